//! Builds the test guest (guest/) with the system C compiler; the crate embeds the ELF.

#[path = "guest_build.rs"]
mod guest_build;

fn main() {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let guest_dir =
        std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("guest");
    guest_build::build_test_guest(&out_dir, &guest_dir);
}
