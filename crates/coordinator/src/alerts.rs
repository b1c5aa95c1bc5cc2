//! Alerts: things an operator must look at now — an old key used after it
//! should no longer be, a leftover copy of a revoked value, revocation held
//! back by evidence. Every alert is written to the store and the log, and,
//! when a webhook is configured, POSTed as JSON with an HMAC-SHA256 signature
//! of the body (`X-Rekey-Signature: sha256=HEX`), retried with exponential
//! backoff. Alerts name keys by id and hosts by name: never a secret value.
//!
//! Tasks: one short task per webhook delivery (bounded attempts).

use crate::store::Store;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub seq: u64,
    pub at_ms: i64,
    /// e.g. `old_version_used`, `leftover_found`, `revocation_held`.
    pub kind: String,
    /// `warning` or `critical`.
    pub severity: String,
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
    Sled(#[from] sled::Error),
    #[error("corrupt alert record: {0}")]
    Corrupt(String),
}

#[derive(Clone)]
pub struct Alerts {
    tree: sled::Tree,
    store: Store,
    webhook: Option<Webhook>,
}

/// `sha256=HEX` of HMAC-SHA256(key, body): what receivers verify.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    format!("sha256={}", hex::encode(ring::hmac::sign(&k, body).as_ref()))
}

impl Alerts {
    pub fn open(store: &Store, webhook: Option<Webhook>) -> Result<Alerts, AlertError> {
        Ok(Alerts { tree: store.db().open_tree("alerts")?, store: store.clone(), webhook })
    }

    pub fn list(&self) -> Result<Vec<Alert>, AlertError> {
        self.tree
            .iter()
            .values()
            .map(|v| serde_json::from_slice(&v?).map_err(|e| AlertError::Corrupt(e.to_string())))
            .collect()
    }

    /// Records an alert, logs it, and sends it to the webhook in the background.
    pub fn raise(
        &self,
        kind: &str,
        severity: &str,
        secret: &str,
        rotation: Option<&str>,
        message: String,
        details: serde_json::Value,
    ) -> Result<Alert, AlertError> {
        let seq = self.store.db().generate_id()? + 1;
        let alert = Alert {
            seq,
            at_ms: rekey_common::time::now_unix_ms(),
            kind: kind.to_string(),
            severity: severity.to_string(),
            secret: secret.to_string(),
            rotation: rotation.map(str::to_string),
            message,
            details,
            delivery: if self.webhook.is_some() { "pending".into() } else { "not_configured".into() },
        };
        self.put(&alert)?;
        tracing::warn!(alert = seq, kind, severity, secret, rotation = ?rotation, message = %alert.message, "ALERT");
        if let Some(hook) = self.webhook.clone() {
            let me = self.clone();
            let a = alert.clone();
            tokio::spawn(async move {
                let outcome = deliver(&hook, &a).await;
                let mut a = a;
                a.delivery = match &outcome {
                    Ok(()) => "delivered".into(),
                    Err(e) => format!("failed: {e}"),
                };
                if let Err(e) = &outcome {
                    tracing::error!(alert = a.seq, url = %hook.url, error = %e, "alert webhook delivery failed");
                }
                let _ = me.put(&a);
            });
        }
        Ok(alert)
    }

    fn put(&self, a: &Alert) -> Result<(), AlertError> {
        self.tree.insert(a.seq.to_be_bytes(), serde_json::to_vec(a).expect("json"))?;
        self.store.flush().map_err(|e| AlertError::Corrupt(e.to_string()))?;
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        let s = signature(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(s, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
