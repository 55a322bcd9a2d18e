//! Mutual TLS for tcp migration connections (docs/tls.md), with rustls (TLS 1.3 only, ring).
//!
//! A `TlsContext` is loaded once from a `tls_dir` with Cloud Hypervisor's file names: `ca-cert.pem`
//! on both sides; `client-cert.pem` + `client-key.pem` on the source, `server-cert.pem` +
//! `server-key.pem` on the destination. Each side checks the peer's certificate chain against the
//! CA; the source also checks that the destination's certificate names the host of its URL.
//!
//! A `TlsStream` owns a migration socket (its own duplicate) and the session on it. All bytes of
//! the connection pass through it: the small control messages and the Memory frames. rustls runs
//! the handshake and every peer check; the TLS 1.3 record layer after it is TlsStream's own, with
//! the secrets rustls hands over (see `TlsStream`). The socket stays blocking with SO_SNDTIMEO / SO_RCVTIMEO as the plaintext path
//! has them; the handshake has its own deadline, and so may a read (`read_exact_by`).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, NONCE_LEN};
use rustls::client::{ClientConfig, ClientConnectionData, UnbufferedClientConnection};
use rustls::crypto::{ring as ring_provider, CryptoProvider};
use rustls::kernel::KernelConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{
    ServerConfig, ServerConnectionData, UnbufferedServerConnection, WebPkiClientVerifier,
};
use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, RootCertStore};

use crate::error::{Error, Kind, Result};
use crate::transfer::would_block;

pub const CA_CERT: &str = "ca-cert.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";

/// Ciphertext buffer of a connection: records are built in it and sent in one call when it is full.
/// 2 MiB (measured against 128 KiB, 1 and 4 MiB): fewer, larger sends cut the TCP stack's work per
/// byte, and the records are still in the core's cache when the kernel copies them.
const SEND_BUFFER: usize = 2 << 20;
/// Read buffer: handshake bytes, then records that are not read straight into the caller's
/// buffer (small reads, the incomplete end of a batch); decrypted in place here.
const READ_BUFFER: usize = 128 << 10;
/// Handshake messages are small; a peer sending more than this before the handshake ends is refused.
const HANDSHAKE_BUFFER: usize = 64 << 10;

// TLS 1.3 record layer (RFC 8446 section 5).
const RECORD_HEADER: usize = 5;
const TAG: usize = 16;
/// Largest plaintext of one record (2^14).
const RECORD_PLAIN: usize = 1 << 14;
/// Largest ciphertext of one record (2^14 + 256).
const RECORD_CIPHER: usize = RECORD_PLAIN + 256;
/// Wire bytes of a full application-data record: header, 2^14 content bytes, type, tag.
const FULL_RECORD: usize = RECORD_HEADER + RECORD_PLAIN + 1 + TAG;
/// Full records' worth of bytes received with one call straight into the caller's buffer.
const BATCH_RECORDS: usize = 16;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The migration source: connects, presents client-cert.pem.
    Client,
    /// The migration destination: accepts, presents server-cert.pem.
    Server,
}

enum Config {
    Client(Arc<ClientConfig>),
    Server(Arc<ServerConfig>),
}

pub struct TlsContext {
    config: Config,
}

fn bad_dir(dir: &Path, what: impl std::fmt::Display) -> Error {
    Error::new(
        Kind::InvalidConfig,
        format!("tls_dir {}: {what}", dir.display()),
    )
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(Kind::Migration, format!("TLS {what}: {e}"))
}

