//! The control API: REST over a Unix socket, usable with `curl --unix-socket`. This is the
//! only place that knows HTTP: it turns requests into the controller's typed [`Command`]s and
//! its [`Response`]s and [`ControlError`]s into status codes and JSON.
//!
//! | request | answer |
//! |---|---|
//! | `GET /vm` | `{"state":"running"\|"paused"\|"stopping","paused_by":[..],"config":{..}}` |
//! | `PUT /vm/pause` | 204 once every vCPU is parked (the operator's pause) |
//! | `PUT /vm/resume` | 204 when the vCPUs run again; 409 if a snapshot or a migration still holds its own pause, or the guest migrated away |
//! | `PUT /vm/stop` | 204; the VM stops and `faultline run` prints its summary |
//! | `GET /vm/stats` | uptime, exits, per-vCPU heartbeats and longest gap |
//! | `PUT /snapshot/create` with `{"snapshot_dir": DIR, "page_checksums": false}` | 200 with what was written, when it is written (pauses, snapshots, resumes unless someone else holds a pause); 409 for a VM with parts a snapshot cannot carry, or while a snapshot or migration runs |
//! | `PUT /migrate` with `{"to": "tcp:HOST:PORT", "mode": "postcopy", "max_bandwidth": 0, "downtime_limit_ms": 300}` | 202; the migration runs in the background (`{"resume": true}` reconnects a post-copy whose link was lost) |
//! | `PUT /drives/{id}` with `{"drive_id": id, "path_on_host": IMG, "is_read_only": false}` | before boot (`--boot-via-api`): 204, a virtio-blk disk (`is_root_device` is accepted and ignored; `"direct": true` bypasses the host's page cache) |
//! | `PUT /network-interfaces/{id}` with `{"iface_id": id, "host_dev_name": TAP, "guest_mac": "06:00:00:00:00:01"}` | before boot: 204, a virtio-net device on the tap |
//! | `PUT /vsock` with `{"guest_cid": 3, "uds_path": SOCK}` | before boot: 204, a virtio-vsock device (Firecracker's hybrid Unix-socket convention) |
//! | `PUT /entropy` with `{}` | before boot: 204, a virtio-rng device |
//! | `PUT /actions` with `{"action_type": "InstanceStart"}` | boots the configured VM: 204, or 400 with why it cannot boot (fix and start again) |
//! | `GET /migrate` | state (`setup`, `precopy`, `switchover`, `postcopy`, `postcopy-paused`, `completed`, `cancelled`, `failed`), progress, error, final statistics |
//!
//! The HTTP is ours ([`wire`]), bounded: one request per connection, read whole within
//! [`REQUEST_DEADLINE`] (else 408), headers at most [`MAX_HEAD`] bytes (else 431), a body at
//! most [`MAX_BODY`] bytes (else 413); at most [`MAX_IN_FLIGHT`] connections at once (else
//! 503), so a client that sends half a request, or nothing, holds one slot for at most the
//! deadline and never holds up the others.
//!
//! Each request is served on a thread of its own and never touches the VM: it hands the
//! command to the VM's controller and waits for the answer (as Firecracker's API thread does),
//! so no request runs on a vCPU thread and a slow one (a snapshot) holds up no other.

pub mod wire;

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::{Value, json};

use crate::config::VirtioSpec;
use crate::controller::{Command, ControlError, ControlHandle, Reply, Response};
use crate::snapshot::SnapshotError;

/// An HTTP status and a JSON body (`Value::Null`: no body).
pub type HttpReply = (u16, Value);

pub use wire::{MAX_BODY, MAX_HEAD, Method, ReadError, WRITE_DEADLINE};

/// Connections served at once (being read or answered); more get 503 at once.
pub const MAX_IN_FLIGHT: usize = 32;
/// How long a client has, from its connection being accepted, to send its whole request;
/// one that has not is answered 408 and closed, freeing its slot.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// How long a closing API server waits for answers being written.
const DRAIN: Duration = Duration::from_secs(2);
/// How long a quick command may take before the API answers 503.
const QUICK: Duration = Duration::from_secs(30);

fn error(code: u16, msg: impl std::fmt::Display) -> HttpReply {
    (code, json!({ "error": msg.to_string() }))
}

fn json_body(body: &str) -> Result<Value, HttpReply> {
    let v: Value =
        serde_json::from_str(body).map_err(|e| error(400, format!("body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(error(400, "the body must be a JSON object"));
    }
    Ok(v)
}

/// The `{id}` of `/drives/{id}`: 1 to 64 characters of `[A-Za-z0-9_-]`.
fn resource_id<'a>(path: &'a str, prefix: &str) -> Result<&'a str, HttpReply> {
    let id = &path[prefix.len()..];
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(error(
            400,
            format!("bad id {id:?}: 1 to 64 letters, digits, '_' or '-'"),
        ));
    }
    Ok(id)
}

