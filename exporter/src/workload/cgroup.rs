//! Cgroup path → workload identity, from the path alone.
//!
//! The kubelet names cgroups predictably, and that is all this module relies
//! on: no runtime socket, no API call. Two drivers name them differently:
//!
//! - **cgroupfs**: `kubepods/<qos>/pod<uid>/<container id>`; Guaranteed pods sit
//!   directly under `kubepods/pod<uid>`. Bare container ids do not say which
//!   runtime made them (containerd and Docker both use a bare id); CRI-O adds
//!   `crio-`.
//! - **systemd**: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/<runtime>-<id>.scope`.
//!   A `-` in a slice name means "child of", so the kubelet writes the uid's
//!   dashes as underscores; we turn them back so the uid matches the API's.
//!   The runtime is named by the scope prefix: `cri-containerd-`, `crio-`,
//!   `docker-`, `libpod-` (Podman). `crio-conmon-`/`libpod-conmon-` scopes hold
//!   the runtime's monitor process, which serves the whole pod, so their time
//!   belongs to the pod.
//!
//! Anything may come before the `kubepods` anchor: a nested cgroup namespace
//! (kind: `kubelet.slice/kubelet-kubepods.slice/...`, k3s in a container:
//! `<prefix>/kubepods/...`), so the pod is found by searching for the anchor
//! rather than matching from the root. Anything below the container's cgroup
//! (a container that makes its own sub-cgroups) is that container's.
//! The same layout appears in the cgroup v1 `cpuacct` hierarchy, so v1 paths
//! classify the same way.
//!
//! Cgroups that are not pods land in named buckets, never in an "unknown":
//! `kernel` (the root cgroup: kernel threads and anything never moved),
//! `init.scope`, `system.slice/<unit>` (a unit's sub-cgroups collapse into the
//! unit, so per-process scopes do not explode label cardinality),
//! `user.slice` (all users together: per-user series would grow without bound
//! on shared nodes), `kubepods` (QoS-level cgroups above any pod), and
//! `other` for everything else.

use std::borrow::Cow;

/// Longest bucket name, in bytes, before it is shortened with a marker.
pub const MAX_BUCKET_BYTES: usize = 64;

/// Which container runtime created a container's cgroup, as its name says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    Podman,
    /// A bare container id (cgroupfs driver with containerd or Docker): the
    /// path does not name the runtime.
    Unidentified,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
            Runtime::Unidentified => "unidentified",
        }
    }
}

/// The pod's Kubernetes QoS class, from the cgroup it was placed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub fn as_str(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "guaranteed",
            QosClass::Burstable => "burstable",
            QosClass::BestEffort => "besteffort",
        }
    }
}

/// Who a cgroup's CPU time belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// A container of a pod. `pod_uid` uses dashes, as the API writes it;
    /// `container_id` is the bare id, lower case, without a runtime scheme.
    Container {
        pod_uid: String,
        container_id: String,
        runtime: Runtime,
        qos: QosClass,
    },
    /// The pod-level cgroup itself, or a sub-cgroup of the pod that is no
    /// container (the runtime's `conmon` monitor).
    Pod { pod_uid: String, qos: QosClass },
    /// Not a pod: a named bucket (see the module docs), at most
    /// [`MAX_BUCKET_BYTES`] long.
    System { bucket: String },
}

impl Workload {
    /// The pod this workload belongs to, if any.
    pub fn pod_uid(&self) -> Option<&str> {
        match self {
            Workload::Container { pod_uid, .. } | Workload::Pod { pod_uid, .. } => Some(pod_uid),
            Workload::System { .. } => None,
        }
    }

    fn system(bucket: &str) -> Workload {
        Workload::System {
            bucket: bounded_label(bucket, MAX_BUCKET_BYTES).into_owned(),
        }
    }
}

/// Classifies a cgroup path relative to the cgroup root (`/a/b`, `a/b` and
/// `/` all work). Never fails: what is no pod gets a named bucket.
pub fn classify(cgroup_path: &str) -> Workload {
    let components: Vec<&str> = cgroup_path
        .split('/')
        .filter(|c| !c.is_empty() && *c != "." && *c != "..")
        .collect();
    classify_pod(&components).unwrap_or_else(|| classify_system(&components))
}

