//! The migration security options shared by `run --incoming`, `migrate` and `demo`.

use std::path::PathBuf;

use vmm::migration::Endpoint;
use xfer::tls::Credentials;

use crate::error::CliError;

/// Who may migrate to us / whom we migrate to (see `xfer::tls`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// TLS 1.3 with a pre-shared key: a file of at least 32 secret bytes that both sides
    /// hold (`head -c 32 /dev/urandom > psk`).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["tls_cert", "insecure"])]
    pub tls_psk: Option<PathBuf>,
    /// TLS 1.3 with X.509: our certificate chain (PEM); needs --tls-key and --tls-ca.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"], conflicts_with = "insecure")]
    pub tls_cert: Option<PathBuf>,
    /// Our private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA bundle that signs the peer's certificate (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Accept only a peer whose certificate carries this name (repeat for more).
    #[arg(long, value_name = "NAME", requires = "tls_cert")]
    pub tls_allow: Vec<String>,
    /// Plain TCP: no authentication, no encryption (whoever reaches the port can migrate a
    /// VM into this process). Unix sockets need no flag: their mode is 0600.
    #[arg(long)]
    pub insecure: bool,
}

impl TlsArgs {
    /// The credentials given, if any.
    pub fn credentials(&self) -> Option<Credentials> {
        if let Some(k) = &self.tls_psk {
            return Some(Credentials::Psk {
                key_file: k.clone(),
            });
        }
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(Credentials::X509 {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
                allow: self.tls_allow.clone(),
            }),
            _ => None,
        }
    }

    /// Check now (files readable, plain TCP allowed) so a mistake fails before anything runs.
    pub fn check(&self, ep: &Endpoint) -> Result<(), CliError> {
        ep.security(self.credentials().as_ref(), self.insecure)
            .map(|_| ())
            .map_err(|e| CliError::Usage(uffd::error_chain(&e)))
    }
}
