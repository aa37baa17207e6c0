//! Billing integrity, end to end on the real kernel: only the kubelet's
//! cgroups are pods. A tenant who builds a pod's layout in a delegated
//! subtree bills nobody's pod; a pod uid the API does not list stays
//! unnamed and is counted in `ergon_unknown_pod_cgroups`.

use ergon_testkit as support;

use support::kube_api::pod;
use support::pods::{KubeApi, NODE};
use support::{BusyChild, CgroupGuard, ExporterProcess, FakeRapl, Metrics, cpu_lock, unique_uid};

const ERGON: &str = env!("CARGO_BIN_EXE_ergon");

/// A pod-shaped cgroup (systemd driver, containerd) under `kubelet_root`
/// with one busy process.
struct Pod {
    uid: String,
    container_id: String,
    // Dropped first: the process must be gone before its cgroup goes.
    _busy: BusyChild,
    _cgroup: CgroupGuard,
}

impl Pod {
    fn start(kubelet_root: &str, tag: &str) -> Pod {
        let uid = unique_uid(tag);
        let container_id = format!("{:0>64}", uid.replace('-', ""));
        let cgroup = CgroupGuard::create(&format!(
            "{kubelet_root}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{container_id}.scope",
            uid.replace('-', "_")
        ));
        Pod {
            uid,
            container_id,
            _busy: BusyChild::spawn_in(&cgroup.path),
            _cgroup: cgroup,
        }
    }
}

#[test]
fn a_forged_pod_layout_bills_nobody_and_unknown_uids_are_reported() {
    let _lock = cpu_lock();
    let rapl = FakeRapl::start(40.0);
    // This test's own kubelet root: the unknown-pod count must see only its
    // pods, not other tests' under the shared fixture root.
    let kubelet_root = format!("ergontest-billing-{}.slice", std::process::id());
    let victim = Pod::start(&kubelet_root, "victim");
    // A pod the kubelet made (under the kubelet's root) that the API does
    // not list on this node.
    let stray = Pod::start(&kubelet_root, "stray");
    // The victim's layout, rebuilt by a user in their delegated subtree,
    // outside the kubelet's root, with a container id of its own.
    let forged_id = format!("{:f>64}", "");
    let forged = CgroupGuard::create(&format!(
        "ergontest-forged-{}.slice/user.slice/user-4242.slice/user@4242.service/app.slice/kubepods/burstable/pod{}/{forged_id}",
        std::process::id(),
        victim.uid
    ));
    let forger = BusyChild::spawn_in(&forged.path);
    let api = KubeApi::start(&[]);
    api.state.lock().unwrap().put(pod(
        &victim.uid,
        "billing",
        "victim",
        NODE,
        &[("main", &format!("containerd://{}", victim.container_id))],
    ));
    let exporter = ExporterProcess::start(
        ERGON.as_ref(),
        &[
            rapl.host_sys_arg(),
            format!("--cgroup-root={}", support::cgroup2_root().display()),
            format!("--kubelet-cgroup-root=/{kubelet_root}"),
            "--meter=rapl".into(),
            "--idle-watts=package=10".into(),
            "--interval=500ms".into(),
            format!("--kube-api={}", api.url()),
            format!("--node-name={NODE}"),
        ],
    );
    let container_cpu = |metrics: &Metrics, id: &str| {
        metrics.sum("ergon_container_cpu_seconds_total", &[("container_id", id)])
    };
    let other = |m: &Metrics| m.sum("ergon_system_cpu_seconds_total", &[("bucket", "other")]);
    let metrics = exporter.eventually("both real pods and the forger measured", |m| {
        container_cpu(m, &victim.container_id) > 0.5
            && container_cpu(m, &stray.container_id) > 0.5
            && other(m) > 0.5
    });

    // The forger's CPU is nobody's pod: no series carries its container id,
    // and the victim's pod energy is its one real container's.
    assert_eq!(
        metrics
            .select(
                "ergon_container_cpu_seconds_total",
                &[("container_id", &forged_id)]
            )
            .count(),
        0,
        "the forged container was billed: {:?}",
        metrics.samples
    );
    let victim_pod = metrics.sum(
        "ergon_pod_energy_joules_total",
        &[("pod_uid", &victim.uid), ("domain", "package")],
    );
    let victim_container = metrics.sum(
        "ergon_container_energy_joules_total",
        &[
            ("container_id", &victim.container_id),
            ("domain", "package"),
        ],
    );
    assert!(victim_pod > 0.0);
    assert!(
        (victim_pod - victim_container).abs() <= 1e-9 * victim_pod + 1e-6,
        "the victim's pod has energy beyond its container: pod {victim_pod}, container {victim_container}"
    );
    // It is billed to where it runs (a top-level directory: `other`).
    assert!(other(&metrics) > 0.5, "{:?}", metrics.samples);

    // The stray pod keeps its energy under its uid, unnamed, and is counted.
    let stray_uid = [("pod_uid", stray.uid.as_str())];
    let stray_series: Vec<_> = metrics
        .select("ergon_pod_energy_joules_total", &stray_uid)
        .collect();
    assert!(!stray_series.is_empty());
    assert!(
        stray_series
            .iter()
            .all(|(labels, _)| labels["pod"].is_empty())
    );
    assert_eq!(metrics.sum("ergon_unknown_pod_cgroups", &[]), 1.0);
    drop(forger);
}
