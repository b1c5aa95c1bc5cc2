//! Enrollment and the agent registry as the CLI prints them with `-o json`.
//! These calls answer protobuf messages (`AgentInfo`, `CreateTokenResponse`),
//! not JSON; these views are the CLI's JSON form of them, with times as
//! formatted UTC strings.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One enrolled agent: `rekey agents -o json` is a list of these, by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentView {
    /// The host name its certificate names (`rekey://agent/NAME`).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Its session is open now.
    pub connected: bool,
    /// Its certificates are refused.
    pub revoked: bool,
    /// Now when connected; formatted UTC time.
    pub last_seen: String,
    /// The agent's build version, from its last hello (empty before the first).
    pub agent_version: String,
    pub cert_serial: String,
    /// When its current certificate expires (renewed automatically before).
    pub cert_expires: String,
    pub enrolled: String,
    /// The secrets its agent.toml declares.
    pub secrets: Vec<String>,
}

/// A join token: `rekey token create -o json`. The token is a one-time
/// credential: hand it to the host's enrollment only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinTokenView {
    /// The host name the agent will be enrolled as.
    pub host: String,
    /// `ID.SECRET`, single use.
    pub token: String,
    /// What the agent pins the coordinator by (`sha256:HEX`).
    pub ca_fingerprint: String,
    /// Formatted UTC time.
    pub expires: String,
    /// The address the CLI used.
    pub coordinator: String,
}

/// The answer to `rekey agent revoke NAME -o json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRevokedView {
    /// The agent's name.
    pub revoked: String,
    /// Its live session was closed.
    pub session_closed: bool,
}
