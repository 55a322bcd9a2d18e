//! One native thread per vCPU running KVM_RUN, with the legacy devices on its exit path.
//!
//! Control (run / pause / kill) goes through `VcpuControl`. A request is never lost: the requester
//! sets `immediate_exit` in kvm_run and then signals the thread, so KVM_RUN returns at once whether
//! the thread was inside it or about to enter it (Firecracker's scheme). A vCPU that issued a
//! lifecycle request or hit an unhandled exit *parks*: it runs no more guest code, but still
//! acknowledges pause and obeys kill, so a parked vCPU never blocks a pause. A vCPU asleep in the
//! idle port has finished its last instruction before it fell asleep (*quiescent*): a pause then
//! takes effect at once, without waking the thread. A vCPU held before its first entry may *stand
//! by*: wait spinning (yielding the CPU each turn, for a few ms at most) instead of asleep, so that
//! a migration's destination lets it run without a wake-up inside the downtime.

use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::devices::DeviceAction;
use crate::error::{Error, Kind, Result};
use crate::idle::{IDLE_PORT, IDLE_SIGNATURE, WAKE_PORT};
use crate::spin::spin_while;
use crate::vm::{LifecycleRequest, VmShared};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Kill,
}

struct Ctl {
    want: Want,
    paused: bool,
    parked: bool,
    exited: bool,
    /// The thread has been let into KVM_RUN since it started (it runs guest code).
    entered: bool,
    /// Asleep in the idle port with no instruction in flight, until it is let into KVM_RUN again.
    quiescent: bool,
    /// Held before its first entry, the thread waits spinning instead of asleep until then.
    stand_by_until: Option<Instant>,
    thread: Option<libc::pthread_t>,
}

pub struct VcpuControl {
    pub index: u8,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    /// The vCPU's kvm_run mapping, owned by the VcpuFd that the VM's vCPU slot keeps alive for as
    /// long as this control exists.
    run: AtomicPtr<kvm_run>,
    /// Counts requests (changed under the `ctl` lock): what a spinning thread watches.
    requests: AtomicU32,
}

/// The longest a thread stands by (spinning) for its first entry before it sleeps again.
const STAND_BY_MAX: Duration = Duration::from_millis(10);
/// How long a caller spins for a standing-by thread's first entry before it sleeps.
const ENTRY_SPIN: Duration = Duration::from_micros(200);

/// The vCPU fd: the vCPU thread holds the lock while in KVM_RUN and handling an exit, and lets go
/// while paused or parked, so a paused vCPU's state can be read or written from elsewhere.
pub type SharedVcpuFd = Arc<Mutex<VcpuFd>>;

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The kick only has to interrupt KVM_RUN; its handler does nothing.
fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        register_signal_handler(kick_signal(), on_kick).expect("installing the vCPU kick handler")
    });
}

impl VcpuControl {
    pub fn new(index: u8, fd: &mut VcpuFd) -> Arc<VcpuControl> {
        Arc::new(VcpuControl {
            index,
            ctl: Mutex::new(Ctl {
                want: Want::Run,
                paused: false,
                parked: false,
                exited: false,
                entered: false,
                quiescent: false,
                stand_by_until: None,
                thread: None,
            }),
            cv: Condvar::new(),
            run: AtomicPtr::new(fd.get_kvm_run() as *mut kvm_run),
            requests: AtomicU32::new(0),
        })
    }

    fn set_immediate_exit(&self, value: u8) {
        let run = self.run.load(Ordering::Acquire);
        // SAFETY: the VcpuFd owning the mapping outlives this control (see `run`); immediate_exit
        // is a plain byte that KVM reads on entry.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, value) };
    }

