//! A release migrates to and from the previous protocol version (4). Real processes, one of
//! them made to speak version 4 only by the test hook `protocol=4` (the version-4 layouts it
//! then writes are those of the frozen fixtures, `crates/wire/tests/v4_compat.rs`), every
//! page checked on arrival (`--verify`):
//! - a new source to an old destination: the old one refuses the version-5 hello as version
//!   4 refuses any other version, the source says its hello again in version 4 on a new
//!   connection, and the session runs in version 4;
//! - an old source to a new destination: its version-4 hello is taken as such;
//! - two new ones agree on version 5;
//! - a destination without a feature the source needs refuses it by name, and keeps
//!   listening; a feature the source can do without (zstd) is left off instead.

mod common;
use common::*;
use serde_json::Value;

/// A small guest dirtying memory while it migrates, so that rounds follow round 0.
const GUEST: &[&str] = &[
    "--memory=64M",
    "--working-set=8M",
    "--dirty-rate=20k",
    "--warmup-ms=100",
    "--channels=2",
];
const PAGES: u64 = 64 << 8;
/// [`GUEST`] dirtying as fast as it can, with a downtime limit it cannot meet: precopy never
/// converges, and the session switches to postcopy after round 0.
const POSTCOPY_GUEST: &[&str] = &[
    "--memory=64M",
    "--working-set=8M",
    "--dirty-rate=0",
    "--warmup-ms=100",
    "--channels=2",
    "--downtime-limit-ms=1",
    "--postcopy",
    "--postcopy-after-rounds=1",
];

/// The destination's log lines (`{"event": "log"}`) up to its `received` event, which is
/// returned with them.
fn received(dest: &mut Proc) -> (Value, Vec<String>) {
    let recv = dest.expect_event("received");
    let logs = dest
        .seen
        .iter()
        .filter(|v| v["event"] == "log")
        .map(|v| v["msg"].as_str().unwrap().to_string())
        .collect();
    (recv, logs)
}

/// Every page of the destination's guest checked, none wrong; both processes end well.
fn assert_exact(mut src: Proc, mut dest: Proc, recv: &Value) {
    let v = &recv["report"]["verify"];
    assert_eq!(u64_at(v, &["pages_checked"]), PAGES, "{v:#}");
    assert_eq!(u64_at(v, &["pages_mismatched"]), 0, "{v:#}");
    if !src.seen.iter().any(|l| l["event"] == "completed") {
        src.expect_event("completed");
    }
    assert!(src.wait_exit().success());
    assert!(dest.wait_exit().success());
}

fn session_line(logs: &[String]) -> &str {
    logs.iter()
        .find(|l| l.starts_with("session "))
        .unwrap_or_else(|| panic!("no session accepted in {logs:#?}"))
}

#[test]
fn a_new_source_migrates_to_a_destination_of_version_4() {
    let (mut dest, addr) = Proc::incoming_hooked(&["--verify"], "protocol=4");
    let src = synthetic_source(&addr, GUEST, &["--page-checksums=true"]);
    let (recv, logs) = received(&mut dest);
    // The version-5 hello was refused as a version-4 livemig refuses it ...
    let refused: Vec<&String> = logs
        .iter()
        .filter(|l| l.starts_with("refused a connection"))
        .collect();
    assert_eq!(refused.len(), 1, "{logs:#?}");
    assert!(
        refused[0].contains("unsupported protocol version 5 (this build speaks version 4)"),
        "{logs:#?}"
    );
    // ... and the session that followed speaks version 4, with page checksums.
    let session = session_line(&logs);
    assert!(session.contains("protocol version 4 ("), "{session}");
    assert!(session.contains("page checksums"), "{session}");
    assert_exact(src, dest, &recv);
}

#[test]
fn a_source_of_version_4_migrates_to_a_new_destination() {
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let src = synthetic_source_hooked(&addr, GUEST, &[], "protocol=4");
    let (recv, logs) = received(&mut dest);
    assert!(
        !logs.iter().any(|l| l.starts_with("refused")),
        "a version-4 hello is taken at once: {logs:#?}"
    );
    let session = session_line(&logs);
    assert!(session.contains("protocol version 4 ("), "{session}");
    assert_exact(src, dest, &recv);
}

