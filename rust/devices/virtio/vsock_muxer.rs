//! The host side of virtio-vsock in Firecracker's and Cloud Hypervisor's hybrid design: one
//! listening unix socket at PATH, on which a host process writes `CONNECT <port>\n` to reach
//! guest port `port` (answered `OK <host port>\n` once the guest accepts); a guest connection to
//! host port P is a connect to the unix socket `PATH_P`. Host sockets are non-blocking, watched
//! by one epoll set that the device's worker thread waits on beside the queue kicks.
//!
//! Bounded: at most MAX_CONNECTIONS connections and handshakes together (the listener is not
//! watched while they are all taken), BUF_ALLOC held bytes per connection, MAX_ORPHAN_RSTS
//! answers to packets for unknown connections, CONNECT_LINE_MAX bytes of handshake; and in time:
//! a host client that has not finished its CONNECT line, or a guest that has not answered a
//! connection request, within CONNECT_TIMEOUT is dropped (a timerfd in the same epoll set), so
//! idle clients cannot hold every slot.

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::ReadVolatile;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::vsock_connection::{send, Connection, State, SHUTDOWN_RCV, SHUTDOWN_SEND};

pub const HOST_CID: u64 = 2;
pub const MAX_CONNECTIONS: usize = 64;
const MAX_ORPHAN_RSTS: usize = 64;
const CONNECT_LINE_MAX: usize = 32;
/// Host-side ports of host-initiated connections (what `OK <port>` names), as Firecracker.
const FIRST_HOST_PORT: u32 = 1 << 30;
const LISTENER: u64 = 0;
/// The epoll token of the timer (connection tokens count up from LISTENER + 1).
const TIMER: u64 = u64::MAX;
/// For a host client's CONNECT line, and for the guest's answer to a connection request (as
/// Firecracker's connection-request timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const EVENTS_PER_WAIT: usize = 64;

pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// A connection by its two ports: the host's (local) and the guest's (peer).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Key {
    host_port: u32,
    guest_port: u32,
}

/// An accepted host client that has not finished its CONNECT line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

pub struct Muxer {
    guest_cid: u64,
    path: String,
    listener: UnixListener,
    listening: bool,
    epoll: Epoll,
    conns: HashMap<Key, Connection>,
    by_token: HashMap<u64, Key>,
    handshakes: HashMap<u64, Handshake>,
    /// Connections owing the guest a packet, each at most once.
    rx_queue: VecDeque<Key>,
    /// RSTs owed for packets that named no connection.
    orphan_rsts: VecDeque<Key>,
    next_token: u64,
    next_host_port: u32,
    /// Host-initiated connections the guest has not answered yet, with their deadlines.
    connecting: HashMap<Key, Instant>,
    timer: TimerFd,
    timer_armed: bool,
    connect_timeout: Duration,
}

