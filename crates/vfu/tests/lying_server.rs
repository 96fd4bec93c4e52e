//! The client against a device that lies (issue item 14): sizes and offsets a server sends
//! are checked with overflow-safe arithmetic and bounded, a lie is refused at connect time
//! with a clear error, and nothing panics. The fake servers are real peers on real sockets.

mod common;

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{TIMEOUT, memfd};
use vfu::client::{CLIENT_MAX_DATA_XFER, Client, ClientError};
use vfu::proto::*;
use vfu::sock;
use zerocopy::{FromBytes, IntoBytes};

/// One region a fake server describes.
struct FakeRegion {
    info: RegionInfo,
    caps: Vec<u8>,
    fd: Option<RawFd>,
}

fn fake_server(
    dir: &tempfile::TempDir,
    name: &str,
    f: impl FnOnce(UnixStream) + Send + 'static,
) -> (PathBuf, JoinHandle<()>) {
    let path = dir.path().join(name);
    let l = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        f(s)
    });
    (path, t)
}

fn reply(s: &UnixStream, to: &Header, payload: &[u8], fds: &[RawFd]) {
    let h = to.reply(HEADER_SIZE + payload.len());
    let _ = sock::send(s, &[h.as_bytes(), payload], fds);
}

fn next(s: &UnixStream, cmd: Command) -> sock::Message {
    let m = sock::recv(s, 1 << 22).expect("a command from the client");
    assert_eq!(m.header.cmd, cmd as u16, "{:?}", m.header);
    m
}

/// Answer VERSION with `caps`, DEVICE_GET_INFO and REGION_INFO for `regions`, no IRQs.
fn describe(s: &UnixStream, caps: &str, regions: &[FakeRegion]) {
    let m = next(s, Command::Version);
    let mut p = vec![0, 0, 1, 0];
    p.extend(caps.as_bytes());
    reply(s, &m.header, &p, &[]);
    let m = next(s, Command::DeviceGetInfo);
    let i = DeviceInfo {
        argsz: 16,
        flags: DEVICE_FLAGS_PCI,
        num_regions: regions.len() as u32,
        num_irqs: 0,
    };
    reply(s, &m.header, i.as_bytes(), &[]);
    for r in regions {
        let full = 32 + r.caps.len() as u32;
        loop {
            let m = next(s, Command::DeviceGetRegionInfo);
            let (q, _) = RegionInfo::read_from_prefix(&m.payload).unwrap();
            if q.argsz < full {
                let short = RegionInfo {
                    argsz: full,
                    cap_offset: 0,
                    ..r.info
                };
                reply(s, &m.header, short.as_bytes(), &[]);
                continue;
            }
            let mut p = RegionInfo {
                argsz: full,
                ..r.info
            }
            .as_bytes()
            .to_vec();
            p.extend(&r.caps);
            reply(s, &m.header, &p, r.fd.as_slice());
            break;
        }
    }
}

fn plain(index: u32, size: u64) -> FakeRegion {
    FakeRegion {
        info: RegionInfo {
            argsz: 32,
            flags: REGION_READ | REGION_WRITE,
            index,
            cap_offset: 0,
            size,
            offset: 0,
        },
        caps: Vec::new(),
        fd: None,
    }
}

/// Wait until the client hangs up.
fn until_closed(s: &UnixStream) {
    while sock::recv(s, 1 << 22).is_ok() {}
}

#[test]
fn a_4_gib_max_data_xfer_size_is_capped_to_1_mib() {
    let dir = tempfile::tempdir().unwrap();
    let (path, t) = fake_server(&dir, "big.sock", |s| {
        describe(
            &s,
            r#"{"capabilities":{"max_data_xfer_size":4294967295}}"#,
            &[plain(0, 4 << 20)],
        );
        // REGION_READs of at most 1 MiB each, answered honestly.
        let mut seen = 0u64;
        while seen < 3 << 19 {
            let m = next(&s, Command::RegionRead);
            let (a, _) = RegionAccess::read_from_prefix(&m.payload).unwrap();
            assert!(
                a.count <= CLIENT_MAX_DATA_XFER,
                "a read of {} bytes",
                a.count
            );
            let mut p = a.as_bytes().to_vec();
            p.resize(16 + a.count as usize, 0xab);
            reply(&s, &m.header, &p, &[]);
            seen += u64::from(a.count);
        }
        until_closed(&s);
    });
    let c = Client::connect(&path, TIMEOUT).expect("connect to a server that says 4 GiB");
    assert_eq!(c.server_caps().max_data_xfer_size, CLIENT_MAX_DATA_XFER);
    let mut buf = vec![0u8; 3 << 19];
    c.region_read(0, 0, &mut buf).expect("a 1.5 MiB read");
    assert!(buf.iter().all(|&b| b == 0xab));
    drop(c);
    t.join().unwrap();
}

