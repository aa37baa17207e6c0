//! The vehicle pipeline stack (`stack/`) on the e2e node.
//!
//! The components Debian packages provide — Redis with redis_exporter,
//! InfluxDB, Prometheus — run from images built here out of those packages,
//! through the overlay `xtask/e2e/stack` over the stack's own manifests
//! (host network, loopback listeners, local images; the overlay says why for
//! each patch). The rest of the stack (the Vehicle API, KServe's
//! InferenceService, Grafana, MLflow, MinIO, the Ingress, the Istio overlay)
//! has no image that can be built here; it goes through `kubectl apply
//! --dry-run=server`, so the real apiserver's validation and admission see
//! every object, its custom kinds registered from `xtask/e2e/stack-crds.yaml`.
//!
//! What the cluster then has to show: each deployed pod Ready, every socket
//! its processes listen on bound to loopback, and the pipeline dashboard's
//! panels, through the e2e's Prometheus, giving each running component its
//! energy under its component name (tests/deploy/live.rs).
//!
//! `internalTrafficPolicy` (the redis, vehicle-api and inference-local
//! Services): the field came with Kubernetes 1.21 (alpha, behind a feature
//! gate) and is on by default from 1.22. The 1.20 apiserver's schema does not
//! know it, so kubectl refuses those Services; with `--validate=false` the
//! apiserver would instead drop the field silently and the Service would
//! route across nodes, which the design forbids. The stack keeps the field
//! (stack/README.md states Kubernetes 1.22 as its minimum). The e2e checks
//! that this field is all the 1.20 apiserver refuses in the whole stack, and
//! strips it: on this single node no kube-proxy runs, so no Service routes
//! anything and the field would change nothing observed.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::cluster::{self, Cluster};
use super::image::{self, DebootstrapImage};
use super::prometheus::Prometheus;

pub const NAMESPACE: &str = "vehicle-pipeline";
/// The node label that puts the edge components (Redis, the Vehicle API,
/// inference) on a node; stack/README.md asks operators to set it.
const EDGE_LABEL: &str = "vehicle-pipeline/edge";
/// Deployed components, named as the pipeline dashboard names them (by pod
/// name prefix).
pub const DEPLOYED: [&str; 3] = ["redis", "influxdb", "prometheus"];
/// Deployed components whose request counter the e2e's Prometheus scrapes
/// under the job the dashboard divides by (redis_exporter, job `redis`).
/// InfluxDB 1.6's /metrics has Go's runtime metrics only (2.x adds
/// http_api_requests_total); the stack's Prometheus is not annotated for
/// scraping (it scrapes itself).
pub const WITH_REQUEST_COUNTER: [&str; 1] = ["redis"];
const CRDS: [&str; 3] = [
    "inferenceservices.serving.kserve.io",
    "peerauthentications.security.istio.io",
    "authorizationpolicies.security.istio.io",
];

/// One Debian tree with every package the deployed components need.
pub const PIPELINE_DEBIAN: DebootstrapImage = DebootstrapImage {
    image: "ergon-e2e/pipeline-debian:bookworm",
    tarball: "debian-bookworm-minbase-pipeline-1.tar",
    packages: "ca-certificates,redis-server,prometheus-redis-exporter,influxdb,prometheus",
    arch: None,
};

/// The images the overlay names, each the Debian tree with its program as
/// the entrypoint (the stack's containers pass only arguments, as the
/// upstream images' entrypoints expect).
const IMAGES: [(&str, &str); 4] = [
    ("ergon-e2e/redis:bookworm", "/usr/bin/redis-server"),
    (
        "ergon-e2e/redis-exporter:bookworm",
        "/usr/bin/prometheus-redis-exporter",
    ),
    ("ergon-e2e/influxdb:bookworm", "/usr/bin/influxd"),
    ("ergon-e2e/prometheus:bookworm", "/usr/bin/prometheus"),
];

/// Deploys the stack, checks it, and removes it whatever the checks said.
pub fn deploy_and_check(cluster: &Cluster, prometheus: &Prometheus) -> Result<()> {
    let result = deploy_and_check_inner(cluster, prometheus);
    let cleaned = clean_up(cluster);
    result.and(cleaned)
}

