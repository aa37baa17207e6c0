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
//! A scraper gets the format and encoding it negotiates ([`negotiate`]):
//! the text format or OpenMetrics, plain or gzip. Each of those bodies is
//! made by the first scrape that asks for it and shared the same way, so a
//! format nobody asks for costs nothing.
//!
//! The report is written in the text format directly rather than through
//! `prometheus::Registry::gather`: building the crate's metric objects for
//! 500 pods took 5 ms of CPU per scrape (measured by `cargo xtask bench`),
//! more than the whole interval's attribution. The crate still provides the
//! process metrics and their encoding.

mod auth;
mod deadlines;
mod health;
mod levels;
mod negotiate;
pub mod otlp;
mod server;
mod tls;

use std::sync::{Arc, OnceLock, RwLock};

use bytes::buf::Chain;
use hyper::body::{Buf, Bytes};

pub use auth::{ALLOWED_FOR, Authorizer, REFUSED_FOR, REVIEW_TIMEOUT};
pub use health::{DEFAULT_UNHEALTHY_AFTER, ServerHandle};
pub use levels::{MetricLevel, MetricLevels};
pub use negotiate::{encoding, format};
pub use server::{MAX_BUFFER_BYTES, SCRAPES, ServerOptions, serve};
pub use tls::{TlsError, TlsFiles, acceptor as tls_acceptor};

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

    /// The samples by label set, duplicates (e.g. two cgroups of one
    /// container) summed: what every exposition of the family shows, sorted
    /// by label values.
    ///
    /// One sort of references, then one pass that adds up neighbours: a
    /// `BTreeMap` of the same keys made this the scrape's hotspot (a node
    /// allocation per series and many more comparisons of long label values,
    /// `cargo xtask bench`'s render row). The sort is stable, so duplicates
    /// are added in the order they were pushed, as the map added them.
    pub fn merged(&self) -> Vec<(&[String], f64)> {
        let mut sorted: Vec<(&[String], f64)> = self
            .samples
            .iter()
            .map(|(labels, value)| (labels.as_slice(), *value))
            .collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        let mut merged: Vec<(&[String], f64)> = Vec::with_capacity(sorted.len());
        for (labels, value) in sorted {
            match merged.last_mut() {
                Some((last, sum)) if *last == labels => *sum += value,
                // From 0.0 like a fresh counter, so -0.0 is written as 0.
                _ => merged.push((labels, 0.0 + value)),
            }
        }
        merged
    }

    /// About how many bytes the family's samples take in the text formats,
    /// to size the output once.
    fn text_bytes(&self) -> usize {
        let names: usize = self.label_names.iter().map(|name| name.len() + 4).sum();
        let per_sample = self.name.len() + names + 32;
        self.samples
            .iter()
            .map(|(labels, _)| per_sample + labels.iter().map(String::len).sum::<usize>())
            .sum::<usize>()
            + self.help.len()
            + 64
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

/// How `/metrics` is written, from the scraper's `Accept` header
/// ([`negotiate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4.
    Text,
    /// OpenMetrics 1.0.0 text: counters' families named without `_total`,
    /// `# UNIT` lines, `# EOF` at the end.
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => prometheus::TEXT_FORMAT,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// The `format` label of `ergon_scrapes_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::OpenMetrics => "openmetrics",
        }
    }
}

/// How the body travels, from the scraper's `Accept-Encoding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
}

impl Encoding {
    /// The `encoding` label of `ergon_scrapes_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Gzip => "gzip",
        }
    }
}

/// The interval's report text compressed as the head of a gzip member: the
/// gzip header and the report deflated and sync-flushed, not yet final. A
/// scrape appends its own process metrics as the member's final deflate
/// block and writes the trailer ([`gzip_tail`]), so every scrape's body is
/// one ordinary gzip member (which every client decodes, unlike concatenated
/// members, which some do not) while the report is compressed once.
#[derive(Debug)]
struct GzipHead {
    bytes: Bytes,
    /// CRC-32 of the uncompressed report, extended by each scrape's tail.
    crc: crc32fast::Hasher,
    /// Length of the uncompressed report.
    len: usize,
}

