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