/// A non-blocking connect to the unix socket at `path`: refused at once when its backlog is
/// full, instead of blocking the device thread.
fn connect_nonblocking(path: &str) -> io::Result<UnixStream> {
    let c = CString::new(path).map_err(io::Error::other)?;
    let bytes = c.as_bytes_with_nul();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() > addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un of the size given.
    let rc = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// `CONNECT <port>` (a trailing \r tolerated) → the port.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text
        .strip_suffix('\r')
        .unwrap_or(text)
        .strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

impl Muxer {
    /// Serves host connections on `listener` (bound at `path` by the caller) for the guest with
    /// `guest_cid`.
    pub fn new(guest_cid: u64, path: String, listener: OwnedFd) -> io::Result<Muxer> {
        let listener = UnixListener::from(listener);
        listener.set_nonblocking(true)?;
        let mut m = Muxer {
            guest_cid,
            path,
            listener,
            listening: false,
            epoll: Epoll::new()?,
            conns: HashMap::new(),
            by_token: HashMap::new(),
            handshakes: HashMap::new(),
            rx_queue: VecDeque::new(),
            orphan_rsts: VecDeque::new(),
            next_token: LISTENER + 1,
            next_host_port: FIRST_HOST_PORT,
            connecting: HashMap::new(),
            timer: TimerFd::new()?,
            timer_armed: false,
            connect_timeout: CONNECT_TIMEOUT,
        };
        m.epoll.ctl(
            ControlOperation::Add,
            m.timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER),
        )?;
        m.refresh_listener();
        Ok(m)
    }

    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Every connection and handshake closed, nothing owed: a device reset, or host state
    /// that did not travel with a migration. The listener stays.
    pub fn reset(&mut self) {
        for (_, c) in self.conns.drain() {
            if !c.registered.is_empty() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    c.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        for (_, h) in self.handshakes.drain() {
            let _ = h.stream.shutdown(Shutdown::Both);
        }
        self.by_token.clear();
        self.rx_queue.clear();
        self.orphan_rsts.clear();
        self.connecting.clear();
        self.refresh_timer();
        self.refresh_listener();
    }

    /// The timer runs (ticking at a fraction of the timeout) while anything waits on a deadline.
    fn refresh_timer(&mut self) {
        let want = !self.handshakes.is_empty() || !self.connecting.is_empty();
        if want == self.timer_armed {
            return;
        }
        let tick = self.connect_timeout / 4;
        let armed = if want {
            self.timer.reset(tick, Some(tick))
        } else {
            self.timer.clear()
        };
        if armed.is_ok() {
            self.timer_armed = want;
        }
    }

    /// Drops the handshakes and guest answers whose time is up.
    fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(&t, _)| t)
            .collect();
        for token in late {
            let h = self.handshakes.remove(&token).expect("a handshake token");
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                h.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            let _ = h.stream.shutdown(Shutdown::Both);
        }
        let late: Vec<Key> = self
            .connecting
            .iter()
            .filter(|(_, &d)| d <= now)
            .map(|(&k, _)| k)
            .collect();
        for key in late {
            self.connecting.remove(&key);
            self.kill(key); // the client sees EOF, the guest a RST should it answer later
        }
        self.refresh_timer();
        self.refresh_listener();
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn refresh_listener(&mut self) {
        let want = self.conns.len() + self.handshakes.len() < MAX_CONNECTIONS;
        if want == self.listening {
            return;
        }
        let (op, ev) = if want {
            (
                ControlOperation::Add,
                EpollEvent::new(EventSet::IN, LISTENER),
            )
        } else {
            (ControlOperation::Delete, EpollEvent::default())
        };
        if self.epoll.ctl(op, self.listener.as_raw_fd(), ev).is_ok() {
            self.listening = want;
        }
    }

    /// Brings the epoll registration of a connection in line with what it waits for.
    fn refresh(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let want = c.interest();
        if want != c.registered {
            let fd = c.stream.as_raw_fd();
            let op = if want.is_empty() {
                ControlOperation::Delete
            } else if c.registered.is_empty() {
                ControlOperation::Add
            } else {
                ControlOperation::Modify
            };
            if self
                .epoll
                .ctl(op, fd, EpollEvent::new(want, c.token))
                .is_ok()
            {
                c.registered = want;
            }
        }
        if !c.queued && c.owes_packet() {
            c.queued = true;
            self.rx_queue.push_back(key);
        }
    }

    /// Ends a connection: the host socket is shut (its peer sees EOF), the guest gets a RST.
    fn kill(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            let _ = c.stream.shutdown(Shutdown::Both);
            c.owed = Default::default();
            c.owed.rst = true;
        }
        self.refresh(key);
    }

    /// Forgets a connection (its RST was sent, or the guest sent one).
    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            if !c.registered.is_empty() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    c.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            self.by_token.remove(&c.token);
        }
        if self.connecting.remove(&key).is_some() {
            self.refresh_timer();
        }
        self.refresh_listener();
    }

    fn orphan_rst(&mut self, key: Key) {
        if self.orphan_rsts.len() < MAX_ORPHAN_RSTS {
            self.orphan_rsts.push_back(key);
        }
    }

    // ---- the guest's packets (tx queue) ----------------------------------------------------

    /// One packet the guest sent.
    pub fn guest_packet<B: BitmapSlice>(&mut self, pkt: &VsockPacket<B>) {
        // Packets not from this guest, or not to the host, go nowhere: there is nothing else.
        if pkt.src_cid() != self.guest_cid || pkt.dst_cid() != HOST_CID {
            return;
        }
        let key = Key {
            host_port: pkt.dst_port(),
            guest_port: pkt.src_port(),
        };
        if pkt.type_() != TYPE_STREAM {
            if pkt.op() != OP_RST {
                self.orphan_rst(key);
            }
            return;
        }
        if pkt.op() == OP_REQUEST {
            self.guest_request(key);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if pkt.op() != OP_RST {
                self.orphan_rst(key);
            }
            return;
        };
        if c.owed.rst {
            return; // already over: its RST is on the way
        }
        c.update_peer_credit(pkt.buf_alloc(), pkt.fwd_cnt());
        match (pkt.op(), c.state) {
            (OP_RST, _) => {
                self.remove(key);
                return;
            }
            (OP_RESPONSE, State::Connecting) => {
                c.state = State::Established;
                self.connecting.remove(&key);
                let ok = format!("OK {}\n", key.host_port);
                // A fresh socket's send buffer holds a short line.
                if !matches!(send_all(&c.stream, ok.as_bytes()), Ok(true)) {
                    self.kill(key);
                    return;
                }
            }
            (OP_RW, State::Established) => {
                let data = pkt.data_slice();
                let r = match data {
                    Some(d) => c.receive_from_guest(d),
                    None => Ok(()),
                };
                if r.is_err() {
                    self.kill(key);
                    return;
                }
                if c.wants_credit_update() {
                    c.owed.credit_update = true;
                }
            }
            (OP_CREDIT_UPDATE, State::Established) => {}
            (OP_CREDIT_REQUEST, State::Established) => c.owed.credit_update = true,
            (OP_SHUTDOWN, State::Established) => {
                c.guest_shutdown |= pkt.flags() & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                let both = c.guest_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND;
                if both || (c.guest_shutdown & SHUTDOWN_SEND != 0 && c.host_eof) {
                    // Nothing more either way: what is held goes out if the socket takes it.
                    let _ = c.flush();
                    self.kill(key);
                    return;
                }
                if c.guest_shutdown & SHUTDOWN_SEND != 0 && c.all_flushed() {
                    let _ = c.stream.shutdown(Shutdown::Write);
                }
            }
            _ => {
                self.kill(key);
                return;
            }
        }
        self.refresh(key);
    }

    /// The guest connects to host port P: a unix socket connect to PATH_P.
    fn guest_request(&mut self, key: Key) {
        if self.conns.contains_key(&key) {
            self.kill(key); // a second REQUEST on a live connection: both ends start over
            return;
        }
        if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
            self.orphan_rst(key);
            return;
        }
        let Ok(stream) = connect_nonblocking(&format!("{}_{}", self.path, key.host_port)) else {
            self.orphan_rst(key);
            return;
        };
        let token = self.token();
        let mut c = Connection::new(stream, State::Established, token);
        c.owed.response = true;
        self.conns.insert(key, c);
        self.by_token.insert(token, key);
        self.refresh_listener();
        self.refresh(key);
    }

    // ---- host sockets ----------------------------------------------------------------------

    /// Handles what the host sockets have for us (no waiting).
    pub fn host_events(&mut self) {
        let mut events = [EpollEvent::default(); EVENTS_PER_WAIT];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        for ev in &events[..n] {
            let token = ev.data();
            let set = ev.event_set();
            if token == TIMER {
                let _ = self.timer.wait(); // it has expired: the read does not block
                self.expire();
            } else if token == LISTENER {
                self.accept();
            } else if self.handshakes.contains_key(&token) {
                self.handshake(token);
            } else if let Some(&key) = self.by_token.get(&token) {
                self.connection_event(key, set);
            }
        }
    }

    fn accept(&mut self) {
        while self.conns.len() + self.handshakes.len() < MAX_CONNECTIONS {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break, // EAGAIN, or an aborted client
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.token();
            let ev = EpollEvent::new(EventSet::IN, token);
            if self
                .epoll
                .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
                .is_err()
            {
                continue;
            }
            self.handshakes.insert(
                token,
                Handshake {
                    stream,
                    line: Vec::new(),
                    deadline: Instant::now() + self.connect_timeout,
                },
            );
        }
        self.refresh_timer();
        self.refresh_listener();
    }

    /// Reads a handshake's CONNECT line a byte at a time: what follows the newline is the
    /// connection's data and stays in the socket.
    fn handshake(&mut self, token: u64) {
        let h = self.handshakes.get_mut(&token).expect("a handshake token");
        let port = loop {
            let mut byte = [0u8; 1];
            match io::Read::read(&mut h.stream, &mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&h.line),
                Ok(1) if h.line.len() < CONNECT_LINE_MAX => h.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => break None, // EOF, an error, or a line too long
            }
        };
        let h = self.handshakes.remove(&token).expect("a handshake token");
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            h.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let Some(guest_port) = port else {
            self.refresh_timer();
            self.refresh_listener();
            return; // dropped: the client sees its socket closed
        };
        let host_port = self.free_host_port(guest_port);
        let key = Key {
            host_port,
            guest_port,
        };
        let mut c = Connection::new(h.stream, State::Connecting, token);
        c.owed.request = true;
        self.conns.insert(key, c);
        self.by_token.insert(token, key);
        self.connecting
            .insert(key, Instant::now() + self.connect_timeout);
        self.refresh(key);
        self.refresh_timer();
        self.refresh_listener();
    }

    fn free_host_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let port = self.next_host_port;
            self.next_host_port = self
                .next_host_port
                .checked_add(1)
                .unwrap_or(FIRST_HOST_PORT);
            let key = Key {
                host_port: port,
                guest_port,
            };
            if !self.conns.contains_key(&key) {
                return port;
            }
        }
    }

    fn connection_event(&mut self, key: Key, set: EventSet) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let trouble = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if c.registered.contains(EventSet::IN) && (set.contains(EventSet::IN) || trouble) {
            c.readable = true; // read (to EOF or EAGAIN) when an rx buffer is there
        }
        if c.registered.contains(EventSet::OUT) && (set.contains(EventSet::OUT) || trouble) {
            match c.flush() {
                Err(_) => {
                    self.kill(key);
                    return;
                }
                Ok(true) if c.guest_shutdown & SHUTDOWN_SEND != 0 => {
                    let _ = c.stream.shutdown(Shutdown::Write);
                }
                Ok(_) => {}
            }
            if c.wants_credit_update() {
                c.owed.credit_update = true;
            }
        }
        self.refresh(key);
    }

    // ---- packets for the guest (rx queue) ----------------------------------------------------

    pub fn has_rx(&self) -> bool {
        !self.orphan_rsts.is_empty() || !self.rx_queue.is_empty()
    }

    /// Writes the next packet owed to the guest into `pkt`; its used length, or None when
    /// nothing was owed after all (the buffer stays the guest's).
    pub fn fill_rx<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<B>) -> Option<u32> {
        if let Some(key) = self.orphan_rsts.pop_front() {
            self.header(pkt, key, OP_RST, 0, (0, 0));
            return Some(PKT_HEADER_SIZE as u32);
        }
        // Each queued connection once: one that cannot use this buffer queues itself again.
        for _ in 0..self.rx_queue.len() {
            let key = self.rx_queue.pop_front()?;
            if let Some(c) = self.conns.get_mut(&key) {
                c.queued = false;
            }
            let len = self.connection_packet(key, pkt);
            self.refresh(key);
            if len.is_some() {
                return len;
            }
        }
        None
    }

    fn header<B: BitmapSlice>(
        &self,
        pkt: &mut VsockPacket<B>,
        key: Key,
        op: u16,
        flags: u32,
        (buf_alloc, fwd_cnt): (u32, u32),
    ) {
        pkt.set_src_cid(HOST_CID)
            .set_dst_cid(self.guest_cid)
            .set_src_port(key.host_port)
            .set_dst_port(key.guest_port)
            .set_type(TYPE_STREAM)
            .set_op(op)
            .set_flags(flags)
            .set_len(0)
            .set_buf_alloc(buf_alloc)
            .set_fwd_cnt(fwd_cnt);
    }

    fn connection_packet<B: BitmapSlice>(
        &mut self,
        key: Key,
        pkt: &mut VsockPacket<B>,
    ) -> Option<u32> {
        let c = self.conns.get_mut(&key)?;
        let hdr = PKT_HEADER_SIZE as u32;
        let o = &mut c.owed;
        let (op, flags) = if o.rst {
            (OP_RST, 0)
        } else if std::mem::take(&mut o.request) {
            (OP_REQUEST, 0)
        } else if std::mem::take(&mut o.response) {
            (OP_RESPONSE, 0)
        } else if o.shutdown != 0 {
            (OP_SHUTDOWN, std::mem::take(&mut o.shutdown))
        } else if c.readable && c.can_send_data() {
            return self.data_packet(key, pkt);
        } else if c.owed.credit_update {
            (OP_CREDIT_UPDATE, 0)
        } else {
            return None;
        };
        let stamp = c.stamp();
        self.header(pkt, key, op, flags, stamp);
        if op == OP_RST {
            self.remove(key);
        }
        Some(hdr)
    }

    /// Reads host bytes straight into the guest's buffer, at most what the guest has room for.
    fn data_packet<B: BitmapSlice>(&mut self, key: Key, pkt: &mut VsockPacket<B>) -> Option<u32> {
        let c = self.conns.get_mut(&key)?;
        let room = pkt.data_slice().map_or(0, |d| d.len());
        let want = room.min(c.peer_credit() as usize);
        if want == 0 {
            return None; // a buffer without data room: only control packets fit
        }
        let mut dst = pkt.data_slice()?.subslice(0, want).ok()?;
        let read = (&c.stream).read_volatile(&mut dst);
        match read {
            Ok(0) => {
                c.host_eof = true;
                c.readable = false;
                if c.guest_shutdown & SHUTDOWN_SEND != 0 {
                    self.kill(key);
                } else {
                    c.owed.shutdown = SHUTDOWN_SEND;
                }
                self.connection_packet(key, pkt)
            }
            Ok(n) => {
                c.sent_to_guest(n as u32);
                let stamp = c.stamp();
                self.header(pkt, key, OP_RW, 0, stamp);
                pkt.set_len(n as u32);
                Some(PKT_HEADER_SIZE as u32 + n as u32)
            }
            Err(vm_memory::VolatileMemoryError::IOError(e))
                if e.kind() == io::ErrorKind::WouldBlock =>
            {
                c.readable = false;
                self.connection_packet(key, pkt)
            }
            Err(_) => {
                self.kill(key);
                self.connection_packet(key, pkt)
            }
        }
    }
}

