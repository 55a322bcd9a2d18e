//! Ends what a stopped VM leaves behind, off the caller's thread.
//!
//! The last close of a KVM VM (its fd and its vCPU fds) destroys it in the kernel; on `kvm_pvm`
//! that takes 13–16 ms (`strace -T`), three quarters of a reboot, which builds the next VM right
//! away and need not wait for the old one to go. So a stopped VM hands its KVM objects and its
//! memory to one process-wide thread, which drops them in the order given. A VM's devices (taps,
//! disk images) are closed by the caller before that: the next VM may open them again.
//!
//! Bounded: while [`MAX_PENDING`] items wait, a caller blocks until one is done, so a guest that
//! reboots in a loop cannot pile up VMs. [`wait_idle`] waits until everything handed over is gone
//! (a VMM's close, tests counting fds).

use std::sync::mpsc::{self, Sender};
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Stopped VMs that may wait for the reaper at once.
pub const MAX_PENDING: usize = 2;

type Remains = Box<dyn Send>;

struct Reaper {
    tx: Mutex<Sender<Remains>>,
    pending: Mutex<usize>,
    changed: Condvar,
}

fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    REAPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Remains>();
        // The thread lives as long as the process: the static owns its sender.
        thread::Builder::new()
            .name("vm-reaper".into())
            .spawn(move || {
                for remains in rx {
                    drop(remains);
                    let r = reaper();
                    *r.pending.lock().unwrap() -= 1;
                    r.changed.notify_all();
                }
            })
            .expect("spawning the VM reaper thread");
        Reaper {
            tx: Mutex::new(tx),
            pending: Mutex::new(0),
            changed: Condvar::new(),
        }
    })
}

/// Drops `remains` on the reaper thread (in place if that thread is gone).
pub fn defer(remains: Remains) {
    let r = reaper();
    let mut pending = r.pending.lock().unwrap();
    while *pending >= MAX_PENDING {
        pending = r.changed.wait(pending).unwrap();
    }
    *pending += 1;
    drop(pending);
    if let Err(mpsc::SendError(remains)) = r.tx.lock().unwrap().send(remains) {
        drop(remains);
        *r.pending.lock().unwrap() -= 1;
        r.changed.notify_all();
    }
}

/// Waits until everything handed to [`defer`] is dropped; false if `timeout` passed first.
pub fn wait_idle(timeout: Duration) -> bool {
    let r = reaper();
    let deadline = Instant::now() + timeout;
    let mut pending = r.pending.lock().unwrap();
    while *pending > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        pending = r.changed.wait_timeout(pending, left).unwrap().0;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Slow(Arc<AtomicUsize>, Duration);

    impl Drop for Slow {
        fn drop(&mut self) {
            thread::sleep(self.1);
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn drops_off_the_callers_thread_and_waits_for_idle() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        defer(Box::new(Slow(dropped.clone(), Duration::from_millis(50))));
        assert!(
            t0.elapsed() < Duration::from_millis(40),
            "defer waited for the drop"
        );
        assert!(wait_idle(Duration::from_secs(10)));
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_full_queue_makes_the_caller_wait() {
        let dropped = Arc::new(AtomicUsize::new(0));
        for _ in 0..MAX_PENDING + 2 {
            defer(Box::new(Slow(dropped.clone(), Duration::from_millis(20))));
            assert!(*reaper().pending.lock().unwrap() <= MAX_PENDING);
        }
        assert!(wait_idle(Duration::from_secs(10)));
        assert_eq!(dropped.load(Ordering::SeqCst), MAX_PENDING + 2);
    }
}
