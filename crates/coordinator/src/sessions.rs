//! Live agent sessions: one entry per connected agent, holding the bounded
//! sender of its outbound stream and a token that ends the session.
//!
//! No thread and no unbounded buffer per agent: an idle session costs one
//! small task (the inbound loop), a 32-slot channel and tonic's own buffers.

use rekey_proto::v1::{self, CoordinatorMessage};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// Capacity of each agent's outbound queue. Deliveries are few and small; a
/// full queue means the agent stopped reading and its session will be closed.
pub const OUTBOUND_CAPACITY: usize = 32;

pub type Outbound = mpsc::Sender<Result<CoordinatorMessage, Status>>;

#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub id: u64,
    /// Serial of the certificate the session was opened with: nothing is sent
    /// once it is revoked.
    pub serial: String,
    pub tx: Outbound,
    pub cancel: CancellationToken,
    pub connected_unix: i64,
}

/// Why a message did not leave (defined with the engine's link, which is
/// what callers see).
pub use crate::engine::link::LinkError as SendError;

/// The registry of live sessions, shared by the services and the engine.
#[derive(Debug, Clone)]
pub struct Sessions {
    inner: Arc<Mutex<HashMap<String, SessionHandle>>>,
    next_id: Arc<AtomicU64>,
    /// Checked before every message: a revoked certificate receives nothing.
    revoked: RevokedSerials,
    /// Dry runs awaiting an answer: request id → (host asked, waiter).
    preflights: Arc<Mutex<HashMap<String, PendingPreflight>>>,
    /// Bumped when a session registers or ends (the web console follows it).
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// Cancelled when rekeyd drains: no session registers after it.
    shutdown: tokio_util::sync::CancellationToken,
}

/// Dry runs in flight at most; each is small (~200 bytes) and ends with its
/// plan's wait. A plan asks every consumer at once, so this bounds the fleet
/// a plan can cover: at 4,096 a 10,000-host start was refused for 5,904
/// hosts "not reading their session".
const MAX_PREFLIGHTS: usize = 65_536;

type PendingPreflight = (String, tokio::sync::oneshot::Sender<v1::PreflightResult>);