/// AES-128-GCM first (the fastest with AES-NI), then AES-256-GCM; TLS 1.3 only.
fn provider() -> Arc<CryptoProvider> {
    let mut p = ring_provider::default_provider();
    p.cipher_suites = vec![
        ring_provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ring_provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(p)
}

fn certs(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>> {
    let path = dir.join(name);
    let certs = CertificateDer::pem_file_iter(&path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| bad_dir(dir, format!("{name}: {e}")))?;
    if certs.is_empty() {
        return Err(bad_dir(dir, format!("{name} holds no certificate")));
    }
    Ok(certs)
}

fn key(dir: &Path, name: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(dir.join(name)).map_err(|e| bad_dir(dir, format!("{name}: {e}")))
}

fn roots(dir: &Path) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for c in certs(dir, CA_CERT)? {
        roots
            .add(c)
            .map_err(|e| bad_dir(dir, format!("{CA_CERT}: {e}")))?;
    }
    Ok(Arc::new(roots))
}

impl TlsContext {
    /// Loads and checks the directory's files for `role`; any problem is an InvalidConfig.
    pub fn load(dir: &Path, role: Role) -> Result<Self> {
        if !dir.is_dir() {
            return Err(bad_dir(dir, "not a directory"));
        }
        let roots = roots(dir)?;
        let provider = provider();
        let builder = |what| bad_dir(dir, what);
        let config = match role {
            Role::Client => {
                let mut c = ClientConfig::builder_with_provider(provider)
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(builder)?
                    .with_root_certificates(roots)
                    .with_client_auth_cert(certs(dir, CLIENT_CERT)?, key(dir, CLIENT_KEY)?)
                    .map_err(|e| bad_dir(dir, format!("{CLIENT_CERT} / {CLIENT_KEY}: {e}")))?;
                c.enable_secret_extraction = true; // TlsStream's record layer takes over after the handshake
                Config::Client(Arc::new(c))
            }
            Role::Server => {
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| bad_dir(dir, format!("{CA_CERT}: {e}")))?;
                let mut c = ServerConfig::builder_with_provider(provider)
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(builder)?
                    .with_client_cert_verifier(verifier)
                    .with_single_cert(certs(dir, SERVER_CERT)?, key(dir, SERVER_KEY)?)
                    .map_err(|e| bad_dir(dir, format!("{SERVER_CERT} / {SERVER_KEY}: {e}")))?;
                c.send_tls13_tickets = 0; // every connection is a full, mutually checked handshake
                c.enable_secret_extraction = true;
                Config::Server(Arc::new(c))
            }
        };
        Ok(TlsContext { config })
    }

    /// Runs the handshake on `sock` (taking it over) within `timeout`. A client checks that the
    /// server's certificate names `server_name` (a DNS name or an IP address).
    pub fn handshake(
        &self,
        sock: OwnedFd,
        server_name: &str,
        timeout: Duration,
    ) -> Result<TlsStream> {
        let deadline = Instant::now() + timeout;
        match &self.config {
            Config::Client(c) => {
                let name = ServerName::try_from(server_name.to_owned()).map_err(|e| {
                    Error::new(
                        Kind::InvalidConfig,
                        format!("TLS server name {server_name:?}: {e}"),
                    )
                })?;
                let conn = UnbufferedClientConnection::new(c.clone(), name)
                    .map_err(|e| tls_err("session", e))?;
                drive_handshake(conn, sock, deadline)
            }
            Config::Server(c) => {
                let conn = UnbufferedServerConnection::new(c.clone())
                    .map_err(|e| tls_err("session", e))?;
                drive_handshake(conn, sock, deadline)
            }
        }
    }
}

/// `read`/`sendmsg` on the raw socket, errors with their errno (EAGAIN is handled by the caller).
struct Fd(RawFd);

impl Read for Fd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Write for Fd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reads of its length; MSG_NOSIGNAL: EPIPE, never SIGPIPE.
        let n = unsafe { libc::send(self.0, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Waits up to `deadline` for `events` on `fd`.
fn poll_until(fd: RawFd, events: libc::c_short, deadline: Instant, what: &str) -> Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error {
                kind: Kind::Migration,
                message: format!("{what} timed out"),
                errno: Some(libc::ETIMEDOUT),
            });
        }
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd that lives across the call.
        let rc = unsafe {
            libc::poll(
                &mut p,
                1,
                left.as_millis().clamp(1, i32::MAX as u128) as i32,
            )
        };
        if rc > 0 {
            return Ok(());
        }
        if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(Error::io(
                Kind::Migration,
                "poll",
                io::Error::last_os_error(),
            ));
        }
    }
}

/// Sends all of `data` during the handshake, each wait bounded by `deadline`.
fn send_by(fd: RawFd, mut data: &[u8], deadline: Instant) -> Result<()> {
    while !data.is_empty() {
        poll_until(fd, libc::POLLOUT, deadline, "the TLS handshake (sending)")?;
        match Fd(fd).write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
            Err(e) => return Err(Error::io(Kind::Migration, "TLS handshake", e)),
        }
    }
    Ok(())
}

/// The session after the handshake: rustls computes the next traffic secrets of a KeyUpdate.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn update_tx(&mut self) -> std::result::Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }

    fn update_rx(&mut self) -> std::result::Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }

    /// Records one key may protect (the suite's confidentiality limit).
    fn record_limit(&self) -> u64 {
        let suite = match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        };
        suite
            .tls13()
            .map_or(1 << 23, |s| s.common.confidentiality_limit)
    }
}

/// The client and server unbuffered connections, for the one handshake loop.
trait Handshaking {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn handshaking(&self) -> bool;
    fn into_kernel(self) -> std::result::Result<(ExtractedSecrets, Kernel), rustls::Error>;
}

impl Handshaking for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn handshaking(&self) -> bool {
        self.is_handshaking()
    }
    fn into_kernel(self) -> std::result::Result<(ExtractedSecrets, Kernel), rustls::Error> {
        self.dangerous_into_kernel_connection()
            .map(|(s, k)| (s, Kernel::Client(k)))
    }
}

impl Handshaking for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn handshaking(&self) -> bool {
        self.is_handshaking()
    }
    fn into_kernel(self) -> std::result::Result<(ExtractedSecrets, Kernel), rustls::Error> {
        self.dangerous_into_kernel_connection()
            .map(|(s, k)| (s, Kernel::Server(k)))
    }
}

/// What the handshake loop does after rustls has told its state.
enum Step {
    Again,
    Read,
    /// rustls would take application data: done once the handshake is.
    Ready,
    Fail(Error),
}

