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
//!   mode 0600 ([`crate::wire::Endpoint::listen`]); TLS is optional there.
//! - **Plain TCP** only with `insecure` set: [`Security::for_endpoint`] refuses it otherwise.
//!
//! # Why a relay
//! The engines read and write a connection from separate threads (pages one way, requests the
//! other) through cloned handles of a [`Sock`]. A rustls connection is one object that cannot
//! be cloned, and this kernel has no kernel TLS (`TCP_ULP "tls"`) to hand the keys to. So after
//! the handshake each TLS connection gets two relay threads, one per direction, between the TCP
//! socket and one end of a Unix socket pair; the other end is the [`Sock`] the engines use,
//! unchanged: its timeouts, clones and shutdown behave as for any Unix socket. Closing either
//! side closes the other.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use thiserror::Error;

use crate::wire::{Endpoint, Sock};

/// The smallest pre-shared key accepted, bytes.
pub const MIN_PSK: usize = 32;
/// The largest key file read, bytes.
const MAX_PSK: u64 = 4096;
/// The name the pre-shared-key certificate carries.
const PSK_NAME: &str = "faultline-psk";
/// A TLS handshake must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Relay buffer, bytes (a pages frame is 256 KiB).
const RELAY_BUF: usize = 256 << 10;
/// How often a relay blocked on the TCP socket checks whether the other side closed.
const RELAY_TICK: Duration = Duration::from_millis(200);

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
    /// Setting up the relay failed.
    #[error("setting up the TLS relay")]
    Relay(#[source] io::Error),
    /// The connection was closed by TLS after the handshake: the peer sent an alert (in TLS
    /// 1.3 a server refuses a client's certificate only after the client finished), or a
    /// record failed to decrypt.
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
    /// The security for `ep`: TLS with `creds`; without, a Unix socket is plain (file
    /// permissions) and TCP is refused unless `insecure`.
    pub fn for_endpoint(
        ep: &Endpoint,
        creds: Option<&Credentials>,
        insecure: bool,
    ) -> Result<Security, TlsError> {
        match (creds, ep) {
            (Some(_), Endpoint::Unix(_)) => Err(TlsError::NotTcp(ep.to_string())),
            (Some(c), Endpoint::Tcp(_)) => Ok(Security::Tls(Arc::new(Tls::new(c)?))),
            (None, Endpoint::Unix(_)) => Ok(Security::Plain),
            (None, Endpoint::Tcp(_)) if insecure => Ok(Security::Plain),
            (None, Endpoint::Tcp(_)) => Err(TlsError::PlainTcp(ep.to_string())),
        }
    }

    /// Whether this is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Security::Tls(_))
    }

    /// Source side: secure a connection just made to `ep`. With TLS, the [`Relay`] tells
    /// why TLS closed the connection, if it did.
    pub fn client(&self, s: Sock, ep: &Endpoint) -> Result<(Sock, Option<Relay>), TlsError> {
        match self {
            Security::Plain => Ok((s, None)),
            Security::Tls(t) => t.client(s, ep).map(|(s, r)| (s, Some(r))),
        }
    }

    /// Destination side: secure a connection just accepted.
    pub fn server(&self, s: Sock) -> Result<Sock, TlsError> {
        match self {
            Security::Plain => Ok(s),
            Security::Tls(t) => t.server(s).map(|(s, _)| s),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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
                let trimmed = secret.trim_ascii();
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
        let client = rustls::ClientConfig::builder_with_provider(prov.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .dangerous()
            .with_custom_certificate_verifier(server_v)
            .with_client_auth_cert(certs.clone(), key.clone_key())
            .map_err(tls_err)?;
        let mut server = rustls::ServerConfig::builder_with_provider(prov)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(client_v)
            .with_single_cert(certs, key)
            .map_err(tls_err)?;
        // No tickets: nothing but application data follows the handshake.
        server.send_tls13_tickets = 0;
        Ok(Tls {
            client: Arc::new(client),
            server: Arc::new(server),
            fixed_name,
            allow,
            mode,
        })
    }

    fn client(&self, s: Sock, ep: &Endpoint) -> Result<(Sock, Relay), TlsError> {
        let name = match (&self.fixed_name, self.allow.first(), ep) {
            (Some(n), _, _) => n.clone(),
            (None, Some(n), _) => n.clone(),
            (None, None, Endpoint::Tcp(a)) => a
                .rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
                .unwrap_or_default(),
            (None, None, Endpoint::Unix(_)) => "localhost".to_string(),
        };
        let sn = ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName(name))?;
        let conn = rustls::ClientConnection::new(self.client.clone(), sn).map_err(tls_err)?;
        handshake(s, rustls::Connection::Client(conn), ep.to_string())
    }

    fn server(&self, s: Sock) -> Result<(Sock, Relay), TlsError> {
        let conn = rustls::ServerConnection::new(self.server.clone()).map_err(tls_err)?;
        handshake(s, rustls::Connection::Server(conn), "the source".into())
    }
}

