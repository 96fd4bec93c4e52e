//! The hand-off of a restored VM's userfaultfd to an external page-fault handler (protocol
//! version 1; see the [module docs](super)).

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::RestoreError;

/// The hand-off message's protocol name.
pub const HANDOFF_PROTOCOL: &str = "faultline-uffd-handoff";
/// The hand-off protocol version.
pub const HANDOFF_VERSION: u32 = 1;

/// One guest memory mapping, as Firecracker describes it to its handlers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandoffMapping {
    /// Host virtual address of the mapping in the VMM.
    pub base_host_virt_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of its first byte in the memory file.
    pub offset: u64,
    /// Page size.
    pub page_size: u64,
}

/// The hand-off message (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handoff {
    /// [`HANDOFF_PROTOCOL`].
    pub protocol: String,
    /// [`HANDOFF_VERSION`].
    pub version: u32,
    /// The VMM's pid (for messages).
    pub vmm_pid: u32,
    /// The snapshot directory whose memory file backs the mappings.
    pub snapshot_dir: PathBuf,
    /// The userfaultfd's features (`UFFDIO_API`).
    pub uffd_features: u64,
    /// Guest memory.
    pub mappings: Vec<HandoffMapping>,
}

/// The handler's answer (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandoffReply {
    /// The handler's protocol version.
    pub version: u32,
    /// Whether it will serve.
    pub ok: bool,
    /// Why not.
    #[serde(default)]
    pub error: Option<String>,
}

/// Largest hand-off message accepted.
const MAX_MSG: u32 = 1 << 20;

/// Send a length-prefixed JSON message, optionally with an fd.
pub fn send_msg<T: Serialize>(s: &UnixStream, v: &T, fd: Option<&OwnedFd>) -> io::Result<()> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let body = serde_json::to_vec(v).map_err(io::Error::other)?;
    let mut msg = (body.len() as u32).to_le_bytes().to_vec();
    msg.extend_from_slice(&body);
    match fd {
        Some(fd) => {
            let n = s
                .send_with_fd(&msg[..], fd.as_raw_fd())
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
            (&*s).write_all(&msg[n..])
        }
        None => (&*s).write_all(&msg),
    }
}

/// Receive a length-prefixed JSON message and the fd sent with it, if any.
pub fn recv_msg<T: for<'de> Deserialize<'de>>(s: &UnixStream) -> io::Result<(T, Option<OwnedFd>)> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut len = [0u8; 4];
    let (n, file) = s
        .recv_with_fd(&mut len)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the connection",
        ));
    }
    (&*s).read_exact(&mut len[n..])?;
    let mut body = vec![0; msg_len(len)?];
    (&*s).read_exact(&mut body)?;
    Ok((parse_body(&body)?, file.map(OwnedFd::from)))
}

/// The body length a message's 4-byte prefix announces, bounded before use (at most 1 MiB).
pub fn msg_len(prefix: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_le_bytes(prefix);
    if len > MAX_MSG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes (at most {MAX_MSG})"),
        ));
    }
    Ok(len as usize)
}

/// Parse a message's JSON body (the bytes after the length prefix).
pub fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> io::Result<T> {
    serde_json::from_slice(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub(super) fn connect_handler(
    path: &Path,
    uffd: &uffd::Uffd,
    handoff: &Handoff,
    timeout: Duration,
) -> Result<UnixStream, RestoreError> {
    let err = |why: &str, source: Option<io::Error>| RestoreError::Handler {
        path: path.to_path_buf(),
        why: why.into(),
        source,
    };
    let deadline = Instant::now() + timeout;
    let conn = loop {
        match UnixStream::connect(path) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(err("cannot connect", Some(e))),
        }
    };
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| err("socket setup", Some(e)))?;
    let fd = uffd
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| err("duplicating the userfaultfd", Some(e)))?;
    send_msg(&conn, handoff, Some(&fd)).map_err(|e| err("sending the hand-off", Some(e)))?;
    let (reply, _) = recv_msg::<HandoffReply>(&conn)
        .map_err(|e| err("no valid answer to the hand-off", Some(e)))?;
    if !reply.ok || reply.version != HANDOFF_VERSION {
        return Err(err(
            &format!(
                "refused (handler protocol version {}, ours {HANDOFF_VERSION}): {}",
                reply.version,
                reply.error.unwrap_or_default()
            ),
            None,
        ));
    }
    conn.set_read_timeout(None)
        .map_err(|e| err("socket setup", Some(e)))?;
    Ok(conn)
}
