//! Boot path: load a payload (the embedded test guest, an ELF vmlinux or a bzImage), write the
//! boot information (the zero page for the 64-bit entry, `hvm_start_info` for PVH), command line,
//! e820 map and ACPI tables, and set up vCPUs for the chosen entry.

pub mod cpu_setup;
pub mod payload;
pub mod pvh;
pub mod zero_page;
