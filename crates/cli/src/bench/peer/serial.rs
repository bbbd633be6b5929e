//! The guest's serial console (COM1) as a Unix socket the VMM serves: the bench reads the
//! guest's lines and sends it commands. The guest's side of the conversation:
//!
//! - once its memory is filled it prints `livemig-guest: ready filled=<pages>`;
//! - to `verify` it answers `verify ok pages=<n> counter=<c>` or `verify bad ...`;
//! - to `status` it answers `counter=<n>`.

use anyhow::{bail, Context};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A connected serial console.
pub(super) struct Serial {
    stream: UnixStream,
    /// Bytes received and not yet split into lines.
    pending: Vec<u8>,
    /// Every line received, for error messages.
    pub(super) lines: Vec<String>,
}

/// What `verify` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Verified {
    pub(super) pages: u64,
    pub(super) counter: u64,
}

impl Serial {
    /// Connects to the console at `path`, waiting up to `timeout` for the socket to appear.
    pub(super) fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Serial> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| {
                        format!("cannot connect to the serial console {}", path.display())
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        Ok(Serial {
            stream,
            pending: Vec::new(),
            lines: Vec::new(),
        })
    }

    /// The next whole line (without its line end), or an error at `deadline`.
    fn next_line(&mut self, deadline: Instant) -> anyhow::Result<String> {
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.pending.drain(..=i).collect();
                let line = String::from_utf8_lossy(&raw).trim_end().to_string();
                self.lines.push(line.clone());
                return Ok(line);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("timed out");
            }
            self.stream.set_read_timeout(Some(left))?;
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => bail!("the console was closed"),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("timed out")
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading the serial console"),
            }
        }
    }

    /// Waits up to `timeout` for a line containing `marker`, returns it.
    pub(super) fn wait_for(&mut self, marker: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_line(deadline) {
                Ok(line) if line.contains(marker) => return Ok(line),
                Ok(_) => {}
                Err(e) => bail!(
                    "no '{marker}' line from the guest within {timeout:?} ({e}); {}",
                    self.said()
                ),
            }
        }
    }

    /// The guest's last lines, for error messages.
    pub(super) fn said(&self) -> String {
        let mut lines: Vec<String> = self.lines.iter().rev().take(8).cloned().collect();
        lines.reverse();
        let partial = String::from_utf8_lossy(&self.pending).to_string();
        if !partial.is_empty() {
            lines.push(partial);
        }
        if lines.is_empty() {
            "the guest printed nothing on its console".into()
        } else {
            format!("the guest's console said: {}", lines.join(" | "))
        }
    }

    /// Waits for the guest's `ready` line; returns how many pages it filled.
    pub(super) fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<u64> {
        let line = self.wait_for(READY, timeout)?;
        parse_ready(&line)
    }

    /// Sends `verify` and checks the answer: an error unless it is `verify ok`.
    pub(super) fn verify(&mut self, timeout: Duration) -> anyhow::Result<Verified> {
        self.stream
            .write_all(b"verify\n")
            .context("sending 'verify' to the guest's console")?;
        let line = self.wait_for("verify ", timeout)?;
        parse_verify(&line)
    }
}

/// The line the guest prints once it has filled its memory.
pub(super) const READY: &str = "livemig-guest: ready";

/// Reads `livemig-guest: ready filled=<pages>`: the pages filled.
pub(super) fn parse_ready(line: &str) -> anyhow::Result<u64> {
    field(line, "filled").with_context(|| format!("a ready line without filled=: {line:?}"))
}

/// Reads `verify ok pages=<n> counter=<c>`; `verify bad ...` and anything else is an error.
pub(super) fn parse_verify(line: &str) -> anyhow::Result<Verified> {
    let rest = &line[line.find("verify ").map_or(0, |i| i + "verify ".len())..];
    if !rest.starts_with("ok") {
        bail!("the guest's own page check failed: {line:?}");
    }
    Ok(Verified {
        pages: field(line, "pages").with_context(|| format!("no pages= in {line:?}"))?,
        counter: field(line, "counter").with_context(|| format!("no counter= in {line:?}"))?,
    })
}

/// The number after `key=` in a line of `key=value` words.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_answers() {
        let v = parse_verify("verify ok pages=262144 counter=77").unwrap();
        assert_eq!(
            v,
            Verified {
                pages: 262144,
                counter: 77
            }
        );
        assert!(parse_verify("verify bad page=12 want=3 got=4").is_err());
        assert!(parse_verify("verify ok counter=77").is_err());
        assert_eq!(
            field("livemig-guest: ready filled=262144", "filled"),
            Some(262144)
        );
        assert_eq!(field("livemig-guest: ready unfilled=3", "filled"), None);
    }

    #[test]
    fn lines_split_across_reads_and_timeouts() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s = Serial {
            stream: a,
            pending: Vec::new(),
            lines: Vec::new(),
        };
        b.write_all(b"boot\r\nlivemig-guest: rea").unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            b.write_all(b"dy filled=5\r\n").unwrap();
            b
        });
        assert_eq!(s.wait_ready(Duration::from_secs(5)).unwrap(), 5);
        let _b = t.join().unwrap();
        let e = s.wait_for("never", Duration::from_millis(50)).unwrap_err();
        assert!(e.to_string().contains("boot"), "{e}");
    }
}
