//! The Grafana dashboards (`dashboards/*.json`): their queries and template
//! variables extracted, filled as Grafana fills them, parsed by promtool, and
//! checked to use only known metrics and to be provisionable.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::common::*;
use crate::metrics::metric_origin;
use crate::promql::promql_metric_names;
use crate::rules::{promtool_check_expressions, recording_rule_names, rule_expressions};
use crate::stack::{PIPELINE_COMPONENTS, PIPELINE_NAMESPACE};

/// One PromQL query of a dashboard panel.
#[derive(Clone, Debug)]
pub struct PanelQuery {
    pub dashboard: String,
    pub panel: String,
    pub ref_id: String,
    /// As written, with Grafana template variables.
    pub expr: String,
    /// The series' legend, as written (`{{component}}`, `redis`).
    pub legend: String,
}

impl PanelQuery {
    pub fn location(&self) -> String {
        format!("{} / {} / {}", self.dashboard, self.panel, self.ref_id)
    }
}

/// A dashboard template variable.
#[derive(Clone, Debug)]
pub struct TemplateVariable {
    pub dashboard: String,
    pub name: String,
    /// Grafana's type: query, custom, textbox, constant, datasource.
    pub kind: String,
    /// For query variables, the `label_values(...)` definition; otherwise
    /// the current (default) value.
    pub query: String,
    pub include_all: bool,
}

pub fn dashboard_files(repo: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(repo.join("dashboards"))
        .expect("dashboards/ exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

pub fn load_dashboard(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).expect("readable dashboard"))
        .unwrap_or_else(|error| panic!("{}: invalid JSON: {error}", path.display()))
}

pub fn dashboard_panels(dashboard: &Value) -> Vec<&Value> {
    let mut panels = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        panels.push(panel);
        // Collapsed rows keep their panels inside.
        panels.extend(panel["panels"].as_array().into_iter().flatten());
    }
    panels
}

/// Every PromQL query in dashboards/*.json, with template variables as
/// written. Call [`substitute_template_variables`] to fill them.
pub fn dashboard_queries(repo: &Path) -> Vec<PanelQuery> {
    let mut queries = Vec::new();
    for file in dashboard_files(repo) {
        let dashboard = load_dashboard(&file);
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        for panel in dashboard_panels(&dashboard) {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    queries.push(PanelQuery {
                        dashboard: name.clone(),
                        panel: panel["title"].as_str().unwrap_or("").to_string(),
                        ref_id: target["refId"].as_str().unwrap_or("").to_string(),
                        expr: expr.to_string(),
                        legend: target["legendFormat"].as_str().unwrap_or("").to_string(),
                    });
                }
            }
        }
    }
    queries
}

/// Every template variable of dashboards/*.json.
pub fn dashboard_variables(repo: &Path) -> Vec<TemplateVariable> {
    let mut variables = Vec::new();
    for file in dashboard_files(repo) {
        let dashboard = load_dashboard(&file);
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        for variable in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let kind = variable["type"].as_str().unwrap_or("").to_string();
            let query = match kind.as_str() {
                "query" => variable["definition"]
                    .as_str()
                    .or_else(|| variable["query"]["query"].as_str())
                    .or_else(|| variable["query"].as_str())
                    .unwrap_or("")
                    .to_string(),
                _ => variable["current"]["value"]
                    .as_str()
                    .or_else(|| variable["query"].as_str())
                    .unwrap_or("")
                    .to_string(),
            };
            variables.push(TemplateVariable {
                dashboard: name.clone(),
                name: variable["name"].as_str().unwrap_or("").to_string(),
                kind,
                query,
                include_all: variable["includeAll"].as_bool().unwrap_or(false),
            });
        }
    }
    variables
}