/// Runs rustls's handshake (certificates, peer checks: all rustls) until both sides have finished,
/// then takes the traffic secrets for the record layer of `TlsStream`. Bytes that came behind the
/// peer's Finished stay in the read buffer (undecrypted) or in `early` (application data rustls
/// decrypted already).
fn drive_handshake<H: Handshaking>(
    mut conn: H,
    sock: OwnedFd,
    deadline: Instant,
) -> Result<TlsStream> {
    let fd = sock.as_raw_fd();
    let mut inbuf = vec![0u8; READ_BUFFER].into_boxed_slice();
    let mut in_end = 0;
    let mut out = vec![0u8; HANDSHAKE_BUFFER];
    let mut out_len = 0;
    let mut early = Vec::new();
    loop {
        let UnbufferedStatus { discard, state } = conn.process(&mut inbuf[..in_end]);
        let step = match state {
            Err(e) => Step::Fail(tls_err("refused the connection", e)),
            Ok(ConnectionState::EncodeTlsData(mut d)) => match d.encode(&mut out[out_len..]) {
                Ok(n) => {
                    out_len += n;
                    Step::Again
                }
                Err(e) => Step::Fail(tls_err("handshake", format!("{e:?}"))),
            },
            Ok(ConnectionState::TransmitTlsData(t)) => {
                send_by(fd, &out[..out_len], deadline)?;
                out_len = 0;
                t.done();
                Step::Again
            }
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                while let Some(rec) = r.next_record() {
                    match rec {
                        Ok(rec) => early.extend_from_slice(rec.payload),
                        Err(e) => return Err(tls_err("receiving", e)),
                    }
                }
                Step::Again
            }
            Ok(ConnectionState::BlockedHandshake) => Step::Read,
            Ok(ConnectionState::WriteTraffic(_)) => Step::Ready,
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => Step::Fail(Error::new(
                Kind::Migration,
                "the migration peer closed the connection during the TLS handshake",
            )),
            Ok(other) => Step::Fail(tls_err("handshake", format!("unexpected state {other:?}"))),
        };
        inbuf.copy_within(discard..in_end, 0);
        in_end -= discard;
        match step {
            Step::Again => {}
            // A TLS 1.3 server may send once its Finished is out, but the client's certificate is
            // checked only with the client's Finished: until then, read on.
            Step::Ready if !conn.handshaking() => break,
            Step::Read | Step::Ready => {
                if in_end == inbuf.len() {
                    return Err(tls_err("handshake", "the peer sent more than a handshake"));
                }
                poll_until(
                    fd,
                    libc::POLLIN,
                    deadline,
                    "the TLS handshake (waiting for the peer)",
                )?;
                match Fd(fd).read(&mut inbuf[in_end..]) {
                    Ok(0) => {
                        return Err(Error::new(
                            Kind::Migration,
                            "the migration peer closed the connection during the TLS handshake",
                        ))
                    }
                    Ok(n) => in_end += n,
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
                    Err(e) => return Err(Error::io(Kind::Migration, "TLS handshake", e)),
                }
            }
            Step::Fail(e) => {
                send_alert(&mut conn, fd);
                return Err(e);
            }
        }
    }
    let (secrets, kernel) = conn.into_kernel().map_err(|e| tls_err("handshake", e))?;
    let key_update_at = kernel.record_limit();
    Ok(TlsStream {
        sock,
        kernel,
        tx: Keys::new(secrets.tx)?,
        rx: Keys::new(secrets.rx)?,
        key_update_at,
        update_requested: false,
        out: Vec::with_capacity(SEND_BUFFER),
        inbuf,
        in_pos: 0,
        in_end,
        plain: (0, 0),
        early,
        early_pos: 0,
        read_deadline: None,
    })
}

/// After a failed handshake: the alert rustls queued, telling the peer why (best effort, short).
fn send_alert<H: Handshaking>(conn: &mut H, fd: RawFd) {
    let mut buf = [0u8; 64];
    if let Ok(ConnectionState::EncodeTlsData(mut d)) = conn.process(&mut []).state {
        if let Ok(n) = d.encode(&mut buf) {
            let _ = send_by(fd, &buf[..n], Instant::now() + Duration::from_millis(200));
        }
    }
}

/// One direction's AEAD key, IV and record sequence number (RFC 8446 section 5.3).
struct Keys {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Self> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            _ => {
                return Err(tls_err(
                    "handshake",
                    "the peer chose a cipher suite that is not offered",
                ))
            }
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| tls_err("handshake", "bad traffic key"))?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| tls_err("handshake", "bad traffic IV"))?;
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The per-record nonce: the IV xor the sequence number; the number then moves on.
    fn next_nonce(&mut self) -> Nonce {
        let mut n = self.iv;
        for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Nonce::assume_unique_for_key(n)
    }
}

