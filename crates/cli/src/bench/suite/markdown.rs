//! The suite's results as Markdown: a heading, how it was run and a table per section, from
//! the typed rows alone (no measuring here).

use super::facts::HowRun;
use super::migration::MigrationRow;
use super::plan::{Plan, CHANNELS, GIB, MIB};
use super::results::{size_spreads, Kept, Results, SizeRatios, SizeRow};
use crate::bench::BenchArgs;
use std::fmt::Write as _;

/// What every section's text reads from.
pub(super) struct Doc<'a> {
    pub a: &'a BenchArgs,
    pub plan: &'a Plan,
    pub how: &'a HowRun,
    pub res: &'a Results,
    pub run_line: String,
    pub load_end: String,
    /// The raw loopback TCP limit, and the raw memory-to-memory copy.
    pub raw: f64,
    pub raw_mem: f64,
}

fn mib(b: f64) -> f64 {
    b / MIB as f64
}

pub(super) fn size_label(b: u64) -> String {
    if b >= 1 << 30 && b & ((1 << 30) - 1) == 0 {
        format!("{} GiB", b >> 30)
    } else {
        format!("{} MiB", b >> 20)
    }
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "not met"
    }
}

/// The whole document, sections in the suite's order; those not run are left out.
pub(super) fn render(d: &Doc) -> String {
    let mut md = String::new();
    head(&mut md, d);
    let res = d.res;
    if !res.channels.is_empty() {
        channels(&mut md, d);
    }
    if !res.size.is_empty() {
        size(&mut md, d);
    }
    if !res.dirty.is_empty() {
        dirty(&mut md, d);
    }
    if !res.local.is_empty() {
        local(&mut md, d);
    }
    if !res.compress_rates.is_empty() {
        compress(&mut md, d);
    }
    if !res.devices.is_empty() {
        devices(&mut md, d);
    }
    if !res.postcopy.is_empty() {
        postcopy(&mut md, d);
    }
    if let Some(f) = &res.file {
        file(&mut md, d, f);
    }
    if !res.resources.is_empty() {
        resources(&mut md, d);
    }
    md
}

fn file(md: &mut String, d: &Doc, f: &crate::bench::file::FileBench) {
    use std::fmt::Write;
    let _ = writeln!(md, "## Through a file\n\n{}\n", d.run_line);
    let _ = writeln!(
        md,
        "How: {} MiB of data, {} threads, in {}; medians of {}{}. The raw write is a \
         sequential write of the same bytes from memory, then `fsync`; the save a live save of \
         an idle guest holding them, `fsync` included. Reads are cold (the file dropped from \
         the page cache) into fresh memory on both sides. Targets: save and eager restore at \
         least 0.8 x the raw rate; on demand, the guest running within 50 ms.\n",
        f.bytes >> 20,
        f.channels,
        f.dir.display(),
        f.runs,
        if f.direct_io {
            ", both sides with O_DIRECT"
        } else {
            ""
        }
    );
    md.push_str(
        "| what | raw MB/s | livemig MB/s | livemig / raw (median of each run's pair) | each run |\n|---|---|---|---|---|\n",
    );
    let runs = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        md,
        "| save | {:.0} | {:.0} | {:.2} | {} |\n| eager restore | {:.0} | {:.0} | {:.2} | {} |\n",
        f.raw_write_bytes_per_s / 1e6,
        f.save_bytes_per_s / 1e6,
        f.save_vs_raw_write,
        runs(&f.save_vs_raw_write_runs),
        f.raw_read_bytes_per_s / 1e6,
        f.restore_bytes_per_s / 1e6,
        f.restore_vs_raw_read,
        runs(&f.restore_vs_raw_read_runs),
    );
    let _ = writeln!(
        md,
        "On demand, a {} MiB guest with {} MiB of data: running again {:.1} ms after the call \
         (each run: {} ms), every page in after {:.0} ms. A guest with a tenth of its pages \
         holding data ({} MiB): a file of {} MiB whose allocated size is {} MiB.\n",
        f.on_demand_memory >> 20,
        f.on_demand_data_bytes >> 20,
        f.on_demand_resumed_ms,
        runs(&f.on_demand_resumed_ms_runs),
        f.on_demand_total_ms,
        f.sparse_data_bytes >> 20,
        f.sparse_file_len >> 20,
        f.sparse_allocated_bytes >> 20
    );
}

