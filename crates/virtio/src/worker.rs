//! A device's thread: it waits on the queues' notify eventfds (KVM ioeventfds: a guest's
//! notify never exits to userspace), on the backend's fds and on a stop eventfd, and calls
//! the transport. One thread per device, so a slow backend never holds up another device.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::mmio::MmioTransport;

const STOP: u64 = u64::MAX;
const RESYNC: u64 = u64::MAX - 1;
const BACKEND: u64 = 1 << 32;

/// Starting a device's thread failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// An eventfd, the epoll instance or the thread could not be made.
    #[error("{what}")]
    Io {
        /// What.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A running device: its transport, its notify eventfds and its thread.
#[derive(Debug)]
pub struct Worker {
    transport: Arc<Mutex<MmioTransport>>,
    notify: Vec<EventFd>,
    stop: EventFd,
    resync: EventFd,
    thread: Option<JoinHandle<()>>,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> WorkerError {
    move |source| WorkerError::Io { what, source }
}

impl Worker {
    /// Start the thread of `transport`, named `name`.
    pub fn spawn(transport: MmioTransport, name: String) -> Result<Worker, WorkerError> {
        Self::spawn_polling(transport, name, Duration::ZERO)
    }

    /// The same, and after each event the thread polls the queues for up to `poll` (extended
    /// each time it finds work) with the driver's notifies turned off, as QEMU's iothreads
    /// do (`poll-max-ns`): a request then costs the guest no exit and the device no wake-up,
    /// at the price of a CPU spinning while the window is open.
    pub fn spawn_polling(
        transport: MmioTransport,
        name: String,
        poll: Duration,
    ) -> Result<Worker, WorkerError> {
        let n = transport.num_queues();
        let transport = Arc::new(Mutex::new(transport));
        let notify = (0..n)
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(io("notify eventfd")))
            .collect::<Result<Vec<_>, _>>()?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(io("stop eventfd"))?;
        let resync = EventFd::new(EFD_NONBLOCK).map_err(io("resync eventfd"))?;
        let epoll = Epoll::new().map_err(io("epoll_create"))?;
        for (i, e) in notify.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    e.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, i as u64),
                )
                .map_err(io("epoll_ctl"))?;
        }
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP),
            )
            .map_err(io("epoll_ctl"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                resync.as_raw_fd(),
                EpollEvent::new(EventSet::IN, RESYNC),
            )
            .map_err(io("epoll_ctl"))?;
        let resync_fd = resync.try_clone().map_err(io("eventfd dup"))?;
        let fds = notify
            .iter()
            .map(|e| e.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(io("eventfd dup"))?;
        let t = transport.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(t, fds, resync_fd, epoll, poll))
            .map_err(io("spawn"))?;
        Ok(Worker {
            transport,
            notify,
            stop,
            resync,
            thread: Some(thread),
        })
    }

    /// The transport (the VMM's MMIO exits go to it).
    pub fn transport(&self) -> &Arc<Mutex<MmioTransport>> {
        &self.transport
    }

    /// Queue `q`'s notify eventfd, to register as a KVM ioeventfd.
    pub fn notify_fd(&self, q: usize) -> Option<&EventFd> {
        self.notify.get(q)
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.notify.len()
    }

    /// Notify queue `q` from the VMM (a trapped QueueNotify write).
    pub fn notify(&self, q: usize) {
        if let Some(e) = self.notify.get(q) {
            let _ = e.write(1);
        }
    }

    /// Have the thread ask the device again which backend fds to poll (after the driver
    /// changed the device's status: activation, reset).
    pub fn resync(&self) {
        let _ = self.resync.write(1);
    }

    /// Let a frozen device go on ([`MmioTransport::thaw`]): its thread runs every queue
    /// once and polls the backend again.
    pub fn thaw(&self) {
        if let Ok(mut t) = self.transport.lock() {
            t.thaw();
        }
        for q in 0..self.notify.len() {
            self.notify(q);
        }
        self.resync();
    }

    /// Stop the thread and wait for it.
    pub fn stop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    transport: Arc<Mutex<MmioTransport>>,
    notify: Vec<EventFd>,
    resync: EventFd,
    epoll: Epoll,
    poll: Duration,
) {
    let mut events = vec![EpollEvent::default(); 16];
    let mut polled: HashSet<RawFd> = HashSet::new();
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio worker: epoll_wait failed: {e}");
                return;
            }
        };
        let Ok(mut t) = transport.lock() else {
            return;
        };
        for ev in &events[..n] {
            let data = ev.data();
            if data == STOP {
                return;
            }
            if data == RESYNC {
                let _ = resync.read();
                continue;
            }
            if data & BACKEND != 0 {
                t.backend_ready(data as u32 as RawFd);
            } else if let Some(e) = notify.get(data as usize) {
                let _ = e.read();
                t.notify(data as usize);
            }
        }
        // Keep the backend fds polled as the device wants them. Every wanted fd is added
        // again each round (EEXIST ignored): a device may close an fd and get the same number
        // back for a new stream within one batch, which epoll dropped with the old file.
        let want: HashSet<RawFd> = t.poll_fds().into_iter().collect();
        drop(t);
        for fd in polled.difference(&want) {
            let _ = epoll.ctl(ControlOperation::Delete, *fd, EpollEvent::default());
        }
        for fd in &want {
            let ev = EpollEvent::new(EventSet::IN, BACKEND | u64::from(*fd as u32));
            match epoll.ctl(ControlOperation::Add, *fd, ev) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => tracing::warn!("virtio worker: cannot poll fd {fd}: {e}"),
            }
        }
        polled = want;
        if !poll.is_zero() {
            poll_window(&transport, &notify, poll);
        }
    }
}

/// Poll the queues until `window` passes with nothing to do; notifies are off meanwhile.
fn poll_window(transport: &Mutex<MmioTransport>, notify: &[EventFd], window: Duration) {
    let Ok(mut t) = transport.lock() else { return };
    if !t.active() {
        return;
    }
    t.suppress_notifies(true);
    drop(t);
    let mut until = Instant::now() + window;
    loop {
        let Ok(mut t) = transport.lock() else { return };
        if t.poll_queues() {
            until = Instant::now() + window;
        }
        if Instant::now() >= until || !t.active() {
            drop(t);
            // Notifies that came while the flag was being seen are stale: drop them, then
            // turn notifies on and look once more (a chain made available just before the
            // flag changed was not notified; one after it will be, through the eventfd).
            for e in notify {
                let _ = e.read();
            }
            if let Ok(mut t) = transport.lock() {
                t.suppress_notifies(false);
                t.poll_queues();
            }
            return;
        }
        drop(t);
        std::hint::spin_loop();
    }
}