/// A migration connection after its mutual TLS handshake. rustls ran the handshake (and checked
/// the peer); the TLS 1.3 record layer is done here, so records are built straight from the
/// caller's buffers (guest memory) into one send buffer (one copy), and received and decrypted
/// in the caller's buffer (no copy; `read_records_into`) instead of rustls's three copies on the
/// receiving side. KeyUpdates go both ways with rustls computing the secrets; a rustls peer reads what this writes and vice versa.
pub struct TlsStream {
    sock: OwnedFd,
    kernel: Kernel,
    tx: Keys,
    rx: Keys,
    /// Sequence number at which the sending key is replaced (a KeyUpdate is sent first).
    key_update_at: u64,
    /// The peer's KeyUpdate asked for ours: sent before the next record.
    update_requested: bool,
    /// Records built but not yet sent.
    out: Vec<u8>,
    /// Socket bytes: `inbuf[in_pos..in_end]` not yet decrypted; `inbuf[plain.0..plain.1]` the
    /// decrypted, not yet taken content of the last record.
    inbuf: Box<[u8]>,
    in_pos: usize,
    in_end: usize,
    plain: (usize, usize),
    /// Application data rustls decrypted during the handshake, taken first.
    early: Vec<u8>,
    early_pos: usize,
    /// Set for one `read_exact_by`: each socket read waits only for what is left until then.
    read_deadline: Option<Instant>,
}

fn record_err(what: impl std::fmt::Display) -> Error {
    Error {
        kind: Kind::Migration,
        message: format!("TLS record: {what}"),
        errno: Some(libc::EBADMSG),
    }
}

