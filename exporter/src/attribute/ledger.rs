//! Cumulative counters per workload and for the node: what `/metrics`
//! exports as `_total` counters and what the checkpoint saves.
//!
//! Counters only grow: each interval adds non-negative, finite amounts (f64
//! addition of a non-negative number never makes a sum smaller), and CPU
//! counters saturate instead of wrapping. A workload's counters outlive its
//! cgroup for `retention` (default 15 min, like Kepler's) after it was last
//! seen, so Prometheus scrapes its final value; then it is dropped, which
//! Prometheus sees as the series ending, not as a reset.
//!
//! Time is the caller's monotonic clock in nanoseconds (`CLOCK_BOOTTIME`
//! suits: it survives an exporter restart within the same boot, which is
//! when a checkpoint is restored). Workloads are serialised as a list of
//! `(key, counters)` pairs, because formats such as JSON only take string
//! map keys and `K` is usually a structured workload identity.
//!
//! Each workload's counters carry the names its series were last labelled
//! with ([`SeriesNames`]), kept, pruned and checkpointed with the counters
//! they label: the Kubernetes API forgets a deleted pod, and a restarted
//! exporter never knew it, yet its retained counters must keep their
//! `namespace`, `pod` and `container` labels or per-namespace sums lose them.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Attribution, SharedSplit, Usage, WorkloadJoules};
use crate::units::{Domain, Joules, Nanos};

/// Default time a workload's counters are kept after it was last seen.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(15 * 60);

/// One workload's counters since it was first seen.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadCounters {
    /// Per domain, summed over the domain's meter sources.
    pub energy: BTreeMap<Domain, WorkloadJoules>,
    pub cpu_ns: u64,
    pub cycles: u64,
    /// When it last used the CPU, received energy or was marked seen.
    pub last_seen: Nanos,
    /// The names its series were last labelled with, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<SeriesNames>,
}

/// The Kubernetes names of a workload's series (empty where not applicable,
/// e.g. `container` of a pod's total).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeriesNames {
    pub namespace: String,
    pub pod: String,
    #[serde(default)]
    pub container: String,
    /// The pod's sandbox (pause) container: its cgroup is a container's,
    /// but the pod's metadata never names it. Its energy shows in the pod's
    /// series only, not as a `container=""` series of its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sandbox: bool,
}

/// One meter source's node-level counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeCounters {
    /// All active energy measured (attributed or not).
    pub active: Joules,
    /// All idle energy measured (shared out or not).
    pub idle: Joules,
    /// Idle energy that stayed on the node (idle policy `none`, or no pods).
    pub idle_kept: Joules,
    /// Active energy of intervals in which nothing ran.
    pub active_unattributed: Joules,
}

/// Cumulative counters per workload `K` and per node meter source.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(bound(
    serialize = "K: Serialize",
    deserialize = "K: Deserialize<'de> + Eq + Hash"
))]
pub struct Ledger<K> {
    #[serde(with = "as_entries")]
    workloads: HashMap<K, WorkloadCounters, KeyHasher>,
    #[serde(with = "as_entries")]
    node: HashMap<(Domain, String), NodeCounters, KeyHasher>,
    /// Configuration, not state: set again after restoring a checkpoint.
    #[serde(skip, default = "default_retention")]
    retention: Duration,
}

/// The ledger's maps hash with foldhash (hashbrown's default hasher, seeded
/// per process) instead of std's SipHash: every interval looks up each
/// workload's counters several times (usage, every domain's energy,
/// liveness), and SipHash over a container's identity (pod uid and 64-hex
/// container id) was half the instructions of an interval with 5,000
/// processes (callgrind, BENCHMARKS.md). The keys are cgroup identities and
/// pids, which only root on the node chooses; the random seed keeps their
/// order unpredictable as std's does.
type KeyHasher = foldhash::fast::RandomState;

fn default_retention() -> Duration {
    DEFAULT_RETENTION
}

impl<K: Eq + Hash + Clone> Default for Ledger<K> {
    fn default() -> Self {
        Ledger::new(DEFAULT_RETENTION)
    }
}

impl<K: Eq + Hash + Clone> Ledger<K> {
    pub fn new(retention: Duration) -> Self {
        Ledger {
            workloads: HashMap::default(),
            node: HashMap::default(),
            retention,
        }
    }

    pub fn retention(&self) -> Duration {
        self.retention
    }

