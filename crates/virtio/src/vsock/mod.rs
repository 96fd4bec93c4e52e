//! The virtio vsock device (being written).
