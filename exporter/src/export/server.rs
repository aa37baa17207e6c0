//! `/metrics`, `/healthz` and `/readyz` over HTTP/1.1 with hyper.
//!
//! The server runs on every node beside workloads it does not control, and
//! the kubelet restarts the exporter when `/healthz` stops answering. So no
//! client, however slow or hostile, may stop the probes from being answered
//! or push the process past its memory limit:
//!
//! - **Probes never wait for a slot.** Every connection is accepted and its
//!   request routed before any slot is taken: `/healthz` and `/readyz` are
//!   answered on any connection. At most [`ServerOptions::max_connections`]
//!   are open, so sockets, tasks and buffers stay bounded; one past the cap
//!   closes the oldest open connection instead of being refused
//!   ([`Connections`]), so clients that hold every connection, silent or
//!   stuck, cannot lock the kubelet out.
//!   Only `/metrics` needs one of [`ServerOptions::max_scrapers`] slots; a
//!   connection claims one at its first scrape and keeps it until it closes
//!   (Prometheus keeps one connection per target). A scrape that finds every
//!   slot taken, say by clients that ask for `/metrics` and never read, is
//!   answered 503 with `Retry-After` and its connection closed, which costs
//!   nothing to keep. So the kubelet's probes are answered while metric
//!   clients hold every slot, and only the slow clients wait.
//! - **Time limits.** A request head must arrive within
//!   [`ServerOptions::header_read_timeout`]; hyper starts that clock
//!   whenever a connection waits for a request, so it is also how long a
//!   kept-alive connection may sit idle (Prometheus then reconnects for its
//!   next scrape, one handshake per scrape). Any other read that waits
//!   longer than [`ServerOptions::idle_timeout`] fails (reads hyper does not
//!   time, such as a TLS handshake's). A response
//!   not read by the client within [`ServerOptions::write_timeout`] is
//!   abandoned and its connection closed ([`super::deadlines`]). So a stuck
//!   client frees its slot after one write timeout at most.
//! - **Memory.** Every `/metrics` response shares the interval's one report
//!   buffer ([`super::MetricsBody`]); a stuck response costs its socket and
//!   hyper's bounded buffers ([`MAX_BUFFER_BYTES`] read, the same written),
//!   not a copy of the report. Gzip and OpenMetrics bodies are shared the
//!   same way: each is made once per interval, by the first scrape that
//!   negotiates it.
//! - **Optional TLS and authorization** ([`super::tls`], [`super::auth`]):
//!   the TLS handshake must finish within the header read timeout; a token
//!   is checked only for `/metrics`, after the cheap paths are answered and
//!   a scraper slot is taken, so probes never wait on the Kubernetes API
//!   and at most `max_scrapers` checks run at once.
//! - **Only what is served is accepted.** GET and HEAD on the known paths;
//!   any other method is answered 405 with `Allow`, other paths 404. Request
//!   heads are bounded by [`MAX_BUFFER_BYTES`] (hyper answers 431 beyond),
//!   and a request that declares a body is answered 413 and its connection
//!   closed without the body being read.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Buf, Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

use super::auth::{Authorizer, Decision};
use super::deadlines::{Deadlines, Limits};
use super::{MetricsBody, ServerHandle};

/// Scrapes answered, by negotiated format and encoding.
pub const SCRAPES: &str = "ergon_scrapes_total";

/// hyper's read buffer, which bounds a request head, and its write buffer.
pub const MAX_BUFFER_BYTES: usize = 16 * 1024;

/// How the server treats its clients; [`Default`] is what the exporter uses
/// without `--tls-*` and `--authorize-metrics`.
#[derive(Clone)]
pub struct ServerOptions {
    /// Open connections at most; a new one past this closes the oldest.
    pub max_connections: usize,
    /// Connections that may scrape `/metrics` at once.
    pub max_scrapers: usize,
    /// A request head must arrive within this.
    pub header_read_timeout: Duration,
    /// A read (outside a request head, which `header_read_timeout` bounds)
    /// that waits this long fails and closes the connection.
    pub idle_timeout: Duration,
    /// A response must be read by the client within this, from its first
    /// byte to its last.
    pub write_timeout: Duration,
    /// HTTPS instead of HTTP ([`super::tls_acceptor`]).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Bearer-token authorization of `/metrics`.
    pub auth: Option<Arc<Authorizer>>,
    /// The grid carbon intensity gauges (`--carbon-intensity`).
    pub carbon: Option<crate::carbon::CarbonIntensity>,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            // A connection that is not stuck in a scrape costs a task and
            // its buffers, a few KiB: 512 of them fit the memory limit, and
            // a burst of clients closes no one's connection.
            max_connections: 512,
            // Prometheus needs one per scraper; 32 leaves room for several
            // scrapers (HA pairs, an agent), curl and retries.
            max_scrapers: 32,
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            // Prometheus' default scrape timeout: a scrape slower than that
            // has been abandoned by Prometheus anyway.
            write_timeout: Duration::from_secs(10),
            tls: None,
            auth: None,
            carbon: None,
        }
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

