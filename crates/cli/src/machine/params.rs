//! Migration capabilities and parameters, set and queried over QMP with QEMU's names
//! (livemig's own parameters carry the `x-` prefix QAPI uses for extensions).

use livemig_engine::config::PostcopyPolicy;
use livemig_engine::{LiveParams, MigrationConfig};
use livemig_qmp::{Args, QmpError};
use livemig_wire::{DeviceTransfer, MAX_CHANNELS, MAX_CHUNK_SIZE};
use serde_json::{json, Value};
use std::time::Duration;

/// The capabilities livemig knows, with their defaults.
#[derive(Debug, Clone)]
pub struct Capabilities {
    /// Data channels in parallel (`multifd-channels` of them); off: one data channel.
    pub multifd: bool,
    /// `MIGRATION` and `MIGRATION_PASS` events.
    pub events: bool,
    /// Throttle the vCPUs while rounds stop shrinking.
    pub auto_converge: bool,
    /// Local mode: hand guest memory (memfds) to a destination on this host over a `unix:`
    /// URI instead of copying it (the guest must run with `--shared-memory`).
    pub local: bool,
    /// `postcopy-ram`: the migration may switch to postcopy (on `migrate-start-postcopy`).
    pub postcopy_ram: bool,
    /// `postcopy-preempt`: accepted for QEMU's scripts; livemig always sends requested pages
    /// on an urgent channel of their own when postcopy is allowed, so it changes nothing.
    pub postcopy_preempt: bool,
    /// `postcopy-blocktime`: `query-migrate` reports the time the destination's vCPUs
    /// waited on missing pages.
    pub postcopy_blocktime: bool,
    /// `pause-before-switchover`: with the guest paused for the switchover, wait for
    /// `migrate-continue` before its state is saved (status `pre-switchover`).
    pub pause_before_switchover: bool,
    /// `mapped-ram`: accepted for QEMU's scripts; a `file:` migration always lays pages out
    /// at fixed offsets (docs/file-format.md), so it changes nothing.
    pub mapped_ram: bool,
    /// `return-path`: accepted for QEMU's scripts; livemig's destination always answers on
    /// the main channel. QEMU requires it for `switchover-ack`, and so does livemig.
    pub return_path: bool,
    /// `switchover-ack`: switch over only once the destination says every device twin has
    /// loaded its initial precopy data.
    pub switchover_ack: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        // livemig's native transfer is parallel; QEMU's default is off.
        Capabilities {
            multifd: true,
            events: false,
            auto_converge: true,
            local: false,
            postcopy_ram: false,
            postcopy_preempt: false,
            postcopy_blocktime: false,
            pause_before_switchover: false,
            mapped_ram: false,
            return_path: false,
            switchover_ack: false,
        }
    }
}

impl Capabilities {
    pub fn query(&self) -> Value {
        json!([
            {"capability": "multifd", "state": self.multifd},
            {"capability": "events", "state": self.events},
            {"capability": "auto-converge", "state": self.auto_converge},
            {"capability": "x-local", "state": self.local},
            {"capability": "postcopy-ram", "state": self.postcopy_ram},
            {"capability": "postcopy-preempt", "state": self.postcopy_preempt},
            {"capability": "postcopy-blocktime", "state": self.postcopy_blocktime},
            {"capability": "pause-before-switchover", "state": self.pause_before_switchover},
            {"capability": "mapped-ram", "state": self.mapped_ram},
            {"capability": "return-path", "state": self.return_path},
            {"capability": "switchover-ack", "state": self.switchover_ack},
        ])
    }

