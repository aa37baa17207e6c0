//! Kubernetes pod metadata for this node: names, container names, CPU
//! requests and allow-listed labels, keyed by pod uid.
//!
//! The cgroup path already gives each pod's uid and each container's id, so
//! the exporter never needs the API to attribute energy; the API only adds
//! names. Hence the failure policy: when the API is unreachable or forbids
//! us, the directory keeps the last pods it knew, the exporter keeps
//! exporting by uid, and names come back when the API does. Nothing here
//! panics or ends the task on an API error.
//!
//! Decisions:
//! - One `kube::runtime::watcher` on `pods` with
//!   `fieldSelector=spec.nodeName=<node>`: the API server filters, so a node
//!   holds only its own ≤ 110 pods however large the cluster.
//! - After any watcher error the watcher is dropped and rebuilt after a
//!   backoff (doubling up to `retry_max`), so every reconnection starts with a
//!   full list. That makes the connection state exact (`connected` turns true
//!   when a list has been received, not at the next pod change) and lets the
//!   list replace the directory atomically, so pods deleted during an outage
//!   are noticed.
//! - Warnings are themselves backed off: the first failure, then the 2nd,
//!   4th, 8th… consecutive one is a warning, the others are debug lines.
//! - A deleted pod stays in the directory for `deleted_retention` (default
//!   15 min, like the exporter's counters), because its last joules are still
//!   exported that long and still need its name.
//! - Static pods: the kubelet names their cgroup after the config hash, not
//!   the uid of the mirror pod the API shows; the mirror pod carries that hash
//!   in the `kubernetes.io/config.mirror` annotation, so lookups accept both.
//! - CPU requests are summed over the pod's regular containers, the value the
//!   `cpu-requests` idle policy shares idle energy by.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;

/// The annotation a mirror pod carries with its static pod's config hash.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// What the exporter knows of one pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// Container id (without the `containerd://` scheme) → container name,
    /// for regular, init and ephemeral containers that have started.
    pub containers: HashMap<String, String>,
    /// Some container of the spec (regular, init or ephemeral) has no
    /// container id in the status yet: a container id of this pod missing
    /// from `containers` may be one of them, not yet reported. When false,
    /// such an id is the pod's sandbox (pause) container, whose id the API
    /// never shows (or an old instance of a restarted container).
    pub containers_pending: bool,
    /// Sum of the regular containers' CPU requests.
    pub cpu_request_millicores: u64,
    /// Only the labels whose keys are on the allow-list.
    pub labels: BTreeMap<String, String>,
}

/// How the watcher is doing, for `ergon doctor` and `/readyz`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionState {
    /// The latest list or watch succeeded and no error has come since.
    pub connected: bool,
    /// A full pod list has been received at least once.
    pub synced: bool,
    /// The latest error, kept after reconnecting (for diagnosis).
    pub last_error: Option<String>,
    /// Errors since the last successful list.
    pub consecutive_failures: u32,
}

#[derive(Debug, Default)]
struct PodEntry {
    meta: Arc<PodMeta>,
    deleted_at: Option<Instant>,
    /// Static pod config hash, when this is a mirror pod.
    config_hash: Option<String>,
}

#[derive(Debug, Default)]
struct Directory {
    pods: HashMap<String, PodEntry>,
    /// Static pod config hash → mirror pod uid.
    uid_by_config_hash: HashMap<String, String>,
    /// Pod uids (and `uid/container id` pairs) looked up and not found, so
    /// that a cgroup no pod list explains (an orphan the kubelet forgot)
    /// asks for at most [`MAX_EARLY_POLLS`] polls, not one per interval
    /// forever.
    missed: HashMap<String, Missed>,
    state: ConnectionState,
}

/// One uid or container looked up and not found.
#[derive(Debug, Default)]
struct Missed {
    /// An early poll was asked for and has not happened yet.
    waiting: bool,
    /// Polls since it was first missed.
    polls: u8,
}

/// Bound of [`Directory::missed`]; past it the map starts over (at worst a
/// few more polls per forgotten uid).
const MAX_MISSED: usize = 4096;

