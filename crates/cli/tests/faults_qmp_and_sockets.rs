//! Peers of the QMP socket and owners of `unix:` paths, against real `livemig` processes:
//!
//! - a `unix:` listen path (`incoming --listen`, `run --qmp`, `incoming --qmp`, QMP
//!   `migrate-incoming`) that is a regular file, a directory or a live socket is refused
//!   naming the path and what it is, and left as it was; a stale socket (nobody listens) is
//!   replaced; `migrate-incoming` aimed at the destination's own QMP socket is refused and QMP
//!   goes on; a listener that goes away removes its path only if the path is still its socket;
//! - a QMP client that does not read never stalls the VM's thread: the other clients' commands
//!   are answered at once with every event, and the laggard is disconnected with a reason;
//! - duplicate keys in a QMP object are refused, QEMU's way;
//! - silent QMP clients are closed after the negotiation timeout, and a full client table
//!   answers a new client with an error naming why.
//!
//! The idle limit (an idle client gives its slot to a new one when every slot is taken) is
//! tested in-process with short limits, in `crates/qmp/tests/server.rs`.

mod common;
mod faults_common;

use common::*;
use faults_common::*;
use livemig_qmp::Client;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

const PRECIOUS: &str = "not a socket: must survive\n";

/// A `livemig` process whose stderr goes to a file (to read its refusals and logs), killed
/// on drop.
struct Logged {
    child: Child,
    log: PathBuf,
}

impl Logged {
    fn spawn(args: &[&str], log: PathBuf) -> Logged {
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_livemig"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("start livemig");
        Logged { child, log }
    }