    /// Applies `migrate-set-capabilities`' list; all or nothing.
    pub fn set(&mut self, list: &[Value]) -> Result<(), QmpError> {
        let mut next = self.clone();
        for item in list {
            let obj = item.as_object().ok_or_else(|| {
                QmpError::generic("Invalid parameter type for 'capabilities', expected: object")
            })?;
            let a = Args::new(obj, &["capability", "state"])?;
            let (name, state) = (a.str("capability")?, a.opt_bool("state")?);
            let state = state.ok_or_else(|| QmpError::generic("Parameter 'state' is missing"))?;
            match name {
                "multifd" => next.multifd = state,
                "events" => next.events = state,
                "auto-converge" => next.auto_converge = state,
                "x-local" => next.local = state,
                "postcopy-ram" => next.postcopy_ram = state,
                "postcopy-preempt" => next.postcopy_preempt = state,
                "postcopy-blocktime" => next.postcopy_blocktime = state,
                "pause-before-switchover" => next.pause_before_switchover = state,
                "mapped-ram" => next.mapped_ram = state,
                "return-path" => next.return_path = state,
                "switchover-ack" => next.switchover_ack = state,
                other => {
                    return Err(QmpError::generic(format!(
                        "Capability '{other}' is not supported by livemig (it knows multifd, events, auto-converge, x-local, postcopy-ram, postcopy-preempt, postcopy-blocktime, pause-before-switchover, mapped-ram, return-path and switchover-ack)"
                    )))
                }
            }
        }
        if next.switchover_ack && !next.return_path {
            return Err(QmpError::generic(
                "Switchover ack capability requires return path",
            ));
        }
        // QEMU's checks (migrate_caps_check), with QEMU's wording.
        if next.postcopy_preempt && !next.postcopy_ram {
            return Err(QmpError::generic("Postcopy preempt requires postcopy-ram"));
        }
        if next.postcopy_ram && next.local {
            return Err(QmpError::generic(
                "Postcopy is not compatible with x-local: local mode moves no page",
            ));
        }
        *self = next;
        Ok(())
    }
}

/// The parameters, as the user set them.
#[derive(Debug, Clone)]
pub struct Parameters {
    pub multifd_channels: u16,
    pub downtime_limit_ms: u64,
    /// Bytes per second; 0: no cap.
    pub max_bandwidth: u64,
    /// Bytes per second the switchover may count on; 0: the measured rates.
    pub avail_switchover_bandwidth: u64,
    pub chunk_size: u32,
    pub credit_window: u32,
    pub buffer_cap: u64,
    pub device_state_transfer: DeviceTransfer,
    /// Milliseconds a silent peer is given; 0: the process's default.
    pub peer_timeout_ms: u64,
    /// Milliseconds the guest may stay paused for the switchover at most.
    pub switchover_timeout_ms: u64,
    /// `x-downtime-hard-limit`: a switchover unfinished this many milliseconds after the
    /// pause is abandoned and tried again later; 0: no bound.
    pub downtime_hard_limit_ms: u64,
    /// `x-switchover-attempts`: switchovers abandoned at most before the policy decides.
    pub switchover_attempts: u32,
    /// `multifd-compression`: pages compressed with zstd.
    pub zstd: bool,
    /// `multifd-zstd-level`.
    pub zstd_level: u64,
    /// Each page carries its CRC32C.
    pub page_checksums: bool,
    /// Auto-converge's steps and trigger (`cpu-throttle-*`, `max-cpu-throttle`,
    /// `throttle-trigger-threshold`).
    pub throttle: livemig_engine::config::ThrottlePolicy,
    /// `tls-creds`: the id of the `tls-creds-x509` object migrations use ("" : none, the
    /// process's own `--tls-*` options hold).
    pub tls_creds: String,
    /// `tls-hostname`: the name the destination's certificate must carry ("": the host of
    /// the migration's address).
    pub tls_hostname: String,
    /// `direct-io`: a `file:` save or restore moves pages with `O_DIRECT` (with `mapped-ram`
    /// and `multifd`, as QEMU).
    pub direct_io: bool,
    /// The live handle every migration started from these parameters shares: it mirrors
    /// `downtime-limit` and `max-bandwidth`, so setting them reaches a migration under way.
    live: LiveParams,
}

impl Default for Parameters {
    fn default() -> Self {
        let d = MigrationConfig::default();
        Parameters {
            multifd_channels: d.channels,
            downtime_limit_ms: d.downtime_limit.as_millis() as u64,
            max_bandwidth: d.max_bandwidth.unwrap_or(0),
            avail_switchover_bandwidth: d.avail_switchover_bandwidth.unwrap_or(0),
            chunk_size: d.chunk_size,
            credit_window: d.credit_window,
            buffer_cap: d.buffer_cap,
            device_state_transfer: d.device_transfer,
            peer_timeout_ms: 0,
            switchover_timeout_ms: d.switchover_timeout.as_millis() as u64,
            downtime_hard_limit_ms: 0,
            switchover_attempts: d.switchover_attempts,
            zstd: d.compress.is_some(),
            zstd_level: 1,
            page_checksums: d.page_checksums,
            throttle: d.throttle,
            tls_creds: String::new(),
            tls_hostname: String::new(),
            direct_io: false,
            live: LiveParams::new(),
        }
    }
}

