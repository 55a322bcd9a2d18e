//! Mutual TLS for tcp migration connections (docs/tls.md), with rustls (TLS 1.3 only, ring).
//!
//! A `TlsContext` is loaded once from a `tls_dir` with Cloud Hypervisor's file names: `ca-cert.pem`
//! on both sides; `client-cert.pem` + `client-key.pem` on the source, `server-cert.pem` +
//! `server-key.pem` on the destination. Each side checks the peer's certificate chain against the
//! CA; the source also checks that the destination's certificate names the host of its URL.
//!
//! A `TlsStream` owns a migration socket (its own duplicate) and the session on it. All bytes of
//! the connection pass through it: the small control messages and the Memory frames, which
//! rust/transfer.rs encrypts straight from guest memory into rustls's records and decrypts into
//! guest memory. The socket stays blocking with SO_SNDTIMEO / SO_RCVTIMEO as the plaintext path
//! has them; only the handshake has its own deadline.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::ClientConfig;
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{ClientConnection, Connection, RootCertStore, ServerConnection};

use crate::error::{Error, Kind, Result};
use crate::transfer::would_block;

pub const CA_CERT: &str = "ca-cert.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";

/// Plaintext bytes handed to rustls at once; what it encrypts is then written out before more.
const WRITE_PIECE: usize = 1 << 20;
/// Encrypted bytes rustls may hold: one piece and its record overhead fit.
const SEND_BUFFER: usize = 2 * WRITE_PIECE;
/// Socket bytes read ahead of rustls per read call (rustls itself asks for at most one record).
const READ_AHEAD: usize = 1 << 20;

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
    Error::new(Kind::InvalidConfig, format!("tls_dir {}: {what}", dir.display()))
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(Kind::Migration, format!("TLS {what}: {e}"))
}

/// AES-128-GCM first (the fastest with AES-NI), then AES-256-GCM; TLS 1.3 only.
fn provider() -> Arc<CryptoProvider> {
    let mut p = ring::default_provider();
    p.cipher_suites = vec![ring::cipher_suite::TLS13_AES_128_GCM_SHA256, ring::cipher_suite::TLS13_AES_256_GCM_SHA384];
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
        roots.add(c).map_err(|e| bad_dir(dir, format!("{CA_CERT}: {e}")))?;
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
                let c = ClientConfig::builder_with_provider(provider)
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(builder)?
                    .with_root_certificates(roots)
                    .with_client_auth_cert(certs(dir, CLIENT_CERT)?, key(dir, CLIENT_KEY)?)
                    .map_err(|e| bad_dir(dir, format!("{CLIENT_CERT} / {CLIENT_KEY}: {e}")))?;
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
                Config::Server(Arc::new(c))
            }
        };
        Ok(TlsContext { config })
    }

    /// Runs the handshake on `sock` (taking it over) within `timeout`. A client checks that the
    /// server's certificate names `server_name` (a DNS name or an IP address).
    pub fn handshake(&self, sock: OwnedFd, server_name: &str, timeout: Duration) -> Result<TlsStream> {
        let conn: Connection = match &self.config {
            Config::Client(c) => {
                let name = ServerName::try_from(server_name.to_owned())
                    .map_err(|e| Error::new(Kind::InvalidConfig, format!("TLS server name {server_name:?}: {e}")))?;
                ClientConnection::new(c.clone(), name).map_err(|e| tls_err("session", e))?.into()
            }
            Config::Server(c) => ServerConnection::new(c.clone()).map_err(|e| tls_err("session", e))?.into(),
        };
        let mut s = TlsStream { conn, sock, inbuf: vec![0; READ_AHEAD].into_boxed_slice(), in_pos: 0, in_end: 0 };
        s.conn.set_buffer_limit(Some(SEND_BUFFER));
        s.handshake(Instant::now() + timeout)?;
        Ok(s)
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
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: msghdr is plain data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // IoSlice is guaranteed ABI compatible with iovec.
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len() as _;
        // SAFETY: the iovecs describe live, readable buffers; MSG_NOSIGNAL: EPIPE, never SIGPIPE.
        let n = unsafe { libc::sendmsg(self.0, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub struct TlsStream {
    conn: Connection,
    sock: OwnedFd,
    /// Socket bytes read but not yet taken by rustls: `inbuf[in_pos..in_end]`.
    inbuf: Box<[u8]>,
    in_pos: usize,
    in_end: usize,
}

/// Waits up to `deadline` for `events` on `fd`.
fn poll_until(fd: RawFd, events: libc::c_short, deadline: Instant, what: &str) -> Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error { kind: Kind::Migration, message: format!("TLS handshake timed out ({what})"), errno: Some(libc::ETIMEDOUT) });
        }
        let mut p = libc::pollfd { fd, events, revents: 0 };
        // SAFETY: one valid pollfd that lives across the call.
        let rc = unsafe { libc::poll(&mut p, 1, left.as_millis().clamp(1, i32::MAX as u128) as i32) };
        if rc > 0 {
            return Ok(());
        }
        if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(Error::io(Kind::Migration, "poll", io::Error::last_os_error()));
        }
    }
}

impl TlsStream {
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn handshake(&mut self, deadline: Instant) -> Result<()> {
        let fd = self.fd();
        while self.conn.is_handshaking() {
            if self.conn.wants_write() {
                poll_until(fd, libc::POLLOUT, deadline, "sending")?;
                self.write_tls()?;
            } else {
                poll_until(fd, libc::POLLIN, deadline, "waiting for the peer")?;
                self.fill().map_err(|e| Error { message: format!("TLS handshake: {}", e.message), ..e })?;
            }
        }
        while self.conn.wants_write() {
            poll_until(fd, libc::POLLOUT, deadline, "sending")?;
            self.write_tls()?;
        }
        Ok(())
    }