/// Early polls one missed uid or container may cause. More than one: a
/// kubelet lists a new pod before its container statuses (seen on a real
/// v1.20 kubelet), so the poll the pod's first cgroup caused can come back
/// without the container names, and the next one, 5 s later, has them.
pub const MAX_EARLY_POLLS: u8 = 3;

/// The node's pods, shared between the watcher task (writer) and the
/// interval loop (readers). Cloning shares the same directory.
#[derive(Clone, Debug, Default)]
pub struct PodDirectory {
    inner: Arc<RwLock<Directory>>,
    /// Woken when a lookup misses a uid for the first time: the kubelet
    /// poller ([`super::kubelet`]) polls early for it.
    unknown_pod: Arc<tokio::sync::Notify>,
}

impl PodDirectory {
    pub fn new() -> Self {
        Self::default()
    }

    /// The pod with this uid (as the cgroup path gives it, so a static pod's
    /// config hash works too), including recently deleted pods.
    pub fn pod(&self, pod_uid: &str) -> Option<Arc<PodMeta>> {
        let found = {
            let directory = self.read();
            let uid = directory
                .uid_by_config_hash
                .get(pod_uid)
                .map_or(pod_uid, String::as_str);
            directory.pods.get(uid).map(|entry| Arc::clone(&entry.meta))
        };
        if found.is_none() {
            self.missed(pod_uid.to_owned());
        }
        found
    }

    fn missed(&self, key: String) {
        let mut directory = self.write();
        if directory.missed.len() >= MAX_MISSED {
            directory.missed.clear();
        }
        let missed = directory.missed.entry(key).or_default();
        if !missed.waiting && missed.polls < MAX_EARLY_POLLS {
            missed.waiting = true;
            // `notify_one` keeps a permit when nobody waits yet, so a miss
            // during a poll is not lost.
            self.unknown_pod.notify_one();
        }
    }

    /// A cgroup of a known pod holds a container the pod's metadata does not
    /// name yet (its status lags the runtime): the kubelet poller asks again
    /// early, a few times at most.
    pub fn missed_container(&self, pod_uid: &str, container_id: &str) {
        self.missed(format!("{pod_uid}/{container_id}"));
    }

    /// Resolves when a lookup has missed a uid or container that may still
    /// be named by an early poll.
    pub(super) async fn unknown_pod_seen(&self) {
        self.unknown_pod.notified().await
    }

    /// Pods that exist now (deleted ones left out), e.g. for idle weights.
    pub fn live_pods(&self) -> Vec<Arc<PodMeta>> {
        self.read()
            .pods
            .values()
            .filter(|entry| entry.deleted_at.is_none())
            .map(|entry| Arc::clone(&entry.meta))
            .collect()
    }

