//! The virtio blk device (being written).
