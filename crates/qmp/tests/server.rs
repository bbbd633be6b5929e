//! The server over a real Unix socket, with a small handler: negotiation, errors that keep
//! the server serving, two clients, events, a client that leaves mid-command, shutdown.

use livemig_qmp::{Args, Events, Handler, QmpError, Request, Server, ServerConfig};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Echo;

impl Handler for Echo {
    fn commands(&self) -> Vec<&'static str> {
        vec!["echo", "slow"]
    }
    fn execute(&self, req: &Request) -> Result<Value, QmpError> {
        match req.execute.as_str() {
            "echo" => {
                let a = Args::new(&req.arguments, &["text"])?;
                Ok(json!({ "text": a.str("text")? }))
            }
            _ => {
                std::thread::sleep(Duration::from_millis(300));
                Ok(json!({}))
            }
        }
    }
}

struct Client {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Client {
    fn connect(path: &PathBuf) -> (Client, Value) {
        let w = UnixStream::connect(path).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client {
            r: BufReader::new(w.try_clone().unwrap()),
            w,
        };
        let greeting = c.recv();
        (c, greeting)
    }
    fn send_raw(&mut self, b: &[u8]) {
        self.w.write_all(b).unwrap();
    }
    fn recv(&mut self) -> Value {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        assert!(line.ends_with("\r\n"), "replies end in CRLF: {line:?}");
        serde_json::from_str(&line).unwrap()
    }
    fn cmd(&mut self, v: Value) -> Value {
        self.send_raw(v.to_string().as_bytes());
        self.recv()
    }
}

/// Threads of this process named by the QMP server.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("lm-qmp"))
        .count()
}

