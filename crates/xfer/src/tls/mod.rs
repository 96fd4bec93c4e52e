//! Who may migrate to us, and who we migrate to: TLS 1.3 on TCP (rustls), in one of two
//! modes, and the rule that plain TCP needs an explicit `insecure`.
//!
//! - **X.509**, as QEMU's `tls-creds-x509`: each side presents a certificate and key (PEM) and
//!   verifies the peer's chain against a CA bundle; an allow-list of names (`allow`) narrows
//!   who is accepted: the peer's certificate must be valid for one of the names (its
//!   subjectAltName). Without an allow-list the source checks the destination against the
//!   endpoint's host, and the destination accepts any client certificate the CA signed.
//! - **Pre-shared key** for simple setups: both sides hold the same secret file (at least 32
//!   bytes: `head -c 32 /dev/urandom > psk`). rustls has no TLS 1.3 external-PSK mode, so the
//!   key is turned into an Ed25519 key pair (HKDF-SHA256 of the secret, domain-separated) and a
//!   fixed self-signed certificate; each side presents it and accepts exactly that certificate
//!   from the peer, whose handshake signature proves it holds the same key. The secret never
//!   crosses the wire. (A low-entropy secret could be guessed offline from the public key, so
//!   shorter files are refused.)
//! - **Unix sockets** are protected by file permission: the listening socket is created with
//!   mode 0600 (`wire::Endpoint::listen`); TLS is optional there.
//! - **Plain TCP** only with `insecure` set: [`Security::choose`] refuses it otherwise.
//!
//! # Records, and threads
//! rustls runs the handshake and then hands the traffic keys over (its kernel-TLS entry point,
//! `dangerous_extract_secrets`); the records themselves are sealed and opened in place by
//! `record` (this kernel has no kernel TLS, `TCP_ULP "tls"`, to take them, and rustls's
//! buffered connection copies a bulk transfer twice more each way). The engines read and write
//! one connection from separate threads (pages one way, requests the other) through clones of
//! a [`Sock`]: the reader and the writer of a [`TlsStream`] each have their own key and
//! buffer, so neither waits for the other; a reader waits for data with `poll` first. The
//! wire is unchanged TLS 1.3 (tested against rustls's own record layer); key updates are not
//! taken, and a connection ends after [`MAX_RECORDS`] records each way.

use std::io::{self, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::danger::ClientCertVerifier;
use thiserror::Error;

mod record;
mod stream;
mod verify;

pub use record::{MAX_RECORDS, crypto_cost};
pub use stream::TlsStream;
use stream::handshake;
use verify::{AllowClient, AllowServer, Pinned};

/// The smallest pre-shared key accepted, bytes.
pub const MIN_PSK: usize = 32;
/// The largest key file read, bytes.
const MAX_PSK: u64 = 4096;
/// The name the pre-shared-key certificate carries.
const PSK_NAME: &str = "faultline-psk";
/// A TLS handshake must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The credentials a migration uses (in `PUT /migrate` and on the command line).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Credentials {
    /// X.509: our certificate chain and key, the CA bundle that signs peers, and an optional
    /// allow-list of peer names.
    X509 {
        /// Our certificate chain (PEM).
        cert: PathBuf,
        /// Our private key (PEM, PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
        /// CA certificates the peer's chain must end in (PEM).
        ca: PathBuf,
        /// Names (subjectAltName) of which the peer's certificate must carry one; empty: any
        /// (the destination's host for the source).
        #[serde(default)]
        allow: Vec<String>,
    },
    /// A secret file both sides hold (at least [`MIN_PSK`] bytes).
    Psk {
        /// The file.
        key_file: PathBuf,
    },
}

