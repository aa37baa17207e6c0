//! A loopback Kubernetes API server speaking the real wire format: PodList
//! answers and newline-delimited WatchEvent streams replayed from a
//! resourceVersion. Stoppable and restartable on the same port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

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
pub struct ApiState {
    pub pods: Vec<Value>,
    pub resource_version: u64,
    pub events: Vec<(u64, String)>,
    pub watches: Vec<mpsc::UnboundedSender<String>>,
    pub forbidden: bool,
    pub queries: Vec<String>,
    /// Bearer tokens the fake TokenReview accepts, and the user each is.
    pub tokens: std::collections::HashMap<String, String>,
    /// Users the fake SubjectAccessReview allows to `get` `/metrics`.
    pub metrics_readers: std::collections::HashSet<String>,
    /// The TokenReview and SubjectAccessReview objects received, in order.
    pub reviews: Vec<Value>,
}

impl ApiState {
    pub fn record(&mut self, kind: &str, object: Value) {
        let line = format!("{}\n", json!({"type": kind, "object": object}));
        self.events.push((self.resource_version, line.clone()));
        self.watches
            .retain(|watch| watch.unbounded_send(line.clone()).is_ok());
    }

    pub fn put(&mut self, mut pod: Value) {
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

    pub fn delete(&mut self, uid: &str) {
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
    pub fn expire_watches(&mut self) {
        let line = format!(
            "{}\n",
            json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "too old resource version: 1 (9)",
                "reason": "Expired", "code": 410}})
        );
        self.watches
            .retain(|watch| watch.unbounded_send(line.clone()).is_ok());
    }

    pub fn list_requests(&self) -> usize {
        self.queries
            .iter()
            .filter(|q| !q.contains("watch=true"))
            .count()
    }

    pub fn bookmark(&mut self) {
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
pub struct FakeApiServer {
    pub address: SocketAddr,
    pub state: Arc<Mutex<ApiState>>,
    pub accept_task: Option<tokio::task::JoinHandle<()>>,
}

impl FakeApiServer {
    pub async fn start(state: Arc<Mutex<ApiState>>) -> FakeApiServer {
        Self::start_on("127.0.0.1:0".parse().unwrap(), state).await
    }

    pub async fn start_on(address: SocketAddr, state: Arc<Mutex<ApiState>>) -> FakeApiServer {
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
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let state = Arc::clone(&state);
                        async move {
                            if request.uri().path().ends_with("reviews") {
                                return Ok::<_, Infallible>(review(&state, request).await);
                            }
                            Ok::<_, Infallible>(answer(&state, request))
                        }
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

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn with<R>(&self, change: impl FnOnce(&mut ApiState) -> R) -> R {
        change(&mut self.state.lock().unwrap())
    }

    pub async fn stop(&mut self) {
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

pub type Body = BoxBody<Bytes, Infallible>;

pub fn answer(state: &Mutex<ApiState>, request: Request<Incoming>) -> Response<Body> {
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

/// `POST .../tokenreviews` and `.../subjectaccessreviews`: the review with
/// its status filled in from [`ApiState::tokens`] and
/// [`ApiState::metrics_readers`], as the real API server answers.
pub async fn review(state: &Mutex<ApiState>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let Ok(body) = request.into_body().collect().await else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
    };
    let Ok(mut object) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not JSON",
        );
    };
    let mut state = state.lock().unwrap();
    state.reviews.push(object.clone());
    if state.forbidden {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:ergon:ergon\" \
             cannot create resource \"tokenreviews\"",
        );
    }
    match path.as_str() {
        "/apis/authentication.k8s.io/v1/tokenreviews" => {
            let token = object["spec"]["token"].as_str().unwrap_or_default();
            object["status"] = match state.tokens.get(token) {
                Some(user) => json!({"authenticated": true, "user": {"username": user,
                    "uid": format!("uid-{user}"), "groups": ["system:serviceaccounts",
                    "system:authenticated"]}}),
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
        }
        "/apis/authorization.k8s.io/v1/subjectaccessreviews" => {
            let spec = &object["spec"];
            let allowed = spec["nonResourceAttributes"]["path"] == "/metrics"
                && spec["nonResourceAttributes"]["verb"] == "get"
                && spec["user"]
                    .as_str()
                    .is_some_and(|user| state.metrics_readers.contains(user));
            object["status"] = if allowed {
                json!({"allowed": true, "reason": "RBAC: allowed by ClusterRoleBinding"})
            } else {
                json!({"allowed": false, "reason": ""})
            };
        }
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
    }
    json_response(StatusCode::CREATED, &object)
}

pub fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "details": {"kind": "pods"}, "code": code.as_u16()});
    json_response(code, &body)
}

pub fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

pub fn decode(text: &str) -> String {
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

/// A pod in the API's JSON, with running containers `(name, runtime id)`.
pub fn pod(
    uid: &str,
    namespace: &str,
    name: &str,
    node: &str,
    containers: &[(&str, &str)],
) -> Value {
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
