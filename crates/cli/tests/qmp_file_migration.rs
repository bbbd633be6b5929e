//! QMP's `migrate {"uri": "file:PATH"}` and `migrate-incoming {"uri": "file:PATH"}` between
//! real processes, with QEMU's `mapped-ram` capability set as QEMU's scripts set it: a live
//! save leaves the guest running, a save after `stop` leaves it paused, and the restored
//! guest (restored through QEMU 9.1's `channels` form of the address) holds every page and
//! the counter where the source stopped; with the `direct-io` parameter (and `mapped-ram`)
//! the save and the restore move pages with `O_DIRECT`.

mod common;

use common::Proc;
use livemig_qmp::Client;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
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

/// Polls `query-migrate` until the migration is over; returns its last answer.
fn finished(c: &mut Client) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let q = c.execute("query-migrate", json!({})).unwrap();
        match q["status"].as_str() {
            Some("completed" | "failed" | "cancelled") => return q,
            _ if Instant::now() > deadline => panic!("no end: {q:#}"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn qmp_saves_to_a_file_and_restores_from_it() {
    let d = dir("qmpfile");
    let (src_sock, dst_sock) = (d.join("src.qmp"), d.join("dst.qmp"));
    let _src = Proc::spawn(&[
        "run",
        "--guest=synthetic",
        "--memory=128M",
        "--dirty-rate=5000",
        "--device=vfio-sim,size=2M",
        "--qmp",
        src_sock.to_str().unwrap(),
    ]);
    let mut src = connect(&src_sock);
    let caps = json!({"capabilities": [
        {"capability": "mapped-ram", "state": true},
        {"capability": "multifd", "state": true},
    ]});
    src.execute("migrate-set-capabilities", caps).unwrap();
    let live = format!("file:{}", d.join("live.lmsave").display());
    src.execute("migrate", json!({ "uri": live })).unwrap();
    let q = finished(&mut src);
    assert_eq!(q["status"], "completed", "{q:#}");
    assert!(q["x-livemig-file"]["live"].as_bool().unwrap(), "{q:#}");
    assert_eq!(q["x-livemig-file"]["direct_io"], false, "{q:#}");
    let status = src.execute("query-status", json!({})).unwrap();
    assert_eq!(
        status["status"], "running",
        "a live save leaves the guest running"
    );

    src.execute("stop", json!({})).unwrap();
    let direct = json!({"direct-io": true});
    src.execute("migrate-set-parameters", direct.clone())
        .unwrap();
    let p = src.execute("query-migrate-parameters", json!({})).unwrap();
    assert_eq!(p["direct-io"], true, "{p:#}");
    let stopped = format!("file:{}", d.join("stopped.lmsave").display());
    src.execute("migrate", json!({ "uri": stopped })).unwrap();
    let q = finished(&mut src);
    assert_eq!(q["status"], "completed", "{q:#}");
    assert_eq!(q["x-livemig-file"]["rounds"].as_array().unwrap().len(), 1);
    assert_eq!(q["x-livemig-file"]["direct_io"], true, "{q:#}");
    let status = src.execute("query-status", json!({})).unwrap();
    assert_eq!(status["status"], "paused", "a stopped guest stays paused");
    let saved = src.execute("x-livemig-verify", json!({})).unwrap();

    let _dst = Proc::spawn(&["incoming", "--verify", "--qmp", dst_sock.to_str().unwrap()]);
    let mut dst = connect(&dst_sock);
    let mapped = json!({"capabilities": [{"capability": "mapped-ram", "state": true}]});
    dst.execute("migrate-set-capabilities", mapped).unwrap();
    dst.execute("migrate-set-parameters", direct).unwrap();
    // QEMU 9.1's channels form, with a file address, as QEMU's scripts give it.
    let file = d.join("stopped.lmsave");
    let channels = json!([{"channel-type": "main",
        "addr": {"transport": "file", "filename": file, "offset": 0}}]);
    dst.execute("migrate-incoming", json!({ "channels": channels }))
        .unwrap();
    let q = finished(&mut dst);
    assert_eq!(q["status"], "completed", "{q:#}");
    let v = &q["x-livemig-file"]["verify"];
    assert_eq!(v["pages_mismatched"], 0, "{q:#}");
    assert_eq!(q["x-livemig-file"]["direct_io"], true, "{q:#}");
    assert_eq!(
        v["counter"], saved["counter"],
        "the counter where the source stopped"
    );
    // Saved stopped, restored stopped, as QEMU does; `cont` runs it.
    let status = dst.execute("query-status", json!({})).unwrap();
    assert_eq!(status["status"], "paused", "{q:#}");
    dst.execute("cont", json!({})).unwrap();
    let status = dst.execute("query-status", json!({})).unwrap();
    assert_eq!(status["status"], "running");
    for c in [&mut src, &mut dst] {
        c.execute("quit", json!({})).unwrap();
    }
    let _ = std::fs::remove_dir_all(&d);
}
