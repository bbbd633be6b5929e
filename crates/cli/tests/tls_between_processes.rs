//! TLS 1.3 with mutual authentication between real processes, with certificates made here
//! (rcgen): a migration with a device completes over TLS with every page exact; a source
//! without a certificate, one with a certificate from another CA, and a plain (non-TLS)
//! source are each refused with a clear error on both sides, the source's guest runs on
//! intact, and the same destination process then takes the real source; a TLS source at a
//! plain destination fails clearly and fast; and no `lm-tls` thread is left once a
//! migration is over (in the destination process, and in-process for both sides).

mod common;
use common::{strs, synthetic_source_hooked, u64_at, Proc};
use livemig_engine::{
    migrate, receive, Endpoint, IncomingConfig, Listener, MigrationConfig, TlsConfig,
};
use livemig_vmm::synthetic::{SyntheticConfig, SyntheticGuest, Workload};
use livemig_vmm::Factory;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The tests of this file run one at a time: they count threads, and the machine is small.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    path: PathBuf,
}

/// Certificate files for one test.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn new() -> Certs {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "livemig-tls-e2e-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Certs { dir }
    }

    fn ca(&self, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        let path = self.dir.join(format!("{name}.ca.crt"));
        std::fs::write(&path, cert.pem()).unwrap();
        Ca { cert, key, path }
    }

    /// A certificate for 127.0.0.1 (client and server use) signed by `ca`: the
    /// `--tls-cert`/`--tls-key` options, and `--tls-ca` naming `trust`.
    fn host(&self, name: &str, ca: &Ca, trust: &Path) -> Vec<String> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
        let (c, k) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        vec![
            format!("--tls-cert={}", c.display()),
            format!("--tls-key={}", k.display()),
            format!("--tls-ca={}", trust.display()),
        ]
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A source process migrating a small synthetic guest with a device to `addr`.
fn source(addr: &str, extra: &[String]) -> Proc {
    source_hooked(addr, extra, "")
}

/// [`source`] with test hooks (see `Proc::spawn_hooked`).
fn source_hooked(addr: &str, extra: &[String], hooks: &str) -> Proc {
    let options = [
        "--memory=64M",
        "--working-set=4M",
        "--dirty-rate=20k",
        "--warmup-ms=50",
        "--channels=4",
        "--device=vfio-sim,size=8M,rate=400M",
    ];
    synthetic_source_hooked(addr, &options, &strs(extra), hooks)
}

/// The `lm-tls` threads of process `pid`.
fn tls_threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|c| c.trim() == "lm-tls")
                .count()
        })
        .unwrap_or(0)
}

/// A failed attempt of a source process: its error, after checking its guest is intact.
fn refused_source(mut src: Proc) -> String {
    let failed = src.expect_event("attempt_failed");
    assert_eq!(
        u64_at(&failed, &["source_verify", "pages_mismatched"]),
        0,
        "the source guest must run on intact: {failed:#}"
    );
    assert!(u64_at(&failed, &["source_verify", "pages_checked"]) > 0);
    assert_eq!(failed["devices_intact"], Value::Bool(true), "{failed:#}");
    src.expect_event("failed");
    assert!(!src.wait_exit().success());
    failed["error"].as_str().unwrap().to_string()
}