fn head(md: &mut String, d: &Doc) {
    let res = d.res;
    let _ = writeln!(md, "# livemig benchmark suite\n");
    let _ = writeln!(md, "{}\n", d.run_line);
    let _ = writeln!(
        md,
        "Raw loopback TCP: {:.0} MB/s at the start, {:.0} MB/s at the end; the limit used is \
         the better, {:.0} MB/s ({}; each a plain socket copy of {} MiB from a cache-hot buffer, \
         best of 1, 2 or 4 streams, 64 KiB or 1 MiB writes, default or 4 MiB socket buffers). \
         Raw memory copy: {:.0} MB/s (the same copy from a {} MiB buffer into another, both \
         faulted in beforehand: every byte read from RAM and written to RAM once, as a migration \
         must; best of 1, 2 or 4 streams). Load average at the end: {}. Figures on a busy \
         machine move by tens of percent from run to run; compare the ratios within one run.\n",
        res.raw_start.0 / 1e6,
        res.raw_end.0 / 1e6,
        d.raw / 1e6,
        res.raw_how(),
        d.plan.raw_bytes >> 20,
        res.raw_memory / 1e6,
        d.plan.raw_bytes >> 20,
        d.load_end,
    );
}

fn channels(md: &mut String, d: &Doc) {
    let (raw, raw_mem) = (d.raw, d.raw_mem);
    let _ = writeln!(
        md,
        "## RAM throughput against channel count\n\n{}\n",
        d.run_line
    );
    let _ = writeln!(
        md,
        "How: a filled, idle {} {} guest migrated between two processes over loopback TCP; \
         the destination started with --memory (guest memory pre-faulted before the source \
         connects). First round = the first round's bytes over its time; overall = all bytes \
         over the time from the first page to the end (setup excluded). Raw loopback TCP \
         (same run): {:.0} MB/s; raw memory copy: {:.0} MB/s. The last row runs without page \
         CRCs (`--page-checksums=false`).\n",
        size_label(d.plan.memory),
        d.how.guest,
        raw / 1e6,
        raw_mem / 1e6
    );
    md.push_str("| channels | total ms | downtime ms | rounds | first round MB/s | overall MB/s | first round / raw | overall / raw | overall / raw memory |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in d.res.channels.iter().map(|k| &k.row) {
        let label = if r.page_checksums {
            r.channels.to_string()
        } else {
            format!("{}, no page CRCs", r.channels)
        };
        let f = &r.figures;
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.1} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
            label,
            f.total_ms,
            f.downtime_ms,
            f.rounds,
            f.first_round_bytes_per_s / 1e6,
            f.bytes_per_s / 1e6,
            f.first_round_bytes_per_s / raw,
            f.bytes_per_s / raw,
            f.bytes_per_s / raw_mem,
        );
    }
    md.push('\n');
    let four = d.res.channels.iter().map(|k| &k.row);
    if let Some(r) = four.clone().find(|r| r.channels == 4 && r.page_checksums) {
        let ratio = r.figures.bytes_per_s / raw;
        let _ = writeln!(
            md,
            "Target (issue 6): 4 channels at 0.85 or more of raw loopback TCP: {ratio:.2} here ({}); \
             {:.2} of the raw memory copy.\n",
            met(ratio >= 0.85),
            r.figures.bytes_per_s / raw_mem
        );
    }
}

