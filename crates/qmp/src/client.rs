//! A small blocking QMP client: what `livemig status` and the Rust tests use. (Python's
//! `qemu.qmp` is the independent client the QMP suite uses.)

use crate::message::{ErrorClass, QmpError};
use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Why a command did not return.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("QMP socket: {0}")]
    Io(#[from] io::Error),
    #[error("QMP peer sent something that is not QMP: {0}")]
    Protocol(String),
    #[error("{0}")]
    Command(QmpError),
}

/// A connected, negotiated client. Events that arrive while waiting for a reply are kept.
pub struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    pub greeting: Value,
    pub events: Vec<Value>,
}

impl Client {
    /// Connects to `path`, reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let writer = UnixStream::connect(path)?;
        writer.set_read_timeout(Some(timeout))?;
        let mut c = Client {
            reader: BufReader::new(writer.try_clone()?),
            writer,
            greeting: Value::Null,
            events: Vec::new(),
        };
        c.greeting = c.read()?;
        if c.greeting.get("QMP").is_none() {
            return Err(ClientError::Protocol(format!(
                "expected a greeting, got {}",
                c.greeting
            )));
        }
        c.execute("qmp_capabilities", json!({}))?;
        Ok(c)
    }

    fn read(&mut self) -> Result<Value, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        serde_json::from_str(&line).map_err(|e| ClientError::Protocol(format!("{e}: {line:?}")))
    }

    /// Runs `command` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, ClientError> {
        let msg = json!({"execute": command, "arguments": arguments});
        self.writer.write_all(msg.to_string().as_bytes())?;
        loop {
            let mut v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get_mut("return") {
                return Ok(r.take());
            }
            if let Some(e) = v.get("error") {
                let class = match e["class"].as_str() {
                    Some("CommandNotFound") => ErrorClass::CommandNotFound,
                    Some("DeviceNotActive") => ErrorClass::DeviceNotActive,
                    _ => ErrorClass::GenericError,
                };
                return Err(ClientError::Command(QmpError {
                    class,
                    desc: e["desc"].as_str().unwrap_or_default().to_string(),
                }));
            }
            return Err(ClientError::Protocol(format!("unexpected message {v}")));
        }
    }
}
