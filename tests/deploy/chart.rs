//! The Helm chart as an operator meets it: `helm lint`, its documented
//! variants, the exporter's port wherever it is named, the host-network value
//! and the state directory.

use std::fs;
use std::process::Command;

use serde_json::{Value, json};

use crate::common::*;
use crate::stack::prometheus_config;

/// The exporter's default port as the exporter contract states it. Used only
/// while `exporter/src/config.rs` does not yet define `DEFAULT_PORT`; once it
/// does, [`exporter_default_port`] reads the constant from there.
pub const CONTRACT_DEFAULT_PORT: u16 = 9102;

#[test]
pub fn helm_lint_strict_passes_for_every_variant() {
    for (name, values) in helm_variants() {
        let mut command = Command::new(tool("helm"));
        command.args(["lint", "--strict"]).arg(chart_dir());
        if let Some(values) = &values {
            command.arg("--values").arg(values);
        }
        let output = run_ok(&mut command);
        assert!(
            output.contains("0 chart(s) failed"),
            "helm lint for variant {name} did not report success:\n{output}"
        );
    }
}

#[test]
pub fn every_chart_variant_is_documented() {
    let readme = fs::read_to_string(chart_dir().join("README.md")).expect("chart README");
    for (name, values) in helm_variants() {
        if let Some(values) = values {
            let file = format!("ci/{}", values.file_name().unwrap().to_string_lossy());
            assert!(
                readme.contains(&file),
                "variant {name} ({file}) is not described in daemonset/helm/ergon/README.md"
            );
        }
    }
}

/// The exporter's default port: `DEFAULT_PORT` in exporter/src/config.rs,
/// or the contract's value while that constant does not exist yet.
pub fn exporter_default_port() -> u16 {
    let config = repo_root().join("exporter/src/config.rs");
    let source = fs::read_to_string(&config).unwrap_or_default();
    let declaration = source
        .lines()
        .find(|line| line.contains("const DEFAULT_PORT"));
    match declaration {
        Some(line) => {
            let value = line
                .split('=')
                .nth(1)
                .map(|rest| rest.trim().trim_end_matches(';').trim().replace('_', ""))
                .unwrap_or_default();
            value.parse().unwrap_or_else(|_| {
                panic!(
                    "{}: cannot read a u16 from `{}`",
                    config.display(),
                    line.trim()
                )
            })
        }
        None => {
            eprintln!(
                "note: {} defines no DEFAULT_PORT yet; using the contract's {CONTRACT_DEFAULT_PORT}",
                config.display()
            );
            CONTRACT_DEFAULT_PORT
        }
    }
}

