//! Builds the kernel programs (`ergon-ebpf`) for bpfel-unknown-none and puts
//! the object in OUT_DIR, where `probe` includes it.
fn main() -> anyhow::Result<()> {
    // Pinned in rust-toolchain.toml; its LLVM must match bpf-linker's.
    let toolchain = std::env::var("AYA_EBPF_TOOLCHAIN").unwrap_or_else(|_| "1.95.0".into());
    // The stable toolchain needs -Z build-std=core for the bpf target.
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../exporter-ebpf");
    let root = root.to_str().expect("utf-8 path");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ergon-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
