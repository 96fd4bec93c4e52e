//! End-to-end discovery over the wire: VERSION negotiation, device info, the regions and
//! IRQs of the example GPIO and DMA-engine devices, BAR2's mmap area against REGION_READ /
//! REGION_WRITE, config-space semantics (BAR sizing, command register, capability chains,
//! lspci decoding, reset), and region accesses bigger than `max_data_xfer_size`. A real
//! [`vfu::server::Server`] on a background thread, our client over real Unix sockets.

mod common;

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use common::*;
use vfu::proto::*;

#[test]
fn negotiation_device_regions_and_irqs() {
    let h = Harness::one_thread();
    let (_g, gdev) = h.gpio("gpio.sock");
    let (_e, ddev) = h.dma("dma.sock");

    for path in [gdev.path(), ddev.path()] {
        let c = connect(path);
        assert_eq!(c.version(), (VERSION_MAJOR, VERSION_MINOR));
        let caps = c.server_caps();
        assert_eq!(caps.max_data_xfer_size, DEFAULT_MAX_DATA_XFER);
        assert!(caps.max_msg_fds >= 2, "{caps:?}");
        assert_eq!(caps.pgsizes & 4096, 4096);
        let mig = caps.migration.as_ref().expect("migration capability");
        assert_eq!(mig.pgsize, 4096);
        let info = c.device_info();
        assert_eq!(info.num_regions, PCI_NUM_REGIONS);
        assert_eq!(info.num_irqs, PCI_NUM_IRQS);
        assert_eq!(
            info.flags & (DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET),
            DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET
        );
        assert_eq!(c.regions().len(), 9);
        assert_eq!(c.irqs().len(), 5);
        for (i, r) in c.regions().iter().enumerate() {
            assert_eq!(r.index, i as u32);
        }
        for (i, q) in c.irqs().iter().enumerate() {
            assert_eq!(q.index, i as u32);
        }
        assert_eq!(
            c.migration_flags().unwrap(),
            Some(MIGRATION_STOP_COPY | MIGRATION_PRE_COPY)
        );
    }

    // GPIO: config 256 bytes, BAR2 256 bytes not mappable, INTx only.
    let g = connect(gdev.path());
    assert_eq!(g.region(PCI_CONFIG_REGION).unwrap().size, 256);
    let bar2 = g.region(2).unwrap();
    assert_eq!(bar2.size, 256);
    assert_eq!(
        bar2.flags & (REGION_READ | REGION_WRITE),
        REGION_READ | REGION_WRITE
    );
    assert_eq!(bar2.flags & REGION_MMAP, 0);
    assert!(bar2.fd.is_none() && bar2.sparse.is_empty());
    for i in [0, 1, 3, 4, 5, PCI_ROM_REGION, PCI_VGA_REGION] {
        assert_eq!(g.region(i).unwrap().size, 0, "region {i}");
    }
    let counts: Vec<u32> = g.irqs().iter().map(|i| i.count).collect();
    assert_eq!(counts, vec![1, 0, 0, 1, 1]);
    let intx = g.irqs()[IRQ_INTX as usize];
    assert_ne!(intx.flags & IRQ_INFO_EVENTFD, 0);
    assert_ne!(intx.flags & IRQ_INFO_AUTOMASKED, 0);
    assert_ne!(intx.flags & IRQ_INFO_MASKABLE, 0);

    // DMA engine: config 4 KiB, BAR0 4 KiB, BAR2 64 KiB mappable at 0x1000..0x10000.
    let d = connect(ddev.path());
    assert_eq!(d.region(PCI_CONFIG_REGION).unwrap().size, 4096);
    assert_eq!(d.region(0).unwrap().size, 0x1000);
    assert!(d.region(0).unwrap().fd.is_none());
    let bar2 = d.region(2).unwrap();
    assert_eq!(bar2.size, 0x10000);
    assert_ne!(bar2.flags & REGION_MMAP, 0);
    assert_ne!(bar2.flags & REGION_CAPS, 0);
    assert_eq!(bar2.sparse, vec![(0x1000, 0xf000)]);
    let counts: Vec<u32> = d.irqs().iter().map(|i| i.count).collect();
    assert_eq!(counts, vec![0, 1, 2, 1, 1]);
    assert_ne!(d.irqs()[IRQ_MSIX as usize].flags & IRQ_INFO_MASKABLE, 0);
    assert_ne!(d.irqs()[IRQ_MSI as usize].flags & IRQ_INFO_NORESIZE, 0);
}

