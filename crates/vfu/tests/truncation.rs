//! SIGBUS from a shrinking file (issue items 12 and 17): the BAR memfd the server hands out
//! is sealed, a client that truncates its own DMA memfd does not kill the server (the device
//! sees a failed DMA, other clients nothing), and our client hands only sealed fds.
//!
//! Alone in its test binary: before the fix, the SIGBUS killed the whole process.

mod common;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::*;
use vfu::client::{Client, ClientError};
use vfu::devices::dma::reg;
use vfu::devices::gpio;
use vfu::proto::*;
use zerocopy::IntoBytes;

const GUEST: u64 = 0x1000_0000;
const SIZE: u64 = 0x10000;

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < TIMEOUT, "{what} within {TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn region_write(c: &mut Raw, region: u32, offset: u64, data: &[u8]) {
    let a = RegionAccess {
        offset,
        region,
        count: data.len() as u32,
    };
    let mut p = a.as_bytes().to_vec();
    p.extend_from_slice(data);
    c.ok(Command::RegionWrite, &p, &[]);
}

/// Write a descriptor copying 0x100 bytes from GUEST+0x1000 to GUEST+0x2000 into `fd`.
fn descriptor(fd: &std::os::fd::OwnedFd) {
    let f = std::fs::File::from(fd.try_clone().unwrap());
    let mut d = Vec::new();
    d.extend((GUEST + 0x1000).to_le_bytes());
    d.extend((GUEST + 0x2000).to_le_bytes());
    d.extend(0x100u32.to_le_bytes());
    d.extend([0u8; 12]);
    std::os::unix::fs::FileExt::write_all_at(&f, &d, 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 0x100], 0x1000).unwrap();
}

#[test]
fn a_client_truncating_its_dma_memfd_does_not_kill_the_server() {
    let h = Harness::new();
    let (engine, dev) = h.dma("dma.sock");
    let (_g, other) = h.gpio("gpio.sock");
    let worker = Client::connect(other.path(), TIMEOUT).expect("the other device's client");

    let mut c = Raw::connect(dev.path());
    c.negotiate();
    // An unsealed memfd (as libvfio-user's client maps an unsealed mkstemp file): accepted.
    let mem = memfd(SIZE, false);
    descriptor(&mem);
    c.ok(
        Command::DmaMap,
        &dma_map(GUEST, SIZE, 0),
        &[mem.as_raw_fd()],
    );
    region_write(&mut c, PCI_CONFIG_REGION, 4, &0x6u16.to_le_bytes());
    region_write(&mut c, 0, reg::DESC, &GUEST.to_le_bytes());
    region_write(&mut c, 0, reg::DOORBELL, &1u32.to_le_bytes());
    wait_until("the first copy", || engine.completed() == 1);

    // The client pulls the pages from under the server; the next copy touches them.
    // SAFETY: ftruncate of our own memfd.
    assert_eq!(unsafe { libc::ftruncate(mem.as_raw_fd(), 0) }, 0);
    region_write(&mut c, 0, reg::DOORBELL, &1u32.to_le_bytes());
    wait_until("the copy over truncated memory to fail", || {
        c.read32(0, reg::ERRORS) == 1
    });
    // The mapping stays unusable; the device, its client and the other device go on.
    region_write(&mut c, 0, reg::DOORBELL, &1u32.to_le_bytes());
    wait_until("the next copy to fail too", || {
        c.read32(0, reg::ERRORS) == 2
    });
    assert_eq!(engine.completed(), 1);
    worker.region_write(gpio::BAR, 0, &[0x77]).unwrap();
    let mut b = [0u8];
    worker.region_read(gpio::BAR, 1, &mut b).unwrap();
    assert_eq!(b[0], 0x77);

    // Unmapped and mapped again with good memory, the device works again.
    let u = DmaUnmap {
        argsz: 24,
        flags: 0,
        address: GUEST,
        size: SIZE,
    };
    c.ok(Command::DmaUnmap, u.as_bytes(), &[]);
    let fresh = memfd(SIZE, true);
    descriptor(&fresh);
    c.ok(
        Command::DmaMap,
        &dma_map(GUEST, SIZE, 0),
        &[fresh.as_raw_fd()],
    );
    region_write(&mut c, 0, reg::DOORBELL, &1u32.to_le_bytes());
    wait_until("a copy after mapping again", || engine.completed() == 2);
}

#[test]
fn the_bar_memfd_handed_out_is_sealed() {
    let h = Harness::new();
    let (_e, dev) = h.dma("dma.sock");
    let c = Client::connect(dev.path(), TIMEOUT).expect("client");
    let fd = c
        .region(2)
        .and_then(|r| r.fd.as_ref())
        .expect("BAR 2 comes with its memfd")
        .as_raw_fd();
    // SAFETY: F_GET_SEALS on a descriptor we hold.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    assert!(
        seals >= 0 && seals & want == want,
        "seals {seals:#x}, want {want:#x}"
    );
    // SAFETY: ftruncate of a descriptor we hold (refused by the seals).
    let r = unsafe { libc::ftruncate(fd, 0) };
    assert_eq!(r, -1, "a client shrank the server's BAR memfd");
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EPERM)
    );
    // The server still reads its BAR memory (the sparse area starts at 0x1000).
    let mut b = [0u8; 4];
    c.region_read(2, 0x1000, &mut b).unwrap();
}

#[test]
fn our_client_hands_only_sealed_fds() {
    let h = Harness::new();
    let (_e, dev) = h.dma("dma.sock");
    let c = Client::connect(dev.path(), TIMEOUT).expect("client");
    let unsealed = memfd(SIZE, false);
    match c.dma_map_fd(GUEST, SIZE, unsealed.as_raw_fd(), 0, DMA_READ | DMA_WRITE) {
        Err(ClientError::Unsealed { fd, .. }) => assert_eq!(fd, unsealed.as_raw_fd()),
        other => panic!("an unsealed memfd: {other:?}"),
    }
    assert!(dev.context().dma_regions().is_empty());
    // A plain file: refused too (on a disk file system F_GET_SEALS fails with EINVAL, whose
    // errno the error keeps; a tmpfs file reads as sealable-but-unsealed).
    let file = tempfile::tempfile().unwrap();
    file.set_len(SIZE).unwrap();
    match c.dma_map_fd(GUEST, SIZE, file.as_raw_fd(), 0, DMA_READ | DMA_WRITE) {
        Err(ClientError::Unsealed { source, .. }) => {
            if let Some(e) = source {
                assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
            }
        }
        other => panic!("a plain file: {other:?}"),
    }
    let sealed = memfd(SIZE, true);
    c.dma_map_fd(GUEST, SIZE, sealed.as_raw_fd(), 0, DMA_READ | DMA_WRITE)
        .expect("a sealed memfd");
}
