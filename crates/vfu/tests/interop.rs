//! Interoperability with rust-vmm's independent vfio-user implementation (`vfio_user`
//! 0.1.7, the one Cloud Hypervisor uses): their client against our server and devices, and
//! our client against their server.
//!
//! Deviations of theirs from the specification seen here (none needed a change on our side):
//!
//! - Their client sends `argsz` = 32 for DEVICE_GET_INFO (it counts the message header); the
//!   structure is 16 bytes. The specification only requires `argsz` to be at least the
//!   structure's size, which 32 is, so our server answers as usual.
//! - Their client reads every reply with a fixed size and never looks at the error flag: an
//!   error reply (16 bytes) leaves its stream out of step. The tests below make it send
//!   only valid requests.
//! - Their client's `resettable()` is inverted (true when DEVICE_FLAGS_RESET is absent).
//! - Their server answers VERSION 0.1 with 0.0 whatever the client says (our client accepts
//!   any minor of major 0), and sends error replies with errno 0 for everything but EINVAL
//!   (a backend's errno is lost).
//! - Their `DmaUnmapFlags` bits are not the specification's (GET_DIRTY_BITMAP is bit 0 and
//!   UNMAP_ALL bit 1 there); only flags 0 is used here.
//! - Their server does not consume the payload of a command it does not know (e.g.
//!   DEVICE_FEATURE), which puts its stream out of step; our client is therefore not asked
//!   about migration here.
//! - When `argsz` is too small for the capabilities, their server's region info keeps
//!   `cap_offset` pointing past the reply and sends the mmap fd only with the full reply.
//!   Our client re-asks with the `argsz` the server gave before looking at capabilities,
//!   as the specification describes, so both forms work.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use common::*;
use rustvmm_vfio_user as rv;
use vfio_bindings::bindings::vfio as vb;
use vfu::client::{Client, ClientError};
use vfu::devices::dma::{self, DmaEngine, DmaOps};
use vfu::devices::gpio::{self, Gpio};
use vfu::proto::*;
use vfu::server::AttachedDevice;

// Their client has no timeouts: every test body runs under a watchdog (`within`).

