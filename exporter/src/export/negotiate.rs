//! Content negotiation of `/metrics`: which format (`Accept`) and encoding
//! (`Accept-Encoding`) a scraper gets.
//!
//! Prometheus (2.x) asks, in order of preference,
//! `application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`
//! and always `Accept-Encoding: gzip`. As the Prometheus client libraries
//! do, the highest-weighted media type Ergon can write wins: OpenMetrics
//! 1.0.0 (or OpenMetrics without a version), else the text format 0.0.4,
//! which is also the answer to no `Accept` at all, to `*/*`, and to a header
//! that names nothing Ergon writes (a scraper that cannot read the text
//! format does not exist; a 406 would only lose the scrape). OpenMetrics
//! 0.0.1 is not offered: Prometheus lists 1.0.0 first anyway.

use super::{Encoding, Format};

/// One `Accept`-style entry: the value before `;`, its parameters, its `q`.
fn entries(header: &str) -> impl Iterator<Item = (&str, Vec<(&str, &str)>, f32)> {
    header.split(',').filter_map(|entry| {
        let mut parts = entry.split(';').map(str::trim);
        let value = parts.next().filter(|v| !v.is_empty())?;
        let mut q = 1.0;
        let mut params = Vec::new();
        for param in parts {
            let (name, arg) = param.split_once('=').unwrap_or((param, ""));
            let (name, arg) = (name.trim(), arg.trim().trim_matches('"'));
            if name.eq_ignore_ascii_case("q") {
                // An unparsable weight counts as 0: not acceptable.
                q = arg.parse().unwrap_or(0.0);
            } else {
                params.push((name, arg));
            }
        }
        Some((value, params, q))
    })
}

/// The format for an `Accept` header (absent: the text format).
pub fn format(accept: Option<&str>) -> Format {
    let Some(accept) = accept else {
        return Format::Text;
    };
    let mut best: Option<(f32, Format)> = None;
    for (media, params, q) in entries(accept) {
        let version = params
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("version"))
            .map(|(_, v)| *v);
        let offered = if media.eq_ignore_ascii_case("application/openmetrics-text") {
            matches!(version, None | Some("1.0.0")).then_some(Format::OpenMetrics)
        } else if media.eq_ignore_ascii_case("text/plain") {
            matches!(version, None | Some("0.0.4")).then_some(Format::Text)
        } else if media == "*/*" || media.eq_ignore_ascii_case("text/*") {
            Some(Format::Text)
        } else {
            None
        };
        // The first of equal weights wins, as the client listed them.
        if let Some(offered) = offered
            && q > 0.0
            && best.is_none_or(|(best_q, _)| q > best_q)
        {
            best = Some((q, offered));
        }
    }
    best.map_or(Format::Text, |(_, format)| format)
}

/// Gzip where `Accept-Encoding` allows it (`gzip` or `x-gzip` with a
/// weight above 0); the body as is otherwise.
pub fn encoding(accept_encoding: Option<&str>) -> Encoding {
    let gzip = accept_encoding.is_some_and(|header| {
        entries(header).any(|(coding, _, q)| {
            (coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip"))
                && q > 0.0
        })
    });
    if gzip {
        Encoding::Gzip
    } else {
        Encoding::Identity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Prometheus 2.42 sends (`scrape.go`, `scrapeAcceptHeader`).
    const PROMETHEUS: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[test]
    fn prometheus_gets_openmetrics_and_others_the_text_format() {
        assert_eq!(format(Some(PROMETHEUS)), Format::OpenMetrics);
        assert_eq!(
            format(Some("application/openmetrics-text; version=1.0.0")),
            Format::OpenMetrics
        );
        assert_eq!(
            format(Some("application/openmetrics-text")),
            Format::OpenMetrics
        );
        assert_eq!(format(None), Format::Text);
        assert_eq!(format(Some("*/*")), Format::Text);
        assert_eq!(format(Some("text/plain;version=0.0.4")), Format::Text);
        // Prometheus with `scrape_protocols` or an older release preferring
        // the text format.
        assert_eq!(
            format(Some(
                "text/plain;version=0.0.4;q=1,application/openmetrics-text;version=1.0.0;q=0.5"
            )),
            Format::Text
        );
        // Only what cannot be served, or refused with q=0: the text format.
        assert_eq!(
            format(Some("application/openmetrics-text;version=0.0.1")),
            Format::Text
        );
        assert_eq!(
            format(Some("application/openmetrics-text;q=0,text/plain;q=0.2")),
            Format::Text
        );
        assert_eq!(format(Some("application/json")), Format::Text);
        assert_eq!(format(Some(",;;, ;q=")), Format::Text);
    }

    #[test]
    fn gzip_only_where_asked_for_with_a_weight() {
        assert_eq!(encoding(Some("gzip")), Encoding::Gzip);
        assert_eq!(
            encoding(Some("deflate, gzip;q=1.0, *;q=0.5")),
            Encoding::Gzip
        );
        assert_eq!(encoding(Some("x-gzip")), Encoding::Gzip);
        assert_eq!(encoding(Some("GZIP")), Encoding::Gzip);
        assert_eq!(encoding(Some("gzip;q=0")), Encoding::Identity);
        assert_eq!(encoding(Some("br, deflate")), Encoding::Identity);
        assert_eq!(encoding(Some("*")), Encoding::Identity);
        assert_eq!(encoding(None), Encoding::Identity);
    }
}
