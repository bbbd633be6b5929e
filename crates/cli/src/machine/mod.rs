//! The VM a `livemig run --qmp` or `livemig incoming --qmp` process holds, driven over QMP.
//!
//! One thread, `lm-vm`, owns the VM and every piece of migration state; QMP client threads
//! hand it commands over a channel and wait for its answer ([`MachineHandle`]). A migration
//! runs on its own thread (`lm-vm-migrate` or `lm-vm-incoming`), which reports progress and
//! its end to `lm-vm` as messages; `lm-vm` joins it when the end arrives, and `quit`
//! cancels and joins it before the process exits. So no migration thread outlives the
//! migration, and the state machine (`docs/state-machines.md`) lives in one place.

mod channels;
mod dirty_rate;
mod file;
mod objects;
mod params;
mod query;
mod state;

use crossbeam_channel::{Receiver, Sender};
use livemig_engine::{
    migrate_vm, receive_vm, CancelToken, Device, Endpoint, Factories, Guest, Incoming,
    IncomingConfig, IncomingError, IncomingEvent, IncomingRecovery, Listener, Mailbox,
    MigrationConfig, MigrationError, MigrationReport, Progress, SourceRecovery, VmState,
};
use livemig_qmp::{Args, Events, Handler, QmpError, Request};
use livemig_vmm::devices::DeviceModels;
use livemig_vmm::Factory;
use params::{Capabilities, Parameters};
use query::{IncomingJob, Outgoing, PostcopyWatch, Switch};
use serde_json::{json, Value};
use state::{MigStatus, RunState};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// A guest and its devices, shared with the migration thread while one runs.
pub struct VmParts {
    pub kind: String,
    pub guest: Arc<dyn Guest>,
    pub devices: Vec<Arc<dyn Device>>,
    pub vmstates: Vec<Arc<dyn VmState>>,
}

/// A VM's parts as a thread takes them along: it lends them to the engine as a [`Vm`].
///
/// [`Vm`]: livemig_engine::Vm
pub struct SharedVm {
    guest: Arc<dyn Guest>,
    devices: Vec<Arc<dyn Device>>,
    vmstates: Vec<Arc<dyn VmState>>,
}

impl SharedVm {
    /// Runs `f` on the VM as the engine borrows it.
    pub fn with<R>(&self, f: impl FnOnce(livemig_engine::Vm<'_>) -> R) -> R {
        let devs: Vec<&dyn Device> = self.devices.iter().map(|d| &**d).collect();
        let vms: Vec<&dyn VmState> = self.vmstates.iter().map(|d| &**d).collect();
        f(livemig_engine::Vm {
            guest: &*self.guest,
            devices: &devs,
            vmstates: &vms,
        })
    }
}

impl VmParts {
    /// Clones of the parts, for a migration's thread.
    pub fn shared(&self) -> SharedVm {
        SharedVm {
            guest: self.guest.clone(),
            devices: self.devices.clone(),
            vmstates: self.vmstates.clone(),
        }
    }

