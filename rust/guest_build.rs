//! Builds vmmpy's test guest (guest/: freestanding x86-64 C and GNU assembly) with the system C
//! compiler. Meant to be included by the crate's build script:
//!
//! ```ignore
//! #[path = "guest_build.rs"]
//! mod guest_build;
//! let elf = guest_build::build_test_guest(&out_dir, &manifest_dir.join("guest"));
//! ```
//!
//! Only std: the build script needs no crates for this.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Name of the produced ELF inside `out_dir`.
pub const TEST_GUEST_ELF: &str = "testguest.elf";

/// Compiler and linker flags for the guest (the linker script is added separately with `-T`).
///
/// * freestanding, static, non-PIE: linked at physical 0x100000 by guest/guest.ld;
/// * `-mgeneral-regs-only`: the guest never enables SSE (CR4.OSFXSR stays as the VMM left it), so
///   the compiler must not emit SSE/AVX;
/// * `-mno-red-zone`, no stack protector, no unwind tables, no CET `endbr64`;
/// * `-fno-builtin`: memset/memcpy come from the guest itself;
/// * `--build-id=none`, `-z noexecstack`, `-z max-page-size=4096`: no stray notes or 2 MiB
///   segment padding in the image.
pub const GUEST_CFLAGS: &[&str] = &[
    "-O2",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-ffreestanding",
    "-fno-pie",
    "-no-pie",
    "-nostdlib",
    "-static",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-fno-builtin",
    "-Wl,--build-id=none",
    "-z",
    "noexecstack",
    "-z",
    "max-page-size=4096",
];

/// Compiles guest/*.c and guest/*.S into `out_dir/testguest.elf` and returns its path. Panics, with
/// the compiler's command line and output, when the build fails. Emits `cargo:rerun-if-changed`
/// for every guest file, so the guest is rebuilt exactly when it changes.
pub fn build_test_guest(out_dir: &Path, guest_dir: &Path) -> PathBuf {
    println!("cargo:rerun-if-env-changed=CC");
    // the directory itself: a source file added or removed
    println!("cargo:rerun-if-changed={}", guest_dir.display());

    let mut sources = Vec::new();
    let entries = std::fs::read_dir(guest_dir)
        .unwrap_or_else(|e| panic!("test guest: cannot read {}: {e}", guest_dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("test guest: reading {}: {e}", guest_dir.display()))
            .path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if matches!(ext, "c" | "S" | "h" | "ld") {
            println!("cargo:rerun-if-changed={}", path.display());
        }
        if matches!(ext, "c" | "S") {
            sources.push(path);
        }
    }
    sources.sort();
    if sources.is_empty() {
        panic!("test guest: no *.c or *.S files in {}", guest_dir.display());
    }
    let script = guest_dir.join("guest.ld");
    if !script.is_file() {
        panic!("test guest: linker script {} is missing", script.display());
    }

    // CC may carry a wrapper and arguments, e.g. "ccache gcc".
    let cc_var = std::env::var("CC")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "cc".into());
    let mut cc_words = cc_var.split_whitespace();
    let cc = cc_words.next().unwrap_or("cc").to_string();

    std::fs::create_dir_all(out_dir)
        .unwrap_or_else(|e| panic!("test guest: cannot create {}: {e}", out_dir.display()));
    let out = out_dir.join(TEST_GUEST_ELF);
    let _ = std::fs::remove_file(&out);

    let mut cmd = Command::new(&cc);
    cmd.args(cc_words)
        .args(GUEST_CFLAGS)
        .arg("-I")
        .arg(guest_dir)
        .arg("-T")
        .arg(&script)
        .arg("-o")
        .arg(&out)
        .args(&sources);
    let shown = format!("{cmd:?}");
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("test guest: cannot run the C compiler `{cc}` (set CC to override): {e}\ncommand: {shown}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!(
            "test guest: the C compiler failed ({})\ncommand: {shown}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            stderr
        );
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=test guest: {line}");
    }

    let image = std::fs::read(&out)
        .unwrap_or_else(|e| panic!("test guest: {} was not produced: {e}", out.display()));
    if image.len() < 64 || &image[..4] != b"\x7fELF" || image[4] != 2 {
        panic!("test guest: {} is not an ELF64 file", out.display());
    }
    if !image.windows(6).any(|w| w == b"vmmpy\0") {
        panic!(
            "test guest: {} lacks the `vmmpy` ELF note (AP entry); check guest/guest.ld",
            out.display()
        );
    }
    out
}