#[test]
pub fn exporter_ports_agree_everywhere() {
    let port = exporter_default_port();
    let values: Value = serde_yaml::from_str(
        &fs::read_to_string(chart_dir().join("values.yaml")).expect("values.yaml"),
    )
    .expect("values.yaml parses");
    assert_eq!(
        values["port"].as_u64(),
        Some(u64::from(port)),
        "the chart's default port differs from the exporter's default"
    );
    let mut renders = vec![("helm default".to_string(), helm_template(None))];
    renders.push((
        "kustomize base".to_string(),
        kustomize(&repo_root().join("daemonset/kustomize/base")),
    ));
    for (what, objects) in renders {
        let daemonset = &find(&objects, "DaemonSet", "ergon").object;
        let pod = &daemonset["spec"]["template"];
        let container = &pod["spec"]["containers"][0];
        let container_port = &container["ports"][0];
        assert_eq!(container_port["name"], "metrics", "{what}");
        assert_eq!(
            container_port["containerPort"],
            json!(port),
            "{what}: containerPort"
        );
        let listen = format!("--listen=0.0.0.0:{port}");
        assert!(
            container["args"]
                .as_array()
                .is_some_and(|args| args.iter().any(|a| a == &json!(listen))),
            "{what}: the DaemonSet does not pass {listen}"
        );
        for probe in ["livenessProbe", "readinessProbe"] {
            assert_eq!(
                container[probe]["httpGet"]["port"], "metrics",
                "{what}: {probe}"
            );
        }
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(
            pod["metadata"]["annotations"]["prometheus.io/port"],
            json!(port.to_string()),
            "{what}: pod scrape annotation"
        );
        let service = &find(&objects, "Service", "ergon").object;
        assert_eq!(
            service["spec"]["ports"][0]["port"],
            json!(port),
            "{what}: Service port"
        );
        assert_eq!(
            service["spec"]["ports"][0]["targetPort"], "metrics",
            "{what}"
        );
        assert_eq!(service["spec"]["ports"][0]["name"], "metrics", "{what}");
        assert_eq!(
            service["metadata"]["annotations"]["prometheus.io/port"],
            json!(port.to_string()),
            "{what}: Service scrape annotation"
        );
        let monitor = &find(&objects, "ServiceMonitor", "ergon").object;
        assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics", "{what}");
        // The ServiceMonitor selects the Service by labels it carries.
        let selector = monitor["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("ServiceMonitor matchLabels");
        for (key, value) in selector {
            assert_eq!(
                &service["metadata"]["labels"][key], value,
                "{what}: the ServiceMonitor's selector misses the Service"
            );
        }
    }
    let prometheus = prometheus_config();
    let ergon_job = prometheus["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|job| job["job_name"] == "ergon")
        .expect("the stack's Prometheus has an ergon job");
    assert_eq!(ergon_job["dns_sd_configs"][0]["port"], json!(port));
}

/// `hostNetwork: true` (clusters without a pod network, and the e2e node):
/// the pod joins the node's network and the exporter listens on the node's
/// address from the downward API, not on every interface of the host.
#[test]
pub fn host_network_value_listens_on_the_pod_ip_only() {
    let default = helm_template(None);
    let spec = &find(&default, "DaemonSet", "ergon").object["spec"]["template"]["spec"];
    assert!(spec["hostNetwork"].is_null(), "hostNetwork defaults to off");
    let objects = helm_template_with(HELM_NAMESPACE, None, &["hostNetwork=true"]);
    let spec = &find(&objects, "DaemonSet", "ergon").object["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");
    let container = &spec["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.contains(&"--listen=$(POD_IP):9102"),
        "listens on the pod IP: {args:?}"
    );
    let env = container["env"].as_array().unwrap();
    assert!(
        env.iter()
            .any(|e| e["name"] == "POD_IP"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"),
        "POD_IP comes from the downward API: {env:?}"
    );
}

#[test]
pub fn the_exporter_keeps_its_state_in_the_mounted_directory_unless_told_not_to() {
    let exporter = |objects: &[Rendered]| -> Value {
        find(objects, "DaemonSet", "ergon").object["spec"]["template"]["spec"]["containers"][0]
            .clone()
    };
    let args = |container: &Value| -> Vec<String> {
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    let state_mount = |container: &Value| {
        container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "checkpoint")
            .map(|m| m["mountPath"].as_str().unwrap().to_owned())
    };
    let chart = exporter(&helm_template(None));
    let base = exporter(&kustomize(&repo_root().join("daemonset/kustomize/base")));
    for container in [&chart, &base] {
        let dir = state_mount(container).expect("the state directory is mounted");
        assert!(
            args(container).contains(&format!("--state-dir={dir}")),
            "the exporter's --state-dir is not its mounted state directory {dir}: {:?}",
            args(container)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("no-checkpoint.yaml");
    std::fs::write(&values, "exporter:\n  checkpoint: false\n").unwrap();
    let without = args(&exporter(&helm_template(Some(&values))));
    assert!(
        without.contains(&"--no-checkpoint".to_owned()),
        "{without:?}"
    );
    assert!(
        !without
            .iter()
            .any(|a| a.starts_with("--state-dir") || a.starts_with("--checkpoint")),
        "{without:?}"
    );
}

/// The exporter container's arguments in a rendered chart.
fn exporter_args(objects: &[Rendered]) -> Vec<String> {
    find(objects, "DaemonSet", "ergon").object["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect()
}

#[test]
fn otlp_endpoint_value_passes_the_flag_and_the_schema_refuses_https() {
    let default = exporter_args(&helm_template(None));
    assert!(
        !default.iter().any(|a| a.starts_with("--otlp-endpoint")),
        "{default:?}"
    );
    let pushed = exporter_args(&helm_template_with(
        HELM_NAMESPACE,
        None,
        &["exporter.otlpEndpoint=http://$(HOST_IP):4318"],
    ));
    assert!(
        pushed.contains(&"--otlp-endpoint=http://$(HOST_IP):4318".to_owned()),
        "{pushed:?}"
    );
    let refused = Command::new(tool("helm"))
        .args(["template", "ergon"])
        .arg(chart_dir())
        .args(["--set", "exporter.otlpEndpoint=https://collector:4318"])
        .output()
        .expect("run helm");
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("otlpEndpoint"),
        "the schema let https through: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// Issue 10 item 2: the kubelet's cgroup root is configurable for nested
/// clusters (kind, k3d) from the chart, and the schema refuses a relative
/// path before the exporter would.
#[test]
fn kubelet_cgroup_roots_value_passes_the_flag_and_the_schema_refuses_relative_paths() {
    let default = exporter_args(&helm_template(None));
    assert!(
        !default
            .iter()
            .any(|a| a.starts_with("--kubelet-cgroup-root")),
        "{default:?}"
    );
    let nested = exporter_args(&helm_template_with(
        HELM_NAMESPACE,
        None,
        &[
            "exporter.kubeletCgroupRoots={/kubelet.slice,/system.slice/docker-*.scope/kubelet.slice}",
        ],
    ));
    assert!(
        nested.contains(
            &"--kubelet-cgroup-root=/kubelet.slice,/system.slice/docker-*.scope/kubelet.slice"
                .to_owned()
        ),
        "{nested:?}"
    );
    let refused = Command::new(tool("helm"))
        .args(["template", "ergon"])
        .arg(chart_dir())
        .args(["--set", "exporter.kubeletCgroupRoots={kubelet.slice}"])
        .output()
        .expect("run helm");
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("kubeletCgroupRoots"),
        "the schema let a relative path through: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