fn their_rd32(c: &mut rv::Client, region: u32, off: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(region, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn their_cap(c: &mut rv::Client, id: u8) -> u64 {
    let mut cfg = [0u8; 256];
    c.region_read(PCI_CONFIG_REGION, 0, &mut cfg).unwrap();
    let mut at = usize::from(cfg[0x34]);
    while at != 0 {
        if cfg[at] == id {
            return at as u64;
        }
        at = usize::from(cfg[at + 1]);
    }
    panic!("capability {id:#x} missing");
}

// ---------------------------------------------------------------------------------------
// Their client, our server
// ---------------------------------------------------------------------------------------

#[test]
fn rustvmm_client_drives_our_gpio() {
    within(20, || {
        let h = Harness::one_thread();
        let g = Gpio::new(true);
        let dev: AttachedDevice = Gpio::description()
            .realize(g.clone())
            .unwrap()
            .attach(&h.server, &h.path("gpio.sock"))
            .unwrap();
        let mut c = rv::Client::new(dev.path()).expect("their client connects");

        let cfg = c.region(PCI_CONFIG_REGION).expect("config region");
        assert_eq!(cfg.size, 256);
        let bar = c.region(gpio::BAR).expect("BAR2");
        assert_eq!(bar.size, 256);
        assert!(bar.file_offset.is_none() && bar.sparse_areas.is_empty());
        assert_eq!(
            bar.flags & (REGION_READ | REGION_WRITE),
            REGION_READ | REGION_WRITE
        );
        for i in [0u32, 1, 3, 4, 5, PCI_ROM_REGION, PCI_VGA_REGION] {
            assert_eq!(c.region(i).unwrap().size, 0, "region {i}");
        }
        assert_eq!(
            their_rd32(&mut c, PCI_CONFIG_REGION, 0),
            u32::from(gpio::VENDOR) | u32::from(gpio::DEVICE) << 16
        );
        let intx = c.get_irq_info(IRQ_INTX).unwrap();
        assert_eq!((intx.index, intx.count), (IRQ_INTX, 1));
        assert_ne!(intx.flags & IRQ_INFO_AUTOMASKED, 0);
        assert_eq!(c.get_irq_info(IRQ_MSIX).unwrap().count, 0);

        // Outputs loop back to inputs.
        c.region_write(gpio::BAR, 0, &[0x5a]).unwrap();
        c.region_write(gpio::BAR, 4, &[0xa5]).unwrap();
        let mut b = [0u8; 1];
        c.region_read(gpio::BAR, 1, &mut b).unwrap();
        assert_eq!(b[0], 0x5a);
        c.region_read(gpio::BAR, 5, &mut b).unwrap();
        assert_eq!(b[0], 0xa5);
        assert_eq!(g.outputs(), 0xa55a);

        // INTx through their SET_IRQS with an eventfd.
        let ev = eventfd();
        c.set_irqs(
            IRQ_INTX,
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            0,
            1,
            &[ev.as_raw_fd()],
        )
        .unwrap();
        c.region_write(gpio::BAR, 2, &[0]).unwrap();
        c.region_write(gpio::BAR, 0, &[0x5b]).unwrap();
        assert!(readable(ev.as_raw_fd(), TIMEOUT), "INTx");
        assert_eq!(ev.read().unwrap(), 1);
        c.region_read(gpio::BAR, 6, &mut b).unwrap();
        assert_eq!(b[0], 1);
        // Unmask through their SET_IRQS (DATA_NONE | UNMASK): the line is still up.
        c.set_irqs(
            IRQ_INTX,
            IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK,
            0,
            1,
            &[],
        )
        .unwrap();
        assert!(readable(ev.as_raw_fd(), TIMEOUT), "INTx after unmask");

        c.reset().unwrap();
        assert_eq!(g.outputs(), 0);
        c.region_read(gpio::BAR, 0, &mut b).unwrap();
        assert_eq!(b[0], 0);
        c.shutdown().unwrap();
    });
}

#[test]
fn rustvmm_client_drives_our_dma_engine() {
    within(20, || {
        let h = Harness::one_thread();
        let engine = DmaEngine::new();
        let dev = DmaEngine::description()
            .realize(Arc::new(DmaOps(engine.clone())))
            .unwrap()
            .attach(&h.server, &h.path("dma.sock"))
            .unwrap();
        let mut c = rv::Client::new(dev.path()).expect("their client connects");

        // Regions as they see them: sizes, the sparse area and its fd.
        assert_eq!(c.region(PCI_CONFIG_REGION).unwrap().size, 4096);
        assert_eq!(c.region(0).unwrap().size, 0x1000);
        assert!(c.region(0).unwrap().file_offset.is_none());
        let bar2 = c.region(2).unwrap();
        assert_eq!(bar2.size, 0x10000);
        assert_ne!(bar2.flags & REGION_MMAP, 0);
        assert_ne!(bar2.flags & REGION_CAPS, 0);
        let areas: Vec<(u64, u64)> = bar2
            .sparse_areas
            .iter()
            .map(|a| (a.offset, a.size))
            .collect();
        assert_eq!(areas, vec![(0x1000, 0xf000)]);
        let fo = bar2
            .file_offset
            .as_ref()
            .expect("BAR2 fd came with the region info");
        let map = Mapped::new(fo.file().as_raw_fd(), fo.start() + 0x1000, 0xf000);
        map.write(0x100, b"written through their mmap");
        let mut back = [0u8; 26];
        c.region_read(2, 0x1100, &mut back).unwrap();
        assert_eq!(&back, b"written through their mmap");
        let p = pattern(512, 3);
        c.region_write(2, 0x2000, &p).unwrap();
        let mut got = vec![0; 512];
        map.read(0x1000, &mut got);
        assert_eq!(got, p);
        let msix = c.get_irq_info(IRQ_MSIX).unwrap();
        assert_eq!((msix.index, msix.count), (IRQ_MSIX, 2));
        assert_eq!(c.get_irq_info(IRQ_MSI).unwrap().count, 1);

        // Guest memory in a memfd, mapped with their DMA_MAP.
        let mfd = memfd(GUEST_SIZE as u64, true);
        let mem = Mapped::new(mfd.as_raw_fd(), 0, GUEST_SIZE);
        c.dma_map(0, GUEST, GUEST_SIZE as u64, mfd.as_raw_fd())
            .unwrap();
        assert_eq!(
            dev.context().dma_regions(),
            vec![(GUEST, GUEST_SIZE as u64)]
        );

        // MSI-X eventfds through their SET_IRQS; MSI-X and bus mastering on; entries
        // unmasked.
        let ev = [eventfd(), eventfd()];
        c.set_irqs(
            IRQ_MSIX,
            (1 << 2) | (1 << 5),
            0,
            2,
            &[ev[0].as_raw_fd(), ev[1].as_raw_fd()],
        )
        .unwrap();
        c.region_write(PCI_CONFIG_REGION, 4, &6u16.to_le_bytes())
            .unwrap();
        let cap = their_cap(&mut c, pci::CAP_MSIX);
        c.region_write(PCI_CONFIG_REGION, cap + 2, &0x8000u16.to_le_bytes())
            .unwrap();
        for v in 0..2u64 {
            c.region_write(0, 0x800 + 16 * v + 12, &0u32.to_le_bytes())
                .unwrap();
        }

        // A copy.
        let src = pattern(0x2345, 77);
        mem.write(0x1000, &src);
        let mut d = [0u8; 32];
        d[0..8].copy_from_slice(&(GUEST + 0x1000).to_le_bytes());
        d[8..16].copy_from_slice(&(GUEST + 0x100000).to_le_bytes());
        d[16..20].copy_from_slice(&(src.len() as u32).to_le_bytes());
        d[20..24].copy_from_slice(&1u32.to_le_bytes());
        mem.write(0, &d);
        c.region_write(0, dma::reg::DESC, &GUEST.to_le_bytes())
            .unwrap();
        c.region_write(0, dma::reg::DOORBELL, &1u32.to_le_bytes())
            .unwrap();
        assert!(readable(ev[0].as_raw_fd(), TIMEOUT), "completion MSI-X");
        assert_eq!(ev[0].read().unwrap(), 1);
        let mut got = vec![0; src.len()];
        mem.read(0x100000, &mut got);
        assert_eq!(got, src);
        let mut st = [0u8; 4];
        mem.read(24, &mut st);
        assert_eq!(u32::from_le_bytes(st), dma::STATUS_DONE);
        assert_eq!(their_rd32(&mut c, 0, dma::reg::COMPLETED), 1);
        assert_eq!(engine.completed(), 1);

        // Unmap and reset.
        c.dma_unmap(GUEST, GUEST_SIZE as u64).unwrap();
        assert!(dev.context().dma_regions().is_empty());
        c.reset().unwrap();
        assert_eq!(their_rd32(&mut c, 0, dma::reg::COMPLETED), 0);
        assert_eq!(their_rd32(&mut c, PCI_CONFIG_REGION, 4) & 0xffff, 0);
        let mut ctl = [0u8; 2];
        c.region_read(PCI_CONFIG_REGION, cap + 2, &mut ctl).unwrap();
        assert_eq!(u16::from_le_bytes(ctl) & 0x8000, 0);
        c.shutdown().unwrap();
    });
}

// ---------------------------------------------------------------------------------------
// Our client, their server
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Seen {
    reads: Vec<(u32, u64, usize)>,
    writes: Vec<(u32, u64, Vec<u8>)>,
    maps: Vec<(u32, u64, u64, u64, bool)>,
    unmaps: Vec<(u64, u64)>,
    resets: u32,
    irqs: Vec<(u32, u32, u32, u32, usize)>,
}

struct Backend {
    bar0: Vec<u8>,
    config: Vec<u8>,
    seen: Arc<Mutex<Seen>>,
}

fn einval() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EINVAL)
}

