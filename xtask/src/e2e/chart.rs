//! The chart as an operator installs it: `helm install --wait` of
//! `daemonset/helm/ergon`, then what the cluster shows about the pod — Ready,
//! its log naming the probe and meters it chose, and its ServiceAccount
//! allowed exactly what it needs (reading this node's pods).

use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::cluster::{self, APISERVER_PORT, Cluster};
use super::image::{ERGON_REPOSITORY, ERGON_TAG};

pub const RELEASE: &str = "ergon";
pub const NAMESPACE: &str = "ergon-system";
/// Not the exporter's default port: the node shares the host's network with
/// whatever else runs here.
pub const PORT: u16 = 39102;
/// Short, so the e2e sees a deleted pod's series disappear.
pub const RETENTION: &str = "40s";

/// The two profiles the e2e installs, one after the other.
#[derive(Clone, Copy, Debug)]
pub enum Profile {
    /// The default values: a privileged container.
    Privileged,
    /// `securityProfile: least-privilege` with the capability fallback for
    /// docker 20.10, which knows neither CAP_BPF nor CAP_PERFMON.
    LeastPrivilege,
}

fn helm(cluster: &Cluster) -> std::process::Command {
    let mut cmd = std::process::Command::new(super::tool("helm"));
    cmd.env("KUBECONFIG", cluster.work.kubeconfig())
        .env("HELM_CACHE_HOME", cluster.work.run.join("helm/cache"))
        .env("HELM_CONFIG_HOME", cluster.work.run.join("helm/config"))
        .env("HELM_DATA_HOME", cluster.work.run.join("helm/data"));
    cmd
}

/// The ServiceMonitor and PrometheusRule kinds (xtask/e2e/prometheus-operator-crds.yaml).
pub fn install_operator_crds(cluster: &Cluster) -> Result<()> {
    let crds = super::script("prometheus-operator-crds.yaml");
    cluster.kubectl(&["apply", "-f", &crds.display().to_string()])?;
    for crd in ["servicemonitors", "prometheusrules"] {
        cluster.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{crd}.monitoring.coreos.com"),
        ])?;
    }
    Ok(())
}

/// The grid's carbon intensity, in the ConfigMap the chart mounts
/// (`exporter.carbonIntensity.configMap`): the dashboards' CO2e panels and
/// the carbon rules need it, and the file path is the one whose timestamp
/// the staleness alert reads.
pub const CARBON_CONFIGMAP: &str = "grid-carbon";
pub const CARBON_GRAMS_PER_KWH: &str = "350";

/// The release's namespace and the carbon ConfigMap, which an operator (or
/// a grid-data CronJob) creates beside the chart.
fn create_carbon_configmap(cluster: &Cluster) -> Result<()> {
    let manifest = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {CARBON_CONFIGMAP}\n  \
         namespace: {NAMESPACE}\ndata:\n  intensity: \"{CARBON_GRAMS_PER_KWH}\"\n"
    );
    let path = cluster.work.run.join("carbon-configmap.yaml");
    std::fs::write(&path, manifest).with_context(|| format!("writing {}", path.display()))?;
    cluster.kubectl(&["apply", "-f", &path.display().to_string()])?;
    Ok(())
}

/// `helm upgrade --install --wait` with the e2e's values for `profile`.
pub fn install(cluster: &Cluster, profile: Profile) -> Result<()> {
    create_carbon_configmap(cluster)?;
    let chart = super::root().join("daemonset/helm/ergon");
    let mut cmd = helm(cluster);
    cmd.args(["upgrade", "--install", RELEASE])
        .arg(&chart)
        .args(["--namespace", NAMESPACE, "--create-namespace"])
        .args(["--wait", "--timeout", "180s"])
        .args(["--set", &format!("image.repository={ERGON_REPOSITORY}")])
        .args(["--set", &format!("image.tag={ERGON_TAG}")])
        .args(["--set", "image.pullPolicy=Never"])
        .args(["--set", "hostNetwork=true"])
        .args([
            "--set",
            &format!("exporter.carbonIntensity.configMap={CARBON_CONFIGMAP}"),
        ])
        .args(["--set", &format!("port={PORT}")])
        // The `kubernetes` Service has no endpoints on this node (the
        // apiserver refuses a loopback one): pods reach the API directly.
        .args(["--set", "exporter.extraEnv[0].name=KUBERNETES_SERVICE_HOST"])
        .args(["--set-string", "exporter.extraEnv[0].value=127.0.0.1"])
        .args(["--set", "exporter.extraEnv[1].name=KUBERNETES_SERVICE_PORT"])
        .args([
            "--set-string",
            &format!("exporter.extraEnv[1].value={APISERVER_PORT}"),
        ])
        .args([
            "--set",
            &format!("exporter.extraArgs={{--retention={RETENTION}}}"),
        ]);
    // The default profile keeps the chart's default pod source (auto: the
    // real kubelet's /pods); the second pass watches the API server, so
    // both sources meet the real cluster.
    if let Profile::LeastPrivilege = profile {
        cmd.args(["--set", "securityProfile=least-privilege"])
            .args([
                "--set",
                "leastPrivilege.capabilities={SYS_ADMIN,SYS_CHROOT}",
            ])
            .args(["--set", "exporter.podSource=apiserver"]);
    }
    super::run(&mut cmd).with_context(|| format!("helm install of the {profile:?} profile"))?;
    wait_ready(cluster, profile)
}

