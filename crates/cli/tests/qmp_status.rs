//! `livemig status --qmp` against a real QMP-driven migration between two processes, and a
//! destination started with `--listen` (QEMU's `-incoming URI`) rather than deferred.

mod common;

use common::Proc;
use livemig_qmp::{Client, ClientError};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn connect(path: &Path) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Client::connect(path, Duration::from_secs(30)) {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("QMP on {}: {e}", path.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn status_follows_a_qmp_migration_to_its_end() {
    let d = dir("status");
    let (src_sock, dst_sock) = (d.join("src.qmp"), d.join("dst.qmp"));
    let mig = format!("unix:{}", d.join("mig").display());
    let _src = Proc::spawn(&[
        "run",
        "--guest=synthetic",
        "--memory=256M",
        "--dirty-rate=2000",
        "--qmp",
        src_sock.to_str().unwrap(),
    ]);
    // Listening from the start, as with QEMU's -incoming URI.
    let _dst = Proc::spawn(&[
        "incoming",
        "--verify",
        "--listen",
        &mig,
        "--qmp",
        dst_sock.to_str().unwrap(),
    ]);
    let mut src = connect(&src_sock);
    let mut dst = connect(&dst_sock);
    assert_eq!(
        dst.execute("query-migrate", json!({})).unwrap()["status"],
        "setup"
    );
    // Slow enough to be watched for a while.
    src.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 128 << 20}),
    )
    .unwrap();
    src.execute("migrate", json!({ "uri": mig })).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_livemig"))
        .args(["status", "--json", "--interval-ms=50", "--qmp"])
        .arg(&src_sock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let statuses: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["migration"]["status"].as_str())
        .collect();
    assert!(
        statuses.contains(&"active"),
        "status saw the migration run: {statuses:?}"
    );
    assert_eq!(statuses.last(), Some(&"completed"));
    // Remaining shrinks to 0 while the total stays the guest's size.
    let last = &lines.last().unwrap()["migration"]["ram"];
    assert_eq!(last["remaining"], 0);
    assert_eq!(last["total"], 256u64 << 20);

    let v = dst.execute("x-livemig-verify", json!({})).unwrap();
    assert_eq!(v["pages-mismatched"], 0, "{v}");
    // A second migrate-incoming on a VM that now has its guest is refused, by name.
    match dst.execute("migrate-incoming", json!({ "uri": mig })) {
        Err(ClientError::Command(e)) => assert!(e.desc.contains("has a guest"), "{e}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    for c in [&mut src, &mut dst] {
        c.execute("quit", json!({})).unwrap();
    }
    let _ = std::fs::remove_dir_all(&d);
}
