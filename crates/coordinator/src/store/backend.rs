//! The storage interface every backend implements: named trees of ordered
//! byte keys → byte values, read directly or inside a serializable
//! transaction that is committed durably before it returns. Everything
//! rekeyd persists goes through it ([`super::Store`] and
//! [`crate::engine::state::EngineState`] are typed layers on top), so sled
//! (embedded, one replica) and PostgreSQL (shared, several replicas) give the
//! same guarantee: a transition and its audit records commit together, and a
//! caller that got `Ok` may act on it.

use super::StoreError;

/// Every tree rekeyd keeps. A backend knows them all up front (sled opens
/// one tree each; PostgreSQL keeps them as a column of one table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tree {
    Meta,
    Tokens,
    Agents,
    Revoked,
    Operators,
    OperatorRecords,
    Rotations,
    /// One record per (rotation, host): `engine::state`.
    RotationHosts,
    Secrets,
    Versions,
    FingerprintKeys,
    ProviderState,
    Audit,
    Incidents,
    Alerts,
    AlertSeq,
}

impl Tree {
    pub const ALL: [Tree; 16] = [
        Tree::Meta,
        Tree::Tokens,
        Tree::Agents,
        Tree::Revoked,
        Tree::Operators,
        Tree::OperatorRecords,
        Tree::Rotations,
        Tree::RotationHosts,
        Tree::Secrets,
        Tree::Versions,
        Tree::FingerprintKeys,
        Tree::ProviderState,
        Tree::Audit,
        Tree::Incidents,
        Tree::Alerts,
        Tree::AlertSeq,
    ];

    /// The tree's name on disk (sled) and in the `tree` column (PostgreSQL);
    /// also its name in backups. Never change one.
    pub fn name(self) -> &'static str {
        match self {
            Tree::Meta => "meta",
            Tree::Tokens => "tokens",
            Tree::Agents => "agents",
            Tree::Revoked => "revoked",
            Tree::Operators => "operators",
            Tree::OperatorRecords => "operator_records",
            Tree::Rotations => "rotations",
            Tree::RotationHosts => "rotation_hosts",
            Tree::Secrets => "secrets",
            Tree::Versions => "versions",
            Tree::FingerprintKeys => "fingerprint_keys",
            Tree::ProviderState => "provider_state",
            Tree::Audit => "audit",
            Tree::Incidents => "incidents",
            Tree::Alerts => "alerts",
            Tree::AlertSeq => "alert_seq",
        }
    }

    pub fn from_name(name: &str) -> Option<Tree> {
        Tree::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// Reads and writes inside one transaction. An error from any call must be
/// returned from the transaction's closure (with `?`): the backend may then
/// run the closure again (a conflict) or give the error to the caller.
pub trait Txn {
    fn get(&mut self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    fn put(&mut self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    fn remove(&mut self, tree: Tree, key: &[u8]) -> Result<(), StoreError>;
}

/// One key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// Why a transaction's closure stopped without committing.
#[derive(Debug)]
pub struct Aborted;

/// A storage backend. Calls block the calling thread (as sled's fsync does);
/// they are short and never wait on the network for long without a timeout.
pub trait Backend: Send + Sync + 'static {
    fn kind(&self) -> rekey_types::v1::StoreBackend;
    fn as_any(&self) -> &dyn std::any::Any;
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every entry whose key starts with `prefix`, in key order.
    fn scan(&self, tree: Tree, prefix: &[u8]) -> Result<Vec<Entry>, StoreError>;
    /// The entry with the greatest key, if any.
    fn last(&self, tree: Tree) -> Result<Option<Entry>, StoreError>;
    /// Runs `f` in one serializable transaction and commits it, durably when
    /// `durable` (PostgreSQL always is). `f` may run more than once. When `f`
    /// returns `Err(Aborted)` nothing is written and `Err(StoreError::Aborted)`
    /// comes back (unless a conflict made the backend retry it).
    fn transaction(
        &self,
        durable: bool,
        f: &mut dyn FnMut(&mut dyn Txn) -> Result<(), Aborted>,
    ) -> Result<(), StoreError>;
    /// Makes every committed write durable (sled; a no-op where commits are).
    fn flush(&self) -> Result<(), StoreError>;
    /// Lets go of the backend's resources and waits until another open of
    /// the same store can succeed (sled's directory lock).
    fn close(&self) -> Result<(), StoreError>;
}
