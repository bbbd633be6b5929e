//! vCPUs: one host thread per vCPU running `KVM_RUN`, pause and resume from another thread,
//! and save/restore of every part of a vCPU's state.
//!
//! ```text
//!   NotStarted --resume--> Running --pause--> Parked --resume--> Running
//!                             |                                     |
//!                             +-- shutdown / error --> Stopped <----+
//! ```
//!
//! Pausing: the controller sets `pause`, then kicks the thread with [`kick_signal`] (a
//! real-time signal whose handler does nothing: its delivery makes `KVM_RUN` return `EINTR`),
//! again every millisecond until the thread reports Parked (a kick that lands just before
//! `KVM_RUN` starts is lost; the next is not). Before parking, the thread sets
//! `immediate_exit` and calls `KVM_RUN` once more, which completes a pending I/O exit without
//! running the guest, so the saved state is at an instruction boundary. While parked the
//! thread does not hold the vCPU fd; save and restore take it.

use super::console::Console;
use super::error::KvmError;
use super::layout::{PORT_BOOT, PORT_PROGRESS, PORT_SLEEP};
use super::state::VcpuState;
use crate::throttle::{Throttle, ThrottleClock};
use kvm_bindings::{kvm_msr_entry, CpuId, Msrs, KVM_MAX_MSR_ENTRIES, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::errno;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), KvmError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), on_kick));
    result.map_err(KvmError::Signal)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    NotStarted,
    Running,
    Parked,
    Stopped(String),
}

/// What the controller and the vCPU thread share.
struct Control {
    index: u32,
    phase: Mutex<Phase>,
    cv: Condvar,
    pause: AtomicBool,
    stop: AtomicBool,
    /// Last progress the payload reported (low 32 bits of its counter).
    reported: AtomicU64,
    /// Progress reports received.
    reports: AtomicU64,
    /// The guest wrote this vCPU's index to the boot port.
    booted: AtomicBool,
    /// COM1 and the debug port, shared by every vCPU of the guest.
    console: Arc<Console>,
    /// Auto-converge's throttle, shared by every vCPU of the guest.
    throttle: Arc<Throttle>,
}

impl Control {
    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, phase: Phase) {
        *self.phase() = phase;
        self.cv.notify_all();
    }

    /// Sleeps up to `d` (a payload's sleep request), waking early for a pause or stop.
    fn sleep(&self, d: Duration) {
        let g = self.phase();
        let _ = self.cv.wait_timeout_while(g, d, |_| {
            !self.pause.load(Ordering::Acquire) && !self.stop.load(Ordering::Acquire)
        });
    }

    /// Waits out a pause as Parked.
    fn park(&self) {
        let mut g = self.phase();
        *g = Phase::Parked;
        self.cv.notify_all();
        while self.pause.load(Ordering::Acquire) && !self.stop.load(Ordering::Acquire) {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        *g = Phase::Running;
        self.cv.notify_all();
    }
}

/// One vCPU and its thread.
pub struct Vcpu {
    index: u32,
    fd: Arc<Mutex<VcpuFd>>,
    ctl: Arc<Control>,
    thread: Mutex<Option<JoinHandle<()>>>,
    msr_indices: Vec<u32>,
}

fn vcpu_err(index: u32, op: &'static str) -> impl FnOnce(errno::Error) -> KvmError {
    move |source| KvmError::Vcpu { index, op, source }
}

