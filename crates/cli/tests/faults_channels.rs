//! Faults on the wire, through livemig's own fault-injecting proxy (`livemig-faultnet`)
//! between a QMP-driven source (`livemig run --qmp`) and a `livemig incoming --json --verify`
//! destination: a data channel or the main channel reset in precopy and in switchover, the
//! main channel lost after handover, corrupted bytes (page data, a frame's magic, its
//! version, the destination's answers), truncated frames, and peers that hang.
//!
//! After each fault: the source's migration failed with an error naming the cause, its
//! guest runs with every page exact and its write counter moving, no migration thread
//! (`lm-src*`, `lm-vm-migrate`) is left and it holds no more threads or descriptors than
//! before; the destination printed `failed` naming the cause, never `received`. Where the
//! source had devices, a retry to a fresh destination completes with every device loaded
//! and every page checked. The proxy's record shows that the fault did fire.
//!
//! The proxy's connections are numbered in accept order: 0 is the main channel, 1 + i is
//! data channel i (the source opens them one after another).

mod common;
mod faults_common;

use common::*;
use faults_common::*;
use livemig_faultnet::{Dir, Fault, Fired, Proxy, Rule, Which};
use livemig_wire::{encode_frame, ChannelHello, FrameKind, SessionId, HEADER_LEN};
use serde_json::{json, Value};
use std::sync::Mutex;
use std::time::Duration;

static SERIAL: Mutex<()> = Mutex::new(());

/// 64 MiB of guest memory: pages the source's check covers.
const PAGES: u64 = 16384;
/// A migration through the proxy ends (one way or the other) within this.
const END: Duration = Duration::from_secs(60);

/// Bytes on a data channel before its first RamPages frame: its ChannelHello.
fn channel_hello_len() -> u64 {
    let hello = ChannelHello {
        session: SessionId([0; 16]),
        index: 0,
    };
    (HEADER_LEN + hello.encode().len()) as u64
}

struct Attempt {
    src: QmpVm,
    dest: Proc,
    proxy: Proxy,
    before: Footprint,
}

/// A source of 64 MiB (plus `src_args`) with migration `params`, a destination, and a
/// proxy with `rules` between them; the migration is started.
fn start(name: &str, src_args: &[&str], params: Value, rules: Vec<Rule>) -> Attempt {
    start_with(name, src_args, params, &[], rules)
}

/// [`start`], the destination started with `dest_args` besides `--verify`.
fn start_with(
    name: &str,
    src_args: &[&str],
    params: Value,
    dest_args: &[&str],
    rules: Vec<Rule>,
) -> Attempt {
    let mut args = vec!["--memory=64M", "--working-set=8M", "--dirty-rate=20k"];
    args.extend_from_slice(src_args);
    let mut src = QmpVm::source(name, &args);
    src.exec("migrate-set-parameters", params);
    let mut d = vec!["--verify"];
    d.extend_from_slice(dest_args);
    let (dest, addr) = Proc::incoming(&d);
    let proxy = Proxy::start(sockaddr(&addr), rules).expect("start the proxy");
    let before = Footprint::of(src.pid());
    src.migrate(&format!("tcp:{}", proxy.addr()));
    Attempt {
        src,
        dest,
        proxy,
        before,
    }
}

impl Attempt {
    /// The source's migration failed with every one of `words` in its error, and the
    /// source is back as it was, its guest running exact. Returns the error.
    fn source_failed(&mut self, words: &[&str], what: &str) -> String {
        let q = self.src.wait_end(END);
        assert_eq!(q["status"], "failed", "{what}: {q:#}");
        let err = q["error-desc"].as_str().unwrap().to_string();
        println!("{what}: source: {err}");
        assert_mentions(&err, words, &format!("{what}: source error"));
        self.before.assert_back(self.src.pid(), what);
        self.src.assert_runs_exact(PAGES, what);
        err
    }