fn classify_pod(components: &[&str]) -> Option<Workload> {
    let anchor = components.iter().position(|c| is_kubepods_component(c))?;
    for i in anchor + 1..components.len() {
        let Some((pod_uid, qos)) = parse_pod_component(components[i], components[i - 1]) else {
            continue;
        };
        let child = components
            .get(i + 1)
            .and_then(|c| parse_container_component(c));
        return Some(match child {
            Some((container_id, runtime)) => Workload::Container {
                pod_uid,
                container_id,
                runtime,
                qos,
            },
            None => Workload::Pod { pod_uid, qos },
        });
    }
    None
}

fn classify_system(components: &[&str]) -> Workload {
    match components {
        [] => Workload::system("kernel"),
        ["init.scope", ..] => Workload::system("init.scope"),
        ["system.slice"] => Workload::system("system.slice"),
        ["system.slice", unit, ..] => Workload::system(&format!("system.slice/{unit}")),
        ["user.slice", ..] => Workload::system("user.slice"),
        _ if components.iter().any(|c| is_kubepods_component(c)) => Workload::system("kubepods"),
        _ => Workload::system("other"),
    }
}

/// `kubepods` (cgroupfs) or any slice whose name contains it
/// (`kubepods.slice`, `kubepods-burstable.slice`, kind's `kubelet-kubepods.slice`).
fn is_kubepods_component(component: &str) -> bool {
    component == "kubepods" || (component.ends_with(".slice") && component.contains("kubepods"))
}

/// A pod cgroup: `pod<uid>` (cgroupfs, QoS from the parent directory) or
/// `<...kubepods...>[-<qos>]-pod<uid_with_underscores>.slice` (systemd).
fn parse_pod_component(component: &str, parent: &str) -> Option<(String, QosClass)> {
    if let Some(slice) = component.strip_suffix(".slice") {
        let at = slice.rfind("-pod")?;
        let prefix = &slice[..at];
        if !prefix.contains("kubepods") {
            return None;
        }
        let qos = if prefix.ends_with("-besteffort") {
            QosClass::BestEffort
        } else if prefix.ends_with("-burstable") {
            QosClass::Burstable
        } else {
            QosClass::Guaranteed
        };
        return Some((normalize_pod_uid(&slice[at + 4..])?, qos));
    }
    let uid = normalize_pod_uid(component.strip_prefix("pod")?)?;
    let qos = match parent {
        "besteffort" => QosClass::BestEffort,
        "burstable" => QosClass::Burstable,
        _ => QosClass::Guaranteed,
    };
    Some((uid, qos))
}

/// Pod uids are UUIDs, or for static pods the 32-hex-digit config hash: 32
/// hex digits in either case, separated by `-` (or `_` under systemd).
fn normalize_pod_uid(raw: &str) -> Option<String> {
    let hex_digits = raw.bytes().filter(u8::is_ascii_hexdigit).count();
    let only_uid_chars = raw
        .bytes()
        .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_');
    (hex_digits == 32 && only_uid_chars).then(|| raw.replace('_', "-").to_ascii_lowercase())
}

/// The cgroup right below a pod's: a container (`Some`), or something of the
/// pod's own (`None`: conmon, or a name we do not recognise, whose time then
/// stays with the pod rather than being guessed at).
fn parse_container_component(component: &str) -> Option<(String, Runtime)> {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    if name.starts_with("crio-conmon-") || name.starts_with("libpod-conmon-") {
        return None;
    }
    const PREFIXES: [(&str, Runtime); 4] = [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("docker-", Runtime::Docker),
        ("libpod-", Runtime::Podman),
    ];
    let (id, runtime) = PREFIXES
        .iter()
        .find_map(|(prefix, runtime)| Some((name.strip_prefix(prefix)?, *runtime)))
        .unwrap_or((name, Runtime::Unidentified));
    is_container_id(id).then(|| (id.to_ascii_lowercase(), runtime))
}

