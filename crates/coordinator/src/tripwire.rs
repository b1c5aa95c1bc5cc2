//! The retired key as a tripwire (playbook step 7), fleet side: while a
//! rotation is in `monitoring`, its old value is searched for across the fleet
//! every `check_every` (keyed fingerprints, never the value — see [`scope`]),
//! and every copy found raises an alert once (host, path, line). The
//! provider side (the old key's last use) is checked by the engine itself.
//!
//! Tasks: one reconciler ([`Tripwire::run`]), which runs at most one scan at a time.

use crate::alerts::{AlertKind, Alerts, Severity};
use crate::engine::machine::{Rotation, RotationState};
use crate::engine::state::EngineState;
use crate::scope::{self, ConsumerMap, Query, Scanner};
use rekey_common::error::Chain;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long agents get to answer a monitoring scan.
const SCAN_TIMEOUT_SECONDS: u32 = 20;

/// The handles the tripwire uses.
pub struct Tripwire {
    pub state: EngineState,
    pub scanner: Scanner,
    pub alerts: Alerts,
}

impl Tripwire {
    /// Scans monitored rotations' old values until `shutdown`. Failures of one
    /// scan are logged and retried at the next interval; it never ends early.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), std::convert::Infallible> {
        run(self, shutdown).await;
        Ok(())
    }
}

/// (secret, version, host, path, line) of a leftover copy.
type Copy = (String, String, String, String, u32);

/// Why a monitored rotation's old value cannot be searched for, in words
/// that say it is not watched: an old version rekey adopted from the provider
/// was never held by the coordinator (there is no value to search for), which
/// is not the same as a value forgotten at revocation.
fn skip_reason(rot: &Rotation, rotations: &[Rotation], e: &scope::ScopeError) -> String {
    let old = rot.old_version.as_deref().unwrap_or("-");
    let created_by_rekey = rotations.iter().any(|r| r.id != rot.id && r.new_version.as_deref() == Some(old));
    match e {
        scope::ScopeError::OldValueForgotten { .. } | scope::ScopeError::ValueNotHeld { .. } if !created_by_rekey => {
            format!(
                "the old version {old} was not created by rekey (it was adopted from the provider), so the \
                 coordinator never held its value: leftover copies of it are not watched"
            )
        }
        _ => format!("{}: leftover copies of the old version {old} are not watched", Chain(e)),
    }
}

impl Tripwire {
    /// Logs a scan that could not run, and audits it once per rotation and
    /// reason, so the rotation's report says what was not watched.
    fn record_skip(
        &self,
        rot: &Rotation,
        rotations: &[Rotation],
        e: &scope::ScopeError,
        skips: &mut BTreeSet<(String, String)>,
    ) {
        let reason = skip_reason(rot, rotations, e);
        tracing::warn!(rotation = %rot.id, secret = %rot.secret, %reason, "tripwire scan skipped: not watched");
        if !skips.insert((rot.id.clone(), reason.clone())) {
            return;
        }
        let details = serde_json::json!({ "rotation": rot.id, "secret": rot.secret, "reason": reason });
        let entry = crate::audit::AuditEntry::new("rekeyd", "tripwire.skipped", details);
        if let Err(e) = self.state.audit(rekey_common::time::now_unix_ms(), vec![entry]) {
            tracing::error!(error = %Chain(&e), "cannot audit a skipped tripwire scan");
        }
    }

    /// One alert per leftover copy not alerted on before.
    fn alert_leftovers(&self, rot: &Rotation, map: &ConsumerMap, alerted: &mut BTreeSet<Copy>) {
        for o in &map.leftovers {
            let key = (rot.secret.clone(), o.version.clone(), o.host.clone(), o.path.clone(), o.line);
            if !alerted.insert(key) {
                continue;
            }
            let message = format!(
                "a copy of the revoked version {} of {} is still on {} in {} line {}{}",
                o.version,
                rot.secret,
                o.host,
                o.path,
                o.line,
                if o.declared { "" } else { " (a file no agent config declares)" }
            );
            let details = serde_json::json!({
                "rotation": rot.id, "secret": rot.secret, "host": o.host, "path": o.path,
                "line": o.line, "version": o.version, "declared": o.declared, "scan": map.scan_id,
            });
            let entry = crate::audit::AuditEntry::new("rekeyd", "alert.leftover_found", details.clone());
            if let Err(e) = self.state.audit(rekey_common::time::now_unix_ms(), vec![entry]) {
                tracing::error!(error = %Chain(&e), "cannot audit a leftover alert");
            }
            let raised = self.alerts.raise(
                AlertKind::LeftoverFound,
                Severity::Warning,
                &rot.secret,
                Some(&rot.id),
                message,
                details,
            );
            if let Err(e) = raised {
                tracing::error!(error = %Chain(&e), "cannot record a leftover alert");
            }
        }
    }
}

async fn run(tripwire: Tripwire, shutdown: CancellationToken) {
    let mut last_scan: HashMap<String, tokio::time::Instant> = HashMap::new();
    // (secret, version, host, path, line) already alerted on: one alert per copy,
    // whichever monitored rotation's scan finds it.
    let mut alerted: BTreeSet<Copy> = BTreeSet::new();
    // (rotation, reason) of skipped scans already audited: once each, not every interval.
    let mut skips: BTreeSet<(String, String)> = BTreeSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let rotations = match tripwire.state.list_rotations() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %Chain(&e), "tripwire cannot list rotations");
                continue;
            }
        };
        for rot in rotations.iter().filter(|r| r.state == RotationState::Monitoring) {
            let every = Duration::from_millis(rot.policy.check_every_ms.max(1000) as u64);
            if last_scan.get(&rot.id).is_some_and(|t| t.elapsed() < every) {
                continue;
            }
            last_scan.insert(rot.id.clone(), tokio::time::Instant::now());
            let scanned = match Query::new(rot.secret.clone(), "old", rot.id.clone(), SCAN_TIMEOUT_SECONDS) {
                Ok(query) => tripwire.scanner.run(&query).await,
                Err(e) => Err(e),
            };
            let map = match scanned {
                Ok(m) => m,
                Err(e) => {
                    tripwire.record_skip(rot, &rotations, &e, &mut skips);
                    continue;
                }
            };
            let mut summary = scope::audit_summary(&map);
            summary["rotation"] = serde_json::json!(rot.id);
            summary["purpose"] = serde_json::json!("tripwire");
            let entry = crate::audit::AuditEntry::new("rekeyd", "scope.result", summary);
            if let Err(e) = tripwire.state.audit(rekey_common::time::now_unix_ms(), vec![entry]) {
                tracing::error!(error = %Chain(&e), "cannot audit a tripwire scan");
            }
            tripwire.alert_leftovers(rot, &map, &mut alerted);
        }
        last_scan.retain(|id, _| rotations.iter().any(|r| &r.id == id));
        skips.retain(|(id, _)| rotations.iter().any(|r| &r.id == id && r.state == RotationState::Monitoring));
    }
}
