//! A command's arguments, read with QMP's own wording for what is missing or mistyped.

use crate::message::QmpError;
use serde_json::{Map, Value};

/// The arguments of one command, checked against the names it takes.
pub struct Args<'a> {
    map: &'a Map<String, Value>,
}

impl<'a> Args<'a> {
    /// Refuses any argument not in `allowed`.
    pub fn new(map: &'a Map<String, Value>, allowed: &[&str]) -> Result<Self, QmpError> {
        if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
        }
        Ok(Args { map })
    }

    fn typed<T>(
        &self,
        key: &str,
        expected: &str,
        get: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, QmpError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(v) => get(v).map(Some).ok_or_else(|| {
                QmpError::generic(format!(
                    "Invalid parameter type for '{key}', expected: {expected}"
                ))
            }),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>, QmpError> {
        self.typed(key, "string", Value::as_str)
    }

    pub fn str(&self, key: &str) -> Result<&'a str, QmpError> {
        self.opt_str(key)?
            .ok_or_else(|| QmpError::generic(format!("Parameter '{key}' is missing")))
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, QmpError> {
        self.typed(key, "boolean", Value::as_bool)
    }

    /// A non-negative integer.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, QmpError> {
        self.typed(key, "uint64", Value::as_u64)
    }

    pub fn opt_array(&self, key: &str) -> Result<Option<&'a Vec<Value>>, QmpError> {
        self.typed(key, "array", Value::as_array)
    }

    pub fn array(&self, key: &str) -> Result<&'a Vec<Value>, QmpError> {
        self.opt_array(key)?
            .ok_or_else(|| QmpError::generic(format!("Parameter '{key}' is missing")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn qemu_wording_for_missing_mistyped_and_unexpected() {
        let m = json!({"uri": 5, "detach": true})
            .as_object()
            .unwrap()
            .clone();
        assert_eq!(
            Args::new(&m, &["uri"]).err().unwrap().desc,
            "Parameter 'detach' is unexpected"
        );
        let a = Args::new(&m, &["uri", "detach", "x"]).unwrap();
        assert_eq!(
            a.str("uri").unwrap_err().desc,
            "Invalid parameter type for 'uri', expected: string"
        );
        assert_eq!(a.str("x").unwrap_err().desc, "Parameter 'x' is missing");
        assert_eq!(a.opt_bool("detach").unwrap(), Some(true));
        assert_eq!(a.opt_u64("x").unwrap(), None);
        let neg = json!({"n": -1}).as_object().unwrap().clone();
        assert!(Args::new(&neg, &["n"]).unwrap().opt_u64("n").is_err());
    }
}