/// Setting up or running TLS failed.
#[derive(Debug, Error)]
pub enum TlsError {
    /// Plain TCP without `insecure`.
    #[error(
        "refusing plain TCP to/from {0}: give TLS credentials (--tls-psk FILE, or --tls-cert, --tls-key and --tls-ca) or --insecure"
    )]
    PlainTcp(String),
    /// A credentials file could not be read.
    #[error("reading {what} {path}")]
    Read {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The cause (errno kept).
        #[source]
        source: io::Error,
    },
    /// A credentials file holds nothing usable.
    #[error("{path}: {why}")]
    Content {
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// rustls refused the configuration or the handshake.
    #[error("TLS")]
    Rustls(#[source] rustls::Error),
    /// Building the pre-shared-key certificate failed.
    #[error("deriving the pre-shared-key certificate")]
    Rcgen(#[source] rcgen::Error),
    /// A verifier could not be built from the CA bundle.
    #[error("the CA bundle {path}")]
    Verifier {
        /// The bundle.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// The endpoint's host is no name a certificate can carry.
    #[error("{0}: not a host name or address for TLS")]
    ServerName(String),
    /// The handshake's I/O failed or timed out.
    #[error("TLS handshake with {peer}")]
    Handshake {
        /// The peer.
        peer: String,
        /// The cause (errno kept; a timeout is `WouldBlock`/`TimedOut`).
        #[source]
        source: io::Error,
    },
    /// TLS needs a TCP connection here.
    #[error("TLS runs over TCP; {0} is a Unix socket, protected by its file mode (0600)")]
    NotTcp(String),
    /// TLS closed the connection after the handshake: the peer sent an alert (in TLS 1.3 a
    /// server refuses a client's certificate only after the client finished), or a record
    /// failed to open.
    #[error("TLS closed the connection: {0}")]
    Closed(String),
}

/// The security of a migration's connections.
#[derive(Clone)]
pub enum Security {
    /// No TLS: a Unix socket (file permissions), or TCP the operator declared insecure.
    Plain,
    /// TLS 1.3.
    Tls(Arc<Tls>),
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Security::Plain => f.write_str("Plain"),
            Security::Tls(t) => write!(f, "Tls({})", t.mode),
        }
    }
}

/// Both ends' rustls configurations, built once from [`Credentials`].
pub struct Tls {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    /// The name the source asks for: the pre-shared-key name, or `None` (the endpoint's host,
    /// or the first allowed name).
    fixed_name: Option<String>,
    allow: Vec<String>,
    mode: &'static str,
}

impl Security {
    /// The security for a connection over TCP (`tcp`) or a Unix socket, `what` naming it:
    /// TLS with `creds`; without, a Unix socket is plain (file permissions) and TCP is
    /// refused unless `insecure`. (`xfer::wire::Endpoint::security` calls this.)
    pub fn choose(
        tcp: bool,
        what: &str,
        creds: Option<&Credentials>,
        insecure: bool,
    ) -> Result<Security, TlsError> {
        match (creds, tcp) {
            (Some(_), false) => Err(TlsError::NotTcp(what.into())),
            (Some(c), true) => Ok(Security::Tls(Arc::new(Tls::new(c)?))),
            (None, false) => Ok(Security::Plain),
            (None, true) if insecure => Ok(Security::Plain),
            (None, true) => Err(TlsError::PlainTcp(what.into())),
        }
    }

    /// Whether this is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Security::Tls(_))
    }
}

/// ring's provider, AES-128-GCM first (the cheapest suite with AES-NI; the peer's choice
/// is still one of the three TLS 1.3 suites).
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

fn read_bounded(what: &'static str, path: &Path, max: u64) -> Result<Vec<u8>, TlsError> {
    let err = |source| TlsError::Read {
        what,
        path: path.into(),
        source,
    };
    let f = std::fs::File::open(path).map_err(err)?;
    let mut v = Vec::new();
    f.take(max + 1).read_to_end(&mut v).map_err(err)?;
    if v.len() as u64 > max {
        return Err(TlsError::Content {
            path: path.into(),
            why: format!("{what} longer than {max} bytes"),
        });
    }
    Ok(v)
}