/// The body's id field, if present, must name the same resource as the URL.
fn same_id(v: &Value, field: &str, id: &str) -> Result<(), HttpReply> {
    match v.get(field).and_then(Value::as_str) {
        Some(b) if b != id => Err(error(
            400,
            format!("\"{field}\" {b:?} differs from the URL's {id:?}"),
        )),
        _ => Ok(()),
    }
}

/// `aa:bb:cc:dd:ee:ff`.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

/// Parse a request into a command (or the HTTP error that answers it).
pub fn route(method: &Method, url: &str, body: &str) -> Result<Command, HttpReply> {
    use Method::{Get, Put};
    let path = url.split('?').next().unwrap_or("");
    let (want_get, cmd) = match path {
        "/snapshot/create" => {
            let v: Value = serde_json::from_str(body)
                .map_err(|e| error(400, format!("body is not JSON: {e}")))?;
            let Some(dir) = v.get("snapshot_dir").and_then(Value::as_str) else {
                return Err(error(400, "missing \"snapshot_dir\" (a directory path)"));
            };
            (
                false,
                Command::SnapshotCreate {
                    dir: PathBuf::from(dir),
                    page_checksums: v
                        .get("page_checksums")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                },
            )
        }
        "/migrate" if *method == Get => (true, Command::MigrateStatus),
        "/migrate" => {
            let r: crate::migration::MigrateRequest = serde_json::from_str(body)
                .map_err(|e| error(400, format!("bad migration request: {e}")))?;
            if r.to.is_none() && !r.resume {
                return Err(error(400, "missing \"to\" (tcp:HOST:PORT or unix:PATH)"));
            }
            (false, Command::Migrate(r))
        }
        "/migrate/reclaim" => (false, Command::MigrateReclaim),
        "/actions" => {
            let v = json_body(body)?;
            match v.get("action_type").and_then(Value::as_str) {
                Some("InstanceStart") => (false, Command::InstanceStart),
                Some(other) => return Err(error(400, format!("unknown action_type {other:?}"))),
                None => return Err(error(400, "missing \"action_type\" (InstanceStart)")),
            }
        }
        "/vsock" => {
            let v = json_body(body)?;
            let cid = v.get("guest_cid").and_then(Value::as_u64);
            let uds = v.get("uds_path").and_then(Value::as_str);
            let (Some(cid), Some(uds)) = (cid, uds) else {
                return Err(error(400, "need \"guest_cid\" (a number) and \"uds_path\""));
            };
            let spec = VirtioSpec::Vsock {
                cid,
                uds: PathBuf::from(uds),
            };
            (
                false,
                Command::PutDevice {
                    id: "vsock".into(),
                    spec,
                },
            )
        }
        "/entropy" => {
            json_body(body)?;
            (
                false,
                Command::PutDevice {
                    id: "entropy".into(),
                    spec: VirtioSpec::Rng,
                },
            )
        }
        p if p.starts_with("/drives/") => {
            let id = resource_id(p, "/drives/")?;
            let v = json_body(body)?;
            same_id(&v, "drive_id", id)?;
            let Some(path) = v.get("path_on_host").and_then(Value::as_str) else {
                return Err(error(400, "missing \"path_on_host\" (a raw image)"));
            };
            let spec = VirtioSpec::Block {
                path: PathBuf::from(path),
                read_only: v
                    .get("is_read_only")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                direct: v.get("direct").and_then(Value::as_bool).unwrap_or(false),
            };
            (
                false,
                Command::PutDevice {
                    id: id.into(),
                    spec,
                },
            )
        }
        p if p.starts_with("/network-interfaces/") => {
            let id = resource_id(p, "/network-interfaces/")?;
            let v = json_body(body)?;
            same_id(&v, "iface_id", id)?;
            let Some(tap) = v.get("host_dev_name").and_then(Value::as_str) else {
                return Err(error(400, "missing \"host_dev_name\" (a tap interface)"));
            };
            let mac = match v.get("guest_mac").and_then(Value::as_str) {
                Some(m) => Some(parse_mac(m).ok_or_else(|| {
                    error(400, format!("\"guest_mac\" {m:?} is not six hex bytes"))
                })?),
                None => None,
            };
            let spec = VirtioSpec::Net {
                tap: tap.into(),
                mac,
            };
            (
                false,
                Command::PutDevice {
                    id: id.into(),
                    spec,
                },
            )
        }
        "/vm" => (true, Command::GetVm),
        "/vm/stats" => (true, Command::Stats),
        "/vm/pause" => (false, Command::Pause),
        "/vm/resume" => (false, Command::Resume),
        "/vm/stop" => (false, Command::Stop),
        _ => return Err(error(404, format!("no such resource: {path}"))),
    };
    match (want_get, method) {
        (true, Get) | (false, Put) => Ok(cmd),
        _ => Err(error(
            405,
            format!(
                "{method} not allowed on {path}; use {}",
                if want_get { "GET" } else { "PUT" }
            ),
        )),
    }
}

