//! Migration hot-path measurements, a cargo bench (not part of the test suite):
//!
//!   cargo bench --bench migration                 # all of them
//!   cargo bench --bench migration -- tls aead     # those whose name contains a word given
//!
//! Each prints ratios against a baseline measured in the same run: this host is a nested,
//! page-table-based KVM (kvm_pvm), so absolute numbers say little (README: the host).

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;

use vmmpy_native::dirty::{self, DirtyLog};
use vmmpy_native::fixtures::{run_to_out, tiny_vm};
use vmmpy_native::memory::{GuestRam, PAGE_SIZE};
use vmmpy_native::ranges::RangeTable;
use vmmpy_native::transfer::{self, CHUNK_MAX};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// CPU time (user + system) of this process so far, all threads.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes one rusage into the zeroed struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `u` lives across the call.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) }, 0);
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// CPL3 at 0x2000: `mov dx,0x3f8 ; L0: out ; mov edi,START ; L: mov [rdi],eax ; add edi,STRIDE ;
/// cmp edi,END ; jb L ; jmp L0`: one store per STRIDE bytes from START to END per run.
fn dirtying_guest(ram: &GuestRam, start: u32, stride: u32, end: u32) {
    use vm_memory::{Bytes, GuestAddress};
    let mut c: Vec<u8> = vec![0x66, 0xba, 0xf8, 0x03, 0xee, 0xbf];
    c.extend(start.to_le_bytes());
    c.extend([0x89, 0x07, 0x81, 0xc7]);
    c.extend(stride.to_le_bytes());
    c.extend([0x81, 0xff]);
    c.extend(end.to_le_bytes());
    c.extend([0x72, (10i8 - 26) as u8, 0xeb, (4i8 - 28) as u8]);
    ram.mem.write_slice(&c, GuestAddress(0x2000)).unwrap();
}

