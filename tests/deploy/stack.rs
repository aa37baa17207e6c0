//! The vehicle pipeline stack (`stack/`): cross-references no schema checks
//! (datasource URLs, DNS discovery names, Ingress backends name Services the
//! stack defines), traffic kept on the node, Secrets documented and never
//! committed, images pinned, the stack's Prometheus configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

use crate::common::*;
use crate::metrics::COMPONENT_REQUEST_METRICS;

/// Namespace the stack deploys the pipeline into; the dashboards default to it.
pub const PIPELINE_NAMESPACE: &str = "vehicle-pipeline";

/// Pipeline components and the pod-name prefix that identifies each one's
/// pods in Ergon's metrics (see dashboards/ergon-vehicle-pipeline.json).
pub const PIPELINE_COMPONENTS: [&str; 8] = [
    "vehicle-api",
    "redis",
    "inference",
    "influxdb",
    "grafana",
    "prometheus",
    "mlflow",
    "minio",
];

pub fn prometheus_config_path() -> PathBuf {
    repo_root().join("stack/components/prometheus/prometheus.yml")
}

pub fn prometheus_config() -> Value {
    serde_yaml::from_str(&fs::read_to_string(prometheus_config_path()).expect("prometheus.yml"))
        .expect("prometheus.yml parses")
}

/// Every Service the stack (pipeline and exporter) defines, by
/// (namespace, name).
pub fn stack_services(objects: &[Rendered]) -> BTreeMap<(String, String), Value> {
    objects
        .iter()
        .filter(|o| o.kind() == "Service")
        .map(|o| {
            (
                (o.namespace().to_string(), o.name().to_string()),
                o.object.clone(),
            )
        })
        .collect()
}

/// Splits `name.namespace.svc[...]` (as used in URLs and DNS names).
pub fn service_of_host(host: &str) -> (String, String) {
    let mut parts = host.split('.');
    let name = parts.next().unwrap_or_default().to_string();
    let namespace = parts.next().unwrap_or_default().to_string();
    assert_eq!(
        parts.next(),
        Some("svc"),
        "`{host}` is not a Service address (name.namespace.svc)"
    );
    (namespace, name)
}

pub fn service_has_port(service: &Value, port: u64) -> bool {
    service["spec"]["ports"]
        .as_array()
        .is_some_and(|ports| ports.iter().any(|p| p["port"] == json!(port)))
}

#[test]
pub fn datasource_urls_name_services_the_stack_defines() {
    let services = stack_services(&stack_render());
    let path = repo_root().join("dashboards/provisioning/datasources/ergon.yaml");
    let provisioning: Value =
        serde_yaml::from_str(&fs::read_to_string(&path).expect("datasources file")).unwrap();
    let datasources = provisioning["datasources"]
        .as_array()
        .expect("datasources list");
    assert!(
        datasources.len() >= 2,
        "Prometheus and InfluxDB datasources expected"
    );
    for datasource in datasources {
        let url = datasource["url"].as_str().expect("datasource url");
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .unwrap_or_else(|| panic!("datasource URL `{url}` has no http(s) scheme"));
        let authority = rest.split('/').next().unwrap();
        let (host, port) = authority
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("datasource URL `{url}` names no port"));
        let port: u64 = port.parse().expect("numeric port");
        let id = service_of_host(host);
        let service = services.get(&id).unwrap_or_else(|| {
            panic!("datasource `{url}` names Service {id:?}, which the stack does not define")
        });
        assert!(
            service_has_port(service, port),
            "datasource `{url}`: Service {id:?} has no port {port}"
        );
    }
    let kinds: BTreeSet<&str> = datasources
        .iter()
        .filter_map(|d| d["type"].as_str())
        .collect();
    assert!(
        kinds.contains("prometheus") && kinds.contains("influxdb"),
        "{kinds:?}"
    );
}

#[test]
pub fn prometheus_discovery_names_headless_services_the_stack_defines() {
    let services = stack_services(&stack_render());
    let config = prometheus_config();
    let mut jobs = BTreeSet::new();
    for job in config["scrape_configs"].as_array().expect("scrape_configs") {
        let job_name = job["job_name"].as_str().unwrap().to_string();
        for sd in job["dns_sd_configs"].as_array().into_iter().flatten() {
            let port = sd["port"].as_u64().expect("dns_sd port");
            for name in sd["names"].as_array().unwrap() {
                let host = name.as_str().unwrap();
                let id = service_of_host(host);
                let service = services.get(&id).unwrap_or_else(|| {
                    panic!("job {job_name}: `{host}` is not a Service the stack defines")
                });
                assert_eq!(
                    service["spec"]["clusterIP"], "None",
                    "job {job_name}: Service {id:?} must be headless, or DNS returns one virtual IP instead of every pod"
                );
                assert!(
                    service_has_port(service, port),
                    "job {job_name}: {id:?} has no port {port}"
                );
            }
        }
        jobs.insert(job_name);
    }
    for (job, metric, _) in COMPONENT_REQUEST_METRICS {
        assert!(
            jobs.contains(job),
            "the pipeline dashboard divides by {metric}{{job=\"{job}\"}}, but the stack's Prometheus has no job {job}"
        );
    }
}

