//! The metric names a PromQL expression selects, for checking that the
//! dashboards and rules use only metrics something produces.

use std::collections::BTreeSet;

pub const PROMQL_AGGREGATIONS: [&str; 14] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
pub const PROMQL_KEYWORDS: [&str; 13] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "start",
];

/// Metric names a PromQL expression selects (after variable substitution).
/// Function and aggregation names, label names in `by (...)`/`on (...)`,
/// matchers, strings, durations and numbers are not metric names.
pub fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_part = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_group = |mut j: usize, open: char, close: char| -> usize {
        // j points at `open`; returns the index after the matching `close`,
        // stepping over strings.
        let mut depth = 0;
        while j < chars.len() {
            let c = chars[j];
            if c == '"' || c == '\'' || c == '`' {
                j += 1;
                while j < chars.len() && chars[j] != c {
                    if chars[j] == '\\' {
                        j += 1;
                    }
                    j += 1;
                }
            } else if c == open {
                depth += 1;
            } else if c == close {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            i = skip_group(i, '{', '}');
        } else if c == '[' {
            i = skip_group(i, '[', ']');
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // Numbers (3.6e6, 0x1f) and durations (5m).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                if (chars[i] == 'e' || chars[i] == 'E')
                    && matches!(chars.get(i + 1), Some('+' | '-'))
                {
                    i += 1;
                }
                i += 1;
            }
        } else if is_start(c) {
            let start = i;
            while i < chars.len() && is_part(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let followed_by_paren = chars.get(next) == Some(&'(');
            let lower = word.to_ascii_lowercase();
            if matches!(
                lower.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) {
                if followed_by_paren {
                    i = skip_group(next, '(', ')');
                }
            } else if PROMQL_AGGREGATIONS.contains(&lower.as_str())
                || PROMQL_KEYWORDS.contains(&lower.as_str())
                || followed_by_paren
                || matches!(lower.as_str(), "inf" | "nan")
            {
                // Function, aggregation or keyword.
            } else {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}