impl TlsStream {
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Encrypts `content` (the rest of `out` from `start + RECORD_HEADER`) as one record of
    /// inner type `typ`.
    fn seal(&mut self, start: usize, typ: u8) -> Result<()> {
        self.out.push(typ);
        let len = self.out.len() - start - RECORD_HEADER + TAG;
        self.out[start..start + RECORD_HEADER].copy_from_slice(&[
            APPLICATION_DATA,
            3,
            3,
            (len >> 8) as u8,
            len as u8,
        ]);
        let aad: [u8; RECORD_HEADER] = self.out[start..start + RECORD_HEADER].try_into().unwrap();
        let nonce = self.tx.next_nonce();
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(
                nonce,
                Aad::from(aad),
                &mut self.out[start + RECORD_HEADER..],
            )
            .map_err(|_| tls_err("encrypt", "AEAD failure"))?;
        self.out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// A KeyUpdate under the current key, then the next key (from rustls) for what follows.
    fn key_update(&mut self) -> Result<()> {
        let start = self.out.len();
        self.out.extend_from_slice(&[0; RECORD_HEADER]);
        self.out.extend_from_slice(&[KEY_UPDATE, 0, 0, 1, 0]); // update_not_requested
        self.seal(start, HANDSHAKE)?;
        self.tx = Keys::new(
            self.kernel
                .update_tx()
                .map_err(|e| tls_err("key update", e))?,
        )?;
        self.update_requested = false;
        Ok(())
    }

    /// Sends every built record.
    fn send_out(&mut self) -> Result<()> {
        let fd = self.fd();
        let mut sent = 0;
        while sent < self.out.len() {
            match Fd(fd).write(&self.out[sent..]) {
                Ok(0) => {
                    return Err(Error::new(
                        Kind::Migration,
                        "sending over TLS: the connection accepts no more bytes",
                    ))
                }
                Ok(n) => sent += n,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN) => would_block(fd, libc::POLLOUT, "sending over TLS")?,
                    _ => return Err(Error::io(Kind::Migration, "sending over TLS", e)),
                },
            }
        }
        self.out.clear();
        Ok(())
    }

    /// Encrypts and sends all of `data`.
    pub fn write_all(&mut self, data: &[u8]) -> Result<()> {
        self.write_gather(&[data])
    }

    /// Encrypts and sends the bytes of `parts` in order; records span parts, so a frame's header,
    /// table and pages fill whole records.
    pub fn write_gather(&mut self, parts: &[&[u8]]) -> Result<()> {
        let (mut i, mut off) = (0, 0);
        loop {
            while i < parts.len() && off == parts[i].len() {
                (i, off) = (i + 1, 0);
            }
            if i == parts.len() {
                break;
            }
            // Room for a KeyUpdate record and one full record.
            if self.out.len() + 2 * RECORD_CIPHER > self.out.capacity().max(SEND_BUFFER) {
                self.send_out()?;
            }
            if self.update_requested || self.tx.seq + 1 >= self.key_update_at {
                self.key_update()?;
            }
            let start = self.out.len();
            self.out.extend_from_slice(&[0; RECORD_HEADER]);
            let mut room = RECORD_PLAIN;
            while room > 0 && i < parts.len() {
                let take = (parts[i].len() - off).min(room);
                self.out.extend_from_slice(&parts[i][off..off + take]);
                off += take;
                room -= take;
                if off == parts[i].len() {
                    (i, off) = (i + 1, 0);
                }
            }
            self.seal(start, APPLICATION_DATA)?;
        }
        self.send_out()
    }

    /// Reads until `inbuf[in_pos..]` holds `need` bytes, and no more: bytes after them (the next
    /// records of a Memory frame) are left in the socket for `read_records_into`. The stream
    /// ending is an error.
    fn fill_to(&mut self, need: usize) -> Result<()> {
        if self.in_pos + need > self.inbuf.len() {
            self.inbuf.copy_within(self.in_pos..self.in_end, 0);
            (self.in_pos, self.in_end) = (0, self.in_end - self.in_pos);
        }
        let fd = self.fd();
        while self.in_end - self.in_pos < need {
            self.wait_readable(fd)?;
            match Fd(fd).read(&mut self.inbuf[self.in_end..self.in_pos + need]) {
                Ok(0) => {
                    return Err(Error::new(
                        Kind::Migration,
                        "the migration peer closed the TLS connection",
                    ))
                }
                Ok(n) => self.in_end += n,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN) => would_block(fd, libc::POLLIN, "receiving over TLS")?,
                    _ => return Err(Error::io(Kind::Migration, "receiving over TLS", e)),
                },
            }
        }
        Ok(())
    }

    /// Reads and decrypts the next record into the read buffer; application data is then at
    /// `plain`.
    fn next_record(&mut self) -> Result<()> {
        self.fill_to(RECORD_HEADER)?;
        let h: [u8; RECORD_HEADER] = self.inbuf[self.in_pos..self.in_pos + RECORD_HEADER]
            .try_into()
            .unwrap();
        let len = record_len(h)?;
        self.fill_to(RECORD_HEADER + len)?;
        let body = self.in_pos + RECORD_HEADER;
        self.in_pos = body + len;
        let nonce = self.rx.next_nonce();
        let inner = self
            .rx
            .key
            .open_in_place(nonce, Aad::from(h), &mut self.inbuf[body..body + len])
            .map_err(|_| record_err("bad record MAC (corrupted or forged)"))?;
        let (typ, n) = inner_type(inner)?;
        if typ == APPLICATION_DATA {
            self.plain = (body, body + n);
            return Ok(());
        }
        self.control(typ, body..body + n)
    }

    /// A record that is not application data, its content at `content` in the read buffer.
    fn control(&mut self, typ: u8, content: std::ops::Range<usize>) -> Result<()> {
        match typ {
            HANDSHAKE => self.post_handshake(content),
            ALERT if self.inbuf[content.clone()] == [1, 0] => Err(Error::new(
                Kind::Migration,
                "the migration peer ended the TLS session",
            )),
            ALERT => Err(tls_err(
                "peer sent an alert",
                format!("{:02x?}", &self.inbuf[content]),
            )),
            _ => Err(record_err(format!("unexpected content type {typ}"))),
        }
    }

    /// Handshake messages after the handshake: KeyUpdate (and session tickets for a client, which
    /// rustls files; vmmpy's server sends none).
    fn post_handshake(&mut self, content: std::ops::Range<usize>) -> Result<()> {
        let mut msgs = &self.inbuf[content];
        while !msgs.is_empty() {
            let [typ, a, b, c, rest @ ..] = msgs else {
                return Err(record_err("truncated handshake message"));
            };
            let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
            if rest.len() < len {
                return Err(record_err("handshake message split across records"));
            }
            let (body, rest) = rest.split_at(len);
            match (*typ, &self.kernel) {
                (KEY_UPDATE, _) if len == 1 && body[0] <= 1 => {
                    if !rest.is_empty() {
                        return Err(record_err("data after a KeyUpdate in its record"));
                    }
                    self.update_requested |= body[0] == 1;
                    self.rx = Keys::new(
                        self.kernel
                            .update_rx()
                            .map_err(|e| tls_err("key update", e))?,
                    )?;
                    return Ok(());
                }
                (NEW_SESSION_TICKET, Kernel::Client(_)) => {
                    let body = body.to_vec();
                    if let Kernel::Client(k) = &mut self.kernel {
                        k.handle_new_session_ticket(&body)
                            .map_err(|e| tls_err("session ticket", e))?;
                    }
                }
                _ => return Err(record_err(format!("unexpected handshake message {typ}"))),
            }
            msgs = rest;
        }
        Ok(())
    }

    /// With nothing buffered: reads the next records (up to BATCH_RECORDS full ones' worth of
    /// bytes, all of which the peer must send for `dst` to fill) with one `recv(MSG_WAITALL)`
    /// straight into `dst`, and decrypts each there, its plaintext moved to the front behind the
    /// previous one's (`open_within`): no copy, one call per batch. A record that is not
    /// application data is handled from the read buffer; an incomplete last record goes there
    /// too and is finished the usual way. Returns the content bytes now at the front of `dst`;
    /// `dst`'s bytes after them are scratch, the caller's later bytes overwrite them.
    fn read_records_into(&mut self, dst: &mut [u8]) -> Result<usize> {
        debug_assert!(self.in_pos == self.in_end && self.early_pos == self.early.len());
        let want = (dst.len() / FULL_RECORD).min(BATCH_RECORDS) * FULL_RECORD;
        let fd = self.fd();
        // dst[..got]: received; from `pos` not yet decrypted; dst[..out]: content.
        let (mut got, mut pos, mut out) = (0, 0, 0);
        loop {
            while got - pos >= RECORD_HEADER {
                let h: [u8; RECORD_HEADER] = dst[pos..pos + RECORD_HEADER].try_into().unwrap();
                let end = pos + RECORD_HEADER + record_len(h)?;
                if end > got {
                    break;
                }
                let nonce = self.rx.next_nonce();
                let inner = self
                    .rx
                    .key
                    .open_within(
                        nonce,
                        Aad::from(h),
                        &mut dst[out..end],
                        pos + RECORD_HEADER - out..,
                    )
                    .map_err(|_| record_err("bad record MAC (corrupted or forged)"))?;
                let (typ, n) = inner_type(inner)?;
                pos = end;
                if typ == APPLICATION_DATA {
                    out += n;
                } else {
                    self.inbuf[..n].copy_from_slice(&dst[out..out + n]);
                    self.control(typ, 0..n)?;
                }
            }
            if got == want {
                // An incomplete record (or none): the read buffer holds it.
                let rest = got - pos;
                self.inbuf[..rest].copy_from_slice(&dst[pos..got]);
                (self.in_pos, self.in_end) = (0, rest);
                return Ok(out);
            }
            self.wait_readable(fd)?;
            // Under a deadline a read takes what is there, not all it wants.
            let flags = if self.read_deadline.is_some() {
                0
            } else {
                libc::MSG_WAITALL
            };
            // SAFETY: `dst[got..want]` is valid for writes of its length.
            let n =
                unsafe { libc::recv(fd, dst[got..want].as_mut_ptr().cast(), want - got, flags) };
            match n {
                0 => {
                    return Err(Error::new(
                        Kind::Migration,
                        "the migration peer closed the TLS connection",
                    ))
                }
                n if n > 0 => got += n as usize,
                _ => match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN) => would_block(fd, libc::POLLIN, "receiving over TLS")?,
                    _ => {
                        return Err(Error::io(
                            Kind::Migration,
                            "receiving over TLS",
                            io::Error::last_os_error(),
                        ))
                    }
                },
            }
        }
    }

    /// Under a read deadline: waits until `fd` is readable, at most until then.
    fn wait_readable(&self, fd: RawFd) -> Result<()> {
        match self.read_deadline {
            Some(deadline) => poll_until(fd, libc::POLLIN, deadline, "receiving over TLS"),
            None => Ok(()),
        }
    }

    /// `read_exact` with all of it done by `deadline` (None: each read has the socket's timeout),
    /// however the peer spreads its records.
    pub fn read_exact_by(&mut self, buf: &mut [u8], deadline: Option<Instant>) -> Result<()> {
        self.read_deadline = deadline;
        let r = self.read_exact(buf);
        self.read_deadline = None;
        r
    }

    /// Fills all of `buf` with decrypted bytes.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        let mut got = 0;
        if self.early_pos < self.early.len() {
            let n = (self.early.len() - self.early_pos).min(buf.len());
            buf[..n].copy_from_slice(&self.early[self.early_pos..self.early_pos + n]);
            self.early_pos += n;
            got = n;
        }
        while got < buf.len() {
            let (start, end) = self.plain;
            if start == end {
                if self.in_pos == self.in_end && buf.len() - got >= FULL_RECORD {
                    got += self.read_records_into(&mut buf[got..])?;
                } else {
                    self.next_record()?;
                }
                continue;
            }
            let n = (end - start).min(buf.len() - got);
            buf[got..got + n].copy_from_slice(&self.inbuf[start..start + n]);
            self.plain.0 += n;
            got += n;
        }
        Ok(())
    }
}

