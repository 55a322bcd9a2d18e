//! CPUID for each vCPU: what KVM supports, with this vCPU's APIC id, the topology (one core per
//! vCPU, one thread per core) and the hypervisor bit.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_TOPOLOGY: u32 = 4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

pub fn for_vcpu(base: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((index as u32) << 24) | ((count as u32) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                }
            }
            LEAF_CACHE_TOPOLOGY => {
                // EAX[31:26]: cores per package - 1.
                e.eax = (e.eax & 0x03ff_ffff) | (((count as u32).saturating_sub(1) & 0x3f) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                e.edx = index as u32;
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        // Core level: `count` cores; shift wide enough for 8 APIC ids.
                        e.eax = 3;
                        e.ebx = count as u32;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
    cpuid
}
