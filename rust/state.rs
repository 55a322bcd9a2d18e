//! Saving and restoring a paused VM's CPU and interrupt-controller state: what a snapshot and a
//! migration's State message carry besides memory. Each KVM structure travels as its raw bytes
//! (they are x86-64 UAPI structs, stable across kernels); state_doc.rs writes them into the
//! state document, whose versioned fields are Python's (vmmpy/snapshot.py).

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::error::{Error, Kind, Result};
use crate::host;

pub type Blobs = Vec<(String, Vec<u8>)>;

/// Marks the kvm-bindings structs that may travel as raw bytes.
///
/// # Safety
/// Implementors are `repr(C)` plain data without pointers or references, for which every bit
/// pattern (all zeroes included) is a valid value.
unsafe trait Pod {}
// SAFETY: all of these are kvm UAPI structs: repr(C) integers, arrays and unions of them.
unsafe impl Pod for kvm_regs {}
// SAFETY: as above.
unsafe impl Pod for kvm_sregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_xsave {}
// SAFETY: as above.
unsafe impl Pod for kvm_xcrs {}
// SAFETY: as above.
unsafe impl Pod for kvm_lapic_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_vcpu_events {}
// SAFETY: as above.
unsafe impl Pod for kvm_mp_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_debugregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_irqchip {}
// SAFETY: as above.
unsafe impl Pod for kvm_pit_state2 {}
// SAFETY: as above.
unsafe impl Pod for kvm_clock_data {}

fn to_bytes<T: Pod>(v: &T) -> Vec<u8> {
    // SAFETY: T is Pod, so all size_of::<T>() bytes behind &T are initialised plain data.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
        .to_vec()
}

fn from_bytes<T: Pod>(name: &str, b: &[u8]) -> Result<T> {
    if b.len() != std::mem::size_of::<T>() {
        return Err(Error::new(
            Kind::InvalidConfig,
            format!(
                "state field {name}: {} bytes, expected {}",
                b.len(),
                std::mem::size_of::<T>()
            ),
        ));
    }
    // SAFETY: T is Pod (any bit pattern is valid) and b has exactly size_of::<T>() bytes.
    Ok(unsafe { std::ptr::read_unaligned(b.as_ptr() as *const T) })
}

fn blob<'a>(blobs: &'a Blobs, name: &str) -> Result<&'a [u8]> {
    blobs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, b)| b.as_slice())
        .ok_or_else(|| Error::new(Kind::InvalidConfig, format!("state lacks {name}")))
}

fn kvm_err(what: &'static str) -> impl Fn(vmm_sys_util::errno::Error) -> Error {
    move |e| Error::kvm(what, e)
}

pub struct VcpuState {
    pub blobs: Blobs,
    pub msrs: Vec<(u32, u64)>,
}

/// Reads the MSRs KVM lists, dropping those this host refuses to read.
fn save_msrs(kvm: &Kvm, fd: &VcpuFd) -> Result<Vec<(u32, u64)>> {
    let mut pending: Vec<u32> = host::msr_indices(kvm)?.to_vec();
    let mut out = Vec::new();
    while !pending.is_empty() {
        let entries: Vec<kvm_msr_entry> = pending
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| Error::new(Kind::Kvm, format!("MSR list: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // KVM stops at the first MSR it cannot read: skip that one and go on.
        pending.drain(..(n + 1).min(pending.len()));
    }
    Ok(out)
}

/// Writes MSRs, skipping (and returning) those the host refuses; KVM stops a batch at the first.
fn restore_msrs(fd: &VcpuFd, msrs: &[(u32, u64)]) -> Result<Vec<u32>> {
    let mut refused = Vec::new();
    let mut rest = msrs;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let batch = Msrs::from_entries(&entries)
            .map_err(|e| Error::new(Kind::Kvm, format!("MSR list: {e:?}")))?;
        let n = fd.set_msrs(&batch).map_err(kvm_err("KVM_SET_MSRS"))?;
        if n < rest.len() {
            refused.push(rest[n].0);
        }
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(refused)
}

pub fn save_vcpu(kvm: &Kvm, fd: &VcpuFd) -> Result<VcpuState> {
    let mut blobs: Blobs = vec![
        (
            "regs".into(),
            to_bytes(&fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?),
        ),
        (
            "sregs".into(),
            to_bytes(&fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?),
        ),
        (
            "xsave".into(),
            to_bytes(&fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?),
        ),
        (
            "xcrs".into(),
            to_bytes(&fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?),
        ),
        (
            "lapic".into(),
            to_bytes(&fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?),
        ),
        (
            "mp_state".into(),
            to_bytes(&fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?),
        ),
        (
            "debugregs".into(),
            to_bytes(&fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?),
        ),
    ];
    // Events last: reading the others must not change them.
    blobs.push((
        "vcpu_events".into(),
        to_bytes(
            &fd.get_vcpu_events()
                .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
        ),
    ));
    Ok(VcpuState {
        blobs,
        msrs: save_msrs(kvm, fd)?,
    })
}

/// Restores a vCPU (CPUID already set). Returns the MSRs the host refused.
pub fn restore_vcpu(fd: &VcpuFd, st: &VcpuState) -> Result<Vec<u32>> {
    let b = &st.blobs;
    fd.set_sregs(&from_bytes("sregs", blob(b, "sregs")?)?)
        .map_err(kvm_err("KVM_SET_SREGS"))?;
    fd.set_regs(&from_bytes("regs", blob(b, "regs")?)?)
        .map_err(kvm_err("KVM_SET_REGS"))?;
    let xsave: kvm_xsave = from_bytes("xsave", blob(b, "xsave")?)?;
    // SAFETY: a plain 4 KiB kvm_xsave (no extra AMX area) as KVM_GET_XSAVE returned it.
    unsafe { fd.set_xsave(&xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&from_bytes("xcrs", blob(b, "xcrs")?)?)
        .map_err(kvm_err("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&from_bytes("debugregs", blob(b, "debugregs")?)?)
        .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&from_bytes("lapic", blob(b, "lapic")?)?)
        .map_err(kvm_err("KVM_SET_LAPIC"))?;
    let refused = restore_msrs(fd, &st.msrs)?;
    fd.set_mp_state(from_bytes("mp_state", blob(b, "mp_state")?)?)
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    fd.set_vcpu_events(&from_bytes("vcpu_events", blob(b, "vcpu_events")?)?)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(refused)
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// PIC, IOAPIC, PIT and the KVM clock.
pub fn save_machine(vm: &VmFd) -> Result<Blobs> {
    Ok(vec![
        (
            "pic_master".into(),
            to_bytes(&irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?),
        ),
        (
            "pic_slave".into(),
            to_bytes(&irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?),
        ),
        ("ioapic".into(), to_bytes(&irqchip(vm, KVM_IRQCHIP_IOAPIC)?)),
        (
            "pit".into(),
            to_bytes(&vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?),
        ),
        (
            "clock".into(),
            to_bytes(&vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?),
        ),
    ])
}

pub fn restore_machine(vm: &VmFd, b: &Blobs) -> Result<()> {
    for name in ["pic_master", "pic_slave", "ioapic"] {
        let chip: kvm_irqchip = from_bytes(name, blob(b, name)?)?;
        vm.set_irqchip(&chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&from_bytes("pit", blob(b, "pit")?)?)
        .map_err(kvm_err("KVM_SET_PIT2"))?;
    let mut clock: kvm_clock_data = from_bytes("clock", blob(b, "clock")?)?;
    // Only the clock value is settable; the flags KVM_GET_CLOCK reports describe the source host.
    clock.flags = 0;
    vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))
}
