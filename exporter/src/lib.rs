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

/// A file an operator names (the configuration, the model coefficients, the
/// carbon intensity), read whole if it holds at most `max` bytes; `Ok(None)`
/// if it holds more (a wrong path, a device, a file that grows), so reading
/// it never costs an unbounded allocation. Each caller says what its file
/// should hold.
pub fn read_at_most(path: &std::path::Path, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= max).then_some(bytes))
}
