//! `--otlp-endpoint`: the same report `/metrics` serves, pushed every
//! interval to an OpenTelemetry collector over OTLP/HTTP protobuf.
//!
//! The encoding, the HTTP client, the retries and the export schedule are the
//! opentelemetry-rust SDK's; this module only says what each family of the
//! [`Report`] becomes. Every family is one observable instrument whose
//! callback reads the latest published report, so a push does no collection
//! work and never sees half an interval: counters become cumulative monotonic
//! sums (their values are already cumulative, checkpointed across restarts),
//! gauges stay gauges.
//!
//! Why these choices:
//! - The SDK's periodic reader runs on a current-thread tokio runtime of its
//!   own thread (`rt-tokio-current-thread`): the server's runtime blocks in
//!   `serve` and the measurement loop is a plain thread, so neither can host
//!   the hyper client. [`OtlpPush::shutdown`] collects and exports once more
//!   (the final flush on SIGTERM) before that thread ends.
//! - While the collector is down, each export is retried with exponential
//!   backoff and jitter within [`export_timeout`], then dropped: nothing is
//!   queued, so memory stays flat, and since every sum is cumulative the next
//!   export that gets through carries all the energy the failed ones did.
//! - Names are Ergon's own without the `_total` suffix the Prometheus
//!   exposition adds to counters (OTLP marks monotonic sums in the type), with
//!   the unit in OTLP's `unit` field; a collector exporting to Prometheus
//!   turns them back into the `/metrics` names. Labels that identify
//!   Kubernetes objects take the semantic-convention names (see
//!   [`attribute_key`]); the node is a resource attribute (`k8s.node.name`,
//!   `host.name`). The `--compat kepler*` families are Prometheus dashboard
//!   aliases of the same energy and are not pushed.
//! - `--carbon-intensity` is pushed as the same two gauges `/metrics` serves
//!   (absent while no intensity is known, as there), so a collector-side
//!   pipeline can turn joules into CO₂e as the recording rules do.

use std::time::Duration;

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry::{Key, KeyValue, Value};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader;
use opentelemetry_sdk::metrics::{SdkMeterProvider, Stream, Temporality};

use super::{Family, Kind, Published, ServerHandle};
use crate::carbon::{
    CARBON_INTENSITY, CARBON_INTENSITY_HELP, CARBON_INTENSITY_TIMESTAMP,
    CARBON_INTENSITY_TIMESTAMP_HELP, CarbonIntensity,
};

/// The OTLP/HTTP path of metrics, appended to an endpoint given without a
/// path (as the collector's `otlphttp` exporter does).
pub const METRICS_PATH: &str = "/v1/metrics";

/// The server's liveness gauge, which lives beside the report (it must move
/// even when an interval fails to publish one).
const LAST_SUCCESS: &str = "ergon_last_successful_interval_timestamp_seconds";

/// Series per instrument the SDK keeps before folding the rest into one
/// overflow point. The SDK's default (2,000) is below one family of a big
/// node (500 pods x 4 domains); the probe's maps bound the real count.
pub const MAX_SERIES_PER_FAMILY: usize = 1 << 18;

/// Where and as whom to push.
#[derive(Clone, Debug)]
pub struct OtlpOptions {
    /// `--otlp-endpoint`, e.g. `http://otel-collector:4318`.
    pub endpoint: String,
    pub interval: Duration,
    /// `k8s.node.name`; empty outside a cluster.
    pub node_name: String,
    /// `host.name`.
    pub host_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error(
        "--otlp-endpoint `{0}` is not an http:// URL: give the collector's OTLP/HTTP receiver, \
         e.g. http://otel-collector:4318 (https is not supported: run the collector as a node \
         agent or sidecar and push to it in plain HTTP)"
    )]
    NotHttp(String),
    #[error(
        "--otlp-endpoint `{endpoint}` is not a URL ({why}): give the collector's OTLP/HTTP \
         receiver, e.g. http://otel-collector:4318"
    )]
    NotUrl { endpoint: String, why: String },
    #[error("--otlp-endpoint `{endpoint}`: {reason}")]
    Exporter { endpoint: String, reason: String },
}

/// The URL exports are posted to: `endpoint` as given when it names a path,
/// else `endpoint` + [`METRICS_PATH`].
pub fn metrics_url(endpoint: &str) -> Result<String, OtlpError> {
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return Err(OtlpError::NotHttp(endpoint.to_owned()));
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(OtlpError::NotHttp(endpoint.to_owned()));
    }
    let path = &rest[authority.len()..];
    let url = if path.is_empty() || path == "/" {
        format!("http://{authority}{METRICS_PATH}")
    } else {
        endpoint.to_owned()
    };
    let bad = |why: String| OtlpError::NotUrl {
        endpoint: endpoint.to_owned(),
        why,
    };
    let parsed: hyper::Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| bad(e.to_string()))?;
    if parsed.host().is_none_or(str::is_empty) {
        return Err(bad("no host".into()));
    }
    // The parser leaves the port to a later, lenient look-up (`43x8` is
    // taken and then ignored): check it here.
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    if !host_port.ends_with(']')
        && let Some((_, port)) = host_port.rsplit_once(':')
        && port.parse::<u16>().is_err()
    {
        return Err(bad(format!("port `{port}`")));
    }
    Ok(url)
}

