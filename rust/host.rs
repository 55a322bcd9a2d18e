//! What this host's KVM supports, read once per process: it depends only on the host kernel, and
//! each read costs (KVM_GET_SUPPORTED_CPUID ~0.3 ms on kvm_pvm, at every VM build and reboot;
//! KVM_GET_MSR_INDEX_LIST at every state save, inside a migration's downtime).

use std::sync::OnceLock;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::error::{Error, Result};

/// `cell`'s value, read by `read` the first time (a failed read is tried again next time).
fn cached<T: Send + Sync>(
    cell: &'static OnceLock<T>,
    read: impl FnOnce() -> Result<T>,
) -> Result<&'static T> {
    if let Some(value) = cell.get() {
        return Ok(value);
    }
    let value = read()?;
    Ok(cell.get_or_init(|| value))
}

pub fn supported_cpuid(kvm: &Kvm) -> Result<&'static CpuId> {
    static CPUID: OnceLock<CpuId> = OnceLock::new();
    cached(&CPUID, || {
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::kvm("KVM_GET_SUPPORTED_CPUID", e))
    })
}

/// The MSRs KVM lists for saving and restoring.
pub fn msr_indices(kvm: &Kvm) -> Result<&'static [u32]> {
    static MSRS: OnceLock<Vec<u32>> = OnceLock::new();
    cached(&MSRS, || {
        kvm.get_msr_index_list()
            .map(|list| list.as_slice().to_vec())
            .map_err(|e| Error::kvm("KVM_GET_MSR_INDEX_LIST", e))
    })
    .map(Vec::as_slice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_value_is_read_once() {
        let kvm = Kvm::new().unwrap();
        let first = msr_indices(&kvm).unwrap();
        assert!(!first.is_empty());
        assert!(std::ptr::eq(first, msr_indices(&kvm).unwrap()));
        let cpuid = supported_cpuid(&kvm).unwrap();
        assert!(std::ptr::eq(cpuid, supported_cpuid(&kvm).unwrap()));
    }
}
