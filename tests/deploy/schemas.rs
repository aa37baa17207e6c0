//! Every rendered object against the kubernetes-models schemas (CRDs
//! included, and the KServe schema in tests/validate/schemas), through
//! tests/validate/validate.mjs; and proof that the validator bites.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

use crate::common::*;
use crate::stack::PIPELINE_COMPONENTS;

/// The validators' node_modules, installed by tests/setup-tools.sh.
pub fn validator_modules() -> PathBuf {
    let modules = repo_root().join(".tools/validate/node_modules");
    assert!(
        modules.join("kubernetes-models").is_dir(),
        "the kubernetes-models validators are not installed in {}: run \
         `cargo xtask setup` (tests/setup-tools.sh)",
        modules.display()
    );
    modules
}

/// One object's validation result.
#[derive(Debug)]
pub struct Validation {
    source: String,
    kind: String,
    name: String,
    validator: Option<String>,
    errors: Vec<String>,
}

/// Validates objects with the kubernetes-models validators (and the KServe
/// schema in tests/validate/schemas). Returns one result per object.
pub fn validate_objects(objects: &[Rendered]) -> Vec<Validation> {
    let input: Vec<Value> = objects
        .iter()
        .map(|rendered| json!({"source": rendered.source, "object": rendered.object}))
        .collect();
    let input = serde_json::to_vec(&input).expect("serialise objects");
    let script = repo_root().join("tests/validate/validate.mjs");
    let mut command = Command::new(tool("node"));
    command.arg(&script).arg(validator_modules());
    let output = run_command(&mut command, Some(&input));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let results: Vec<Validation> = stdout
        .lines()
        .map(|line| {
            let report: Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("validator printed `{line}`: {error}"));
            Validation {
                source: report["source"].as_str().unwrap_or("").to_string(),
                kind: report["kind"].as_str().unwrap_or("").to_string(),
                name: report["name"].as_str().unwrap_or("").to_string(),
                validator: report["validator"].as_str().map(str::to_string),
                errors: report["errors"]
                    .as_array()
                    .map(|errors| {
                        errors
                            .iter()
                            .map(|e| e.as_str().unwrap_or("").to_string())
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect();
    assert_eq!(
        results.len(),
        objects.len(),
        "the validator answered for {} of {} objects (exit {}); stderr:\n{}",
        results.len(),
        objects.len(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let any_invalid = results.iter().any(|result| !result.errors.is_empty());
    assert_eq!(
        output.status.code(),
        Some(if any_invalid { 1 } else { 0 }),
        "validator exit status disagrees with its reports; stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    results
}

pub fn assert_all_valid(objects: &[Rendered]) {
    assert!(!objects.is_empty(), "nothing was rendered");
    let failures: Vec<String> = validate_objects(objects)
        .into_iter()
        .filter(|result| !result.errors.is_empty())
        .map(|result| {
            format!(
                "{}: {} {}: {}",
                result.source,
                result.kind,
                result.name,
                result.errors.join("; ")
            )
        })
        .collect();
    assert!(
        failures.is_empty(),
        "objects failed schema validation:\n{}",
        failures.join("\n")
    );
}

#[test]
pub fn helm_template_renders_valid_objects_for_every_variant() {
    let mut all = Vec::new();
    for (name, values) in helm_variants() {
        let rendered = helm_template(values.as_deref());
        let kinds: BTreeSet<&str> = rendered.iter().map(Rendered::kind).collect();
        for required in [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "Service",
        ] {
            assert!(
                kinds.contains(required),
                "variant {name} renders no {required} (kinds: {kinds:?})"
            );
        }
        all.extend(rendered);
    }
    assert_all_valid(&all);
}

#[test]
pub fn kustomize_builds_valid_objects_for_every_kustomization() {
    let dirs = kustomizations();
    for expected in [
        "daemonset/kustomize/base",
        "daemonset/kustomize/overlays/least-privilege",
        "daemonset/kustomize/overlays/no-operator",
        "stack/base",
        "stack/overlays/istio",
        "dashboards",
    ] {
        assert!(
            dirs.contains(&repo_root().join(expected)),
            "{expected} has no kustomization.yaml"
        );
    }
    for component in PIPELINE_COMPONENTS {
        assert!(
            dirs.contains(&repo_root().join("stack/components").join(component)),
            "pipeline component {component} cannot be deployed alone: no stack/components/{component}/kustomization.yaml"
        );
    }
    let mut all = Vec::new();
    for dir in &dirs {
        let rendered = kustomize(dir);
        assert!(!rendered.is_empty(), "{} renders nothing", relative(dir));
        all.extend(rendered);
    }
    assert_all_valid(&all);
}

#[test]
pub fn crds_are_checked_by_their_own_validators() {
    let mut objects = stack_render();
    objects.extend(kustomize(&repo_root().join("stack/overlays/istio")));
    objects.extend(helm_template(None));
    let results = validate_objects(&objects);
    let validator_of = |kind: &str| -> BTreeSet<String> {
        results
            .iter()
            .filter(|result| result.kind == kind)
            .filter_map(|result| result.validator.clone())
            .collect()
    };
    for (kind, expected) in [
        ("ServiceMonitor", "@kubernetes-models/prometheus-operator"),
        ("PrometheusRule", "@kubernetes-models/prometheus-operator"),
        ("PeerAuthentication", "@kubernetes-models/istio"),
        ("AuthorizationPolicy", "@kubernetes-models/istio"),
        (
            "InferenceService",
            "inferenceservice.serving.kserve.io.v1beta1.json",
        ),
        ("DaemonSet", "kubernetes-models"),
    ] {
        let validators = validator_of(kind);
        assert!(
            !validators.is_empty() && validators.iter().all(|v| v.contains(expected)),
            "{kind} objects were validated by {validators:?}, expected {expected}"
        );
    }
}

/// A valid object of each schema family, the same object broken in one
/// field, and what the break is. The valid one must pass and the broken one
/// fail: the validator bites, and it bites on the break.
pub fn broken_manifest_cases() -> Vec<(&'static str, Value, Value)> {
    let daemonset = |port: Value, host_pid: Value| {
        json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "ergon"},
            "spec": {
                "selector": {"matchLabels": {"app": "ergon"}},
                "template": {
                    "metadata": {"labels": {"app": "ergon"}},
                    "spec": {"hostPID": host_pid, "containers": [{
                        "name": "ergon", "image": "ergon:1",
                        "ports": [{"name": "metrics", "containerPort": port}]
                    }]}
                }
            }
        })
    };
    let service_monitor = |interval: &str| {
        json!({
            "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": {"name": "ergon"},
            "spec": {"selector": {"matchLabels": {"app": "ergon"}},
                     "endpoints": [{"port": "metrics", "interval": interval}]}
        })
    };
    let rule = |expr: Value| {
        json!({
            "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "ergon"},
            "spec": {"groups": [{"name": "g", "rules": [{"record": "a:b", "expr": expr}]}]}
        })
    };
    let peer = |mode: &str| {
        json!({
            "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "default"},
            "spec": {"mtls": {"mode": mode}}
        })
    };
    let isvc = |model: Value| {
        json!({
            "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": "inference"},
            "spec": {"predictor": {"model": model}}
        })
    };
    let service = |port: Value| {
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "ergon"},
            "spec": {"ports": [{"name": "metrics", "port": port}]}
        })
    };
    vec![
        (
            "DaemonSet containerPort given as a string",
            daemonset(json!(9102), json!(true)),
            daemonset(json!("9102"), json!(true)),
        ),
        (
            "DaemonSet hostPID given as a string",
            daemonset(json!(9102), json!(true)),
            daemonset(json!(9102), json!("yes")),
        ),
        (
            "DaemonSet field misspelt (hostPid)",
            daemonset(json!(9102), json!(true)),
            {
                let mut broken = daemonset(json!(9102), json!(true));
                let spec = broken["spec"]["template"]["spec"].as_object_mut().unwrap();
                spec.remove("hostPID");
                spec.insert("hostPid".to_string(), json!(true));
                broken
            },
        ),
        (
            "ServiceMonitor endpoint field misspelt (relabellings)",
            service_monitor("30s"),
            {
                let mut broken = service_monitor("30s");
                broken["spec"]["endpoints"][0]["relabellings"] = json!([]);
                broken
            },
        ),
        (
            "Service port missing (null)",
            service(json!(9102)),
            service(Value::Null),
        ),
        (
            "ServiceMonitor interval not a duration",
            service_monitor("30s"),
            service_monitor("every 30 seconds"),
        ),
        (
            "PrometheusRule expr of the wrong type",
            rule(json!("up")),
            rule(json!({"query": "up"})),
        ),
        (
            "PeerAuthentication mode not an mTLS mode",
            peer("STRICT"),
            peer("STRICTEST"),
        ),
        (
            "InferenceService model without modelFormat",
            isvc(json!({"modelFormat": {"name": "sklearn"}, "storageUri": "s3://models/m/1"})),
            isvc(json!({"storageUri": "s3://models/m/1"})),
        ),
        (
            "InferenceService field misspelt (storageURI)",
            isvc(json!({"modelFormat": {"name": "sklearn"}, "storageUri": "s3://models/m/1"})),
            isvc(json!({"modelFormat": {"name": "sklearn"}, "storageURI": "s3://models/m/1"})),
        ),
        (
            "InferenceService embedded Kubernetes type broken (resources.requests)",
            isvc(
                json!({"modelFormat": {"name": "sklearn"}, "resources": {"requests": {"cpu": "1"}}}),
            ),
            isvc(json!({"modelFormat": {"name": "sklearn"}, "resources": {"requests": "1 cpu"}})),
        ),
    ]
}

#[test]
pub fn validator_rejects_broken_manifests() {
    let cases = broken_manifest_cases();
    let mut objects = Vec::new();
    for (what, valid, broken) in &cases {
        objects.push(Rendered {
            source: format!("valid: {what}"),
            object: valid.clone(),
        });
        objects.push(Rendered {
            source: format!("broken: {what}"),
            object: broken.clone(),
        });
    }
    objects.push(Rendered {
        source: "broken: a kind nobody validates".to_string(),
        object: json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}),
    });
    let results = validate_objects(&objects);
    for result in &results {
        if result.source.starts_with("valid: ") {
            assert!(
                result.errors.is_empty(),
                "{} was rejected: {:?}",
                result.source,
                result.errors
            );
        } else {
            assert!(
                !result.errors.is_empty(),
                "{} passed validation: the validator does not bite",
                result.source
            );
        }
    }
}
