//! `rekey.v1.AgentService`: enrollment and the agents' live sessions.

use super::{Authorizer, internal};
use crate::config::Config;
use crate::engine::driver::{AgentEvent, EngineHandle};
use crate::pki::Ca;
use crate::scope::Scans;
use crate::sessions::{SessionHandle, Sessions};
use crate::store::{AgentRecord, Redeem, Store};
use rekey_common::error::Chain;
use rekey_common::time::{format_unix, now_unix};
use rekey_common::tls::Role;
use rekey_proto::PROTOCOL_VERSION;
use rekey_proto::v1::agent_service_server::AgentService;
use rekey_proto::v1::{
    AgentMessage, CoordinatorMessage, EnrollRequest, EnrollResponse, HeartbeatAck, RenewResponse, Welcome,
    agent_message, coordinator_message,
};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// How long a new session may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often last-seen is written to the store for a healthy session.
const LAST_SEEN_PERSIST: Duration = Duration::from_secs(60);

/// The agent service and the handles it uses (cheap to clone: a session's
/// task holds a clone).
#[derive(Clone)]
pub struct AgentSvc {
    pub config: Arc<Config>,
    pub store: Store,
    pub ca: Arc<Ca>,
    pub sessions: Sessions,
    pub auth: Authorizer,
    pub engine: EngineHandle,
    pub scans: Scans,
}

pub(crate) fn version_mismatch(peer: &str, theirs: u32) -> Status {
    Status::failed_precondition(format!(
        "protocol version mismatch: {peer} speaks rekey protocol v{theirs}, this coordinator speaks v{PROTOCOL_VERSION}; \
         run the same rekey release on both sides"
    ))
}

/// Splits `ID.SECRET` and hashes the secret part.
fn parse_token(token: &str) -> Result<(String, String), Status> {
    let malformed =
        || Status::invalid_argument("malformed join token: expected ID.SECRET as printed by `rekey token create`");
    let (id, secret) = token.trim().split_once('.').ok_or_else(malformed)?;
    if id.is_empty() || secret.len() < 16 || !id.chars().chain(secret.chars()).all(|c| c.is_ascii_alphanumeric()) {
        return Err(malformed());
    }
    let hash = hex::encode(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()));
    Ok((id.to_string(), hash))
}

type SessionStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentSvc {
    async fn enroll(&self, req: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        let req = req.into_inner();
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(version_mismatch("the agent", req.protocol_version));
        }
        let (id, hash) = parse_token(&req.token)?;
        // Check the CSR before spending the token: a broken agent must not burn it.
        crate::pki::Ca::check_csr(&req.csr_der)
            .map_err(|e| Status::invalid_argument(format!("enrollment refused: {e}")))?;
        let s = self;
        let now = now_unix();
        let record = match s.store.redeem_token(&id, &hash, now).map_err(internal)? {
            Redeem::Ok(t) => t,
            Redeem::Unknown => {
                return Err(Status::unauthenticated(
                    "unknown join token (check for typos, or create one with `rekey token create`)",
                ));
            }
            Redeem::AlreadyUsed { used_unix } => {
                return Err(Status::permission_denied(format!(
                    "join token {id} was already used at {}; tokens are single use, create a new one",
                    format_unix(used_unix)
                )));
            }
            Redeem::Expired { expires_unix } => {
                return Err(Status::permission_denied(format!(
                    "join token {id} expired at {}; create a new one",
                    format_unix(expires_unix)
                )));
            }
        };
        let issued =
            s.ca.sign_agent_csr(&req.csr_der, &record.host, s.config.agent_cert_ttl)
                .map_err(|e| Status::invalid_argument(format!("enrollment of {} refused: {e}", record.host)))?;
        let previous = s.store.get_agent(&record.host).map_err(internal)?;
        let agent = AgentRecord {
            name: record.host.clone(),
            labels: record.labels.clone(),
            enrolled_unix: now,
            cert_serial: issued.serial.clone(),
            cert_not_after_unix: issued.not_after_unix,
            serials: vec![issued.serial.clone()],
            agent_version: req.agent_version.clone(),
            ..Default::default()
        };
        s.store.enroll_agent(&agent, now).map_err(internal)?;
        crate::metrics::events::events().enrollment();
        if let Some(prev) = previous {
            // A re-enrolled host: its old certificates are dead from now on.
            s.auth.revoked().extend(prev.serials);
            s.sessions.close(&agent.name, None);
        }
        tracing::info!(agent = %agent.name, token = %id, serial = %issued.serial, "agent enrolled");
        super::audit_to(
            s.engine.state(),
            &format!("agent/{}", agent.name),
            "agent.enroll",
            serde_json::json!({ "agent": agent.name, "token": id, "serial": issued.serial, "labels": agent.labels }),
        );
        Ok(Response::new(EnrollResponse {
            host: record.host,
            labels: record.labels.into_iter().collect(),
            certificate_pem: issued.cert_pem,
            ca_pem: s.ca.cert_pem().to_string(),
            not_after_unix: issued.not_after_unix,
        }))
    }

    type SessionStream = SessionStream;

    async fn session(&self, req: Request<Streaming<AgentMessage>>) -> Result<Response<Self::SessionStream>, Status> {
        let identity = self.auth.check(&req, Role::Agent)?;
        let s = self.clone();
        let (name, serial) = (identity.name.clone(), identity.serial.clone());
        // A fast refusal before waiting; the decisive check is the compare-and-swap below.
        let record = s
            .store
            .get_agent(&name)
            .map_err(internal)?
            .ok_or_else(|| Status::unauthenticated(format!("unknown agent {name}: enroll it again")))?;
        check_current(&record, &serial)?;
        let mut inbound = req.into_inner();
        let hello = tokio::select! {
            h = wait_hello(&mut inbound) => h?,
            // A revocation closes a session still waiting for its hello.
            _ = s.auth.revoked().revoked(&serial) => return Err(revoked_status(&name)),
            // So does a drain: the graceful shutdown must not wait on it.
            _ = s.sessions.shutting_down().cancelled() => {
                return Err(Status::unavailable("rekeyd is shutting down; reconnect shortly"));
            }
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(version_mismatch(&format!("agent {name}"), hello.protocol_version));
        }
        let now = now_unix();
        // Flushed only when the hello changes what the record says: a fleet
        // reconnecting at once after a restart otherwise costs one fsync per
        // agent (10,000 hosts: 36 s). last_seen alone need not survive a
        // crash, as in `touch_last_seen`, and every hello re-sends the rest.
        let changed = match s.store.get_agent(&name) {
            Ok(Some(rec)) => rec.agent_version != hello.agent_version || rec.secrets != hello.secrets,
            _ => true,
        };
        s.store
            .update_agent(&name, changed, |rec| {
                check_current(rec, &serial)?;
                rec.agent_version = hello.agent_version.clone();
                rec.secrets = hello.secrets.clone();
                rec.last_seen_unix = now;
                Ok::<(), Status>(())
            })
            .map_err(internal)?
            .ok_or_else(|| Status::unauthenticated(format!("unknown agent {name}: enroll it again")))??;

        let (tx, rx) = mpsc::channel(crate::sessions::OUTBOUND_CAPACITY);
        let cancel = CancellationToken::new();
        let id = s.sessions.next_id();
        tx.try_send(Ok(CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Welcome(Welcome {
                protocol_version: PROTOCOL_VERSION,
                host: name.clone(),
                heartbeat_interval_ms: s.config.heartbeat_interval.as_millis() as u64,
            })),
        }))
        .expect("fresh channel has room");
        let handle =
            SessionHandle { id, serial: serial.clone(), tx: tx.clone(), cancel: cancel.clone(), connected_unix: now };
        s.sessions.register(&name, handle);
        // A revocation that committed after the swap but before the session was
        // registered found nothing to close: look again now that it is visible.
        if s.auth.revoked().contains(&serial) {
            s.sessions.deregister(&name, id);
            return Err(revoked_status(&name));
        }
        tracing::info!(agent = %name, session = id, version = %hello.agent_version, secrets = ?hello.secrets, "agent connected");
        s.engine.agent_event(AgentEvent::Connected { host: name.clone(), applied: hello.applied.clone() }).await;

        let span = tracing::info_span!("session", agent = %name, session = id);
        tokio::spawn(
            async move {
                let reason = inbound_loop(&s, &name, &serial, &mut inbound, &tx, &cancel).await;
                s.sessions.deregister(&name, id);
                touch_last_seen(&s.store, &name);
                tracing::info!(%reason, "agent disconnected");
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn revoked_status(name: &str) -> Status {
    Status::permission_denied(format!("agent {name} is revoked; enroll it again with a new join token"))
}

/// The record allows a session with this certificate: not revoked, and the
/// serial belongs to the current enrollment.
fn check_current(rec: &AgentRecord, serial: &str) -> Result<(), Status> {
    if let Some(at) = rec.revoked_unix {
        return Err(Status::permission_denied(format!("agent {} was revoked at {}", rec.name, format_unix(at))));
    }
    if !rec.serials.iter().any(|s| s == serial) {
        return Err(Status::unauthenticated(format!(
            "certificate {serial} is not one issued to the current enrollment of {}",
            rec.name
        )));
    }
    Ok(())
}

/// The session's first message, which must be a hello, within `HELLO_TIMEOUT`.
async fn wait_hello(inbound: &mut Streaming<AgentMessage>) -> Result<rekey_proto::v1::Hello, Status> {
    match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(AgentMessage { msg: Some(agent_message::Msg::Hello(h)) }))) => Ok(h),
        Ok(Ok(Some(_))) => Err(Status::invalid_argument("the first message of a session must be a hello")),
        Ok(Ok(None)) => Err(Status::cancelled("agent closed the session before hello")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Status::deadline_exceeded("no hello within 10s")),
    }
}

