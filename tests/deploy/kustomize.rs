//! The kustomize base and overlays of the exporter equal the chart's
//! variants (minus Helm's own labels), so the two cannot drift.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::common::*;

/// Drops what Helm adds and kustomize does not (its own labels), and the
/// Namespace object the kustomize base carries.
pub fn normalised(objects: &[Rendered]) -> BTreeMap<(String, String), Value> {
    let mut by_id = BTreeMap::new();
    for rendered in objects {
        if rendered.kind() == "Namespace" {
            continue;
        }
        let mut object = rendered.object.clone();
        let strip = |metadata: &mut Value| {
            if let Some(labels) = metadata.get_mut("labels").and_then(Value::as_object_mut) {
                labels.remove("helm.sh/chart");
                labels.remove("app.kubernetes.io/managed-by");
            }
        };
        strip(&mut object["metadata"]);
        if object["spec"]["template"]["metadata"].is_object() {
            strip(&mut object["spec"]["template"]["metadata"]);
        }
        by_id.insert(
            (rendered.kind().to_string(), rendered.name().to_string()),
            object,
        );
    }
    by_id
}

#[test]
pub fn kustomize_base_and_overlays_equal_the_chart_variants() {
    for (values, dir) in [
        (None, "daemonset/kustomize/base"),
        (
            Some("ci/least-privilege-values.yaml"),
            "daemonset/kustomize/overlays/least-privilege",
        ),
        (
            Some("ci/no-operator-values.yaml"),
            "daemonset/kustomize/overlays/no-operator",
        ),
    ] {
        let helm = normalised(&helm_template(
            values.map(|v| chart_dir().join(v)).as_deref(),
        ));
        let kustomized = normalised(&kustomize(&repo_root().join(dir)));
        let helm_ids: BTreeSet<_> = helm.keys().collect();
        let kustomize_ids: BTreeSet<_> = kustomized.keys().collect();
        assert_eq!(
            helm_ids, kustomize_ids,
            "{dir} and the chart ({values:?}) render different objects"
        );
        for (id, object) in &helm {
            assert_eq!(
                object, &kustomized[id],
                "{dir}: {id:?} differs from the chart's render with {values:?}; change both together"
            );
        }
    }
}