/// Every parameter name `migrate-set-parameters` takes.
pub const NAMES: &[&str] = &[
    "multifd-channels",
    "downtime-limit",
    "max-bandwidth",
    "avail-switchover-bandwidth",
    "x-device-chunk-size",
    "x-credit-window",
    "x-buffer-cap",
    "x-device-state-transfer",
    "x-peer-timeout",
    "x-switchover-timeout",
    "x-downtime-hard-limit",
    "x-switchover-attempts",
    "multifd-compression",
    "multifd-zstd-level",
    "x-page-checksums",
    "cpu-throttle-initial",
    "cpu-throttle-increment",
    "max-cpu-throttle",
    "throttle-trigger-threshold",
    "tls-creds",
    "tls-hostname",
    "direct-io",
];

/// The parameters a migration under way takes (QEMU takes them live too; libvirt's
/// `migrate-setmaxdowntime` and `migrate-setspeed` set the first two when a migration does
/// not converge). The rest are refused while a migration runs.
pub const LIVE: &[&str] = &[
    "downtime-limit",
    "max-bandwidth",
    "avail-switchover-bandwidth",
    "cpu-throttle-initial",
    "cpu-throttle-increment",
    "max-cpu-throttle",
    "throttle-trigger-threshold",
];

/// QEMU's bound on `multifd-zstd-level`.
const MAX_ZSTD_LEVEL: u64 = 20;

/// QEMU's bound on `downtime-limit` (ms).
const MAX_DOWNTIME_MS: u64 = 2_000_000;

fn range_err(name: &str, what: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' expects {what}"))
}

impl Parameters {
    pub fn query(&self) -> Value {
        json!({
            "multifd-channels": self.multifd_channels,
            "downtime-limit": self.downtime_limit_ms,
            "max-bandwidth": self.max_bandwidth,
            "avail-switchover-bandwidth": self.avail_switchover_bandwidth,
            "x-device-chunk-size": self.chunk_size,
            "x-credit-window": self.credit_window,
            "x-buffer-cap": self.buffer_cap,
            "x-device-state-transfer": match self.device_state_transfer {
                DeviceTransfer::Multifd => "multifd",
                DeviceTransfer::Main => "main",
            },
            "x-peer-timeout": self.peer_timeout_ms,
            "x-switchover-timeout": self.switchover_timeout_ms,
            "x-downtime-hard-limit": self.downtime_hard_limit_ms,
            "x-switchover-attempts": self.switchover_attempts,
            "multifd-compression": if self.zstd { "zstd" } else { "none" },
            "multifd-zstd-level": self.zstd_level,
            "x-page-checksums": self.page_checksums,
            "cpu-throttle-initial": self.throttle.initial,
            "cpu-throttle-increment": self.throttle.increment,
            "max-cpu-throttle": self.throttle.max,
            "throttle-trigger-threshold": self.throttle.trigger_threshold,
            "tls-creds": self.tls_creds,
            "tls-hostname": self.tls_hostname,
            "direct-io": self.direct_io,
        })
    }

    /// Applies `migrate-set-parameters`; all or nothing.
    pub fn set(&mut self, args: &serde_json::Map<String, Value>) -> Result<(), QmpError> {
        let a = Args::new(args, NAMES)?;
        let mut next = self.clone();
        next.set_ram(&a)?;
        next.set_devices(&a)?;
        next.set_timeouts(&a)?;
        next.set_compression(&a)?;
        next.set_throttle(&a)?;
        if let Some(c) = a.opt_str("tls-creds")? {
            next.tls_creds = c.to_string();
        }
        if let Some(d) = a.opt_bool("direct-io")? {
            next.direct_io = d;
        }
        if let Some(h) = a.opt_str("tls-hostname")? {
            next.tls_hostname = h.to_string();
        }
        *self = next;
        self.publish();
        Ok(())
    }

