//! End-to-end interrupts: GPIO INTx with automasking and the command register's INTx
//! disable, MSI-X masking (table, function mask, SET_IRQS) with the PBA, MSI masking and
//! pending bits, interrupts deferred while the device is stopped, and concurrent triggers
//! against region reads. Real eventfds, a real server, our client over real Unix sockets.

mod common;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use vfu::devices::dma;
use vfu::devices::gpio;
use vfu::proto::*;

#[test]
fn gpio_loopback_and_intx_with_automask() {
    let h = Harness::one_thread();
    let (gpio, dev) = h.gpio("gpio.sock");
    let c = connect(dev.path());
    let bar = gpio::BAR;

    // Outputs loop back to inputs.
    c.region_write(bar, 0, &[0x5a]).unwrap();
    c.region_write(bar, 4, &[0xc3]).unwrap();
    assert_eq!(rd8(&c, bar, 0), 0x5a);
    assert_eq!(rd8(&c, bar, 1), 0x5a);
    assert_eq!(rd8(&c, bar, 4), 0xc3);
    assert_eq!(rd8(&c, bar, 5), 0xc3);
    assert_eq!(gpio.outputs(), 0xc35a);
    assert_eq!(rd8(&c, bar, 6), 0, "no change interrupt while disabled");

    // INTx through an eventfd.
    let ev = eventfd();
    c.set_irq_eventfds(IRQ_INTX, 0, &[ev.as_raw_fd()]).unwrap();
    c.region_write(bar, 2, &[0]).unwrap(); // enable the change interrupt
    assert!(!readable(ev.as_raw_fd(), Duration::from_millis(50)));
    c.region_write(bar, 0, &[0x01]).unwrap();
    assert!(readable(ev.as_raw_fd(), TIMEOUT), "INTx not signalled");
    assert_eq!(drain(&ev), 1);
    assert_eq!(rd8(&c, bar, 6), 1, "irq status");
    assert_ne!(rd16_cfg(&c, 6) & pci::STATUS_INTX, 0, "status INTx bit");

    // Automasked: a second change does not signal until the client unmasks.
    c.region_write(bar, 0, &[0x02]).unwrap();
    assert!(!readable(ev.as_raw_fd(), Duration::from_millis(100)));
    c.mask_irqs(IRQ_INTX, 0, 1, false).unwrap();
    assert!(readable(ev.as_raw_fd(), TIMEOUT), "INTx not re-signalled");
    assert_eq!(drain(&ev), 1);

    // Clear the interrupt (write offset 1): line deasserted; unmasking does not re-signal.
    c.region_write(bar, 1, &[0]).unwrap();
    assert_eq!(rd8(&c, bar, 6), 0);
    assert_eq!(rd16_cfg(&c, 6) & pci::STATUS_INTX, 0);
    c.mask_irqs(IRQ_INTX, 0, 1, false).unwrap();
    assert!(!readable(ev.as_raw_fd(), Duration::from_millis(50)));

    // External inputs changing raise it too.
    gpio.set_inputs(0x0100);
    assert!(readable(ev.as_raw_fd(), TIMEOUT));
    assert_eq!(drain(&ev), 1);
    c.region_write(bar, 1, &[0]).unwrap();
    c.mask_irqs(IRQ_INTX, 0, 1, false).unwrap();

    // Command register INTx disable: the function must not signal INTx; clearing the bit
    // with the line still asserted delivers it.
    c.config_write(4, &pci::CMD_INTX_DISABLE.to_le_bytes())
        .unwrap();
    c.region_write(bar, 0, &[0x03]).unwrap();
    assert_eq!(rd8(&c, bar, 6), 1);
    assert!(
        !readable(ev.as_raw_fd(), Duration::from_millis(100)),
        "INTx signalled with INTx disabled in the command register"
    );
    assert_ne!(
        rd16_cfg(&c, 6) & pci::STATUS_INTX,
        0,
        "status still shows it"
    );
    c.config_write(4, &0u16.to_le_bytes()).unwrap();
    assert!(readable(ev.as_raw_fd(), TIMEOUT), "INTx not delivered");
    assert_eq!(drain(&ev), 1);

    // Reading offset 2 disables the interrupt and deasserts the line.
    let _ = rd8(&c, bar, 2);
    c.mask_irqs(IRQ_INTX, 0, 1, false).unwrap();
    c.region_write(bar, 0, &[0x44]).unwrap();
    assert!(!readable(ev.as_raw_fd(), Duration::from_millis(50)));

    // Disabling the index (DATA_NONE, count 0) removes the eventfd.
    c.region_write(bar, 2, &[0]).unwrap();
    c.disable_irqs(IRQ_INTX).unwrap();
    c.region_write(bar, 0, &[0x45]).unwrap();
    assert!(!readable(ev.as_raw_fd(), Duration::from_millis(50)));

    // Reset: outputs back to 0.
    c.reset().unwrap();
    assert_eq!(rd8(&c, bar, 0), 0);
    assert_eq!(gpio.outputs(), 0);
}

