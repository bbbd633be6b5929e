//! Saving a guest to a file in one process (`migrate --to file:PATH`) and restoring it in
//! others (`incoming --from file:PATH`): the KVM micro-VM (skipped, saying so, where
//! /dev/kvm is not usable) and the synthetic guest, idle and dirtying, with a VFIO-like
//! device; every page exact, the counter continuing from where the guest paused, the same
//! file restored twice; and bad files refused by a process that says what is wrong.

mod common;
use common::*;

use livemig_vmm::kvm::usable_or_skip;
use std::path::{Path, PathBuf};

fn file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("livemig-proc-{name}-{}.lmsave", std::process::id()))
}

/// Saves a guest started with `guest` to `path` (extra `migrate` flags in `extra`);
/// returns the save's `completed` line.
fn save(path: &Path, guest: &[&str], extra: &[&str]) -> serde_json::Value {
    let to = format!("--to=file:{}", path.display());
    let mut args = vec!["migrate", "--json", to.as_str()];
    args.extend_from_slice(guest);
    args.extend_from_slice(extra);
    let mut src = Proc::spawn(&args);
    let done = src.expect_event("completed");
    assert!(src.wait_exit().success());
    done
}

/// Restores `path` in a new process, checks every page and the counter, lets the guest
/// run and checks it again (a `dirtying` guest's counter must go on from where it paused,
/// an idle one's stay there).
fn restore_exact(path: &Path, paused_at: u64, pages: u64, dirtying: bool) {
    let got = restore(path, pages, &[]);
    let v = &got.0["report"]["verify"];
    assert_eq!(
        u64_at(v, &["counter"]),
        paused_at,
        "the counter comes back exactly where it paused"
    );
    runs_on(got, paused_at, dirtying);
}

/// Restores `path` in a new process (with `extra` flags); returns its `received` line,
/// every page checked exact, and the process, to be waited for with [`runs_on`].
fn restore(path: &Path, pages: u64, extra: &[&str]) -> (serde_json::Value, Proc) {
    let from = format!("--from=file:{}", path.display());
    let mut args = vec![
        "incoming",
        "--json",
        from.as_str(),
        "--verify",
        "--run-after-ms=300",
    ];
    args.extend_from_slice(extra);
    let mut dest = Proc::spawn(&args);
    let recv = dest.expect_event("received");
    let v = &recv["report"]["verify"];
    assert_eq!(u64_at(v, &["pages_checked"]), pages, "{v:#}");
    assert_eq!(u64_at(v, &["pages_mismatched"]), 0, "{v:#}");
    (recv, dest)
}

/// Lets the restored guest run, then checks it again.
fn runs_on((_, mut dest): (serde_json::Value, Proc), paused_at: u64, dirtying: bool) {
    let after = dest.expect_event("after_run");
    assert_eq!(u64_at(&after["verify"], &["pages_mismatched"]), 0);
    let counter = u64_at(&after["verify"], &["counter"]);
    match dirtying {
        true => assert!(counter > paused_at, "the restored guest runs on: {after:#}"),
        false => assert_eq!(
            counter, paused_at,
            "an idle guest writes nothing: {after:#}"
        ),
    }
    assert!(dest.wait_exit().success());
}

/// The end-to-end tests' KVM micro-VM, with a vfio-sim device.
fn kvm() -> Vec<&'static str> {
    [KVM_GUEST, &["--device=vfio-sim,size=8M,precopy=2M"]].concat()
}

#[test]
fn kvm_guest_saved_live_while_dirtying_restores_exact_twice() {
    if !usable_or_skip() {
        return;
    }
    let path = file("kvm-live");
    let done = save(&path, &kvm(), &["--downtime-limit-ms=1", "--max-rounds=4"]);
    assert_eq!(done["guest"], "kvm");
    let r = &done["report"];
    let rounds = r["rounds"].as_array().unwrap();
    assert!((2..=4).contains(&rounds.len()), "{r:#}");
    let rewritten: u64 = rounds[1..].iter().map(|x| u64_at(x, &["pages"])).sum();
    assert!(
        rewritten > 0,
        "pages dirtied during round 0 were written again: {r:#}"
    );
    assert!(u64_at(r, &["device_bytes"]) > 8 << 20);
    let paused_at = u64_at(&done, &["counter_at_pause"]);
    assert!(paused_at > 0);
    for _ in 0..2 {
        restore_exact(&path, paused_at, 65536, true);
    }
    let _ = std::fs::remove_file(&path);
}

