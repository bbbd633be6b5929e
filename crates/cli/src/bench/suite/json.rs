//! The suite's results as one JSON document (`--json`, `bench.json`), from the typed rows.

use super::markdown::Doc;
use super::migration::{MigrationRow, Usage};
use super::plan::CHANNELS;
use super::results::{size_spreads, Kept, SizeRatios, SizeRow};
use serde::Serialize;
use serde_json::{json, Value};

/// A channels row with its ratios to the raw limit.
#[derive(Serialize)]
struct ChannelsRow<'a> {
    #[serde(flatten)]
    row: &'a Kept<MigrationRow>,
    first_round_ratio_to_raw: f64,
    ratio_to_raw: f64,
}

/// A size row with its ratios to the raw limits.
#[derive(Serialize)]
struct SizeOut<'a> {
    #[serde(flatten)]
    row: &'a Kept<SizeRow>,
    #[serde(flatten)]
    ratios: SizeRatios,
}

/// A migration's usage, named.
#[derive(Serialize)]
struct Resource<'a> {
    name: &'a str,
    #[serde(flatten)]
    usage: &'a Usage,
}

fn size(d: &Doc) -> Value {
    let res = d.res;
    if res.size.is_empty() {
        return json!({"rows": []});
    }
    let rows: Vec<SizeOut> = res
        .size
        .iter()
        .map(|row| SizeOut {
            row,
            ratios: SizeRatios::of(&row.row, d.raw, d.raw_mem),
        })
        .collect();
    let spread: Vec<Value> = size_spreads(&res.size)
        .iter()
        .map(|s| json!({"dirty": s.dirty, "prepared_destination": s.prepared, "largest_over_smallest": s.hi / s.lo}))
        .collect();
    json!({
        "rows": rows,
        "working_set_bytes": d.a.suite.size_working_set,
        "dirty_rate": d.a.suite.size_dirty_rate,
        "channels": CHANNELS,
        "ms_per_gib_spread": spread,
    })
}

pub(super) fn document(d: &Doc) -> Value {
    let (a, plan, res, raw) = (d.a, d.plan, d.res, d.raw);
    let channels_rows: Vec<ChannelsRow> = res
        .channels
        .iter()
        .map(|row| ChannelsRow {
            row,
            first_round_ratio_to_raw: row.row.figures.first_round_bytes_per_s / raw,
            ratio_to_raw: row.row.figures.bytes_per_s / raw,
        })
        .collect();
    let mut how_json = d.how.json();
    how_json["load_average_end"] = json!(d.load_end);
    how_json["quick"] = json!(a.suite.quick);
    how_json["repeat"] = json!(a.repeat.max(1));
    json!({
        "how": how_json,
        "raw_memory_bytes_per_s": d.raw_mem,
        "local": {"channels": CHANNELS, "rows": res.local},
        "compress": {"rates": res.compress_rates, "rows": res.compress},
        "file": res.file,
        "raw_tcp": {
            "bytes_per_s": raw,
            "start_bytes_per_s": res.raw_start.0,
            "end_bytes_per_s": res.raw_end.0,
            "best": res.raw_how(),
            "copy_bytes": plan.raw_bytes,
        },
        "channels": {"memory_bytes": plan.memory, "rows": channels_rows},
        "size": size(d),
        "dirty": {
            "memory_bytes": plan.memory,
            "working_set_bytes": plan.working_set,
            "channels": CHANNELS,
            "rows": res.dirty,
        },
        "devices": {
            "guest_memory_bytes": a.device_guest_memory,
            "device_size_bytes": a.device_size,
            "device_rate": a.device_rate,
            "channels": a.device_channels,
            "rows": res.devices,
        },
        "postcopy": {
            "memory_bytes": super::sections::postcopy_sizes(a).0,
            "working_set_bytes": super::sections::postcopy_sizes(a).1,
            "channels": CHANNELS,
            "rows": res.postcopy,
            "netns_skipped": res.postcopy_netns_skipped,
        },
        "resources": res.resources.iter().map(|(name, usage)| Resource { name, usage }).collect::<Vec<_>>(),
    })
}