    fn from_incoming(inc: Incoming) -> VmParts {
        VmParts {
            kind: inc.report.guest_kind.clone(),
            guest: Arc::from(inc.guest),
            devices: inc.devices.into_iter().map(Arc::from).collect(),
            vmstates: inc.vmstates.into_iter().map(Arc::from).collect(),
        }
    }
}

/// What an incoming migration may ask of this side (from `livemig incoming`'s options).
#[derive(Debug, Clone)]
pub struct IncomingLimits {
    pub verify: bool,
    pub max_guest_memory: Option<u64>,
    pub peer_timeout: std::time::Duration,
    /// TLS for every migration of this VM, both ways (the process's --tls-* options).
    pub tls: Option<Arc<livemig_engine::TlsConfig>>,
}

impl Default for IncomingLimits {
    fn default() -> Self {
        IncomingLimits {
            verify: false,
            max_guest_memory: None,
            peer_timeout: livemig_engine::config::DEFAULT_PEER_TIMEOUT,
            tls: None,
        }
    }
}

/// Messages to the `lm-vm` thread.
enum Msg {
    Command(Request, Sender<Result<Value, QmpError>>),
    Quit,
    Progress(Progress),
    SourceDone(Box<Result<MigrationReport, MigrationError>>),
    IncomingSession,
    /// The incoming session switched to postcopy, or resumed it.
    IncomingPostcopy,
    /// The incoming session's postcopy broke: paused until `migrate-recover`.
    IncomingPaused,
    IncomingDone(Box<Result<Incoming, IncomingError>>),
    /// A save to a file ended.
    FileSaved(Box<Result<livemig_engine::file::SaveReport, livemig_engine::file::FileError>>),
    /// A restore from a file ended.
    FileRestored(Box<Result<livemig_engine::file::Restored, livemig_engine::file::FileError>>),
}

/// The latest migration, this side's role in it.
enum Job {
    None,
    Out(Box<Outgoing>),
    In(Box<IncomingJob>),
    /// A save to, or a restore from, a file.
    File(Box<file::FileJob>),
}

struct Machine {
    vm: Option<VmParts>,
    run: RunState,
    status: MigStatus,
    job: Job,
    /// The running migration's thread and cancel token.
    thread: Option<(JoinHandle<()>, CancelToken)>,
    caps: Capabilities,
    params: Parameters,
    limits: IncomingLimits,
    events: Events,
    tx: Sender<Msg>,
    /// Where a broken postcopy's resume comes from: `migrate` with `resume` posts the new
    /// address (source), `migrate-recover` the new listener (destination).
    recover_to: Mailbox<Endpoint>,
    recover_on: Mailbox<Listener>,
    /// `migrate-continue` lets a migration held in `pre-switchover` go on.
    switchover_gate: Mailbox<()>,
    /// `object-add`ed TLS credentials.
    objects: objects::Objects,
    /// `calc-dirty-rate`'s measurement.
    dirty_rate: dirty_rate::DirtyRate,
    /// Postcopy broke after the switch: the guest's memory is split between this host and
    /// the destination, and this paused copy is kept (never resumed, not replaced).
    split: bool,
}

/// The QMP side of the machine: runs each command on `lm-vm` and waits for its answer.
pub struct MachineHandle {
    tx: Sender<Msg>,
}

/// Every command the machine serves, besides the protocol's own.
const COMMANDS: &[&str] = &[
    "query-status",
    "stop",
    "cont",
    "quit",
    "migrate",
    "migrate-incoming",
    "migrate_cancel",
    "migrate-start-postcopy",
    "migrate-recover",
    "migrate-continue",
    "object-add",
    "object-del",
    "calc-dirty-rate",
    "query-dirty-rate",
    "query-migrate",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "x-livemig-verify",
];

impl Handler for MachineHandle {
    fn commands(&self) -> Vec<&'static str> {
        COMMANDS.to_vec()
    }

    fn execute(&self, req: &Request) -> Result<Value, QmpError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.tx
            .send(Msg::Command(req.clone(), tx))
            .map_err(|_| QmpError::generic("the VM is shutting down"))?;
        rx.recv()
            .map_err(|_| QmpError::generic("the VM is shutting down"))?
    }

    fn after_reply(&self, req: &Request) {
        if req.execute == "quit" {
            let _ = self.tx.send(Msg::Quit);
        }
    }
}

/// Starts `lm-vm` with `vm` (a source) or without (a destination waiting for
/// `migrate-incoming`). Returns the QMP handle and the thread, which ends on `quit`.
pub fn start(
    vm: Option<VmParts>,
    events: Events,
    limits: IncomingLimits,
) -> std::io::Result<(MachineHandle, JoinHandle<()>)> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let m = Machine {
        run: if vm.is_some() {
            RunState::Running
        } else {
            RunState::InMigrate
        },
        vm,
        status: MigStatus::None,
        job: Job::None,
        thread: None,
        caps: Capabilities::default(),
        params: Parameters::default(),
        limits,
        events,
        tx: tx.clone(),
        split: false,
        recover_to: Mailbox::new(),
        recover_on: Mailbox::new(),
        switchover_gate: Mailbox::new(),
        objects: Default::default(),
        dirty_rate: Default::default(),
    };
    let h = std::thread::Builder::new()
        .name("lm-vm".into())
        .spawn(move || m.run(rx))?;
    Ok((MachineHandle { tx }, h))
}

fn busy() -> QmpError {
    QmpError::generic("There's a migration process in progress")
}

impl Machine {
    fn run(mut self, rx: Receiver<Msg>) {
        while let Ok(msg) = rx.recv() {
            match msg {
                Msg::Command(req, reply) => {
                    let _ = reply.send(self.command(&req));
                }
                Msg::Quit => break,
                other => self.migration_event(other),
            }
        }
        // Quit: cancel what runs and wait for its end, so its thread is joined.
        if let Some((_, cancel)) = &self.thread {
            cancel.cancel();
        }
        while self.thread.is_some() {
            match rx.recv() {
                Ok(Msg::Command(_, reply)) => {
                    let _ = reply.send(Err(QmpError::generic("the VM is shutting down")));
                }
                Ok(other) => self.migration_event(other),
                Err(_) => break,
            }
        }
        self.events.emit(
            "SHUTDOWN",
            Some(json!({"guest": false, "reason": "host-qmp-quit"})),
        );
    }

    fn set_status(&mut self, s: MigStatus) {
        if self.status != s {
            self.status = s;
            if self.caps.events {
                self.events
                    .emit("MIGRATION", Some(json!({"status": s.name()})));
            }
        }
    }

