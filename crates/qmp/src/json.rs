//! JSON as QMP reads it: serde_json's parser, but an object with a key twice is refused (QEMU:
//! "JSON parse error, duplicate key"), where serde_json keeps the last value. Nesting is
//! bounded by the splitter ([`crate::split::Limits::max_depth`]) before a message gets here,
//! and by serde_json's own recursion limit.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::fmt;

/// A key longer than this is cut short in the error.
const KEY_IN_ERROR: usize = 64;

/// Parses one JSON text; an object anywhere in it with a duplicate key is an error naming
/// the key.
pub fn parse(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let Strict(v) = Strict::deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// A [`Value`] deserialized with duplicate keys refused.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number that is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(Strict(e)) = seq.next_element()? {
            v.push(e);
        }
        Ok(Value::Array(v))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if m.contains_key(&k) {
                let shown: String = k.chars().take(KEY_IN_ERROR).collect();
                let more = if shown.len() < k.len() { "..." } else { "" };
                return Err(de::Error::custom(format_args!(
                    "duplicate key '{shown}{more}'"
                )));
            }
            let Strict(v) = map.next_value()?;
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        let e = parse(br#"{"a":1,"b":2,"a":3}"#).unwrap_err().to_string();
        assert!(e.starts_with("duplicate key 'a'"), "{e}");
        let e = parse(br#"{"x":[{"y":{"k":1,"k":1}}]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("duplicate key 'k'"), "{e}");
        // The same key in different objects is fine.
        assert_eq!(
            parse(br#"{"a":{"a":1},"b":[{"a":2},{"a":3}]}"#).unwrap(),
            json!({"a": {"a": 1}, "b": [{"a": 2}, {"a": 3}]})
        );
        let long = format!(r#"{{"{k}":1,"{k}":2}}"#, k = "z".repeat(1000));
        let e = parse(long.as_bytes()).unwrap_err().to_string();
        assert!(e.len() < 200, "the key is cut short in the error: {e}");
    }

    #[test]
    fn everything_else_is_read_as_serde_json_reads_it() {
        for text in [
            r#"{"s":"\u00e9\n","i":-5,"u":18446744073709551615,"f":1.5e3,"n":null,"t":true}"#,
            "[]",
            "{}",
            "\"x\"",
        ] {
            let want: Value = serde_json::from_str(text).unwrap();
            assert_eq!(parse(text.as_bytes()).unwrap(), want, "{text}");
        }
        assert!(parse(b"{} x").is_err(), "trailing characters");
        assert!(parse(b"{\"a\":").is_err());
    }

    proptest! {
        /// Any bytes: no panic; whatever serde_json refuses is refused too, and what it
        /// accepts without a duplicate key comes out the same.
        #[test]
        fn agrees_with_serde_json(data in proptest::collection::vec(any::<u8>(), 0..128)) {
            let strict = parse(&data);
            match serde_json::from_slice::<Value>(&data) {
                Err(_) => prop_assert!(strict.is_err()),
                Ok(v) => {
                    if let Ok(s) = strict {
                        prop_assert_eq!(s, v);
                    }
                }
            }
        }
    }
}