    /// The destination refused with every one of `words`, never resuming. Returns its error.
    fn destination_failed(&mut self, words: &[&str], what: &str) -> String {
        let err = assert_destination_failed(&mut self.dest, words, END);
        println!("{what}: destination: {err}");
        err
    }

    fn fired(&self) -> Vec<Fired> {
        let f = self.proxy.fired();
        assert!(
            !f.is_empty(),
            "the fault never fired: {:?}",
            self.proxy.log()
        );
        f
    }
}

/// A migration of `src` to a fresh destination, without a proxy, completes: every page
/// checked at the destination, and `devices` devices loaded whole (more than `device_bytes`
/// each). Leaves the source in `postmigrate`.
fn retry_completes(src: &mut QmpVm, devices: usize, device_bytes: u64) {
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    src.exec("migrate-set-parameters", json!({"max-bandwidth": 0}));
    src.migrate(&addr);
    let q = src.wait_end(END);
    assert_eq!(q["status"], "completed", "the retry: {q:#}");
    let states = q["device-state"].as_array().unwrap();
    assert_eq!(states.len(), devices, "{q:#}");
    for d in states {
        assert!(d["bytes"].as_u64().unwrap() > device_bytes, "{d:#}");
    }
    let recv = dest.expect_event("received");
    assert_eq!(
        u64_at(&recv["report"]["verify"], &["pages_checked"]),
        PAGES,
        "{recv:#}"
    );
    assert_eq!(u64_at(&recv["report"]["verify"], &["pages_mismatched"]), 0);
    assert!(dest.wait_exit().success());
    assert_eq!(src.run_state(), "postmigrate");
}

/// A slow device: its final save lasts about 1.6 s, the switchover as long (with a downtime
/// limit above that, [`SLOW_LIMIT`]: the switchover counts the device's read time).
const SLOW_DEVICE: &str = "--device=vfio-sim,size=32M,rate=20M";
/// A downtime limit the slow device fits, milliseconds.
const SLOW_LIMIT: u64 = 10_000;

#[test]
fn a_data_channel_reset_in_precopy_fails_the_attempt_and_the_guest_runs_on() {
    let _s = serial(&SERIAL);
    // 64 MiB at 64 MiB/s: round 0 lasts about a second; data channel 0 is reset 2 MiB in.
    let mut a = start(
        "dc-precopy",
        &[],
        json!({"max-bandwidth": 64 << 20}),
        vec![Rule::reset_after(Which::Nth(1), Dir::Up, 2 << 20)],
    );
    a.source_failed(&["data channel 0"], "data channel reset in precopy");
    a.destination_failed(&["data channel 0"], "data channel reset in precopy");
    let f = a.fired();
    assert_eq!((f[0].conn, f[0].fault), (1, Fault::Reset));
    a.src.quit();
}

#[test]
fn a_data_channel_reset_in_switchover_resumes_the_guest_with_its_devices() {
    let _s = serial(&SERIAL);
    let mut a = start(
        "dc-switchover",
        &[SLOW_DEVICE, "--device=vmstate-sim"],
        json!({ "downtime-limit": SLOW_LIMIT }),
        vec![],
    );
    // The guest pauses; the device's final save takes about 1.6 s: reset data channel 1
    // 300 ms into it, while its chunks flow.
    a.src.wait_run_state("finish-migrate", END);
    std::thread::sleep(Duration::from_millis(300));
    assert!(a.proxy.fault(2, Fault::Reset));
    a.source_failed(&["data channel 1"], "data channel reset in switchover");
    a.destination_failed(&["data channel 1"], "data channel reset in switchover");
    retry_completes(&mut a.src, 1, 32 << 20);
    a.src.quit();
}

