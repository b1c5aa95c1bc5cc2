//! `rekey.v1.AdminService`: the operator API. Every call requires an operator
//! certificate issued by this coordinator; agents are refused. Read models
//! travel as `JsonResponse`s holding exactly one `rekey_types::v1` view (or a
//! list of them), built by [`views`].

// Declared here so that `service/mod.rs` stays as it is while it is being
// restructured; it belongs beside `admin` and `agent` there.

use super::views;
use super::{Authorizer, internal};
use crate::alerts::Alerts;
use crate::config::Config;
use crate::engine::campaign::Campaigns;
use crate::engine::campaign::{CampaignError, Incident};
use crate::engine::driver::EngineHandle;
use crate::engine::driver::{EngineError, StartOptions};
use crate::engine::machine::{DecisionKind, Event, Rotation};
use crate::pki::Ca;
use crate::preflight::{self, Preflight, PreflightError};
use crate::scope::Scanner;
use crate::scope::{self, ScopeError};
use crate::sessions::Sessions;
use crate::store::Store;
use crate::store::TokenRecord;
use crate::store::{OperatorRecord, OperatorRefused, OperatorRole};
use rekey_common::error::{MAX_NAMED, bounded, chain as one_line};
use rekey_common::time::now_unix;
use rekey_common::tls::Identity;
use rekey_proto::v1::admin_service_server::AdminService;
use rekey_proto::v1::{
    BackupRequest, BackupResponse, Control, ControlRotationRequest, CoordinatorMessage, CreateTokenRequest,
    CreateTokenResponse, GetIncidentRequest, GetReportRequest, GetRotationRequest, JsonResponse, ListAgentsRequest,
    ListAgentsResponse, ListAlertsRequest, ListAuditRequest, ListIncidentsRequest, ListRotationsRequest,
    ListSecretsRequest, ListVersionsRequest, OpenIncidentRequest, PlanRotationRequest, ReportResponse,
    RevokeAgentRequest, RevokeAgentResponse, Revoked, ScopeRequest, StartRotationRequest, VerifyAuditRequest,
    coordinator_message,
};
use rekey_proto::v1::{CreateOperatorRequest, CreateOperatorResponse, ListOperatorsRequest, RevokeOperatorRequest};
use rekey_proto::{PROTOCOL_HEADER, PROTOCOL_VERSION};
use rekey_types::v1::{
    AlertView, AuditRecordView, AuditVerifyView, IncidentView, OperatorView, RotationSummary, RotationView, ScopeView,
};
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// The admin service and the handles it uses (cheap to clone).
#[derive(Clone)]
pub struct AdminSvc {
    pub config: Arc<Config>,
    pub store: Store,
    pub ca: Arc<Ca>,
    pub sessions: Sessions,
    pub auth: Authorizer,
    pub engine: EngineHandle,
    pub campaigns: Campaigns,
    pub alerts: Alerts,
    pub scanner: Scanner,
    /// Seals online backups (derived from the master key at init).
    pub backup_key: Arc<crate::crypto::Key>,
    /// The web console's one-time logins and sessions (`rekey console`).
    pub console: crate::console::auth::Logins,
    /// Cancelled at shutdown: ends the server streams (`WatchRotation`) so the drain can finish.
    pub streams: tokio_util::sync::CancellationToken,
}

/// Every admin RPC, for the role table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rpc {
    CreateToken,
    ListAgents,
    RevokeAgent,
    ListSecrets,
    StartRotation,
    PlanRotation,
    GetRotation,
    ListRotations,
    ControlRotation,
    ListVersions,
    ListAudit,
    OpenIncident,
    ListAlerts,
    GetIncident,
    ListIncidents,
    CloseIncident,
    GetReport,
    VerifyAudit,
    Scope,
    CreateOperator,
    ListOperators,
    RevokeOperator,
    Backup,
    ListCoordinators,
    WatchRotation,
    CreateConsoleLogin,
}

impl Rpc {
    #[cfg(test)]
    const ALL: [Rpc; 26] = [
        Rpc::CreateToken,
        Rpc::ListAgents,
        Rpc::RevokeAgent,
        Rpc::ListSecrets,
        Rpc::StartRotation,
        Rpc::PlanRotation,
        Rpc::GetRotation,
        Rpc::ListRotations,
        Rpc::ControlRotation,
        Rpc::ListVersions,
        Rpc::ListAudit,
        Rpc::OpenIncident,
        Rpc::ListAlerts,
        Rpc::GetIncident,
        Rpc::ListIncidents,
        Rpc::CloseIncident,
        Rpc::GetReport,
        Rpc::VerifyAudit,
        Rpc::Scope,
        Rpc::CreateOperator,
        Rpc::ListOperators,
        Rpc::RevokeOperator,
        Rpc::Backup,
        Rpc::ListCoordinators,
        Rpc::WatchRotation,
        Rpc::CreateConsoleLogin,
    ];

