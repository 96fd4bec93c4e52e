//! End-to-end migration v2 and dirty logging: save / load of device state with the ERROR
//! state on a bad stream, PRE_COPY and STOP_COPY, DMA dirty logging of device writes, and
//! libvfio-user's sample device (timer, INTx, message and fd DMA, dirty logging, pre-copy
//! migration to a second device) on our framework, driven by our client.

mod common;

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use vfu::client::{Client, ClientError};
use vfu::devices::gpio;
use vfu::proto::*;
use vfu::server::AttachedDevice;

#[test]
fn migration_save_load_and_bad_state() {
    let h = Harness::one_thread();
    let (src_gpio, src_dev) = h.gpio("src.sock");
    let (dst_gpio, dst_dev) = h.gpio("dst.sock");
    let (_e, dma_dev) = h.dma("dma.sock");
    let src = connect(src_dev.path());
    let dst = connect(dst_dev.path());

    src.region_write(gpio::BAR, 0, &[0x12]).unwrap();
    src.region_write(gpio::BAR, 4, &[0x34]).unwrap();
    src.region_write(gpio::BAR, 2, &[0]).unwrap(); // interrupt enabled
    src.config_write(4, &0x0002u16.to_le_bytes()).unwrap();
    src.config_write(0x18, &0xd000_0000u32.to_le_bytes())
        .unwrap();
    assert_eq!(src.migration_state().unwrap(), MigState::Running);

    let blob = src.save_state().unwrap();
    assert_eq!(&blob[..4], b"VFUS");
    assert_eq!(src.migration_state().unwrap(), MigState::Stop);
    assert_eq!(src_dev.context().migration_state(), MigState::Stop);
    // Stopped: MIG_DATA_READ refused outside STOP_COPY.
    assert!(src.mig_data_read(16).is_err());
    src.set_migration_state(MigState::Running).unwrap();

    dst.load_state(&blob).unwrap();
    assert_eq!(dst.migration_state().unwrap(), MigState::Running);
    assert_eq!(dst_gpio.outputs(), 0x3412);
    assert_eq!(rd8(&dst, gpio::BAR, 0), 0x12);
    assert_eq!(rd8(&dst, gpio::BAR, 4), 0x34);
    assert_eq!(rd16_cfg(&dst, 4), 0x0002);
    assert_eq!(rd32(&dst, PCI_CONFIG_REGION, 0x18), 0xd000_0000);
    // The interrupt-enable state came along: a change on the destination sets the status.
    dst.region_write(gpio::BAR, 0, &[0x13]).unwrap();
    assert_eq!(rd8(&dst, gpio::BAR, 6), 1);
    assert_eq!(src_gpio.outputs(), 0x3412);

    // Garbage: the load fails, the device is in ERROR, and only reset recovers it.
    let err = dst
        .load_state(b"this is not a device state at all")
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Server { cmd: Command::DeviceFeature, errno } if errno == libc::EINVAL),
        "{err:?}"
    );
    assert_eq!(dst.migration_state().unwrap(), MigState::Error);
    assert_eq!(dst_dev.context().migration_state(), MigState::Error);
    assert!(dst.set_migration_state(MigState::Running).is_err());
    // Still answering region accesses while in ERROR.
    assert_eq!(rd32(&dst, PCI_CONFIG_REGION, 0), 0x0dc8_494f);
    dst.reset().unwrap();
    assert_eq!(dst.migration_state().unwrap(), MigState::Running);
    assert_eq!(dst_gpio.outputs(), 0);

    // A truncated state and another device's state are refused the same way.
    for bad in [&blob[..blob.len() - 3], &blob[..9]] {
        assert!(dst.load_state(bad).is_err());
        assert_eq!(dst.migration_state().unwrap(), MigState::Error);
        dst.reset().unwrap();
    }
    let dma_client = connect(dma_dev.path());
    let dma_blob = dma_client.save_state().unwrap();
    assert!(dst.load_state(&dma_blob).is_err());
    assert_eq!(dst.migration_state().unwrap(), MigState::Error);
    dst.reset().unwrap();
    // Unsupported states are refused without breaking the device.
    assert!(matches!(
        dst.set_migration_state(MigState::PreCopyP2p),
        Err(ClientError::Server { errno, .. }) if errno == libc::ENOTSUP
    ));
    assert_eq!(dst.migration_state().unwrap(), MigState::Running);
    // PRE_COPY: the device keeps running and (framework stream) has no early data; it can be
    // abandoned back to RUNNING, or finished through STOP_COPY with the whole state.
    dst.set_migration_state(MigState::PreCopy).unwrap();
    assert_eq!(dst.mig_data_read(4096).unwrap(), Vec::<u8>::new());
    dst.set_migration_state(MigState::Running).unwrap();
    dst.set_migration_state(MigState::PreCopy).unwrap();
    dst.set_migration_state(MigState::StopCopy).unwrap();
    let mut again = Vec::new();
    loop {
        let d = dst.mig_data_read(1000).unwrap();
        if d.is_empty() {
            break;
        }
        again.extend(d);
    }
    assert_eq!(&again[..4], b"VFUS");
    // STOP_COPY cannot go back to PRE_COPY.
    assert!(dst.set_migration_state(MigState::PreCopy).is_err());
}