impl Sessions {
    pub fn new(revoked: RevokedSerials) -> Sessions {
        Sessions {
            inner: Arc::default(),
            next_id: Arc::default(),
            revoked,
            preflights: Arc::default(),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
            shutdown: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Ends every live session and refuses later ones (rekeyd is draining):
    /// a session whose hello arrives after this is closed at once, so the
    /// graceful drain never waits on it.
    pub fn close_all(&self) {
        self.shutdown.cancel();
        for name in self.connected() {
            self.close(&name, None);
        }
    }

    /// Cancelled once [`Sessions::close_all`] ran.
    pub fn shutting_down(&self) -> &tokio_util::sync::CancellationToken {
        &self.shutdown
    }

    /// Changes whenever an agent's session registers or ends.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers a session; a previous session of the same agent is ended
    /// (the agent reconnected before the old connection was noticed dead).
    pub fn register(&self, name: &str, handle: SessionHandle) {
        let old = {
            let mut inner = self.inner.lock().expect("sessions lock");
            if self.shutdown.is_cancelled() {
                // Draining: this session ends before it starts.
                handle.cancel.cancel();
                return;
            }
            inner.insert(name.to_string(), handle)
        };
        crate::metrics::events::events().session_opened();
        if let Some(old) = old {
            old.cancel.cancel();
        }
        self.changed();
    }

    /// Removes the session if it is still the one with `id`.
    pub fn deregister(&self, name: &str, id: u64) -> bool {
        let mut map = self.inner.lock().expect("sessions lock");
        if map.get(name).is_some_and(|h| h.id == id) {
            map.remove(name);
            drop(map);
            self.changed();
            true
        } else {
            false
        }
    }

    pub fn get(&self, name: &str) -> Option<SessionHandle> {
        self.inner.lock().expect("sessions lock").get(name).cloned()
    }

    pub fn is_connected(&self, name: &str) -> bool {
        self.inner.lock().expect("sessions lock").contains_key(name)
    }

    pub fn connected(&self) -> Vec<String> {
        self.inner.lock().expect("sessions lock").keys().cloned().collect()
    }

    /// Queues a message for an agent without waiting. A session whose
    /// certificate was revoked is closed instead: nothing reaches it.
    pub fn send(&self, name: &str, msg: CoordinatorMessage) -> Result<(), SendError> {
        let h = self.get(name).ok_or_else(|| SendError::NotConnected(name.to_string()))?;
        if self.revoked.contains(&h.serial) {
            self.deregister(name, h.id);
            h.cancel.cancel();
            return Err(SendError::Revoked(name.to_string()));
        }
        h.tx.try_send(Ok(msg)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Backpressure(name.to_string()),
            mpsc::error::TrySendError::Closed(_) => SendError::NotConnected(name.to_string()),
        })
    }

    /// Ends an agent's session, after queueing `last` if given. Returns
    /// whether a session was live.
    pub fn close(&self, name: &str, last: Option<CoordinatorMessage>) -> bool {
        let h = self.inner.lock().expect("sessions lock").remove(name);
        match h {
            Some(h) => {
                if let Some(m) = last {
                    let _ = h.tx.try_send(Ok(m));
                }
                h.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// An agent's dry-run answer: handed to the plan that asked that host, once.
    /// An answer nobody waits for (late, duplicate, from another host) is dropped.
    pub fn preflight_answer(&self, host: &str, result: v1::PreflightResult) {
        let mut map = self.preflights.lock().expect("preflights lock");
        match map.get(&result.request_id) {
            Some((asked, _)) if asked == host => {
                let (_, tx) = map.remove(&result.request_id).expect("present");
                let _ = tx.send(result);
            }
            Some(_) => {
                tracing::warn!(agent = %host, request = %result.request_id, "preflight answer from a host not asked dropped")
            }
            None => {
                tracing::info!(agent = %host, request = %result.request_id, "preflight answer nobody waits for dropped")
            }
        }
    }
}

impl crate::engine::link::PreflightLink for Sessions {
    fn is_connected(&self, host: &str) -> bool {
        Sessions::is_connected(self, host)
    }

    fn preflight(&self, host: &str, req: v1::Preflight) -> Result<crate::engine::link::PreflightAnswer, SendError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut map = self.preflights.lock().expect("preflights lock");
            // Waiters that gave up (their plan timed out) leave no entry
            // behind; swept only when full, so a plan's sends stay O(hosts).
            if map.len() >= MAX_PREFLIGHTS {
                map.retain(|_, (_, tx)| !tx.is_closed());
            }
            if map.len() >= MAX_PREFLIGHTS {
                return Err(SendError::Backpressure(host.to_string()));
            }
            map.insert(req.request_id.clone(), (host.to_string(), tx));
        }
        let id = req.request_id.clone();
        let sent = self.send(host, message(v1::coordinator_message::Msg::Preflight(req)));
        if sent.is_err() {
            self.preflights.lock().expect("preflights lock").remove(&id);
        }
        sent.map(|()| rx)
    }
}

/// The engine reaches agents through their sessions: the one place that
/// turns the driver's verbs into protocol messages.
impl crate::engine::link::AgentLink for Sessions {
    fn is_connected(&self, host: &str) -> bool {
        Sessions::is_connected(self, host)
    }

    fn deliver(&self, host: &str, d: crate::engine::link::Delivery) -> Result<(), SendError> {
        still_leading(host)?;
        let to_proto = |f: &rekey_providers::Fields| {
            f.iter().map(|(k, v)| v1::SecretField { name: k.clone(), value: v.expose().to_vec() }).collect::<Vec<_>>()
        };
        let delivery = v1::Delivery {
            rotation_id: d.rotation_id,
            secret: d.secret,
            version_id: d.version_id,
            fields: to_proto(&d.fields),
            previous_version_id: d.previous_version_id.unwrap_or_default(),
            previous_fields: d.previous_fields.as_ref().map(to_proto).unwrap_or_default(),
            restart_jitter_ms: d.restart_jitter_ms,
            fingerprint_key: d.fingerprint_key,
        };
        crate::metrics::events::events().delivery(&delivery.secret);
        self.send(host, message(v1::coordinator_message::Msg::Delivery(delivery)))
    }

    fn rollback(&self, host: &str, rotation_id: &str, secret: &str, version_id: &str) -> Result<(), SendError> {
        still_leading(host)?;
        let msg = v1::coordinator_message::Msg::Rollback(v1::Rollback {
            rotation_id: rotation_id.to_string(),
            secret: secret.to_string(),
            version_id: version_id.to_string(),
        });
        crate::metrics::events::events().rollback(secret);
        self.send(host, message(msg))
    }

    fn purge(&self, host: &str, secret: &str, version_id: &str) -> Result<(), SendError> {
        still_leading(host)?;
        let msg = v1::coordinator_message::Msg::Purge(v1::Purge {
            secret: secret.to_string(),
            version_id: version_id.to_string(),
        });
        self.send(host, message(msg))
    }
}

/// Nothing reaches an agent from a replica whose lease may have run out
/// ([`crate::leading::ensure_leading`]; with sled, always leading).
fn still_leading(host: &str) -> Result<(), SendError> {
    crate::leading::ensure_leading().map_err(|_| SendError::NotConnected(host.to_string()))
}

fn message(msg: v1::coordinator_message::Msg) -> CoordinatorMessage {
    CoordinatorMessage { msg: Some(msg) }
}

/// Certificate serials refused from now on, mirrored from the store (which
/// is written first). Waiters learn of each revocation at once.
#[derive(Debug, Clone, Default)]
pub struct RevokedSerials {
    set: Arc<RwLock<HashSet<String>>>,
    changed: Arc<tokio::sync::Notify>,
}

impl RevokedSerials {
    pub fn new(serials: impl IntoIterator<Item = String>) -> Self {
        RevokedSerials { set: Arc::new(RwLock::new(serials.into_iter().collect())), changed: Arc::default() }
    }

    pub fn contains(&self, serial: &str) -> bool {
        self.set.read().expect("revoked lock").contains(serial)
    }

    pub fn extend(&self, serials: impl IntoIterator<Item = String>) {
        self.set.write().expect("revoked lock").extend(serials);
        self.changed.notify_waiters();
    }

    /// Returns once `serial` is revoked (at once if it already is).
    pub async fn revoked(&self, serial: &str) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a revocation in between is not missed.
            notified.as_mut().enable();
            if self.contains(serial) {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(serial: &str) -> (SessionHandle, mpsc::Receiver<Result<CoordinatorMessage, Status>>) {
        let (tx, rx) = mpsc::channel(4);
        (SessionHandle { id: 1, serial: serial.into(), tx, cancel: CancellationToken::new(), connected_unix: 0 }, rx)
    }

    #[tokio::test]
    async fn nothing_is_sent_to_a_revoked_certificate_and_waiters_wake() {
        let revoked = RevokedSerials::default();
        let sessions = Sessions::new(revoked.clone());
        let (h, mut rx) = handle("0a");
        let cancel = h.cancel.clone();
        sessions.register("web-1", h);
        sessions.send("web-1", CoordinatorMessage::default()).unwrap();
        assert!(rx.recv().await.is_some());

        let waiter = tokio::spawn({
            let r = revoked.clone();
            async move { r.revoked("0a").await }
        });
        revoked.extend(["0a".to_string()]);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
        // The next send finds the revocation: refused, session closed, nothing queued.
        assert!(matches!(sessions.send("web-1", CoordinatorMessage::default()), Err(SendError::Revoked(_))));
        assert!(cancel.is_cancelled() && !sessions.is_connected("web-1"));
        assert!(rx.try_recv().is_err());
        // Already revoked: the wait returns at once.
        revoked.revoked("0a").await;
    }

    #[tokio::test]
    async fn a_preflight_answer_reaches_its_waiter_only_from_the_host_asked_and_once() {
        use crate::engine::link::PreflightLink;
        let sessions = Sessions::new(RevokedSerials::default());
        let (h, mut rx) = handle("0b");
        sessions.register("web-1", h);
        let req = v1::Preflight { request_id: "pf-1".into(), secret: "api-key".into(), ..Default::default() };
        let answer = sessions.preflight("web-1", req).unwrap();
        let sent = rx.recv().await.unwrap().unwrap();
        assert!(matches!(sent.msg, Some(v1::coordinator_message::Msg::Preflight(p)) if p.request_id == "pf-1"));
        let result = |checks: usize| v1::PreflightResult {
            request_id: "pf-1".into(),
            secret: "api-key".into(),
            checks: vec![v1::PreflightCheck::default(); checks],
        };
        // Another host cannot answer for web-1.
        sessions.preflight_answer("web-2", result(5));
        sessions.preflight_answer("web-1", result(1));
        sessions.preflight_answer("web-1", result(2));
        assert_eq!(answer.await.unwrap().checks.len(), 1);
        // Not connected: refused, nothing left waiting.
        assert!(matches!(sessions.preflight("web-9", v1::Preflight::default()), Err(SendError::NotConnected(_))));
        assert!(sessions.preflights.lock().unwrap().is_empty());
    }

    #[test]
    fn a_drain_closes_live_sessions_and_any_that_register_after_it() {
        let sessions = Sessions::new(RevokedSerials::new(Vec::<String>::new()));
        let (live, _rx1) = handle("01");
        let live_cancel = live.cancel.clone();
        sessions.register("web-1", live);
        sessions.close_all();
        assert!(live_cancel.is_cancelled(), "a live session is ended by the drain");
        // A hello that arrived just after the drain began: never registered.
        let (late, _rx2) = handle("02");
        let late_cancel = late.cancel.clone();
        sessions.register("web-2", late);
        assert!(late_cancel.is_cancelled(), "a session registering during the drain ends at once");
        assert!(sessions.connected().is_empty());
        assert!(sessions.shutting_down().is_cancelled());
    }
}
