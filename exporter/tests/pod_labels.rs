//! `--pod-labels` end to end: a pod-shaped cgroup doing work, the loopback
//! Kubernetes API describing it with labels (some allow-listed, some not,
//! some absurdly long), and the real `ergon` binary. The labels must come out
//! the kube-state-metrics way — one `ergon_pod_labels` info series per pod,
//! joined by `pod_uid` — and never on the energy series; every label value
//! on `/metrics` stays bounded.

use ergon_testkit as support;
use support::pods::{KubeApi, NODE, PodFixture};
use support::{BusyChild, CgroupGuard, ExporterProcess, FakeRapl, cpu_lock, unique_uid};

const ERGON: &str = env!("CARGO_BIN_EXE_ergon");
const MAX_LABEL_BYTES: usize = ergon::export::MAX_LABEL_BYTES;

fn start_exporter(rapl: &FakeRapl, api: &KubeApi, extra: &[&str]) -> ExporterProcess {
    let mut args = vec![
        rapl.host_sys_arg(),
        format!("--cgroup-root={}", support::cgroup2_root().display()),
        support::kubelet_cgroup_root_arg(),
        "--meter=rapl".into(),
        "--interval=500ms".into(),
        format!("--kube-api={}", api.url()),
        format!("--node-name={NODE}"),
    ];
    args.extend(extra.iter().map(|arg| arg.to_string()));
    ExporterProcess::start(ERGON.as_ref(), &args)
}

#[test]
fn allow_listed_pod_labels_are_one_info_series_per_pod_and_every_value_is_bounded() {
    let _lock = cpu_lock();
    let rapl = FakeRapl::start(40.0);
    // A pod whose container id, name, namespace and label value are all far
    // longer than a label may be (a runtime or API server that does not
    // enforce Kubernetes' limits).
    let uid = unique_uid("labels");
    let container_id = format!("{:0>200}", uid.replace('-', ""));
    let cgroup = CgroupGuard::pod(&uid, &container_id);
    let pod = PodFixture {
        uid: uid.clone(),
        name: format!("vehicle-api-{}", "x".repeat(300)),
        namespace: format!("pipeline-{}", "n".repeat(300)),
        container_id,
        children: vec![BusyChild::spawn_in(&cgroup.path)],
        cgroup,
    };
    let mut object = pod.api_object();
    object["metadata"]["labels"] = serde_json::json!({
        "app": "vehicle-api",
        "app.kubernetes.io/part-of": format!("pipeline-{}", "v".repeat(500)),
        "team": "edge",
        "secret-ish": "not on the allow-list",
    });
    let api = KubeApi::start(&[]);
    api.state.lock().unwrap().put(object);

    let exporter = start_exporter(
        &rapl,
        &api,
        &["--pod-labels=app,app.kubernetes.io/part-of,team,missing-on-this-pod"],
    );
    let metrics = exporter.eventually("the pod's info series", |m| {
        m.select("ergon_pod_labels", &[("pod_uid", uid.as_str())])
            .count()
            == 1
            && m.sum(
                "ergon_pod_energy_joules_total",
                &[("pod_uid", uid.as_str())],
            ) > 0.0
    });

    let this_pod = [("pod_uid", uid.as_str())];
    let (labels, value) = metrics
        .select("ergon_pod_labels", &this_pod)
        .next()
        .unwrap();
    assert_eq!(value, 1.0);
    assert_eq!(labels["label_app"], "vehicle-api");
    assert_eq!(labels["label_team"], "edge");
    let part_of = &labels["label_app_kubernetes_io_part_of"];
    assert!(
        part_of.starts_with("pipeline-vvv") && part_of.len() <= MAX_LABEL_BYTES,
        "{part_of}"
    );
    assert!(
        !labels.contains_key("label_secret_ish")
            && !labels.contains_key("label_missing_on_this_pod"),
        "{labels:?}"
    );
    assert!(labels["pod"].starts_with("vehicle-api-xxx") && labels["pod"].len() <= MAX_LABEL_BYTES);

    // Pod labels never go on the energy series, and every label value of
    // every series is bounded.
    for (name, labels, _) in &metrics.samples {
        if name != "ergon_pod_labels" {
            assert!(
                labels.keys().all(|key| !key.starts_with("label_")),
                "{name} carries pod labels: {labels:?}"
            );
        }
        for (key, value) in labels {
            assert!(
                value.len() <= MAX_LABEL_BYTES,
                "{name}{{{key}}} is {} bytes: {value}",
                value.len()
            );
        }
    }
    let this_pod_name = [("pod", labels["pod"].as_str())];
    let container = metrics
        .select("ergon_container_cpu_seconds_total", &this_pod_name)
        .next()
        .map(|(labels, _)| labels["container_id"].clone())
        .expect("the container's series");
    assert!(
        container.starts_with("0000") && container.contains('~'),
        "{container}"
    );
}

#[test]
fn without_pod_labels_there_is_no_info_series() {
    let _lock = cpu_lock();
    let rapl = FakeRapl::start(40.0);
    let pod = PodFixture::start("vehicle-pipeline", "influxdb-0", 1);
    let api = KubeApi::start(&[&pod]);
    let exporter = start_exporter(&rapl, &api, &[]);
    let metrics = exporter.eventually("the pod's energy, named", |m| {
        m.select(
            "ergon_pod_energy_joules_total",
            &[("pod_uid", pod.uid.as_str()), ("pod", "influxdb-0")],
        )
        .count()
            > 0
    });
    assert_eq!(metrics.select("ergon_pod_labels", &[]).count(), 0);
}
