//! The pod watcher against a loopback HTTP server that speaks the Kubernetes
//! API's real wire format: `GET /api/v1/pods?fieldSelector=...` answers a
//! PodList, `watch=true` a stream of newline-delimited WatchEvents (ADDED,
//! MODIFIED, DELETED, BOOKMARK) replayed from the requested resourceVersion.
//! The server is stopped and restarted mid-test to check that the directory
//! keeps its pods, reports the outage, and catches up afterwards.

use ergon_testkit as support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ergon::workload::kube::KubeSetupError;
use ergon::workload::{ApiSource, PodDirectory, PodWatcher, PodWatcherConfig};
use serde_json::{Value, json};
use support::kube_api::{ApiState, FakeApiServer, pod};

const UID_API: &str = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b";
const UID_INFERENCE: &str = "7a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d";
const UID_OTHER_NODE: &str = "8b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d6e";
const UID_LATE: &str = "9c4d5e6f-7a8b-4c9d-8e0f-2a3b4c5d6e7f";

fn vehicle_api_pod(containers: &[(&str, &str)]) -> Value {
    pod(UID_API, "telemetry", "vehicle-api-0", "node-a", containers)
}

async fn watch(server: &FakeApiServer) -> (PodWatcher, PodDirectory) {
    let watcher = PodWatcher::spawn(watcher_config(server)).await.unwrap();
    let directory = watcher.directory().clone();
    (watcher, directory)
}

fn watcher_config(server: &FakeApiServer) -> PodWatcherConfig {
    let mut config = PodWatcherConfig::new("node-a", ApiSource::Url(server.url()));
    config.label_allowlist = vec!["app".into()];
    config.retry_initial = Duration::from_millis(20);
    config.retry_max = Duration::from_millis(200);
    config
}