/// kvm_floor.c's sequence on one slot: KVM_GET_DIRTY_LOG, popcount scan, KVM_CLEAR_DIRTY_LOG of
/// the whole slot with the bitmap it got. Returns (pages, get+scan+clear time).
fn floor_sync(vm: &VmFd, bitmap: &mut [u64], pages: u64) -> (u64, Duration) {
    let t0 = Instant::now();
    let log = kvm_dirty_log {
        slot: 0,
        padding1: 0,
        __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: the bitmap has a bit for every page of slot 0.
    assert!(unsafe { ioctl_with_ref(vm, dirty::KVM_GET_DIRTY_LOG(), &log) } >= 0);
    let n: u64 = bitmap.iter().map(|w| w.count_ones() as u64).sum();
    let clr = kvm_clear_dirty_log {
        slot: 0,
        num_pages: pages as u32,
        first_page: 0,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: as above; KVM only reads the bitmap.
    assert!(unsafe { ioctl_with_ref(vm, dirty::KVM_CLEAR_DIRTY_LOG(), &clr) } >= 0);
    (n, t0.elapsed())
}

fn dirty_sync() {
    let size = GIB;
    let ram = GuestRam::with_ranges(&[(0, size)]).unwrap();
    let Some((_kvm, vm, mut vcpu)) = tiny_vm(&ram, true) else {
        return;
    };
    let pages = size / PAGE_SIZE;
    let mut bitmap = vec![0u64; (pages / 64) as usize];
    println!("dirty sync, 1 GiB slot, manual protect (KVM_CLEAR_DIRTY_LOG), guest in CPL3 dirtying pages");
    for (label, stride) in [("1%", 100 * PAGE_SIZE as u32), ("100%", PAGE_SIZE as u32)] {
        dirtying_guest(&ram, 0x10_0000, stride, size as u32);
        run_to_out(&mut vcpu); // to the first `out`
        run_to_out(&mut vcpu); // touch every target page once (allocates the memfd pages)
        let mut log = DirtyLog::start(&vm, &ram, true).unwrap();
        let (mut ours, mut floor, mut touch) = (Vec::new(), Vec::new(), Vec::new());
        let mut counts = (0, 0);
        for round in 0..6 {
            let t0 = Instant::now();
            run_to_out(&mut vcpu);
            touch.push(ms(t0.elapsed()));
            if round % 2 == 0 {
                let t0 = Instant::now();
                let t = log.sync(&vm, &ram).unwrap();
                ours.push(ms(t0.elapsed()));
                counts.0 = t.total_bytes() / PAGE_SIZE;
            } else {
                let (n, d) = floor_sync(&vm, &mut bitmap, pages);
                floor.push(ms(d));
                counts.1 = n;
            }
        }
        let (o, f) = (median(ours), median(floor));
        println!(
            "  {label:>4}: pages {} / {}  DirtyLog::sync (GET+CLEAR+VMM bitmap+RangeTable) {o:.3} ms  floor (GET+popcount+CLEAR) {f:.3} ms  ratio {:.2}  (guest re-dirty {:.1} ms)",
            counts.0,
            counts.1,
            o / f,
            median(touch)
        );
        log.stop(&vm, &ram).unwrap();
    }

    // The parts that are ours, without KVM.
    let bm = vm_memory::bitmap::AtomicBitmap::new(
        GIB as usize,
        std::num::NonZeroUsize::new(4096).unwrap(),
    );
    let t0 = Instant::now();
    let n = 100;
    for _ in 0..n {
        std::hint::black_box(bm.get_and_reset());
    }
    println!(
        "  AtomicBitmap::get_and_reset, 1 GiB: {:.4} ms",
        ms(t0.elapsed()) / n as f64
    );
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let sparse: Vec<u64> = (0..pages / 64)
        .map(|_| {
            let mut w = 0;
            for b in 0..64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if x.is_multiple_of(100) {
                    w |= 1 << b;
                }
            }
            w
        })
        .collect();
    let full = vec![u64::MAX; (pages / 64) as usize];
    for (label, b) in [("1% random", &sparse), ("100%", &full)] {
        let t0 = Instant::now();
        let mut r = 0;
        for _ in 0..n {
            r += RangeTable::from_bitmap(std::hint::black_box(b), 0).len();
        }
        println!(
            "  RangeTable::from_bitmap 1 GiB {label}: {:.4} ms ({} ranges)",
            ms(t0.elapsed()) / n as f64,
            r / n
        );
    }
    let t0 = Instant::now();
    let t = dirty::all_ram(&ram);
    println!(
        "  all_ram on this guest (touched {} MiB): {:.3} ms",
        t.total_bytes() / MIB,
        ms(t0.elapsed())
    );
    let idle = GuestRam::with_ranges(&[(0, GIB)]).unwrap();
    use vm_memory::{Bytes, GuestAddress};
    idle.mem
        .write_slice(&[1u8; 1 << 20], GuestAddress(0x10_0000))
        .unwrap();
    let t0 = Instant::now();
    let t = dirty::all_ram(&idle);
    println!(
        "  all_ram on an idle 1 GiB guest (1 MiB written): {:.3} ms, {} range(s), {} KiB",
        ms(t0.elapsed()),
        t.len(),
        t.total_bytes() >> 10
    );
}

fn fill_random(ram: &GuestRam) {
    for (_, host, size) in ram.regions() {
        // SAFETY: host..host+size is the live mapping of a region of `ram`, not shared with a guest.
        let words =
            unsafe { std::slice::from_raw_parts_mut(host as *mut u64, (size / 8) as usize) };
        let mut x = 0x1234_5678_9abc_def1u64;
        for w in words {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *w = x | 1;
        }
    }
}

fn read_exact(fd: RawFd, buf: &mut [u8]) -> bool {
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: reads into the unfilled tail of `buf`.
        let n = unsafe { libc::read(fd, buf[off..].as_mut_ptr().cast(), buf.len() - off) };
        if n <= 0 {
            return false;
        }
        off += n as usize;
    }
    true
}

/// Receiver that drains Memory frames into a scratch buffer (no guest memory): measures the sender.
fn drain_frames(fd: RawFd) -> u64 {
    let mut buf = vec![0u8; 4 << 20];
    let mut total = 0;
    let mut h = [0u8; 16];
    while read_exact(fd, &mut h) {
        let len = u64::from_le_bytes(h[8..16].try_into().unwrap()) as usize;
        let mut table = vec![0u8; len];
        assert!(read_exact(fd, &mut table));
        let mut data: u64 = table
            .chunks(16)
            .filter(|e| {
                u32::from_le_bytes(e[12..16].try_into().unwrap()) & transfer::FLAG_ZERO == 0
            })
            .map(|e| u32::from_le_bytes(e[8..12].try_into().unwrap()) as u64)
            .sum();
        total += data;
        while data > 0 {
            let n = data.min(buf.len() as u64) as usize;
            assert!(read_exact(fd, &mut buf[..n]));
            data -= n as u64;
        }
    }
    total
}

