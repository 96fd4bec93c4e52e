//! `faultline bench vfio-user`: the vfio-user data path, ours beside its anchors in the same
//! run.
//!
//! - `region-rw`: a 4-byte REGION_WRITE + REGION_READ round trip on the GPIO card's BAR 2
//!   (our client and server over a Unix socket), every client and server on one CPU (a
//!   wake-up across CPUs, ~26 µs here, would measure the scheduler's placement instead). Anchor: rust-vmm's `vfio_user` client and
//!   server (Cloud Hypervisor's implementation) doing the same pair on a 4 KiB BAR; and, when
//!   libvfio-user's samples are built (`scripts/libvfio-user.sh`, or a directory named by
//!   `FAULTLINE_LIBVFIO_USER`), our client against libvfio-user's own `gpio-pci-idio-16`
//!   server process doing the same pair on its BAR 2 (`impl: "libvfio-user"`; there the write
//!   at 0x0 is the output register, counting pins, and the read at 0x0 is answered with the
//!   library's zeroed buffer). The samples are built from the upstream sources in
//!   `../shared/peers/libvfio-user`.
//! - `dma`: the DMA engine copying 64 MiB descriptors between two halves of a memfd the
//!   client mapped (fd passing, so the server copies through its own mapping). Anchor:
//!   `memcpy` of the same size in one process (the ceiling).
//! - `dma-msg`: the same engine when memory was mapped without an fd (DMA_READ/DMA_WRITE
//!   messages served by the client), 4 MiB descriptors.
//! - `irq`: `DeviceContext::trigger` (MSI-X, unmasked) to the wake-up of a thread blocked
//!   reading the client's eventfd. Anchor: a bare eventfd write to the same wake-up (what
//!   libvfio-user's `vfu_irq_trigger` does; the floor).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use vfu::client::{Client, DmaMemory};
use vfu::devices::{dma, gpio};
use vfu::proto::{DMA_READ, DMA_WRITE, IRQ_MSIX};
use vfu::server::Server;
use vmm_sys_util::eventfd::EventFd;

use crate::BenchError;

/// One output line.
#[derive(Debug, Serialize)]
pub struct Line {
    /// `"vfio-user"`.
    pub bench: &'static str,
    /// `region-rw`, `dma`, `dma-msg`, `irq`.
    pub case: &'static str,
    /// `faultline` or the anchor (`rust-vmm`, `libvfio-user`, `memcpy`, `eventfd`).
    pub r#impl: &'static str,
    /// Median, µs (latency cases; for DMA, per descriptor).
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Throughput, GB/s (DMA cases; 0 otherwise).
    pub gbps: f64,
    /// Samples.
    pub samples: usize,
}

fn run_err(what: &str) -> impl Fn(&dyn std::error::Error) -> BenchError + '_ {
    move |e| BenchError::Run(format!("{what}: {}", uffd::error_chain(e)))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn line(case: &'static str, imp: &'static str, mut us: Vec<f64>, gbps: f64) -> Line {
    Line {
        bench: "vfio-user",
        case,
        r#impl: imp,
        p50_us: pct(&mut us, 0.5),
        p99_us: pct(&mut us, 0.99),
        gbps,
        samples: us.len(),
    }
}

