//! `--out DIR`: a benchmark's Markdown and JSON written as DIR/bench.md and DIR/bench.json.

use anyhow::Context;
use std::path::Path;

/// Writes `md` and `doc` into `dir` (created if needed), and says so on stderr as `who`.
pub(crate) fn write_out(
    dir: &Path,
    md: &str,
    doc: &serde_json::Value,
    who: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (md_path, json_path) = (dir.join("bench.md"), dir.join("bench.json"));
    std::fs::write(&md_path, md).with_context(|| format!("cannot write {}", md_path.display()))?;
    std::fs::write(&json_path, serde_json::to_string_pretty(doc)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    eprintln!(
        "{who}: wrote {} and {}",
        md_path.display(),
        json_path.display()
    );
    Ok(())
}
