//! The YAML configuration file, through the same parser the flags use.
#![no_main]

use clap::Parser;
use ergon::config::{Cli, settings_from_yaml};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(args) = settings_from_yaml(text, |_| false) else {
        return;
    };
    let Ok(cli) = Cli::try_parse_from(std::iter::once("ergon".to_owned()).chain(args)) else {
        return;
    };
    let _ = cli.idle_watts();
    let _ = cli.pod_label_keys();
});
