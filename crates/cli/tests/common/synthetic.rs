//! Command lines of `livemig migrate` sources of a synthetic guest, as the end-to-end tests
//! start them.

use super::Proc;

/// `migrate --json --to=TO --guest=synthetic`, then `options`.
pub fn synthetic_source_args(to: &str, options: &[&str]) -> Vec<String> {
    let head = ["migrate".into(), "--json".into(), format!("--to={to}")];
    let guest = "--guest=synthetic".to_string();
    head.into_iter()
        .chain([guest])
        .chain(options.iter().map(|o| o.to_string()))
        .collect()
}

/// A source process migrating a synthetic guest to `to`, with `options` then `extra`.
pub fn synthetic_source(to: &str, options: &[&str], extra: &[&str]) -> Proc {
    synthetic_source_hooked(to, options, extra, "")
}

/// [`synthetic_source`] with test hooks (see [`Proc::spawn_hooked`]).
pub fn synthetic_source_hooked(to: &str, options: &[&str], extra: &[&str], hooks: &str) -> Proc {
    let mut args = synthetic_source_args(to, options);
    args.extend(extra.iter().map(|e| e.to_string()));
    Proc::spawn_hooked(&strs(&args), hooks)
}

/// The `&str`s of `v`, for a command line.
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}