#[test]
fn msix_masking_latches_pba_and_unmask_delivers() {
    let rig = DmaRig::new(true);
    rig.mask_vector(0, true);
    rig.put_desc(0, GUEST + 0x1000, GUEST + 0x2000, 64, 1);
    rig.ring(GUEST, 1);
    wait_for("completion", || rig.reg(dma::reg::COMPLETED) == 1);
    rig.wait_idle();
    let mut pba = [0u8; 8];
    rig.client.region_read(0, 0xc00, &mut pba).unwrap();
    assert_eq!(u64::from_le_bytes(pba), 1, "PBA bit 0");
    assert!(!readable(rig.ev[0].as_raw_fd(), Duration::from_millis(100)));
    let stats = rig.dev.context().irq_stats();
    assert!(stats.latched.load(Ordering::Relaxed) >= 1);

    // Unmask through the table: delivered, PBA clear.
    rig.mask_vector(0, false);
    assert!(readable(rig.ev[0].as_raw_fd(), TIMEOUT), "not released");
    assert_eq!(drain(&rig.ev[0]), 1);
    rig.client.region_read(0, 0xc00, &mut pba).unwrap();
    assert_eq!(u64::from_le_bytes(pba), 0);
    assert!(stats.released.load(Ordering::Relaxed) >= 1);

    // Function mask in MSI-X control: latched too, released when cleared.
    let msix = cap_offset(&rig.client, pci::CAP_MSIX);
    rig.client
        .config_write(msix + 2, &0xc000u16.to_le_bytes())
        .unwrap();
    rig.ring(GUEST, 1);
    wait_for("completion", || rig.reg(dma::reg::COMPLETED) == 2);
    rig.wait_idle();
    assert!(!readable(rig.ev[0].as_raw_fd(), Duration::from_millis(50)));
    rig.client.region_read(0, 0xc00, &mut pba).unwrap();
    assert_eq!(u64::from_le_bytes(pba), 1);
    rig.client
        .config_write(msix + 2, &0x8000u16.to_le_bytes())
        .unwrap();
    assert!(readable(rig.ev[0].as_raw_fd(), TIMEOUT));
    assert_eq!(drain(&rig.ev[0]), 1);

    // SET_IRQS mask/unmask on the MSI-X index works the same way.
    rig.client.mask_irqs(IRQ_MSIX, 0, 1, true).unwrap();
    rig.ring(GUEST, 1);
    wait_for("completion", || rig.reg(dma::reg::COMPLETED) == 3);
    rig.wait_idle();
    assert!(!readable(rig.ev[0].as_raw_fd(), Duration::from_millis(50)));
    rig.client.mask_irqs(IRQ_MSIX, 0, 1, false).unwrap();
    assert!(readable(rig.ev[0].as_raw_fd(), TIMEOUT));
    assert_eq!(drain(&rig.ev[0]), 1);
}

