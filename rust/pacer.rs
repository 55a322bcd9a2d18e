//! `max_bandwidth` for outgoing migrations: one pacer shared by every connection of a migration,
//! so the cap holds for their sum (QEMU's `max-bandwidth`: bytes per second, 0 = unlimited). It
//! also measures the current send rate for `migration-progress`.
//!
//! Pacing is a virtual clock: every write of `n` bytes books the next `n / rate` seconds after the
//! previous booking (or after now, if the link fell behind: no credit is saved up) and sleeps until
//! its booking ends. Over a long transfer the rate is the cap, whatever the number of writers.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Kind, Result};

/// How long a write may book at once: writers cut their writes to `slice()` bytes so that a
/// cancel never waits longer than this, and the rate measurement stays smooth.
const SLICE_TIME: Duration = Duration::from_millis(50);
const SLICE_MIN: usize = 64 << 10;
/// The current rate is measured over windows of this length.
const RATE_WINDOW: Duration = Duration::from_millis(500);

struct Clock {
    /// When the last booking ends.
    next: Instant,
    cancelled: bool,
    window_start: Instant,
    window_bytes: u64,
    /// Bytes/s of the last complete window.
    rate: f64,
}

pub struct Pacer {
    /// Bytes per second; 0 = unlimited (only measured).
    limit: u64,
    clock: Mutex<Clock>,
    wake: Condvar,
}

impl Pacer {
    pub fn new(limit: u64) -> Self {
        let now = Instant::now();
        Pacer {
            limit,
            clock: Mutex::new(Clock {
                next: now,
                cancelled: false,
                window_start: now,
                window_bytes: 0,
                rate: 0.0,
            }),
            wake: Condvar::new(),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The most bytes one write should carry (`max` without a cap).
    pub fn slice(&self, max: usize) -> usize {
        if self.limit == 0 {
            return max;
        }
        let per_slice = (self.limit as f64 * SLICE_TIME.as_secs_f64()) as usize;
        per_slice.clamp(SLICE_MIN, max.max(SLICE_MIN)).min(max)
    }

    /// Accounts `n` bytes just written; with a cap, sleeps until they fit it. Fails once cancelled.
    pub fn take(&self, n: usize) -> Result<()> {
        let mut c = self.clock.lock().unwrap();
        if self.limit != 0 {
            let start = c.next.max(Instant::now());
            c.next = start + Duration::from_secs_f64(n as f64 / self.limit as f64);
            let until = c.next;
            loop {
                if c.cancelled {
                    return Err(Error::new(Kind::Migration, "migration cancelled"));
                }
                let now = Instant::now();
                if now >= until {
                    break;
                }
                c = self.wake.wait_timeout(c, until - now).unwrap().0;
            }
        }
        // Measured when the bytes are let through, so the rate shows what the cap allows.
        let now = Instant::now();
        c.window_bytes += n as u64;
        let elapsed = now - c.window_start;
        if elapsed >= RATE_WINDOW {
            c.rate = c.window_bytes as f64 / elapsed.as_secs_f64();
            c.window_start = now;
            c.window_bytes = 0;
        }
        Ok(())
    }

    /// Bytes/s sent recently (0 once nothing was sent for two windows).
    pub fn rate(&self) -> f64 {
        let c = self.clock.lock().unwrap();
        if c.window_start.elapsed() > 2 * RATE_WINDOW {
            return 0.0;
        }
        c.rate
    }

    /// Wakes every sleeping writer with an error; later writes fail at once.
    pub fn cancel(&self) {
        self.clock.lock().unwrap().cancelled = true;
        self.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn unlimited_only_measures() {
        let p = Pacer::new(0);
        assert_eq!(p.slice(4 << 20), 4 << 20);
        let t = Instant::now();
        for _ in 0..100 {
            p.take(1 << 20).unwrap();
        }
        assert!(t.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn cap_holds_for_the_sum_of_writers() {
        let limit = 8u64 << 20; // 8 MiB/s, 4 writers, 2 MiB each: 1 s
        let p = Arc::new(Pacer::new(limit));
        let slice = p.slice(4 << 20);
        assert_eq!(slice, (limit as f64 * 0.05) as usize);
        let t = Instant::now();
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let mut left = 2usize << 20;
                    while left > 0 {
                        let n = left.min(slice);
                        p.take(n).unwrap();
                        left -= n;
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let secs = t.elapsed().as_secs_f64();
        assert!(
            (0.95..1.3).contains(&secs),
            "8 MiB at 8 MiB/s took {secs} s"
        );
        let rate = p.rate();
        assert!(
            rate > limit as f64 * 0.8 && rate < limit as f64 * 1.2,
            "rate {rate}"
        );
    }

    #[test]
    fn cancel_wakes_a_sleeping_writer() {
        let p = Arc::new(Pacer::new(1 << 10)); // 1 KiB/s: a 64 KiB write books 64 s
        let p2 = p.clone();
        let t = Instant::now();
        let w = std::thread::spawn(move || p2.take(64 << 10));
        std::thread::sleep(Duration::from_millis(50));
        p.cancel();
        assert!(w.join().unwrap().is_err());
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(p.take(1).is_err());
    }
}