/// Accepts exactly one certificate (the pre-shared-key identity), then checks the handshake
/// signature with it.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    algs: WebPkiSupportedAlgorithms,
}

impl Pinned {
    fn check(
        &self,
        ee: &CertificateDer<'_>,
        inter: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if ee.as_ref() == self.cert.as_ref() && inter.is_empty() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        ee: &CertificateDer<'_>,
        inter: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(ee, inter)
            .map(|_| ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        ee: &CertificateDer<'_>,
        inter: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(ee, inter)
            .map(|_| ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls12_signature(self, m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Whether `ee` is valid for one of `names` (its subjectAltName).
fn valid_for_any(ee: &CertificateDer<'_>, names: &[String]) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(ee) else {
        return false;
    };
    names.iter().any(|n| {
        ServerName::try_from(n.as_str())
            .is_ok_and(|sn| cert.verify_is_valid_for_subject_name(&sn).is_ok())
    })
}

fn not_allowed() -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
}

/// The CA's verdict on the destination, for one of the allowed names (or the endpoint's).
#[derive(Debug)]
struct AllowServer {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    allow: Vec<String>,
}

impl ServerCertVerifier for AllowServer {
    fn verify_server_cert(
        &self,
        ee: &CertificateDer<'_>,
        inter: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let v = self.inner.verify_server_cert(ee, inter, name, ocsp, now)?;
        if self.allow.is_empty() || valid_for_any(ee, &self.allow) {
            Ok(v)
        } else {
            Err(not_allowed())
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The CA's verdict on the source, then the allow-list.
#[derive(Debug)]
struct AllowClient {
    inner: Arc<dyn ClientCertVerifier>,
    allow: Vec<String>,
}

impl ClientCertVerifier for AllowClient {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        ee: &CertificateDer<'_>,
        inter: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let v = self.inner.verify_client_cert(ee, inter, now)?;
        if self.allow.is_empty() || valid_for_any(ee, &self.allow) {
            Ok(v)
        } else {
            Err(not_allowed())
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Run the handshake on `s` (within [`HANDSHAKE_TIMEOUT`]), then start the relay.
fn handshake(
    s: Sock,
    mut conn: rustls::Connection,
    peer: String,
) -> Result<(Sock, Relay), TlsError> {
    let mut tcp = match s {
        Sock::Tcp(t) => t,
        Sock::Unix(_) => return Err(TlsError::NotTcp(peer)),
    };
    let hs_err = |source| TlsError::Handshake {
        peer: peer.clone(),
        source,
    };
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    while conn.is_handshaking() || conn.wants_write() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(hs_err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
            )));
        }
        tcp.set_read_timeout(Some(left)).map_err(hs_err)?;
        tcp.set_write_timeout(Some(left)).map_err(hs_err)?;
        match conn.complete_io(&mut tcp) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(hs_err(e)),
        }
        if !conn.is_handshaking() && !conn.wants_write() {
            break;
        }
    }
    conn.set_buffer_limit(None);
    relay(tcp, conn).map_err(TlsError::Relay)
}

/// A handle on a connection's relay: why TLS closed it, if it did.
#[derive(Clone)]
pub struct Relay(Arc<Shared>);

impl Relay {
    /// The TLS error that closed the connection (an alert from the peer, a bad record).
    pub fn error(&self) -> Option<TlsError> {
        self.0
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .map(TlsError::Closed)
    }

    /// [`Relay::error`], waiting up to `t` for the relay to notice (the engines may see the
    /// end of the stream a moment before the relay has recorded why).
    pub fn error_within(&self, t: Duration) -> Option<TlsError> {
        let end = Instant::now() + t;
        loop {
            if let Some(e) = self.error() {
                return Some(e);
            }
            if Instant::now() >= end || self.0.closed.load(Ordering::SeqCst) {
                return self.error();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The state both relay threads share.
struct Shared {
    /// What closed the connection, when TLS did.
    error: Mutex<Option<String>>,
    conn: Mutex<rustls::Connection>,
    /// Held while records are made and written, so they reach the socket in sequence order.
    tx: Mutex<TcpStream>,
    closed: AtomicBool,
    tcp: TcpStream,
    plain: UnixStream,
}

impl Shared {
    /// Keep a TLS failure (not the plain end of a connection) as the reason it closed.
    fn record(&self, e: &io::Error) {
        if e.kind() == io::ErrorKind::InvalidData {
            let mut g = self.error.lock().unwrap_or_else(|p| p.into_inner());
            g.get_or_insert_with(|| e.to_string());
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.tcp.shutdown(Shutdown::Both);
        let _ = self.plain.shutdown(Shutdown::Both);
    }

    /// Make records of whatever rustls has to send and write them (tx lock held by caller).
    fn flush(&self, tcp: &mut TcpStream, out: &mut Vec<u8>) -> io::Result<()> {
        out.clear();
        {
            let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            while c.wants_write() {
                c.write_tls(out)?;
            }
        }
        self.write_all(tcp, out)
    }

    fn write_all(&self, tcp: &mut TcpStream, mut b: &[u8]) -> io::Result<()> {
        while !b.is_empty() {
            match tcp.write(b) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => b = &b[n..],
                Err(e) if retry(&e) && !self.closed.load(Ordering::SeqCst) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Start the two relay threads; returns the engines' end of the pair.
fn relay(tcp: TcpStream, conn: rustls::Connection) -> io::Result<(Sock, Relay)> {
    let (ours, theirs) = UnixStream::pair()?;
    for s in [&ours, &theirs] {
        crate::wire::set_sock_buffers(s, RELAY_BUF * 4);
    }
    tcp.set_read_timeout(Some(RELAY_TICK))?;
    tcp.set_write_timeout(Some(RELAY_TICK))?;
    let sh = Arc::new(Shared {
        error: Mutex::new(None),
        conn: Mutex::new(conn),
        tx: Mutex::new(tcp.try_clone()?),
        closed: AtomicBool::new(false),
        tcp: tcp.try_clone()?,
        plain: ours.try_clone()?,
    });
    let (a, b, handle) = (sh.clone(), sh.clone(), Relay(sh));
    let mut rx_tcp = tcp;
    let mut rx_plain = ours.try_clone()?;
    let mut tx_plain = ours;
    std::thread::Builder::new()
        .name("tls-rx".into())
        .spawn(move || {
            if let Err(e) = rx_loop(&a, &mut rx_tcp, &mut rx_plain) {
                a.record(&e);
            }
            a.close();
        })?;
    std::thread::Builder::new()
        .name("tls-tx".into())
        .spawn(move || {
            if let Err(e) = tx_loop(&b, &mut tx_plain) {
                b.record(&e);
            }
            b.close();
        })?;
    Ok((Sock::Unix(theirs), handle))
}

/// TCP → decrypt → the engines.
fn rx_loop(sh: &Shared, tcp: &mut TcpStream, plain: &mut UnixStream) -> io::Result<()> {
    let mut buf = vec![0u8; RELAY_BUF];
    let mut clear = Vec::with_capacity(RELAY_BUF);
    let mut out = Vec::new();
    // Application data that came with the handshake's last flight is already decrypted.
    {
        let mut c = sh.conn.lock().unwrap_or_else(|p| p.into_inner());
        let st = c
            .process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        clear.resize(st.plaintext_bytes_to_read(), 0);
        c.reader().read_exact(&mut clear)?;
    }
    plain.write_all(&clear)?;
    loop {
        let n = match tcp.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if retry(&e) && !sh.closed.load(Ordering::SeqCst) => continue,
            Err(e) => return Err(e),
        };
        let mut rest = &buf[..n];
        let mut reply = false;
        clear.clear();
        {
            let mut c = sh.conn.lock().unwrap_or_else(|p| p.into_inner());
            while !rest.is_empty() {
                c.read_tls(&mut rest)?;
                let st = match c.process_new_packets() {
                    Ok(st) => st,
                    Err(e) => {
                        // Tell the peer why (rustls queued an alert), then close.
                        let mut alert = Vec::new();
                        while c.wants_write() && c.write_tls(&mut alert).is_ok_and(|n| n > 0) {}
                        drop(c);
                        let mut t = sh.tx.lock().unwrap_or_else(|p| p.into_inner());
                        let _ = sh.write_all(&mut t, &alert);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                };
                let want = st.plaintext_bytes_to_read();
                if want > 0 {
                    let at = clear.len();
                    clear.resize(at + want, 0);
                    c.reader().read_exact(&mut clear[at..])?;
                }
                if st.peer_has_closed() {
                    rest = &[];
                }
            }
            reply |= c.wants_write();
        }
        if reply {
            let mut t = sh.tx.lock().unwrap_or_else(|p| p.into_inner());
            sh.flush(&mut t, &mut out)?;
        }
        plain.write_all(&clear)?;
    }
}

/// The engines → encrypt → TCP.
fn tx_loop(sh: &Shared, plain: &mut UnixStream) -> io::Result<()> {
    let mut buf = vec![0u8; RELAY_BUF];
    let mut out = Vec::with_capacity(RELAY_BUF + 4096);
    loop {
        let n = match plain.read(&mut buf) {
            Ok(0) => {
                // The engines closed: tell the peer, then close.
                let mut t = sh.tx.lock().unwrap_or_else(|p| p.into_inner());
                sh.conn
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .send_close_notify();
                let _ = sh.flush(&mut t, &mut out);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut t = sh.tx.lock().unwrap_or_else(|p| p.into_inner());
        sh.conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .writer()
            .write_all(&buf[..n])?;
        sh.flush(&mut t, &mut out)?;
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
        let tcp: Endpoint = "tcp:127.0.0.1:1".parse().unwrap();
        let e = Security::for_endpoint(&tcp, None, false).unwrap_err();
        assert!(e.to_string().contains("--insecure"), "{e}");
        assert!(!Security::for_endpoint(&tcp, None, true).unwrap().is_tls());
        let unix: Endpoint = "unix:/tmp/x.sock".parse().unwrap();
        assert!(!Security::for_endpoint(&unix, None, false).unwrap().is_tls());
    }

    #[test]
    fn short_psk_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        std::fs::write(&p, b"short").unwrap();
        let tcp: Endpoint = "tcp:127.0.0.1:1".parse().unwrap();
        let e = Security::for_endpoint(&tcp, Some(&Credentials::Psk { key_file: p }), false)
            .unwrap_err();
        assert!(e.to_string().contains("at least 32"), "{e}");
    }
}
