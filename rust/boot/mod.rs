//! Boot path: load a payload (the embedded test guest, an ELF vmlinux or a bzImage), write the
//! zero page, command line, e820 map and ACPI tables, and set up vCPUs for the 64-bit entry.

pub mod cpu_setup;
pub mod payload;
pub mod zero_page;