/// Values for Grafana's built-in variables that a panel query may use.
pub fn builtin_variable_values() -> BTreeMap<String, String> {
    [
        ("__rate_interval", "1m"),
        ("__interval", "15s"),
        ("__range", "5m"),
        ("__range_s", "300"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Fills Grafana template variables (`$name`, `${name}`, `${name:format}`,
/// `[[name]]`) from `values`. Unknown names are left as written, as Grafana
/// does (so `$1` in a `label_replace` replacement survives).
pub fn substitute_template_variables(expr: &str, values: &BTreeMap<String, String>) -> String {
    let bytes = expr.as_bytes();
    let mut out = String::with_capacity(expr.len());
    let mut i = 0;
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    while i < bytes.len() {
        let rest = &expr[i..];
        if let Some(inner) = rest.strip_prefix("${") {
            if let Some(end) = inner.find('}') {
                let name = inner[..end].split(':').next().unwrap_or("");
                if let Some(value) = values.get(name) {
                    out.push_str(value);
                    i += 2 + end + 1;
                    continue;
                }
            }
        } else if let Some(inner) = rest.strip_prefix("[[") {
            if let Some(end) = inner.find("]]") {
                let name = inner[..end].split(':').next().unwrap_or("");
                if let Some(value) = values.get(name) {
                    out.push_str(value);
                    i += 2 + end + 2;
                    continue;
                }
            }
        } else if let Some(after) = rest.strip_prefix('$') {
            let len = after.bytes().take_while(|&b| is_word(b)).count();
            let name = &after[..len];
            if let Some(value) = values.get(name) {
                out.push_str(value);
                i += 1 + len;
                continue;
            }
        }
        let ch = rest.chars().next().unwrap();
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// Sample values for every variable, for checks without a live Prometheus:
/// query variables get `.*`-style matches (or a sample name where a single
/// value is needed), others their default.
pub fn sample_variable_values(
    variables: &[TemplateVariable],
    dashboard: &str,
) -> BTreeMap<String, String> {
    let mut values = builtin_variable_values();
    for variable in variables.iter().filter(|v| v.dashboard == dashboard) {
        let value = match variable.kind.as_str() {
            "datasource" => "prometheus".to_string(),
            "query" if variable.include_all => ".*".to_string(),
            "query" => format!("sample-{}", variable.name),
            _ => variable.query.clone(),
        };
        values.insert(variable.name.clone(), value);
    }
    values
}

/// The selector of a Grafana `label_values(selector, label)` variable query.
pub fn label_values_selector(definition: &str) -> Option<&str> {
    let inner = definition
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    Some(inner.rsplit_once(',')?.0.trim())
}

/// The label of a Grafana `label_values(selector, label)` variable query.
pub fn label_values_label(definition: &str) -> Option<&str> {
    let inner = definition
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    Some(inner.rsplit_once(',')?.1.trim())
}

/// Every metric name the dashboards (with sample variable values) and the
/// rules use, with where each is used.
pub fn referenced_metric_names(repo: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let variables = dashboard_variables(repo);
    for query in dashboard_queries(repo) {
        let values = sample_variable_values(&variables, &query.dashboard);
        for name in promql_metric_names(&substitute_template_variables(&query.expr, &values)) {
            used.entry(name).or_default().insert(query.location());
        }
    }
    for variable in &variables {
        if variable.kind == "query" {
            let selector = label_values_selector(&variable.query).unwrap_or_else(|| {
                panic!(
                    "{}: variable {} is not label_values(selector, label)",
                    variable.dashboard, variable.name
                )
            });
            for name in promql_metric_names(selector) {
                used.entry(name).or_default().insert(format!(
                    "{} / variable {}",
                    variable.dashboard, variable.name
                ));
            }
        }
    }
    let rules = repo.join("daemonset/rules/ergon.rules.yaml");
    for rule in rule_expressions(&rules) {
        for name in promql_metric_names(&rule.expr) {
            used.entry(name)
                .or_default()
                .insert(format!("ergon.rules.yaml / {}", rule.name));
        }
    }
    used
}

/// One sample pod per pipeline component, named as its controller would
/// name it, in the pipeline namespace: what the end-to-end fixture must run
/// (as pod-shaped cgroups with matching Kubernetes metadata) for the
/// pipeline dashboard's queries to have data.
pub fn pipeline_pod_names() -> Vec<(String, String)> {
    PIPELINE_COMPONENTS
        .iter()
        .map(|component| {
            let pod = match *component {
                "inference" => "inference-predictor-5d8f7c9b4-x2k8q".to_string(),
                "influxdb" | "prometheus" | "minio" => format!("{component}-0"),
                "vehicle-api" | "redis" => format!("{component}-7xk2p"),
                _ => format!("{component}-6b8d9f5c7-q4w2z"),
            };
            (PIPELINE_NAMESPACE.to_string(), pod)
        })
        .collect()
}

#[test]
pub fn query_extraction_finds_every_dashboard_query() {
    let repo = repo_root();
    let queries = dashboard_queries(&repo);
    let dashboards: BTreeSet<&str> = queries.iter().map(|q| q.dashboard.as_str()).collect();
    assert_eq!(
        dashboards,
        BTreeSet::from([
            "ergon-cluster-overview.json",
            "ergon-exporter-health.json",
            "ergon-pod-drilldown.json",
            "ergon-vehicle-pipeline.json",
        ])
    );
    // Count the targets independently of the extractor: every non-row panel
    // has targets and each has an expr.
    let mut expected = 0;
    for file in dashboard_files(&repo) {
        for panel in dashboard_panels(&load_dashboard(&file)) {
            if panel["type"] == "row" {
                continue;
            }
            let targets = panel["targets"].as_array().unwrap_or_else(|| {
                panic!(
                    "{}: panel {} has no targets",
                    file.display(),
                    panel["title"]
                )
            });
            assert!(
                !targets.is_empty(),
                "{}: panel {} has no query",
                file.display(),
                panel["title"]
            );
            expected += targets.len();
        }
    }
    assert_eq!(queries.len(), expected);
    let variables = dashboard_variables(&repo);
    for query in &queries {
        let values = sample_variable_values(&variables, &query.dashboard);
        let filled = substitute_template_variables(&query.expr, &values);
        assert!(
            !filled.contains("$__") && !filled.contains("${") && !filled.contains("[["),
            "{}: unfilled variable in `{filled}`",
            query.location()
        );
        for word in filled.split('$').skip(1) {
            assert!(
                word.starts_with(|c: char| c.is_ascii_digit()),
                "{}: unknown variable ${word} in `{}`",
                query.location(),
                query.expr
            );
        }
        assert!(
            !promql_metric_names(&filled).is_empty(),
            "{}: selects no metric: `{filled}`",
            query.location()
        );
    }
}

#[test]
pub fn substitution_and_metric_name_extraction_handle_grafana_and_promql_forms() {
    let values: BTreeMap<String, String> = [
        ("instance", "node-a"),
        ("__rate_interval", "1m"),
        ("pod", "p"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(
        substitute_template_variables(
            r#"rate(x{instance=~"$instance",pod="${pod:regex}",c="[[pod]]"}[$__rate_interval]) $1 $unknown"#,
            &values
        ),
        r#"rate(x{instance=~"node-a",pod="p",c="p"}[1m]) $1 $unknown"#
    );
    let names = promql_metric_names(
        r#"sum by (namespace, pod) (rate(a_total{l="b_total"}[5m] offset 1h)) / on(namespace) group_left(x) b:rule:rate5m * 3.6e6 or vector(0) > bool 1 and c"#,
    );
    assert_eq!(
        names,
        BTreeSet::from([
            "a_total".to_string(),
            "b:rule:rate5m".to_string(),
            "c".to_string()
        ])
    );
    let names = promql_metric_names(
        r#"label_replace(rate(m{pod=~"(a|b)-.*"}[1m]), "component", "$1", "pod", "(a|b)-.*") / sum without (cpu) (count(n))"#,
    );
    assert_eq!(names, BTreeSet::from(["m".to_string(), "n".to_string()]));
}

#[test]
pub fn dashboards_use_only_known_metrics() {
    let repo = repo_root();
    let recording = recording_rule_names();
    let used = referenced_metric_names(&repo);
    let mut unknown = Vec::new();
    for (name, places) in &used {
        match metric_origin(name, &recording) {
            None => unknown.push(format!("{name} (used in {places:?})")),
            Some(_) if name.starts_with("kepler_") => unknown.push(format!(
                "{name}: Kepler compat names are opt-in, dashboards must not need them ({places:?})"
            )),
            Some(_) => {}
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics nothing produces:\n{}",
        unknown.join("\n")
    );
    // Every dashboard reads the exporter.
    assert!(used.contains_key("ergon_pod_energy_joules_total"));
    assert!(used.contains_key("ergon_probe_info") && used.contains_key("ergon_meter_up"));
}

#[test]
pub fn promtool_parses_every_dashboard_query() {
    let repo = repo_root();
    let variables = dashboard_variables(&repo);
    let expressions: Vec<(String, String)> = dashboard_queries(&repo)
        .into_iter()
        .map(|query| {
            let values = sample_variable_values(&variables, &query.dashboard);
            (
                query.location(),
                substitute_template_variables(&query.expr, &values),
            )
        })
        .collect();
    promtool_check_expressions(&expressions);
}

#[test]
pub fn dashboards_are_provisionable_and_mark_estimates() {
    let repo = repo_root();
    let kustomization: Value = serde_yaml::from_str(
        &fs::read_to_string(repo.join("dashboards/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let packaged: BTreeSet<String> = kustomization["configMapGenerator"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["files"].as_array().unwrap().iter())
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    let mut uids = BTreeSet::new();
    for file in dashboard_files(&repo) {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            packaged.contains(&name),
            "{name} is not in dashboards/kustomization.yaml"
        );
        let dashboard = load_dashboard(&file);
        let uid = dashboard["uid"]
            .as_str()
            .expect("dashboard uid")
            .to_string();
        assert!(uids.insert(uid.clone()), "dashboard uid {uid} used twice");
        let mut marks_estimates = false;
        for panel in dashboard_panels(&dashboard) {
            if panel["type"] == "row" {
                continue;
            }
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{name}: panel {} must use the datasource variable",
                panel["title"]
            );
            let shows_source = panel["targets"].as_array().into_iter().flatten().any(|t| {
                t["legendFormat"]
                    .as_str()
                    .is_some_and(|l| l.contains("{{source}}"))
            });
            let has_model_override = panel["fieldConfig"]["overrides"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|o| {
                    o["matcher"]["options"]
                        .as_str()
                        .is_some_and(|m| m.contains("model"))
                });
            assert!(
                !shows_source || has_model_override,
                "{name}: panel {} shows series by source without marking source=model as an estimate",
                panel["title"]
            );
            let text = panel.to_string();
            marks_estimates |= text.contains(r#"source=\"model\""#) || has_model_override;
        }
        assert!(marks_estimates, "{name}: nothing marks model estimates");
    }
    assert_eq!(
        uids.len(),
        4,
        "cluster overview, pod drill-down, pipeline, exporter health"
    );
}

#[test]
pub fn pipeline_dashboard_covers_every_component() {
    let repo = repo_root();
    let text = fs::read_to_string(repo.join("dashboards/ergon-vehicle-pipeline.json")).unwrap();
    for component in PIPELINE_COMPONENTS {
        assert!(
            text.contains(component),
            "the pipeline dashboard never mentions {component}"
        );
    }
    // Each sample pod name matches the dashboard's component regex, so the
    // fixture the live test needs is the one this file describes.
    let queries = dashboard_queries(&repo);
    let power = queries
        .iter()
        .find(|q| q.dashboard == "ergon-vehicle-pipeline.json" && q.panel == "Power by component")
        .expect("Power by component panel");
    for (_, pod) in pipeline_pod_names() {
        let component = PIPELINE_COMPONENTS
            .iter()
            .find(|c| pod.starts_with(&format!("{c}-")))
            .unwrap();
        assert!(
            power.expr.contains(&format!("|{component}|"))
                || power.expr.contains(&format!("({component}|"))
                || power.expr.contains(&format!("|{component})"))
        );
    }
}
