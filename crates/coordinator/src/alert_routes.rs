//! Alerts where on-call looks: Slack-compatible incoming webhooks and the
//! PagerDuty Events API v2, each a `[[alerts.route]]` with a minimum
//! severity, beside the signed generic webhook of [`crate::alerts`].
//!
//! PagerDuty gets a `trigger` per alert with a dedup key per alert
//! (`rekey:SECRET:ROTATION:KIND`: a repeat of the same alert updates the
//! same incident) and a `resolve` once the alert's cause is over: for the
//! old key used after the switch or during grace, when the rotation has
//! left the hold (monitoring, completed, aborted); for a use after
//! revocation or a leftover copy, when the rotation's monitoring ends.
//! Slack gets a message for each. Which alerts are open is kept in memory:
//! after a restart of rekeyd an open incident is resolved by hand.
//!
//! The Slack URL and the PagerDuty routing key are secrets: read from a 0600
//! file or an environment variable at each send, never logged (errors are
//! stripped of the URL).
//!
//! Tasks: [`RouterTask::run`] (supervised as `alert-routes`), one short task
//! per delivery (at most [`CONCURRENCY`] in flight).

use crate::alerts::{Alert, AlertKind, RouterHandle, Severity};
use crate::engine::machine::RotationState;
use rekey_common::config::ConfigError;
use rekey_providers::credential::Source;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// PagerDuty's Events API v2 endpoint (overridable per route, e.g. for a proxy).
pub const PAGERDUTY_URL: &str = "https://events.pagerduty.com/v2/enqueue";
/// Deliveries in flight at once, over every route.
const CONCURRENCY: usize = 8;
/// Alerts waiting for the router; beyond this an alert is logged as not routed.
const QUEUE: usize = 1024;
/// Attempts per delivery (a 4xx other than 429 is not retried).
const ATTEMPTS: u32 = 5;

/// `[[alerts.route]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// `slack` or `pagerduty`.
    kind: String,
    /// `warning` (every alert, the default) or `critical`.
    #[serde(default)]
    min_severity: Option<String>,
    /// Slack: the incoming-webhook URL, from a 0600 file or a variable.
    url_file: Option<PathBuf>,
    url_env: Option<String>,
    /// PagerDuty: the integration's routing key, from a 0600 file or a variable.
    routing_key_file: Option<PathBuf>,
    routing_key_env: Option<String>,
    /// PagerDuty: the Events API URL (default [`PAGERDUTY_URL`]).
    events_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A Slack-compatible incoming webhook; its URL is the secret.
    Slack { url: Source },
    /// PagerDuty Events API v2.
    PagerDuty { routing_key: Source, events_url: String },
}

/// One validated route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub target: Target,
    pub min_severity: Severity,
}

impl Route {
    /// `slack` or `pagerduty`, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self.target {
            Target::Slack { .. } => "slack",
            Target::PagerDuty { .. } => "pagerduty",
        }
    }

    fn wants(&self, s: Severity) -> bool {
        rank(s) >= rank(self.min_severity)
    }
}

fn rank(s: Severity) -> u8 {
    match s {
        Severity::Warning => 1,
        Severity::Critical => 2,
    }
}

/// Validates `[[alerts.route]]`: errors name the file and `alerts.route[i].FIELD`.
pub fn validate(path: &Path, base: &Path, raw: Vec<RawRoute>) -> Result<Vec<Route>, ConfigError> {
    raw.into_iter().enumerate().map(|(i, r)| route(path, base, i, r)).collect()
}

fn route(path: &Path, base: &Path, i: usize, r: RawRoute) -> Result<Route, ConfigError> {
    let err = |field: &str, m: String| ConfigError::field(path, format!("alerts.route[{i}].{field}"), m);
    let min_severity = match r.min_severity.as_deref() {
        None | Some("warning") => Severity::Warning,
        Some("critical") => Severity::Critical,
        Some(other) => return Err(err("min_severity", format!("expected \"warning\" or \"critical\", got {other:?}"))),
    };
    let source = |name: &str, file: Option<PathBuf>, env: Option<String>| {
        let file = file.map(|f| base.join(f));
        let s = Source::pick(name, &file, &env, true).map_err(|(f, m)| err(&f, m))?.expect("required");
        s.check(name).map_err(|(f, m)| err(&f, m))?;
        Ok::<_, ConfigError>(s)
    };
    let target = match r.kind.as_str() {
        "slack" => {
            if r.routing_key_file.is_some() || r.routing_key_env.is_some() || r.events_url.is_some() {
                return Err(err("kind", "a slack route takes url_file or url_env only".into()));
            }
            Target::Slack { url: source("url", r.url_file, r.url_env)? }
        }
        "pagerduty" => {
            if r.url_file.is_some() || r.url_env.is_some() {
                return Err(err("url_file", "a pagerduty route takes routing_key_file or routing_key_env".into()));
            }
            let events_url = r.events_url.unwrap_or_else(|| PAGERDUTY_URL.to_string());
            if !(events_url.starts_with("https://") || events_url.starts_with("http://")) {
                return Err(err("events_url", format!("expected an http(s) URL, got {events_url:?}")));
            }
            Target::PagerDuty { routing_key: source("routing_key", r.routing_key_file, r.routing_key_env)?, events_url }
        }
        other => return Err(err("kind", format!("expected \"slack\" or \"pagerduty\", got {other:?}"))),
    };
    Ok(Route { target, min_severity })
}

