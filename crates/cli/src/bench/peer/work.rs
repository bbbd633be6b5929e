//! What is measured: the rows (destination kind x guest work x channels, and the sparse
//! guest), the guest's work and how the guest is booted.

use std::fmt;
use std::path::PathBuf;

/// How the guest is booted.
#[derive(Debug, Clone)]
pub(super) enum Boot {
    /// The PVH image both tools boot, given its work on the kernel command line.
    Image(PathBuf),
    /// No image: livemig runs its built-in guest with the same work given as options, and
    /// QEMU cannot run.
    Builtin,
}

/// What the guest does: fill `fill` bytes of its `memory` with checkable data, then write
/// `rate` pages a second over a working set of `working_set` bytes (0: idle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GuestWork {
    pub(super) memory: u64,
    pub(super) fill: u64,
    pub(super) working_set: u64,
    pub(super) rate: u64,
}

impl GuestWork {
    /// The kernel command line that asks the guest image for this work. `pace=spin`: the
    /// guest busy-waits between writes, which any VMM runs the same.
    pub(super) fn append(&self) -> String {
        format!(
            "fill={} ws={} rate={} pace=spin",
            size_arg(self.fill),
            size_arg(self.working_set),
            self.rate
        )
    }
}

/// A size as the guest's command line takes it: `1G`, `64M`, `4K` or bytes.
pub(super) fn size_arg(b: u64) -> String {
    match b {
        0 => "0".into(),
        b if b.is_multiple_of(1 << 30) => format!("{}G", b >> 30),
        b if b.is_multiple_of(1 << 20) => format!("{}M", b >> 20),
        b if b.is_multiple_of(1 << 10) => format!("{}K", b >> 10),
        b => b.to_string(),
    }
}

/// The destination: each tool's default, or memory allocated and touched before the source
/// connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dest {
    /// QEMU `-incoming defer`; livemig `incoming` without `--memory`.
    Cold,
    /// QEMU `-mem-prealloc`; livemig `incoming --memory SIZE`.
    Prepared,
}

/// The guest's work during the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Load {
    Idle,
    Dirtying,
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RowSpec {
    pub(super) dest: Dest,
    pub(super) load: Load,
    pub(super) channels: u16,
    /// The large, mostly empty guest (`--sparse-memory`) instead of the main one.
    pub(super) sparse: bool,
}

impl RowSpec {
    /// Every row: cold and prepared x idle and dirtying x 2 and 4 channels, then the sparse
    /// guest (idle, 4 channels, cold).
    pub(super) fn all() -> Vec<RowSpec> {
        let mut v = Vec::new();
        for dest in [Dest::Cold, Dest::Prepared] {
            for load in [Load::Idle, Load::Dirtying] {
                for channels in [2, 4] {
                    v.push(RowSpec {
                        dest,
                        load,
                        channels,
                        sparse: false,
                    });
                }
            }
        }
        v.push(RowSpec {
            dest: Dest::Cold,
            load: Load::Idle,
            channels: 4,
            sparse: true,
        });
        v
    }

    /// Reads a row's name: `DEST-LOAD-Nch` (`cold-idle-2ch`, `prepared-dirtying-4ch`), or
    /// `sparse` (`sparse-DEST-LOAD-Nch` for a sparse guest under other conditions).
    pub(super) fn parse(s: &str) -> Result<RowSpec, String> {
        let bad = || {
            format!(
                "'{s}' is not a row: try cold-idle-2ch, prepared-dirtying-4ch (DEST-LOAD-Nch, \
                 DEST cold or prepared, LOAD idle or dirtying) or sparse"
            )
        };
        let s = s.trim();
        if s == "sparse" {
            return Ok(RowSpec::all().pop().expect("the sparse row"));
        }
        let (sparse, rest) = match s.strip_prefix("sparse-") {
            Some(r) => (true, r),
            None => (false, s),
        };
        let parts: Vec<&str> = rest.split('-').collect();
        let [dest, load, ch] = parts[..] else {
            return Err(bad());
        };
        let dest = match dest {
            "cold" => Dest::Cold,
            "prepared" => Dest::Prepared,
            _ => return Err(bad()),
        };
        let load = match load {
            "idle" => Load::Idle,
            "dirtying" => Load::Dirtying,
            _ => return Err(bad()),
        };
        let channels = ch
            .strip_suffix("ch")
            .and_then(|n| n.parse::<u16>().ok())
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(bad)?;
        Ok(RowSpec {
            dest,
            load,
            channels,
            sparse,
        })
    }
}

impl fmt::Display for Dest {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Dest::Cold => "cold",
            Dest::Prepared => "prepared",
        })
    }
}

impl fmt::Display for Load {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Load::Idle => "idle",
            Load::Dirtying => "dirtying",
        })
    }
}

impl fmt::Display for RowSpec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.sparse {
            f.write_str("sparse-")?;
        }
        write!(f, "{}-{}-{}ch", self.dest, self.load, self.channels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_names_round_trip() {
        for r in RowSpec::all() {
            assert_eq!(RowSpec::parse(&r.to_string()), Ok(r));
        }
        assert_eq!(RowSpec::all().len(), 9);
        assert!(RowSpec::parse("sparse").unwrap().sparse);
        assert!(RowSpec::parse("warm-idle-2ch").is_err());
        assert!(RowSpec::parse("cold-idle-0ch").is_err());
        assert!(RowSpec::parse("cold-idle").is_err());
    }

    #[test]
    fn command_line_sizes() {
        let w = GuestWork {
            memory: 3 << 29,
            fill: 1 << 30,
            working_set: 64 << 20,
            rate: 65536,
        };
        assert_eq!(w.append(), "fill=1G ws=64M rate=65536 pace=spin");
        assert_eq!(size_arg(1536 << 20), "1536M");
        assert_eq!(size_arg(0), "0");
    }
}