/// What a request gets: an answer now, or the metrics once authorized.
enum Routed {
    Reply(Reply),
    Metrics,
}

impl From<Reply> for Routed {
    fn from(reply: Reply) -> Routed {
        Routed::Reply(reply)
    }
}

fn route(request: &Request<Incoming>, shared: &Shared) -> Routed {
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
            closing(response).into()
        } else {
            response.into()
        };
    }
    if declares_body(request) {
        return closing(reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            "text/plain",
            "GET and HEAD requests take no body\n",
        ))
        .into();
    }
    let path = request.uri().path();
    let handle = &shared.handle;
    let reply = match path {
        "/metrics" => return Routed::Metrics,
        "/healthz" => match handle.health() {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ok\n"),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("unhealthy: {why}\n"),
            ),
        },
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
    };
    reply.into()
}

/// `/metrics` in the format and encoding the client negotiated
/// ([`super::negotiate`]), counted in `ergon_scrapes_total`.
fn metrics(request: &Request<Incoming>, shared: &Shared) -> Reply {
    let header = |name| {
        request
            .headers()
            .get(name)
            .and_then(|value: &HeaderValue| value.to_str().ok())
    };
    let format = super::format(header(header::ACCEPT));
    let encoding = super::encoding(header(header::ACCEPT_ENCODING));
    shared
        .scrapes
        .with_label_values(&[format.as_str(), encoding.as_str()])
        .inc();
    let body = super::render(&shared.handle.published, &shared.process, format, encoding);
    let mut response = Response::new(Full::new(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    // Caches between Prometheus and the exporter must not serve one
    // client's negotiated body to another.
    headers.insert(
        header::VARY,
        HeaderValue::from_static("Accept, Accept-Encoding"),
    );
    if encoding == super::Encoding::Gzip {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    response
}

/// `/metrics` for a client `auth` allows; 401, 403 or 503 otherwise, with
/// the connection closed so that a refused client keeps no scraper slot.
async fn authorized_metrics(
    request: &Request<Incoming>,
    auth: &Authorizer,
    shared: &Shared,
) -> Reply {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    let refused = match auth.check(token).await {
        Decision::Allowed => return metrics(request, shared),
        Decision::Unauthenticated(why) => {
            let mut response = reply(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                format!("unauthorized: {why}\n"),
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ergon\""),
            );
            response
        }
        Decision::Forbidden(why) => reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            format!("forbidden: {why}\n"),
        ),
        // The details are in the exporter's log, not for the client.
        Decision::Unavailable(_) => {
            let mut response = reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "the token could not be checked with the Kubernetes API; try again\n",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            response
        }
    };
    closing(refused)
}

async fn respond(request: Request<Incoming>, slot: &ScrapeSlot, shared: &Shared) -> Reply {
    match route(&request, shared) {
        Routed::Reply(reply) => reply,
        Routed::Metrics if !slot.claim() => busy(shared),
        Routed::Metrics => match &shared.options.auth {
            Some(auth) => authorized_metrics(&request, auth, shared).await,
            None => metrics(&request, shared),
        },
    }
}

/// The open connections, oldest first, each with what closes it.
///
/// Past the cap, a new connection closes the oldest one rather than being
/// closed itself. Refusing new connections, as a plain cap does, hands the
/// server to whoever holds the cap: 512 clients that connect and send
/// nothing, each renewed as it times out, kept every kubelet probe out. Nor
/// would a few connections reserved for probes help: the same clients fill
/// the reserve too, since a connection says what it wants only after it has
/// been accepted. With eviction every new connection is served, and one is
/// closed before it is answered only if `max_connections` newer ones are
/// accepted first. The accept loop lets each new connection's task run
/// before it accepts the next ([`serve`]), so a probe, whose head follows
/// its connection at once and which is answered in the same turn, is
/// answered first. The oldest connection is the one that has had most of
/// its share: a silent one still waiting for its head, a stuck scrape (its
/// slot goes with it) or an idle keep-alive connection, which HTTP lets a
/// server close at any time. Memory stays bounded as before: at most
/// `max_connections` tasks, plus those aborted and not yet dropped.
struct Connections {
    max: usize,
    /// By connection number (which grows): the oldest is the first. The
    /// task's handle is missing only while [`Connections::admit`] spawns it.
    open: std::sync::Mutex<BTreeMap<u64, (SocketAddr, Option<AbortHandle>)>>,
    next: AtomicU64,
}

impl Connections {
    fn new(max: usize) -> Connections {
        Connections {
            max: max.max(1),
            open: std::sync::Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, (SocketAddr, Option<AbortHandle>)>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `serve` as the task of the connection from `peer`, first
    /// closing the oldest connection if `max` are open. Called by the one
    /// accept loop only.
    fn admit<F>(self: &Arc<Self>, peer: SocketAddr, serve: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evicted = {
            let mut open = self.lock();
            let evicted = if open.len() >= self.max {
                open.pop_first()
            } else {
                None
            };
            open.insert(id, (peer, None));
            evicted
        };
        if let Some((_, (oldest, task))) = evicted {
            tracing::debug!(
                "closing the connection from {oldest} for one from {peer}: {} connections are open",
                self.max
            );
            // Its future (socket, buffers, scrape slot) is dropped at the
            // runtime's next turn.
            if let Some(task) = task {
                task.abort();
            }
        }
        let registered = Registered {
            connections: self.clone(),
            id,
        };
        // Spawned without the lock: a runtime that is shutting down drops
        // the future (and so `registered`, which takes the lock) at once.
        let task = tokio::spawn(async move {
            let _registered = registered;
            serve.await;
        });
        // A task that has ended already took its entry out.
        if let Some((_, handle)) = self.lock().get_mut(&id) {
            *handle = Some(task.abort_handle());
        }
    }
}

/// A connection's place in [`Connections`], given up when its task ends or
/// is aborted.
struct Registered {
    connections: Arc<Connections>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.connections.lock().remove(&self.id);
    }
}

/// What every connection's task shares.
struct Shared {
    handle: ServerHandle,
    process: prometheus::Registry,
    /// `ergon_scrapes_total{format,encoding}`: what scrapers negotiated.
    scrapes: prometheus::IntCounterVec,
    options: ServerOptions,
}

/// Serves until the listener fails. Bind errors are returned before serving.
pub async fn serve(
    listener: TcpListener,
    handle: ServerHandle,
    options: ServerOptions,
) -> std::io::Result<()> {
    let connections = Arc::new(Connections::new(options.max_connections));
    let scrapers = Arc::new(Semaphore::new(options.max_scrapers));
    let process = super::process_registry();
    process
        .register(Box::new(handle.last_success_gauge()))
        .expect("the liveness gauge registers once");
    let scrapes = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            SCRAPES,
            "Scrapes of /metrics answered, by the format (text|openmetrics) and encoding (identity|gzip) the scraper negotiated.",
        ),
        &["format", "encoding"],
    )
    .expect("a valid metric name and labels");
    process
        .register(Box::new(scrapes.clone()))
        .expect("the scrape counter registers once");
    if let Some(carbon) = &options.carbon {
        process
            .register(Box::new(carbon.clone()))
            .expect("the carbon gauges register once");
    }
    let shared = Arc::new(Shared {
        handle,
        process,
        scrapes,
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
        let slot = ScrapeSlot {
            scrapers: scrapers.clone(),
            permit: std::sync::Mutex::new(None),
        };
        let shared = shared.clone();
        connections.admit(peer, async move {
            let limits = Limits {
                idle: shared.options.idle_timeout,
                write: shared.options.write_timeout,
            };
            let stream = Deadlines::new(stream, limits);
            let served = match shared.options.tls.clone() {
                None => serve_connection(stream, slot, shared).await,
                Some(tls) => {
                    let handshake = shared.options.header_read_timeout;
                    match tokio::time::timeout(handshake, tls.accept(stream)).await {
                        Ok(Ok(stream)) => serve_connection(stream, slot, shared).await,
                        Ok(Err(e)) => {
                            tracing::debug!("TLS handshake with {peer} failed: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake with {peer} took over {handshake:?}");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = served {
                tracing::debug!("connection from {peer} ended: {e}");
            }
        });
        // The new connection's task runs, and the sockets that became
        // readable are polled, before the next connection is accepted: a
        // probe in a burst of connections reads its head (and is answered)
        // before the burst can push it out as the oldest.
        tokio::task::yield_now().await;
    }
}

async fn serve_connection<S>(stream: S, slot: ScrapeSlot, shared: Arc<Shared>) -> hyper::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let header_read_timeout = shared.options.header_read_timeout;
    let slot = Arc::new(slot);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (slot, shared) = (slot.clone(), shared.clone());
        async move { Ok::<_, Infallible>(respond(request, &slot, &shared).await) }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(MAX_BUFFER_BYTES)
        .serve_connection(TokioIo::new(stream), service)
        .await
}
