//! The control API: REST over a Unix socket, usable with `curl --unix-socket`.
//!
//! | request | answer |
//! |---|---|
//! | `GET /vm` | `{"state":"running"\|"paused","config":{..}}` |
//! | `PUT /vm/pause` | 204 once every vCPU is parked |
//! | `PUT /vm/resume` | 204 |
//! | `PUT /vm/stop` | 204; the VM stops and `faultline run` prints its summary |
//! | `GET /vm/stats` | uptime, exits, per-vCPU heartbeats and longest gap |
//! | `PUT /snapshot/create` with `{"snapshot_dir": DIR, "page_checksums": false}` | 200 with what was written (pauses, snapshots, resumes unless it was paused) |
//! | `PUT /migrate` with `{"to": "tcp:HOST:PORT", "mode": "postcopy", "max_bandwidth": 0, "downtime_limit_ms": 300}` | 202; the migration runs in the background (`{"resume": true}` reconnects a post-copy whose link was lost) |
//! | `GET /migrate` | state (`setup`, `precopy`, `switchover`, `postcopy`, `postcopy-paused`, `completed`, `cancelled`, `failed`), progress, error, final statistics |
//!
//! The HTTP server runs on its own thread and never touches the VM: it hands each request to
//! the VM's controller over a channel and waits for the answer (as Firecracker's API thread
//! does), so no request ever runs on a vCPU thread.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Sender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::{Value, json};

/// A request the controller answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `PUT /snapshot/create`.
    SnapshotCreate {
        /// Where to write it.
        dir: PathBuf,
        /// Record a CRC per page as well.
        page_checksums: bool,
    },
    /// `GET /vm`.
    GetVm,
    /// `PUT /vm/pause`.
    Pause,
    /// `PUT /vm/resume`.
    Resume,
    /// `PUT /vm/stop`.
    Stop,
    /// `GET /vm/stats`.
    Stats,
    /// `PUT /migrate`: start a migration, or resume one whose link was lost.
    Migrate(crate::migration::MigrateRequest),
    /// `GET /migrate`: the migration's state, progress and statistics.
    MigrateStatus,
}

/// The controller's answer: an HTTP status and a JSON body (`Value::Null`: no body).
pub type ApiReply = (u16, Value);

/// Sends requests to a VM's controller.
#[derive(Clone)]
pub struct ApiSender(pub(crate) Sender<crate::vm::Msg>);

impl ApiSender {
    /// Ask the controller; `None` if it is gone or does not answer within `timeout`.
    pub fn ask(&self, req: ApiRequest, timeout: Duration) -> Option<ApiReply> {
        let (tx, rx) = mpsc::channel();
        self.0.send(crate::vm::Msg::Api(req, tx)).ok()?;
        rx.recv_timeout(timeout).ok()
    }
}

fn route(method: &tiny_http::Method, url: &str, body: &str) -> Result<ApiRequest, ApiReply> {
    use tiny_http::Method::{Get, Put};
    let path = url.split('?').next().unwrap_or("");
    let (want_get, req) = match path {
        "/snapshot/create" => {
            let v: Value = serde_json::from_str(body)
                .map_err(|e| (400, json!({ "error": format!("body is not JSON: {e}") })))?;
            let Some(dir) = v.get("snapshot_dir").and_then(Value::as_str) else {
                return Err((
                    400,
                    json!({ "error": "missing \"snapshot_dir\" (a directory path)" }),
                ));
            };
            (
                false,
                ApiRequest::SnapshotCreate {
                    dir: PathBuf::from(dir),
                    page_checksums: v
                        .get("page_checksums")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                },
            )
        }
        "/migrate" if *method == Get => (true, ApiRequest::MigrateStatus),
        "/migrate" => {
            let r: crate::migration::MigrateRequest = serde_json::from_str(body).map_err(|e| {
                (
                    400,
                    json!({ "error": format!("bad migration request: {e}") }),
                )
            })?;
            if r.to.is_none() && !r.resume {
                return Err((
                    400,
                    json!({ "error": "missing \"to\" (tcp:HOST:PORT or unix:PATH)" }),
                ));
            }
            (false, ApiRequest::Migrate(r))
        }
        "/vm" => (true, ApiRequest::GetVm),
        "/vm/stats" => (true, ApiRequest::Stats),
        "/vm/pause" => (false, ApiRequest::Pause),
        "/vm/resume" => (false, ApiRequest::Resume),
        "/vm/stop" => (false, ApiRequest::Stop),
        _ => return Err((404, json!({ "error": format!("no such resource: {path}") }))),
    };
    match (want_get, method) {
        (true, Get) | (false, Put) => Ok(req),
        _ => Err((
            405,
            json!({ "error": format!("{method} not allowed on {path}; use {}", if want_get { "GET" } else { "PUT" }) }),
        )),
    }
}

/// A minimal HTTP/1.1 client over a Unix socket (for `faultline snapshot`, `faultline migrate`
/// and the benchmarks): one request, `Connection: close`, the status code and body back.
pub fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .map_err(|e| format!("cannot connect to the API socket {}: {e}", sock.display()))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("API request: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| format!("API answer: {e}"))?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {resp:.80}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The API server thread; removes its socket when dropped.
pub struct ApiServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl ApiServer {
    /// Listen on `path` (an existing socket file there is replaced) and forward to `to`.
    pub fn start(path: &Path, to: ApiSender) -> io::Result<ApiServer> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let server = Arc::new(
            tiny_http::Server::http_unix(path).map_err(|e| io::Error::other(e.to_string()))?,
        );
        let s = server.clone();
        let thread = thread::Builder::new().name("api".into()).spawn(move || {
            for mut req in s.incoming_requests() {
                let mut body = String::new();
                let _ = std::io::Read::take(req.as_reader(), 1 << 16).read_to_string(&mut body);
                let (code, body) = match route(req.method(), req.url(), &body) {
                    Ok(r) => to.ask(r, Duration::from_secs(30)).unwrap_or((
                        503,
                        json!({ "error": "the VM is not answering (stopped?)" }),
                    )),
                    Err(reply) => reply,
                };
                let resp = if body.is_null() {
                    tiny_http::Response::from_string("").with_status_code(code)
                } else {
                    tiny_http::Response::from_string(body.to_string())
                        .with_status_code(code)
                        .with_header(
                            "Content-Type: application/json"
                                .parse::<tiny_http::Header>()
                                .expect("static header parses"),
                        )
                };
                let _ = req.respond(resp);
            }
        })?;
        Ok(ApiServer {
            server,
            thread: Some(thread),
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