#[test]
fn dma_dirty_logging_reports_and_clears_device_writes() {
    let rig = DmaRig::new(true);
    let c = &rig.client;
    let page = 4096u64;
    // Not started: a report is refused.
    assert!(c.dma_logging_report(GUEST, 16 * page, page).is_err());
    assert!(matches!(
        c.dma_logging_start(1000, &[]),
        Err(ClientError::Server { errno, .. }) if errno == libc::EINVAL
    ));
    c.dma_logging_start(page, &[]).unwrap();
    assert_eq!(rig.dev.context().dma_logging(), Some(page));
    let ctx = rig.dev.context();
    // Device writes through the fd mapping: pages 1 and 2 (a write across their edge) and 9.
    ctx.dma_write(GUEST + page + page - 8, &[1; 16]).unwrap();
    ctx.dma_write(GUEST + 9 * page, &[2; 1]).unwrap();
    // Reads do not dirty.
    let mut b = [0u8; 64];
    ctx.dma_read(GUEST + 5 * page, &mut b).unwrap();
    // A write the device made some other way, marked by hand.
    ctx.dma_mark_dirty(GUEST + 12 * page, 1);
    let words = c.dma_logging_report(GUEST, 16 * page, page).unwrap();
    assert_eq!(words, vec![(1 << 1) | (1 << 2) | (1 << 9) | (1 << 12)]);
    // Reported pages are cleared.
    assert_eq!(
        c.dma_logging_report(GUEST, 16 * page, page).unwrap(),
        vec![0]
    );
    // A report of a sub-range counts from its own first page.
    ctx.dma_write(GUEST + 3 * page, &[3; 8]).unwrap();
    assert_eq!(
        c.dma_logging_report(GUEST + 2 * page, 4 * page, page)
            .unwrap(),
        vec![1 << 1]
    );
    // Another page size than logging's is refused; so is a misaligned range.
    assert!(c.dma_logging_report(GUEST, 16 * page, 2 * page).is_err());
    assert!(c.dma_logging_report(GUEST + 1, page, page).is_err());
    c.dma_logging_stop().unwrap();
    assert_eq!(ctx.dma_logging(), None);
    assert!(c.dma_logging_report(GUEST, 16 * page, page).is_err());
}

mod sample {
    //! libvfio-user's sample device on our framework, driven by our client.
    use super::*;
    use vfu::devices::sample::{self, Sample};

    fn serve(h: &Harness, name: &str) -> (Arc<Sample>, AttachedDevice) {
        let s = Sample::new();
        let dev = Sample::description()
            .realize(s.clone())
            .expect("realize sample")
            .attach(&h.server, &h.path(name))
            .expect("attach sample");
        s.start(dev.context());
        (s, dev)
    }