    fn set_run(&mut self, r: RunState) {
        let was = self.run.running();
        self.run = r;
        match (was, r.running()) {
            (true, false) => self.events.emit("STOP", None),
            (false, true) => self.events.emit("RESUME", None),
            _ => {}
        }
    }

    fn join_thread(&mut self) {
        if let Some((h, _)) = self.thread.take() {
            let _ = h.join();
        }
    }

    fn command(&mut self, req: &Request) -> Result<Value, QmpError> {
        let none = || Args::new(&req.arguments, &[]);
        match req.execute.as_str() {
            "query-status" => {
                none()?;
                Ok(json!({
                    "running": self.run.running(), "singlestep": false, "status": self.run.name()
                }))
            }
            "stop" => {
                none()?;
                self.stop()
            }
            "cont" => {
                none()?;
                self.cont()
            }
            "quit" => {
                none()?;
                Ok(json!({}))
            }
            "migrate" => self.migrate(req),
            "migrate-incoming" => self.migrate_incoming(req),
            "migrate_cancel" => {
                none()?;
                self.cancel()
            }
            "migrate-start-postcopy" => {
                none()?;
                self.start_postcopy()
            }
            "migrate-recover" => self.recover(req),
            "migrate-continue" => self.continue_switchover(req),
            "object-add" | "object-del" | "calc-dirty-rate" | "query-dirty-rate" => {
                self.tool_command(req)
            }
            "query-migrate" => {
                none()?;
                Ok(match &self.job {
                    Job::None => json!({}),
                    Job::Out(o) => o.query(self.status),
                    Job::In(i) => i.query(self.status),
                    Job::File(f) => f.query(self.status),
                })
            }
            "migrate-set-capabilities" => {
                let a = Args::new(&req.arguments, &["capabilities"])?;
                let list = a.array("capabilities")?;
                if self.status.in_progress() {
                    return Err(busy());
                }
                self.caps.set(list)?;
                Ok(json!({}))
            }
            "query-migrate-capabilities" => {
                none()?;
                Ok(self.caps.query())
            }
            "migrate-set-parameters" => {
                // `downtime-limit` and `max-bandwidth` reach a migration under way.
                self.params
                    .set_while(&req.arguments, self.status.in_progress())?;
                Ok(json!({}))
            }
            "query-migrate-parameters" => {
                none()?;
                Ok(self.params.query())
            }
            "x-livemig-verify" => {
                none()?;
                self.verify()
            }
            other => Err(QmpError::not_found(other)),
        }
    }

    /// The commands around a migration rather than of it: TLS objects and the dirty rate.
    fn tool_command(&mut self, req: &Request) -> Result<Value, QmpError> {
        match req.execute.as_str() {
            "object-add" => self.objects.add(&req.arguments).map(|()| json!({})),
            "object-del" => self
                .objects
                .del(&req.arguments, &self.params.tls_creds)
                .map(|()| json!({})),
            "calc-dirty-rate" => {
                if self.status.in_progress() {
                    return Err(busy());
                }
                let vm = self.vm.as_ref().ok_or_else(no_guest)?;
                self.dirty_rate.start(vm.guest.clone(), &req.arguments)
            }
            "query-dirty-rate" => {
                Args::new(&req.arguments, &[])?;
                Ok(self.dirty_rate.query())
            }
            other => Err(QmpError::not_found(other)),
        }
    }

    fn stop(&mut self) -> Result<Value, QmpError> {
        match self.run {
            _ if self.status.in_progress() => Err(QmpError::generic(
                "cannot stop the guest while a migration runs: livemig pauses it itself at switchover (migrate_cancel first)",
            )),
            RunState::Running => {
                let vm = self.vm.as_ref().ok_or_else(no_guest)?;
                vm.guest
                    .pause()
                    .map_err(|e| QmpError::generic(format!("cannot stop the guest: {e}")))?;
                self.set_run(RunState::Paused);
                Ok(json!({}))
            }
            RunState::InMigrate => Err(no_guest()),
            _ => Ok(json!({})),
        }
    }

    fn cont(&mut self) -> Result<Value, QmpError> {
        match self.run {
            RunState::Running => Ok(json!({})),
            RunState::Paused => {
                let vm = self.vm.as_ref().ok_or_else(no_guest)?;
                vm.guest
                    .resume()
                    .map_err(|e| QmpError::generic(format!("cannot resume the guest: {e}")))?;
                self.set_run(RunState::Running);
                Ok(json!({}))
            }
            RunState::FinishMigrate if self.in_postcopy() => Err(QmpError::generic(
                "the guest runs on the destination in postcopy; it never runs here again",
            )),
            RunState::FinishMigrate => Err(QmpError::generic(
                "the guest is paused for switchover; it runs here again only if the migration fails or is cancelled",
            )),
            RunState::PostMigrate if self.split => Err(QmpError::generic(SPLIT)),
            RunState::PostMigrate => Err(QmpError::generic(
                "the guest was migrated and runs on the destination; livemig does not run it here again",
            )),
            RunState::InMigrate => Err(no_guest()),
        }
    }