/// Writes all of `data` if the socket takes it without blocking (Ok(false) when it would block).
fn send_all(stream: &UnixStream, data: &[u8]) -> io::Result<bool> {
    let mut off = 0;
    while off < data.len() {
        match send(stream.as_raw_fd(), data[off..].as_ptr(), data.len() - off) {
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

impl Drop for Muxer {
    /// The VM owned the listening socket: its path goes with it.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"connect 5",
            b"CONNECT 5 6",
            b"",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
    }

    /// Runs the muxer's host side until `done` holds (a 10 s bound, as a busy host may need).
    fn serve_until(m: &mut Muxer, mut done: impl FnMut(&Muxer) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(m) {
            assert!(
                Instant::now() < deadline,
                "the muxer did not get there in 10 s"
            );
            let mut p = libc::pollfd {
                fd: m.epoll_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the muxer's epoll fd, which outlives the call.
            unsafe { libc::poll(&mut p, 1, 100) };
            m.host_events();
        }
    }

    #[test]
    fn a_client_that_never_finishes_its_connect_line_is_dropped_in_time() {
        let dir = std::env::temp_dir().join(format!("vmmpy-vsock-{}-idle", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let listener = UnixListener::bind(&dir).unwrap();
        let mut m = Muxer::new(3, dir.to_str().unwrap().into(), listener.into()).unwrap();
        m.connect_timeout = Duration::from_millis(40);
        let mut idle = UnixStream::connect(&dir).unwrap();
        io::Write::write_all(&mut idle, b"CONNE").unwrap(); // and nothing more
        serve_until(&mut m, |m| m.handshakes.len() == 1);
        assert!(m.timer_armed);
        serve_until(&mut m, |m| m.handshakes.is_empty());
        let mut buf = [0u8; 8];
        assert_eq!(
            io::Read::read(&mut idle, &mut buf).unwrap(),
            0,
            "the client sees EOF"
        );
        assert!(!m.timer_armed, "nothing waits on a deadline any more");
        assert!(m.listening);
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn a_connection_the_guest_never_answers_is_reset_in_time() {
        let dir =
            std::env::temp_dir().join(format!("vmmpy-vsock-{}-unanswered", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let listener = UnixListener::bind(&dir).unwrap();
        let mut m = Muxer::new(3, dir.to_str().unwrap().into(), listener.into()).unwrap();
        m.connect_timeout = Duration::from_millis(40);
        let mut client = UnixStream::connect(&dir).unwrap();
        io::Write::write_all(&mut client, b"CONNECT 5000\n").unwrap();
        serve_until(&mut m, |m| m.connecting.len() == 1);
        serve_until(&mut m, |m| m.connecting.is_empty());
        let mut buf = [0u8; 8];
        assert_eq!(
            io::Read::read(&mut client, &mut buf).unwrap(),
            0,
            "the client sees EOF, no OK"
        );
        assert!(
            m.conns.values().all(|c| c.owed.rst),
            "the guest is owed a RST"
        );
        assert!(!m.timer_armed);
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn nonblocking_connect_is_refused_at_once_without_a_listener() {
        let path = std::env::temp_dir().join(format!("vmmpy-vsock-{}-none", std::process::id()));
        let e = connect_nonblocking(path.to_str().unwrap()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        let long = "x".repeat(200);
        let e = connect_nonblocking(&long).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
    }
}
