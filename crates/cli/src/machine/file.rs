//! `migrate {"uri": "file:PATH"}` and `migrate-incoming {"uri": "file:PATH"}`: the VM
//! saved to a file and restored from one (QEMU's `file:` URI; the layout is always
//! livemig's mapped one, so the `mapped-ram` capability is accepted and changes nothing).
//!
//! A save runs on `lm-vm-save`: live if the guest runs (rounds, then a short pause; the
//! guest runs on after), in one pass if it was stopped (it stays paused). A restore runs on
//! `lm-vm-restore`; the guest runs once it is whole. Either reports its end to `lm-vm`.

use super::state::{MigStatus, RunState};
use super::{busy, no_guest, Job, Machine, Msg, VmParts};
use livemig_engine::file::{
    restore_vm, save_vm, FileError, RestoreConfig, RestoreReport, Restored, SaveConfig, SaveReport,
};
use livemig_engine::{CancelToken, Factories};
use livemig_qmp::QmpError;
use livemig_vmm::devices::DeviceModels;
use livemig_vmm::Factory;
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// A save to or a restore from a file, as `query-migrate` shows it.
pub struct FileJob {
    uri: String,
    saving: bool,
    start: Instant,
    end: Option<Instant>,
    save: Option<SaveReport>,
    restore: Option<RestoreReport>,
    error: Option<String>,
}

impl FileJob {
    fn new(uri: &str, saving: bool) -> Box<FileJob> {
        Box::new(FileJob {
            uri: uri.to_string(),
            saving,
            start: Instant::now(),
            end: None,
            save: None,
            restore: None,
            error: None,
        })
    }

    pub fn query(&self, status: MigStatus) -> Value {
        let mut m = Map::new();
        m.insert("status".into(), json!(status.name()));
        let ms = self.end.unwrap_or_else(Instant::now) - self.start;
        m.insert("total-time".into(), json!(ms.as_millis() as u64));
        if let Some(r) = &self.save {
            let data = r.pages_in_file * livemig_wire::PAGE_SIZE as u64;
            m.insert("downtime".into(), json!(r.downtime_ms.round() as u64));
            m.insert(
                "ram".into(),
                json!({"transferred": data, "remaining": 0, "total": r.memory_bytes,
                    "normal": r.pages_in_file, "normal-bytes": data,
                    "dirty-sync-count": r.rounds.len(), "page-size": livemig_wire::PAGE_SIZE}),
            );
            m.insert("x-livemig-file".into(), json!(r));
        }
        if let Some(r) = &self.restore {
            m.insert("x-livemig-file".into(), json!(r));
        }
        if let Some(e) = &self.error {
            m.insert("error-desc".into(), json!(e));
        }
        m.insert("x-uri".into(), json!(self.uri));
        m.insert(
            "x-direction".into(),
            json!(if self.saving { "save" } else { "restore" }),
        );
        Value::Object(m)
    }
}

impl Machine {
    /// Whether pages move with `O_DIRECT`: the `direct-io` parameter, with the `mapped-ram`
    /// and `multifd` capabilities (QEMU's `migrate_direct_io`).
    fn direct_io(&self) -> bool {
        self.params.direct_io && self.caps.mapped_ram && self.caps.multifd
    }

    /// `migrate` to `file:PATH`: saves the guest, live if it runs, in one pass if stopped.
    pub(super) fn migrate_to_file(&mut self, uri: &str, path: PathBuf) -> Result<Value, QmpError> {
        if self.status.in_progress() {
            return Err(busy());
        }
        let paused = match self.run {
            RunState::Running => false,
            RunState::Paused => true,
            RunState::InMigrate => return Err(no_guest()),
            _ => {
                return Err(QmpError::generic(
                    "the guest was migrated away: there is nothing here to save",
                ))
            }
        };
        let vm = self.vm.as_ref().ok_or_else(no_guest)?;
        let config = SaveConfig {
            channels: match self.caps.multifd {
                true => self.params.multifd_channels,
                false => 1,
            },
            downtime_limit: std::time::Duration::from_millis(self.params.downtime_limit_ms),
            chunk_size: self.params.chunk_size,
            paused,
            direct_io: self.direct_io(),
            ..SaveConfig::default()
        };
        let shared = vm.shared();
        let (cancel, tx) = (config.cancel.clone(), self.tx.clone());
        let thread = std::thread::Builder::new()
            .name("lm-vm-save".into())
            .spawn(move || {
                let r = shared.with(|vm| save_vm(vm, &path, &config, &|_| {}));
                let _ = tx.send(Msg::FileSaved(Box::new(r)));
            })
            .map_err(|e| QmpError::generic(format!("cannot start the save thread: {e}")))?;
        self.thread = Some((thread, cancel));
        self.job = Job::File(FileJob::new(uri, true));
        self.set_status(MigStatus::Active);
        Ok(json!({}))
    }

