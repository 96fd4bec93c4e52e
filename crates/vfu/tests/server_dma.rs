//! End-to-end DMA: the DMA engine copying through memfd mappings (DMA_MAP with fds) and
//! through DMA_READ / DMA_WRITE messages served by the client, the doorbell's ioeventfd,
//! DMA_UNMAP, bus mastering off, descriptors outside any mapping, DMA_MAP while a message
//! DMA is in flight, and fds smaller than their mapping. Real memfds and eventfds.

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use vfu::client::ClientError;
use vfu::devices::dma;
use vfu::proto::*;

#[test]
fn dma_engine_copies_and_raises_msix() {
    let rig = DmaRig::new(true);
    assert_eq!(rig.reg(dma::reg::ID), dma::ID);

    let src = pattern(0x3000, 5);
    rig.mem.write(0x1000, &src);
    rig.put_desc(0, GUEST + 0x1000, GUEST + 0x20000, 0x3000, 1);
    rig.ring(GUEST, 1);
    assert!(
        readable(rig.ev[0].as_raw_fd(), TIMEOUT),
        "no completion IRQ"
    );
    assert_eq!(drain(&rig.ev[0]), 1);
    assert_eq!(drain(&rig.ev[1]), 0);
    let mut dst = vec![0; 0x3000];
    rig.mem.read(0x20000, &mut dst);
    assert_eq!(dst, src);
    assert_eq!(rig.status_of(0), dma::STATUS_DONE);
    assert_eq!(rig.reg(dma::reg::COMPLETED), 1);
    assert_eq!(rig.engine.completed(), 1);
    rig.wait_idle();
    assert_eq!(rig.reg(dma::reg::STATUS), 0);
    let mut b = [0; 8];
    rig.client.region_read(0, dma::reg::BYTES, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0x3000);
    let mut b = [0; 8];
    rig.client.region_read(0, dma::reg::DESC, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), GUEST);

    // Two descriptors in one ring, spanning the mapping's middle.
    let a = pattern(100, 1);
    let b2 = pattern(5000, 2);
    rig.mem.write(0x100000, &a);
    rig.mem.write(0x200000, &b2);
    rig.put_desc(0x40, GUEST + 0x100000, GUEST + 0x300000, 100, 0);
    rig.put_desc(0x60, GUEST + 0x200000, GUEST + 0x310000, 5000, 1);
    rig.ring(GUEST + 0x40, 2);
    assert!(readable(rig.ev[0].as_raw_fd(), TIMEOUT));
    assert_eq!(drain(&rig.ev[0]), 1, "only the second asked for an IRQ");
    let mut got = vec![0; 100];
    rig.mem.read(0x300000, &mut got);
    assert_eq!(got, a);
    let mut got = vec![0; 5000];
    rig.mem.read(0x310000, &mut got);
    assert_eq!(got, b2);
    assert_eq!(rig.status_of(0x40), dma::STATUS_DONE);
    assert_eq!(rig.status_of(0x60), dma::STATUS_DONE);
    assert_eq!(rig.reg(dma::reg::COMPLETED), 3);

    // The doorbell's ioeventfd: one sub-region at 0x10; a signal rings without any
    // REGION_WRITE.
    let io = rig.client.region_io_fds(0).unwrap();
    assert_eq!(io.len(), 1);
    let (sub, fd) = &io[0];
    assert_eq!((sub.offset, sub.size), (dma::reg::DOORBELL, 4));
    assert_eq!(sub.kind, 0);
    assert!(rig.client.region_io_fds(2).unwrap().is_empty());
    let src = pattern(777, 42);
    rig.mem.write(0x5000, &src);
    rig.put_desc(0x80, GUEST + 0x5000, GUEST + 0x6000, 777, 1);
    rig.client
        .region_write(0, dma::reg::DESC, &(GUEST + 0x80).to_le_bytes())
        .unwrap();
    let mut f = std::fs::File::from(fd.try_clone().unwrap());
    f.write_all(&1u64.to_ne_bytes()).unwrap();
    assert!(
        readable(rig.ev[0].as_raw_fd(), TIMEOUT),
        "ioeventfd did not ring"
    );
    assert_eq!(drain(&rig.ev[0]), 1);
    let mut got = vec![0; 777];
    rig.mem.read(0x6000, &mut got);
    assert_eq!(got, src);
    assert_eq!(rig.status_of(0x80), dma::STATUS_DONE);
    assert_eq!(rig.reg(dma::reg::COMPLETED), 4);

    // Unmap: the engine can no longer reach the memory.
    rig.client.dma_unmap(GUEST, GUEST_SIZE as u64).unwrap();
    assert!(rig.dev.context().dma_regions().is_empty());
    let errors = rig.reg(dma::reg::ERRORS);
    rig.ring(GUEST, 1);
    wait_for("the error count", || {
        rig.reg(dma::reg::ERRORS) == errors + 1
    });
    assert!(rig.client.dma_unmap(GUEST, GUEST_SIZE as u64).is_err());
}