/// The HTTP form of the controller's answer.
pub fn http(reply: Reply) -> HttpReply {
    match reply {
        Ok(Response::Vm(v)) => (200, json!(v)),
        Ok(Response::Done) => (204, Value::Null),
        Ok(Response::Stats(s)) => (200, json!(s)),
        Ok(Response::Snapshot(info)) => (200, json!(info)),
        Ok(Response::MigrationStarted(st)) => (202, st),
        Ok(Response::Migration(st)) => (200, st),
        Err(e) => {
            let code = match &e {
                ControlError::Snapshot(SnapshotError::Uncarried(_)) => 409,
                ControlError::Snapshot(SnapshotError::Finished) => 400,
                ControlError::Snapshot(_) => 500,
                ControlError::Busy(_)
                | ControlError::StillPaused(_)
                | ControlError::HandedOver
                | ControlError::NotResumable(_)
                | ControlError::CannotResumeHere
                | ControlError::MigrationDone
                | ControlError::InDoubt
                | ControlError::NotInDoubt
                | ControlError::Uncarried(_) => 409,
                ControlError::NoMigration => 404,
                ControlError::Finished
                | ControlError::NoDestination
                | ControlError::Security(_) => 400,
                ControlError::Kvm(_) | ControlError::Thread { .. } => 500,
                ControlError::NotStarted => 409,
                ControlError::AfterBoot | ControlError::Boot(_) => 400,
                ControlError::Gone => 503,
            };
            error(code, uffd::error_chain(&e))
        }
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
) -> Result<(u16, String), CallError> {
    use std::io::Write;
    let io = |what: &'static str| move |source| CallError::Io { what, source };
    let mut s =
        std::os::unix::net::UnixStream::connect(sock).map_err(|source| CallError::Connect {
            path: sock.to_path_buf(),
            source,
        })?;
    s.set_read_timeout(Some(timeout))
        .map_err(io("setting the timeout"))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(io("sending the request"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(io("reading the answer"))?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| CallError::NotHttp(resp.chars().take(80).collect()))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// An API call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nobody listens on the socket.
    #[error("cannot connect to the API socket {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Cause (errno kept).
        #[source]
        source: io::Error,
    },
    /// The exchange failed.
    #[error("API {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Cause (errno kept).
        #[source]
        source: io::Error,
    },
    /// The answer is not HTTP.
    #[error("not an HTTP answer: {0}")]
    NotHttp(String),
}

