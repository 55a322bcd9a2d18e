//! Waiting awake for something due within microseconds: a bounded spin that yields the CPU each
//! turn. A thread asleep on a futex or in recv takes a wake-up across CPUs (tens of microseconds
//! on a nested host) when it comes; the yield lets a thread queued on the same CPU run meanwhile
//! (a plain spin held such a thread off for a whole time slice, 4–6 ms).

use std::time::Instant;

/// Spins while `busy()` holds, until `until` at the latest.
pub fn spin_while(mut busy: impl FnMut() -> bool, until: Instant) {
    while busy() && Instant::now() < until {
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ends_when_the_condition_goes_or_the_time_is_up() {
        let mut turns = 0;
        spin_while(
            || {
                turns += 1;
                turns < 3
            },
            Instant::now() + Duration::from_secs(60),
        );
        assert_eq!(turns, 3);
        spin_while(|| true, Instant::now()); // returns: the time is up
    }
}
