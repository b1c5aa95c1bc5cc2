//! Prometheus metrics: rekeyd's own HTTP listener (`[metrics] listen`, off
//! by default) serving the OpenMetrics text exposition at `/metrics`.
//!
//! Two kinds of figures:
//! - **State**, read at scrape time from the store, the session registry, the
//!   engine and the alert log ([`Sources`]): agents, rotations by state, hosts
//!   by state per active rotation, waves, alerts, the audit head, the soonest
//!   certificate expiry, the engine's queue. Nothing has to be kept in step.
//! - **Events**, counted where they happen through [`events()`]: provider
//!   calls (via [`metered`], a `Provider` wrapper), deliveries, reports,
//!   rollbacks, enrollments, sessions. One process-wide set, so each hook is
//!   one line and no constructor grows a parameter.
//!
//! Labels name secrets, rotations, hosts, states, stages and provider
//! operations: never a value or a fingerprint.
//!
//! Tasks: [`Exporter::run`] (supervised as `metrics`), one short task per
//! HTTP connection.

use crate::alerts::Alerts;
use crate::engine::driver::EngineHandle;
use crate::engine::machine::{AlertKind, HostState, RotationState, Severity};
use crate::sessions::Sessions;
use crate::store::Store;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

pub mod events;

use events::Labels;
pub use events::{Events, events, metered};

/// The content type of the OpenMetrics text exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every host state and rotation state, so a state with nothing in it reads 0
/// rather than vanishing from the scrape.
const HOST_STATES: [HostState; 9] = [
    HostState::Pending,
    HostState::Delivered,
    HostState::Applied,
    HostState::Restarted,
    HostState::Healthy,
    HostState::Failed,
    HostState::RolledBack,
    HostState::Unreachable,
    HostState::Excluded,
];
const ROTATION_STATES: [RotationState; 13] = [
    RotationState::Planned,
    RotationState::Generating,
    RotationState::RollingOut,
    RotationState::Halted,
    RotationState::Verified,
    RotationState::Deactivating,
    RotationState::Grace,
    RotationState::Deleting,
    RotationState::Monitoring,
    RotationState::Completed,
    RotationState::Aborting,
    RotationState::Aborted,
    RotationState::Abandoned,
];

const ALERT_KINDS: [AlertKind; 4] = [
    AlertKind::OldVersionUsed,
    AlertKind::OldVersionUsedDuringGrace,
    AlertKind::OldVersionUsedAfterRevocation,
    AlertKind::LeftoverFound,
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics listener failed")]
    Serve(#[source] std::io::Error),
}

/// What a scrape reads.
#[derive(Clone)]
pub struct Sources {
    pub store: Store,
    pub sessions: Sessions,
    pub engine: EngineHandle,
    pub alerts: Alerts,
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: i64) {
    let g = Gauge::<i64>::default();
    g.set(v);
    r.register(name, help, g);
}

fn gauges(r: &mut Registry, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, i64)>) {
    let f = Family::<Labels, Gauge>::default();
    for (labels, v) in rows {
        f.get_or_create(&labels).set(v);
    }
    r.register(name, help, f);
}