    fn verify(&mut self) -> Result<Value, QmpError> {
        if self.status.in_progress() {
            return Err(busy());
        }
        let vm = self.vm.as_ref().ok_or_else(no_guest)?;
        let running = self.run.running();
        let err = |e: livemig_engine::GuestError| QmpError::generic(format!("verify: {e}"));
        if running {
            vm.guest.pause().map_err(err)?;
        }
        let v = vm.guest.verify();
        if running {
            vm.guest.resume().map_err(err)?;
        }
        let v = v.map_err(err)?;
        Ok(json!({
            "guest": vm.kind, "pages-checked": v.pages_checked,
            "pages-mismatched": v.pages_mismatched, "counter": v.counter, "examples": v.examples,
        }))
    }

    /// Whether the guest can be migrated now, and whether it is stopped (a guest its
    /// operator stopped is migrated as it is, and stays stopped: QEMU's way).
    fn migratable(&mut self) -> Result<bool, QmpError> {
        let paused = match self.run {
            RunState::Running => false,
            RunState::Paused => true,
            RunState::InMigrate => return Err(no_guest()),
            RunState::PostMigrate => {
                return Err(QmpError::generic(
                    "the guest was migrated already and runs on the destination",
                ))
            }
            _ => {
                return Err(QmpError::generic(
                    "the guest is paused for a migration under way",
                ))
            }
        };
        if self.dirty_rate.measuring() {
            return Err(QmpError::generic(
                "calc-dirty-rate is measuring this guest's dirty log: migrate once it is done",
            ));
        }
        Ok(paused)
    }

    /// The outgoing migration's configuration: the parameters and capabilities, TLS, the
    /// gates QMP commands open (`migrate-continue`, `migrate` with `resume`).
    fn outgoing_config(&mut self, guest_paused: bool) -> Result<MigrationConfig, QmpError> {
        let mut config = self.params.migration_config(&self.caps);
        config.tls = self.tls(objects::TlsEndpoint::Client)?;
        config.guest_paused = guest_paused;
        self.switchover_gate.clear();
        if self.caps.pause_before_switchover {
            config.pause_before_switchover = Some(self.switchover_gate.clone());
        }
        // A broken postcopy waits, as QEMU's, for `migrate` with `resume` (or `quit`).
        self.recover_to.clear();
        config.postcopy_recovery = SourceRecovery::OnRequest {
            addresses: self.recover_to.clone(),
            within: None,
        };
        if config.postcopy.allowed {
            // What postcopy does not go with (compression) is refused now, not as a failed
            // migration.
            config
                .validate()
                .map_err(|e| QmpError::generic(e.to_string()))?;
        }
        Ok(config)
    }

    fn migrate(&mut self, req: &Request) -> Result<Value, QmpError> {
        let a = Args::new(
            &req.arguments,
            &["uri", "channels", "detach", "blk", "inc", "resume"],
        )?;
        let uri = channels::address(&a)?;
        let uri = uri.as_str();
        if a.opt_bool("resume")? == Some(true) {
            return self.resume(uri);
        }
        for flag in ["blk", "inc"] {
            if a.opt_bool(flag)? == Some(true) {
                return Err(QmpError::generic(format!(
                    "'{flag}' is not supported by livemig"
                )));
            }
        }
        a.opt_bool("detach")?;
        if let Some(path) = crate::file::file_uri(uri) {
            return self.migrate_to_file(uri, path.map_err(QmpError::generic)?);
        }
        if self.status.in_progress() {
            return Err(busy());
        }
        let guest_paused = self.migratable()?;
        let to: Endpoint = uri
            .parse()
            .map_err(|e| QmpError::generic(format!("Invalid migration URI '{uri}': {e}")))?;
        let config = self.outgoing_config(guest_paused)?;
        let vm = self.vm.as_ref().ok_or_else(no_guest)?;
        let watch = PostcopyWatch {
            allowed: config.postcopy.allowed,
            trigger: config.postcopy_trigger.clone(),
            switch: Switch::Precopy,
        };
        let shared = vm.shared();
        let names = vm.devices.iter().map(|d| d.descriptor().name).collect();
        let (stats, cancel, tx) = (config.stats.clone(), config.cancel.clone(), self.tx.clone());
        let thread = std::thread::Builder::new()
            .name("lm-vm-migrate".into())
            .spawn(move || {
                let progress_tx = tx.clone();
                let progress = move |p: &Progress| {
                    let _ = progress_tx.send(Msg::Progress(p.clone()));
                };
                let r = shared.with(|vm| migrate_vm(vm, &to, &config, &progress));
                let _ = tx.send(Msg::SourceDone(Box::new(r)));
            })
            .map_err(|e| QmpError::generic(format!("cannot start the migration thread: {e}")))?;
        self.thread = Some((thread, cancel));
        let mut out = Outgoing::new(
            uri.to_string(),
            stats,
            names,
            watch,
            self.caps.postcopy_blocktime,
        );
        out.guest_paused = guest_paused;
        self.job = Job::Out(Box::new(out));
        self.set_status(MigStatus::Setup);
        Ok(json!({}))
    }

