//! The preflight of a rotation (`rekey rotate plan`, and the first step of
//! every `rekey rotate start` not told to skip it): before any key exists,
//! the provider is listed (its credentials work) and reconciled with rekey's
//! record ([`crate::engine::reconcile`]), and every consumer agent dry-runs
//! its apply with a placeholder version (`Preflight` → `PreflightResult`,
//! through [`PreflightLink`]). The waves are planned exactly as a start plans
//! them. Everything that would stop the rotation is a [`Problem`]; a host
//! that is not connected, or does not answer within the wait, is one.
//!
//! Owns no task: a plan runs in the caller's task, bounded by its wait.

use crate::config::Config;
use crate::engine::catalog::SecretSpec;
use crate::engine::driver::{EngineError, EngineHandle, consumer_targets, known_versions};
use crate::engine::link::PreflightLink;
use crate::engine::plan::plan_waves;
use crate::engine::reconcile::{OldVersion, Reconciliation, can_list, reconcile, version_limit};
use crate::engine::state::StateError;
use crate::store::{Store, StoreError};
use rand::Rng;
use rekey_common::error::chain;
use rekey_proto::v1;
use rekey_providers::{Provider, VersionInfo};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

/// How long a plan waits for the agents' answers unless told otherwise.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(20);
/// The longest wait a plan accepts.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("unknown secret {0:?}: it is not in the coordinator's catalog (see `rekey secrets`)")]
    UnknownSecret(String),
    #[error("invalid wait of {0}s: expected 1 to 300 seconds")]
    BadWait(u64),
    #[error("cannot read the secret's record")]
    State(#[from] StateError),
    #[error("cannot read the agent registry")]
    Store(#[from] StoreError),
}

/// The wait a request asks for (0: the default), checked.
pub fn wait_of(seconds: u64) -> Result<Duration, PreflightError> {
    match seconds {
        0 => Ok(DEFAULT_WAIT),
        s if Duration::from_secs(s) <= MAX_WAIT => Ok(Duration::from_secs(s)),
        s => Err(PreflightError::BadWait(s)),
    }
}

/// What a plan found at the provider.
#[derive(Debug, Clone)]
pub enum ProviderCheck {
    Listed {
        versions: Vec<VersionInfo>,
        reconciliation: Reconciliation,
    },
    /// The provider's config has no list request: nothing to reconcile with.
    NotListable,
    Failed(String),
}

/// How one consumer host came out of its dry run.
#[derive(Debug, Clone, PartialEq)]
pub enum HostCheck {
    NotConnected(String),
    NoAnswer,
    Answered(Vec<v1::PreflightCheck>),
}

/// One thing that stops the rotation.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub host: Option<String>,
    pub subject: String,
    pub detail: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.host {
            Some(h) => write!(f, "{h}: {}: {}", self.subject, self.detail),
            None => write!(f, "{}: {}", self.subject, self.detail),
        }
    }
}

/// The preflight of one secret's rotation.
#[derive(Debug, Clone)]
pub struct Plan {
    pub secret: String,
    pub provider_kind: String,
    pub recorded: Option<String>,
    /// The version a rotation started now would replace, if known.
    pub old_version: Option<String>,
    pub provider: ProviderCheck,
    pub fields: Vec<String>,
    pub waves: Vec<Vec<String>>,
    pub canary: bool,
    pub hosts: BTreeMap<String, HostCheck>,
    /// Secret-level refusals: already rotating, no consumers.
    pub blockers: Vec<String>,
    /// What the provider's settings mean for this rotation without stopping
    /// it (e.g. a strategy that is not zero-downtime); shown as findings.
    pub warnings: Vec<String>,
    pub wait: Duration,
    pub elapsed_ms: u64,
}

