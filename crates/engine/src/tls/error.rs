//! What goes wrong with TLS, and rustls' errors as a person should read them.

use rustls::{AlertDescription, CertificateError};
use std::fmt;
use std::io;
use std::path::PathBuf;

/// Which TLS file a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    /// This side's certificate chain (PEM).
    Certificate,
    /// This side's private key (PEM).
    Key,
    /// The CA certificate the peer's certificate must be signed by (PEM).
    Ca,
}

impl fmt::Display for TlsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsFile::Certificate => "certificate",
            TlsFile::Key => "private key",
            TlsFile::Ca => "CA certificate",
        })
    }
}

/// What went wrong with TLS: a file that cannot be used, or a connection refused at the TLS
/// layer (by either side).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read the TLS {what} file {}: {source}", path.display())]
    Read {
        /// Which file.
        what: TlsFile,
        /// Its path.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// A file is not valid PEM.
    #[error("the TLS {what} file {} is not valid PEM: {detail}", path.display())]
    Pem {
        /// Which file.
        what: TlsFile,
        /// Its path.
        path: PathBuf,
        /// What the parser found.
        detail: String,
    },
    /// A file holds no item of the kind expected (e.g. a key file with no key).
    #[error("the TLS {what} file {} holds no {what} (expected {expected})", path.display())]
    Empty {
        /// Which file.
        what: TlsFile,
        /// Its path.
        path: PathBuf,
        /// The PEM item(s) looked for.
        expected: &'static str,
    },
    /// The CA file's certificates cannot be used as trust anchors.
    #[error("the TLS CA file {} cannot be used: {detail}", path.display())]
    Ca {
        /// Its path.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The key does not go with the certificate, or rustls cannot use the pair.
    #[error("the TLS key {} cannot be used with the certificate {}: {detail}", key.display(), cert.display())]
    Key {
        /// The certificate's path.
        cert: PathBuf,
        /// The key's path.
        key: PathBuf,
        /// Why.
        detail: String,
    },
    /// The name given to check the destination's certificate against is not a valid DNS
    /// name or IP address.
    #[error("'{name}' is not a valid TLS server name: {detail}")]
    ServerName {
        /// The name given.
        name: String,
        /// Why it is not valid.
        detail: String,
    },
    /// TLS to a `unix:` address without a server name: give one with
    /// [`TlsConfig::with_server_name`](crate::TlsConfig::with_server_name).
    #[error("TLS to {to}: a unix: address has no host name to check the destination's certificate against; give the name in its certificate (--tls-server-name)")]
    NoServerName {
        /// The address.
        to: String,
    },
    /// The handshake failed: the text says why and whose fault it looks like.
    #[error("TLS: {0}")]
    Handshake(String),
    /// The peer speaks plain livemig, not TLS.
    #[error("TLS: {0}")]
    NotTls(String),
    /// The handshake was stopped by a cancel (the migration's, or the destination's wait).
    #[error("TLS handshake cancelled")]
    Cancelled,
    /// The connection's `lm-tls` pump thread could not be started.
    #[error("TLS: cannot start the connection's lm-tls thread: {0}")]
    Spawn(#[source] io::Error),
}

/// Who is at the other end, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Peer {
    Source,
    Destination,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Peer::Source => "source",
            Peer::Destination => "destination",
        })
    }
}

/// A rustls error as a person should read it.
pub(super) fn describe(e: &rustls::Error, peer: Peer) -> String {
    use rustls::Error as E;
    match e {
        E::AlertReceived(AlertDescription::CertificateRequired) => format!(
            "the {peer} requires a certificate and this side presented none (alert: certificate required)"
        ),
        E::AlertReceived(
            a @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::AccessDenied),
        ) => format!("the {peer} refused this side's certificate (alert: {a:?})"),
        E::AlertReceived(a) => format!("the {peer} sent a fatal alert: {a:?}"),
        E::NoCertificatesPresented => format!("the {peer} presented no certificate"),
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => format!(
                "the {peer}'s certificate is not signed by the CA in this side's CA file (unknown issuer)"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the {peer}'s certificate is not valid for the name it was reached by ({e}); name the right one with --tls-server-name")
            }
            c => format!("the {peer}'s certificate is not valid: {c:?}"),
        },
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. } => {
            format!("the {peer} does not speak TLS 1.3 ({e})")
        }
        E::PeerIncompatible(p) => format!("the {peer} cannot do TLS 1.3 as configured here ({p:?})"),
        e => format!("with the {peer}: {e}"),
    }
}