fn deploy_and_check_inner(cluster: &Cluster, prometheus: &Prometheus) -> Result<()> {
    build_images(cluster)?;
    install_crds(cluster)?;
    let whole_stack: Vec<Value> = [
        render(&super::root().join("stack/base"))?,
        render(&super::root().join("stack/overlays/istio"))?,
    ]
    .concat()
    .into_iter()
    .filter(|object| !is_exporter(object))
    .collect();

    let deployed = render(&super::script("stack"))?;
    cluster.kubectl(&[
        "label",
        "node",
        &cluster.node,
        &format!("{EDGE_LABEL}=true"),
        "--overwrite",
    ])?;
    create_volumes(cluster, &deployed)?;
    apply(
        cluster,
        "stack-deployed",
        &strip_internal_traffic_policy(&deployed),
        &[],
    )?;
    create_secrets(cluster)?;
    let pods = wait_ready(cluster)?;

    eprintln!("e2e: the whole stack (and its Istio overlay) through the apiserver, dry run");
    // After the deployment, so that the namespace exists and a refusal can
    // only be about the objects themselves.
    check_only_internal_traffic_policy_refused(cluster, &whole_stack)?;
    let dry_run = apply(
        cluster,
        "stack-dry-run",
        &strip_internal_traffic_policy(&whole_stack),
        &["--dry-run=server"],
    )?;
    eprintln!(
        "e2e: {} objects accepted by the apiserver (server dry run)",
        dry_run.lines().count()
    );

    check_loopback_listeners(&pods)?;

    super::cluster_test(
        "live::cluster_pipeline_dashboard_shows_each_running_component",
        &[
            ("ERGON_E2E_PROMETHEUS", prometheus.address.as_str()),
            ("ERGON_E2E_PIPELINE_COMPONENTS", &DEPLOYED.join(",")),
            (
                "ERGON_E2E_PIPELINE_REQUEST_COUNTERS",
                &WITH_REQUEST_COUNTER.join(","),
            ),
        ],
    )
    .context("the pipeline dashboard's panel queries against the cluster's Prometheus")?;
    // The stack's annotated pods are scraped too, under their own jobs:
    // none of that may look like the exporter failing.
    super::check_no_alerts(prometheus)
}

fn build_images(cluster: &Cluster) -> Result<()> {
    image::import_debootstrap(cluster, &PIPELINE_DEBIAN)?;
    for (name, entrypoint) in IMAGES {
        image::build_local(
            cluster,
            name,
            &[],
            &format!(
                "FROM {}\nENTRYPOINT [\"{entrypoint}\"]\n",
                PIPELINE_DEBIAN.image
            ),
        )?;
    }
    Ok(())
}

fn install_crds(cluster: &Cluster) -> Result<()> {
    let crds = super::script("stack-crds.yaml");
    cluster.kubectl(&["apply", "-f", &crds.display().to_string()])?;
    for crd in CRDS {
        cluster.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{crd}"),
        ])?;
    }
    Ok(())
}

/// `kubectl kustomize dir`, as JSON objects.
fn render(dir: &Path) -> Result<Vec<Value>> {
    let yaml = super::output(
        std::process::Command::new(super::tool("kubectl"))
            .arg("kustomize")
            .arg(dir),
    )?;
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&yaml) {
        let object: Value = serde::Deserialize::deserialize(document)
            .with_context(|| format!("kubectl kustomize {} printed invalid YAML", dir.display()))?;
        if !object.is_null() {
            objects.push(object);
        }
    }
    Ok(objects)
}