    /// Its exit status if it ends within `t`.
    fn ends_within(&mut self, t: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + t;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `livemig ARGS` must fail at once (within 20 s: a guest is started first for `run`),
/// with an error naming every one of `words`.
fn assert_refused(dir: &Path, args: &[&str], words: &[&str]) {
    let mut p = Logged::spawn(args, dir.join("stderr.log"));
    let status = p.ends_within(Duration::from_secs(20));
    let err = p.stderr();
    let what = format!("livemig {}", args.join(" "));
    let status = status.unwrap_or_else(|| panic!("{what}: still running; it should refuse: {err}"));
    assert!(!status.success(), "{what}: exited with success: {err}");
    println!("{what}: {}", err.trim_end());
    assert_mentions(&err, words, &what);
}

fn write_precious(path: &Path) {
    std::fs::write(path, PRECIOUS).unwrap();
}

fn assert_precious(path: &Path, what: &str) {
    let got = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{what}: {} is gone: {e}", path.display()));
    assert_eq!(got, PRECIOUS, "{what}: {} was changed", path.display());
}

/// A stale socket at `path`: bound, then closed without removing the file.
fn stale_socket(path: &Path) {
    drop(UnixListener::bind(path).unwrap());
    assert!(std::fs::metadata(path).unwrap().file_type().is_socket());
    assert_eq!(
        UnixStream::connect(path).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
}

/// `listener` still owns its path: a connection to the path reaches it.
fn assert_still_served(listener: &UnixListener, path: &Path, what: &str) {
    let _c = UnixStream::connect(path).unwrap_or_else(|e| {
        panic!(
            "{what}: {} no longer reaches its socket: {e}",
            path.display()
        )
    });
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match listener.accept() {
            Ok(_) => return,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("{what}: the connection reached another socket: {e}"),
        }
    }
}

fn connect_qmp(path: &Path) -> Client {
    Client::connect(path, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("QMP on {}: {e}", path.display()))
}

#[test]
fn a_unix_listen_path_that_is_not_a_socket_is_refused_and_left_alone() {
    let _s = serial(&SERIAL);
    let dir = tmp_dir("not-a-socket");
    let file = dir.join("precious.txt");
    write_precious(&file);
    let f = file.to_str().unwrap();
    let listen = format!("unix:{f}");
    assert_refused(
        &dir,
        &["incoming", "--json", "--listen", &listen],
        &[f, "regular file", "not a socket"],
    );
    assert_precious(&file, "incoming --listen");
    assert_refused(
        &dir,
        &["run", "--guest=synthetic", "--memory=16M", "--qmp", f],
        &[f, "regular file", "not a socket"],
    );
    assert_precious(&file, "run --qmp");
    assert_refused(
        &dir,
        &["incoming", "--qmp", f],
        &[f, "regular file", "not a socket"],
    );
    assert_precious(&file, "incoming --qmp");
    let sub = dir.join("a-directory");
    std::fs::create_dir_all(&sub).unwrap();
    let listen_dir = format!("unix:{}", sub.display());
    assert_refused(
        &dir,
        &["incoming", "--json", "--listen", &listen_dir],
        &[sub.to_str().unwrap(), "directory", "not a socket"],
    );
    assert!(sub.is_dir());

    // QMP migrate-incoming: the command's error, the file kept, the VM still waiting.
    let mut dst = QmpVm::destination("not-a-socket-qmp", &[]);
    let e = dst
        .client
        .execute("migrate-incoming", json!({ "uri": listen }))
        .expect_err("migrate-incoming on a regular file must fail")
        .to_string();
    println!("migrate-incoming {listen}: {e}");
    assert_mentions(&e, &[f, "regular file", "not a socket"], "migrate-incoming");
    assert_precious(&file, "migrate-incoming");
    assert_eq!(dst.run_state(), "inmigrate");
    dst.quit();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn migrate_incoming_at_the_own_qmp_socket_is_refused_and_qmp_goes_on() {
    let _s = serial(&SERIAL);
    let mut dst = QmpVm::destination("own-qmp", &[]);
    let own = dst.sock.clone();
    let uri = format!("unix:{}", own.display());
    let e = dst
        .client
        .execute("migrate-incoming", json!({ "uri": uri }))
        .expect_err("migrate-incoming on the VM's own QMP socket must fail")
        .to_string();
    println!("migrate-incoming {uri}: {e}");
    assert_mentions(&e, &[own.to_str().unwrap(), "in use"], "migrate-incoming");
    // The QMP socket is still there and a new client gets in.
    let mut again = connect_qmp(&own);
    assert_eq!(
        again.execute("query-status", json!({})).unwrap()["status"],
        "inmigrate"
    );
    // And `incoming --qmp P --listen unix:P` is refused, not served by one or the other.
    let dir = tmp_dir("own-qmp-cli");
    let p = dir.join("both.sock");
    let listen = format!("unix:{}", p.display());
    assert_refused(
        &dir,
        &[
            "incoming",
            "--qmp",
            p.to_str().unwrap(),
            "--listen",
            &listen,
        ],
        &[p.to_str().unwrap(), "in use"],
    );
    drop(again);
    dst.quit();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_is_refused() {
    let _s = serial(&SERIAL);
    let dir = tmp_dir("stale-live");

    // Stale: replaced, for a migration listener and for QMP.
    let stale = dir.join("stale.sock");
    stale_socket(&stale);
    let listen = format!("unix:{}", stale.display());
    let mut dst = Proc::spawn(&["incoming", "--json", "--listen", &listen]);
    let l = dst.expect_event("listening");
    assert_eq!(l["addr"], listen.as_str());
    UnixStream::connect(&stale).expect("the destination listens on the stale socket's path");
    drop(dst);
    let stale_qmp = dir.join("stale.qmp");
    stale_socket(&stale_qmp);
    let mut vm = Logged::spawn(
        &["incoming", "--qmp", stale_qmp.to_str().unwrap()],
        dir.join("stale-qmp.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut c = loop {
        match Client::connect(&stale_qmp, Duration::from_secs(10)) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("QMP on a stale socket's path: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    assert_eq!(
        c.execute("query-status", json!({})).unwrap()["status"],
        "inmigrate"
    );
    let _ = c.execute("quit", json!({}));
    assert!(vm.ends_within(Duration::from_secs(10)).is_some());

    // Live (someone accepts on it): refused everywhere, and its owner keeps it.
    let live = dir.join("live.sock");
    let owner = UnixListener::bind(&live).unwrap();
    let l = live.to_str().unwrap();
    let listen = format!("unix:{l}");
    assert_refused(
        &dir,
        &["incoming", "--json", "--listen", &listen],
        &[l, "in use"],
    );
    assert_still_served(&owner, &live, "incoming --listen");
    assert_refused(
        &dir,
        &["run", "--guest=synthetic", "--memory=16M", "--qmp", l],
        &[l, "in use"],
    );
    assert_still_served(&owner, &live, "run --qmp");
    assert_refused(&dir, &["incoming", "--qmp", l], &[l, "in use"]);
    assert_still_served(&owner, &live, "incoming --qmp");
    let mut dst = QmpVm::destination("stale-live-qmp", &[]);
    let e = dst
        .client
        .execute("migrate-incoming", json!({ "uri": listen }))
        .expect_err("migrate-incoming on a live socket must fail")
        .to_string();
    assert_mentions(&e, &[l, "in use"], "migrate-incoming");
    assert_still_served(&owner, &live, "migrate-incoming");
    dst.quit();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_listener_removes_its_path_only_while_the_path_is_its_own() {
    let _s = serial(&SERIAL);
    let dir = tmp_dir("not-ours");

    // migrate-incoming's listener: the path replaced behind its back, then cancelled.
    let mut dst = QmpVm::destination("not-ours-qmp", &[]);
    let p = dir.join("mig.sock");
    let uri = format!("unix:{}", p.display());
    dst.exec("migrate-incoming", json!({ "uri": uri }));
    assert!(std::fs::metadata(&p).unwrap().file_type().is_socket());
    let other = dir.join("other.txt");
    write_precious(&other);
    std::fs::rename(&other, &p).unwrap();
    dst.exec("migrate_cancel", json!({}));
    let q = dst.wait_end(Duration::from_secs(20));
    assert_eq!(q["status"], "cancelled", "{q:#}");
    std::thread::sleep(Duration::from_millis(200));
    assert_precious(&p, "migrate-incoming's listener, after cancel");
    // Its own path it does remove.
    let own = dir.join("own.sock");
    dst.exec(
        "migrate-incoming",
        json!({ "uri": format!("unix:{}", own.display()) }),
    );
    assert!(own.exists());
    dst.exec("migrate_cancel", json!({}));
    dst.wait_end(Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(5);
    while own.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!own.exists(), "a listener removes its own socket file");

    // The QMP server: its socket path replaced, then quit.
    let qmp = dst.sock.clone();
    write_precious(&other);
    std::fs::rename(&other, &qmp).unwrap();
    let _ = dst.client.execute("quit", json!({}));
    dst.proc.wait_exit();
    assert_precious(&qmp, "the QMP server, after quit");
    drop(dst);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A raw QMP connection: the greeting read, capabilities negotiated (or not).
fn raw_qmp(path: &Path, negotiate: bool) -> (UnixStream, BufReader<UnixStream>) {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"QMP\""), "greeting: {line}");
    let mut w = s;
    if negotiate {
        w.write_all(br#"{"execute":"qmp_capabilities"}"#).unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("\"return\""), "{line}");
    }
    (w, r)
}

/// Reads until EOF (within `t`); the lines read. Panics if the connection stays open.
fn read_to_eof(r: &mut BufReader<UnixStream>, t: Duration, what: &str) -> Vec<String> {
    r.get_ref().set_read_timeout(Some(t)).unwrap();
    let deadline = Instant::now() + t;
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => return lines,
            Ok(_) => lines.push(line),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return lines,
            Err(e) => panic!(
                "{what}: still open after {t:?} ({e}); read {} lines",
                lines.len()
            ),
        }
        assert!(Instant::now() < deadline, "{what}: still open after {t:?}");
    }
}

#[test]
fn a_qmp_client_that_does_not_read_does_not_stall_the_vm() {
    let _s = serial(&SERIAL);
    let dir = tmp_dir("slow-reader");
    let sock = dir.join("src.qmp");
    let vm = Logged::spawn(
        &[
            "run",
            "--guest=synthetic",
            "--memory=16M",
            "--qmp",
            sock.to_str().unwrap(),
        ],
        dir.join("stderr.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut fast = loop {
        match Client::connect(&sock, Duration::from_secs(30)) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("QMP: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    // Negotiated (so it is sent every event), then never reads again; its receive buffer
    // as small as the kernel allows.
    let (slow_w, mut slow_r) = raw_qmp(&sock, true);
    // SAFETY: sets an int socket option on a valid descriptor from a live UnixStream.
    unsafe {
        use std::os::fd::AsRawFd;
        let v: libc::c_int = 1;
        libc::setsockopt(
            slow_w.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }

    // Each stop and cont sends an event to both clients. Was: once the slow client's socket
    // was full, each event blocked the VM's thread for up to 5 s.
    const ROUNDS: usize = 1500;
    let mut worst = Duration::ZERO;
    for i in 0..ROUNDS {
        for cmd in ["stop", "cont"] {
            let t = Instant::now();
            fast.execute(cmd, json!({}))
                .unwrap_or_else(|e| panic!("{cmd} #{i}: {e}"));
            let took = t.elapsed();
            worst = worst.max(took);
            assert!(
                took < Duration::from_secs(2),
                "{cmd} #{i} took {took:?}: a client that does not read stalled the VM's thread"
            );
        }
    }
    println!("{} commands, the slowest answered in {worst:?}", 2 * ROUNDS);
    // The reading client got every event, in order.
    let names: Vec<&str> = fast
        .events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2 * ROUNDS, "events to the reading client");
    assert!(
        names.chunks(2).all(|p| p == ["STOP", "RESUME"]),
        "events out of order"
    );
    // The laggard was disconnected (what it had been sent, then EOF), with a reason logged.
    let lines = read_to_eof(
        &mut slow_r,
        Duration::from_secs(20),
        "the client that does not read",
    );
    assert!(
        lines.len() < 2 * ROUNDS,
        "the laggard was sent all {} events",
        lines.len()
    );
    let log = vm.stderr();
    for l in log.lines().filter(|l| l.contains("disconnected")) {
        println!("{l}");
    }
    assert_mentions(
        &log,
        &["QMP client", "disconnected", "does not read"],
        "the VM's log",
    );
    assert_eq!(
        fast.execute("query-status", json!({})).unwrap()["status"],
        "running"
    );
    let _ = fast.execute("quit", json!({}));
    drop(slow_w);
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn duplicate_keys_in_a_qmp_object_are_refused() {
    let _s = serial(&SERIAL);
    let mut vm = QmpVm::source("dup-keys", &["--memory=16M"]);
    let (mut w, mut r) = raw_qmp(&vm.sock, true);
    let mut ask = |msg: &[u8]| -> Value {
        w.write_all(msg).unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    };
    let v = ask(br#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":100,"downtime-limit":200},"id":1}"#);
    println!("{v}");
    assert_eq!(v["error"]["class"], "GenericError", "{v}");
    assert_mentions(
        v["error"]["desc"].as_str().unwrap_or(""),
        &["JSON parse error", "duplicate key 'downtime-limit'"],
        "duplicate argument",
    );
    let v = ask(br#"{"execute":"query-status","execute":"quit"}"#);
    assert_mentions(
        v["error"]["desc"].as_str().unwrap_or(""),
        &["duplicate key 'execute'"],
        "duplicate member",
    );
    // Nested objects too; and the connection goes on.
    let v = ask(br#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"events","state":true,"state":false}]}}"#);
    assert_mentions(
        v["error"]["desc"].as_str().unwrap_or(""),
        &["duplicate key 'state'"],
        "nested duplicate",
    );
    let v = ask(br#"{"execute":"query-migrate-parameters"}"#);
    assert_eq!(v["return"]["downtime-limit"], 300, "nothing was set: {v}");
    assert_eq!(vm.run_state(), "running");
    vm.quit();
}

#[test]
fn silent_qmp_clients_are_closed_after_the_negotiation_timeout_and_a_full_table_says_why() {
    let _s = serial(&SERIAL);
    let mut vm = QmpVm::source("silent", &["--memory=16M"]);
    // The harness's client holds one of the 8 slots; 7 silent ones take the rest.
    let t0 = Instant::now();
    let mut silent: Vec<_> = (0..7).map(|_| raw_qmp(&vm.sock, false)).collect();
    // A ninth is refused with a reason.
    let s = UnixStream::connect(&vm.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    println!("the ninth client: {}", line.trim_end());
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_mentions(
        v["error"]["desc"].as_str().unwrap_or(""),
        &["too many QMP clients", "8"],
        "the ninth client's refusal",
    );
    // The silent ones are told why and closed after the negotiation timeout (10 s).
    for (i, (_, r)) in silent.iter_mut().enumerate() {
        let lines = read_to_eof(r, Duration::from_secs(25), &format!("silent client {i}"));
        let all = lines.concat();
        assert_mentions(
            &all,
            &["qmp_capabilities", "10 s"],
            "the silent client's farewell",
        );
    }
    let waited = t0.elapsed();
    println!("silent clients closed after {waited:?}");
    assert!(
        waited >= Duration::from_secs(9),
        "closed too early: {waited:?}"
    );
    // Their slots are free again, and the harness's client was never disturbed.
    let mut c = connect_qmp(&vm.sock);
    assert_eq!(
        c.execute("query-status", json!({})).unwrap()["status"],
        "running"
    );
    assert_eq!(vm.run_state(), "running");
    drop(c);
    vm.quit();
}
