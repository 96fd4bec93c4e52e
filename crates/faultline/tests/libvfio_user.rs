//! Interoperability with libvfio-user, the reference vfio-user implementation: libvfio-user's
//! own sample client (`samples/client`, built by `scripts/libvfio-user.sh` from the genuine
//! upstream checkout in `../shared/peers/libvfio-user`, or `$FAULTLINE_LIBVFIO_USER_SRC`)
//! against `faultline device serve sample`, the device of libvfio-user's `samples/server`.
//! Missing sources or a failed build fail the test.
//!
//! The client of these upstream sources hardcodes BAR1 as 0x3000 bytes (the size of
//! `samples/server`'s BAR1 before upstream's fix for #871; later upstream reads it from the
//! region info), which our sample device keeps as BAR1's storage (in a 16 KiB BAR), so
//! BAR1's CRC and the migration stream are checked over those 0x3000 bytes.
//!
//! The client negotiates, checks the IDs and regions, maps DMA, sets INTx, starts dirty-page
//! logging, arms the BAR0 timer, serves the server's message DMA, checks the dirty bitmaps,
//! then migrates: PRE_COPY while a thread writes BAR1, STOP_COPY, and `migrate_to()`, which
//! forks. The *parent* execs `dirname(argv[0])/server -v <socket>_migrated` (the destination
//! server) and the *child* goes on as the client: it resumes the state there, checks BAR1's
//! CRC, sets INTx again and waits for the interrupt it scheduled 10 s ahead on the source.
//!
//! So the client runs from a temporary directory next to a `server` shell shim that execs
//! `faultline device serve sample --once`, and this test process is a child subreaper:
//! when the destination server (the process it spawned) exits, the client's child is
//! reparented here and its exit status is collected with `waitpid(-1)`. That is why this
//! test is alone in its test binary (it must not reap other tests' children).

use std::collections::HashSet;
use std::ffi::{c_int, c_ulong};
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::libvfio_user::samples_dir;

mod sys {
    pub use libc::{PR_SET_CHILD_SUBREAPER, SIGKILL, WNOHANG, kill, prctl, waitpid};
}

/// Everything must be over by then (the client schedules an interrupt 10 s ahead).
const LIMIT: Duration = Duration::from_secs(60);

/// `waitpid` status, decoded.
fn describe(status: c_int) -> String {
    let sig = status & 0x7f;
    if sig == 0 {
        format!("exit code {}", (status >> 8) & 0xff)
    } else if sig != 0x7f {
        format!("killed by signal {sig}")
    } else {
        format!("stopped ({status:#x})")
    }
}

/// Processes whose parent is `ppid` (from `/proc/*/stat`).
fn children_of(ppid: u32) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| {
        let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "pid (comm) state ppid ...": comm may hold anything, so split after its ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let parent: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        (parent == ppid).then_some(pid)
    })
    .collect()
}

/// Whether a Unix socket is listening at `path` (`/proc/net/unix`, flag `__SO_ACCEPTCON`).
/// Connecting to find out would count as the `--once` server's client.
fn listening(path: &Path) -> bool {
    let p = path.to_string_lossy();
    std::fs::read_to_string("/proc/net/unix").is_ok_and(|t| {
        t.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 8
                && f[7] == p
                && u32::from_str_radix(f[3], 16).is_ok_and(|x| x & 0x10000 != 0)
        })
    })
}

/// The processes of one run; whatever still runs is killed on drop (also on panic).
struct Run {
    dir: tempfile::TempDir,
    source: Option<Child>,
    client: Option<Child>,
    /// Pids reaped with `waitpid(-1)` (never to be signalled again).
    reaped: HashSet<i32>,
}

impl Run {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// Both sides' output, for failure messages.
    fn logs(&self) -> String {
        format!(
            "--- source server (faultline device serve sample) ---\n{}\
             --- client stdout (and destination server's) ---\n{}\
             --- client stderr (and destination server's) ---\n{}--- end ---",
            self.read("source.log"),
            self.read("client.out"),
            self.read("client.err")
        )
    }