/// Receiver that applies Memory frames to `dst` with recv_memory.
fn recv_frames(fd: RawFd, dst: &GuestRam) -> u64 {
    let mut total = 0;
    let mut h = [0u8; 16];
    while read_exact(fd, &mut h) {
        let s = transfer::recv_memory(
            transfer::Link::Plain(fd),
            dst,
            u64::from_le_bytes(h[8..16].try_into().unwrap()),
        )
        .unwrap();
        total += s.bytes_received;
    }
    total
}

/// Baseline: write() the same number of bytes from one 4 MiB buffer; the receiver read()s them.
fn plain_write(fd: RawFd, bytes: u64) {
    let buf = vec![0x5au8; 4 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        let mut off = 0;
        while off < n {
            // SAFETY: writes from the initialised prefix of `buf`.
            let w = unsafe { libc::write(fd, buf[off..n].as_ptr().cast(), n - off) };
            assert!(w > 0);
            off += w as usize;
        }
        left -= n as u64;
    }
}

fn plain_drain(fd: RawFd) -> u64 {
    let mut buf = vec![0u8; 4 << 20];
    let mut total = 0;
    loop {
        // SAFETY: reads into `buf`.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return total;
        }
        total += n as u64;
    }
}

#[derive(Clone, Copy)]
enum Link {
    Tcp,
    Unix,
}

#[derive(Clone, Copy, PartialEq)]
enum Opts {
    Default,
    NoDelay,
    Tuned,
}

fn connect(link: Link, opts: Opts) -> (OwnedFd, OwnedFd) {
    let (a, b): (OwnedFd, OwnedFd) = match link {
        Link::Tcp => {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, _) = l.accept().unwrap();
            if opts == Opts::NoDelay {
                c.set_nodelay(true).unwrap();
                s.set_nodelay(true).unwrap();
            }
            (c.into(), s.into())
        }
        Link::Unix => {
            let mut fds = [0; 2];
            // SAFETY: `fds` has room for two descriptors.
            let rc = unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr(),
                )
            };
            assert_eq!(rc, 0);
            // SAFETY: fresh descriptors owned by nobody else.
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
        }
    };
    if opts == Opts::Tuned {
        transfer::tune_socket(a.as_raw_fd()).unwrap();
        transfer::tune_socket(b.as_raw_fd()).unwrap();
    }
    (a, b)
}

/// GB/s of sending `bytes` with `send` while `recv` consumes on another thread.
fn run_pair(
    link: Link,
    opts: Opts,
    send: impl FnOnce(RawFd) + Send,
    recv: impl FnOnce(RawFd) -> u64 + Send,
    bytes: u64,
) -> f64 {
    let (a, b) = connect(link, opts);
    std::thread::scope(|s| {
        let r = s.spawn(move || recv(b.as_raw_fd()));
        let t0 = Instant::now();
        send(a.as_raw_fd());
        drop(a);
        let got = r.join().unwrap();
        let dt = t0.elapsed();
        assert_eq!(got, bytes);
        bytes as f64 / dt.as_secs_f64() / 1e9
    })
}

