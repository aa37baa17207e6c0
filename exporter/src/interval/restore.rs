//! The loop's cumulative [`State`] from the checkpoint at start, checked
//! before it is trusted.
//!
//! A restored value is exported as a counter that Prometheus assumes only
//! grows, so nothing impossible gets in: joules finite and non-negative, no
//! workload seen after now (it would never be pruned), CPU time within what
//! the node's CPUs could have run since boot. A checkpoint that fails is set
//! aside by [`Checkpoint::load`] and the counters start from zero.

use crate::checkpoint::Checkpoint;
use crate::units::Nanos;

use super::{Settings, State};

/// The checkpoint (if enabled) and the state to start from.
pub(super) fn restore(settings: &Settings, cpus: u32) -> (Option<Checkpoint>, State) {
    let mut state = State::new(settings.retention);
    let Some(path) = &settings.checkpoint else {
        return (None, state);
    };
    let boot_id = crate::checkpoint::boot_id(&settings.host_proc);
    let mut checkpoint = Checkpoint::new(path.clone(), boot_id);
    let now = Nanos(crate::units::monotonic_ns());
    match checkpoint.load::<State>(|restored| restored.validate(now, cpus)) {
        Ok(Some(restored)) => {
            tracing::info!("counters restored from checkpoint {}", path.display());
            state = restored;
            state.workloads.set_retention(settings.retention);
            state.pods.set_retention(settings.retention);
            state.processes.set_retention(settings.retention);
        }
        Ok(None) => tracing::info!("no checkpoint at {} yet", path.display()),
        Err(e) => tracing::warn!("{e}"),
    }
    (Some(checkpoint), state)
}

impl State {
    /// See the module docs. `now` is `CLOCK_MONOTONIC`, the ledgers' clock.
    /// Public for the checkpoint fuzzer, which loads through it as
    /// `restore` does.
    pub fn validate(&self, now: Nanos, cpus: u32) -> Result<(), String> {
        self.workloads
            .validate(now)
            .map_err(|e| format!("workload counters: {e}"))?;
        self.pods
            .validate(now)
            .map_err(|e| format!("pod counters: {e}"))?;
        self.processes
            .validate(now)
            .map_err(|e| format!("process counters: {e}"))?;
        if let Some((domain, joules)) = self.residual.iter().find(|(_, j)| !j.is_finite()) {
            return Err(format!("the residual of {} is {joules} J", domain.as_str()));
        }
        // Busy and idle time of all CPUs together cannot exceed the time
        // since boot times the CPUs (a few percent of slack for CPUs brought
        // online and offline).
        let possible = u128::from(now.0) * u128::from(cpus.max(1)) * 105 / 100;
        let counted = u128::from(self.busy_ns) + u128::from(self.idle_ns);
        if counted > possible {
            return Err(format!(
                "{} s of CPU time counted, more than {cpus} CPUs ran in {} s since boot",
                counted / 1_000_000_000,
                now.0 / 1_000_000_000
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::Domain;
    use std::time::Duration;

    #[test]
    fn impossible_state_is_refused() {
        let now = Nanos(3_600_000_000_000);
        let fresh = State::new(Duration::from_secs(60));
        assert_eq!(fresh.validate(now, 4), Ok(()));
        let mut busy = State::new(Duration::from_secs(60));
        busy.busy_ns = 3 * 3_600_000_000_000;
        busy.idle_ns = 3_600_000_000_000 / 2;
        assert_eq!(busy.validate(now, 4), Ok(()));
        let err = busy.validate(now, 2).unwrap_err();
        assert!(err.contains("more than 2 CPUs"), "{err}");
        let mut residual = State::new(Duration::from_secs(60));
        residual.residual.insert(Domain::Dram, f64::NAN);
        let err = residual.validate(now, 4).unwrap_err();
        assert!(err.contains("residual of dram"), "{err}");
    }

    #[test]
    fn a_full_node_checkpoint_fits_the_read_bound_and_comes_back() {
        use crate::attribute::{DomainEnergy, SeriesNames, Usage, attribute};
        use crate::units::Joules;
        use crate::workload::{QosClass, Runtime, Workload};
        use std::collections::HashMap;
        // The default map sizes (--max-cgroups 16384, --max-processes
        // 32768), three domains each, the longest names a label keeps.
        let containers: HashMap<Workload, Usage> = (0..16_384u64)
            .map(|i| {
                let workload = Workload::Container {
                    pod_uid: format!("{i:08x}-5d2f-4a6b-9c8d-7e6f5a4b3c2d"),
                    container_id: format!("{i:064x}"),
                    runtime: Runtime::Containerd,
                    qos: QosClass::Burstable,
                };
                (
                    workload,
                    Usage {
                        cpu_ns: 123_456_789_012 + i,
                        cycles: 0,
                    },
                )
            })
            .collect();
        let processes: HashMap<u32, Usage> = (0..32_768u32)
            .map(|pid| {
                (
                    4_000_000 + pid,
                    Usage {
                        cpu_ns: 987_654_321,
                        cycles: 0,
                    },
                )
            })
            .collect();
        let now = Nanos(crate::units::monotonic_ns());
        let mut state = State::new(Duration::from_secs(900));
        for domain in [Domain::Package, Domain::Dram, Domain::Gpu] {
            let energy = DomainEnergy {
                domain,
                source: "rapl".into(),
                energy: Joules(123_456.789_012_345),
                idle: Joules(1_234.567_890_123),
            };
            state
                .workloads
                .apply(&attribute(&energy, &containers, &HashMap::new()), now);
            state
                .processes
                .apply(&attribute(&energy, &processes, &HashMap::new()), now);
        }
        state.workloads.add_usage(&containers, now);
        state.processes.add_usage(&processes, now);
        let long = crate::export::bounded_label(&"x".repeat(253));
        for (_, counters) in state.workloads.workloads_mut() {
            counters.names = Some(SeriesNames {
                namespace: "n".repeat(63),
                pod: long.clone(),
                container: "c".repeat(63),
                sandbox: false,
            });
        }
        for pid in processes.keys() {
            state
                .process_labels
                .insert(*pid, ("c".repeat(16), format!("{pid:064x}")));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::checkpoint::CHECKPOINT_FILE);
        let started = std::time::Instant::now();
        let mut checkpoint = Checkpoint::new(path.clone(), Some("boot".into()));
        assert!(checkpoint.save(&state).unwrap());
        let saved = started.elapsed();
        let bytes = std::fs::metadata(&path).unwrap().len();
        let started = std::time::Instant::now();
        let restored = Checkpoint::new(path, Some("boot".into()))
            .load::<State>(|s| s.validate(now, 2))
            .unwrap()
            .unwrap();
        eprintln!(
            "full-node checkpoint: {bytes} bytes, saved in {saved:?}, loaded and validated in {:?}",
            started.elapsed()
        );
        assert!(
            bytes < crate::checkpoint::MAX_CHECKPOINT_BYTES / 2,
            "a full node's checkpoint of {bytes} bytes is near the read bound"
        );
        assert_eq!(restored.workloads.workloads().count(), 16_384);
        assert_eq!(restored.processes.workloads().count(), 32_768);
    }
}
