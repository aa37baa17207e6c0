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

/// The most a loopback connection can hold in flight when its reader sets
/// `client_receive_buffer`: the server's send buffer at its largest
/// (`tcp_wmem`'s maximum, which autotuning may reach) plus the client's.
fn socket_buffers_bytes(client_receive_buffer: usize) -> usize {
    let wmem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem").unwrap();
    let send_max: usize = wmem
        .split_whitespace()
        .nth(2)
        .and_then(|max| max.parse().ok())
        .expect("three numbers in tcp_wmem");
    send_max + client_receive_buffer
}

#[test]
fn a_stuck_scrape_frees_its_slot_after_the_write_timeout() {
    use std::io::Write;
    let options = ServerOptions {
        max_scrapers: 1,
        write_timeout: Duration::from_secs(1),
        ..ServerOptions::default()
    };
    let write_timeout = options.write_timeout;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // The stuck client asks for a small receive buffer (before connecting,
    // so that the window stays small); the body must be larger than all the
    // sockets can hold, or the server would finish writing it.
    let stuck_socket = tokio::net::TcpSocket::new_v4().unwrap();
    stuck_socket.set_recv_buffer_size(16 * 1024).unwrap();
    let receive_buffer = stuck_socket.recv_buffer_size().unwrap() as usize;
    let buffers = socket_buffers_bytes(receive_buffer);
    let per_pod = ergon::export::render_report(&report_of_pods(100)).len() / 100;
    let pods = (2 * buffers / per_pod).max(1000);
    let server = TestServer::start(report_of_pods(pods), options);
    let port = server.port;
    let scrape = b"GET /metrics HTTP/1.1\r\nHost: ergon\r\nConnection: close\r\n\r\n";

    // A first scrape renders the interval's body once (later ones share it)
    // and frees its slot when done.
    let first = raw_request(port, scrape, Duration::from_secs(30)).expect("a first scrape");
    assert_eq!(status_of(&first), 200, "{}", &first[..200]);
    assert!(complete(&first));
    assert!(
        first.len() > buffers,
        "the body ({} B) must not fit in the sockets' buffers ({buffers} B)",
        first.len()
    );

    // The stuck client: asks for /metrics, keeps its socket open, reads nothing.
    let stuck = runtime
        .block_on(stuck_socket.connect(([127, 0, 0, 1], port).into()))
        .unwrap()
        .into_std()
        .unwrap();
    stuck.set_nonblocking(false).unwrap();
    (&stuck)
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: ergon\r\n\r\n")
        .unwrap();
    let asked = Instant::now();

    // Its slot is the only one: scrapes are turned away (503) until the
    // server gives up on it, one write timeout after it started writing.
    let mut busy = Vec::new();
    let freed = loop {
        std::thread::sleep(Duration::from_millis(100));
        let sent = asked.elapsed();
        let answer = raw_request(port, scrape, Duration::from_secs(10));
        let status = answer.as_deref().map(status_of).unwrap_or(0);
        match status {
            503 => busy.push(sent),
            200 => {
                let answer = answer.unwrap();
                assert!(complete(&answer), "an incomplete scrape after {sent:?}");
                assert!(answer.len() > buffers, "{} B", answer.len());
                break sent;
            }
            other => panic!("a scrape after {sent:?} answered {other}: {answer:?}"),
        }
        // Slack for timers, the scheduler and this loop's polling on a
        // loaded 2-core machine: a write deadline that did not fire would
        // hold the slot for good.
        assert!(
            asked.elapsed() < write_timeout * 2,
            "the stuck scrape still held the only slot {:?} after it was asked, with a write \
             timeout of {write_timeout:?} ({} scrapes turned away)",
            asked.elapsed(),
            busy.len()
        );
    };
    assert!(
        !busy.is_empty(),
        "the stuck scrape held its slot at first: {busy:?}"
    );
    assert!(
        freed + Duration::from_millis(300) >= write_timeout,
        "the slot was free after {freed:?}, before the write timeout {write_timeout:?}: was \
         the stuck scrape stuck?"
    );
    assert!(
        freed <= write_timeout * 2,
        "the slot was free after {freed:?}"
    );
    eprintln!(
        "{} B body; {} scrapes turned away, the next answered 200 {freed:?} after the stuck one",
        first.len(),
        busy.len()
    );
    drop(stuck);
}

/// Holds `count` connections to `port` that send nothing; one the server
/// closes is opened again at once, as a client that keeps the cap full
/// would. Stops when `stop` is set; returns how many it opened.
fn silent_connections(
    port: u16,
    count: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    use std::io::Read;
    std::thread::spawn(move || {
        let connect = || {
            let stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            stream.set_nonblocking(true).ok()?;
            Some(stream)
        };
        let mut streams: Vec<_> = (0..count).map(|_| connect()).collect();
        let mut opened = count;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for stream in &mut streams {
                let open = stream.as_mut().is_some_and(|stream| {
                    matches!(stream.read(&mut [0u8; 64]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                });
                if !open {
                    *stream = connect();
                    opened += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        opened
    })
}

#[test]
fn probes_are_answered_while_silent_connections_fill_the_connection_cap() {
    let max_connections = 8;
    let options = ServerOptions {
        max_connections,
        ..ServerOptions::default()
    };
    let header_read_timeout = options.header_read_timeout;
    let server = TestServer::start(report_of_pods(50), options);
    let port = server.port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let silent = silent_connections(port, 2 * max_connections, stop.clone());
    std::thread::sleep(Duration::from_millis(300));

    // Probes every 0.5 s, for longer than a silent connection may wait for
    // its request head (so the silent client renews some meanwhile).
    let mut probes = Vec::new();
    let started = Instant::now();
    while started.elapsed() < header_read_timeout + Duration::from_secs(1) {
        for path in ["/healthz", "/readyz"] {
            let asked = Instant::now();
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: ergon\r\nConnection: close\r\n\r\n");
            let answer = raw_request(port, request.as_bytes(), Duration::from_secs(1));
            probes.push((
                started.elapsed(),
                path,
                answer.as_deref().map(status_of).unwrap_or(0),
                asked.elapsed(),
            ));
        }
        std::thread::sleep(PROBE_EVERY);
    }
    // A scrape gets in too.
    let scrape = raw_request(
        port,
        b"GET /metrics HTTP/1.1\r\nHost: ergon\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let opened = silent.join().unwrap();

    let failed: Vec<_> = probes
        .iter()
        .filter(|(_, _, status, took)| *status != 200 || *took > Duration::from_secs(1))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} probes failed or took over 1 s with {max_connections} connections allowed \
         and {} silent ones held (at, path, status, took): {failed:?}",
        failed.len(),
        probes.len(),
        2 * max_connections
    );
    assert!(probes.len() >= 10, "{} probes", probes.len());
    let scrape = scrape.expect("a scrape while the cap is full");
    assert_eq!(
        status_of(&scrape),
        200,
        "{}",
        &scrape[..scrape.len().min(200)]
    );
    assert!(complete(&scrape));
    eprintln!(
        "{} probes all 200 (slowest {:?}); the silent client opened {opened} connections",
        probes.len(),
        probes.iter().map(|p| p.3).max().unwrap()
    );
}
