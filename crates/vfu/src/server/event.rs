//! The server's event loop: one epoll set with every device's listening socket, every client
//! connection and every ioeventfd handed out. [`Server::poll_fd`] lets any event loop wait on
//! it; [`Server::process`] handles what is ready. Connections are armed one-shot, so several
//! threads may call [`Server::process`] (or [`Server::run`]) at once and each connection is
//! served by one thread at a time, in order.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::session::{Outcome, SESSIONS, Session};
use super::{DeviceContext, IoEventSpec, lock};

/// A failure of the server itself (not of one client).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Creating the epoll set or the shutdown eventfd failed.
    #[error("creating the event loop")]
    Setup(#[source] std::io::Error),
    /// Binding the device's socket failed.
    #[error("listening on {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// errno.
        #[source]
        source: std::io::Error,
    },
    /// Something already listens at the path.
    #[error("{0} is in use by a live server")]
    InUse(PathBuf),
    /// epoll_wait / epoll_ctl failed.
    #[error("epoll")]
    Epoll(#[source] std::io::Error),
}

enum Source {
    Listener(UnixListener, DeviceContext),
    Session(Arc<Session>),
    IoEvent(std::sync::Weak<Session>, EventFd, IoEventSpec),
    Shutdown,
}

struct Shared {
    epoll: OwnedFd,
    sources: Mutex<HashMap<u64, Arc<Source>>>,
    next: AtomicU64,
    stop: AtomicBool,
    shutdown: EventFd,
    paths: Mutex<Vec<PathBuf>>,
    log: bool,
    /// Sessions open now.
    live: AtomicU64,
    /// Stop when the last client goes ([`Server::exit_when_idle`]).
    exit_when_idle: AtomicBool,
}

/// The vfio-user server: serves every attached device's clients.
#[derive(Clone)]
pub struct Server {
    sh: Arc<Shared>,
}

/// Stops a [`Server`]'s [`run`](Server::run) loops from another thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    sh: Arc<Shared>,
}

impl ShutdownHandle {
    /// Ask the loops to return.
    pub fn shutdown(&self) {
        self.sh.stop.store(true, Ordering::SeqCst);
        let _ = self.sh.shutdown.write(1);
    }
}

const SHUTDOWN_TOKEN: u64 = 0;

/// Most connections to one device at once (one of them its client; the others are being
/// refused or are yet to send VERSION). Past it, new connections are closed at once.
pub const MAX_CONNECTIONS: usize = 8;

/// Session ids, unique in the process.
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