#[test]
fn bus_master_off_refuses_dma() {
    let rig = DmaRig::new(false);
    rig.mem.write(0x1000, &[0xaa; 64]);
    rig.put_desc(0, GUEST + 0x1000, GUEST + 0x2000, 64, 1);
    rig.ring(GUEST, 1);
    wait_for("the error count", || rig.reg(dma::reg::ERRORS) == 1);
    rig.wait_idle();
    assert_eq!(rig.reg(dma::reg::STATUS), 2, "last run had an error");
    assert_eq!(rig.reg(dma::reg::COMPLETED), 0);
    assert_eq!(
        rig.status_of(0),
        0,
        "the device could not even write status"
    );
    let mut dst = [0u8; 64];
    rig.mem.read(0x2000, &mut dst);
    assert_eq!(dst, [0; 64]);
    assert!(!readable(rig.ev[0].as_raw_fd(), Duration::from_millis(50)));
    assert!(rig.dev.context().dma_read(GUEST, &mut [0; 4]).is_err());

    // Turning bus mastering on makes the same descriptor work.
    let cmd = rd16_cfg(&rig.client, 4) | pci::CMD_BUS_MASTER;
    rig.client.config_write(4, &cmd.to_le_bytes()).unwrap();
    rig.ring(GUEST, 1);
    assert!(readable(rig.ev[0].as_raw_fd(), TIMEOUT));
    rig.mem.read(0x2000, &mut dst);
    assert_eq!(dst, [0xaa; 64]);
    assert_eq!(rig.status_of(0), dma::STATUS_DONE);
}

#[test]
fn dma_outside_any_mapping_fails_the_descriptor() {
    let rig = DmaRig::new(true);
    // Source unmapped.
    rig.put_desc(0, 0x9000_0000, GUEST + 0x2000, 64, 1);
    rig.ring(GUEST, 1);
    assert!(readable(rig.ev[1].as_raw_fd(), TIMEOUT), "error vector 1");
    assert_eq!(drain(&rig.ev[1]), 1);
    assert_eq!(drain(&rig.ev[0]), 0);
    let st = rig.status_of(0);
    assert_ne!(st & dma::STATUS_FAILED, 0, "status {st:#x}");
    assert_eq!(st & 0xffff, libc::EFAULT as u32);
    // Destination straddling the end of the mapping.
    let end = GUEST + GUEST_SIZE as u64;
    rig.put_desc(0x20, GUEST + 0x1000, end - 16, 64, 1);
    rig.ring(GUEST + 0x20, 1);
    assert!(readable(rig.ev[1].as_raw_fd(), TIMEOUT));
    drain(&rig.ev[1]);
    assert_eq!(
        rig.status_of(0x20),
        dma::STATUS_FAILED | libc::EFAULT as u32
    );
    // Too long.
    rig.put_desc(0x40, GUEST, GUEST + 0x1000, dma::MAX_LEN + 1, 1);
    rig.ring(GUEST + 0x40, 1);
    assert!(readable(rig.ev[1].as_raw_fd(), TIMEOUT));
    drain(&rig.ev[1]);
    assert_eq!(rig.status_of(0x40), dma::STATUS_FAILED | libc::E2BIG as u32);
    // The descriptor itself unmapped: nothing to write status to, counted as an error.
    rig.ring(0x7000_0000, 1);
    wait_for("the error count", || rig.reg(dma::reg::ERRORS) == 4);
    rig.wait_idle();
    assert_eq!(rig.reg(dma::reg::COMPLETED), 0);

    // Still serving.
    assert_eq!(rig.reg(dma::reg::ID), dma::ID);
    rig.put_desc(0x60, GUEST + 0x1000, GUEST + 0x2000, 64, 1);
    rig.ring(GUEST + 0x60, 1);
    assert!(readable(rig.ev[0].as_raw_fd(), TIMEOUT));
    assert_eq!(rig.status_of(0x60), dma::STATUS_DONE);
}

