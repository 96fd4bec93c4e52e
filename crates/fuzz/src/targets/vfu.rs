//! vfio-user: the server's decoding of a client's message (header, then the command's
//! payload), and the client's handling of a server's replies (a real [`Client`] on a real
//! Unix socket whose other end answers with the input).
//!
//! Client input format: a sequence of messages, each a little-endian `u16` length and that
//! many bytes (a vfio-user message, header first; a short one is padded with zeros to a
//! header). The answering end sends them in order; before each reply (type bits 1) it reads
//! the client's next command and copies its message id and command number into the reply, so
//! that the input reaches the reply parsers rather than only the id check. Every header's
//! `size` is set to the message's length (a wrong size only stalls a stream). A message of the
//! command type is sent at once, as a server's own `DMA_READ`/`DMA_WRITE`.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use vfu::client::Client;
use vfu::proto::{
    FLAG_TYPE_MASK, HEADER_SIZE, Header, MSG_OVERHEAD, Request, TYPE_REPLY, parse_request,
};
use vfu::sock;
use zerocopy::IntoBytes;

/// The largest message the server side accepts here (its default data size and overhead).
const MAX_MSG: u32 = vfu::proto::DEFAULT_MAX_DATA_XFER + MSG_OVERHEAD;

/// Server side: the first byte is how many fds came with the message (0..=3), the second picks
/// the negotiated data size; the rest is the message.
pub fn server(data: &[u8]) -> bool {
    let [nfds, size, msg @ ..] = data else {
        return false;
    };
    let max_data = if size & 1 == 0 { 4096 } else { 1 << 20 };
    let Ok(h) = Header::decode(msg, MAX_MSG) else {
        return false;
    };
    assert_eq!(
        Header::decode(h.as_bytes(), MAX_MSG),
        Ok(h),
        "header round trip"
    );
    let Some(payload) = msg.get(HEADER_SIZE..h.size as usize) else {
        return false;
    };
    match parse_request(&h, payload, usize::from(nfds % 4), max_data) {
        Ok(r) => {
            check(&r, max_data);
            true
        }
        Err(e) => {
            assert!(e.errno() > 0, "an error reply carries an errno");
            false
        }
    }
}

/// What a decoded request promises its handler.
fn check(r: &Request, max_data: u32) {
    match r {
        Request::Version { caps, .. } => {
            let again = vfu::proto::Caps::from_json(&caps.to_json()).expect("own caps parse");
            assert_eq!(&again, caps, "capabilities round trip");
        }
        Request::RegionRead(access) => {
            assert!(access.count <= max_data, "read bounded");
        }
        Request::RegionWrite { access, data } => {
            assert!(access.count <= max_data, "write bounded");
            assert_eq!(data.len(), access.count as usize, "write carries its bytes");
        }
        _ => {}
    }
}

/// The socket the client target's process `pid` listens on (the runner removes it after).
pub fn socket_path(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("faultline-fuzz-vfu-{pid}.sock"))
}

fn listener() -> &'static (UnixListener, PathBuf) {
    static L: OnceLock<(UnixListener, PathBuf)> = OnceLock::new();
    L.get_or_init(|| {
        let path = socket_path(std::process::id());
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).expect("binding the fuzz socket");
        (l, path)
    })
}

/// Split the input into messages.
fn messages(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let [a, b, rest @ ..] = data {
        let n = usize::from(u16::from_le_bytes([*a, *b])).min(rest.len());
        let mut m = rest[..n].to_vec();
        m.resize(m.len().max(HEADER_SIZE), 0);
        out.push(m);
        data = &rest[n..];
    }
    out
}

/// The answering end: reply to each command with the next message.
fn answer(s: UnixStream, msgs: Vec<Vec<u8>>) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    for mut m in msgs {
        let size = m.len() as u32;
        m[4..8].copy_from_slice(&size.to_ne_bytes());
        let flags = u32::from_ne_bytes(m[8..12].try_into().expect("4 bytes"));
        if flags & FLAG_TYPE_MASK == TYPE_REPLY {
            // The client's next command (its replies to our DMA requests are skipped).
            let q = loop {
                match sock::recv(&s, 1 << 24) {
                    Ok(q) if q.header.is_reply() => continue,
                    Ok(q) => break q.header,
                    Err(_) => return,
                }
            };
            m[0..2].copy_from_slice(&q.msg_id.to_ne_bytes());
            m[2..4].copy_from_slice(&q.cmd.to_ne_bytes());
        }
        if sock::send(&s, &[&m], &[]).is_err() {
            return;
        }
    }
}

/// Client side: connect (VERSION, DEVICE_GET_INFO, each region's and IRQ's info), then a few
/// calls whose replies carry structure; `true` if the client connected.
pub fn client(data: &[u8]) -> bool {
    static SIGPIPE: OnceLock<()> = OnceLock::new();
    SIGPIPE.get_or_init(|| {
        // SAFETY: setting a signal's disposition to SIG_IGN installs no handler. Every Rust
        // `main` does the same at start-up; libFuzzer's C `main` does not, and a write to the
        // socket the answering end closed would otherwise kill the fuzzer.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
    let (l, path) = listener();
    let msgs = messages(data);
    thread::scope(|sc| {
        let t = sc.spawn(|| {
            if let Ok((s, _)) = l.accept() {
                answer(s, msgs);
            }
        });
        let ok = match Client::connect(path, Duration::from_secs(5)) {
            Ok(c) => {
                let mut b = [0u8; 8];
                for r in c.regions().iter().map(|r| r.index).take(2) {
                    let _ = c.region_read(r, 0, &mut b);
                    let _ = c.region_io_fds(r);
                }
                let _ = c.migration_flags();
                let _ = c.migration_state();
                let _ = c.dma_logging_report(0, 1 << 20, 4096);
                let _ = c.mig_data_read(64);
                true
            }
            Err(_) => false,
        };
        let _ = t.join();
        ok
    })
}
