//! Alerts: things an operator must look at now — an old key used after it
//! should no longer be, a leftover copy of a revoked value, revocation held
//! back by evidence. Every alert is written to the store and the log, and,
//! when a webhook is configured, POSTed as JSON with an HMAC-SHA256 signature
//! of the body (`X-Rekey-Signature: sha256=HEX`), retried with exponential
//! backoff. Alerts name keys by id and hosts by name: never a secret value.
//!
//! Tasks: [`WebhookSender::run`], under the supervisor, sends queued alerts
//! (at most 8 deliveries in flight, each with bounded attempts).

pub use crate::engine::machine::{AlertKind, Severity};
use crate::store::{Store, Tree};
use rekey_common::error::Chain;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub seq: u64,
    pub at_ms: i64,
    pub kind: AlertKind,
    pub severity: Severity,
    pub secret: String,
    pub rotation: Option<String>,
    pub message: String,
    pub details: serde_json::Value,
    /// Webhook delivery: `not_configured`, `pending`, `delivered`, `failed: …`.
    pub delivery: String,
}

/// Where alerts go besides the store and the log.
#[derive(Clone)]
pub struct Webhook {
    pub url: String,
    /// Key of the body signature (from a 0600 file or an environment variable).
    pub key: Arc<rekey_common::secret::SecretBytes>,
    pub max_attempts: u32,
    pub first_backoff: Duration,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook").field("url", &self.url).field("max_attempts", &self.max_attempts).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("alert store i/o")]
    Store(#[from] crate::store::StoreError),
    #[error("corrupt alert record: {0}")]
    Corrupt(String),
}

#[derive(Clone)]
pub struct Alerts {
    /// Alerts by number (`Tree::Alerts`); the last number handed out in
    /// `Tree::AlertSeq` (`LAST_SEQ`) — not sled's `generate_id`, which
    /// reserves a block of ids per open and so jumps after every restart
    /// (2000002 → 4000001): alert numbers are dense.
    store: Store,
    /// Alerts waiting for the webhook task (none without a webhook).
    outbox: Option<mpsc::Sender<Alert>>,
    /// Slack and PagerDuty routes (`[[alerts.route]]`), if any.
    routes: Option<RouterHandle>,
}

/// Alerts waiting for the webhook; beyond this, an alert is stored and
/// logged but marked as not sent.
const WEBHOOK_QUEUE: usize = 1024;
/// The key of the last alert number in the `alert_seq` tree.
const LAST_SEQ: &[u8] = b"last";

/// Webhook deliveries (each with its retries) in flight at once.
const WEBHOOK_CONCURRENCY: usize = 8;

/// The task that sends alerts to the webhook, with retries, a few at a time.
pub struct WebhookSender {
    hook: Webhook,
    alerts: Alerts,
    rx: mpsc::Receiver<Alert>,
}

/// `sha256=HEX` of HMAC-SHA256(key, body): what receivers verify.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    format!("sha256={}", hex::encode(ring::hmac::sign(&k, body).as_ref()))
}

impl Alerts {
    /// The alert log, and the webhook's sender task if a webhook is configured
    /// (run it under the supervisor).
    pub fn open(store: &Store, webhook: Option<Webhook>) -> Result<(Alerts, Option<WebhookSender>), AlertError> {
        let Some(hook) = webhook else {
            return Ok((Alerts { store: store.clone(), outbox: None, routes: None }, None));
        };
        let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
        let alerts = Alerts { store: store.clone(), outbox: Some(tx), routes: None };
        Ok((alerts.clone(), Some(WebhookSender { hook, alerts, rx })))
    }

    /// These alerts, also sent to the Slack/PagerDuty routes behind `routes`.
    pub fn with_routes(mut self, routes: Option<RouterHandle>) -> Alerts {
        self.routes = routes;
        self
    }

    pub fn list(&self) -> Result<Vec<Alert>, AlertError> {
        self.store
            .scan(Tree::Alerts, b"")?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| AlertError::Corrupt(e.to_string())))
            .collect()
    }

    /// The next alert number: one more than the last handed out or stored
    /// (stores written before this counter existed continue after their
    /// highest alert), atomic across concurrent raisers.
    fn next_seq(&self) -> Result<u64, AlertError> {
        let stored = match self.store.last(Tree::Alerts)? {
            Some((k, _)) => be_u64(&k)?,
            None => 0,
        };
        self.store.transaction(true, |t| {
            let last = t.get(Tree::AlertSeq, LAST_SEQ)?.map(|v| be_u64(&v)).transpose()?.unwrap_or(0);
            let next = last.max(stored).saturating_add(1);
            t.put(Tree::AlertSeq, LAST_SEQ, &next.to_be_bytes())?;
            Ok(next)
        })
    }

    /// Records an alert, logs it, and sends it to the webhook in the background.
    pub fn raise(
        &self,
        kind: AlertKind,
        severity: Severity,
        secret: &str,
        rotation: Option<&str>,
        message: String,
        details: serde_json::Value,
    ) -> Result<Alert, AlertError> {
        let seq = self.next_seq()?;
        let alert = Alert {
            seq,
            at_ms: rekey_common::time::now_unix_ms(),
            kind,
            severity,
            secret: secret.to_string(),
            rotation: rotation.map(str::to_string),
            message,
            details,
            delivery: if self.outbox.is_some() { "pending".into() } else { "not_configured".into() },
        };
        self.put(&alert)?;
        tracing::warn!(alert = seq, kind = kind.as_str(), severity = severity.as_str(), secret, rotation = ?rotation, message = %alert.message, "ALERT");
        if let Some(routes) = &self.routes {
            routes.route(&alert);
        }
        if let Some(outbox) = &self.outbox
            && let Err(e) = outbox.try_send(alert.clone())
        {
            let mut a = alert.clone();
            a.delivery = format!("failed: not sent to the webhook ({e})");
            tracing::error!(alert = seq, "alert webhook queue full: alert not sent");
            self.put(&a)?;
            return Ok(a);
        }
        Ok(alert)
    }

    fn put(&self, a: &Alert) -> Result<(), AlertError> {
        Ok(self.store.put(Tree::Alerts, &a.seq.to_be_bytes(), &serde_json::to_vec(a).expect("json"))?)
    }
}

