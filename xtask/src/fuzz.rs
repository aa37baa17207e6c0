//! `cargo xtask fuzz [--seconds N] [--dev] [TARGET…]`: runs each cargo-fuzz target
//! of `fuzz/` (libFuzzer) for N seconds (default 60), seeded with the corpus
//! kept in the repository, under AddressSanitizer and with memory limits, so
//! a panic, an overflow or an unbounded allocation on any host input fails.
//!
//! The pinned stable toolchain builds the sanitizers with
//! `RUSTC_BOOTSTRAP=1` (cargo-fuzz passes `-Zsanitizer`), so no nightly is
//! needed. New inputs found during a run go to `target/fuzz-found/`, not
//! into the repository's corpus: the corpus grows only by hand, with inputs
//! worth keeping (`cargo fuzz cmin` first). A crash is written to
//! `fuzz/artifacts/<target>/` and the run stops there, naming the command
//! that reproduces it.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{TOOLCHAIN, root, run};

/// Per-run limits: a parser of a few files must not need more.
const RSS_LIMIT_MB: u32 = 2048;
const MALLOC_LIMIT_MB: u32 = 256;
/// One input taking longer than this is a hang.
const INPUT_TIMEOUT_S: u32 = 10;

fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("cargo");
    // `cargo xtask` runs this under `cargo run`, whose variables (CARGO_*,
    // LD_LIBRARY_PATH, the toolchain) would make cargo-fuzz rebuild every
    // instrumented dependency that a run from a shell already built.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if (name.starts_with("CARGO") && name != "CARGO_HOME")
            || name.starts_with("RUSTUP_TOOLCHAIN")
            || name == "RUST_RECURSION_COUNT"
            || name == "LD_LIBRARY_PATH"
        {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd.arg(format!("+{TOOLCHAIN}"))
        .arg("fuzz")
        .current_dir(root())
        // cargo-fuzz passes -Zsanitizer and -Zcoverage options.
        .env("RUSTC_BOOTSTRAP", "1");
    cmd
}

pub fn run_all(args: &[String]) -> Result<()> {
    let mut seconds: u32 = 60;
    // `--dev`: unoptimised instrumented builds. The smoke of `cargo xtask
    // test` runs each target for seconds, where compiling the optimised
    // tree would take longer than the fuzzing.
    let mut profile = "--release";
    let mut targets: Vec<String> = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                let value = args
                    .next()
                    .context("--seconds needs a number, e.g. --seconds 10")?;
                seconds = value
                    .parse()
                    .ok()
                    .filter(|s| (1..=86_400).contains(s))
                    .with_context(|| {
                        format!("--seconds `{value}`: use a whole number from 1 to 86400")
                    })?;
            }
            "--dev" => profile = "--dev",
            other if other.starts_with('-') => {
                bail!(
                    "cargo xtask fuzz: unknown option `{other}`; use --seconds N [--dev] [TARGET…]"
                )
            }
            target => targets.push(target.to_owned()),
        }
    }
    let listed = cargo_fuzz().arg("list").output();
    let listed = match listed {
        Ok(output) if output.status.success() => output,
        _ => bail!(
            "cargo-fuzz is not installed for toolchain {TOOLCHAIN}: run \
             `cargo install cargo-fuzz --locked`"
        ),
    };
    let known: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    if targets.is_empty() {
        targets = known.clone();
    }
    if let Some(unknown) = targets.iter().find(|t| !known.contains(t)) {
        bail!(
            "no fuzz target `{unknown}`; the targets are: {}",
            known.join(", ")
        );
    }
    run(cargo_fuzz().args(["build", profile, "--debug-assertions"]))
        .context("building the fuzz targets")?;
    for target in &targets {
        let corpus = root().join("fuzz/corpus").join(target);
        // New inputs land here, outside the repository, and are cleared
        // before each run.
        let found = root().join("target/fuzz-found").join(target);
        let _ = std::fs::remove_dir_all(&found);
        std::fs::create_dir_all(&found).with_context(|| format!("creating {}", found.display()))?;
        let artifacts = root().join("fuzz/artifacts").join(target);
        std::fs::create_dir_all(&artifacts)
            .with_context(|| format!("creating {}", artifacts.display()))?;
        let result = run(cargo_fuzz()
            .args(["run", profile, "--debug-assertions", target])
            .arg(&found)
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg(format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1"));
        if let Err(e) = result {
            bail!(
                "fuzz target `{target}` failed ({e}): the input is in {}; reproduce with \
                 `RUSTC_BOOTSTRAP=1 cargo fuzz run {target} <that file>`, fix the parser and \
                 add the input as a regression test",
                artifacts.display()
            );
        }
    }
    eprintln!(
        "fuzz: {} targets ran {seconds} s each without a finding",
        targets.len()
    );
    Ok(())
}

/// The smoke of `cargo xtask test` (`cargo xtask fuzz --seconds 5 --dev`),
/// run as a child at the lowest priority beside the e2e, its output in
/// `target/fuzz-smoke.log` (printed when it fails, its last line when not).
pub struct Smoke {
    child: std::io::Result<std::process::Child>,
    log: PathBuf,
    started: std::time::Instant,
}

impl Smoke {
    pub fn start() -> Smoke {
        let log = root().join("target/fuzz-smoke.log");
        let child = std::fs::File::create(&log).and_then(|file| {
            let exe = std::env::current_exe()?;
            eprintln!(
                "fuzz smoke: started beside the e2e at low priority (log: {})",
                log.display()
            );
            Command::new("nice")
                .args(["-n", "19"])
                .arg(exe)
                .args(["fuzz", "--seconds", "5", "--dev"])
                .current_dir(root())
                .stdin(std::process::Stdio::null())
                .stdout(file.try_clone()?)
                .stderr(file)
                .spawn()
        });
        Smoke {
            child,
            log,
            started: std::time::Instant::now(),
        }
    }

    pub fn wait(self) -> Result<()> {
        let status = self
            .child
            .and_then(|mut child| child.wait())
            .context("running the fuzz smoke (`cargo xtask fuzz --seconds 5 --dev`)")?;
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if status.success() {
            eprintln!(
                "fuzz smoke: {} ({:.0} s after it started)",
                lines.last().copied().unwrap_or("no output"),
                self.started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        eprintln!("----- last 60 lines of {} -----", self.log.display());
        for line in &lines[lines.len().saturating_sub(60)..] {
            eprintln!("{line}");
        }
        bail!(
            "`cargo xtask fuzz --seconds 5 --dev` failed ({status}); its log: {}",
            self.log.display()
        )
    }
}
