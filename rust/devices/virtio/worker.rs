//! One thread per virtio device: it sleeps in poll(2) on the device's kick eventfds (written by
//! KVM on a notify-register write, never through userspace), its wake eventfd and its backend's
//! fd when it has one (a tap, vsock's epoll over its host sockets), and serves the queues under
//! the device lock, a batch (at most a queue's size of chains) at a time. Pause is a handshake:
//! the thread finishes the batch it is in, then acknowledges and holds still, so nothing is in
//! flight while device state is captured.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

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
        let thread_ctl = ctl.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || run(&dev, &kicks, &thread_wake, &thread_ctl))
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

    /// Asks the thread to hold still and waits until it does (its batch done).
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

/// Blocks while paused; false when the thread must end.
fn wait_runnable(ctl: &(Mutex<Ctl>, Condvar)) -> bool {
    let (lock, cv) = ctl;
    let mut c = lock.lock().unwrap();
    loop {
        match c.want {
            Want::Stop => return false,
            Want::Run => {
                c.parked = false;
                return true;
            }
            Want::Pause => {
                if !c.parked {
                    c.parked = true;
                    cv.notify_all();
                }
            }
        }
        c = cv.wait(c).unwrap();
    }
}

fn run(dev: &Mutex<VirtioPci>, kicks: &[EventFd], wake: &EventFd, ctl: &(Mutex<Ctl>, Condvar)) {
    let pollin = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds: Vec<libc::pollfd> = kicks
        .iter()
        .chain([wake])
        .map(|e| pollin(e.as_raw_fd()))
        .collect();
    let eventfds = fds.len();
    // Serving before the first wait picks up requests a restored queue already holds.
    while wait_runnable(ctl) {
        let (more, backend) = {
            let mut d = dev.lock().unwrap();
            (d.process_queues(), d.backend_fd())
        };
        // The backend is polled only while the device can take its input; the device drains it
        // itself in process_queues.
        fds.truncate(eventfds);
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
        for (i, p) in fds[..eventfds].iter_mut().enumerate() {
            if p.revents & libc::POLLIN != 0 {
                let evt = kicks.get(i).unwrap_or(wake);
                let _ = evt.read();
            }
            p.revents = 0;
        }
    }
}