#[test]
fn a_main_channel_reset_in_precopy_fails_the_attempt_and_the_guest_runs_on() {
    let _s = serial(&SERIAL);
    let mut a = start(
        "main-precopy",
        &[],
        json!({"max-bandwidth": 64 << 20}),
        vec![],
    );
    let deadline = std::time::Instant::now() + END;
    while a.proxy.bytes(1, Dir::Up) < 4 << 20 {
        assert!(std::time::Instant::now() < deadline, "{:?}", a.proxy.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(a.proxy.fault(0, Fault::Reset));
    a.source_failed(&["main channel"], "main channel reset in precopy");
    a.destination_failed(&["main channel"], "main channel reset in precopy");
    a.src.quit();
}

#[test]
fn a_main_channel_reset_in_switchover_resumes_the_guest_with_its_devices() {
    let _s = serial(&SERIAL);
    let mut a = start(
        "main-switchover",
        &[SLOW_DEVICE, "--device=vmstate-sim"],
        json!({ "downtime-limit": SLOW_LIMIT }),
        vec![],
    );
    a.src.wait_run_state("finish-migrate", END);
    std::thread::sleep(Duration::from_millis(300));
    assert!(a.proxy.fault(0, Fault::Reset));
    a.source_failed(&["main channel"], "main channel reset in switchover");
    a.destination_failed(&["main channel"], "main channel reset in switchover");
    retry_completes(&mut a.src, 1, 32 << 20);
    a.src.quit();
}

/// The destination runs the guest and its `Resumed` is lost (the main channel hangs right
/// after the source's `Handover` went through, then is reset): the source cannot know
/// whether the destination runs the guest, says so, and keeps its copy paused for good.
/// Exactly one copy runs: the destination's, exact.
#[test]
fn a_main_channel_lost_after_handover_leaves_exactly_one_running_copy() {
    let _s = serial(&SERIAL);
    let handover = encode_frame(FrameKind::Handover, &[]);
    let mut src = QmpVm::source(
        "after-handover",
        &["--memory=64M", "--working-set=8M", "--dirty-rate=20k"],
    );
    let (mut dest, addr) = Proc::incoming(&["--verify", "--run-after-ms=500"]);
    let proxy = Proxy::start(
        sockaddr(&addr),
        vec![Rule::after_pattern(
            Which::Nth(0),
            Dir::Up,
            &handover,
            Fault::Hang,
        )],
    )
    .unwrap();
    let before = Footprint::of(src.pid());
    src.migrate(&format!("tcp:{}", proxy.addr()));
    let recv = dest.expect_event("received");
    assert_eq!(u64_at(&recv["report"]["verify"], &["pages_mismatched"]), 0);
    // The source still waits for Resumed: the link is hung, not closed.
    assert_eq!(src.query_migrate()["status"], "active");
    assert_eq!(src.run_state(), "finish-migrate");
    assert!(proxy.fault(0, Fault::Reset));
    let q = src.wait_end(END);
    assert_eq!(q["status"], "failed", "{q:#}");
    let err = q["error-desc"].as_str().unwrap();
    println!("lost Resumed: source: {err}");
    assert_mentions(
        err,
        &["handover outcome unknown", "stays paused"],
        "source error",
    );
    // Never runs here again, and refuses to.
    assert_eq!(src.run_state(), "postmigrate");
    assert!(src.client.execute("cont", json!({})).is_err());
    before.assert_back(src.pid(), "lost Resumed");
    // The destination's copy ran on, exact.
    let after = dest.expect_event("after_run");
    assert_eq!(u64_at(&after["verify"], &["pages_mismatched"]), 0);
    assert!(dest.wait_exit().success());
    let f = proxy.fired();
    assert_eq!(f[0].fault, Fault::Hang);
    src.quit();
}

/// The main channel is reset right after the source's `Handover` reached the destination,
/// before the destination's `Resumed` could go back. The source keeps its copy paused
/// (it cannot know); the destination should keep running the guest it has resumed, since
/// the source will never run it again. Whether the destination's `Resumed` gets into its
/// socket before the reset arrives is a race: five tries, each of which must keep the guest.
#[test]
fn a_main_channel_reset_right_after_handover_must_not_lose_the_guest() {
    let _s = serial(&SERIAL);
    let handover = encode_frame(FrameKind::Handover, &[]);
    for i in 0..5 {
        let mut src = QmpVm::source(
            "reset-after-handover",
            &["--memory=64M", "--working-set=8M", "--dirty-rate=20k"],
        );
        let (mut dest, addr) = Proc::incoming(&["--verify", "--run-after-ms=500"]);
        let proxy = Proxy::start(
            sockaddr(&addr),
            vec![Rule::after_pattern(
                Which::Nth(0),
                Dir::Up,
                &handover,
                Fault::Reset,
            )],
        )
        .unwrap();
        src.migrate(&format!("tcp:{}", proxy.addr()));
        let q = src.wait_end(END);
        assert_eq!(q["status"], "failed", "try {i}: {q:#}");
        assert_mentions(
            q["error-desc"].as_str().unwrap(),
            &["handover outcome unknown"],
            "source error",
        );
        assert_eq!(src.run_state(), "postmigrate");
        assert_eq!(proxy.fired()[0].fault, Fault::Reset);
        // The guest must run somewhere: at the destination.
        let end = dest.wait_within(&["received", "failed"], END).unwrap();
        assert_eq!(
            end["event"], "received",
            "try {i}: the guest was lost: the source keeps its copy paused and the destination \
             dropped the one it had resumed: {end:#}"
        );
        let after = dest.expect_event("after_run");
        assert_eq!(u64_at(&after["verify"], &["pages_mismatched"]), 0);
        src.quit();
    }
}

/// Runs a migration through a proxy with one `rule` on the wire and checks it fails on both
/// sides with the words given.
fn wire_fault(name: &str, rule: Rule, src_words: &[&str], dst_words: &[&str]) -> Attempt {
    let mut a = start(
        name,
        &[],
        // Page CRCs on (they are off by default): the corrupted page must be caught.
        json!({"max-bandwidth": 64 << 20, "x-page-checksums": true}),
        vec![rule.clone()],
    );
    a.source_failed(src_words, name);
    a.destination_failed(dst_words, name);
    let f = a.fired();
    assert_eq!(f[0].fault, rule.fault, "{f:?}");
    a
}

#[test]
fn a_corrupted_byte_of_page_data_fails_the_crc_check() {
    let _s = serial(&SERIAL);
    // A byte 12 MiB into data channel 0's stream: almost surely page data (headers and
    // prefixes are 0.3 % of it) of a page well past the 8 MiB the guest keeps dirtying. The
    // page arrives torn and is never sent again, so the destination refuses the end of the
    // migration as corrupted. (A flip in the first packets would heal: those pages are
    // dirtied again and re-sent intact, as a page torn by the guest is.)
    let at = channel_hello_len() + (12 << 20);
    let a = wire_fault(
        "corrupt-page",
        Rule::flip_at(Which::Nth(1), Dir::Up, at, 0x01),
        &["CRC32C"],
        &["CRC32C"],
    );
    a.src.quit();
}

#[test]
fn a_corrupted_byte_of_a_packet_prefix_fails_the_frame_crc_at_once() {
    let _s = serial(&SERIAL);
    // A byte of the page offsets in data channel 0's first packet: the prefix, covered by
    // the frame CRC (the page CRCs follow the data, in the trailer).
    let at = channel_hello_len() + 16 + 16 + 100;
    let a = wire_fault(
        "corrupt-prefix",
        Rule::flip_at(Which::Nth(1), Dir::Up, at, 0x01),
        &["CRC32C mismatch", "data channel 0"],
        &["CRC32C mismatch", "data channel 0"],
    );
    a.src.quit();
}

#[test]
fn a_wrong_magic_in_the_middle_of_a_data_channel_is_refused() {
    let _s = serial(&SERIAL);
    // The first byte of data channel 1's first RamPages frame header.
    let a = wire_fault(
        "wrong-magic",
        Rule::flip_at(Which::Nth(2), Dir::Up, channel_hello_len(), 0x20),
        &["bad magic", "data channel 1"],
        &["bad magic", "data channel 1"],
    );
    a.src.quit();
}

#[test]
fn a_wrong_version_in_the_middle_of_a_data_channel_is_refused() {
    let _s = serial(&SERIAL);
    // The version becomes 0 in data channel 0's first RamPages frame header.
    let a = wire_fault(
        "wrong-version",
        Rule::flip_at(
            Which::Nth(1),
            Dir::Up,
            channel_hello_len() + 4,
            livemig_wire::FRAME_VERSION as u8,
        ),
        &["version 0", "data channel 0"],
        &["version 0", "data channel 0"],
    );
    a.src.quit();
}

#[test]
fn a_corrupted_answer_of_the_destination_fails_the_attempt() {
    let _s = serial(&SERIAL);
    // The main channel back to the source: SessionAccept (16 + 10 + 16 bytes in version
    // 5), then the first RoundAck, whose payload byte is flipped.
    let accept = HEADER_LEN as u64 + 10 + 16;
    let a = wire_fault(
        "corrupt-answer",
        Rule::flip_at(Which::Nth(0), Dir::Down, accept + 16, 0x01),
        &["main channel", "CRC32C mismatch", "RoundAck"],
        &["main channel", "CRC32C mismatch"],
    );
    a.src.quit();
}

#[test]
fn a_data_channel_cut_in_the_middle_of_a_frame_is_a_clear_truncation() {
    let _s = serial(&SERIAL);
    // Data channel 1 ends (a clean FIN) 300 000 bytes into its first 525 328-byte packet.
    let a = wire_fault(
        "truncated-frame",
        Rule::cut_after(Which::Nth(2), Dir::Up, channel_hello_len() + 16 + 300_000),
        &["data channel 1"],
        &["data channel 1", "connection closed inside"],
    );
    a.src.quit();
}

#[test]
fn a_truncated_session_hello_is_refused_and_the_destination_keeps_listening() {
    let _s = serial(&SERIAL);
    let mut src = QmpVm::source(
        "truncated-hello",
        &["--memory=64M", "--working-set=8M", "--dirty-rate=20k"],
    );
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let proxy = Proxy::start(
        sockaddr(&addr),
        vec![Rule::cut_after(Which::Nth(0), Dir::Up, 20)],
    )
    .unwrap();
    let before = Footprint::of(src.pid());
    src.migrate(&format!("tcp:{}", proxy.addr()));
    let q = src.wait_end(END);
    assert_eq!(q["status"], "failed", "{q:#}");
    let err = q["error-desc"].as_str().unwrap();
    println!("truncated SessionHello: source: {err}");
    assert_mentions(err, &["main channel"], "source error");
    before.assert_back(src.pid(), "truncated SessionHello");
    src.assert_runs_exact(PAGES, "truncated SessionHello");
    let refused = wait_log(&mut dest, "refused a connection", END);
    println!("truncated SessionHello: destination: {}", refused["msg"]);
    assert_mentions(
        refused["msg"].as_str().unwrap(),
        &["connection closed inside a frame"],
        "destination log",
    );
    // The same destination still takes the real migration, straight.
    src.migrate(&addr);
    let q = src.wait_end(END);
    assert_eq!(q["status"], "completed", "{q:#}");
    let recv = dest.expect_event("received");
    assert_eq!(u64_at(&recv["report"]["verify"], &["pages_mismatched"]), 0);
    assert!(dest.wait_exit().success());
    src.quit();
}

/// Ten attempts, each reset on another connection at another offset, then one that
/// completes: the source and a QMP destination that took every attempt hold no more
/// threads, descriptors or memory than after the first.
#[test]
fn ten_resets_in_a_row_leak_nothing_on_either_side() {
    let _s = serial(&SERIAL);
    let mut src = QmpVm::source(
        "ten-resets",
        &["--memory=64M", "--working-set=8M", "--dirty-rate=20k"],
    );
    let mut dst = QmpVm::destination("ten-resets", &["--verify"]);
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let target = sockaddr(&uri);
    src.exec("migrate-set-parameters", json!({"max-bandwidth": 64 << 20}));
    let attempt = |i: usize, src: &mut QmpVm, dst: &mut QmpVm| {
        dst.exec("migrate-incoming", json!({ "uri": uri }));
        // Connections 0..=4 (main, data 0..3): the main channel in the destination's
        // answers (its SessionAccept and first RoundAcks), a data channel anywhere in its
        // first 1 MiB (every one carries at least two packets of round 0).
        let conn = i % 5;
        let (dir, at) = if conn == 0 {
            (Dir::Down, 10 + 7 * i as u64)
        } else {
            (Dir::Up, (i as u64 * 100_003) % (1 << 20))
        };
        let proxy =
            Proxy::start(target, vec![Rule::reset_after(Which::Nth(conn), dir, at)]).unwrap();
        src.migrate(&format!("tcp:{}", proxy.addr()));
        let q = src.wait_end(END);
        assert_eq!(
            q["status"],
            "failed",
            "attempt {i}: {q:#} {:?} {:?}",
            proxy.log(),
            (0..5)
                .map(|c| (proxy.bytes(c, Dir::Up), proxy.bytes(c, Dir::Down)))
                .collect::<Vec<_>>()
        );
        let d = dst.wait_end(END);
        assert_eq!(d["status"], "failed", "attempt {i}: destination {d:#}");
        drop(proxy);
        src.assert_runs_exact(PAGES, &format!("attempt {i}"));
    };
    attempt(0, &mut src, &mut dst);
    let (src0, dst0) = (Footprint::of(src.pid()), Footprint::of(dst.pid()));
    for i in 1..=10 {
        attempt(i, &mut src, &mut dst);
    }
    let src1 = src0.assert_back(src.pid(), "source after ten resets");
    let dst1 = dst0.assert_back(dst.pid(), "destination after ten resets");
    println!(
        "ten resets: source RSS {} -> {} MiB, fds {} -> {}; destination RSS {} -> {} MiB, \
         fds {} -> {}",
        src0.rss >> 20,
        src1.rss >> 20,
        src0.fds,
        src1.fds,
        dst0.rss >> 20,
        dst1.rss >> 20,
        dst0.fds,
        dst1.fds
    );
    // A destination guest (64 MiB) kept per attempt would be 640 MiB.
    assert!(src1.rss < src0.rss + (48 << 20), "source RSS grew");
    assert!(dst1.rss < dst0.rss + (48 << 20), "destination RSS grew");
    dst.exec("migrate-incoming", json!({ "uri": uri }));
    src.exec("migrate-set-parameters", json!({"max-bandwidth": 0}));
    src.migrate(&uri);
    assert_eq!(src.wait_end(END)["status"], "completed");
    assert_eq!(dst.wait_end(END)["status"], "completed");
    let v = dst.verify();
    assert_eq!(v["pages-mismatched"], 0, "{v:#}");
    assert_eq!(v["pages-checked"], PAGES);
    src.quit();
    dst.quit();
}

// Hung links: the proxy stops forwarding and closes nothing, both processes alive (unlike a
// SIGSTOPped peer, see dead_peers_are_detected.rs, the peers' own sockets stay healthy and
// keep accepting bytes until their buffers fill). Both sides run with a peer timeout of 2 s.

const PEER_TIMEOUT_MS: u64 = 2000;

/// The attempt failed within a bound set by the peer timeout, saying why.
fn failed_in_time(a: &mut Attempt, hung: std::time::Instant, words: &[&str], what: &str) {
    let err = a.source_failed(words, what);
    let waited = hung.elapsed();
    println!("{what}: failed {waited:?} after the link hung");
    assert!(
        waited < Duration::from_millis(PEER_TIMEOUT_MS * 5),
        "{what}: found after {waited:?}: {err}"
    );
}

/// A data channel stops forwarding in precopy without closing: the attempt fails within
/// the peer timeout's bound, the guest runs on, the destination drops what it had.
#[test]
fn a_data_channel_that_hangs_in_precopy_fails_within_the_peer_timeout() {
    let _s = serial(&SERIAL);
    let pt = format!("--peer-timeout-ms={PEER_TIMEOUT_MS}");
    let mut a = start_with(
        "hang-precopy",
        &[],
        json!({"max-bandwidth": 64 << 20, "x-peer-timeout": PEER_TIMEOUT_MS}),
        &[&pt],
        vec![Rule::hang_after(Which::Nth(1), Dir::Up, 2 << 20)],
    );
    while a.proxy.fired().is_empty() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let hung = std::time::Instant::now();
    failed_in_time(&mut a, hung, &[], "hung data channel in precopy");
    a.destination_failed(&[], "hung data channel in precopy");
    a.src.quit();
}

/// When data channel 0 hangs, the error both sides report should name data channel 0 and
/// the timeout. Three tries (each masked most of the time today).
#[test]
fn a_hung_data_channel_is_named_as_the_cause() {
    let _s = serial(&SERIAL);
    let pt = format!("--peer-timeout-ms={PEER_TIMEOUT_MS}");
    for i in 0..3 {
        let mut a = start_with(
            "hang-cause",
            &[],
            json!({"max-bandwidth": 64 << 20, "x-peer-timeout": PEER_TIMEOUT_MS}),
            &[&pt],
            vec![Rule::hang_after(Which::Nth(1), Dir::Up, 2 << 20)],
        );
        let what = format!("hung data channel 0, try {i}");
        a.destination_failed(&["data channel 0", "peer timeout"], &what);
        a.source_failed(&["data channel 0", "peer timeout"], &what);
        a.src.quit();
    }
}

/// The main channel stops forwarding during switchover (the guest paused, the device's
/// final state on its way): the attempt fails within the peer timeout's bound and the guest
/// runs on here with its devices.
#[test]
fn a_main_channel_that_hangs_in_switchover_fails_within_the_peer_timeout() {
    let _s = serial(&SERIAL);
    let pt = format!("--peer-timeout-ms={PEER_TIMEOUT_MS}");
    let mut a = start_with(
        "hang-switchover",
        &[SLOW_DEVICE],
        json!({"x-peer-timeout": PEER_TIMEOUT_MS, "downtime-limit": SLOW_LIMIT}),
        &[&pt],
        vec![],
    );
    a.src.wait_run_state("finish-migrate", END);
    assert!(a.proxy.fault(0, Fault::Hang));
    let hung = std::time::Instant::now();
    failed_in_time(
        &mut a,
        hung,
        &["main channel"],
        "hung main channel in switchover",
    );
    a.destination_failed(&[], "hung main channel in switchover");
    retry_completes(&mut a.src, 1, 32 << 20);
    a.src.quit();
}

/// Every connection stops forwarding in precopy: both sides find it within the peer
/// timeout's bound; the destination never resumes anything.
#[test]
fn a_link_that_hangs_whole_is_found_by_both_sides() {
    let _s = serial(&SERIAL);
    let pt = format!("--peer-timeout-ms={PEER_TIMEOUT_MS}");
    let mut a = start_with(
        "hang-all",
        &[],
        json!({"max-bandwidth": 64 << 20, "x-peer-timeout": PEER_TIMEOUT_MS}),
        &[&pt],
        vec![],
    );
    assert!(a.proxy.wait_connections(5, END));
    while a.proxy.bytes(1, Dir::Up) < 2 << 20 {
        std::thread::sleep(Duration::from_millis(5));
    }
    for c in 0..5 {
        assert!(a.proxy.fault(c, Fault::Hang));
    }
    let hung = std::time::Instant::now();
    let err = a.destination_failed(&[], "whole link hung");
    println!(
        "whole link hung: destination gave up after {:?}",
        hung.elapsed()
    );
    assert!(
        hung.elapsed() < Duration::from_millis(PEER_TIMEOUT_MS * 5),
        "{err}"
    );
    failed_in_time(&mut a, hung, &[], "whole link hung");
    a.src.quit();
}