/// The tests count the server's threads: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn negotiation_errors_events_two_clients_and_clean_shutdown() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = std::env::temp_dir().join(format!("lm-qmp-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("qmp.sock");
    let before = threads();
    let events = Events::new();
    let server = Server::start(&path, Arc::new(Echo), &events, ServerConfig::default()).unwrap();

    let (mut a, greeting) = Client::connect(&path);
    assert!(greeting["QMP"]["version"]["package"]
        .as_str()
        .unwrap()
        .starts_with("livemig"));
    // Before negotiation only qmp_capabilities runs, and no events arrive.
    let r = a.cmd(json!({"execute": "echo", "arguments": {"text": "x"}}));
    assert_eq!(r["error"]["class"], "CommandNotFound");
    events.emit("NOT_SEEN", None);
    // No newline between messages, and an id of any type is echoed.
    a.send_raw(br#"{"execute":"qmp_capabilities"}{"execute":"echo","arguments":{"text":"hi"},"id":{"n":1}}"#);
    assert_eq!(a.recv()["return"], json!({}));
    let r = a.recv();
    assert_eq!(r["return"]["text"], "hi");
    assert_eq!(r["id"], json!({"n": 1}));

    // Bad input of every kind: an error naming it, and the server goes on.
    for (input, want) in [
        (&b"{\"execute\": }"[..], "JSON parse error"),
        (
            b"{\"execute\":\"nope\"}",
            "The command nope has not been found",
        ),
        (
            b"{\"execute\":\"echo\",\"arguments\":{\"text\":1}}",
            "Invalid parameter type for 'text', expected: string",
        ),
        (
            b"{\"execute\":\"echo\",\"arguments\":{\"bad\":1}}",
            "Parameter 'bad' is unexpected",
        ),
        (b"[1,2]\n", "must be a JSON object"),
        (
            b"{\"execute\":\"qmp_capabilities\"}",
            "negotiation is already complete",
        ),
    ] {
        a.send_raw(input);
        let r = a.recv();
        let desc = r["error"]["desc"].as_str().unwrap_or_default().to_string();
        assert!(desc.contains(want), "{input:?}: {r}");
    }
    let r = a.cmd(json!({"execute": "query-commands"}));
    assert!(r["return"]
        .as_array()
        .unwrap()
        .contains(&json!({"name": "echo"})));

    // A second client at the same time; events reach both once negotiated.
    let (mut b, _) = Client::connect(&path);
    b.cmd(json!({"execute": "qmp_capabilities"}));
    events.emit("MIGRATION", Some(json!({"status": "active"})));
    for c in [&mut a, &mut b] {
        let ev = c.recv();
        assert_eq!(ev["event"], "MIGRATION");
        assert_eq!(ev["data"]["status"], "active");
    }

    // A client that leaves while its command runs does not disturb the others.
    let (mut gone, _) = Client::connect(&path);
    gone.cmd(json!({"execute": "qmp_capabilities"}));
    gone.send_raw(br#"{"execute":"slow"}"#);
    drop(gone);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        b.cmd(json!({"execute": "echo", "arguments": {"text": "still"}}))["return"]["text"],
        "still"
    );

    server.shutdown();
    assert!(!path.exists(), "the socket file is removed");
    // Every server thread joined (the clients' sockets were shut down under them).
    let mut after = threads();
    for _ in 0..50 {
        if after <= before {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        after = threads();
    }
    assert_eq!(before, 0);
    assert_eq!(after, 0, "QMP threads left after shutdown");
    let mut line = String::new();
    assert_eq!(a.r.read_line(&mut line).unwrap_or(0), 0, "client sees EOF");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn too_many_clients_are_told_so() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = std::env::temp_dir().join(format!("lm-qmp-max-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("qmp.sock");
    let events = Events::new();
    let config = ServerConfig {
        max_clients: 1,
        ..ServerConfig::default()
    };
    let server = Server::start(&path, Arc::new(Echo), &events, config).unwrap();
    let (_first, _) = Client::connect(&path);
    let (_second, refused) = Client::connect(&path);
    assert!(refused["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("too many QMP clients"));
    server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lm-qmp-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What the server logged, for the tests that check its reasons.
static LOG: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn log_here(msg: &str) {
    LOG.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(msg.to_string());
}

fn logged() -> String {
    LOG.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
}

/// Reads lines until EOF within `t`; the lines.
fn until_eof(c: &mut Client, t: Duration) -> Vec<String> {
    c.r.get_ref().set_read_timeout(Some(t)).unwrap();
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        match c.r.read_line(&mut line) {
            Ok(0) => return lines,
            Ok(_) => lines.push(line),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return lines,
            Err(e) => panic!("still connected after {t:?} ({e}); read {lines:?}"),
        }
    }
}

#[test]
fn a_client_that_does_not_read_is_disconnected_and_events_never_wait_for_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = test_dir("slow");
    let path = dir.join("qmp.sock");
    let events = Events::new();
    let config = ServerConfig {
        max_queued_messages: 64,
        write_timeout: Duration::from_secs(60),
        log: log_here,
        ..ServerConfig::default()
    };
    let server = Server::start(&path, Arc::new(Echo), &events, config).unwrap();
    let (mut slow, _) = Client::connect(&path);
    slow.cmd(json!({"execute": "qmp_capabilities"}));
    let (mut other, _) = Client::connect(&path);
    other.cmd(json!({"execute": "qmp_capabilities"}));
    // The slow client never reads again. Was: once its socket was full, each event waited
    // 5 s (the write timeout) for it.
    let t = Instant::now();
    for i in 0..5000 {
        events.emit("TICK", Some(json!({ "i": i })));
    }
    let took = t.elapsed();
    assert!(took < Duration::from_secs(2), "5000 events took {took:?}");
    // The slow client got what fitted, then EOF; the reason is logged.
    let lines = until_eof(&mut slow, Duration::from_secs(10));
    assert!(lines.len() < 5000, "{} lines", lines.len());
    let log = logged();
    assert!(
        log.contains("disconnected: it does not read its replies and events (64 messages"),
        "{log}"
    );
    // The other client is still served (it was dropped too if it fell behind: it did not
    // read during the burst; a fresh client is served either way).
    let (mut fresh, _) = Client::connect(&path);
    fresh.cmd(json!({"execute": "qmp_capabilities"}));
    assert_eq!(
        fresh.cmd(json!({"execute": "echo", "arguments": {"text": "on"}}))["return"]["text"],
        "on"
    );
    drop(other);
    server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_client_that_does_not_negotiate_is_told_why_and_closed() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = test_dir("negotiate");
    let path = dir.join("qmp.sock");
    let events = Events::new();
    let config = ServerConfig {
        negotiation_timeout: Duration::from_millis(300),
        log: log_here,
        ..ServerConfig::default()
    };
    let server = Server::start(&path, Arc::new(Echo), &events, config).unwrap();
    let t = Instant::now();
    let (mut silent, _) = Client::connect(&path);
    let (mut prompt, _) = Client::connect(&path);
    prompt.cmd(json!({"execute": "qmp_capabilities"}));
    let lines = until_eof(&mut silent, Duration::from_secs(10));
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(lines.len(), 1, "{lines:?}");
    let v: Value = serde_json::from_str(&lines[0]).unwrap();
    let desc = v["error"]["desc"].as_str().unwrap();
    assert!(
        desc.contains("'qmp_capabilities'") && desc.contains("300 ms"),
        "{desc}"
    );
    // The negotiated client is not timed out.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        prompt.cmd(json!({"execute": "echo", "arguments": {"text": "x"}}))["return"]["text"],
        "x"
    );
    server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn when_every_slot_is_taken_an_idle_client_gives_its_slot_to_a_new_one() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = test_dir("idle");
    let path = dir.join("qmp.sock");
    let events = Events::new();
    let config = ServerConfig {
        max_clients: 2,
        idle_limit: Duration::from_millis(500),
        log: log_here,
        ..ServerConfig::default()
    };
    let server = Server::start(&path, Arc::new(Echo), &events, config).unwrap();
    let (mut idle, _) = Client::connect(&path);
    idle.cmd(json!({"execute": "qmp_capabilities"}));
    let (mut busy, _) = Client::connect(&path);
    busy.cmd(json!({"execute": "qmp_capabilities"}));
    // Before the idle limit, a third client is refused, naming why.
    let (_, refused) = Client::connect(&path);
    let desc = refused["error"]["desc"].as_str().unwrap().to_string();
    assert!(
        desc.contains("too many QMP clients: 2") && desc.contains("idle for 500 ms"),
        "{desc}"
    );
    std::thread::sleep(Duration::from_millis(600));
    busy.cmd(json!({"execute": "echo", "arguments": {"text": "still here"}}));
    // Now the idle one (silent for 600 ms) gives its slot to a new client.
    let (mut new, greeting) = Client::connect(&path);
    assert!(greeting.get("QMP").is_some(), "{greeting}");
    assert_eq!(
        new.cmd(json!({"execute": "qmp_capabilities"}))["return"],
        json!({})
    );
    let lines = until_eof(&mut idle, Duration::from_secs(10));
    let all = lines.concat();
    assert!(
        all.contains("it sent nothing for") && all.contains("needs its slot"),
        "{all}"
    );
    // The busy client was not touched.
    assert_eq!(
        busy.cmd(json!({"execute": "echo", "arguments": {"text": "y"}}))["return"]["text"],
        "y"
    );
    server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn what_was_queued_is_delivered_when_the_server_shuts_down() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = test_dir("drain");
    let path = dir.join("qmp.sock");
    let events = Events::new();
    let server = Server::start(&path, Arc::new(Echo), &events, ServerConfig::default()).unwrap();
    let (mut c, _) = Client::connect(&path);
    c.cmd(json!({"execute": "qmp_capabilities"}));
    for i in 0..100 {
        events.emit("LAST_WORDS", Some(json!({ "i": i })));
    }
    server.shutdown();
    let lines = until_eof(&mut c, Duration::from_secs(10));
    assert_eq!(lines.len(), 100, "every queued event before EOF");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_socket_path_must_be_free_or_a_stale_socket_and_is_removed_only_while_ours() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = test_dir("path");
    let events = Events::new();
    let start = |p: &PathBuf| Server::start(p, Arc::new(Echo), &events, ServerConfig::default());
    // A regular file: refused, kept.
    let file = dir.join("file");
    std::fs::write(&file, "keep").unwrap();
    let e = start(&file).err().unwrap().to_string();
    assert!(e.contains("is a regular file, not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    // A live socket (another server of this process): refused; that server still serves.
    let path = dir.join("qmp.sock");
    let first = start(&path).unwrap();
    let e = start(&path).err().unwrap().to_string();
    assert!(e.contains("is a socket in use"), "{e}");
    let (_c, greeting) = Client::connect(&path);
    assert!(greeting.get("QMP").is_some());
    // A stale socket: replaced.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let second = start(&stale).unwrap();
    let (_d, greeting) = Client::connect(&stale);
    assert!(greeting.get("QMP").is_some());
    second.shutdown();
    assert!(!stale.exists(), "its own socket file is removed");
    // Replaced behind the server's back: left alone at shutdown.
    std::fs::rename(&file, &path).unwrap();
    first.shutdown();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_client_that_sends_many_commands_before_reading_is_slowed_not_dropped() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = test_dir("pipeline");
    let path = dir.join("qmp.sock");
    let events = Events::new();
    let config = ServerConfig {
        max_queued_messages: 16,
        ..ServerConfig::default()
    };
    let server = Server::start(&path, Arc::new(Echo), &events, config).unwrap();
    let (mut c, _) = Client::connect(&path);
    c.cmd(json!({"execute": "qmp_capabilities"}));
    // 3000 commands written by another thread before this one reads any reply: far more
    // than the queue and the socket hold, so the server must wait for the client.
    let mut w = c.w.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..3000 {
            let m = json!({"execute": "echo", "arguments": {"text": "p"}, "id": i});
            w.write_all(m.to_string().as_bytes()).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..3000 {
        let r = c.recv();
        assert_eq!(r["id"], i, "{r}");
        assert_eq!(r["return"]["text"], "p");
    }
    writer.join().unwrap();
    server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