impl Backend {
    fn space(&mut self, region: u32) -> Result<&mut Vec<u8>, std::io::Error> {
        match region {
            0 => Ok(&mut self.bar0),
            PCI_CONFIG_REGION => Ok(&mut self.config),
            _ => Err(einval()),
        }
    }
}

impl rv::ServerBackend for Backend {
    fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), std::io::Error> {
        self.seen
            .lock()
            .unwrap()
            .reads
            .push((region, offset, data.len()));
        let s = self.space(region)?;
        let src = s
            .get(offset as usize..offset as usize + data.len())
            .ok_or_else(einval)?;
        data.copy_from_slice(src);
        Ok(())
    }

    fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), std::io::Error> {
        self.seen
            .lock()
            .unwrap()
            .writes
            .push((region, offset, data.to_vec()));
        let s = self.space(region)?;
        let dst = s
            .get_mut(offset as usize..offset as usize + data.len())
            .ok_or_else(einval)?;
        dst.copy_from_slice(data);
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: rv::DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> Result<(), std::io::Error> {
        // Prove the fd is the client's memory: leave a mark at the mapping's start.
        if let Some(f) = &fd {
            f.write_at(b"seen by rust-vmm", offset)?;
        }
        self.seen
            .lock()
            .unwrap()
            .maps
            .push((flags.bits(), offset, address, size, fd.is_some()));
        Ok(())
    }

    fn dma_unmap(
        &mut self,
        _flags: rv::DmaUnmapFlags,
        address: u64,
        size: u64,
    ) -> Result<(), std::io::Error> {
        self.seen.lock().unwrap().unmaps.push((address, size));
        Ok(())
    }

    fn reset(&mut self) -> Result<(), std::io::Error> {
        self.seen.lock().unwrap().resets += 1;
        self.bar0.fill(0);
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), std::io::Error> {
        // Signal every eventfd once, as a device would.
        for mut f in &fds {
            std::io::Write::write_all(&mut f, &1u64.to_ne_bytes())?;
        }
        self.seen
            .lock()
            .unwrap()
            .irqs
            .push((index, flags, start, count, fds.len()));
        Ok(())
    }
}

