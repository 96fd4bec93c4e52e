//! vfio-user for faultline: the protocol, a device framework (server) and a client.
//!
//! vfio-user (QEMU `docs/interop/vfio-user.rst`, which libvfio-user follows) lets a PCI
//! device be an ordinary process: a client (a VMM) talks to it over a Unix socket, passing
//! file descriptors for guest memory, interrupts and mappable device memory.
//!
//! - [`proto`]: the wire format (16-byte header, per-command payloads, the VERSION
//!   capabilities JSON), with pure, fuzzed decoders. Protocol version 0.1.
//! - [`server`]: the device framework. An author describes a device (IDs, BARs with
//!   memfd-backed sparse mmap areas, PM / MSI / MSI-X / PCIe / extended capabilities,
//!   ioeventfds) and implements [`server::DeviceOps`]; the framework owns config space, DMA
//!   translation and interrupts, DMA dirty-page logging and the migration v2 state machine
//!   (STOP_COPY and PRE_COPY), with a thread-safe data path, a poll fd, and several devices
//!   and clients per process.
//! - [`client`]: what a VMM (or `faultline device probe`) uses to drive any vfio-user server.
//! - [`devices`]: example devices: a GPIO card with the register layout of Linux's
//!   `gpio-pci-idio-16` driver, a DMA copy engine with MSI-X completion interrupts, and the
//!   device of libvfio-user's `samples/server`, which libvfio-user's own client tests.
//!
//! Why not the `vfio_user` crate of rust-vmm: its server handles one client with one
//! backend callback per command and leaves config space, interrupts and DMA to the device;
//! its client has no timeouts and trusts the server's replies. Its client and server are
//! used here as independent peers in the interoperability tests.
//!
//! Wire details follow the specification: little-endian host order, the reply echoing the
//! command's message ID, error replies carrying an errno, fds attached to the message's
//! first bytes.

pub mod client;
pub mod devices;
pub mod proto;
pub mod server;
pub mod sock;