/// The dedup key of an alert: one PagerDuty incident per secret, rotation and kind.
pub fn dedup_key(a: &Alert) -> String {
    format!("rekey:{}:{}:{}", a.secret, a.rotation.as_deref().unwrap_or("-"), a.kind.as_str())
}

/// Whether an alert's cause is over, given its rotation's state now.
pub fn is_resolved(kind: AlertKind, state: RotationState) -> bool {
    match kind {
        // The hold: over once revocation went ahead or the rotation ended.
        AlertKind::OldVersionUsed | AlertKind::OldVersionUsedDuringGrace => {
            state == RotationState::Monitoring || state.is_terminal()
        }
        // Raised while monitoring: over when monitoring ends.
        AlertKind::OldVersionUsedAfterRevocation | AlertKind::LeftoverFound => state.is_terminal(),
    }
}

/// The rotation's state, read when rotations change (to resolve alerts).
pub type Lookup = Arc<dyn Fn(&str) -> Option<RotationState> + Send + Sync>;

/// The task that delivers alerts to the routes and resolves them.
pub struct RouterTask {
    routes: Arc<Vec<Route>>,
    rx: mpsc::Receiver<Alert>,
    changes: watch::Receiver<u64>,
    lookup: Lookup,
    client: reqwest::Client,
    /// Open alerts by dedup key: (kind, rotation, the alert as triggered).
    open: BTreeMap<String, Alert>,
}

/// A router for `routes` (none: no task and no handle).
pub fn router(routes: Vec<Route>, changes: watch::Receiver<u64>, lookup: Lookup) -> Option<(RouterHandle, RouterTask)> {
    if routes.is_empty() {
        return None;
    }
    let (tx, rx) = mpsc::channel(QUEUE);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().ok()?;
    let task = RouterTask { routes: Arc::new(routes), rx, changes, lookup, client, open: BTreeMap::new() };
    Some((RouterHandle::new(tx), task))
}