/// The destination's log lines so far.
fn logs(p: &Proc) -> Vec<String> {
    p.seen
        .iter()
        .filter(|v| v["event"] == "log")
        .map(|v| v["msg"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn a_migration_over_tls_completes_exact_and_strangers_are_refused() {
    let _g = serial();
    let certs = Certs::new();
    let ca = certs.ca("real");
    let dest_tls = certs.host("dest", &ca, &ca.path);
    let src_tls = certs.host("src", &ca, &ca.path);
    let mut dargs = vec!["--verify".to_string(), "--run-after-ms=1500".into()];
    dargs.extend(dest_tls.iter().cloned());
    let (mut dest, addr) = Proc::incoming(&strs(&dargs));

    // (2) No client certificate.
    let e = refused_source(source_hooked(&addr, &src_tls, "tls-no-client-cert"));
    assert!(e.contains("requires a certificate"), "{e}");

    // (3) A certificate from another CA (the stranger trusts the real CA, so it would
    // accept the destination).
    let other = certs.ca("other");
    let e = refused_source(source(&addr, &certs.host("stranger", &other, &ca.path)));
    assert!(e.contains("refused this side's certificate"), "{e}");

    // (4) Plain livemig, no TLS at all.
    let e = refused_source(source(&addr, &[]));
    assert!(e.contains("requires TLS"), "{e}");

    // (1) The real source, over TLS, with a device: every page exact at the destination.
    let mut src = source(&addr, &src_tls);
    let done = src.expect_event("completed");
    assert!(src.wait_exit().success());
    let received = dest.expect_event("received");
    let verify = &received["report"]["verify"];
    assert_eq!(u64_at(verify, &["pages_mismatched"]), 0, "{received:#}");
    assert_eq!(
        u64_at(verify, &["pages_checked"]),
        (64u64 << 20) / 4096,
        "{received:#}"
    );
    assert_eq!(
        u64_at(&verify["counter"], &[]),
        u64_at(&done, &["counter_at_pause"]),
        "the guest must continue where it paused"
    );
    // The device's whole state crossed too (loaded and checked byte by byte there).
    let devices = done["report"]["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1, "{done:#}");
    assert!(u64_at(&devices[0], &["bytes"]) >= 8 << 20, "{done:#}");

    // (6) The migration is over, the guest runs on at the destination: no lm-tls left.
    let deadline = Instant::now() + Duration::from_secs(1);
    while tls_threads_of(dest.child.id()) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        tls_threads_of(dest.child.id()),
        0,
        "an lm-tls thread outlived its migration"
    );
    let after = dest.expect_event("after_run");
    assert_eq!(u64_at(&after, &["verify", "pages_mismatched"]), 0);
    assert!(dest.wait_exit().success());

    // Each stranger was refused at the TLS layer, with the reason, on the destination too.
    let logs = logs(&dest);
    for words in [
        "presented no certificate",
        "not signed by the CA",
        "plain livemig",
    ] {
        assert!(
            logs.iter()
                .any(|l| l.starts_with("refused a connection: TLS: ") && l.contains(words)),
            "no refusal mentioning '{words}' in {logs:#?}"
        );
    }
}

#[test]
fn a_tls_source_at_a_plain_destination_fails_clearly_and_fast() {
    let _g = serial();
    let certs = Certs::new();
    let ca = certs.ca("real");
    let (mut dest, addr) = Proc::incoming(&[]);
    let start = Instant::now();
    let e = refused_source(source(&addr, &certs.host("src", &ca, &ca.path)));
    assert!(e.contains("does not speak TLS"), "{e}");
    // Well inside the 10 s connect timeout (this includes starting the source's guest).
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    // The plain destination refused it and waits on.
    let log = dest.expect_event("log");
    assert!(
        log["msg"]
            .as_str()
            .unwrap()
            .starts_with("refused a connection"),
        "{log:#}"
    );
    assert!(dest.child.try_wait().unwrap().is_none());
}

#[test]
fn no_tls_thread_outlives_a_migration_in_process() {
    let _g = serial();
    let certs = Certs::new();
    let ca = certs.ca("real");
    let files = |name: &str| {
        let a = certs.host(name, &ca, &ca.path);
        let path = |i: usize| a[i].split_once('=').unwrap().1.to_string();
        Arc::new(TlsConfig::from_files(path(0), path(1), path(2)).unwrap())
    };
    let (server, client) = (files("dest"), files("src"));
    let tls_threads = || tls_threads_of(std::process::id());
    let guest = SyntheticGuest::start(&SyntheticConfig {
        memory_bytes: 32 << 20,
        fill: 1.0,
        workload: Workload {
            working_set_pages: 256,
            rate: 10_000,
            threads: 1,
        },
        backing: Default::default(),
    })
    .unwrap();
    // A unix: address needs the name the destination's certificate carries.
    let path = certs.dir.join("dest.sock");
    let to = Endpoint::Unix(path.clone());
    let config = MigrationConfig {
        tls: Some(client.clone()),
        ..MigrationConfig::default()
    };
    let e = migrate(&guest, &to, &config, &|_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("--tls-server-name"), "{e}");
    let listener = Listener::bind(&to).unwrap();
    let in_config = IncomingConfig {
        verify: true,
        tls: Some(server),
        ..IncomingConfig::default()
    };
    let config = MigrationConfig {
        channels: 3,
        tls: Some(Arc::new(
            (*client).clone().with_server_name("127.0.0.1").unwrap(),
        )),
        ..MigrationConfig::default()
    };
    let peak = AtomicUsize::new(0);
    let progress = |_: &livemig_engine::Progress| {
        peak.fetch_max(tls_threads(), Ordering::Relaxed);
    };
    let (src, dst) = std::thread::scope(|s| {
        let dest = s.spawn(|| receive(&listener, &Factory, &in_config, &|_| {}));
        let src = migrate(&guest, &to, &config, &progress);
        (src, dest.join().unwrap())
    });
    src.unwrap();
    let inc = dst.unwrap();
    let verify = inc.report.verify.as_ref().unwrap();
    assert_eq!(verify.pages_mismatched, 0);
    assert!(verify.pages_checked > 0);
    // Both sides' pumps, one per channel (main + 3 data), ran during the migration...
    assert_eq!(peak.load(Ordering::Relaxed), 8);
    // ...and none is left now that both calls have returned (a joined thread can stay
    // listed in /proc for a moment after it has exited).
    let deadline = Instant::now() + Duration::from_secs(1);
    while tls_threads() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(tls_threads(), 0);
}
