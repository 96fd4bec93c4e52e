//! Fuzzing the wire format: the pure decoders with proptest (arbitrary and structured
//! inputs; they must return `Ok` or `Err`, never panic, and what they accept must be
//! consistent), then a live server fed seeded random malformed messages over real sockets.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use vfu::client::Client;
use vfu::devices::dma::{self, DmaEngine, DmaOps};
use vfu::proto::*;
use vfu::server::Server;
use vfu::sock;
use zerocopy::IntoBytes;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// u32 words biased small (so counts, flags and indexes often make sense), as bytes, then
/// a random tail.
fn structured_payload() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(
            prop_oneof![
                4 => 0u32..64,
                1 => Just(0x24u32), // EVENTFD | TRIGGER
                1 => Just(0x22u32), // BOOL | TRIGGER
                1 => Just(0x11u32), // NONE | UNMASK
                1 => prop::sample::select(vec![
                    FEATURE_GET | FEATURE_MIG_DEVICE_STATE,
                    FEATURE_SET | FEATURE_MIG_DEVICE_STATE,
                    FEATURE_PROBE | FEATURE_MIGRATION,
                ]),
                1 => any::<u32>(),
            ],
            0..12,
        ),
        prop::collection::vec(any::<u8>(), 0..24),
    )
        .prop_map(|(words, tail)| {
            let mut v: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
            v.extend(tail);
            v
        })
}

fn any_payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..96),
        structured_payload(),
    ]
}

