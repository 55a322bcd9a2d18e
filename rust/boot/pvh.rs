//! Xen's PVH boot information: `hvm_start_info` (version 1) with the command line, the memory map
//! (the same e820 map as the zero page's), the RSDP and the initramfs as the one module. The BSP
//! starts at the ELF's PHYS32_ENTRY with EBX = `layout::PVH_START_INFO`.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::GuestAddress;

use crate::error::{Error, Kind, Result};
use crate::layout;
use crate::memory::GuestMem;

pub fn write_start_info(
    mem: &GuestMem,
    ram_size: u64,
    initramfs: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<()> {
    let memmap: Vec<hvm_memmap_table_entry> = layout::e820_map(ram_size)
        .into_iter()
        .map(|(addr, size, kind)| hvm_memmap_table_entry {
            addr,
            size,
            type_: kind,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout::CMDLINE,
        rsdp_paddr: rsdp,
        memmap_paddr: layout::PVH_MEMMAP,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let module = initramfs.map(|(paddr, size)| hvm_modlist_entry {
        paddr,
        size,
        ..Default::default()
    });
    if module.is_some() {
        info.nr_modules = 1;
        info.modlist_paddr = layout::PVH_MODLIST;
    }
    let mut params = BootParams::new(&info, GuestAddress(layout::PVH_START_INFO));
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP));
    if let Some(module) = module {
        params.set_modules(&[module], GuestAddress(layout::PVH_MODLIST));
    }
    PvhBootConfigurator::write_bootparams::<GuestMem>(&params, mem)
        .map_err(|e| Error::new(Kind::Payload, format!("writing the PVH start info: {e}")))
}

// The memory map (at most six entries: two RAM ranges) ends below the zero page's page.
const _: () = assert!(layout::PVH_MEMMAP + 24 * 6 <= layout::ZERO_PAGE);

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn start_info_layout() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        write_start_info(&mem, 64 << 20, Some((0x300_0000, 0x1234)), 0xe0000).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_START_INFO)).unwrap();
        assert_eq!(
            (info.magic, info.version, info.nr_modules),
            (0x336e_c578, 1, 1)
        );
        assert_eq!(
            (info.cmdline_paddr, info.rsdp_paddr, info.modlist_paddr),
            (layout::CMDLINE, 0xe0000, layout::PVH_MODLIST)
        );
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(layout::PVH_MODLIST)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x1234));
        let map = layout::e820_map(64 << 20);
        assert_eq!(info.memmap_entries as usize, map.len());
        assert!(layout::e820_map(8 << 30).len() <= 6);
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(
                layout::PVH_MEMMAP + 24 * (map.len() as u64 - 1),
            ))
            .unwrap();
        assert_eq!((last.addr, last.size, last.type_), map[map.len() - 1]);
        // No initramfs: no module list.
        write_start_info(&mem, 64 << 20, None, 0xe0000).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_START_INFO)).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
    }
}
