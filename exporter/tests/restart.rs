//! Restarts of the real `ergon` binary, with a loopback Kubernetes API: the
//! counters come back from the checkpoint with their names, they are served
//! from the first scrape, an unusable checkpoint is set aside and reported,
//! and the first interval after start carries energy.

use ergon_testkit as support;

const ERGON: &str = env!("CARGO_BIN_EXE_ergon");

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::pods::{KubeApi as Api, PodFixture as TestPod};
use support::{ExporterProcess, FakeRapl, Metrics, cpu_lock};

type Sample = (String, BTreeMap<String, String>, f64);

fn args(rapl: &FakeRapl, api: &Api, extra: &[String]) -> Vec<String> {
    let mut args = support::pods::exporter_args(rapl, api);
    args.push("--retention=10m".into());
    args.extend(extra.iter().cloned());
    args
}

fn of_pod<'a>(metrics: &'a Metrics, pod: &TestPod) -> Vec<&'a Sample> {
    metrics
        .samples
        .iter()
        .filter(|(_, labels, _)| {
            labels.get("pod_uid") == Some(&pod.uid)
                || labels.get("container_id") == Some(&pod.container_id)
        })
        .collect()
}

fn named(samples: &[&Sample], pod: &TestPod) -> bool {
    !samples.is_empty()
        && samples.iter().all(|(_, labels, _)| {
            labels["namespace"] == pod.namespace
                && labels["pod"] == pod.name
                && labels.get("container").is_none_or(|c| c == "main")
        })
}

#[test]
fn a_deleted_pod_keeps_its_names_across_a_restart_and_counters_are_served_at_once() {
    let _lock = cpu_lock();
    let rapl = FakeRapl::start(30.0);
    let mut gone = TestPod::start("vehicle-pipeline", "job-once", 1);
    let staying = TestPod::start("vehicle-pipeline", "vehicle-api-0", 1);
    let api = Api::start(&[&gone, &staying]);
    let state = tempfile::tempdir().unwrap();
    let state_arg = format!("--state-dir={}", state.path().display());
    let mut exporter = ExporterProcess::start(
        ERGON.as_ref(),
        &args(&rapl, &api, &[state_arg.clone(), "--interval=500ms".into()]),
    );
    exporter.eventually("the pod that will go is named", |m| {
        named(&of_pod(m, &gone), &gone)
            && m.sum("ergon_pod_energy_joules_total", &[("pod", "job-once")]) > 0.0
    });

    // The pod ends: its processes exit, its cgroup goes, the API deletes it.
    gone.stop();
    gone.cgroup.remove();
    api.state.lock().unwrap().delete(&gone.uid);
    std::thread::sleep(Duration::from_millis(1500));
    let before = exporter.metrics();
    let counters_of_gone: Vec<Sample> = of_pod(&before, &gone)
        .into_iter()
        .filter(|(name, _, _)| name.ends_with("_total"))
        .cloned()
        .collect();
    assert!(
        named(&counters_of_gone.iter().collect::<Vec<_>>(), &gone),
        "{counters_of_gone:?}"
    );
    let counters: Vec<Sample> = before
        .samples
        .iter()
        .filter(|(name, _, _)| support::persisted_counter(name))
        .cloned()
        .collect();

    // Killed without warning; the new exporter measures every 30 s, so
    // what it serves before then can only be the restored counters.
    exporter.kill();
    let started = Instant::now();
    let exporter = ExporterProcess::start(
        ERGON.as_ref(),
        &args(&rapl, &api, &[state_arg, "--interval=30s".into()]),
    );
    let after = exporter.metrics();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the first scrape came after the first interval"
    );
    for (name, labels, value) in &counters {
        let now = after
            .samples
            .iter()
            .find(|(n, l, _)| n == name && l == labels)
            .map(|(_, _, v)| *v);
        match now {
            Some(now) => assert!(
                now >= *value,
                "{name}{labels:?} went down: {value} -> {now}"
            ),
            None => panic!(
                "{name}{labels:?} is missing from the first scrape after a restart; the pod's \
                 series now: {:?}",
                of_pod(&after, &gone)
            ),
        }
    }
    assert!(
        named(&of_pod(&after, &gone), &gone),
        "{:?}",
        of_pod(&after, &gone)
    );
    let written = after.sum("ergon_checkpoint_writing", &[]);
    assert_eq!(written, 0.0, "nothing was saved yet by the new exporter");
}

