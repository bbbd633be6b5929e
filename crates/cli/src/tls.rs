//! TLS options (`--tls-cert`, `--tls-key`, `--tls-ca`, `--tls-server-name`), shared by every
//! command that migrates, and throwaway certificates for `bench --tls`.

use anyhow::Context;
use clap::Args;
use livemig_engine::TlsConfig;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// TLS 1.3 with mutual authentication on every channel. Give all three files or none.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct TlsArgs {
    /// TLS: this side's certificate (PEM, leaf first). It must be signed by the --tls-ca
    /// CA, allow TLS client and server use, and name the host peers connect to.
    #[arg(long, value_name = "PATH", requires_all = ["tls_key", "tls_ca"])]
    #[serde(serialize_with = "crate::child_args::path")]
    pub tls_cert: Option<PathBuf>,
    /// TLS: this side's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PATH", requires_all = ["tls_cert", "tls_ca"])]
    #[serde(serialize_with = "crate::child_args::path")]
    pub tls_key: Option<PathBuf>,
    /// TLS: the CA certificate(s) (PEM) every peer's certificate must be signed by.
    #[arg(long, value_name = "PATH", requires_all = ["tls_cert", "tls_key"])]
    #[serde(serialize_with = "crate::child_args::path")]
    pub tls_ca: Option<PathBuf>,
    /// TLS: check the destination's certificate against this name instead of the host in
    /// tcp:HOST:PORT (needed for unix: addresses).
    #[arg(long, value_name = "NAME", requires = "tls_cert")]
    pub tls_server_name: Option<String>,
}

/// Handed on to a child process as its flags.
impl crate::child_args::ToArgs for TlsArgs {}

impl TlsArgs {
    /// The engine's TLS configuration, with the files loaded; `None` without TLS.
    pub fn config(&self) -> anyhow::Result<Option<Arc<TlsConfig>>> {
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca)
        else {
            return Ok(None);
        };
        let mut c = TlsConfig::from_files(cert, key, ca)?;
        if let Some(name) = &self.tls_server_name {
            c = c.with_server_name(name)?;
        }
        if crate::test_hooks()?.tls_no_client_cert {
            c = c.without_client_certificate();
        }
        Ok(Some(Arc::new(c)))
    }

    /// Makes a throwaway CA and one certificate for 127.0.0.1 and localhost (client and
    /// server use) signed by it, in `dir`, and returns the options naming them.
    pub fn throwaway(dir: &Path) -> anyhow::Result<TlsArgs> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let ca_key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name
            .push(DnType::CommonName, "livemig throwaway CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = p.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])?;
        p.distinguished_name
            .push(DnType::CommonName, "livemig host");
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &ca, &ca_key)?;
        let a = TlsArgs {
            tls_cert: Some(dir.join("host.crt")),
            tls_key: Some(dir.join("host.key")),
            tls_ca: Some(dir.join("ca.crt")),
            ..TlsArgs::default()
        };
        for (path, pem) in [
            (&a.tls_cert, cert.pem()),
            (&a.tls_key, key.serialize_pem()),
            (&a.tls_ca, ca.pem()),
        ] {
            let path = path.as_ref().expect("set above");
            std::fs::write(path, pem)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(a)
    }
}