#[test]
fn a_sparse_area_whose_mmap_offset_overflows_is_refused_at_connect() {
    for (name, mmap_offset) in [("wrap", u64::MAX - 0x800), ("off_t", i64::MAX as u64)] {
        let dir = tempfile::tempdir().unwrap();
        let fd = memfd(0x2000, true);
        let raw = fd.as_raw_fd();
        let (path, t) = fake_server(&dir, "sparse.sock", move |s| {
            let caps = sparse_mmap_cap(&[(0x1000, 0x1000)]);
            let r = FakeRegion {
                info: RegionInfo {
                    argsz: 32,
                    flags: REGION_READ | REGION_WRITE | REGION_MMAP | REGION_CAPS,
                    index: 0,
                    cap_offset: 32,
                    size: 0x2000,
                    offset: mmap_offset,
                },
                caps,
                fd: Some(raw),
            };
            describe(&s, r#"{"capabilities":{}}"#, &[r]);
            until_closed(&s);
        });
        match Client::connect(&path, TIMEOUT) {
            Err(ClientError::Protocol { cmd, what }) => {
                assert_eq!(cmd, Command::DeviceGetRegionInfo, "{name}");
                assert!(what.contains("overflows"), "{name}: {what}");
            }
            Err(e) => panic!("{name}: {e}"),
            Ok(c) => panic!(
                "{name}: a sparse area at mmap offset {:#x}+0x1000 was accepted: {:?}",
                mmap_offset,
                c.region(0).map(|r| (r.mmap_offset, &r.sparse))
            ),
        }
        t.join().unwrap();
        drop(fd);
    }
}

#[test]
fn an_ioeventfd_outside_its_region_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, t) = fake_server(&dir, "iofd.sock", |s| {
        describe(&s, r#"{"capabilities":{}}"#, &[plain(0, 0x1000)]);
        for (offset, size) in [(u64::MAX - 3, 8), (0xffc, 8), (0, 3)] {
            let m = next(&s, Command::DeviceGetRegionIoFds);
            let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
            let h = RegionIoFds {
                argsz: 16 + 40,
                flags: 0,
                index: 0,
                count: 1,
            };
            let sub = SubRegionIoEventFd {
                offset,
                size,
                fd_index: 0,
                kind: 0,
                flags: 0,
                padding: 0,
                datamatch: 0,
            };
            let mut p = h.as_bytes().to_vec();
            p.extend(sub.as_bytes());
            reply(&s, &m.header, &p, &[efd.as_raw_fd()]);
        }
        until_closed(&s);
    });
    let c = Client::connect(&path, TIMEOUT).expect("connect");
    for what in ["wrapping", "past the end", "3-byte"] {
        match c.region_io_fds(0) {
            Err(ClientError::Protocol { what: w, .. }) => {
                assert!(w.contains("not an access inside region 0"), "{what}: {w}")
            }
            Err(e) => panic!("{what}: {e}"),
            Ok(v) => panic!(
                "{what} ioeventfd accepted: {:?}",
                v.iter()
                    .map(|(s, _)| (s.offset, s.size))
                    .collect::<Vec<_>>()
            ),
        }
    }
    drop(c);
    t.join().unwrap();
}

fn version_payload() -> Vec<u8> {
    let mut p = vec![0, 0, 1, 0];
    p.extend(Caps::default().to_json());
    p
}

/// Answer VERSION and DEVICE_GET_INFO (one region, no IRQs) honestly.
fn honest_start(s: &UnixStream) {
    let m = next(s, Command::Version);
    reply(s, &m.header, &version_payload(), &[]);
    let m = next(s, Command::DeviceGetInfo);
    let i = DeviceInfo {
        argsz: 16,
        flags: DEVICE_FLAGS_PCI,
        num_regions: 1,
        num_irqs: 0,
    };
    reply(s, &m.header, i.as_bytes(), &[]);
}

