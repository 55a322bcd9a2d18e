//! Fixtures shared by the unit tests and benches/migration.rs: a tiny KVM VM over a `GuestRam`
//! whose one vCPU runs hand-assembled CPL3 code, and a throwaway mutual-TLS directory. Public so
//! the cargo bench (a separate crate linking the rlib) can build the same VM the tests do.

use std::path::PathBuf;
use std::process::Command;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use crate::dirty::enable_manual_protect;
use crate::memory::GuestRam;

/// A VM with `ram`'s regions as slots 0.., registered like vm.rs does, identity page tables
/// (2 MiB pages with Accessed/Dirty preset, so the CPU's page walks write nothing), a flat GDT
/// with ring-0 and ring-3 segments, and one vCPU at 0x1000 in CPL0 that drops to CPL3 at 0x2000.
pub fn tiny_vm(ram: &GuestRam, manual: bool) -> Option<(Kvm, VmFd, VcpuFd)> {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("no /dev/kvm ({e}): skipping");
            return None;
        }
    };
    let vm = kvm.create_vm().unwrap();
    if manual {
        assert!(
            enable_manual_protect(&vm),
            "this host offers MANUAL_DIRTY_LOG_PROTECT2"
        );
    }
    vm.set_tss_address(0xfffb_d000).unwrap();
    for (slot, (gpa, host, size)) in ram.regions().into_iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: a fixture: every caller (unit tests, benches/) keeps `ram` alive and mapped for as
        // long as the VM it gets back.
        unsafe { vm.set_user_memory_region(r) }.unwrap();
    }
    let m = &ram.mem;
    m.write_obj(0xa000u64 | 0x27, GuestAddress(0x9000)).unwrap();
    for i in 0..4u64 {
        m.write_obj((0xb000 + i * 0x1000) | 0x27, GuestAddress(0xa000 + 8 * i))
            .unwrap();
    }
    for i in 0..4 * 512u64 {
        m.write_obj((i << 21) | 0xe7, GuestAddress(0xb000 + 8 * i))
            .unwrap();
    }
    for (i, d) in [
        0u64,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00af_fb00_0000_ffff,
        0x00cf_f300_0000_ffff,
    ]
    .iter()
    .enumerate()
    {
        m.write_obj(*d, GuestAddress(0x500 + 8 * i as u64)).unwrap();
    }
    // CPL0 at 0x1000: push ss, rsp, rflags (IOPL=3), cs, rip; iretq to CPL3 at 0x2000.
    let mut c: Vec<u8> = vec![0x6a, 0x23, 0x68];
    c.extend(0x80000u32.to_le_bytes());
    c.push(0x68);
    c.extend(0x3002u32.to_le_bytes());
    c.extend([0x6a, 0x1b, 0x68]);
    c.extend(0x2000u32.to_le_bytes());
    c.extend([0x48, 0xcf]);
    m.write_slice(&c, GuestAddress(0x1000)).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut s = vcpu.get_sregs().unwrap();
    let cs = kvm_segment {
        limit: 0xffff_ffff,
        selector: 8,
        type_: 11,
        present: 1,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let ds = kvm_segment {
        limit: 0xffff_ffff,
        selector: 16,
        type_: 3,
        present: 1,
        s: 1,
        db: 1,
        g: 1,
        ..Default::default()
    };
    s.cs = cs;
    (s.ds, s.es, s.fs, s.gs, s.ss) = (ds, ds, ds, ds, ds);
    s.gdt.base = 0x500;
    s.gdt.limit = 5 * 8 - 1;
    (s.cr3, s.cr4, s.cr0, s.efer) = (0x9000, 0x20, 0x8005_0033, 0x500);
    vcpu.set_sregs(&s).unwrap();
    vcpu.set_regs(&kvm_regs {
        rip: 0x1000,
        rflags: 2,
        rsp: 0x8000,
        ..Default::default()
    })
    .unwrap();
    Some((kvm, vm, vcpu))
}

/// Runs the vCPU to its next `out` to COM1 (the tiny guests' "done" mark).
pub fn run_to_out(vcpu: &mut VcpuFd) {
    match vcpu.run().unwrap() {
        VcpuExit::IoOut(0x3f8, _) => {}
        other => panic!("unexpected exit {other:?}"),
    }
}

/// A CA and, signed by it, client and server certificates for `ip` in a fresh directory, made
/// with the openssl CLI as docs/tls.md tells users to.
pub fn make_tls_dir(name: &str, ip: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmmpy-tls-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("the openssl CLI");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=vmmpy test CA",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
    ]);
    let ext = format!("subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\n");
    std::fs::write(dir.join("ext.cnf"), ext).unwrap();
    for side in ["client", "server"] {
        let (key, csr, cert) = (
            format!("{side}-key.pem"),
            format!("{side}.csr"),
            format!("{side}-cert.pem"),
        );
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={side}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            &cert,
        ]);
    }
    dir
}