    pub fn set_retention(&mut self, retention: Duration) {
        self.retention = retention;
    }

    /// Adds one interval's split to the counters; workloads that received
    /// energy count as seen at `now`.
    pub fn apply(&mut self, attribution: &Attribution<K>, now: Nanos) {
        for (key, joules) in &attribution.per_workload {
            self.update(key, now, |counters| {
                let domain = counters.energy.entry(attribution.domain).or_default();
                add(&mut domain.active, joules.active);
                add(&mut domain.idle, joules.idle);
            });
        }
        self.add_node(attribution);
    }

    /// Adds several domains split by the same shares: the same counters as
    /// [`Ledger::apply`] of each domain's split, each key visited once.
    pub fn apply_shared(&mut self, split: &SharedSplit<'_, K>, now: Nanos) {
        for (key, domains) in split.per_key() {
            self.update(key, now, |counters| {
                for (domain, joules) in domains {
                    add(
                        &mut counters.energy.entry(domain).or_default().active,
                        joules,
                    );
                }
            });
        }
        for attribution in split.domains() {
            self.add_node(attribution);
        }
    }

    fn add_node(&mut self, attribution: &Attribution<K>) {
        let node = self
            .node
            .entry((attribution.domain, attribution.source.clone()))
            .or_default();
        add(&mut node.active, attribution.active());
        add(&mut node.idle, attribution.idle);
        add(&mut node.idle_kept, attribution.node_idle);
        add(
            &mut node.active_unattributed,
            attribution.node_active_unattributed,
        );
    }

    /// Adds one interval's CPU usage; workloads in `usage` count as seen.
    pub fn add_usage(&mut self, usage: &HashMap<K, Usage>, now: Nanos) {
        for (key, used) in usage {
            self.update(key, now, |counters| {
                counters.cpu_ns = counters.cpu_ns.saturating_add(used.cpu_ns);
                counters.cycles = counters.cycles.saturating_add(used.cycles);
            });
        }
    }

    /// Keeps a workload that still exists (its cgroup is there) from expiring
    /// while it uses nothing. Unknown keys are ignored: a workload gets
    /// counters when it first uses something.
    pub fn mark_seen(&mut self, key: &K, now: Nanos) {
        if let Some(counters) = self.workloads.get_mut(key) {
            counters.last_seen = counters.last_seen.max(now);
        }
    }

    /// Drops workloads not seen for the retention window; returns them so
    /// their series can be removed.
    pub fn prune(&mut self, now: Nanos) -> Vec<K> {
        let retention = u64::try_from(self.retention.as_nanos()).unwrap_or(u64::MAX);
        let mut dropped = Vec::new();
        self.workloads.retain(|key, counters| {
            let keep = now.0.saturating_sub(counters.last_seen.0) < retention;
            if !keep {
                dropped.push(key.clone());
            }
            keep
        });
        dropped
    }

    pub fn workload(&self, key: &K) -> Option<&WorkloadCounters> {
        self.workloads.get(key)
    }

    pub fn workloads(&self) -> impl Iterator<Item = (&K, &WorkloadCounters)> {
        self.workloads.iter()
    }

    /// For updating what is not a counter ([`WorkloadCounters::names`]).
    pub fn workloads_mut(&mut self) -> impl Iterator<Item = (&K, &mut WorkloadCounters)> {
        self.workloads.iter_mut()
    }

    /// Checks restored counters against what this ledger can produce:
    /// finite, non-negative joules and no `last_seen` after `now` (a time in
    /// the future would never be pruned). The error names the first
    /// offending entry.
    pub fn validate(&self, now: Nanos) -> Result<(), String>
    where
        K: std::fmt::Debug,
    {
        let plausible = |joules: Joules| joules.0.is_finite() && joules.0 >= 0.0;
        for (key, counters) in &self.workloads {
            if counters.last_seen > now {
                return Err(format!(
                    "{key:?} was last seen at {} ns, after now ({} ns of CLOCK_MONOTONIC)",
                    counters.last_seen.0, now.0
                ));
            }
            for (domain, joules) in &counters.energy {
                if !plausible(joules.active) || !plausible(joules.idle) {
                    return Err(format!(
                        "{key:?} has {} J active and {} J idle in {}",
                        joules.active.0,
                        joules.idle.0,
                        domain.as_str()
                    ));
                }
            }
        }
        for ((domain, source), node) in &self.node {
            for (what, joules) in [
                ("active", node.active),
                ("idle", node.idle),
                ("idle kept", node.idle_kept),
                ("active unattributed", node.active_unattributed),
            ] {
                if !plausible(joules) {
                    return Err(format!(
                        "the node's {what} energy of {} from {source} is {} J",
                        domain.as_str(),
                        joules.0
                    ));
                }
            }
        }
        Ok(())
    }