/// A published report and, once someone scraped it, its bodies: one per
/// format and encoding, each made by the first scrape that asks for it.
struct Snapshot {
    report: Report,
    text: OnceLock<Bytes>,
    openmetrics: OnceLock<Bytes>,
    text_gzip: OnceLock<GzipHead>,
    openmetrics_gzip: OnceLock<GzipHead>,
}

impl Snapshot {
    fn plain(&self, format: Format) -> &Bytes {
        let cell = match format {
            Format::Text => &self.text,
            Format::OpenMetrics => &self.openmetrics,
        };
        cell.get_or_init(|| Bytes::from(render_format(&self.report, format)))
    }

    fn gzip(&self, format: Format) -> &GzipHead {
        let cell = match format {
            Format::Text => &self.text_gzip,
            Format::OpenMetrics => &self.openmetrics_gzip,
        };
        cell.get_or_init(|| gzip_head(self.plain(format)))
    }
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
            openmetrics: OnceLock::new(),
            text_gzip: OnceLock::new(),
            openmetrics_gzip: OnceLock::new(),
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

    /// Whether a report has been published (readiness): after the first
    /// interval, or at once when counters were restored from a checkpoint
    /// (they are served before anything new is measured).
    pub fn is_ready(&self) -> bool {
        self.snapshot().is_some()
    }

    /// The text exposition of the latest report: formatted by the first
    /// scrape that asks for it, then shared by every scrape until the next
    /// interval publishes. Empty before the first interval.
    pub fn text(&self) -> Bytes {
        self.body(Format::Text)
    }

    /// The latest report in `format`, uncompressed; made once per interval.
    pub fn body(&self, format: Format) -> Bytes {
        match self.snapshot() {
            Some(snapshot) => snapshot.plain(format).clone(),
            None => Bytes::new(),
        }
    }
}

/// Writes `report` in the Prometheus text format (version 0.0.4): HELP and
/// TYPE lines, one line per label set (duplicates, e.g. two cgroups of one
/// container, summed), label values escaped.
pub fn render_report(report: &Report) -> Vec<u8> {
    render_format(report, Format::Text)
}

/// Writes `report` in `format`, without OpenMetrics' `# EOF` (the process
/// metrics follow it in every body).
pub fn render_format(report: &Report, format: Format) -> Vec<u8> {
    let families = || report.families.iter().filter(|f| !f.samples.is_empty());
    let mut out = String::with_capacity(families().map(Family::text_bytes).sum());
    for family in families() {
        let samples = family.merged().into_iter().map(|(labels, value)| {
            // Runtime label names (the pod labels an operator allow-listed)
            // follow the fixed ones; a pod without such a label gets no
            // pair rather than an empty one.
            let names = family
                .label_names
                .iter()
                .copied()
                .chain(family.runtime_label_names.iter().map(String::as_str));
            let fixed = family.label_names.len();
            let pairs = names
                .zip(labels)
                .enumerate()
                .filter(move |(i, (_, value))| *i < fixed || !value.is_empty())
                .map(|(_, (name, value))| (name, value.as_str()));
            (pairs, value)
        });
        push_family(
            &mut out,
            format,
            (family.name, family.help, family.kind),
            samples,
        );
    }
    out.into_bytes()
}

/// Units OpenMetrics announces with `# UNIT`, taken from the name's suffix
/// (the Prometheus naming conventions put the base unit there).
const UNITS: &[&str] = &["joules", "watts", "seconds", "bytes"];