    /// What the call does, for a refusal: "may not {what}".
    fn what(self) -> &'static str {
        match self {
            Rpc::CreateToken => "create a join token",
            Rpc::ListAgents => "list agents",
            Rpc::RevokeAgent => "revoke an agent",
            Rpc::ListSecrets => "list secrets",
            Rpc::StartRotation => "start a rotation",
            Rpc::PlanRotation => "plan a rotation",
            Rpc::GetRotation => "read a rotation",
            Rpc::ListRotations => "list rotations",
            Rpc::ControlRotation => "pause, resume, abort or exclude a host from a rotation",
            Rpc::ListVersions => "list versions",
            Rpc::ListAudit => "read the audit log",
            Rpc::OpenIncident => "open an incident",
            Rpc::ListAlerts => "list alerts",
            Rpc::GetIncident => "read an incident",
            Rpc::ListIncidents => "list incidents",
            Rpc::CloseIncident => "close an incident",
            Rpc::GetReport => "read a report",
            Rpc::VerifyAudit => "verify the audit log",
            Rpc::Scope => "run a scope scan",
            Rpc::CreateOperator => "create an operator",
            Rpc::ListOperators => "list operators",
            Rpc::RevokeOperator => "revoke an operator",
            Rpc::Backup => "take a backup of the store",
            Rpc::ListCoordinators => "list the coordinators",
            Rpc::WatchRotation => "watch a rotation",
            Rpc::CreateConsoleLogin => "open the web console",
        }
    }
}

/// THE role table: the least role that may make each admin call. Viewers
/// read; rotators also run rotations (and exclusions), incidents and scope
/// scans; admins also enroll (tokens), revoke agents and manage operators.
pub(crate) fn required_role(rpc: Rpc) -> OperatorRole {
    use OperatorRole::*;
    match rpc {
        Rpc::ListAgents
        | Rpc::ListSecrets
        | Rpc::GetRotation
        | Rpc::ListRotations
        | Rpc::ListVersions
        | Rpc::ListAudit
        | Rpc::ListAlerts
        | Rpc::GetIncident
        | Rpc::ListIncidents
        | Rpc::GetReport
        | Rpc::VerifyAudit
        | Rpc::ListOperators
        | Rpc::ListCoordinators
        | Rpc::WatchRotation
        // The console is read-only: a viewer sees there what `rekey` shows it.
        | Rpc::CreateConsoleLogin => Viewer,
        // A plan makes every consumer run its health check now and carries the
        // current version to the consumers: as much as a start, short of a key.
        Rpc::StartRotation
        | Rpc::PlanRotation
        | Rpc::ControlRotation
        | Rpc::OpenIncident
        | Rpc::CloseIncident
        | Rpc::Scope => Rotator,
        // A backup holds every secret (sealed) and every credential record.
        Rpc::CreateToken | Rpc::RevokeAgent | Rpc::CreateOperator | Rpc::RevokeOperator | Rpc::Backup => Admin,
    }
}

/// The refusal of a call the operator's role does not allow, if it does not.
fn role_refusal(rec: &OperatorRecord, rpc: Rpc) -> Option<Status> {
    let needed = required_role(rpc);
    (!rec.role.allows(needed)).then(|| {
        Status::permission_denied(format!(
            "operator {} has role {} and may not {}: that needs role {needed}",
            rec.name,
            rec.role,
            rpc.what()
        ))
    })
}

