//! The HTTP server against clients that misbehave: pipelined scrapes that are
//! never read, odd methods, unknown paths, bodies, oversized heads.

mod server_support;

use std::time::{Duration, Instant};

use ergon::export::ServerOptions;
use server_support::{
    TestServer, chart_memory_limit_bytes, raw_request, report_of_pods, rss_bytes, status_of,
};
use tokio::net::TcpStream;

const SLOW_CLIENTS: usize = 200;
const PIPELINED_GETS: usize = 200;
const HELD_FOR: Duration = Duration::from_secs(20);
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// One client that sends pipelined `GET /metrics` and never reads. When the
/// server closes its connection it opens another, until `until`. Returns
/// how many connections it opened.
async fn slow_reader(port: u16, until: tokio::time::Instant) -> usize {
    let requests = "GET /metrics HTTP/1.1\r\nHost: ergon\r\n\r\n".repeat(PIPELINED_GETS);
    let mut connections = 0;
    // Bounded: at most one connection per 100 ms until `until`.
    while tokio::time::Instant::now() < until && connections < 1000 {
        let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_secs(1),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        connections += 1;
        let mut sent = 0;
        // Writes what the socket takes; then, every 250 ms, one more request,
        // which fails once the server has given up on the connection.
        loop {
            if tokio::time::Instant::now() >= until {
                return connections;
            }
            let chunk = if sent < requests.len() {
                &requests.as_bytes()[sent..]
            } else {
                &requests.as_bytes()[..38]
            };
            match stream.try_write(chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    connections
}

/// Whether an answer's body is as long as its `content-length` says.
fn complete(answer: &str) -> bool {
    let Some((head, body)) = answer.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .is_some_and(|length| length == body.len())
}

#[test]
fn probes_and_scrapes_survive_two_hundred_clients_that_never_read() {
    let options = ServerOptions::default();
    let write_timeout = options.write_timeout;
    let server = TestServer::start(report_of_pods(500), options);
    let port = server.port;
    let scrape = raw_request(
        port,
        b"GET /metrics HTTP/1.1\r\nHost: ergon\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .expect("a first scrape");
    assert_eq!(status_of(&scrape), 200, "{}", &scrape[..200]);
    assert!(complete(&scrape));
    let body_bytes = scrape.len();
    assert!(
        body_bytes > 512 * 1024,
        "a realistic report: {body_bytes} B"
    );

    let limit = chart_memory_limit_bytes();
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let until = tokio::time::Instant::now() + HELD_FOR;
    let readers: Vec<_> = (0..SLOW_CLIENTS)
        .map(|_| clients.spawn(slow_reader(port, until)))
        .collect();

    // Probes every 0.5 s, each on a new connection as the kubelet does.
    let mut probes = Vec::new();
    let mut peak_rss = rss_bytes();
    let started = Instant::now();
    while started.elapsed() < HELD_FOR {
        let asked = Instant::now();
        let answer = raw_request(
            port,
            b"GET /healthz HTTP/1.1\r\nHost: ergon\r\nConnection: close\r\n\r\n",
            Duration::from_secs(2),
        );
        let took = asked.elapsed();
        probes.push((
            started.elapsed(),
            answer.as_deref().map(status_of).unwrap_or(0),
            took,
        ));
        peak_rss = peak_rss.max(rss_bytes());
        std::thread::sleep(PROBE_EVERY.saturating_sub(took));
    }
    let connections: usize = clients
        .block_on(futures::future::join_all(readers))
        .into_iter()
        .map(|opened| opened.unwrap())
        .sum();
    // The clients go: their sockets close with the runtime.
    drop(clients);
    let gone = Instant::now();

    let failed: Vec<_> = probes
        .iter()
        .filter(|(_, status, took)| *status != 200 || *took > Duration::from_secs(1))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} probes failed or took over 1 s (at, status, took): {failed:?}",
        failed.len(),
        probes.len()
    );
    assert!(probes.len() >= 30, "{} probes", probes.len());
    assert!(
        connections >= SLOW_CLIENTS,
        "every slow client connected: {connections}"
    );
    assert!(
        peak_rss < limit,
        "peak RSS {peak_rss} B above the chart's memory limit {limit} B"
    );

    // Normal scrapes resume within one write timeout.
    let resumed = loop {
        let answer = raw_request(
            port,
            b"GET /metrics HTTP/1.1\r\nHost: ergon\r\nConnection: close\r\n\r\n",
            Duration::from_secs(2),
        );
        if let Some(answer) = answer
            && status_of(&answer) == 200
            && complete(&answer)
        {
            break gone.elapsed();
        }
        assert!(
            gone.elapsed() < write_timeout,
            "no full scrape within {write_timeout:?} after the clients left"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "{} probes all 200 (slowest {:?}); {connections} slow connections; peak RSS {} MiB \
         (limit {} MiB); scrapes resumed after {resumed:?}",
        probes.len(),
        probes.iter().map(|p| p.2).max().unwrap(),
        peak_rss >> 20,
        limit >> 20
    );
}

#[test]
fn only_get_and_head_on_known_paths_and_no_bodies() {
    let server = TestServer::start(report_of_pods(2), ServerOptions::default());
    let ask = |request: &str| {
        raw_request(server.port, request.as_bytes(), Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no answer to {request:?}"))
    };
    let post = ask("POST /metrics HTTP/1.1\r\nHost: e\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status_of(&post), 405, "{post}");
    assert!(
        post.to_ascii_lowercase().contains("allow: get, head"),
        "{post}"
    );
    let delete = ask("DELETE /healthz HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n");
    assert_eq!(status_of(&delete), 405, "{delete}");

    let unknown = ask("GET /debug/pprof HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n");
    assert_eq!(status_of(&unknown), 404, "{unknown}");

    // HEAD: the headers of GET, no body.
    let head = ask("HEAD /metrics HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n");
    assert_eq!(status_of(&head), 200, "{head}");
    assert!(head.ends_with("\r\n\r\n"), "{head}");

    // A body is refused without being read, and the connection closed: the
    // server does not wait for the gigabyte the client announced.
    let asked = Instant::now();
    let body = ask("GET /metrics HTTP/1.1\r\nHost: e\r\nContent-Length: 1000000000\r\n\r\nxx");
    assert_eq!(status_of(&body), 413, "{body}");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    let chunked =
        ask("GET /metrics HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n");
    assert_eq!(status_of(&chunked), 413, "{chunked}");

    // A head larger than the server's buffer is refused, not buffered.
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: e\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let answer = raw_request(server.port, huge.as_bytes(), Duration::from_secs(5));
    assert!(
        answer.as_deref().is_none_or(|a| status_of(a) == 431),
        "{answer:?}"
    );
}

#[test]
fn idle_and_trickling_connections_are_closed() {
    let options = ServerOptions {
        header_read_timeout: Duration::from_millis(800),
        ..ServerOptions::default()
    };
    let server = TestServer::start(report_of_pods(2), options);
    use std::io::{Read, Write};
    // Silent after connecting: closed after the header read timeout.
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let opened = Instant::now();
    let mut buffer = [0u8; 64];
    assert_eq!(silent.read(&mut buffer).unwrap_or(0), 0);
    let took = opened.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");

    // Kept alive after a request, then silent: closed after the same limit.
    let mut kept = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: e\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let answered = Instant::now();
    loop {
        match kept.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
        }
    }
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    let idle = answered.elapsed();
    assert!(
        idle >= Duration::from_millis(700) && idle < Duration::from_secs(3),
        "a kept-alive connection idle for {idle:?}"
    );

    // A head trickled a byte every 200 ms never completes in time.
    let mut trickle = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    trickle
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let opened = Instant::now();
    let mut closed = false;
    for byte in b"GET /metrics HTTP/1.1\r\nHost: ergon\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaa".iter() {
        if trickle.write_all(&[*byte]).is_err() {
            closed = true;
            break;
        }
        match trickle.read(&mut buffer) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => {}
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        closed,
        "a trickled head was still accepted after {:?}",
        opened.elapsed()
    );
    assert!(
        opened.elapsed() < Duration::from_secs(4),
        "{:?}",
        opened.elapsed()
    );
}