    /// `migrate-set-parameters` while a migration may run (`running`): then only [`LIVE`]
    /// parameters are taken (with QEMU's refusal for the rest), and they reach the
    /// migration under way within one round.
    pub fn set_while(
        &mut self,
        args: &serde_json::Map<String, Value>,
        running: bool,
    ) -> Result<(), QmpError> {
        if running && args.keys().any(|k| !LIVE.contains(&k.as_str())) {
            // Unknown names get their own error first, as when nothing runs.
            Args::new(args, NAMES)?;
            return Err(super::busy());
        }
        self.set(args)
    }

    /// The live values into the handle migrations share (only once a set is whole).
    fn publish(&self) {
        self.live
            .set_downtime_limit(Duration::from_millis(self.downtime_limit_ms));
        self.live
            .set_max_bandwidth(std::num::NonZeroU64::new(self.max_bandwidth));
        self.live
            .set_switchover_bandwidth(std::num::NonZeroU64::new(self.avail_switchover_bandwidth));
        self.live.set_throttle(self.throttle);
    }

    /// Auto-converge's steps and trigger, in QEMU's ranges and words.
    fn set_throttle(&mut self, a: &Args) -> Result<(), QmpError> {
        let t = &mut self.throttle;
        for (name, field, top) in [
            ("cpu-throttle-initial", &mut t.initial, 99),
            ("cpu-throttle-increment", &mut t.increment, 99),
            ("max-cpu-throttle", &mut t.max, 99),
            ("throttle-trigger-threshold", &mut t.trigger_threshold, 100),
        ] {
            if let Some(v) = a.opt_u64(name)? {
                if !(1..=top).contains(&v) {
                    return Err(range_err(
                        name,
                        &format!("an integer in the range of 1 to {top}"),
                    ));
                }
                *field = v as u8;
            }
        }
        Ok(())
    }

    /// The channels, downtime limit and bandwidth of `a`.
    fn set_ram(&mut self, a: &Args) -> Result<(), QmpError> {
        if let Some(n) = a.opt_u64("multifd-channels")? {
            if n == 0 || n > MAX_CHANNELS as u64 {
                return Err(range_err(
                    "multifd-channels",
                    &format!("a value between 1 and {MAX_CHANNELS}"),
                ));
            }
            self.multifd_channels = n as u16;
        }
        if let Some(ms) = a.opt_u64("downtime-limit")? {
            if ms > MAX_DOWNTIME_MS {
                return Err(range_err(
                    "downtime-limit",
                    &format!("an integer in the range of 0 to {MAX_DOWNTIME_MS} ms"),
                ));
            }
            self.downtime_limit_ms = ms;
        }
        if let Some(b) = a.opt_u64("max-bandwidth")? {
            self.max_bandwidth = b;
        }
        if let Some(b) = a.opt_u64("avail-switchover-bandwidth")? {
            self.avail_switchover_bandwidth = b;
        }
        Ok(())
    }

    /// How device state travels: chunk size, credit, buffer cap, channel.
    fn set_devices(&mut self, a: &Args) -> Result<(), QmpError> {
        if let Some(c) = a.opt_u64("x-device-chunk-size")? {
            if c == 0 || c > MAX_CHUNK_SIZE as u64 {
                return Err(range_err(
                    "x-device-chunk-size",
                    &format!("1 byte to {} MiB", MAX_CHUNK_SIZE >> 20),
                ));
            }
            self.chunk_size = c as u32;
        }
        if let Some(w) = a.opt_u64("x-credit-window")? {
            self.credit_window = u32::try_from(w)
                .map_err(|_| range_err("x-credit-window", "a 32-bit count of chunks"))?;
        }
        if let Some(b) = a.opt_u64("x-buffer-cap")? {
            self.buffer_cap = b;
        }
        if let Some(t) = a.opt_str("x-device-state-transfer")? {
            self.device_state_transfer = match t {
                "multifd" => DeviceTransfer::Multifd,
                "main" => DeviceTransfer::Main,
                _ => return Err(range_err("x-device-state-transfer", "'multifd' or 'main'")),
            };
        }
        Ok(())
    }