/// Authorizes an admin call, the one place every admin RPC goes through: an
/// operator certificate this coordinator issued, neither it nor its operator
/// revoked (read on every call), a role that allows `rpc`
/// ([`required_role`]), and a compatible CLI.
pub(crate) fn operator<T>(svc: &AdminSvc, req: &Request<T>, rpc: Rpc) -> Result<Identity, Status> {
    let (id, rec) = svc.auth.operator(req)?;
    if let Some(refused) = role_refusal(&rec, rpc) {
        tracing::warn!(operator = %rec.name, role = %rec.role, call = ?rpc, "call refused by role");
        return Err(refused);
    }
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
        let who = operator(self, &req, Rpc::CreateToken)?;
        let req = req.into_inner();
        let s = self;
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
        super::audit_to(
            s.engine.state(),
            &who.to_string(),
            "token.create",
            serde_json::json!({ "token": id, "host": rec.host, "labels": rec.labels, "expires_unix": rec.expires_unix }),
        );
        Ok(Response::new(CreateTokenResponse {
            token: format!("{id}.{secret}"),
            ca_fingerprint: s.ca.fingerprint(),
            expires_unix: rec.expires_unix,
        }))
    }

    /// The registry, filtered and limited here (`rekey agents --filter
    /// --limit`): a large fleet's page is cut before it is sent.
    async fn list_agents(&self, req: Request<ListAgentsRequest>) -> Result<Response<ListAgentsResponse>, Status> {
        operator(self, &req, Rpc::ListAgents)?;
        let r = req.into_inner();
        let filters = r
            .filters
            .iter()
            .map(|t| rekey_types::v1::AgentFilter::parse(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(bounded(e.to_string())))?;
        let records = self.store.list_agents().map_err(internal)?;
        let connected = |name: &str| self.sessions.is_connected(name);
        let (agents, total) = views::agents_page(records, connected, &filters, r.limit as usize, now_unix());
        Ok(Response::new(ListAgentsResponse { agents, total }))
    }

    async fn revoke_agent(&self, req: Request<RevokeAgentRequest>) -> Result<Response<RevokeAgentResponse>, Status> {
        let who = operator(self, &req, Rpc::RevokeAgent)?;
        let name = req.into_inner().name;
        let s = self;
        let rec = s
            .store
            .revoke_agent(&name, &who.to_string(), now_unix())
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no agent named {name:?} (see `rekey agents`)")))?;
        // Handshake refusal first, then end the live session.
        s.auth.revoked().extend(rec.serials.iter().cloned());
        let was_connected = s.sessions.close(
            &name,
            Some(CoordinatorMessage {
                msg: Some(coordinator_message::Msg::Revoked(Revoked { reason: format!("revoked by {who}") })),
            }),
        );
        tracing::warn!(operator = %who, agent = %name, was_connected, "agent revoked");
        super::audit_to(
            s.engine.state(),
            &who.to_string(),
            "agent.revoke",
            serde_json::json!({ "agent": name, "serials": rec.serials }),
        );
        s.exclude_revoked(&name, &who.to_string()).await;
        Ok(Response::new(RevokeAgentResponse { was_connected }))
    }

    async fn list_secrets(&self, req: Request<ListSecretsRequest>) -> Result<Response<JsonResponse>, Status> {
        operator(self, &req, Rpc::ListSecrets)?;
        let out = views::secrets(&self.config, self.engine.state(), &self.store)
            .map_err(|e| Status::internal(one_line(&e)))?;
        Ok(json(&out))
    }

    /// Runs the preflight first and refuses to generate a key while it finds
    /// a problem, unless told to skip it with a reason (audited).
    async fn start_rotation(&self, req: Request<StartRotationRequest>) -> Result<Response<JsonResponse>, Status> {
        let who = operator(self, &req, Rpc::StartRotation)?.to_string();
        let r = req.into_inner();
        let opts = if r.skip_preflight {
            if r.reason.trim().is_empty() {
                return Err(Status::invalid_argument(
                    "skipping the preflight needs a reason (--reason TEXT): it goes to the audit log",
                ));
            }
            tracing::warn!(operator = %who, secret = %r.secret, reason = %r.reason, "preflight skipped");
            StartOptions { preflight_skipped: Some(r.reason) }
        } else {
            let plan = self.preflight().run(&r.secret, preflight::DEFAULT_WAIT).await.map_err(preflight_status)?;
            let problems = plan.problems();
            if !problems.is_empty() {
                return Err(self.refuse_start(&who, &r.secret, &problems));
            }
            StartOptions::default()
        };
        self.rotation_json(self.engine.start_with(&r.secret, &who, opts).await)
    }

    async fn plan_rotation(&self, req: Request<PlanRotationRequest>) -> Result<Response<JsonResponse>, Status> {
        let who = operator(self, &req, Rpc::PlanRotation)?;
        let r = req.into_inner();
        let wait = preflight::wait_of(r.wait_seconds.into()).map_err(preflight_status)?;
        let plan = self.preflight().run(&r.secret, wait).await.map_err(preflight_status)?;
        let problems = plan.problems().len();
        tracing::info!(operator = %who, secret = %r.secret, problems, elapsed_ms = plan.elapsed_ms, "rotation planned");
        Ok(json(&views::plan(&plan)))
    }

    async fn get_rotation(&self, req: Request<GetRotationRequest>) -> Result<Response<JsonResponse>, Status> {
        operator(self, &req, Rpc::GetRotation)?;
        let id = req.into_inner().id;
        match self.engine.state().get_rotation(&id) {
            Ok(Some(r)) => Ok(json(&RotationView::from(&r))),
            Ok(None) => Err(engine_status(EngineError::UnknownRotation(id))),
            Err(e) => Err(Status::internal(one_line(&e))),
        }
    }

    async fn list_rotations(&self, req: Request<ListRotationsRequest>) -> Result<Response<JsonResponse>, Status> {
        operator(self, &req, Rpc::ListRotations)?;
        let filter = req.into_inner().secret;
        let mut all = self.engine.state().list_rotations().map_err(|e| Status::internal(one_line(&e)))?;
        all.retain(|r| filter.is_empty() || r.secret == filter);
        all.sort_by_key(|r| std::cmp::Reverse(r.created_ms));
        Ok(json(&all.iter().map(RotationSummary::from).collect::<Vec<_>>()))
    }

    async fn control_rotation(&self, req: Request<ControlRotationRequest>) -> Result<Response<JsonResponse>, Status> {
        let who = operator(self, &req, Rpc::ControlRotation)?.to_string();
        let r = req.into_inner();
        let event = match Control::try_from(r.action) {
            Ok(Control::Pause) => Event::Pause { by: who.clone() },
            Ok(Control::Resume) => Event::Resume { by: who.clone() },
            Ok(Control::Abort) => Event::Abort { by: who.clone() },
            Ok(Control::Exclude) => {
                if r.reason.trim().is_empty() {
                    return Err(Status::invalid_argument(
                        "excluding a host needs a reason (--reason TEXT): it goes to the audit log",
                    ));
                }
                Event::Exclude { host: r.host, by: who.clone(), reason: r.reason }
            }
            Ok(c @ (Control::Revoke | Control::Finish | Control::Abandon)) => {
                let kind = match c {
                    Control::Revoke => DecisionKind::Revoke,
                    Control::Finish => DecisionKind::Finish,
                    _ => DecisionKind::Abandon,
                };
                if r.reason.trim().is_empty() {
                    return Err(Status::invalid_argument(format!(
                        "`{}` needs a reason (--reason TEXT): it goes to the audit log and the report",
                        kind.as_str()
                    )));
                }
                Event::Decide { kind, by: who.clone(), reason: r.reason }
            }
            _ => return Err(Status::invalid_argument(format!("unknown rotation control {}", r.action))),
        };
        self.rotation_json(self.engine.control(&r.id, event, &who).await)
    }

    async fn list_versions(&self, req: Request<ListVersionsRequest>) -> Result<Response<JsonResponse>, Status> {
        operator(self, &req, Rpc::ListVersions)?;
        let secret = req.into_inner().secret;
        let p =
            self.engine.provider(&secret).ok_or_else(|| engine_status(EngineError::UnknownSecret(secret.clone())))?;
        let mut versions = p.list().await.map_err(|e| Status::unavailable(format!("provider of {secret}: {e}")))?;
        versions.sort_by(|a, b| a.created_unix.cmp(&b.created_unix).then(a.id.cmp(&b.id)));
        let rec = self.engine.state().get_secret(&secret).map_err(|e| Status::internal(one_line(&e)))?;
        let current = rec.current_version.as_deref();
        Ok(json(&versions.iter().map(|v| views::version(v, current)).collect::<Vec<_>>()))
    }

    async fn get_report(&self, req: Request<GetReportRequest>) -> Result<Response<ReportResponse>, Status> {
        operator(self, &req, Rpc::GetReport)?;
        let r = req.into_inner();
        let state = self.engine.state();
        let audit = state.audit_records().map_err(|e| Status::internal(one_line(&e)))?;
        let head = crate::audit::verify(&audit).head;
        if r.id.starts_with("inc-") {
            let inc = self.campaigns.get(&r.id).map_err(campaign_status)?;
            let rotations: Vec<Rotation> = inc
                .secrets
                .values()
                .filter_map(|p| p.rotation.as_ref())
                .map(|id| state.get_rotation(id).map_err(|e| Status::internal(one_line(&e))))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .flatten()
                .collect();
            let content = match r.format.as_str() {
                "md" | "markdown" | "" => crate::report::incident_markdown(&inc, &rotations, &audit, &head),
                "json" => serde_json::to_string_pretty(&crate::report::incident_json(&inc, &rotations, &audit, &head))
                    .expect("json"),
                other => {
                    return Err(Status::invalid_argument(format!(
                        "unknown report format {other:?}: expected md or json"
                    )));
                }
            };
            return Ok(Response::new(ReportResponse { content }));
        }
        let rot = state
            .get_rotation(&r.id)
            .map_err(|e| Status::internal(one_line(&e)))?
            .ok_or_else(|| engine_status(EngineError::UnknownRotation(r.id.clone())))?;
        let content = match r.format.as_str() {
            "md" | "markdown" | "" => crate::report::rotation_markdown(&rot, &audit, &head),
            "json" => serde_json::to_string_pretty(&crate::report::rotation_json(&rot, &audit, &head)).expect("json"),
            other => {
                return Err(Status::invalid_argument(format!("unknown report format {other:?}: expected md or json")));
            }
        };
        Ok(Response::new(ReportResponse { content }))
    }

    async fn list_alerts(&self, req: Request<ListAlertsRequest>) -> Result<Response<JsonResponse>, Status> {
        operator(self, &req, Rpc::ListAlerts)?;
        let mut all = self.alerts.list().map_err(|e| Status::internal(e.to_string()))?;
        all.reverse(); // newest first
        Ok(json(&all.iter().map(AlertView::from).collect::<Vec<_>>()))
    }

    async fn open_incident(&self, req: Request<OpenIncidentRequest>) -> Result<Response<JsonResponse>, Status> {
        let who = operator(self, &req, Rpc::OpenIncident)?.to_string();
        let r = req.into_inner();
        let concurrency = if r.concurrency == 0 { 1 } else { r.concurrency as usize };
        let inc = self.campaigns.open(&r.name, &r.secrets, concurrency, &r.first, &who).map_err(campaign_status)?;
        Ok(json(&incident_view(self, &inc)?))
    }

    async fn get_incident(&self, req: Request<GetIncidentRequest>) -> Result<Response<JsonResponse>, Status> {
        operator(self, &req, Rpc::GetIncident)?;
        let inc = self.campaigns.get(&req.into_inner().id).map_err(campaign_status)?;
        Ok(json(&incident_view(self, &inc)?))
    }

    async fn list_incidents(&self, req: Request<ListIncidentsRequest>) -> Result<Response<JsonResponse>, Status> {
        operator(self, &req, Rpc::ListIncidents)?;
        let mut all = self.campaigns.list().map_err(campaign_status)?;
        all.sort_by_key(|i| std::cmp::Reverse(i.opened_ms));
        let v = all.iter().map(|i| incident_view(self, i)).collect::<Result<Vec<_>, _>>()?;
        Ok(json(&v))
    }

    async fn close_incident(&self, req: Request<GetIncidentRequest>) -> Result<Response<JsonResponse>, Status> {
        let who = operator(self, &req, Rpc::CloseIncident)?.to_string();
        let inc = self.campaigns.close(&req.into_inner().id, &who).map_err(campaign_status)?;
        Ok(json(&incident_view(self, &inc)?))
    }

    async fn list_audit(&self, req: Request<ListAuditRequest>) -> Result<Response<JsonResponse>, Status> {
        operator(self, &req, Rpc::ListAudit)?;
        let limit = req.into_inner().limit as usize;
        let mut records = self.engine.state().audit_records().map_err(|e| Status::internal(one_line(&e)))?;
        if limit > 0 && records.len() > limit {
            records.drain(..records.len() - limit);
        }
        Ok(json(&records.iter().map(AuditRecordView::from).collect::<Vec<_>>()))
    }

    async fn scope(&self, req: Request<ScopeRequest>) -> Result<Response<JsonResponse>, Status> {
        let who = operator(self, &req, Rpc::Scope)?.to_string();
        let r = req.into_inner();
        let s = self;
        let query = scope::Query::new(r.secret, &r.version, r.rotation_id, r.timeout_seconds).map_err(scope_status)?;
        let scan = s.scanner.prepare(&query).map_err(scope_status)?;
        // Recorded before any agent is asked: who looked for what, and where.
        super::audit_to(
            s.engine.state(),
            &who,
            "scope.scan",
            serde_json::json!({
                "scan": scan.id, "secret": query.secret, "filter": query.filter.to_string(),
                "rotation": scan.rotation, "hosts_asked": scan.hosts_asked,
                "versions": scan.searched.iter().map(|v| serde_json::json!({"version": v.version, "role": v.role, "field": v.field})).collect::<Vec<_>>(),
            }),
        );
        tracing::info!(operator = %who, scan = %scan.id, secret = %query.secret, hosts = scan.hosts_asked.len(), "scope scan started");
        let map = scan.run(&s.scanner).await.map_err(scope_status)?;
        super::audit_to(s.engine.state(), &who, "scope.result", scope::audit_summary(&map));
        Ok(json(&ScopeView::from(&map)))
    }

    async fn backup(&self, req: Request<BackupRequest>) -> Result<Response<BackupResponse>, Status> {
        let who = operator(self, &req, Rpc::Backup)?.to_string();
        let (summary, file) = crate::backup::export(&self.store, self.engine.state(), &self.backup_key)
            .map_err(|e| Status::unavailable(format!("backup failed: {}", one_line(&e))))?;
        tracing::info!(operator = %who, audit_seq = summary.audit_seq, bytes = file.len(), "store backed up");
        super::audit_to(
            self.engine.state(),
            &who,
            "store.backup",
            serde_json::json!({ "audit_seq": summary.audit_seq, "audit_hash": summary.audit_hash }),
        );
        Ok(Response::new(BackupResponse { file, audit_seq: summary.audit_seq }))
    }

    async fn create_operator(
        &self,
        req: Request<CreateOperatorRequest>,
    ) -> Result<Response<CreateOperatorResponse>, Status> {
        let who = operator(self, &req, Rpc::CreateOperator)?.to_string();
        let r = req.into_inner();
        if !crate::store::valid_operator_name(&r.name) {
            return Err(Status::invalid_argument(format!(
                "invalid operator name {:?}: expected letters, digits, '-', '.', '_' (at most 64)",
                r.name
            )));
        }
        let role: OperatorRole = r.role.parse().map_err(Status::invalid_argument)?;
        let issued = self.ca.sign_operator_csr(&r.csr_der, &r.name, self.config.operator_cert_ttl).map_err(|e| {
            Status::invalid_argument(format!(
                "cannot sign the certificate request for operator {}: {}",
                r.name,
                one_line(&e)
            ))
        })?;
        let rec = OperatorRecord {
            name: r.name.clone(),
            role,
            serials: vec![issued.serial.clone()],
            created_unix: now_unix(),
            created_by: who.clone(),
            revoked_unix: None,
            revoked_by: None,
        };
        // The certificate is returned only once its serial is recorded: an
        // unrecorded serial is refused on every call anyway.
        self.store.create_operator(&rec).map_err(internal)?.map_err(operator_status)?;
        tracing::info!(operator = %who, created = %rec.name, role = %rec.role, serial = %issued.serial, "operator created");
        super::audit_to(
            self.engine.state(),
            &who,
            "operator.create",
            serde_json::json!({ "operator": rec.name, "role": rec.role, "serial": issued.serial }),
        );
        Ok(Response::new(CreateOperatorResponse {
            cert_pem: issued.cert_pem,
            ca_pem: self.ca.cert_pem().to_string(),
            operator_json: serde_json::to_string(&OperatorView::from(&rec)).expect("views serialize to json"),
        }))
    }

    async fn list_operators(&self, req: Request<ListOperatorsRequest>) -> Result<Response<JsonResponse>, Status> {
        operator(self, &req, Rpc::ListOperators)?;
        let all = self.store.list_operators().map_err(internal)?;
        Ok(json(&all.iter().map(OperatorView::from).collect::<Vec<_>>()))
    }

    async fn revoke_operator(&self, req: Request<RevokeOperatorRequest>) -> Result<Response<JsonResponse>, Status> {
        let who = operator(self, &req, Rpc::RevokeOperator)?.to_string();
        let name = req.into_inner().name;
        let rec = self.store.revoke_operator(&name, &who, now_unix()).map_err(internal)?.map_err(operator_status)?;
        // Refused from the next call on (the store is read on every call too).
        self.auth.revoked().extend(rec.serials.iter().cloned());
        tracing::warn!(operator = %who, revoked = %name, "operator revoked");
        super::audit_to(
            self.engine.state(),
            &who,
            "operator.revoke",
            serde_json::json!({ "operator": name, "role": rec.role, "serials": rec.serials }),
        );
        Ok(json(&OperatorView::from(&rec)))
    }

    async fn verify_audit(&self, req: Request<VerifyAuditRequest>) -> Result<Response<JsonResponse>, Status> {
        operator(self, &req, Rpc::VerifyAudit)?;
        let records = self.engine.state().audit_records().map_err(|e| Status::internal(one_line(&e)))?;
        Ok(json(&AuditVerifyView::from(&crate::audit::verify(&records))))
    }

    async fn list_coordinators(
        &self,
        req: Request<rekey_proto::v1::ListCoordinatorsRequest>,
    ) -> Result<Response<JsonResponse>, Status> {
        operator(self, &req, Rpc::ListCoordinators)?;
        let view = crate::ha::coordinators_view(&self.store, &self.config.ha).map_err(internal)?;
        Ok(json(&view))
    }

    async fn create_console_login(
        &self,
        req: Request<rekey_proto::v1::CreateConsoleLoginRequest>,
    ) -> Result<Response<rekey_proto::v1::CreateConsoleLoginResponse>, Status> {
        let id = operator(self, &req, Rpc::CreateConsoleLogin)?;
        // The session gets the operator's role as recorded now.
        let (_, rec) = self.auth.operator(&req)?;
        let link = self.console.create(&rec.name, rec.role, rekey_common::time::now_unix_ms()).map_err(|e| {
            use crate::console::auth::LoginError as E;
            match e {
                E::Off(_) | E::NotListening => Status::failed_precondition(e.to_string()),
                E::TooMany(_) => Status::resource_exhausted(e.to_string()),
                E::Random => Status::internal(e.to_string()),
            }
        })?;
        tracing::info!(operator = %id, "console login link issued");
        Ok(Response::new(rekey_proto::v1::CreateConsoleLoginResponse {
            url: link.url,
            expires_unix: (link.expires_ms / 1000) as u64,
            session_seconds: link.session.as_secs(),
        }))
    }

    type WatchRotationStream = WatchStream;

    async fn watch_rotation(&self, req: Request<GetRotationRequest>) -> Result<Response<WatchStream>, Status> {
        operator(self, &req, Rpc::WatchRotation)?;
        let id = req.into_inner().id;
        // Subscribed before the first read, so no change falls between the two.
        let changes = self.engine.state().rotation_changes();
        let first = match self.engine.state().get_rotation(&id) {
            Ok(Some(r)) => r,
            Ok(None) => return Err(engine_status(EngineError::UnknownRotation(id))),
            Err(e) => return Err(Status::internal(one_line(&e))),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        let state = self.engine.state().clone();
        let stop = self.streams.clone();
        tokio::spawn(watch(state, first, changes, tx, stop));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// Views a slow watcher may fall behind by before the engine's commits wait
/// for it (each is one document; a watcher that went away ends its task).
const WATCH_BUFFER: usize = 8;

/// Sends `rot` now and again after every committed change to it, until it is
/// terminal, the watcher goes away or rekeyd shuts down.
async fn watch(
    state: crate::engine::state::EngineState,
    mut rot: Rotation,
    mut changes: tokio::sync::watch::Receiver<u64>,
    tx: tokio::sync::mpsc::Sender<Result<JsonResponse, Status>>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let doc = JsonResponse { json: serde_json::to_string(&RotationView::from(&rot)).expect("views serialize") };
        if tx.send(Ok(doc)).await.is_err() || rot.state.is_terminal() {
            return;
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
            match state.get_rotation(&rot.id) {
                Ok(Some(next)) if next != rot => {
                    rot = next;
                    break;
                }
                Ok(_) => continue,
                Err(e) => {
                    let _ = tx.send(Err(Status::internal(one_line(&e)))).await;
                    return;
                }
            }
        }
    }
}

/// The stream of [`AdminService::watch_rotation`]: one JSON document per change.
pub type WatchStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<JsonResponse, Status>> + Send + 'static>>;

/// `status` with its message cut to [`rekey_common::error::MAX_MESSAGE`]
/// bytes: an error naming every host of a large fleet would otherwise not
/// fit the HTTP/2 trailers it travels in, and the client would see a
/// dropped connection instead of the refusal.
fn capped(status: Status) -> Status {
    if status.message().len() <= rekey_common::error::MAX_MESSAGE {
        return status;
    }
    Status::new(status.code(), bounded(status.message().to_string()))
}

fn operator_status(e: OperatorRefused) -> Status {
    capped(match e {
        OperatorRefused::Unknown(_) => Status::not_found(format!("{e} (see `rekey operator list`)")),
        OperatorRefused::Exists(_) => Status::already_exists(e.to_string()),
        OperatorRefused::AlreadyRevoked { .. } => Status::failed_precondition(e.to_string()),
    })
}

fn campaign_status(e: CampaignError) -> Status {
    capped(match e {
        CampaignError::Unknown(_) => Status::not_found(e.to_string()),
        CampaignError::NoMatch(_)
        | CampaignError::BadName(_)
        | CampaignError::BadConcurrency
        | CampaignError::FirstNotMatching { .. } => Status::invalid_argument(e.to_string()),
        CampaignError::Closed(_) => Status::failed_precondition(e.to_string()),
        CampaignError::State(_) => Status::internal(one_line(&e)),
    })
}

/// An incident with the live state of each of its rotations.
fn incident_view(shared: &AdminSvc, inc: &Incident) -> Result<IncidentView, Status> {
    let state = shared.engine.state();
    views::incident(inc, |id| state.get_rotation(id)).map_err(|e| Status::internal(one_line(&e)))
}

fn engine_status(e: EngineError) -> Status {
    capped(match e {
        EngineError::UnknownSecret(_) | EngineError::UnknownRotation(_) => Status::not_found(e.to_string()),
        EngineError::NoConsumers(_) | EngineError::AlreadyRotating { .. } | EngineError::Refused(_) => {
            Status::failed_precondition(e.to_string())
        }
        EngineError::Provider { .. } => Status::unavailable(one_line(&e)),
        EngineError::Stopped => Status::unavailable(e.to_string()),
        EngineError::State(_) => {
            tracing::error!(error = %one_line(&e), "engine state failure");
            Status::internal(one_line(&e))
        }
    })
}

fn scope_status(e: ScopeError) -> Status {
    use ScopeError as E;
    capped(match e {
        E::UnknownSecret(_) | E::UnknownRotation(_) => Status::not_found(e.to_string()),
        E::WrongRotation { .. } | E::BadFilter(_) | E::BadTimeout(_) => Status::invalid_argument(e.to_string()),
        E::NoVersion { .. } | E::OldValueForgotten { .. } | E::ValueNotHeld { .. } | E::NothingSearchable { .. } => {
            Status::failed_precondition(e.to_string())
        }
        E::TooManyScans(_) => Status::resource_exhausted(e.to_string()),
        E::State(_) | E::Store(_) | E::Random => {
            tracing::error!(error = %one_line(&e), "scope scan failed");
            Status::internal(one_line(&e))
        }
    })
}

/// A view (or a list of views) as the JSON document of a `JsonResponse`.
fn json<V: Serialize + ?Sized>(view: &V) -> Response<JsonResponse> {
    Response::new(JsonResponse { json: serde_json::to_string(view).expect("views serialize to json") })
}

fn preflight_status(e: PreflightError) -> Status {
    capped(match e {
        PreflightError::UnknownSecret(_) => Status::not_found(e.to_string()),
        PreflightError::BadWait(_) => Status::invalid_argument(e.to_string()),
        PreflightError::State(_) | PreflightError::Store(_) => {
            tracing::error!(error = %one_line(&e), "preflight failed");
            Status::internal(one_line(&e))
        }
    })
}

impl AdminSvc {
    fn preflight(&self) -> Preflight<'_> {
        Preflight { config: &self.config, engine: &self.engine, store: &self.store, link: &self.sessions }
    }

    /// The refusal of a start whose preflight found problems (audited). The
    /// message names the first [`MAX_NAMED`] problems and counts the rest:
    /// the whole list is in the audit record and in `rekey rotate plan`.
    fn refuse_start(&self, who: &str, secret: &str, problems: &[preflight::Problem]) -> Status {
        let lines: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        tracing::warn!(operator = %who, %secret, problems = lines.len(), "start refused by the preflight");
        super::audit_to(
            self.engine.state(),
            who,
            "rotation.preflight_refused",
            serde_json::json!({ "secret": secret, "problems": lines }),
        );
        let mut shown = lines.iter().take(MAX_NAMED).cloned().collect::<Vec<_>>().join("\n  - ");
        if lines.len() > MAX_NAMED {
            shown.push_str(&format!("\n  - and {} more", lines.len() - MAX_NAMED));
        }
        Status::failed_precondition(bounded(format!(
            "the preflight of {secret} found {} problem(s); no key was generated:\n  - {shown}\n\
             fix them (`rekey rotate plan {secret}` shows the whole plan), or start anyway with \
             --skip-preflight --reason TEXT (audited)",
            lines.len(),
        )))
    }

    /// A revoked agent never reports again: every rotation still waiting
    /// for it (its confirmation, or its rollback in an abort) excludes it,
    /// audited as the revoking operator's exclusion. Rotations past
    /// verification refuse (nothing waits for the host any more); so do
    /// rotations the host is not a target of.
    async fn exclude_revoked(&self, host: &str, who: &str) {
        let rotations = match self.engine.state().list_rotations() {
            Ok(r) => r,
            Err(e) => {
                return tracing::error!(agent = %host, error = %one_line(&e), "revoked agent not excluded from its rotations");
            }
        };
        let waiting = rotations
            .into_iter()
            .filter(|r| !r.state.is_terminal() && r.hosts.get(host).is_some_and(|h| h.exclusion.is_none()));
        for r in waiting {
            let reason = "its agent was revoked: it will never report again".to_string();
            let event = Event::Exclude { host: host.to_string(), by: who.to_string(), reason };
            match self.engine.control(&r.id, event, who).await {
                Ok(_) => tracing::warn!(rotation = %r.id, agent = %host, "revoked agent excluded from the rotation"),
                Err(e) => {
                    tracing::info!(rotation = %r.id, agent = %host, reason = %one_line(&e), "revoked agent stays in the rotation")
                }
            }
        }
    }

    fn rotation_json(&self, r: Result<Rotation, EngineError>) -> Result<Response<JsonResponse>, Status> {
        r.map(|r| json(&RotationView::from(&r))).map_err(engine_status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(role: OperatorRole) -> OperatorRecord {
        OperatorRecord {
            name: "ann".into(),
            role,
            serials: vec![],
            created_unix: 0,
            created_by: String::new(),
            revoked_unix: None,
            revoked_by: None,
        }
    }

    #[test]
    fn viewers_only_read_rotators_rotate_admins_do_everything() {
        use OperatorRole::*;
        let allowed = |role| Rpc::ALL.into_iter().filter(|r| role_refusal(&op(role), *r).is_none()).collect::<Vec<_>>();
        assert_eq!(allowed(Admin), Rpc::ALL.to_vec());
        let read_only = [
            Rpc::ListAgents,
            Rpc::ListSecrets,
            Rpc::GetRotation,
            Rpc::ListRotations,
            Rpc::ListVersions,
            Rpc::ListAudit,
            Rpc::ListAlerts,
            Rpc::GetIncident,
            Rpc::ListIncidents,
            Rpc::GetReport,
            Rpc::VerifyAudit,
            Rpc::ListOperators,
            Rpc::ListCoordinators,
            Rpc::WatchRotation,
            Rpc::CreateConsoleLogin,
        ];
        assert_eq!(allowed(Viewer), read_only.to_vec());
        let mut rotator = allowed(Rotator);
        rotator.retain(|r| !read_only.contains(r));
        assert_eq!(
            rotator,
            [
                Rpc::StartRotation,
                Rpc::PlanRotation,
                Rpc::ControlRotation,
                Rpc::OpenIncident,
                Rpc::CloseIncident,
                Rpc::Scope
            ]
        );
        for admin_only in [Rpc::CreateToken, Rpc::RevokeAgent, Rpc::CreateOperator, Rpc::RevokeOperator, Rpc::Backup] {
            assert_eq!(required_role(admin_only), Admin, "{admin_only:?}");
        }
        let refused = role_refusal(&op(Viewer), Rpc::StartRotation).unwrap();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            refused.message(),
            "operator ann has role viewer and may not start a rotation: that needs role rotator"
        );
        let refused = role_refusal(&op(Rotator), Rpc::CreateToken).unwrap();
        assert!(refused.message().contains("needs role admin"), "{}", refused.message());
    }

    #[test]
    fn an_error_naming_every_host_is_cut_to_fit_the_trailers() {
        let hosts: Vec<String> = (1..=10_000).map(|i| format!("h{i} (unreachable)")).collect();
        let s = engine_status(EngineError::Refused(hosts.join(", ")));
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert!(s.message().len() <= rekey_common::error::MAX_MESSAGE, "{}", s.message().len());
        assert!(s.message().starts_with("h1 (unreachable), h2 (unreachable)"), "{}", s.message());
        assert!(s.message().ends_with(" more bytes left out)"), "{}", s.message());
        let short = engine_status(EngineError::Refused("h1 (unreachable)".into()));
        assert!(short.message().ends_with("h1 (unreachable)"), "{}", short.message());
    }

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