    /// The destination's configuration from the parameters and the process's limits.
    fn incoming_config(&self, cancel: &CancelToken) -> Result<IncomingConfig, QmpError> {
        let tls = self.tls(objects::TlsEndpoint::Server)?;
        let mut config = IncomingConfig {
            verify: self.limits.verify,
            credit_window: self.params.credit_window,
            // 0 (the parameter's default) is the destination's own cap, not "unbounded".
            buffer_cap: match self.params.buffer_cap {
                0 => livemig_engine::config::DEFAULT_BUFFER_CAP,
                cap => cap,
            },
            peer_timeout: self.params.peer_timeout(self.limits.peer_timeout),
            tls,
            cancel: cancel.clone(),
            // A broken postcopy waits, as QEMU's, for `migrate-recover` (or `quit`).
            postcopy_recovery: IncomingRecovery::OnRequest {
                listeners: self.recover_on.clone(),
                within: None,
            },
            ..IncomingConfig::default()
        };
        if let Some(m) = self.limits.max_guest_memory {
            config.max_guest_memory = m;
        }
        Ok(config)
    }

    fn migrate_incoming(&mut self, req: &Request) -> Result<Value, QmpError> {
        let a = Args::new(&req.arguments, &["uri", "channels", "exit-on-error"])?;
        let uri = channels::address(&a)?;
        let uri = uri.as_str();
        a.opt_bool("exit-on-error")?;
        if self.status.in_progress() {
            return Err(QmpError::generic(
                "an incoming migration is already waiting or running",
            ));
        }
        // A VM whose guest was migrated away may take a guest in again (ping-pong).
        if self.split {
            return Err(QmpError::generic(SPLIT));
        }
        if !matches!(self.run, RunState::InMigrate | RunState::PostMigrate) {
            return Err(QmpError::generic(
                "this VM has a guest already: migrate-incoming needs a VM started with --incoming or one whose guest was migrated away",
            ));
        }
        if let Some(path) = crate::file::file_uri(uri) {
            return self.incoming_from_file(uri, path.map_err(QmpError::generic)?);
        }
        let at: Endpoint = uri
            .parse()
            .map_err(|e| QmpError::generic(format!("Invalid migration URI '{uri}': {e}")))?;
        // Every check (the TLS credentials among them) before anything changes.
        let cancel = CancelToken::new();
        let config = self.incoming_config(&cancel)?;
        let listener = Listener::bind(&at)
            .map_err(|e| QmpError::generic(format!("cannot listen on {uri}: {e}")))?;
        if self.run == RunState::PostMigrate {
            // The guest runs on elsewhere: this copy (and its threads) goes.
            self.vm = None;
            self.run = RunState::InMigrate;
        }
        // The VM is built now, before the source is told to come (QEMU's destination has its
        // VM too): its set-up then waits only for the guest's memory slots and vCPUs.
        livemig_vmm::kvm::prepare_vm();
        self.recover_on.clear();
        let tx = self.tx.clone();
        let thread = std::thread::Builder::new()
            .name("lm-vm-incoming".into())
            .spawn(move || receive_on(listener, config, tx))
            .map_err(|e| QmpError::generic(format!("cannot start the migration thread: {e}")))?;
        self.thread = Some((thread, cancel));
        self.job = Job::In(Box::new(IncomingJob {
            uri: uri.to_string(),
            start: Instant::now(),
            end: None,
            report: None,
            error: None,
            blocktime: self.caps.postcopy_blocktime,
        }));
        self.set_status(MigStatus::Setup);
        Ok(json!({}))
    }

    fn cancel(&mut self) -> Result<Value, QmpError> {
        if !self.status.in_progress() {
            return Ok(json!({}));
        }
        // QEMU's rule and words: the guest runs on the destination, and its memory is split
        // between the hosts, so there is nothing to go back to.
        if self.in_postcopy() {
            return Err(QmpError::generic(
                "Postcopy migration in progress, cannot cancel.",
            ));
        }
        if let Job::In(_) = self.job {
            if self.status.in_postcopy() {
                return Err(QmpError::generic(
                    "Postcopy migration in progress, cannot cancel.",
                ));
            }
            if self.status == MigStatus::Active {
                return Err(QmpError::generic(
                    "an incoming migration under way is cancelled on its source",
                ));
            }
        }
        if let Some((_, cancel)) = &self.thread {
            cancel.cancel();
        }
        self.set_status(MigStatus::Cancelling);
        Ok(json!({}))
    }