impl Vcpu {
    /// Wraps a created vCPU (CPUID set, nothing else) whose thread is not started yet.
    pub fn new(
        index: u32,
        fd: VcpuFd,
        cpuid: &CpuId,
        msr_indices: &[u32],
        throttle: &Arc<Throttle>,
        console: &Arc<Console>,
    ) -> Result<Self, KvmError> {
        install_kick_handler()?;
        let mut cpuid = cpuid.clone();
        for e in cpuid.as_mut_slice() {
            match e.function {
                // Initial APIC ID in EBX[31:24]; x2APIC ID in EDX of the topology leaves.
                1 => e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24),
                0xb | 0x1f => e.edx = index,
                _ => {}
            }
        }
        fd.set_cpuid2(&cpuid)
            .map_err(vcpu_err(index, "set CPUID"))?;
        Ok(Vcpu {
            index,
            fd: Arc::new(Mutex::new(fd)),
            ctl: Arc::new(Control {
                index,
                phase: Mutex::new(Phase::NotStarted),
                cv: Condvar::new(),
                pause: AtomicBool::new(true),
                stop: AtomicBool::new(false),
                reported: AtomicU64::new(0),
                reports: AtomicU64::new(0),
                booted: AtomicBool::new(false),
                console: Arc::clone(console),
                throttle: throttle.clone(),
            }),
            thread: Mutex::new(None),
            msr_indices: msr_indices.to_vec(),
        })
    }

    fn fd(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the boot CPU's registers to the PVH entry state: flat 32-bit protected mode,
    /// paging off, `%ebx` = `hvm_start_info` (the source, before the first resume).
    pub fn boot_pvh(&self, entry: u64) -> Result<(), KvmError> {
        let fd = self.fd();
        let i = self.index;
        let mut sregs = fd.get_sregs().map_err(vcpu_err(i, "get sregs"))?;
        super::layout::pvh_sregs(&mut sregs);
        fd.set_sregs(&sregs).map_err(vcpu_err(i, "set sregs"))?;
        fd.set_regs(&super::layout::pvh_regs(entry))
            .map_err(vcpu_err(i, "set regs"))?;
        Self::runnable(&fd, i)
    }

    /// Sets an application processor's registers to the image's 64-bit AP entry, on the GDT
    /// and page tables the boot CPU built, in ring 3 when `user_mode`.
    pub fn boot_ap(&self, entry: u64, user_mode: bool) -> Result<(), KvmError> {
        let fd = self.fd();
        let i = self.index;
        let mut sregs = fd.get_sregs().map_err(vcpu_err(i, "get sregs"))?;
        super::layout::long_mode_sregs(&mut sregs, user_mode);
        fd.set_sregs(&sregs).map_err(vcpu_err(i, "set sregs"))?;
        fd.set_regs(&super::layout::ap_regs(entry, i, user_mode))
            .map_err(vcpu_err(i, "set regs"))?;
        Self::runnable(&fd, i)
    }

    fn runnable(fd: &VcpuFd, i: u32) -> Result<(), KvmError> {
        // Application processors wait for INIT/SIPI unless told they may run.
        let mut mp = fd.get_mp_state().map_err(vcpu_err(i, "get mp_state"))?;
        mp.mp_state = KVM_MP_STATE_RUNNABLE;
        fd.set_mp_state(mp).map_err(vcpu_err(i, "set mp_state"))
    }

    /// Whether the guest wrote this vCPU's index to the boot port.
    pub fn booted(&self) -> bool {
        self.ctl.booted.load(Ordering::Acquire)
    }

    /// Why the vCPU stopped, if it did.
    pub fn stopped(&self) -> Option<String> {
        match &*self.ctl.phase() {
            Phase::Stopped(reason) => Some(reason.clone()),
            _ => None,
        }
    }

    /// Last progress reported by the payload (low 32 bits of its counter) and how many
    /// reports came.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.ctl.reported.load(Ordering::Acquire),
            self.ctl.reports.load(Ordering::Acquire),
        )
    }

    /// Starts the thread, or lets a parked one run again.
    pub fn resume(&self) -> Result<(), KvmError> {
        let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if let Phase::Stopped(reason) = &*self.ctl.phase() {
            return Err(KvmError::VcpuStopped {
                index: self.index,
                reason: reason.clone(),
            });
        }
        self.ctl.pause.store(false, Ordering::Release);
        if thread.is_none() {
            let (fd, ctl) = (Arc::clone(&self.fd), Arc::clone(&self.ctl));
            ctl.set(Phase::Running);
            let h = std::thread::Builder::new()
                .name(format!("kvm-vcpu{}", self.index))
                .spawn(move || run_loop(&fd, &ctl))
                .map_err(|source| KvmError::Thread {
                    index: self.index,
                    source,
                })?;
            *thread = Some(h);
        } else {
            let _g = self.ctl.phase();
            self.ctl.cv.notify_all();
        }
        Ok(())
    }

    /// Stops the vCPU; returns once it is parked (or was never started, or has stopped).
    pub fn pause(&self) -> Result<(), KvmError> {
        self.ctl.pause.store(true, Ordering::Release);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        let Some(h) = thread.as_ref() else {
            return Ok(());
        };
        let mut g = self.ctl.phase();
        self.ctl.cv.notify_all();
        while *g == Phase::Running {
            // A kick that arrives between the thread's check of `pause` and KVM_RUN is lost;
            // kick again until it parks.
            let _ = h.kill(kick_signal());
            g = self
                .ctl
                .cv
                .wait_timeout(g, Duration::from_millis(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Saves every part of the vCPU's state. Only while paused.
    pub fn save(&self) -> Result<VcpuState, KvmError> {
        let fd = self.fd();
        let i = self.index;
        Ok(VcpuState {
            mp_state: fd.get_mp_state().map_err(vcpu_err(i, "get mp_state"))?,
            regs: fd.get_regs().map_err(vcpu_err(i, "get regs"))?,
            sregs: fd.get_sregs().map_err(vcpu_err(i, "get sregs"))?,
            xsave: fd.get_xsave().map_err(vcpu_err(i, "get xsave"))?,
            xcrs: fd.get_xcrs().map_err(vcpu_err(i, "get xcrs"))?,
            debugregs: fd.get_debug_regs().map_err(vcpu_err(i, "get debug regs"))?,
            lapic: fd.get_lapic().map_err(vcpu_err(i, "get LAPIC"))?,
            msrs: self.get_msrs(&fd)?,
            events: fd
                .get_vcpu_events()
                .map_err(vcpu_err(i, "get vCPU events"))?,
        })
    }

    fn get_msrs(&self, fd: &VcpuFd) -> Result<Vec<kvm_msr_entry>, KvmError> {
        let mut out = Vec::with_capacity(self.msr_indices.len());
        for chunk in self.msr_indices.chunks(KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| KvmError::Msrs {
                index: self.index,
                op: "build the MSR list",
                done: 0,
                wanted: entries.len(),
                first_failed: chunk[0],
            })?;
            let n = fd
                .get_msrs(&mut msrs)
                .map_err(vcpu_err(self.index, "get MSRs"))?;
            if n != entries.len() {
                return Err(KvmError::Msrs {
                    index: self.index,
                    op: "KVM_GET_MSRS",
                    done: n,
                    wanted: entries.len(),
                    first_failed: chunk[n.min(chunk.len() - 1)],
                });
            }
            out.extend_from_slice(msrs.as_slice());
        }
        Ok(out)
    }

    /// Loads state saved by [`Vcpu::save`]. Only while paused.
    pub fn restore(&self, s: &VcpuState) -> Result<(), KvmError> {
        let fd = self.fd();
        let i = self.index;
        fd.set_mp_state(s.mp_state)
            .map_err(vcpu_err(i, "set mp_state"))?;
        fd.set_regs(&s.regs).map_err(vcpu_err(i, "set regs"))?;
        fd.set_sregs(&s.sregs).map_err(vcpu_err(i, "set sregs"))?;
        // SAFETY: KVM_SET_XSAVE reads a `kvm_xsave` (4 KiB), which `s.xsave` is. It would read
        // more only if this process had enabled dynamic XSTATE features (AMX) for guests with
        // arch_prctl, which livemig never does.
        unsafe { fd.set_xsave(&s.xsave) }.map_err(vcpu_err(i, "set xsave"))?;
        fd.set_xcrs(&s.xcrs).map_err(vcpu_err(i, "set xcrs"))?;
        fd.set_debug_regs(&s.debugregs)
            .map_err(vcpu_err(i, "set debug regs"))?;
        fd.set_lapic(&s.lapic).map_err(vcpu_err(i, "set LAPIC"))?;
        for chunk in s.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).map_err(|_| KvmError::Msrs {
                index: i,
                op: "build the MSR list",
                done: 0,
                wanted: chunk.len(),
                first_failed: chunk[0].index,
            })?;
            let n = fd.set_msrs(&msrs).map_err(vcpu_err(i, "set MSRs"))?;
            if n != chunk.len() {
                return Err(KvmError::Msrs {
                    index: i,
                    op: "KVM_SET_MSRS",
                    done: n,
                    wanted: chunk.len(),
                    first_failed: chunk[n.min(chunk.len() - 1)].index,
                });
            }
        }
        fd.set_vcpu_events(&s.events)
            .map_err(vcpu_err(i, "set vCPU events"))?;
        Ok(())
    }

    /// Stops the thread for good (the guest is being dropped).
    pub fn shutdown(&self) {
        self.ctl.stop.store(true, Ordering::Release);
        let h = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = h {
            {
                let _g = self.ctl.phase();
                self.ctl.cv.notify_all();
            }
            while !h.is_finished() {
                let _ = h.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = h.join();
        }
    }
}

/// The vCPU thread.
fn run_loop(fd: &Mutex<VcpuFd>, ctl: &Control) {
    let mut vcpu = fd.lock().unwrap_or_else(|p| p.into_inner());
    let mut clock = ThrottleClock::default();
    loop {
        // Throttled: after running a while, sleep in proportion (the payload exits to the
        // host every few hundred pages at most, so this is reached often enough).
        if let Some(d) = clock.due(&ctl.throttle) {
            ctl.sleep(d);
            clock.restart();
        }
        if ctl.stop.load(Ordering::Acquire) {
            ctl.set(Phase::Stopped("shut down".into()));
            return;
        }
        if ctl.pause.load(Ordering::Acquire) {
            // Complete a pending I/O exit without running the guest any further.
            vcpu.set_kvm_immediate_exit(1);
            let _ = vcpu.run();
            vcpu.set_kvm_immediate_exit(0);
            drop(vcpu);
            ctl.park();
            vcpu = fd.lock().unwrap_or_else(|p| p.into_inner());
            clock.restart();
            continue;
        }
        let stopped = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) if ctl.console.io_out(port, data) => None,
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                let value = u32::from_le_bytes(v) as u64;
                match port {
                    PORT_PROGRESS => {
                        ctl.reported.store(value, Ordering::Release);
                        ctl.reports.fetch_add(1, Ordering::AcqRel);
                    }
                    PORT_SLEEP => ctl.sleep(Duration::from_micros(value.min(1_000_000))),
                    PORT_BOOT => ctl.booted.store(true, Ordering::Release),
                    _ => {}
                }
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctl.console.io_in(port, data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::Hlt) => Some("the guest halted".to_string()),
            Ok(VcpuExit::Shutdown) => Some("the guest shut down (triple fault)".to_string()),
            Ok(other) => Some(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(format!("KVM_RUN failed: {e}")),
        };
        if let Some(reason) = stopped {
            let regs = vcpu.get_regs().map(|r| format!(" at rip 0x{:x}", r.rip));
            ctl.set(Phase::Stopped(format!(
                "vCPU {}: {reason}{}",
                ctl.index,
                regs.unwrap_or_default()
            )));
            return;
        }
    }
}
