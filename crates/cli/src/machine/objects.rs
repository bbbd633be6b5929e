//! QEMU's TLS credentials as QMP objects: `object-add` of a `tls-creds-x509` naming a
//! directory in QEMU's layout (`ca-cert.pem`, and `server-cert.pem` / `server-key.pem` or
//! `client-cert.pem` / `client-key.pem` for its endpoint), `object-del`, and the migration
//! parameters `tls-creds` (an object's id) and `tls-hostname` (the name the destination's
//! certificate must carry) that make a migration use it, as QEMU's scripts and libvirt do.
//!
//! The files are loaded when the object is added, so a missing or bad file is the
//! command's error, naming it. livemig authenticates both peers always: `verify-peer` must be
//! true (QEMU's default), and each side's certificate is checked against the CA.

use livemig_engine::TlsConfig;
use livemig_qmp::{Args, QmpError};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::sync::Arc;

/// Which side of a migration the credentials are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsEndpoint {
    /// The source: `client-cert.pem`, `client-key.pem`.
    Client,
    /// The destination: `server-cert.pem`, `server-key.pem`.
    Server,
}

impl TlsEndpoint {
    fn name(self) -> &'static str {
        match self {
            TlsEndpoint::Client => "client",
            TlsEndpoint::Server => "server",
        }
    }
}

/// One `tls-creds-x509` object.
#[derive(Debug, Clone)]
pub struct TlsCreds {
    pub id: String,
    pub dir: PathBuf,
    pub endpoint: TlsEndpoint,
    /// Loaded when the object was added.
    config: TlsConfig,
}

/// The objects added so far.
#[derive(Debug, Default)]
pub struct Objects {
    creds: Vec<TlsCreds>,
}

impl Objects {
    /// `object-add`.
    pub fn add(&mut self, args: &Map<String, Value>) -> Result<(), QmpError> {
        let a = Args::new(
            args,
            &[
                "qom-type",
                "id",
                "dir",
                "endpoint",
                "verify-peer",
                "priority",
            ],
        )?;
        let kind = a.str("qom-type")?;
        if kind != "tls-creds-x509" {
            return Err(QmpError::generic(format!(
                "Invalid parameter '{kind}' (livemig's objects are tls-creds-x509)"
            )));
        }
        let id = a.str("id")?;
        if self.creds.iter().any(|c| c.id == id) {
            return Err(QmpError::generic(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        let endpoint = match a.opt_str("endpoint")?.unwrap_or("client") {
            "client" => TlsEndpoint::Client,
            "server" => TlsEndpoint::Server,
            other => {
                return Err(QmpError::generic(format!(
                    "Parameter 'endpoint' does not accept value '{other}'"
                )))
            }
        };
        if a.opt_bool("verify-peer")? == Some(false) {
            return Err(QmpError::generic(
                "livemig authenticates both peers: 'verify-peer' must be true",
            ));
        }
        let dir = PathBuf::from(a.str("dir")?);
        let side = endpoint.name();
        let config = TlsConfig::from_files(
            dir.join(format!("{side}-cert.pem")),
            dir.join(format!("{side}-key.pem")),
            dir.join("ca-cert.pem"),
        )
        .map_err(|e| QmpError::generic(format!("tls-creds-x509 '{id}': {e}")))?;
        self.creds.push(TlsCreds {
            id: id.to_string(),
            dir,
            endpoint,
            config,
        });
        Ok(())
    }

    /// `object-del`; refused while the parameters name it (`in_use`).
    pub fn del(&mut self, args: &Map<String, Value>, in_use: &str) -> Result<(), QmpError> {
        let a = Args::new(args, &["id"])?;
        let id = a.str("id")?;
        let Some(i) = self.creds.iter().position(|c| c.id == id) else {
            return Err(QmpError::generic(format!("object '{id}' not found")));
        };
        if id == in_use {
            return Err(QmpError::generic(format!(
                "object '{id}' is in use, can not be deleted"
            )));
        }
        self.creds.remove(i);
        Ok(())
    }

    /// The TLS configuration a migration on `endpoint`'s side uses when the parameters name
    /// `creds` (none when `creds` is empty), checking the server name `hostname` (if any).
    pub fn tls(
        &self,
        creds: &str,
        hostname: &str,
        endpoint: TlsEndpoint,
    ) -> Result<Option<Arc<TlsConfig>>, QmpError> {
        if creds.is_empty() {
            return Ok(None);
        }
        let c =
            self.creds.iter().find(|c| c.id == creds).ok_or_else(|| {
                QmpError::generic(format!("No TLS credentials with id '{creds}'"))
            })?;
        if c.endpoint != endpoint {
            return Err(QmpError::generic(format!(
                "Expected TLS credentials for a {} endpoint ('{creds}' is for a {} one, from {})",
                endpoint.name(),
                c.endpoint.name(),
                c.dir.display()
            )));
        }
        let mut config = c.config.clone();
        if !hostname.is_empty() {
            config = config
                .with_server_name(hostname)
                .map_err(|e| QmpError::generic(format!("tls-hostname '{hostname}': {e}")))?;
        }
        Ok(Some(Arc::new(config)))
    }
}
