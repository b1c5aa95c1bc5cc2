//! How the driver reaches agents: three verbs (deliver, roll back, purge)
//! and a presence check, nothing else. The live implementation
//! ([`crate::sessions::Sessions`]) turns them into messages on the agents'
//! session streams; tests put a fake behind it to run the driver alone.
//! [`PreflightLink`] is the rotation plan's way to agents: a dry run out, one
//! answer back.

use rekey_providers::Fields;

/// A version for one host: what the agent needs to apply it. Values are in
/// `SecretBytes` (redacted `Debug`, zeroized on drop).
#[derive(Debug)]
pub struct Delivery {
    pub rotation_id: String,
    pub secret: String,
    pub version_id: String,
    pub fields: Fields,
    /// The version being replaced, for in-place replacement and rollback.
    pub previous_version_id: Option<String>,
    pub previous_fields: Option<Fields>,
    pub restart_jitter_ms: u64,
    /// The rotation's fingerprint key: the agent reports HMAC(key, value).
    pub fingerprint_key: Vec<u8>,
}

/// Why a message did not leave: the agent is offline, not reading, or revoked.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("agent {0} is not connected")]
    NotConnected(String),
    #[error("agent {0} is not reading its session (outbound queue full)")]
    Backpressure(String),
    #[error("agent {0} is revoked")]
    Revoked(String),
}

/// The driver's only way to an agent. Every call queues and returns at once;
/// the agent's answers come back as engine events.
pub trait AgentLink: Send + Sync + 'static {
    fn is_connected(&self, host: &str) -> bool;
    /// Send a new version.
    fn deliver(&self, host: &str, delivery: Delivery) -> Result<(), LinkError>;
    /// Tell the host to restore the version before `version_id`.
    fn rollback(&self, host: &str, rotation_id: &str, secret: &str, version_id: &str) -> Result<(), LinkError>;
    /// Tell the host `version_id` is revoked: delete backups holding it.
    fn purge(&self, host: &str, secret: &str, version_id: &str) -> Result<(), LinkError>;
}

/// A dry run's answer from one agent, or nothing (the receiver errs) if the
/// session ended before it answered.
pub type PreflightAnswer = tokio::sync::oneshot::Receiver<rekey_proto::v1::PreflightResult>;

/// How a rotation plan reaches agents: one dry run per host, answered once
/// (by `request_id`). Separate from [`AgentLink`]: the driver never asks.
pub trait PreflightLink: Send + Sync {
    fn is_connected(&self, host: &str) -> bool;
    /// Sends `req` to `host`; the answer with the same `request_id` from that
    /// host (and no other) arrives on the receiver.
    fn preflight(&self, host: &str, req: rekey_proto::v1::Preflight) -> Result<PreflightAnswer, LinkError>;
}
