//! Campaigns (playbook step 6): an incident rotates every catalog secret
//! matching a pattern, with bounded concurrency and one status.
//!
//! An incident is a durable record (`incidents` tree). One task
//! ([`Campaigns::run`]) reconciles every open incident once a second and when
//! poked: it starts the next secrets' rotations while fewer than
//! `concurrency` of the incident's rotations are in their rollout phase
//! (planned, generating, rolling out — the phases that restart services).
//! Reconciling is idempotent: a restarted coordinator simply continues.

use super::driver::{EngineError, EngineHandle};
pub use super::incident::{Incident, SecretProgress};
use super::machine::RotationState;
use super::state::{EngineState, StateError};
use crate::audit::AuditEntry;
use crate::config::Config;
use rekey_common::error::Chain;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    #[error("no secret of the catalog matches {0:?} (see `rekey secrets`)")]
    NoMatch(String),
    #[error("invalid incident name {0:?}: expected 1 to 100 printable characters")]
    BadName(String),
    #[error("concurrency must be at least 1")]
    BadConcurrency,
    #[error("no incident {0:?} (see `rekey incident list`)")]
    Unknown(String),
    #[error("incident {0} is already closed")]
    Closed(String),
    #[error(transparent)]
    State(#[from] StateError),
}

/// `*` matches any run of characters, `?` one character; everything else is literal.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some('?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

fn in_rollout(state: RotationState) -> bool {
    matches!(state, RotationState::Planned | RotationState::Generating | RotationState::RollingOut)
}

/// Handle to the campaign reconciler (cheap to clone).
#[derive(Clone)]
pub struct Campaigns {
    config: Arc<Config>,
    state: EngineState,
    engine: EngineHandle,
    poke: Arc<Notify>,
}

impl Campaigns {
    pub fn new(config: Arc<Config>, state: EngineState, engine: EngineHandle) -> Campaigns {
        Campaigns { config, state, engine, poke: Arc::new(Notify::new()) }
    }

    /// Opens an incident over every catalog secret matching `pattern`.
    pub fn open(&self, name: &str, pattern: &str, concurrency: usize, by: &str) -> Result<Incident, CampaignError> {
        if name.trim().is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
            return Err(CampaignError::BadName(name.to_string()));
        }
        if concurrency == 0 {
            return Err(CampaignError::BadConcurrency);
        }
        let secrets: BTreeMap<String, SecretProgress> = self
            .config
            .secrets
            .iter()
            .filter(|s| glob_match(pattern, &s.name))
            .map(|s| (s.name.clone(), SecretProgress { rotation: None, error: None }))
            .collect();
        if secrets.is_empty() {
            return Err(CampaignError::NoMatch(pattern.to_string()));
        }
        let now = rekey_common::time::now_unix_ms();
        let mut b = [0u8; 3];
        rand::Rng::fill(&mut rand::rng(), &mut b[..]);
        let inc = Incident {
            id: format!("inc-{:x}{}", now / 1000, hex::encode(b)),
            name: name.to_string(),
            pattern: pattern.to_string(),
            concurrency,
            opened_by: by.to_string(),
            opened_ms: now,
            closed_by: None,
            closed_ms: None,
            secrets,
        };
        self.state.put_incident(
            &inc,
            vec![AuditEntry::new(
                by,
                "incident.open",
                serde_json::json!({ "incident": inc.id, "name": name, "pattern": pattern,
                                    "secrets": inc.secrets.keys().collect::<Vec<_>>(), "concurrency": concurrency }),
            )],
        )?;
        self.poke.notify_one();
        Ok(inc)
    }

    pub fn close(&self, id: &str, by: &str) -> Result<Incident, CampaignError> {
        let mut inc = self.state.get_incident(id)?.ok_or_else(|| CampaignError::Unknown(id.to_string()))?;
        if !inc.is_open() {
            return Err(CampaignError::Closed(id.to_string()));
        }
        inc.closed_by = Some(by.to_string());
        inc.closed_ms = Some(rekey_common::time::now_unix_ms());
        self.state.put_incident(
            &inc,
            vec![AuditEntry::new(by, "incident.close", serde_json::json!({ "incident": id, "name": inc.name }))],
        )?;
        Ok(inc)
    }

    pub fn get(&self, id: &str) -> Result<Incident, CampaignError> {
        self.state.get_incident(id)?.ok_or_else(|| CampaignError::Unknown(id.to_string()))
    }

    pub fn list(&self) -> Result<Vec<Incident>, CampaignError> {
        Ok(self.state.list_incidents()?)
    }

    /// Reconciles open incidents every second and when poked, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), std::convert::Infallible> {
        loop {
            if let Err(e) = self.reconcile().await {
                tracing::error!(error = %Chain(&e), "campaign reconcile failed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = self.poke.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn reconcile(&self) -> Result<(), CampaignError> {
        for mut inc in self.state.list_incidents()?.into_iter().filter(Incident::is_open) {
            let mut active = 0;
            for p in inc.secrets.values() {
                if let Some(id) = &p.rotation
                    && let Some(r) = self.state.get_rotation(id)?
                    && in_rollout(r.state)
                {
                    active += 1;
                }
            }
            let mut changed = false;
            let waiting: Vec<String> = inc
                .secrets
                .iter()
                .filter(|(_, p)| p.rotation.is_none() && p.error.is_none())
                .map(|(n, _)| n.clone())
                .collect();
            for secret in waiting {
                if active >= inc.concurrency {
                    break;
                }
                let by = format!("{} (incident {})", inc.opened_by, inc.id);
                let progress = match self.engine.start(&secret, &by).await {
                    Ok(rot) => {
                        active += 1;
                        SecretProgress { rotation: Some(rot.id), error: None }
                    }
                    // Wait for the other rotation of this secret to end, then start ours.
                    Err(EngineError::AlreadyRotating { .. }) => continue,
                    Err(e) => SecretProgress { rotation: None, error: Some(e.to_string()) },
                };
                tracing::info!(incident = %inc.id, %secret, rotation = ?progress.rotation, error = ?progress.error, "campaign step");
                inc.secrets.insert(secret, progress);
                changed = true;
            }
            if changed {
                self.state.put_incident(&inc, vec![])?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_names() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("payments-*", "payments-api-key"));
        assert!(!glob_match("payments-*", "aws-payments"));
        assert!(glob_match("*-key", "api-key"));
        assert!(glob_match("db-?", "db-1"));
        assert!(!glob_match("db-?", "db-10"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
    }
}
