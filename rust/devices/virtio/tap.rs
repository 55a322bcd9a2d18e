//! A host tap interface (Linux's tun driver in tap mode, no packet-information prefix): opened by
//! name through /dev/net/tun, creating it when it does not exist and this process may (its
//! address and netmask are then set, as Cloud Hypervisor does; an existing tap keeps its own), or
//! taken over from a descriptor an orchestrator opened. Non-blocking; no offloads, so the kernel
//! hands over whole, checksummed frames.

use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::error::{Error, Kind, Result};
use crate::fd::dup_owned;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
/// The virtio-net header (virtio 1.x, `num_buffers` included) a tap with IFF_VNET_HDR prefixes.
pub const VNET_HDR_LEN: usize = 12;

/// struct ifreq with the part of its union that is used here: flags, or a sockaddr_in.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn named(name: &str) -> IfReq {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }

    fn flags(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_flags(&mut self, flags: i16) {
        self.data[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    fn set_ipv4(&mut self, addr: Ipv4Addr) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[4..8].copy_from_slice(&addr.octets());
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// An ioctl taking an ifreq; the errno on failure.
fn ifreq_ioctl(fd: RawFd, request: libc::c_ulong, req: &mut IfReq) -> std::result::Result<(), i32> {
    // SAFETY: every request used here reads or writes at most a struct ifreq (40 bytes), which
    // `req` is, and `fd` is open for the call.
    let r = unsafe { libc::ioctl(fd, request, req as *mut IfReq) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(())
    }
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// TUNSETOFFLOAD: which offloads the kernel may hand over (none: whole, checksummed frames).
fn set_offload(fd: RawFd, flags: libc::c_uint) -> std::io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value, on a tun fd we own.
    check(unsafe { libc::ioctl(fd, TUNSETOFFLOAD, libc::c_ulong::from(flags)) })
}

/// TUNSETVNETHDRSZ: the size of the virtio-net header in front of each frame.
fn set_vnet_hdr_size(fd: RawFd, size: libc::c_int) -> std::io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at `size`.
    check(unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ, &size as *const libc::c_int) })
}

/// Makes `fd` non-blocking.
fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL on an open descriptor.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    check(fl)?;
    // SAFETY: F_SETFL on the same descriptor, with its own flags plus O_NONBLOCK.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) })
}

/// Whether the host has a network interface of this name.
fn interface_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// The interface address settings, through an AF_INET socket (the ioctls act on the interface by
/// name, whichever netns-local socket carries them).
fn configure_interface(name: &str, ip: Option<(Ipv4Addr, Ipv4Addr)>) -> Result<()> {
    // SAFETY: a plain socket(2) call; the result is checked and owned below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(Error::io(
            Kind::HostIo,
            "socket for tap set-up",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `s` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(s) };
    let fail = |what: &str, errno: i32| {
        Error::os(Kind::InvalidConfig, &format!("tap {name}: {what}"), errno)
    };
    if let Some((addr, mask)) = ip {
        let mut req = IfReq::named(name);
        req.set_ipv4(addr);
        ifreq_ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &mut req)
            .map_err(|e| fail("setting its address", e))?;
        let mut req = IfReq::named(name);
        req.set_ipv4(mask);
        ifreq_ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK, &mut req)
            .map_err(|e| fail("setting its netmask", e))?;
    }
    let mut req = IfReq::named(name);
    ifreq_ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req)
        .map_err(|e| fail("reading its flags", e))?;
    if req.flags() & libc::IFF_UP as i16 == 0 {
        req.set_flags(req.flags() | libc::IFF_UP as i16);
        ifreq_ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req)
            .map_err(|e| fail("bringing it up", e))?;
    }
    Ok(())
}

pub struct Tap {
    file: File,
    /// Frames come and go with a virtio-net header in front (VNET_HDR_LEN bytes) or bare (0).
    hdr_len: usize,
}

