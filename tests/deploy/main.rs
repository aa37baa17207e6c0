//! Deployment checks: the Helm chart and kustomize bases in `daemonset/`, the
//! Grafana dashboards in `dashboards/`, and the vehicle pipeline in `stack/`,
//! proven with the real tools rather than by reading YAML by eye.
//!
//! Why each check exists:
//! - `helm lint --strict`, `helm template` and `kubectl kustomize` are what an
//!   operator runs; a chart that lints but renders an object the API server
//!   would reject is caught by validating every rendered object against the
//!   `kubernetes-models` schemas (CRDs included), and against their
//!   TypeScript interfaces for unknown fields, which the OpenAPI schemas
//!   let through (a misspelt `hostPid` would otherwise pass). A
//!   deliberately broken object of every schema family must fail, so the
//!   validator is known to bite.
//! - The same exporter ships as a chart and as a kustomize base. The base is
//!   kept equal to the chart's render (minus Helm's own labels), variant by
//!   variant, so the two cannot drift.
//! - Ports, Service names and Secrets are cross-references that no schema
//!   checks: the DaemonSet, Service, ServiceMonitor, scrape annotations,
//!   Prometheus configuration and the exporter's default port must agree;
//!   every datasource URL, DNS discovery name and Ingress backend must name a
//!   Service the stack defines; every Secret the stack references must be
//!   documented for the operator and none may be committed.
//! - `promtool` (Debian's `prometheus` package) checks the rules, the stack's
//!   Prometheus configuration, and every dashboard query's syntax (each is
//!   wrapped as a recording rule).
//! - The end-to-end check needs the exporter binary: `ERGON_BIN` names it.
//!   A real Prometheus scrapes it and every dashboard panel query, with its
//!   template variables filled from the live label values, must return data;
//!   every metric name the dashboards and rules use must be in the
//!   exporter's real `/metrics`. Without `ERGON_BIN` that test says so on
//!   stderr and passes; `cargo xtask test` always sets it.
//!
//! Tools are found in `<repo>/.tools/` (installed by `tests/setup-tools.sh`,
//! which `cargo xtask setup` runs) or on PATH.
//!
//! One module per thing checked; what they share is in `common`.

mod chart;
mod common;
mod dashboards;
mod kustomize;
mod live;
mod metrics;
mod promql;
mod rules;
mod schemas;
mod security;
mod stack;
