//! The paravirtual idle and wake ports. A vCPU that writes the idle port sleeps here, not in the
//! guest: guest supervisor code (HLT and its timer interrupt) is emulated and costly on PVM hosts.
//! Every wake bumps a sequence number, so a wake that lands just before a vCPU goes to sleep is
//! not lost: the vCPU sees a sequence it has not seen yet and returns at once.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

pub const IDLE_PORT: u16 = 0x5f0;
pub const WAKE_PORT: u16 = 0x5f4;
/// What a read of the idle port returns ("VMPY"): how the test guest tells vmmpy from a VMM
/// without the idle port (there an unclaimed port reads as all ones) and falls back to HLT.
pub const IDLE_SIGNATURE: u32 = 0x5950_4d56;
/// Upper bound on one idle sleep, whatever the guest asks.
pub const MAX_IDLE: Duration = Duration::from_millis(1000);

#[derive(Default)]
pub struct IdleGate {
    seq: Mutex<u64>,
    cv: Condvar,
}

impl IdleGate {
    /// Wakes every sleeping vCPU (guest wake port, serial input).
    pub fn wake_all(&self) {
        *self.seq.lock().unwrap() += 1;
        self.cv.notify_all();
    }

    /// Makes sleepers re-check their `interrupted` condition (pause, kill).
    pub fn notify(&self) {
        let _guard = self.seq.lock().unwrap();
        self.cv.notify_all();
    }

    pub fn sleep(&self, last_seen: &mut u64, timeout: Duration, interrupted: impl Fn() -> bool) {
        let deadline = Instant::now() + timeout.min(MAX_IDLE);
        let mut seq = self.seq.lock().unwrap();
        while *seq == *last_seen && !interrupted() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            seq = self.cv.wait_timeout(seq, deadline - now).unwrap().0;
        }
        *last_seen = *seq;
    }
}