/// Last-seen bookkeeping: a compare-and-swap that never touches anything else
/// (a revocation in between stays), not flushed (losing it in a crash is harmless).
fn touch_last_seen(store: &Store, name: &str) {
    let now = now_unix();
    if let Err(e) = store.update_agent(name, false, |rec| {
        rec.last_seen_unix = now;
        Ok::<(), std::convert::Infallible>(())
    }) {
        tracing::warn!(agent = %name, error = %Chain(&e), "cannot record last seen");
    }
}

/// Reads the agent's messages until it leaves, falls silent, or the session is
/// cancelled (revocation, replacement, shutdown). Returns why it ended.
async fn inbound_loop(
    s: &AgentSvc,
    name: &str,
    serial: &str,
    inbound: &mut Streaming<AgentMessage>,
    tx: &crate::sessions::Outbound,
    cancel: &CancellationToken,
) -> String {
    let mut last_persist = tokio::time::Instant::now();
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => return "session closed by coordinator".into(),
            r = tokio::time::timeout(s.config.silence_timeout, inbound.message()) => r,
        };
        let msg = match next {
            Err(_) => return format!("silent for {}s", s.config.silence_timeout.as_secs()),
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => return "agent closed the session".into(),
            Ok(Err(e)) => return format!("stream error: {}", e.message()),
        };
        if last_persist.elapsed() >= LAST_SEEN_PERSIST {
            last_persist = tokio::time::Instant::now();
            touch_last_seen(&s.store, name);
        }
        match msg.msg {
            Some(agent_message::Msg::Heartbeat(hb)) => {
                // An ack that does not fit is dropped: the agent is behind, not dead.
                let _ = tx.try_send(Ok(CoordinatorMessage {
                    msg: Some(coordinator_message::Msg::HeartbeatAck(HeartbeatAck { seq: hb.seq })),
                }));
            }
            Some(agent_message::Msg::Renew(r)) => {
                let reply = renew(s, name, serial, &r.csr_der);
                let msg = match reply {
                    Ok(resp) => Ok(CoordinatorMessage { msg: Some(coordinator_message::Msg::Renewed(resp)) }),
                    Err(status) => Err(status),
                };
                if tx.send(msg).await.is_err() {
                    return "outbound closed".into();
                }
            }
            Some(agent_message::Msg::Report(r)) => {
                tracing::info!(rotation = %r.rotation_id, secret = %r.secret, stage = r.stage, "stage report");
                crate::metrics::events::events().report(&r.secret, r.stage);
                s.engine.agent_event(AgentEvent::Report { host: name.to_string(), report: r }).await;
            }
            Some(agent_message::Msg::ScanResult(r)) => s.scans.deliver(name, r),
            Some(agent_message::Msg::PreflightResult(r)) => s.sessions.preflight_answer(name, r),
            Some(agent_message::Msg::Hello(_)) => {
                tracing::warn!("duplicate hello ignored");
            }
            None => {
                tracing::warn!("empty message ignored");
            }
        }
    }
}

/// A new certificate for the session's agent. Signed first (pure), then
/// recorded by a compare-and-swap that refuses if the agent was revoked — in
/// the store or in memory — so a revoked session never gets a certificate.
fn renew(s: &AgentSvc, name: &str, serial: &str, csr: &[u8]) -> Result<RenewResponse, Status> {
    if s.auth.revoked().contains(serial) {
        return Err(revoked_status(name));
    }
    let issued =
        s.ca.sign_agent_csr(csr, name, s.config.agent_cert_ttl)
            .map_err(|e| Status::invalid_argument(format!("renewal refused: {e}")))?;
    // Persisted (flushed) before the agent can use it.
    s.store
        .update_agent(name, true, |rec| {
            check_current(rec, serial)?;
            rec.cert_serial = issued.serial.clone();
            rec.cert_not_after_unix = issued.not_after_unix;
            rec.serials.push(issued.serial.clone());
            // Keep the serials that can still be valid; older ones have expired anyway.
            let keep = 8;
            if rec.serials.len() > keep {
                let drop = rec.serials.len() - keep;
                rec.serials.drain(..drop);
            }
            Ok::<(), Status>(())
        })
        .map_err(internal)?
        .ok_or_else(|| Status::unauthenticated(format!("unknown agent {name}")))??;
    tracing::info!(serial = %issued.serial, not_after = %format_unix(issued.not_after_unix), "certificate renewed");
    Ok(RenewResponse { certificate_pem: issued.cert_pem, not_after_unix: issued.not_after_unix })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_strictly() {
        assert!(parse_token("abcd1234.0123456789abcdef0123").is_ok());
        for bad in ["", "nodot", ".x", "id.short", "id.0123456789abcdef;rm", "a b.0123456789abcdef"] {
            assert_eq!(parse_token(bad).unwrap_err().code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }
}