fn region(index: u32, flags: u32, size: u64) -> rv::ServerRegion {
    rv::ServerRegion {
        region_info: vb::vfio_region_info {
            argsz: std::mem::size_of::<vb::vfio_region_info>() as u32,
            flags,
            index,
            cap_offset: 0,
            size,
            offset: 0,
        },
        sparse_areas: Vec::new(),
        mmap_fd: None,
    }
}

#[test]
fn our_client_drives_rustvmm_server() {
    within(20, || {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rv.sock");
        let rw = vb::VFIO_REGION_INFO_FLAG_READ | vb::VFIO_REGION_INFO_FLAG_WRITE;
        let bar2_mem = memfd(0x2000, true);
        let mut regions: Vec<rv::ServerRegion> =
            (0..PCI_NUM_REGIONS).map(|i| region(i, 0, 0)).collect();
        regions[0] = region(0, rw, 0x1000);
        regions[2] = rv::ServerRegion {
            sparse_areas: vec![rv::SparseArea {
                area: vb::vfio_region_sparse_mmap_area {
                    offset: 0,
                    size: 0x2000,
                },
            }],
            mmap_fd: Some(bar2_mem.as_raw_fd()),
            ..region(2, rw | vb::VFIO_REGION_INFO_FLAG_MMAP, 0x2000)
        };
        regions[PCI_CONFIG_REGION as usize] = region(PCI_CONFIG_REGION, rw, 256);
        let irq = |index, flags, count| rv::IrqInfo {
            index,
            flags,
            count,
        };
        let ev_flags = vb::VFIO_IRQ_INFO_EVENTFD;
        let irqs = vec![
            irq(
                0,
                ev_flags | vb::VFIO_IRQ_INFO_MASKABLE | vb::VFIO_IRQ_INFO_AUTOMASKED,
                1,
            ),
            irq(1, ev_flags, 1),
            irq(
                2,
                ev_flags | vb::VFIO_IRQ_INFO_MASKABLE | vb::VFIO_IRQ_INFO_NORESIZE,
                4,
            ),
            irq(3, ev_flags, 1),
            irq(4, ev_flags, 1),
        ];
        let server = rv::Server::new(&path, true, irqs, regions).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut config = vec![0u8; 256];
        config[..4].copy_from_slice(&0x5678_1234u32.to_le_bytes());
        let mut backend = Backend {
            bar0: vec![0; 0x1000],
            config,
            seen: seen.clone(),
        };
        let t = std::thread::spawn(move || {
            let r = server.run(&mut backend);
            (r.map_err(|e| e.to_string()), backend)
        });

        let c = Client::connect(&path, TIMEOUT).expect("our client connects");
        // They answer VERSION 0.1 with 0.0 and their own capabilities.
        assert_eq!(c.version(), (0, 0));
        let caps = c.server_caps();
        assert_eq!(caps.max_msg_fds, 1);
        assert_eq!(caps.max_data_xfer_size, 1 << 20);
        assert_eq!(caps.migration.as_ref().map(|m| m.pgsize), Some(4096));
        let info = c.device_info();
        assert_eq!((info.num_regions, info.num_irqs), (9, 5));
        assert_eq!(
            info.flags & (DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET),
            DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET
        );
        assert_eq!(c.region(0).unwrap().size, 0x1000);
        assert_eq!(c.region(PCI_CONFIG_REGION).unwrap().size, 256);
        assert_eq!(c.region(5).unwrap().size, 0);
        let counts: Vec<u32> = c.irqs().iter().map(|i| i.count).collect();
        assert_eq!(counts, vec![1, 1, 4, 1, 1]);
        assert_ne!(c.irqs()[0].flags & IRQ_INFO_AUTOMASKED, 0);

        // Their sparse-mmap capability and fd: the same memory as their memfd.
        let r2 = c.region(2).unwrap();
        assert_eq!(r2.sparse, vec![(0, 0x2000)]);
        assert_ne!(r2.flags & REGION_MMAP, 0);
        let theirs = Mapped::new(bar2_mem.as_raw_fd(), 0, 0x2000);
        let ours = Mapped::new(
            r2.fd.as_ref().expect("BAR2 fd").as_raw_fd(),
            r2.mmap_offset,
            0x2000,
        );
        theirs.write(0x1800, b"shared");
        let mut b6 = [0u8; 6];
        ours.read(0x1800, &mut b6);
        assert_eq!(&b6, b"shared");

        // Region access, config space, their backend's errors.
        c.region_write(0, 0x10, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        c.region_read(0, 0x10, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        c.config_read(0, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0x5678_1234);
        let big = pattern(0x800, 1);
        c.region_write(0, 0x800, &big).unwrap();
        let mut back = vec![0; 0x800];
        c.region_read(0, 0x800, &mut back).unwrap();
        assert_eq!(back, big);
        // Out of range: their backend says EINVAL, their server says errno 0.
        let err = c.region_read(0, 0xffe, &mut b).unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Server {
                    cmd: Command::RegionRead,
                    errno: 0
                }
            ),
            "{err:?}"
        );
        // A region they do not have (index past their table): EINVAL.
        let err = c.region_read(PCI_NUM_REGIONS, 0, &mut b).unwrap_err();
        assert!(
            matches!(err, ClientError::Server { errno, .. } if errno == libc::EINVAL),
            "{err:?}"
        );
        // Still in step after the errors.
        c.region_read(0, 0x10, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);

        // DMA_MAP with an fd: their backend writes through it, we see it in our mapping.
        let mfd = memfd(0x20000, true);
        let mem = Mapped::new(mfd.as_raw_fd(), 0, 0x20000);
        c.dma_map_fd(
            GUEST,
            0x10000,
            mfd.as_raw_fd(),
            0x4000,
            DMA_READ | DMA_WRITE,
        )
        .unwrap();
        let mut mark = [0u8; 16];
        mem.read(0x4000, &mut mark);
        assert_eq!(&mark, b"seen by rust-vmm");

        // SET_IRQS with eventfds: their backend signals them.
        let ev = [eventfd(), eventfd()];
        c.set_irq_eventfds(IRQ_MSIX, 1, &[ev[0].as_raw_fd(), ev[1].as_raw_fd()])
            .unwrap();
        for e in &ev {
            assert!(readable(e.as_raw_fd(), TIMEOUT));
            assert_eq!(e.read().unwrap(), 1);
        }
        c.mask_irqs(IRQ_MSIX, 2, 1, true).unwrap();
        c.dma_unmap(GUEST, 0x10000).unwrap();
        c.reset().unwrap();
        c.region_read(0, 0x10, &mut b).unwrap();
        assert_eq!(b, [0; 4], "their backend reset BAR0");
        drop(c);

        let (r, backend) = t.join().unwrap();
        r.expect("their server ran cleanly");
        let s = seen.lock().unwrap();
        assert!(s.writes.contains(&(0, 0x10, vec![1, 2, 3, 4])));
        assert!(s.reads.contains(&(PCI_CONFIG_REGION, 0, 4)));
        assert!(s.reads.contains(&(0, 0xffe, 4)));
        assert_eq!(
            s.maps,
            vec![(DMA_READ | DMA_WRITE, 0x4000, GUEST, 0x10000, true)]
        );
        assert_eq!(s.unmaps, vec![(GUEST, 0x10000)]);
        assert_eq!(s.resets, 1);
        assert_eq!(
            s.irqs,
            vec![
                (
                    IRQ_MSIX,
                    IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                    1,
                    2,
                    2
                ),
                (IRQ_MSIX, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, 2, 1, 0),
            ]
        );
        assert_eq!(backend.bar0[0x10..0x14], [0; 4]);
    });
}