    pub fn connection(&self) -> ConnectionState {
        self.read().state.clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Directory> {
        // A writer that panicked leaves a consistent map (every update is a
        // single insert or replace), so the data is still good to read.
        self.inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Directory> {
        self.inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn upsert(&self, pod: ConvertedPod) {
        let mut directory = self.write();
        directory.insert(pod);
        directory.state.connected = true;
    }

    fn mark_deleted(&self, uid: &str, now: Instant) {
        if let Some(entry) = self.write().pods.get_mut(uid) {
            entry.deleted_at.get_or_insert(now);
        }
    }

    /// A complete list: its pods are current, every other pod is deleted.
    pub(super) fn replace_all(&self, listed: Vec<ConvertedPod>, now: Instant) {
        let mut directory = self.write();
        let listed_uids: std::collections::HashSet<String> =
            listed.iter().map(|pod| pod.meta.uid.clone()).collect();
        for (uid, entry) in directory.pods.iter_mut() {
            if !listed_uids.contains(uid) {
                entry.deleted_at.get_or_insert(now);
            }
        }
        for pod in listed {
            directory.insert(pod);
        }
        let Directory {
            missed,
            pods,
            uid_by_config_hash,
            ..
        } = &mut *directory;
        let known = |key: &str| match key.split_once('/') {
            Some((uid, container_id)) => pods
                .get(uid)
                .is_some_and(|entry| entry.meta.containers.contains_key(container_id)),
            None => pods.contains_key(key) || uid_by_config_hash.contains_key(key),
        };
        missed.retain(|key, _| !known(key));
        for entry in missed.values_mut() {
            if std::mem::take(&mut entry.waiting) {
                entry.polls += 1;
            }
        }
        directory.state.connected = true;
        directory.state.synced = true;
        directory.state.consecutive_failures = 0;
    }

    pub(super) fn prune_deleted(&self, retention: Duration, now: Instant) {
        let mut directory = self.write();
        let Directory {
            pods,
            uid_by_config_hash,
            ..
        } = &mut *directory;
        pods.retain(|uid, entry| {
            let keep = entry
                .deleted_at
                .is_none_or(|since| now.saturating_duration_since(since) < retention);
            // A static pod's mirror deleted and recreated has a new uid that
            // took over the hash: only the entry's own mapping goes.
            if !keep
                && let Some(hash) = &entry.config_hash
                && uid_by_config_hash.get(hash) == Some(uid)
            {
                uid_by_config_hash.remove(hash);
            }
            keep
        });
    }

    /// Records a failure; returns the number of consecutive failures.
    pub(super) fn record_failure(&self, error: String) -> u32 {
        let mut directory = self.write();
        let state = &mut directory.state;
        state.connected = false;
        state.last_error = Some(error);
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        state.consecutive_failures
    }
}

impl Directory {
    fn insert(&mut self, pod: ConvertedPod) {
        // The API server always sets a uid; without one no cgroup can match.
        if pod.meta.uid.is_empty() {
            tracing::debug!(
                namespace = pod.meta.namespace,
                pod = pod.meta.name,
                "pod without a uid ignored"
            );
            return;
        }
        let uid = pod.meta.uid.clone();
        if let Some(hash) = &pod.config_hash {
            self.uid_by_config_hash.insert(hash.clone(), uid.clone());
        }
        self.pods.insert(
            uid,
            PodEntry {
                meta: Arc::new(pod.meta),
                deleted_at: None,
                config_hash: pod.config_hash,
            },
        );
    }
}

/// Where the Kubernetes API is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiSource {
    /// In-cluster service account if present, else the kubeconfig
    /// (`KUBECONFIG` or `~/.kube/config`).
    Infer,
    /// A kubeconfig file.
    Kubeconfig(PathBuf),
    /// A plain API URL without credentials (a proxy such as `kubectl proxy`,
    /// or a test server).
    Url(String),
}

/// Settings of the pod watcher.
#[derive(Clone, Debug)]
pub struct PodWatcherConfig {
    /// This node's name (`spec.nodeName` of its pods), usually from the
    /// downward API as `NODE_NAME`.
    pub node_name: String,
    pub api: ApiSource,
    /// Pod label keys copied into [`PodMeta::labels`]; empty means none.
    pub label_allowlist: Vec<String>,
    /// How long a deleted pod stays resolvable.
    pub deleted_retention: Duration,
    /// First retry delay after an API error; doubles up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl PodWatcherConfig {
    pub fn new(node_name: impl Into<String>, api: ApiSource) -> Self {
        PodWatcherConfig {
            node_name: node_name.into(),
            api,
            label_allowlist: Vec::new(),
            deleted_retention: Duration::from_secs(15 * 60),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeSetupError {
    #[error(
        "the node name is empty: set NODE_NAME (downward API: spec.nodeName) so only this node's pods are watched"
    )]
    NoNodeName,
    #[error("invalid Kubernetes API URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error(
        "no Kubernetes API configuration: not in a cluster ({in_cluster}) and no usable kubeconfig \
         ({kubeconfig}); run in a pod with a service account, or pass a kubeconfig"
    )]
    NoConfig {
        in_cluster: String,
        kubeconfig: String,
    },
    #[error("cannot read the kubeconfig {}: {reason}", path.display())]
    Kubeconfig { path: PathBuf, reason: String },
    #[error("cannot build a Kubernetes client: {0}")]
    Client(String),
}

/// A running pod watcher; dropping it stops the task.
#[derive(Debug)]
pub struct PodWatcher {
    directory: PodDirectory,
    task: tokio::task::JoinHandle<()>,
}

impl PodWatcher {
    /// Builds the client and starts watching in a tokio task. Errors only for
    /// configuration that can never work (no node name, no API config); an
    /// unreachable API is retried forever.
    pub async fn spawn(config: PodWatcherConfig) -> Result<PodWatcher, KubeSetupError> {
        if config.node_name.trim().is_empty() {
            return Err(KubeSetupError::NoNodeName);
        }
        let client = build_client(&config.api).await?;
        let directory = PodDirectory::new();
        let task = tokio::spawn(run_watcher(client, config, directory.clone()));
        Ok(PodWatcher { directory, task })
    }

