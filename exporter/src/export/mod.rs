//! The Prometheus side: a [`Report`] computed once per interval, rendered on
//! scrape by a custom `prometheus` collector, and served by `hyper`.
//!
//! A scrape does no collection work: the interval loop publishes an immutable
//! `Arc<Report>` and the collector only formats it. Scrapes therefore cost the
//! same whether Prometheus polls every second or every minute, and a slow or
//! hostile client cannot stall measurement.

mod server;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto;

pub use server::{ServerHandle, serve};

/// Label values are cut to this many bytes (head + `~` + hash, so two long
/// values stay distinct), so that no path or name can blow up Prometheus'
/// index.
pub const MAX_LABEL_BYTES: usize = 128;

/// Bounds a label value to [`MAX_LABEL_BYTES`].
pub fn bounded_label(value: &str) -> String {
    crate::workload::cgroup::bounded_label(value, MAX_LABEL_BYTES).into_owned()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One metric family of a report.
#[derive(Clone, Debug)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub label_names: &'static [&'static str],
    /// Label values in `label_names` order, and the value.
    pub samples: Vec<(Vec<String>, f64)>,
}

impl Family {
    pub fn new(
        name: &'static str,
        help: &'static str,
        kind: Kind,
        label_names: &'static [&'static str],
    ) -> Family {
        Family {
            name,
            help,
            kind,
            label_names,
            samples: Vec::new(),
        }
    }

    pub fn push(&mut self, labels: Vec<String>, value: f64) {
        debug_assert_eq!(labels.len(), self.label_names.len(), "{}", self.name);
        self.samples.push((labels, value));
    }
}

/// Everything one interval computed, ready to be scraped.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub families: Vec<Family>,
}

impl Report {
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }
}

/// The latest report, shared between the interval loop and the server.
#[derive(Clone, Default)]
pub struct Published {
    report: Arc<RwLock<Option<Arc<Report>>>>,
}

impl Published {
    pub fn publish(&self, report: Report) {
        let report = Arc::new(report);
        *self.report.write().unwrap_or_else(|p| p.into_inner()) = Some(report);
    }

    /// The last report, if any interval has completed (readiness).
    pub fn latest(&self) -> Option<Arc<Report>> {
        self.report
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Renders [`Published`] reports for a `prometheus::Registry`.
pub struct ReportCollector {
    published: Published,
    descs: Vec<Desc>,
}

impl ReportCollector {
    /// `catalogue` lists every family the reports may hold (name, help,
    /// label names), so the registry knows them before the first interval.
    pub fn new(published: Published, catalogue: &[Family]) -> ReportCollector {
        let descs = catalogue
            .iter()
            .map(|f| {
                Desc::new(
                    f.name.to_owned(),
                    f.help.to_owned(),
                    f.label_names.iter().map(|l| (*l).to_owned()).collect(),
                    Default::default(),
                )
                .expect("catalogue entries are valid metric descriptions")
            })
            .collect();
        ReportCollector { published, descs }
    }
}

impl Collector for ReportCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let Some(report) = self.published.latest() else {
            return Vec::new();
        };
        report
            .families
            .iter()
            .filter(|f| !f.samples.is_empty())
            .map(to_proto)
            .collect()
    }
}

fn to_proto(family: &Family) -> proto::MetricFamily {
    let mut out = proto::MetricFamily::default();
    out.set_name(family.name.to_owned());
    out.set_help(family.help.to_owned());
    out.set_field_type(match family.kind {
        Kind::Counter => proto::MetricType::COUNTER,
        Kind::Gauge => proto::MetricType::GAUGE,
    });
    // Prometheus' text format wants one line per label set: merge duplicates
    // (two cgroups of one container) by summing.
    let mut merged: BTreeMap<&[String], f64> = BTreeMap::new();
    for (labels, value) in &family.samples {
        *merged.entry(labels.as_slice()).or_default() += value;
    }
    let metrics = merged
        .into_iter()
        .map(|(labels, value)| {
            let mut metric = proto::Metric::default();
            metric.set_label(
                family
                    .label_names
                    .iter()
                    .zip(labels)
                    .map(|(name, value)| {
                        let mut pair = proto::LabelPair::default();
                        pair.set_name((*name).to_owned());
                        pair.set_value(value.clone());
                        pair
                    })
                    .collect(),
            );
            match family.kind {
                Kind::Counter => {
                    let mut counter = proto::Counter::default();
                    counter.set_value(value);
                    metric.set_counter(counter);
                }
                Kind::Gauge => {
                    let mut gauge = proto::Gauge::default();
                    gauge.set_value(value);
                    metric.set_gauge(gauge);
                }
            }
            metric
        })
        .collect();
    out.set_metric(metrics);
    out
}

/// A registry with the report collector and the exporter's own process
/// metrics (`process_cpu_seconds_total`, `process_resident_memory_bytes`).
pub fn registry(published: Published, catalogue: &[Family]) -> prometheus::Registry {
    let registry = prometheus::Registry::new();
    registry
        .register(Box::new(ReportCollector::new(published, catalogue)))
        .expect("the report collector registers once");
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("the process collector registers once");
    registry
}

/// Text exposition of everything `registry` gathers.
pub fn render(registry: &prometheus::Registry) -> Vec<u8> {
    let mut buffer = Vec::with_capacity(64 * 1024);
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = prometheus::Encoder::encode(&encoder, &registry.gather(), &mut buffer) {
        tracing::error!("encoding metrics failed: {e}");
    }
    buffer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_labels_are_bounded() {
        let long = "é".repeat(200);
        let cut = bounded_label(&long);
        assert!(cut.len() <= MAX_LABEL_BYTES && cut.contains('~'), "{cut}");
        assert_eq!(bounded_label("short"), "short");
    }

    #[test]
    fn report_renders_with_help_type_and_merged_duplicates() {
        let published = Published::default();
        let mut family = Family::new("ergon_test_total", "A test counter.", Kind::Counter, &["a"]);
        let catalogue = vec![family.clone()];
        family.push(vec!["x".into()], 1.5);
        family.push(vec!["x".into()], 2.0);
        family.push(vec!["y\"z".into()], 1.0);
        let registry = registry(published.clone(), &catalogue);
        assert!(
            !String::from_utf8(render(&registry))
                .unwrap()
                .contains("ergon_test_total")
        );
        published.publish(Report {
            families: vec![family],
        });
        let text = String::from_utf8(render(&registry)).unwrap();
        assert!(
            text.contains("# HELP ergon_test_total A test counter."),
            "{text}"
        );
        assert!(text.contains("# TYPE ergon_test_total counter"));
        assert!(text.contains("ergon_test_total{a=\"x\"} 3.5"));
        assert!(text.contains("ergon_test_total{a=\"y\\\"z\"} 1"));
    }
}