/// The DaemonSet's pods, as `name` per line.
fn pods(cluster: &Cluster) -> Result<Vec<String>> {
    let out = cluster.kubectl(&[
        "get",
        "pods",
        "-n",
        NAMESPACE,
        "-l",
        &format!("app.kubernetes.io/instance={RELEASE}"),
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type==\"Ready\")].status} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
    ])?;
    Ok(out.lines().map(str::to_owned).collect())
}

/// The one Ready exporter pod of the current rollout.
pub fn ready_pod(cluster: &Cluster) -> Result<String> {
    cluster::wait_for(
        "the exporter pod to be the only one and Ready",
        Duration::from_secs(180),
        || {
            let lines = pods(cluster)?;
            if lines.len() != 1 {
                return Ok(None);
            }
            let fields: Vec<&str> = lines[0].split_whitespace().collect();
            Ok((fields.len() == 2 && fields[1] == "True").then(|| fields[0].to_owned()))
        },
    )
}

fn wait_ready(cluster: &Cluster, profile: Profile) -> Result<()> {
    let pod = ready_pod(cluster)?;
    let log = cluster.kubectl(&["logs", "-n", NAMESPACE, &pod])?;
    eprintln!("e2e: {profile:?} profile: pod {pod} Ready; its log:\n{log}");
    // --pod-source auto must take the real kubelet here (a fallback to the
    // API server would hide a broken kubelet client); apiserver watches.
    let pod_source = match profile {
        Profile::Privileged => "pod metadata from the kubelet",
        Profile::LeastPrivilege => "pod watch started",
    };
    for (needle, what) in [
        ("eBPF probe attached", "the eBPF probe it chose"),
        ("meter found", "the meter it chose"),
        (pod_source, "where it gets this node's pods from"),
    ] {
        if !log.contains(needle) {
            bail!(
                "{profile:?} profile: the log of {pod} does not show {what} (no `{needle}` line)"
            );
        }
    }
    // Both profiles may chroot the loader's thread (CAP_SYS_CHROOT), so
    // neither parses the kernel's BTF at start (the memory peak).
    if log.contains("could not chroot") {
        bail!(
            "{profile:?} profile: {pod} could not chroot to skip the BTF parse: the chart's \
             capabilities lack SYS_CHROOT"
        );
    }
    check_rbac(cluster, profile)
}

/// The ServiceAccount may read pods the way its pod source does (all the
/// exporter needs) and nothing it does not need.
fn check_rbac(cluster: &Cluster, profile: Profile) -> Result<()> {
    let account = format!("system:serviceaccount:{NAMESPACE}:{RELEASE}");
    let can = |verb: &str, resource: &str| -> Result<bool> {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        let mut command = cluster.kubectl_command();
        command.args(["auth", "can-i", verb, resource, "--as", &account]);
        if !subresource.is_empty() {
            command.args(["--subresource", subresource]);
        }
        let out = command.args(["--all-namespaces"]).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim() == "yes")
    };
    // auto needs the kubelet's nodes/proxy and, for its fallback, the
    // watch; apiserver only the watch.
    let kubelet = matches!(profile, Profile::Privileged);
    let mut needed = vec![("list", "pods"), ("watch", "pods")];
    // Nothing reads Node objects or gets single pods (a watch lists, then
    // watches): those verbs are not granted.
    let mut denied = vec![
        ("delete", "pods"),
        ("list", "secrets"),
        ("create", "pods"),
        ("get", "nodes"),
        ("get", "pods"),
    ];
    if kubelet {
        needed.push(("get", "nodes/proxy"));
    } else {
        denied.push(("get", "nodes/proxy"));
    }
    for (verb, resource) in needed {
        if !can(verb, resource)? {
            bail!("RBAC denies the exporter's ServiceAccount `{verb} {resource}`, which it needs");
        }
    }
    for (verb, resource) in denied {
        if can(verb, resource)? {
            bail!(
                "RBAC allows the exporter's ServiceAccount `{verb} {resource}`, which it does not need"
            );
        }
    }
    Ok(())
}

/// `kubectl rollout restart` of the DaemonSet, waiting until the new pod is
/// Ready and the old one gone.
pub fn rollout_restart(cluster: &Cluster) -> Result<String> {
    let daemonset = format!("daemonset/{RELEASE}");
    cluster.kubectl(&["rollout", "restart", "-n", NAMESPACE, &daemonset])?;
    cluster.kubectl(&[
        "rollout",
        "status",
        "-n",
        NAMESPACE,
        &daemonset,
        "--timeout=180s",
    ])?;
    ready_pod(cluster)
}

pub fn uninstall(cluster: &Cluster) -> Result<()> {
    super::run(helm(cluster).args(["uninstall", RELEASE, "--namespace", NAMESPACE, "--wait"]))
}