    fn request(&self, want: Want, vm: &VmShared) {
        let mut c = self.ctl.lock().unwrap();
        if c.want == Want::Kill {
            return;
        }
        c.want = want;
        self.requests.fetch_add(1, Ordering::Release);
        if c.quiescent && want != Want::Kill {
            // Asleep with its state complete: paused (or running on) as it lies, without a
            // wake-up; the thread finds out when it next wakes, before it enters KVM_RUN.
            c.paused = want == Want::Pause;
            drop(c);
            self.cv.notify_all();
            return;
        }
        if want != Want::Run && !c.exited {
            self.set_immediate_exit(1);
            if let Some(t) = c.thread {
                // SAFETY: the thread is not joined before `exited` is set, so `t` is valid.
                unsafe { libc::pthread_kill(t, kick_signal()) };
            }
        }
        drop(c);
        self.cv.notify_all();
        vm.gate.notify();
    }

    pub fn pause(&self, vm: &VmShared) {
        self.request(Want::Pause, vm)
    }

    pub fn resume(&self, vm: &VmShared) {
        self.request(Want::Run, vm)
    }

    pub fn kill(&self, vm: &VmShared) {
        self.request(Want::Kill, vm)
    }

    /// Waits until this vCPU acknowledged the pause (or ended).
    pub fn wait_paused(&self, deadline: Instant) -> Result<()> {
        let mut c = self.ctl.lock().unwrap();
        while !(c.paused || c.exited) {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::new(
                    Kind::PauseTimeout,
                    format!("vCPU {} did not acknowledge the pause", self.index),
                ));
            }
            c = self.cv.wait_timeout(c, deadline - now).unwrap().0;
        }
        Ok(())
    }

    /// A vCPU held before its first entry wakes and waits spinning (for at most STAND_BY_MAX)
    /// instead of asleep: letting it run then takes microseconds instead of two wake-ups across
    /// threads (a migration's destination calls this as the State arrives).
    pub fn stand_by(&self) {
        let mut c = self.ctl.lock().unwrap();
        if !c.entered && c.want == Want::Pause {
            c.stand_by_until = Some(Instant::now() + STAND_BY_MAX);
            self.requests.fetch_add(1, Ordering::Release);
            drop(c);
            self.cv.notify_all();
        }
    }

    /// Waits until this vCPU's thread runs guest code (or ended, or was told to hold still);
    /// false if it was not scheduled by `deadline`. A VM "runs" only from then on: a thread that
    /// exists but has not been scheduled yet runs nothing.
    pub fn wait_entered(&self, deadline: Instant) -> bool {
        let entered = |c: &Ctl| c.entered || c.exited || c.want != Want::Run;
        // Only a thread standing by is worth a spin: a sleeping one takes a wake-up anyway.
        let standing_by = self.ctl.lock().unwrap().stand_by_until.is_some();
        if standing_by {
            spin_while(
                || !entered(&self.ctl.lock().unwrap()),
                Instant::now() + ENTRY_SPIN,
            );
        }
        let mut c = self.ctl.lock().unwrap();
        while !entered(&c) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            c = self.cv.wait_timeout(c, deadline - now).unwrap().0;
        }
        true
    }

    /// Whether the vCPU is held before its first guest instruction: never let into KVM_RUN, and
    /// not about to be (its state may still be written from elsewhere).
    pub fn held_before_first_entry(&self) -> bool {
        let c = self.ctl.lock().unwrap();
        !c.entered && c.want == Want::Pause
    }

    fn interrupted(&self) -> bool {
        self.ctl.lock().unwrap().want != Want::Run
    }

    pub fn state(&self) -> &'static str {
        let c = self.ctl.lock().unwrap();
        if c.exited {
            "exited"
        } else if c.paused {
            "paused"
        } else if c.parked {
            "parked"
        } else {
            "running"
        }
    }

    fn park(&self) {
        self.ctl.lock().unwrap().parked = true;
    }

    /// Called with the idle port's instruction completed, right before the idle sleep.
    fn fall_asleep(&self) {
        let mut c = self.ctl.lock().unwrap();
        c.quiescent = true;
        if c.want == Want::Pause && !c.paused {
            // A pause that came while the instruction was being completed.
            c.paused = true;
            self.cv.notify_all();
        }
    }

    /// Blocks while paused or parked. Returns false when the vCPU must end.
    fn wait_runnable(&self, fd: &Mutex<VcpuFd>) -> bool {
        let mut c = self.ctl.lock().unwrap();
        loop {
            match c.want {
                Want::Kill => {
                    c.exited = true;
                    self.cv.notify_all();
                    return false;
                }
                Want::Pause => {
                    if !c.paused {
                        // A vCPU that never ran has no instruction in flight, and its state may
                        // still be restored from elsewhere (a migration's destination).
                        if c.entered && !c.quiescent {
                            complete_pending_io(&mut fd.lock().unwrap());
                        }
                        c.paused = true;
                        self.cv.notify_all();
                    }
                }
                Want::Run => {
                    c.paused = false;
                    c.stand_by_until = None;
                    if !c.parked {
                        c.quiescent = false;
                        self.set_immediate_exit(0);
                        if !c.entered {
                            c.entered = true;
                            self.cv.notify_all();
                            drop(c);
                            // Whoever waits for this first entry (a migrated guest's start, whose
                            // answer ends the downtime) is often woken onto this very CPU: let it
                            // run before the guest takes the CPU for its first slice.
                            std::thread::yield_now();
                        }
                        return true;
                    }
                }
            }
            if let Some(until) = c.stand_by_until.filter(|_| c.want == Want::Pause) {
                // Standing by: spin until the next request (or the stand-by ends), then look again.
                let seen = self.requests.load(Ordering::Acquire);
                drop(c);
                spin_while(|| self.requests.load(Ordering::Acquire) == seen, until);
                c = self.ctl.lock().unwrap();
                if c.stand_by_until.is_some_and(|u| Instant::now() >= u) {
                    c.stand_by_until = None;
                }
                continue;
            }
            c = self.cv.wait(c).unwrap();
        }
    }
}

