//! `/metrics` behind TokenReview and SubjectAccessReview, against the
//! loopback Kubernetes API: allowed, denied, unknown tokens, the cache, and
//! an API outage (fail closed).

mod meter_support;
mod server_support;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ergon::export::{Authorizer, ServerOptions};
use ergon_testkit::kube_api::{ApiState, FakeApiServer};
use meter_support::CapturedLogs;
use server_support::{Binary, TestServer, raw_request, report_of_pods, status_of};

/// Everything logged by this test binary (the server logs on its own
/// thread, so `capture_logs`' thread-local subscriber would miss it).
fn log() -> &'static CapturedLogs {
    static LOG: OnceLock<CapturedLogs> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = CapturedLogs::default();
        let _ = tracing::subscriber::set_global_default(
            tracing_subscriber::fmt()
                .with_writer(log.clone())
                .with_ansi(false)
                .finish(),
        );
        log
    })
}

fn scrape(port: u16, token: Option<&str>) -> String {
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    raw_request(
        port,
        format!("GET /metrics HTTP/1.1\r\nHost: e\r\n{authorization}Connection: close\r\n\r\n")
            .as_bytes(),
        Duration::from_secs(10),
    )
    .expect("an answer")
}

/// The loopback API server, knowing `tokens` (token, user) and allowing
/// `readers` to get /metrics, on its own runtime.
fn fake_api(
    tokens: &[(&str, &str)],
    readers: &[&str],
) -> (tokio::runtime::Runtime, FakeApiServer, Arc<Mutex<ApiState>>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let state = Arc::new(Mutex::new(ApiState::default()));
    {
        let mut state = state.lock().unwrap();
        for (token, user) in tokens {
            state.tokens.insert(token.to_string(), user.to_string());
        }
        for reader in readers {
            state.metrics_readers.insert(reader.to_string());
        }
    }
    let api = runtime.block_on(FakeApiServer::start(state.clone()));
    (runtime, api, state)
}

#[test]
fn metrics_need_a_token_allowed_to_get_metrics_and_fail_closed_without_the_api() {
    let log = log();
    let (runtime, mut api, state) = fake_api(
        &[
            (
                "prometheus-token",
                "system:serviceaccount:monitoring:prometheus",
            ),
            ("intruder-token", "system:serviceaccount:default:intruder"),
            ("late-token", "system:serviceaccount:monitoring:late"),
        ],
        &[
            "system:serviceaccount:monitoring:prometheus",
            "system:serviceaccount:monitoring:late",
        ],
    );
    let client = runtime.block_on(async {
        kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap()
    });
    let options = ServerOptions {
        auth: Some(Arc::new(Authorizer::new(client))),
        ..ServerOptions::default()
    };
    let server = TestServer::start(report_of_pods(3), options);
    let port = server.port;

    let none = scrape(port, None);
    assert_eq!(status_of(&none), 401, "{none}");
    // Refused clients are disconnected: they keep no scraper slot.
    assert!(none.to_lowercase().contains("connection: close"), "{none}");
    assert!(
        none.to_lowercase().contains("www-authenticate: bearer"),
        "{none}"
    );
    assert!(!none.contains("ergon_pod"), "{none}");

    let allowed = scrape(port, Some("prometheus-token"));
    assert_eq!(status_of(&allowed), 200, "{allowed}");
    assert!(allowed.contains("ergon_pod_energy_joules_total{"));
    // The question asked is the one kube-rbac-proxy asks.
    let reviews = state.lock().unwrap().reviews.clone();
    assert_eq!(reviews.len(), 2, "{reviews:?}");
    assert_eq!(reviews[0]["kind"], "TokenReview");
    assert_eq!(reviews[0]["spec"]["token"], "prometheus-token");
    assert_eq!(reviews[1]["kind"], "SubjectAccessReview");
    assert_eq!(
        reviews[1]["spec"]["user"],
        "system:serviceaccount:monitoring:prometheus"
    );
    assert_eq!(
        reviews[1]["spec"]["nonResourceAttributes"],
        serde_json::json!({"path": "/metrics", "verb": "get"})
    );
    assert_eq!(reviews[1]["spec"]["groups"][0], "system:serviceaccounts");

    let denied = scrape(port, Some("intruder-token"));
    assert_eq!(status_of(&denied), 403, "{denied}");
    assert!(
        denied.contains("intruder") && !denied.contains("ergon_pod"),
        "{denied}"
    );
    let unknown = scrape(port, Some("forged-token"));
    assert_eq!(status_of(&unknown), 401, "{unknown}");

    // Decisions are cached: asking again costs the API nothing.
    let asked = state.lock().unwrap().reviews.len();
    for token in ["prometheus-token", "intruder-token", "forged-token"] {
        scrape(port, Some(token));
    }
    assert_eq!(state.lock().unwrap().reviews.len(), asked);

    // Probes need no token.
    let health = raw_request(
        port,
        b"GET /healthz HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(status_of(&health), 200, "{health}");

    // The exporter's service account may not create reviews: fail closed.
    state.lock().unwrap().forbidden = true;
    let refused = scrape(port, Some("late-token"));
    assert_eq!(status_of(&refused), 503, "{refused}");
    state.lock().unwrap().forbidden = false;

    // The API goes away: an uncached token is refused (503) at once, with a
    // log line that says why; the cached decision still holds.
    runtime.block_on(api.stop());
    let started = Instant::now();
    let outage = scrape(port, Some("late-token"));
    assert_eq!(status_of(&outage), 503, "{outage}");
    assert!(!outage.contains("ergon_pod"), "{outage}");
    assert!(
        started.elapsed() < ergon::export::REVIEW_TIMEOUT + Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let cached = scrape(port, Some("prometheus-token"));
    assert_eq!(status_of(&cached), 200, "{cached}");
    let logged = log.text();
    assert!(
        logged.contains("fail closed") && logged.contains("tokenreviews"),
        "{logged}"
    );
    drop(server);
    drop(runtime);
}

#[test]
fn the_binary_authorizes_scrapes_with_the_configured_api_and_refuses_to_start_without_one() {
    let (_runtime, api, _) = fake_api(&[("scraper-token", "prometheus")], &["prometheus"]);
    let exporter = Binary::spawn(&[
        "--authorize-metrics".into(),
        format!("--kube-api={}", api.url()),
    ]);
    let started = Instant::now();
    loop {
        let answer = raw_request(
            exporter.port,
            b"GET /metrics HTTP/1.1\r\nHost: e\r\nAuthorization: Bearer scraper-token\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        );
        if answer.as_deref().is_some_and(|a| status_of(a) == 200) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no authorized scrape from the binary: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let anonymous = scrape(exporter.port, None);
    assert_eq!(status_of(&anonymous), 401, "{anonymous}");
    drop(exporter);
    drop(api);

    let (ok, stderr) = Binary::spawn(&["--authorize-metrics".into()]).exit();
    assert!(
        !ok && stderr.contains("--authorize-metrics") && stderr.contains("--kube-api"),
        "{stderr}"
    );
}
