//! A fault-injecting TCP proxy for livemig's tests.
//!
//! A [`Proxy`] listens on a port and forwards each connection it accepts to a target, as a
//! pair of pipes (client to target, "up"; target to client, "down"). The test chooses, per
//! connection (the Nth accepted, or every one) and per direction, what goes wrong and when:
//!
//! - **latency**: every chunk read is stamped and released `latency` later, so throughput
//!   is kept (chunks are in flight together, as on a long link) instead of one sleep per
//!   chunk in series;
//! - **reset** after K bytes (or after a byte pattern): the K bytes are delivered, then both
//!   peers get a real RST (`SO_LINGER` 0);
//! - **cut** after K bytes: a clean FIN to both peers in the middle of whatever was being
//!   sent (a truncated frame);
//! - **flip** the byte at offset K (XOR with a mask): corruption on the wire;
//! - **hang** after K bytes: nothing more is forwarded either way and nothing is closed, like
//!   a peer that stopped without closing its sockets.
//!
//! Faults can also be fired while a connection runs ([`Proxy::fault`]). The proxy counts
//! connections and bytes, and records every fault it fired ([`Proxy::fired`]), so a test can
//! check that its fault really happened. Every thread it starts is named `fnet-*` and is
//! joined when the proxy is dropped.
//!
//! With [`ProxyBuilder::netns`] the proxy listens and connects from inside a network
//! namespace (its accepting thread enters it; sockets stay in the namespace they were made
//! in), so it can sit between two namespaces joined by a veth pair.

#![warn(missing_docs)]

mod conn;
mod pipe;
mod proxy;
mod rules;

pub use proxy::{Proxy, ProxyBuilder};
pub use rules::{Dir, Fault, Fired, Rule, Trigger, Which};

use std::sync::Mutex;
use std::time::Duration;

/// How often blocked threads look at the proxy's and the connection's state.
const TICK: Duration = Duration::from_millis(20);
/// Bytes read at once.
const CHUNK: usize = 64 << 10;

/// Locks `m`, taking the data of a poisoned lock as it is (a panicked test thread does not
/// make the proxy's records unreadable).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Names of this process's threads that start with `prefix` (from /proc/self/task).
pub fn threads_named(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
        .map(|c| c.trim_end().to_string())
        .filter(|c| c.starts_with(prefix))
        .collect()
}

#[cfg(test)]
mod tests;