/// KVM finishes an in-flight PIO/MMIO instruction only on the next KVM_RUN; one with
/// immediate_exit set completes it and returns without running guest code, so the state read
/// after a pause is consistent.
fn complete_pending_io(fd: &mut VcpuFd) {
    fd.set_kvm_immediate_exit(1);
    let _ = fd.run();
}

/// Spawns the vCPU thread.
pub fn spawn(
    fd: SharedVcpuFd,
    ctl: Arc<VcpuControl>,
    vm: Arc<VmShared>,
) -> Result<std::thread::JoinHandle<()>> {
    use std::os::unix::thread::JoinHandleExt;
    install_kick_handler();
    let thread_ctl = ctl.clone();
    let handle = std::thread::Builder::new()
        .name(format!("vcpu{}", ctl.index))
        .spawn(move || {
            let _exit = ExitGuard {
                ctl: &thread_ctl,
                vm: &vm,
            };
            unblock_kick_signal();
            run_loop(&fd, &thread_ctl, &vm);
        })
        .map_err(|e| Error::io(Kind::Kvm, "spawning a vCPU thread", e))?;
    ctl.ctl.lock().unwrap().thread = Some(handle.as_pthread_t());
    Ok(handle)
}

/// However the thread ends (a panic included), it counts as stopped: a pause never waits for it.
struct ExitGuard<'a> {
    ctl: &'a VcpuControl,
    vm: &'a VmShared,
}

impl Drop for ExitGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.vm.record_failure(
                self.ctl.index,
                "the vCPU thread panicked".into(),
                Vec::new(),
            );
        }
        let mut c = self
            .ctl
            .ctl
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        c.exited = true;
        drop(c);
        self.ctl.cv.notify_all();
    }
}

