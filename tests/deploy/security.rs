//! RBAC and security context: the least-privilege and hardened variants,
//! cluster-scoped names per release, read-only host mounts.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use crate::common::*;

#[test]
pub fn least_privilege_variant_drops_privileged_mode() {
    let values = chart_dir().join("ci/least-privilege-values.yaml");
    let objects = helm_template(Some(&values));
    let container =
        &find(&objects, "DaemonSet", "ergon").object["spec"]["template"]["spec"]["containers"][0];
    let context = &container["securityContext"];
    assert_eq!(context["privileged"], false);
    assert_eq!(context["readOnlyRootFilesystem"], true);
    assert_eq!(context["allowPrivilegeEscalation"], false);
    assert_eq!(context["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        context["capabilities"]["add"],
        json!(["BPF", "PERFMON", "SYS_CHROOT"])
    );
    let default = helm_template(None);
    let context = &find(&default, "DaemonSet", "ergon").object["spec"]["template"]["spec"]["containers"]
        [0]["securityContext"];
    assert_eq!(
        context["privileged"], true,
        "the default profile is privileged"
    );
}

/// ClusterRole and ClusterRoleBinding are cluster-scoped: two releases of
/// the same name in two namespaces must not share them (the second install
/// would fail, or uninstalling one would cut the other's API access).
#[test]
pub fn two_releases_in_two_namespaces_share_no_cluster_scoped_name() {
    let cluster_scoped = |namespace: &str| -> BTreeSet<(String, String)> {
        helm_template_with(namespace, None, &[])
            .iter()
            .filter(|o| matches!(o.kind(), "ClusterRole" | "ClusterRoleBinding"))
            .map(|o| (o.kind().to_string(), o.name().to_string()))
            .collect()
    };
    let (first, second) = (cluster_scoped("team-a"), cluster_scoped("team-b"));
    assert_eq!(first.len(), 2, "a ClusterRole and its binding: {first:?}");
    let shared: Vec<_> = first.intersection(&second).collect();
    assert!(
        shared.is_empty(),
        "release `ergon` in namespaces team-a and team-b share {shared:?}"
    );
    let objects = helm_template_with("team-a", None, &[]);
    let binding = objects
        .iter()
        .find(|o| o.kind() == "ClusterRoleBinding")
        .unwrap();
    let role = objects.iter().find(|o| o.kind() == "ClusterRole").unwrap();
    assert_eq!(
        binding.object["roleRef"]["name"],
        role.object["metadata"]["name"]
    );
}

#[test]
pub fn hardened_variant_adds_tls_auth_rbac_and_a_network_policy_the_default_does_not() {
    let hardened = helm_template(Some(&chart_dir().join("ci/hardened-values.yaml")));
    let pod = &find(&hardened, "DaemonSet", "ergon").object["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for flag in [
        "--tls-cert-file=/var/run/ergon/tls/tls.crt",
        "--tls-key-file=/var/run/ergon/tls/tls.key",
        "--authorize-metrics",
    ] {
        assert!(args.contains(&flag), "{flag} missing from {args:?}");
    }
    // A directory mount (no subPath): the kubelet updates a renewed Secret.
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "tls")
        .expect("the TLS Secret is mounted");
    assert_eq!(mount["mountPath"], "/var/run/ergon/tls");
    assert!(mount.get("subPath").is_none());
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == "ergon-metrics-tls")
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["scheme"], "HTTPS");
    assert_eq!(container["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
    let endpoint = &find(&hardened, "ServiceMonitor", "ergon").object["spec"]["endpoints"][0];
    assert_eq!(endpoint["scheme"], "https");
    assert!(endpoint["bearerTokenFile"].is_string());

    let review_rules = |objects: &[Rendered]| -> Vec<Value> {
        find(objects, "ClusterRole", &format!("{HELM_NAMESPACE}-ergon")).object["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|rule| {
                rule["resources"][0]
                    .as_str()
                    .is_some_and(|r| r.ends_with("reviews"))
            })
            .cloned()
            .collect()
    };
    assert_eq!(
        review_rules(&hardened),
        vec![
            json!({"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}),
            json!({"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]}),
        ]
    );
    let reader = find(
        &hardened,
        "ClusterRole",
        &format!("{HELM_NAMESPACE}-ergon-metrics-reader"),
    );
    assert_eq!(
        reader.object["rules"],
        json!([{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}])
    );

    let policy = &find(&hardened, "NetworkPolicy", "ergon").object["spec"];
    assert_eq!(policy["policyTypes"], json!(["Ingress"]));
    assert_eq!(
        policy["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "ergon"
    );
    let ingress = policy["ingress"].as_array().unwrap();
    assert_eq!(
        ingress.len(),
        1,
        "one rule: the scrapers, to the metrics port"
    );
    assert_eq!(
        ingress[0]["ports"],
        json!([{"port": "metrics", "protocol": "TCP"}])
    );
    assert_eq!(
        ingress[0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "prometheus"
    );

    // Off by default: none of it.
    let default = helm_template(None);
    assert!(review_rules(&default).is_empty());
    assert!(
        !default
            .iter()
            .any(|o| o.kind() == "NetworkPolicy" || o.name().ends_with("-metrics-reader"))
    );
    let args = &find(&default, "DaemonSet", "ergon").object["spec"]["template"]["spec"]["containers"]
        [0]["args"];
    assert!(!args.to_string().contains("--tls") && !args.to_string().contains("--authorize"));
}

#[test]
pub fn daemonset_mounts_host_paths_read_only_and_tolerates_every_taint() {
    let objects = helm_template(None);
    let pod = &find(&objects, "DaemonSet", "ergon").object["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "the DaemonSet must tolerate every taint"
    );
    let container = &pod["containers"][0];
    assert_eq!(container["env"][0]["name"], "NODE_NAME");
    assert_eq!(
        container["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    for mount in container["volumeMounts"].as_array().unwrap() {
        let name = mount["name"].as_str().unwrap();
        let host_path = volumes[name]["hostPath"]["path"].as_str().unwrap_or("");
        if name == "checkpoint" {
            assert_eq!(host_path, "/var/lib/ergon");
            assert_ne!(
                mount["readOnly"], true,
                "the checkpoint directory must be writable"
            );
        } else {
            assert_eq!(
                mount["readOnly"], true,
                "host mount {name} ({host_path}) must be read-only"
            );
        }
    }
    for host_path in [
        "/sys",
        "/proc",
        "/sys/fs/cgroup",
        "/sys/kernel/btf",
        "/sys/kernel/tracing",
    ] {
        assert!(
            volumes.values().any(|v| v["hostPath"]["path"] == host_path),
            "no hostPath volume for {host_path}"
        );
    }
}

/// The exporter's ClusterRole grants what the code calls, and nothing else
/// (the chart README's "Why each permission" table names the code path of
/// each rule):
/// - pods `list` and `watch`: the API server watch of this node's pods
///   (`workload::kube::run_watcher`, a kube-runtime watcher: one list, then
///   watches; never a `get`), for `podSource` apiserver and auto;
/// - nodes/proxy `get`: how the kubelet authorizes the exporter's
///   `GET https://<node>:10250/pods` (`workload::kubelet::Kubelet::pods`),
///   for `podSource` kubelet and auto;
/// - tokenreviews and subjectaccessreviews `create`: `--authorize-metrics`
///   (`export::auth::Authorizer::review`), with `auth.enabled`.
///
/// Nothing reads the Node object (no `nodes get`), and the watcher never
/// gets a single pod (no `pods get`).
#[test]
pub fn cluster_role_grants_only_what_the_code_calls() {
    type Rule = (String, String, String);
    let rule = |group: &str, resource: &str, verb: &str| -> Rule {
        (group.to_string(), resource.to_string(), verb.to_string())
    };
    let watch_pods = [rule("", "pods", "list"), rule("", "pods", "watch")];
    let kubelet_pods = [rule("", "nodes/proxy", "get")];
    let reviews = [
        rule("authentication.k8s.io", "tokenreviews", "create"),
        rule("authorization.k8s.io", "subjectaccessreviews", "create"),
    ];
    let role_name = format!("{HELM_NAMESPACE}-ergon");
    for pod_source in ["apiserver", "kubelet", "auto"] {
        for auth in [false, true] {
            let mut expected: BTreeSet<Rule> = BTreeSet::new();
            if pod_source != "kubelet" {
                expected.extend(watch_pods.iter().cloned());
            }
            if pod_source != "apiserver" {
                expected.extend(kubelet_pods.iter().cloned());
            }
            if auth {
                expected.extend(reviews.iter().cloned());
            }
            let sets = [
                format!("exporter.podSource={pod_source}"),
                format!("auth.enabled={auth}"),
            ];
            let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
            let objects = helm_template_with(HELM_NAMESPACE, None, &sets);
            let role = find(&objects, "ClusterRole", &role_name);
            let mut granted: BTreeSet<Rule> = BTreeSet::new();
            for entry in role.object["rules"].as_array().unwrap() {
                let keys: BTreeSet<&str> = entry
                    .as_object()
                    .unwrap()
                    .keys()
                    .map(String::as_str)
                    .collect();
                assert_eq!(
                    keys,
                    BTreeSet::from(["apiGroups", "resources", "verbs"]),
                    "podSource={pod_source} auth={auth}: a rule with other fields \
                     (resourceNames, nonResourceURLs) in the exporter's role: {entry}"
                );
                let strings = |key: &str| -> Vec<&str> {
                    entry[key]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap())
                        .collect()
                };
                for group in strings("apiGroups") {
                    for resource in strings("resources") {
                        for verb in strings("verbs") {
                            assert!(
                                granted.insert(rule(group, resource, verb)),
                                "podSource={pod_source} auth={auth}: {group:?} {resource} \
                                 {verb} granted twice"
                            );
                        }
                    }
                }
            }
            assert_eq!(
                granted,
                expected,
                "podSource={pod_source} auth={auth}: the exporter's ClusterRole must grant \
                 exactly what the code calls (extra: {:?}; missing: {:?})",
                granted.difference(&expected).collect::<Vec<_>>(),
                expected.difference(&granted).collect::<Vec<_>>()
            );
            // The role is the exporter's, bound to its ServiceAccount only;
            // the metrics-reader role (auth) is for scrapers, never bound here.
            let bindings: Vec<&Rendered> = objects
                .iter()
                .filter(|o| o.kind() == "ClusterRoleBinding")
                .collect();
            assert_eq!(bindings.len(), 1, "podSource={pod_source} auth={auth}");
            assert_eq!(bindings[0].object["roleRef"]["name"], role_name.as_str());
            assert_eq!(
                bindings[0].object["subjects"],
                json!([{"kind": "ServiceAccount", "name": "ergon", "namespace": HELM_NAMESPACE}])
            );
        }
    }
}
