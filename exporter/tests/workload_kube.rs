//! The pod watcher against a loopback HTTP server that speaks the Kubernetes
//! API's real wire format: `GET /api/v1/pods?fieldSelector=...` answers a
//! PodList, `watch=true` a stream of newline-delimited WatchEvents (ADDED,
//! MODIFIED, DELETED, BOOKMARK) replayed from the requested resourceVersion.
//! The server is stopped and restarted mid-test to check that the directory
//! keeps its pods, reports the outage, and catches up afterwards.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ergon::workload::kube::KubeSetupError;
use ergon::workload::{ApiSource, PodDirectory, PodWatcher, PodWatcherConfig};
use futures::StreamExt;
use futures::channel::mpsc;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

/// What the fake API server holds: pods by uid, the resourceVersion
/// counter, the event log watches replay from, and the open watches.
#[derive(Default)]
struct ApiState {
    pods: Vec<Value>,
    resource_version: u64,
    events: Vec<(u64, String)>,
    watches: Vec<mpsc::UnboundedSender<String>>,
    forbidden: bool,
    queries: Vec<String>,
}

impl ApiState {
    fn record(&mut self, kind: &str, object: Value) {
        let line = format!("{}\n", json!({"type": kind, "object": object}));
        self.events.push((self.resource_version, line.clone()));
        self.watches
            .retain(|watch| watch.unbounded_send(line.clone()).is_ok());
    }

    fn put(&mut self, mut pod: Value) {
        self.resource_version += 1;
        pod["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        let uid = pod["metadata"]["uid"].clone();
        let kind = match self.pods.iter().position(|p| p["metadata"]["uid"] == uid) {
            Some(at) => {
                self.pods[at] = pod.clone();
                "MODIFIED"
            }
            None => {
                self.pods.push(pod.clone());
                "ADDED"
            }
        };
        self.record(kind, pod);
    }

    fn delete(&mut self, uid: &str) {
        let at = self
            .pods
            .iter()
            .position(|p| p["metadata"]["uid"] == uid)
            .expect("pod to delete");
        let mut pod = self.pods.remove(at);
        self.resource_version += 1;
        pod["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        self.record("DELETED", pod);
    }

    /// What the API server sends when a watch's resourceVersion is too old.
    fn expire_watches(&mut self) {
        let line = format!(
            "{}\n",
            json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "too old resource version: 1 (9)",
                "reason": "Expired", "code": 410}})
        );
        self.watches
            .retain(|watch| watch.unbounded_send(line.clone()).is_ok());
    }

    fn list_requests(&self) -> usize {
        self.queries
            .iter()
            .filter(|q| !q.contains("watch=true"))
            .count()
    }

    fn bookmark(&mut self) {
        let line = format!(
            "{}\n",
            json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                "metadata": {"resourceVersion": self.resource_version.to_string()}}})
        );
        self.watches
            .retain(|watch| watch.unbounded_send(line.clone()).is_ok());
    }
}

/// A loopback API server; `stop` closes the listener and every connection.
struct FakeApiServer {
    address: SocketAddr,
    state: Arc<Mutex<ApiState>>,
    accept_task: Option<tokio::task::JoinHandle<()>>,
}

impl FakeApiServer {
    async fn start(state: Arc<Mutex<ApiState>>) -> FakeApiServer {
        Self::start_on("127.0.0.1:0".parse().unwrap(), state).await
    }