    /// The peer and switchover timeouts.
    fn set_timeouts(&mut self, a: &Args) -> Result<(), QmpError> {
        if let Some(ms) = a.opt_u64("x-peer-timeout")? {
            let min = livemig_engine::config::MIN_PEER_TIMEOUT.as_millis() as u64;
            if ms != 0 && ms < min {
                return Err(range_err(
                    "x-peer-timeout",
                    &format!("0 (the default) or at least {min} ms"),
                ));
            }
            self.peer_timeout_ms = ms;
        }
        if let Some(ms) = a.opt_u64("x-switchover-timeout")? {
            if ms == 0 {
                return Err(range_err("x-switchover-timeout", "at least 1 ms"));
            }
            self.switchover_timeout_ms = ms;
        }
        if let Some(ms) = a.opt_u64("x-downtime-hard-limit")? {
            if ms > MAX_DOWNTIME_MS {
                return Err(range_err(
                    "x-downtime-hard-limit",
                    &format!("0 (no bound) or up to {MAX_DOWNTIME_MS} ms"),
                ));
            }
            self.downtime_hard_limit_ms = ms;
        }
        if let Some(n) = a.opt_u64("x-switchover-attempts")? {
            if !(1..=1000).contains(&n) {
                return Err(range_err("x-switchover-attempts", "1 to 1000"));
            }
            self.switchover_attempts = n as u32;
        }
        Ok(())
    }

    /// Compression and page checksums.
    fn set_compression(&mut self, a: &Args) -> Result<(), QmpError> {
        if let Some(c) = a.opt_str("multifd-compression")? {
            self.zstd = match c {
                "none" => false,
                "zstd" => true,
                _ => return Err(range_err("multifd-compression", "'none' or 'zstd'")),
            };
        }
        if let Some(l) = a.opt_u64("multifd-zstd-level")? {
            if l > MAX_ZSTD_LEVEL {
                return Err(range_err(
                    "multifd-zstd-level",
                    &format!("an integer in the range of 0 to {MAX_ZSTD_LEVEL}"),
                ));
            }
            self.zstd_level = l;
        }
        if let Some(b) = a.opt_bool("x-page-checksums")? {
            self.page_checksums = b;
        }
        Ok(())
    }

    /// The peer timeout: the parameter if set, else `default`.
    pub fn peer_timeout(&self, default: Duration) -> Duration {
        if self.peer_timeout_ms == 0 {
            default
        } else {
            Duration::from_millis(self.peer_timeout_ms)
        }
    }

