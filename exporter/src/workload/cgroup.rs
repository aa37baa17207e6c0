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
//! **Only the kubelet's cgroups are pods.** A pod's cgroup must sit exactly
//! where the kubelet puts it: its `kubepods` anchor directly below one of the
//! kubelet's cgroup roots ([`KubeletCgroupRoots`]: `/` by default, the
//! kubelet's own default; configured with `--kubelet-cgroup-root` for nested
//! setups: kind seen from inside its node, `/kubelet.slice`; a kind or k3d
//! node seen from the host, `/system.slice/docker-*.scope/kubelet.slice` or
//! `/docker/*`), the QoS and pod levels at their fixed depths, the systemd slice
//! names consistent with their parents. Anyone who can make directories (a
//! user's delegated `user@.service` subtree, a container with a writable
//! cgroup namespace) can build `kubepods/burstable/pod<uid>/<id>` somewhere;
//! accepting the anchor at any depth let a tenant bill any pod or hide its
//! use under another's uid. Such a subtree is billed to where it really is
//! (`user.slice`, the unit, `other`). Anything below a real container's
//! cgroup (a container that makes its own sub-cgroups, even ones shaped like
//! pods) is that container's. A path with `..` (a process seen from another
//! cgroup namespace) is never a pod: callers resolve it first
//! ([`super::pid_cgroup`]).
//! The same layout appears in the cgroup v1 `cpuacct` hierarchy, so v1 paths
//! classify the same way.
//!
//! Cgroups that are not pods land in named buckets, never in an "unknown":
//! `kernel` (the root cgroup: kernel threads and anything never moved),
//! `init.scope`, `system.slice/<unit>` (a unit's sub-cgroups collapse into the
//! unit, so per-process scopes do not explode label cardinality),
//! `system.slice/transient` (every transient unit systemd-run or logind makes,
//! `run-*.scope`, `run-u123.service`, `session-*.scope`: each would otherwise
//! be a new series that lives once), `user.slice` (all users together:
//! per-user series would grow without bound on shared nodes), `kubepods`
//! (QoS-level cgroups above any pod, and misshapen names under the kubelet's
//! root), and `other` for everything else.

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

/// Where the kubelet makes its `kubepods` cgroups: cgroup path patterns,
/// relative to the cgroup root, directly under which the anchor must sit.
/// A component may hold one `*` (any run of characters within that
/// component, never across a `/`), for prefixes that carry a container id
/// (`/system.slice/docker-*.scope/kubelet.slice`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeletCgroupRoots {
    roots: Vec<Vec<String>>,
}

impl Default for KubeletCgroupRoots {
    /// The kubelet's default `--cgroup-root=/`: `/kubepods` (cgroupfs
    /// driver) or `/kubepods.slice` (systemd driver).
    fn default() -> Self {
        KubeletCgroupRoots {
            roots: vec![Vec::new()],
        }
    }
}

impl KubeletCgroupRoots {
    /// Parses `--kubelet-cgroup-root` values (absolute cgroup paths, `/` for
    /// the hierarchy's root). An empty list is the default.
    pub fn parse<S: AsRef<str>>(values: &[S]) -> Result<Self, String> {
        let mut roots = Vec::new();
        for value in values.iter().map(AsRef::as_ref).map(str::trim) {
            if value.is_empty() {
                continue;
            }
            let bad = |why: &str| {
                format!(
                    "--kubelet-cgroup-root `{value}`: {why}; give the cgroup path the kubelet's \
                     `kubepods` cgroup sits in, as /proc/<kubelet pid>/cgroup on the host shows \
                     it, e.g. / or /kubelet.slice or /system.slice/docker-*.scope/kubelet.slice"
                )
            };
            if !value.starts_with('/') {
                return Err(bad("not an absolute cgroup path"));
            }
            let components: Vec<String> = value
                .split('/')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect();
            if components.iter().any(|c| c == "." || c == "..") {
                return Err(bad("`.` and `..` are not allowed"));
            }
            if components.iter().any(|c| c.matches('*').count() > 1) {
                return Err(bad("at most one `*` per path component"));
            }
            roots.push(components);
        }
        if roots.is_empty() {
            return Ok(Self::default());
        }
        Ok(KubeletCgroupRoots { roots })
    }

    /// The roots as given (`/`, `/kubelet.slice`, ...), for logs and doctor.
    pub fn describe(&self) -> String {
        self.roots
            .iter()
            .map(|root| format!("/{}", root.join("/")))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// For each root that is a prefix of `components`: the components below
    /// it, and the root's last component (for systemd's
    /// `<parent>-kubepods.slice`).
    fn strip<'a, 'b>(
        &self,
        components: &'a [&'b str],
    ) -> impl Iterator<Item = (&'a [&'b str], Option<&'b str>)> {
        self.roots.iter().filter_map(move |root| {
            let matched = root.len() <= components.len()
                && root
                    .iter()
                    .zip(components)
                    .all(|(pattern, component)| component_matches(pattern, component));
            matched.then(|| {
                let parent = root.len().checked_sub(1).map(|last| components[last]);
                (&components[root.len()..], parent)
            })
        })
    }
}