/// On demand: the KVM guest runs before its pages are read (each page read on its first
/// touch, the rest by a background thread); once all are in, every page is exact and the
/// counter has gone on from where it paused.
#[test]
fn kvm_guest_restored_on_demand_runs_on_exact() {
    if !usable_or_skip() {
        return;
    }
    let path = file("kvm-ondemand");
    let done = save(&path, &kvm(), &["--downtime-limit-ms=1", "--max-rounds=3"]);
    let paused_at = u64_at(&done, &["counter_at_pause"]);
    let got = restore(&path, 65536, &["--on-demand"]);
    let r = &got.0["report"];
    assert_eq!(r["on_demand"], true);
    let resumed = r["resumed_ms"].as_f64().unwrap();
    assert!(resumed <= r["total_ms"].as_f64().unwrap(), "{r:#}");
    assert!(u64_at(&r["verify"], &["counter"]) >= paused_at, "{r:#}");
    runs_on(got, paused_at, true);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn kvm_guest_idle_and_stopped_first_is_saved_in_one_pass() {
    if !usable_or_skip() {
        return;
    }
    let path = file("kvm-idle");
    let mut guest = kvm();
    guest.retain(|a| !a.starts_with("--working"));
    guest.push("--working-set=0");
    let done = save(&path, &guest, &["--stop-first"]);
    let r = &done["report"];
    assert_eq!(r["rounds"].as_array().unwrap().len(), 1, "{r:#}");
    assert_eq!(r["live"], false);
    restore_exact(&path, u64_at(&done, &["counter_at_pause"]), 65536, false);
    let _ = std::fs::remove_file(&path);
}

const SYNTHETIC: &[&str] = &[
    "--guest=synthetic",
    "--memory=128M",
    "--fill=0.5",
    "--working-set=8M",
    "--dirty-rate=0",
    "--warmup-ms=100",
    "--device=vfio-sim,size=4M,precopy=1M",
    "--device=vmstate-sim",
];

#[test]
fn synthetic_guest_saved_live_and_idle_restores_exact() {
    let path = file("syn-live");
    let done = save(
        &path,
        SYNTHETIC,
        &["--downtime-limit-ms=1", "--max-rounds=3"],
    );
    let r = &done["report"];
    assert!(r["rounds"].as_array().unwrap().len() >= 2, "{r:#}");
    // Half the guest is zero: those pages are holes, the file holds about the data.
    assert!(
        u64_at(r, &["pages_in_file"]) < 32768 / 2 + 2048 + 64,
        "{r:#}"
    );
    restore_exact(&path, u64_at(&done, &["counter_at_pause"]), 32768, true);
    let idle: Vec<&str> = SYNTHETIC
        .iter()
        .copied()
        .map(|a| {
            if a.starts_with("--working") {
                "--working-set=0"
            } else {
                a
            }
        })
        .collect();
    let done = save(&path, &idle, &[]);
    let rounds = done["report"]["rounds"].as_array().unwrap();
    assert_eq!(
        rounds.len(),
        2,
        "every page, then the paused round: {rounds:#?}"
    );
    assert_eq!(
        u64_at(&rounds[1], &["pages"]),
        0,
        "an idle guest dirties nothing"
    );
    restore_exact(&path, u64_at(&done, &["counter_at_pause"]), 32768, false);
    let _ = std::fs::remove_file(&path);
}

/// The header of the save file at `path`.
fn header_of(path: &Path) -> livemig_wire::file::FileHeader {
    use livemig_wire::file::{FileHeader, FilePrefix, PREFIX_LEN};
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut raw = [0u8; PREFIX_LEN];
    f.read_exact_at(&mut raw, 0).unwrap();
    let prefix = FilePrefix::decode(&raw).unwrap();
    let mut body = vec![0u8; prefix.header_len as usize];
    f.read_exact_at(&mut body, PREFIX_LEN as u64).unwrap();
    FileHeader::decode(&body).unwrap()
}

/// A restore of `path` that must fail, its error containing `says`.
fn refused(path: &Path, extra: &[&str], says: &str) {
    let from = format!("--from=file:{}", path.display());
    let mut args = vec!["incoming", "--json", from.as_str(), "--verify"];
    args.extend_from_slice(extra);
    let mut dest = Proc::spawn(&args);
    let failed = dest.expect_event("failed");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains(says), "expected '{says}' in: {error}");
    assert!(!dest.wait_exit().success());
    assert!(
        !dest.seen.iter().any(|l| l["event"] == "received"),
        "nothing was restored: {:#?}",
        dest.seen
    );
}