#[test]
fn client_survives_a_lying_server() {
    let dir = tempfile::tempdir().unwrap();
    let short = Duration::from_millis(500);

    // (a) A reply with the wrong message ID.
    let (p, t) = fake_server(&dir, "a.sock", |s| {
        let m = sock::recv(&s, 1 << 21).unwrap();
        let mut h = m.header;
        h.msg_id = h.msg_id.wrapping_add(1);
        reply(&s, &h, &version_payload(), &[]);
        until_closed(&s);
    });
    let err = Client::connect(&p, short)
        .err()
        .expect("wrong msg_id accepted");
    assert!(
        matches!(
            err,
            ClientError::Protocol {
                cmd: Command::Version,
                ..
            }
        ),
        "{err:?}"
    );
    t.join().unwrap();

    // (b) A sparse mmap area outside its region.
    let (p, t) = fake_server(&dir, "b.sock", |s| {
        honest_start(&s);
        while let Ok(m) = sock::recv(&s, 1 << 21) {
            let caps = sparse_mmap_cap(&[(0x800, 0x1000)]);
            let info = RegionInfo {
                argsz: (32 + caps.len()) as u32,
                flags: REGION_READ | REGION_CAPS,
                index: 0,
                cap_offset: 32,
                size: 0x1000,
                offset: 0,
            };
            let mut p = info.as_bytes().to_vec();
            p.extend(caps);
            reply(&s, &m.header, &p, &[]);
        }
    });
    let err = Client::connect(&p, short)
        .err()
        .expect("bad sparse area accepted");
    assert!(
        matches!(
            err,
            ClientError::Protocol {
                cmd: Command::DeviceGetRegionInfo,
                ..
            }
        ),
        "{err:?}"
    );
    t.join().unwrap();

    // (c) Disconnects in the middle of negotiation (half a reply header).
    let (p, t) = fake_server(&dir, "c.sock", |s| {
        let m = sock::recv(&s, 1 << 21).unwrap();
        let h = m.header.reply(64);
        let _ = (&s).write_all(&h.as_bytes()[..8]);
    });
    let err = Client::connect(&p, short)
        .err()
        .expect("half a reply accepted");
    assert!(
        matches!(err, ClientError::Disconnected(Command::Version)),
        "{err:?}"
    );
    t.join().unwrap();
    // ... or before replying at all.
    let (p, t) = fake_server(&dir, "c2.sock", |s| {
        let _ = sock::recv(&s, 1 << 21);
    });
    let err = Client::connect(&p, short).err().expect("no reply accepted");
    assert!(
        matches!(err, ClientError::Disconnected(Command::Version)),
        "{err:?}"
    );
    t.join().unwrap();

    // (d) Never replies: a timeout within the given time.
    let (p, t) = fake_server(&dir, "d.sock", |s| {
        let _ = sock::recv(&s, 1 << 21);
        until_closed(&s);
    });
    let t0 = Instant::now();
    let err = Client::connect(&p, short).err().expect("silence accepted");
    let took = t0.elapsed();
    assert!(
        matches!(
            err,
            ClientError::Timeout {
                cmd: Command::Version,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(took >= short && took < short * 4, "took {took:?}");
    t.join().unwrap();

    // (e) Region info for another region than asked.
    let (p, t) = fake_server(&dir, "e.sock", |s| {
        honest_start(&s);
        if let Ok(m) = sock::recv(&s, 1 << 21) {
            let info = RegionInfo {
                argsz: 32,
                index: 5,
                size: 16,
                ..Default::default()
            };
            reply(&s, &m.header, info.as_bytes(), &[]);
        }
        until_closed(&s);
    });
    let err = Client::connect(&p, short)
        .err()
        .expect("wrong region accepted");
    assert!(
        matches!(
            err,
            ClientError::Protocol {
                cmd: Command::DeviceGetRegionInfo,
                ..
            }
        ),
        "{err:?}"
    );
    t.join().unwrap();

    // (f) A reply larger than anything negotiated: refused without allocating it.
    let (p, t) = fake_server(&dir, "f.sock", |s| {
        let m = sock::recv(&s, 1 << 21).unwrap();
        let h = m.header.reply(usize::MAX >> 33);
        let _ = (&s).write_all(h.as_bytes());
        until_closed(&s);
    });
    let err = Client::connect(&p, short)
        .err()
        .expect("huge reply accepted");
    assert!(
        matches!(
            err,
            ClientError::Protocol {
                cmd: Command::Version,
                ..
            }
        ),
        "{err:?}"
    );
    t.join().unwrap();

    // (g) Claims thousands of regions.
    let (p, t) = fake_server(&dir, "g.sock", |s| {
        let m = sock::recv(&s, 1 << 21).unwrap();
        reply(&s, &m.header, &version_payload(), &[]);
        let m = sock::recv(&s, 1 << 21).unwrap();
        let i = DeviceInfo {
            argsz: 16,
            flags: DEVICE_FLAGS_PCI,
            num_regions: 100_000,
            num_irqs: 5,
        };
        reply(&s, &m.header, i.as_bytes(), &[]);
        until_closed(&s);
    });
    let err = Client::connect(&p, short)
        .err()
        .expect("100000 regions accepted");
    assert!(
        matches!(
            err,
            ClientError::Protocol {
                cmd: Command::DeviceGetInfo,
                ..
            }
        ),
        "{err:?}"
    );
    t.join().unwrap();

    // (h) A server-initiated DMA request for unmapped memory while the client waits: the
    // client answers with an error and still gets its reply.
    let (p, t) = fake_server(&dir, "h.sock", |s| {
        honest_start(&s);
        let m = sock::recv(&s, 1 << 21).unwrap();
        let a = DmaAccess {
            address: 0x1234_0000,
            count: 16,
        };
        let dh = Header::command(0x8001, Command::DmaRead, HEADER_SIZE + 16);
        sock::send(&s, &[dh.as_bytes(), a.as_bytes()], &[]).unwrap();
        let r = sock::recv(&s, 1 << 21).unwrap();
        assert!(r.header.is_reply() && r.header.is_error());
        assert_eq!(r.header.msg_id, 0x8001);
        assert_eq!(r.header.error, libc::EFAULT as u32);
        let info = RegionInfo {
            argsz: 32,
            flags: REGION_READ,
            index: 0,
            size: 16,
            ..Default::default()
        };
        reply(&s, &m.header, info.as_bytes(), &[]);
        until_closed(&s);
    });
    let c = Client::connect(&p, short).expect("honest server");
    assert_eq!(c.regions().len(), 1);
    assert_eq!(c.dma_requests_served(), 0);
    drop(c);
    t.join().unwrap();
}
