//! `livemig bench --tls`: the throughput cost of TLS. Every row (channel count, idle or
//! dirtying guest) is migrated twice in the same run, over plain TCP and over TLS 1.3 with
//! mutual authentication (throwaway certificates made for the run), alternating so both see
//! the same machine; the table puts them side by side.

use super::args::BenchArgs;
use super::raw_tcp;
use super::run::{filled_guest_args, Figures};
use crate::child_args::ToArgs;
use crate::pair::run_pair;
use crate::tls::TlsArgs;
use serde::Serialize;
use serde_json::json;
use std::process::ExitCode;

pub fn run(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("livemig-bench-tls-{}", std::process::id()));
    let tls = TlsArgs::throwaway(&dir)?;
    let result = measure_all(a, &tls);
    let _ = std::fs::remove_dir_all(&dir);
    let (rows, raw, raw_how) = result?;
    let how = format!(
        "livemig bench --tls --memory {} --working-set {} --dirty-rate {}: a {} MiB {} guest, filled, \
         migrated between two processes over loopback TCP, each row twice in the same run (plain, \
         then TLS 1.3 with mutual authentication: ECDSA P-256 certificates made for the run, \
         AES-128-GCM, one lm-tls thread per channel on each side), {} time(s) each, median kept. \
         Raw = best plain socket copy ({raw_how}).",
        a.memory,
        a.working_set,
        a.dirty_rate,
        a.memory >> 20,
        a.guest.name(),
        a.repeat.max(1)
    );
    if a.json {
        crate::emit(&json!({"guest": a.guest.name(), "mode": "tls", "how": how,
            "raw_tcp_bytes_per_s": raw, "rows": rows}));
    } else {
        println!("{}", table(&rows, raw, &how));
    }
    Ok(ExitCode::SUCCESS)
}

/// One row: the same migration over plain TCP and over TLS.
#[derive(Serialize)]
struct Row {
    channels: u16,
    dirty: bool,
    plain: Figures,
    tls: Figures,
    tls_to_plain: f64,
    raw_tcp_bytes_per_s: f64,
}

type Measured = (Vec<Row>, f64, String);

fn measure_all(a: &BenchArgs, tls: &TlsArgs) -> anyhow::Result<Measured> {
    let (raw, raw_how) = raw_tcp::measure(a.memory)?;
    let mut rows = Vec::new();
    for dirty in [false, true] {
        for &ch in &a.channels {
            let (mut plain, mut secure) = (Vec::new(), Vec::new());
            for _ in 0..a.repeat.max(1) {
                plain.push(one(a, ch, dirty, None)?);
                secure.push(one(a, ch, dirty, Some(tls))?);
            }
            let (plain, secure) = (median(plain), median(secure));
            let ratio = secure.bytes_per_s / plain.bytes_per_s.max(1.0);
            if !a.json {
                eprintln!(
                    "bench: {ch} channels, {}: plain {:.0} MB/s, TLS {:.0} MB/s ({:.2})",
                    if dirty { "dirtying" } else { "idle" },
                    plain.bytes_per_s / 1e6,
                    secure.bytes_per_s / 1e6,
                    ratio
                );
            }
            rows.push(Row {
                channels: ch,
                dirty,
                plain,
                tls: secure,
                tls_to_plain: ratio,
                raw_tcp_bytes_per_s: raw,
            });
        }
    }
    Ok((rows, raw, raw_how))
}

fn median(mut v: Vec<Figures>) -> Figures {
    v.sort_by(|x, y| x.bytes_per_s.total_cmp(&y.bytes_per_s));
    v.swap_remove(v.len() / 2)
}

/// One migration between two processes, with TLS on both sides when given.
fn one(
    a: &BenchArgs,
    channels: u16,
    dirty: bool,
    tls: Option<&TlsArgs>,
) -> anyhow::Result<Figures> {
    let ws = if dirty { a.working_set } else { 0 };
    let mut src = filled_guest_args(a, a.memory, ws, a.dirty_rate, 200, channels);
    let mut dst = vec![format!("--memory={}", a.memory)];
    if let Some(t) = tls {
        src.extend(t.to_args());
        dst.extend(t.to_args());
    }
    let r = run_pair(&dst, &src, |_| {})?;
    Ok(Figures::of(&r.source.report))
}

fn table(rows: &[Row], raw: f64, how: &str) -> String {
    let mut s = format!("Raw loopback TCP (same run): {:.0} MB/s\n\n", raw / 1e6);
    s.push_str(
        "| channels | guest | plain MB/s | TLS MB/s | TLS / plain | plain setup ms | TLS setup ms | plain downtime ms | TLS downtime ms |\n",
    );
    s.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            r.channels,
            if r.dirty { "dirtying" } else { "idle" },
            r.plain.bytes_per_s / 1e6,
            r.tls.bytes_per_s / 1e6,
            r.tls_to_plain,
            r.plain.setup_ms,
            r.tls.setup_ms,
            r.plain.downtime_ms,
            r.tls.downtime_ms,
        ));
    }
    s.push_str(&format!("\nHow: {how}\n"));
    s
}
