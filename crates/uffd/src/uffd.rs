//! Creating a userfaultfd, registering ranges and resolving faults.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::time::Duration;

use crate::error::{CreateError, Op, ReadError, RegisterError, ResolveError};
use crate::sys;
use crate::{ContinueMode, CopyMode, Features, Ioctls, MoveMode, Range, RegisterMode};

/// How the file descriptor was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd` (access controlled by the device's mode).
    Device,
    /// The `userfaultfd(2)` syscall.
    Syscall,
    /// Delivered by a `UFFD_EVENT_FORK` event, or adopted with [`Uffd::from_owned_fd`].
    Inherited,
}

/// Where to create the userfaultfd from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Via {
    /// `/dev/userfaultfd`, falling back to the syscall if the device is absent or denied.
    #[default]
    Auto,
    /// `/dev/userfaultfd` only.
    Device,
    /// The syscall only.
    Syscall,
}

/// What the running kernel offers, probed with a throwaway userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Support {
    /// Every feature `UFFDIO_API` reports.
    pub features: Features,
    /// The ioctls the API reports on the fd itself.
    pub ioctls: Ioctls,
    /// How the probe's fd was created.
    pub origin: Origin,
}

impl Support {
    /// Probe the kernel once per process (kernel-mode faults allowed, i.e. the mode KVM needs);
    /// later calls return the cached answer.
    pub fn probe() -> Result<Support, CreateError> {
        static CACHE: OnceLock<Support> = OnceLock::new();
        if let Some(s) = CACHE.get() {
            return Ok(*s);
        }
        let b = UffdBuilder::new();
        let (fd, origin) = b.open()?;
        let mut api = sys::uffdio_api {
            api: sys::UFFD_API,
            features: 0,
            ioctls: 0,
        };
        ioctl(fd.as_raw_fd(), sys::UFFDIO_API, &mut api).map_err(|source| {
            CreateError::Handshake {
                requested: Features::empty(),
                source,
            }
        })?;
        let s = Support {
            features: Features::from_bits_retain(api.features),
            ioctls: Ioctls::from_bits_retain(api.ioctls),
            origin,
        };
        Ok(*CACHE.get_or_init(|| s))
    }
}

/// Builds a [`Uffd`].
///
/// Defaults: close-on-exec, non-blocking, kernel-mode faults allowed (KVM needs them for guest
/// memory), no optional features, `/dev/userfaultfd` with a syscall fallback.
///
/// ```no_run
/// use uffd::{Features, UffdBuilder};
/// let uffd = UffdBuilder::new()
///     .require_features(Features::THREAD_ID | Features::EVENT_REMOVE)
///     .create()?;
/// println!("features: {:?}", uffd.features());
/// # Ok::<(), uffd::CreateError>(())
/// ```
#[derive(Debug, Clone)]
pub struct UffdBuilder {
    close_on_exec: bool,
    non_blocking: bool,
    user_mode_only: bool,
    features: Features,
    via: Via,
}

impl Default for UffdBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl UffdBuilder {
    /// A builder with the defaults above.
    pub fn new() -> Self {
        Self {
            close_on_exec: true,
            non_blocking: true,
            user_mode_only: false,
            features: Features::empty(),
            via: Via::Auto,
        }
    }

    /// Close the fd on `exec` (default true).
    pub fn close_on_exec(mut self, on: bool) -> Self {
        self.close_on_exec = on;
        self
    }

    /// Make `read` return `EAGAIN` instead of blocking (default true).
    pub fn non_blocking(mut self, on: bool) -> Self {
        self.non_blocking = on;
        self
    }

    /// Only handle faults taken in user mode (`UFFD_USER_MODE_ONLY`; default false). Must stay
    /// off for guest memory: KVM touches it from kernel mode.
    pub fn user_mode_only(mut self, on: bool) -> Self {
        self.user_mode_only = on;
        self
    }

    /// Features that must be enabled; creation fails with [`CreateError::Unsupported`] if the
    /// kernel lacks any of them.
    pub fn require_features(mut self, f: Features) -> Self {
        self.features |= f;
        self
    }

    /// Where to create the fd from (default [`Via::Auto`]).
    pub fn via(mut self, via: Via) -> Self {
        self.via = via;
        self
    }

    fn flags(&self) -> i32 {
        let mut flags = 0;
        if self.close_on_exec {
            flags |= libc::O_CLOEXEC;
        }
        if self.non_blocking {
            flags |= libc::O_NONBLOCK;
        }
        if self.user_mode_only {
            flags |= sys::UFFD_USER_MODE_ONLY;
        }
        flags
    }