#[test]
fn msi_masking_and_pending_bits() {
    let h = Harness::one_thread();
    let (_e, dev) = h.dma("dma.sock");
    let c = connect(dev.path());
    let ctx = dev.context().clone();
    let ev = eventfd();
    c.set_irq_eventfds(IRQ_MSI, 0, &[ev.as_raw_fd()]).unwrap();
    // Nothing enabled: dropped.
    assert_eq!(ctx.trigger(0), vfu::server::Delivery::Dropped);
    let msi = cap_offset(&c, pci::CAP_MSI);
    c.config_write(msi + 4, &0xfee0_0000u32.to_le_bytes())
        .unwrap();
    c.config_write(msi + 2, &1u16.to_le_bytes()).unwrap();
    assert_eq!(ctx.trigger(0), vfu::server::Delivery::Signalled);
    assert!(readable(ev.as_raw_fd(), TIMEOUT));
    assert_eq!(drain(&ev), 1);
    assert_eq!(ctx.trigger(1), vfu::server::Delivery::Dropped, "one vector");
    // Masked: pending bit in config space, delivered on unmask.
    c.config_write(msi + 16, &1u32.to_le_bytes()).unwrap();
    assert_eq!(ctx.trigger(0), vfu::server::Delivery::Pending);
    assert_eq!(rd32(&c, PCI_CONFIG_REGION, msi + 20), 1, "MSI pending bit");
    assert!(!readable(ev.as_raw_fd(), Duration::from_millis(50)));
    c.config_write(msi + 16, &0u32.to_le_bytes()).unwrap();
    assert!(readable(ev.as_raw_fd(), TIMEOUT));
    assert_eq!(drain(&ev), 1);
    assert_eq!(rd32(&c, PCI_CONFIG_REGION, msi + 20), 0);
    // The pending-bit register is read-only to the client.
    c.config_write(msi + 20, &1u32.to_le_bytes()).unwrap();
    assert_eq!(rd32(&c, PCI_CONFIG_REGION, msi + 20), 0);
    // No eventfd yet: pending until one is given.
    c.disable_irqs(IRQ_MSI).unwrap();
    assert_eq!(ctx.trigger(0), vfu::server::Delivery::Pending);
    c.set_irq_eventfds(IRQ_MSI, 0, &[ev.as_raw_fd()]).unwrap();
    assert!(readable(ev.as_raw_fd(), TIMEOUT));
    assert_eq!(drain(&ev), 1);
    // MSI-X takes precedence once enabled.
    let msix = cap_offset(&c, pci::CAP_MSIX);
    c.config_write(msix + 2, &0x8000u16.to_le_bytes()).unwrap();
    assert_eq!(
        ctx.trigger(0),
        vfu::server::Delivery::Pending,
        "entry masked"
    );
    assert!(!readable(ev.as_raw_fd(), Duration::from_millis(50)));
}

#[test]
fn stopped_device_defers_interrupts_until_running() {
    let rig = DmaRig::new(true);
    let ctx = rig.dev.context().clone();
    rig.client.set_migration_state(MigState::Stop).unwrap();
    assert_eq!(ctx.trigger(0), vfu::server::Delivery::Pending);
    assert!(
        ctx.dma_read(GUEST, &mut [0; 4]).is_err(),
        "no DMA while stopped"
    );
    assert!(!readable(rig.ev[0].as_raw_fd(), Duration::from_millis(50)));
    rig.client.set_migration_state(MigState::Running).unwrap();
    assert!(readable(rig.ev[0].as_raw_fd(), TIMEOUT));
    assert_eq!(drain(&rig.ev[0]), 1);
    assert!(ctx.dma_read(GUEST, &mut [0; 4]).is_ok());
}

#[test]
fn concurrent_triggers_and_region_reads() {
    within(25, || {
        let rig = Arc::new(DmaRig::new(true));
        let ctx = rig.dev.context().clone();
        let done = Arc::new(AtomicBool::new(false));
        let triggers: Vec<_> = (0..4)
            .map(|_| {
                let ctx = ctx.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        ctx.trigger(0);
                    }
                })
            })
            .collect();
        let reader = {
            let rig = rig.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !done.load(Ordering::Relaxed) {
                    assert_eq!(rig.reg(dma::reg::ID), dma::ID);
                    let mut pba = [0u8; 8];
                    rig.client.region_read(0, 0xc00, &mut pba).unwrap();
                    n += 1;
                }
                n
            })
        };
        let mut counted = 0u64;
        while triggers.iter().any(|t| !t.is_finished()) {
            counted += drain(&rig.ev[0]);
        }
        for t in triggers {
            t.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
        let reads = reader.join().unwrap();
        counted += drain(&rig.ev[0]);
        let st = ctx.irq_stats();
        let signalled = st.signalled.load(Ordering::Relaxed);
        assert_eq!(st.triggered.load(Ordering::Relaxed), 40_000);
        assert_eq!(signalled, 40_000, "all unmasked, all signalled");
        assert_eq!(counted, signalled, "eventfd counts vs signals");
        assert!(reads > 0);
    });
}
