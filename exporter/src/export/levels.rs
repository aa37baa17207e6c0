//! Which series families a report holds (`--metrics`), Kepler's levels.
//!
//! Cardinality is an operator's budget: a cluster of small nodes with many
//! pods may afford node and pod series but not one series per container and
//! domain. The levels are decided when the interval's report is built, so a
//! level switched off costs no formatting, no memory and no bytes on the
//! wire, not just a filter at scrape time.
//!
//! - `node`: the node's energy, power, CPU time and unattributed energy, and
//!   the system buckets (`system.slice/<unit>`, kernel, overflow) that are
//!   no pod: with the pods they add up to the node.
//! - `pod`: one energy series per pod and domain.
//! - `container`: energy, CPU time and cycles per container.
//! - `process`: energy per process. It needs per-process accounting in the
//!   kernel, so `--metrics …,process` turns that on (as `--per-process`
//!   does); `--per-process` alone adds the `process` level, as it always
//!   exported process series.
//!
//! The exporter's own health (build and probe info, meter up, residual,
//! probe overflow and cost, checkpoint, model fit) is always exported: it
//! is a handful of series and the alerts depend on it. Switching a level
//! off changes what is exported, not what is measured: attribution, the
//! counters and the checkpoint are the same at every level (per-process
//! accounting aside, which only the `process` level runs).

use clap::ValueEnum;

/// One level of `--metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MetricLevel {
    Node,
    Pod,
    Container,
    Process,
}

/// What `--metrics` selected; the default is Kepler's: node, pod, container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricLevels {
    pub node: bool,
    pub pod: bool,
    pub container: bool,
    pub process: bool,
}

impl Default for MetricLevels {
    fn default() -> MetricLevels {
        MetricLevels::from_levels(&[MetricLevel::Node, MetricLevel::Pod, MetricLevel::Container])
    }
}

impl MetricLevels {
    pub fn from_levels(levels: &[MetricLevel]) -> MetricLevels {
        MetricLevels {
            node: levels.contains(&MetricLevel::Node),
            pod: levels.contains(&MetricLevel::Pod),
            container: levels.contains(&MetricLevel::Container),
            process: levels.contains(&MetricLevel::Process),
        }
    }

    /// Every level, as the unit tests and benchmarks build reports.
    pub fn all() -> MetricLevels {
        MetricLevels {
            node: true,
            pod: true,
            container: true,
            process: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_come_from_the_list() {
        let levels = MetricLevels::from_levels(&[MetricLevel::Pod, MetricLevel::Process]);
        assert_eq!(
            levels,
            MetricLevels {
                node: false,
                pod: true,
                container: false,
                process: true
            }
        );
        let default = MetricLevels::default();
        assert!(default.node && default.pod && default.container && !default.process);
    }
}