#[test]
fn an_unusable_checkpoint_is_set_aside_and_reported() {
    let _lock = cpu_lock();
    let rapl = FakeRapl::start(30.0);
    let api = Api::start(&[]);
    let state = tempfile::tempdir().unwrap();
    let checkpoint = state.path().join("ergon-checkpoint.json");
    std::fs::write(
        &checkpoint,
        b"{\"format\":\"ergon-checkpoint\",\"version\":1,",
    )
    .unwrap();
    let exporter = ExporterProcess::start(
        ERGON.as_ref(),
        &args(
            &rapl,
            &api,
            &[
                format!("--state-dir={}", state.path().display()),
                "--interval=500ms".into(),
            ],
        ),
    );
    let metrics = exporter.eventually("a checkpoint is written", |m| {
        m.sum("ergon_checkpoint_writing", &[]) == 1.0
    });
    assert_eq!(
        metrics.sum("ergon_checkpoint_rejected_total", &[("reason", "format")]),
        1.0
    );
    let aside: Vec<_> = std::fs::read_dir(state.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("ergon-checkpoint.json.rejected-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
}

#[test]
fn the_first_interval_has_energy_wherever_cpu_time_was_counted() {
    let _lock = cpu_lock();
    let busy = TestPod::start("vehicle-pipeline", "first-interval", 1);
    let rapl = FakeRapl::start(30.0);
    // The model meter, as on every VM (an estimate from utilisation, no
    // counter), and a counter-based meter (RAPL) that needs a baseline.
    let meters = [
        ("model", vec!["--meter=model".to_owned()]),
        ("rapl", vec!["--meter=rapl".to_owned(), rapl.host_sys_arg()]),
    ];
    for (source, meter_args) in meters {
        let mut args = meter_args.clone();
        args.extend([
            format!("--cgroup-root={}", support::cgroup2_root().display()),
            support::kubelet_cgroup_root_arg(),
            "--interval=3s".into(),
            "--no-checkpoint".into(),
        ]);
        let exporter = ExporterProcess::start(ERGON.as_ref(), &args);
        // Ready means the first interval was published; the next comes 3 s
        // later.
        let first = exporter.metrics();
        let container = [("container_id", busy.container_id.as_str())];
        let cpu = first.sum("ergon_container_cpu_seconds_total", &container);
        let joules = first.sum("ergon_container_energy_joules_total", &container);
        assert!(
            cpu > 0.0,
            "{source}: the busy pod used no CPU in the first interval"
        );
        assert!(
            joules > 0.0,
            "{source}: the first interval counted {cpu} CPU seconds and no joules"
        );
        let node = first.sum("ergon_node_energy_joules_total", &[("source", source)]);
        assert!(node > 0.0, "{source}: no energy in the first interval");
        // All of it, not a part: the first interval's energy is its power
        // over the whole 3 s (the fake RAPL counter draws 30 W; the model's
        // power is its gauge), as for every later interval.
        let watts = match source {
            "rapl" => 30.0,
            _ => first.sum(
                "ergon_node_power_watts",
                &[("source", source), ("domain", "package")],
            ),
        };
        let package = first.sum(
            "ergon_node_energy_joules_total",
            &[("source", source), ("domain", "package")],
        );
        // 35%: a late tick on a loaded machine lengthens the interval; a
        // lost or partial interval is far outside.
        assert!(
            (package / (watts * 3.0) - 1.0).abs() < 0.35,
            "{source}: the first 3-s interval has {package} J at {watts} W"
        );
    }
}

#[test]
fn a_second_exporter_on_the_same_state_dir_writes_only_after_the_first_exits() {
    let _lock = cpu_lock();
    let rapl = FakeRapl::start(30.0);
    let api = Api::start(&[]);
    let state = tempfile::tempdir().unwrap();
    let args = args(
        &rapl,
        &api,
        &[
            format!("--state-dir={}", state.path().display()),
            "--interval=500ms".into(),
        ],
    );
    let writing = |m: &Metrics| m.sum("ergon_checkpoint_writing", &[]);
    let mut first = ExporterProcess::start(ERGON.as_ref(), &args);
    first.eventually("the first exporter writes", |m| writing(m) == 1.0);
    // A rolling update's surge pod on the same node.
    let second = ExporterProcess::start(ERGON.as_ref(), &args);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(writing(&second.metrics()), 0.0, "two exporters write");
    assert!(
        second.metrics().sum("ergon_node_cpu_seconds_total", &[]) > 0.0,
        "the second exporter stopped measuring"
    );
    assert_eq!(writing(&first.metrics()), 1.0);
    first.kill();
    second.eventually("the second exporter takes over", |m| writing(m) == 1.0);
}
