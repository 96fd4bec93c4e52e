//! The virtio net device (being written).