fn memfd(size: u64) -> Result<OwnedFd, BenchError> {
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe {
        libc::memfd_create(
            c"vfu-bench".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(BenchError::Run(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: a new descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own memfd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
        return Err(BenchError::Run(format!(
            "ftruncate: {}",
            std::io::Error::last_os_error()
        )));
    }
    // Sealed against shrinking and growing: the client hands only such fds to DMA_MAP.
    // SAFETY: F_ADD_SEALS on our own memfd with an integer argument.
    if unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    } != 0
    {
        return Err(BenchError::Run(format!(
            "F_ADD_SEALS: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(fd)
}

struct Map {
    addr: *mut u8,
    len: usize,
}

impl Map {
    fn new(fd: &OwnedFd, len: usize) -> Result<Map, BenchError> {
        // SAFETY: a new shared mapping of our memfd.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(BenchError::Run(format!(
                "mmap: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Map {
            addr: p.cast(),
            len,
        })
    }

    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: our live mapping of `len` bytes, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.addr, self.len) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

struct Served {
    server: Server,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: std::path::PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.server.shutdown_handle().shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

fn serve(
    dir: &Path,
) -> Result<(Served, Arc<dma::DmaEngine>, vfu::server::DeviceContext), BenchError> {
    std::fs::create_dir_all(dir).map_err(|e| BenchError::Run(format!("{}: {e}", dir.display())))?;
    let server = Server::new(false).map_err(|e| run_err("server")(&e))?;
    gpio::Gpio::description()
        .realize(gpio::Gpio::new(true))
        .map_err(|e| run_err("gpio")(&e))?
        .attach(&server, &dir.join("gpio.sock"))
        .map_err(|e| run_err("gpio")(&e))?;
    let engine = dma::DmaEngine::new();
    let d = dma::DmaEngine::description()
        .realize(Arc::new(dma::DmaOps(engine.clone())))
        .map_err(|e| run_err("dma")(&e))?
        .attach(&server, &dir.join("dma.sock"))
        .map_err(|e| run_err("dma")(&e))?;
    let ctx = d.context().clone();
    let s2 = server.clone();
    let thread = std::thread::spawn(move || {
        let _ = s2.run();
    });
    Ok((
        Served {
            server,
            thread: Some(thread),
            _dir: dir.to_path_buf(),
        },
        engine,
        ctx,
    ))
}

fn region_rw_ours(dir: &Path, n: usize) -> Result<Vec<f64>, BenchError> {
    let c = Client::connect(&dir.join("gpio.sock"), Duration::from_secs(5))
        .map_err(|e| run_err("connect")(&e))?;
    region_rw(&c, n)
}

/// `n` timed 4-byte write + read pairs on BAR 2 (after n/10 warm-up pairs).
fn region_rw(c: &Client, n: usize) -> Result<Vec<f64>, BenchError> {
    let mut us = Vec::with_capacity(n);
    let mut b = [0u8; 4];
    for i in 0..n + n / 10 {
        let t = Instant::now();
        c.region_write(2, 0, &(i as u32).to_le_bytes())
            .map_err(|e| run_err("write")(&e))?;
        c.region_read(2, 0, &mut b)
            .map_err(|e| run_err("read")(&e))?;
        if i >= n / 10 {
            us.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(us)
}

struct AnchorBackend {
    bar: Vec<u8>,
}

impl rustvmm_vfio_user::ServerBackend for AnchorBackend {
    fn region_read(&mut self, _r: u32, offset: u64, data: &mut [u8]) -> Result<(), std::io::Error> {
        let o = offset as usize;
        data.copy_from_slice(&self.bar[o..o + data.len()]);
        Ok(())
    }
    fn region_write(&mut self, _r: u32, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let o = offset as usize;
        self.bar[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn dma_map(
        &mut self,
        _f: rustvmm_vfio_user::DmaMapFlags,
        _o: u64,
        _a: u64,
        _s: u64,
        _fd: Option<std::fs::File>,
    ) -> Result<(), std::io::Error> {
        Ok(())
    }
    fn dma_unmap(
        &mut self,
        _f: rustvmm_vfio_user::DmaUnmapFlags,
        _a: u64,
        _s: u64,
    ) -> Result<(), std::io::Error> {
        Ok(())
    }
    fn reset(&mut self) -> Result<(), std::io::Error> {
        Ok(())
    }
    fn set_irqs(
        &mut self,
        _i: u32,
        _f: u32,
        _s: u32,
        _c: u32,
        _fds: Vec<std::fs::File>,
    ) -> Result<(), std::io::Error> {
        Ok(())
    }
}

fn region_rw_anchor(dir: &Path, n: usize) -> Result<Vec<f64>, BenchError> {
    use rustvmm_vfio_user::{Server as RServer, ServerRegion};
    let path = dir.join("rustvmm.sock");
    let _ = std::fs::remove_file(&path);
    let mut regions = Vec::new();
    for i in 0..9u32 {
        let size = match i {
            0 => 4096,
            7 => 256,
            _ => 0,
        };
        regions.push(ServerRegion {
            region_info: vfio_bindings::bindings::vfio::vfio_region_info {
                argsz: 32,
                flags: if size > 0 { 3 } else { 0 },
                index: i,
                cap_offset: 0,
                size,
                offset: 0,
            },
            sparse_areas: Vec::new(),
            mmap_fd: None,
        });
    }
    let server = RServer::new(&path, true, Vec::new(), regions)
        .map_err(|e| run_err("rust-vmm server")(&e))?;
    let t = std::thread::spawn(move || {
        let mut b = AnchorBackend { bar: vec![0; 4096] };
        let _ = server.run(&mut b);
    });
    let mut c = None;
    for _ in 0..100 {
        match rustvmm_vfio_user::Client::new(&path) {
            Ok(x) => {
                c = Some(x);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let mut c = c.ok_or_else(|| BenchError::Run("rust-vmm client could not connect".into()))?;
    let mut us = Vec::with_capacity(n);
    let mut b = [0u8; 4];
    for i in 0..n + n / 10 {
        let t0 = Instant::now();
        c.region_write(0, 0, &(i as u32).to_le_bytes())
            .map_err(|e| run_err("rust-vmm write")(&e))?;
        c.region_read(0, 0, &mut b)
            .map_err(|e| run_err("rust-vmm read")(&e))?;
        if i >= n / 10 {
            us.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    let _ = c.shutdown();
    drop(c);
    let _ = t.join();
    Ok(us)
}

fn setup_dma(c: &Client) -> Result<(), BenchError> {
    let e = |e: vfu::client::ClientError| run_err("dma setup")(&e);
    c.config_write(4, &6u16.to_le_bytes()).map_err(e)?;
    Ok(())
}

fn dma_ours(
    dir: &Path,
    engine: &dma::DmaEngine,
    mib: u64,
    runs: usize,
) -> Result<(Vec<f64>, f64), BenchError> {
    let size = (2 * mib + 1) << 20;
    let fd = memfd(size)?;
    let mut m = Map::new(&fd, size as usize)?;
    let c = Client::connect(&dir.join("dma.sock"), Duration::from_secs(10))
        .map_err(|e| run_err("connect")(&e))?;
    let base = 0x1_0000_0000u64;
    c.dma_map_fd(base, size, fd.as_raw_fd(), 0, DMA_READ | DMA_WRITE)
        .map_err(|e| run_err("dma map")(&e))?;
    setup_dma(&c)?;
    let len = mib << 20;
    {
        let s = m.slice();
        for (i, b) in s[1 << 20..(1 << 20) + len as usize].iter_mut().enumerate() {
            *b = i as u8;
        }
        let d = &mut s[..32];
        d[0..8].copy_from_slice(&(base + (1 << 20)).to_le_bytes());
        d[8..16].copy_from_slice(&(base + (1 << 20) + len).to_le_bytes());
        d[16..20].copy_from_slice(&(len as u32).to_le_bytes());
    }
    c.region_write(0, dma::reg::DESC, &base.to_le_bytes())
        .map_err(|e| run_err("desc")(&e))?;
    let mut us = Vec::new();
    let t_all = Instant::now();
    for _ in 0..runs {
        let before = engine.completed();
        let t = Instant::now();
        c.region_write(0, dma::reg::DOORBELL, &1u32.to_le_bytes())
            .map_err(|e| run_err("doorbell")(&e))?;
        while engine.completed() == before {
            std::hint::spin_loop();
            if t.elapsed() > Duration::from_secs(30) {
                return Err(BenchError::Run("DMA copy did not complete in 30 s".into()));
            }
        }
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let secs = t_all.elapsed().as_secs_f64();
    let s = m.slice();
    let (a, b) = s[1 << 20..].split_at(len as usize);
    if a != &b[..len as usize] {
        return Err(BenchError::Run("DMA copy corrupted data".into()));
    }
    Ok((us, (len * runs as u64) as f64 / secs / 1e9))
}

fn memcpy_anchor(mib: u64, runs: usize) -> (Vec<f64>, f64) {
    let len = (mib << 20) as usize;
    let src = vec![7u8; len];
    let mut dst = vec![0u8; len];
    let mut us = Vec::new();
    let t_all = Instant::now();
    for _ in 0..runs {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let secs = t_all.elapsed().as_secs_f64();
    (us, (len * runs) as f64 / secs / 1e9)
}

struct VecMem(std::sync::Mutex<Vec<u8>>);

impl DmaMemory for VecMem {
    fn read(&self, offset: u64, buf: &mut [u8]) -> bool {
        let v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match v.get(offset as usize..offset as usize + buf.len()) {
            Some(s) => {
                buf.copy_from_slice(s);
                true
            }
            None => false,
        }
    }
    fn write(&self, offset: u64, data: &[u8]) -> bool {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match v.get_mut(offset as usize..offset as usize + data.len()) {
            Some(s) => {
                s.copy_from_slice(data);
                true
            }
            None => false,
        }
    }
}

fn dma_msg(
    dir: &Path,
    engine: &dma::DmaEngine,
    mib: u64,
    runs: usize,
) -> Result<(Vec<f64>, f64), BenchError> {
    let size = (2 * mib + 1) << 20;
    let len = mib << 20;
    let mut v = vec![0u8; size as usize];
    let base = 0x2_0000_0000u64;
    v[0..8].copy_from_slice(&(base + (1 << 20)).to_le_bytes());
    v[8..16].copy_from_slice(&(base + (1 << 20) + len).to_le_bytes());
    v[16..20].copy_from_slice(&(len as u32).to_le_bytes());
    let mem = Arc::new(VecMem(std::sync::Mutex::new(v)));
    let c = Client::connect(&dir.join("dma.sock"), Duration::from_secs(10))
        .map_err(|e| run_err("connect")(&e))?;
    c.dma_map_local(base, size, DMA_READ | DMA_WRITE, mem.clone())
        .map_err(|e| run_err("dma map")(&e))?;
    setup_dma(&c)?;
    c.region_write(0, dma::reg::DESC, &base.to_le_bytes())
        .map_err(|e| run_err("desc")(&e))?;
    let mut us = Vec::new();
    let t_all = Instant::now();
    let mut b = [0u8; 4];
    for _ in 0..runs {
        let before = engine.completed();
        let t = Instant::now();
        c.region_write(0, dma::reg::DOORBELL, &1u32.to_le_bytes())
            .map_err(|e| run_err("doorbell")(&e))?;
        // The client serves the engine's DMA_READ/WRITE while it waits in a call.
        while engine.completed() == before {
            c.region_read(0, dma::reg::STATUS, &mut b)
                .map_err(|e| run_err("status")(&e))?;
            if t.elapsed() > Duration::from_secs(30) {
                return Err(BenchError::Run(
                    "message DMA did not complete in 30 s".into(),
                ));
            }
        }
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let secs = t_all.elapsed().as_secs_f64();
    Ok((us, (len * runs as u64) as f64 / secs / 1e9))
}

fn irq_ours(
    dir: &Path,
    ctx: &vfu::server::DeviceContext,
    n: usize,
) -> Result<Vec<f64>, BenchError> {
    let c = Client::connect(&dir.join("dma.sock"), Duration::from_secs(5))
        .map_err(|e| run_err("connect")(&e))?;
    let efd = EventFd::new(libc::EFD_CLOEXEC).map_err(|e| run_err("eventfd")(&e))?;
    c.set_irq_eventfds(IRQ_MSIX, 0, &[efd.as_raw_fd()])
        .map_err(|e| run_err("set irqs")(&e))?;
    // MSI-X on, vector 0 unmasked.
    let mut cfg = vec![0u8; 256];
    c.config_read(0, &mut cfg)
        .map_err(|e| run_err("config read")(&e))?;
    let msix = pci::MsixCap::find(&cfg)
        .ok_or_else(|| BenchError::Run("the DMA engine shows no MSI-X capability".into()))?;
    c.config_write(msix.offset as u64 + 2, &0x8001u16.to_le_bytes())
        .map_err(|e| run_err("msix enable")(&e))?;
    c.region_write(
        u32::from(msix.table_bar),
        u64::from(msix.table_offset) + 12,
        &0u32.to_le_bytes(),
    )
    .map_err(|e| run_err("unmask")(&e))?;
    wake_latency(n, &efd, || {
        ctx.trigger(0);
    })
}

fn wake_latency(n: usize, efd: &EventFd, fire: impl Fn()) -> Result<Vec<f64>, BenchError> {
    let reader = efd.try_clone().map_err(|e| run_err("eventfd")(&e))?;
    let (tx, rx) = std::sync::mpsc::channel::<Instant>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<f64>();
    let h = std::thread::spawn(move || {
        while let Ok(t0) = rx.recv() {
            if reader.read().is_err() {
                break;
            }
            let _ = done_tx.send(t0.elapsed().as_secs_f64() * 1e6);
        }
    });
    let mut us = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t0 = Instant::now();
        tx.send(t0)
            .map_err(|_| BenchError::Run("waker gone".into()))?;
        // Let the reader block before firing, as a device interrupt finds a sleeping vCPU.
        std::thread::sleep(Duration::from_micros(50));
        let t1 = Instant::now();
        fire();
        let total = done_rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| BenchError::Run("no wake-up within 5 s".into()))?;
        let fired_after = (t1 - t0).as_secs_f64() * 1e6;
        if i >= n / 10 {
            us.push(total - fired_after);
        }
    }
    drop(tx);
    let _ = h.join();
    Ok(us)
}

/// Where libvfio-user's samples are: `$FAULTLINE_LIBVFIO_USER`, else `.cache/libvfio-user/samples`
/// under the current directory or an ancestor of this executable (a build in the repository).
pub fn libvfio_user_samples() -> Option<std::path::PathBuf> {
    let ok = |d: std::path::PathBuf| d.join("gpio-pci-idio-16").is_file().then_some(d);
    if let Some(d) = std::env::var_os("FAULTLINE_LIBVFIO_USER") {
        return ok(d.into());
    }
    let mut starts = vec![std::env::current_dir().ok()];
    starts.push(std::env::current_exe().ok());
    starts
        .into_iter()
        .flatten()
        .flat_map(|p| p.ancestors().map(Path::to_path_buf).collect::<Vec<_>>())
        .find_map(|a| ok(a.join(".cache/libvfio-user/samples")))
}

/// Kills and reaps a child process on drop.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Our client against libvfio-user's `gpio-pci-idio-16` sample (its server, its process).
fn region_rw_libvfio_user(dir: &Path, samples: &Path, n: usize) -> Result<Vec<f64>, BenchError> {
    let sock = dir.join("libvfio-user-gpio.sock");
    let child = std::process::Command::new(samples.join("gpio-pci-idio-16"))
        .arg(&sock)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| BenchError::Run(format!("start libvfio-user's gpio-pci-idio-16: {e}")))?;
    let _child = Reaped(child);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sock.exists() {
        if Instant::now() > deadline {
            return Err(BenchError::Run(
                "libvfio-user's gpio-pci-idio-16 did not create its socket within 5 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let c = Client::connect(&sock, Duration::from_secs(5))
        .map_err(|e| run_err("connect to libvfio-user")(&e))?;
    region_rw(&c, n)
}

/// This thread's CPU mask narrowed to the CPU it runs on, until dropped.
struct OnOneCpu(libc::cpu_set_t);

impl OnOneCpu {
    fn new() -> Result<OnOneCpu, BenchError> {
        // SAFETY: an all-zero cpu_set_t is a valid empty set.
        let mut saved: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: this thread's mask into our own set of the size we pass.
        let r = unsafe {
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut saved)
        };
        if r != 0 {
            return Err(run_err("sched_getaffinity")(
                &std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: no arguments; returns the CPU or -1.
        let cpu = unsafe { libc::sched_getcpu() }.max(0) as usize;
        memx::pin_to(cpu).map_err(|e| run_err("pinning to one CPU")(&e))?;
        Ok(OnOneCpu(saved))
    }
}

impl Drop for OnOneCpu {
    fn drop(&mut self) {
        // SAFETY: the mask read in `new`, for this thread.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) };
    }
}

/// Run every case; `f` gets each line. Without libvfio-user's samples (see
/// [`libvfio_user_samples`]) its region-rw line is left out, and a note says so on stderr.
pub fn run(quick: bool, mut f: impl FnMut(&Line)) -> Result<(), BenchError> {
    let dir = std::env::temp_dir().join(format!("faultline-bench-vfu-{}", std::process::id()));
    // region-rw: the client, every server (ours, rust-vmm's, libvfio-user's process) on the
    // CPU this thread is on: a wake-up across CPUs costs ~26 µs here, which would hide the
    // implementations behind the scheduler's placement. Threads and processes started from
    // here inherit the mask; it is given back before the other cases.
    let rw_dir = dir.join("rw");
    let pinned = OnOneCpu::new()?;
    let (served, _, _) = serve(&rw_dir)?;
    let n = if quick { 2_000 } else { 20_000 };
    f(&line(
        "region-rw",
        "faultline",
        region_rw_ours(&rw_dir, n)?,
        0.0,
    ));
    f(&line(
        "region-rw",
        "rust-vmm",
        region_rw_anchor(&rw_dir, n)?,
        0.0,
    ));
    match libvfio_user_samples() {
        Some(samples) => f(&line(
            "region-rw",
            "libvfio-user",
            region_rw_libvfio_user(&rw_dir, &samples, n)?,
            0.0,
        )),
        None => tracing::warn!(
            "faultline bench: libvfio-user's samples not found (run scripts/libvfio-user.sh, or \
             set FAULTLINE_LIBVFIO_USER to their directory): no libvfio-user region-rw line"
        ),
    }
    drop(served);
    drop(pinned);
    let (served, engine, ctx) = serve(&dir)?;
    let (mib, runs) = if quick { (16, 4) } else { (64, 16) };
    let (us, g) = dma_ours(&dir, &engine, mib, runs)?;
    f(&line("dma", "faultline", us, g));
    let (us, g) = memcpy_anchor(mib, runs);
    f(&line("dma", "memcpy", us, g));
    let (us, g) = dma_msg(&dir, &engine, 4, if quick { 2 } else { 8 })?;
    f(&line("dma-msg", "faultline", us, g));
    let irq_n = if quick { 1_000 } else { 10_000 };
    f(&line("irq", "faultline", irq_ours(&dir, &ctx, irq_n)?, 0.0));
    let efd = EventFd::new(libc::EFD_CLOEXEC).map_err(|e| run_err("eventfd")(&e))?;
    let us = wake_latency(irq_n, &efd, || {
        let _ = efd.write(1);
    })?;
    f(&line("irq", "eventfd", us, 0.0));
    drop(served);
    Ok(())
}