/// The exporter's own objects in stack/base (from
/// daemonset/kustomize/overlays/no-operator). The chart installed the same
/// exporter for real on this node, and tests/deploy/kustomize.rs keeps the
/// two equal; applied over the live release, kubectl would merge the
/// kustomize port (9102) into the chart's (the e2e's 39102) and the
/// apiserver rightly refuses two ports named `metrics`. They are left out
/// of the dry run.
fn is_exporter(object: &Value) -> bool {
    object["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ergon"
}

fn kind_and_name(object: &Value) -> String {
    format!(
        "{}/{}",
        object["kind"].as_str().unwrap_or(""),
        object["metadata"]["name"].as_str().unwrap_or("")
    )
}

/// The objects with `spec.internalTrafficPolicy` removed from every Service
/// (see the module doc for why).
fn strip_internal_traffic_policy(objects: &[Value]) -> Vec<Value> {
    let mut objects = objects.to_vec();
    for object in &mut objects {
        if object["kind"] == "Service"
            && let Some(spec) = object["spec"].as_object_mut()
        {
            spec.remove("internalTrafficPolicy");
        }
    }
    objects
}

/// The whole stack, unchanged, through the apiserver (dry run): refused,
/// and for `internalTrafficPolicy` only.
fn check_only_internal_traffic_policy_refused(cluster: &Cluster, objects: &[Value]) -> Result<()> {
    let with_field: BTreeSet<String> = objects
        .iter()
        .filter(|o| o["kind"] == "Service" && !o["spec"]["internalTrafficPolicy"].is_null())
        .map(kind_and_name)
        .collect();
    if with_field.is_empty() {
        bail!(
            "no Service of stack/ sets internalTrafficPolicy any more: drop its stripping from \
             xtask/src/e2e/stack.rs"
        );
    }
    let refusal = match apply(cluster, "stack-unchanged", objects, &["--dry-run=server"]) {
        Ok(_) => bail!(
            "the 1.20 apiserver accepted Services with internalTrafficPolicy ({with_field:?}): \
             the e2e need not strip the field"
        ),
        Err(error) => format!("{error:#}"),
    };
    let refused: Vec<&str> = refusal
        .lines()
        .filter(|l| l.contains("unknown field") || l.contains("ValidationError"))
        .collect();
    let other: Vec<&&str> = refused
        .iter()
        .filter(|l| !l.contains("internalTrafficPolicy"))
        .collect();
    if refused.is_empty() || !other.is_empty() {
        bail!(
            "the apiserver refused the unchanged stack for more than internalTrafficPolicy \
             (Services that set it: {with_field:?}):\n{refusal}"
        );
    }
    eprintln!(
        "e2e: as expected, the 1.20 apiserver refuses internalTrafficPolicy and nothing else \
         (Services that set it: {with_field:?}); it is stripped from here on:\n{}",
        refused.join("\n")
    );
    Ok(())
}

/// Writes `objects` as a List and runs `kubectl apply -f` on it with
/// `extra` arguments; returns kubectl's output.
fn apply(cluster: &Cluster, name: &str, objects: &[Value], extra: &[&str]) -> Result<String> {
    let path = cluster.work.run.join(format!("{name}.json"));
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
    fs::write(&path, serde_json::to_vec_pretty(&list)?)?;
    let mut args = vec!["apply", "-f"];
    let path = path.display().to_string();
    args.push(&path);
    args.extend(extra);
    cluster.kubectl(&args)
}

/// A hostPath PersistentVolume, bound in advance, for every claim the
/// StatefulSets' volumeClaimTemplates make, on a directory under the run dir
/// owned by the user the pod runs as (a hostPath gets no fsGroup).
fn create_volumes(cluster: &Cluster, objects: &[Value]) -> Result<()> {
    let mut volumes = Vec::new();
    for set in objects.iter().filter(|o| o["kind"] == "StatefulSet") {
        let set_name = set["metadata"]["name"].as_str().unwrap_or("");
        let replicas = set["spec"]["replicas"].as_u64().unwrap_or(1);
        let owner = set["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
            .as_u64()
            .unwrap_or(0) as u32;
        for template in set["spec"]["volumeClaimTemplates"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for ordinal in 0..replicas {
                let claim = format!(
                    "{}-{set_name}-{ordinal}",
                    template["metadata"]["name"].as_str().unwrap_or("")
                );
                let dir = volume_root(cluster).join(&claim);
                fs::create_dir_all(&dir)?;
                std::os::unix::fs::chown(&dir, Some(owner), Some(owner))
                    .with_context(|| format!("chown {owner} {}", dir.display()))?;
                volumes.push(json!({
                    "apiVersion": "v1",
                    "kind": "PersistentVolume",
                    "metadata": {"name": volume_name(&claim), "labels": {"app.kubernetes.io/part-of": "ergon-e2e"}},
                    "spec": {
                        "capacity": {"storage": template["spec"]["resources"]["requests"]["storage"]},
                        "accessModes": template["spec"]["accessModes"],
                        "persistentVolumeReclaimPolicy": "Retain",
                        "hostPath": {"path": dir.display().to_string(), "type": "Directory"},
                        "claimRef": {"namespace": NAMESPACE, "name": claim},
                    }
                }));
            }
        }
    }
    if volumes.is_empty() {
        bail!("the stack's StatefulSets claim no volumes: the e2e's volume step has gone stale");
    }
    apply(cluster, "stack-volumes", &volumes, &[]).map(|_| ())
}

fn volume_root(cluster: &Cluster) -> PathBuf {
    cluster.work.run.join("stack-volumes")
}

fn volume_name(claim: &str) -> String {
    format!("ergon-e2e-{NAMESPACE}-{claim}")
}

/// The Secrets stack/README.md asks the operator to create, for the deployed
/// components, with generated values.
fn create_secrets(cluster: &Cluster) -> Result<()> {
    let random = || -> Result<String> {
        let mut bytes = [0u8; 24];
        use std::io::Read;
        fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
    };
    let secrets: [(&str, &[&str]); 2] = [
        ("redis-auth", &["password"]),
        (
            "influxdb-auth",
            &[
                "admin-user",
                "admin-password",
                "admin-token",
                "grafana-read-token",
            ],
        ),
    ];
    for (name, keys) in secrets {
        let mut args = vec![
            "create".to_owned(),
            "secret".to_owned(),
            "generic".to_owned(),
            name.to_owned(),
            "-n".to_owned(),
            NAMESPACE.to_owned(),
        ];
        for key in keys {
            args.push(format!("--from-literal={key}={}", random()?));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cluster.kubectl(&args)?;
    }
    Ok(())
}

/// A Ready pod of the stack: its name, uid and component.
pub struct StackPod {
    pub name: String,
    pub uid: String,
    pub component: &'static str,
}

/// Waits until every deployed component has a Ready pod.
fn wait_ready(cluster: &Cluster) -> Result<Vec<StackPod>> {
    let listing = || -> Result<Vec<(String, String, bool)>> {
        let out = cluster.kubectl(&[
            "get",
            "pods",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.metadata.uid} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
        ])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                (fields.len() >= 2).then(|| {
                    (
                        fields[0].to_owned(),
                        fields[1].to_owned(),
                        fields.get(2) == Some(&"True"),
                    )
                })
            })
            .collect())
    };
    let ready = cluster::wait_for(
        &format!("a Ready pod of each of {DEPLOYED:?}"),
        Duration::from_secs(180),
        || {
            let pods = listing()?;
            let mut found = Vec::new();
            for component in DEPLOYED {
                match pods
                    .iter()
                    .find(|(name, _, ready)| *ready && name.starts_with(&format!("{component}-")))
                {
                    Some((name, uid, _)) => found.push(StackPod {
                        name: name.clone(),
                        uid: uid.clone(),
                        component,
                    }),
                    None => return Ok(None),
                }
            }
            Ok(Some(found))
        },
    );
    match ready {
        Ok(pods) => {
            for pod in &pods {
                eprintln!("e2e: {} Ready ({})", pod.name, pod.component);
            }
            Ok(pods)
        }
        Err(error) => {
            let state = cluster
                .kubectl(&["get", "pods,pvc", "-n", NAMESPACE, "-o", "wide"])
                .unwrap_or_default();
            let events = cluster
                .kubectl(&["get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp"])
                .unwrap_or_default();
            bail!("{error:#}\n{state}\nevents:\n{events}")
        }
    }
}

