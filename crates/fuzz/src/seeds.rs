//! Seeds from real traffic, written by `fuzz-seeds` into `crates/fuzz/corpus/TARGET/`.
//!
//! - `xfer_frame`: frames sent by xfer's and the migration's own send paths (`Sock::send`,
//!   `send_json`, `proto::ack`) over a real Unix socket, read back as bytes.
//! - `vfu_server`, `vfu_client`: a real vfio-user [`Client`] talking to a real device server
//!   (the GPIO device) through a recording proxy; each client message is a server seed, the
//!   server's replies in order are the client seed.
//! - `snapshot_*`: a snapshot taken of a running KVM guest (`RunningVm::snapshot`).
//! - `handoff`: `send_msg` of a hand-off and of its reply over a real socket.
//! - `api_request`: the bytes `vmm::api::call` sends for each API call, on a real socket;
//!   method, target and body as the server parsed them.
//! - `virtio_guest`: driver sessions (features, queue setup, good requests) for each device,
//!   run through the real device and transport and checked to have done their work.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vfu::client::Client;
use vfu::sock;
use zerocopy::IntoBytes;

/// Seeds: (target, file name, bytes).
pub type Seeds = Vec<(&'static str, String, Vec<u8>)>;

/// Bytes written to `a` by `send`, read from its peer.
fn captured(send: impl FnOnce(&UnixStream)) -> Vec<u8> {
    let (a, mut b) = UnixStream::pair().expect("socket pair");
    send(&a);
    drop(a);
    let mut out = Vec::new();
    b.read_to_end(&mut out).expect("reading the frames back");
    out
}

/// Migration frames, one seed per conversation.
pub fn xfer(state_bin: &[u8]) -> Seeds {
    use vmm::migration::{DestReport, End, Switch, Verdict};
    use xfer::bitmap::words_to_bytes;
    use xfer::proto::{Channel, Hello, MigrationMode};
    use xfer::wire::{Kind, Sock};
    let sock = |f: &dyn Fn(&mut Sock)| {
        captured(|s| {
            let mut s = Sock::Unix(s.try_clone().expect("clone"));
            f(&mut s);
        })
    };
    let cfg = serde_json::to_value(vmm::VmConfig::default()).expect("config");
    let mut page = vec![0u8; 4096];
    page[..8].copy_from_slice(b"faultlin");
    let mut out: Seeds = Vec::new();
    let mut add = |name: &str, b: Vec<u8>| out.push(("xfer_frame", name.into(), b));
    add(
        "precopy-main",
        sock(&|s| {
            let h = Hello::new(7, MigrationMode::Hybrid, false, Some(cfg.clone()));
            s.send_json(Kind::Hello, &h).unwrap();
            s.send_json(Kind::Round, &serde_json::json!({"round": 0, "pages": 2}))
                .unwrap();
            s.send(Kind::Pages, 0x1000, &page).unwrap();
            s.send(Kind::Zero, 0x2000, &3u32.to_le_bytes()).unwrap();
            let sw = Switch {
                postcopy: true,
                heartbeats: vec![12, 9],
                rounds: 1,
                paused: false,
                digest: Some(0x1234_5678_9abc_def0),
            };
            s.send_json(Kind::Switch, &sw).unwrap();
            s.send(Kind::Needed, 0, &words_to_bytes(&[0b1011, 0, 1 << 63]))
                .unwrap();
            s.send(Kind::State, 0, state_bin).unwrap();
        }),
    );
    add(
        "priority",
        sock(&|s| {
            let mut h = Hello::new(7, MigrationMode::Postcopy, false, None);
            h.channel = Channel::Priority;
            s.send_json(Kind::Hello, &h).unwrap();
            s.send(Kind::Request, 0x5000, &4u32.to_le_bytes()).unwrap();
            s.send(Kind::Pages, 0x5000, &page).unwrap();
        }),
    );
    add(
        "dest",
        sock(&|s| {
            xfer::proto::ack(s, Ok(true)).unwrap();
            s.send_json(Kind::Resumed, &serde_json::json!({})).unwrap();
            let r = DestReport {
                pages_background: 100,
                pages_priority: 3,
                blocktime_ms: vec![0.25, 1.5],
                heads_us: vec![Some(120), None],
                gaps_us: vec![900, 1100],
                ..DestReport::default()
            };
            s.send_json(Kind::Done, &r).unwrap();
            s.send(Kind::Recover, 0, &words_to_bytes(&[u64::MAX, 7]))
                .unwrap();
        }),
    );
    add(
        "end",
        sock(&|s| {
            let e = End {
                downtime_us: 2500,
                tails_us: vec![Some(40), None],
                gaps_us: vec![1000, 2000],
                checksums: Some(vec![0xdead_beef, 1]),
            };
            s.send_json(Kind::End, &e).unwrap();
            s.send_json(Kind::Verdict, &Verdict { digest: 0xfeed })
                .unwrap();
        }),
    );
    add(
        "refusals",
        sock(&|s| {
            xfer::proto::ack(s, Err("protocol version 2".into())).unwrap();
            s.send_json(Kind::Error, &serde_json::json!({"error": "out of memory"}))
                .unwrap();
            s.send_json(Kind::Cancel, &serde_json::json!({"reason": "deadline"}))
                .unwrap();
        }),
    );
    add(
        "crc-trailers",
        sock(&|s| {
            // Frames with CRC32C trailers, as a peer that offered `crc32c` sends them.
            s.send_crc(Kind::Pages, 0x3000, &page, true).unwrap();
            s.send_crc(Kind::Zero, 0x4000, &2u32.to_le_bytes(), true)
                .unwrap();
            s.send_crc(Kind::Resend, 0x3000, &1u32.to_le_bytes(), true)
                .unwrap();
            s.send_vectored_crc(Kind::Pages, 0x5000, &page, true)
                .unwrap();
        }),
    );
    out
}

/// Messages seen by the proxy: (fds, bytes).
type Log = Arc<Mutex<Vec<(usize, Vec<u8>)>>>;

/// Forward vfio-user messages from `from` to `to`, recording each with its fd count.
fn forward(from: UnixStream, to: UnixStream, log: Log) {
    let _ = from.set_read_timeout(Some(Duration::from_secs(10)));
    while let Ok(m) = sock::recv(&from, 1 << 24) {
        let mut bytes = m.header.as_bytes().to_vec();
        bytes.extend_from_slice(&m.payload);
        let fds: Vec<_> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
        log.lock().expect("log").push((fds.len(), bytes.clone()));
        if sock::send(&to, &[&bytes], &fds).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// vfio-user messages both ways between a real client and the GPIO device's server.
pub fn vfu(dir: &Path) -> Seeds {
    use vfu::devices::gpio::Gpio;
    use vfu::server::Server;
    let server = Server::new(false).expect("vfio-user server");
    let stop = server.shutdown_handle();
    let s = server.clone();
    let run = std::thread::spawn(move || s.run());
    let dev_path = dir.join("gpio.sock");
    let _dev = Gpio::description()
        .realize(Gpio::new(true))
        .expect("realizing the GPIO device")
        .attach(&server, &dev_path)
        .expect("serving it");
    let proxy_path = dir.join("proxy.sock");
    let l = UnixListener::bind(&proxy_path).expect("proxy socket");
    let up = Arc::new(Mutex::new(Vec::new()));
    let down = Arc::new(Mutex::new(Vec::new()));
    let (u, d) = (up.clone(), down.clone());
    let proxy = std::thread::spawn(move || {
        let (c, _) = l.accept().expect("client");
        let s = UnixStream::connect(&dev_path).expect("device");
        let (c2, s2) = (c.try_clone().expect("clone"), s.try_clone().expect("clone"));
        let t = std::thread::spawn(move || forward(s2, c2, d));
        forward(c, s, u);
        let _ = t.join();
    });
    {
        let c = Client::connect(&proxy_path, Duration::from_secs(10)).expect("client connects");
        let mut b = [0u8; 4];
        let _ = c.config_read(0, &mut b);
        let _ = c.region_read(0, 0, &mut b);
        let _ = c.region_write(0, 0, &[1, 0, 0, 0]);
        let _ = c.region_io_fds(0);
        let _ = c.migration_flags();
        let _ = c.migration_state();
        let _ = c.reset();
    }
    let _ = proxy.join();
    // The device's own migration stream, in the record a snapshot keeps of it.
    let record = {
        let c = Client::connect(&dir.join("gpio.sock"), Duration::from_secs(10))
            .expect("a second client connects");
        let _ = c.region_write(2, 0, &[0x5a]);
        let stream = c.save_state().expect("the device's state");
        vmm::devices::pci::PciRecord {
            slot: 1,
            id: vmm::guest::abi::PCI_ID_GPIO,
            table: vec![[0xfee0_0000, 0, 0x41, 0]],
            stream,
        }
        .encode()
    };
    stop.shutdown();
    let _ = run.join();
    let mut out: Seeds = Vec::new();
    let mut b = vec![2u8];
    b.extend_from_slice(&record);
    out.push(("device_record", "vfio-user-gpio".into(), b));
    for (i, (nfds, m)) in up.lock().expect("log").iter().enumerate() {
        let mut b = vec![*nfds as u8, 1];
        b.extend_from_slice(m);
        out.push(("vfu_server", format!("client-msg-{i:02}"), b));
    }
    let mut seq = Vec::new();
    for (_, m) in down.lock().expect("log").iter() {
        seq.extend_from_slice(&(m.len() as u16).to_le_bytes());
        seq.extend_from_slice(m);
    }
    out.push(("vfu_client", "gpio-session".into(), seq));
    out
}

/// A snapshot of a running built-in guest (1 vCPU, 8 MiB, an entropy device): its
/// manifest, index and state (with the device's record, also a `device_record` seed).
pub fn snapshot(dir: &Path) -> (Seeds, Vec<u8>) {
    use vmm::{Event, Vm, VmConfig, Workload};
    let cfg = VmConfig {
        mem_bytes: 8 << 20,
        vcpus: 1,
        workload: Workload::Dirty,
        workload_bytes: Some(1 << 20),
        virtio: vec![vmm::VirtioSpec::Rng],
        ..VmConfig::default()
    };
    let mut running = Vm::new(cfg)
        .expect("a VM (needs /dev/kvm)")
        .start()
        .expect("starting it");
    let t = Instant::now();
    loop {
        assert!(t.elapsed() < Duration::from_secs(60), "no heartbeat");
        if let Some(Event::Heartbeat { n, .. }) =
            running.next_event(Duration::from_secs(1)).expect("events")
            && n >= 2
        {
            break;
        }
    }
    let snap = dir.join("snap");
    running.snapshot(&snap, true).expect("snapshot");
    running.stop();
    let read = |f: &str| std::fs::read(snap.join(f)).expect("snapshot file");
    let state = read(vmm::snapshot::files::STATE);
    let mut st = vec![0u8]; // one vCPU
    st.extend_from_slice(&state);
    let seeds = vec![
        (
            "snapshot_manifest",
            "manifest.json".into(),
            read(vmm::snapshot::files::MANIFEST),
        ),
        (
            "snapshot_index",
            "memory.idx".into(),
            read(vmm::snapshot::files::INDEX),
        ),
        ("snapshot_state", "state.bin".into(), st),
    ];
    let mut seeds = seeds;
    let (vm, _) = vmm::snapshot::state::decode(&state, 1).expect("the snapshot's state");
    for (i, r) in vm.devices.virtio.iter().enumerate() {
        let mut b = vec![0u8];
        b.extend_from_slice(r);
        seeds.push(("device_record", format!("virtio-{i}"), b));
    }
    assert!(!vm.devices.virtio.is_empty(), "the seed VM's device record");
    let serial = vmm::devices::SerialState {
        in_buffer: b"login: ".to_vec(),
        ..Default::default()
    };
    let mut b = vec![1u8];
    b.extend_from_slice(&vmm::devices::SerialRecord::encode(&serial));
    seeds.push(("device_record", "com1".into(), b));
    (seeds, state)
}

/// The hand-off and its reply, as `send_msg` writes them.
pub fn handoff() -> Seeds {
    use vmm::restore::{
        HANDOFF_PROTOCOL, HANDOFF_VERSION, Handoff, HandoffMapping, HandoffReply, send_msg,
    };
    let h = Handoff {
        protocol: HANDOFF_PROTOCOL.into(),
        version: HANDOFF_VERSION,
        vmm_pid: 4242,
        snapshot_dir: PathBuf::from("/var/lib/faultline/snap"),
        uffd_features: 0x1f8,
        mappings: vec![HandoffMapping {
            base_host_virt_addr: 0x7f00_0000_0000,
            size: 1 << 30,
            offset: 0,
            page_size: 4096,
        }],
    };
    let r = HandoffReply {
        version: HANDOFF_VERSION,
        ok: false,
        error: Some("loading the snapshot".into()),
    };
    vec![
        (
            "handoff",
            "handoff".into(),
            captured(|s| send_msg(s, &h, None).expect("send")),
        ),
        (
            "handoff",
            "reply".into(),
            captured(|s| send_msg(s, &r, None).expect("send")),
        ),
    ]
}

/// Each API call, the bytes `vmm::api::call` sends, recorded on a real Unix socket and
/// answered once the API server's parser has the whole request.
pub fn api(dir: &Path) -> Seeds {
    use std::io::{Read, Write};
    let path = dir.join("api.sock");
    let _ = std::fs::remove_file(&path);
    let server = std::os::unix::net::UnixListener::bind(&path).expect("API socket");
    let calls: &[(&str, &str, &str)] = &[
        ("GET", "/vm", ""),
        ("PUT", "/vm/pause", ""),
        ("PUT", "/vm/resume", ""),
        ("GET", "/vm/stats", ""),
        (
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_dir":"/tmp/snap","page_checksums":true}"#,
        ),
        (
            "PUT",
            "/migrate",
            r#"{"to":"tcp:127.0.0.1:7000","mode":"hybrid","max_bandwidth":125000000,"downtime_limit_ms":300}"#,
        ),
        ("PUT", "/migrate", r#"{"resume":true}"#),
        ("GET", "/migrate", ""),
        ("PUT", "/vm/stop", ""),
    ];
    let mut out: Seeds = Vec::new();
    for (i, (m, url, body)) in calls.iter().enumerate() {
        let p = path.clone();
        let (m2, u2, b2) = (m.to_string(), url.to_string(), body.to_string());
        let t = std::thread::spawn(move || {
            vmm::api::call(&p, &m2, &u2, &b2, Duration::from_secs(10)).expect("API call")
        });
        let (mut s, _) = server.accept().expect("a client");
        let mut seed = Vec::new();
        let mut chunk = [0u8; 4096];
        while vmm::api::wire::parse_request(&seed)
            .expect("our client's request parses")
            .is_none()
        {
            let n = s.read(&mut chunk).expect("reading the request");
            assert!(n > 0, "the client closed mid-request");
            seed.extend_from_slice(&chunk[..n]);
        }
        let _ = s.write_all(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        drop(s);
        let _ = t.join();
        out.push(("api_request", format!("call-{i:02}"), seed));
    }
    out
}

/// Every seed (needs /dev/kvm for the snapshot).
pub fn all(dir: &Path) -> Seeds {
    let (mut s, state) = snapshot(dir);
    s.extend(xfer(&state));
    s.extend(vfu(dir));
    s.extend(handoff());
    s.extend(api(dir));
    s.extend(virtio());
    s
}

/// `virtio_guest`: a driver session per device (features, queue setup, good requests),
/// written by [`Input`](crate::targets::virtio::driver::Input) and run through the real
/// device and transport; each is checked to have done its work before it is kept.
pub fn virtio() -> Seeds {
    use crate::targets::virtio::driver::{DATA, Input};
    use crate::targets::virtio::{Kind, Outcome, run};
    let mut out: Seeds = Vec::new();
    let mut keep = |name: &str, i: &Input, check: &dyn Fn(&Outcome)| {
        let b = i.encode();
        let o = run(&b).expect("a whole input");
        assert!(
            o.reached_driver_ok && o.broken.is_none(),
            "{name}: the device did not work: {:?}",
            o.broken
        );
        check(&o);
        out.push(("virtio_guest", name.to_string(), b));
    };
    let m = |o: &Outcome, at: u64, n: usize| o.mem[at as usize..at as usize + n].to_vec();

    // Block: write a sector, read it back, the serial.
    let mut i = Input::new(Kind::Block, false);
    let f = virtio::blk::F_SEG_MAX | virtio::blk::F_BLK_SIZE | virtio::blk::F_FLUSH;
    i.init(f, false, 1);
    let hdr = |t: u32, sector: u64| {
        let mut h = t.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        h
    };
    i.put(DATA, &hdr(virtio::blk::req::OUT, 1));
    i.put(DATA + 0x10, &[0xab; 512]);
    i.add(
        0,
        &[
            (DATA, 16, false),
            (DATA + 0x10, 512, false),
            (DATA + 0x210, 1, true),
        ],
    );
    i.kick(0);
    i.put(DATA + 0x220, &hdr(virtio::blk::req::IN, 1));
    i.add(
        0,
        &[
            (DATA + 0x220, 16, false),
            (DATA + 0x230, 512, true),
            (DATA + 0x430, 1, true),
        ],
    );
    i.put(DATA + 0x440, &hdr(virtio::blk::req::GET_ID, 0));
    i.add(
        0,
        &[
            (DATA + 0x440, 16, false),
            (DATA + 0x450, 20, true),
            (DATA + 0x464, 1, true),
        ],
    );
    i.kick(0);
    keep("blk-write-read-id", &i, &|o| {
        assert_eq!(Input::used_idx(&o.mem, 0), 3);
        assert_eq!(m(o, DATA + 0x210, 1), [0], "write status");
        assert_eq!(m(o, DATA + 0x430, 1), [0], "read status");
        assert_eq!(m(o, DATA + 0x230, 512), [0xab; 512], "read back");
        assert_eq!(m(o, DATA + 0x450, 8), b"disk.img", "serial");
    });

    // Block with MSI and EVENT_IDX: flush, discard, write zeroes, read.
    let mut i = Input::new(Kind::Block, true);
    let f = virtio::blk::F_FLUSH | virtio::blk::F_DISCARD | virtio::blk::F_WRITE_ZEROES;
    i.begin(f, true);
    i.setup_queue(0);
    i.r32(virtio::mmio::reg::MSI_CSR);
    i.w16(virtio::mmio::reg::MSI_CSR, virtio::mmio::MSI_CSR_ENABLE);
    for v in 0..2 {
        i.w32(virtio::mmio::reg::MSI_ADDRESS_LOW, 0xfee0_0000);
        i.w32(virtio::mmio::reg::MSI_ADDRESS_HIGH, 0);
        i.w32(virtio::mmio::reg::MSI_DATA, 0x30 + v);
        i.w16(
            virtio::mmio::reg::MSI_COMMAND,
            virtio::mmio::MSI_CMD_UPDATE | v as u16,
        );
    }
    i.driver_ok();
    let seg = |sector: u64, n: u32| {
        let mut s = sector.to_le_bytes().to_vec();
        s.extend_from_slice(&n.to_le_bytes());
        s.extend_from_slice(&[0; 4]);
        s
    };
    i.put(DATA, &hdr(virtio::blk::req::FLUSH, 0));
    i.add(0, &[(DATA, 16, false), (DATA + 0x10, 1, true)]);
    i.put(DATA + 0x20, &hdr(virtio::blk::req::DISCARD, 0));
    i.put(DATA + 0x30, &seg(0, 8));
    i.add(0, &[(DATA + 0x20, 32, false), (DATA + 0x40, 1, true)]);
    i.put(DATA + 0x50, &hdr(virtio::blk::req::WRITE_ZEROES, 0));
    i.put(DATA + 0x60, &seg(8, 8));
    i.add(0, &[(DATA + 0x50, 32, false), (DATA + 0x70, 1, true)]);
    i.put(DATA + 0x80, &hdr(virtio::blk::req::IN, 8));
    i.put(DATA + 0x90, &[0xff; 512]);
    i.add(
        0,
        &[
            (DATA + 0x80, 16, false),
            (DATA + 0x90, 512, true),
            (DATA + 0x290, 1, true),
        ],
    );
    i.kick(0);
    keep("blk-msi-flush-discard-zeroes", &i, &|o| {
        assert_eq!(Input::used_idx(&o.mem, 0), 4);
        for s in [0x10, 0x40, 0x70, 0x290] {
            assert_eq!(m(o, DATA + s, 1), [0], "status at {s:#x}");
        }
        assert_eq!(m(o, DATA + 0x90, 512), [0; 512], "zeroes read back");
    });

    // Entropy: two buffers.
    let mut i = Input::new(Kind::Rng, false);
    i.init(0, false, 1);
    i.add(0, &[(DATA, 64, true)]);
    i.add(0, &[(DATA + 0x40, 32, true), (DATA + 0x60, 32, true)]);
    i.kick(0);
    keep("rng", &i, &|o| {
        assert_eq!(Input::used_idx(&o.mem, 0), 2);
        assert!(m(o, DATA, 128).iter().any(|b| *b != 0), "random bytes");
    });

    // Network: receive buffers, a frame out, a frame in.
    let mut i = Input::new(Kind::Net, false);
    i.init(virtio::net::F_MAC | virtio::net::F_STATUS, false, 2);
    i.r32(virtio::mmio::reg::CONFIG);
    i.add(0, &[(DATA, 128, true)]);
    i.add(0, &[(DATA + 0x80, 128, true)]);
    i.kick(0);
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x08, 0x06]);
    frame.resize(60, 0x11);
    let mut tx = vec![0u8; virtio::net::HDR_LEN];
    tx.extend_from_slice(&frame);
    i.put(DATA + 0x100, &tx);
    i.add(1, &[(DATA + 0x100, tx.len() as u32, false)]);
    i.kick(1);
    i.host(0, 0, 0);
    i.host_send(60, 0x5a);
    i.backends(1);
    keep("net", &i, &|o| {
        assert_eq!(o.frames, vec![frame.clone()], "the peer got the frame");
        assert_eq!(Input::used_idx(&o.mem, 0), 1, "one frame in");
        assert_eq!(m(o, DATA + 10, 2), [1, 0], "num_buffers");
        assert_eq!(m(o, DATA + 12, 60), [0x5a; 60], "the peer's frame");
    });

    // vsock, guest-initiated: connect to port 5000, send "hello", receive the host's bytes.
    use virtio::vsock::packet::{HDR_LEN, HOST_CID, Header, Op, TYPE_STREAM};
    let pkt = |op: Op, src_port: u32, dst_port: u32, len: u32| Header {
        src_cid: crate::targets::virtio::GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc: 64 << 10,
        fwd_cnt: 0,
    };
    let port = crate::targets::virtio::VSOCK_PORT;
    let mut i = Input::new(Kind::Vsock, false);
    i.init(0, false, 3);
    for k in 0..4 {
        i.add(0, &[(DATA + 0x80 * k, 0x80, true)]);
    }
    i.kick(0);
    let tx = DATA + 0x200;
    i.put(tx, &pkt(Op::Request, 1234, port, 0).encode());
    i.add(1, &[(tx, HDR_LEN as u32, false)]);
    i.kick(1);
    i.put(tx + 0x40, &pkt(Op::Rw, 1234, port, 5).encode());
    i.put(tx + 0x80, b"hello");
    i.add(
        1,
        &[(tx + 0x40, HDR_LEN as u32, false), (tx + 0x80, 5, false)],
    );
    i.kick(1);
    i.host(0, 0, 0);
    i.host(1, 5, b'w');
    i.backends(4);
    keep("vsock-guest-connect", &i, &|o| {
        assert_eq!(
            o.host_bytes, b"hello",
            "the host stream got the guest's bytes"
        );
        let h = |k: u64| {
            let b: [u8; HDR_LEN] = m(o, DATA + 0x80 * k, HDR_LEN).try_into().expect("header");
            Header::parse(&b)
        };
        assert_eq!(h(0).op(), Some(Op::Response));
        assert_eq!((h(1).op(), h(1).len), (Some(Op::Rw), 5));
        assert_eq!(m(o, DATA + 0x80 + HDR_LEN as u64, 5), b"wwwww");
    });

    // vsock, host-initiated: `CONNECT 1234`, the guest accepts, the host reads `OK <port>`.
    let mut i = Input::new(Kind::Vsock, false);
    i.init(0, false, 3);
    for k in 0..2 {
        i.add(0, &[(DATA + 0x80 * k, 0x80, true)]);
    }
    i.kick(0);
    i.host_send(1234, 0);
    for _ in 0..2 {
        i.backends(2);
    }
    let local = 1 << 30;
    let mut resp = pkt(Op::Response, 1234, local, 0);
    resp.buf_alloc = 64 << 10;
    i.put(DATA + 0x200, &resp.encode());
    i.add(1, &[(DATA + 0x200, HDR_LEN as u32, false)]);
    i.kick(1);
    i.host(0, 0, 0);
    keep("vsock-host-connect", &i, &|o| {
        let b: [u8; HDR_LEN] = m(o, DATA, HDR_LEN).try_into().expect("header");
        let h = Header::parse(&b);
        assert_eq!(
            (h.op(), h.src_port, h.dst_port),
            (Some(Op::Request), local, 1234)
        );
        assert_eq!(o.host_bytes, format!("OK {local}\n").as_bytes());
    });
    out
}
