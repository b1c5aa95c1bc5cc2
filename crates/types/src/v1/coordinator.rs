//! High availability: `rekey coordinators -o json`. Built by any replica from
//! the shared store (the lease row and the replicas' heartbeats).

use super::string_enum;
use serde::{Deserialize, Serialize};

string_enum! {
    /// Where rekeyd keeps its state.
    pub enum StoreBackend {
        /// One embedded sled database on the coordinator's disk (one replica).
        Sled = "sled",
        /// A shared PostgreSQL database (any number of replicas, one leader).
        Postgres = "postgres",
    }
}

/// The replicas sharing one store and which of them leads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorsView {
    pub backend: StoreBackend,
    /// The store's schema version (migrations applied).
    pub schema_version: u32,
    /// The replica holding the lease, by id; `None` while nobody does.
    pub leader: Option<String>,
    /// The lease's epoch: bumped at every change of leader; every write of a
    /// leader carries it, so a deposed leader's writes are refused.
    pub epoch: u64,
    /// Milliseconds since the leader last renewed the lease.
    pub lease_age_ms: Option<i64>,
    /// How long a lease lasts without renewal.
    pub lease_ttl_ms: i64,
    /// Which replica answered this call.
    pub answered_by: String,
    pub replicas: Vec<ReplicaView>,
}

/// One rekeyd replica, as it last announced itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaView {
    /// Stable per data dir (`[ha] id`, default the host name and port).
    pub id: String,
    /// The address agents and operators reach it at (`[ha] advertise`).
    pub address: String,
    pub leader: bool,
    /// Unix milliseconds of its last heartbeat in the store.
    pub last_seen_ms: i64,
    pub version: String,
}