fn pem_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let bytes = read_bounded(what, path, 1 << 20)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Content {
            path: path.into(),
            why: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Content {
            path: path.into(),
            why: format!("no certificate in this {what}"),
        });
    }
    Ok(certs)
}

fn pem_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let bytes = read_bounded("key", path, 1 << 20)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Content {
        path: path.into(),
        why: format!("no usable private key: {e}"),
    })
}

/// The PKCS#8 (RFC 8410) encoding of an Ed25519 private key from its 32-byte seed.
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    let mut v = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    v.extend_from_slice(seed);
    v
}

/// The certificate and key both sides derive from a pre-shared secret.
fn psk_identity(
    secret: &[u8],
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
    struct Len32;
    impl ring::hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let prk =
        ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"faultline-migrate-psk-v1").extract(secret);
    let mut seed = [0u8; 32];
    prk.expand(&[b"ed25519 identity"], Len32)
        .and_then(|okm| okm.fill(&mut seed))
        .map_err(|_| TlsError::Rustls(rustls::Error::General("HKDF".into())))?;
    let pkcs8 = ed25519_pkcs8(&seed);
    let kp = rcgen::KeyPair::try_from(pkcs8.as_slice()).map_err(TlsError::Rcgen)?;
    let mut p =
        rcgen::CertificateParams::new(vec![PSK_NAME.to_string()]).map_err(TlsError::Rcgen)?;
    // Everything fixed, so both sides derive the same bytes (Ed25519 signs deterministically).
    p.serial_number = Some(rcgen::SerialNumber::from(vec![1]));
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, PSK_NAME);
    p.not_before = rcgen::date_time_ymd(2000, 1, 1);
    p.not_after = rcgen::date_time_ymd(9999, 12, 31);
    let cert = p.self_signed(&kp).map_err(TlsError::Rcgen)?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(pkcs8.into())))
}

fn tls_err(e: rustls::Error) -> TlsError {
    TlsError::Rustls(e)
}

