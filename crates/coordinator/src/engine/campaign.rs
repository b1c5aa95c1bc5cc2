//! Campaigns (playbook step 6): an incident rotates every catalog secret
//! matching a pattern, with bounded concurrency and one status.
//!
//! An incident is a durable record (`incidents` tree). One task
//! ([`Campaigns::run`]) reconciles every open incident when poked, whenever a
//! rotation's change is committed (so the next secret starts as soon as a
//! slot frees) and once a second: it starts the next secrets' rotations, in
//! the incident's start order ([`start_order`]), while fewer than
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
    #[error("--first {name:?} is not one of the secrets matching {pattern:?} ({matching})")]
    FirstNotMatching { name: String, pattern: String, matching: String },
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

/// The order an incident starts its secrets in: the `first` names as given
/// (the exposed key goes first), then higher catalog `priority`, then catalog
/// order. `matching` is (name, priority) in catalog order.
pub fn start_order(matching: &[(String, i64)], first: &[String], pattern: &str) -> Result<Vec<String>, CampaignError> {
    let mut order: Vec<String> = Vec::new();
    for name in first {
        if !matching.iter().any(|(n, _)| n == name) {
            let matching = matching.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
            return Err(CampaignError::FirstNotMatching { name: name.clone(), pattern: pattern.to_string(), matching });
        }
        if !order.contains(name) {
            order.push(name.clone());
        }
    }
    let mut rest: Vec<&(String, i64)> = matching.iter().filter(|(n, _)| !order.contains(n)).collect();
    // Stable: equal priorities keep catalog order.
    rest.sort_by_key(|(_, p)| std::cmp::Reverse(*p));
    order.extend(rest.into_iter().map(|(n, _)| n.clone()));
    Ok(order)
}

/// How many more rotations may start now, with `active` in their rollout phase.
fn free_slots(concurrency: usize, active: usize) -> usize {
    concurrency.saturating_sub(active)
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

    /// Opens an incident over every catalog secret matching `pattern`,
    /// starting the `first` ones first.
    pub fn open(
        &self,
        name: &str,
        pattern: &str,
        concurrency: usize,
        first: &[String],
        by: &str,
    ) -> Result<Incident, CampaignError> {
        if name.trim().is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
            return Err(CampaignError::BadName(name.to_string()));
        }
        if concurrency == 0 {
            return Err(CampaignError::BadConcurrency);
        }
        let matching: Vec<(String, i64)> = self
            .config
            .secrets
            .iter()
            .filter(|s| glob_match(pattern, &s.name))
            .map(|s| (s.name.clone(), s.priority))
            .collect();
        if matching.is_empty() {
            return Err(CampaignError::NoMatch(pattern.to_string()));
        }
        let order = start_order(&matching, first, pattern)?;
        let secrets: BTreeMap<String, SecretProgress> =
            order.iter().map(|n| (n.clone(), SecretProgress { rotation: None, error: None })).collect();
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
            order,
        };
        self.state.put_incident(
            &inc,
            vec![AuditEntry::new(
                by,
                "incident.open",
                serde_json::json!({ "incident": inc.id, "name": name, "pattern": pattern,
                                    "secrets": inc.order, "first": first, "concurrency": concurrency }),
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

    /// Reconciles open incidents when poked, when a rotation changes, and
    /// every second, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), std::convert::Infallible> {
        let mut changes = self.state.rotation_changes();
        loop {
            // Seen before reconciling: a change committed meanwhile wakes the next round.
            changes.borrow_and_update();
            if let Err(e) = self.reconcile().await {
                tracing::error!(error = %Chain(&e), "campaign reconcile failed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = self.poke.notified() => {}
                _ = changes.changed() => {}
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
            for secret in inc.waiting() {
                if free_slots(inc.concurrency, active) == 0 {
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

    fn catalog(entries: &[(&str, i64)]) -> Vec<(String, i64)> {
        entries.iter().map(|(n, p)| (n.to_string(), *p)).collect()
    }

    #[test]
    fn secrets_start_first_named_then_by_priority_then_in_catalog_order() {
        // Catalog order is not name order: z-db comes first in the file.
        let m = catalog(&[("z-db", 0), ("api-key", 0), ("fleet-key", 0), ("mail", 5)]);
        assert_eq!(start_order(&m, &[], "*").unwrap(), vec!["mail", "z-db", "api-key", "fleet-key"]);
        let first = vec!["fleet-key".to_string(), "z-db".to_string(), "fleet-key".to_string()];
        assert_eq!(start_order(&m, &first, "*").unwrap(), vec!["fleet-key", "z-db", "mail", "api-key"]);
        let e = start_order(&m, &["payments".to_string()], "*").unwrap_err().to_string();
        assert!(e.contains("\"payments\"") && e.contains("z-db, api-key, fleet-key, mail"), "{e}");
    }

    /// The reconciler wakes on every committed rotation change, so a freed
    /// rollout slot is refilled at once rather than on the next 1 s poll.
    #[test]
    fn a_committed_rotation_change_wakes_the_reconciler() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("store")).unwrap();
        let state = EngineState::open(&store, Arc::new(crate::crypto::Key::generate().unwrap())).unwrap();
        let mut changes = state.rotation_changes();
        let mut rot = crate::engine::machine::Rotation::new(
            "rot-1".into(),
            "api-key".into(),
            "operator/admin".into(),
            Default::default(),
            None,
            vec![vec!["h1".into()]],
            String::new(),
            0,
        );
        state.begin(&rot, vec![]).unwrap();
        assert!(!changes.has_changed().unwrap(), "nothing committed yet");
        rot.state = RotationState::Verified;
        state.commit(&rot, vec![]).unwrap();
        assert!(changes.has_changed().unwrap(), "a rollout that left its phase wakes the campaigns");
        changes.borrow_and_update();
        assert!(!changes.has_changed().unwrap());
    }

    #[test]
    fn the_incident_hands_out_waiting_secrets_in_its_order_and_slots_bound_them() {
        let mut inc = Incident {
            id: "inc-1".into(),
            name: "x".into(),
            pattern: "*".into(),
            concurrency: 2,
            opened_by: "operator/admin".into(),
            opened_ms: 0,
            closed_by: None,
            closed_ms: None,
            secrets: ["a", "b", "c", "d"]
                .iter()
                .map(|n| (n.to_string(), SecretProgress { rotation: None, error: None }))
                .collect(),
            order: vec!["d".into(), "b".into(), "a".into(), "c".into()],
        };
        assert_eq!(inc.waiting(), vec!["d", "b", "a", "c"]);
        inc.secrets.insert("d".into(), SecretProgress { rotation: Some("rot-1".into()), error: None });
        inc.secrets.insert("b".into(), SecretProgress { rotation: None, error: Some("no agent".into()) });
        assert_eq!(inc.waiting(), vec!["a", "c"], "started and failed secrets are not handed out again");
        // A record from before `order` existed: name order.
        inc.order.clear();
        assert_eq!(inc.start_order(), vec!["a", "b", "c", "d"]);
        assert_eq!(free_slots(2, 0), 2);
        assert_eq!(free_slots(2, 1), 1);
        assert_eq!(free_slots(2, 3), 0, "never negative when more are active than allowed");
    }
}
