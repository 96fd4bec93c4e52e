//! One client per device (issue item 13): a second client is refused with `EBUSY` until the
//! first disconnects, what the first installed goes with it, and connections that never
//! negotiate are bounded per device.

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::*;
use vfu::client::{Client, ClientError};
use vfu::devices::gpio;
use vfu::proto::*;
use vfu::server::MAX_CONNECTIONS;
use vmm_sys_util::eventfd::EventFd;

fn readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

#[test]
fn a_second_client_is_refused_until_the_first_disconnects() {
    let h = Harness::new();
    let (_g, dev) = h.gpio("gpio.sock");
    let (_e, other) = h.dma("dma.sock");
    let a = Client::connect(dev.path(), TIMEOUT).expect("first client");
    match Client::connect(dev.path(), TIMEOUT) {
        Err(ClientError::Server { cmd, errno }) => {
            assert_eq!((cmd, errno), (Command::Version, libc::EBUSY))
        }
        Err(e) => panic!("second client: {e}"),
        Ok(_) => panic!("a second client was let in beside the first"),
    }
    // The refusal did not disturb the first client, nor another device's client.
    let d = Client::connect(other.path(), TIMEOUT).expect("client of the other device");
    a.region_write(gpio::BAR, 0, &[0x5a]).unwrap();
    let mut b = [0u8];
    a.region_read(gpio::BAR, 1, &mut b).unwrap();
    assert_eq!(b[0], 0x5a);
    d.region_read(PCI_CONFIG_REGION, 0, &mut [0; 4]).unwrap();

    // The first client's interrupt eventfd goes with it; the next client is let in at once
    // (no wait for the server to notice the hang-up).
    let ea = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    a.set_irq_eventfds(IRQ_INTX, 0, &[ea.as_raw_fd()]).unwrap();
    drop(a);
    let b = Client::connect(dev.path(), TIMEOUT).expect("the next client after the first left");
    // Enable the change interrupt and change the inputs (loopback): INTx.
    b.region_write(gpio::BAR, 2, &[0]).unwrap();
    b.region_write(gpio::BAR, 0, &[0x33]).unwrap();
    assert!(
        !readable(ea.as_raw_fd(), 100),
        "the old client's eventfd fired"
    );
    b.region_write(gpio::BAR, 1, &[0]).unwrap();
    let eb = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    b.set_irq_eventfds(IRQ_INTX, 0, &[eb.as_raw_fd()]).unwrap();
    b.mask_irqs(IRQ_INTX, 0, 1, false).unwrap();
    b.region_write(gpio::BAR, 0, &[0x35]).unwrap();
    assert!(readable(eb.as_raw_fd(), 5000), "the new client's eventfd");
}

#[test]
fn connections_per_device_are_bounded() {
    let h = Harness::new();
    let (_g, dev) = h.gpio("gpio.sock");
    let owner = Client::connect(dev.path(), TIMEOUT).expect("client");
    // Connections that never send VERSION, up to the limit, stay open.
    let idle: Vec<Raw> = (1..MAX_CONNECTIONS)
        .map(|_| Raw::connect(dev.path()))
        .collect();
    owner
        .region_read(PCI_CONFIG_REGION, 0, &mut [0; 4])
        .unwrap();
    for r in &idle {
        assert!(
            !readable(r.s.as_raw_fd(), 0),
            "an idle connection was closed"
        );
    }
    // One more is closed at once.
    let extra = Raw::connect(dev.path());
    extra
        .s
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut b = [0u8; 16];
    match (&extra.s).read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!("{n} bytes on a connection past the limit"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("a connection past the limit of {MAX_CONNECTIONS} stayed open: {e}"),
    }
    // The device's client is served throughout.
    owner
        .region_read(PCI_CONFIG_REGION, 0, &mut [0; 4])
        .unwrap();
}
