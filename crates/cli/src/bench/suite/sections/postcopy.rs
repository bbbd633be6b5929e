//! Postcopy against precopy with auto-converge, on the same guest: a 1 GiB guest (KVM when
//! usable, else synthetic) writing a 256 MiB working set as fast as it can
//! (`--dirty-rate=0`), migrated over loopback TCP with `--postcopy --postcopy-after-rounds=1`,
//! again with the background push capped (`--max-postcopy-bandwidth=200M`, so faults wait
//! behind it), and without postcopy (precopy, auto-converge on: livemig's default).
//! Then postcopy and precopy again over a link of 1 Gbit/s (two network namespaces joined
//! by a veth pair, a `tc tbf` bucket on the source's side: [`crate::bench::netlink`]); rows
//! SKIPPED when the link cannot be made here (no root, `ip`, `tc` or namespaces).
//! `--quick`: a 64 MiB guest writing 16 MiB.

use super::super::plan::{Plan, CHANNELS, MIB};
use super::super::results::{Kept, Results};
use crate::bench::netlink::NetLink;
use crate::bench::run::{filled_guest_args, median, Figures, Run};
use crate::bench::BenchArgs;
use crate::pair::run_pair;
use livemig_engine::report::{FaultLatencyReport, PostcopyReport};
use serde::Serialize;

/// The push cap of the second postcopy row.
const CAPPED_PUSH: &str = "200M";

/// One migration of the postcopy section.
#[derive(Debug, Clone, Serialize)]
pub(in super::super) struct PostcopyRow {
    /// "postcopy", "postcopy, push capped 200M" or "precopy, auto-converge".
    pub mode: String,
    /// "loopback".
    pub link: String,
    pub memory_bytes: u64,
    pub working_set_bytes: u64,
    pub channels: u16,
    pub postcopy_allowed: bool,
    /// `--max-postcopy-bandwidth`, as given.
    pub max_postcopy_bandwidth: Option<String>,
    #[serde(flatten)]
    pub figures: Figures,
    /// The source's postcopy figures (none: it never switched).
    pub postcopy: Option<PostcopyReport>,
    /// The destination's fault waits (none: no postcopy).
    pub postcopy_faults: Option<FaultLatencyReport>,
    /// The destination's time from the switch until every page was in.
    pub dest_postcopy_ms: f64,
    /// Rounds auto-converge ran throttled, and their time added up.
    pub throttled_rounds: usize,
    pub throttled_ms: f64,
    pub max_throttle_percent: u8,
}

struct Spec {
    mode: &'static str,
    postcopy: bool,
    cap: Option<&'static str>,
    /// The guest, when not the bench's own (`--guest`).
    guest: Option<&'static str>,
}

/// The rate of the namespaces' link, as tc spells it and as the table says it.
const NETNS_RATE: &str = "1gbit";
pub(in super::super) const NETNS_LINK: &str = "netns, 1 Gbit/s (tc tbf)";

/// What runs over the namespaces' link.
pub(in super::super) const NETNS_SPECS: [&str; 2] = ["postcopy", "precopy, auto-converge"];

const SPECS: [Spec; 4] = [
    Spec {
        mode: "postcopy",
        postcopy: true,
        cap: None,
        guest: None,
    },
    // The KVM guest runs ring-0 code slowly under this machine's software virtualization,
    // so in its short postcopy phase it faults a handful of times; the synthetic guest's
    // writers (ring 3) fault on every page they touch: the loopback fault figures.
    Spec {
        mode: "postcopy, synthetic guest",
        postcopy: true,
        cap: None,
        guest: Some("synthetic"),
    },
    Spec {
        mode: "postcopy, push capped 200M",
        postcopy: true,
        cap: Some(CAPPED_PUSH),
        guest: None,
    },
    Spec {
        mode: "precopy, auto-converge",
        postcopy: false,
        cap: None,
        guest: None,
    },
];

/// The guest's memory and working set: 1 GiB and 256 MiB (`--quick`: 64 and 16 MiB).
pub(in super::super) fn sizes(a: &BenchArgs) -> (u64, u64) {
    if a.suite.quick {
        (64 * MIB, 16 * MIB)
    } else {
        (1 << 30, 256 * MIB)
    }
}

