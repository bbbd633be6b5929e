//! `livemig bench --mode suite --quick`: one command runs every benchmark section (channels,
//! guest size, dirty rate, devices, local mode, resources) with real two-process migrations, and writes
//! bench.md and bench.json holding a row for every size, channel count, rate and device
//! count asked for, with plausible values and how it was run.

use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::Duration;

const SIZES: [u64; 2] = [32 << 20, 64 << 20];
const CHANNELS: [u64; 3] = [1, 2, 4];
const RATES: [&str; 3] = ["0", "50000", "max"];
const DEVICES: [u64; 3] = [0, 1, 2];

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("{k} is a number in {v:#}"))
}

fn rows<'a>(j: &'a Value, section: &str) -> &'a Vec<Value> {
    j[section]["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("{section}.rows in bench.json"))
}

#[test]
fn the_suite_writes_every_section_as_markdown_and_json() {
    let dir = std::env::temp_dir().join(format!("livemig-bench-suite-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.join("out");
    let args = [
        "bench".to_string(),
        "--mode=suite".into(),
        "--quick".into(),
        "--guest=synthetic".into(),
        format!("--out={}", out.display()),
        "--channels-list=1,2,4".into(),
        "--sizes=32M,64M".into(),
        "--dirty-rates=0,50k,max".into(),
        "--device-counts=0,1,2".into(),
    ];
    let child = Command::new(env!("CARGO_BIN_EXE_livemig"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start livemig bench");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(Duration::from_secs(300)) {
        Ok(o) => o.expect("wait for livemig bench"),
        Err(_) => {
            // SAFETY: kill on the pid of the child this test started, which has not been reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("the quick suite did not finish within 300 s");
        }
    };
    assert!(output.status.success(), "livemig bench --mode suite failed");
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 Markdown");

    // bench.md: the same Markdown as printed, every section with how it was run.
    let md = std::fs::read_to_string(out.join("bench.md")).expect("bench.md was written");
    assert_eq!(md, stdout, "bench.md holds what was printed");
    for heading in [
        "## RAM throughput against channel count",
        "## Total time and downtime against guest size",
        "## Downtime against dirty rate",
        "## Downtime against device count",
        "## Local mode against guest size",
        "## The cost of zstd compression",
        "## Resources of every migration",
    ] {
        assert!(md.contains(heading), "{heading} in bench.md:\n{md}");
    }
    let run_lines = md
        .lines()
        .filter(|l| l.starts_with("Run: `livemig bench --mode=suite --quick"))
        .count();
    assert!(
        run_lines >= 6,
        "a how-it-was-run line above every table:\n{md}"
    );
    assert!(md.contains("synthetic guest (chosen with --guest)"), "{md}");
    assert!(md.contains("Linux "), "the kernel in bench.md");
    for size in ["32 MiB", "64 MiB"] {
        for row in ["idle | prepared", "dirtying | prepared", "idle | cold"] {
            assert!(
                md.contains(&format!("| {size} | {row} | yes |")),
                "a {size} {row} row in bench.md"
            );
        }
    }
    for ch in CHANNELS {
        assert!(md.lines().any(|l| l.starts_with(&format!("| {ch} | "))));
    }
    assert!(
        md.lines().any(|l| l.starts_with("| 4, no page CRCs | ")),
        "{md}"
    );
    assert!(md.contains("| 64 MiB | idle | prepared | no |"), "{md}");

    // bench.json: the numbers.
    let text = std::fs::read_to_string(out.join("bench.json")).expect("bench.json was written");
    let j: Value = serde_json::from_str(&text).expect("bench.json is JSON");
    let how = &j["how"];
    assert_eq!(how["guest"], "synthetic");
    assert!(how["command"]
        .as_str()
        .unwrap()
        .starts_with("livemig bench --mode=suite --quick"));
    assert!(how["logical_cpus"].as_u64().unwrap() >= 1);
    for k in ["kernel", "date", "cpu_model"] {
        assert!(!how[k].as_str().unwrap_or("").is_empty(), "how.{k}");
    }
    let raw = f(&j["raw_tcp"], "bytes_per_s");
    assert!(raw > 1e6, "raw loopback TCP at {raw} B/s");
    assert!(f(&j["raw_tcp"], "start_bytes_per_s") > 0.0);
    assert!(f(&j["raw_tcp"], "end_bytes_per_s") > 0.0);

    assert!(f(&j, "raw_memory_bytes_per_s") > 1e6);
    let ch = rows(&j, "channels");
    assert_eq!(
        ch.iter()
            .map(|r| (r["channels"].as_u64().unwrap(), r["page_checksums"] == true))
            .collect::<Vec<_>>(),
        CHANNELS
            .iter()
            .map(|&c| (c, true))
            .chain([(4, false)])
            .collect::<Vec<_>>(),
        "one row per channel count, then 4 channels without page CRCs"
    );
    for r in ch {
        assert!(f(r, "bytes_per_s") > 0.0 && f(r, "first_round_bytes_per_s") > 0.0);
        for k in ["ratio_to_raw", "first_round_ratio_to_raw"] {
            let x = f(r, k);
            assert!(x > 0.0 && x <= 2.0, "{k} = {x} in (0, 2]: {r:#}");
        }
        assert!(f(r, "downtime_ms") > 0.0 && f(r, "total_ms") >= f(r, "downtime_ms"));
    }

    let size = rows(&j, "size");
    assert_eq!(
        size.len(),
        3 * SIZES.len() + 1,
        "idle and dirtying per size to a prepared destination, idle to a cold one, then the \
         target's guest without page CRCs"
    );
    let no_crcs: Vec<_> = size
        .iter()
        .filter(|r| r["page_checksums"] == false)
        .collect();
    assert_eq!(no_crcs.len(), 1);
    assert_eq!(no_crcs[0]["memory_bytes"], 64 << 20);
    assert_eq!(no_crcs[0]["warm_destination"], true);
    assert!(f(no_crcs[0], "total_over_raw_memory") > 0.0);
    for (dirty, warm) in [(false, true), (true, true), (false, false)] {
        for s in SIZES {
            let r = size
                .iter()
                .find(|r| {
                    r["memory_bytes"].as_u64() == Some(s)
                        && r["dirty"] == dirty
                        && r["warm_destination"] == warm
                        && r["page_checksums"] == true
                })
                .unwrap_or_else(|| {
                    panic!("a size row for {s} bytes, dirty {dirty}, prepared {warm}")
                });
            assert!(f(r, "total_ms") > 0.0 && f(r, "downtime_ms") > 0.0);
            assert!(f(r, "raw_copy_ms") > 0.0);
            let ratio = f(r, "total_over_raw");
            assert!(ratio > 0.0 && ratio.is_finite(), "total / raw = {ratio}");
            let per = f(r, "ms_per_gib");
            let expect = f(r, "total_ms") / (s as f64 / (1u64 << 30) as f64);
            assert!((per - expect).abs() < 1e-6 * expect, "ms per GiB");
        }
    }

    let dirty = rows(&j, "dirty");
    assert_eq!(
        dirty
            .iter()
            .map(|r| r["dirty_rate_label"].as_str().unwrap())
            .collect::<Vec<_>>(),
        RATES,
        "one row per dirty rate"
    );
    for r in dirty {
        assert!(r["rounds"].as_u64().unwrap() >= 1);
        assert!(f(r, "downtime_ms") > 0.0 && f(r, "total_ms") > 0.0);
    }
    assert_eq!(dirty[0]["working_set_bytes"], 0, "rate 0 is an idle guest");
    assert!(dirty[2]["dirty_rate"].is_null(), "max: as fast as it can");
    assert!(
        dirty[2]["first_round_dirty_after_pages"].as_u64().unwrap() > 0,
        "a guest writing as fast as it can dirties pages during the first round"
    );

    let dev = rows(&j, "devices");
    let mut seen: Vec<(u64, String)> = dev
        .iter()
        .map(|r| {
            (
                r["devices"].as_u64().unwrap(),
                r["mode"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    seen.sort();
    let mut want = vec![(0, "none".to_string())];
    for n in &DEVICES[1..] {
        want.push((*n, "parallel".into()));
        want.push((*n, "serial".into()));
    }
    // The largest count once more, in parallel, at the extra downtime limit (1000 ms by
    // default): the expected downtime against the one that follows when the limit fits.
    want.push((*DEVICES.last().unwrap(), "parallel".into()));
    want.sort();
    assert_eq!(seen, want, "device rows");
    let limits: Vec<u64> = dev
        .iter()
        .filter(|r| r["devices"].as_u64() == DEVICES.last().copied() && r["mode"] == "parallel")
        .map(|r| r["limit_ms"].as_u64().unwrap_or(0))
        .collect();
    assert!(limits.contains(&1000), "the extra limit's row: {limits:?}");
    for r in dev {
        // Without devices the ideal is the RAM left for the last round over the raw link,
        // which the rounds run below the limit (they go on while they halve it) can make 0.
        let none = r["devices"] == 0;
        assert!(f(r, "downtime_ms") > 0.0 && (none || f(r, "ideal_downtime_ms") > 0.0));
        assert!(f(r, "ideal_downtime_ms") >= 0.0);
        assert_eq!(r["cap_held"], true, "{r:#}");
    }

    // Local mode: one row per size, not a page copied.
    let local = rows(&j, "local");
    assert_eq!(
        local
            .iter()
            .map(|r| r["memory_bytes"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        SIZES
    );
    for r in local {
        assert_eq!(r["local"], true);
        assert_eq!(f(r, "ram_pages_sent"), 0.0, "{r:#}");
        assert!(f(r, "downtime_ms") > 0.0 && f(r, "total_ms") >= f(r, "downtime_ms"));
    }

    // Section 6: every migration's resources, in its row and in the list.
    let res = j["resources"].as_array().expect("resources");
    // Compression: rates for two kinds of pages at two levels, then two migrations.
    let rates = j["compress"]["rates"].as_array().expect("compress.rates");
    assert_eq!(rates.len(), 4);
    for r in rates {
        assert!(f(r, "compress_bytes_per_s") > 0.0 && f(r, "decompress_bytes_per_s") > 0.0);
    }
    let ratio = |kind: &str| {
        rates
            .iter()
            .filter(|r| r["pages"] == kind)
            .map(|r| f(r, "ratio"))
            .fold(0.0f64, f64::max)
    };
    assert!(ratio("text") > 10.0, "text-like pages compress");
    assert!(ratio("pattern") < 1.1, "livemig's page pattern does not");
    let comp = rows(&j, "compress");
    assert_eq!(
        comp.iter()
            .map(|r| r["compress_level"].clone())
            .collect::<Vec<_>>(),
        vec![Value::Null, Value::from(1)]
    );
    let migrations = ch.len() + size.len() + dirty.len() + dev.len() + local.len() + comp.len();
    assert_eq!(res.len(), migrations, "one resources entry per migration");
    for u in res {
        let name = u["name"].as_str().unwrap();
        if name.starts_with("local-") {
            // Nothing of RAM moves: only the peaks mean something.
            assert!(f(u, "source_peak_rss_bytes") > 0.0 && f(u, "dest_peak_rss_bytes") > 0.0);
            continue;
        }
        let moved = f(u, "moved_bytes");
        assert!(moved >= (30 << 20) as f64, "{name}: moved {moved} bytes");
        let guest = f(u, "dest_guest_memory_bytes");
        assert!(guest >= (32 << 20) as f64, "{name}: guest memory");
        let rss = f(u, "dest_peak_rss_bytes");
        assert!(
            rss >= guest / 2.0 && rss < guest + (1u64 << 30) as f64,
            "{name}: destination peak RSS {rss} against a {guest}-byte guest"
        );
        assert!(f(u, "source_peak_rss_bytes") > 0.0);
        for side in ["source", "dest"] {
            let cpu = f(u, &format!("{side}_cpu_s"));
            let per = f(u, &format!("{side}_cpu_s_per_gib"));
            assert!(cpu > 0.0, "{name}: {side} CPU {cpu} s");
            assert!(per > 0.0 && per < 1000.0, "{name}: {side} {per} CPU s/GiB");
            assert!(f(u, &format!("{side}_process_cpu_s")) >= cpu - 0.05);
        }
    }
    for (name, n) in [("devices-2-parallel", 2.0), ("devices-0-none", 0.0)] {
        let u = res.iter().find(|u| u["name"] == name).unwrap();
        let buffered = f(u, "dest_peak_buffered_bytes");
        assert_eq!(buffered > 0.0, n > 0.0, "{name}: peak buffered {buffered}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