impl Tap {
    /// Opens the tap `name`; when it does not exist, creates it (needs CAP_NET_ADMIN) and gives it
    /// `ip` (address, netmask). The tap is brought up either way.
    pub fn open(name: &str, ip: Option<(Ipv4Addr, Ipv4Addr)>) -> Result<Tap> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', '\0', ' ']) {
            return Err(Error::new(
                Kind::InvalidConfig,
                format!(
                    "tap name {name:?}: 1 to {} bytes, no '/' or blanks",
                    libc::IFNAMSIZ - 1
                ),
            ));
        }
        let existed = interface_exists(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| {
                Error::io(
                    Kind::InvalidConfig,
                    &format!("tap {name}: opening /dev/net/tun"),
                    e,
                )
            })?;
        let mut req = IfReq::named(name);
        req.set_flags(IFF_TAP | IFF_NO_PI);
        if let Err(errno) = ifreq_ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) {
            let why = match errno {
                libc::EBUSY => "in use by another process".to_string(),
                libc::EPERM if existed => {
                    "not this process's to open (owner, or CAP_NET_ADMIN)".into()
                }
                libc::EPERM => {
                    "does not exist, and this process may not create it (CAP_NET_ADMIN)".into()
                }
                libc::EINVAL if existed => {
                    "not a tap device (or a multi-queue one, which vmmpy does not use)".into()
                }
                _ => "TUNSETIFF".into(),
            };
            return Err(Error::os(
                Kind::InvalidConfig,
                &format!("tap {name}: {why}"),
                errno,
            ));
        }
        set_offload(file.as_raw_fd(), 0).map_err(|e| {
            Error::io(
                Kind::InvalidConfig,
                &format!("tap {name}: TUNSETOFFLOAD"),
                e,
            )
        })?;
        configure_interface(name, if existed { None } else { ip })?;
        Ok(Tap { file, hdr_len: 0 })
    }

    /// Takes a duplicate of `fd`, which must be a tap (as an orchestrator opens it, with or
    /// without IFF_VNET_HDR); `fd` stays the caller's, open. The duplicate shares `fd`'s open
    /// file description, so what is set here is set for every holder of it (the caller, the
    /// orchestrator that passed it): O_NONBLOCK, the vnet header size (12, when the tap has
    /// IFF_VNET_HDR) and offloads off (TUNSETOFFLOAD 0).
    pub fn from_fd(fd: RawFd) -> Result<Tap> {
        let owned = dup_owned(fd, &format!("tap fd {fd}"))?;
        let mut req = IfReq::named("");
        ifreq_ioctl(owned.as_raw_fd(), TUNGETIFF, &mut req).map_err(|errno| {
            Error::os(Kind::InvalidConfig, &format!("fd {fd} is not a tap"), errno)
        })?;
        let flags = req.flags();
        if flags & IFF_TAP == 0 || flags & IFF_NO_PI == 0 {
            return Err(Error::new(
                Kind::InvalidConfig,
                format!("fd {fd}: a tun device or one with packet information, not a plain tap"),
            ));
        }
        let name = req.name();
        let file = File::from(owned);
        let what = |call: &str| format!("tap fd {fd} ({name}): {call}");
        set_nonblocking(file.as_raw_fd())
            .map_err(|e| Error::io(Kind::InvalidConfig, &what("O_NONBLOCK"), e))?;
        let hdr_len = if flags & IFF_VNET_HDR != 0 {
            set_vnet_hdr_size(file.as_raw_fd(), VNET_HDR_LEN as libc::c_int)
                .map_err(|e| Error::io(Kind::InvalidConfig, &what("TUNSETVNETHDRSZ"), e))?;
            VNET_HDR_LEN
        } else {
            0
        };
        set_offload(file.as_raw_fd(), 0)
            .map_err(|e| Error::io(Kind::InvalidConfig, &what("TUNSETOFFLOAD"), e))?;
        Ok(Tap { file, hdr_len })
    }

    /// Bytes of virtio-net header in front of each frame read or written (0 or VNET_HDR_LEN).
    pub fn hdr_len(&self) -> usize {
        self.hdr_len
    }

    /// One frame (with its header when hdr_len is not 0); WouldBlock when none is waiting.
    pub fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Sends one frame (with its header when hdr_len is not 0).
    pub fn write(&self, frame: &[u8]) -> std::io::Result<usize> {
        // SAFETY: `frame` is valid for reads of its length.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// For tests that create taps: moves the calling thread (each test has its own) into a new
/// network namespace, so that its taps and frames never reach the host's; false, with the
/// missing capability printed, when taps cannot be made here.
#[cfg(test)]
pub(crate) fn private_netns_for_taps() -> bool {
    // SAFETY: geteuid has no preconditions.
    if !std::path::Path::new("/dev/net/tun").exists() || unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: creating a tap needs /dev/net/tun and root");
        return false;
    }
    // SAFETY: unshare(2) with CLONE_NEWNET changes only the calling thread's network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = std::io::Error::last_os_error();
        eprintln!("skipped: a private network namespace for the test's taps: unshare: {e}");
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tap this test creates (in its thread's own network namespace); it goes away with the
    /// fd, since it is not made persistent.
    fn temp_name(tag: &str) -> String {
        format!("vt{}{tag}", std::process::id() % 100_000)
    }

    /// Whether the interface is there, in the calling thread's namespace (/sys/class/net shows
    /// the namespace sysfs was mounted in).
    fn has_interface(name: &str) -> bool {
        let name = std::ffi::CString::new(name).unwrap();
        // SAFETY: a NUL-terminated name.
        unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
    }

    #[test]
    fn names_that_cannot_be_interfaces_are_refused() {
        for bad in ["", "a/b", "sixteen-chars-xx", "a b"] {
            let e = Tap::open(bad, None).err().expect("refused");
            assert_eq!(e.kind, Kind::InvalidConfig, "{bad:?}: {}", e.message);
        }
    }

    #[test]
    fn a_non_tap_interface_is_refused_by_name() {
        if !private_netns_for_taps() {
            return;
        }
        let e = Tap::open("lo", None).err().expect("lo is no tap");
        assert!(e.message.contains("not a tap"), "{}", e.message);
    }

    #[test]
    fn created_tap_passes_frames_and_its_fd_can_be_taken_over() {
        if !private_netns_for_taps() {
            return;
        }
        let name = temp_name("a");
        let tap = Tap::open(&name, None).unwrap();
        assert_eq!(tap.hdr_len(), 0);
        assert!(has_interface(&name));
        // Nothing is waiting: a non-blocking read says so.
        let mut buf = [0u8; 2048];
        let e = tap.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        // An Ethernet frame written goes out (the kernel takes it).
        let mut frame = vec![0xffu8; 6];
        frame.extend([0x02, 0, 0, 0, 0, 1, 0x88, 0xb5]);
        frame.extend([0u8; 46]);
        assert_eq!(tap.write(&frame).unwrap(), frame.len());
        // The same tap through its descriptor, as an orchestrator would pass it.
        let other = Tap::from_fd(tap.as_raw_fd()).unwrap();
        assert_eq!(other.hdr_len(), 0);
        // A second open by name while it is attached is refused, by reason.
        let e = Tap::open(&name, None).err().expect("busy");
        assert!(e.message.contains("in use"), "{}", e.message);
    }

    #[test]
    fn an_fd_that_is_no_tap_is_refused() {
        let f = File::open("/dev/null").unwrap();
        let e = Tap::from_fd(f.as_raw_fd()).err().expect("refused");
        assert!(e.message.contains("not a tap"), "{}", e.message);
    }
}