impl Sources {
    /// The whole exposition, state read now.
    pub fn scrape(&self) -> Result<String, String> {
        let mut r = Registry::default();
        r.register(
            "rekey_build",
            "rekeyd's version",
            prometheus_client::metrics::info::Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        self.agents(&mut r)?;
        self.rotations(&mut r)?;
        self.alerts(&mut r)?;
        let (seq, _) = self.engine.state().audit_head().map_err(|e| rekey_common::error::chain(&e))?;
        gauge(&mut r, "rekey_audit_head_sequence", "Sequence number of the newest audit record", seq as i64);
        gauge(&mut r, "rekey_engine_queue_depth", "Events waiting for the engine", self.engine.queue_depth() as i64);
        events().register(&mut r);
        let mut out = String::new();
        encode(&mut out, &r).map_err(|e| e.to_string())?;
        Ok(out)
    }

    fn agents(&self, r: &mut Registry) -> Result<(), String> {
        let agents = self.store.list_agents().map_err(|e| rekey_common::error::chain(&e))?;
        let revoked = agents.iter().filter(|a| a.revoked_unix.is_some()).count() as i64;
        let enrolled = agents.len() as i64 - revoked;
        let rows = [(vec![("state", "enrolled".to_string())], enrolled), (vec![("state", "revoked".into())], revoked)];
        gauges(r, "rekey_agents", "Agents known to the coordinator, by enrollment state", rows);
        let connected = self.sessions.connected().len() as i64;
        gauge(r, "rekey_agents_connected", "Agents with a live session", connected);
        let soonest = agents.iter().filter(|a| a.revoked_unix.is_none()).map(|a| a.cert_not_after_unix).min();
        if let Some(t) = soonest {
            let help = "Soonest expiry of an enrolled agent's certificate (unix seconds)";
            gauge(r, "rekey_agent_cert_soonest_expiry_timestamp_seconds", help, t);
        }
        Ok(())
    }

    fn rotations(&self, r: &mut Registry) -> Result<(), String> {
        let all = self.engine.state().list_rotations().map_err(|e| rekey_common::error::chain(&e))?;
        let mut by_state: BTreeMap<&str, i64> = ROTATION_STATES.iter().map(|s| (s.as_str(), 0)).collect();
        for rot in &all {
            *by_state.entry(rot.state.as_str()).or_default() += 1;
        }
        let rows = by_state.into_iter().map(|(s, n)| (vec![("state", s.to_string())], n));
        gauges(r, "rekey_rotations", "Rotations by state", rows);
        let (mut hosts, mut wave, mut waves, mut halted) = (vec![], vec![], vec![], vec![]);
        for rot in all.iter().filter(|r| !r.state.is_terminal()) {
            let id = vec![("rotation", rot.id.clone()), ("secret", rot.secret.clone())];
            let mut counts: BTreeMap<&str, i64> = HOST_STATES.iter().map(|s| (s.as_str(), 0)).collect();
            for h in rot.hosts.values() {
                *counts.entry(h.state.as_str()).or_default() += 1;
            }
            for (state, n) in counts {
                let mut l = id.clone();
                l.push(("state", state.to_string()));
                hosts.push((l, n));
            }
            wave.push((id.clone(), rot.current_wave as i64));
            waves.push((id.clone(), rot.waves.len() as i64));
            halted.push((id, i64::from(rot.state == RotationState::Halted)));
        }
        gauges(r, "rekey_rotation_hosts", "Hosts of each active rotation, by state", hosts);
        gauges(r, "rekey_rotation_wave", "The wave an active rotation is on (0: the first, the canary if any)", wave);
        gauges(r, "rekey_rotation_waves", "How many waves an active rotation has", waves);
        gauges(r, "rekey_rotation_halted", "1 while an active rotation is halted and needs an operator", halted);
        Ok(())
    }

    fn alerts(&self, r: &mut Registry) -> Result<(), String> {
        // Every kind and severity from 0: `increase()` then sees the first alert too.
        let mut counts: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for kind in ALERT_KINDS {
            for severity in [Severity::Warning, Severity::Critical] {
                counts.insert((kind.as_str(), severity.as_str()), 0);
            }
        }
        for a in self.alerts.list().map_err(|e| rekey_common::error::chain(&e))? {
            *counts.entry((a.kind.as_str(), a.severity.as_str())).or_default() += 1;
        }
        let f = Family::<Labels, Counter>::default();
        for ((kind, severity), n) in counts {
            f.get_or_create(&vec![("kind", kind.to_string()), ("severity", severity.to_string())]).inc_by(n);
        }
        r.register("rekey_alerts", "Alerts raised, by kind and severity", f);
        Ok(())
    }
}

/// The bound metrics listener, ready to serve.
pub struct Exporter {
    listener: tokio::net::TcpListener,
    sources: Sources,
}

impl Exporter {
    /// Binds `addr` and writes the bound address to `addr_file` (useful with port 0).
    pub async fn bind(addr: SocketAddr, addr_file: PathBuf, sources: Sources) -> Result<Exporter, MetricsError> {
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })?;
        let bound = listener.local_addr().map_err(|source| MetricsError::Bind { addr, source })?;
        rekey_common::fs::write_atomic(&addr_file, format!("{bound}\n").as_bytes(), 0o644)
            .map_err(|source| MetricsError::Write { path: addr_file.clone(), source })?;
        if !bound.ip().is_loopback() {
            tracing::warn!(%bound, "metrics served beyond loopback: they name hosts and secrets (never values)");
        }
        tracing::info!(addr = %bound, "metrics at http://{bound}/metrics");
        Ok(Exporter { listener, sources })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves `/metrics` until `stop`.
    pub async fn run(self, stop: CancellationToken) -> Result<(), MetricsError> {
        let sources = self.sources;
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let sources = sources.clone();
                async move { respond(sources).await }
            }),
        );
        axum::serve(self.listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
            .map_err(MetricsError::Serve)
    }
}

