//! The Prometheus side: a [`Report`] computed once per interval, formatted
//! on scrape, and served by `hyper`.
//!
//! A scrape does no collection work: the interval loop publishes an immutable
//! report and the first scrape after it formats it; every further scrape of
//! the same interval gets the same bytes. Scrapes therefore cost the same
//! whether Prometheus polls every second or every minute, concurrent scrapes
//! do not multiply the work, and a slow or hostile client cannot stall
//! measurement.
//!
//! The report is written in the text format directly rather than through
//! `prometheus::Registry::gather`: building the crate's metric objects for
//! 500 pods took 5 ms of CPU per scrape (measured by `cargo xtask bench`),
//! more than the whole interval's attribution. The crate still provides the
//! process metrics and their encoding.

mod server;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, RwLock};

use hyper::body::Bytes;

pub use server::{ServerHandle, serve};

/// Label values are cut to this many bytes (head + `~` + hash, so two long
/// values stay distinct), so that no path or name can blow up Prometheus'
/// index.
pub const MAX_LABEL_BYTES: usize = 128;

/// Bounds a label value to [`MAX_LABEL_BYTES`].
pub fn bounded_label(value: &str) -> String {
    crate::workload::cgroup::bounded_label(value, MAX_LABEL_BYTES).into_owned()
}

