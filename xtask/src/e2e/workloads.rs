//! Real workloads on the node and what Prometheus shows about them.
//!
//! Three pods run 1, 2 and 4 busy loops. Each is held to 100 millicores per
//! loop by its CPU limit (requests equal limits): the ratio of their CPU is
//! then steady whatever else runs on the machine, and the e2e takes at most
//! 0.7 of a core from the engineers' tests running beside it. A fourth pod
//! lives about 20 s and is deleted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::cluster::{self, Cluster};
use super::image::BUSYBOX_IMAGE;
use super::prometheus::Prometheus;

pub const NAMESPACE: &str = "ergon-e2e-load";
/// (pod name, busy loops).
pub const LOOP_PODS: [(&str, u32); 3] = [("loops-1", 1), ("loops-2", 2), ("loops-4", 4)];
const SHORT_LIVED: &str = "short-lived";
const CONTAINER: &str = "busy";
/// The ratio check's tolerance (the issue's ±5%).
const RATIO_TOLERANCE: f64 = 0.05;

fn pod_manifest(name: &str, loops: u32) -> String {
    let millicores = 100 * loops;
    format!(
        r#"---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  containers:
    - name: {CONTAINER}
      image: {BUSYBOX_IMAGE}
      imagePullPolicy: Never
      command: ["/bin/busybox", "sh", "-c", "for i in $(seq {loops}); do (while :; do :; done) & done; wait"]
      resources:
        requests: {{cpu: {millicores}m, memory: 16Mi}}
        limits: {{cpu: {millicores}m, memory: 16Mi}}
"#
    )
}

fn apply(cluster: &Cluster, name: &str, manifest: &str) -> Result<()> {
    let path = cluster.work.run.join(format!("{name}.yaml"));
    std::fs::write(&path, manifest)?;
    cluster
        .kubectl(&["apply", "-f", &path.display().to_string()])
        .map(|_| ())
}

/// Creates the namespace and the three busy pods, and waits for them to run.
pub fn start_loops(cluster: &Cluster) -> Result<()> {
    let mut manifest = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n");
    for (name, loops) in LOOP_PODS {
        manifest.push_str(&pod_manifest(name, loops));
    }
    apply(cluster, "loops", &manifest)?;
    wait_running(cluster, &LOOP_PODS.map(|(name, _)| name))
}