fn send_memory() {
    let src = GuestRam::with_ranges(&[(0, GIB)]).unwrap();
    fill_random(&src);
    let chunks = dirty::all_ram(&src).split(CHUNK_MAX);
    let bytes = GIB;
    let send_all = |src: &Arc<GuestRam>| {
        let src = src.clone();
        let chunks = chunks.clone();
        move |fd: RawFd| {
            for c in &chunks {
                transfer::send_memory(transfer::Link::Plain(fd), &src, c, None).unwrap();
            }
        }
    };
    let reps = 5;
    println!("send_memory, 1 GiB of non-zero pages in {} frames of {} MiB; GB/s median [min-max] of {reps} interleaved runs", chunks.len(), CHUNK_MAX / MIB);
    let dst = GuestRam::with_ranges(&[(0, GIB)]).unwrap();
    let (_, src_host, src_size) = src.regions()[0];
    let write_mapping = move |fd: RawFd| {
        let mut off = 0;
        while off < src_size {
            let n = (src_size - off).min(4 << 20);
            // SAFETY: reads the live source mapping.
            let w = unsafe { libc::write(fd, (src_host + off) as *const libc::c_void, n as usize) };
            assert!(w > 0);
            off += w as u64;
        }
    };
    let variants = [
        ("tcp, default options", Link::Tcp, Opts::Default),
        ("tcp, TCP_NODELAY only", Link::Tcp, Opts::NoDelay),
        ("tcp, tune_socket", Link::Tcp, Opts::Tuned),
        ("unix, default options", Link::Unix, Opts::Default),
        ("unix, tune_socket", Link::Unix, Opts::Tuned),
    ];
    let show = |v: &Vec<f64>| {
        let lo = v.iter().cloned().fold(f64::MAX, f64::min);
        let hi = v.iter().cloned().fold(0.0, f64::max);
        format!("{:.2} [{lo:.2}-{hi:.2}]", median(v.clone()))
    };
    for (name, link, opts) in variants {
        let (mut hot, mut cold, mut ours, mut e2e) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            hot.push(run_pair(
                link,
                opts,
                |fd| plain_write(fd, bytes),
                plain_drain,
                bytes,
            ));
            cold.push(run_pair(link, opts, write_mapping, plain_drain, bytes));
            ours.push(run_pair(link, opts, send_all(&src), drain_frames, bytes));
            e2e.push(run_pair(
                link,
                opts,
                send_all(&src),
                |fd| recv_frames(fd, &dst),
                bytes,
            ));
        }
        let (h, c, o, e) = (
            median(hot.clone()),
            median(cold.clone()),
            median(ours.clone()),
            median(e2e.clone()),
        );
        println!("  {name}:");
        println!(
            "    plain write() from one 4 MiB buffer → read(): {}",
            show(&hot)
        );
        println!(
            "    plain write() of the guest mapping  → read(): {}",
            show(&cold)
        );
        println!("    send_memory → drain read():                  {}   ratio {:.2} vs 4 MiB buffer, {:.2} vs mapping", show(&ours), o / h, o / c);
        println!("    send_memory → recv_memory (resident dst):    {}   ratio {:.2} vs 4 MiB buffer, {:.2} vs mapping", show(&e2e), e / h, e / c);
    }
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .unwrap();
    let mut scan = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        for c in &chunks {
            transfer::send_memory(transfer::Link::Plain(null.as_raw_fd()), &src, c, None).unwrap();
        }
        scan.push(ms(t0.elapsed()));
    }
    println!("  send_memory of 1 GiB non-zero to /dev/null (zero scan, table, writev that copies nothing): {:.1} ms", median(scan));
    for (name, link) in [("unix", Link::Unix), ("tcp", Link::Tcp)] {
        let mut fresh = Vec::new();
        for _ in 0..3 {
            let dst = GuestRam::with_ranges(&[(0, GIB)]).unwrap();
            fresh.push(run_pair(
                link,
                Opts::Tuned,
                send_all(&src),
                |fd| recv_frames(fd, &dst),
                bytes,
            ));
        }
        let mut floor = Vec::new();
        for _ in 0..3 {
            let dst = GuestRam::with_ranges(&[(0, GIB)]).unwrap();
            let (_, host, size) = dst.regions()[0];
            floor.push(run_pair(
                link,
                Opts::Tuned,
                |fd| plain_write(fd, bytes),
                |fd| {
                    let mut off = 0;
                    while off < size {
                        // SAFETY: reads into the fresh destination mapping, within its size.
                        let n = unsafe {
                            libc::read(
                                fd,
                                (host + off) as *mut libc::c_void,
                                (size - off).min(4 << 20) as usize,
                            )
                        };
                        assert!(n > 0);
                        off += n as u64;
                    }
                    off
                },
                bytes,
            ));
        }
        println!("  {name}, into a fresh destination (first touch of every page): send_memory → recv_memory {}   plain write() → read() into the mapping {}   ratio {:.2}", show(&fresh), show(&floor), median(fresh.clone()) / median(floor.clone()));
    }

    // All-zero memory that exists (pages allocated, zero): only the scan and ZERO entries.
    let zero = GuestRam::with_ranges(&[(0, GIB)]).unwrap();
    for (_, host, size) in zero.regions() {
        // SAFETY: fresh mapping of `zero`; writing zeros allocates its pages.
        unsafe { std::ptr::write_bytes(host as *mut u8, 0, size as usize) };
    }
    let zchunks = dirty::all_ram(&zero).split(CHUNK_MAX);
    assert_eq!(zchunks.iter().map(|c| c.total_bytes()).sum::<u64>(), GIB);
    let (a, b) = connect(Link::Unix, Opts::Tuned);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        let r = s.spawn(|| drain_frames(b.as_raw_fd()));
        for c in &zchunks {
            transfer::send_memory(transfer::Link::Plain(a.as_raw_fd()), &zero, c, None).unwrap();
        }
        // SAFETY: shutting down our own socket ends the drain.
        unsafe { libc::shutdown(a.as_raw_fd(), libc::SHUT_WR) };
        assert_eq!(r.join().unwrap(), 0);
    });
    println!(
        "  1 GiB of allocated zero pages: zero scan + ZERO entries {:.1} ms ({:.1} GB/s scanned)",
        ms(t0.elapsed()),
        GIB as f64 / t0.elapsed().as_secs_f64() / 1e9
    );
    std::io::stdout().flush().unwrap();
}

