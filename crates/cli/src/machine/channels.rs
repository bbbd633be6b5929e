//! `migrate` and `migrate-incoming` name their address as QEMU 9.1+ accepts it: a `uri`
//! string, or a `channels` list holding one `main` channel whose `addr` is a
//! `MigrationAddress` (`socket` of type `inet` or `unix`, or `file`). Either one, never both,
//! with QEMU's words for what is wrong.

use livemig_qmp::{Args, QmpError};
use serde_json::{Map, Value};

/// The address a `migrate` / `migrate-incoming` asks for, as a livemig URI
/// (`tcp:HOST:PORT`, `unix:PATH`, `file:PATH`).
pub fn address(a: &Args<'_>) -> Result<String, QmpError> {
    match (a.opt_str("uri")?, a.opt_array("channels")?) {
        (Some(uri), None) => Ok(uri.to_string()),
        (None, Some(list)) => from_channels(list),
        _ => Err(QmpError::generic(
            "Either 'uri' or 'channels' argument should be provided",
        )),
    }
}

/// The one `main` channel's address.
fn from_channels(list: &[Value]) -> Result<String, QmpError> {
    let [channel] = list else {
        return Err(QmpError::generic(if list.is_empty() {
            "Channel list is empty"
        } else {
            "Channel list has more than one entries"
        }));
    };
    let channel = object(channel, "channels")?;
    let c = Args::new(channel, &["channel-type", "addr"])?;
    let kind = c.str("channel-type")?;
    if kind != "main" {
        return Err(QmpError::generic(format!(
            "Parameter 'channel-type' does not accept value '{kind}' (livemig takes one 'main' channel; its data channels follow multifd-channels)"
        )));
    }
    let addr = object(
        channel
            .get("addr")
            .ok_or_else(|| QmpError::generic("Parameter 'addr' is missing"))?,
        "addr",
    )?;
    from_address(addr)
}

/// A `MigrationAddress` as a URI.
fn from_address(addr: &Map<String, Value>) -> Result<String, QmpError> {
    let transport = addr
        .get("transport")
        .and_then(Value::as_str)
        .ok_or_else(|| QmpError::generic("Parameter 'transport' is missing"))?;
    match transport {
        "socket" => {
            let kind = addr.get("type").and_then(Value::as_str).unwrap_or("");
            match kind {
                "inet" => {
                    let a = Args::new(addr, &["transport", "type", "host", "port"])?;
                    Ok(format!("tcp:{}:{}", a.str("host")?, a.str("port")?))
                }
                "unix" => {
                    let a = Args::new(addr, &["transport", "type", "path"])?;
                    Ok(format!("unix:{}", a.str("path")?))
                }
                other => Err(QmpError::generic(format!(
                    "Parameter 'type' does not accept value '{other}' (livemig takes inet and unix sockets)"
                ))),
            }
        }
        "file" => {
            let a = Args::new(addr, &["transport", "filename", "offset"])?;
            if a.opt_u64("offset")?.is_some_and(|o| o != 0) {
                return Err(QmpError::generic(
                    "livemig writes a save file from its start: 'offset' must be 0",
                ));
            }
            Ok(format!("file:{}", a.str("filename")?))
        }
        other => Err(QmpError::generic(format!(
            "Parameter 'transport' does not accept value '{other}' (livemig takes socket and file)"
        ))),
    }
}

fn object<'a>(v: &'a Value, name: &str) -> Result<&'a Map<String, Value>, QmpError> {
    v.as_object().ok_or_else(|| {
        QmpError::generic(format!(
            "Invalid parameter type for '{name}', expected: object"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn addr_of(args: Value) -> Result<String, String> {
        let map = args.as_object().unwrap().clone();
        let a = Args::new(&map, &["uri", "channels", "detach", "resume"]).map_err(|e| e.desc)?;
        address(&a).map_err(|e| e.desc)
    }

    #[test]
    fn channels_name_the_same_addresses_as_uris() {
        let main = |addr: Value| json!({"channels": [{"channel-type": "main", "addr": addr}]});
        assert_eq!(
            addr_of(main(
                json!({"transport": "socket", "type": "inet", "host": "10.0.0.2", "port": "4444"})
            )),
            Ok("tcp:10.0.0.2:4444".into())
        );
        assert_eq!(
            addr_of(main(
                json!({"transport": "socket", "type": "unix", "path": "/run/m.sock"})
            )),
            Ok("unix:/run/m.sock".into())
        );
        assert_eq!(
            addr_of(main(
                json!({"transport": "file", "filename": "/var/vm.save", "offset": 0})
            )),
            Ok("file:/var/vm.save".into())
        );
        assert_eq!(addr_of(json!({"uri": "tcp:h:1"})), Ok("tcp:h:1".into()));
    }

    #[test]
    fn wrong_forms_are_refused_with_qemus_words() {
        let both = json!({"uri": "tcp:h:1", "channels": []});
        assert!(addr_of(both)
            .unwrap_err()
            .contains("Either 'uri' or 'channels'"));
        assert!(addr_of(json!({}))
            .unwrap_err()
            .contains("Either 'uri' or 'channels'"));
        let two = json!({"channels": [{}, {}]});
        assert!(addr_of(two).unwrap_err().contains("more than one"));
        let data = json!({"channels": [{"channel-type": "data", "addr": {}}]});
        assert!(addr_of(data).unwrap_err().contains("channel-type"));
        let exec = json!({"channels": [{"channel-type": "main", "addr": {"transport": "exec", "args": []}}]});
        assert!(addr_of(exec).unwrap_err().contains("transport"));
        let vsock = json!({"channels": [{"channel-type": "main",
            "addr": {"transport": "socket", "type": "vsock", "cid": "3", "port": "1"}}]});
        assert!(addr_of(vsock).unwrap_err().contains("'type'"));
        let bad = json!({"channels": [{"channel-type": "main", "addr": {"transport": "socket", "type": "inet", "host": "h"}}]});
        assert!(addr_of(bad).unwrap_err().contains("port"));
    }
}