/// Polls `condition` until it holds; a generous deadline only turns a hang
/// into a failure with a message (nothing here measures time).
async fn wait_for(what: &str, directory: &PodDirectory, condition: impl Fn(&PodDirectory) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !condition(directory) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; connection: {:?}",
            directory.connection()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn container_name(directory: &PodDirectory, uid: &str, container_id: &str) -> Option<String> {
    directory.pod(uid)?.containers.get(container_id).cloned()
}

fn is_live(directory: &PodDirectory, uid: &str) -> bool {
    directory.live_pods().iter().any(|pod| pod.uid == uid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_follow_the_api_through_an_outage() {
    let state = Arc::new(Mutex::new(ApiState::default()));
    let mut server = FakeApiServer::start(Arc::clone(&state)).await;
    server.with(|api| {
        api.put(vehicle_api_pod(&[
            ("api", "containerd://AA11"),
            ("redis", "containerd://bb22"),
        ]));
        api.put(pod(
            UID_INFERENCE,
            "kserve",
            "inference-0",
            "node-a",
            &[("kserve-container", "cri-o://cc33")],
        ));
        api.put(pod(
            UID_OTHER_NODE,
            "telemetry",
            "vehicle-api-1",
            "node-b",
            &[("api", "containerd://dd44")],
        ));
    });

    let (watcher, directory) = watch(&server).await;
    wait_for("the first list", &directory, |d| d.connection().synced).await;

    let api_pod = directory.pod(UID_API).unwrap();
    assert_eq!(
        (api_pod.namespace.as_str(), api_pod.name.as_str()),
        ("telemetry", "vehicle-api-0")
    );
    assert_eq!(
        api_pod.containers.get("aa11").map(String::as_str),
        Some("api")
    );
    assert_eq!(
        api_pod.containers.get("bb22").map(String::as_str),
        Some("redis")
    );
    assert_eq!(api_pod.cpu_request_millicores, 500);
    assert_eq!(api_pod.labels.keys().collect::<Vec<_>>(), ["app"]);
    assert_eq!(
        container_name(&directory, UID_INFERENCE, "cc33").as_deref(),
        Some("kserve-container")
    );
    // The server filters by the selector the watcher sent.
    assert!(directory.pod(UID_OTHER_NODE).is_none());
    assert!(server.with(|api| {
        api.queries
            .iter()
            .any(|q| q.contains("fieldSelector=spec.nodeName=node-a"))
    }));
    assert!(directory.connection().connected);

    // Watch events: a new container, a new pod, a deletion, a bookmark.
    let mut inference = pod(
        UID_INFERENCE,
        "kserve",
        "inference-0",
        "node-a",
        &[
            ("kserve-container", "cri-o://cc33"),
            ("queue-proxy", "cri-o://ee55"),
        ],
    );
    server.with(|api| api.put(inference.clone()));
    wait_for("a MODIFIED event", &directory, |d| {
        container_name(d, UID_INFERENCE, "ee55").is_some()
    })
    .await;
    server.with(|api| {
        api.put(pod(
            UID_LATE,
            "mlflow",
            "mlflow-0",
            "node-a",
            &[("mlflow", "containerd://ff66")],
        ))
    });
    wait_for("an ADDED event", &directory, |d| is_live(d, UID_LATE)).await;
    server.with(|api| api.delete(UID_API));
    wait_for("a DELETED event", &directory, |d| !is_live(d, UID_API)).await;
    // Deleted pods keep their names for the retention window.
    assert_eq!(directory.pod(UID_API).unwrap().name, "vehicle-api-0");
    server.with(|api| api.bookmark());
    inference["metadata"]["labels"]["app"] = json!("inference-v2");
    server.with(|api| api.put(inference.clone()));
    wait_for("an event after a BOOKMARK", &directory, |d| {
        d.pod(UID_INFERENCE)
            .is_some_and(|p| p.labels["app"] == "inference-v2")
    })
    .await;
    assert!(directory.connection().connected);

    // An expired watch is routine: a relist, no outage.
    let lists = server.with(|api| api.list_requests());
    server.with(|api| api.expire_watches());
    let relisted = || server.with(|api| api.list_requests()) > lists;
    wait_for("a relist after 410 Gone", &directory, |_| relisted()).await;
    wait_for("the relist to finish", &directory, |d| {
        d.connection().connected
    })
    .await;
    assert_eq!(directory.connection().consecutive_failures, 0);
    assert_eq!(directory.connection().last_error, None);

    // The API goes away: everything known stays, the state says so.
    server.stop().await;
    wait_for("the outage to be noticed", &directory, |d| {
        !d.connection().connected
    })
    .await;
    let state_during_outage = directory.connection();
    assert!(state_during_outage.last_error.is_some());
    assert!(state_during_outage.synced);
    assert_eq!(directory.pod(UID_INFERENCE).unwrap().name, "inference-0");
    assert_eq!(
        container_name(&directory, UID_LATE, "ff66").as_deref(),
        Some("mlflow")
    );
    wait_for("a few retries", &directory, |d| {
        d.connection().consecutive_failures >= 3
    })
    .await;
    assert!(directory.pod(UID_INFERENCE).is_some());

    // Changes while away, then the API returns on the same address.
    inference["metadata"]["labels"]["app"] = json!("inference-v3");
    server.with(|api| {
        api.put(inference.clone());
        api.delete(UID_LATE);
    });
    let address = server.address;
    let server = FakeApiServer::start_on(address, state).await;
    wait_for("the reconnection", &directory, |d| {
        let state = d.connection();
        state.connected && state.consecutive_failures == 0
    })
    .await;
    assert_eq!(
        directory.pod(UID_INFERENCE).unwrap().labels["app"],
        "inference-v3"
    );
    assert!(!is_live(&directory, UID_LATE), "deleted during the outage");
    assert!(
        directory.pod(UID_LATE).is_some(),
        "still named for the retention window"
    );

    // Live updates resume.
    server.with(|api| api.put(vehicle_api_pod(&[("api", "containerd://0a0a")])));
    wait_for("updates after reconnecting", &directory, |d| {
        is_live(d, UID_API)
    })
    .await;
    drop(watcher);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_keeps_retrying_without_crashing() {
    let state = Arc::new(Mutex::new(ApiState {
        forbidden: true,
        ..Default::default()
    }));
    let server = FakeApiServer::start(Arc::clone(&state)).await;
    server.with(|api| api.put(vehicle_api_pod(&[("api", "containerd://aa11")])));
    let (_watcher, directory) = watch(&server).await;

    wait_for("repeated 403s", &directory, |d| {
        d.connection().consecutive_failures >= 3
    })
    .await;
    let forbidden = directory.connection();
    assert!(!forbidden.connected && !forbidden.synced);
    let error = forbidden.last_error.unwrap();
    assert!(error.contains("forbidden"), "{error}");
    assert!(directory.pod(UID_API).is_none());

    // RBAC fixed: names arrive.
    server.with(|api| api.forbidden = false);
    wait_for("the list once allowed", &directory, |d| {
        d.connection().synced
    })
    .await;
    assert_eq!(directory.pod(UID_API).unwrap().name, "vehicle-api-0");
}

#[tokio::test]
async fn configuration_that_cannot_work_is_refused_up_front() {
    let empty_node = PodWatcherConfig::new(" ", ApiSource::Url("http://127.0.0.1:1".into()));
    let error = PodWatcher::spawn(empty_node).await.unwrap_err();
    assert!(matches!(error, KubeSetupError::NoNodeName), "{error}");
    assert!(error.to_string().contains("NODE_NAME"));

    let bad_url = PodWatcherConfig::new("node-a", ApiSource::Url("http://exa mple".into()));
    let error = PodWatcher::spawn(bad_url).await.unwrap_err();
    assert!(matches!(error, KubeSetupError::BadUrl { .. }), "{error}");

    let missing = PodWatcherConfig::new(
        "node-a",
        ApiSource::Kubeconfig("/nonexistent/kubeconfig".into()),
    );
    let error = PodWatcher::spawn(missing).await.unwrap_err();
    assert!(
        error.to_string().contains("/nonexistent/kubeconfig"),
        "{error}"
    );
}
