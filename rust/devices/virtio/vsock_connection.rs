//! One virtio-vsock stream connection between a guest port and a host unix socket: its state,
//! the control packets it owes the guest, and the credit accounting of virtio 1.2 §5.10.6.3 in
//! both directions (the guest never sends more than the buffer vmmpy advertises, vmmpy never
//! sends more than the guest's).

use std::collections::VecDeque;
use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::EventSet;

/// Guest bytes held per connection while the host socket does not take them: the buffer vmmpy
/// advertises (buf_alloc), so a guest that keeps to its credit never overruns it.
pub const BUF_ALLOC: u32 = 256 * 1024;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: the guest has (or is owed) a REQUEST and has not answered yet.
    Connecting,
    Established,
}

/// Control packets owed to the guest, sent in field order as rx buffers allow.
#[derive(Default)]
pub struct Owed {
    pub request: bool,
    pub response: bool,
    /// SHUTDOWN flags to send (0: none).
    pub shutdown: u32,
    pub credit_update: bool,
    /// The connection is over: RST, then it is forgotten.
    pub rst: bool,
}

pub struct Connection {
    pub stream: UnixStream,
    pub state: State,
    pub owed: Owed,
    /// epoll token, and the events registered for it (empty: not in the epoll set).
    pub token: u64,
    pub registered: EventSet,
    /// In the muxer's queue of connections owing the guest a packet.
    pub queued: bool,
    /// The host socket reported data that has not been read up to EAGAIN yet.
    pub readable: bool,
    /// The host will send no more (its read side gave EOF).
    pub host_eof: bool,
    /// SHUTDOWN flags the guest sent.
    pub guest_shutdown: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// Bytes received from the guest, and of those the ones the host socket took.
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    /// The fwd_cnt the guest last saw in a header.
    last_fwd_cnt_sent: Wrapping<u32>,
    pending: VecDeque<u8>,
}

