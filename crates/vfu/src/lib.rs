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
//!   per process (one client each at a time).
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
//!
//! # Sharing: one client per device
//!
//! A device has one client at a time, as with libvfio-user: the first connection to
//! negotiate (`VERSION`) owns the device, and another connection's `VERSION` gets an error
//! reply with `EBUSY` (the client's [`client::ClientError::Server`]) and is closed. When the
//! owner disconnects (or merely hangs up, closing or shutting down its writing end: a new
//! client is let in at once, even before the server has read the old connection's end), what
//! it installed goes with it: its DMA
//! mappings, its interrupt eventfds and its ioeventfds. So no client can unmap, replace or
//! drop another's state. Several devices (each with its own client) share one [`server::Server`]
//! and its threads, and a client of one device cannot disturb another device's client.
//!
//! # Limits
//!
//! Everything a client controls is bounded before use, by what the server advertised in its
//! `VERSION` reply or by a fixed limit; a request past a bound gets an error reply with an
//! errno and the session goes on.
//!
//! | what | bound | errno |
//! |---|---|---|
//! | message data (REGION_READ/WRITE count, MIG_DATA size) | `max_data_xfer_size` 1 MiB | `EINVAL` |
//! | fds in one message | 64 (each command takes its exact count) | connection closed / `EINVAL` |
//! | DMA mappings | `max_dma_maps` 4096 | `ENOSPC` |
//! | bytes mapped in all (with or without fds) | 256 TiB | `ENOSPC` |
//! | dirty bitmaps of all mappings while logging | 64 MiB (2 TiB in 4 KiB pages), allocated fallibly | `ENOMEM` |
//! | one `DMA_LOGGING_REPORT` bitmap | `max_bitmap_size` 256 KiB (8 GiB in 4 KiB pages) | `E2BIG` |
//! | mappings of fds not sealed against shrinking, per process | 4096 | `ENOSPC` |
//! | connections to one device (the client and those being refused) | [`server::MAX_CONNECTIONS`] 8; more are closed at once | — |
//! | ioeventfds | one set per BAR and client: asking again replaces them | — |
//!
//! Shrinking files: the BAR memfds the server hands out are sealed (`F_SEAL_SHRINK |
//! F_SEAL_GROW | F_SEAL_SEAL`). A client's DMA fd that is not sealed against shrinking is
//! still accepted (libvfio-user's own client maps an unsealed `mkstemp` file), but its mapping
//! is guarded: if the client truncates the file, the SIGBUS of the server's next access is
//! caught, the vanished pages are replaced by anonymous ones, and that DMA (and every later
//! one through the mapping) fails with [`server::DmaError::Truncated`] while the process, its
//! other devices and clients go on. faultline's [`client`] hands only sealed fds
//! ([`client::Client::dma_map_fd`] refuses others) and the VMM's guest memfd is sealed.
//!
//! The client bounds what a server says the same way: the server's `max_data_xfer_size` is
//! capped at 1 MiB ([`client::CLIENT_MAX_DATA_XFER`]), and a device that describes sparse
//! mmap areas whose file offset overflows (or leaves `off_t`), ioeventfds outside their
//! region, too many regions or IRQs, or capability chains that loop is refused at connect
//! time with [`client::ClientError::Protocol`].

pub mod client;
pub mod devices;
pub mod proto;
pub mod server;
pub mod sock;