fn wait_running(cluster: &Cluster, pods: &[&str]) -> Result<()> {
    cluster::wait_for(
        &format!("pods {pods:?} to run"),
        Duration::from_secs(120),
        || {
            for pod in pods {
                if pod_field(cluster, pod, "{.status.phase}")? != "Running" {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
}

/// One field of a pod of [`NAMESPACE`], as a kubectl JSONPath.
fn pod_field(cluster: &Cluster, pod: &str, jsonpath: &str) -> Result<String> {
    let template = format!("jsonpath={jsonpath}");
    Ok(cluster
        .kubectl(&["get", "pod", pod, "-n", NAMESPACE, "-o", &template])?
        .trim()
        .to_owned())
}

fn pod_uid(cluster: &Cluster, pod: &str) -> Result<String> {
    pod_field(cluster, pod, "{.metadata.uid}")
}

/// The pod's cgroup in the unified (v2) hierarchy, where the kernel keeps
/// `cpu.stat` for every cgroup.
pub(super) fn pod_cgroup(uid: &str) -> Result<PathBuf> {
    let leaf = format!("pod{uid}");
    let unified = if Path::new("/sys/fs/cgroup/unified/kubepods").is_dir() {
        PathBuf::from("/sys/fs/cgroup/unified/kubepods")
    } else {
        PathBuf::from("/sys/fs/cgroup/kubepods")
    };
    for dir in [
        unified.clone(),
        unified.join("burstable"),
        unified.join("besteffort"),
    ] {
        let path = dir.join(&leaf);
        if path.is_dir() {
            return Ok(path);
        }
    }
    bail!("no cgroup {leaf} under {}", unified.display())
}

/// `usage_usec` of the pod's cgroup, in seconds.
fn cgroup_cpu_seconds(cgroup: &Path) -> Result<f64> {
    let stat = std::fs::read_to_string(cgroup.join("cpu.stat"))
        .with_context(|| format!("reading {}/cpu.stat", cgroup.display()))?;
    let usec: f64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .context("cpu.stat has no usage_usec")?
        .trim()
        .parse()?;
    Ok(usec / 1e6)
}

/// The exporter names the real namespace, pods and container, and the 1- and
/// 4-loop pods' joules are in the ratio of the CPU their cgroups were charged.
pub fn check_names_and_ratio(cluster: &Cluster, prometheus: &Prometheus) -> Result<()> {
    let pods = cluster::wait_for(
        "Prometheus to show the three busy pods by name",
        Duration::from_secs(120),
        || {
            let found = prometheus.values_by(
                &format!("ergon_pod_energy_joules_total{{namespace=\"{NAMESPACE}\"}} > 0"),
                "pod",
            )?;
            let names: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
            Ok(LOOP_PODS
                .iter()
                .all(|(p, _)| names.contains(p))
                .then_some(found))
        },
    )?;
    eprintln!("e2e: pods by name: {pods:?}");
    // A kubelet lists a new pod before its container statuses; the
    // exporter asks again within a few intervals (--pod-source auto takes
    // the kubelet here), so the container's name may follow the pod's.
    let query =
        format!("ergon_container_energy_joules_total{{namespace=\"{NAMESPACE}\",pod=\"loops-4\"}}");
    let named = cluster::wait_for(
        &format!("container=\"{CONTAINER}\" of pod loops-4"),
        Duration::from_secs(60),
        || {
            let containers = prometheus.values_by(&query, "container")?;
            Ok(containers.iter().any(|(c, _)| c == CONTAINER).then_some(()))
        },
    );
    if named.is_err() {
        bail!(
            "ergon_container_energy_joules_total has no container=\"{CONTAINER}\" for pod loops-4 \
             after 60 s (found {:?})",
            prometheus.values_by(&query, "container")?
        );
    }

    // Let the counters run long enough that the exporter's and Prometheus'
    // few seconds of lag are small beside them.
    let cgroups = [
        pod_cgroup(&pod_uid(cluster, "loops-1")?)?,
        pod_cgroup(&pod_uid(cluster, "loops-4")?)?,
    ];
    cluster::wait_for(
        "60 s of CPU in the busy pods",
        Duration::from_secs(240),
        || Ok((cgroup_cpu_seconds(&cgroups[1])? > 24.0).then_some(())),
    )?;
    let joules = |pod: &str| -> Result<f64> {
        let found = prometheus.values_by(
            &format!("ergon_pod_energy_joules_total{{namespace=\"{NAMESPACE}\",pod=\"{pod}\"}}"),
            "pod",
        )?;
        found
            .first()
            .map(|(_, j)| *j)
            .with_context(|| format!("no ergon_pod_energy_joules_total for {pod}"))
    };
    let (joules_1, joules_4) = (joules("loops-1")?, joules("loops-4")?);
    let (cpu_1, cpu_4) = (
        cgroup_cpu_seconds(&cgroups[0])?,
        cgroup_cpu_seconds(&cgroups[1])?,
    );
    let joules_ratio = joules_1 / joules_4;
    let cpu_ratio = cpu_1 / cpu_4;
    eprintln!(
        "e2e: loops-1 {joules_1:.3} J / {cpu_1:.2} CPU s, loops-4 {joules_4:.3} J / {cpu_4:.2} CPU s: \
         joules ratio {joules_ratio:.4}, cpu.stat ratio {cpu_ratio:.4}"
    );
    if !((joules_ratio / cpu_ratio) - 1.0)
        .abs()
        .le(&RATIO_TOLERANCE)
    {
        bail!(
            "the joules of loops-1 and loops-4 are in the ratio {joules_ratio:.4}, their cgroups' \
             cpu.stat in {cpu_ratio:.4}: more than {:.0}% apart",
            RATIO_TOLERANCE * 100.0
        );
    }
    // Each pod's sandbox (pause) container has a container cgroup that no
    // container status names: its energy belongs to the pod's series, not
    // to a `container=""` one (Prometheus marks a series stale as soon as a
    // scrape lacks it, so one folded a minute ago is not returned).
    let unnamed = prometheus.query(&format!(
        "ergon_container_energy_joules_total{{namespace=\"{NAMESPACE}\",container=\"\"}}"
    ))?;
    if !unnamed.is_empty() {
        bail!(
            "container series without a container name in {NAMESPACE}: the pods' sandboxes \
             must fold into their pods: {unnamed:?}"
        );
    }
    Ok(())
}

/// A pod that lives ~20 s and is deleted: its series keeps its final value,
/// then disappears once the exporter's retention has passed.
pub fn check_deleted_pod(
    cluster: &Cluster,
    prometheus: &Prometheus,
    retention: Duration,
) -> Result<()> {
    apply(cluster, SHORT_LIVED, &pod_manifest(SHORT_LIVED, 1))?;
    wait_running(cluster, &[SHORT_LIVED])?;
    cluster::sleep(Duration::from_secs(20))?;
    let series =
        format!("ergon_pod_energy_joules_total{{namespace=\"{NAMESPACE}\",pod=\"{SHORT_LIVED}\"}}");
    let value = |what: &str| -> Result<Option<f64>> {
        let found = prometheus.values_by(&series, "pod")?;
        eprintln!("e2e: {SHORT_LIVED} {what}: {found:?}");
        Ok(found.first().map(|(_, j)| *j))
    };
    if value("before deletion")?.is_none() {
        bail!("{SHORT_LIVED} ran 20 s but Prometheus has no {series}");
    }
    // The exporter's retention starts when the pod's cgroup goes, which is
    // after this request and before `kubectl delete --wait` returns. How
    // long the kubelet takes to remove the pod object after that varies
    // (47 s on a loaded machine in one run, past the moment the series
    // expired), so the check reads what Prometheus recorded from the
    // request until the series went, rather than sampling at guessed times.
    let requested = unix_now();
    cluster.kubectl(&["delete", "pod", SHORT_LIVED, "-n", NAMESPACE, "--wait=true"])?;
    eprintln!(
        "e2e: {SHORT_LIVED} deleted ({:.0} s for `kubectl delete --wait`)",
        unix_now() - requested
    );
    cluster::wait_for(
        &format!("{series} to disappear after the retention"),
        retention + Duration::from_secs(120),
        || Ok(prometheus.query(&series)?.is_empty().then_some(())),
    )?;
    let gone = unix_now();
    let points = prometheus.range(&series, requested, gone, 1)?;
    let Some(&(last_at, final_joules)) = points.last() else {
        bail!("{series} vanished with the deletion request, before the retention");
    };
    // One point a second, each the last scrape's sample: a gap longer than
    // two scrapes means the series left and came back.
    if let Some(gap) = points.windows(2).find(|w| w[1].0 - w[0].0 > 11.0) {
        bail!(
            "{series} was absent from {:.0} to {:.0} (Unix s) while the pod was being deleted",
            gap[0].0,
            gap[1].0
        );
    }
    if let Some(w) = points.windows(2).find(|w| w[1].1 < w[0].1) {
        bail!("{SHORT_LIVED}'s counter went down after the deletion request: {w:?}");
    }
    // From the first point at the final value to the last point: the time
    // the deleted pod's final counter stayed exported.
    let final_from = points
        .iter()
        .find(|(_, joules)| *joules == final_joules)
        .map_or(last_at, |(at, _)| *at);
    let kept = last_at - final_from;
    eprintln!(
        "e2e: {SHORT_LIVED} kept its final {final_joules:.3} J for {kept:.0} s, gone from \
         Prometheus {:.0} s after the deletion request (retention {retention:?})",
        gone - requested
    );
    // The series stops at the scrape after the exporter dropped it, its
    // value at the first scrape after the last slice: ±2 scrapes of 5 s.
    if kept + 10.0 < retention.as_secs_f64() {
        bail!(
            "{series} kept its final value for only {kept:.0} s before it went, less than the \
             retention of {retention:?}"
        );
    }
    Ok(())
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// The energy counters, for the no-decrease check across restarts. Pod
/// and container series only where the API named them: this machine is
/// shared with tests that create and remove pod-shaped cgroups with
/// synthetic uids (ergon_testkit), whose unnamed series restart from zero
/// when a uid is reused — seen in the first runs, and not this cluster's
/// pods.
pub const COUNTERS: [&str; 4] = [
    "ergon_node_energy_joules_total",
    "ergon_pod_energy_joules_total{namespace!=\"\"}",
    "ergon_container_energy_joules_total{namespace!=\"\"}",
    "ergon_container_cpu_seconds_total{namespace!=\"\"}",
];

/// Deletes the load's namespace and waits until it is gone (its busy loops
/// would otherwise take CPU from the stack's step). Each pod's deletion
/// waits for the kubelet's cleanup, ~47 s on a loaded node; one CI run
/// went past 120 s for the namespace, so the wait is 300 s, and a timeout
/// says what was left.
pub fn delete_namespace(cluster: &Cluster) -> Result<()> {
    let started = std::time::Instant::now();
    let deleted = cluster.kubectl(&[
        "delete",
        "namespace",
        NAMESPACE,
        "--wait=true",
        "--timeout=300s",
    ]);
    match deleted {
        Ok(_) => {
            eprintln!(
                "e2e: namespace {NAMESPACE} deleted in {:.0} s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(e) => {
            let left = cluster
                .kubectl(&["get", "pods", "-n", NAMESPACE, "-o", "wide"])
                .unwrap_or_else(|e| format!("(pods not listed: {e:#})"));
            let status = cluster
                .kubectl(&["get", "namespace", NAMESPACE, "-o", "jsonpath={.status}"])
                .unwrap_or_else(|e| format!("(status not read: {e:#})"));
            Err(e.context(format!(
                "namespace {NAMESPACE} not gone after {:.0} s; its pods:\n{left}\nits status: \
                 {status}",
                started.elapsed().as_secs_f64()
            )))
        }
    }
}
