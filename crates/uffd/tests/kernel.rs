//! Every ioctl and event of the `uffd` crate against the running kernel: no mocks.
//! These tests need userfaultfd with kernel-mode faults (root or /dev/userfaultfd access);
//! without it they fail with the creation error, they never skip.

use std::os::fd::AsRawFd;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use uffd::*;

/// Tests that fork hold this: a FORK-event uffd of one test would otherwise see (and block)
/// the other test's fork.
static FORK_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn page() -> usize {
    page_size()
}

/// An `mmap`ed area, unmapped on drop.
struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    fn anon(pages: usize) -> Mapping {
        Self::map(pages, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
    }

    fn shared_fd(pages: usize, fd: i32) -> Mapping {
        Self::map(pages, libc::MAP_SHARED, fd)
    }

    fn map(pages: usize, flags: i32, fd: i32) -> Mapping {
        let len = pages * page();
        // SAFETY: a fresh mapping chosen by the kernel; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Mapping {
            addr: p as usize,
            len,
        }
    }

    fn range(&self) -> Range {
        Range::new(self.addr, self.len).unwrap()
    }

    fn page(&self, i: usize) -> Range {
        Range::new(self.addr + i * page(), page()).unwrap()
    }

    fn read(&self, off: usize) -> u8 {
        // SAFETY: `off` is inside the mapping; volatile so the access really happens.
        unsafe { ptr::read_volatile((self.addr + off) as *const u8) }
    }

    fn write(&self, off: usize, v: u8) {
        // SAFETY: `off` is inside the mapping.
        unsafe { ptr::write_volatile((self.addr + off) as *mut u8, v) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; nothing references it any more.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

fn create(features: Features) -> Uffd {
    UffdBuilder::new()
        .require_features(features)
        .create()
        .unwrap_or_else(|e| panic!("userfaultfd unavailable: {}", error_chain(&e)))
}

/// Wait for one page fault (with a timeout so a bug fails instead of hanging).
fn next_fault(u: &Uffd) -> Pagefault {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no page fault within 10 s");
        u.poll_readable(Some(Duration::from_millis(100))).unwrap();
        match u.read_event().unwrap() {
            Some(Event::Pagefault(pf)) => return pf,
            Some(other) => panic!("unexpected event {other:?}"),
            None => continue,
        }
    }
}

/// Read byte `off` of `m` on another thread; returns its join handle.
fn reader(m: &Mapping, off: usize) -> thread::JoinHandle<u8> {
    let addr = m.addr + off;
    thread::spawn(move || {
        // SAFETY: the mapping outlives the thread (joined before the mapping drops).
        unsafe { ptr::read_volatile(addr as *const u8) }
    })
}

#[test]
fn probe_reports_this_kernels_features() {
    let s = Support::probe().unwrap_or_else(|e| panic!("probe: {}", error_chain(&e)));
    for f in [
        Features::MOVE,
        Features::POISON,
        Features::WP_ASYNC,
        Features::THREAD_ID,
        Features::MINOR_SHMEM,
        Features::EVENT_FORK,
    ] {
        assert!(
            s.features.contains(f),
            "kernel lacks {f:?}: {:?}",
            s.features
        );
    }
    assert!(
        s.ioctls
            .contains(Ioctls::REGISTER | Ioctls::UNREGISTER | Ioctls::API)
    );
}

#[test]
fn create_options_device_syscall_cloexec_nonblock() {
    for via in [Via::Device, Via::Syscall] {
        let u = UffdBuilder::new().via(via).create().unwrap();
        assert_eq!(
            u.origin(),
            if via == Via::Device {
                Origin::Device
            } else {
                Origin::Syscall
            }
        );
        // SAFETY: F_GETFD / F_GETFL on a valid fd.
        let (fdfl, fl) = unsafe {
            (
                libc::fcntl(u.as_raw_fd(), libc::F_GETFD),
                libc::fcntl(u.as_raw_fd(), libc::F_GETFL),
            )
        };
        assert!(fdfl & libc::FD_CLOEXEC != 0);
        assert!(fl & libc::O_NONBLOCK != 0);
        // Non-blocking: nothing pending reads as an empty batch.
        assert!(u.read_event().unwrap().is_none());
    }
    let u = UffdBuilder::new()
        .close_on_exec(false)
        .non_blocking(false)
        .user_mode_only(true)
        .create()
        .unwrap();
    // SAFETY: F_GETFD / F_GETFL on a valid fd.
    let (fdfl, fl) = unsafe {
        (
            libc::fcntl(u.as_raw_fd(), libc::F_GETFD),
            libc::fcntl(u.as_raw_fd(), libc::F_GETFL),
        )
    };
    assert_eq!(fdfl & libc::FD_CLOEXEC, 0);
    assert_eq!(fl & libc::O_NONBLOCK, 0);
    // An unknown feature bit is refused with the supported set, before any fd is made.
    let err = UffdBuilder::new()
        .require_features(Features::from_bits_retain(1 << 62))
        .create()
        .unwrap_err();
    assert!(matches!(err, CreateError::Unsupported { .. }), "{err}");
}

#[test]
fn missing_copy_zeropage_thread_id() {
    let m = Mapping::anon(4);
    let u = create(Features::THREAD_ID);
    let ioctls = u.register(m.range(), RegisterMode::MISSING).unwrap();
    assert!(ioctls.contains(Ioctls::COPY | Ioctls::ZEROPAGE | Ioctls::WAKE));

    let t = reader(&m, 5);
    let pf = next_fault(&u);
    assert_eq!(pf.page(), m.page(0));
    assert_eq!(pf.kind, FaultKind::Missing);
    assert!(!pf.write);
    assert!(pf.thread_id.unwrap_or(0) > 0, "THREAD_ID gives the tid");
    let data = vec![0x5a_u8; page()];
    assert_eq!(
        u.copy(pf.page(), &data, CopyMode::empty()).unwrap(),
        Resolved::Done(page())
    );
    assert_eq!(t.join().unwrap(), 0x5a);

    let t = reader(&m, page() + 1);
    let pf = next_fault(&u);
    assert_eq!(
        u.zeropage(pf.page(), false).unwrap(),
        Resolved::Done(page())
    );
    assert_eq!(t.join().unwrap(), 0);

    // EEXIST: resolving a present page is reported, and wakes, without an error.
    assert_eq!(
        u.copy(m.page(0), &data, CopyMode::empty()).unwrap(),
        Resolved::AlreadyPresent
    );
    // Partial progress: page 2 copies, page 3... wait: make page 3 present first.
    u.zeropage(m.page(3), false).unwrap();
    let two = Range::new(m.addr + 2 * page(), 2 * page()).unwrap();
    let two_pages = vec![7_u8; 2 * page()];
    match u.copy(two, &two_pages, CopyMode::empty()) {
        Err(ResolveError::Partial { done, .. }) => assert_eq!(done, page()),
        other => panic!("expected partial progress, got {other:?}"),
    }
    assert_eq!(m.read(2 * page()), 7);
    assert_eq!(m.read(3 * page()), 0);
    // Data shorter than the range is refused before the kernel sees it.
    assert!(matches!(
        u.copy(m.page(1), &data[..10], CopyMode::empty()),
        Err(ResolveError::ShortSource { .. })
    ));
}

#[test]
fn dontwake_then_wake() {
    let m = Mapping::anon(1);
    let u = create(Features::empty());
    u.register(m.range(), RegisterMode::MISSING).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let (addr, d) = (m.addr, done.clone());
    let t = thread::spawn(move || {
        // SAFETY: the mapping outlives the thread.
        let v = unsafe { ptr::read_volatile(addr as *const u8) };
        d.store(true, Ordering::SeqCst);
        v
    });
    let pf = next_fault(&u);
    let data = vec![9_u8; page()];
    u.copy(pf.page(), &data, CopyMode::DONTWAKE).unwrap();
    thread::sleep(Duration::from_millis(100));
    assert!(
        !done.load(Ordering::SeqCst),
        "DONTWAKE left the thread blocked"
    );
    u.wake(pf.page()).unwrap();
    assert_eq!(t.join().unwrap(), 9);
}

#[test]
fn minor_fault_on_memfd_continue() {
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"uffd-minor".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: ftruncate on our memfd.
    assert_eq!(unsafe { libc::ftruncate(fd, 2 * page() as i64) }, 0);
    let alias = Mapping::shared_fd(2, fd);
    let m = Mapping::shared_fd(2, fd);
    // Populate the page cache through the alias; `m` has no PTEs for it yet.
    alias.write(0, 0x42);
    alias.write(page(), 0x43);
    let u = create(Features::MINOR_SHMEM);
    let ioctls = u.register(m.range(), RegisterMode::MINOR).unwrap();
    assert!(ioctls.contains(Ioctls::CONTINUE));
    let t = reader(&m, 0);
    let pf = next_fault(&u);
    assert_eq!(pf.kind, FaultKind::Minor);
    // The handler may rewrite the page through the alias before continuing.
    alias.write(0, 0x44);
    assert_eq!(
        u.continue_range(pf.page(), ContinueMode::empty()).unwrap(),
        Resolved::Done(page())
    );
    assert_eq!(t.join().unwrap(), 0x44);
    // SAFETY: closing our memfd; the mappings keep the file alive.
    unsafe { libc::close(fd) };
}

#[test]
fn continue_with_write_protect_on_shmem() {
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"uffd-minor-wp".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: ftruncate on our memfd.
    assert_eq!(unsafe { libc::ftruncate(fd, page() as i64) }, 0);
    let alias = Mapping::shared_fd(1, fd);
    let m = Mapping::shared_fd(1, fd);
    alias.write(0, 0x61);
    let u =
        create(Features::MINOR_SHMEM | Features::PAGEFAULT_FLAG_WP | Features::WP_HUGETLBFS_SHMEM);
    u.register(m.range(), RegisterMode::MINOR | RegisterMode::WP)
        .unwrap();
    let addr = m.addr;
    // A write: first the MINOR fault, resolved with CONTINUE|WP, then the WP fault.
    let t = thread::spawn(move || {
        // SAFETY: the mapping outlives the thread.
        unsafe { ptr::write_volatile(addr as *mut u8, 0x62) }
    });
    let pf = next_fault(&u);
    assert_eq!(pf.kind, FaultKind::Minor);
    u.continue_range(pf.page(), ContinueMode::WP).unwrap();
    let pf = next_fault(&u);
    assert_eq!(
        pf.kind,
        FaultKind::WriteProtect,
        "CONTINUE|WP mapped the page read-only"
    );
    u.write_protect(pf.page(), false, false).unwrap();
    t.join().unwrap();
    assert_eq!(alias.read(0), 0x62);
    // SAFETY: closing our memfd; the mappings keep the file alive.
    unsafe { libc::close(fd) };
}

#[test]
fn write_protect_sync() {
    let m = Mapping::anon(2);
    let u = create(Features::PAGEFAULT_FLAG_WP);
    u.register(m.range(), RegisterMode::MISSING | RegisterMode::WP)
        .unwrap();
    // COPY with WP: the new page is mapped write-protected.
    let data = vec![1_u8; page()];
    u.copy(m.page(0), &data, CopyMode::WP).unwrap();
    assert_eq!(m.read(0), 1, "reads of a WP page do not fault");
    let addr = m.addr;
    let t = thread::spawn(move || {
        // SAFETY: the mapping outlives the thread.
        unsafe { ptr::write_volatile(addr as *mut u8, 2) }
    });
    let pf = next_fault(&u);
    assert_eq!(pf.kind, FaultKind::WriteProtect);
    assert!(pf.write);
    assert_eq!(pf.page(), m.page(0));
    u.write_protect(pf.page(), false, false).unwrap();
    t.join().unwrap();
    assert_eq!(m.read(0), 2);
    // Protect again, explicitly: the next write faults again.
    u.write_protect(m.page(0), true, false).unwrap();
    let t = thread::spawn(move || {
        // SAFETY: the mapping outlives the thread.
        unsafe { ptr::write_volatile(addr as *mut u8, 3) }
    });
    let pf = next_fault(&u);
    assert_eq!(pf.kind, FaultKind::WriteProtect);
    u.write_protect(pf.page(), false, false).unwrap();
    t.join().unwrap();
    assert_eq!(m.read(0), 3);
}

#[test]
fn write_protect_async_dirty_tracking() {
    let m = Mapping::anon(64);
    m.write(0, 1); // populated before tracking starts
    let mut tr = DirtyTracker::new(m.range()).unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let mut runs = Vec::new();
    assert_eq!(
        tr.collect(&mut runs).unwrap(),
        0,
        "nothing written yet: {runs:?}"
    );
    for p in [0, 1, 2, 10, 63] {
        m.write(p * page() + 8, 0xee);
    }
    m.read(20 * page()); // reads do not dirty
    let mut bitmap = vec![false; 64];
    assert_eq!(tr.collect_bitmap(&mut bitmap).unwrap(), 5);
    let dirty: Vec<usize> = (0..64).filter(|&i| bitmap[i]).collect();
    assert_eq!(dirty, vec![0, 1, 2, 10, 63]);
    // Re-protected by the scan: a second scan is empty, then only new writes show.
    runs.clear();
    assert_eq!(tr.collect(&mut runs).unwrap(), 0);
    m.write(5 * page(), 1);
    m.write(6 * page(), 1);
    runs.clear();
    assert_eq!(tr.collect(&mut runs).unwrap(), 2);
    assert_eq!(
        runs,
        vec![Range::new(m.addr + 5 * page(), 2 * page()).unwrap()]
    );
    assert_eq!(m.read(8), 0xee, "data survives tracking");
}

#[test]
fn poison_raises_sigbus_in_a_child() {
    let m = Mapping::anon(2);
    let u = create(Features::POISON);
    let ioctls = u.register(m.range(), RegisterMode::MISSING).unwrap();
    assert!(ioctls.contains(Ioctls::POISON));
    let data = vec![3_u8; page()];
    u.copy(m.page(0), &data, CopyMode::empty()).unwrap();
    assert_eq!(u.poison(m.page(1), false).unwrap(), Resolved::Done(page()));
    // Touch the poisoned page in a child so the SIGBUS does not kill the test.
    let _serial = FORK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: the child only does volatile reads and _exit (async-signal-safe).
    let pid = unsafe { libc::syscall(libc::SYS_fork) } as libc::pid_t;
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: in the child: reads of the mapping and _exit only.
        unsafe {
            if ptr::read_volatile(m.addr as *const u8) != 3 {
                libc::_exit(3);
            }
            ptr::read_volatile((m.addr + page()) as *const u8);
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
        "child status {status:#x}: expected death by SIGBUS"
    );
}

#[test]
fn move_pages_between_mappings() {
    let src = Mapping::anon(4);
    for i in 0..4 {
        src.write(i * page(), 0x10 + i as u8);
    }
    let dst = Mapping::anon(4);
    let u = create(Features::MOVE);
    let ioctls = u.register(dst.range(), RegisterMode::MISSING).unwrap();
    assert!(ioctls.contains(Ioctls::MOVE));
    // SAFETY: no Rust reference points into `src` (accessed only through raw volatile reads).
    let r = unsafe { u.move_pages(dst.range(), src.range(), MoveMode::empty()) }.unwrap();
    assert_eq!(r, Resolved::Done(4 * page()));
    for i in 0..4 {
        assert_eq!(dst.read(i * page()), 0x10 + i as u8);
        assert_eq!(src.read(i * page()), 0, "the source page is gone");
    }
    // Holes in the source are refused unless ALLOW_SRC_HOLES.
    let holes = Mapping::anon(1);
    let dst2 = Mapping::anon(1);
    u.register(dst2.range(), RegisterMode::MISSING).unwrap();
    // SAFETY: as above.
    let err = unsafe { u.move_pages(dst2.range(), holes.range(), MoveMode::empty()) };
    assert!(err.is_err(), "moving a hole without ALLOW_SRC_HOLES fails");
    // SAFETY: as above.
    let ok = unsafe { u.move_pages(dst2.range(), holes.range(), MoveMode::ALLOW_SRC_HOLES) };
    assert!(ok.is_ok(), "{ok:?}");
}

#[derive(Debug, PartialEq)]
enum Seen {
    Fault(usize),
    Remap { from: usize, to: usize, len: usize },
    Remove { len: usize },
    Unmap { len: usize },
}

#[test]
fn fork_remap_remove_unmap_events_from_a_child() {
    let _serial = FORK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mapping::anon(4);
    let u = Arc::new(create(
        Features::EVENT_FORK
            | Features::EVENT_REMAP
            | Features::EVENT_REMOVE
            | Features::EVENT_UNMAP,
    ));
    u.register(m.range(), RegisterMode::MISSING).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let handler = {
        let (u, stop) = (u.clone(), stop.clone());
        thread::spawn(move || {
            let fill = vec![0xa5_u8; page()];
            let mut buf = EventBuffer::new(16);
            let mut uffds = vec![u];
            while !stop.load(Ordering::SeqCst) {
                let fds: Vec<_> = uffds
                    .iter()
                    .map(|u| std::os::fd::AsFd::as_fd(&**u))
                    .collect();
                let ready = poll_in(&fds, Some(Duration::from_millis(50))).unwrap();
                if ready == 0 {
                    continue;
                }
                let i = ready.trailing_zeros() as usize;
                let cur = uffds[i].clone();
                let events: Vec<Event> = cur.read_events(&mut buf).unwrap().collect();
                for ev in events {
                    match ev {
                        Event::Fork { uffd } => uffds.push(Arc::new(uffd)),
                        Event::Pagefault(pf) => {
                            cur.copy(pf.page(), &fill, CopyMode::empty()).unwrap();
                            tx.send(Seen::Fault(i)).unwrap();
                        }
                        Event::Remap { from, to, len } => {
                            tx.send(Seen::Remap { from, to, len }).unwrap()
                        }
                        Event::Remove { start, end } => {
                            tx.send(Seen::Remove { len: end - start }).unwrap()
                        }
                        Event::Unmap { start, end } => {
                            tx.send(Seen::Unmap { len: end - start }).unwrap()
                        }
                        Event::Unknown { code } => panic!("unknown event {code}"),
                    }
                }
            }
            uffds
        })
    };
    let (addr, len) = (m.addr, m.len);
    // Where the child moves the range to (MREMAP_FIXED replaces this placeholder).
    let target = Mapping::anon(4);
    let to = target.addr;
    // Raw fork: glibc's fork() holds malloc's locks until the kernel has delivered the FORK
    // event, which the handler thread reads while it allocates.
    // SAFETY: the child only makes raw syscalls, volatile reads and _exit.
    let pid = unsafe { libc::syscall(libc::SYS_fork) } as libc::pid_t;
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: in the child: syscalls on its own copy of the mapping, then _exit.
        unsafe {
            if ptr::read_volatile(addr as *const u8) != 0xa5 {
                libc::_exit(10);
            }
            let new = libc::mremap(
                addr as *mut libc::c_void,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                to as *mut libc::c_void,
            );
            if new == libc::MAP_FAILED {
                libc::_exit(11);
            }
            // A fresh page of the moved range still faults to the handler.
            if ptr::read_volatile((new as usize + page()) as *const u8) != 0xa5 {
                libc::_exit(12);
            }
            if libc::madvise(new, page(), libc::MADV_DONTNEED) != 0 {
                libc::_exit(13);
            }
            if libc::munmap(new, len) != 0 {
                libc::_exit(14);
            }
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    stop.store(true, Ordering::SeqCst);
    let uffds = handler.join().unwrap();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x}"
    );
    // The child is gone: resolving into its address space is its own error, with errno.
    let e = uffds[1]
        .copy(m.page(2), &vec![0; page()], CopyMode::empty())
        .unwrap_err();
    assert!(matches!(e, ResolveError::TargetGone { .. }), "{e:?}");
    assert!(
        matches!(e.errno(), Some(libc::ESRCH | libc::ENOENT)),
        "{e:?}"
    );
    let seen: Vec<Seen> = rx.try_iter().collect();
    assert_eq!(
        seen,
        vec![
            Seen::Fault(1),
            Seen::Remap {
                from: addr,
                to,
                len
            },
            // MREMAP_FIXED replaced the placeholder at `to`: reported as an unmap.
            Seen::Unmap { len },
            Seen::Fault(1),
            Seen::Remove { len: page() },
            Seen::Unmap { len },
        ],
        "events from the child arrive on the child's uffd"
    );
    // The parent's own copy is untouched and still registered.
    assert!(u.read_event().unwrap().is_none());
}

