//! The handshake of protocol version 1: the hello on each connection, its answer, and the
//! connection pair (main, priority) both sides set up.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::tls::{Security, TlsError};
use crate::wire::{Endpoint, Keepalive, Kind, Listener, RecvError, Sock, link_deadline};

/// The protocol's name, in every hello.
pub const PROTOCOL: &str = "faultline-migrate";
/// The protocol version. This crate speaks version 1 unchanged, so old and new peers migrate
/// between each other; keepalives ([`Kind::Keepalive`]) are an addition negotiated in the
/// hello and its answer (`keepalive_ms`), sent only to a peer that announced them.
pub const VERSION: u32 = 1;
/// Kernel socket buffer of the main connection (each side), bytes: the background stream
/// then has little in flight, so a page the pusher has claimed arrives soon after it is asked.
pub const MAIN_BUFFER: usize = 128 << 10;

/// How memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationMode {
    /// Iterative pre-copy, then stop-and-copy.
    Precopy,
    /// State first, memory on demand and in the background.
    Postcopy,
    /// Pre-copy rounds, then post-copy.
    Hybrid,
}

impl MigrationMode {
    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Precopy => "precopy",
            Self::Postcopy => "postcopy",
            Self::Hybrid => "hybrid",
        }
    }
}

impl std::str::FromStr for MigrationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "precopy" => Ok(Self::Precopy),
            "postcopy" => Ok(Self::Postcopy),
            "hybrid" => Ok(Self::Hybrid),
            _ => Err(format!(
                "unknown migration mode '{s}' (precopy, postcopy, hybrid)"
            )),
        }
    }
}

/// Which connection of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// Hello, background pages, state, control.
    Main,
    /// Requests and their answers.
    Priority,
}

/// The first frame on each connection (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL`].
    pub protocol: String,
    /// [`VERSION`].
    pub version: u32,
    /// This migration's id (the priority connection and recoveries name it).
    pub id: u64,
    /// Which connection this is.
    pub channel: Channel,
    /// A recovery of a post-copy migration.
    #[serde(default)]
    pub resume: bool,
    /// The mode.
    pub mode: MigrationMode,
    /// What is migrated (a VM's configuration; main channel of a new migration), as the
    /// embedding program defines it.
    #[serde(default)]
    pub config: Option<Value>,
    /// Whether the VM has the in-kernel irqchip.
    #[serde(default)]
    pub irqchip: bool,
    /// The sender understands keepalives and counts the link lost after this many ms of
    /// silence on a connection (0 or absent: an older peer, which gets no keepalives).
    #[serde(default)]
    pub keepalive_ms: u64,
    /// The sender checks and sends CRC32C frame trailers ([`crate::wire::FLAG_CRC`]); both
    /// sides must say so for them to be used (absent in an older peer's hello).
    #[serde(default)]
    pub crc32c: bool,
}

/// The environment variable that makes a source not offer CRC32C trailers (tests: a link
/// whose damage only the memory digest can catch).
pub const NO_CRC_ENV: &str = "FAULTLINE_TEST_NO_CRC";

impl Hello {
    /// A hello of this protocol for the main channel.
    pub fn new(id: u64, mode: MigrationMode, resume: bool, config: Option<Value>) -> Hello {
        Hello {
            protocol: PROTOCOL.into(),
            version: VERSION,
            id,
            channel: Channel::Main,
            resume,
            mode,
            config,
            irqchip: false,
            keepalive_ms: link_deadline().as_millis() as u64,
            crc32c: std::env::var_os(NO_CRC_ENV).is_none(),
        }
    }
}

/// The destination's answer (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelloAck {
    /// The destination's protocol version.
    pub version: u32,
    /// Whether it accepts.
    pub ok: bool,
    /// Why not.
    #[serde(default)]
    pub error: Option<String>,
    /// The destination runs `verify` and wants the source's checksums at switchover.
    #[serde(default)]
    pub want_checksums: bool,
    /// As [`Hello::keepalive_ms`]: set only when the hello announced keepalives too.
    #[serde(default)]
    pub keepalive_ms: u64,
    /// CRC32C trailers are used on this connection pair: set only when the hello offered
    /// them.
    #[serde(default)]
    pub crc32c: bool,
}

impl HelloAck {
    /// The keepalives this answer agrees on, with our own deadline.
    pub fn keepalive(&self) -> Option<Keepalive> {
        Keepalive::negotiate(link_deadline(), self.keepalive_ms)
    }
}

impl Hello {
    /// The keepalives an answer to this hello agrees on, with our own deadline.
    pub fn keepalive(&self) -> Option<Keepalive> {
        Keepalive::negotiate(link_deadline(), self.keepalive_ms)
    }
}