/// Writes one family: HELP, TYPE (and UNIT in OpenMetrics) and its samples.
fn push_family<'a, L>(
    out: &mut String,
    format: Format,
    (name, help, kind): (&str, &str, Kind),
    samples: impl Iterator<Item = (L, f64)>,
) where
    L: Iterator<Item = (&'a str, &'a str)>,
{
    // OpenMetrics names a counter's family without `_total`; its samples
    // keep the suffix.
    let family_name = match (format, kind) {
        (Format::OpenMetrics, Kind::Counter) => name.strip_suffix("_total").unwrap_or(name),
        _ => name,
    };
    out.push_str("# HELP ");
    out.push_str(family_name);
    out.push(' ');
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if format == Format::OpenMetrics => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out.push_str("\n# TYPE ");
    out.push_str(family_name);
    out.push_str(match kind {
        Kind::Counter => " counter\n",
        Kind::Gauge => " gauge\n",
    });
    if format == Format::OpenMetrics
        && let Some(unit) = UNITS
            .iter()
            .find(|unit| family_name.ends_with(&format!("_{unit}")))
    {
        out.push_str("# UNIT ");
        out.push_str(family_name);
        out.push(' ');
        out.push_str(unit);
        out.push('\n');
    }
    for (labels, value) in samples {
        out.push_str(name);
        let mut labels = labels.peekable();
        if labels.peek().is_some() {
            out.push('{');
            for (i, (label, value)) in labels.enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(label);
                out.push_str("=\"");
                push_label_value(out, value);
                out.push('"');
            }
            out.push('}');
        }
        out.push(' ');
        push_value(out, value);
        out.push('\n');
    }
}