#[test]
fn many_threads_fault_at_once() {
    const THREADS: usize = 8;
    const PER: usize = 64;
    let m = Mapping::anon(THREADS * PER);
    let u = Arc::new(create(Features::THREAD_ID));
    u.register(m.range(), RegisterMode::MISSING).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let (u, stop, base) = (u.clone(), stop.clone(), m.addr);
        thread::spawn(move || {
            let mut buf = EventBuffer::new(32);
            let mut data = vec![0_u8; page()];
            let mut served = 0;
            while !stop.load(Ordering::SeqCst) {
                if !u.poll_readable(Some(Duration::from_millis(20))).unwrap() {
                    continue;
                }
                for ev in u.read_events(&mut buf).unwrap() {
                    let Event::Pagefault(pf) = ev else {
                        panic!("{ev:?}")
                    };
                    let idx = (pf.page().start() - base) / page();
                    data.fill((idx % 251) as u8);
                    match u.copy(pf.page(), &data, CopyMode::empty()).unwrap() {
                        Resolved::Done(_) => served += 1,
                        Resolved::AlreadyPresent => {}
                    }
                }
            }
            served
        })
    };
    let base = m.addr;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            thread::spawn(move || {
                for i in 0..PER {
                    // Interleave the threads' pages so faults race on neighbouring pages.
                    let idx = i * THREADS + t;
                    // SAFETY: inside the mapping, which outlives the workers.
                    let v = unsafe { ptr::read_volatile((base + idx * page() + 100) as *const u8) };
                    assert_eq!(v, (idx % 251) as u8);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    assert_eq!(handler.join().unwrap(), THREADS * PER);
}

#[test]
fn bad_input_gives_clear_errors() {
    let p = page();
    let m = Mapping::anon(4);
    // Unaligned range.
    let e = Range::new(m.addr + 1, p).unwrap_err();
    assert!(e.to_string().contains("not aligned"), "{e}");
    // Overlapping registration with another uffd: EBUSY, named.
    let a = create(Features::empty());
    let b = create(Features::empty());
    a.register(m.range(), RegisterMode::MISSING).unwrap();
    let e = b.register(m.page(1), RegisterMode::MISSING).unwrap_err();
    let msg = error_chain(&e);
    assert!(msg.contains("another userfaultfd"), "{msg}");
    assert!(
        matches!(&e, RegisterError::Register { source, .. } if source.raw_os_error() == Some(libc::EBUSY))
    );
    // Unmapped range: below mmap_min_addr, so no other test's mapping can land there (a
    // freed hole elsewhere is refilled by parallel tests, whose mappings this would register).
    let r = Range::new(page(), 2 * page()).unwrap();
    let e = a.register(r, RegisterMode::MISSING).unwrap_err();
    assert!(
        error_chain(&e).contains("not mapped"),
        "{}",
        error_chain(&e)
    );
    // WP without the feature that reports WP faults.
    let e = b
        .register(Mapping::anon(1).range(), RegisterMode::WP)
        .unwrap_err();
    assert!(matches!(e, RegisterError::ModeNeedsFeature { .. }), "{e}");
    // Resolving outside any registered range: an error with errno, no panic.
    let other = Mapping::anon(1);
    let e = a
        .copy(other.range(), &vec![0; p], CopyMode::empty())
        .unwrap_err();
    assert!(e.errno().is_some(), "{e:?}");
    // An fd that is not a userfaultfd: errors carry the kernel's errno.
    let f = std::fs::File::open("/dev/null").unwrap();
    let fake = Uffd::from_owned_fd(f.into(), Features::empty());
    let e = fake.register(m.range(), RegisterMode::MISSING).unwrap_err();
    assert!(
        matches!(&e, RegisterError::Register { source, .. } if source.raw_os_error().is_some())
    );
    assert!(fake.zeropage(m.page(0), false).is_err());
    // A closed userfaultfd: its registrations vanish and faults are ordinary again (no hang).
    drop(a);
    assert_eq!(m.read(0), 0);
}