/// How long one export (all its retries) may take: one interval, so a
/// collector that is down never makes exports pile up, capped at the
/// collector-side default of 10 s.
pub fn export_timeout(interval: Duration) -> Duration {
    interval.clamp(Duration::from_millis(100), Duration::from_secs(10))
}

/// The OTLP attribute of an Ergon label: the OpenTelemetry semantic
/// conventions' name where one exists, else the label's own name.
pub fn attribute_key(label: &'static str) -> &'static str {
    match label {
        "namespace" => "k8s.namespace.name",
        "pod" => "k8s.pod.name",
        "pod_uid" => "k8s.pod.uid",
        "container" => "k8s.container.name",
        "container_id" => "container.id",
        "pid" => "process.pid",
        "comm" => "process.executable.name",
        other => other,
    }
}

/// The OTLP name and unit of a family: counters lose the `_total` the
/// Prometheus exposition requires; the unit is read from the name's suffix
/// (UCUM, as OTLP wants).
pub fn metric_name_and_unit(family: &Family) -> (&'static str, &'static str) {
    let name = match family.kind {
        Kind::Counter => family.name.strip_suffix("_total").unwrap_or(family.name),
        Kind::Gauge => family.name,
    };
    let unit = if name.contains("_joules") {
        "J"
    } else if name.contains("_watts") {
        "W"
    } else if name.ends_with("_seconds") {
        "s"
    } else if name.ends_with("_bytes") {
        "By"
    } else {
        "1"
    };
    (name, unit)
}

/// The exporter's pushes; [`OtlpPush::shutdown`] flushes and stops them.
pub struct OtlpPush {
    provider: SdkMeterProvider,
}

impl OtlpPush {
    /// Registers one instrument per family of `catalogue` (the Kepler aliases
    /// left out) and the liveness gauge of `handle`, and starts pushing every
    /// `options.interval`.
    pub fn start(
        options: &OtlpOptions,
        catalogue: &[Family],
        handle: &ServerHandle,
        carbon: Option<&CarbonIntensity>,
    ) -> Result<OtlpPush, OtlpError> {
        let url = metrics_url(&options.endpoint)?;
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(export_timeout(options.interval))
            .with_temporality(Temporality::Cumulative)
            .build()
            .map_err(|e| OtlpError::Exporter {
                endpoint: options.endpoint.clone(),
                reason: e.to_string(),
            })?;
        let reader =
            PeriodicReader::builder(exporter, opentelemetry_sdk::runtime::TokioCurrentThread)
                .with_interval(options.interval)
                .with_timeout(export_timeout(options.interval))
                .build();
        let mut resource = Resource::builder()
            .with_service_name("ergon")
            .with_attribute(KeyValue::new("host.name", options.host_name.clone()));
        if !options.node_name.is_empty() {
            resource =
                resource.with_attribute(KeyValue::new("k8s.node.name", options.node_name.clone()));
        }
        let provider = SdkMeterProvider::builder()
            .with_resource(resource.build())
            .with_reader(reader)
            .with_view(|_: &opentelemetry_sdk::metrics::Instrument| {
                Stream::builder()
                    .with_cardinality_limit(MAX_SERIES_PER_FAMILY)
                    .build()
                    .ok()
            })
            .build();
        let meter = provider.meter("ergon");
        for family in catalogue
            .iter()
            .filter(|family| !family.name.starts_with("kepler_"))
        {
            register(&meter, family, &handle.published);
        }
        let liveness = handle.clone();
        meter
            .f64_observable_gauge(LAST_SUCCESS)
            .with_description(
                "Unix time at which the last interval was measured (0: none yet). Alert when it \
                 falls behind: the counters are flat because nothing is measured.",
            )
            .with_unit("s")
            .with_callback(move |observer| observer.observe(liveness.last_success_seconds(), &[]))
            .build();
        if let Some(carbon) = carbon {
            register_carbon(&meter, carbon);
        }
        Ok(OtlpPush { provider })
    }

    /// Collects and exports the latest report once more, then stops the
    /// pushing thread. Called on SIGTERM after the last interval published.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!("OTLP: the final push did not complete: {e}");
        }
    }
}