/// The handshake failed.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// Connecting failed.
    #[error("connecting to {endpoint}")]
    Connect {
        /// Where.
        endpoint: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Accepting failed.
    #[error("accepting a connection")]
    Accept(#[source] std::io::Error),
    /// TLS refused the peer, or its handshake failed.
    #[error("securing the connection")]
    Tls(#[source] crate::tls::TlsError),
    /// Nobody connected in time.
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    /// Sending a frame failed.
    #[error("sending the {0:?} frame")]
    Send(Kind, #[source] std::io::Error),
    /// Receiving a frame failed.
    #[error("receiving the handshake")]
    Recv(#[source] RecvError),
    /// Another frame came.
    #[error("expected a {want:?} frame, got {got:?}")]
    Unexpected {
        /// The kind expected.
        want: Kind,
        /// The kind that came.
        got: Kind,
    },
    /// The JSON did not parse.
    #[error("malformed {0:?} frame")]
    Malformed(Kind, #[source] serde_json::Error),
    /// Not our protocol or version.
    #[error("protocol {protocol} version {version} is not ours ({PROTOCOL} version {VERSION})")]
    Version {
        /// Their protocol name.
        protocol: String,
        /// Their version.
        version: u32,
    },
    /// The peer refused.
    #[error("the destination refused: {0}")]
    Refused(String),
    /// The second connection is not this migration's priority channel.
    #[error("the second connection is not this migration's priority channel")]
    NotPriority,
    /// A socket option could not be set.
    #[error("socket setup")]
    Setup(#[source] std::io::Error),
}

fn recv_json<T: for<'de> Deserialize<'de>>(s: &mut Sock, want: Kind) -> Result<T, HandshakeError> {
    let mut buf = Vec::new();
    let h = s.recv(&mut buf).map_err(HandshakeError::Recv)?;
    if h.kind != want {
        return Err(HandshakeError::Unexpected { want, got: h.kind });
    }
    serde_json::from_slice(&buf).map_err(|e| HandshakeError::Malformed(want, e))
}

/// Source side: secure a connection just made to `ep` (TLS needs TCP).
pub fn secure_client(s: Sock, sec: &Security, ep: &Endpoint) -> Result<Sock, TlsError> {
    match (sec, s, ep) {
        (Security::Plain, s, _) => Ok(s),
        (Security::Tls(t), Sock::Tcp(tcp), Endpoint::Tcp(addr)) => {
            t.client(tcp, addr).map(Sock::Tls)
        }
        _ => Err(TlsError::NotTcp(ep.to_string())),
    }
}

/// Destination side: secure a connection just accepted (TLS needs TCP).
pub fn secure_server(s: Sock, sec: &Security) -> Result<Sock, TlsError> {
    match (sec, s) {
        (Security::Plain, s) => Ok(s),
        (Security::Tls(t), Sock::Tcp(tcp)) => t.server(tcp).map(Sock::Tls),
        _ => Err(TlsError::NotTcp("a Unix socket".into())),
    }
}

/// In TLS 1.3 a destination refuses our certificate only after our side finished: reading
/// its answer then fails with the alert, which is named as TLS's refusal.
fn tls_refusal(e: HandshakeError) -> HandshakeError {
    match e {
        HandshakeError::Recv(RecvError::Io(io))
            if io.get_ref().is_some_and(|i| i.is::<crate::tls::TlsError>()) =>
        {
            match io
                .into_inner()
                .map(|b| b.downcast::<crate::tls::TlsError>())
            {
                Some(Ok(t)) => HandshakeError::Tls(*t),
                _ => HandshakeError::Setup(std::io::Error::other("TLS")),
            }
        }
        e => e,
    }
}

/// Source: connect to `ep`, send `h`, and wait (at most `timeout`) for an accepting answer.
pub fn hello(
    ep: &Endpoint,
    sec: &Security,
    h: &Hello,
    timeout: Duration,
) -> Result<(Sock, HelloAck), HandshakeError> {
    let s = ep
        .connect(Duration::from_secs(10))
        .map_err(|source| HandshakeError::Connect {
            endpoint: ep.to_string(),
            source,
        })?;
    let mut s = secure_client(s, sec, ep).map_err(HandshakeError::Tls)?;
    s.set_read_timeout(Some(timeout))
        .map_err(HandshakeError::Setup)?;
    s.send_json(Kind::Hello, h)
        .map_err(|e| HandshakeError::Send(Kind::Hello, e))?;
    let ack: HelloAck = recv_json(&mut s, Kind::HelloAck).map_err(tls_refusal)?;
    if !ack.ok || ack.version != VERSION {
        return Err(HandshakeError::Refused(format!(
            "its protocol version {}, ours {VERSION}: {}",
            ack.version,
            ack.error.clone().unwrap_or_default()
        )));
    }
    s.set_read_timeout(None).map_err(HandshakeError::Setup)?;
    Ok((s, ack))
}

/// Source: open the main connection with `h`, then the priority connection.
pub fn connect_pair(
    ep: &Endpoint,
    sec: &Security,
    h: &Hello,
    timeout: Duration,
) -> Result<(Sock, Sock, HelloAck), HandshakeError> {
    let (main, ack) = hello(ep, sec, h, timeout)?;
    main.set_buffers(MAIN_BUFFER);
    let mut p = h.clone();
    p.channel = Channel::Priority;
    p.config = None;
    let (prio, _) = hello(ep, sec, &p, timeout)?;
    Ok((main, prio, ack))
}

/// Destination: read the hello on a new connection and check protocol and version.
pub fn read_hello(s: &mut Sock) -> Result<Hello, HandshakeError> {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(HandshakeError::Setup)?;
    let h: Hello = recv_json(s, Kind::Hello)?;
    if h.protocol != PROTOCOL || h.version != VERSION {
        return Err(HandshakeError::Version {
            protocol: h.protocol,
            version: h.version,
        });
    }
    Ok(h)
}

/// Destination: answer a hello (`Err`: refuse, with the reason). No keepalives are
/// offered: answer with [`ack_hello`] for that.
pub fn ack(s: &mut Sock, r: Result<bool, String>) -> Result<(), HandshakeError> {
    send_ack(s, r, false, false)
}

/// Destination: answer hello `h` (`Err`: refuse), agreeing to keepalives and CRC32C
/// trailers if `h` offered them.
pub fn ack_hello(s: &mut Sock, h: &Hello, r: Result<bool, String>) -> Result<(), HandshakeError> {
    send_ack(s, r, h.keepalive_ms > 0, h.crc32c)
}

fn send_ack(
    s: &mut Sock,
    r: Result<bool, String>,
    keepalive: bool,
    crc32c: bool,
) -> Result<(), HandshakeError> {
    let keepalive_ms = if keepalive {
        link_deadline().as_millis() as u64
    } else {
        0
    };
    let a = match r {
        Ok(want_checksums) => HelloAck {
            version: VERSION,
            ok: true,
            error: None,
            want_checksums,
            keepalive_ms,
            crc32c,
        },
        Err(e) => HelloAck {
            version: VERSION,
            ok: false,
            error: Some(e),
            want_checksums: false,
            keepalive_ms: 0,
            crc32c: false,
        },
    };
    s.send_json(Kind::HelloAck, &a)
        .map_err(|e| HandshakeError::Send(Kind::HelloAck, e))
}

/// Accept a connection and secure it, within `timeout`. A peer TLS refuses (no credentials,
/// a wrong certificate, a stalled handshake) is dropped and the wait goes on, so whoever
/// connects first cannot deny the real source; if nobody else came, the last refusal is the
/// error.
pub fn accept_secure(
    l: &Listener,
    sec: &Security,
    timeout: Duration,
) -> Result<Sock, HandshakeError> {
    let deadline = std::time::Instant::now() + timeout;
    let mut refused = None;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Some(s) = l.accept(left).map_err(HandshakeError::Accept)? else {
            return Err(refused.map_or(HandshakeError::Timeout(timeout), HandshakeError::Tls));
        };
        match secure_server(s, sec) {
            Ok(s) => return Ok(s),
            Err(e) => refused = Some(e),
        }
    }
}

/// Destination: accept the main connection (its hello checked by `check`, which accepts with
/// `Ok(want_checksums)` or refuses), then the priority connection of the same migration.
pub fn accept_pair(
    l: &Listener,
    sec: &Security,
    timeout: Duration,
    check: impl FnOnce(&Hello) -> Result<bool, String>,
) -> Result<(Sock, Sock, Hello), HandshakeError> {
    let mut main = accept_secure(l, sec, timeout)?;
    let h = match read_hello(&mut main) {
        Ok(h) => h,
        Err(e) => {
            let _ = ack(&mut main, Err(uffd::error_chain(&e)));
            return Err(e);
        }
    };
    let want = match check(&h) {
        Ok(w) => w,
        Err(e) => {
            let _ = ack(&mut main, Err(e.clone()));
            return Err(HandshakeError::Refused(e));
        }
    };
    ack_hello(&mut main, &h, Ok(want))?;
    main.set_buffers(MAIN_BUFFER);
    let wait = Duration::from_secs(10);
    let mut prio = accept_secure(l, sec, wait)?;
    let p = read_hello(&mut prio)?;
    if p.channel != Channel::Priority || p.id != h.id {
        let _ = ack(
            &mut prio,
            Err("not this migration's priority channel".into()),
        );
        return Err(HandshakeError::NotPriority);
    }
    ack_hello(&mut prio, &p, Ok(want))?;
    for s in [&main, &prio] {
        s.set_read_timeout(None).map_err(HandshakeError::Setup)?;
    }
    Ok((main, prio, h))
}