impl Tls {
    /// Build both ends' configurations from `c` (files are read now).
    pub fn new(c: &Credentials) -> Result<Tls, TlsError> {
        let prov = provider();
        let algs = prov.signature_verification_algorithms;
        let (certs, key, server_v, client_v, fixed_name, allow, mode): (
            _,
            _,
            Arc<dyn ServerCertVerifier>,
            Arc<dyn ClientCertVerifier>,
            _,
            _,
            _,
        ) = match c {
            Credentials::Psk { key_file } => {
                let secret = read_bounded("pre-shared key", key_file, MAX_PSK)?;
                // A text key (hex, base64) may end with a newline; binary keys are used whole.
                let trimmed = if secret
                    .iter()
                    .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
                {
                    secret.trim_ascii()
                } else {
                    &secret[..]
                };
                if trimmed.len() < MIN_PSK {
                    return Err(TlsError::Content {
                        path: key_file.clone(),
                        why: format!(
                            "a pre-shared key of {} bytes; at least {MIN_PSK} needed (head -c 32 /dev/urandom > FILE)",
                            trimmed.len()
                        ),
                    });
                }
                let (cert, key) = psk_identity(trimmed)?;
                let pin = Arc::new(Pinned {
                    cert: cert.clone(),
                    algs,
                });
                (
                    vec![cert],
                    key,
                    pin.clone() as _,
                    pin as _,
                    Some(PSK_NAME.to_string()),
                    Vec::new(),
                    "psk",
                )
            }
            Credentials::X509 {
                cert,
                key,
                ca,
                allow,
            } => {
                let chain = pem_certs("certificate", cert)?;
                let key = pem_key(key)?;
                let mut roots = rustls::RootCertStore::empty();
                for c in pem_certs("CA bundle", ca)? {
                    roots.add(c).map_err(|e| TlsError::Content {
                        path: ca.clone(),
                        why: format!("a CA certificate rustls refuses: {e}"),
                    })?;
                }
                let roots = Arc::new(roots);
                let verifier_err = |source| TlsError::Verifier {
                    path: ca.clone(),
                    source,
                };
                let sv = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots.clone(),
                    prov.clone(),
                )
                .build()
                .map_err(verifier_err)?;
                let cv = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots,
                    prov.clone(),
                )
                .build()
                .map_err(verifier_err)?;
                (
                    chain,
                    key,
                    Arc::new(AllowServer {
                        inner: sv,
                        allow: allow.clone(),
                    }) as _,
                    Arc::new(AllowClient {
                        inner: cv,
                        allow: allow.clone(),
                    }) as _,
                    None,
                    allow.clone(),
                    "x509",
                )
            }
        };
        let mut client = rustls::ClientConfig::builder_with_provider(prov.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .dangerous()
            .with_custom_certificate_verifier(server_v)
            .with_client_auth_cert(certs.clone(), key.clone_key())
            .map_err(tls_err)?;
        // The records are ours once the handshake is over (`record`).
        client.enable_secret_extraction = true;
        let mut server = rustls::ServerConfig::builder_with_provider(prov)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(client_v)
            .with_single_cert(certs, key)
            .map_err(tls_err)?;
        // No tickets: nothing but application data follows the handshake.
        server.send_tls13_tickets = 0;
        server.enable_secret_extraction = true;
        Ok(Tls {
            client: Arc::new(client),
            server: Arc::new(server),
            fixed_name,
            allow,
            mode,
        })
    }

    /// Source side: secure a TCP connection just made to `addr` (`HOST:PORT`; the host is
    /// the name checked when no allow-list names the destination).
    pub fn client(&self, tcp: TcpStream, addr: &str) -> Result<TlsStream, TlsError> {
        let name = match (&self.fixed_name, self.allow.first()) {
            (Some(n), _) | (None, Some(n)) => n.clone(),
            (None, None) => addr
                .rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
                .unwrap_or_default(),
        };
        let sn = ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName(name))?;
        let conn = rustls::ClientConnection::new(self.client.clone(), sn).map_err(tls_err)?;
        handshake(tcp, rustls::Connection::Client(conn), addr.to_string())
    }

    /// Destination side: secure a TCP connection just accepted.
    pub fn server(&self, tcp: TcpStream) -> Result<TlsStream, TlsError> {
        let conn = rustls::ServerConnection::new(self.server.clone()).map_err(tls_err)?;
        handshake(tcp, rustls::Connection::Server(conn), "the source".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_identity_is_deterministic_and_keyed() {
        let a = psk_identity(&[7u8; 32]).unwrap();
        let b = psk_identity(&[7u8; 32]).unwrap();
        let c = psk_identity(&[8u8; 32]).unwrap();
        assert_eq!(a.0, b.0, "both sides must derive the same certificate");
        assert_ne!(a.0, c.0, "another key, another certificate");
    }

    #[test]
    fn plain_tcp_needs_insecure() {
        let tcp = "tcp:127.0.0.1:1";
        let e = Security::choose(true, tcp, None, false).unwrap_err();
        assert!(e.to_string().contains("--insecure"), "{e}");
        assert!(!Security::choose(true, tcp, None, true).unwrap().is_tls());
        assert!(
            !Security::choose(false, "unix:/tmp/x.sock", None, false)
                .unwrap()
                .is_tls()
        );
    }

    fn psk_tls() -> (tempfile::TempDir, Arc<Tls>) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        std::fs::write(&p, [5u8; 32]).unwrap();
        let creds = Credentials::Psk { key_file: p };
        match Security::choose(true, "tcp:127.0.0.1:1", Some(&creds), false).unwrap() {
            Security::Tls(t) => (d, t),
            Security::Plain => unreachable!(),
        }
    }

    /// Our record layer against rustls's own, both ways: a rustls client (its buffered
    /// connection, records sealed and opened by rustls) talks to our server stream, with
    /// records of every size, across record boundaries, and a close_notify each way.
    #[test]
    fn our_records_are_the_records_rustls_sends_and_takes() {
        use std::io::Write;
        let (_d, tls) = psk_tls();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let theirs = {
            let (client, data) = (tls.client.clone(), data.clone());
            std::thread::spawn(move || {
                let tcp = TcpStream::connect(addr).unwrap();
                let sn = ServerName::try_from(PSK_NAME).unwrap();
                let conn = rustls::ClientConnection::new(client, sn).unwrap();
                let mut s = rustls::StreamOwned::new(conn, tcp);
                // Writes of odd sizes: records of every length.
                for chunk in data.chunks(12_345) {
                    s.write_all(chunk).unwrap();
                }
                s.flush().unwrap();
                // Then read back what the server sends, to its close_notify.
                let mut back = Vec::new();
                s.read_to_end(&mut back).unwrap();
                s.conn.send_close_notify();
                let _ = s.flush();
                back
            })
        };
        let (tcp, _) = l.accept().unwrap();
        let ours = tls.server(tcp).unwrap();
        let mut got = vec![0u8; data.len()];
        let mut at = 0;
        while at < got.len() {
            let n = ours.read(&mut got[at..]).unwrap();
            assert!(n > 0, "ended after {at} bytes");
            at += n;
        }
        assert!(got == data, "rustls's records opened by us differ");
        // Ours to rustls: one write larger than a record, vectored writes across records.
        ours.write(&data[..100_000]).unwrap();
        ours.write_vectored(&[
            std::io::IoSlice::new(&data[100_000..100_007]),
            std::io::IoSlice::new(&[]),
            std::io::IoSlice::new(&data[100_007..300_000]),
        ])
        .unwrap();
        ours.shutdown();
        let back = theirs.join().unwrap();
        assert!(back == data, "our records opened by rustls differ");
    }

    /// A record damaged on the wire is an error for the reader, never wrong data.
    #[test]
    fn a_damaged_record_is_an_error() {
        use std::io::Write;
        let (_d, tls) = psk_tls();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let relay = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let raddr = relay.local_addr().unwrap();
        // A relay that flips one bit of the first application record after the handshake
        // (the 2,000th byte from the client, well past its handshake flight).
        std::thread::spawn(move || {
            let (mut c, _) = relay.accept().unwrap();
            let mut s = TcpStream::connect(addr).unwrap();
            let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
            });
            let mut buf = vec![0u8; 1 << 16];
            let mut seen = 0usize;
            loop {
                let n = match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if seen <= 4000 && seen + n > 4000 {
                    buf[4000 - seen] ^= 0x40;
                }
                seen += n;
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let client = {
            let tls = tls.clone();
            std::thread::spawn(move || {
                let tcp = TcpStream::connect(raddr).unwrap();
                let s = tls.client(tcp, &raddr.to_string()).unwrap();
                s.write(&vec![3u8; 50_000]).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(500));
            })
        };
        let (tcp, _) = l.accept().unwrap();
        let ours = tls.server(tcp).unwrap();
        let mut buf = vec![0u8; 50_000];
        let mut at = 0;
        let err = loop {
            match ours.read(&mut buf[at..]) {
                Ok(0) => panic!("the stream ended instead of failing"),
                Ok(n) => {
                    assert!(buf[at..at + n].iter().all(|&b| b == 3), "wrong data read");
                    at += n;
                }
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("authenticate"), "{err}");
        client.join().unwrap();
    }

    #[test]
    fn short_psk_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        std::fs::write(&p, b"short").unwrap();
        let e = Security::choose(
            true,
            "tcp:127.0.0.1:1",
            Some(&Credentials::Psk { key_file: p }),
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("at least 32"), "{e}");
    }
}