/// Every socket that a process of a stack pod listens on is bound to
/// loopback, and each pod listens somewhere (so the check saw it).
fn check_loopback_listeners(pods: &[StackPod]) -> Result<()> {
    let sockets = super::output(std::process::Command::new("ss").args(["-Hltunp"]))
        .context("listing listening sockets with ss (apt-get install iproute2)")?;
    for pod in pods {
        let cgroup = super::workloads::pod_cgroup(&pod.uid)?;
        let mut pids = BTreeSet::new();
        collect_pids(&cgroup, &mut pids);
        let mut listening = Vec::new();
        for line in sockets.lines() {
            let line_pids: BTreeSet<u32> = line
                .split("pid=")
                .skip(1)
                .filter_map(|rest| rest.split(',').next()?.parse().ok())
                .collect();
            if line_pids.is_disjoint(&pids) {
                continue;
            }
            let local = line.split_whitespace().nth(4).unwrap_or("");
            if !(local.starts_with("127.0.0.1:") || local.starts_with("[::1]:")) {
                bail!(
                    "pod {} listens on {local}, not on loopback only:\n{line}",
                    pod.name
                );
            }
            listening.push(local.to_owned());
        }
        if listening.is_empty() {
            bail!(
                "no listening socket found for pod {} (pids {pids:?}): the check saw nothing",
                pod.name
            );
        }
        eprintln!("e2e: {} listens on {listening:?} only", pod.name);
    }
    Ok(())
}

fn collect_pids(cgroup: &Path, pids: &mut BTreeSet<u32>) {
    let procs = fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    for entry in fs::read_dir(cgroup).into_iter().flatten().flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            collect_pids(&entry.path(), pids);
        }
    }
}

/// The namespace, the volumes, the CRDs and the node label go; the images
/// stay in the cached image store.
fn clean_up(cluster: &Cluster) -> Result<()> {
    let mut failures = Vec::new();
    let mut attempt = |what: &str, args: &[&str]| {
        if let Err(error) = cluster.kubectl(args) {
            failures.push(format!("{what}: {error:#}"));
        }
    };
    attempt(
        "deleting the namespace",
        &[
            "delete",
            "namespace",
            NAMESPACE,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=300s",
        ],
    );
    attempt(
        "deleting the volumes",
        &[
            "delete",
            "persistentvolumes",
            "-l",
            "app.kubernetes.io/part-of=ergon-e2e",
            "--ignore-not-found",
        ],
    );
    let crds: Vec<String> = CRDS.iter().map(|c| format!("crd/{c}")).collect();
    let mut args = vec!["delete", "--ignore-not-found"];
    args.extend(crds.iter().map(String::as_str));
    attempt("deleting the stack's CRDs", &args);
    let unlabel = format!("{EDGE_LABEL}-");
    attempt(
        "removing the node label",
        &["label", "node", &cluster.node, &unlabel],
    );
    let _ = fs::remove_dir_all(volume_root(cluster));
    if !failures.is_empty() {
        bail!("cleaning up the stack failed: {}", failures.join("; "));
    }
    Ok(())
}