    async fn start_on(address: SocketAddr, state: Arc<Mutex<ApiState>>) -> FakeApiServer {
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        let address = listener.local_addr().unwrap();
        let served = Arc::clone(&state);
        let accept_task = tokio::spawn(async move {
            // Dropping the JoinSet (when this task is aborted) aborts every
            // connection, so clients see the server go away.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&served);
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(answer(&state, request)) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        FakeApiServer {
            address,
            state,
            accept_task: Some(accept_task),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    fn with<R>(&self, change: impl FnOnce(&mut ApiState) -> R) -> R {
        change(&mut self.state.lock().unwrap())
    }

    async fn stop(&mut self) {
        if let Some(task) = self.accept_task.take() {
            task.abort();
            let _ = task.await;
        }
        self.with(|state| state.watches.clear());
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(task) = self.accept_task.take() {
            task.abort();
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn answer(state: &Mutex<ApiState>, request: Request<Incoming>) -> Response<Body> {
    let query = request.uri().query().unwrap_or_default().to_owned();
    let params: Vec<(String, String)> = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (decode(key), decode(value)))
        .collect();
    let param = |name: &str| {
        params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    let mut state = state.lock().unwrap();
    state.queries.push(decode(&query));
    if request.uri().path() != "/api/v1/pods" {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    if state.forbidden {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "pods is forbidden: User \"system:serviceaccount:ergon:ergon\" cannot list resource \"pods\" \
             in API group \"\" at the cluster scope",
        );
    }
    let node = param("fieldSelector").and_then(|selector| selector.strip_prefix("spec.nodeName="));
    if param("watch") == Some("true") {
        // Replay what happened after the client's resourceVersion, then go live.
        let from: u64 = param("resourceVersion")
            .and_then(|rv| rv.parse().ok())
            .unwrap_or(0);
        let (sender, receiver) = mpsc::unbounded::<String>();
        for (_, line) in state.events.iter().filter(|(rv, _)| *rv > from) {
            sender.unbounded_send(line.clone()).unwrap();
        }
        let node = node.map(str::to_owned);
        let (filtered_sender, filtered) = mpsc::unbounded::<String>();
        // The field selector applies to pod events; bookmarks and errors always pass.
        tokio::spawn(async move {
            let mut receiver = receiver;
            while let Some(line) = receiver.next().await {
                let event: Value = serde_json::from_str(&line).unwrap();
                let passes = event["type"] == "BOOKMARK"
                    || event["type"] == "ERROR"
                    || node
                        .as_deref()
                        .is_none_or(|node| event["object"]["spec"]["nodeName"] == node);
                if passes && filtered_sender.unbounded_send(line).is_err() {
                    break;
                }
            }
        });
        state.watches.push(sender);
        let frames = filtered.map(|line| Ok::<_, Infallible>(Frame::data(Bytes::from(line))));
        return Response::builder()
            .header("content-type", "application/json")
            .body(BodyExt::boxed(StreamBody::new(frames)))
            .unwrap();
    }
    let items: Vec<Value> = state
        .pods
        .iter()
        .filter(|pod| node.is_none_or(|node| pod["spec"]["nodeName"] == node))
        .map(|pod| {
            // List items carry no kind/apiVersion, as the real API sends them.
            let mut item = pod.clone();
            let object = item.as_object_mut().unwrap();
            object.remove("kind");
            object.remove("apiVersion");
            item
        })
        .collect();
    let list = json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": state.resource_version.to_string()},
        "items": items,
    });
    json_response(StatusCode::OK, &list)
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "details": {"kind": "pods"}, "code": code.as_u16()});
    json_response(code, &body)
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if bytes.len() >= i + 3 => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

const UID_API: &str = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b";
const UID_INFERENCE: &str = "7a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d";
const UID_OTHER_NODE: &str = "8b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d6e";
const UID_LATE: &str = "9c4d5e6f-7a8b-4c9d-8e0f-2a3b4c5d6e7f";

/// A pod in the API's JSON, with running containers `(name, runtime id)`.
fn pod(uid: &str, namespace: &str, name: &str, node: &str, containers: &[(&str, &str)]) -> Value {
    let specs: Vec<Value> = containers
        .iter()
        .map(|(container, _)| {
            json!({"name": container, "image": format!("registry.local/{container}:1"),
            "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"cpu": "1"}}})
        })
        .collect();
    let statuses: Vec<Value> = containers
        .iter()
        .map(|(container, id)| {
            json!({"name": container, "containerID": id, "ready": true,
            "restartCount": 0, "image": format!("registry.local/{container}:1"),
            "imageID": format!("registry.local/{container}@sha256:00"), "started": true,
            "state": {"running": {"startedAt": "2026-05-01T10:00:00Z"}}})
        })
        .collect();
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "resourceVersion": "0",
            "creationTimestamp": "2026-05-01T09:59:58Z",
            "labels": {"app": name.trim_end_matches("-0"), "team": "edge"},
        },
        "spec": {"nodeName": node, "containers": specs, "restartPolicy": "Always"},
        "status": {"phase": "Running", "qosClass": "Burstable", "podIP": "10.42.0.7",
            "containerStatuses": statuses},
    })
}

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
