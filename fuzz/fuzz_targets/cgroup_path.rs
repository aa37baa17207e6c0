//! Cgroup path classification, with the invariants the labels rely on.
#![no_main]

use ergon::workload::cgroup::{MAX_BUCKET_BYTES, Workload, bounded_label, classify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = String::from_utf8_lossy(data);
    match classify(&path) {
        Workload::Container {
            pod_uid,
            container_id,
            ..
        } => {
            assert!(!pod_uid.is_empty() && !pod_uid.contains('/'), "{pod_uid:?}");
            assert!(
                container_id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{container_id:?}"
            );
        }
        Workload::Pod { pod_uid, .. } => {
            assert!(!pod_uid.is_empty() && !pod_uid.contains('/'), "{pod_uid:?}");
        }
        Workload::System { bucket } => {
            assert!(bucket.len() <= MAX_BUCKET_BYTES, "{bucket:?}");
        }
    }
    for max in [0, 1, 9, 10, 64, 128] {
        let bounded = bounded_label(&path, max);
        assert!(
            bounded.len() <= max.max(9) || bounded == path,
            "{max}: {bounded:?}"
        );
    }
});
