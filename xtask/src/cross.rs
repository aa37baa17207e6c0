//! arm64: the exporter cross-built for `aarch64-unknown-linux-gnu`, and its
//! unit tests run under qemu-user.
//!
//! Edge nodes are often ARM. Nothing here can fetch a prebuilt aarch64
//! standard library (`rustup target add` reaches no server), so the standard
//! library is built from the pinned toolchain's `rust-src` with
//! `-Z build-std` (allowed on stable by `RUSTC_BOOTSTRAP=1`, as the kernel
//! crate's build already is). Debian's `gcc-aarch64-linux-gnu` links, and
//! compiles the C and assembly of dependencies such as `ring`; Debian's
//! `qemu-user` runs the test binaries with the cross sysroot's loader. The
//! eBPF object is the same bytes on both architectures: it is built once for
//! `bpfel-unknown-none` by `exporter/build.rs` and embedded as data.
//!
//! The cross builds have their own target directory, `target/cross`.
//! `RUSTC_BOOTSTRAP=1` is in the environment of their host build scripts,
//! and some (proc-macro2's) rerun when it changes: sharing `target/` made
//! every cross build dirty the host's proc-macros, and the next host `cargo
//! test` (the e2e's cluster tests) compiled tokio, hyper and serde again
//! (81 s in CI). The cross build compiles its host build scripts and
//! proc-macros itself now: measured cold, the arm64 step took 461 s against
//! 397 s before, the e2e 351 s against 480 s.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub const AARCH64: &str = "aarch64-unknown-linux-gnu";

/// Debian packages the cross build and the emulated tests need.
pub const APT_PACKAGES: &[&str] = &[
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "qemu-user",
];

/// The unit tests under emulation take a few minutes; a hung emulated
/// process must not hold CI for its whole budget.
const TEST_TIME_LIMIT: Duration = Duration::from_secs(15 * 60);

/// A `cargo` command set up to build for `target`.
pub fn cargo_for(target: &str) -> Result<Command> {
    if target != AARCH64 {
        bail!(
            "cross-building is set up for {AARCH64} only (got `{target}`); the host build is \
             `cargo xtask build`"
        );
    }
    let mut cmd = super::cargo();
    let env_target = target.replace('-', "_");
    let linker = "aarch64-linux-gnu-gcc";
    let runner = "qemu-aarch64 -L /usr/aarch64-linux-gnu";
    cmd.env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", target_dir())
        .env(format!("CC_{env_target}"), linker)
        .env(format!("AR_{env_target}"), "aarch64-linux-gnu-ar")
        .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", linker)
        .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER", runner)
        // Tests that re-run their own binary in a child need the emulator
        // too (binfmt_misc is not registered here).
        .env("ERGON_TEST_RUNNER", runner);
    Ok(cmd)
}

/// Where the cross builds put their artifacts (see the module's docs).
pub fn target_dir() -> PathBuf {
    super::root().join("target/cross")
}

fn build_std_args(target: &str) -> [String; 3] {
    [
        "-Zbuild-std=std,panic_abort".into(),
        "--target".into(),
        target.into(),
    ]
}

/// `cargo xtask build --target T`: the release binary for `T`.
pub fn build(target: &str) -> Result<()> {
    let mut cmd = cargo_for(target)?;
    cmd.arg("build").args(build_std_args(target)).args([
        "--release",
        "-p",
        "ergon",
        "--bin",
        "ergon",
    ]);
    super::run(&mut cmd).with_context(|| format!("cross-building ergon for {target}"))?;
    eprintln!(
        "built {}",
        target_dir()
            .join(format!("{target}/release/ergon"))
            .display()
    );
    Ok(())
}

/// The exporter for aarch64 in the dev profile, the one `cargo xtask test`
/// builds everything in: what the e2e puts in the arm64 image it builds from
/// the Containerfile.
///
/// Built the way `cargo test` builds the binary its integration tests run
/// (`--test log_output --no-run`, the smallest of them), not by `cargo
/// build`: a test build unifies the dev-dependencies' features (the
/// testkit's tokio, hyper and rustls features), so this reuses every
/// dependency the unit tests just compiled, where `cargo build` would
/// compile a third of them again with fewer features (minutes under
/// `-Z build-std`).
pub fn build_dev() -> Result<PathBuf> {
    let mut cmd = cargo_for(AARCH64)?;
    cmd.arg("test").args(build_std_args(AARCH64)).args([
        "-p",
        "ergon",
        "--test",
        "log_output",
        "--no-run",
    ]);
    super::run(&mut cmd).with_context(|| format!("cross-building ergon for {AARCH64}"))?;
    Ok(target_dir().join(format!("{AARCH64}/debug/ergon")))
}

/// The exporter's unit tests, built for aarch64 and run under qemu-user.
/// Their `test result:` lines go through the same tally as the host tests.
pub fn unit_tests(tally: &mut super::Tally) -> Result<bool> {
    let mut cmd = cargo_for(AARCH64)?;
    cmd.arg("test")
        .args(build_std_args(AARCH64))
        .args(["-p", "ergon", "--lib"]);
    super::run_tests(&mut cmd, tally, Some(TEST_TIME_LIMIT))
}
