//! The facts at the head of every benchmark table, so a reader can repeat the run: the
//! command, the build and commit, the host (CPU, memory, kernel), the date and the load. One
//! place for `bench --mode suite` and `bench --peer qemu`.

use serde_json::{json, Value};

/// The facts a reader needs to repeat a run.
pub(crate) struct RunFacts {
    command: String,
    build: &'static str,
    commit: String,
    host: Host,
    date: String,
    load_start: String,
}

impl RunFacts {
    pub(crate) fn collect() -> RunFacts {
        RunFacts {
            command: command_line(),
            build: build(),
            commit: commit(),
            host: Host::read(),
            date: utc_now(),
            load_start: load_average(),
        }
    }

    /// One paragraph for the head of a table, `extra` (empty, or ending in "; ") said just
    /// before the load average.
    pub(crate) fn line(&self, extra: &str) -> String {
        format!(
            "Run: `{}` ({}, commit {}) on {}, {} logical CPUs, {:.0} GiB RAM, Linux {}, {}; \
             {extra}load average at the start {}.",
            self.command,
            self.build,
            self.commit,
            self.host.cpu_model,
            self.host.cpus,
            self.host.memory_gib,
            self.host.kernel,
            self.date,
            self.load_start,
        )
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "command": self.command,
            "build": self.build,
            "commit": self.commit,
            "cpu_model": self.host.cpu_model,
            "logical_cpus": self.host.cpus,
            "memory_gib": self.host.memory_gib,
            "kernel": self.host.kernel,
            "date": self.date,
            "load_average_start": self.load_start,
        })
    }
}

/// The host a run was made on.
pub(crate) struct Host {
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
}

impl Host {
    pub(crate) fn read() -> Host {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown".into(), |(_, v)| v.trim().to_string());
        let cpus = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count()
            .max(std::thread::available_parallelism().map_or(1, |n| n.get()));
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|k| k.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / (1u64 << 20) as f64);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or("unknown".into(), |s| s.trim().to_string());
        Host {
            cpu_model,
            cpus,
            memory_gib,
            kernel,
        }
    }
}

/// "release build" or "debug build".
pub(crate) fn build() -> &'static str {
    if cfg!(debug_assertions) {
        "debug build"
    } else {
        "release build"
    }
}

/// This process's command line, quoted for a POSIX shell, the program as `livemig`.
pub(crate) fn command_line() -> String {
    let quote = |s: &str| {
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_=.,:/+@%".contains(c))
        {
            s.to_string()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    std::iter::once("livemig".to_string())
        .chain(std::env::args().skip(1).map(|a| quote(&a)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The commit this was built from, and whether the tree had changes.
pub(crate) fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(["-C", env!("CARGO_MANIFEST_DIR")])
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        None => "unknown".into(),
        Some(c) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(changes) if !changes.is_empty() => format!("{c} + uncommitted changes"),
            _ => c,
        },
    }
}

/// The 1, 5 and 15 minute load averages.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Now, in UTC, as `YYYY-MM-DD HH:MM UTC`.
pub(crate) fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}
