//! The gRPC services. Each converts its errors to `tonic::Status` in one
//! place; messages are lowercase, specific, and never contain a secret value.
//!
//! Each service holds the handles it uses (cheap clones); nothing below
//! `service/` imports from here.

pub mod admin;
pub mod agent;
pub mod follower;
pub(crate) mod views;

use crate::engine::state::EngineState;
use crate::sessions::RevokedSerials;
use crate::store::{OperatorRecord, Store, StoreError};
use rekey_common::error::Chain;
use rekey_common::tls::{self, Identity, Role};

/// The one authentication check of every call except enrollment: a client
/// certificate from this CA, in the expected role, not revoked, and (for
/// operators) issued by this coordinator to an operator that is not revoked,
/// read from the store on every call. What an operator's role allows is
/// decided in one table, `admin::required_role`. Cheap to clone.
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
        if role == Role::Operator {
            return self.operator(req).map(|(id, _)| id);
        }
        self.identity(req, role)
    }

    /// The certificate's identity, in the expected role (agent or operator).
    fn identity<T>(&self, req: &tonic::Request<T>, role: Role) -> Result<Identity, tonic::Status> {
        let id = tls::request_identity(req)?;
        if id.role != role {
            return Err(tonic::Status::permission_denied(match role {
                Role::Operator => format!("{id} is not an operator: agent certificates cannot call the admin API"),
                Role::Agent => format!("{id} cannot open an agent session"),
            }));
        }
        if role == Role::Agent && self.revoked.contains(&id.serial) {
            return Err(tonic::Status::permission_denied(format!(
                "certificate {} of {id} is revoked; enroll again with a new join token",
                id.serial
            )));
        }
        Ok(id)
    }

    /// An operator call: the certificate's identity and the operator's record
    /// (its role), refused if the operator or this certificate is revoked or
    /// the serial was not issued here.
    pub(crate) fn operator<T>(&self, req: &tonic::Request<T>) -> Result<(Identity, OperatorRecord), tonic::Status> {
        let id = self.identity(req, Role::Operator)?;
        let rec = self.operator_record(&id)?;
        Ok((id, rec))
    }

    fn operator_record(&self, id: &Identity) -> Result<OperatorRecord, tonic::Status> {
        let Some(rec) = self.store.operator_by_serial(&id.serial).map_err(internal)? else {
            return Err(tonic::Status::permission_denied(format!(
                "operator certificate {} is unknown to this coordinator",
                id.serial
            )));
        };
        if let Some(at) = rec.revoked_unix {
            return Err(tonic::Status::permission_denied(format!(
                "operator {} was revoked at {} by {}; ask an admin for a new credential",
                rec.name,
                rekey_common::time::format_unix(at),
                rec.revoked_by.as_deref().unwrap_or("an admin")
            )));
        }
        if self.revoked.contains(&id.serial) {
            return Err(tonic::Status::permission_denied(format!(
                "certificate {} of operator {} is revoked; ask an admin for a new credential",
                id.serial, rec.name
            )));
        }
        Ok(rec)
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
