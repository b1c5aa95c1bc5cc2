//! `rekey.v1.AdminService`: the operator API. Every call requires an operator
//! certificate issued by this coordinator; agents are refused.

use super::{Shared, internal};
use crate::store::TokenRecord;
use rekey_common::time::now_unix;
use rekey_common::tls::{Identity, Role};
use rekey_proto::v1::admin_service_server::AdminService;
use rekey_proto::v1::{
    AgentInfo, CoordinatorMessage, CreateTokenRequest, CreateTokenResponse, ListAgentsRequest, ListAgentsResponse,
    RevokeAgentRequest, RevokeAgentResponse, Revoked, coordinator_message,
};
use rekey_proto::{PROTOCOL_HEADER, PROTOCOL_VERSION};
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::BTreeMap;
use std::time::Duration;
use tonic::{Request, Response, Status};

pub struct AdminSvc {
    pub shared: Shared,
}

/// Authorizes an admin call: operator role, a serial this coordinator issued
/// to an operator, and a compatible CLI.
pub(crate) fn operator<T>(shared: &Shared, req: &Request<T>) -> Result<Identity, Status> {
    let id = super::authorize(shared, req, Role::Operator)?;
    if let Some(v) = req.metadata().get(PROTOCOL_HEADER) {
        let theirs: u32 = v.to_str().ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        if theirs != PROTOCOL_VERSION {
            return Err(super::agent::version_mismatch("the rekey CLI", theirs));
        }
    }
    Ok(id)
}

/// Host names as DNS names or simple identifiers: what a certificate URI and a
/// table can carry without surprises.
pub(crate) fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && !name.starts_with(['-', '.'])
}

fn valid_label(k: &str, v: &str) -> bool {
    let ok = |s: &str, allow_empty: bool| {
        (allow_empty || !s.is_empty())
            && s.len() <= 63
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '/'))
    };
    ok(k, false) && ok(v, true)
}

fn random_hex(bytes: usize) -> Result<String, Status> {
    let mut b = vec![0u8; bytes];
    SystemRandom::new().fill(&mut b).map_err(|_| Status::internal("system random number generator failed"))?;
    Ok(hex::encode(b))
}

#[tonic::async_trait]
impl AdminService for AdminSvc {
    async fn create_token(&self, req: Request<CreateTokenRequest>) -> Result<Response<CreateTokenResponse>, Status> {
        let who = operator(&self.shared, &req)?;
        let req = req.into_inner();
        let s = &self.shared;
        if !valid_host_name(&req.host) {
            return Err(Status::invalid_argument(format!(
                "invalid host name {:?}: expected letters, digits, '-', '.', '_' (at most 253)",
                req.host
            )));
        }
        for (k, v) in &req.labels {
            if !valid_label(k, v) {
                return Err(Status::invalid_argument(format!(
                    "invalid label {k:?}={v:?}: expected key and value of letters, digits, '-', '.', '_', '/' (at most 63 each)"
                )));
            }
        }
        let ttl = if req.ttl_seconds == 0 { s.config.default_token_ttl } else { Duration::from_secs(req.ttl_seconds) };
        if ttl > s.config.max_token_ttl {
            return Err(Status::invalid_argument(format!(
                "token ttl {} exceeds the coordinator's pki.max_token_ttl of {}",
                humantime::format_duration(ttl),
                humantime::format_duration(s.config.max_token_ttl)
            )));
        }
        let id = random_hex(4)?;
        let secret = random_hex(16)?;
        let now = now_unix();
        let rec = TokenRecord {
            id: id.clone(),
            secret_sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes())),
            host: req.host.clone(),
            labels: req.labels.into_iter().collect::<BTreeMap<_, _>>(),
            created_unix: now,
            expires_unix: now + ttl.as_secs() as i64,
            created_by: who.to_string(),
            used_unix: None,
        };
        s.store.put_token(&rec).map_err(internal)?;
        tracing::info!(operator = %who, token = %id, host = %rec.host, "join token created");
        Ok(Response::new(CreateTokenResponse {
            token: format!("{id}.{secret}"),
            ca_fingerprint: s.ca.fingerprint(),
            expires_unix: rec.expires_unix,
        }))
    }

    async fn list_agents(&self, req: Request<ListAgentsRequest>) -> Result<Response<ListAgentsResponse>, Status> {
        operator(&self.shared, &req)?;
        let s = &self.shared;
        let now = now_unix();
        let mut agents: Vec<AgentInfo> = s
            .store
            .list_agents()
            .map_err(internal)?
            .into_iter()
            .map(|a| {
                let connected = s.sessions.is_connected(&a.name);
                AgentInfo {
                    connected,
                    last_seen_unix: if connected { now } else { a.last_seen_unix },
                    revoked: a.revoked_unix.is_some(),
                    name: a.name,
                    labels: a.labels.into_iter().collect(),
                    agent_version: a.agent_version,
                    cert_not_after_unix: a.cert_not_after_unix,
                    secrets: a.secrets,
                    enrolled_unix: a.enrolled_unix,
                    cert_serial: a.cert_serial,
                }
            })
            .collect();
        agents.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    async fn revoke_agent(&self, req: Request<RevokeAgentRequest>) -> Result<Response<RevokeAgentResponse>, Status> {
        let who = operator(&self.shared, &req)?;
        let name = req.into_inner().name;
        let s = &self.shared;
        let rec = s
            .store
            .revoke_agent(&name, &who.to_string(), now_unix())
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no agent named {name:?} (see `rekey agents`)")))?;
        // Handshake refusal first, then end the live session.
        s.revoked.extend(rec.serials.iter().cloned());
        let was_connected = s.sessions.close(
            &name,
            Some(CoordinatorMessage {
                msg: Some(coordinator_message::Msg::Revoked(Revoked { reason: format!("revoked by {who}") })),
            }),
        );
        tracing::warn!(operator = %who, agent = %name, was_connected, "agent revoked");
        Ok(Response::new(RevokeAgentResponse { was_connected }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_are_validated() {
        assert!(valid_host_name("web-1.prod"));
        for bad in ["", "-x", "a b", "a/b", "x\u{e9}"] {
            assert!(!valid_host_name(bad), "{bad}");
        }
        assert!(valid_label("env", "prod"));
        assert!(valid_label("team", ""));
        assert!(!valid_label("", "x"));
        assert!(!valid_label("k", "a b"));
    }
}
