//! The guest's console: COM1 (rust-vmm's `vm-superio` 16550 model at ports 0x3f8..0x3ff)
//! and the debug port 0xe9.
//!
//! The guest polls the line status register and never enables the UART's interrupts, so the
//! serial device's interrupt trigger does nothing. What the guest writes is split into lines
//! kept here (the last [`MAX_LINES`]) and, when asked, echoed to stderr; what the host sends
//! goes into the UART's receive FIFO (64 bytes), where the guest finds it at its next poll.
//! The UART's registers and FIFO are part of the migrated state ([`Console::state`]).

use super::layout::{PORT_COM1, PORT_DEBUGCON};
use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// Lines of guest output kept.
pub const MAX_LINES: usize = 1000;
/// Longest line kept (longer ones are cut).
const MAX_LINE: usize = 4096;

/// The UART's interrupt line: not connected (the guest polls).
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

#[derive(Default)]
struct Stream {
    partial: Vec<u8>,
    lines: VecDeque<String>,
    /// Lines ever completed (numbers the lines across the ring's drops).
    total: u64,
}

impl Stream {
    fn push(&mut self, b: u8) -> Option<String> {
        if b == b'\n' {
            let line = String::from_utf8_lossy(&self.partial)
                .trim_end_matches('\r')
                .to_string();
            self.partial.clear();
            if self.lines.len() == MAX_LINES {
                self.lines.pop_front();
            }
            self.lines.push_back(line.clone());
            self.total += 1;
            return Some(line);
        }
        if self.partial.len() < MAX_LINE {
            self.partial.push(b);
        }
        None
    }
}

#[derive(Default)]
struct Output {
    serial: Stream,
    debug: Stream,
}

/// Where the UART's output goes: the line buffer.
struct Sink {
    out: Arc<Shared>,
}

struct Shared {
    output: Mutex<Output>,
    cv: Condvar,
    /// Echo serial lines to stderr, prefixed with this.
    echo: Option<String>,
}

impl Shared {
    fn output(&self) -> MutexGuard<'_, Output> {
        self.output.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut o = self.out.output();
        for &b in buf {
            if let Some(line) = o.serial.push(b) {
                if let Some(prefix) = &self.out.echo {
                    eprintln!("{prefix}{line}");
                }
            }
        }
        drop(o);
        self.out.cv.notify_all();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

type Uart = Serial<NoInterrupt, NoEvents, Sink>;

/// COM1 and the debug port of one guest.
pub struct Console {
    uart: Mutex<Uart>,
    shared: Arc<Shared>,
}

impl Console {
    /// A console whose serial lines are echoed to stderr after `echo` when it is set.
    pub fn new(echo: Option<String>) -> Self {
        let shared = Arc::new(Shared {
            output: Mutex::new(Output::default()),
            cv: Condvar::new(),
            echo,
        });
        let sink = Sink {
            out: Arc::clone(&shared),
        };
        Console {
            uart: Mutex::new(Serial::new(NoInterrupt, sink)),
            shared,
        }
    }

    fn uart(&self) -> MutexGuard<'_, Uart> {
        self.uart.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handles a guest `out`; false when `port` is not the console's.
    pub fn io_out(&self, port: u16, data: &[u8]) -> bool {
        match port {
            PORT_DEBUGCON => {
                let mut o = self.shared.output();
                for &b in data {
                    o.debug.push(b);
                }
                true
            }
            p if (PORT_COM1..PORT_COM1 + 8).contains(&p) => {
                if let Some(&b) = data.first() {
                    // The UART's only errors are its (infallible) trigger's and the sink's,
                    // which never fails.
                    let _ = self.uart().write((p - PORT_COM1) as u8, b);
                }
                true
            }
            _ => false,
        }
    }

    /// Handles a guest `in`; false when `port` is not the console's.
    pub fn io_in(&self, port: u16, data: &mut [u8]) -> bool {
        match port {
            p if (PORT_COM1..PORT_COM1 + 8).contains(&p) => {
                let v = self.uart().read((p - PORT_COM1) as u8);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
                true
            }
            _ => false,
        }
    }

    /// The serial lines kept, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.shared.output().serial.lines.iter().cloned().collect()
    }

    /// The debug port's lines kept, oldest first.
    pub fn debug_lines(&self) -> Vec<String> {
        self.shared.output().debug.lines.iter().cloned().collect()
    }

    /// Serial lines completed so far.
    pub fn line_count(&self) -> u64 {
        self.shared.output().serial.total
    }

    /// Waits up to `timeout` for a serial line after the first `after` lines for which `f`
    /// holds; `give_up` is asked every few milliseconds whether to stop early.
    pub fn wait_line(
        &self,
        after: u64,
        timeout: Duration,
        mut f: impl FnMut(&str) -> bool,
        mut give_up: impl FnMut() -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut o = self.shared.output();
        loop {
            let s = &o.serial;
            let first = s.total - s.lines.len() as u64;
            let skip = after.saturating_sub(first) as usize;
            if let Some(l) = s.lines.iter().skip(skip).find(|l| f(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline || give_up() {
                return None;
            }
            let wait = (deadline - now).min(Duration::from_millis(20));
            o = self
                .shared
                .cv
                .wait_timeout(o, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Puts `bytes` into the UART's receive FIFO, waiting (up to `timeout`) for room while the
    /// guest reads it. Returns the bytes queued.
    pub fn send(&self, bytes: &[u8], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut sent = 0;
        while sent < bytes.len() {
            let n = self.uart().enqueue_raw_bytes(&bytes[sent..]).unwrap_or(0);
            sent += n;
            if sent < bytes.len() {
                if Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        sent
    }

    /// The UART's registers and receive FIFO.
    pub fn state(&self) -> SerialState {
        self.uart().state()
    }

    /// Loads registers and FIFO saved by [`Console::state`]; false when the FIFO is too long.
    pub fn restore(&self, state: &SerialState) -> bool {
        let sink = Sink {
            out: Arc::clone(&self.shared),
        };
        match Serial::from_state(state, NoInterrupt, NoEvents, sink) {
            Ok(s) => {
                *self.uart() = s;
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_commands_and_state() {
        let c = Console::new(None);
        for &b in b"hello\r\nworld\n" {
            assert!(c.io_out(PORT_COM1, &[b]));
        }
        assert!(c.io_out(PORT_DEBUGCON, b"dbg\n"));
        assert!(!c.io_out(0x80, &[1]));
        assert_eq!(c.lines(), ["hello", "world"]);
        assert_eq!(c.debug_lines(), ["dbg"]);
        let got = c.wait_line(
            1,
            Duration::from_millis(10),
            |l| l.starts_with('w'),
            || false,
        );
        assert_eq!(got.as_deref(), Some("world"));
        assert!(c
            .wait_line(2, Duration::from_millis(10), |_| true, || false)
            .is_none());
        // Input: line status says data ready, the bytes come in order.
        assert_eq!(c.send(b"ab", Duration::ZERO), 2);
        let mut v = [0u8; 1];
        c.io_in(PORT_COM1 + 5, &mut v);
        assert_eq!(v[0] & 1, 1);
        let st = c.state();
        assert_eq!(st.in_buffer, b"ab");
        c.io_in(PORT_COM1, &mut v);
        assert_eq!(v[0], b'a');
        // Restored: the FIFO is back as saved.
        assert!(c.restore(&st));
        c.io_in(PORT_COM1, &mut v);
        assert_eq!(v[0], b'a');
        let full = SerialState {
            in_buffer: vec![0; 65],
            ..st
        };
        assert!(!c.restore(&full));
    }
}
