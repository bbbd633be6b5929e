//! [`TlsConfig`]: this side's certificate and key and the CA it trusts, loaded from PEM files
//! into the rustls client and server configurations both roles use.

use super::error::{TlsError, TlsFile};
use crate::transport::Endpoint;
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// Certificates and keys for TLS on every channel, both roles: the source presents its
/// certificate as a client and checks the destination's; the destination presents the same
/// kind of certificate as a server and refuses a client without one signed by the CA.
#[derive(Clone)]
pub struct TlsConfig {
    pub(super) client: Arc<ClientConfig>,
    pub(super) server: Arc<ServerConfig>,
    server_name: Option<ServerName<'static>>,
    files: String,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("files", &self.files)
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// TLS 1.3 only; AES-128-GCM first (the fastest with AES instructions), then the others.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn read_file(what: TlsFile, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn load_certs(what: TlsFile, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "a PEM block -----BEGIN CERTIFICATE-----",
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(TlsFile::Key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what: TlsFile::Key,
            path: path.to_path_buf(),
            expected: "a PEM private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC)",
        },
        e => TlsError::Pem {
            what: TlsFile::Key,
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
    })
}

impl TlsConfig {
    /// Loads this side's certificate (PEM, the chain's leaf first), its private key (PEM:
    /// PKCS#8, PKCS#1 or SEC1) and the CA certificate(s) (PEM) every peer's certificate
    /// must be signed by. The certificate should allow both TLS client and server use (a
    /// host can be source and destination) and name the host peers reach it by.
    pub fn from_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
        ca: impl AsRef<Path>,
    ) -> Result<TlsConfig, TlsError> {
        let (cert, key, ca) = (cert.as_ref(), key.as_ref(), ca.as_ref());
        let chain = load_certs(TlsFile::Certificate, cert)?;
        let private = load_key(key)?;
        let mut roots = RootCertStore::empty();
        for c in load_certs(TlsFile::Ca, ca)? {
            roots.add(c).map_err(|e| TlsError::Ca {
                path: ca.to_path_buf(),
                detail: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);
        let provider = provider();
        let key_err = |e: rustls::Error| TlsError::Key {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            detail: match e {
                rustls::Error::InconsistentKeys(_) => {
                    "the key is not the certificate's (their public keys differ)".into()
                }
                e => e.to_string(),
            },
        };
        let tls13 = |e: rustls::Error| TlsError::Handshake(format!("TLS 1.3 unavailable: {e}"));
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Ca {
                path: ca.to_path_buf(),
                detail: e.to_string(),
            })?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls13)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), private.clone_key())
            .map_err(key_err)?;
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.ignore_client_order = true;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls13)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private)
            .map_err(key_err)?;
        client.resumption = Resumption::disabled();
        Ok(TlsConfig {
            client: Arc::new(client),
            server: Arc::new(server),
            server_name: None,
            files: format!(
                "cert {}, key {}, CA {}",
                cert.display(),
                key.display(),
                ca.display()
            ),
        })
    }

    /// Checks the destination's certificate against `name` instead of the host of the
    /// address connected to (required for `unix:` addresses).
    pub fn with_server_name(mut self, name: &str) -> Result<TlsConfig, TlsError> {
        let n = ServerName::try_from(name.to_string()).map_err(|e| TlsError::ServerName {
            name: name.to_string(),
            detail: e.to_string(),
        })?;
        self.server_name = Some(n);
        Ok(self)
    }

    /// TEST ONLY: the source side presents no certificate (to show the destination refuses
    /// it).
    pub fn without_client_certificate(mut self) -> TlsConfig {
        let mut client = (*self.client).clone();
        let roots_only = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 is in the ring provider")
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        client.client_auth_cert_resolver = roots_only.client_auth_cert_resolver;
        self.client = Arc::new(client);
        self
    }

    /// The name the destination's certificate is checked against for `to`.
    pub fn server_name(&self, to: &Endpoint) -> Result<ServerName<'static>, TlsError> {
        if let Some(n) = &self.server_name {
            return Ok(n.clone());
        }
        match to {
            Endpoint::Tcp(a) => {
                let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                ServerName::try_from(host.to_string()).map_err(|e| TlsError::ServerName {
                    name: host.to_string(),
                    detail: e.to_string(),
                })
            }
            Endpoint::Unix(_) => Err(TlsError::NoServerName { to: to.to_string() }),
        }
    }
}
