//! `--otlp-endpoint`: a loopback OTLP/HTTP receiver decodes the real
//! protobuf (the `opentelemetry-proto` messages) the exporter pushes while it
//! measures named pods, and checks names, attributes and values against the
//! same exporter's `/metrics`; a collector that is down at start gets the
//! full cumulative energy once it is up, with the exporter's memory flat in
//! between; SIGTERM pushes the last interval before the exporter exits.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ergon_testkit as support;
use http_body_util::BodyExt;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Metric, NumberDataPoint, metric, number_data_point,
};
use prost::Message;
use support::pods::{KubeApi as Api, NODE, PodFixture as TestPod};
use support::{ExporterProcess, FakeRapl, Metrics, cpu_lock};

const ERGON: &str = env!("CARGO_BIN_EXE_ergon");

/// An OTLP/HTTP metrics receiver on loopback, on its own runtime; every
/// request decoded and kept with the time it arrived. Dropping it stops it.
struct Receiver {
    runtime: tokio::runtime::Runtime,
    accept_task: tokio::task::JoinHandle<()>,
    address: SocketAddr,
    received: Arc<Mutex<Vec<(Instant, ExportMetricsServiceRequest)>>>,
}

impl Receiver {
    fn start_on(address: SocketAddr) -> Receiver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(address))
            .unwrap();
        let address = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let kept = received.clone();
        let accept_task = runtime.spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let kept = kept.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: hyper::Request<hyper::body::Incoming>| {
                            let kept = kept.clone();
                            async move {
                                let path_ok = request.uri().path() == "/v1/metrics";
                                let protobuf = request
                                    .headers()
                                    .get(hyper::header::CONTENT_TYPE)
                                    .is_some_and(|t| t == "application/x-protobuf");
                                let body = request.into_body().collect().await.unwrap().to_bytes();
                                let status = match ExportMetricsServiceRequest::decode(body) {
                                    Ok(decoded) if path_ok && protobuf => {
                                        kept.lock().unwrap().push((Instant::now(), decoded));
                                        200
                                    }
                                    _ => 400,
                                };
                                Ok::<_, Infallible>(
                                    hyper::Response::builder()
                                        .status(status)
                                        .header("content-type", "application/x-protobuf")
                                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Receiver {
            runtime,
            accept_task,
            address,
            received,
        }
    }

    fn start() -> Receiver {
        Self::start_on("127.0.0.1:0".parse().unwrap())
    }

    fn endpoint_arg(&self) -> String {
        format!("--otlp-endpoint=http://{}", self.address)
    }

    fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Waits (20 s at most) until more than `already` requests arrived, and
    /// returns request number `already` (0-based).
    fn wait_for(&self, already: usize) -> ExportMetricsServiceRequest {
        for _ in 0..200 {
            if let Some((_, request)) = self.received.lock().unwrap().get(already) {
                return request.clone();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no OTLP push number {} arrived", already + 1);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.accept_task.abort();
        let _ = self.runtime.block_on(&mut self.accept_task);
    }
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        other => format!("{other:?}"),
    }
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| text(&kv.value))
}

fn metrics(request: &ExportMetricsServiceRequest) -> impl Iterator<Item = &Metric> {
    request
        .resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
}

fn metric<'a>(request: &'a ExportMetricsServiceRequest, name: &str) -> &'a Metric {
    metrics(request)
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("no `{name}` pushed"))
}

fn points(metric: &Metric) -> &[NumberDataPoint] {
    match &metric.data {
        Some(metric::Data::Sum(sum)) => &sum.data_points,
        Some(metric::Data::Gauge(gauge)) => &gauge.data_points,
        other => panic!("`{}` is {other:?}", metric.name),
    }
}

fn value(point: &NumberDataPoint) -> f64 {
    match point.value {
        Some(number_data_point::Value::AsDouble(v)) => v,
        Some(number_data_point::Value::AsInt(v)) => v as f64,
        None => panic!("a data point without a value"),
    }
}

/// The pushed value of `name` at the point whose attributes include all of
/// `matching`.
fn pushed(request: &ExportMetricsServiceRequest, name: &str, matching: &[(&str, &str)]) -> f64 {
    points(metric(request, name))
        .iter()
        .filter(|p| {
            matching
                .iter()
                .all(|(k, v)| attribute(&p.attributes, k).as_deref() == Some(*v))
        })
        .map(value)
        .sum()
}

