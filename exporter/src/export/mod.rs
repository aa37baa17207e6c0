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

mod auth;
mod deadlines;
mod health;
pub mod otlp;
mod server;
mod tls;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, RwLock};

use bytes::buf::Chain;
use hyper::body::{Buf, Bytes};

pub use auth::{ALLOWED_FOR, Authorizer, REFUSED_FOR, REVIEW_TIMEOUT};
pub use health::{DEFAULT_UNHEALTHY_AFTER, ServerHandle};
pub use server::{MAX_BUFFER_BYTES, ServerOptions, serve};
pub use tls::{TlsError, TlsFiles, acceptor as tls_acceptor};

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

    /// The samples by label set, duplicates (e.g. two cgroups of one
    /// container) summed: what every exposition of the family shows.
    pub fn merged(&self) -> BTreeMap<&[String], f64> {
        let mut merged: BTreeMap<&[String], f64> = BTreeMap::new();
        for (labels, value) in &self.samples {
            *merged.entry(labels.as_slice()).or_default() += value;
        }
        merged
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

    /// `read` applied to the latest report; `None` before the first interval.
    pub fn with_latest<R>(&self, read: impl FnOnce(&Report) -> R) -> Option<R> {
        self.snapshot().map(|snapshot| read(&snapshot.report))
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
        for (labels, value) in family.merged() {
            out.push_str(family.name);
            if !labels.is_empty() {
                out.push('{');
                for (i, (name, value)) in family.label_names.iter().zip(labels).enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
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

/// The process collector's `process_cpu_seconds_total` is an integer
/// counter of whole seconds: an exporter that uses a few milliseconds per
/// scrape showed 0 for hours, and the exporter-health dashboard's CPU panel
/// stayed empty. It is replaced by [`own_cpu_seconds`].
const PROCESS_CPU: &str = "process_cpu_seconds_total";

/// User + system CPU time of this process (all threads), in seconds with
/// microsecond resolution, from `getrusage(RUSAGE_SELF)`.
pub fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes one plain struct we own.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// A `/metrics` body: the interval's report text, then this scrape's
/// process metrics.
///
/// The report part is the interval's one buffer (a reference-counted
/// [`Bytes`]), never a copy: a thousand stuck scrapes of a 1 MiB report hold
/// one megabyte between them, not a gigabyte. Only the process metrics
/// (about 1 KiB, fresh on every scrape) are rendered per request. hyper
/// writes the two parts with one vectored write, without joining them.
pub type MetricsBody = Chain<Bytes, Bytes>;

/// The full `/metrics` body: the latest report and the process metrics.
pub fn render(published: &Published, process: &prometheus::Registry) -> MetricsBody {
    let report = published.text();
    let mut own = Vec::with_capacity(2048);
    let encoder = prometheus::TextEncoder::new();
    let families: Vec<_> = process
        .gather()
        .into_iter()
        .filter(|family| family.name() != PROCESS_CPU)
        .collect();
    if let Err(e) = prometheus::Encoder::encode(&encoder, &families, &mut own) {
        tracing::error!("encoding the process metrics failed: {e}");
    }
    let mut cpu = format!(
        "# HELP {PROCESS_CPU} Total user and system CPU time spent in seconds.\n\
         # TYPE {PROCESS_CPU} counter\n{PROCESS_CPU} "
    );
    push_value(&mut cpu, own_cpu_seconds());
    cpu.push('\n');
    own.extend_from_slice(cpu.as_bytes());
    report.chain(Bytes::from(own))
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

    fn joined(body: MetricsBody) -> String {
        let (report, own) = body.into_inner();
        String::from_utf8([report, own].concat()).unwrap()
    }

    /// A fraction of a second of CPU shows as such, not as 0.
    #[test]
    fn process_cpu_seconds_keep_their_fraction() {
        let process = process_registry();
        let start = own_cpu_seconds();
        while own_cpu_seconds() - start < 0.25 {
            std::hint::black_box((0..1000).sum::<u64>());
        }
        let before = own_cpu_seconds();
        let text = joined(render(&Published::default(), &process));
        let after = own_cpu_seconds();
        let reported: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_cpu_seconds_total "))
            .unwrap_or_else(|| panic!("no process_cpu_seconds_total in {text}"))
            .parse()
            .unwrap();
        assert!(
            (before..=after).contains(&reported),
            "process_cpu_seconds_total {reported}, getrusage {before}..{after}"
        );
        assert_eq!(text.matches("# TYPE process_cpu_seconds_total").count(), 1);
    }

    #[test]
    fn report_renders_with_help_type_escapes_and_merged_duplicates() {
        let published = Published::default();
        let process = process_registry();
        assert!(!joined(render(&published, &process)).contains("ergon_"));
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
        let text = joined(render(&published, &process));
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
        // Every scrape's body starts with that one buffer, not a copy of it.
        let (first, _) = render(&published, &process).into_inner();
        let (second, _) = render(&published, &process).into_inner();
        assert_eq!(first.as_ptr(), second.as_ptr());
        assert_eq!(first.as_ptr(), published.text().as_ptr());
    }
}