fn size(md: &mut String, d: &Doc) {
    let (raw, raw_mem) = (d.raw, d.raw_mem);
    let _ = writeln!(
        md,
        "## Total time and downtime against guest size\n\n{}\n",
        d.run_line
    );
    let _ = writeln!(
        md,
        "How: filled {} guests, idle and dirtying {} MiB at {} pages/s, {CHANNELS} channels. \
         Prepared: the destination allocated and faulted in guest memory before the source \
         connected (`incoming --memory`, as QEMU's destination allocates guest RAM at \
         start-up). Cold: it allocates and pre-faults guest memory while the pages arrive, \
         so total time includes allocation and first touch (on this machine the first touch \
         of memory the hypervisor took back costs 1.5-1.9 s per GiB, and less for memory \
         freed a moment ago: cold rows depend on what ran before). Total time includes \
         connection set-up. The last row: the target's idle guest, prepared, without page \
         CRCs. Raw copy = guest bytes / raw loopback TCP ({:.0} MB/s); raw \
         memory copy = guest bytes / the raw memory-to-memory copy ({:.0} MB/s); ms per GiB = \
         total / guest size.\n",
        d.how.guest,
        d.a.suite.size_working_set >> 20,
        d.a.suite.size_dirty_rate,
        raw / 1e6,
        raw_mem / 1e6
    );
    md.push_str("| guest size | guest | destination | page CRCs | total ms | setup ms | downtime ms | rounds | raw copy ms | total / raw | raw memory copy ms | total / raw memory | ms per GiB |\n");
    md.push_str("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in d.res.size.iter().map(|k| &k.row) {
        let x = SizeRatios::of(r, raw, raw_mem);
        let m = &r.migration;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.1} | {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} |",
            size_label(m.memory_bytes),
            if r.dirty { "dirtying" } else { "idle" },
            if m.warm_destination { "prepared" } else { "cold" },
            if m.page_checksums { "yes" } else { "no" },
            m.figures.total_ms,
            m.figures.setup_ms,
            m.figures.downtime_ms,
            m.figures.rounds,
            x.raw_copy_ms,
            x.total_over_raw,
            x.raw_memory_copy_ms,
            x.total_over_raw_memory,
            r.ms_per_gib,
        );
    }
    md.push('\n');
    for s in size_spreads(&d.res.size) {
        let _ = writeln!(
            md,
            "Linearity, {}, {} destination: ms per GiB from {:.0} to {:.0} across sizes (largest / smallest = {:.2}).\n",
            if s.dirty { "dirtying" } else { "idle" },
            if s.prepared { "prepared" } else { "cold" },
            s.lo,
            s.hi,
            s.hi / s.lo
        );
    }
    size_target(md, d);
}

/// The target for the idle 1 GiB guest, when it was run.
fn size_target(md: &mut String, d: &Doc) {
    let ratios = |r: &SizeRow| SizeRatios::of(r, d.raw, d.raw_mem);
    let idle_1g = |warm: bool, crcs: bool| {
        d.res.size.iter().map(|k| &k.row).find(|r| {
            r.migration.memory_bytes == 1 << 30
                && !r.dirty
                && r.migration.warm_destination == warm
                && r.migration.page_checksums == crcs
        })
    };
    let Some(t) = idle_1g(false, true) else {
        return;
    };
    let ratio = ratios(t).total_over_raw;
    let others: String = [
        (true, true, "prepared"),
        (true, false, "prepared, no page CRCs"),
    ]
    .iter()
    .filter_map(|&(w, c, what)| {
        idle_1g(w, c).map(|r| {
            let x = ratios(r);
            format!(
                "; {:.2} ({what}; {:.2} of the raw memory copy)",
                x.total_over_raw, x.total_over_raw_memory
            )
        })
    })
    .collect();
    let _ = writeln!(
        md,
        "Target (issue 6): total / raw ≤ 1.3 for a filled idle 1 GiB guest, set-up and \
         pre-faulting included: {ratio:.2} here with a cold destination ({}){}.\n",
        met(ratio <= 1.3),
        others
    );
}

fn dirty(md: &mut String, d: &Doc) {
    let _ = writeln!(md, "## Downtime against dirty rate\n\n{}\n", d.run_line);
    let _ = writeln!(
        md,
        "How: a filled {} {} guest writing pages of a {} MiB working set at each rate (0: \
         idle; max: as fast as one vCPU writes), {CHANNELS} channels, destination started \
         with --memory; livemig's defaults otherwise (switchover once the rest would move \
         within 300 ms, at most 30 rounds). Dirty MB/s = the rate asked for x 4 KiB; dirtied \
         in round 1 = the distinct pages written while the first round was sent (at most \
         the working set).\n",
        size_label(d.plan.memory),
        d.how.guest,
        d.plan.working_set >> 20
    );
    md.push_str("| dirty rate pages/s | dirty MB/s | dirtied in round 1 MiB | total ms | downtime ms | rounds | switchover | overall MB/s |\n");
    md.push_str("|---:|---:|---:|---:|---:|---:|---|---:|\n");
    for r in d.res.dirty.iter().map(|k| &k.row) {
        let dirty_mbs = r
            .dirty_rate
            .map_or("-".into(), |p| format!("{:.0}", p as f64 * 4096.0 / 1e6));
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.1} | {} | {} | {:.0} |",
            r.dirty_rate_label,
            dirty_mbs,
            r.first_round_dirty_after_pages as f64 * 4096.0 / MIB as f64,
            r.figures.total_ms,
            r.figures.downtime_ms,
            r.figures.rounds,
            if r.forced_switchover {
                "forced"
            } else {
                "converged"
            },
            r.figures.bytes_per_s / 1e6,
        );
    }
    md.push('\n');
}

