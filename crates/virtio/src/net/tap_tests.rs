//! virtio-net over a real tap interface (needs root / CAP_NET_ADMIN and `ip`): the host side
//! is an `AF_PACKET` socket bound to the tap.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

use super::tests::{MAC, driver, polled, tx, wait_readable};
use super::*;
use crate::testing::DATA;

/// A tap interface made for one test, deleted when dropped.
struct TapIf {
    name: String,
    deleted: bool,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip {}`: {e} (iproute2 needed)", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {} (these tests need root to make a tap)",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TapIf {
    fn new(tag: char) -> TapIf {
        let name = format!("fltap{}{tag}", std::process::id());
        // a leftover of an earlier run with the same pid
        let _ = Command::new("ip").args(["link", "del", &name]).output();
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        let t = TapIf {
            name,
            deleted: false,
        };
        // no IPv6 autoconfiguration traffic from the host into the tap
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", t.name),
            "1",
        );
        ip(&["link", "set", &t.name, "up"]);
        t
    }

    fn delete(&mut self) {
        ip(&["link", "del", &self.name]);
        self.deleted = true;
    }
}

impl Drop for TapIf {
    fn drop(&mut self) {
        if !self.deleted {
            let _ = Command::new("ip")
                .args(["link", "del", &self.name])
                .output();
        }
    }
}

/// A raw `AF_PACKET` socket bound to interface `name` (non-blocking).
fn packet_socket(name: &str) -> OwnedFd {
    let cname = CString::new(name).unwrap();
    // SAFETY: cname is NUL-terminated.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert_ne!(
        ifindex,
        0,
        "if_nametoindex({name}): {}",
        io::Error::last_os_error()
    );
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket call.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    assert!(fd >= 0, "socket(AF_PACKET): {}", io::Error::last_os_error());
    // SAFETY: fd was just made and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = proto;
    sa.sll_ifindex = ifindex as i32;
    // SAFETY: sa is a valid sockaddr_ll of the size passed.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(
        r,
        0,
        "bind AF_PACKET to {name}: {}",
        io::Error::last_os_error()
    );
    fd
}

/// An ARP request from `src` (who has 10.0.0.2? tell 10.0.0.1), broadcast, padded to 60.
fn arp(src: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&src);
    f.extend_from_slice(&[10, 0, 0, 1]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 0, 0, 2]);
    f.resize(60, 0);
    f
}

/// Frames arriving on the packet socket, until one equals `want` (5 s at most).
fn host_sees(fd: &OwnedFd, want: &[u8]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    let mut seen = Vec::new();
    while std::time::Instant::now() < deadline {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: p is one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 200) };
        // SAFETY: buf is a valid writable buffer of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 {
            if &buf[..n as usize] == want {
                return;
            }
            seen.push(n);
        }
    }
    panic!("the host never saw the frame on the tap (other frames' lengths: {seen:?})");
}

#[test]
fn tap_a_guest_frame_reaches_the_host() {
    let t = TapIf::new('a');
    let tap = Tap::open(&t.name).expect("open the tap");
    assert_eq!(tap.name(), t.name);
    let host = packet_socket(&t.name);
    let (mut d, stats) = driver(Box::new(tap));
    let f = arp(MAC);
    let head = tx(&mut d, &f);
    assert_eq!(d.used(TX), vec![(head, 0)]);
    assert!(!d.needs_reset());
    host_sees(&host, &f);
    assert_eq!(stats.tx_frames.load(Ordering::Relaxed), 1);
    let rx: u64 =
        std::fs::read_to_string(format!("/sys/class/net/{}/statistics/rx_packets", t.name))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    assert!(rx >= 1, "the tap counted {rx} received packets");
}

#[test]
fn tap_a_host_frame_reaches_the_guest() {
    let t = TapIf::new('b');
    let tap = Tap::open(&t.name).expect("open the tap");
    let host = packet_socket(&t.name);
    let (mut d, stats) = driver(Box::new(tap));
    let mut heads = Vec::new();
    for i in 0..8 {
        heads.push(d.add(RX, &[(DATA + i * 0x1000, 2048, true)]));
    }
    d.kick(RX);
    let f = arp([0x02, 0, 0, 0, 0, 0x01]);
    // SAFETY: f is a valid readable buffer of its length.
    let n = unsafe { libc::send(host.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
    assert_eq!(
        n,
        f.len() as isize,
        "AF_PACKET send: {}",
        io::Error::last_os_error()
    );
    let fd = polled(&d);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut got = Vec::new();
    while std::time::Instant::now() < deadline {
        wait_readable(fd);
        d.t.backend_ready(fd);
        for (head, len) in d.used(RX) {
            let i = heads.iter().position(|h| *h == head).unwrap() as u64;
            let bytes = d.get(DATA + i * 0x1000, len as usize);
            assert_eq!(&bytes[..HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
            got.push(bytes[HDR_LEN..].to_vec());
        }
        if got.contains(&f) {
            assert!(stats.rx_frames.load(Ordering::Relaxed) >= 1);
            assert!(!d.needs_reset());
            return;
        }
    }
    panic!(
        "the guest never got the host's frame; it got {} others",
        got.len()
    );
}

#[test]
fn tap_deleted_while_active_fails_the_device() {
    let mut t = TapIf::new('c');
    let tap = Tap::open(&t.name).expect("open the tap");
    let (mut d, _) = driver(Box::new(tap));
    let head = tx(&mut d, &arp(MAC));
    assert_eq!(d.used(TX), vec![(head, 0)]);
    assert!(!d.needs_reset());
    t.delete();
    tx(&mut d, &arp(MAC));
    assert!(d.needs_reset(), "TX on a deleted tap");
    let why = d.t.broken().unwrap_or_default().to_string();
    assert!(why.contains("net send"), "{why}");
    // the process goes on: a new tap, a new device
    let t2 = TapIf::new('d');
    let (mut d2, _) = driver(Box::new(Tap::open(&t2.name).expect("open the new tap")));
    let head = tx(&mut d2, &arp(MAC));
    assert_eq!(d2.used(TX), vec![(head, 0)]);
    assert!(!d2.needs_reset());
}

#[test]
fn tap_deleted_while_active_fails_the_device_on_receive() {
    let mut t = TapIf::new('e');
    let tap = Tap::open(&t.name).expect("open the tap");
    let (mut d, _) = driver(Box::new(tap));
    d.add(RX, &[(DATA, 2048, true)]);
    let fd = polled(&d);
    t.delete();
    // the detached tap's fd polls as an error: the worker would call the device
    wait_readable(fd);
    d.t.backend_ready(fd);
    assert!(d.needs_reset(), "RX on a deleted tap");
    let why = d.t.broken().unwrap_or_default().to_string();
    assert!(why.contains("net receive"), "{why}");
}

#[test]
fn tap_bad_names_are_refused() {
    for name in ["", "a/b", "sixteen_chars_xx", "nul\0x"] {
        assert!(
            matches!(Tap::open(name), Err(TapError::Name { .. })),
            "{name:?}"
        );
    }
}