fn migrate_once(
    a: &BenchArgs,
    plan: &Plan,
    s: &Spec,
    link: Option<&NetLink>,
) -> anyhow::Result<Run<PostcopyRow>> {
    let (memory, ws) = sizes(a);
    let mut src = filled_guest_args(a, memory, ws, 0, plan.warmup_ms, CHANNELS);
    if let Some(g) = s.guest {
        src.retain(|arg| !arg.starts_with("--guest="));
        src.push(format!("--guest={g}"));
    }
    src.push("--auto-converge=true".into());
    if s.postcopy {
        src.push("--postcopy".into());
        src.push("--postcopy-after-rounds=1".into());
    }
    if let Some(cap) = s.cap {
        src.push(format!("--max-postcopy-bandwidth={cap}"));
    }
    let r = match link {
        Some(l) => l.run_pair(&[], &src)?,
        None => run_pair(&[], &src, |_| {})?,
    };
    let rep = &r.source.report;
    let dest = &r.dest.report;
    if s.postcopy && rep.postcopy.is_none() {
        eprintln!(
            "bench suite: {}: the migration converged before switching to postcopy",
            s.mode
        );
    }
    let throttled: Vec<_> = rep
        .rounds
        .iter()
        .filter(|r| r.throttle_percent > 0)
        .collect();
    let row = PostcopyRow {
        mode: s.mode.into(),
        link: if link.is_some() {
            NETNS_LINK
        } else {
            "loopback"
        }
        .into(),
        memory_bytes: memory,
        working_set_bytes: ws,
        channels: CHANNELS,
        postcopy_allowed: s.postcopy,
        max_postcopy_bandwidth: s.cap.map(str::to_string),
        figures: Figures::of(rep),
        postcopy: rep.postcopy.clone(),
        postcopy_faults: dest.postcopy_faults.clone(),
        dest_postcopy_ms: dest.postcopy_ms,
        throttled_rounds: throttled.len(),
        throttled_ms: throttled.iter().map(|r| r.ms).sum(),
        max_throttle_percent: throttled
            .iter()
            .map(|r| r.throttle_percent)
            .max()
            .unwrap_or(0),
    };
    Ok(Run::new(row, r))
}

pub(super) fn measure(a: &BenchArgs, plan: &Plan, res: &mut Results) -> anyhow::Result<()> {
    for s in &SPECS {
        one(a, plan, res, s, None)?;
    }
    match NetLink::new(NETNS_RATE) {
        Ok(link) => {
            for s in SPECS.iter().filter(|s| NETNS_SPECS.contains(&s.mode)) {
                one(a, plan, res, s, Some(&link))?;
            }
        }
        Err(why) => {
            eprintln!("bench suite: postcopy over a 1 Gbit/s netns link: SKIPPED ({why})");
            res.postcopy_netns_skipped = Some(why);
        }
    }
    Ok(())
}

/// One row: `s` migrated `--repeat` times over `link` (none: loopback), the median total kept.
fn one(
    a: &BenchArgs,
    plan: &Plan,
    res: &mut Results,
    s: &Spec,
    link: Option<&NetLink>,
) -> anyhow::Result<()> {
    let run = median(
        a.repeat,
        || migrate_once(a, plan, s, link),
        |r| r.row.figures.total_ms,
    )?;
    let f = &run.row.figures;
    let mut say = format!(
        "total {:.0} ms, downtime {:.1} ms",
        f.total_ms, f.downtime_ms
    );
    if let Some(pc) = &run.row.postcopy {
        say += &format!(", postcopy {:.0} ms, {} pages", pc.ms, pc.pages);
    }
    if let Some(fl) = &run.row.postcopy_faults {
        say += &format!(", {} faults, p99 {} us", fl.faults, fl.p99_us);
    }
    if run.row.throttled_rounds > 0 {
        say += &format!(", throttled {:.0} ms", run.row.throttled_ms);
    }
    let mut name = match (s.postcopy, s.cap) {
        (false, _) => "precopy-auto-converge".to_string(),
        (true, None) => "postcopy".to_string(),
        (true, Some(c)) => format!("postcopy-push-{c}"),
    };
    if let Some(g) = s.guest {
        name += &format!("-{g}");
    }
    if link.is_some() {
        name += "-netns-1gbit";
    }
    let row: Kept<PostcopyRow> = res.keep(a, &name, run, say)?;
    res.postcopy.push(row);
    Ok(())
}