/// Runtimes use 64 hex digits; accept shorter (but not trivially short) ids.
fn is_container_id(id: &str) -> bool {
    id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `value` if it fits in `max_bytes`; else its head and a `~` marker with a
/// hash of the whole value, `max_bytes` long in all, so two long values that
/// share a head still get distinct labels.
pub fn bounded_label(value: &str, max_bytes: usize) -> Cow<'_, str> {
    if value.len() <= max_bytes {
        return Cow::Borrowed(value);
    }
    let marker = format!("~{:08x}", fnv1a_32(value.as_bytes()));
    let mut cut = max_bytes.saturating_sub(marker.len());
    while !value.is_char_boundary(cut) {
        cut -= 1;
    }
    Cow::Owned(format!("{}{marker}", &value[..cut]))
}

/// FNV-1a: a stable hash (unlike std's, which is seeded per process), so a
/// shortened label is the same after a restart.
fn fnv1a_32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1e4b8a3c-5d2f-4a6b-9c8d-7e6f5a4b3c2d";
    const UID_SYSTEMD: &str = "1e4b8a3c_5d2f_4a6b_9c8d_7e6f5a4b3c2d";
    const ID: &str = "3f2a9c1b7e6d5c4b3a29180716f5e4d3c2b1a09f8e7d6c5b4a3928170615f4e3";

    fn container(runtime: Runtime, qos: QosClass) -> Workload {
        Workload::Container {
            pod_uid: UID.into(),
            container_id: ID.into(),
            runtime,
            qos,
        }
    }

    fn bucket(name: &str) -> Workload {
        Workload::System {
            bucket: name.into(),
        }
    }

    #[test]
    fn cgroupfs_driver_by_qos() {
        assert_eq!(
            classify(&format!("/kubepods/burstable/pod{UID}/{ID}")),
            container(Runtime::Unidentified, QosClass::Burstable)
        );
        assert_eq!(
            classify(&format!("kubepods/besteffort/pod{UID}/{ID}")),
            container(Runtime::Unidentified, QosClass::BestEffort)
        );
        // Guaranteed pods sit directly under kubepods.
        assert_eq!(
            classify(&format!("/kubepods/pod{UID}/{ID}")),
            container(Runtime::Unidentified, QosClass::Guaranteed)
        );
        assert_eq!(
            classify(&format!("/kubepods/pod{UID}")),
            Workload::Pod {
                pod_uid: UID.into(),
                qos: QosClass::Guaranteed
            }
        );
        // CRI-O under cgroupfs keeps its prefix, without `.scope`.
        assert_eq!(
            classify(&format!("/kubepods/burstable/pod{UID}/crio-{ID}")),
            container(Runtime::CriO, QosClass::Burstable)
        );
    }

    #[test]
    fn systemd_driver_each_runtime() {
        let pod = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice"
        );
        for (scope, runtime) in [
            ("cri-containerd", Runtime::Containerd),
            ("crio", Runtime::CriO),
            ("docker", Runtime::Docker),
            ("libpod", Runtime::Podman),
        ] {
            assert_eq!(
                classify(&format!("{pod}/{scope}-{ID}.scope")),
                container(runtime, QosClass::Burstable),
                "{scope}"
            );
        }
        assert_eq!(
            classify(&format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
            )),
            container(Runtime::Containerd, QosClass::BestEffort)
        );
        assert_eq!(
            classify(&format!(
                "/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
            )),
            container(Runtime::Containerd, QosClass::Guaranteed)
        );
    }

    #[test]
    fn conmon_and_unrecognised_children_belong_to_the_pod() {
        let pod = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice"
        );
        let expected = Workload::Pod {
            pod_uid: UID.into(),
            qos: QosClass::Burstable,
        };
        assert_eq!(classify(&pod), expected);
        assert_eq!(classify(&format!("{pod}/crio-conmon-{ID}.scope")), expected);
        assert_eq!(
            classify(&format!("{pod}/libpod-conmon-{ID}.scope")),
            expected
        );
        assert_eq!(classify(&format!("{pod}/something-else.scope")), expected);
        assert_eq!(
            classify(&format!("{pod}/cri-containerd-not-an-id.scope")),
            expected
        );
    }

    #[test]
    fn sub_cgroups_of_a_container_are_the_container() {
        assert_eq!(
            classify(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope/init.scope/worker"
            )),
            container(Runtime::Containerd, QosClass::Burstable)
        );
    }

    #[test]
    fn prefixes_before_kubepods_k3s_kind_and_nested_namespaces() {
        // k3s (cgroupfs) under its own prefix, e.g. running inside a container.
        assert_eq!(
            classify(&format!("/k3s/kubepods/burstable/pod{UID}/{ID}")),
            container(Runtime::Unidentified, QosClass::Burstable)
        );
        // kind / nested systemd: the kubelet's slices carry a prefix.
        assert_eq!(
            classify(&format!(
                "/system.slice/docker-0123456789ab.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
            )),
            container(Runtime::Containerd, QosClass::BestEffort)
        );
        // A nested namespace seen from outside may carry `..`.
        assert_eq!(
            classify(&format!("/../../kubepods/pod{UID}/{ID}")),
            container(Runtime::Unidentified, QosClass::Guaranteed)
        );
    }

    #[test]
    fn static_pod_uid_is_a_hash_without_dashes() {
        let hash = "5a4c7d8d1b3e2f60718293a4b5c6d7e8";
        assert_eq!(
            classify(&format!("/kubepods/burstable/pod{hash}/{ID}")),
            Workload::Container {
                pod_uid: hash.into(),
                container_id: ID.into(),
                runtime: Runtime::Unidentified,
                qos: QosClass::Burstable
            }
        );
    }

    #[test]
    fn uids_and_ids_are_lower_case() {
        let upper = UID.to_ascii_uppercase();
        let w = classify(&format!("/kubepods/pod{upper}/{}", ID.to_ascii_uppercase()));
        assert_eq!(w, container(Runtime::Unidentified, QosClass::Guaranteed));
    }

    #[test]
    fn non_pod_buckets() {
        assert_eq!(classify("/"), bucket("kernel"));
        assert_eq!(classify(""), bucket("kernel"));
        assert_eq!(classify("/init.scope"), bucket("init.scope"));
        assert_eq!(classify("/system.slice"), bucket("system.slice"));
        assert_eq!(
            classify("/system.slice/containerd.service"),
            bucket("system.slice/containerd.service")
        );
        // Nested units collapse into the top unit.
        assert_eq!(
            classify("/system.slice/k3s.service/shim-1234"),
            bucket("system.slice/k3s.service")
        );
        assert_eq!(
            classify("/user.slice/user-1000.slice/session-3.scope"),
            bucket("user.slice")
        );
        assert_eq!(classify("/user.slice"), bucket("user.slice"));
        assert_eq!(
            classify("/kubepods.slice/kubepods-burstable.slice"),
            bucket("kubepods")
        );
        assert_eq!(classify("/kubepods/besteffort"), bucket("kubepods"));
        assert_eq!(classify("/machine.slice/vm.scope"), bucket("other"));
        assert_eq!(
            classify("/process_api/2a82b06fe84d93f41181766b7d5995ab"),
            bucket("other")
        );
        // A `pod`-looking name outside kubepods is no pod.
        assert_eq!(classify(&format!("/pod{UID}/{ID}")), bucket("other"));
        // A malformed uid under kubepods stays in the kubepods bucket.
        assert_eq!(
            classify("/kubepods/burstable/podnot-a-uid/abc"),
            bucket("kubepods")
        );
    }

    #[test]
    fn long_bucket_names_are_bounded_and_stay_distinct() {
        let a = format!("/system.slice/docker-{ID}.scope");
        let b = format!("/system.slice/docker-{}.scope", ID.replace('3', "4"));
        let (Workload::System { bucket: ba }, Workload::System { bucket: bb }) =
            (classify(&a), classify(&b))
        else {
            panic!("expected system buckets");
        };
        assert_eq!(ba.len(), MAX_BUCKET_BYTES);
        assert_eq!(bb.len(), MAX_BUCKET_BYTES);
        assert!(ba.starts_with("system.slice/docker-3f2a9c1b"), "{ba}");
        assert!(ba.contains('~'), "{ba}");
        assert_ne!(ba, bb);
        // Stable across calls (and processes: FNV is unseeded).
        assert_eq!(classify(&a), classify(&a));
    }

    #[test]
    fn bounded_label_respects_utf8_boundaries() {
        let value = "é".repeat(40); // 80 bytes
        let bounded = bounded_label(&value, 20);
        assert!(bounded.len() <= 20, "{bounded}");
        assert!(bounded.starts_with('é'));
        assert_eq!(bounded_label("short", 20), "short");
    }
}
