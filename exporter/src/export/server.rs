//! `/metrics`, `/healthz` and `/readyz` over HTTP/1.1 with hyper.
//!
//! Defences against slow or hostile clients: a header read timeout (a
//! client that trickles headers is dropped), a cap on open connections, no
//! request bodies read, and only GET/HEAD served.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::Published;

const MAX_CONNECTIONS: usize = 64;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Liveness: the interval loop stamps each completed interval here.
#[derive(Clone)]
pub struct ServerHandle {
    pub published: Published,
    started: Instant,
    last_interval_ms: Arc<AtomicU64>,
    /// An interval older than this makes `/healthz` fail.
    stale_after: Duration,
}

impl ServerHandle {
    pub fn new(published: Published, interval: Duration) -> ServerHandle {
        ServerHandle {
            published,
            started: Instant::now(),
            last_interval_ms: Arc::new(AtomicU64::new(0)),
            stale_after: interval * 5 + Duration::from_secs(10),
        }
    }

    pub fn interval_done(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_interval_ms.store(ms.max(1), Ordering::Relaxed);
    }

    fn healthy(&self) -> bool {
        // Before the first interval, `last` is 0: healthy for one stale
        // period after start, which covers loading the probe.
        let last = self.last_interval_ms.load(Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64;
        now.saturating_sub(last) <= self.stale_after.as_millis() as u64
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn route(
    request: &Request<Incoming>,
    handle: &ServerHandle,
    process: &prometheus::Registry,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET and HEAD are served\n",
        );
        response.headers_mut().insert(
            "allow",
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return response;
    }
    match request.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            prometheus::TEXT_FORMAT,
            super::render(&handle.published, process),
        ),
        "/healthz" if handle.healthy() => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/healthz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the measurement loop has not completed an interval recently\n",
        ),
        "/readyz" if handle.published.is_ready() => reply(StatusCode::OK, "text/plain", "ready\n"),
        "/readyz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "no interval measured yet\n",
        ),
        "/" => reply(
            StatusCode::OK,
            "text/html",
            "<html><body><h1>Ergon</h1><p><a href=\"/metrics\">/metrics</a> \
             <a href=\"/healthz\">/healthz</a> <a href=\"/readyz\">/readyz</a></p></body></html>\n",
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics\n",
        ),
    }
}

/// Serves until the listener fails. Bind errors are returned before serving.
pub async fn serve(listener: TcpListener, handle: ServerHandle) -> std::io::Result<()> {
    let process = Arc::new(super::process_registry());
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer): (_, SocketAddr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!("refusing {peer}: {MAX_CONNECTIONS} connections already open");
            continue;
        };
        let handle = handle.clone();
        let process = process.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = route(&request, &handle, &process);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!("connection from {peer} ended: {e}");
            }
            drop(permit);
        });
    }
}
