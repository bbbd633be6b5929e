//! `livemig bench --peer qemu` end to end, in a tiny configuration: QEMU and livemig migrate
//! the same guest on loopback, both driven over QMP, and the table has both tools' figures
//! with every page checked. Where QEMU (or KVM for it) is missing the test says SKIPPED;
//! without QEMU the bench must still measure livemig and say why the peer columns are empty.

use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// Says the test is skipped, and adds a line to `LIVEMIG_SKIP_LOG` (counted by `.ci/run`).
fn skip(test: &str, why: &str) {
    let line = format!("{test}: SKIPPED ({why})");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("LIVEMIG_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One write of the whole line, so concurrent tests' lines never interleave.
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }
}

fn kvm_openable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn qemu_on_path() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()))
}

/// Runs the bench with `args` (plus `--repeat 1 --json --out DIR`), returns its exit success, its JSON
/// document and the Markdown it wrote.
fn bench(args: &[&str], env: &[(&str, &str)], out: &Path) -> (bool, Value, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_livemig"))
        .args(["bench", "--peer", "qemu", "--repeat", "1"])
        // A short settle: these runs are too small for the host's state to matter much.
        .args(["--settle-ms", "200", "--json", "--out"])
        .arg(out)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run livemig bench");
    let stderr = String::from_utf8_lossy(&o.stderr);
    eprintln!("{stderr}");
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "bench printed no JSON ({e}): {}\n{stderr}",
            String::from_utf8_lossy(&o.stdout)
        )
    });
    let md = std::fs::read_to_string(out.join("bench.md")).expect("bench.md written");
    assert!(out.join("bench.json").is_file(), "bench.json written");
    (o.status.success(), doc, md)
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("livemig-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The row's table line (after the header), split into cells.
fn cells(md: &str, starts: &str) -> Vec<String> {
    let line = md
        .lines()
        .find(|l| l.starts_with(starts))
        .unwrap_or_else(|| panic!("no row starting {starts:?} in:\n{md}"));
    line.trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

#[test]
fn qemu_and_livemig_side_by_side_every_page_checked() {
    let test = "qemu_and_livemig_side_by_side_every_page_checked";
    if !qemu_on_path() {
        return skip(test, "no qemu-system-x86_64");
    }
    if !kvm_openable() {
        return skip(test, "no usable /dev/kvm for qemu-system-x86_64");
    }
    let out = tmp("peer-bench");
    let (ok, doc, md) = bench(
        &[
            "--rows=cold-dirtying-2ch",
            "--peer-memory=256M",
            "--peer-fill=128M",
            "--peer-working-set=16M",
            "--peer-dirty-rate=20000",
        ],
        &[],
        &out,
    );
    let _ = std::fs::remove_dir_all(&out);
    let peer = &doc["peer"];
    assert_eq!(peer["available"], true, "QEMU and KVM are here: {peer}");
    assert!(ok, "the bench failed:\n{md}");
    let rows = doc["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 1, "{doc}");
    let row = &rows[0];
    assert_eq!(row["failure"], Value::Null, "{row}");
    for tool in ["qemu", "livemig"] {
        let samples = row[tool]["samples"].as_array().expect("samples");
        assert_eq!(samples.len(), 1, "{tool}: {row}");
        let s = &samples[0];
        for k in ["total_ms", "downtime_ms", "dest_cpu_s"] {
            assert!(s[k].as_f64().is_some_and(|v| v >= 0.0), "{tool} {k}: {s}");
        }
        assert!(s["total_ms"].as_f64().unwrap() > 0.0, "{tool}: {s}");
        assert!(
            s["dest_peak_rss_bytes"].as_u64().unwrap() > 16 << 20,
            "{tool}: {s}"
        );
        assert!(
            s["pages_checked"].as_u64().unwrap() >= (128 << 20) / 4096,
            "{tool} checked too few pages: {s}"
        );
    }
    // QEMU's guest checked its own pages on its console.
    assert_eq!(
        row["qemu"]["samples"][0]["checked_by"], "guest-verify",
        "{row}"
    );
    for k in ["total", "downtime", "dest_peak_rss"] {
        assert!(
            row["livemig_to_qemu"][k].as_f64().is_some_and(|r| r > 0.0),
            "ratio {k}: {row}"
        );
    }
    // The Markdown says how it was run, and the row has both tools' figures and checks.
    assert!(md.contains("Run: `livemig bench --peer qemu"), "{md}");
    let c = cells(&md, "| cold |");
    assert_eq!(c.len(), 18, "{c:?}");
    for (i, what) in [(4, "QEMU total"), (5, "livemig total"), (6, "ratio")] {
        assert!(c[i].parse::<f64>().is_ok(), "{what} is {:?} in {c:?}", c[i]);
    }
    assert!(
        !c[17].contains("FAILED") && c[17].matches("1 ok").count() == 2,
        "{c:?}"
    );
}

#[test]
fn without_qemu_livemig_is_measured_and_the_peer_columns_say_why() {
    let test = "without_qemu_livemig_is_measured_and_the_peer_columns_say_why";
    if !kvm_openable() {
        return skip(test, "no usable /dev/kvm");
    }
    let out = tmp("peer-bench-noqemu");
    let (ok, doc, md) = bench(
        &[
            "--rows=prepared-idle-2ch",
            "--peer-memory=128M",
            "--peer-fill=64M",
        ],
        &[("LIVEMIG_QEMU", "/nonexistent/qemu-system-x86_64")],
        &out,
    );
    let _ = std::fs::remove_dir_all(&out);
    assert!(ok, "the bench failed:\n{md}");
    let peer = &doc["peer"];
    assert_eq!(peer["available"], false, "{peer}");
    assert!(
        peer["why"]
            .as_str()
            .is_some_and(|w| w.contains("/nonexistent/qemu-system-x86_64")),
        "{peer}"
    );
    let row = &doc["rows"][0];
    assert_eq!(row["qemu"]["samples"].as_array().map(Vec::len), Some(0));
    let s = &row["livemig"]["samples"][0];
    assert!(s["total_ms"].as_f64().is_some_and(|t| t > 0.0), "{row}");
    assert!(s["pages_checked"].as_u64().is_some_and(|p| p > 0), "{row}");
    let c = cells(&md, "| prepared |");
    assert_eq!((c[4].as_str(), c[6].as_str()), ("-", "-"), "{c:?}");
    assert!(c[5].parse::<f64>().is_ok(), "{c:?}");
    assert!(md.contains("only livemig's columns"), "{md}");
}
