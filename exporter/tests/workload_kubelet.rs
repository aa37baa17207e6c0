//! Pod metadata from a loopback kubelet serving real `/pods` JSON, over
//! HTTPS with a certificate made by openssl and over the read-only port's
//! plain HTTP: names reach the directory, refusals say which permission is
//! missing, and polls stay bounded (counted at the server).

use ergon_testkit as support;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ergon::workload::kube::MAX_EARLY_POLLS;
use ergon::workload::{KubeletConfig, KubeletError, KubeletPoller, PodDirectory};
use hyper::StatusCode;
use support::kube_api::pod;
use support::kubelet::{FakeKubelet, KubeletState};
use support::tls::issued_by_ca;

const UID_API: &str = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b";
const UID_NEW: &str = "7a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d";
const UID_ORPHAN: &str = "8b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d6e";

struct Tls {
    _dir: tempfile::TempDir,
    /// The cluster CA that issued the kubelet's certificate.
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    token: PathBuf,
}

fn tls() -> Tls {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = issued_by_ca(dir.path(), "kubelet");
    let token = dir.path().join("token");
    std::fs::write(&token, "sa-token-1\n").unwrap();
    Tls {
        ca,
        cert,
        key,
        token,
        _dir: dir,
    }
}

fn state_with(pods: Vec<serde_json::Value>) -> Arc<Mutex<KubeletState>> {
    Arc::new(Mutex::new(KubeletState {
        pods,
        ..KubeletState::default()
    }))
}

fn api_pod() -> serde_json::Value {
    pod(
        UID_API,
        "telemetry",
        "vehicle-api-0",
        "node-a",
        &[("api", "containerd://aaa111")],
    )
}

fn config(kubelet: &FakeKubelet, tls: &Tls) -> KubeletConfig {
    let mut config = KubeletConfig::new(kubelet.url());
    config.ca_file = Some(tls.ca.clone());
    config.token_file = Some(tls.token.clone());
    config.period = Duration::from_secs(3600);
    config.min_gap = Duration::from_millis(300);
    config.retry_initial = Duration::from_millis(50);
    config
}

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

#[tokio::test]
async fn pods_over_https_with_the_token_and_an_unknown_uid_polls_once_per_gap() {
    let tls = tls();
    let kubelet =
        FakeKubelet::start(state_with(vec![api_pod()]), Some((&tls.cert, &tls.key))).await;
    let poller = KubeletPoller::connect(config(&kubelet, &tls))
        .await
        .unwrap();
    let directory = poller.directory().clone();
    let api = directory.pod(UID_API).expect("the kubelet's pod");
    assert_eq!(
        (api.namespace.as_str(), api.name.as_str()),
        ("telemetry", "vehicle-api-0")
    );
    assert_eq!(api.containers["aaa111"], "api");
    assert_eq!(
        kubelet.with(|state| state.requests.clone()),
        [Some("Bearer sa-token-1".to_owned())]
    );

    // A new pod starts; its cgroup is looked up every "interval" (10 ms
    // here, far below the 300 ms gap): one poll finds it.
    kubelet.with(|state| {
        state.pods.push(pod(
            UID_NEW,
            "telemetry",
            "inference-0",
            "node-a",
            &[("model", "containerd://bbb222")],
        ))
    });
    wait_for("the new pod", &directory, |directory| {
        directory.pod(UID_NEW).is_some()
    })
    .await;
    assert_eq!(kubelet.request_count(), 2, "one poll for the new pod");

    // A cgroup no list explains, looked up 200 times over two seconds (six
    // gaps): it asks for a few polls (a kubelet may list a pod late), then
    // none, not one per lookup or per gap.
    for _ in 0..200 {
        assert!(directory.pod(UID_ORPHAN).is_none());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        kubelet.request_count(),
        2 + usize::from(MAX_EARLY_POLLS),
        "the orphan asked more than {MAX_EARLY_POLLS} times"
    );

    // A deleted pod: gone from the next list, still resolvable (retention).
    kubelet.with(|state| state.pods.retain(|pod| pod["metadata"]["uid"] != UID_API));
    kubelet.with(|state| {
        state.pods.push(pod(
            "9c4d5e6f-7a8b-4c9d-8e0f-2a3b4c5d6e7f",
            "telemetry",
            "late-0",
            "node-a",
            &[],
        ))
    });
    assert!(
        directory
            .pod("9c4d5e6f-7a8b-4c9d-8e0f-2a3b4c5d6e7f")
            .is_none()
    );
    wait_for("the late pod", &directory, |directory| {
        directory.live_pods().iter().all(|pod| pod.uid != UID_API)
    })
    .await;
    assert_eq!(directory.pod(UID_API).unwrap().name, "vehicle-api-0");
    drop(poller);
}

