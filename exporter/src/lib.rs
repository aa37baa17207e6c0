//! Ergon: per-pod, per-container and per-node energy for Kubernetes.
//!
//! Modules follow the data's path: `probe` (what ran where, from eBPF or
//! `/proc`) → `meter` (joules from RAPL, NVML or a model) → `workload` (cgroup
//! → container → pod) → `attribute` (pure arithmetic: joules per workload) →
//! `export` (Prometheus). `config` is read once at start; `interval` is the
//! loop that moves data along that path.

pub mod attribute;
pub mod carbon;
pub mod checkpoint;
pub mod config;
pub mod doctor;
pub mod export;
pub mod interval;
pub mod meter;
pub mod probe;
pub mod units;
pub mod workload;
