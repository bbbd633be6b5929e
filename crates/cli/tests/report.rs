//! `livemig demo --report DIR`: after a real two-process migration of a small synthetic guest,
//! DIR holds the timeline and downtime pictures and the raw numbers, and the pictures draw
//! what report.json says.

mod common;
use common::*;
use serde_json::Value;

/// Checks that `svg` is one well-formed `<svg>` element (tags balanced, text escaped) and
/// returns it for further checks.
fn well_formed(name: &str, svg: &str) -> String {
    let body = svg
        .strip_prefix("<?xml")
        .map_or(svg, |rest| &rest[rest.find("?>").unwrap() + 2..])
        .trim();
    assert!(body.starts_with("<svg"), "{name} starts with <svg");
    assert!(body.ends_with("</svg>"), "{name} ends with </svg>");
    let mut open: Vec<&str> = Vec::new();
    let mut rest = body;
    while let Some(i) = rest.find('<') {
        let tag = &rest[i + 1..];
        let end = tag
            .find('>')
            .unwrap_or_else(|| panic!("{name}: unclosed tag"));
        let inner = &tag[..end];
        if let Some(closing) = inner.strip_prefix('/') {
            let top = open
                .pop()
                .unwrap_or_else(|| panic!("{name}: stray </{closing}>"));
            assert_eq!(top, closing.trim(), "{name}: tags nest");
        } else if !inner.ends_with('/') {
            open.push(inner.split_whitespace().next().unwrap_or(""));
        }
        rest = &tag[end + 1..];
        assert!(
            !rest.split('<').next().unwrap().contains('>'),
            "{name}: text escaped"
        );
    }
    assert!(open.is_empty(), "{name}: unclosed {open:?}");
    body.to_string()
}

#[test]
fn demo_writes_the_pictures_and_their_numbers() {
    let dir = std::env::temp_dir().join(format!("livemig-report-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let report_arg = format!("--report={}", dir.join("out").display());
    let mut demo = Proc::spawn(&[
        "demo",
        "--json",
        &report_arg,
        "--guest=synthetic",
        "--memory=128M",
        "--working-set=8M",
        "--dirty-rate=20k",
        "--warmup-ms=50",
        "--channels=2",
        // Does not converge at 1 ms while the guest dirties: a few rounds to plot.
        "--downtime-limit-ms=1",
        "--max-rounds=3",
    ]);
    let summary = demo
        .lines
        .recv_timeout(TIMEOUT)
        .expect("the demo's summary");
    assert!(demo.wait_exit().success(), "{summary:#}");

    let out = dir.join("out");
    let files: Vec<String> = summary["report_files"]
        .as_array()
        .unwrap_or_else(|| panic!("report_files in {summary:#}"))
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    for name in ["timeline.svg", "downtime.svg", "report.json"] {
        let path = out.join(name);
        assert!(path.is_file(), "{} was written", path.display());
        assert!(files.contains(&path.display().to_string()), "{files:?}");
    }

    let raw: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let rounds = raw["source"]["rounds"].as_array().expect("source rounds");
    assert_eq!(rounds.len() as u64, summary["rounds"].as_u64().unwrap());
    assert!(
        rounds.len() >= 2,
        "a precopy round and the switchover round"
    );
    let plotted = raw["timeline"]["rounds"].as_array().unwrap();
    assert_eq!(plotted.len(), rounds.len());
    assert_eq!(
        plotted[0]["throughput_bytes_per_s"],
        rounds[0]["bytes_per_s"]
    );
    assert!(
        raw["dest"]["verify"]["pages_checked"].as_u64().unwrap() > 0,
        "the destination's report is kept: {:#}",
        raw["dest"]
    );

    let timeline = well_formed(
        "timeline.svg",
        &std::fs::read_to_string(out.join("timeline.svg")).unwrap(),
    );
    for series in ["throughput", "remaining", "dirty-rate"] {
        assert_eq!(
            timeline.matches(&format!("class=\"pt {series}\"")).count(),
            rounds.len(),
            "one {series} point per round"
        );
    }
    let downtime = well_formed(
        "downtime.svg",
        &std::fs::read_to_string(out.join("downtime.svg")).unwrap(),
    );
    let parts = raw["downtime"]["sequential"].as_array().unwrap();
    let nonzero = parts
        .iter()
        .filter(|p| p["ms"].as_f64().unwrap() > 0.0)
        .count();
    assert!(nonzero >= 1, "{parts:#?}");
    assert_eq!(downtime.matches("class=\"seg\"").count(), nonzero);
    let sum: f64 = parts.iter().map(|p| p["ms"].as_f64().unwrap()).sum();
    let downtime_ms = raw["source"]["downtime_ms"].as_f64().unwrap();
    assert!(
        (sum - downtime_ms).abs() <= 0.01_f64.max(downtime_ms * 1e-3) + 1e-9,
        "the stacked parts add up to the downtime: {sum} vs {downtime_ms}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
