//! A client cannot abort or exhaust the server: every size it controls is bounded by what
//! the server advertised, a request past a bound gets an error reply with an errno, and the
//! session goes on (issue items 11 and 14).

mod common;

use common::*;
use vfu::proto::*;

/// DMA_LOGGING_START payload: page size, no ranges (all mapped memory).
fn log_start(page: u64) -> Vec<u8> {
    let mut d = page.to_ne_bytes().to_vec();
    d.extend(0u32.to_ne_bytes());
    d.extend(0u32.to_ne_bytes());
    feature(FEATURE_SET | FEATURE_DMA_LOGGING_START, &d)
}

/// DMA_LOGGING_REPORT payload.
fn log_report(iova: u64, len: u64, page: u64) -> Vec<u8> {
    let mut d = iova.to_ne_bytes().to_vec();
    d.extend(len.to_ne_bytes());
    d.extend(page.to_ne_bytes());
    feature(FEATURE_GET | FEATURE_DMA_LOGGING_REPORT, &d)
}

#[test]
fn dma_map_and_dirty_logging_are_bounded_and_the_session_survives() {
    let h = Harness::new();
    let (_e, dev) = h.dma("dma.sock");
    let mut c = Raw::connect(dev.path());
    let v = c.version();
    let caps = Caps::from_json(&v.payload[4..]).expect("server caps");
    let advertised_bitmap = caps.migration.expect("migration caps").max_bitmap_size;
    let id = c.read32(PCI_CONFIG_REGION, 0);

    // 2^62 bytes without an fd: past the total a client may map.
    c.expect_error(Command::DmaMap, &dma_map(0, 1 << 62, 0), &[], libc::ENOSPC);
    // 1 TiB is within it, but its dirty bitmap in 512-byte pages (256 MiB) is not.
    c.ok(Command::DmaMap, &dma_map(0, 1 << 40, 0), &[]);
    c.expect_error(Command::DeviceFeature, &log_start(512), &[], libc::ENOMEM);
    // In 4 KiB pages it is (32 MiB).
    c.ok(Command::DeviceFeature, &log_start(4096), &[]);
    // While logging, a new mapping's bitmap counts too: 2^47 more bytes would need 4 GiB.
    c.expect_error(
        Command::DmaMap,
        &dma_map(1 << 47, 1 << 47, 0),
        &[],
        libc::ENOMEM,
    );
    // A report of 2^32 pages (a 512 MiB bitmap) is past max_bitmap_size.
    c.expect_error(
        Command::DeviceFeature,
        &log_report(0, 4096 << 32, 4096),
        &[],
        libc::E2BIG,
    );
    // The largest report max_bitmap_size allows is answered in full.
    let pages = advertised_bitmap * 8;
    let r = c.ok(
        Command::DeviceFeature,
        &log_report(0, pages * 4096, 4096),
        &[],
    );
    assert_eq!(r.len() as u64, 8 + 24 + advertised_bitmap);
    c.expect_error(
        Command::DeviceFeature,
        &log_report(0, (pages + 1) * 4096, 4096),
        &[],
        libc::E2BIG,
    );
    c.ok(
        Command::DeviceFeature,
        &feature(FEATURE_SET | FEATURE_DMA_LOGGING_STOP, &[0; 16]),
        &[],
    );
    // Unmapped, the budget is back: the whole limit fits in one mapping again.
    let u = DmaUnmap {
        argsz: 24,
        flags: 0,
        address: 0,
        size: 1 << 40,
    };
    c.ok(Command::DmaUnmap, zerocopy::IntoBytes::as_bytes(&u), &[]);
    c.ok(Command::DmaMap, &dma_map(0, 1 << 48, 0), &[]);
    c.expect_error(Command::DmaMap, &dma_map(1 << 48, 1, 0), &[], libc::ENOSPC);

    // The session is still served.
    assert_eq!(c.read32(PCI_CONFIG_REGION, 0), id);
}

#[test]
fn dma_map_count_is_bounded_by_max_dma_maps() {
    let h = Harness::new();
    let (_e, dev) = h.dma("dma.sock");
    let mut c = Raw::connect(dev.path());
    let v = c.version();
    let caps = Caps::from_json(&v.payload[4..]).expect("server caps");
    for i in 0..u64::from(caps.max_dma_maps) {
        c.ok(Command::DmaMap, &dma_map(i << 12, 4096, 0), &[]);
    }
    c.expect_error(
        Command::DmaMap,
        &dma_map(u64::from(caps.max_dma_maps) << 12, 4096, 0),
        &[],
        libc::ENOSPC,
    );
    c.read32(PCI_CONFIG_REGION, 0);
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

#[test]
fn ioeventfds_asked_again_replace_the_old_ones() {
    let h = Harness::new();
    let (_e, dev) = h.dma("dma.sock");
    let c = vfu::client::Client::connect(dev.path(), TIMEOUT).expect("client");
    let first = c.region_io_fds(0).expect("ioeventfds");
    assert_eq!(first.len(), 1);
    drop(first);
    let before = open_fds();
    for _ in 0..200 {
        assert_eq!(c.region_io_fds(0).expect("ioeventfds").len(), 1);
    }
    let grown = open_fds().saturating_sub(before);
    assert!(
        grown < 50,
        "200 GET_REGION_IO_FDS left {grown} more descriptors open in the server"
    );
    // The latest ioeventfd works: a write to it rings the doorbell (an empty descriptor
    // list at 0 fails the copy and counts an error, which is enough to see it ran).
    let fds = c.region_io_fds(0).expect("ioeventfds");
    let efd = fds[0].1.try_clone().unwrap();
    let errs = |c: &vfu::client::Client| {
        let mut b = [0u8; 4];
        c.region_read(0, vfu::devices::dma::reg::ERRORS, &mut b)
            .unwrap();
        u32::from_le_bytes(b)
    };
    let e0 = errs(&c);
    // SAFETY: write of 8 bytes to an eventfd we hold.
    let n = unsafe {
        libc::write(
            std::os::fd::AsRawFd::as_raw_fd(&efd),
            1u64.to_ne_bytes().as_ptr().cast(),
            8,
        )
    };
    assert_eq!(n, 8);
    let t = std::time::Instant::now();
    while errs(&c) == e0 {
        assert!(t.elapsed() < TIMEOUT, "the doorbell ioeventfd did nothing");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