    /// `migrate` with `resume: true`: the paused postcopy's source goes on to `uri` (where
    /// the destination listens after `migrate-recover`). QEMU's checks and words.
    fn resume(&mut self, uri: &str) -> Result<Value, QmpError> {
        if !matches!(self.job, Job::Out(_)) || self.status != MigStatus::PostcopyPaused {
            return Err(QmpError::generic(
                "Cannot resume if there is no paused migration",
            ));
        }
        let to: Endpoint = uri
            .parse()
            .map_err(|e| QmpError::generic(format!("Invalid migration URI '{uri}': {e}")))?;
        self.recover_to.post(to);
        self.set_status(MigStatus::PostcopyRecover);
        Ok(json!({}))
    }

    /// The TLS a migration on `endpoint`'s side uses: the `tls-creds` object the parameters
    /// name, or else the process's own `--tls-*` options.
    fn tls(
        &self,
        endpoint: objects::TlsEndpoint,
    ) -> Result<Option<Arc<livemig_engine::TlsConfig>>, QmpError> {
        match self
            .objects
            .tls(&self.params.tls_creds, &self.params.tls_hostname, endpoint)?
        {
            Some(tls) => Ok(Some(tls)),
            None => Ok(self.limits.tls.clone()),
        }
    }

    /// `migrate-continue`: a migration held in `pre-switchover` goes on. QEMU's check and
    /// words: `state` must be the status the migration is in.
    fn continue_switchover(&mut self, req: &Request) -> Result<Value, QmpError> {
        let a = Args::new(&req.arguments, &["state"])?;
        let state = a.str("state")?;
        if state != self.status.name() || self.status != MigStatus::PreSwitchover {
            return Err(QmpError::generic(format!(
                "Migration not in expected state: {}",
                self.status.name()
            )));
        }
        self.switchover_gate.post(());
        Ok(json!({}))
    }

    /// `migrate-recover`: the paused postcopy's destination listens on `uri` for the
    /// source's resume. QEMU's checks and words.
    fn recover(&mut self, req: &Request) -> Result<Value, QmpError> {
        let a = Args::new(&req.arguments, &["uri"])?;
        let uri = a.str("uri")?;
        if !matches!(self.job, Job::In(_)) || self.status != MigStatus::PostcopyPaused {
            return Err(QmpError::generic(
                "Migrate recover can only be run when postcopy is paused.",
            ));
        }
        let at: Endpoint = uri
            .parse()
            .map_err(|e| QmpError::generic(format!("Invalid migration URI '{uri}': {e}")))?;
        let listener = Listener::bind(&at)
            .map_err(|e| QmpError::generic(format!("cannot listen on {uri}: {e}")))?;
        self.recover_on.post(listener);
        self.set_status(MigStatus::PostcopyRecover);
        Ok(json!({}))
    }

    /// The outgoing migration under way has switched to postcopy, or may have (the guest
    /// paused for a switch that `migrate-start-postcopy` asked for and not told apart from a
    /// switchover yet).
    fn in_postcopy(&self) -> bool {
        match &self.job {
            Job::Out(o) => self.status.in_progress() && o.postcopy.started(),
            _ => false,
        }
    }

    /// `migrate-start-postcopy`, with QEMU's checks and words. As QEMU, a migration that
    /// has ended meanwhile is no error (that would race with the command); the switch
    /// happens at the end of the round under way.
    fn start_postcopy(&mut self) -> Result<Value, QmpError> {
        if !self.caps.postcopy_ram {
            return Err(QmpError::generic(
                "Enable postcopy with migrate_set_capability before the start of migration",
            ));
        }
        match &self.job {
            Job::Out(o) if o.postcopy.allowed => {
                o.postcopy.trigger.fire();
                Ok(json!({}))
            }
            // Capabilities cannot change while a migration runs, so this one ended before
            // postcopy-ram was set.
            Job::Out(_) if !self.status.in_progress() => Ok(json!({})),
            Job::Out(_) => Err(QmpError::generic(
                "Enable postcopy with migrate_set_capability before the start of migration",
            )),
            _ => Err(QmpError::generic(
                "Postcopy must be started after migration has been started",
            )),
        }
    }

    fn migration_event(&mut self, msg: Msg) {
        match msg {
            Msg::Progress(p) => self.progress(p),
            Msg::SourceDone(r) => self.source_done(*r),
            Msg::IncomingSession => self.set_status(MigStatus::Active),
            // The guest runs on this side from the switch; the VM is this machine's once
            // every page is in.
            Msg::IncomingPostcopy => self.set_status(MigStatus::PostcopyActive),
            Msg::IncomingPaused => self.set_status(MigStatus::PostcopyPaused),
            Msg::IncomingDone(r) => self.incoming_done(*r),
            Msg::FileSaved(r) => self.file_saved(*r),
            Msg::FileRestored(r) => self.file_restored(*r),
            Msg::Command(..) | Msg::Quit => {}
        }
    }