#[tokio::test]
async fn the_period_polls_without_new_pods_and_no_faster() {
    let tls = tls();
    let kubelet =
        FakeKubelet::start(state_with(vec![api_pod()]), Some((&tls.cert, &tls.key))).await;
    let mut config = config(&kubelet, &tls);
    config.period = Duration::from_millis(200);
    let poller = KubeletPoller::connect(config).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let polls = kubelet.request_count();
    // 1 at connect + one per 200 ms: 6; a loaded machine may lose one.
    assert!(
        (4..=7).contains(&polls),
        "{polls} polls in 1.1 s at a 200 ms period"
    );
    drop(poller);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_unless_verification_is_off() {
    let tls = tls();
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _, _) = issued_by_ca(other.path(), "other");
    let kubelet =
        FakeKubelet::start(state_with(vec![api_pod()]), Some((&tls.cert, &tls.key))).await;
    let mut config = config(&kubelet, &tls);
    config.ca_file = Some(other_ca);
    let error = KubeletPoller::connect(config.clone()).await.unwrap_err();
    assert!(matches!(error, KubeletError::Unreachable { .. }), "{error}");
    let text = error.to_string();
    assert!(
        text.to_lowercase().contains("certificate")
            && text.contains("--kubelet-insecure-skip-tls-verify"),
        "{text}"
    );
    config.insecure_skip_tls_verify = true;
    let poller = KubeletPoller::connect(config).await.unwrap();
    assert!(poller.directory().pod(UID_API).is_some());
}

#[tokio::test]
async fn refusals_name_the_permission_and_the_read_only_port_needs_none() {
    let tls = tls();
    let kubelet =
        FakeKubelet::start(state_with(vec![api_pod()]), Some((&tls.cert, &tls.key))).await;
    kubelet.with(|state| state.refuse = Some(StatusCode::FORBIDDEN));
    let error = KubeletPoller::connect(config(&kubelet, &tls))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("403")
            && error.contains("nodes/proxy")
            && error.contains("system:serviceaccount:ergon:ergon"),
        "{error}"
    );
    kubelet.with(|state| state.refuse = Some(StatusCode::UNAUTHORIZED));
    let error = KubeletPoller::connect(config(&kubelet, &tls))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("401") && error.contains("--kubelet-token-file"),
        "{error}"
    );

    // The same kubelet refusing while polling: the last pods stay and the
    // state says why.
    kubelet.with(|state| state.refuse = None);
    let poller = KubeletPoller::connect(config(&kubelet, &tls))
        .await
        .unwrap();
    kubelet.with(|state| state.refuse = Some(StatusCode::FORBIDDEN));
    let directory = poller.directory().clone();
    assert!(directory.pod(UID_ORPHAN).is_none()); // asks for a poll
    wait_for("the refusal", &directory, |directory| {
        !directory.connection().connected
    })
    .await;
    assert!(
        directory
            .connection()
            .last_error
            .unwrap()
            .contains("nodes/proxy")
    );
    assert!(
        directory.pod(UID_API).is_some(),
        "the last pods were dropped"
    );

    // The read-only port: plain HTTP, no token.
    let read_only = FakeKubelet::start(state_with(vec![api_pod()]), None).await;
    let mut plain = KubeletConfig::new(read_only.url());
    plain.token_file = None;
    plain.ca_file = None;
    let poller = KubeletPoller::connect(plain).await.unwrap();
    assert!(poller.directory().pod(UID_API).is_some());
    assert_eq!(read_only.with(|state| state.requests.clone()), [None]);
}

#[tokio::test]
async fn a_node_without_pods_lists_null() {
    let kubelet = FakeKubelet::start(state_with(Vec::new()), None).await;
    let mut config = KubeletConfig::new(kubelet.url());
    config.token_file = None;
    let poller = KubeletPoller::connect(config).await.unwrap();
    assert!(poller.directory().live_pods().is_empty());
    assert!(poller.directory().connection().synced);
}

const ERGON: &str = env!("CARGO_BIN_EXE_ergon");

