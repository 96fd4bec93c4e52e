//! The client against a device that lies (issue item 14): sizes and offsets a server sends
//! are checked with overflow-safe arithmetic and bounded, a lie is refused at connect time
//! with a clear error, and nothing panics. The fake servers are real peers on real sockets.

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;

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