fn assert_cumulative_monotonic(metric: &Metric) {
    match &metric.data {
        Some(metric::Data::Sum(sum)) => {
            assert!(sum.is_monotonic, "`{}` is not monotonic", metric.name);
            assert_eq!(
                sum.aggregation_temporality,
                AggregationTemporality::Cumulative as i32,
                "`{}` is not cumulative",
                metric.name
            );
        }
        other => panic!("`{}` is not a sum: {other:?}", metric.name),
    }
}

fn start_exporter(rapl: &FakeRapl, api: &Api, extra: &[String]) -> ExporterProcess {
    let mut args = support::pods::exporter_args(rapl, api);
    args.push("--interval=500ms".into());
    args.extend_from_slice(extra);
    ExporterProcess::start(ERGON.as_ref(), &args)
}

fn pod_energy(metrics: &Metrics, pod: &TestPod) -> f64 {
    metrics.sum(
        "ergon_pod_energy_joules_total",
        &[("pod", &pod.name), ("domain", "package")],
    )
}

#[test]
fn pushed_metrics_match_the_scrape() {
    let _lock = cpu_lock();
    let rapl = FakeRapl::start(40.0);
    let pod = TestPod::start("vehicle-pipeline", "vehicle-api-7d9f", 1);
    let api = Api::start(&[&pod]);
    let receiver = Receiver::start();
    // A fixed carbon intensity: its gauge is pushed like every other family.
    let exporter = start_exporter(
        &rapl,
        &api,
        &[receiver.endpoint_arg(), "--carbon-intensity=350".into()],
    );

    let before = exporter.eventually("the pod's energy", |m| pod_energy(m, &pod) > 0.0);
    // The second push to arrive after this scrape was collected after it.
    let after_before = receiver.count() + 1;
    let request = receiver.wait_for(after_before);
    let after = exporter.metrics();

    // The node is the resource.
    let resource = request.resource_metrics[0].resource.as_ref().unwrap();
    assert_eq!(
        attribute(&resource.attributes, "k8s.node.name").as_deref(),
        Some(NODE)
    );
    assert!(attribute(&resource.attributes, "host.name").is_some_and(|h| !h.is_empty()));
    assert_eq!(
        attribute(&resource.attributes, "service.name").as_deref(),
        Some("ergon")
    );

    // Every Ergon family of the scrape is pushed, counters as cumulative
    // monotonic sums without `_total`, gauges as gauges.
    let text = exporter.metrics_text();
    for line in text.lines().filter(|l| l.starts_with("# TYPE ergon_")) {
        let mut words = line.split(' ').skip(2);
        let (name, kind) = (words.next().unwrap(), words.next().unwrap());
        if before.select(name, &[]).next().is_none() {
            continue; // appeared after the push was collected
        }
        if name == "ergon_scrapes_total" {
            continue; // counts /metrics scrapes: the HTTP side's, not pushed
        }
        match kind {
            "counter" => {
                assert_cumulative_monotonic(metric(&request, name.strip_suffix("_total").unwrap()))
            }
            _ => assert!(
                matches!(metric(&request, name).data, Some(metric::Data::Gauge(_))),
                "`{name}` is not a gauge"
            ),
        }
    }
    let energy = metric(&request, "ergon_pod_energy_joules");
    assert_eq!(energy.unit, "J");

    // Data-point attributes take the semantic conventions' names, and the
    // counters lie between the scrapes before and after the push.
    let pod_point = [
        ("k8s.namespace.name", pod.namespace.as_str()),
        ("k8s.pod.name", pod.name.as_str()),
        ("k8s.pod.uid", pod.uid.as_str()),
        ("domain", "package"),
    ];
    let joules = pushed(&request, "ergon_pod_energy_joules", &pod_point);
    assert!(
        pod_energy(&before, &pod) <= joules && joules <= pod_energy(&after, &pod),
        "pushed {joules} J, scraped {} J before and {} J after",
        pod_energy(&before, &pod),
        pod_energy(&after, &pod)
    );
    let container_point = [
        ("k8s.pod.name", pod.name.as_str()),
        ("k8s.container.name", "main"),
        ("container.id", pod.container_id.as_str()),
    ];
    let seconds = pushed(&request, "ergon_container_cpu_seconds", &container_point);
    let scraped = |m: &Metrics| {
        m.sum(
            "ergon_container_cpu_seconds_total",
            &[("pod", &pod.name), ("container", "main")],
        )
    };
    assert!(
        seconds > 0.0 && scraped(&before) <= seconds && seconds <= scraped(&after),
        "pushed {seconds} s, scraped {} s before and {} s after",
        scraped(&before),
        scraped(&after)
    );
    let node = [("domain", "package"), ("mode", "active")];
    let node_joules = pushed(&request, "ergon_node_energy_joules", &node);
    let scraped_node = |m: &Metrics| m.sum("ergon_node_energy_joules_total", &node);
    assert!(
        scraped_node(&before) <= node_joules && node_joules <= scraped_node(&after),
        "pushed {node_joules} J, scraped {} J before and {} J after",
        scraped_node(&before),
        scraped_node(&after)
    );
    assert_eq!(
        pushed(&request, "ergon_grid_carbon_intensity_grams_per_kwh", &[]),
        350.0
    );
    let watts = pushed(&request, "ergon_node_power_watts", &[("domain", "package")]);
    assert!(
        (watts - 40.0).abs() < 6.0,
        "node power {watts} W, the meter advances at 40 W"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

#[test]
fn collector_down_at_start_gets_everything_once_up_and_memory_stays_flat() {
    let _lock = cpu_lock();
    let rapl = FakeRapl::start(40.0);
    let pod = TestPod::start("vehicle-pipeline", "influxdb-0", 1);
    let api = Api::start(&[&pod]);
    let port = support::free_port();
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    let exporter = start_exporter(&rapl, &api, &[format!("--otlp-endpoint=http://{address}")]);

    // Twenty failed pushes and their retries, none queued.
    std::thread::sleep(Duration::from_secs(2));
    let settled = rss_kib(exporter.child.id());
    std::thread::sleep(Duration::from_secs(10));
    let later = rss_kib(exporter.child.id());
    eprintln!(
        "ergon's RSS with the collector down: {settled} KiB after 2 s, {later} KiB 10 s later"
    );
    assert!(
        later < settled + 4 * 1024,
        "memory grew from {settled} KiB to {later} KiB while the collector was down"
    );

    let before = exporter.metrics();
    let receiver = Receiver::start_on(address);
    let request = receiver.wait_for(1);
    let pod_point = [("k8s.pod.name", pod.name.as_str()), ("domain", "package")];
    let joules = pushed(&request, "ergon_pod_energy_joules", &pod_point);
    // Cumulative: the energy of the intervals no push carried is not lost.
    assert!(
        joules >= pod_energy(&before, &pod) && joules > 0.0,
        "first push after the outage carries {joules} J, the scrape before it {} J",
        pod_energy(&before, &pod)
    );
}

#[test]
fn sigterm_pushes_the_last_interval() {
    let _lock = cpu_lock();
    let rapl = FakeRapl::start(40.0);
    let pod = TestPod::start("vehicle-pipeline", "redis-0", 1);
    let api = Api::start(&[&pod]);
    let receiver = Receiver::start();
    let mut args = support::pods::exporter_args(&rapl, &api);
    // Pushes 4 s apart: one arriving within a second of SIGTERM is the
    // final flush, not the schedule.
    args.extend(["--interval=4s".into(), receiver.endpoint_arg()]);
    let mut exporter = ExporterProcess::start(ERGON.as_ref(), &args);
    receiver.wait_for(0);
    let periodic = receiver.count();
    std::thread::sleep(Duration::from_millis(300));

    let signalled = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(
        unsafe { libc::kill(exporter.child.id() as i32, libc::SIGTERM) },
        0
    );
    let status = exporter.child.wait().unwrap();
    assert!(status.success(), "ergon exited with {status}");
    let received = receiver.received.lock().unwrap();
    assert_eq!(
        received.len(),
        periodic + 1,
        "SIGTERM made no final push (or more than one)"
    );
    let (arrived, last) = received.last().unwrap();
    assert!(*arrived >= signalled && *arrived - signalled < Duration::from_secs(3));
    let pod_point = [("k8s.pod.name", pod.name.as_str()), ("domain", "package")];
    assert!(pushed(last, "ergon_pod_energy_joules", &pod_point) > 0.0);
}
