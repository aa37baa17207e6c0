//! The exporter's real HTTP server on loopback, serving a published report
//! of a realistic size, for the server's tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use ergon::export::{Family, Kind, Published, Report, ServerHandle, ServerOptions};

/// A report the size of a node with `pods` pods: two containers each, two
/// energy domains, CPU time; label values as long as real ones.
pub fn report_of_pods(pods: usize) -> Report {
    let mut pod_energy = Family::new(
        "ergon_pod_energy_joules_total",
        "Energy attributed to the pod.",
        Kind::Counter,
        &["namespace", "pod", "pod_uid", "domain"],
    );
    let mut container_energy = Family::new(
        "ergon_container_energy_joules_total",
        "Energy attributed to the container.",
        Kind::Counter,
        &["namespace", "pod", "container", "container_id", "domain"],
    );
    let mut container_cpu = Family::new(
        "ergon_container_cpu_seconds_total",
        "CPU time of the container.",
        Kind::Counter,
        &["namespace", "pod", "container", "container_id"],
    );
    for i in 0..pods {
        let namespace = format!("team-{}", i % 17);
        let pod = format!("vehicle-api-7d9f8b6c5-{i:05x}");
        let uid = format!("{i:08x}-1b2c-4d3e-8f40-{i:012x}");
        for domain in ["package", "dram"] {
            pod_energy.push(
                vec![namespace.clone(), pod.clone(), uid.clone(), domain.into()],
                1234.5 + i as f64,
            );
        }
        for container in ["app", "istio-proxy"] {
            let id = format!("containerd://{:0>64x}", i * 2 + container.len());
            for domain in ["package", "dram"] {
                container_energy.push(
                    vec![
                        namespace.clone(),
                        pod.clone(),
                        container.into(),
                        id.clone(),
                        domain.into(),
                    ],
                    617.25 + i as f64,
                );
            }
            container_cpu.push(
                vec![namespace.clone(), pod.clone(), container.into(), id],
                42.125 + i as f64,
            );
        }
    }
    Report {
        families: vec![pod_energy, container_energy, container_cpu],
    }
}

/// `ergon::export::serve` on its own thread and single-threaded runtime, as
/// the binary runs it. Stopped (every connection dropped) on drop.
pub struct TestServer {
    pub port: u16,
    pub handle: ServerHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(report: Report, options: ServerOptions) -> TestServer {
        let published = Published::default();
        published.publish(report);
        let handle = ServerHandle::new(published, Duration::from_secs(5));
        handle.interval_done();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound, port) = std::sync::mpsc::channel();
        let served = handle.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                // tokio's bind, as the binary's: a backlog of 1024.
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                bound.send(listener.local_addr().unwrap().port()).unwrap();
                tokio::select! {
                    served = ergon::export::serve(listener, served, options) => {
                        panic!("the server stopped: {served:?}")
                    }
                    _ = stopped => {}
                }
            });
        });
        let port = port
            .recv_timeout(Duration::from_secs(10))
            .expect("the server binds a port");
        TestServer {
            port,
            handle,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends `request` as is and reads the answer until the server closes or
/// `timeout` passes; `None` when the connection failed.
pub fn raw_request(port: u16, request: &[u8], timeout: Duration) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    stream.write_all(request).ok()?;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    (!answer.is_empty()).then(|| String::from_utf8_lossy(&answer).into_owned())
}

/// The status code of an HTTP/1.1 answer.
pub fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// The process's resident memory, from `/proc/self/status`.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// The chart's default memory limit (`resources.limits.memory`), in bytes.
pub fn chart_memory_limit_bytes() -> u64 {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../daemonset/helm/ergon/values.yaml"
    );
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let limit = values["resources"]["limits"]["memory"]
        .as_str()
        .expect("resources.limits.memory in the chart's values.yaml");
    let (number, unit) = limit.split_at(limit.find(|c: char| c.is_alphabetic()).unwrap());
    let scale = match unit {
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => panic!("unexpected memory unit {other} in the chart's limit {limit}"),
    };
    number.parse::<u64>().unwrap() * scale
}

/// A one-cgroup tree the procfs probe reads, so the real binary measures
/// without eBPF or real cgroups.
pub fn fake_cgroup_tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cpu.stat"),
        "usage_usec 1000\nuser_usec 600\nsystem_usec 400\n",
    )
    .unwrap();
    dir
}

/// The real `ergon` binary on a free loopback port with the procfs probe,
/// the model meter and `extra` flags; killed on drop.
pub struct Binary {
    pub child: std::process::Child,
    pub port: u16,
    /// The cgroup tree the probe reads (`--cgroup-root`).
    pub cgroups: tempfile::TempDir,
}

impl Binary {
    pub fn spawn(extra: &[String]) -> Binary {
        let cgroups = fake_cgroup_tree();
        let port = ergon_testkit::free_port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_ergon"))
            .arg(format!("--listen=127.0.0.1:{port}"))
            .args(["--probe=procfs", "--meter=model", "--interval=200ms"])
            .arg(format!("--cgroup-root={}", cgroups.path().display()))
            .args(extra)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("ERGON_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting ergon");
        Binary {
            child,
            port,
            cgroups,
        }
    }

    /// Waits for the process to end (at most 20 s); its exit success and
    /// stderr.
    pub fn exit(mut self) -> (bool, String) {
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut stderr = String::new();
                let _ = self
                    .child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut stderr);
                return (status.success(), stderr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("ergon did not exit");
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