/// The API server thread; removes its socket when dropped.
pub struct ApiServer {
    stop: Arc<AtomicBool>,
    /// Connections being read or answered (each on a thread of its own).
    in_flight: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

/// Read one request from `s` (within [`REQUEST_DEADLINE`]), have it answered, write the
/// answer (within [`wire::WRITE_DEADLINE`]).
fn serve(mut s: UnixStream, to: &ControlHandle) {
    let req = match wire::read_request(&mut s, REQUEST_DEADLINE) {
        Ok(r) => r,
        Err(e) => {
            if let Some(code) = e.status() {
                let (_, body) = error(code, uffd::error_chain(&e));
                let _ = wire::respond(&mut s, code, &body.to_string(), WRITE_DEADLINE);
                wire::close_unread(s, Duration::from_millis(200));
            }
            return;
        }
    };
    let (code, body) = match route(&req.method, &req.url, &req.body) {
        Ok(cmd) => {
            // A snapshot answers when it is written, however long that takes; the controller
            // answers everything else at once.
            let timeout = match cmd {
                Command::SnapshotCreate { .. } => None,
                _ => Some(QUICK),
            };
            http(to.ask(cmd, timeout))
        }
        Err(reply) => reply,
    };
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let _ = wire::respond(&mut s, code, &body, WRITE_DEADLINE);
}

/// Accept connections until `stop`, each served on a thread of its own, at most
/// [`MAX_IN_FLIGHT`] at once (more get 503 at once).
fn accept_loop(
    l: UnixListener,
    to: ControlHandle,
    in_flight: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(SeqCst) {
        let mut p = libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        if unsafe { libc::poll(&mut p, 1, 50) } <= 0 {
            continue;
        }
        let Ok((mut s, _)) = l.accept() else {
            // Out of file descriptors, say: do not spin on a listener that stays readable.
            thread::sleep(Duration::from_millis(50));
            continue;
        };
        if in_flight.fetch_add(1, SeqCst) >= MAX_IN_FLIGHT {
            in_flight.fetch_sub(1, SeqCst);
            let (code, body) = error(503, "too many requests in progress");
            let _ = wire::respond(&mut s, code, &body.to_string(), Duration::from_millis(100));
            // Not longer: this thread accepts for everybody.
            wire::close_unread(s, Duration::from_millis(5));
            continue;
        }
        let (to, n) = (to.clone(), in_flight.clone());
        let spawned = thread::Builder::new()
            .name("api-request".into())
            .spawn(move || {
                serve(s, &to);
                n.fetch_sub(1, SeqCst);
            });
        if spawned.is_err() {
            in_flight.fetch_sub(1, SeqCst);
        }
    }
}

impl ApiServer {
    /// Listen on `path` and forward to `to`. A stale socket there is replaced; any other
    /// file is left alone and refused. The socket is the owner's only (mode 0600): whoever
    /// can open it controls the VM.
    pub fn start(path: &Path, to: ControlHandle) -> io::Result<ApiServer> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // Bound and listening under a temporary name, made 0600, then renamed into place: the
        // path appears only once it accepts connections, and only for our user (a client that
        // waits for the file never finds it refusing, nobody else ever can connect).
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let l = UnixListener::bind(&tmp)?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let in_flight = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, st) = (in_flight.clone(), stop.clone());
        let thread = thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(l, to, n, st))?;
        Ok(ApiServer {
            stop,
            in_flight,
            thread: Some(thread),
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Let answers being written finish (a process that exits right after the controller
        // answered, as a source after its final migration status was read, would cut them
        // off), for at most DRAIN.
        let deadline = std::time::Instant::now() + DRAIN;
        while self.in_flight.load(SeqCst) > 0 && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(2));
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::PauseOwner;
    use Method::{Get, Put};

    #[test]
    fn requests_become_commands_or_http_errors() {
        assert_eq!(route(&Get, "/vm", ""), Ok(Command::GetVm));
        assert_eq!(route(&Put, "/vm/pause?x=1", ""), Ok(Command::Pause));
        assert_eq!(route(&Get, "/migrate", ""), Ok(Command::MigrateStatus));
        assert_eq!(
            route(&Put, "/migrate/reclaim", ""),
            Ok(Command::MigrateReclaim)
        );
        assert_eq!(
            route(&Put, "/snapshot/create", r#"{"snapshot_dir":"/s"}"#),
            Ok(Command::SnapshotCreate {
                dir: "/s".into(),
                page_checksums: false
            })
        );
        let code = |r: Result<Command, HttpReply>| r.err().map(|e| e.0);
        let post = Method::Other("POST".into());
        assert_eq!(code(route(&post, "/vm/pause", "")), Some(405));
        assert_eq!(code(route(&Put, "/vm", "")), Some(405));
        assert_eq!(code(route(&Get, "/nope", "")), Some(404));
        assert_eq!(code(route(&Put, "/snapshot/create", "{")), Some(400));
        assert_eq!(code(route(&Put, "/snapshot/create", "{}")), Some(400));
        assert_eq!(
            code(route(&Put, "/migrate", r#"{"mode":"postcopy"}"#)),
            Some(400)
        );
    }

    #[test]
    fn the_socket_is_private_and_other_files_are_never_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (tx, _rx) = std::sync::mpsc::channel();
        let handle = ControlHandle(tx);
        let file = dir.path().join("precious");
        std::fs::write(&file, b"data").unwrap();
        let e = ApiServer::start(&file, handle.clone())
            .err()
            .expect("a regular file is not replaced");
        assert!(e.to_string().contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
        let sock = dir.path().join("api.sock");
        let s = ApiServer::start(&sock, handle.clone()).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(s);
        // A stale socket left by a dead VMM is replaced.
        let stale = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        drop(stale);
        assert!(ApiServer::start(&sock, handle).is_ok());
    }

    #[test]
    fn answers_get_their_status_codes_here() {
        assert_eq!(http(Ok(Response::Done)), (204, Value::Null));
        let code = |e: ControlError| http(Err(e)).0;
        assert_eq!(
            code(ControlError::StillPaused(vec![PauseOwner::Migration])),
            409
        );
        assert_eq!(code(ControlError::HandedOver), 409);
        assert_eq!(code(ControlError::InDoubt), 409);
        assert_eq!(code(ControlError::Busy("a snapshot")), 409);
        assert_eq!(
            code(ControlError::Snapshot(SnapshotError::Uncarried(vec![
                "a device".into()
            ]))),
            409
        );
        assert_eq!(code(ControlError::Snapshot(SnapshotError::Finished)), 400);
        assert_eq!(code(ControlError::NoMigration), 404);
        assert_eq!(code(ControlError::Gone), 503);
        let (_, body) = http(Err(ControlError::StillPaused(vec![PauseOwner::Migration])));
        assert_eq!(body["error"], "the VM stays paused: held by migration");
    }
}
