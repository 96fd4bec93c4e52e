//! Example devices built on the framework, served by `faultline device serve`: the GPIO card
//! and the DMA engine (driven by the built-in guest), and libvfio-user's sample device
//! (driven by libvfio-user's own client in the interop tests).

pub mod dma;
pub mod gpio;
pub mod sample;
