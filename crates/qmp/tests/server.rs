//! The server over a real Unix socket, with a small handler: negotiation, errors that keep
//! the server serving, two clients, events, a client that leaves mid-command, shutdown.

use livemig_qmp::{Args, Events, Handler, QmpError, Request, Server, ServerConfig};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