impl Plan {
    /// Everything that stops the rotation: the secret, the provider, then
    /// the hosts in wave order.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out: Vec<Problem> =
            self.blockers.iter().map(|b| Problem { host: None, subject: "secret".into(), detail: b.clone() }).collect();
        let provider = |detail: String| Problem { host: None, subject: "provider".into(), detail };
        match &self.provider {
            ProviderCheck::Failed(e) => out.push(provider(format!("cannot list its versions: {e}"))),
            ProviderCheck::Listed { reconciliation, .. } => {
                out.extend(reconciliation.problems().into_iter().map(provider))
            }
            ProviderCheck::NotListable => {}
        }
        let wait = self.wait.as_secs();
        for host in self.waves.iter().flatten() {
            let p =
                |subject: &str, detail: String| Problem { host: Some(host.clone()), subject: subject.into(), detail };
            match self.hosts.get(host) {
                Some(HostCheck::NotConnected(why)) => out.push(p("connection", why.clone())),
                Some(HostCheck::NoAnswer) | None => out.push(p(
                    "preflight",
                    format!("no answer within {wait}s (an agent older than this coordinator ignores dry runs)"),
                )),
                Some(HostCheck::Answered(checks)) => {
                    out.extend(checks.iter().filter(|c| !c.ok).map(|c| p(&c.subject, c.detail.clone())));
                }
            }
        }
        out
    }
}

/// What a plan needs: the catalog, the engine (its state and providers), the
/// agent registry, and the way to the agents.
pub struct Preflight<'a> {
    pub config: &'a Config,
    pub engine: &'a EngineHandle,
    pub store: &'a Store,
    pub link: &'a dyn PreflightLink,
}

