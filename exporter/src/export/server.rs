//! `/metrics`, `/healthz` and `/readyz` over HTTP/1.1 with hyper.
//!
//! The server runs on every node beside workloads it does not control, and
//! the kubelet restarts the exporter when `/healthz` stops answering. So no
//! client, however slow or hostile, may stop the probes from being answered
//! or push the process past its memory limit:
//!
//! - **Probes never wait for a slot.** Every connection is accepted up to
//!   [`ServerOptions::max_connections`] (beyond that, closed at once, so
//!   sockets and tasks stay bounded), and its request is routed before any
//!   slot is taken: `/healthz` and `/readyz` are answered on any connection.
//!   Only `/metrics` needs one of [`ServerOptions::max_scrapers`] slots; a
//!   connection claims one at its first scrape and keeps it until it closes
//!   (Prometheus keeps one connection per target). A scrape that finds every
//!   slot taken, say by clients that ask for `/metrics` and never read, is
//!   answered 503 with `Retry-After` and its connection closed, which costs
//!   nothing to keep. So the kubelet's probes are answered while metric
//!   clients hold every slot, and only the slow clients wait.
//! - **Time limits.** A request head must arrive within
//!   [`ServerOptions::header_read_timeout`]; a kept-alive connection that
//!   sends nothing for [`ServerOptions::idle_timeout`] is closed; a response
//!   not read by the client within [`ServerOptions::write_timeout`] is
//!   abandoned and its connection closed ([`super::deadlines`]). So a stuck
//!   client frees its slot after one write timeout at most.
//! - **Memory.** Every `/metrics` response shares the interval's one report
//!   buffer ([`super::MetricsBody`]); a stuck response costs its socket and
//!   hyper's bounded buffers ([`MAX_BUFFER_BYTES`] read, the same written),
//!   not a copy of the report.
//! - **Only what is served is accepted.** GET and HEAD on the known paths;
//!   any other method is answered 405 with `Allow`, other paths 404. Request
//!   heads are bounded by [`MAX_BUFFER_BYTES`] (hyper answers 431 beyond),
//!   and a request that declares a body is answered 413 and its connection
//!   closed without the body being read.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Buf, Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::deadlines::{Deadlines, Limits};
use super::{MetricsBody, Published};

/// hyper's read buffer, which bounds a request head, and its write buffer.
pub const MAX_BUFFER_BYTES: usize = 16 * 1024;

/// How the server treats its clients; [`Default`] is what the exporter uses.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Open connections at most; more are closed when accepted.
    pub max_connections: usize,
    /// Connections that may scrape `/metrics` at once.
    pub max_scrapers: usize,
    /// A request head must arrive within this.
    pub header_read_timeout: Duration,
    /// A kept-alive connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// A response must be read by the client within this, from its first
    /// byte to its last.
    pub write_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            // A connection that is not stuck in a scrape costs a task and
            // its buffers, a few KiB: 512 of them fit the memory limit, and
            // a burst of clients does not lock the probes out.
            max_connections: 512,
            // Prometheus needs one per scraper; 32 leaves room for several
            // scrapers (HA pairs, an agent), curl and retries.
            max_scrapers: 32,
            header_read_timeout: Duration::from_secs(5),
            // Above the usual 15-60 s scrape interval, so Prometheus keeps
            // its connection between scrapes.
            idle_timeout: Duration::from_secs(90),
            // Prometheus' default scrape timeout: a scrape slower than that
            // has been abandoned by Prometheus anyway.
            write_timeout: Duration::from_secs(10),
        }
    }
}

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

type Reply = Response<Full<MetricsBody>>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into().chain(Bytes::new())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A connection's claim on one of the `max_scrapers` slots: taken at its
/// first `/metrics` request, released when the connection closes.
struct ScrapeSlot {
    scrapers: Arc<Semaphore>,
    permit: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
}

impl ScrapeSlot {
    /// Whether this connection holds a slot (taking one if free).
    fn claim(&self) -> bool {
        let mut permit = self.permit.lock().unwrap_or_else(|p| p.into_inner());
        if permit.is_none() {
            *permit = self.scrapers.clone().try_acquire_owned().ok();
        }
        permit.is_some()
    }
}

fn busy(shared: &Shared) -> Reply {
    let mut response = reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "text/plain",
        format!(
            "all {} scrape slots are taken; try again shortly\n",
            shared.options.max_scrapers
        ),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    closing(response)
}

/// Whether the request declares a body (which is never read).
fn declares_body(request: &Request<Incoming>) -> bool {
    request.headers().contains_key(header::TRANSFER_ENCODING)
        || request
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0")
}

fn closing(mut response: Reply) -> Reply {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn route(request: &Request<Incoming>, slot: &ScrapeSlot, shared: &Shared) -> Reply {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET and HEAD are served\n",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return if declares_body(request) {
            closing(response)
        } else {
            response
        };
    }
    if declares_body(request) {
        return closing(reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            "text/plain",
            "GET and HEAD requests take no body\n",
        ));
    }
    let path = request.uri().path();
    let handle = &shared.handle;
    match path {
        "/metrics" if !slot.claim() => busy(shared),
        "/metrics" => {
            let mut response =
                Response::new(Full::new(super::render(&handle.published, &shared.process)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(prometheus::TEXT_FORMAT),
            );
            response
        }
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
            "not found: the paths are /metrics, /healthz and /readyz\n",
        ),
    }
}

/// What every connection's task shares.
struct Shared {
    handle: ServerHandle,
    process: prometheus::Registry,
    options: ServerOptions,
}

/// Serves until the listener fails. Bind errors are returned before serving.
pub async fn serve(
    listener: TcpListener,
    handle: ServerHandle,
    options: ServerOptions,
) -> std::io::Result<()> {
    let connections = Arc::new(Semaphore::new(options.max_connections));
    let scrapers = Arc::new(Semaphore::new(options.max_scrapers));
    let shared = Arc::new(Shared {
        handle,
        process: super::process_registry(),
        options,
    });
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
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::debug!(
                "closing the connection from {peer}: {} connections are open",
                shared.options.max_connections
            );
            continue;
        };
        let slot = ScrapeSlot {
            scrapers: scrapers.clone(),
            permit: std::sync::Mutex::new(None),
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let limits = Limits {
                idle: shared.options.idle_timeout,
                write: shared.options.write_timeout,
            };
            let stream = Deadlines::new(stream, limits);
            if let Err(e) = serve_connection(stream, slot, shared).await {
                tracing::debug!("connection from {peer} ended: {e}");
            }
            drop(permit);
        });
    }
}

async fn serve_connection<S>(stream: S, slot: ScrapeSlot, shared: Arc<Shared>) -> hyper::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let header_read_timeout = shared.options.header_read_timeout;
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let response = route(&request, &slot, &shared);
        async move { Ok::<_, Infallible>(response) }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(MAX_BUFFER_BYTES)
        .serve_connection(TokioIo::new(stream), service)
        .await
}
