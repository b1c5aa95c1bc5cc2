//! The event counters of [`super`]: things counted where they happen
//! (provider calls through [`metered`], deliveries, reports, rollbacks,
//! enrollments, sessions, alert routes). A leaf: it imports nothing of the
//! crate, so the modules that count (sessions, the driver, alert routes)
//! never depend on the scrape side, which reads them.

use async_trait::async_trait;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use rekey_providers::{CreateRequest, LastUsed, NewVersion, Provider, ProviderError, VersionInfo};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

pub(crate) type Labels = Vec<(&'static str, String)>;

/// Counters of things that happen, shared by the whole process.
pub struct Events {
    pub(crate) provider_calls: Family<Labels, Counter>,
    pub(crate) provider_errors: Family<Labels, Counter>,
    pub(crate) provider_seconds: Family<Labels, Histogram>,
    pub(crate) deliveries: Family<Labels, Counter>,
    pub(crate) reports: Family<Labels, Counter>,
    pub(crate) rollbacks: Family<Labels, Counter>,
    pub(crate) enrollments: Counter,
    pub(crate) sessions: Counter,
    pub(crate) alert_routes: Family<Labels, Counter>,
}

static EVENTS: LazyLock<Events> = LazyLock::new(|| Events {
    provider_calls: Family::default(),
    provider_errors: Family::default(),
    // 5 ms … ~80 s: a random value to a slow cloud API with retries.
    provider_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.5, 12))),
    deliveries: Family::default(),
    reports: Family::default(),
    rollbacks: Family::default(),
    enrollments: Counter::default(),
    sessions: Counter::default(),
    alert_routes: Family::default(),
});

/// The process-wide event counters.
pub fn events() -> &'static Events {
    &EVENTS
}

impl Events {
    /// A delivery of a new version sent down an agent's session.
    pub fn delivery(&self, secret: &str) {
        self.deliveries.get_or_create(&vec![("secret", secret.to_string())]).inc();
    }

    /// A stage report received from an agent (`stage`: the protocol's `Stage`).
    pub fn report(&self, secret: &str, stage: i32) {
        let stage = rekey_proto::v1::Stage::try_from(stage).map_or("unknown", |s| s.as_str_name());
        let stage = stage.strip_prefix("STAGE_").unwrap_or(stage).to_ascii_lowercase();
        let labels = vec![("secret", secret.to_string()), ("stage", stage)];
        self.reports.get_or_create(&labels).inc();
    }

    /// A rollback asked of an agent.
    pub fn rollback(&self, secret: &str) {
        self.rollbacks.get_or_create(&vec![("secret", secret.to_string())]).inc();
    }

    /// An agent enrolled with a join token.
    pub fn enrollment(&self) {
        self.enrollments.inc();
    }

    /// A delivery to an alert route (`slack`, `pagerduty`), sent or given up.
    pub fn alert_route(&self, route: &str, sent: bool) {
        let outcome = if sent { "sent" } else { "failed" };
        self.alert_routes.get_or_create(&vec![("route", route.to_string()), ("outcome", outcome.into())]).inc();
    }

    /// An agent session registered.
    pub fn session_opened(&self) {
        self.sessions.inc();
    }

    fn provider_call(&self, secret: &str, kind: &str, op: &str, started: Instant, outcome: Outcome) {
        let labels = vec![("secret", secret.to_string()), ("provider", kind.to_string()), ("operation", op.into())];
        self.provider_seconds.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
        let mut with_outcome = labels.clone();
        with_outcome.push(("outcome", outcome.as_str().into()));
        self.provider_calls.get_or_create(&with_outcome).inc();
        // Created at the first call, so `increase()` sees the first error too.
        let errors = self.provider_errors.get_or_create(&labels);
        if outcome == Outcome::Error {
            errors.inc();
        }
    }

    pub(crate) fn register(&self, r: &mut Registry) {
        r.register(
            "rekey_provider_calls",
            "Provider calls by secret, provider kind, operation and outcome (ok, not_found, error)",
            self.provider_calls.clone(),
        );
        r.register("rekey_provider_errors", "Provider calls that failed", self.provider_errors.clone());
        r.register_with_unit(
            "rekey_provider_call_duration",
            "How long provider calls took",
            Unit::Seconds,
            self.provider_seconds.clone(),
        );
        r.register("rekey_deliveries", "New versions sent to agents", self.deliveries.clone());
        r.register("rekey_reports", "Stage reports received from agents", self.reports.clone());
        r.register("rekey_rollbacks", "Rollbacks asked of agents", self.rollbacks.clone());
        r.register("rekey_token_enrollments", "Agents enrolled with a join token", self.enrollments.clone());
        r.register("rekey_sessions_opened", "Agent sessions registered", self.sessions.clone());
        let help = "Alert deliveries to Slack and PagerDuty routes, by outcome (sent, failed after retries)";
        r.register("rekey_alert_route_deliveries", help, self.alert_routes.clone());
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    NotFound,
    Error,
}

impl Outcome {
    fn of<T>(r: &Result<T, ProviderError>) -> Outcome {
        match r {
            Ok(_) => Outcome::Ok,
            Err(ProviderError::NotFound { .. }) => Outcome::NotFound,
            Err(_) => Outcome::Error,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NotFound => "not_found",
            Outcome::Error => "error",
        }
    }
}

/// `inner`, with every call counted and timed under `secret`'s name.
pub fn metered(secret: &str, inner: Arc<dyn Provider>) -> Arc<dyn Provider> {
    Arc::new(Metered { secret: secret.to_string(), inner })
}

struct Metered {
    secret: String,
    inner: Arc<dyn Provider>,
}

impl Metered {
    async fn time<T>(
        &self,
        op: &str,
        call: impl Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        let started = Instant::now();
        let r = call.await;
        events().provider_call(&self.secret, self.inner.kind(), op, started, Outcome::of(&r));
        r
    }
}

#[async_trait]
impl Provider for Metered {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn current(&self) -> Result<Option<VersionInfo>, ProviderError> {
        self.time("current", self.inner.current()).await
    }
    fn field_names(&self) -> Vec<String> {
        self.inner.field_names()
    }
    async fn create(&self, req: &CreateRequest) -> Result<NewVersion, ProviderError> {
        self.time("create", self.inner.create(req)).await
    }
    async fn deactivate(&self, version: &str) -> Result<(), ProviderError> {
        self.time("deactivate", self.inner.deactivate(version)).await
    }
    async fn reactivate(&self, version: &str) -> Result<(), ProviderError> {
        self.time("reactivate", self.inner.reactivate(version)).await
    }
    async fn delete(&self, version: &str) -> Result<(), ProviderError> {
        self.time("delete", self.inner.delete(version)).await
    }
    async fn list(&self) -> Result<Vec<VersionInfo>, ProviderError> {
        self.time("list", self.inner.list()).await
    }
    async fn last_used(&self, version: &str) -> Result<LastUsed, ProviderError> {
        self.time("last_used", self.inner.last_used(version)).await
    }
}
