//! One thread per virtio device: it sleeps in poll(2) on the device's kick eventfds (written by
//! KVM on a notify-register write, never through userspace), its wake eventfd, the eventfd its
//! I/O engine signals completions on and its backend's fd (a tap, vsock's epoll over its host
//! sockets) when it has them, and serves the queues under the device lock, a batch (at most a
//! queue's size of chains) at a time. Pause is a handshake: the thread stops taking requests,
//! answers every one in flight (quiesce), then acknowledges and holds still, so nothing is in
//! flight while device state is captured.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::pci::VirtioPci;
use crate::error::{Error, Kind, Result};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

struct Ctl {
    want: Want,
    parked: bool,
}

pub struct Worker {
    ctl: Arc<(Mutex<Ctl>, Condvar)>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
    name: String,
}

impl Worker {
    /// Starts serving `dev`; with `paused`, the thread holds still until `resume`.
    pub fn spawn(
        name: String,
        dev: Arc<Mutex<VirtioPci>>,
        kicks: Vec<EventFd>,
        wake: EventFd,
        paused: bool,
    ) -> Result<Worker> {
        let want = if paused { Want::Pause } else { Want::Run };
        let ctl = Arc::new((
            Mutex::new(Ctl {
                want,
                parked: false,
            }),
            Condvar::new(),
        ));
        let thread_wake = wake
            .try_clone()
            .map_err(|e| Error::io(Kind::Kvm, "dup of a device eventfd", e))?;
        let done = dev
            .lock()
            .unwrap()
            .completion_event()
            .map_err(|e| Error::io(Kind::Kvm, "dup of a completion eventfd", e))?;
        let thread_ctl = ctl.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || run(&dev, &kicks, &thread_wake, done.as_ref(), &thread_ctl))
            .map_err(|e| Error::io(Kind::Kvm, "spawning a device thread", e))?;
        Ok(Worker {
            ctl,
            wake,
            thread: Some(thread),
            name,
        })
    }

    fn set(&self, want: Want) {
        let (lock, cv) = &*self.ctl;
        let mut c = lock.lock().unwrap();
        if c.want != Want::Stop {
            c.want = want;
        }
        drop(c);
        cv.notify_all();
        let _ = self.wake.write(1);
    }

    /// Asks the thread to hold still and waits until it does (every request answered).
    pub fn pause(&self, deadline: Instant) -> Result<()> {
        self.set(Want::Pause);
        let (lock, cv) = &*self.ctl;
        let mut c = lock.lock().unwrap();
        while !c.parked && self.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::new(
                    Kind::PauseTimeout,
                    format!("device thread {} did not finish its requests", self.name),
                ));
            }
            c = cv.wait_timeout(c, deadline - now).unwrap().0;
        }
        Ok(())
    }

    pub fn resume(&self) {
        self.set(Want::Run);
    }

    /// Ends and joins the thread. Idempotent.
    pub fn stop(&mut self) {
        self.set(Want::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Blocks while paused, after `quiesce` on the way in; false when the thread must end.
fn wait_runnable(ctl: &(Mutex<Ctl>, Condvar), mut quiesce: impl FnMut()) -> bool {
    let (lock, cv) = ctl;
    let mut c = lock.lock().unwrap();
    loop {
        match c.want {
            Want::Stop => return false,
            Want::Run => {
                c.parked = false;
                return true;
            }
            Want::Pause if !c.parked => {
                drop(c);
                quiesce();
                c = lock.lock().unwrap();
                if c.want != Want::Pause {
                    continue;
                }
                c.parked = true;
                cv.notify_all();
            }
            Want::Pause => {}
        }
        c = cv.wait(c).unwrap();
    }
}

/// A driver with one request in flight sends the next within microseconds of the answer. While
/// nothing is in flight, the thread looks for it for the device's `window` after its last
/// request with notifications off, so it costs the vCPU no exit (the kick) and this thread no
/// wake-up; with requests in flight their completions bring the thread back anyway, and it does
/// not spin.
fn poll_while_idle(dev: &Mutex<VirtioPci>, window: Duration) {
    let mut until = None;
    loop {
        let mut d = dev.lock().unwrap();
        let progress = d.poll_queues();
        let idle = d.in_flight() == 0;
        drop(d);
        let now = Instant::now();
        if progress {
            until = Some(now + window);
        }
        match until {
            Some(t) if idle && now < t => std::hint::spin_loop(),
            _ => return,
        }
    }
}

/// Answers every request in flight, taking no new ones; gives up when the thread must end (the
/// ring, dropped with the device, still waits for what storage has not finished).
fn quiesce(dev: &Mutex<VirtioPci>, done: Option<&EventFd>, ctl: &(Mutex<Ctl>, Condvar)) {
    while dev.lock().unwrap().complete_queues() > 0 {
        if ctl.0.lock().unwrap().want == Want::Stop {
            return;
        }
        let Some(done) = done else {
            return;
        };
        let mut p = libc::pollfd {
            fd: done.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: p is one valid pollfd for an eventfd this thread owns. The timeout only bounds
        // a wait the completion itself ends; the engine clears the eventfd when it reaps.
        unsafe { libc::poll(&mut p, 1, 100) };
    }
}

fn run(
    dev: &Mutex<VirtioPci>,
    kicks: &[EventFd],
    wake: &EventFd,
    done: Option<&EventFd>,
    ctl: &(Mutex<Ctl>, Condvar),
) {
    let pollin = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let events: Vec<&EventFd> = kicks.iter().chain([wake]).chain(done).collect();
    let mut fds: Vec<libc::pollfd> = events.iter().map(|e| pollin(e.as_raw_fd())).collect();
    let window = dev.lock().unwrap().idle_poll();
    // Serving before the first wait picks up requests a restored queue already holds.
    while wait_runnable(ctl, || quiesce(dev, done, ctl)) {
        if !window.is_zero() {
            poll_while_idle(dev, window);
        }
        let (more, backend) = {
            let mut d = dev.lock().unwrap();
            (d.process_queues(), d.backend_fd())
        };
        // The backend is polled only while the device can take its input; the device drains it
        // itself in process_queues.
        fds.truncate(events.len());
        fds.extend(backend.map(pollin));
        // A batch stopped at its cap: no waiting (the lock is free meanwhile, and a pause is seen
        // at the top of the loop), only the events that came are taken.
        let timeout = if more { 0 } else { -1 };
        // SAFETY: fds is a valid array of pollfd for fds this thread's caller keeps open (the
        // backend's belongs to the device, which the Arc keeps alive).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            continue; // EINTR
        }
        for (p, evt) in fds.iter_mut().zip(&events) {
            if p.revents & libc::POLLIN != 0 {
                let _ = evt.read();
            }
            p.revents = 0;
        }
    }
}