/// The ciphertext length (tag included) of a record with header `h`, checked.
fn record_len(h: [u8; RECORD_HEADER]) -> Result<usize> {
    let len = u16::from_be_bytes([h[3], h[4]]) as usize;
    if h[0] != APPLICATION_DATA || h[1] != 3 || len <= TAG || len > RECORD_CIPHER {
        return Err(record_err(format!("malformed header {h:02x?}")));
    }
    Ok(len)
}

/// The type and content length of a decrypted record: content, its type, zero padding.
fn inner_type(inner: &[u8]) -> Result<(u8, usize)> {
    match inner.iter().rposition(|&b| b != 0) {
        Some(t) => Ok((inner[t], t)),
        None => Err(record_err("no content type")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::make_tls_dir;

    fn tcp_pair() -> (OwnedFd, OwnedFd) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c.into(), s.into())
    }

    /// Client and server handshakes on two threads; the results of both.
    fn handshake(
        client_dir: &Path,
        server_dir: &Path,
        name: &str,
    ) -> (Result<TlsStream>, Result<TlsStream>) {
        let (c, s) = tcp_pair();
        let client = TlsContext::load(client_dir, Role::Client).unwrap();
        let server = TlsContext::load(server_dir, Role::Server).unwrap();
        let t = std::thread::spawn(move || server.handshake(s, "", Duration::from_secs(5)));
        let c = client.handshake(c, name, Duration::from_secs(5));
        (c, t.join().unwrap())
    }

    #[test]
    fn mutual_tls_roundtrip_and_refusals() {
        let a = make_tls_dir("a", "127.0.0.1");
        let b = make_tls_dir("b", "127.0.0.1");
        // Same CA: both sides accept; data goes both ways, large writes included.
        let (c, s) = handshake(&a, &a, "127.0.0.1");
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        let big: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i * 7) as u8).collect();
        let big2 = big.clone();
        let t = std::thread::spawn(move || {
            let mut got = vec![0u8; big2.len()];
            s.read_exact(&mut got).unwrap();
            assert!(got == big2);
            s.write_all(b"ok").unwrap();
            s
        });
        c.write_all(&big).unwrap();
        let mut ok = [0u8; 2];
        c.read_exact(&mut ok).unwrap();
        assert_eq!(&ok, b"ok");
        let s = t.join().unwrap();
        // The peer going away is an error for a reader.
        drop(s);
        assert!(c.read_exact(&mut ok).is_err());

        // The server's certificate is from another CA: the client refuses.
        let (c, _) = handshake(&a, &b, "127.0.0.1");
        assert!(c.is_err());
        // The client's certificate is from another CA: the server refuses before reading anything.
        let (_, s) = handshake(&b, &a, "127.0.0.1");
        let e = s.err().expect("server accepted a client of another CA");
        assert!(e.message.contains("TLS"), "{}", e.message);
        // The server's certificate does not name the host the client connected to.
        let (c, _) = handshake(&a, &a, "127.0.0.2");
        assert!(c.is_err());
        for d in [a, b] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn a_read_by_a_deadline_ends_there_however_the_peer_trickles() {
        let a = make_tls_dir("deadline", "127.0.0.1");
        for size in [100, 3 * FULL_RECORD] {
            let (c, s) = handshake(&a, &a, "127.0.0.1");
            let (mut c, mut s) = (c.unwrap(), s.unwrap());
            // A record every 100 ms, each one byte: every read finds something, soon.
            let writer = std::thread::spawn(move || {
                for _ in 0..20 {
                    if c.write_all(b"x").is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            let mut buf = vec![0u8; size];
            let deadline = Instant::now() + Duration::from_millis(300);
            let e = s.read_exact_by(&mut buf, Some(deadline)).unwrap_err();
            assert_eq!(e.errno, Some(libc::ETIMEDOUT), "{size}: {}", e.message);
            drop(s);
            writer.join().unwrap();
        }
        std::fs::remove_dir_all(a).unwrap();
    }

    /// A plain rustls peer (its own record layer) for `ctx`'s other side, on a thread: reads
    /// `data.len()` bytes and checks them, updates its keys, sends `data` back, then close_notify.
    fn rustls_peer(
        ctx: &TlsContext,
        sock: std::net::TcpStream,
        data: Vec<u8>,
    ) -> std::thread::JoinHandle<()> {
        fn run<C, S>(conn: C, sock: std::net::TcpStream, data: Vec<u8>)
        where
            C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
            S: rustls::SideData,
        {
            let mut s = rustls::StreamOwned::new(conn, sock);
            let mut got = vec![0u8; data.len()];
            s.read_exact(&mut got).unwrap();
            assert!(got == data, "rustls read other bytes than were written");
            s.conn.refresh_traffic_keys().unwrap();
            s.write_all(&data).unwrap();
            s.conn.send_close_notify();
            s.flush().unwrap();
        }
        match &ctx.config {
            Config::Client(c) => {
                let conn =
                    rustls::ClientConnection::new(c.clone(), "127.0.0.1".try_into().unwrap())
                        .unwrap();
                std::thread::spawn(move || run(conn, sock, data))
            }
            Config::Server(c) => {
                let conn = rustls::ServerConnection::new(c.clone()).unwrap();
                std::thread::spawn(move || run(conn, sock, data))
            }
        }
    }

    #[test]
    fn records_interoperate_with_rustls_both_ways_with_key_updates() {
        let dir = make_tls_dir("interop", "127.0.0.1");
        let client = TlsContext::load(&dir, Role::Client).unwrap();
        let server = TlsContext::load(&dir, Role::Server).unwrap();
        let data: Vec<u8> = (0..(1 << 20) + 12345)
            .map(|i| (i * 13 + i / 7) as u8)
            .collect();
        for ours_is_client in [true, false] {
            let (c, s) = tcp_pair();
            let (ours, theirs, sock, peer_sock) = if ours_is_client {
                (&client, &server, c, s)
            } else {
                (&server, &client, s, c)
            };
            let peer = rustls_peer(theirs, peer_sock.into(), data.clone());
            let mut t = ours
                .handshake(sock, "127.0.0.1", Duration::from_secs(5))
                .unwrap();
            t.key_update_at = t.tx.seq + 9; // a KeyUpdate every few records: rustls must follow them
            let (head, tail) = data.split_at(100);
            t.write_gather(&[head, &[], tail]).unwrap();
            // What rustls sends back (after its own KeyUpdate), read in odd pieces.
            // Read in odd pieces (through the read buffer), or at once (batches straight into
            // `back`, the KeyUpdate record among them).
            let mut back = vec![0u8; data.len()];
            let piece = if ours_is_client { 7777 } else { back.len() };
            for piece in back.chunks_mut(piece) {
                t.read_exact(piece).unwrap();
            }
            assert!(back == data, "our records decrypted to other bytes");
            let e = t.read_exact(&mut [0u8; 1]).unwrap_err();
            assert!(e.message.contains("ended the TLS session"), "{}", e.message);
            peer.join().unwrap();
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Feeds `bytes` to `t` through a fresh socket, three bytes per write (records split anywhere).
    fn trickle(t: &mut TlsStream, bytes: Vec<u8>) -> std::thread::JoinHandle<()> {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        t.sock = b.into();
        std::thread::spawn(move || {
            let mut a = a;
            for piece in bytes.chunks(3) {
                if a.write_all(piece).is_err() {
                    return;
                }
            }
        })
    }

    /// What `t`'s peer sent on `raw` (the socket under `t`), `n` bytes.
    fn ciphertext(raw: &mut std::net::TcpStream, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        raw.read_exact(&mut v).unwrap();
        v
    }

    #[test]
    fn split_records_are_read_and_a_forged_record_is_an_error() {
        let a = make_tls_dir("forge", "127.0.0.1");
        let (c, s) = handshake(&a, &a, "127.0.0.1");
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        let mut raw = std::net::TcpStream::from(s.sock.try_clone().unwrap());
        let msg: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        // 40000 bytes: three records (16384 + 16384 + 7232), 17 bytes of overhead plus a header each.
        let wire = msg.len() + 3 * (RECORD_HEADER + 1 + TAG);
        c.write_all(&msg).unwrap();
        let feeder = trickle(&mut s, ciphertext(&mut raw, wire));
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).unwrap();
        assert!(got == msg);
        feeder.join().unwrap();
        // The same again with one bit flipped in the second record: refused, no bytes of it.
        c.write_all(&msg).unwrap();
        let mut bytes = ciphertext(&mut raw, wire);
        bytes[RECORD_HEADER + 16384 + 1 + TAG + 100] ^= 4;
        let feeder = trickle(&mut s, bytes);
        let mut first = vec![0u8; 16384];
        s.read_exact(&mut first).unwrap();
        assert!(first[..] == msg[..16384]);
        let e = s.read_exact(&mut [0u8; 1]).unwrap_err();
        assert_eq!(
            (e.kind, e.errno),
            (Kind::Migration, Some(libc::EBADMSG)),
            "{}",
            e.message
        );
        assert!(e.message.contains("bad record MAC"), "{}", e.message);
        // SAFETY: shutdown of our own socket; the feeder then stops on EPIPE.
        unsafe { libc::shutdown(s.fd(), libc::SHUT_RDWR) };
        feeder.join().unwrap();
        // A flipped bit in a record read straight into the caller's buffer: refused the same way.
        c.write_all(&msg).unwrap();
        let mut bytes = ciphertext(&mut raw, wire);
        bytes[RECORD_HEADER + 5000] ^= 1;
        let feeder = trickle(&mut s, bytes);
        let e = s.read_exact(&mut got).unwrap_err();
        assert_eq!(e.errno, Some(libc::EBADMSG), "{}", e.message);
        // SAFETY: as above.
        unsafe { libc::shutdown(s.fd(), libc::SHUT_RDWR) };
        feeder.join().unwrap();
        let (c2, s2) = handshake(&a, &a, "127.0.0.1");
        (c, s) = (c2.unwrap(), s2.unwrap());
        raw = std::net::TcpStream::from(s.sock.try_clone().unwrap());
        // A stream that ends inside a record is an error too.
        c.write_all(&msg[..100]).unwrap();
        let bytes = ciphertext(&mut raw, 100 + RECORD_HEADER + 1 + TAG);
        let feeder = trickle(&mut s, bytes[..50].to_vec());
        assert!(s.read_exact(&mut [0u8; 100]).is_err());
        feeder.join().unwrap();
        std::fs::remove_dir_all(a).unwrap();
    }

    #[test]
    fn plaintext_peer_and_silent_peer_are_refused_in_time() {
        let a = make_tls_dir("p", "127.0.0.1");
        let server = TlsContext::load(&a, Role::Server).unwrap();
        // A plaintext migration header instead of a ClientHello.
        let (c, s) = tcp_pair();
        let mut c = std::net::TcpStream::from(c);
        c.write_all(&[1, 0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
        assert!(server.handshake(s, "", Duration::from_secs(5)).is_err());
        // A peer that sends nothing: the handshake deadline ends it.
        let (_c, s) = tcp_pair();
        let t = Instant::now();
        let e = server
            .handshake(s, "", Duration::from_millis(300))
            .err()
            .unwrap();
        assert_eq!(e.errno, Some(libc::ETIMEDOUT), "{}", e.message);
        assert!(t.elapsed() < Duration::from_secs(3));
        // Missing files are a config error naming the file.
        let e = TlsContext::load(&a.join("nope"), Role::Client)
            .err()
            .unwrap();
        assert_eq!(e.kind, Kind::InvalidConfig);
        std::fs::remove_file(a.join(CLIENT_KEY)).unwrap();
        let e = TlsContext::load(&a, Role::Client).err().unwrap();
        assert!(e.message.contains(CLIENT_KEY), "{}", e.message);
        assert!(TlsContext::load(&a, Role::Server).is_ok());
        std::fs::remove_dir_all(a).unwrap();
    }
}