fn component_matches(pattern: &str, component: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == component,
        Some((head, tail)) => {
            component.len() >= head.len() + tail.len()
                && component.starts_with(head)
                && component.ends_with(tail)
        }
    }
}

/// Classifies a cgroup path relative to the cgroup root (`/a/b`, `a/b` and
/// `/` all work) with the kubelet at its default root. Never fails: what is
/// no pod gets a named bucket.
pub fn classify(cgroup_path: &str) -> Workload {
    classify_under(cgroup_path, &KubeletCgroupRoots::default())
}

/// [`classify`] with the kubelet's cgroup roots given.
pub fn classify_under(cgroup_path: &str, kubelet_roots: &KubeletCgroupRoots) -> Workload {
    let components: Vec<&str> = cgroup_path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if components.contains(&"..") {
        // Relative to another cgroup namespace: where it lands is unknown
        // here, so it is nobody's pod.
        return Workload::system("other");
    }
    kubelet_roots
        .strip(&components)
        .find_map(|(below_root, parent)| classify_kubelet_layout(below_root, parent))
        .unwrap_or_else(|| classify_system(&components))
}

/// The kubelet's layout below its cgroup root, starting at the `kubepods`
/// anchor; `None` if there is no anchor here. Under the anchor only the exact
/// depths and names the kubelet writes make a pod; anything else there is
/// the `kubepods` bucket.
fn classify_kubelet_layout(below_root: &[&str], root_name: Option<&str>) -> Option<Workload> {
    let (&anchor, rest) = below_root.split_first()?;
    let found = if anchor == "kubepods" {
        cgroupfs_pod(rest)
    } else {
        // systemd: `kubepods.slice`, or `<parent>-kubepods.slice` below a
        // parent slice `<parent>.slice` (kind: kubelet.slice/kubelet-kubepods.slice).
        let stem = anchor.strip_suffix(".slice")?;
        let parent_stem = root_name.and_then(|name| name.strip_suffix(".slice"));
        let expected = parent_stem.map_or("kubepods".to_owned(), |p| format!("{p}-kubepods"));
        if stem != "kubepods" && stem != expected {
            return None;
        }
        systemd_pod(stem, rest)
    };
    let Some((pod_at, pod_uid, qos)) = found else {
        return Some(Workload::system("kubepods"));
    };
    let child = rest
        .get(pod_at + 1)
        .and_then(|c| parse_container_component(c));
    Some(match child {
        Some((container_id, runtime)) => Workload::Container {
            pod_uid,
            container_id,
            runtime,
            qos,
        },
        None => Workload::Pod { pod_uid, qos },
    })
}

/// cgroupfs: `pod<uid>` (Guaranteed) or `<qos>/pod<uid>`, right below
/// `kubepods`. Returns the pod's index in `below_anchor`.
fn cgroupfs_pod(below_anchor: &[&str]) -> Option<(usize, String, QosClass)> {
    let pod = |component: &str| normalize_pod_uid(component.strip_prefix("pod")?);
    match below_anchor {
        ["besteffort", pod_dir, ..] => Some((1, pod(pod_dir)?, QosClass::BestEffort)),
        ["burstable", pod_dir, ..] => Some((1, pod(pod_dir)?, QosClass::Burstable)),
        [pod_dir, ..] => Some((0, pod(pod_dir)?, QosClass::Guaranteed)),
        [] => None,
    }
}

/// systemd: `<stem>-pod<uid>.slice` (Guaranteed) or
/// `<stem>-<qos>.slice/<stem>-<qos>-pod<uid>.slice`, right below the anchor
/// slice `<stem>.slice`; systemd slice names spell out their parents.
fn systemd_pod(stem: &str, below_anchor: &[&str]) -> Option<(usize, String, QosClass)> {
    let pod = |component: &str, slice: &str| {
        let uid = component
            .strip_suffix(".slice")?
            .strip_prefix(slice)?
            .strip_prefix("-pod")?;
        normalize_pod_uid(uid)
    };
    let first = *below_anchor.first()?;
    for (qos, name) in [
        (QosClass::BestEffort, "besteffort"),
        (QosClass::Burstable, "burstable"),
    ] {
        let qos_slice = format!("{stem}-{name}");
        if first == format!("{qos_slice}.slice") {
            return Some((1, pod(below_anchor.get(1)?, &qos_slice)?, qos));
        }
    }
    Some((0, pod(first, stem)?, QosClass::Guaranteed))
}