    /// One write of queued TLS records.
    fn write_tls(&mut self) -> Result<()> {
        let fd = self.fd();
        match self.conn.write_tls(&mut Fd(fd)) {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR) => Ok(()),
                Some(libc::EAGAIN) => would_block(fd, libc::POLLOUT, "sending over TLS"),
                _ => Err(Error::io(Kind::Migration, "sending over TLS", e)),
            },
        }
    }

    /// Writes out every queued TLS record.
    fn flush(&mut self) -> Result<()> {
        while self.conn.wants_write() {
            self.write_tls()?;
        }
        Ok(())
    }

    /// Reads more from the socket and lets rustls decrypt it. The stream ending is an error.
    fn fill(&mut self) -> Result<()> {
        if self.in_pos == self.in_end {
            let fd = self.fd();
            let n = loop {
                match Fd(fd).read(&mut self.inbuf) {
                    Ok(n) => break n,
                    Err(e) => match e.raw_os_error() {
                        Some(libc::EINTR) => continue,
                        Some(libc::EAGAIN) => would_block(fd, libc::POLLIN, "receiving over TLS")?,
                        _ => return Err(Error::io(Kind::Migration, "receiving over TLS", e)),
                    },
                }
            };
            if n == 0 {
                return Err(Error::new(Kind::Migration, "the migration peer closed the TLS connection"));
            }
            (self.in_pos, self.in_end) = (0, n);
        }
        let n = self
            .conn
            .read_tls(&mut &self.inbuf[self.in_pos..self.in_end])
            .map_err(|e| Error::io(Kind::Migration, "receiving over TLS", e))?;
        self.in_pos += n;
        if let Err(e) = self.conn.process_new_packets() {
            let _ = self.flush(); // the alert telling the peer why
            return Err(tls_err("refused the connection", e));
        }
        Ok(())
    }

    /// Encrypts and sends all of `data`.
    pub fn write_all(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let piece = data.len().min(WRITE_PIECE);
            let n = self.conn.writer().write(&data[..piece]).map_err(|e| Error::io(Kind::Migration, "TLS encrypt", e))?;
            data = &data[n..];
            self.flush()?;
        }
        Ok(())
    }

    /// Fills all of `buf` with decrypted bytes.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match self.conn.reader().read(&mut buf[got..]) {
                Ok(0) => return Err(Error::new(Kind::Migration, "the migration peer ended the TLS session")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.fill()?,
                Err(e) => return Err(Error::io(Kind::Migration, "receiving over TLS", e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    /// A CA and, signed by it, client and server certificates for `ip` in a fresh directory, made
    /// with the openssl CLI as docs/tls.md tells users to.
    pub fn make_tls_dir(name: &str, ip: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmmpy-tls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(&dir).output().expect("the openssl CLI");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
              "-subj", "/CN=vmmpy test CA", "-keyout", "ca-key.pem", "-out", "ca-cert.pem"]);
        let ext = format!("subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\n");
        std::fs::write(dir.join("ext.cnf"), ext).unwrap();
        for side in ["client", "server"] {
            let (key, csr, cert) = (format!("{side}-key.pem"), format!("{side}.csr"), format!("{side}-cert.pem"));
            run(&["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", &format!("/CN={side}"),
                  "-keyout", &key, "-out", &csr]);
            run(&["x509", "-req", "-in", &csr, "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
                  "-days", "2", "-extfile", "ext.cnf", "-out", &cert]);
        }
        dir
    }

    fn tcp_pair() -> (OwnedFd, OwnedFd) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c.into(), s.into())
    }

    /// Client and server handshakes on two threads; the results of both.
    fn handshake(client_dir: &Path, server_dir: &Path, name: &str) -> (Result<TlsStream>, Result<TlsStream>) {
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
    fn plaintext_peer_and_silent_peer_are_refused_in_time() {
        let a = make_tls_dir("p", "127.0.0.1");
        let server = TlsContext::load(&a, Role::Server).unwrap();
        // A plaintext migration header instead of a ClientHello.
        let (c, s) = tcp_pair();
        let mut c = std::net::TcpStream::from(c);
        c.write_all(&[1, 0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert!(server.handshake(s, "", Duration::from_secs(5)).is_err());
        // A peer that sends nothing: the handshake deadline ends it.
        let (_c, s) = tcp_pair();
        let t = Instant::now();
        let e = server.handshake(s, "", Duration::from_millis(300)).err().unwrap();
        assert_eq!(e.errno, Some(libc::ETIMEDOUT), "{}", e.message);
        assert!(t.elapsed() < Duration::from_secs(3));
        // Missing files are a config error naming the file.
        let e = TlsContext::load(&a.join("nope"), Role::Client).err().unwrap();
        assert_eq!(e.kind, Kind::InvalidConfig);
        std::fs::remove_file(a.join(CLIENT_KEY)).unwrap();
        let e = TlsContext::load(&a, Role::Client).err().unwrap();
        assert!(e.message.contains(CLIENT_KEY), "{}", e.message);
        assert!(TlsContext::load(&a, Role::Server).is_ok());
        std::fs::remove_dir_all(a).unwrap();
    }
}