#[test]
fn two_new_sides_speak_version_5() {
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let src = synthetic_source(&addr, GUEST, &[]);
    let (recv, logs) = received(&mut dest);
    let session = session_line(&logs);
    assert!(
        session.contains("protocol version 5 (zstd compression, page checksums, local mode"),
        "{session}"
    );
    assert!(!logs.iter().any(|l| l.starts_with("refused")), "{logs:#?}");
    assert_exact(src, dest, &recv);
}

/// Local mode to a destination of version 4: the memory files follow the refused hello on
/// the first connection (lost with it), and again the version-4 hello on the second.
#[test]
fn a_new_source_in_local_mode_migrates_to_a_destination_of_version_4() {
    let sock = std::env::temp_dir().join(format!("livemig-v4-local-{}.sock", std::process::id()));
    let listen = format!("--listen=unix:{}", sock.display());
    let mut dest = Proc::spawn_hooked(&["incoming", &listen, "--json", "--verify"], "protocol=4");
    let addr = dest.expect_event("listening")["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let mut src = synthetic_source(&addr, GUEST, &["--local"]);
    let (recv, logs) = received(&mut dest);
    let refused = logs.iter().filter(|l| l.starts_with("refused")).count();
    assert_eq!(refused, 1, "{logs:#?}");
    assert!(
        session_line(&logs).contains("protocol version 4 ("),
        "{logs:#?}"
    );
    let done = src.expect_event("completed");
    assert_eq!(u64_at(&done["report"], &["normal_pages"]), 0, "{done:#}");
    let v = &recv["report"]["verify"];
    assert_eq!(u64_at(v, &["pages_checked"]), PAGES, "{v:#}");
    assert_eq!(u64_at(v, &["pages_mismatched"]), 0, "{v:#}");
    assert!(src.wait_exit().success());
    assert!(dest.wait_exit().success());
}

/// Postcopy (its preempt channel, the switch, pages on request) in a session agreed on
/// version 4, both ways.
#[test]
fn postcopy_works_in_a_version_4_session_both_ways() {
    for (src_hooks, dest_hooks) in [("", "protocol=4"), ("protocol=4", "")] {
        let (mut dest, addr) = Proc::incoming_hooked(&["--verify"], dest_hooks);
        let mut src = synthetic_source_hooked(&addr, POSTCOPY_GUEST, &[], src_hooks);
        let done = src.expect_event("completed");
        let pc = &done["report"]["postcopy"];
        assert!(u64_at(pc, &["pages"]) > 0, "{done:#}");
        let (recv, logs) = received(&mut dest);
        let session = session_line(&logs);
        assert!(session.contains("protocol version 4 ("), "{session}");
        assert!(session.contains("postcopy"), "{session}");
        assert_exact(src, dest, &recv);
    }
}

/// Sides with no version in common (emulated: one speaks 5 only, the other 4 only) fail at
/// set-up, each saying which versions the other speaks, in either direction.
#[test]
fn sides_with_no_version_in_common_say_why() {
    let cases = [
        (
            "protocol=5",
            "protocol=4",
            "the destination speaks protocol version 4, this source version 5",
        ),
        (
            "protocol=4",
            "protocol=5",
            "unsupported protocol version 4 (this build speaks version 5)",
        ),
    ];
    for (src_hooks, dest_hooks, said) in cases {
        let (mut dest, addr) = Proc::incoming_hooked(&["--verify"], dest_hooks);
        let mut src = synthetic_source_hooked(&addr, GUEST, &[], src_hooks);
        let failed = src.expect_event("attempt_failed");
        assert!(
            failed["error"].as_str().unwrap().contains(said),
            "{failed:#}"
        );
        assert_eq!(u64_at(&failed["source_verify"], &["pages_mismatched"]), 0);
        assert!(!src.wait_exit().success());
        let refused = dest.expect_event("log");
        let msg = refused["msg"].as_str().unwrap();
        assert!(
            msg.starts_with("refused a connection: unsupported protocol version"),
            "{msg}"
        );
    }
}

/// A source that needs page checksums, a destination without them: refused by name, the
/// source's guest runs on exact, and the destination still takes the next source.
#[test]
fn a_required_feature_the_destination_lacks_is_refused_by_name() {
    let (mut dest, addr) = Proc::incoming_hooked(&["--verify"], "lack=page-checksums");
    let mut src = synthetic_source(&addr, GUEST, &["--page-checksums=true"]);
    let failed = src.expect_event("attempt_failed");
    let err = failed["error"].as_str().unwrap().to_string();
    let said = "this destination lacks page checksums, which the source requires";
    assert!(err.contains(said), "{failed:#}");
    let v = &failed["source_verify"];
    assert_eq!(u64_at(v, &["pages_checked"]), PAGES, "{failed:#}");
    assert_eq!(u64_at(v, &["pages_mismatched"]), 0, "{failed:#}");
    src.expect_event("failed");
    assert!(!src.wait_exit().success());
    let refused = dest.expect_event("log");
    assert!(
        refused["msg"].as_str().unwrap().contains(said),
        "{refused:#}"
    );
    // Without the checksums the same destination takes it.
    let src = synthetic_source(&addr, GUEST, &[]);
    let (recv, _) = received(&mut dest);
    assert_exact(src, dest, &recv);
}

/// The livemig of version 4 itself, built from the last commit that spoke it (0f43c67):
/// `LIVEMIG_V4_BIN=/path/to/livemig cargo test -p livemig --test
/// protocol_versions_between_processes -- --ignored`.
fn v4_binary() -> String {
    std::env::var("LIVEMIG_V4_BIN")
        .expect("LIVEMIG_V4_BIN: a livemig built from the last version-4 commit")
}

fn v4_proc(args: &[&str]) -> Proc {
    let mut cmd = std::process::Command::new(v4_binary());
    cmd.args(args);
    Proc::start(cmd)
}

#[test]
#[ignore = "needs LIVEMIG_V4_BIN, a livemig built from the last version-4 commit"]
fn a_new_source_migrates_to_the_version_4_build() {
    let mut dest = v4_proc(&["incoming", "--listen=tcp:127.0.0.1:0", "--json", "--verify"]);
    let addr = dest.expect_event("listening")["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let src = synthetic_source(&addr, GUEST, &["--page-checksums=true"]);
    let (recv, logs) = received(&mut dest);
    // The old build refused the version-5 hello once, by its version, and took the retry.
    let refused: Vec<&String> = logs.iter().filter(|l| l.starts_with("refused")).collect();
    assert_eq!(refused.len(), 1, "{logs:#?}");
    assert!(refused[0].contains("version 5"), "{logs:#?}");
    assert_exact(src, dest, &recv);
}

#[test]
#[ignore = "needs LIVEMIG_V4_BIN, a livemig built from the last version-4 commit"]
fn a_new_source_switches_to_postcopy_on_the_version_4_build() {
    let mut dest = v4_proc(&["incoming", "--listen=tcp:127.0.0.1:0", "--json", "--verify"]);
    let addr = dest.expect_event("listening")["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let mut src = synthetic_source(&addr, POSTCOPY_GUEST, &[]);
    let done = src.expect_event("completed");
    assert!(
        u64_at(&done["report"]["postcopy"], &["pages"]) > 0,
        "{done:#}"
    );
    let (recv, _) = received(&mut dest);
    assert_exact(src, dest, &recv);
}

#[test]
#[ignore = "needs LIVEMIG_V4_BIN, a livemig built from the last version-4 commit"]
fn the_version_4_build_migrates_to_a_new_destination() {
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let src = v4_proc(&strs(&synthetic_source_args(&addr, GUEST)));
    let (recv, logs) = received(&mut dest);
    let session = session_line(&logs);
    assert!(session.contains("protocol version 4 ("), "{session}");
    assert!(!logs.iter().any(|l| l.starts_with("refused")), "{logs:#?}");
    assert_exact(src, dest, &recv);
}