#[test]
fn bad_files_are_refused_by_the_restoring_process() {
    use std::os::unix::fs::FileExt;
    let path = file("good");
    let mut small: Vec<&str> = SYNTHETIC.to_vec();
    small.retain(|a| !a.starts_with("--memory"));
    small.push("--memory=32M");
    let done = save(&path, &small, &["--stop-first"]);
    let len = u64_at(&done["report"], &["file_len"]);
    let copy = |name: &str, damage: &dyn Fn(&std::fs::File)| {
        let q = file(name);
        std::fs::copy(&path, &q).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&q)
            .unwrap();
        damage(&f);
        q
    };
    let cut = copy("cut", &|f| f.set_len(len / 2).unwrap());
    refused(&cut, &[], "truncated");
    let version = copy("version", &|f| f.write_all_at(&[7], 8).unwrap());
    refused(&version, &[], "version 7");
    let header = copy("header", &|f| f.write_all_at(&[0xff, 0xff], 36).unwrap());
    refused(&header, &[], "header is corrupted");
    let page = copy("page", &|f| {
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, (1 << 20) + 7).unwrap();
        f.write_all_at(&[!b[0]], (1 << 20) + 7).unwrap();
    });
    refused(&page, &[], "corrupted");
    refused(&page, &["--on-demand"], "is corrupted");
    // A page CRC entry damaged: an eager restore refuses the table before building
    // anything; an on-demand one reads the table a group at a time once the guest runs,
    // and fails naming the group.
    let crcs = header_of(&path).regions[0].crcs.offset;
    let table = copy("table", &|f| {
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, crcs + 4).unwrap();
        f.write_all_at(&[!b[0]], crcs + 4).unwrap();
    });
    refused(&table, &[], "region 0 page CRCs is corrupted");
    refused(
        &table,
        &["--on-demand"],
        "region 0 page CRCs (pages 0 to 1023) is corrupted",
    );
    refused(
        &path,
        &["--max-guest-memory=16M"],
        "more than this side accepts",
    );
    restore_exact(&path, u64_at(&done, &["counter_at_pause"]), 8192, true);
    for q in [&path, &cut, &version, &header, &page, &table] {
        let _ = std::fs::remove_file(q);
    }
}

/// An eager restore of a sparse file (a twentieth of the pages, some in every 2 MiB) into
/// memory advised for huge pages: the process's memory follows the data, not the guest (a
/// page read into an untouched block would otherwise fault the whole 2 MiB in).
#[test]
fn a_sparse_guest_restores_eagerly_to_about_its_data() {
    let path = file("sparse");
    let guest = [
        "--guest=synthetic",
        "--memory=512M",
        "--fill=0.05",
        "--working-set=0",
        "--dirty-rate=0",
        "--warmup-ms=0",
    ];
    let done = save(&path, &guest, &["--stop-first"]);
    let data = u64_at(&done["report"], &["pages_in_file"]) * 4096;
    assert!(data < 32 << 20, "{done:#}");
    let from = format!("--from=file:{}", path.display());
    let mut dest = Proc::spawn(&["incoming", "--json", from.as_str()]);
    let recv = dest.expect_event("received");
    assert!(dest.wait_exit().success());
    assert_eq!(u64_at(&recv["report"], &["pages_read"]) * 4096, data);
    let rss = u64_at(&recv, &["peak_rss_bytes"]);
    assert!(
        rss < data + (64 << 20),
        "peak RSS {} MiB for {} MiB of data in a 512 MiB guest",
        rss >> 20,
        data >> 20
    );
    let _ = std::fs::remove_file(&path);
}