/// Check what an accepted request promises.
fn check_request(h: &Header, payload: &[u8], nfds: usize, max_data: u32, r: &Request) {
    assert_eq!(payload.len() + HEADER_SIZE, h.size as usize);
    assert!(!h.is_reply());
    let max = max_data as usize;
    match r {
        Request::Version { caps, .. } => {
            assert_eq!(nfds, 0);
            assert!(caps.max_data_xfer_size >= 1);
        }
        Request::DmaMap(m) => {
            assert!(nfds <= 1);
            assert!(m.size > 0);
            assert!(m.address.checked_add(m.size).is_some());
        }
        Request::SetIrqs { set, data } => {
            let kind = set.flags & (IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD);
            let action =
                set.flags & (IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER);
            assert_eq!(kind.count_ones(), 1);
            assert_eq!(action.count_ones(), 1);
            assert!(set.count <= 2048 && set.start.checked_add(set.count).is_some());
            match kind {
                IRQ_SET_DATA_EVENTFD => {
                    assert_eq!(nfds, set.count as usize);
                    assert!(data.is_empty());
                }
                IRQ_SET_DATA_BOOL => {
                    assert_eq!(nfds, 0);
                    assert_eq!(data.len(), set.count as usize);
                }
                _ => {
                    assert_eq!(nfds, 0);
                    assert!(data.is_empty());
                }
            }
        }
        Request::RegionRead(a) => {
            assert_eq!(nfds, 0);
            assert!(a.count as usize <= max);
        }
        Request::RegionWrite { access, data } => {
            assert_eq!(nfds, 0);
            assert_eq!(data.len(), access.count as usize);
            assert!(data.len() <= max);
        }
        Request::MigDataRead { size } => {
            assert_eq!(nfds, 0);
            assert!(*size as usize <= max);
        }
        Request::MigDataWrite { data } => {
            assert_eq!(nfds, 0);
            assert!(data.len() <= max);
        }
        Request::DeviceFeature { feature, .. } => {
            assert_eq!(nfds, 0);
            let ops = feature.flags & (FEATURE_GET | FEATURE_SET | FEATURE_PROBE);
            assert_ne!(ops, 0);
            assert!(ops & (FEATURE_GET | FEATURE_SET) != (FEATURE_GET | FEATURE_SET));
        }
        Request::DmaUnmap(_)
        | Request::DeviceGetInfo { .. }
        | Request::RegionInfo { .. }
        | Request::RegionIoFds { .. }
        | Request::IrqInfo { .. }
        | Request::DeviceReset => assert_eq!(nfds, 0),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn header_decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..40),
                                  max in prop_oneof![Just(0u32), Just(16), Just(4096), any::<u32>()]) {
        if let Ok(h) = Header::decode(&bytes, max) {
            prop_assert!(bytes.len() >= HEADER_SIZE);
            prop_assert!(h.size as usize >= HEADER_SIZE && h.size <= max);
            prop_assert!(h.flags & FLAG_TYPE_MASK <= TYPE_REPLY);
            prop_assert_eq!(&h.to_bytes()[..], &bytes[..HEADER_SIZE]);
        }
    }

    #[test]
    fn parse_request_never_panics(
        cmd in prop_oneof![8 => 0u16..20, 1 => any::<u16>()],
        msg_id in any::<u16>(),
        flags in prop_oneof![4 => Just(0u32), 1 => Just(TYPE_REPLY), 1 => Just(FLAG_NO_REPLY), 1 => any::<u32>()],
        size_ok in prop::bool::weighted(0.9),
        size in any::<u32>(),
        payload in any_payload(),
        nfds in prop_oneof![3 => Just(0usize), 1 => 0usize..5],
        max_data in prop_oneof![Just(4096u32), Just(DEFAULT_MAX_DATA_XFER), Just(0), 0u32..64],
    ) {
        let h = Header {
            msg_id,
            cmd,
            size: if size_ok { (HEADER_SIZE + payload.len()) as u32 } else { size },
            flags,
            error: 0,
        };
        if let Ok(r) = parse_request(&h, &payload, nfds, max_data) {
            check_request(&h, &payload, nfds, max_data, &r);
        }
    }

    #[test]
    fn parse_request_region_write_and_set_irqs(
        offset in any::<u64>(),
        region in 0u32..10,
        count in 0u32..80,
        extra in -2i32..3,
        flags in 0u32..0x80,
        start in 0u32..4,
        nfds in 0usize..4,
    ) {
        // REGION_WRITE with a count near the data length.
        let a = RegionAccess { offset, region, count };
        let mut p = a.as_bytes().to_vec();
        let len = (count as i32 + extra).max(0) as u32;
        p.extend(vec![0xab; len as usize]);
        let h = Header::command(1, Command::RegionWrite, HEADER_SIZE + p.len());
        let valid = len == count && count <= 64;
        match parse_request(&h, &p, 0, 64) {
            Ok(r) => {
                check_request(&h, &p, 0, 64, &r);
                prop_assert!(valid);
            }
            Err(_) => prop_assert!(!valid),
        }
        // SET_IRQS with every flag combination, a few vectors and fds.
        let s = IrqSet { argsz: 20, flags, index: IRQ_MSIX, start, count: count % 5 };
        let mut p = s.as_bytes().to_vec();
        p.extend(vec![1; (count % 7) as usize]);
        let h = Header::command(2, Command::DeviceSetIrqs, HEADER_SIZE + p.len());
        if let Ok(r) = parse_request(&h, &p, nfds, 4096) {
            check_request(&h, &p, nfds, 4096, &r);
        }
    }

    #[test]
    fn sparse_areas_stay_inside_the_region(
        size in prop_oneof![Just(0u64), Just(0x10000), any::<u64>()],
        cap_offset in prop_oneof![Just(0u32), Just(32), Just(36), 0u32..200, any::<u32>()],
        areas in prop::collection::vec((prop_oneof![0u64..0x20000, any::<u64>()],
                                        prop_oneof![0u64..0x20000, any::<u64>()]), 0..4),
        mutate in prop::collection::vec((0usize..96, any::<u8>()), 0..3),
        random in prop::collection::vec(any::<u8>(), 0..96),
        use_random in prop::bool::weighted(0.3),
    ) {
        let mut caps = if use_random { random } else { sparse_mmap_cap(&areas) };
        for (at, b) in mutate {
            if let Some(x) = caps.get_mut(at) {
                *x = b;
            }
        }
        let info = RegionInfo {
            argsz: (32 + caps.len()) as u32,
            flags: REGION_CAPS,
            index: 0,
            cap_offset,
            size,
            offset: 0,
        };
        if let Ok(found) = parse_sparse_areas(&info, &caps) {
            prop_assert!(found.len() <= caps.len() / 16);
            for (o, l) in found {
                prop_assert!(o.checked_add(l).is_some_and(|e| e <= size), "{o:#x}+{l:#x} in {size:#x}");
            }
        }
    }

    #[test]
    fn caps_from_arbitrary_text(s in ".{0,200}") {
        if let Ok(c) = Caps::from_json(s.as_bytes()) {
            prop_assert!(c.max_data_xfer_size >= 1);
        }
    }

    #[test]
    fn caps_from_arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(c) = Caps::from_json(&b) {
            prop_assert!(c.max_data_xfer_size >= 1);
        }
    }

    #[test]
    fn caps_from_structured_json(
        fds in prop_oneof![Just("1".to_string()), any::<i64>().prop_map(|v| v.to_string()), Just("\"x\"".to_string())],
        xfer in prop_oneof![any::<u32>().prop_map(|v| v.to_string()), Just("-1".to_string()), Just("1e9".to_string()), Just("99999999999".to_string())],
        pgsize in prop_oneof![Just("4096".to_string()), any::<u64>().prop_map(|v| v.to_string()), Just("null".to_string())],
        extra in prop_oneof![Just(String::new()), Just(",\"twin_socket\":{\"supported\":true}".to_string()), Just(",\"max_dma_maps\":-3".to_string())],
        nul in any::<bool>(),
    ) {
        let mut s = format!(
            "{{\"capabilities\":{{\"max_msg_fds\":{fds},\"max_data_xfer_size\":{xfer},\"migration\":{{\"pgsize\":{pgsize}}}{extra}}}}}"
        ).into_bytes();
        if nul {
            s.push(0);
            s.extend(b"trailing garbage after the NUL");
        }
        if let Ok(c) = Caps::from_json(&s) {
            prop_assert!(c.max_data_xfer_size >= 1);
            // What we accept, we can say back identically.
            prop_assert_eq!(Caps::from_json(&c.to_json()).unwrap(), c);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Live server
// ---------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn memfd(size: usize) -> OwnedFd {
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"vfu-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate of our own memfd.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
    assert_eq!(r, 0);
    fd
}

/// A malformed (or occasionally well-formed) command: header fields, payload, fds.
fn random_message(r: &mut Rng, fds: &[RawFd], consistent: bool) -> (Header, Vec<u8>, Vec<RawFd>) {
    let cmd = match r.below(10) {
        0 => r.next() as u16,
        _ => r.below(20) as u16,
    };
    let payload = match r.below(4) {
        // Random bytes.
        0 => {
            let n = r.below(96) as usize;
            r.bytes(n)
        }
        // Small words: plausible counts, indexes and flags.
        1 | 2 => {
            let n = r.below(10) as usize;
            let mut v: Vec<u8> = (0..n)
                .flat_map(|_| {
                    let w = if r.below(4) == 0 {
                        r.next() as u32
                    } else {
                        r.below(64) as u32
                    };
                    w.to_ne_bytes()
                })
                .collect();
            let tail = r.below(16) as usize;
            v.extend(r.bytes(tail));
            v
        }
        // A real fixed part with fields scrambled.
        _ => {
            let mut v = match r.below(5) {
                0 => RegionAccess {
                    offset: r.below(0x1100),
                    region: r.below(9) as u32,
                    count: r.below(16) as u32,
                }
                .as_bytes()
                .to_vec(),
                1 => IrqSet {
                    argsz: 20,
                    flags: r.below(64) as u32,
                    index: r.below(6) as u32,
                    start: r.below(3) as u32,
                    count: r.below(3) as u32,
                }
                .as_bytes()
                .to_vec(),
                2 => DmaMap {
                    argsz: 32,
                    flags: r.below(8) as u32,
                    offset: r.below(3) * 0x1000,
                    address: r.next(),
                    size: r.below(0x3000),
                }
                .as_bytes()
                .to_vec(),
                3 => DeviceFeature {
                    argsz: 16,
                    flags: r.below(8) as u32 | (1 << (16 + r.below(3))),
                }
                .as_bytes()
                .to_vec(),
                _ => RegionInfo {
                    argsz: r.below(128) as u32,
                    index: r.below(12) as u32,
                    ..Default::default()
                }
                .as_bytes()
                .to_vec(),
            };
            let tail = r.below(12) as usize;
            v.extend(r.bytes(tail));
            v
        }
    };
    let size = if consistent || r.below(4) != 0 {
        (HEADER_SIZE + payload.len()) as u32
    } else {
        match r.below(3) {
            0 => r.below(16) as u32,
            1 => (HEADER_SIZE + payload.len()) as u32 + r.below(64) as u32,
            _ => r.next() as u32,
        }
    };
    let flags = if consistent {
        0
    } else {
        match r.below(8) {
            0 => r.next() as u32,
            1 => TYPE_REPLY,
            2 => FLAG_NO_REPLY,
            _ => 0,
        }
    };
    let nfds = match r.below(6) {
        0 => 1,
        1 => 2 + r.below(2) as usize,
        _ => 0,
    };
    let chosen = (0..nfds)
        .map(|_| fds[r.below(fds.len() as u64) as usize])
        .collect();
    let h = Header {
        msg_id: r.next() as u16,
        cmd,
        size,
        flags,
        error: 0,
    };
    (h, payload, chosen)
}

fn negotiate(s: &UnixStream) -> bool {
    let mut p = vec![0, 0, 1, 0];
    p.extend(Caps::default().to_json());
    let h = Header::command(1, Command::Version, HEADER_SIZE + p.len());
    if sock::send(s, &[h.as_bytes(), &p], &[]).is_err() {
        return false;
    }
    matches!(sock::recv(s, 2 << 20), Ok(m) if !m.header.is_error())
}

fn raw(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

#[test]
fn live_server_survives_malformed_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::new(false).unwrap();
    let stop = server.shutdown_handle();
    let s = server.clone();
    let loop_thread = std::thread::spawn(move || s.run());
    let engine = DmaEngine::new();
    let dev = DmaEngine::description()
        .realize(Arc::new(DmaOps(engine)))
        .unwrap()
        .attach(&server, &dir.path().join("dma.sock"))
        .unwrap();
    let path = dev.path().to_path_buf();

    let ev = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mem = memfd(0x4000);
    let fds = [ev.as_raw_fd(), mem.as_raw_fd()];
    let mut r = Rng(0x5eed_f00d_dead_beef);

    // 300 messages, each on a fresh connection (negotiated or not), then EOF: the server
    // must answer or drop, and close the connection once we are done.
    for i in 0..300 {
        let s = raw(&path);
        if r.below(4) != 0 && !negotiate(&s) {
            panic!("message {i}: negotiation failed");
        }
        let (h, payload, chosen) = random_message(&mut r, &fds, false);
        let _ = sock::send(&s, &[h.as_bytes(), &payload], &chosen);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        match (&s).read_to_end(&mut sink) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("message {i} ({h:?}): the server did not close: {e}"),
        }
    }

    // 200 more in sequence on negotiated connections (sizes consistent, so the stream
    // stays in step): every one gets a reply, or the server drops the connection.
    let mut s = raw(&path);
    assert!(negotiate(&s));
    let (mut ok, mut refused, mut dropped) = (0, 0, 0);
    for i in 0..200 {
        let (h, payload, chosen) = random_message(&mut r, &fds, true);
        if h.cmd == Command::Version as u16 {
            continue;
        }
        let sent = sock::send(&s, &[h.as_bytes(), &payload], &chosen);
        let reply = sent.ok().map(|()| {
            loop {
                match sock::recv(&s, 2 << 20) {
                    // The device may DMA to us if the random messages set that up: refuse.
                    Ok(m) if !m.header.is_reply() => {
                        let e = m.header.error_reply(libc::EFAULT);
                        let _ = sock::send(&s, &[e.as_bytes()], &[]);
                    }
                    other => break other,
                }
            }
        });
        match reply {
            Some(Ok(m)) => {
                assert!(m.header.is_reply(), "message {i}: {:?}", m.header);
                assert_eq!(m.header.msg_id, h.msg_id, "message {i}");
                if m.header.is_error() {
                    refused += 1;
                } else {
                    ok += 1;
                }
            }
            Some(Err(sock::RecvError::Idle)) => panic!("message {i} ({h:?}): no reply"),
            _ => {
                dropped += 1;
                s = raw(&path);
                assert!(negotiate(&s));
            }
        }
    }
    drop(s);
    eprintln!("in sequence: {ok} accepted, {refused} refused, {dropped} dropped");
    assert!(
        ok > 0 && refused > 0,
        "the fuzz should reach the command handlers"
    );

    // A well-formed client is still served.
    let c = Client::connect(&path, Duration::from_secs(5)).unwrap();
    c.reset().unwrap();
    let mut id = [0u8; 4];
    c.region_read(0, dma::reg::ID, &mut id).unwrap();
    assert_eq!(u32::from_le_bytes(id), dma::ID);
    let mut v = [0u8; 4];
    c.config_read(0, &mut v).unwrap();
    assert_eq!(u32::from_le_bytes(v), 0x0d3a_fa17);
    assert_eq!(c.migration_state().unwrap(), MigState::Running);
    drop(c);

    stop.shutdown();
    loop_thread.join().unwrap().unwrap();
}
