//! The gRPC services. Each converts its errors to `tonic::Status` in one
//! place; messages are lowercase, specific, and never contain a secret value.

pub mod admin;
pub mod agent;

use crate::config::Config;
use crate::pki::Ca;
use crate::sessions::{RevokedSerials, Sessions};
use crate::store::{Store, StoreError};
use std::sync::Arc;

/// State shared by the services (cheap to clone).
#[derive(Clone)]
pub struct Shared {
    pub config: Arc<Config>,
    pub store: Store,
    pub ca: Arc<Ca>,
    pub sessions: Sessions,
    pub revoked: RevokedSerials,
}

pub(crate) fn internal(e: StoreError) -> tonic::Status {
    tracing::error!(error = %e, source = ?std::error::Error::source(&e), "store failure");
    tonic::Status::internal(format!("coordinator store failure: {e}"))
}