/// One observable instrument for `family`, observing every merged label set
/// of the latest report.
fn register(meter: &Meter, family: &Family, published: &Published) {
    let (name, unit) = metric_name_and_unit(family);
    let family_name = family.name;
    let keys: Vec<Key> = family
        .label_names
        .iter()
        .map(|label| Key::from_static_str(attribute_key(label)))
        .collect();
    let published = published.clone();
    let observe = move |record: &mut dyn FnMut(f64, &[KeyValue])| {
        published.with_latest(|report| {
            let Some(family) = report.family(family_name) else {
                return;
            };
            for (labels, value) in family.merged() {
                let attributes: Vec<KeyValue> = keys
                    .iter()
                    .zip(labels)
                    .map(|(key, value)| KeyValue::new(key.clone(), attribute_value(key, value)))
                    .collect();
                record(value, &attributes);
            }
        });
    };
    match family.kind {
        Kind::Counter => {
            meter
                .f64_observable_counter(name)
                .with_description(family.help)
                .with_unit(unit)
                .with_callback(move |observer| {
                    observe(&mut |value, attributes| observer.observe(value, attributes))
                })
                .build();
        }
        Kind::Gauge => {
            meter
                .f64_observable_gauge(name)
                .with_description(family.help)
                .with_unit(unit)
                .with_callback(move |observer| {
                    observe(&mut |value, attributes| observer.observe(value, attributes))
                })
                .build();
        }
    }
}

/// The carbon intensity and, for a file, its time: observed only while a
/// value is known.
fn register_carbon(meter: &Meter, carbon: &CarbonIntensity) {
    let intensity = carbon.clone();
    meter
        .f64_observable_gauge(CARBON_INTENSITY)
        .with_description(CARBON_INTENSITY_HELP)
        .with_unit("g/(kW.h)")
        .with_callback(move |observer| {
            if let Some((value, _)) = intensity.current() {
                observer.observe(value.0, &[]);
            }
        })
        .build();
    let timestamp = carbon.clone();
    meter
        .f64_observable_gauge(CARBON_INTENSITY_TIMESTAMP)
        .with_description(CARBON_INTENSITY_TIMESTAMP_HELP)
        .with_unit("s")
        .with_callback(move |observer| {
            if let Some((_, Some(unix_time))) = timestamp.current() {
                observer.observe(unix_time, &[]);
            }
        })
        .build();
}

/// `process.pid` is an integer in the conventions; every other value stays
/// the label's text.
fn attribute_value(key: &Key, text: &str) -> Value {
    match (key.as_str(), text.parse::<i64>()) {
        ("process.pid", Ok(pid)) => Value::I64(pid),
        _ => Value::from(text.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_without_path_gets_the_metrics_path() {
        assert_eq!(
            metrics_url("http://collector:4318").unwrap(),
            "http://collector:4318/v1/metrics"
        );
        assert_eq!(
            metrics_url("http://collector:4318/").unwrap(),
            "http://collector:4318/v1/metrics"
        );
        assert_eq!(
            metrics_url("http://gateway/otlp/v1/metrics").unwrap(),
            "http://gateway/otlp/v1/metrics"
        );
    }

    #[test]
    fn endpoint_that_is_not_plain_http_is_refused_by_name() {
        for bad in [
            "https://collector:4318",
            "collector:4318",
            "http://",
            "grpc://x",
            "http://collector:43x8",
        ] {
            let message = metrics_url(bad).unwrap_err().to_string();
            assert!(message.contains("--otlp-endpoint"), "{message}");
            assert!(message.contains(bad), "{message}");
        }
    }

    #[test]
    fn counters_lose_total_and_carry_their_unit() {
        let counter = Family::new("ergon_pod_energy_joules_total", "", Kind::Counter, &[]);
        assert_eq!(
            metric_name_and_unit(&counter),
            ("ergon_pod_energy_joules", "J")
        );
        let gauge = Family::new("ergon_node_power_watts", "", Kind::Gauge, &[]);
        assert_eq!(
            metric_name_and_unit(&gauge),
            ("ergon_node_power_watts", "W")
        );
        let seconds = Family::new("ergon_container_cpu_seconds_total", "", Kind::Counter, &[]);
        assert_eq!(
            metric_name_and_unit(&seconds),
            ("ergon_container_cpu_seconds", "s")
        );
        let info = Family::new("ergon_build_info", "", Kind::Gauge, &[]);
        assert_eq!(metric_name_and_unit(&info), ("ergon_build_info", "1"));
    }

    #[test]
    fn kubernetes_labels_take_semantic_convention_names() {
        assert_eq!(attribute_key("namespace"), "k8s.namespace.name");
        assert_eq!(attribute_key("pod"), "k8s.pod.name");
        assert_eq!(attribute_key("pod_uid"), "k8s.pod.uid");
        assert_eq!(attribute_key("container"), "k8s.container.name");
        assert_eq!(attribute_key("container_id"), "container.id");
        assert_eq!(attribute_key("domain"), "domain");
    }

    #[test]
    fn export_timeout_fits_in_the_interval() {
        assert_eq!(
            export_timeout(Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        assert_eq!(
            export_timeout(Duration::from_secs(60)),
            Duration::from_secs(10)
        );
    }
}