/// `alerts`, also routed to `routes`, and the task that sends them (none
/// without routes). Alerts are resolved as `state`'s rotations change.
pub fn attach(
    alerts: crate::alerts::Alerts,
    routes: &[Route],
    state: &crate::engine::state::EngineState,
) -> (crate::alerts::Alerts, Option<RouterTask>) {
    let reader = state.clone();
    let lookup: Lookup = Arc::new(move |id| reader.get_rotation(id).ok().flatten().map(|r| r.state));
    match router(routes.to_vec(), state.rotation_changes(), lookup) {
        Some((handle, task)) => (alerts.with_routes(Some(handle)), Some(task)),
        None => (alerts, None),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Trigger,
    Resolve,
}

impl RouterTask {
    /// Delivers alerts and resolutions until `stop`.
    pub async fn run(mut self, stop: CancellationToken) -> Result<(), std::convert::Infallible> {
        let mut inflight = tokio::task::JoinSet::new();
        loop {
            while inflight.len() >= CONCURRENCY {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = inflight.join_next() => {}
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
                a = self.rx.recv() => match a {
                    Some(a) => {
                        if a.rotation.is_some() {
                            self.open.insert(dedup_key(&a), a.clone());
                        }
                        self.send(&mut inflight, &a, Action::Trigger);
                    }
                    None => return Ok(()),
                },
                c = self.changes.changed() => {
                    if c.is_err() {
                        return Ok(());
                    }
                    for a in self.resolved() {
                        self.send(&mut inflight, &a, Action::Resolve);
                    }
                }
            }
        }
    }

    /// Open alerts whose cause is over, removed from the open set.
    fn resolved(&mut self) -> Vec<Alert> {
        let done: Vec<String> = self
            .open
            .iter()
            .filter(|(_, a)| {
                let state = a.rotation.as_deref().and_then(|r| (self.lookup)(r));
                state.is_some_and(|s| is_resolved(a.kind, s))
            })
            .map(|(k, _)| k.clone())
            .collect();
        done.iter().filter_map(|k| self.open.remove(k)).collect()
    }

    fn send(&self, inflight: &mut tokio::task::JoinSet<()>, a: &Alert, action: Action) {
        for route in self.routes.iter().filter(|r| r.wants(a.severity)) {
            let (route, a, client) = (route.clone(), a.clone(), self.client.clone());
            inflight.spawn(async move {
                let outcome = deliver(&client, &route, &a, action, ATTEMPTS).await;
                crate::metrics::events::events().alert_route(route.kind(), outcome.is_ok());
                match outcome {
                    Ok(()) => tracing::info!(alert = a.seq, route = route.kind(), ?action, "alert sent"),
                    Err(e) => {
                        tracing::error!(alert = a.seq, route = route.kind(), ?action, error = %e, "alert not sent")
                    }
                }
            });
        }
    }
}

/// The Slack message: `text` (the notification) and `blocks` (the layout).
pub fn slack_body(a: &Alert, resolved: bool) -> serde_json::Value {
    let icon = match (resolved, a.severity) {
        (true, _) => ":white_check_mark:",
        (false, Severity::Critical) => ":rotating_light:",
        (false, Severity::Warning) => ":warning:",
    };
    let head = if resolved { "resolved".to_string() } else { a.severity.as_str().to_string() };
    let text = format!("{icon} rekey {head}: {}", a.message);
    let context = format!(
        "secret `{}` · rotation `{}` · alert #{} · {}",
        a.secret,
        a.rotation.as_deref().unwrap_or("-"),
        a.seq,
        a.kind.as_str()
    );
    serde_json::json!({
        "text": text,
        "blocks": [
            { "type": "section", "text": { "type": "mrkdwn", "text": text } },
            { "type": "context", "elements": [ { "type": "mrkdwn", "text": context } ] },
        ],
    })
}

/// The PagerDuty Events v2 event (`routing_key` filled in at send time).
pub fn pagerduty_body(a: &Alert, action_resolve: bool, routing_key: &str) -> serde_json::Value {
    if action_resolve {
        return serde_json::json!({
            "routing_key": routing_key, "event_action": "resolve", "dedup_key": dedup_key(a),
        });
    }
    let summary: String = format!("rekey: {}", a.message).chars().take(1024).collect();
    serde_json::json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key(a),
        "payload": {
            "summary": summary,
            "severity": a.severity.as_str(),
            "source": "rekeyd",
            "component": a.secret,
            "group": a.rotation,
            "class": a.kind.as_str(),
            "timestamp": rekey_common::time::format_unix_ms(a.at_ms),
            "custom_details": { "alert": a.seq, "details": a.details },
        },
    })
}

async fn deliver(
    client: &reqwest::Client,
    route: &Route,
    a: &Alert,
    action: Action,
    attempts: u32,
) -> Result<(), String> {
    let (url, body) = match &route.target {
        Target::Slack { url } => {
            let url = url.read()?;
            let url = String::from_utf8(url.expose().to_vec()).map_err(|_| "the slack URL is not UTF-8".to_string())?;
            (url, slack_body(a, action == Action::Resolve))
        }
        Target::PagerDuty { routing_key, events_url } => {
            let key = routing_key.read()?;
            let key = std::str::from_utf8(key.expose()).map_err(|_| "the routing key is not UTF-8".to_string())?;
            (events_url.clone(), pagerduty_body(a, action == Action::Resolve, key))
        }
    };
    let body = serde_json::to_vec(&body).expect("json");
    let mut backoff = Duration::from_millis(500);
    let mut last = String::new();
    for attempt in 1..=attempts {
        let req = client.post(&url).header("content-type", "application/json").body(body.clone());
        match req.send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) if r.status().is_client_error() && r.status().as_u16() != 429 => {
                return Err(format!("refused with HTTP {}", r.status().as_u16()));
            }
            Ok(r) => last = format!("HTTP {}", r.status().as_u16()),
            // Never the URL: a Slack webhook's URL is its secret.
            Err(e) => last = e.without_url().to_string(),
        }
        if attempt < attempts {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
    Err(format!("{last} after {attempts} attempts"))
}

#[cfg(test)]
#[path = "alert_routes_tests.rs"]
mod tests;