    /// `migrate-incoming` from `file:PATH`: restores the guest saved there.
    pub(super) fn incoming_from_file(
        &mut self,
        uri: &str,
        path: PathBuf,
    ) -> Result<Value, QmpError> {
        let mut config = RestoreConfig {
            readers: self.params.multifd_channels,
            verify: self.limits.verify,
            // As QEMU: a guest saved stopped is restored stopped (`cont` runs it).
            as_saved: true,
            direct_io: self.direct_io(),
            cancel: CancelToken::new(),
            ..RestoreConfig::default()
        };
        if let Some(m) = self.limits.max_guest_memory {
            config.max_guest_memory = m;
        }
        if self.run == RunState::PostMigrate {
            self.vm = None;
            self.run = RunState::InMigrate;
        }
        let (cancel, tx) = (config.cancel.clone(), self.tx.clone());
        let thread = std::thread::Builder::new()
            .name("lm-vm-restore".into())
            .spawn(move || {
                let factories = Factories {
                    guest: &Factory,
                    devices: &DeviceModels,
                };
                let r = restore_vm(&path, factories, &config);
                let _ = tx.send(Msg::FileRestored(Box::new(r)));
            })
            .map_err(|e| QmpError::generic(format!("cannot start the restore thread: {e}")))?;
        self.thread = Some((thread, cancel));
        self.job = Job::File(FileJob::new(uri, false));
        self.set_status(MigStatus::Active);
        Ok(json!({}))
    }

    /// The save ended: the guest runs on (or stays paused) here either way.
    pub(super) fn file_saved(&mut self, r: Result<SaveReport, FileError>) {
        self.join_thread();
        let cancelled = self.status == MigStatus::Cancelling;
        let Job::File(j) = &mut self.job else { return };
        j.end = Some(Instant::now());
        let status = match r {
            Ok(report) => {
                j.save = Some(report);
                MigStatus::Completed
            }
            Err(e) => {
                eprintln!("livemig: save to {} failed: {e}", j.uri);
                let cancelled = cancelled || matches!(e, FileError::Cancelled);
                j.error = Some(e.to_string());
                match cancelled {
                    true => MigStatus::Cancelled,
                    false => MigStatus::Failed,
                }
            }
        };
        self.set_status(status);
    }

    /// The restore ended: on success the guest runs here.
    pub(super) fn file_restored(&mut self, r: Result<Restored, FileError>) {
        self.join_thread();
        let Job::File(j) = &mut self.job else { return };
        j.end = Some(Instant::now());
        match r {
            Ok(restored) => {
                j.restore = Some(restored.report.clone());
                self.vm = Some(VmParts {
                    kind: restored.report.guest_kind.clone(),
                    guest: Arc::from(restored.guest),
                    devices: restored.devices.into_iter().map(Arc::from).collect(),
                    vmstates: restored.vmstates.into_iter().map(Arc::from).collect(),
                });
                self.set_run(match restored.report.resumed_ms {
                    Some(_) => RunState::Running,
                    None => RunState::Paused,
                });
                self.set_status(MigStatus::Completed);
            }
            Err(e) => {
                eprintln!("livemig: restore from {} failed: {e}", j.uri);
                j.error = Some(e.to_string());
                self.set_status(match e {
                    FileError::Cancelled => MigStatus::Cancelled,
                    _ => MigStatus::Failed,
                });
            }
        }
    }
}
