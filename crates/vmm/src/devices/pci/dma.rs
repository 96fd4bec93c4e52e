//! How vfio-user devices reach guest memory.
//!
//! - [`DmaBacking::Memfd`]: guest memory is a memfd, mapped by each device (`DMA_MAP` with
//!   the fd): the device reads and writes it directly, the fastest path. Used whenever the
//!   memory is whole and shareable: a fresh boot, an eager restore, a pre-copy destination.
//! - [`DmaBacking::Messages`]: memory that arrives on demand (a lazy or prefetch restore, a
//!   post-copy or hybrid destination) or that cannot be shared (an `mmap` restore's private
//!   file mapping). A device's own mapping would bypass the userfaultfd that fills that
//!   memory: it would read pages not yet there as zeros, and the pages' arrival would
//!   overwrite what it wrote. So the device gets the memory without an fd and reaches it
//!   through `DMA_READ` / `DMA_WRITE` messages, which the VMM serves from its own mapping
//!   ([`GuestDma`]), where a missing page faults and is fetched like any other. A thread per
//!   device ([`serve`]) answers the device's requests whenever no call is in flight (a call
//!   answers them in passing). The VMM logs the pages those messages write (the protocol
//!   leaves that to the client), for pre-copy.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vfu::client::{Client, ClientError, DmaMemory};
use virtio::dirty::DirtyPages;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;

/// Where devices find guest memory.
pub enum DmaBacking<'a> {
    /// The memory's memfd, mapped by each device.
    Memfd(&'a std::fs::File),
    /// Through messages the VMM serves from this memory.
    Messages(Arc<GuestMem>),
}

/// Guest memory served to a device through `DMA_READ` / `DMA_WRITE` messages: volatile
/// copies through vm-memory; writes are logged in `dirty` while it tracks.
pub struct GuestDma {
    pub(super) mem: Arc<GuestMem>,
    pub(super) dirty: Arc<DirtyPages>,
}

impl DmaMemory for GuestDma {
    fn read(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.mem.mem().read_slice(buf, GuestAddress(offset)).is_ok()
    }

    fn write(&self, offset: u64, data: &[u8]) -> bool {
        let ok = self
            .mem
            .mem()
            .write_slice(data, GuestAddress(offset))
            .is_ok();
        if ok {
            self.dirty.mark(offset, data.len() as u64);
        }
        ok
    }
}

/// How long the serving thread waits for a request before it looks at `stop` again.
const SERVE_POLL: Duration = Duration::from_millis(100);

/// Answer the device's DMA requests until `stop` or until the device goes away: wait until
/// its socket is readable, then serve what is there (taking the client's lock: when a call
/// holds it, that call answers them in passing and nothing is left here).
pub fn serve(client: Arc<Client>, stop: Arc<AtomicBool>, name: String) {
    let fd = client.raw_fd();
    while !stop.load(Ordering::SeqCst) {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack; the fd stays open as long as `client`, which this
        // thread holds.
        let n = unsafe { libc::poll(&mut p, 1, SERVE_POLL.as_millis() as libc::c_int) };
        if n <= 0 {
            continue; // timeout, or EINTR
        }
        match client.serve_requests(Duration::ZERO, 64) {
            Ok(_) => {}
            Err(ClientError::Disconnected(_)) => {
                tracing::warn!(device = %name, "vfio-user device went away");
                return;
            }
            Err(e) => {
                tracing::warn!(device = %name, "serving the device's DMA: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