#[test]
fn dma_engine_bar2_mmap_is_the_same_memory_as_region_access() {
    let h = Harness::one_thread();
    let (_e, dev) = h.dma("dma.sock");
    let c = connect(dev.path());
    let bar2 = c.region(2).unwrap();
    let (off, len) = bar2.sparse[0];
    let fd = bar2.fd.as_ref().expect("BAR2 fd").as_raw_fd();
    let map = Mapped::new(fd, bar2.mmap_offset + off, len as usize);

    // Write through the mmap, read through REGION_READ.
    let p = pattern(256, 7);
    map.write(0x20, &p);
    let mut back = vec![0; 256];
    c.region_read(2, off + 0x20, &mut back).unwrap();
    assert_eq!(back, p);

    // Write through REGION_WRITE, read through the mmap.
    let q = pattern(4096, 99);
    c.region_write(2, off + 0x3000, &q).unwrap();
    let mut back = vec![0; 4096];
    map.read(0x3000, &mut back);
    assert_eq!(back, q);

    // The trapped first page reads the same memfd through the device callback.
    c.region_write(2, 0x10, &[1, 2, 3, 4]).unwrap();
    let mut b = [0; 4];
    c.region_read(2, 0x10, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4]);
    // An access straddling the trapped page and the mmap area is split: the trapped half
    // goes to the device, the mapped half to the memory.
    c.region_write(2, 0xffc, &[9, 8, 7, 6, 5, 4, 3, 2]).unwrap();
    let mut b = [0; 8];
    c.region_read(2, 0xffc, &mut b).unwrap();
    assert_eq!(b, [9, 8, 7, 6, 5, 4, 3, 2]);
    let mut hi = [0; 4];
    c.region_read(2, 0x1000, &mut hi).unwrap();
    assert_eq!(hi, [5, 4, 3, 2]);
    // Out of the region: refused.
    assert!(c.region_read(2, 0x10000 - 2, &mut b).is_err());
    assert!(c.region_read(5, 0, &mut b).is_err());
}