fn local(md: &mut String, d: &Doc) {
    let _ = writeln!(md, "## Local mode against guest size\n\n{}\n", d.run_line);
    let _ = writeln!(
        md,
        "How: a filled, idle {} guest in memfd-backed memory migrated to a destination on the \
         same host over a Unix socket with `--local`: the destination maps the memory files \
         the source hands over (SCM_RIGHTS) and no page is copied; {CHANNELS} data channels \
         carry only device state (none here). Copied, cold = the idle row of the same size \
         in the size table, if run.\n",
        d.how.guest
    );
    md.push_str("| guest size | total ms | setup ms | downtime ms | RAM pages sent | copied, cold: total ms | copied, cold: downtime ms |\n");
    md.push_str("|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in d.res.local.iter().map(|k| &k.row) {
        let size = r.memory_bytes;
        let copied = d.res.size.iter().map(|k| &k.row).find(|c| {
            c.migration.memory_bytes == size && !c.dirty && !c.migration.warm_destination
        });
        let cell = |v: fn(&SizeRow) -> f64, prec: usize| {
            copied.map_or("-".to_string(), |c| format!("{:.prec$}", v(c)))
        };
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.2} | {} | {} | {} |",
            size_label(size),
            r.figures.total_ms,
            r.figures.setup_ms,
            r.figures.downtime_ms,
            r.ram_pages_sent,
            cell(|c| c.migration.figures.total_ms, 0),
            cell(|c| c.migration.figures.downtime_ms, 1),
        );
    }
    md.push('\n');
    let four_gib = d.res.local.iter().map(|k| &k.row);
    if let Some(r) = four_gib.clone().find(|r| r.memory_bytes == 4 << 30) {
        let dt = r.figures.downtime_ms;
        let _ = writeln!(
            md,
            "Target (issue 6): local mode, idle 4 GiB guest, downtime under 20 ms: {dt:.2} ms here ({}).\n",
            met(dt < 20.0)
        );
    }
}

fn compress(md: &mut String, d: &Doc) {
    let res = d.res;
    let _ = writeln!(md, "## The cost of zstd compression\n\n{}\n", d.run_line);
    let _ = writeln!(
        md,
        "How: one core compresses and then decompresses {} MiB of pages in packets of 128 \
         pages, as a data channel does with `--compress zstd`: livemig's page pattern (what \
         the test guests hold) and text-like pages (a line repeated). Then the suite's idle \
         {} guest migrated to a prepared destination, 4 channels, without and with \
         `--compress zstd` (level 1); its pages are the pattern, which does not shrink, \
         so each channel tries, backs off (tries again after 1, 2, 4, ... up to 64 \
         packets) and sends the rest as they are: the second row is the price of trying. Compression pays where the link is slower than the cores can compress \
         and the pages shrink.\n",
        res.compress_rates.first().map_or(0, |r| r.bytes >> 20),
        size_label(d.plan.memory)
    );
    md.push_str("| pages | zstd level | compress MB/s (1 core) | decompress MB/s | ratio |\n");
    md.push_str("|---|---:|---:|---:|---:|\n");
    for r in &res.compress_rates {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.2} |",
            r.pages,
            r.level,
            r.compress_bytes_per_s / 1e6,
            r.decompress_bytes_per_s / 1e6,
            r.ratio,
        );
    }
    md.push('\n');
    if !res.compress.is_empty() {
        compress_migrations(md, &res.compress);
    }
}

fn compress_migrations(md: &mut String, rows: &[Kept<MigrationRow>]) {
    md.push_str("| migration | total ms | MB/s | bytes sent | src CPU s/GiB | dst CPU s/GiB |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|\n");
    for k in rows {
        let (r, u) = (&k.row, &k.usage);
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {} | {:.2} | {:.2} |",
            match r.compress_level {
                Some(l) => format!("--compress zstd, level {l}"),
                None => "uncompressed".into(),
            },
            r.figures.total_ms,
            r.figures.bytes_per_s / 1e6,
            r.figures.transferred_bytes,
            u.source_cpu_s_per_gib,
            u.dest_cpu_s_per_gib,
        );
    }
    md.push('\n');
}