    pub fn directory(&self) -> &PodDirectory {
        &self.directory
    }
}

impl Drop for PodWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client for `api` (also used to authorize scrapes, `--authorize-metrics`).
pub async fn build_client(api: &ApiSource) -> Result<kube::Client, KubeSetupError> {
    let config = match api {
        ApiSource::Url(url) => {
            let uri = url.parse().map_err(|error: hyper::http::uri::InvalidUri| {
                KubeSetupError::BadUrl {
                    url: url.clone(),
                    reason: error.to_string(),
                }
            })?;
            kube::Config::new(uri)
        }
        ApiSource::Kubeconfig(path) => {
            let kubeconfig_error = |reason: String| KubeSetupError::Kubeconfig {
                path: path.clone(),
                reason,
            };
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| kubeconfig_error(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| kubeconfig_error(e.to_string()))?
        }
        ApiSource::Infer => match kube::Config::incluster() {
            Ok(config) => config,
            Err(in_cluster) => kube::Config::from_kubeconfig(&Default::default())
                .await
                .map_err(|kubeconfig| KubeSetupError::NoConfig {
                    in_cluster: in_cluster.to_string(),
                    kubeconfig: kubeconfig.to_string(),
                })?,
        },
    };
    kube::Client::try_from(config).map_err(|error| KubeSetupError::Client(error.to_string()))
}

async fn run_watcher(client: kube::Client, config: PodWatcherConfig, directory: PodDirectory) {
    let api: kube::Api<Pod> = kube::Api::all(client);
    let selector = format!("spec.nodeName={}", config.node_name);
    let mut prune = tokio::time::interval(Duration::from_secs(30));
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first complete listing is logged once: an operator reading the
    // pod's log sees that names come from the API, and for which node.
    let mut watch_started = false;
    loop {
        let mut stream = watcher(api.clone(), watcher::Config::default().fields(&selector)).boxed();
        let mut listing: Option<Vec<ConvertedPod>> = None;
        let error = loop {
            let event = tokio::select! {
                event = stream.next() => event,
                _ = prune.tick() => {
                    directory.prune_deleted(config.deleted_retention, Instant::now());
                    continue;
                }
            };
            match event {
                Some(Ok(watcher::Event::Init)) => listing = Some(Vec::new()),
                Some(Ok(watcher::Event::InitApply(pod))) => listing
                    .get_or_insert_default()
                    .push(convert_pod(&pod, &config.label_allowlist)),
                Some(Ok(watcher::Event::InitDone)) => {
                    let failures = directory.connection().consecutive_failures;
                    let pods = listing.take().unwrap_or_default();
                    let count = pods.len();
                    directory.replace_all(pods, Instant::now());
                    if !watch_started {
                        watch_started = true;
                        tracing::info!(
                            node = %config.node_name,
                            pods = count,
                            "pod watch started: names come from the Kubernetes API"
                        );
                    } else if failures > 0 {
                        tracing::info!(
                            failures,
                            "Kubernetes API reachable again; pod names are current"
                        );
                    }
                }
                Some(Ok(watcher::Event::Apply(pod))) => {
                    directory.upsert(convert_pod(&pod, &config.label_allowlist))
                }
                Some(Ok(watcher::Event::Delete(pod))) => {
                    if let Some(uid) = pod.metadata.uid.as_deref() {
                        directory.mark_deleted(uid, Instant::now());
                    }
                }
                // The watch's resourceVersion expired (410 Gone): routine on
                // long watches, no outage. The watcher relists by itself and
                // the list replaces the directory.
                Some(Err(watcher::Error::WatchError(status))) if status.code == 410 => {
                    tracing::debug!(message = status.message, "pod watch expired; relisting")
                }
                Some(Err(error)) => break error.to_string(),
                None => break "the watch stream ended".to_owned(),
            }
        };
        let failures = directory.record_failure(error.clone());
        let delay = retry_delay(failures, config.retry_initial, config.retry_max);
        if failures.is_power_of_two() {
            tracing::warn!(
                %error,
                failures,
                retry_in = ?delay,
                "Kubernetes API unavailable; exporting by pod uid with the last known names"
            );
        } else {
            tracing::debug!(%error, failures, retry_in = ?delay, "Kubernetes API still unavailable");
        }
        drop(stream);
        tokio::time::sleep(delay).await;
    }
}

/// `initial × 2^(failures−1)`, at most `max`.
pub(super) fn retry_delay(failures: u32, initial: Duration, max: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    initial.saturating_mul(1 << doublings).min(max)
}

#[derive(Debug)]
pub(super) struct ConvertedPod {
    meta: PodMeta,
    config_hash: Option<String>,
}

pub(super) fn convert_pod(pod: &Pod, label_allowlist: &[String]) -> ConvertedPod {
    let metadata = &pod.metadata;
    let name = metadata.name.clone().unwrap_or_default();
    let namespace = metadata.namespace.clone().unwrap_or_default();
    let labels = metadata
        .labels
        .iter()
        .flatten()
        .filter(|(key, _)| label_allowlist.contains(key))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();

    let mut containers = HashMap::new();
    // Names of the containers that have an id.
    let mut started = HashSet::new();
    if let Some(status) = &pod.status {
        let statuses = [
            &status.container_statuses,
            &status.init_container_statuses,
            &status.ephemeral_container_statuses,
        ];
        for status in statuses.into_iter().flatten().flatten() {
            if let Some(id) = status
                .container_id
                .as_deref()
                .and_then(strip_runtime_scheme)
            {
                containers.insert(id, status.name.clone());
                started.insert(status.name.as_str());
            }
        }
    }
    let containers_pending = pod.spec.as_ref().is_some_and(|spec| {
        spec.containers
            .iter()
            .map(|c| &c.name)
            .chain(spec.init_containers.iter().flatten().map(|c| &c.name))
            .chain(spec.ephemeral_containers.iter().flatten().map(|c| &c.name))
            .any(|name| !started.contains(name.as_str()))
    });

    let mut cpu_request_millicores = 0u64;
    for container in pod.spec.iter().flat_map(|spec| &spec.containers) {
        let request = container
            .resources
            .as_ref()
            .and_then(|resources| resources.requests.as_ref())
            .and_then(|requests| requests.get("cpu"));
        let Some(request) = request else { continue };
        match cpu_millicores(&request.0) {
            Ok(millicores) => {
                cpu_request_millicores = cpu_request_millicores.saturating_add(millicores)
            }
            Err(reason) => tracing::warn!(
                namespace,
                pod = name,
                container = container.name,
                request = request.0,
                reason,
                "ignoring an unparsable CPU request (counted as 0 for the idle policy)"
            ),
        }
    }

    let config_hash = metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(MIRROR_ANNOTATION))
        .map(|hash| hash.to_ascii_lowercase());
    ConvertedPod {
        meta: PodMeta {
            uid: metadata.uid.clone().unwrap_or_default(),
            namespace,
            name,
            containers,
            containers_pending,
            cpu_request_millicores,
            labels,
        },
        config_hash,
    }
}