    fn epoch() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn read_all(c: &Client, chunk: u32) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let d = c.mig_data_read(chunk).unwrap();
            if d.is_empty() {
                return out;
            }
            out.extend(d);
        }
    }

    #[test]
    fn timer_intx_dma_dirty_logging_and_precopy_migration() {
        let h = Harness::one_thread();
        let (src_dev, src) = serve(&h, "src.sock");
        let c = connect(src.path());
        let mut cfg = [0u8; 4];
        c.config_read(0, &mut cfg).unwrap();
        assert_eq!(cfg, [0xad, 0xde, 0xef, 0xbe]);
        assert_eq!(c.region(1).unwrap().size, sample::BAR1_SIZE);
        // Slot 0: memory served through messages; slot 1: a memfd the server maps.
        let ram = Arc::new(VecMem(Mutex::new(vec![0u8; 4096])));
        c.dma_map_local(0, 4096, DMA_READ | DMA_WRITE, ram.clone())
            .unwrap();
        let fd = memfd(4096, true);
        c.dma_map_fd(0x1000, 4096, fd.as_raw_fd(), 0, DMA_READ | DMA_WRITE)
            .unwrap();
        let intx = eventfd();
        c.set_irq_eventfds(IRQ_INTX, 0, &[intx.as_raw_fd()])
            .unwrap();
        c.dma_logging_start(4096, &[]).unwrap();
        // BAR0: the timer, due now.
        c.region_write(0, 0, &epoch().to_ne_bytes()).unwrap();
        assert!(
            readable(intx.as_raw_fd(), Duration::from_secs(3)),
            "no INTx"
        );
        // The message DMA needs the client to read its socket: keep it busy until done.
        wait_for("the sample's DMA pass", || {
            let mut b = [0u8; 8];
            c.region_read(0, 0, &mut b).unwrap();
            src_dev.fired.load(Ordering::Relaxed) >= 1
        });
        let want: Vec<u8> = (0..4).flat_map(|i| [b'A' + i; 1024]).collect();
        assert_eq!(
            *ram.0.lock().unwrap(),
            want,
            "written through DMA_WRITE messages"
        );
        let m = Mapped::new(fd.as_raw_fd(), 0, 4096);
        let mut direct = vec![0u8; 4096];
        m.read(0, &mut direct);
        assert_eq!(direct, want, "written through the fd");
        // The fd-mapped page is logged dirty by the server; the message one is the client's.
        assert_eq!(c.dma_logging_report(0x1000, 4096, 4096).unwrap(), vec![1]);
        assert_eq!(c.dma_logging_report(0, 4096, 4096).unwrap(), vec![0]);
        c.dma_logging_stop().unwrap();

        // BAR1: 12 KiB of storage (a write across the trapped middle page), 4 KiB reserved.
        let garbage = pattern(0x3000, 7);
        c.region_write(1, 0, &garbage).unwrap();
        let mut tail = [1u8; 16];
        c.region_write(1, 0x3000, &tail).unwrap();
        c.region_read(1, 0x3000, &mut tail).unwrap();
        assert_eq!(tail, [0; 16]);
        // Schedule an interrupt 2 s ahead, then migrate: PRE_COPY yields BAR1 (12 KiB),
        // STOP_COPY BAR1 and the timer (12 KiB + 8).
        let due = epoch() + 2;
        c.region_write(0, 0, &due.to_ne_bytes()).unwrap();
        assert_eq!(
            c.migration_flags().unwrap(),
            Some(MIGRATION_STOP_COPY | MIGRATION_PRE_COPY)
        );
        c.set_migration_state(MigState::PreCopy).unwrap();
        let pre = read_all(&c, 1024);
        assert_eq!(pre, garbage);
        c.set_migration_state(MigState::StopCopy).unwrap();
        let state = read_all(&c, 1024);
        assert_eq!(state.len(), 0x3000 + 8);
        assert_eq!(&state[..0x3000], &garbage[..]);
        assert_eq!(&state[0x3000..], &due.to_ne_bytes());
        c.set_migration_state(MigState::Stop).unwrap();

        // The destination: RESUMING takes the stream; a short one cannot run.
        let (_dst_dev, dst) = serve(&h, "dst.sock");
        let d = connect(dst.path());
        d.set_migration_state(MigState::Resuming).unwrap();
        d.mig_data_write(&state[..100]).unwrap();
        assert!(d.set_migration_state(MigState::Running).is_err());
        d.reset().unwrap();
        d.set_migration_state(MigState::Resuming).unwrap();
        for piece in state.chunks(1024) {
            d.mig_data_write(piece).unwrap();
        }
        d.set_migration_state(MigState::Stop).unwrap();
        let mut back = vec![0u8; 0x3000];
        d.region_read(1, 0, &mut back).unwrap();
        assert_eq!(back, garbage);
        let intx = eventfd();
        d.set_irq_eventfds(IRQ_INTX, 0, &[intx.as_raw_fd()])
            .unwrap();
        d.set_migration_state(MigState::Running).unwrap();
        // The interrupt scheduled on the source fires on the destination.
        assert!(
            readable(intx.as_raw_fd(), Duration::from_secs(5)),
            "the migrated timer did not fire"
        );
        assert!(epoch() >= due);
    }

    #[test]
    fn bad_bar0_accesses_are_refused() {
        let h = Harness::one_thread();
        let (_s, dev) = serve(&h, "s.sock");
        let c = connect(dev.path());
        for (off, len) in [(0u64, 4usize), (8, 8), (1, 8)] {
            let mut b = vec![0u8; len];
            assert!(matches!(
                c.region_read(0, off, &mut b),
                Err(ClientError::Server { errno, .. }) if errno == libc::EINVAL
            ));
        }
        // MIG_DATA_READ outside PRE_COPY / STOP_COPY is refused.
        assert!(c.mig_data_read(64).is_err());
    }
}
