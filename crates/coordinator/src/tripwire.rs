//! The retired key as a tripwire (playbook step 7), fleet side: while a
//! rotation is in `monitoring`, its old value is searched for across the fleet
//! every `check_every` (keyed fingerprints, never the value — see [`scope`]),
//! and every copy found raises an alert once (host, path, line). The
//! provider side (the old key's last use) is checked by the engine itself.
//!
//! Tasks: one reconciler ([`Tripwire::run`]), which runs at most one scan at a time.

use crate::alerts::{AlertKind, Alerts, Severity};
use crate::engine::machine::Rotation;
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

impl Tripwire {
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
        for rot in rotations.iter().filter(|r| r.state == crate::engine::machine::RotationState::Monitoring) {
            let every = Duration::from_millis(rot.policy.check_every_ms.max(1000) as u64);
            if last_scan.get(&rot.id).is_some_and(|t| t.elapsed() < every) {
                continue;
            }
            last_scan.insert(rot.id.clone(), tokio::time::Instant::now());
            let query = match Query::new(rot.secret.clone(), "old", rot.id.clone(), SCAN_TIMEOUT_SECONDS) {
                Ok(q) => q,
                Err(e) => {
                    tracing::warn!(rotation = %rot.id, error = %Chain(&e), "tripwire scan not possible");
                    continue;
                }
            };
            let map = match tripwire.scanner.run(&query).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::info!(rotation = %rot.id, error = %Chain(&e), "tripwire scan skipped");
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
    }
}