    /// The outgoing migration ended.
    fn source_done(&mut self, r: Result<MigrationReport, MigrationError>) {
        self.join_thread();
        let cancelled = self.status == MigStatus::Cancelling;
        let Job::Out(o) = &mut self.job else { return };
        o.end = Some(Instant::now());
        let guest_paused = o.guest_paused;
        let postcopy = match &r {
            Ok(report) => report.postcopy.is_some(),
            Err(e) => matches!(e, MigrationError::PostcopyBroken(_)),
        };
        match r {
            Ok(report) => {
                o.report = Some(report);
                self.set_run(RunState::PostMigrate);
                if postcopy && self.status != MigStatus::PostcopyActive {
                    self.set_status(MigStatus::PostcopyActive);
                }
                self.set_status(MigStatus::Completed);
            }
            Err(e) => {
                // After PostcopyStart the engine reports every failure as
                // PostcopyBroken: the guest's memory is split between the hosts.
                let broken = postcopy;
                let handed_over = broken || matches!(e, MigrationError::HandoverUnknown(_));
                o.error = Some(e.to_string());
                eprintln!("livemig: migration to {} failed: {e}", o.to);
                if broken {
                    // Not resumed (the wait for `migrate` with `resume` ended with
                    // `quit`): the copy stays paused, kept, for good.
                    self.split = true;
                    if !self.status.in_postcopy() {
                        self.set_status(MigStatus::PostcopyActive);
                    }
                }
                if handed_over {
                    // The destination may run the guest: never here again.
                    self.set_run(RunState::PostMigrate);
                } else if guest_paused {
                    // Stopped by its operator before the migration: stays stopped.
                    self.set_run(RunState::Paused);
                } else {
                    // The engine has resumed the guest if it had paused it.
                    self.set_run(RunState::Running);
                }
                let cancelled = cancelled || matches!(e, MigrationError::Cancelled);
                self.set_status(if cancelled {
                    MigStatus::Cancelled
                } else {
                    MigStatus::Failed
                });
            }
        }
    }

    /// The incoming migration ended.
    fn incoming_done(&mut self, r: Result<Incoming, IncomingError>) {
        self.join_thread();
        let Job::In(j) = &mut self.job else { return };
        j.end = Some(Instant::now());
        match r {
            Ok(inc) => {
                let postcopy = inc.report.postcopy_ms > 0.0;
                j.report = Some(inc.report.clone());
                let paused = inc.report.paused;
                self.vm = Some(VmParts::from_incoming(inc));
                // A guest stopped on the source arrives stopped.
                self.set_run(if paused {
                    RunState::Paused
                } else {
                    RunState::Running
                });
                if postcopy && self.status != MigStatus::PostcopyActive {
                    self.set_status(MigStatus::PostcopyActive);
                }
                self.set_status(MigStatus::Completed);
            }
            Err(e) => {
                j.error = Some(e.to_string());
                eprintln!("livemig: incoming migration on {} failed: {e}", j.uri);
                self.set_status(if matches!(e, IncomingError::Cancelled) {
                    MigStatus::Cancelled
                } else {
                    MigStatus::Failed
                });
            }
        }
        // A VM built ahead and not taken (a failed or non-KVM session) goes with the
        // wait it was built for: after the outcome is told (tearing a VM down takes a
        // few ms), and on this thread, before any next migrate-incoming builds anew.
        livemig_vmm::kvm::forget_prepared_vm();
    }

    /// A switchover past `x-downtime-hard-limit` was abandoned: the guest runs here again
    /// and precopy goes on.
    fn switchover_abandoned(&mut self, a: livemig_engine::AbandonedSwitchover) {
        let Job::Out(o) = &mut self.job else { return };
        o.ram_bytes_at_pause = None;
        let data = json!({"round": a.round, "cut-ms": a.cut_ms,
            "paused-ms": a.paused_ms, "waiting-for": a.waiting_for});
        o.abandoned.push(a);
        if self.caps.events {
            self.events.emit("SWITCHOVER_ABANDONED", Some(data));
        }
        if self.run == RunState::FinishMigrate {
            self.set_run(RunState::Running);
        }
        self.set_status(MigStatus::Active);
    }