#[test]
fn message_based_dma_through_the_client() {
    let h = Harness::one_thread();
    let (engine, dev) = h.dma("dma.sock");
    let c = connect(dev.path());
    let base = 0x4000_0000u64;
    // The mapping is twice the memory the client actually holds (see the error case below).
    let size = 1 << 20;
    let mem = Arc::new(VecMem(Mutex::new(vec![0; size])));
    c.dma_map_local(base, 2 * size as u64, DMA_READ | DMA_WRITE, mem.clone())
        .unwrap();
    assert_eq!(dev.context().dma_regions(), vec![(base, 2 * size as u64)]);
    c.config_write(4, &0x6u16.to_le_bytes()).unwrap();

    // 200 KiB: one DMA_READ and one DMA_WRITE message of that size.
    let len = 200 << 10;
    let src = pattern(len, 3);
    {
        let mut m = mem.0.lock().unwrap();
        m[0x1000..0x1000 + len].copy_from_slice(&src);
        let mut d = [0u8; 32];
        d[0..8].copy_from_slice(&(base + 0x1000).to_le_bytes());
        d[8..16].copy_from_slice(&(base + 0x80000).to_le_bytes());
        d[16..20].copy_from_slice(&(len as u32).to_le_bytes());
        m[..32].copy_from_slice(&d);
    }
    c.region_write(0, dma::reg::DESC, &base.to_le_bytes())
        .unwrap();
    c.region_write(0, dma::reg::DOORBELL, &1u32.to_le_bytes())
        .unwrap();
    // The client serves the server's DMA requests only inside a call: keep calling.
    let deadline = Instant::now() + TIMEOUT;
    let status = || u32::from_le_bytes(mem.0.lock().unwrap()[24..28].try_into().unwrap());
    while rd32(&c, 0, dma::reg::COMPLETED) < 1 || status() != dma::STATUS_DONE {
        assert!(Instant::now() < deadline, "message DMA did not complete");
        let _ = rd32(&c, 0, dma::reg::STATUS);
    }
    assert_eq!(&mem.0.lock().unwrap()[0x80000..0x80000 + len], &src[..]);
    assert!(c.dma_requests_served() >= 4, "{}", c.dma_requests_served());
    assert_eq!(engine.completed(), 1);

    // The framework's own dma_read goes through the same path (from a thread that is not
    // serving the socket), while this thread keeps the client inside calls.
    let ctx = dev.context().clone();
    let t = std::thread::spawn(move || {
        let mut b = [0u8; 16];
        ctx.dma_read(base + 0x1000, &mut b).map(|()| b)
    });
    let deadline = Instant::now() + TIMEOUT;
    while !t.is_finished() {
        assert!(Instant::now() < deadline, "dma_read did not complete");
        let _ = rd32(&c, 0, dma::reg::STATUS);
    }
    assert_eq!(t.join().unwrap().unwrap(), src[..16]);

    // Inside the mapping but outside the memory the client holds: the client answers the
    // DMA_WRITE with an error and the descriptor fails with EIO.
    {
        let mut m = mem.0.lock().unwrap();
        m[32..40].copy_from_slice(&(base + 0x1000).to_le_bytes());
        m[40..48].copy_from_slice(&(base + size as u64 + 0x100).to_le_bytes());
        m[48..52].copy_from_slice(&64u32.to_le_bytes());
        m[52..56].copy_from_slice(&0u32.to_le_bytes());
    }
    c.region_write(0, dma::reg::DESC, &(base + 32).to_le_bytes())
        .unwrap();
    c.region_write(0, dma::reg::DOORBELL, &1u32.to_le_bytes())
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let status2 = || u32::from_le_bytes(mem.0.lock().unwrap()[56..60].try_into().unwrap());
    while rd32(&c, 0, dma::reg::ERRORS) < 1 || status2() == 0 {
        assert!(Instant::now() < deadline, "no error");
    }
    assert_eq!(status2(), dma::STATUS_FAILED | libc::EIO as u32);
    assert_eq!(rd32(&c, 0, dma::reg::COMPLETED), 1);
    c.dma_unmap(base, 2 * size as u64).unwrap();
    assert!(dev.context().dma_regions().is_empty());
}

