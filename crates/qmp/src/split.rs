//! Splits a QMP byte stream into JSON objects.
//!
//! QMP clients need not end a message with a newline (Python's `qemu.qmp` does not), so the
//! server finds where each object ends by counting brackets outside strings, as QEMU's own
//! JSON streamer does. The object's text is then parsed on its own, so a malformed message
//! costs that message only. Anything outside an object, an object longer than
//! [`Limits::max_len`] or nested deeper than [`Limits::max_depth`] is an error; the splitter
//! then skips to the next newline, where the client can start afresh.
//!
//! Pure and allocation-bounded: fuzzed and property-tested.

use thiserror::Error;

/// What the splitter accepts at most.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of one message.
    pub max_len: usize,
    /// Nesting of objects and arrays in one message.
    pub max_depth: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_len: 1 << 20,
            max_depth: 64,
        }
    }
}

/// Why bytes were not a message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SplitError {
    #[error(
        "QMP input must be a JSON object; found {0:?} outside one (skipping to the next newline)"
    )]
    Stray(char),
    #[error("QMP message longer than {0} bytes (skipping to the next newline)")]
    TooLong(usize),
    #[error("QMP message nested deeper than {0} levels (skipping to the next newline)")]
    TooDeep(u32),
}

/// The splitter's state between reads.
#[derive(Debug)]
pub struct Splitter {
    limits: Limits,
    /// The object being collected (empty between objects).
    buf: Vec<u8>,
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// After an error: skip input until a newline.
    skipping: bool,
}

impl Splitter {
    pub fn new(limits: Limits) -> Self {
        Splitter {
            limits,
            buf: Vec::new(),
            depth: 0,
            in_string: false,
            escaped: false,
            skipping: false,
        }
    }

    /// Feeds `input`; each complete object (its bytes) or error goes to `out` in order.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<Result<Vec<u8>, SplitError>>) {
        for &b in input {
            if self.skipping {
                if b == b'\n' {
                    self.skipping = false;
                }
                continue;
            }
            if self.depth == 0 {
                match b {
                    b' ' | b'\t' | b'\r' | b'\n' => continue,
                    b'{' => {}
                    other => {
                        self.fail(SplitError::Stray(other as char), out);
                        continue;
                    }
                }
            }
            if self.buf.len() >= self.limits.max_len {
                self.fail(SplitError::TooLong(self.limits.max_len), out);
                continue;
            }
            self.buf.push(b);
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth > self.limits.max_depth {
                        self.fail(SplitError::TooDeep(self.limits.max_depth), out);
                    }
                }
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        out.push(Ok(std::mem::take(&mut self.buf)));
                    }
                }
                _ => {}
            }
        }
    }

    fn fail(&mut self, e: SplitError, out: &mut Vec<Result<Vec<u8>, SplitError>>) {
        out.push(Err(e));
        self.buf.clear();
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.skipping = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split(chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, SplitError>> {
        let mut s = Splitter::new(Limits::default());
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        out
    }

    #[test]
    fn objects_without_newlines_and_split_across_reads() {
        let out = split(&[b"{\"execute\":\"a\"}{\"exec", b"ute\":\"b}{\"}  \r\n{}"]);
        let msgs: Vec<_> = out.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            msgs,
            vec![
                b"{\"execute\":\"a\"}".to_vec(),
                b"{\"execute\":\"b}{\"}".to_vec(),
                b"{}".to_vec()
            ]
        );
    }

    #[test]
    fn escaped_quotes_stay_in_the_string() {
        let out = split(&[br#"{"a":"x\"}{"}"#]);
        assert_eq!(out, vec![Ok(br#"{"a":"x\"}{"}"#.to_vec())]);
    }

    #[test]
    fn stray_bytes_skip_to_the_newline_then_recover() {
        let out = split(&[b"hello {\"x\":1}\n{\"y\":2}"]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], Err(SplitError::Stray('h')));
        assert_eq!(out[1], Ok(b"{\"y\":2}".to_vec()));
    }

    #[test]
    fn too_long_and_too_deep_are_refused() {
        let mut s = Splitter::new(Limits {
            max_len: 8,
            max_depth: 2,
        });
        let mut out = Vec::new();
        s.push(b"{\"aaaaaaaaaa\":1}\n{[[1]]}\n{\"k\":1}", &mut out);
        assert_eq!(
            out,
            vec![
                Err(SplitError::TooLong(8)),
                Err(SplitError::TooDeep(2)),
                Ok(b"{\"k\":1}".to_vec())
            ]
        );
    }

    proptest! {
        /// Any byte stream, fed in any pieces: never panics, every message is bounded, and
        /// the pieces do not change what comes out.
        #[test]
        fn any_input_any_chunking(data in proptest::collection::vec(any::<u8>(), 0..512),
                                  cut in 0usize..512) {
            let limits = Limits { max_len: 64, max_depth: 4 };
            let mut whole = Splitter::new(limits);
            let mut a = Vec::new();
            whole.push(&data, &mut a);
            let cut = cut.min(data.len());
            let mut parts = Splitter::new(limits);
            let mut b = Vec::new();
            parts.push(&data[..cut], &mut b);
            parts.push(&data[cut..], &mut b);
            prop_assert_eq!(&a, &b);
            for m in a.iter().flatten() {
                prop_assert!(m.len() <= 64);
                prop_assert_eq!(m[0], b'{');
            }
        }

        /// Serialized objects come back one for one, whatever separates them.
        #[test]
        fn json_objects_round_trip(keys in proptest::collection::vec("[a-z\"\\\\{}]{0,6}", 1..6)) {
            let objs: Vec<String> = keys.iter().enumerate()
                .map(|(i, k)| serde_json::json!({ "execute": k, "id": i }).to_string())
                .collect();
            let out = split(&[objs.concat().as_bytes()]);
            let got: Vec<String> = out.into_iter()
                .map(|r| String::from_utf8(r.unwrap()).unwrap()).collect();
            prop_assert_eq!(got, objs);
        }
    }
}
