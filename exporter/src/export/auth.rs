//! Authorization of `/metrics` by bearer token (`--authorize-metrics`), off
//! by default.
//!
//! The same check kube-rbac-proxy puts in front of node_exporter and Kepler:
//! the scraper sends its service account token; a `TokenReview` asks the API
//! server who it is, and a `SubjectAccessReview` whether that user may `get`
//! the non-resource URL `/metrics`. A ClusterRole with
//! `nonResourceURLs: ["/metrics"], verbs: ["get"]` bound to Prometheus' service
//! account grants it. `/healthz` and `/readyz` stay open: the kubelet's probes
//! carry no token.
//!
//! Decisions are cached for a short time, keyed by a SHA-256 of the token
//! (the token itself is not kept): a Prometheus scraping every 15 s costs the
//! API server two requests a minute per node, and a revoked permission stops
//! working within [`ALLOWED_FOR`]. Failures to reach the API are not cached
//! and fail closed: the scrape gets 503 and the log says why, never the
//! metrics.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;

/// How long an allowed token is trusted without asking again.
pub const ALLOWED_FOR: Duration = Duration::from_secs(60);
/// How long a refused token is refused without asking again.
pub const REFUSED_FOR: Duration = Duration::from_secs(10);
/// One review must answer within this, or the scrape is refused (503).
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// Decisions kept at most (distinct tokens seen within the cache times).
const MAX_CACHED: usize = 1024;

/// The outcome of checking one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// No token, or the API server does not know it (401).
    Unauthenticated(String),
    /// A known user without permission to `get` `/metrics` (403).
    Forbidden(String),
    /// The API server could not be asked (503); not cached.
    Unavailable(String),
}

/// Checks bearer tokens against the Kubernetes API.
pub struct Authorizer {
    client: kube::Client,
    cache: Mutex<HashMap<[u8; 32], (Decision, Instant)>>,
}

impl Authorizer {
    pub fn new(client: kube::Client) -> Authorizer {
        Authorizer {
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the request with this `Authorization` header may read
    /// `/metrics`.
    pub async fn check(&self, authorization: Option<&[u8]>) -> Decision {
        let Some(token) = authorization
            .and_then(|value| value.strip_prefix(b"Bearer "))
            .and_then(|token| std::str::from_utf8(token).ok())
            .map(str::trim)
            .filter(|token| !token.is_empty())
        else {
            return Decision::Unauthenticated(
                "no bearer token: send `Authorization: Bearer <service account token>`".into(),
            );
        };
        let key: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        let now = Instant::now();
        if let Some((decision, until)) = self.lock().get(&key)
            && now < *until
        {
            return decision.clone();
        }
        let decision = match tokio::time::timeout(REVIEW_TIMEOUT, self.review(token)).await {
            Ok(decision) => decision,
            Err(_) => Decision::Unavailable(format!(
                "the Kubernetes API did not answer the token review within {REVIEW_TIMEOUT:?}"
            )),
        };
        let keep_for = match &decision {
            Decision::Allowed => ALLOWED_FOR,
            Decision::Unauthenticated(_) | Decision::Forbidden(_) => REFUSED_FOR,
            Decision::Unavailable(reason) => {
                tracing::warn!("refusing a /metrics scrape (503), fail closed: {reason}");
                return decision;
            }
        };
        let mut cache = self.lock();
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, (_, until)| now < *until);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(key, (decision.clone(), now + keep_for));
        decision
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (Decision, Instant)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn review(&self, token: &str) -> Decision {
        let unavailable = |what: &str, e: kube::Error| {
            Decision::Unavailable(format!(
                "the Kubernetes API refused or failed the {what} ({e}); the exporter's service \
                 account needs `create` on tokenreviews.authentication.k8s.io and \
                 subjectaccessreviews.authorization.k8s.io (the chart grants it with auth.enabled)"
            ))
        };
        let reviews: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: None,
            },
            ..TokenReview::default()
        };
        let reviewed = match reviews.create(&PostParams::default(), &review).await {
            Ok(reviewed) => reviewed,
            Err(e) => return unavailable("token review", e),
        };
        let status = reviewed.status.unwrap_or_default();
        let user = match (status.authenticated, status.user) {
            (Some(true), Some(user)) => user,
            _ => {
                return Decision::Unauthenticated(format!(
                    "the token was not accepted by the Kubernetes API{}",
                    status.error.map(|e| format!(": {e}")).unwrap_or_default()
                ));
            }
        };
        let username = user.username.clone().unwrap_or_default();
        let access: kube::Api<SubjectAccessReview> = kube::Api::all(self.client.clone());
        let question = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some("/metrics".into()),
                    verb: Some("get".into()),
                }),
                resource_attributes: None,
            },
            ..SubjectAccessReview::default()
        };
        let answer = match access.create(&PostParams::default(), &question).await {
            Ok(answer) => answer,
            Err(e) => return unavailable("subject access review", e),
        };
        match answer.status {
            Some(status) if status.allowed => Decision::Allowed,
            status => Decision::Forbidden(format!(
                "{username} may not get /metrics{}: grant it a ClusterRole with \
                 nonResourceURLs [/metrics], verbs [get]",
                status
                    .and_then(|s| s.reason)
                    .filter(|r| !r.is_empty())
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            )),
        }
    }
}