#[test]
fn dma_map_while_message_dma_is_in_flight() {
    let h = Harness::one_thread();
    let (engine, dev) = h.dma("dma.sock");
    let c = connect(dev.path());
    let base = 0x4000_0000u64;
    let mem = Arc::new(VecMem(Mutex::new(vec![0; 1 << 20])));
    c.dma_map_local(base, 1 << 20, DMA_READ | DMA_WRITE, mem.clone())
        .unwrap();
    c.config_write(4, &0x6u16.to_le_bytes()).unwrap();
    {
        let mut m = mem.0.lock().unwrap();
        m[0x1000..0x1100].fill(0x77);
        m[0..8].copy_from_slice(&(base + 0x1000).to_le_bytes());
        m[8..16].copy_from_slice(&(base + 0x2000).to_le_bytes());
        m[16..20].copy_from_slice(&0x100u32.to_le_bytes());
    }
    c.region_write(0, dma::reg::DESC, &base.to_le_bytes())
        .unwrap();
    c.region_write(0, dma::reg::DOORBELL, &1u32.to_le_bytes())
        .unwrap();
    // The engine now waits for this client to serve its DMA_READ; meanwhile the client
    // maps more memory (with an fd). That must neither stall the server nor fail the copy.
    std::thread::sleep(Duration::from_millis(50));
    let fd = memfd(0x10000, true);
    let t0 = Instant::now();
    c.dma_map_fd(GUEST, 0x10000, fd.as_raw_fd(), 0, DMA_READ | DMA_WRITE)
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while engine.completed() + rd32(&c, 0, dma::reg::ERRORS) < 1 {
        assert!(Instant::now() < deadline, "copy never finished");
    }
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "DMA_MAP stalled {:?} behind the in-flight message DMA",
        t0.elapsed()
    );
    assert_eq!(engine.completed(), 1, "the copy failed");
    assert_eq!(&mem.0.lock().unwrap()[0x2000..0x2100], &[0x77; 0x100][..]);

    // A client that goes away while the engine waits on it does not stall the server for
    // the next client either (one client per device: it takes over once `c` hung up).
    c.region_write(0, dma::reg::DOORBELL, &1u32.to_le_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    drop(c);
    let t0 = Instant::now();
    let other = connect(dev.path());
    assert_eq!(rd32(&other, 0, dma::reg::ID), dma::ID);
    wait_for("the orphaned copy to fail", || {
        rd32(&other, 0, dma::reg::ERRORS) == 1
    });
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "stalled {:?}",
        t0.elapsed()
    );
}

#[test]
fn dma_map_of_an_fd_smaller_than_the_mapping_is_refused() {
    let rig = DmaRig::new(true);
    // 4 KiB of memfd mapped as 64 KiB: touching the rest would SIGBUS the server process.
    let small = memfd(0x1000, true);
    let err = rig
        .client
        .dma_map_fd(
            0x2000_0000,
            0x10000,
            small.as_raw_fd(),
            0,
            DMA_READ | DMA_WRITE,
        )
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Server { cmd: Command::DmaMap, errno } if errno == libc::EINVAL),
        "{err:?}"
    );
    // ... and with an offset that pushes it past the end.
    assert!(
        rig.client
            .dma_map_fd(0x2000_0000, 0x1000, small.as_raw_fd(), 0x1000, DMA_READ)
            .is_err()
    );
    // Exactly the file: fine.
    rig.client
        .dma_map_fd(
            0x2000_0000,
            0x1000,
            small.as_raw_fd(),
            0,
            DMA_READ | DMA_WRITE,
        )
        .unwrap();
    // A descriptor reaching into what would have been past the end: an error, not a crash.
    rig.put_desc(0, 0x2000_0000, 0x2000_8000, 16, 1);
    rig.ring(GUEST, 1);
    assert!(readable(rig.ev[1].as_raw_fd(), TIMEOUT));
    assert_eq!(rig.status_of(0), dma::STATUS_FAILED | libc::EFAULT as u32);
    assert_eq!(rig.reg(dma::reg::ID), dma::ID);
}