fn unblock_kick_signal() {
    // SAFETY: plain sigset manipulation on a local set, then pthread_sigmask for this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

enum Outcome {
    Continue,
    Idle(u32),
    Request(LifecycleRequest),
    Error(String),
}

fn run_loop(fd: &Mutex<VcpuFd>, ctl: &VcpuControl, vm: &VmShared) {
    let mut idle_seq = 0u64;
    while ctl.wait_runnable(fd) {
        let outcome = {
            let mut fd = fd.lock().unwrap();
            let outcome = match fd.run() {
                Ok(exit) => handle_exit(exit, vm),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    Outcome::Continue
                }
                Err(e) => Outcome::Error(format!("KVM_RUN failed: {e}")),
            };
            if let Outcome::Error(reason) = outcome {
                // Registers are read while the exit is fresh, before the fd is let go.
                ctl.park();
                vm.record_error(ctl.index, reason, &mut fd);
                continue;
            }
            outcome
        };
        match outcome {
            Outcome::Continue | Outcome::Error(_) => {}
            Outcome::Idle(ms) => {
                // The idle port's OUT is finished before the sleep (one KVM_RUN that returns at
                // once), so a pause during the sleep needs nothing from this thread.
                complete_pending_io(&mut fd.lock().unwrap());
                ctl.fall_asleep();
                vm.gate
                    .sleep(&mut idle_seq, Duration::from_millis(ms as u64), || {
                        ctl.interrupted()
                    });
            }
            Outcome::Request(req) => {
                ctl.park();
                vm.request(req);
            }
        }
    }
}

fn device_outcome(action: DeviceAction) -> Outcome {
    match action {
        DeviceAction::None => Outcome::Continue,
        DeviceAction::Reset => Outcome::Request(LifecycleRequest::Reset),
        DeviceAction::Shutdown => Outcome::Request(LifecycleRequest::Shutdown),
    }
}

fn handle_exit(exit: VcpuExit, vm: &VmShared) -> Outcome {
    match exit {
        VcpuExit::IoIn(IDLE_PORT, data) => {
            let n = data.len().min(4);
            data[..n].copy_from_slice(&IDLE_SIGNATURE.to_le_bytes()[..n]);
            Outcome::Continue
        }
        VcpuExit::IoIn(port, data) => {
            vm.pio.read(port, data);
            Outcome::Continue
        }
        VcpuExit::IoOut(IDLE_PORT, data) => {
            let mut ms = [0u8; 4];
            ms[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
            Outcome::Idle(u32::from_le_bytes(ms))
        }
        VcpuExit::IoOut(WAKE_PORT, _) => {
            vm.gate.wake_all();
            Outcome::Continue
        }
        VcpuExit::IoOut(port, data) => device_outcome(vm.pio.write(port, data)),
        VcpuExit::MmioRead(addr, data) => {
            vm.mmio.read(addr, data);
            Outcome::Continue
        }
        VcpuExit::MmioWrite(addr, data) => device_outcome(vm.mmio.write(addr, data)),
        VcpuExit::Intr | VcpuExit::Hlt | VcpuExit::IoapicEoi(_) => Outcome::Continue,
        // A triple fault.
        VcpuExit::Shutdown => Outcome::Request(LifecycleRequest::Reset),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => {
            Outcome::Request(LifecycleRequest::Reset)
        }
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => {
            Outcome::Request(LifecycleRequest::Shutdown)
        }
        VcpuExit::SystemEvent(kind, _) => Outcome::Error(format!("system event {kind}")),
        VcpuExit::InternalError => Outcome::Error("internal error".into()),
        VcpuExit::FailEntry(reason, cpu) => Outcome::Error(format!(
            "failed entry (hardware reason {reason:#x}, cpu {cpu})"
        )),
        VcpuExit::Unknown => Outcome::Error("unknown exit".into()),
        other => Outcome::Error(format!("unhandled exit {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::tiny_vm;
    use crate::memory::GuestRam;

    #[test]
    fn wait_entered_returns_once_the_thread_is_let_into_kvm_run() {
        let ram = GuestRam::with_ranges(&[(0, 1 << 20)]).unwrap();
        let Some((_kvm, _vm, mut fd)) = tiny_vm(&ram, false) else {
            return;
        };
        let ctl = VcpuControl::new(0, &mut fd);
        let fd = Mutex::new(fd);
        // Not scheduled yet: the wait ends at its deadline, saying so.
        assert!(!ctl.wait_entered(Instant::now() + Duration::from_millis(20)));
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(30));
                assert!(ctl.wait_runnable(&fd));
            });
            assert!(ctl.wait_entered(Instant::now() + Duration::from_secs(30)));
        });
        assert_eq!(ctl.state(), "running");
    }
}