fn devices(md: &mut String, d: &Doc) {
    let a = d.a;
    let _ = writeln!(md, "## Downtime against device count\n\n{}\n", d.run_line);
    let dev_how = format!(
        "a {} {} guest dirtying {} MiB at {} pages/s, {} data channels, devices of {} MiB \
         read at {} MB/s (vfio-sim), 1 MiB chunks, default credit (2 x channels); parallel = \
         chunks on the data channels with credit, serial = each device in turn on the main \
         channel; the same rows as `livemig bench --mode devices`. Ideal = max(one device's \
         read time, all device bytes / raw TCP) + the last RAM round / raw TCP (without \
         devices: the last RAM round / raw TCP). Limit = the downtime limit; the switchover \
         counts the devices' read time, so devices that cannot fit it are forced over at \
         the round bound (30 rounds, 100 ms apart once only the devices hold it). Expected \
         = what the source expected when it paused the guest (RAM and devices); expected / \
         actual is how close that came.",
        size_label(a.device_guest_memory),
        d.how.guest,
        a.working_set.min(a.device_guest_memory / 4) >> 20,
        a.dirty_rate,
        a.device_channels,
        a.device_size >> 20,
        a.device_rate / 1_000_000,
    );
    let rows: Vec<_> = d.res.devices.iter().map(|k| &k.row).collect();
    md.push_str(&crate::bench::devices::table(&rows, d.raw, &dev_how));
    md.push('\n');
}

fn postcopy(md: &mut String, d: &Doc) {
    let (memory, ws) = super::sections::postcopy_sizes(d.a);
    let _ = writeln!(
        md,
        "## Postcopy beside precopy with auto-converge\n\n{}\n",
        d.run_line
    );
    let _ = writeln!(
        md,
        "How: a filled {} {} guest writing a {} MiB working set as fast as it can \
         (--dirty-rate=0), {CHANNELS} channels over loopback TCP, then over a link of 1 Gbit/s \
         (two network namespaces joined by a veth pair, a tc tbf bucket on the source's \
         side), cold destination. Postcopy \
         rows: --postcopy --postcopy-after-rounds=1 (the guest runs on the destination after \
         one precopy round; what it touches is fetched on demand, the rest pushed), the second \
         with the push capped (--max-postcopy-bandwidth) so faults wait behind it. Precopy \
         row: no --postcopy, auto-converge on (livemig's default). Postcopy ms = from the \
         switch until the destination had every page (source's report); pages requested = \
         pages the destination asked for (the source's count); fault waits = from the fault read to its \
         page installed (upper bounds of buckets an eighth of a power of two wide, at most 12.5 % high, capped at the max). Throttled = the time \
         of the rounds auto-converge ran throttled, and its highest throttle.\n",
        size_label(memory),
        d.how.guest,
        ws >> 20
    );
    postcopy_rows(md, d);
    postcopy_targets(md, d);
    md.push('\n');
}

/// The postcopy table's rows (SKIPPED rows where the link could not be made).
fn postcopy_rows(md: &mut String, d: &Doc) {
    md.push_str("| mode | link | total ms | downtime ms | rounds | postcopy ms | pages in postcopy | pages requested | faults | fault p50 us | fault p99 us | fault max us | throttled ms (max %) |\n");
    md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let dash = || "-".to_string();
    for r in d.res.postcopy.iter().map(|k| &k.row) {
        let f = &r.figures;
        let pc = r.postcopy.as_ref();
        let fl = r.postcopy_faults.as_ref();
        let throttled = if r.throttled_rounds > 0 {
            format!("{:.0} ({}%)", r.throttled_ms, r.max_throttle_percent)
        } else {
            "0".into()
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.mode,
            r.link,
            f.total_ms,
            f.downtime_ms,
            f.rounds,
            pc.map_or_else(dash, |p| format!("{:.0}", p.ms)),
            pc.map_or_else(dash, |p| p.pages.to_string()),
            pc.map_or_else(dash, |p| p.requested.to_string()),
            fl.map_or_else(dash, |l| l.faults.to_string()),
            fl.map_or_else(dash, |l| l.p50_us.to_string()),
            fl.map_or_else(dash, |l| l.p99_us.to_string()),
            fl.map_or_else(dash, |l| l.max_us.to_string()),
            throttled,
        );
    }
    if let Some(why) = &d.res.postcopy_netns_skipped {
        for mode in super::sections::POSTCOPY_NETNS_SPECS {
            let _ = writeln!(
                md,
                "| {mode} | {} | SKIPPED ({}) | | | | | | | | | | |",
                super::sections::POSTCOPY_NETNS_LINK,
                why.replace('|', "/")
            );
        }
    }
}

