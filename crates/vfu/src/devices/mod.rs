//! Example devices built on the framework, served by `faultline device serve` and driven by
//! the built-in guest.

pub mod dma;
pub mod gpio;
pub mod sample;