fn be_u64(b: &[u8]) -> Result<u64, AlertError> {
    let a: [u8; 8] = b.try_into().map_err(|_| AlertError::Corrupt(format!("alert number of {} bytes", b.len())))?;
    Ok(u64::from_be_bytes(a))
}

impl WebhookSender {
    /// Sends queued alerts until `stop`; deliveries still retrying then are
    /// abandoned (their alerts stay `pending` in the store).
    pub async fn run(mut self, stop: CancellationToken) -> Result<(), std::convert::Infallible> {
        let mut inflight = tokio::task::JoinSet::new();
        loop {
            if inflight.len() >= WEBHOOK_CONCURRENCY {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = inflight.join_next() => continue,
                }
            }
            let alert = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                Some(_) = inflight.join_next(), if !inflight.is_empty() => continue,
                a = self.rx.recv() => match a {
                    Some(a) => a,
                    None => return Ok(()),
                },
            };
            let (hook, alerts) = (self.hook.clone(), self.alerts.clone());
            inflight.spawn(async move {
                let outcome = deliver(&hook, &alert).await;
                let mut a = alert;
                a.delivery = match &outcome {
                    Ok(()) => "delivered".into(),
                    Err(e) => format!("failed: {e}"),
                };
                if let Err(e) = &outcome {
                    tracing::error!(alert = a.seq, url = %hook.url, error = %e, "alert webhook delivery failed");
                }
                if let Err(e) = alerts.put(&a) {
                    tracing::error!(alert = a.seq, error = %Chain(&e), "cannot record the webhook outcome");
                }
            });
        }
    }
}

async fn deliver(hook: &Webhook, a: &Alert) -> Result<(), String> {
    let body = serde_json::to_vec(&serde_json::json!({ "source": "rekey", "alert": a })).expect("json");
    let sig = signature(hook.key.expose(), &body);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().map_err(|e| e.to_string())?;
    let mut backoff = hook.first_backoff;
    let mut last = String::new();
    for attempt in 1..=hook.max_attempts.max(1) {
        let r = client
            .post(&hook.url)
            .header("content-type", "application/json")
            .header("x-rekey-signature", &sig)
            .header("x-rekey-alert", a.seq.to_string())
            .body(body.clone())
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => return Ok(()),
            Ok(resp) => last = format!("HTTP {}", resp.status().as_u16()),
            Err(e) => last = e.to_string(),
        }
        tracing::warn!(alert = a.seq, attempt, error = %last, "alert webhook attempt failed");
        if attempt < hook.max_attempts {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
    }
    Err(format!("{last} after {} attempts", hook.max_attempts))
}

/// Where [`crate::alerts::Alerts::raise`] hands alerts to the routes (cheap to clone).
#[derive(Clone, Debug)]
pub struct RouterHandle {
    tx: mpsc::Sender<Alert>,
}

impl RouterHandle {
    pub(crate) fn new(tx: mpsc::Sender<Alert>) -> RouterHandle {
        RouterHandle { tx }
    }

    /// Queues an alert for the routes; never waits.
    pub fn route(&self, a: &Alert) {
        if self.tx.try_send(a.clone()).is_err() {
            tracing::error!(alert = a.seq, "alert routes queue full: alert not sent to slack/pagerduty");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raise(alerts: &Alerts) -> u64 {
        let details = serde_json::json!({});
        alerts.raise(AlertKind::LeftoverFound, Severity::Warning, "k", None, "m".into(), details).unwrap().seq
    }

    #[test]
    fn alert_numbers_stay_dense_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let mut seen = Vec::new();
        for _restart in 0..3 {
            let store = Store::open(&path).unwrap();
            let (alerts, _) = Alerts::open(&store, None).unwrap();
            seen.push(raise(&alerts));
            seen.push(raise(&alerts));
            drop(alerts);
            store.close().unwrap();
        }
        assert_eq!(seen, [1, 2, 3, 4, 5, 6], "one number after another, whatever the restarts");
        let store = Store::open(&path).unwrap();
        let (alerts, _) = Alerts::open(&store, None).unwrap();
        let listed: Vec<u64> = alerts.list().unwrap().iter().map(|a| a.seq).collect();
        assert_eq!(listed, [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn a_store_numbered_by_generate_id_continues_after_its_highest_alert() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let (alerts, _) = Alerts::open(&store, None).unwrap();
        assert_eq!(raise(&alerts), 1);
        // An alert stored by an older rekeyd under a jumped number, before the counter existed.
        let mut jumped = alerts.list().unwrap()[0].clone();
        jumped.seq = 4_000_001;
        alerts.put(&jumped).unwrap();
        store.remove(Tree::AlertSeq, LAST_SEQ).unwrap();
        assert_eq!(raise(&alerts), 4_000_002, "never a number below one already shown");
        assert_eq!(raise(&alerts), 4_000_003);
    }

    #[test]
    fn concurrent_raisers_never_share_a_number() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let (alerts, _) = Alerts::open(&store, None).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let a = alerts.clone();
                std::thread::spawn(move || (0..10).map(|_| raise(&a)).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        all.sort();
        assert_eq!(all, (1..=40).collect::<Vec<_>>());
    }

    #[test]
    fn signatures_are_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        let s = signature(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(s, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