/// A label value escaped as both formats want (`\\`, `\"`, `\n`); most
/// values need no escape and are copied whole.
fn push_label_value(out: &mut String, value: &str) {
    // No early exit, so the check compiles to a vectorised scan.
    let special = value
        .bytes()
        .fold(false, |found, b| found | matches!(b, b'\\' | b'"' | b'\n'));
    if !special {
        out.push_str(value);
        return;
    }
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
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

/// Compression level of `/metrics` bodies: zlib's default. The report is
/// compressed once per interval, so its cost does not grow with scrapes.
fn gzip_level() -> flate2::Compression {
    flate2::Compression::default()
}

/// Deflates `input` with a fresh raw (headerless) compressor, ending with
/// `flush`: `Sync` leaves the stream open at a byte boundary, `Finish`
/// writes the final block.
fn deflate(input: &[u8], flush: flate2::FlushCompress) -> Vec<u8> {
    let mut compressor = flate2::Compress::new(gzip_level(), false);
    let mut out = Vec::with_capacity(input.len() / 4 + 64);
    loop {
        let consumed = compressor.total_in() as usize;
        out.reserve(input.len() / 8 + 64);
        let status = compressor
            .compress_vec(&input[consumed..], &mut out, flush)
            .expect("deflate into a growing buffer cannot fail");
        let done = compressor.total_in() as usize == input.len()
            && (status == flate2::Status::StreamEnd
                || (flush != flate2::FlushCompress::Finish && out.len() < out.capacity()));
        if done {
            return out;
        }
    }
}

/// The gzip header (RFC 1952: deflate, no name, no time, unknown OS) and the
/// report deflated up to a sync flush.
fn gzip_head(report: &Bytes) -> GzipHead {
    let mut bytes = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    bytes.extend(deflate(report, flate2::FlushCompress::Sync));
    let mut crc = crc32fast::Hasher::new();
    crc.update(report);
    GzipHead {
        bytes: Bytes::from(bytes),
        crc,
        len: report.len(),
    }
}

/// The end of a gzip member that `head` began: `own` deflated as the final
/// block, then the CRC-32 and length of the whole uncompressed body.
fn gzip_tail(head: &GzipHead, own: &[u8]) -> Vec<u8> {
    let mut tail = deflate(own, flate2::FlushCompress::Finish);
    let mut crc = head.crc.clone();
    crc.update(own);
    tail.extend(crc.finalize().to_le_bytes());
    // ISIZE is the length modulo 2^32 (RFC 1952).
    tail.extend(((head.len + own.len()) as u32).to_le_bytes());
    tail
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

/// A `/metrics` body: the interval's report, then this scrape's process
/// metrics.
///
/// The report part is the interval's one buffer (a reference-counted
/// [`Bytes`]), never a copy: a thousand stuck scrapes of a 1 MiB report hold
/// one megabyte between them, not a gigabyte. Only the process metrics
/// (about 1 KiB, fresh on every scrape) are rendered per request. hyper
/// writes the two parts with one vectored write, without joining them.
///
/// Compressed, the report part is the gzip member's shared head and the
/// scrape's part its final block and trailer ([`GzipHead`]): one valid gzip
/// member, the report compressed once per interval.
pub type MetricsBody = Chain<Bytes, Bytes>;

/// The full `/metrics` body: the latest report and the process metrics, in
/// the negotiated format and encoding.
pub fn render(
    published: &Published,
    process: &prometheus::Registry,
    format: Format,
    encoding: Encoding,
) -> MetricsBody {
    let own = render_own(process, format);
    match (published.snapshot(), encoding) {
        (Some(snapshot), Encoding::Gzip) => {
            let head = snapshot.gzip(format);
            head.bytes.clone().chain(Bytes::from(gzip_tail(head, &own)))
        }
        (None, Encoding::Gzip) => {
            let head = gzip_head(&Bytes::new());
            let tail = gzip_tail(&head, &own);
            head.bytes.chain(Bytes::from(tail))
        }
        (Some(snapshot), Encoding::Identity) => {
            snapshot.plain(format).clone().chain(Bytes::from(own))
        }
        (None, Encoding::Identity) => Bytes::new().chain(Bytes::from(own)),
    }
}

/// This scrape's process metrics (and OpenMetrics' `# EOF`, which must end
/// the body), rendered by the same writer as the report, so both formats'
/// rules hold for them too.
fn render_own(process: &prometheus::Registry, format: Format) -> Vec<u8> {
    use prometheus::proto::MetricType;
    let mut own = String::with_capacity(2048);
    for family in process.gather() {
        if family.name() == PROCESS_CPU {
            continue;
        }
        let kind = match family.get_field_type() {
            MetricType::COUNTER => Kind::Counter,
            MetricType::GAUGE => Kind::Gauge,
            other => {
                tracing::debug!("{} is a {other:?}, not served", family.name());
                continue;
            }
        };
        let samples = family.get_metric().iter().map(|metric| {
            let labels = metric
                .get_label()
                .iter()
                .map(|pair| (pair.name(), pair.value()));
            let value = match kind {
                Kind::Counter => metric.get_counter().get_value(),
                Kind::Gauge => metric.get_gauge().get_value(),
            };
            (labels, value)
        });
        push_family(
            &mut own,
            format,
            (family.name(), family.help(), kind),
            samples,
        );
    }
    let cpu = [(std::iter::empty::<(&str, &str)>(), own_cpu_seconds())].into_iter();
    push_family(
        &mut own,
        format,
        (
            PROCESS_CPU,
            "Total user and system CPU time spent in seconds.",
            Kind::Counter,
        ),
        cpu,
    );
    if format == Format::OpenMetrics {
        own.push_str("# EOF\n");
    }
    own.into_bytes()
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
        let text = joined(render(
            &Published::default(),
            &process,
            Format::Text,
            Encoding::Identity,
        ));
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
            !joined(render(
                &published,
                &process,
                Format::Text,
                Encoding::Identity
            ))
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
        let text = joined(render(
            &published,
            &process,
            Format::Text,
            Encoding::Identity,
        ));
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
        let (first, _) =
            render(&published, &process, Format::Text, Encoding::Identity).into_inner();
        let (second, _) =
            render(&published, &process, Format::Text, Encoding::Identity).into_inner();
        assert_eq!(first.as_ptr(), second.as_ptr());
        assert_eq!(first.as_ptr(), published.text().as_ptr());
    }

    fn sample_report() -> Report {
        let mut energy = Family::new(
            "ergon_pod_energy_joules_total",
            "Energy \"attributed\" to a pod.",
            Kind::Counter,
            &["pod"],
        );
        for pod in 0..200 {
            energy.push(vec![format!("pod-{pod}")], f64::from(pod) * 1.5);
        }
        let mut power = Family::new("ergon_node_power_watts", "Power.", Kind::Gauge, &["domain"]);
        power.push(vec!["package".into()], 42.0);
        let mut info = Family::new("ergon_build_info", "Build.", Kind::Gauge, &["version"]);
        info.push(vec!["1".into()], 1.0);
        Report {
            families: vec![energy, power, info],
        }
    }

    fn gunzip(body: MetricsBody) -> String {
        use std::io::Read;
        let (head, tail) = body.into_inner();
        let gzip = [head, tail].concat();
        // GzDecoder reads one member: the body must be exactly one.
        let mut decoder = flate2::read::GzDecoder::new(&gzip[..]);
        let mut text = String::new();
        decoder
            .read_to_string(&mut text)
            .unwrap_or_else(|e| panic!("not a gzip member: {e}"));
        let mut rest = Vec::new();
        decoder.into_inner().read_to_end(&mut rest).unwrap();
        assert!(
            rest.is_empty(),
            "{} bytes after the gzip member",
            rest.len()
        );
        text
    }

    /// Every report line of the compressed body is the plain body's; the
    /// compressed report is made once and shared by every scrape.
    #[test]
    fn gzip_bodies_are_one_member_sharing_the_compressed_report() {
        let published = Published::default();
        let process = process_registry();
        // Before the first interval: the process metrics alone, compressed.
        let empty = gunzip(render(&published, &process, Format::Text, Encoding::Gzip));
        assert!(empty.contains("process_cpu_seconds_total"), "{empty}");
        published.publish(sample_report());
        for format in [Format::Text, Format::OpenMetrics] {
            let plain = String::from_utf8(published.body(format).to_vec()).unwrap();
            let first = render(&published, &process, format, Encoding::Gzip);
            let second = render(&published, &process, format, Encoding::Gzip);
            assert_eq!(first.first_ref().as_ptr(), second.first_ref().as_ptr());
            let compressed = first.first_ref().len() + first.last_ref().len();
            assert!(
                compressed * 4 < plain.len(),
                "{format:?}: {compressed} bytes compressed of {}",
                plain.len()
            );
            let text = gunzip(first);
            assert!(text.starts_with(&plain), "{format:?}: {text}");
            let own = &text[plain.len()..];
            assert!(own.contains("process_cpu_seconds_total "), "{own}");
            assert_eq!(
                own.ends_with("# EOF\n"),
                format == Format::OpenMetrics,
                "{own}"
            );
        }
    }

    #[test]
    fn openmetrics_names_counter_families_without_total_and_ends_with_eof() {
        let published = Published::default();
        published.publish(sample_report());
        let process = process_registry();
        let text = joined(render(
            &published,
            &process,
            Format::OpenMetrics,
            Encoding::Identity,
        ));
        for line in [
            "# HELP ergon_pod_energy_joules Energy \\\"attributed\\\" to a pod.\n",
            "# TYPE ergon_pod_energy_joules counter\n",
            "# UNIT ergon_pod_energy_joules joules\n",
            "ergon_pod_energy_joules_total{pod=\"pod-1\"} 1.5\n",
            "# TYPE ergon_node_power_watts gauge\n# UNIT ergon_node_power_watts watts\n",
            "# TYPE ergon_build_info gauge\nergon_build_info{version=\"1\"} 1\n",
            "# TYPE process_cpu_seconds counter\n# UNIT process_cpu_seconds seconds\nprocess_cpu_seconds_total ",
            "# TYPE process_resident_memory_bytes gauge\n# UNIT process_resident_memory_bytes bytes\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert!(text.ends_with("\n# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(!text.contains("# TYPE ergon_pod_energy_joules_total"));
        // The text format keeps its own rules: full names, no UNIT, no EOF.
        let plain = joined(render(
            &published,
            &process,
            Format::Text,
            Encoding::Identity,
        ));
        assert!(plain.contains("# TYPE ergon_pod_energy_joules_total counter\n"));
        assert!(
            plain
                .contains("# HELP ergon_pod_energy_joules_total Energy \"attributed\" to a pod.\n")
        );
        assert!(!plain.contains("# UNIT") && !plain.contains("# EOF"));
    }
}