impl Preflight<'_> {
    /// Plans a rotation of `secret`: reads, lists, asks; changes nothing.
    pub async fn run(&self, secret: &str, wait: Duration) -> Result<Plan, PreflightError> {
        let started = Instant::now();
        let spec = self.config.secret(secret).ok_or_else(|| PreflightError::UnknownSecret(secret.to_string()))?;
        let provider = self.engine.provider(secret).ok_or_else(|| PreflightError::UnknownSecret(secret.to_string()))?;
        let state = self.engine.state();
        let record = state.get_secret(secret)?;
        let mut blockers = Vec::new();
        // Worded as the engine would refuse them.
        if let Some(rotation) = record.active_rotation.clone() {
            blockers.push(EngineError::AlreadyRotating { secret: secret.to_string(), rotation }.to_string());
        }
        let consumers = consumer_targets(self.store, spec)?;
        let targets: Vec<String> = consumers.iter().map(|t| t.name.clone()).collect();
        if targets.is_empty() {
            blockers.push(EngineError::NoConsumers(secret.to_string()).to_string());
        }
        // Exactly as a start plans them.
        let waves = plan_waves(&consumers, spec.policy.canary, &spec.policy.selector_waves, &spec.policy.waves).waves;
        let recorded = record.current_version.clone();
        let check = check_provider(self, spec, recorded.as_deref(), provider.as_ref(), wait).await?;
        let old_version = match &check {
            ProviderCheck::Listed { reconciliation, .. } => match &reconciliation.old {
                OldVersion::FirstRotation => current_of(provider.as_ref(), wait).await,
                _ => reconciliation.old_version().map(str::to_string),
            },
            _ => recorded.clone(),
        };
        let (fields, current) = placeholder_fields(self, secret, provider.as_ref(), &check, recorded.as_deref())?;
        let request = |request_id: String| v1::Preflight {
            request_id,
            secret: secret.to_string(),
            placeholder_fields: fields
                .iter()
                .map(|f| v1::SecretField { name: f.clone(), value: format!("rekey-preflight-{f}").into_bytes() })
                .collect(),
            current_version_id: current.as_ref().map(|(v, _)| v.clone()).unwrap_or_default(),
            current_fields: current.as_ref().map(|(_, f)| f.clone()).unwrap_or_default(),
        };
        let hosts = ask(self.link, &targets, request, wait).await;
        Ok(Plan {
            secret: secret.to_string(),
            provider_kind: spec.provider.kind().to_string(),
            recorded,
            old_version,
            provider: check,
            fields,
            waves,
            canary: spec.policy.canary > 0,
            hosts,
            blockers,
            warnings: spec.provider.plan_warnings(),
            wait,
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }
}

async fn check_provider(
    pf: &Preflight<'_>,
    spec: &SecretSpec,
    recorded: Option<&str>,
    provider: &dyn Provider,
    wait: Duration,
) -> Result<ProviderCheck, PreflightError> {
    if !can_list(&spec.provider) {
        return Ok(ProviderCheck::NotListable);
    }
    let versions = match tokio::time::timeout(wait, provider.list()).await {
        Err(_) => return Ok(ProviderCheck::Failed(format!("no answer within {}s", wait.as_secs()))),
        Ok(Err(e)) => return Ok(ProviderCheck::Failed(chain(&e))),
        Ok(Ok(v)) => v,
    };
    let known = known_versions(pf.engine.state(), &spec.name)?;
    let reconciliation = reconcile(recorded, &known, &versions, version_limit(provider.kind()));
    Ok(ProviderCheck::Listed { versions, reconciliation })
}

/// The provider's own current version (a first rotation), bounded; `None`
/// when it cannot tell.
async fn current_of(provider: &dyn Provider, wait: Duration) -> Option<String> {
    match tokio::time::timeout(wait, provider.current()).await {
        Ok(Ok(v)) => v.map(|v| v.id),
        _ => None,
    }
}

type CurrentFields = Option<(String, Vec<v1::SecretField>)>;

/// The placeholder's field names (the provider's, else the current
/// version's), and the current version with its fields when rekey holds them
/// and the provider still has it (so `replace` files can be checked).
fn placeholder_fields(
    pf: &Preflight<'_>,
    secret: &str,
    provider: &dyn Provider,
    check: &ProviderCheck,
    recorded: Option<&str>,
) -> Result<(Vec<String>, CurrentFields), PreflightError> {
    let missing = matches!(check, ProviderCheck::Listed { reconciliation, .. } if reconciliation.recorded_missing);
    let current = match recorded {
        Some(v) if !missing => pf.engine.state().get_version(secret, v)?.map(|f| (v.to_string(), f)),
        _ => None,
    };
    let mut names = provider.field_names();
    if names.is_empty()
        && let Some((_, f)) = &current
    {
        names = f.keys().cloned().collect();
    }
    let current = current.map(|(v, f)| {
        let fields =
            f.iter().map(|(k, val)| v1::SecretField { name: k.clone(), value: val.expose().to_vec() }).collect();
        (v, fields)
    });
    Ok((names, current))
}

fn request_id() -> String {
    let mut b = [0u8; 8];
    rand::rng().fill(&mut b[..]);
    format!("pf-{}", hex::encode(b))
}

/// Sends a dry run to every host (each its own request id) and waits for
/// the answers until `wait` has passed.
pub async fn ask(
    link: &dyn PreflightLink,
    hosts: &[String],
    request: impl Fn(String) -> v1::Preflight,
    wait: Duration,
) -> BTreeMap<String, HostCheck> {
    let deadline = Instant::now() + wait;
    let mut out = BTreeMap::new();
    let mut waiting = Vec::new();
    for host in hosts {
        if !link.is_connected(host) {
            out.insert(host.clone(), HostCheck::NotConnected(format!("agent {host} is not connected")));
            continue;
        }
        match link.preflight(host, request(request_id())) {
            Ok(rx) => waiting.push((host.clone(), rx)),
            Err(e) => {
                out.insert(host.clone(), HostCheck::NotConnected(e.to_string()));
            }
        }
    }
    for (host, rx) in waiting {
        let check = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => HostCheck::Answered(r.checks),
            Ok(Err(_)) => HostCheck::NotConnected(format!("agent {host}'s session ended before it answered")),
            Err(_) => HostCheck::NoAnswer,
        };
        out.insert(host, check);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::link::{LinkError, PreflightAnswer};
    use std::sync::Mutex;
    use tokio::sync::oneshot;

    /// Hosts that answer with the given checks, hosts that stay silent, and
    /// hosts that are gone; records every request sent.
    #[derive(Default)]
    struct FakeLink {
        answers: BTreeMap<String, Vec<v1::PreflightCheck>>,
        silent: Vec<String>,
        sent: Mutex<Vec<(String, v1::Preflight)>>,
        held: Mutex<Vec<oneshot::Sender<v1::PreflightResult>>>,
    }

    impl PreflightLink for FakeLink {
        fn is_connected(&self, host: &str) -> bool {
            self.answers.contains_key(host) || self.silent.iter().any(|s| s == host)
        }

        fn preflight(&self, host: &str, req: v1::Preflight) -> Result<PreflightAnswer, LinkError> {
            let (tx, rx) = oneshot::channel();
            self.sent.lock().unwrap().push((host.to_string(), req.clone()));
            match self.answers.get(host) {
                Some(checks) => {
                    let _ = tx.send(v1::PreflightResult {
                        request_id: req.request_id,
                        secret: req.secret,
                        checks: checks.clone(),
                    });
                }
                None => self.held.lock().unwrap().push(tx),
            }
            Ok(rx)
        }
    }

    fn check(subject: &str, ok: bool, detail: &str) -> v1::PreflightCheck {
        v1::PreflightCheck { subject: subject.into(), ok, detail: detail.into() }
    }

    fn plan(hosts: BTreeMap<String, HostCheck>, waves: Vec<Vec<String>>) -> Plan {
        Plan {
            secret: "api-key".into(),
            provider_kind: "random".into(),
            recorded: None,
            old_version: None,
            provider: ProviderCheck::NotListable,
            fields: vec!["value".into()],
            waves,
            canary: true,
            hosts,
            blockers: vec![],
            warnings: vec![],
            wait: Duration::from_secs(2),
            elapsed_ms: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silent_and_missing_hosts_are_named_problems_and_failed_checks_are_quoted() {
        let link = FakeLink {
            answers: BTreeMap::from([
                ("web-1".to_string(), vec![check("file /srv/key.env", true, "owner root, mode 0600")]),
                ("web-2".to_string(), vec![check("file /srv/kye.env", false, "does not exist")]),
            ]),
            silent: vec!["web-3".into()],
            ..Default::default()
        };
        let hosts: Vec<String> = ["web-1", "web-2", "web-3", "web-4"].map(String::from).to_vec();
        let request = |id: String| v1::Preflight { request_id: id, secret: "api-key".into(), ..Default::default() };
        let got = ask(&link, &hosts, request, Duration::from_secs(2)).await;
        assert!(matches!(&got["web-1"], HostCheck::Answered(c) if c.len() == 1 && c[0].ok));
        assert_eq!(got["web-3"], HostCheck::NoAnswer);
        assert_eq!(got["web-4"], HostCheck::NotConnected("agent web-4 is not connected".into()));
        // Not connected: never asked. Every request has its own id.
        let sent = link.sent.lock().unwrap();
        assert_eq!(sent.iter().map(|(h, _)| h.as_str()).collect::<Vec<_>>(), ["web-1", "web-2", "web-3"]);
        let ids: std::collections::BTreeSet<_> = sent.iter().map(|(_, r)| r.request_id.clone()).collect();
        assert_eq!(ids.len(), 3);

        let p = plan(got, vec![vec!["web-1".into()], vec!["web-2".into(), "web-3".into(), "web-4".into()]]);
        let lines: Vec<String> = p.problems().iter().map(|p| p.to_string()).collect();
        assert_eq!(
            lines,
            [
                "web-2: file /srv/kye.env: does not exist",
                "web-3: preflight: no answer within 2s (an agent older than this coordinator ignores dry runs)",
                "web-4: connection: agent web-4 is not connected",
            ]
        );
    }

    #[test]
    fn secret_and_provider_problems_come_first() {
        let mut p = plan(BTreeMap::new(), vec![]);
        p.blockers.push("api-key is already being rotated by rot-1; wait for it, or abort it".into());
        p.provider = ProviderCheck::Failed("http: 403 forbidden".into());
        let lines: Vec<String> = p.problems().iter().map(|p| p.to_string()).collect();
        assert_eq!(lines[0], "secret: api-key is already being rotated by rot-1; wait for it, or abort it");
        assert_eq!(lines[1], "provider: cannot list its versions: http: 403 forbidden");
        assert!(plan(BTreeMap::new(), vec![]).problems().is_empty());
    }

    #[test]
    fn waits_are_bounded() {
        assert_eq!(wait_of(0).unwrap(), DEFAULT_WAIT);
        assert_eq!(wait_of(5).unwrap(), Duration::from_secs(5));
        assert!(matches!(wait_of(301), Err(PreflightError::BadWait(301))));
    }
}