    /// Node counters per (domain, meter source).
    pub fn node(&self) -> impl Iterator<Item = (Domain, &str, &NodeCounters)> {
        self.node
            .iter()
            .map(|((domain, source), counters)| (*domain, source.as_str(), counters))
    }

    /// Applies `change` to `key`'s counters (new ones if it has none) and
    /// marks it seen at `now`. The key is cloned only when it is new: most
    /// keys of an interval were there the interval before, and cloning a
    /// container's identity allocates.
    fn update(&mut self, key: &K, now: Nanos, change: impl FnOnce(&mut WorkloadCounters)) {
        if let Some(counters) = self.workloads.get_mut(key) {
            counters.last_seen = counters.last_seen.max(now);
            change(counters);
        } else {
            let mut counters = WorkloadCounters {
                last_seen: now,
                ..WorkloadCounters::default()
            };
            change(&mut counters);
            self.workloads.insert(key.clone(), counters);
        }
    }
}

/// Counters take only non-negative, finite amounts.
fn add(counter: &mut Joules, delta: Joules) {
    if delta.0 > 0.0 && delta.0.is_finite() {
        counter.0 += delta.0;
    }
}

/// A map as a sequence of `(key, value)` pairs, for keys that are not strings.
mod as_entries {
    use std::collections::HashMap;
    use std::hash::{BuildHasher, Hash};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, H, S: Serializer>(
        map: &HashMap<K, V, H>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(map)
    }

    pub fn deserialize<'de, K, V, H, D>(deserializer: D) -> Result<HashMap<K, V, H>, D::Error>
    where
        K: Deserialize<'de> + Eq + Hash,
        V: Deserialize<'de>,
        H: BuildHasher + Default,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(deserializer)?
            .into_iter()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribute::{DomainEnergy, attribute};

    const MINUTE: u64 = 60_000_000_000;

    fn interval(joules: f64, usage: &HashMap<&'static str, Usage>) -> Attribution<&'static str> {
        let energy = DomainEnergy {
            domain: Domain::Package,
            source: "rapl:package-0".into(),
            energy: Joules(joules),
            idle: Joules(joules / 4.0),
        };
        attribute(&energy, usage, &HashMap::new())
    }

    #[test]
    fn accumulates_energy_usage_and_node_counters() {
        let usage = HashMap::from([
            (
                "a",
                Usage {
                    cpu_ns: 10,
                    cycles: 0,
                },
            ),
            (
                "b",
                Usage {
                    cpu_ns: 30,
                    cycles: 0,
                },
            ),
        ]);
        let mut ledger = Ledger::new(DEFAULT_RETENTION);
        for minute in 0..2 {
            ledger.apply(&interval(8.0, &usage), Nanos(minute * MINUTE));
            ledger.add_usage(&usage, Nanos(minute * MINUTE));
        }
        let b = ledger.workload(&"b").unwrap();
        assert_eq!(b.cpu_ns, 60);
        assert!((b.energy[&Domain::Package].active.0 - 9.0).abs() < 1e-12);
        let (domain, source, node) = ledger.node().next().unwrap();
        assert_eq!((domain, source), (Domain::Package, "rapl:package-0"));
        assert_eq!(
            (node.active, node.idle, node.idle_kept),
            (Joules(12.0), Joules(4.0), Joules(4.0))
        );
    }

    #[test]
    fn retention_drops_workloads_not_seen() {
        let usage = HashMap::from([
            (
                "gone",
                Usage {
                    cpu_ns: 1,
                    cycles: 0,
                },
            ),
            (
                "alive",
                Usage {
                    cpu_ns: 1,
                    cycles: 0,
                },
            ),
        ]);
        let mut ledger = Ledger::new(Duration::from_secs(15 * 60));
        ledger.add_usage(&usage, Nanos(0));
        ledger.mark_seen(&"alive", Nanos(10 * MINUTE));
        ledger.mark_seen(&"never-used", Nanos(10 * MINUTE));
        assert!(ledger.prune(Nanos(15 * MINUTE - 1)).is_empty());
        assert_eq!(ledger.prune(Nanos(15 * MINUTE)), vec!["gone"]);
        assert!(ledger.workload(&"alive").is_some());
        assert!(ledger.workload(&"never-used").is_none());
        assert_eq!(ledger.prune(Nanos(25 * MINUTE)), vec!["alive"]);
    }

    #[test]
    fn validation_refuses_impossible_counters() {
        let usage = HashMap::from([(
            "a",
            Usage {
                cpu_ns: 1,
                cycles: 0,
            },
        )]);
        let mut ledger = Ledger::new(DEFAULT_RETENTION);
        ledger.apply(&interval(8.0, &usage), Nanos(MINUTE));
        assert_eq!(ledger.validate(Nanos(MINUTE)), Ok(()));
        let err = ledger.validate(Nanos(MINUTE - 1)).unwrap_err();
        assert!(err.contains("after now"), "{err}");
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            let mut broken = ledger.clone();
            let (_, counters) = broken.workloads_mut().next().unwrap();
            counters.energy.get_mut(&Domain::Package).unwrap().idle = Joules(bad);
            let err = broken.validate(Nanos(MINUTE)).unwrap_err();
            assert!(err.contains("\"a\"") && err.contains("J idle"), "{err}");
            let mut broken = ledger.clone();
            broken.node.values_mut().next().unwrap().idle_kept = Joules(bad);
            let err = broken.validate(Nanos(MINUTE)).unwrap_err();
            assert!(err.contains("idle kept"), "{err}");
        }
    }