/// `containerd://<id>`, `cri-o://<id>`, `docker://<id>` → `<id>` (lower
/// case, as the cgroup path gives it). Empty ids (not started) are `None`.
fn strip_runtime_scheme(container_id: &str) -> Option<String> {
    let id = container_id
        .split_once("://")
        .map_or(container_id, |(_, id)| id);
    (!id.is_empty()).then(|| id.to_ascii_lowercase())
}

/// A Kubernetes CPU quantity in millicores, rounded up as the API server
/// does (`0.0001` is 1m). Accepts the quantity grammar: decimal number with
/// an optional SI (`m`, `k`, `M`…), binary (`Ki`, `Mi`…) or exponent (`e3`)
/// suffix.
fn cpu_millicores(quantity: &str) -> Result<u64, String> {
    let text = quantity.trim();
    let text = text.strip_prefix('+').unwrap_or(text);
    if text.starts_with('-') {
        return Err("a CPU request cannot be negative".into());
    }
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err("no number".into());
    }
    // value = digits × 10^(power10 − fraction.len()) × 2^power2, in cores.
    let (power10, power2): (i32, u32) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        exponent if exponent.starts_with(['e', 'E']) => (
            exponent[1..]
                .parse()
                .map_err(|_| format!("bad exponent {exponent:?}"))?,
            0,
        ),
        other => return Err(format!("unknown suffix {other:?}")),
    };
    let digits: u128 = format!("{whole}{fraction}")
        .parse()
        .map_err(|_| "not a decimal number".to_owned())?;
    let too_large = || "too large".to_owned();
    let scaled = digits
        .checked_shl(power2)
        .filter(|v| v >> power2 == digits)
        .ok_or_else(too_large)?;
    // Millicores: one more factor of 10^3.
    let exponent = power10 + 3 - i32::try_from(fraction.len()).map_err(|_| too_large())?;
    let millicores = if exponent >= 0 {
        10u128
            .checked_pow(exponent.unsigned_abs())
            .and_then(|factor| scaled.checked_mul(factor))
            .ok_or_else(too_large)?
    } else {
        match 10u128.checked_pow(exponent.unsigned_abs()) {
            Some(divisor) => scaled.div_ceil(divisor),
            // More than 38 decimal places below a millicore: a nonzero value
            // rounds up to 1m.
            None => u128::from(scaled > 0),
        }
    };
    u64::try_from(millicores).map_err(|_| too_large())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_json(uid: &str, name: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": "telemetry",
                "uid": uid,
                "resourceVersion": "42",
                "labels": {"app": "vehicle-api", "pod-template-hash": "7c9d8f"},
            },
            "spec": {
                "nodeName": "edge-1",
                "containers": [
                    {"name": "api", "image": "api:1", "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}}},
                    {"name": "redis", "image": "redis:7", "resources": {"requests": {"cpu": "1.5"}}},
                    {"name": "sidecar", "image": "s:1"}
                ],
                "initContainers": [{"name": "migrate", "image": "m:1", "resources": {"requests": {"cpu": "4"}}}]
            },
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {"name": "api", "containerID": "containerd://AAA111", "image": "api:1", "imageID": "", "ready": true, "restartCount": 0},
                    {"name": "redis", "containerID": "cri-o://bbb222", "image": "redis:7", "imageID": "", "ready": true, "restartCount": 0},
                    {"name": "sidecar", "image": "s:1", "imageID": "", "ready": false, "restartCount": 0}
                ],
                "initContainerStatuses": [
                    {"name": "migrate", "containerID": "docker://ccc333", "image": "m:1", "imageID": "", "ready": false, "restartCount": 0}
                ]
            }
        })
    }

    fn convert(value: serde_json::Value, allow: &[&str]) -> ConvertedPod {
        let pod: Pod = serde_json::from_value(value).unwrap();
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        convert_pod(&pod, &allow)
    }

    #[test]
    fn converts_real_pod_json() {
        let converted = convert(pod_json("u-1", "api-0"), &["app"]);
        let meta = converted.meta;
        assert_eq!(
            (
                meta.uid.as_str(),
                meta.namespace.as_str(),
                meta.name.as_str()
            ),
            ("u-1", "telemetry", "api-0")
        );
        assert_eq!(meta.containers.len(), 3);
        assert_eq!(meta.containers["aaa111"], "api");
        assert_eq!(meta.containers["bbb222"], "redis");
        assert_eq!(meta.containers["ccc333"], "migrate");
        // Regular containers only: 250m + 1.5 cores.
        assert_eq!(meta.cpu_request_millicores, 1750);
        assert_eq!(
            meta.labels,
            BTreeMap::from([("app".to_owned(), "vehicle-api".to_owned())])
        );
        assert_eq!(converted.config_hash, None);
        assert!(
            convert(pod_json("u-1", "api-0"), &[])
                .meta
                .labels
                .is_empty()
        );
    }

    #[test]
    fn cpu_quantities() {
        for (quantity, millicores) in [
            ("250m", 250),
            ("1", 1000),
            ("0.5", 500),
            ("0.1", 100),
            ("1.5", 1500),
            ("2k", 2_000_000),
            ("1e3", 1_000_000),
            ("100e-3", 100),
            ("+2", 2000),
            ("0.0001", 1),
            ("1n", 1),
            ("0", 0),
            (".5", 500),
            ("1Ki", 1_024_000),
            ("500000u", 500),
        ] {
            assert_eq!(cpu_millicores(quantity), Ok(millicores), "{quantity}");
        }
        for bad in [
            "",
            "-1",
            "abc",
            "1x",
            "1.2.3",
            "1e",
            "99999999999999999999999E",
        ] {
            assert!(cpu_millicores(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn directory_list_replaces_and_deleted_pods_linger() {
        let directory = PodDirectory::new();
        let t0 = Instant::now();
        directory.replace_all(
            vec![
                convert(pod_json("u-1", "a"), &[]),
                convert(pod_json("u-2", "b"), &[]),
            ],
            t0,
        );
        assert!(directory.connection().synced);
        assert_eq!(directory.live_pods().len(), 2);

        // A relist without u-1: deleted, still resolvable until pruned.
        directory.replace_all(vec![convert(pod_json("u-2", "b"), &[])], t0);
        assert_eq!(directory.live_pods().len(), 1);
        assert_eq!(directory.pod("u-1").unwrap().name, "a");
        let retention = Duration::from_secs(60);
        directory.prune_deleted(retention, t0 + Duration::from_secs(59));
        assert!(directory.pod("u-1").is_some());
        directory.prune_deleted(retention, t0 + retention);
        assert!(directory.pod("u-1").is_none());
        assert!(directory.pod("u-2").is_some());
    }

    #[test]
    fn failures_keep_pods_and_count() {
        let directory = PodDirectory::new();
        directory.replace_all(vec![convert(pod_json("u-1", "a"), &[])], Instant::now());
        assert_eq!(directory.record_failure("connection refused".into()), 1);
        assert_eq!(directory.record_failure("connection refused".into()), 2);
        let state = directory.connection();
        assert!(!state.connected && state.synced);
        assert_eq!(state.last_error.as_deref(), Some("connection refused"));
        assert_eq!(directory.pod("u-1").unwrap().name, "a");
        directory.replace_all(vec![convert(pod_json("u-1", "a"), &[])], Instant::now());
        assert_eq!(directory.connection().consecutive_failures, 0);
        assert!(directory.connection().connected);
    }

    #[test]
    fn static_pods_resolve_by_config_hash() {
        let mut json = pod_json(
            "0c5b1c2e-1111-2222-3333-444455556666",
            "kube-apiserver-edge-1",
        );
        json["metadata"]["annotations"] =
            serde_json::json!({ MIRROR_ANNOTATION: "5A4C7D8D1B3E2F60718293A4B5C6D7E8" });
        let directory = PodDirectory::new();
        directory.upsert(convert(json, &[]));
        let by_hash = directory.pod("5a4c7d8d1b3e2f60718293a4b5c6d7e8").unwrap();
        assert_eq!(by_hash.name, "kube-apiserver-edge-1");
        assert!(
            directory
                .pod("0c5b1c2e-1111-2222-3333-444455556666")
                .is_some()
        );
    }

    #[test]
    fn a_recreated_mirror_pod_keeps_its_name_when_the_old_one_is_pruned() {
        let mirror = |uid: &str| {
            let mut json = pod_json(uid, "kube-apiserver-edge-1");
            json["metadata"]["annotations"] =
                serde_json::json!({ MIRROR_ANNOTATION: "5a4c7d8d1b3e2f60718293a4b5c6d7e8" });
            convert(json, &[])
        };
        let directory = PodDirectory::new();
        let t0 = Instant::now();
        directory.upsert(mirror("0c5b1c2e-0000-0000-0000-000000000001"));
        // The API deletes the mirror pod and the kubelet recreates it.
        directory.mark_deleted("0c5b1c2e-0000-0000-0000-000000000001", t0);
        directory.upsert(mirror("0c5b1c2e-0000-0000-0000-000000000002"));
        let retention = Duration::from_secs(60);
        directory.prune_deleted(retention, t0 + retention);
        assert!(
            directory
                .pod("0c5b1c2e-0000-0000-0000-000000000001")
                .is_none()
        );
        let by_hash = directory.pod("5a4c7d8d1b3e2f60718293a4b5c6d7e8");
        assert_eq!(
            by_hash.map(|pod| pod.uid.clone()).as_deref(),
            Some("0c5b1c2e-0000-0000-0000-000000000002"),
            "the static pod's cgroup lost its name"
        );
    }

    /// Whether a poll was asked for within 50 ms.
    async fn asked(directory: &PodDirectory) -> bool {
        tokio::time::timeout(Duration::from_millis(50), directory.unknown_pod_seen())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_missed_uid_asks_for_a_few_polls_at_most() {
        let directory = PodDirectory::new();
        assert!(directory.pod("u-9").is_none());
        assert!(asked(&directory).await, "the first miss did not ask");
        assert!(directory.pod("u-9").is_none());
        assert!(
            !asked(&directory).await,
            "the same uid asked twice before the poll"
        );
        // Lists that still lack it: it asks again after each, up to
        // MAX_EARLY_POLLS polls, then never (an orphan cgroup).
        for poll in 1..=MAX_EARLY_POLLS {
            directory.replace_all(vec![convert(pod_json("u-1", "a"), &[])], Instant::now());
            assert!(directory.pod("u-9").is_none());
            assert_eq!(
                asked(&directory).await,
                poll < MAX_EARLY_POLLS,
                "after poll {poll}"
            );
        }
        // Known pods never ask; another unknown uid does.
        assert!(directory.pod("u-1").is_some());
        assert!(!asked(&directory).await);
        assert!(directory.pod("u-10").is_none());
        assert!(asked(&directory).await);
    }

    #[tokio::test]
    async fn an_unnamed_container_asks_again_until_the_status_names_it() {
        let directory = PodDirectory::new();
        // The kubelet lists the pod before its container statuses.
        let mut json = pod_json("u-1", "a");
        json["status"] = serde_json::json!({});
        let listed = convert(json, &[]);
        assert!(listed.meta.containers_pending);
        directory.replace_all(vec![listed], Instant::now());
        assert!(directory.pod("u-1").is_some());
        assert!(!asked(&directory).await);
        directory.missed_container("u-1", "aaa111");
        assert!(asked(&directory).await, "an unnamed container did not ask");
        directory.missed_container("u-1", "aaa111");
        assert!(!asked(&directory).await, "asked twice before the poll");
        // Still no status: one more early poll.
        directory.replace_all(
            vec![convert(
                {
                    let mut json = pod_json("u-1", "a");
                    json["status"] = serde_json::json!({});
                    json
                },
                &[],
            )],
            Instant::now(),
        );
        directory.missed_container("u-1", "aaa111");
        assert!(asked(&directory).await);
        // Named now: the container is complete and asks no more.
        let mut json = pod_json("u-1", "a");
        json["status"]["containerStatuses"][2]["containerID"] = "containerd://ddd444".into();
        let named = convert(json, &[]);
        assert!(!named.meta.containers_pending, "{:?}", named.meta);
        directory.replace_all(vec![named], Instant::now());
        assert!(directory.read().missed.is_empty());
    }

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(3);
        let delays: Vec<_> = (1..=7)
            .map(|n| retry_delay(n, initial, max).as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3000, 3000]);
        assert_eq!(retry_delay(u32::MAX, initial, max), max);
    }
}