#[test]
fn config_space_semantics_over_the_wire() {
    let h = Harness::one_thread();
    let (_e, ddev) = h.dma("dma.sock");
    let (_g, gdev) = h.gpio("gpio.sock");
    let d = connect(ddev.path());
    let g = connect(gdev.path());

    // IDs, class, revision; read-only.
    assert_eq!(rd32(&d, PCI_CONFIG_REGION, 0), 0x0d3a_fa17);
    assert_eq!(rd32(&d, PCI_CONFIG_REGION, 8), 0x0880_0001);
    assert_eq!(rd32(&g, PCI_CONFIG_REGION, 0), 0x0dc8_494f);
    d.config_write(0, &[0xff; 4]).unwrap();
    assert_eq!(rd32(&d, PCI_CONFIG_REGION, 0), 0x0d3a_fa17);
    assert_eq!(rd32(&d, PCI_CONFIG_REGION, 0x2c), 0x0d3a_fa17);

    // BAR sizing: all ones reads back ~(size - 1) | flags.
    for (c, off, size) in [
        (&d, 0x10u64, 0x1000u32),
        (&d, 0x18, 0x10000),
        (&g, 0x18, 0x100),
    ] {
        c.config_write(off, &u32::MAX.to_le_bytes()).unwrap();
        assert_eq!(
            rd32(c, PCI_CONFIG_REGION, off),
            !(size - 1),
            "BAR at {off:#x}"
        );
        c.config_write(off, &0xe000_0000u32.to_le_bytes()).unwrap();
        assert_eq!(rd32(c, PCI_CONFIG_REGION, off), 0xe000_0000);
    }
    // An unimplemented BAR stays 0.
    d.config_write(0x14, &u32::MAX.to_le_bytes()).unwrap();
    assert_eq!(rd32(&d, PCI_CONFIG_REGION, 0x14), 0);

    // Command register: only implemented bits stick (INTx disable only with a pin).
    d.config_write(4, &0xffffu16.to_le_bytes()).unwrap();
    assert_eq!(rd16_cfg(&d, 4), 0x0146);
    g.config_write(4, &0xffffu16.to_le_bytes()).unwrap();
    assert_eq!(rd16_cfg(&g, 4), 0x0546);
    d.config_write(4, &0u16.to_le_bytes()).unwrap();
    assert_eq!(rd16_cfg(&d, 4), 0);
    // Status: capability list present.
    assert_ne!(rd16_cfg(&d, 6) & pci::STATUS_CAP_LIST, 0);

    // Capability chains.
    let cfg = config(&d);
    assert_eq!(cfg.len(), 4096);
    let ids: Vec<u8> = cap_chain(&cfg).iter().map(|c| c.0).collect();
    assert_eq!(
        ids,
        vec![pci::CAP_PM, pci::CAP_MSI, pci::CAP_MSIX, pci::CAP_PCIE]
    );
    let msix = cap_chain(&cfg)[2].1;
    let dw = |o: usize| u32::from_le_bytes(cfg[o..o + 4].try_into().unwrap());
    assert_eq!(
        u16::from_le_bytes([cfg[msix + 2], cfg[msix + 3]]) & 0x7ff,
        1
    );
    assert_eq!(dw(msix + 4), 0x800); // table: BAR 0, offset 0x800
    assert_eq!(dw(msix + 8), 0xc00); // PBA: BAR 0, offset 0xc00
    assert_eq!(dw(0x100) & 0xffff, u32::from(pci::EXT_CAP_DSN));
    let gcfg = config(&g);
    assert_eq!(gcfg.len(), 256);
    let ids: Vec<u8> = cap_chain(&gcfg).iter().map(|c| c.0).collect();
    assert_eq!(ids, vec![pci::CAP_PM]);
    assert_eq!(gcfg[pci::INTERRUPT_PIN], 1);

    // Capability registers are read-only where they must be.
    let msix = msix as u64;
    d.config_write(msix + 4, &u32::MAX.to_le_bytes()).unwrap();
    assert_eq!(rd32(&d, PCI_CONFIG_REGION, msix + 4), 0x800);

    // lspci decodes what came over the wire.
    let text = pci::lspci::describe("00:03.0", &config(&d));
    for needle in [
        "MSI-X: Enable- Count=2 Masked-",
        "MSI: Enable- Count=1/1 Maskable+ 64bit+",
        "Power Management version 3",
        "Express (v2) Endpoint",
        "Device Serial Number",
        "Vector table: BAR=0 offset=00000800",
        "PBA: BAR=0 offset=00000c00",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    let ctl = rd16_cfg(&d, msix + 2) | 0x8000;
    d.config_write(msix + 2, &ctl.to_le_bytes()).unwrap();
    let text = pci::lspci::describe("00:03.0", &config(&d));
    assert!(text.contains("MSI-X: Enable+ Count=2 Masked-"), "{text}");
    let text = pci::lspci::describe("00:04.0", &config(&g));
    assert!(text.contains("Interrupt: pin A"), "{text}");

    // Out-of-range config access is refused, and the connection survives.
    assert!(d.config_read(4095, &mut [0; 2]).is_err());
    assert!(g.config_write(255, &[0; 2]).is_err());
    assert_eq!(rd32(&g, PCI_CONFIG_REGION, 0), 0x0dc8_494f);

    // Reset restores config space.
    d.reset().unwrap();
    assert_eq!(rd32(&d, PCI_CONFIG_REGION, 0x10), 0);
    assert_eq!(rd16_cfg(&d, msix + 2) & 0x8000, 0);
}

/// A device with one big BAR of plain memory served by callbacks.
struct Ram(Mutex<Vec<u8>>);

impl vfu::server::DeviceOps for Ram {
    fn region_read(
        &self,
        _dev: &vfu::server::DeviceContext,
        _bar: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), vfu::server::DeviceError> {
        let m = self.0.lock().unwrap();
        data.copy_from_slice(&m[offset as usize..offset as usize + data.len()]);
        Ok(())
    }

    fn region_write(
        &self,
        _dev: &vfu::server::DeviceContext,
        _bar: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), vfu::server::DeviceError> {
        let mut m = self.0.lock().unwrap();
        m[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn reset(&self, _dev: &vfu::server::DeviceContext) -> Result<(), vfu::server::DeviceError> {
        Ok(())
    }

    fn save(&self, _dev: &vfu::server::DeviceContext) -> Result<Vec<u8>, vfu::server::DeviceError> {
        Ok(self.0.lock().unwrap().clone())
    }

    fn load(
        &self,
        _dev: &vfu::server::DeviceContext,
        s: &[u8],
    ) -> Result<(), vfu::server::DeviceError> {
        self.0.lock().unwrap().copy_from_slice(s);
        Ok(())
    }
}

#[test]
fn region_access_larger_than_max_data_xfer_size() {
    let h = Harness::one_thread();
    let size = 4 << 20;
    let ram = Arc::new(Ram(Mutex::new(vec![0; size])));
    let dev = vfu::server::DeviceDescription::new(
        "ram",
        pci::Ids {
            vendor: 0x1234,
            device: 0x5678,
            class: 0x050000,
            ..Default::default()
        },
    )
    .bar(0, pci::Bar::mem32(size as u64), &[])
    .realize(ram.clone())
    .unwrap()
    .attach(&h.server, &h.path("ram.sock"))
    .unwrap();
    let c = connect(dev.path());
    assert_eq!(c.region(0).unwrap().size, size as u64);
    // 3 MiB in one call: the client must split it to respect max_data_xfer_size (1 MiB).
    let data = pattern(3 << 20, 9);
    c.region_write(0, 0x1000, &data).unwrap();
    assert_eq!(
        &ram.0.lock().unwrap()[0x1000..0x1000 + data.len()],
        &data[..]
    );
    let mut back = vec![0; data.len()];
    c.region_read(0, 0x1000, &mut back).unwrap();
    assert_eq!(back, data);
    // Migration state bigger than one MIG_DATA_READ also round-trips.
    let blob = c.save_state().unwrap();
    assert!(blob.len() > size);
    c.set_migration_state(MigState::Running).unwrap();
    ram.0.lock().unwrap().fill(0);
    c.load_state(&blob).unwrap();
    assert_eq!(
        &ram.0.lock().unwrap()[0x1000..0x1000 + data.len()],
        &data[..]
    );
}
