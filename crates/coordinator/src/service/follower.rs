//! What a follower replica serves: `rekey coordinators`, and for every other
//! call a pointer to the leader — gRPC `UNAVAILABLE` with the message
//! naming it and `rekey-leader: HOST:PORT` metadata (absent while no
//! replica holds a live lease). Agents and the CLI move there by themselves.

use super::Authorizer;
use super::admin::WatchStream;
use crate::config::HaConfig;
use crate::store::Store;
use rekey_proto::v1::admin_service_server::AdminService;
use rekey_proto::v1::agent_service_server::AgentService;
use rekey_proto::v1::*;
use std::pin::Pin;
use tonic::{Request, Response, Status, Streaming};

pub use rekey_common::ha::LEADER_METADATA;

#[derive(Clone)]
pub struct FollowerSvc {
    pub store: Store,
    pub ha: HaConfig,
    pub auth: Authorizer,
}

impl FollowerSvc {
    /// The refusal that sends the caller to the leader.
    fn redirect(&self) -> Status {
        let leader =
            self.store.postgres().and_then(|pg| pg.lease().ok()).and_then(|l| l.live_leader().map(String::from));
        redirect_status(&self.ha.id, leader.as_deref())
    }
}

/// `UNAVAILABLE`, naming the leader in the message and the metadata (one
/// definition for both sides: `rekey_common::ha`).
pub fn redirect_status(me: &str, leader: Option<&str>) -> Status {
    rekey_common::ha::follower_status(me, leader.filter(|l| !l.is_empty()))
}

/// Every admin call but `ListCoordinators` goes to the leader. (Written in
/// the shape `async_trait` gives trait methods: the attribute does not see
/// inside a macro.)
macro_rules! to_leader {
    ($($name:ident($req:ty) -> $resp:ty;)*) => {
        $(fn $name<'life0, 'async_trait>(
            &'life0 self,
            _req: Request<$req>,
        ) -> Pin<Box<dyn Future<Output = Result<Response<$resp>, Status>> + Send + 'async_trait>>
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            let refused = self.redirect();
            Box::pin(async move { Err(refused) })
        })*
    };
}

#[tonic::async_trait]
impl AdminService for FollowerSvc {
    to_leader! {
        create_token(CreateTokenRequest) -> CreateTokenResponse;
        list_agents(ListAgentsRequest) -> ListAgentsResponse;
        revoke_agent(RevokeAgentRequest) -> RevokeAgentResponse;
        list_secrets(ListSecretsRequest) -> JsonResponse;
        start_rotation(StartRotationRequest) -> JsonResponse;
        plan_rotation(PlanRotationRequest) -> JsonResponse;
        get_rotation(GetRotationRequest) -> JsonResponse;
        list_rotations(ListRotationsRequest) -> JsonResponse;
        control_rotation(ControlRotationRequest) -> JsonResponse;
        list_versions(ListVersionsRequest) -> JsonResponse;
        get_report(GetReportRequest) -> ReportResponse;
        list_alerts(ListAlertsRequest) -> JsonResponse;
        open_incident(OpenIncidentRequest) -> JsonResponse;
        get_incident(GetIncidentRequest) -> JsonResponse;
        list_incidents(ListIncidentsRequest) -> JsonResponse;
        close_incident(GetIncidentRequest) -> JsonResponse;
        list_audit(ListAuditRequest) -> JsonResponse;
        scope(ScopeRequest) -> JsonResponse;
        backup(BackupRequest) -> BackupResponse;
        create_operator(CreateOperatorRequest) -> CreateOperatorResponse;
        list_operators(ListOperatorsRequest) -> JsonResponse;
        revoke_operator(RevokeOperatorRequest) -> JsonResponse;
        verify_audit(VerifyAuditRequest) -> JsonResponse;
        create_console_login(CreateConsoleLoginRequest) -> CreateConsoleLoginResponse;
    }

    async fn list_coordinators(&self, req: Request<ListCoordinatorsRequest>) -> Result<Response<JsonResponse>, Status> {
        self.auth.operator(&req)?;
        let view = crate::ha::coordinators_view(&self.store, &self.ha).map_err(super::internal)?;
        Ok(Response::new(JsonResponse { json: serde_json::to_string(&view).expect("json") }))
    }

    type WatchRotationStream = WatchStream;

    async fn watch_rotation(&self, _req: Request<GetRotationRequest>) -> Result<Response<WatchStream>, Status> {
        Err(self.redirect())
    }
}

type NoSession = Pin<Box<dyn tokio_stream::Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for FollowerSvc {
    async fn enroll(&self, _req: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        Err(self.redirect())
    }

    type SessionStream = NoSession;

    async fn session(&self, _req: Request<Streaming<AgentMessage>>) -> Result<Response<NoSession>, Status> {
        Err(self.redirect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redirect_names_the_leader_in_message_and_metadata() {
        let st = redirect_status("r2", Some("10.0.0.1:7400"));
        assert_eq!(st.code(), tonic::Code::Unavailable);
        assert!(st.message().contains("the leader is at 10.0.0.1:7400"), "{}", st.message());
        assert_eq!(st.metadata().get(LEADER_METADATA).unwrap(), "10.0.0.1:7400");
        let none = redirect_status("r2", None);
        assert!(none.metadata().get(LEADER_METADATA).is_none());
        assert!(none.message().contains("election"), "{}", none.message());
    }
}
