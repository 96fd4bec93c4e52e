//! HTTP/1.1 on one API connection, bounded in time and size: one request per connection
//! (`Connection: close`), read whole before it is routed.
//!
//! - The whole request (request line, headers, body) must arrive within
//!   [`REQUEST_DEADLINE`](super::REQUEST_DEADLINE) of the connection being accepted; a client
//!   that sends half of it, or nothing, is answered `408` and closed then.
//! - The request line and headers together are at most [`MAX_HEAD`] bytes (`431` past that);
//!   the body, sized by `Content-Length`, at most [`MAX_BODY`] bytes (`413`). A body in
//!   another framing (`Transfer-Encoding`) is refused with `411`.
//! - The answer must be taken by the client within [`WRITE_DEADLINE`].

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Largest request line plus headers.
pub const MAX_HEAD: usize = 8 << 10;
/// Largest body.
pub const MAX_BODY: usize = 64 << 10;
/// How long a client has to take the answer.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// An HTTP method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// `PUT`.
    Put,
    /// Any other (never routed).
    Other(String),
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Method::Get => f.write_str("GET"),
            Method::Put => f.write_str("PUT"),
            Method::Other(m) => f.write_str(m),
        }
    }
}

/// A request read whole.
#[derive(Debug)]
pub struct Request {
    /// Its method.
    pub method: Method,
    /// Its target (path and query).
    pub url: String,
    /// Its body (UTF-8).
    pub body: String,
}

/// Why no request could be read; each but `Closed` and `Io` is answered with its status.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The deadline passed first.
    #[error("the request did not arrive within {0:?}")]
    Timeout(Duration),
    /// Request line and headers past [`MAX_HEAD`].
    #[error("request line and headers longer than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// A body past [`MAX_BODY`].
    #[error("a body of {0} bytes (at most {MAX_BODY})")]
    BodyTooLarge(u64),
    /// A body framed otherwise than by `Content-Length`.
    #[error("only bodies sized by Content-Length are accepted")]
    LengthRequired,
    /// Not HTTP/1.x.
    #[error("bad request: {0}")]
    Bad(String),
    /// The client closed before the request was whole.
    #[error("the client closed the connection mid-request")]
    Closed,
    /// The socket failed.
    #[error("reading the request")]
    Io(#[source] io::Error),
}

impl ReadError {
    /// The status that answers it (`None`: nobody to answer).
    pub fn status(&self) -> Option<u16> {
        match self {
            ReadError::Timeout(_) => Some(408),
            ReadError::HeadTooLarge => Some(431),
            ReadError::BodyTooLarge(_) => Some(413),
            ReadError::LengthRequired => Some(411),
            ReadError::Bad(_) => Some(400),
            ReadError::Closed | ReadError::Io(_) => None,
        }
    }
}

/// Read more bytes into `buf`, failing at `deadline`.
fn fill(
    s: &mut UnixStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    total: Duration,
) -> Result<(), ReadError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ReadError::Timeout(total));
    }
    s.set_read_timeout(Some(left)).map_err(ReadError::Io)?;
    let mut chunk = [0u8; 4096];
    match s.read(&mut chunk) {
        Ok(0) => Err(ReadError::Closed),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(ReadError::Timeout(total))
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
        Err(e) => Err(ReadError::Io(e)),
    }
}

/// Read one request, whole, within `total` of now.
pub fn read_request(s: &mut UnixStream, total: Duration) -> Result<Request, ReadError> {
    let deadline = Instant::now() + total;
    let mut buf = Vec::new();
    loop {
        if let Some(r) = parse_request(&buf)? {
            return Ok(r);
        }
        fill(s, &mut buf, deadline, total)?;
    }
}

/// Parse a request from the bytes received so far (untrusted): `Ok(None)` while it is not
/// whole yet. Sizes are bounded before use ([`MAX_HEAD`], [`MAX_BODY`]).
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, ReadError> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(ReadError::HeadTooLarge);
        }
        return Ok(None);
    };
    if head_end > MAX_HEAD {
        return Err(ReadError::HeadTooLarge);
    }
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| ReadError::Bad("headers are not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(url), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ReadError::Bad(format!("request line {line:?}")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ReadError::Bad(format!("version {version:?}")));
    }
    let mut len: u64 = 0;
    for h in lines {
        let Some((name, value)) = h.split_once(':') else {
            return Err(ReadError::Bad(format!("header line {h:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            len = value
                .parse()
                .map_err(|_| ReadError::Bad(format!("Content-Length {value:?}")))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ReadError::LengthRequired);
        }
    }
    if len > MAX_BODY as u64 {
        return Err(ReadError::BodyTooLarge(len));
    }
    let start = head_end + 4;
    let want = start + len as usize;
    if buf.len() < want {
        return Ok(None);
    }
    let body = String::from_utf8(buf[start..want].to_vec())
        .map_err(|_| ReadError::Bad("the body is not UTF-8".into()))?;
    let method = match method {
        "GET" => Method::Get,
        "PUT" => Method::Put,
        m => Method::Other(m.to_string()),
    };
    Ok(Some(Request {
        method,
        url: url.to_string(),
        body,
    }))
}

/// Close after an answer to a request not read whole: take what the client already sent
/// (at most `MAX_HEAD + MAX_BODY` bytes, for at most `linger`), because closing a Unix socket
/// with unread data resets the connection and the client could lose the answer.
pub fn close_unread(mut s: UnixStream, linger: Duration) {
    let _ = s.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + linger;
    let mut chunk = [0u8; 4096];
    let mut taken = 0;
    while taken < MAX_HEAD + MAX_BODY {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => taken += n,
        }
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Write an answer (a JSON body unless `body` is empty), within `deadline` (for a request
/// served: [`WRITE_DEADLINE`]).
pub fn respond(s: &mut UnixStream, code: u16, body: &str, deadline: Duration) -> io::Result<()> {
    s.set_write_timeout(Some(deadline))?;
    let ctype = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    let msg = format!(
        "HTTP/1.1 {code} {}\r\nContent-Length: {}\r\n{ctype}Connection: close\r\n\r\n{body}",
        reason(code),
        body.len()
    );
    s.write_all(msg.as_bytes())?;
    s.flush()
}
