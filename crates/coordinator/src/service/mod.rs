//! The gRPC services. Each converts its errors to `tonic::Status` in one
//! place; messages are lowercase, specific, and never contain a secret value.
//!
//! Each service holds the handles it uses (cheap clones); nothing below
//! `service/` imports from here.

pub mod admin;
pub mod agent;
pub(crate) mod views;

use crate::engine::state::EngineState;
use crate::sessions::RevokedSerials;
use crate::store::{Store, StoreError};
use rekey_common::error::Chain;
use rekey_common::tls::{self, Identity, Role};

/// The one authorization check of every call except enrollment: a client
/// certificate from this CA, in the expected role, not revoked, and (for
/// operators) issued by this coordinator. Cheap to clone.
#[derive(Clone)]
pub struct Authorizer {
    revoked: RevokedSerials,
    store: Store,
}

impl Authorizer {
    pub fn new(revoked: RevokedSerials, store: Store) -> Authorizer {
        Authorizer { revoked, store }
    }

    /// The serials refused from now on (revocations extend it).
    pub fn revoked(&self) -> &RevokedSerials {
        &self.revoked
    }

    pub(crate) fn check<T>(&self, req: &tonic::Request<T>, role: Role) -> Result<Identity, tonic::Status> {
        let id = tls::request_identity(req)?;
        if id.role != role {
            return Err(tonic::Status::permission_denied(match role {
                Role::Operator => format!("{id} is not an operator: agent certificates cannot call the admin API"),
                Role::Agent => format!("{id} cannot open an agent session"),
            }));
        }
        if self.revoked.contains(&id.serial) {
            return Err(tonic::Status::permission_denied(format!(
                "certificate {} of {id} is revoked; enroll again with a new join token",
                id.serial
            )));
        }
        if role == Role::Operator && !self.store.is_operator_serial(&id.serial).map_err(internal)? {
            return Err(tonic::Status::permission_denied(format!(
                "operator certificate {} is unknown to this coordinator",
                id.serial
            )));
        }
        Ok(id)
    }
}

/// Records an event in the audit chain (best effort: the action itself
/// already succeeded and was persisted).
pub(crate) fn audit_to(state: &EngineState, actor: &str, action: &str, details: serde_json::Value) {
    let entry = crate::audit::AuditEntry::new(actor, action, details);
    if let Err(e) = state.audit(rekey_common::time::now_unix_ms(), vec![entry]) {
        tracing::error!(error = %Chain(&e), action, "audit append failed");
    }
}

pub(crate) fn internal(e: StoreError) -> tonic::Status {
    tracing::error!(error = %Chain(&e), "store failure");
    tonic::Status::internal(format!("coordinator store failure: {}", Chain(&e)))
}