async fn respond(sources: Sources) -> axum::response::Response {
    use axum::response::IntoResponse;
    // The store reads block: off the async workers.
    match tokio::task::spawn_blocking(move || sources.scrape()).await {
        Ok(Ok(text)) => ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "metrics scrape failed");
            (axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("scrape failed: {e}\n")).into_response()
        }
        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("scrape failed: {e}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A provider call through the wrapper is counted and timed under the
    /// secret, the provider kind and the operation; counters end in `_total`.
    #[tokio::test]
    async fn metered_provider_calls_are_counted_and_timed() {
        let state = Arc::new(MemState::default());
        let cfg: rekey_providers::ProviderConfig =
            toml::from_str("kind = \"random\"\nlength = 32").expect("a random provider config");
        let p = metered("metered-test", rekey_providers::build(&cfg, state).unwrap());
        p.list().await.unwrap();
        assert!(p.delete("nope").await.is_err());
        let mut r = Registry::default();
        events().register(&mut r);
        let mut out = String::new();
        encode(&mut out, &r).unwrap();
        let base = "secret=\"metered-test\",provider=\"random\"";
        assert!(out.contains("# TYPE rekey_provider_calls counter"), "{out}");
        assert!(
            out.contains(&format!("rekey_provider_calls_total{{{base},operation=\"list\",outcome=\"ok\"}} 1")),
            "{out}"
        );
        let gone = format!("rekey_provider_calls_total{{{base},operation=\"delete\",outcome=\"not_found\"}} 1");
        assert!(out.contains(&gone), "{out}");
        assert!(
            out.contains(&format!("rekey_provider_call_duration_seconds_count{{{base},operation=\"list\"}} 1")),
            "{out}"
        );
        let errors = format!("rekey_provider_errors_total{{{base},operation=\"delete\"}} 0");
        assert!(out.contains(&errors), "not found is not an error: {out}");
    }

    #[derive(Default)]
    struct MemState(std::sync::Mutex<BTreeMap<String, Vec<u8>>>);

    impl rekey_providers::ProviderState for MemState {
        fn get(&self, key: &str) -> Result<Option<rekey_common::secret::SecretBytes>, String> {
            Ok(self.0.lock().unwrap().get(key).map(|v| rekey_common::secret::SecretBytes::new(v.clone())))
        }
        fn put(&self, key: &str, value: &[u8]) -> Result<(), String> {
            self.0.lock().unwrap().insert(key.to_string(), value.to_vec());
            Ok(())
        }
        fn remove(&self, key: &str) -> Result<(), String> {
            self.0.lock().unwrap().remove(key);
            Ok(())
        }
        fn keys(&self) -> Result<Vec<String>, String> {
            Ok(self.0.lock().unwrap().keys().cloned().collect())
        }
    }
}
