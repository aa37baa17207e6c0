//! Every input kept in `fuzz/corpus/<target>/`, replayed through the same
//! function its libFuzzer target runs (`fuzz/src/targets.rs`, included here
//! as a module), so plain `cargo test` — and so `cargo xtask test` — catches
//! a regression on a known input without cargo-fuzz, a nightly feature or
//! a sanitizer build. The fuzzing itself (new inputs, AddressSanitizer,
//! memory limits) stays `cargo xtask fuzz`.

#[path = "../../fuzz/src/lib.rs"]
mod ergon_fuzz;

use std::path::{Path, PathBuf};

use ergon_fuzz::targets;

/// A target's body: libFuzzer's input in, a panic on a finding.
type Target = fn(&[u8]);

/// Each target of `fuzz/Cargo.toml` and the function its body is.
const TARGETS: &[(&str, Target)] = &[
    ("powercap", targets::powercap),
    ("hwmon", targets::hwmon),
    ("perf_power", targets::perf_power),
    ("procfs", targets::procfs),
    ("cgroup_path", targets::cgroup_path),
    ("checkpoint", targets::checkpoint),
    ("config_yaml", targets::config_yaml),
];

fn fuzz_dir() -> PathBuf {
    let exporter = Path::new(env!("CARGO_MANIFEST_DIR"));
    exporter.parent().unwrap_or(exporter).join("fuzz")
}

/// The `[[bin]]` names of `fuzz/Cargo.toml`: the targets `cargo fuzz` knows.
fn declared_targets() -> Vec<String> {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    let mut names = Vec::new();
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(name) = line.strip_prefix("name = ") {
            names.push(name.trim_matches('"').to_owned());
        }
    }
    names.sort();
    names
}

#[test]
fn every_fuzz_target_is_replayed_and_has_a_corpus() {
    let mut replayed: Vec<String> = TARGETS.iter().map(|(name, _)| name.to_string()).collect();
    replayed.sort();
    assert_eq!(
        declared_targets(),
        replayed,
        "fuzz/Cargo.toml's targets and this test's list differ: add the new target's \
         function to TARGETS"
    );
    for (name, _) in TARGETS {
        let corpus = fuzz_dir().join("corpus").join(name);
        let inputs = std::fs::read_dir(&corpus)
            .unwrap_or_else(|e| panic!("{}: {e}", corpus.display()))
            .count();
        assert!(inputs > 0, "{} is empty", corpus.display());
        assert!(
            fuzz_dir()
                .join("fuzz_targets")
                .join(format!("{name}.rs"))
                .is_file(),
            "no fuzz_targets/{name}.rs"
        );
    }
}

#[test]
fn every_corpus_input_runs_through_its_target_without_a_panic() {
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (name, target) in TARGETS {
        let corpus = fuzz_dir().join("corpus").join(name);
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(&corpus)
            .unwrap_or_else(|e| panic!("{}: {e}", corpus.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        inputs.sort();
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&data));
            replayed += 1;
            if outcome.is_err() {
                let file = input.file_name().unwrap_or_default().to_string_lossy();
                failures.push(format!(
                    "fuzz/corpus/{name}/{file}: reproduce under the sanitizer with \
                     `RUSTC_BOOTSTRAP=1 cargo fuzz run {name} fuzz/corpus/{name}/{file}`"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {replayed} corpus inputs panicked (the panic is printed above):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