#[test]
pub fn ingress_backends_name_services_with_those_ports() {
    let objects = stack_render();
    let services = stack_services(&objects);
    let ingress = find(&objects, "Ingress", "vehicle-pipeline");
    let mut hosts = BTreeSet::new();
    for rule in ingress.object["spec"]["rules"].as_array().unwrap() {
        hosts.insert(rule["host"].as_str().unwrap().to_string());
        for path in rule["http"]["paths"].as_array().unwrap() {
            let backend = &path["backend"]["service"];
            let id = (
                ingress.namespace().to_string(),
                backend["name"].as_str().unwrap().to_string(),
            );
            let service = services
                .get(&id)
                .unwrap_or_else(|| panic!("Ingress backend {id:?} is not a Service of the stack"));
            let port_name = backend["port"]["name"]
                .as_str()
                .expect("named backend port");
            assert!(
                service["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["name"] == port_name),
                "Ingress backend {id:?} port {port_name} not on the Service"
            );
        }
    }
    assert!(
        hosts.iter().any(|h| h.starts_with("grafana."))
            && hosts.iter().any(|h| h.starts_with("mlflow.")),
        "the Ingress must give Grafana and MLflow host names: {hosts:?}"
    );
}

#[test]
pub fn pipeline_services_keep_traffic_on_the_node() {
    let objects = stack_render();
    let vehicle_api = &find(&objects, "Service", "vehicle-api").object["spec"];
    assert_eq!(vehicle_api["type"], "NodePort");
    assert_eq!(vehicle_api["externalTrafficPolicy"], "Local");
    assert_eq!(vehicle_api["internalTrafficPolicy"], "Local");
    let inference = &find(&objects, "Service", "inference-local").object["spec"];
    assert_eq!(inference["internalTrafficPolicy"], "Local");
    let isvc = &find(&objects, "InferenceService", "inference").object;
    let storage = isvc["spec"]["predictor"]["model"]["storageUri"]
        .as_str()
        .expect("storageUri");
    assert!(
        storage.starts_with("s3://"),
        "the model must come from MinIO: {storage}"
    );
    // The Service selects the pods KServe creates for this InferenceService.
    assert_eq!(
        inference["selector"]["serving.kserve.io/inferenceservice"],
        json!(isvc["metadata"]["name"])
    );
}

/// Secret names a rendered object references: env secretKeyRef, envFrom,
/// volumes, ServiceAccount secrets, Ingress TLS.
pub fn referenced_secrets(object: &Value, found: &mut BTreeSet<String>) {
    match object {
        Value::Object(map) => {
            for key in ["secretKeyRef", "secretRef"] {
                if let Some(name) = map.get(key).and_then(|r| r["name"].as_str()) {
                    found.insert(name.to_string());
                }
            }
            if let Some(name) = map.get("secret").and_then(|s| s["secretName"].as_str()) {
                found.insert(name.to_string());
            }
            if let Some(name) = map.get("secretName").and_then(Value::as_str) {
                found.insert(name.to_string());
            }
            for value in map.values() {
                referenced_secrets(value, found);
            }
        }
        Value::Array(items) => items
            .iter()
            .for_each(|item| referenced_secrets(item, found)),
        _ => {}
    }
}

#[test]
pub fn secrets_are_referenced_documented_and_never_committed() {
    let mut objects = stack_render();
    objects.extend(kustomize(&repo_root().join("stack/overlays/istio")));
    let readme = fs::read_to_string(repo_root().join("stack/README.md")).expect("stack README");
    let mut names = BTreeSet::new();
    for rendered in &objects {
        assert_ne!(
            rendered.kind(),
            "Secret",
            "{}: Secret {} is committed; reference an operator-created Secret instead",
            rendered.source,
            rendered.name()
        );
        referenced_secrets(&rendered.object, &mut names);
        if rendered.kind() == "ServiceAccount" {
            for secret in rendered.object["secrets"].as_array().into_iter().flatten() {
                names.insert(secret["name"].as_str().unwrap().to_string());
            }
        }
    }
    assert!(
        names.len() >= 5,
        "expected the stack's Secrets, found {names:?}"
    );
    for name in &names {
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "Secret {name} is referenced but not listed in stack/README.md's Secrets table"
        );
    }
}

/// Container images of a rendered object (pods, templates, InferenceService).
pub fn images(object: &Value, found: &mut Vec<String>) {
    match object {
        Value::Object(map) => {
            if let (Some(Value::String(image)), true) = (map.get("image"), map.contains_key("name"))
            {
                found.push(image.clone());
            }
            map.values().for_each(|value| images(value, found));
        }
        Value::Array(items) => items.iter().for_each(|item| images(item, found)),
        _ => {}
    }
}

#[test]
pub fn images_are_pinned_by_version() {
    let mut objects = stack_render();
    for (_, values) in helm_variants() {
        objects.extend(helm_template(values.as_deref()));
    }
    let mut all = Vec::new();
    for rendered in &objects {
        images(&rendered.object, &mut all);
    }
    assert!(
        all.len() >= 10,
        "expected the stack's images, found {all:?}"
    );
    for image in all {
        let last = image.rsplit('/').next().unwrap();
        let tag = last.split_once(':').map(|(_, tag)| tag);
        assert!(
            image.contains("@sha256:") || tag.is_some_and(|t| !t.is_empty() && t != "latest"),
            "image `{image}` is not pinned to a version"
        );
    }
}

#[test]
pub fn promtool_accepts_the_stack_prometheus_config() {
    let output = run_ok(
        Command::new(tool("promtool"))
            .args(["check", "config"])
            .arg(prometheus_config_path()),
    );
    assert!(output.contains("SUCCESS"), "{output}");
}
