//! The recording and alerting rules (`daemonset/rules/ergon.rules.yaml`)
//! through promtool: syntax, unit tests, the promised names; and promtool as
//! the PromQL parser of other checks.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::common::*;

pub fn rules_path() -> PathBuf {
    repo_root().join("daemonset/rules/ergon.rules.yaml")
}

#[test]
pub fn promtool_accepts_the_rules() {
    let output = run_ok(
        Command::new(tool("promtool"))
            .args(["check", "rules"])
            .arg(rules_path()),
    );
    assert!(output.contains("SUCCESS"), "{output}");
}

/// The CO2e rules' arithmetic (joules / 3.6e6 × gCO2e/kWh, per pod,
/// namespace and node) and the alerts that need more than a name
/// (the probe's overflow, a stalled measurement) against known series:
/// tests/rules/*.test.yaml.
#[test]
pub fn promtool_rule_unit_tests_pass() {
    for file in ["carbon.test.yaml", "probe.test.yaml", "stalled.test.yaml"] {
        let output = run_ok(
            Command::new(tool("promtool"))
                .args(["test", "rules"])
                .arg(repo_root().join("tests/rules").join(file)),
        );
        assert!(output.contains("SUCCESS"), "{file}: {output}");
    }
}

#[test]
pub fn rules_have_the_promised_records_and_alerts() {
    let rules = rule_expressions(&rules_path());
    let names: BTreeSet<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    for expected in [
        "namespace:ergon_pod_energy_kwh:increase1d",
        "pod:ergon_pod_co2e_grams_per_second:rate5m",
        "namespace:ergon_pod_co2e_grams:increase1d",
        "instance:ergon_node_co2e_grams:increase1d",
        "ErgonCarbonIntensityStale",
        "ErgonExporterDown",
        "ErgonMeterDown",
        "ErgonProbeFellBackToProcfs",
        "ErgonMeasurementStalled",
        "ErgonProbeOverflow",
    ] {
        assert!(
            names.contains(expected),
            "rule {expected} missing: {names:?}"
        );
    }
}

/// Writes each expression as a recording rule and lets promtool parse them:
/// the real PromQL parser, not a pattern.
pub fn promtool_check_expressions(expressions: &[(String, String)]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let rules: Vec<Value> = expressions
        .iter()
        .enumerate()
        .map(|(index, (_, expr))| json!({"record": format!("check:dashboard_query_{index}"), "expr": expr}))
        .collect();
    let file = dir.path().join("dashboard-queries.rules.yaml");
    let text =
        serde_yaml::to_string(&json!({"groups": [{"name": "dashboard-queries", "rules": rules}]}))
            .expect("serialise rules");
    fs::write(&file, text).expect("write rules");
    let output = run_command(
        Command::new(tool("promtool"))
            .args(["check", "rules"])
            .arg(&file),
        None,
    );
    if !output.status.success() {
        let listing: Vec<String> = expressions
            .iter()
            .enumerate()
            .map(|(i, (where_, expr))| format!("  {i}: {where_}: {expr}"))
            .collect();
        panic!(
            "promtool rejects dashboard queries:\n{}{}\nqueries:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            listing.join("\n")
        );
    }
}

/// One rule of a Prometheus rule file.
#[derive(Clone, Debug)]
pub struct RuleExpression {
    /// The recorded metric or the alert's name.
    pub name: String,
    pub is_alert: bool,
    pub expr: String,
}

/// Every rule of a Prometheus rule file.
pub fn rule_expressions(path: &Path) -> Vec<RuleExpression> {
    let file: Value = serde_yaml::from_str(&fs::read_to_string(path).expect("rules file"))
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let mut rules = Vec::new();
    for group in file["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            let (name, is_alert) = match (rule["record"].as_str(), rule["alert"].as_str()) {
                (Some(record), _) => (record, false),
                (None, Some(alert)) => (alert, true),
                (None, None) => panic!("{}: rule with neither record nor alert", path.display()),
            };
            rules.push(RuleExpression {
                name: name.to_string(),
                is_alert,
                expr: rule["expr"].as_str().expect("rule expr").to_string(),
            });
        }
    }
    rules
}

pub fn recording_rule_names() -> BTreeSet<String> {
    rule_expressions(&rules_path())
        .into_iter()
        .filter(|r| !r.is_alert)
        .map(|r| r.name)
        .collect()
}
