//! vCPU state for the 64-bit boot protocol (identity page tables, the boot GDT, long mode) and for
//! the PVH entry (flat 32-bit protected mode, paging off), FPU, boot MSRs and the LAPIC's
//! LINT0/LINT1 wiring.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, Kind, Result};
use crate::host;
use crate::layout;
use crate::memory::GuestMem;

const CODE64: u64 = 0x00af_9b00_0000_ffff;
const DATA: u64 = 0x00cf_9300_0000_ffff;
const TSS: u64 = 0x0080_8b00_0000_ffff;
const CODE32: u64 = 0x00cf_9b00_0000_ffff;
/// Linux's 64-bit boot protocol wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;
const BOOT_CS32: u16 = 0x28;
const BOOT_GDT_ENTRIES: u16 = 6;

const X86_CR0_PE: u64 = 1;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_WP: u64 = 1 << 16;
const X86_CR0_AM: u64 = 1 << 18;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Writes the boot GDT, an empty IDT and page tables identity-mapping the first 4 GiB.
pub fn write_boot_tables(mem: &GuestMem) -> Result<()> {
    let w = |addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|e| Error::new(Kind::Kvm, format!("writing boot tables at {addr:#x}: {e}")))
    };
    for (i, desc) in [0, 0, CODE64, DATA, TSS, CODE32].iter().enumerate() {
        w(layout::BOOT_GDT + 8 * i as u64, *desc)?;
    }
    w(layout::BOOT_IDT, 0)?;
    w(layout::PML4, layout::PDPT | 0x3)?;
    for i in 0..4u64 {
        w(layout::PDPT + 8 * i, (layout::PD + 0x1000 * i) | 0x3)?;
    }
    // 2048 entries of 2 MiB: present, writable, page size.
    for i in 0..2048u64 {
        w(layout::PD + 8 * i, (i << 21) | 0x83)?;
    }
    Ok(())
}

fn segment(desc: u64, selector: u16) -> kvm_segment {
    let raw_limit = (((desc >> 32) & 0xf_0000) | (desc & 0xffff)) as u32;
    let granular = (desc >> 55) & 1 == 1;
    kvm_segment {
        base: ((desc >> 16) & 0xff_ffff) | (((desc >> 56) & 0xff) << 24),
        // KVM takes the limit in bytes: with G set the descriptor counts 4 KiB pages. Long mode
        // ignores limits, 32-bit protected mode (PVH) does not.
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((desc >> 40) & 0xf) as u8,
        present: ((desc >> 47) & 1) as u8,
        dpl: ((desc >> 45) & 3) as u8,
        db: ((desc >> 54) & 1) as u8,
        s: ((desc >> 44) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        g: ((desc >> 55) & 1) as u8,
        avl: ((desc >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Puts a vCPU at `entry` in 64-bit mode as the boot protocol expects; `rsi`/`rdi` carry the zero
/// page and (for the test guest's APs) the vCPU index.
/// The vCPU's special registers with the boot GDT's flat segments (`code` for CS), its TSS, and
/// an IDT of limit 7 (any exception is a triple fault); both entries start from these.
fn boot_segments(vcpu: &VcpuFd, code: kvm_segment) -> Result<kvm_sregs> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::kvm("KVM_GET_SREGS", e))?;
    let data = segment(DATA, BOOT_DS);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS, BOOT_TSS);
    sregs.gdt.base = layout::BOOT_GDT;
    sregs.gdt.limit = BOOT_GDT_ENTRIES * 8 - 1;
    sregs.idt.base = layout::BOOT_IDT;
    sregs.idt.limit = 7;
    Ok(sregs)
}

pub fn setup_long_mode(vcpu: &VcpuFd, entry: u64, rsi: u64, rdi: u64) -> Result<()> {
    let mut sregs = boot_segments(vcpu, segment(CODE64, BOOT_CS))?;
    sregs.cr3 = layout::PML4;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 =
        X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_AM | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::kvm("KVM_SET_SREGS", e))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: layout::BOOT_STACK,
        rbp: layout::BOOT_STACK,
        rsi,
        rdi,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| Error::kvm("KVM_SET_REGS", e))?;
    reset_fpu(vcpu)
}

/// Puts a vCPU at `entry` as the PVH ABI wants it: 32-bit protected mode with flat 4 GiB code and
/// data segments, paging and long mode off, EBX = the `hvm_start_info` address.
pub fn setup_pvh(vcpu: &VcpuFd, entry: u64, start_info: u64) -> Result<()> {
    let mut sregs = boot_segments(vcpu, segment(CODE32, BOOT_CS32))?;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::kvm("KVM_SET_SREGS", e))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rbx: start_info,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| Error::kvm("KVM_SET_REGS", e))?;
    reset_fpu(vcpu)
}

/// The x87/SSE state at reset: all exceptions masked (FCW 0x37f, MXCSR 0x1f80).
fn reset_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| Error::kvm("KVM_SET_FPU", e))
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// Boot MSRs, limited to those KVM lists as settable (this host rejects others outright).
pub fn setup_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<()> {
    let supported = host::msr_indices(kvm)?;
    let wanted = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ];
    let entries: Vec<kvm_msr_entry> = wanted
        .iter()
        .filter(|(index, _)| supported.contains(index))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|e| Error::new(Kind::Kvm, format!("MSR list: {e:?}")))?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| Error::kvm("KVM_SET_MSRS", e))?;
    if set != entries.len() {
        let refused = entries[set].index;
        return Err(Error::new(
            Kind::Kvm,
            format!(
                "KVM_SET_MSRS accepted {set} of {} MSRs (refused {refused:#x})",
                entries.len()
            ),
        ));
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// LINT0 as ExtINT (the PIC) and LINT1 as NMI, as a PC's BIOS leaves them.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| Error::kvm("KVM_GET_LAPIC", e))?;
    let mut set_mode = |reg: usize, mode: u32| {
        let bytes: &mut [u8] = unsafe_bytes(&mut lapic.regs[reg..reg + 4]);
        let val = u32::from_le_bytes(bytes.try_into().unwrap());
        let val = (val & !0x700) | (mode << 8);
        bytes.copy_from_slice(&val.to_le_bytes());
    };
    set_mode(APIC_LVT0, APIC_MODE_EXTINT);
    set_mode(APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| Error::kvm("KVM_SET_LAPIC", e))
}

fn unsafe_bytes(regs: &mut [std::os::raw::c_char]) -> &mut [u8] {
    // SAFETY: c_char and u8 have the same size and alignment; the slice covers the same memory.
    unsafe { std::slice::from_raw_parts_mut(regs.as_mut_ptr() as *mut u8, regs.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_segments_span_4_gib() {
        let code = segment(CODE32, BOOT_CS32);
        assert_eq!(
            (code.base, code.limit, code.db, code.l, code.g, code.type_),
            (0, 0xffff_ffff, 1, 0, 1, 0xb)
        );
        assert_eq!(segment(DATA, BOOT_DS).limit, 0xffff_ffff);
        assert_eq!(segment(TSS, BOOT_TSS).limit, 0x0fff_ffff);
    }
}