fn write_size() {
    let src = GuestRam::with_ranges(&[(0, GIB)]).unwrap();
    fill_random(&src);
    let (_, host, size) = src.regions()[0];
    let writer = move |step: u64| {
        move |fd: RawFd| {
            let mut off = 0;
            while off < size {
                let n = (size - off).min(step);
                // SAFETY: reads the live source mapping.
                let w = unsafe { libc::write(fd, (host + off) as *const libc::c_void, n as usize) };
                assert!(w > 0);
                off += w as u64;
            }
        }
    };
    for (name, link, opts) in [
        ("tcp nodelay", Link::Tcp, Opts::NoDelay),
        ("unix tuned", Link::Unix, Opts::Tuned),
        ("unix default", Link::Unix, Opts::Default),
    ] {
        let mut res: Vec<(u64, Vec<f64>)> = [256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
            .iter()
            .map(|&s| (s, Vec::new()))
            .collect();
        for _ in 0..5 {
            for (step, v) in res.iter_mut() {
                v.push(run_pair(link, opts, writer(*step), plain_drain, GIB));
            }
        }
        let line: Vec<String> = res
            .into_iter()
            .map(|(s, v)| format!("{} KiB: {:.2}", s >> 10, median(v)))
            .collect();
        println!("  {name}: write() size → GB/s  {}", line.join("  "));
    }
}

/// Plaintext vs mutual TLS for the page path alone: 512 MiB of non-zero pages from one GuestRam
/// into another over TCP loopback with send_memory / recv_memory, a warm-up run, then 7 runs of
/// each mode alternating; medians of throughput and of CPU time per GiB (docs/tls.md "Throughput").
fn tls_vs_plaintext() {
    use vmmpy_native::fixtures::make_tls_dir;
    use vmmpy_native::tls::{Role, TlsContext};
    let size = 512 * MIB;
    let src = GuestRam::with_ranges(&[(0, size)]).unwrap();
    fill_random(&src);
    let dst = GuestRam::with_ranges(&[(0, size)]).unwrap();
    let chunks = dirty::all_ram(&src).split(CHUNK_MAX);
    let dir = make_tls_dir("bench", "127.0.0.1");
    let client = Arc::new(TlsContext::load(&dir, Role::Client).unwrap());
    let server = Arc::new(TlsContext::load(&dir, Role::Server).unwrap());
    // (GB/s, CPU seconds of both sides per GiB): on a shared 2-core host the CPU cost is the
    // steadier figure, and throughput follows it when the cores are busy.
    let run = |tls: bool| -> (f64, f64) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let s = l.accept().unwrap().0;
        for fd in [c.as_raw_fd(), s.as_raw_fd()] {
            transfer::tune_socket(fd).unwrap();
        }
        let (c, s): (OwnedFd, OwnedFd) = (c.into(), s.into());
        let (src, frames, client) = (src.clone(), chunks.clone(), client.clone());
        let server = server.clone();
        let (t0, cpu0) = (Instant::now(), cpu_seconds());
        let sender = std::thread::spawn(move || {
            let mut tx = tls.then(|| {
                client
                    .handshake(c.try_clone().unwrap(), "127.0.0.1", Duration::from_secs(5))
                    .unwrap()
            });
            for ch in &frames {
                let link = match tx.as_mut() {
                    Some(t) => transfer::Link::Tls(t),
                    None => transfer::Link::Plain(c.as_raw_fd()),
                };
                transfer::send_memory(link, &src, ch, None).unwrap();
            }
            drop(tx);
        });
        let mut rx = tls.then(|| {
            server
                .handshake(s.try_clone().unwrap(), "", Duration::from_secs(5))
                .unwrap()
        });
        let mut total = 0;
        for _ in 0..chunks.len() {
            let mut h = [0u8; 16];
            let link = match rx.as_mut() {
                Some(t) => {
                    t.read_exact(&mut h).unwrap();
                    transfer::Link::Tls(t)
                }
                None => {
                    assert!(read_exact(s.as_raw_fd(), &mut h));
                    transfer::Link::Plain(s.as_raw_fd())
                }
            };
            total +=
                transfer::recv_memory(link, &dst, u64::from_le_bytes(h[8..16].try_into().unwrap()))
                    .unwrap()
                    .bytes_received;
        }
        sender.join().unwrap();
        assert_eq!(total, size);
        let gib = size as f64 / GIB as f64;
        (
            size as f64 / t0.elapsed().as_secs_f64() / 1e9,
            (cpu_seconds() - cpu0) / gib,
        )
    };
    run(false); // warm-up: the destination's RAM gets its pages
    let (mut plain, mut tls) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        plain.push(run(false));
        tls.push(run(true));
    }
    let rate = |v: &[(f64, f64)]| v.iter().map(|r| r.0).collect::<Vec<_>>();
    let cpu = |v: &[(f64, f64)]| median(v.iter().map(|r| r.1).collect());
    let (p, t) = (median(rate(&plain)), median(rate(&tls)));
    println!("512 MiB over TCP loopback: plaintext {p:.2} GB/s {:.2?}, TLS {t:.2} GB/s {:.2?}: ratio {:.3} (target >= 0.7)", rate(&plain), rate(&tls), t / p);
    let (pc, tc) = (cpu(&plain), cpu(&tls));
    println!(
        "  CPU per GiB (both sides): plaintext {pc:.3} s, TLS {tc:.3} s: ratio {:.3}",
        pc / tc
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// The record layer's floor: copying 16 KiB records out of a 64 MiB buffer alone, and copying
/// plus sealing them with ring's AES-128-GCM (what TlsStream does per record on the sender).
fn aead_floor() {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).unwrap());
    let src = vec![5u8; 64 << 20];
    let mut rec = vec![0u8; 16 << 10];
    for round in 0..3 {
        let t0 = Instant::now();
        for (i, c) in src.chunks(16 << 10).enumerate() {
            rec.copy_from_slice(c);
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&(i as u64 + round * 10000).to_be_bytes());
            let _ = std::hint::black_box(
                key.seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(n),
                    Aad::from([0u8; 5]),
                    &mut rec,
                )
                .unwrap(),
            );
        }
        let seal = t0.elapsed();
        let t0 = Instant::now();
        for c in src.chunks(16 << 10) {
            rec.copy_from_slice(c);
            std::hint::black_box(&mut rec);
        }
        let copy = t0.elapsed();
        println!(
            "64 MiB: copy+seal {:.2} GB/s, copy alone {:.2} GB/s",
            64.0 * 1.048576e-3 / seal.as_secs_f64(),
            64.0 * 1.048576e-3 / copy.as_secs_f64()
        );
    }
}

/// The benches, by name; `cargo bench` passes `--bench` (and any `--` words) to a harness-less
/// bench, so flags are skipped and the other words select.
fn main() {
    let benches: [(&str, fn()); 5] = [
        ("dirty_sync", dirty_sync),
        ("send_memory", send_memory),
        ("write_size", write_size),
        ("tls_vs_plaintext", tls_vs_plaintext),
        ("aead_floor", aead_floor),
    ];
    let words: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    for (name, bench) in benches {
        if words.is_empty() || words.iter().any(|w| name.contains(w.as_str())) {
            println!("== {name}");
            bench();
        }
    }
}