    #[test]
    fn names_travel_with_their_counters() {
        use crate::workload::cgroup::{QosClass, Workload};
        let pod = Workload::Pod {
            pod_uid: "9f0e".into(),
            qos: QosClass::Burstable,
        };
        let usage = HashMap::from([(
            pod.clone(),
            Usage {
                cpu_ns: 5,
                cycles: 0,
            },
        )]);
        let mut ledger = Ledger::new(Duration::from_secs(60));
        ledger.add_usage(&usage, Nanos(3));
        let names = SeriesNames {
            namespace: "vehicle-pipeline".into(),
            pod: "job-once".into(),
            container: String::new(),
            sandbox: false,
        };
        for (_, counters) in ledger.workloads_mut() {
            counters.names = Some(names.clone());
        }
        let restored: Ledger<Workload> =
            serde_json::from_str(&serde_json::to_string(&ledger).unwrap()).unwrap();
        assert_eq!(restored.workload(&pod).unwrap().names, Some(names));
        // Checkpoints written before names were kept still load.
        let old = r#"{"workloads":[[{"system":{"bucket":"kernel"}},{"energy":{},"cpu_ns":1,"cycles":0,"last_seen":0}]],"node":[]}"#;
        let restored: Ledger<Workload> = serde_json::from_str(old).unwrap();
        assert_eq!(restored.workloads().next().unwrap().1.names, None);
    }

    #[test]
    fn round_trips_through_json_with_structured_keys() {
        use crate::workload::cgroup::{QosClass, Workload};
        let pod = Workload::Pod {
            pod_uid: "1e4b8a3c-5d2f-4a6b-9c8d-7e6f5a4b3c2d".into(),
            qos: QosClass::Burstable,
        };
        let usage = HashMap::from([(
            pod.clone(),
            Usage {
                cpu_ns: 5,
                cycles: 7,
            },
        )]);
        let energy = DomainEnergy {
            domain: Domain::Dram,
            source: "rapl:dram-0".into(),
            energy: Joules(2.5),
            idle: Joules(0.5),
        };
        let mut ledger = Ledger::new(Duration::from_secs(60));
        ledger.apply(&attribute(&energy, &usage, &HashMap::new()), Nanos(3));
        ledger.add_usage(&usage, Nanos(3));
        let json = serde_json::to_string(&ledger).unwrap();
        let restored: Ledger<Workload> = serde_json::from_str(&json).unwrap();
        assert_eq!(restored.workload(&pod), ledger.workload(&pod));
        assert_eq!(
            restored.node().collect::<Vec<_>>(),
            ledger.node().collect::<Vec<_>>()
        );
        // Retention is configuration: the default until set again.
        assert_eq!(restored.retention(), DEFAULT_RETENTION);
    }
}
