//! QMP messages: requests parsed from one JSON object, and the replies, errors, events and
//! greeting the server writes. Pure functions, so the parser can be fuzzed.

use serde_json::{json, Map, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// QMP's error classes (QEMU uses few of them today; `GenericError` is the usual one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
}

impl ErrorClass {
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
        }
    }
}

/// A command's failure, as QMP reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    pub fn not_found(command: &str) -> Self {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: format!("The command {command} has not been found"),
        }
    }
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.class.name(), self.desc)
    }
}

impl std::error::Error for QmpError {}

/// One command from a client.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub execute: String,
    pub arguments: Map<String, Value>,
    /// Echoed in the reply, whatever JSON it is.
    pub id: Option<Value>,
}

/// A request that could not be understood, with the id to answer under if it had one.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRequest {
    pub id: Option<Value>,
    pub error: QmpError,
}

/// Parses one message (the bytes of one JSON object) into a request. An object with a key
/// twice, at any depth, is refused as QEMU refuses it ("JSON parse error, duplicate key").
pub fn parse_request(bytes: &[u8]) -> Result<Request, BadRequest> {
    let bad = |id: Option<Value>, desc: String| BadRequest {
        id,
        error: QmpError::generic(desc),
    };
    let v: Value =
        crate::json::parse(bytes).map_err(|e| bad(None, format!("JSON parse error, {e}")))?;
    let Value::Object(mut obj) = v else {
        return Err(bad(None, "QMP input must be a JSON object".into()));
    };
    let id = obj.remove("id");
    let execute = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => {
            return Err(bad(
                id,
                "QMP input member 'execute' must be a string".into(),
            ));
        }
        None if obj.contains_key("exec-oob") => {
            return Err(bad(id, "out-of-band execution is not supported".into()));
        }
        None => return Err(bad(id, "QMP input lacks member 'execute'".into())),
    };
    let arguments = match obj.remove("arguments") {
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(bad(
                id,
                "QMP input member 'arguments' must be an object".into(),
            ))
        }
        None => Map::new(),
    };
    if let Some(k) = obj.keys().next() {
        return Err(bad(id, format!("QMP input member '{k}' is unexpected")));
    }
    Ok(Request {
        execute,
        arguments,
        id,
    })
}

fn with_id(mut v: Map<String, Value>, id: Option<&Value>) -> Value {
    if let Some(id) = id {
        v.insert("id".into(), id.clone());
    }
    Value::Object(v)
}

/// `{"return": value, "id": id}`.
pub fn reply_ok(value: Value, id: Option<&Value>) -> Value {
    let mut m = Map::new();
    m.insert("return".into(), value);
    with_id(m, id)
}

/// `{"error": {"class": .., "desc": ..}, "id": id}`.
pub fn reply_err(e: &QmpError, id: Option<&Value>) -> Value {
    let mut m = Map::new();
    m.insert(
        "error".into(),
        json!({"class": e.class.name(), "desc": e.desc}),
    );
    with_id(m, id)
}

/// `{"event": name, "data": data, "timestamp": {"seconds": .., "microseconds": ..}}`.
pub fn event(name: &str, data: Option<Value>) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut m = Map::new();
    m.insert("event".into(), Value::String(name.into()));
    if let Some(d) = data {
        m.insert("data".into(), d);
    }
    m.insert(
        "timestamp".into(),
        json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()}),
    );
    Value::Object(m)
}

/// The greeting. `version.qemu` is the QEMU release whose QMP livemig follows;
/// `package` says it is livemig.
pub fn greeting(package: &str) -> Value {
    json!({"QMP": {
        "version": {"qemu": {"major": 9, "minor": 2, "micro": 0}, "package": package},
        "capabilities": []
    }})
}

/// A message as it goes on the wire: compact JSON and CRLF, as QEMU writes it.
pub fn to_line(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).unwrap_or_default();
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(bytes: &[u8]) -> String {
        parse_request(bytes).unwrap_err().error.desc
    }

    #[test]
    fn parses_a_command_with_arguments_and_any_id() {
        let r = parse_request(br#"{"execute":"migrate","arguments":{"uri":"tcp:a:1"},"id":[1]}"#)
            .unwrap();
        assert_eq!(r.execute, "migrate");
        assert_eq!(r.arguments["uri"], "tcp:a:1");
        assert_eq!(r.id, Some(json!([1])));
    }

    #[test]
    fn names_what_is_wrong() {
        assert!(desc(b"{\"execute\":").starts_with("JSON parse error"));
        assert_eq!(desc(b"{}"), "QMP input lacks member 'execute'");
        assert_eq!(
            desc(br#"{"execute":1}"#),
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            desc(br#"{"execute":"x","arguments":[]}"#),
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            desc(br#"{"execute":"x","bogus":1}"#),
            "QMP input member 'bogus' is unexpected"
        );
        assert!(desc(br#"{"execute":"a","execute":"b"}"#)
            .starts_with("JSON parse error, duplicate key 'execute'"));
        assert!(
            desc(br#"{"execute":"m","arguments":{"uri":"a","uri":"b"}}"#)
                .starts_with("JSON parse error, duplicate key 'uri'")
        );
        let e = parse_request(br#"{"execute":7,"id":"abc"}"#).unwrap_err();
        assert_eq!(
            e.id,
            Some(json!("abc")),
            "the id is kept for the error reply"
        );
    }

    #[test]
    fn replies_and_events_have_qmp_shape() {
        let e = reply_err(&QmpError::not_found("foo"), Some(&json!(3)));
        assert_eq!(e["error"]["class"], "CommandNotFound");
        assert_eq!(e["id"], 3);
        let ev = event("STOP", None);
        assert_eq!(ev["event"], "STOP");
        assert!(ev["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(to_line(&ev).ends_with(b"}\r\n"));
    }
}