/// A fake kubelet on a runtime of its own, for the tests that run the
/// binary synchronously.
fn kubelet_on_runtime(
    pods: Vec<serde_json::Value>,
    tls: Option<&Tls>,
) -> (tokio::runtime::Runtime, FakeKubelet) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let files = tls.map(|tls| (tls.cert.as_path(), tls.key.as_path()));
    let kubelet = runtime.block_on(FakeKubelet::start(state_with(pods), files));
    (runtime, kubelet)
}

#[test]
fn the_binary_names_pods_from_the_kubelet_without_a_poll_storm() {
    let _lock = support::cpu_lock();
    let rapl = support::FakeRapl::start(20.0);
    let pod = support::pods::PodFixture::start("telemetry", "vehicle-api-0", 1);
    let (_runtime, kubelet) = kubelet_on_runtime(vec![pod.api_object()], None);
    let api = support::pods::KubeApi::start(&[]);
    let mut args: Vec<String> = support::pods::exporter_args(&rapl, &api)
        .into_iter()
        .filter(|arg| !arg.starts_with("--kube-api"))
        .collect();
    args.extend([
        "--pod-source=kubelet".to_owned(),
        format!("--kubelet-url={}", kubelet.url()),
        "--interval=1s".to_owned(),
    ]);
    let exporter = support::ExporterProcess::start(ERGON.as_ref(), &args);
    exporter.eventually("the pod named from the kubelet", |metrics| {
        metrics
            .select(
                "ergon_pod_energy_joules_total",
                &[("pod_uid", pod.uid.as_str())],
            )
            .any(|(labels, _)| {
                labels["pod"] == "vehicle-api-0" && labels["namespace"] == "telemetry"
            })
    });
    let before = kubelet.request_count();
    std::thread::sleep(Duration::from_secs(3));
    let polls = kubelet.request_count() - before;
    // Other tests' pod cgroups may appear meanwhile: at most one poll per
    // 1 s interval, never one per lookup.
    assert!(polls <= 3, "{polls} kubelet polls in 3 intervals");
    assert_eq!(
        api.state.lock().unwrap().list_requests(),
        0,
        "--pod-source kubelet asked the API server"
    );
}

#[test]
fn auto_falls_back_to_the_api_server_with_one_line_naming_the_rbac() {
    let tls = tls();
    let (_runtime, kubelet) = kubelet_on_runtime(vec![api_pod()], Some(&tls));
    kubelet.with(|state| state.refuse = Some(StatusCode::FORBIDDEN));
    let api = support::pods::KubeApi::start(&[]);
    let mut exporter = support::LoggedChild::spawn(
        std::process::Command::new(ERGON)
            .arg(format!("--listen=127.0.0.1:{}", support::free_port()))
            .args([
                "--no-checkpoint",
                "--probe=procfs",
                "--meter=model",
                "--node-name=node-a",
            ])
            .arg(format!("--kube-api={}", api.url()))
            .arg(format!("--kubelet-url={}", kubelet.url()))
            .arg(format!("--kubelet-ca-file={}", tls.ca.display()))
            .arg(format!("--kubelet-token-file={}", tls.token.display()))
            .env("ERGON_LOG", "info")
            .env("NO_COLOR", "1"),
    );
    let line = exporter.wait_for_line("kubelet is not usable", Duration::from_secs(30));
    assert!(
        line.contains("403") && line.contains("nodes/proxy"),
        "{line}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while api.state.lock().unwrap().list_requests() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no pod list asked of the API server"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        kubelet.request_count(),
        1,
        "auto asked the kubelet more than once"
    );
}

#[tokio::test]
async fn a_period_too_long_for_the_clock_still_polls_for_new_pods() {
    // `last + period` overflowed tokio's Instant and killed the poller's
    // task: pod names froze with nothing but a panic line in the log.
    let kubelet = FakeKubelet::start(state_with(vec![api_pod()]), None).await;
    let mut config = KubeletConfig::new(kubelet.url());
    config.token_file = None;
    config.ca_file = None;
    config.period = Duration::from_secs(10_000_000_000_000_000_000);
    config.min_gap = Duration::from_millis(50);
    let poller = KubeletPoller::connect(config).await.unwrap();
    let directory = poller.directory().clone();
    kubelet.with(|state| {
        state.pods.push(pod(
            UID_NEW,
            "telemetry",
            "inference-0",
            "node-a",
            &[("model", "containerd://bbb222")],
        ))
    });
    wait_for("the new pod", &directory, |directory| {
        directory.pod(UID_NEW).is_some()
    })
    .await;
    assert!(kubelet.request_count() >= 2);
}
