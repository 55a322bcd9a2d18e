//! Dirty-page tracking for pre-copy migration: KVM's per-slot dirty log (guest writes) ORed with
//! vm-memory's per-region bitmap (the VMM's own writes), turned into a `RangeTable` per sync.
//!
//! Slot `i` is RAM region `i` of `GuestRam`, registered at the same guest address, host address and
//! size as `vm.rs` registers it; only the flags change.
//!
//! With `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (see `enable_manual_protect`), `KVM_GET_DIRTY_LOG` only
//! reads the log and `sync` re-arms write protection with `KVM_CLEAR_DIRTY_LOG` for exactly the bits
//! it got, before the caller reads (sends) those pages: a guest write racing with the send is then
//! caught by the next sync. Without it, `KVM_GET_DIRTY_LOG` reads, clears and re-protects at once.

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, kvm_userspace_memory_region, KVMIO,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

use crate::error::{Error, Kind, Result};
use crate::memory::{GuestRam, VmmBitmap, PAGE_SIZE};
use crate::ranges::RangeTable;

ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Enables `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (with `KVM_DIRTY_LOG_INITIALLY_SET` when offered) on
/// a VM; true when it is on. Call it before any slot enables KVM_MEM_LOG_DIRTY_PAGES.
pub fn enable_manual_protect(vm: &VmFd) -> bool {
    let offered = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 as libc::c_ulong);
    if offered <= 0 || offered as u32 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE == 0 {
        return false;
    }
    let flags =
        offered as u32 & (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET);
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = flags as u64;
    vm.enable_cap(&cap).is_ok()
}

struct Slot {
    gpa: u64,
    host: u64,
    size: u64,
    pages: u64,
    /// KVM's bitmap for this slot, reused by every sync; then ORed with the VMM's bitmap.
    bits: Vec<u64>,
}

pub struct DirtyLog {
    slots: Vec<Slot>,
    manual_protect: bool,
}

fn set_slot(vm: &VmFd, index: usize, s: &Slot, flags: u32) -> Result<()> {
    let region = kvm_userspace_memory_region {
        slot: index as u32,
        flags,
        guest_phys_addr: s.gpa,
        memory_size: s.size,
        userspace_addr: s.host,
    };
    // SAFETY: the region is the one vm.rs registered (same slot, addresses and size; only the flags
    // differ): memory owned by the GuestRam the caller passes, which outlives the VM's use of it.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| Error::kvm("KVM_SET_USER_MEMORY_REGION (dirty logging)", e))
}

/// The VMM-side bitmap of a RAM region (one bit per 4 KiB page).
fn vmm_bitmap(region: &vm_memory::GuestRegionMmap<VmmBitmap>) -> &VmmBitmap {
    MmapRegion::bitmap(region)
}

impl DirtyLog {
    /// Turns on dirty logging for every RAM slot and starts the VMM-side bitmaps afresh. Every
    /// write after this returns (by a vCPU or through `ram.mem`) shows up in a later `sync`.
    /// `manual_protect`: the VM has `enable_manual_protect` on.
    pub fn start(vm: &VmFd, ram: &GuestRam, manual_protect: bool) -> Result<DirtyLog> {
        let mut slots = Vec::new();
        for (gpa, host, size) in ram.regions() {
            let pages = size / PAGE_SIZE;
            slots.push(Slot {
                gpa,
                host,
                size,
                pages,
                bits: vec![0; pages.div_ceil(64) as usize],
            });
        }
        // Reset first: a VMM write between here and the KVM registration is reported (once more).
        for region in ram.mem.iter() {
            vmm_bitmap(region).reset();
        }
        let mut log = DirtyLog {
            slots,
            manual_protect,
        };
        for (i, s) in log.slots.iter().enumerate() {
            set_slot(vm, i, s, KVM_MEM_LOG_DIRTY_PAGES)?;
        }
        if manual_protect {
            // With KVM_DIRTY_LOG_INITIALLY_SET every bit starts set and nothing is write-protected:
            // clear (= protect) the whole slot now so that a sync reports writes since start only.
            // Without it KVM protected everything at registration and this finds no bit to clear.
            for (i, s) in log.slots.iter_mut().enumerate() {
                s.bits.fill(u64::MAX);
                if s.pages % 64 != 0 {
                    *s.bits.last_mut().unwrap() = (1u64 << (s.pages % 64)) - 1;
                }
                clear_dirty_log(vm, i as u32, s, 0, s.bits.len())?;
            }
        }
        Ok(log)
    }

    #[cfg(test)]
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    fn check_layout(&self, ram: &GuestRam) -> Result<()> {
        let same = ram.mem.num_regions() == self.slots.len()
            && ram
                .mem
                .iter()
                .zip(&self.slots)
                .all(|(r, s)| r.start_addr().0 == s.gpa && r.len() == s.size);
        if same {
            Ok(())
        } else {
            Err(Error::new(
                Kind::Migration,
                "guest RAM changed since dirty logging started",
            ))
        }
    }

    /// The pages written since `start` or the previous sync. With manual protect, their write
    /// protection is re-armed before this returns, so send them after it.
    pub fn sync(&mut self, vm: &VmFd, ram: &GuestRam) -> Result<RangeTable> {
        self.check_layout(ram)?;
        let mut table = RangeTable::new();
        for (i, (s, region)) in self.slots.iter_mut().zip(ram.mem.iter()).enumerate() {
            let log = kvm_dirty_log {
                slot: i as u32,
                padding1: 0,
                __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: s.bits.as_mut_ptr().cast(),
                },
            };
            // SAFETY: `log` points at `s.bits`, which holds ceil(pages / 64) u64 words: the size KVM
            // writes for a slot of `pages` pages. The ioctl reads `log` and writes only the bitmap.
            let rc = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
            if rc < 0 {
                return Err(Error::io(
                    Kind::Kvm,
                    "KVM_GET_DIRTY_LOG",
                    std::io::Error::last_os_error(),
                ));
            }
            if self.manual_protect {
                // Clear (re-protect) only the span of words that has bits: KVM walks every word.
                if let Some(first) = s.bits.iter().position(|&w| w != 0) {
                    let last = s.bits.iter().rposition(|&w| w != 0).unwrap();
                    clear_dirty_log(vm, i as u32, s, first, last + 1)?;
                }
            }
            if let Some(vmm) = vmm_bitmap(region).take() {
                for (w, v) in s.bits.iter_mut().zip(vmm) {
                    *w |= v;
                }
            }
            table.append_bitmap(&s.bits, s.gpa);
        }
        Ok(table)
    }

    /// Turns dirty logging off again (also after a failed or cancelled migration: a logging slot
    /// makes the guest's first write to each page after a sync fault).
    pub fn stop(self, vm: &VmFd, ram: &GuestRam) -> Result<()> {
        self.check_layout(ram)?;
        for (i, s) in self.slots.iter().enumerate() {
            set_slot(vm, i, s, 0)?;
        }
        Ok(())
    }
}

/// KVM_CLEAR_DIRTY_LOG for the words `first..end` of `s.bits`.
fn clear_dirty_log(vm: &VmFd, slot: u32, s: &mut Slot, first: usize, end: usize) -> Result<()> {
    let first_page = first as u64 * 64;
    // KVM wants a multiple of 64 pages unless the span reaches the end of the slot.
    let num_pages = (end as u64 * 64).min(s.pages) - first_page;
    let clear = kvm_clear_dirty_log {
        slot,
        num_pages: num_pages as u32,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: s.bits[first..].as_mut_ptr().cast(),
        },
    };
    // SAFETY: the bitmap pointer covers words first..bits.len() of `s.bits`, at least
    // ceil(num_pages / 64) words; KVM only reads it. `clear` lives across the call.
    let rc = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
    if rc < 0 {
        return Err(Error::io(
            Kind::Kvm,
            "KVM_CLEAR_DIRTY_LOG",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Iteration 0's table: all of guest RAM except what was never written (memfd holes, found with
/// SEEK_DATA / SEEK_HOLE; private RAM's pages that pagemap reports neither present nor swapped),
/// so an idle guest's first pass skips untouched memory.
pub fn all_ram(ram: &GuestRam) -> RangeTable {
    let mut table = RangeTable::new();
    for (index, region) in ram.mem.iter().enumerate() {
        let gpa = region.start_addr().0;
        for (off, n) in ram.used_extents(index) {
            table.push(gpa + off, n);
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::fixtures::{run_to_out, tiny_vm};

    const MIB: u64 = 1 << 20;

    /// Page numbers (gpa / 4096) in a table.
    fn pages_of(t: &RangeTable) -> Vec<u64> {
        t.iter()
            .flat_map(|r| (r.gpa / PAGE_SIZE)..(r.end() / PAGE_SIZE))
            .collect()
    }

    #[test]
    fn all_ram_skips_holes() {
        let ram = GuestRam::with_ranges(&[(0, 8 * MIB), (16 * MIB, 4 * MIB)]).unwrap();
        assert!(all_ram(&ram).is_empty(), "fresh memfds are all holes");
        ram.mem.write_obj(1u8, GuestAddress(0x3000)).unwrap();
        ram.mem.write_obj(1u32, GuestAddress(0x4ffe)).unwrap(); // straddles two pages
        ram.mem.write_obj(1u64, GuestAddress(8 * MIB - 8)).unwrap(); // last page of region 0
        ram.mem.write_obj(1u64, GuestAddress(16 * MIB)).unwrap(); // first page of region 1
        let t = all_ram(&ram);
        assert_eq!(pages_of(&t), vec![3, 4, 5, 2047, 4096]);
    }

    #[test]
    fn all_ram_of_private_ram_lists_touched_memory() {
        let ram = GuestRam::private(&[(0, 32 * MIB), (48 * MIB, 4 * MIB)]).unwrap();
        // 4 KiB pages, so the walk's answer is exact (a huge page would bring its 2 MiB along).
        for (_, host, size) in ram.regions() {
            // SAFETY: madvise on the test's own fresh mapping.
            unsafe {
                libc::madvise(
                    host as *mut libc::c_void,
                    size as usize,
                    libc::MADV_NOHUGEPAGE,
                )
            };
        }
        assert!(all_ram(&ram).is_empty(), "fresh private RAM has no page");
        ram.mem.write_obj(1u8, GuestAddress(0x3000)).unwrap();
        // Straddles pages 4095 and 4096: one run across the walk's 16 MiB read boundary.
        ram.mem.write_obj(1u64, GuestAddress(16 * MIB - 4)).unwrap();
        ram.mem.write_obj(1u64, GuestAddress(32 * MIB - 8)).unwrap(); // last page of region 0
        let t = all_ram(&ram);
        assert_eq!(pages_of(&t), vec![3, 4095, 4096, 8191]);
        assert_eq!(t.len(), 3, "the straddling write is one range");
    }

    /// CPL3 code at 0x2000: `L: out 0x3f8 ; store eax to each of `targets` ; jmp L`.
    pub fn store_loop(ram: &GuestRam, targets: &[u32]) {
        let mut c: Vec<u8> = vec![0x66, 0xba, 0xf8, 0x03, 0xee];
        for t in targets {
            c.push(0xbf); // mov edi, imm32
            c.extend(t.to_le_bytes());
            c.extend([0x89, 0x07]); // mov [rdi], eax
        }
        let back = -(c.len() as i64 - 4 + 2) as i8; // to the `out`
        c.extend([0xeb, back as u8]);
        ram.mem.write_slice(&c, GuestAddress(0x2000)).unwrap();
    }

    fn dirty_log_reports_exact_pages(manual: bool) {
        let ram: Arc<GuestRam> =
            GuestRam::with_ranges(&[(0, 16 * MIB), (32 * MIB, 4 * MIB)]).unwrap();
        let Some((_kvm, vm, mut vcpu)) = tiny_vm(&ram, manual) else {
            return;
        };
        let targets = [
            0x40_0000u32,
            0x40_1ffc,
            0x7f_f000,
            16 * MIB as u32 - 4,
            32 * MIB as u32,
            36 * MIB as u32 - 8,
        ];
        store_loop(&ram, &targets);
        run_to_out(&mut vcpu); // CPL0 prologue (its pushes write the stack page) and the first `out`

        let mut log = DirtyLog::start(&vm, &ram, manual).unwrap();
        assert_eq!(log.manual_protect(), manual);
        assert!(
            log.sync(&vm, &ram).unwrap().is_empty(),
            "nothing written since start"
        );

        ram.mem.write_obj(7u64, GuestAddress(0x30_0000)).unwrap(); // a VMM write
        run_to_out(&mut vcpu); // the guest's stores
        let t = log.sync(&vm, &ram).unwrap();
        let want: Vec<u64> = vec![0x300, 0x400, 0x401, 0x7ff, 0xfff, 0x2000, 0x23ff];
        assert_eq!(pages_of(&t), want);
        assert_eq!(t.len(), 6, "0x400 and 0x401 coalesce");
        assert!(
            log.sync(&vm, &ram).unwrap().is_empty(),
            "a second sync without writes is empty"
        );

        // Write protection was re-armed: the same stores are seen again.
        run_to_out(&mut vcpu);
        let t = log.sync(&vm, &ram).unwrap();
        assert_eq!(pages_of(&t), want[1..].to_vec());
        log.stop(&vm, &ram).unwrap();
        // Logging off: the guest runs on and nothing breaks.
        run_to_out(&mut vcpu);
    }

    #[test]
    fn dirty_log_manual_protect() {
        dirty_log_reports_exact_pages(true);
    }

    #[test]
    fn dirty_log_without_manual_protect() {
        dirty_log_reports_exact_pages(false);
    }

    #[test]
    fn vmm_writes_are_tracked_per_region() {
        let ram = GuestRam::with_ranges(&[(0, 2 * MIB), (4 * MIB, 2 * MIB)]).unwrap();
        let Some((_kvm, vm, _vcpu)) = tiny_vm(&ram, true) else {
            return;
        };
        let mut log = DirtyLog::start(&vm, &ram, true).unwrap();
        ram.mem.write_obj(1u8, GuestAddress(2 * MIB - 1)).unwrap(); // last byte of region 0
        ram.mem
            .write_slice(&[1u8; 8192], GuestAddress(6 * MIB - 8192))
            .unwrap(); // end of region 1
        ram.mem
            .write_obj(1u16, GuestAddress(4 * MIB + 4095))
            .unwrap(); // straddles two pages
        let t = log.sync(&vm, &ram).unwrap();
        assert_eq!(pages_of(&t), vec![0x1ff, 0x400, 0x401, 0x5fe, 0x5ff]);
        assert!(log.sync(&vm, &ram).unwrap().is_empty());
        log.stop(&vm, &ram).unwrap();
    }
}