/// The Prometheus label name of a Kubernetes pod label key, as
/// kube-state-metrics writes it: `label_` and the key with every character
/// that is no ASCII letter, digit or `_` replaced by `_`
/// (`app.kubernetes.io/name` → `label_app_kubernetes_io_name`).
pub fn pod_label_name(key: &str) -> String {
    let mut name = String::with_capacity(key.len() + 6);
    name.push_str("label_");
    name.extend(
        key.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
    );
    name
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
    /// Label names known only at run time (`ergon_pod_labels`' `label_<key>`
    /// from `--pod-labels`), after `label_names`. An empty value in these
    /// positions is left out of the line: Prometheus reads a missing label
    /// and an empty one the same.
    pub runtime_label_names: Vec<String>,
    /// Label values in `label_names` then `runtime_label_names` order, and
    /// the value.
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
            runtime_label_names: Vec::new(),
            samples: Vec::new(),
        }
    }

    pub fn push(&mut self, labels: Vec<String>, value: f64) {
        debug_assert_eq!(
            labels.len(),
            self.label_names.len() + self.runtime_label_names.len(),
            "{}",
            self.name
        );
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

/// A published report and, once someone scraped it, its text.
struct Snapshot {
    report: Report,
    text: OnceLock<Bytes>,
}

/// The latest report, shared between the interval loop and the server.
#[derive(Clone, Default)]
pub struct Published {
    latest: Arc<RwLock<Option<Arc<Snapshot>>>>,
}

impl Published {
    pub fn publish(&self, report: Report) {
        let snapshot = Arc::new(Snapshot {
            report,
            text: OnceLock::new(),
        });
        *self.latest.write().unwrap_or_else(|p| p.into_inner()) = Some(snapshot);
    }

    fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.latest
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether any interval has completed (readiness).
    pub fn is_ready(&self) -> bool {
        self.snapshot().is_some()
    }

    /// The text exposition of the latest report: formatted by the first
    /// scrape that asks for it, then shared by every scrape until the next
    /// interval publishes. Empty before the first interval.
    pub fn text(&self) -> Bytes {
        match self.snapshot() {
            Some(snapshot) => snapshot
                .text
                .get_or_init(|| Bytes::from(render_report(&snapshot.report)))
                .clone(),
            None => Bytes::new(),
        }
    }
}

/// Writes `report` in the Prometheus text format (version 0.0.4): HELP and
/// TYPE lines, one line per label set (duplicates, e.g. two cgroups of one
/// container, summed), label values escaped.
pub fn render_report(report: &Report) -> Vec<u8> {
    let mut out = String::with_capacity(256 * 1024);
    for family in report.families.iter().filter(|f| !f.samples.is_empty()) {
        out.push_str("# HELP ");
        out.push_str(family.name);
        out.push(' ');
        for c in family.help.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push_str("\n# TYPE ");
        out.push_str(family.name);
        out.push_str(match family.kind {
            Kind::Counter => " counter\n",
            Kind::Gauge => " gauge\n",
        });
        let mut merged: BTreeMap<&[String], f64> = BTreeMap::new();
        for (labels, value) in &family.samples {
            *merged.entry(labels.as_slice()).or_default() += value;
        }
        for (labels, value) in merged {
            out.push_str(family.name);
            if !labels.is_empty() {
                out.push('{');
                let names = family
                    .label_names
                    .iter()
                    .copied()
                    .chain(family.runtime_label_names.iter().map(String::as_str));
                let mut first = true;
                for (i, (name, value)) in names.zip(labels).enumerate() {
                    if i >= family.label_names.len() && value.is_empty() {
                        continue;
                    }
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    out.push_str(name);
                    out.push_str("=\"");
                    for c in value.chars() {
                        match c {
                            '\\' => out.push_str("\\\\"),
                            '"' => out.push_str("\\\""),
                            '\n' => out.push_str("\\n"),
                            c => out.push(c),
                        }
                    }
                    out.push('"');
                }
                out.push('}');
            }
            out.push(' ');
            push_value(&mut out, value);
            out.push('\n');
        }
    }
    out.into_bytes()
}

fn push_value(out: &mut String, value: f64) {
    use std::fmt::Write;
    if value.is_nan() {
        out.push_str("NaN");
    } else if value.is_infinite() {
        out.push_str(if value > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        let _ = write!(out, "{value}");
    }
}

/// The exporter's own process metrics (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, …), from the `prometheus` crate.
pub fn process_registry() -> prometheus::Registry {
    let registry = prometheus::Registry::new();
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("the process collector registers once");
    registry
}

/// A full `/metrics` body: the latest report and the process metrics.
pub fn render(published: &Published, process: &prometheus::Registry) -> Vec<u8> {
    let report = published.text();
    let mut buffer = Vec::with_capacity(report.len() + 2048);
    buffer.extend_from_slice(&report);
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = prometheus::Encoder::encode(&encoder, &process.gather(), &mut buffer) {
        tracing::error!("encoding the process metrics failed: {e}");
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
    fn runtime_labels_follow_the_static_ones_and_empty_ones_are_left_out() {
        assert_eq!(
            pod_label_name("app.kubernetes.io/part-of"),
            "label_app_kubernetes_io_part_of"
        );
        let mut family = Family::new("ergon_x", "X.", Kind::Gauge, &["pod_uid"]);
        family.runtime_label_names = vec!["label_app".into(), "label_team".into()];
        family.push(vec!["u1".into(), "api".into(), "".into()], 1.0);
        family.push(vec!["u2".into(), "".into(), "edge".into()], 1.0);
        let text = String::from_utf8(render_report(&Report {
            families: vec![family],
        }))
        .unwrap();
        assert!(
            text.contains("ergon_x{pod_uid=\"u1\",label_app=\"api\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("ergon_x{pod_uid=\"u2\",label_team=\"edge\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn report_renders_with_help_type_escapes_and_merged_duplicates() {
        let published = Published::default();
        let process = process_registry();
        assert!(
            !String::from_utf8(render(&published, &process))
                .unwrap()
                .contains("ergon_")
        );
        assert!(!published.is_ready());
        let mut family = Family::new("ergon_test_total", "A test counter.", Kind::Counter, &["a"]);
        family.push(vec!["x".into()], 1.5);
        family.push(vec!["x".into()], 2.0);
        family.push(vec!["y\"z\\\n".into()], 1.0);
        let mut gauge = Family::new("ergon_test_gauge", "Special values.", Kind::Gauge, &[]);
        gauge.push(vec![], f64::INFINITY);
        let empty = Family::new("ergon_empty_total", "Nothing.", Kind::Counter, &[]);
        published.publish(Report {
            families: vec![family, gauge, empty],
        });
        let text = String::from_utf8(render(&published, &process)).unwrap();
        assert!(
            text.contains("# HELP ergon_test_total A test counter.\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE ergon_test_total counter\n"));
        assert!(text.contains("ergon_test_total{a=\"x\"} 3.5\n"));
        assert!(
            text.contains(r#"ergon_test_total{a="y\"z\\\n"} 1"#),
            "{text}"
        );
        assert!(text.contains("ergon_test_gauge +Inf\n"));
        assert!(!text.contains("ergon_empty_total"));
        assert!(text.contains("process_resident_memory_bytes"));
        // The same interval's text is formatted once and shared.
        assert_eq!(published.text().as_ptr(), published.text().as_ptr());
    }
}