    fn progress(&mut self, p: Progress) {
        let Job::Out(o) = &mut self.job else { return };
        let mut pass = None;
        let mut switchover = false;
        let mut postcopy = false;
        match p {
            Progress::Connected {
                setup_ms,
                total_pages,
                ..
            } => {
                o.setup_ms = Some(setup_ms);
                o.total_pages = total_pages;
            }
            Progress::RoundStarted { pages, .. } => {
                let s = o.stats.snapshot();
                o.dirty_syncs += 1;
                o.round_pages = pages;
                o.round_start_sent = s.normal_pages + s.zero_pages;
                pass = Some(o.dirty_syncs);
            }
            Progress::RoundDone(r) => {
                o.expected_downtime_ms = r.expected_downtime_ms;
                o.last_round = Some(r);
            }
            Progress::Switchover {
                expected_downtime_ms,
                remaining_pages,
                postcopy: to_postcopy,
                ..
            } => {
                o.expected_downtime_ms = expected_downtime_ms;
                switchover = true;
                let s = o.stats.snapshot();
                o.ram_bytes_at_pause = Some(s.ram_bytes);
                o.postcopy.switch = o.postcopy.at_pause(
                    to_postcopy,
                    s.normal_pages + s.zero_pages,
                    remaining_pages,
                );
                postcopy = matches!(o.postcopy.switch, Switch::Postcopy { .. });
            }
            Progress::PreSwitchover => {
                self.set_status(MigStatus::PreSwitchover);
                return;
            }
            // QEMU's `device` status, or back to `postcopy-active` at a switch to postcopy.
            Progress::SavingDevices => {
                let next = match o.postcopy.switch {
                    Switch::Postcopy { .. } => MigStatus::PostcopyActive,
                    Switch::Precopy => MigStatus::Device,
                };
                self.set_status(next);
                return;
            }
            Progress::PostcopyPaused { .. } => {
                self.set_status(MigStatus::PostcopyPaused);
                return;
            }
            Progress::PostcopyResumed { .. } => {
                self.set_status(MigStatus::PostcopyActive);
                return;
            }
            Progress::SwitchoverAbandoned(a) => return self.switchover_abandoned(a),
        }
        if self.status == MigStatus::Setup {
            self.set_status(MigStatus::Active);
        }
        if let Some(n) = pass {
            if self.caps.events {
                self.events.emit("MIGRATION_PASS", Some(json!({"pass": n})));
            }
        }
        if switchover && self.run == RunState::Running {
            self.set_run(RunState::FinishMigrate);
        }
        if postcopy {
            self.set_status(MigStatus::PostcopyActive);
        }
    }
}

/// The incoming migration's thread (`lm-vm-incoming`): receives one VM on `listener`,
/// telling the machine of the session's start, of a switch to postcopy, and of the end.
fn receive_on(listener: Listener, config: IncomingConfig, tx: Sender<Msg>) {
    let log_tx = tx.clone();
    let log = move |ev: &IncomingEvent| {
        match ev {
            IncomingEvent::SessionAccepted { .. } => {
                let _ = log_tx.send(Msg::IncomingSession);
            }
            IncomingEvent::PostcopyStarted { .. } | IncomingEvent::PostcopyResumed { .. } => {
                let _ = log_tx.send(Msg::IncomingPostcopy);
            }
            IncomingEvent::PostcopyPaused { .. } => {
                let _ = log_tx.send(Msg::IncomingPaused);
            }
            _ => {}
        }
        eprintln!("livemig: {ev}");
    };
    let factories = Factories {
        guest: &Factory,
        devices: &DeviceModels,
    };
    let r = receive_vm(&listener, factories, &config, &log);
    drop(listener);
    let _ = tx.send(Msg::IncomingDone(Box::new(r)));
}

/// Why a copy left by a broken postcopy neither runs nor gives way.
const SPLIT: &str = "postcopy broke after the switch and was not resumed: the guest's memory is split between this host and the destination, so this copy stays paused and is kept; 'quit' discards it";

fn no_guest() -> QmpError {
    QmpError::generic("no guest here yet: it arrives with 'migrate-incoming'")
}

/// Serves QMP on `path` for a VM until `quit`; with `incoming`, starts waiting for an
/// incoming migration there at once (as `-incoming URI` does).
pub fn serve(
    path: &std::path::Path,
    vm: Option<VmParts>,
    limits: IncomingLimits,
    incoming: Option<&Endpoint>,
) -> anyhow::Result<()> {
    let events = Events::new();
    let (handle, thread) = start(vm, events.clone(), limits)?;
    let handle = Arc::new(handle);
    if let Some(at) = incoming {
        let mut arguments = serde_json::Map::new();
        arguments.insert("uri".into(), json!(at.to_string()));
        handle
            .execute(&Request {
                execute: "migrate-incoming".into(),
                arguments,
                id: None,
            })
            .map_err(|e| anyhow::anyhow!("{}", e.desc))?;
    }
    let server = livemig_qmp::Server::start(
        path,
        handle.clone(),
        &events,
        livemig_qmp::ServerConfig::default(),
    )?;
    eprintln!("livemig: QMP on {}", path.display());
    let _ = thread.join();
    server.shutdown();
    Ok(())
}
