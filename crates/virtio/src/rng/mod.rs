//! The virtio rng device (being written).