/// send(2) with MSG_NOSIGNAL: a host peer that went away gives EPIPE, never SIGPIPE.
pub fn send(fd: RawFd, ptr: *const u8, len: usize) -> io::Result<usize> {
    // SAFETY: the callers pass a pointer valid for reads of `len` bytes (a slice or a
    // VolatileSlice's guard, held across the call); send only reads it.
    let n = unsafe { libc::send(fd, ptr.cast(), len, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl Connection {
    pub fn new(stream: UnixStream, state: State, token: u64) -> Connection {
        Connection {
            stream,
            state,
            owed: Owed::default(),
            token,
            registered: EventSet::empty(),
            queued: false,
            readable: false,
            host_eof: false,
            guest_shutdown: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            pending: VecDeque::new(),
        }
    }

    /// Every guest packet carries its receive buffer and how much of it it has consumed.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// Bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub fn sent_to_guest(&mut self, n: u32) {
        self.tx_cnt += n;
    }

    /// (buf_alloc, fwd_cnt) for a header to the guest, which then knows vmmpy's free space.
    pub fn stamp(&mut self) -> (u32, u32) {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.owed.credit_update = false;
        (BUF_ALLOC, self.fwd_cnt.0)
    }

    /// Data may go to the guest: established, the host not at EOF, the guest still receiving
    /// and with room.
    pub fn can_send_data(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    pub fn owes_packet(&self) -> bool {
        let o = &self.owed;
        o.rst
            || o.request
            || o.response
            || o.shutdown != 0
            || o.credit_update
            || (self.readable && self.can_send_data())
    }

    /// The host-socket events worth waiting for now.
    pub fn interest(&self) -> EventSet {
        if self.owed.rst {
            return EventSet::empty();
        }
        let mut e = EventSet::empty();
        if !self.readable && self.can_send_data() {
            e |= EventSet::IN;
        }
        if !self.pending.is_empty() {
            e |= EventSet::OUT;
        }
        e
    }

    /// Takes a RW packet's payload for the host socket: written at once as far as the socket
    /// takes it, the rest held. Err when the guest sent beyond the credit it was given.
    pub fn receive_from_guest<B: BitmapSlice>(
        &mut self,
        data: &VolatileSlice<B>,
    ) -> io::Result<()> {
        let len = data.len();
        let held = (self.rx_cnt - self.fwd_cnt).0 as usize;
        if held + len > BUF_ALLOC as usize {
            return Err(io::Error::other("the guest sent more than its credit"));
        }
        let mut written = 0;
        if self.pending.is_empty() {
            let guard = data.ptr_guard();
            written = match send(self.stream.as_raw_fd(), guard.as_ptr(), len) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
        }
        if written < len {
            let mut rest = vec![0u8; len - written];
            data.subslice(written, len - written)
                .map_err(io::Error::other)?
                .copy_to(&mut rest[..]);
            self.pending.extend(rest);
        }
        self.rx_cnt += len as u32;
        self.fwd_cnt += written as u32;
        Ok(())
    }

    /// Writes held guest bytes until the socket would block. Returns whether none are left.
    pub fn flush(&mut self) -> io::Result<bool> {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            match send(self.stream.as_raw_fd(), front.as_ptr(), front.len()) {
                Ok(n) => {
                    self.pending.drain(..n);
                    self.fwd_cnt += n as u32;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    pub fn all_flushed(&self) -> bool {
        self.pending.is_empty()
    }

    /// The guest thinks less than half the buffer is free while more is: tell it.
    pub fn wants_credit_update(&self) -> bool {
        let free_as_seen = BUF_ALLOC.saturating_sub((self.rx_cnt - self.last_fwd_cnt_sent).0);
        free_as_seen < BUF_ALLOC / 2 && self.fwd_cnt != self.last_fwd_cnt_sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(a, State::Established, 1), b)
    }

    #[test]
    fn peer_credit_follows_the_guests_counters() {
        let (mut c, _peer) = pair();
        assert_eq!(c.peer_credit(), 0);
        c.update_peer_credit(4096, 0);
        c.sent_to_guest(1000);
        assert_eq!(c.peer_credit(), 3096);
        c.sent_to_guest(4000);
        assert_eq!(
            c.peer_credit(),
            0,
            "more in flight than the buffer: no credit"
        );
        c.update_peer_credit(4096, 5000);
        assert_eq!(c.peer_credit(), 4096);
        // Counters wrap around u32.
        c.sent_to_guest(u32::MAX);
        c.update_peer_credit(4096, 5000u32.wrapping_add(u32::MAX) - 10);
        assert_eq!(c.peer_credit(), 4086);
    }

    #[test]
    fn guest_bytes_beyond_the_socket_are_held_then_flushed_and_credit_is_returned() {
        let (mut c, mut peer) = pair();
        let mut buf = vec![7u8; 64 * 1024];
        let mut total = 0usize;
        // The socket takes what fits in its buffer, BUF_ALLOC more are held, then no more.
        loop {
            // SAFETY: `buf` outlives the slice, and nothing else accesses it meanwhile.
            let slice = unsafe { VolatileSlice::new(buf.as_mut_ptr(), buf.len()) };
            if c.receive_from_guest(&slice).is_err() {
                break;
            }
            total += buf.len();
            assert!(c.pending.len() <= BUF_ALLOC as usize);
        }
        assert!(total >= BUF_ALLOC as usize && c.pending.len() > BUF_ALLOC as usize - buf.len());
        assert_eq!(
            c.interest(),
            EventSet::OUT,
            "no credit from the guest yet: no IN"
        );
        let mut got = 0usize;
        let mut sink = vec![0u8; 65536];
        while got < total {
            let _ = c.flush().unwrap();
            got += peer.read(&mut sink).unwrap();
        }
        assert!(c.flush().unwrap());
        assert_eq!(got, total);
        assert!(c.wants_credit_update());
        let (alloc, fwd) = c.stamp();
        assert_eq!((alloc, fwd as usize), (BUF_ALLOC, total));
        assert!(!c.wants_credit_update());
    }
}
