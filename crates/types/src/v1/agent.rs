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

/// One term of `rekey agents --filter` (and of `ListAgentsRequest.filters`):
/// an agent is listed when it matches every term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentFilter {
    /// `connected`, `disconnected` (neither connected nor revoked) or `revoked`.
    State(AgentState),
    /// `KEY=VALUE`: the agent's label KEY is VALUE (`KEY=` matches an empty value).
    Label(String, String),
    /// Any other word: a part of the agent's name.
    Name(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    Connected,
    Disconnected,
    Revoked,
}

/// A filter term that is none of the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid filter {term:?}: {why}; expected connected, disconnected, revoked, KEY=VALUE (a label) \
     or part of a host name (letters, digits, '.', '-', '_')"
)]
pub struct AgentFilterError {
    pub term: String,
    pub why: &'static str,
}

impl AgentFilter {
    pub fn parse(term: &str) -> Result<AgentFilter, AgentFilterError> {
        let err = |why| AgentFilterError { term: term.to_string(), why };
        let word = |s: &str, what| {
            if s.len() > 253 {
                return Err(err("longer than 253 characters"));
            }
            match s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '/')) {
                true => Ok(s.to_string()),
                false => Err(err(what)),
            }
        };
        Ok(match term {
            "" => return Err(err("it is empty")),
            "connected" => AgentFilter::State(AgentState::Connected),
            "disconnected" => AgentFilter::State(AgentState::Disconnected),
            "revoked" => AgentFilter::State(AgentState::Revoked),
            _ => match term.split_once('=') {
                Some(("", _)) => return Err(err("the label key is empty")),
                Some((k, v)) => AgentFilter::Label(
                    word(k, "the label key has a character labels cannot hold")?,
                    word(v, "the label value has a character labels cannot hold")?,
                ),
                None if term.contains('/') => return Err(err("host names have no '/'")),
                None => AgentFilter::Name(word(term, "host names hold no such character")?),
            },
        })
    }

    /// Whether an agent with this name, labels and state matches the term.
    pub fn matches(&self, name: &str, labels: &BTreeMap<String, String>, connected: bool, revoked: bool) -> bool {
        match self {
            AgentFilter::State(AgentState::Connected) => connected,
            AgentFilter::State(AgentState::Disconnected) => !connected && !revoked,
            AgentFilter::State(AgentState::Revoked) => revoked,
            AgentFilter::Label(k, v) => labels.get(k) == Some(v),
            AgentFilter::Name(part) => name.contains(part.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_terms_parse_into_state_label_or_name() {
        assert_eq!(AgentFilter::parse("connected"), Ok(AgentFilter::State(AgentState::Connected)));
        assert_eq!(AgentFilter::parse("disconnected"), Ok(AgentFilter::State(AgentState::Disconnected)));
        assert_eq!(AgentFilter::parse("revoked"), Ok(AgentFilter::State(AgentState::Revoked)));
        assert_eq!(AgentFilter::parse("env=prod"), Ok(AgentFilter::Label("env".into(), "prod".into())));
        assert_eq!(AgentFilter::parse("team="), Ok(AgentFilter::Label("team".into(), String::new())));
        assert_eq!(AgentFilter::parse("web-1"), Ok(AgentFilter::Name("web-1".into())));
        for (bad, why) in [
            ("", "it is empty"),
            ("=prod", "the label key is empty"),
            ("a b", "host names hold no such character"),
            ("env=a b", "the label value has a character labels cannot hold"),
            ("a/b", "host names have no '/'"),
        ] {
            let e = AgentFilter::parse(bad).unwrap_err();
            assert_eq!(e.why, why, "{bad:?}");
            assert!(e.to_string().starts_with(&format!("invalid filter {bad:?}: {why}; expected connected")), "{e}");
        }
    }

    #[test]
    fn a_filter_matches_by_state_label_and_name_part() {
        let labels = BTreeMap::from([("env".to_string(), "prod".to_string())]);
        let m =
            |t: &str, connected, revoked| AgentFilter::parse(t).unwrap().matches("web-12", &labels, connected, revoked);
        assert!(m("connected", true, false) && !m("connected", false, false));
        assert!(m("disconnected", false, false) && !m("disconnected", false, true) && !m("disconnected", true, false));
        assert!(m("revoked", false, true) && !m("revoked", true, false));
        assert!(m("env=prod", true, false) && !m("env=dev", true, false) && !m("team=", true, false));
        assert!(m("eb-1", true, false) && !m("db", true, false));
    }
}