/// Their client and ours on the same device in turn (one client per device: ours is refused
/// with EBUSY while theirs is connected, and let in once it has gone).
#[test]
fn both_clients_on_one_device_in_turn() {
    within(20, || {
        let h = Harness::one_thread();
        let g = Gpio::new(true);
        let dev = Gpio::description()
            .realize(g.clone())
            .unwrap()
            .attach(&h.server, &h.path("gpio.sock"))
            .unwrap();
        let mut theirs = rv::Client::new(dev.path()).unwrap();
        theirs.region_write(gpio::BAR, 0, &[0x42]).unwrap();
        assert!(matches!(
            Client::connect(dev.path(), TIMEOUT),
            Err(vfu::client::ClientError::Server {
                errno: libc::EBUSY,
                ..
            })
        ));
        drop(theirs);
        let ours = Client::connect(dev.path(), TIMEOUT).unwrap();
        let mut b = [0u8; 1];
        ours.region_read(gpio::BAR, 1, &mut b).unwrap();
        assert_eq!(b[0], 0x42);
        ours.region_write(gpio::BAR, 0, &[0x24]).unwrap();
        drop(ours);
        let mut theirs = rv::Client::new(dev.path()).unwrap();
        theirs.region_read(gpio::BAR, 0, &mut b).unwrap();
        assert_eq!(b[0], 0x24);
    });
}