    fn open_device(&self) -> Result<OwnedFd, CreateError> {
        const DEV: &CStr = c"/dev/userfaultfd";
        // SAFETY: DEV is a valid NUL-terminated path; open has no other preconditions.
        let dev = unsafe { libc::open(DEV.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if dev < 0 {
            return Err(CreateError::OpenDevice(io::Error::last_os_error()));
        }
        // SAFETY: `dev` was just returned by open and is owned by nobody else.
        let dev = unsafe { OwnedFd::from_raw_fd(dev) };
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd.
        let fd = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                sys::USERFAULTFD_IOC_NEW as libc::Ioctl,
                self.flags(),
            )
        };
        if fd < 0 {
            return Err(CreateError::DeviceNew(io::Error::last_os_error()));
        }
        // SAFETY: the ioctl returned a fresh fd that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn open_syscall(&self, device: String) -> Result<OwnedFd, CreateError> {
        // SAFETY: userfaultfd(2) takes flags by value and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, self.flags()) };
        if fd < 0 {
            return Err(CreateError::Syscall {
                device,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: the syscall returned a fresh fd that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    fn open(&self) -> Result<(OwnedFd, Origin), CreateError> {
        match self.via {
            Via::Device => Ok((self.open_device()?, Origin::Device)),
            Via::Syscall => Ok((self.open_syscall("not tried".into())?, Origin::Syscall)),
            Via::Auto => match self.open_device() {
                Ok(fd) => Ok((fd, Origin::Device)),
                Err(e) => {
                    let why = crate::error_chain(&e);
                    Ok((self.open_syscall(why)?, Origin::Syscall))
                }
            },
        }
    }

    /// Create the userfaultfd and complete the `UFFDIO_API` handshake.
    pub fn create(&self) -> Result<Uffd, CreateError> {
        if !self.features.is_empty() {
            let supported = Support::probe()?.features;
            let missing = self.features - supported;
            if !missing.is_empty() {
                return Err(CreateError::Unsupported { missing, supported });
            }
        }
        let (fd, origin) = self.open()?;
        let mut api = sys::uffdio_api {
            api: sys::UFFD_API,
            features: self.features.bits(),
            ioctls: 0,
        };
        ioctl(fd.as_raw_fd(), sys::UFFDIO_API, &mut api).map_err(|source| {
            CreateError::Handshake {
                requested: self.features,
                source,
            }
        })?;
        let mut features = self.features;
        // The kernel turns WP_UNPOPULATED on with WP_ASYNC.
        if features.contains(Features::WP_ASYNC) {
            features |= Features::WP_UNPOPULATED;
        }
        Ok(Uffd {
            fd,
            features,
            supported: Features::from_bits_retain(api.features),
            ioctls: Ioctls::from_bits_retain(api.ioctls),
            origin,
        })
    }
}

/// What a resolve operation achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// The whole range was done; the value is its length in bytes.
    Done(usize),
    /// The first page was already present (`EEXIST`): someone resolved it first. The range was
    /// woken so that no thread stays blocked on it.
    AlreadyPresent,
}

/// A userfaultfd: owns the fd; every operation is a method; `Send + Sync` (the kernel
/// serialises what needs serialising).
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: Features,
    supported: Features,
    ioctls: Ioctls,
    origin: Origin,
}

pub(crate) fn ioctl<T>(fd: RawFd, req: u32, arg: &mut T) -> io::Result<i32> {
    // SAFETY: every request number used with this helper is an `_IOR`/`_IOWR` ioctl whose
    // argument type is `T` (checked at compile time in `sys`); `arg` is a valid, exclusive
    // pointer to a `T` for the duration of the call.
    let r = unsafe { libc::ioctl(fd, req as libc::Ioctl, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Uffd {
    /// Adopt an fd known to be a userfaultfd that completed `UFFDIO_API` with `features`
    /// (for example one received over a Unix socket). Operations on an fd that is not a
    /// userfaultfd fail with the kernel's errno (`EBADF`/`ENOTTY`/`EINVAL`), never UB.
    pub fn from_owned_fd(fd: OwnedFd, features: Features) -> Uffd {
        Uffd {
            fd,
            features,
            supported: features,
            ioctls: Ioctls::REGISTER | Ioctls::UNREGISTER | Ioctls::API,
            origin: Origin::Inherited,
        }
    }

    pub(crate) fn inherit(&self, fd: OwnedFd) -> Uffd {
        Uffd {
            fd,
            features: self.features,
            supported: self.supported,
            ioctls: self.ioctls,
            origin: Origin::Inherited,
        }
    }

    /// Features enabled on this fd.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Every feature the kernel reported in the handshake.
    pub fn supported_features(&self) -> Features {
        self.supported
    }

    /// The ioctls the handshake reported for the fd itself.
    pub fn api_ioctls(&self) -> Ioctls {
        self.ioctls
    }

    /// How the fd was obtained.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// Switch `read` between non-blocking (`EAGAIN` when nothing is pending) and blocking.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        // SAFETY: F_GETFL / F_SETFL on an fd we own.
        let fl = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_GETFL) };
        if fl < 0 {
            return Err(io::Error::last_os_error());
        }
        let new = if on {
            fl | libc::O_NONBLOCK
        } else {
            fl & !libc::O_NONBLOCK
        };
        // SAFETY: as above.
        if unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_SETFL, new) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Register `range` in `mode`; returns the ioctls the kernel allows on it.
    pub fn register(&self, range: Range, mode: RegisterMode) -> Result<Ioctls, RegisterError> {
        let mut need = Features::empty();
        if mode.contains(RegisterMode::WP) && !self.features.contains(Features::PAGEFAULT_FLAG_WP) {
            // Sync WP needs fault reporting; async WP resolves by itself.
            if !self.features.contains(Features::WP_ASYNC) {
                need |= Features::PAGEFAULT_FLAG_WP;
            }
        }
        if !need.is_empty() {
            return Err(RegisterError::ModeNeedsFeature {
                range,
                mode,
                missing: need,
            });
        }
        let mut arg = sys::uffdio_register {
            range: range.as_raw(),
            mode: mode.bits(),
            ioctls: 0,
        };
        ioctl(self.fd.as_raw_fd(), sys::UFFDIO_REGISTER, &mut arg).map_err(|source| {
            RegisterError::Register {
                range,
                mode,
                source,
            }
        })?;
        Ok(Ioctls::from_bits_retain(arg.ioctls))
    }

    /// Unregister `range`; threads blocked on faults in it are woken and fault normally.
    pub fn unregister(&self, range: Range) -> Result<(), RegisterError> {
        let mut arg = range.as_raw();
        ioctl(self.fd.as_raw_fd(), sys::UFFDIO_UNREGISTER, &mut arg)
            .map_err(|source| RegisterError::Unregister { range, source })?;
        Ok(())
    }

    /// Turn an ioctl result and the kernel's progress field into a [`Resolved`].
    fn outcome(
        &self,
        op: Op,
        range: Range,
        res: io::Result<i32>,
        progress: i64,
    ) -> Result<Resolved, ResolveError> {
        let source = match res {
            Ok(_) => return Ok(Resolved::Done(range.len())),
            Err(e) => e,
        };
        match source.raw_os_error() {
            Some(libc::EAGAIN) => Err(ResolveError::Partial {
                op,
                range,
                done: usize::try_from(progress).unwrap_or(0),
                source,
            }),
            Some(libc::EEXIST) => {
                self.wake(range)?;
                Ok(Resolved::AlreadyPresent)
            }
            Some(libc::ENOENT | libc::ESRCH) => Err(ResolveError::TargetGone { op, range, source }),
            _ => Err(ResolveError::Failed { op, range, source }),
        }
    }

    /// `UFFDIO_COPY`: atomically fill the missing pages of `dst` with `src[..dst.len()]`.
    pub fn copy(&self, dst: Range, src: &[u8], mode: CopyMode) -> Result<Resolved, ResolveError> {
        if src.len() < dst.len() {
            return Err(ResolveError::ShortSource {
                op: Op::Copy,
                range: dst,
                given: src.len(),
            });
        }
        let mut arg = sys::uffdio_copy {
            dst: dst.start() as u64,
            src: src.as_ptr() as u64,
            len: dst.len() as u64,
            mode: mode.bits(),
            copy: 0,
        };
        let res = ioctl(self.fd.as_raw_fd(), sys::UFFDIO_COPY, &mut arg);
        self.outcome(Op::Copy, dst, res, arg.copy)
    }

    /// `UFFDIO_ZEROPAGE`: map zero pages over the missing pages of `range`.
    pub fn zeropage(&self, range: Range, dont_wake: bool) -> Result<Resolved, ResolveError> {
        let mut arg = sys::uffdio_zeropage {
            range: range.as_raw(),
            mode: if dont_wake {
                sys::UFFDIO_ZEROPAGE_MODE_DONTWAKE
            } else {
                0
            },
            zeropage: 0,
        };
        let res = ioctl(self.fd.as_raw_fd(), sys::UFFDIO_ZEROPAGE, &mut arg);
        self.outcome(Op::ZeroPage, range, res, arg.zeropage)
    }

    /// `UFFDIO_CONTINUE`: map the page-cache pages behind `range` (MINOR faults).
    pub fn continue_range(
        &self,
        range: Range,
        mode: ContinueMode,
    ) -> Result<Resolved, ResolveError> {
        let mut arg = sys::uffdio_continue {
            range: range.as_raw(),
            mode: mode.bits(),
            mapped: 0,
        };
        let res = ioctl(self.fd.as_raw_fd(), sys::UFFDIO_CONTINUE, &mut arg);
        self.outcome(Op::Continue, range, res, arg.mapped)
    }

    /// `UFFDIO_WRITEPROTECT`: set (`protect = true`) or clear write protection on `range`.
    /// Clearing wakes the threads blocked on WP faults in it unless `dont_wake`.
    pub fn write_protect(
        &self,
        range: Range,
        protect: bool,
        dont_wake: bool,
    ) -> Result<(), ResolveError> {
        let mut mode = 0;
        if protect {
            mode |= sys::UFFDIO_WRITEPROTECT_MODE_WP;
        }
        if dont_wake {
            mode |= sys::UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
        }
        let mut arg = sys::uffdio_writeprotect {
            range: range.as_raw(),
            mode,
        };
        let res = ioctl(self.fd.as_raw_fd(), sys::UFFDIO_WRITEPROTECT, &mut arg);
        self.outcome(Op::WriteProtect, range, res, 0).map(|_| ())
    }

    /// `UFFDIO_POISON`: make accesses to the missing pages of `range` raise `SIGBUS`
    /// (for memory lost on the source, as with hardware poison).
    pub fn poison(&self, range: Range, dont_wake: bool) -> Result<Resolved, ResolveError> {
        let mut arg = sys::uffdio_poison {
            range: range.as_raw(),
            mode: if dont_wake {
                sys::UFFDIO_POISON_MODE_DONTWAKE
            } else {
                0
            },
            updated: 0,
        };
        let res = ioctl(self.fd.as_raw_fd(), sys::UFFDIO_POISON, &mut arg);
        self.outcome(Op::Poison, range, res, arg.updated)
    }

    /// `UFFDIO_MOVE`: move the pages of `src` into the missing pages of `dst` (same length)
    /// without copying; `src` is left unmapped.
    ///
    /// # Safety
    ///
    /// The pages of `src` disappear from the caller's address space: no live Rust reference
    /// may point into `src` (reads through one would see different memory). `dst` follows the
    /// same rules as [`copy`](Self::copy).
    pub unsafe fn move_pages(
        &self,
        dst: Range,
        src: Range,
        mode: MoveMode,
    ) -> Result<Resolved, ResolveError> {
        if src.len() < dst.len() {
            return Err(ResolveError::ShortSource {
                op: Op::Move,
                range: dst,
                given: src.len(),
            });
        }
        let mut arg = sys::uffdio_move {
            dst: dst.start() as u64,
            src: src.start() as u64,
            len: dst.len() as u64,
            mode: mode.bits(),
            move_: 0,
        };
        let res = ioctl(self.fd.as_raw_fd(), sys::UFFDIO_MOVE, &mut arg);
        self.outcome(Op::Move, dst, res, arg.move_)
    }

    /// `UFFDIO_WAKE`: wake the threads blocked on faults in `range` (after `DONTWAKE` ops).
    pub fn wake(&self, range: Range) -> Result<(), ResolveError> {
        let mut arg = range.as_raw();
        ioctl(self.fd.as_raw_fd(), sys::UFFDIO_WAKE, &mut arg).map_err(|source| {
            ResolveError::Failed {
                op: Op::Wake,
                range,
                source,
            }
        })?;
        Ok(())
    }

    /// Wait until events are readable; `Ok(false)` on timeout (`None` waits forever).
    pub fn poll_readable(&self, timeout: Option<Duration>) -> Result<bool, ReadError> {
        poll_in(&[self.fd.as_fd()], timeout)
            .map(|r| r != 0)
            .map_err(ReadError::Poll)
    }
}

/// `poll(2)` for readability on `fds` (at most 64); returns a bit mask of the ready ones
/// (bit `i` for `fds[i]`), 0 on timeout.
pub fn poll_in(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> io::Result<u64> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(pfds
            .iter()
            .take(64)
            .enumerate()
            .filter(|(_, p)| p.revents != 0)
            .fold(0, |m, (i, _)| m | (1 << i)));
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl IntoRawFd for Uffd {
    fn into_raw_fd(self) -> RawFd {
        self.fd.into_raw_fd()
    }
}

impl From<Uffd> for OwnedFd {
    fn from(u: Uffd) -> OwnedFd {
        u.fd
    }
}
