//! Who used the CPU: cgroup id → cgroup path → container, pod or system
//! bucket ([`cgroup`], [`resolver`]), and the names Kubernetes gives them
//! ([`kube`], from an API server watch, or [`kubelet`], from the node's
//! kubelet).
//!
//! Identity comes from the cgroup path alone, so energy is attributed to
//! pod uids and container ids even when the Kubernetes API is away; the API
//! only adds namespaces, names, CPU requests and labels.

pub mod cgroup;
pub mod kube;
pub mod kubelet;
pub mod pid_cgroup;
pub mod resolver;

pub use self::cgroup::{KubeletCgroupRoots, QosClass, Runtime, Workload, classify, classify_under};
pub use self::kube::{
    ApiSource, ConnectionState, PodDirectory, PodMeta, PodWatcher, PodWatcherConfig,
};
pub use self::kubelet::{KubeletConfig, KubeletError, KubeletPoller};
pub use self::pid_cgroup::cgroup_id_of_pid;
pub use self::resolver::{CgroupResolver, ResolvedCgroup};