/// The postcopy targets, as this run met them.
fn postcopy_targets(md: &mut String, d: &Doc) {
    // The uncapped loopback row with the most faults: the KVM guest, slow in ring 0 here,
    // may fault once or not at all in its short postcopy phase.
    if let Some((mode, fl)) = d
        .res
        .postcopy
        .iter()
        .filter(|k| {
            k.row.postcopy.is_some()
                && k.row.max_postcopy_bandwidth.is_none()
                && k.row.link == "loopback"
        })
        .filter_map(|k| Some((&k.row.mode, k.row.postcopy_faults.as_ref()?)))
        .max_by_key(|(_, fl)| fl.faults)
    {
        if fl.faults == 0 {
            let _ = writeln!(
                md,
                "\nLoopback targets (uncapped rows): not measurable, no fault in this run."
            );
        } else {
            let _ = writeln!(
                md,
                "\nLoopback targets (uncapped row with the most faults, {mode}): fault p50 <= 100 \
                 us: {} ({} us); p99 <= 1 ms: {} ({} us; {} faults).",
                met(fl.p50_us <= 100),
                fl.p50_us,
                met(fl.p99_us <= 1000),
                fl.p99_us,
                fl.faults,
            );
        }
    }
    if let Some(k) = d
        .res
        .postcopy
        .iter()
        .find(|k| k.row.postcopy.is_some() && k.row.link != "loopback")
    {
        let r = &k.row;
        let bound_ms = 1.3 * 1e3 * r.memory_bytes as f64 / 125e6;
        let p99 = r.postcopy_faults.as_ref().map_or(0, |f| f.p99_us);
        let _ = writeln!(
            md,
            "\n1 Gbit/s targets (postcopy row): total <= 1.3 x guest memory / link rate \
             ({bound_ms:.0} ms): {} ({:.0} ms); downtime <= 50 ms: {} ({:.1} ms); fault p99 \
             <= 5 ms: {} ({p99} us).",
            met(r.figures.total_ms <= bound_ms),
            r.figures.total_ms,
            met(r.figures.downtime_ms <= 50.0),
            r.figures.downtime_ms,
            met(p99 <= 5000),
        );
    }
}

fn resources(md: &mut String, d: &Doc) {
    let _ = writeln!(
        md,
        "## Resources of every migration\n\n{}\n\nHow: peak RSS = VmHWM of each \
         process, read by the process itself as it prints its final JSON line (the \
         destination's includes the guest memory it received; \"over guest\" is what is \
         left). Peak buffered = the sum of each device's largest reorder buffer on the \
         destination (a bound on what was buffered at once). CPU = user + system time of \
         the process from the start of the migration (source: after its guest started, was \
         filled and warmed up; destination: from when it waits for the source, after any \
         --memory pre-fault) less the guest's own threads (vCPUs, dirtying threads), per \
         GiB sent (RAM and device state).\n",
        d.run_line
    );
    md.push_str("| migration | GiB moved | src peak RSS MiB | dst peak RSS MiB | dst over guest MiB | dst peak buffered MiB | src CPU s | dst CPU s | src CPU s/GiB | dst CPU s/GiB | guest CPU s (src) |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (name, u) in &d.res.resources {
        let _ = writeln!(
            md,
            "| {name} | {:.2} | {:.0} | {:.0} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            u.moved_bytes as f64 / GIB,
            mib(u.source_peak_rss_bytes.unwrap_or(0) as f64),
            mib(u.dest_peak_rss_bytes as f64),
            mib(u.dest_rss_over_guest_bytes as f64),
            mib(u.dest_peak_buffered_bytes as f64),
            u.source_cpu_s,
            u.dest_cpu_s,
            u.source_cpu_s_per_gib,
            u.dest_cpu_s_per_gib,
            u.source_guest_cpu_s,
        );
    }
    md.push('\n');
}