    /// The source's configuration for one migration.
    pub fn migration_config(&self, caps: &Capabilities) -> MigrationConfig {
        MigrationConfig {
            channels: if caps.multifd {
                self.multifd_channels
            } else {
                1
            },
            downtime_limit: Duration::from_millis(self.downtime_limit_ms),
            max_bandwidth: (self.max_bandwidth > 0).then_some(self.max_bandwidth),
            avail_switchover_bandwidth: (self.avail_switchover_bandwidth > 0)
                .then_some(self.avail_switchover_bandwidth),
            throttle: self.throttle,
            live: self.live.clone(),
            chunk_size: self.chunk_size,
            credit_window: self.credit_window,
            buffer_cap: self.buffer_cap,
            device_transfer: self.device_state_transfer,
            peer_timeout: self.peer_timeout(livemig_engine::config::DEFAULT_PEER_TIMEOUT),
            switchover_timeout: Duration::from_millis(self.switchover_timeout_ms),
            downtime_hard_limit: (self.downtime_hard_limit_ms > 0)
                .then(|| Duration::from_millis(self.downtime_hard_limit_ms)),
            switchover_attempts: self.switchover_attempts,
            switchover_ack: caps.switchover_ack,
            auto_converge: caps.auto_converge,
            compress: self.zstd.then_some(self.zstd_level as i32),
            page_checksums: self.page_checksums,
            ram: if caps.local {
                livemig_wire::RamTransfer::Local
            } else {
                livemig_wire::RamTransfer::Copy
            },
            // QEMU's postcopy switches only on `migrate-start-postcopy`: no round bound.
            postcopy: PostcopyPolicy {
                allowed: caps.postcopy_ram,
                after_rounds: None,
            },
            ..MigrationConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_is_all_or_nothing_and_checked() {
        let mut p = Parameters::default();
        let bad = json!({"multifd-channels": 8, "downtime-limit": "x"});
        let e = p.set(bad.as_object().unwrap()).unwrap_err();
        assert!(e.desc.contains("downtime-limit"), "{e}");
        assert_ne!(p.multifd_channels, 8, "nothing applied");
        let e = p
            .set(json!({"multifd-channels": 0}).as_object().unwrap())
            .unwrap_err();
        assert!(e.desc.contains("between 1 and"), "{e}");
        p.set(
            json!({"multifd-channels": 8, "max-bandwidth": 1000})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(p.query()["multifd-channels"], 8);
        let c = p.migration_config(&Capabilities::default());
        assert_eq!((c.channels, c.max_bandwidth), (8, Some(1000)));
        let single = Capabilities {
            multifd: false,
            events: true,
            ..Capabilities::default()
        };
        assert_eq!(p.migration_config(&single).channels, 1);
    }

    #[test]
    fn the_switchover_timeout_reaches_the_migration_and_zero_is_refused() {
        let mut p = Parameters::default();
        assert_eq!(p.query()["x-switchover-timeout"], 30_000);
        let e = p
            .set(json!({"x-switchover-timeout": 0}).as_object().unwrap())
            .unwrap_err();
        assert!(e.desc.contains("x-switchover-timeout"), "{e}");
        p.set(json!({"x-switchover-timeout": 1500}).as_object().unwrap())
            .unwrap();
        let c = p.migration_config(&Capabilities::default());
        assert_eq!(c.switchover_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn compression_and_page_checksums_reach_the_migration() {
        let mut p = Parameters::default();
        assert_eq!(p.query()["multifd-compression"], "none");
        let c = p.migration_config(&Capabilities::default());
        assert_eq!((c.compress, c.page_checksums), (None, false));
        let e = p
            .set(json!({"multifd-compression": "zlib"}).as_object().unwrap())
            .unwrap_err();
        assert!(e.desc.contains("'none' or 'zstd'"), "{e}");
        let e = p
            .set(json!({"multifd-zstd-level": 21}).as_object().unwrap())
            .unwrap_err();
        assert!(e.desc.contains("multifd-zstd-level"), "{e}");
        p.set(
            json!({"multifd-compression": "zstd", "multifd-zstd-level": 3, "x-page-checksums": true})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        let c = p.migration_config(&Capabilities::default());
        assert_eq!((c.compress, c.page_checksums), (Some(3), true));
        assert_eq!(p.query()["x-page-checksums"], true);
    }

    #[test]
    fn unknown_capability_is_named() {
        let mut c = Capabilities::default();
        let e = c
            .set(&[json!({"capability": "xbzrle", "state": true})])
            .unwrap_err();
        assert!(e.desc.contains("'xbzrle'"));
        c.set(&[json!({"capability": "events", "state": true})])
            .unwrap();
        assert!(c.events);
        c.set(&[json!({"capability": "x-local", "state": true})])
            .unwrap();
        let config = Parameters::default().migration_config(&c);
        assert_eq!(config.ram, livemig_wire::RamTransfer::Local);
    }

    #[test]
    fn switchover_ack_needs_the_return_path_and_the_hard_limit_is_a_parameter() {
        let mut c = Capabilities::default();
        let ack = json!({"capability": "switchover-ack", "state": true});
        let e = c.set(std::slice::from_ref(&ack)).unwrap_err();
        assert_eq!(e.desc, "Switchover ack capability requires return path");
        assert!(!c.switchover_ack, "nothing applied");
        c.set(&[json!({"capability": "return-path", "state": true}), ack])
            .unwrap();
        let set = |p: &mut Parameters, v: Value| p.set(v.as_object().unwrap());
        let mut p = Parameters::default();
        assert_eq!(p.migration_config(&c).downtime_hard_limit, None);
        set(
            &mut p,
            json!({"x-downtime-hard-limit": 100, "x-switchover-attempts": 2}),
        )
        .unwrap();
        let config = p.migration_config(&c);
        assert!(config.switchover_ack);
        assert_eq!(config.downtime_hard_limit, Some(Duration::from_millis(100)));
        assert_eq!(config.switchover_attempts, 2);
        assert_eq!(p.query()["x-downtime-hard-limit"], 100);
        let e = set(&mut p, json!({"x-switchover-attempts": 0})).unwrap_err();
        assert!(e.desc.contains("x-switchover-attempts"), "{e}");
        let live = json!({"x-downtime-hard-limit": 5});
        let e = p.set_while(live.as_object().unwrap(), true).unwrap_err();
        assert!(!e.desc.is_empty(), "refused mid-migration");
    }

    #[test]
    fn postcopy_capabilities_follow_qemus_rules() {
        let mut c = Capabilities::default();
        assert!(!Parameters::default().migration_config(&c).postcopy.allowed);
        let e = c
            .set(&[json!({"capability": "postcopy-preempt", "state": true})])
            .unwrap_err();
        assert_eq!(e.desc, "Postcopy preempt requires postcopy-ram");
        assert!(!c.postcopy_preempt, "nothing applied");
        c.set(&[
            json!({"capability": "postcopy-ram", "state": true}),
            json!({"capability": "postcopy-preempt", "state": true}),
            json!({"capability": "postcopy-blocktime", "state": true}),
        ])
        .unwrap();
        let config = Parameters::default().migration_config(&c);
        assert!(config.postcopy.allowed);
        assert_eq!(config.postcopy.after_rounds, None);
        let e = c
            .set(&[json!({"capability": "x-local", "state": true})])
            .unwrap_err();
        assert!(e.desc.contains("x-local"), "{e}");
        let q = c.query();
        let on: Vec<_> = q
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["state"] == true)
            .map(|x| x["capability"].as_str().unwrap())
            .collect();
        assert_eq!(
            on,
            [
                "multifd",
                "auto-converge",
                "postcopy-ram",
                "postcopy-preempt",
                "postcopy-blocktime"
            ]
        );
    }
    #[test]
    fn downtime_limit_and_bandwidth_reach_a_migration_under_way_and_nothing_else_does() {
        let mut p = Parameters::default();
        let c = p.migration_config(&Capabilities::default());
        let set = |p: &mut Parameters, v: Value| p.set_while(v.as_object().unwrap(), true);
        set(
            &mut p,
            json!({"downtime-limit": 1000, "max-bandwidth": 1 << 20}),
        )
        .unwrap();
        assert_eq!(c.downtime_limit_now(), Duration::from_millis(1000));
        assert_eq!(c.max_bandwidth_now(), Some(1 << 20));
        assert_eq!(p.query()["downtime-limit"], 1000);
        set(&mut p, json!({"max-bandwidth": 0})).unwrap();
        assert_eq!(c.max_bandwidth_now(), None, "0 lifts the cap");
        assert_eq!(c.avail_switchover_bandwidth_now(), None);
        set(&mut p, json!({"avail-switchover-bandwidth": 1 << 30})).unwrap();
        assert_eq!(c.avail_switchover_bandwidth_now(), Some(1 << 30));
        assert_eq!(p.query()["avail-switchover-bandwidth"], 1 << 30);
        let e = set(&mut p, json!({"downtime-limit": 50, "multifd-channels": 2})).unwrap_err();
        assert_eq!(e.desc, "There's a migration process in progress");
        assert_eq!(
            c.downtime_limit_now(),
            Duration::from_millis(1000),
            "nothing applied"
        );
        let e = set(&mut p, json!({"downtime-limit": 50, "nonsense": 2})).unwrap_err();
        assert!(e.desc.contains("'nonsense'"), "{e}");
        let e = set(&mut p, json!({"downtime-limit": 3_000_000})).unwrap_err();
        assert!(e.desc.contains("downtime-limit"), "{e}");
        assert_eq!(
            c.downtime_limit_now(),
            Duration::from_millis(1000),
            "nothing applied"
        );
        p.set_while(json!({"multifd-channels": 2}).as_object().unwrap(), false)
            .unwrap();
    }
}
