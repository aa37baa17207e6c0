//! A loopback kubelet: `GET /pods` answers a PodList in the kubelet's real
//! JSON, over HTTP (the read-only port) or HTTPS (the authenticated port),
//! and can refuse with the kubelet's own 401 and 403 answers. Every request
//! is counted with the bearer token it carried, so tests can check how
//! often the exporter polls.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

/// What the fake kubelet holds and has seen.
#[derive(Default)]
pub struct KubeletState {
    /// Pods in the API's JSON (e.g. [`crate::kube_api::pod`]).
    pub pods: Vec<Value>,
    /// The `Authorization` header of every request, in order.
    pub requests: Vec<Option<String>>,
    /// Answer every request with this refusal (401 or 403) instead.
    pub refuse: Option<StatusCode>,
}

/// A running fake kubelet; stopped on drop.
pub struct FakeKubelet {
    pub address: SocketAddr,
    pub state: Arc<Mutex<KubeletState>>,
    https: bool,
    task: tokio::task::JoinHandle<()>,
}

impl FakeKubelet {
    /// Serves on a free loopback port; HTTPS with `tls` = (certificate chain,
    /// key) PEM files, else plain HTTP.
    pub async fn start(
        state: Arc<Mutex<KubeletState>>,
        tls: Option<(&Path, &Path)>,
    ) -> FakeKubelet {
        let acceptor = tls.map(|(cert, key)| crate::tls::acceptor(cert, key));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let served = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&served);
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let reply = answer(&state, &request);
                        async move { Ok::<_, Infallible>(reply) }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            // A client that rejects the certificate ends here.
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let _ = builder.serve_connection(io, service).await;
                        }
                        None => {
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let _ = builder.serve_connection(io, service).await;
                        }
                    }
                });
            }
        });
        FakeKubelet {
            address,
            state,
            https: tls.is_some(),
            task,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.address)
    }

    pub fn with<R>(&self, change: impl FnOnce(&mut KubeletState) -> R) -> R {
        change(&mut self.state.lock().unwrap())
    }

    /// Requests received so far.
    pub fn request_count(&self) -> usize {
        self.with(|state| state.requests.len())
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(state: &Mutex<KubeletState>, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut state = state.lock().unwrap();
    let authorization = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    state.requests.push(authorization);
    let text = |code: StatusCode, body: &str| {
        Response::builder()
            .status(code)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap()
    };
    // The kubelet's own refusals (pkg/kubelet/server/auth.go): plain text.
    match state.refuse {
        Some(StatusCode::UNAUTHORIZED) => return text(StatusCode::UNAUTHORIZED, "Unauthorized"),
        Some(StatusCode::FORBIDDEN) => {
            return text(
                StatusCode::FORBIDDEN,
                "Forbidden (user=system:serviceaccount:ergon:ergon, verb=get, resource=nodes, \
                 subresource=proxy)",
            );
        }
        _ => {}
    }
    if request.method() != hyper::Method::GET || request.uri().path() != "/pods" {
        return text(StatusCode::NOT_FOUND, "404 page not found");
    }
    // Go encodes an empty slice of a nil list as null.
    let items = if state.pods.is_empty() {
        Value::Null
    } else {
        Value::Array(state.pods.clone())
    };
    let body = json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items});
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}