    fn kill(&mut self, pid: i32) {
        if pid > 0 && !self.reaped.contains(&pid) {
            // SAFETY: plain syscalls on a pid this test started (directly or by its child's
            // fork) and has not reaped.
            unsafe {
                sys::kill(pid, sys::SIGKILL);
                sys::waitpid(pid, std::ptr::null_mut(), 0);
            }
            self.reaped.insert(pid);
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        // The client's forked child: a child of the destination server or, once that is
        // gone, of this process.
        let mut pids = Vec::new();
        if let Some(c) = &self.client {
            pids.extend(children_of(c.id()));
        }
        pids.extend(children_of(std::process::id()));
        for c in [self.client.as_ref(), self.source.as_ref()]
            .into_iter()
            .flatten()
        {
            pids.push(c.id() as i32);
        }
        for p in pids {
            self.kill(p);
        }
    }
}

#[test]
fn libvfio_user_client_against_device_serve_sample() {
    let faultline = env!("CARGO_BIN_EXE_faultline");
    let samples = samples_dir();
    let mut run = Run {
        dir: tempfile::tempdir().unwrap(),
        source: None,
        client: None,
        reaped: HashSet::new(),
    };

    // The client and, next to it, the `server` it execs for the migration destination
    // (`server -v <socket>_migrated`).
    std::fs::copy(samples.join("client"), run.path("client")).unwrap();
    let shim = run.path("server");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\n# libvfio-user's samples/client runs `server -v SOCKET` as its \
             migration destination.\nexec '{faultline}' device serve sample --once --socket \"$2\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();

    // The source server.
    let sock = run.path("s.sock");
    let log = File::create(run.path("source.log")).unwrap();
    run.source = Some(
        Command::new(faultline)
            .args(["device", "serve", "sample", "--once", "--socket"])
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start faultline device serve sample"),
    );
    let t = Instant::now();
    while !(std::fs::metadata(&sock).is_ok_and(|m| m.file_type().is_socket()) && listening(&sock)) {
        if let Some(st) = run.source.as_mut().unwrap().try_wait().unwrap() {
            let pid = run.source.as_ref().unwrap().id() as i32;
            run.reaped.insert(pid);
            panic!(
                "`faultline device serve sample --once` exited before listening ({st})\n{}",
                run.logs()
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no socket listening at {} within 10 s\n{}",
            sock.display(),
            run.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // Orphans (the client's child, once the destination server exits) become ours.
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { sys::prctl(sys::PR_SET_CHILD_SUBREAPER, 1 as c_ulong) };
    assert_eq!(
        r,
        0,
        "PR_SET_CHILD_SUBREAPER: {}",
        std::io::Error::last_os_error()
    );

    // Line-buffered stdout (stdbuf) so that nothing is lost or doubled across its fork and
    // exec, and so that a client that aborts still shows how far it got.
    let client = run.path("client");
    let mut cmd = if Path::new("/usr/bin/stdbuf").exists() {
        let mut c = Command::new("/usr/bin/stdbuf");
        c.args(["-oL", "-eL"]).arg(&client);
        c
    } else {
        Command::new(&client)
    };
    cmd.arg(&sock)
        .current_dir(run.dir.path())
        .stdin(Stdio::null())
        .stdout(File::create(run.path("client.out")).unwrap())
        .stderr(File::create(run.path("client.err")).unwrap());
    run.client = Some(cmd.spawn().expect("start libvfio-user's samples/client"));
    let spawned = run.client.as_ref().unwrap().id() as i32;
    let source = run.source.as_ref().unwrap().id() as i32;

    // 1. The spawned process: the client until migrate_to(), then the destination server,
    //    which exits (--once) when the client's child disconnects.
    let deadline = t + LIMIT;
    let spawned_status = loop {
        if let Some(st) = run.client.as_mut().unwrap().try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the client / destination server did not finish within {LIMIT:?}\n{}",
            run.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    run.reaped.insert(spawned);

    // 2. The client's child, now ours (and the source server, which exits with its last
    //    client, may come first).
    let mut source_status = None;
    let child_status = loop {
        let mut status: c_int = 0;
        // SAFETY: waitpid with a valid out pointer.
        let pid = unsafe { sys::waitpid(-1, &mut status, sys::WNOHANG) };
        if pid > 0 {
            run.reaped.insert(pid);
            if pid == source {
                source_status = Some(describe(status));
                continue;
            }
            break Some((pid, status));
        }
        if pid < 0 {
            // ECHILD: no child left, so the client never forked (it failed before migrating).
            break None;
        }
        assert!(
            Instant::now() < deadline,
            "the client's child (after its fork in migrate_to) did not finish within \
             {LIMIT:?}; the spawned process ended with {spawned_status}\n{}",
            run.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };

    let out = run.read("client.out");
    let summary = format!(
        "spawned process (client, then destination server): {spawned_status}; client's child: \
         {}; source server: {}",
        match child_status {
            Some((pid, st)) => format!("pid {pid}, {}", describe(st)),
            None => "none (the client did not fork)".into(),
        },
        source_status.as_deref().unwrap_or("not reaped here")
    );
    let Some((_, status)) = child_status else {
        panic!("{summary}\n{}", run.logs());
    };
    assert!(
        status == 0,
        "libvfio-user's client failed: {summary}\n{}",
        run.logs()
    );
    let count = |s: &str| out.lines().filter(|l| l.contains(s)).count();
    assert_eq!(
        count("client: INTx triggered!"),
        2,
        "two interrupts (source, then destination after migration): {summary}\n{}",
        run.logs()
    );
    for want in [
        "client: devinfo: flags",
        "client: get_dirty_bitmap: 0-0xfff\t0x1",
        "client: get_dirty_bitmap: 0x1000-0x1fff\t0x1",
        "client: stopping fake guest thread",
        "client: setting device state to stop-and-copy",
        "client: starting destination server",
    ] {
        assert!(
            count(want) >= 1,
            "missing {want:?} in the client's output: {summary}\n{}",
            run.logs()
        );
    }
    assert!(
        count("client: get_dirty_bitmap") >= 2,
        "{summary}\n{}",
        run.logs()
    );
    eprintln!("{summary}\n{}", run.logs());
}