impl Server {
    /// An empty server. `log`: print connection events on stderr.
    pub fn new(log: bool) -> Result<Server, ServeError> {
        // SAFETY: epoll_create1 with a valid flag; the result is checked.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(ServeError::Setup(std::io::Error::last_os_error()));
        }
        // SAFETY: `ep` is a new descriptor we own.
        let epoll = unsafe { OwnedFd::from_raw_fd(ep) };
        let shutdown =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(ServeError::Setup)?;
        let s = Server {
            sh: Arc::new(Shared {
                epoll,
                sources: Mutex::new(HashMap::new()),
                next: AtomicU64::new(1),
                stop: AtomicBool::new(false),
                shutdown,
                paths: Mutex::new(Vec::new()),
                log,
                live: AtomicU64::new(0),
                exit_when_idle: AtomicBool::new(false),
            }),
        };
        s.ctl(
            libc::EPOLL_CTL_ADD,
            s.sh.shutdown.as_raw_fd(),
            SHUTDOWN_TOKEN,
            false,
        )?;
        lock(&s.sh.sources).insert(SHUTDOWN_TOKEN, Arc::new(Source::Shutdown));
        Ok(s)
    }

    /// The epoll fd: readable when [`process`](Server::process) has work.
    pub fn poll_fd(&self) -> RawFd {
        self.sh.epoll.as_raw_fd()
    }

    /// Make [`run`](Server::run) return once a client has come and the last one has gone
    /// (libvfio-user's samples serve one client and exit; so does `device serve --once`).
    pub fn exit_when_idle(&self) {
        self.sh.exit_when_idle.store(true, Ordering::SeqCst);
    }

    /// Clients connected now.
    pub fn clients(&self) -> u64 {
        self.sh.live.load(Ordering::SeqCst)
    }

    /// A handle that stops [`run`](Server::run).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            sh: self.sh.clone(),
        }
    }

    fn ctl(&self, op: i32, fd: RawFd, token: u64, oneshot: bool) -> Result<(), ServeError> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | if oneshot { libc::EPOLLONESHOT } else { 0 }) as u32,
            u64: token,
        };
        // SAFETY: valid epoll fd and event struct; the kernel copies it.
        if unsafe { libc::epoll_ctl(self.sh.epoll.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(ServeError::Epoll(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn add(&self, src: Source, fd: RawFd, oneshot: bool) -> Result<u64, ServeError> {
        let token = self.sh.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.sh.sources).insert(token, Arc::new(src));
        if let Err(e) = self.ctl(libc::EPOLL_CTL_ADD, fd, token, oneshot) {
            lock(&self.sh.sources).remove(&token);
            return Err(e);
        }
        Ok(token)
    }

    pub(crate) fn add_device(&self, dev: DeviceContext, path: &Path) -> Result<(), ServeError> {
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServeError::InUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let l = UnixListener::bind(path).map_err(|source| ServeError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        l.set_nonblocking(true).map_err(|source| ServeError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        let fd = l.as_raw_fd();
        self.add(Source::Listener(l, dev), fd, false)?;
        lock(&self.sh.paths).push(path.to_path_buf());
        Ok(())
    }

    /// Wait up to `timeout` (`None`: forever) and handle what is ready. Returns how many
    /// events were handled.
    pub fn process(&self, timeout: Option<Duration>) -> Result<usize, ServeError> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 16];
        let ms = timeout.map_or(-1, |d| d.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: `evs` has room for 16 events.
        let n = unsafe { libc::epoll_wait(self.sh.epoll.as_raw_fd(), evs.as_mut_ptr(), 16, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(ServeError::Epoll(e));
        }
        for ev in &evs[..n as usize] {
            let token = ev.u64;
            let Some(src) = lock(&self.sh.sources).get(&token).cloned() else {
                continue;
            };
            self.handle(token, &src)?;
        }
        Ok(n as usize)
    }

    fn handle(&self, token: u64, src: &Source) -> Result<(), ServeError> {
        match src {
            Source::Shutdown => {
                let _ = self.sh.shutdown.read();
            }
            Source::Listener(l, dev) => loop {
                match l.accept() {
                    Ok((stream, _)) => {
                        // Non-blocking: messages are assembled piecewise (a client that
                        // stalls mid-message holds up only itself); sends wait for room
                        // up to `sock::SEND_TIMEOUT`.
                        if let Err(e) = stream.set_nonblocking(true) {
                            if self.sh.log {
                                tracing::warn!(device = dev.name(), "vfio-user: accept: {e}");
                            }
                            continue;
                        }
                        let open = lock(&self.sh.sources)
                            .values()
                            .filter(|s| {
                                matches!(&***s, Source::Session(x) if Arc::ptr_eq(&x.dev.0, &dev.0))
                            })
                            .count();
                        if open >= MAX_CONNECTIONS {
                            if self.sh.log {
                                tracing::warn!(
                                    device = dev.name(),
                                    "vfio-user: {open} connections open; refusing another"
                                );
                            }
                            continue;
                        }
                        // Process-wide: sessions are found by id in a global table, and a
                        // process may run several servers.
                        let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
                        let fd = stream.as_raw_fd();
                        let s = Arc::new(Session::new(id, stream, dev.clone()));
                        self.sh.live.fetch_add(1, Ordering::SeqCst);
                        lock(&SESSIONS).insert(id, Arc::downgrade(&s));
                        if self.sh.log {
                            tracing::info!(
                                device = dev.name(),
                                client = id,
                                "vfio-user: client connected"
                            );
                        }
                        self.add(Source::Session(s), fd, true)?;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        if self.sh.log {
                            tracing::warn!(device = dev.name(), "vfio-user: accept: {e}");
                        }
                        break;
                    }
                }
            },
            Source::Session(s) => {
                let out = loop {
                    match s.serve_one() {
                        Outcome::Continue if s.has_backlog() => continue,
                        o => break o,
                    }
                };
                let watch = std::mem::take(&mut *lock(&s.new_ioevents));
                if !watch.is_empty() {
                    // A client asking for a BAR's ioeventfds again gets new ones in place of
                    // the old (which are no longer watched): they do not pile up.
                    let me = Arc::downgrade(s);
                    let old: Vec<(u64, RawFd)> = lock(&self.sh.sources)
                        .iter()
                        .filter_map(|(&t, src)| match &**src {
                            Source::IoEvent(w, efd, spec)
                                if w.ptr_eq(&me)
                                    && watch.iter().any(|(_, n)| n.bar == spec.bar) =>
                            {
                                Some((t, efd.as_raw_fd()))
                            }
                            _ => None,
                        })
                        .collect();
                    for (t, fd) in old {
                        let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, t, true);
                        lock(&self.sh.sources).remove(&t);
                    }
                }
                for (efd, spec) in watch {
                    let fd = efd.as_raw_fd();
                    self.add(Source::IoEvent(Arc::downgrade(s), efd, spec), fd, true)?;
                }
                match out {
                    Outcome::Continue => {
                        self.ctl(libc::EPOLL_CTL_MOD, s.sock.as_raw_fd(), token, true)?;
                    }
                    Outcome::Close(why) => {
                        if self.sh.log {
                            tracing::info!(
                                device = s.dev.name(),
                                client = s.id,
                                "vfio-user: client disconnected: {why}"
                            );
                        }
                        self.drop_session(token, s);
                    }
                }
            }
            Source::IoEvent(weak, efd, spec) => {
                let _ = efd.read();
                match weak.upgrade() {
                    Some(s) => {
                        let v = spec.datamatch.unwrap_or(0).to_le_bytes();
                        let n = (spec.size as usize).min(8);
                        let mut data = v[..n].to_vec();
                        if let Err(e) = s.dev.region_access(spec.bar, spec.offset, &mut data, true)
                            && self.sh.log
                        {
                            tracing::warn!(
                                device = s.dev.name(),
                                "vfio-user: ioeventfd write: {e}"
                            );
                        }
                        // Not fatal: the client may have replaced or dropped this ioeventfd
                        // meanwhile (then it is no longer in the set).
                        let _ = self.ctl(libc::EPOLL_CTL_MOD, efd.as_raw_fd(), token, true);
                    }
                    None => {
                        let _ = self.ctl(libc::EPOLL_CTL_DEL, efd.as_raw_fd(), token, true);
                        lock(&self.sh.sources).remove(&token);
                    }
                }
            }
        }
        Ok(())
    }

    fn drop_session(&self, token: u64, s: &Arc<Session>) {
        let _ = self.ctl(libc::EPOLL_CTL_DEL, s.sock.as_raw_fd(), token, true);
        lock(&self.sh.sources).remove(&token);
        lock(&SESSIONS).remove(&s.id);
        s.fail_pending();
        s.dev.forget_session(s.id);
        s.dev.release(s.id);
        let _ = s.sock.shutdown(std::net::Shutdown::Both);
        // After the shutdown: a request sent from now on fails at once.
        s.fail_pending();
        // The ioeventfds handed to this client go with it.
        let me = Arc::downgrade(s);
        let gone: Vec<(u64, RawFd)> = lock(&self.sh.sources)
            .iter()
            .filter_map(|(&t, src)| match &**src {
                Source::IoEvent(w, efd, _) if w.ptr_eq(&me) => Some((t, efd.as_raw_fd())),
                _ => None,
            })
            .collect();
        for (t, fd) in gone {
            let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, t, true);
            lock(&self.sh.sources).remove(&t);
        }
        if self.sh.live.fetch_sub(1, Ordering::SeqCst) == 1
            && self.sh.exit_when_idle.load(Ordering::SeqCst)
        {
            self.sh.stop.store(true, Ordering::SeqCst);
            let _ = self.sh.shutdown.write(1);
        }
    }

    /// Serve until [`ShutdownHandle::shutdown`].
    pub fn run(&self) -> Result<(), ServeError> {
        while !self.sh.stop.load(Ordering::SeqCst) {
            self.process(Some(Duration::from_millis(500)))?;
        }
        Ok(())
    }

    /// Serve from `threads` threads (this one included) until shut down.
    pub fn run_threads(&self, threads: usize) -> Result<(), ServeError> {
        let hs: Vec<_> = (1..threads.max(1))
            .map(|_| {
                let s = self.clone();
                std::thread::spawn(move || s.run())
            })
            .collect();
        let r = self.run();
        for h in hs {
            let _ = h.join();
        }
        r
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        for p in lock(&self.paths).drain(..) {
            let _ = std::fs::remove_file(p);
        }
    }
}
