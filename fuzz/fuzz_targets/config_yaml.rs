//! The YAML configuration file, loaded and validated: see [`ergon_fuzz::targets::config_yaml`].
//! The body lives in the library so that `exporter/tests/fuzz_corpus.rs`
//! replays the corpus through the same code in plain `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ergon_fuzz::targets::config_yaml(data));