fn classify_system(components: &[&str]) -> Workload {
    match components {
        [] => Workload::system("kernel"),
        ["init.scope", ..] => Workload::system("init.scope"),
        ["system.slice"] => Workload::system("system.slice"),
        ["system.slice", unit, ..] if is_transient_unit(unit) => {
            Workload::system("system.slice/transient")
        }
        ["system.slice", unit, ..] => Workload::system(&format!("system.slice/{unit}")),
        ["user.slice", ..] => Workload::system("user.slice"),
        _ => Workload::system("other"),
    }
}

/// Units made on the fly, one per command or login, whose names never
/// repeat: `systemd-run` (`run-u123.service`, `run-r<hex>.scope`,
/// `run-p<pid>-i<n>.scope`) and logind (`session-3.scope`).
fn is_transient_unit(unit: &str) -> bool {
    let Some((name, kind)) = unit.rsplit_once('.') else {
        return false;
    };
    matches!(kind, "scope" | "service" | "timer" | "socket")
        && (name.starts_with("run-") || name.starts_with("session-"))
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

    fn roots(list: &[&str]) -> KubeletCgroupRoots {
        KubeletCgroupRoots::parse(list).unwrap()
    }

    /// Every genuine layout the kubelet makes at the root `prefix`, for both
    /// drivers and every runtime, with what it must classify as.
    fn genuine_layouts(prefix: &str, systemd_parent: &str) -> Vec<(String, Workload)> {
        let mut layouts = Vec::new();
        for (qos_dir, qos) in [
            ("besteffort/", QosClass::BestEffort),
            ("burstable/", QosClass::Burstable),
            ("", QosClass::Guaranteed),
        ] {
            for (name, runtime) in [
                (ID.to_owned(), Runtime::Unidentified),
                (format!("crio-{ID}"), Runtime::CriO),
            ] {
                layouts.push((
                    format!("{prefix}/kubepods/{qos_dir}pod{UID}/{name}"),
                    container(runtime, qos),
                ));
            }
        }
        let anchor = format!("{systemd_parent}kubepods");
        for (qos_slice, qos) in [
            (Some("besteffort"), QosClass::BestEffort),
            (Some("burstable"), QosClass::Burstable),
            (None, QosClass::Guaranteed),
        ] {
            let pod_slice = match qos_slice {
                Some(q) => format!("{anchor}-{q}.slice/{anchor}-{q}-pod{UID_SYSTEMD}.slice"),
                None => format!("{anchor}-pod{UID_SYSTEMD}.slice"),
            };
            for (scope, runtime) in [
                ("cri-containerd", Runtime::Containerd),
                ("crio", Runtime::CriO),
                ("docker", Runtime::Docker),
                ("libpod", Runtime::Podman),
            ] {
                layouts.push((
                    format!("{prefix}/{anchor}.slice/{pod_slice}/{scope}-{ID}.scope"),
                    container(runtime, qos),
                ));
            }
        }
        layouts
    }

    #[test]
    fn only_the_kubelets_root_makes_pods() {
        let host = KubeletCgroupRoots::default();
        for (path, expected) in genuine_layouts("", "") {
            assert_eq!(classify_under(&path, &host), expected, "{path}");
        }
        // The same layouts built inside a user's delegated subtree, a login
        // session, a system unit or a top-level directory: billed to where
        // they really are, never to the pod uid they name.
        for (forger, bucket_name) in [
            (
                "/user.slice/user-4242.slice/user@4242.service/app.slice",
                "user.slice",
            ),
            ("/user.slice/user-1000.slice/session-3.scope", "user.slice"),
            ("/system.slice/evil.service", "system.slice/evil.service"),
            ("/k3s", "other"),
            ("/machine.slice/vm.scope", "other"),
        ] {
            for (path, _) in genuine_layouts(forger, "") {
                assert_eq!(classify_under(&path, &host), bucket(bucket_name), "{path}");
            }
        }
    }

    #[test]
    fn the_kubelets_layout_is_exact_below_its_root() {
        let host = KubeletCgroupRoots::default();
        for misplaced in [
            // An extra level between the QoS and the pod.
            format!("/kubepods/burstable/extra/pod{UID}/{ID}"),
            format!("/kubepods/extra/pod{UID}/{ID}"),
            // A systemd slice that does not name its parent.
            format!(
                "/kubepods.slice/kubepods-burstable.slice/other-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
            ),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
            ),
            format!(
                "/kubepods.slice/evil.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
            ),
        ] {
            assert_eq!(
                classify_under(&misplaced, &host),
                bucket("kubepods"),
                "{misplaced}"
            );
        }
        // A slice whose name only contains `kubepods` is no anchor.
        assert_eq!(
            classify_under(
                &format!(
                    "/evil-kubepods.slice/evil-kubepods-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
                ),
                &host
            ),
            bucket("other")
        );
        // A pod-shaped tree inside a real container (its own cgroup
        // namespace, delegated) is that container's.
        let other_uid = "99999999-8888-4777-8666-555555555555";
        let other_id = "f".repeat(64);
        assert_eq!(
            classify_under(
                &format!(
                    "/kubepods/burstable/pod{UID}/{ID}/kubepods/burstable/pod{other_uid}/{other_id}"
                ),
                &host
            ),
            container(Runtime::Unidentified, QosClass::Burstable)
        );
    }

    #[test]
    fn nested_kubelets_count_only_where_configured() {
        // kind seen from inside the node: the kubelet's --cgroup-root=/kubelet.
        let kind = roots(&["/kubelet.slice"]);
        for (path, expected) in genuine_layouts("/kubelet.slice", "kubelet-") {
            assert_eq!(classify_under(&path, &kind), expected, "{path}");
            assert_eq!(classify(&path), bucket("other"), "unconfigured: {path}");
        }
        // kind or k3d seen from the host: the node container's id varies.
        let from_host = roots(&["/system.slice/docker-*.scope/kubelet.slice", "/docker/*"]);
        let node = "/system.slice/docker-0123456789ab.scope/kubelet.slice";
        for (path, expected) in genuine_layouts(node, "kubelet-") {
            assert_eq!(classify_under(&path, &from_host), expected, "{path}");
            assert_eq!(
                classify(&path),
                bucket("system.slice/docker-0123456789ab.scope"),
                "unconfigured: {path}"
            );
        }
        for (path, expected) in genuine_layouts("/docker/0123456789ab", "") {
            assert_eq!(classify_under(&path, &from_host), expected, "{path}");
        }
        // The pattern is one component: it does not reach into user.slice.
        let forged = format!(
            "/system.slice/docker-x.scope/evil/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            classify_under(&forged, &from_host),
            bucket("system.slice/docker-x.scope")
        );
        // Configured roots replace the default; list both to keep it.
        assert_eq!(
            classify_under(&format!("/kubepods/pod{UID}/{ID}"), &kind),
            bucket("other")
        );
        let both = roots(&["/", "/kubelet.slice"]);
        assert_eq!(
            classify_under(&format!("/kubepods/pod{UID}/{ID}"), &both),
            container(Runtime::Unidentified, QosClass::Guaranteed)
        );
        // A path from another cgroup namespace is resolved by the caller,
        // never guessed at here.
        assert_eq!(
            classify(&format!("/../../kubepods/pod{UID}/{ID}")),
            bucket("other")
        );
    }

    #[test]
    fn kubelet_root_flag_is_checked() {
        assert_eq!(roots(&[]), KubeletCgroupRoots::default());
        assert_eq!(roots(&["/"]), KubeletCgroupRoots::default());
        assert_eq!(
            roots(&["/kubelet.slice", "/docker/*"]).describe(),
            "/kubelet.slice,/docker/*"
        );
        for bad in ["kubelet.slice", "/a/../b", "/a/**"] {
            let error = KubeletCgroupRoots::parse(&[bad]).unwrap_err();
            assert!(
                error.contains("--kubelet-cgroup-root") && error.contains(bad),
                "{error}"
            );
        }
    }

    #[test]
    fn transient_units_fold_into_one_bucket_per_slice() {
        for unit in [
            "run-u123.service",
            "run-r0a1b2c3d4e5f60718293a4b5c6d7e8f9.scope",
            "run-p4242-i4243.scope",
            "session-17.scope",
            "run-docker-runtime\\x2drunc-moby-abc.mount.scope",
        ] {
            assert_eq!(
                classify(&format!("/system.slice/{unit}")),
                bucket("system.slice/transient"),
                "{unit}"
            );
            assert_eq!(
                classify(&format!("/system.slice/{unit}/sub")),
                bucket("system.slice/transient"),
                "{unit}"
            );
        }
        // Sessions and user units stay in the one user bucket.
        assert_eq!(
            classify("/user.slice/user-1000.slice/session-3.scope"),
            bucket("user.slice")
        );
        // Named services keep their own series.
        for unit in ["runner.service", "sessiond.service", "containerd.service"] {
            assert_eq!(
                classify(&format!("/system.slice/{unit}")),
                bucket(&format!("system.slice/{unit}"))
            );
        }
        // 10,000 transient units make one series.
        let buckets: std::collections::HashSet<Workload> = (0..10_000)
            .map(|i| classify(&format!("/system.slice/run-u{i}.service")))
            .collect();
        assert_eq!(buckets.len(), 1);
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
