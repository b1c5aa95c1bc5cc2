//! The secret catalog: `[[secret]]` blocks of `coordinator.toml`, validated
//! into [`SecretSpec`]s. A config error names the file, the secret and the field.
//! Relative paths in provider and sink settings (credential files, commands)
//! are relative to the config file.

use super::machine::Policy;
use super::plan::Amount;
use rekey_common::config::ConfigError;
use rekey_common::time::parse_duration;
use rekey_providers::{ProviderConfig, SinkConfig};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSecret {
    name: String,
    #[serde(default)]
    description: String,
    provider: ProviderConfig,
    /// Where every new version is also written (e.g. Vault), before any host gets it.
    #[serde(default)]
    sinks: Vec<SinkConfig>,
    /// Labels an agent must carry (all of them) to receive this secret.
    #[serde(default)]
    selector: BTreeMap<String, String>,
    /// Agents (by name) that may receive this secret.
    #[serde(default)]
    hosts: Option<Vec<String>>,
    /// Every enrolled agent that declares the secret may receive it: must be
    /// written out, never implied by a missing selector.
    #[serde(default)]
    all_agents: bool,
    #[serde(default)]
    rollout: RawRollout,
    #[serde(default)]
    revocation: RawRevocation,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawAmount {
    Int(usize),
    Str(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    #[serde(default = "one")]
    canary: usize,
    #[serde(default = "all")]
    waves: Vec<RawAmount>,
    #[serde(default = "zero")]
    failure_budget: RawAmount,
    #[serde(default = "five_minutes")]
    host_deadline: String,
    #[serde(default = "no_time")]
    jitter: String,
}

fn one() -> usize {
    1
}
fn all() -> Vec<RawAmount> {
    vec![RawAmount::Str("100%".into())]
}
fn zero() -> RawAmount {
    RawAmount::Int(0)
}
fn five_minutes() -> String {
    "5m".into()
}
fn no_time() -> String {
    "0s".into()
}
fn ten_minutes() -> String {
    "10m".into()
}
fn yes() -> bool {
    true
}

impl Default for RawRollout {
    fn default() -> Self {
        RawRollout { canary: 1, waves: all(), failure_budget: zero(), host_deadline: five_minutes(), jitter: no_time() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRevocation {
    #[serde(default = "yes")]
    deactivate: bool,
    #[serde(default = "ten_minutes")]
    grace: String,
    #[serde(default = "yes")]
    delete: bool,
    #[serde(default = "three_days")]
    monitor: String,
    /// Hold deactivation until the provider's usage data shows no use of the
    /// old version since the last host switched (where the provider reports usage).
    #[serde(default = "yes")]
    require_evidence: bool,
    /// How coarse the provider's usage timestamps are (AWS: up to hours).
    #[serde(default = "no_time")]
    usage_granularity: String,
    /// `reactivate` (alert, reactivate the old version, halt) or `proceed` (alert only).
    #[serde(default = "reactivate")]
    on_use_during_grace: String,
    /// `hold` (alert, hold revocation until an operator decides) or `revoke`
    /// (alert, revoke anyway) when the old version is used after every host switched.
    #[serde(default = "hold")]
    on_use_after_switch: String,
    /// How often usage is checked during grace and monitoring.
    #[serde(default = "one_minute")]
    check_every: String,
}

fn three_days() -> String {
    "72h".into()
}
fn reactivate() -> String {
    "reactivate".into()
}
fn one_minute() -> String {
    "1m".into()
}
fn hold() -> String {
    "hold".into()
}

impl Default for RawRevocation {
    fn default() -> Self {
        RawRevocation {
            deactivate: true,
            grace: ten_minutes(),
            delete: true,
            monitor: three_days(),
            require_evidence: true,
            usage_granularity: no_time(),
            on_use_during_grace: reactivate(),
            on_use_after_switch: hold(),
            check_every: one_minute(),
        }
    }
}

/// One secret rekey rotates.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretSpec {
    pub name: String,
    pub description: String,
    pub provider: ProviderConfig,
    pub sinks: Vec<SinkConfig>,
    pub selector: BTreeMap<String, String>,
    /// When set, only these agents (and, with a selector, only those of them
    /// that match it).
    pub hosts: Option<Vec<String>>,
    pub all_agents: bool,
    pub policy: Policy,
}

impl SecretSpec {
    /// Whether the agent `name` with these labels may receive this secret:
    /// every consumer rule the catalog gives must hold (least privilege; a
    /// secret with no rule has no consumer — config load refuses it).
    pub fn selects(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        let named = self.hosts.as_ref().is_none_or(|h| h.iter().any(|x| x == name));
        let labelled = self.selector.iter().all(|(k, v)| labels.get(k) == Some(v));
        let some_rule = self.all_agents || !self.selector.is_empty() || self.hosts.is_some();
        some_rule && named && labelled
    }
}

fn amount(path: &Path, field: &str, raw: &RawAmount) -> Result<Amount, ConfigError> {
    match raw {
        RawAmount::Int(n) => Ok(Amount::Count(*n)),
        RawAmount::Str(s) => Amount::parse(s).map_err(|m| ConfigError::field(path, field, m)),
    }
}

fn duration_ms(path: &Path, field: &str, s: &str) -> Result<i64, ConfigError> {
    parse_duration(s).map(|d| d.as_millis() as i64).map_err(|m| ConfigError::field(path, field, m))
}

/// A secret must name who may receive it: a selector, a host list, or an
/// explicit `all_agents = true`.
fn check_consumer_rule(path: &Path, at: &dyn Fn(&str) -> String, s: &RawSecret) -> Result<(), ConfigError> {
    if let Some(hosts) = &s.hosts
        && hosts.is_empty()
    {
        return Err(ConfigError::field(
            path,
            at("hosts"),
            "an empty host list selects no agent; remove it or name hosts",
        ));
    }
    if s.all_agents && (s.hosts.is_some() || !s.selector.is_empty()) {
        return Err(ConfigError::field(
            path,
            at("all_agents"),
            "all_agents = true cannot be combined with selector or hosts",
        ));
    }
    if !s.all_agents && s.hosts.is_none() && s.selector.is_empty() {
        return Err(ConfigError::field(
            path,
            at("selector"),
            "names no consumers: set selector = { label = \"value\" }, hosts = [\"name\", ...], or all_agents = true \
             (every enrolled agent that declares it); a secret never goes to every agent by default",
        ));
    }
    Ok(())
}

/// The rotation policy of one `[[secret]]` (its rollout and revocation tables).
fn policy(path: &Path, at: &dyn Fn(&str) -> String, s: &RawSecret) -> Result<Policy, ConfigError> {
    let mut waves = Vec::new();
    for (j, w) in s.rollout.waves.iter().enumerate() {
        waves.push(amount(path, &at(&format!("rollout.waves[{j}]")), w)?);
    }
    let failure_budget = amount(path, &at("rollout.failure_budget"), &s.rollout.failure_budget)?;
    let host_deadline_ms = duration_ms(path, &at("rollout.host_deadline"), &s.rollout.host_deadline)?;
    if host_deadline_ms < 1000 {
        return Err(ConfigError::field(path, at("rollout.host_deadline"), "must be at least 1s"));
    }
    Ok(Policy {
        canary: s.rollout.canary,
        waves,
        failure_budget,
        host_deadline_ms,
        jitter_ms: duration_ms(path, &at("rollout.jitter"), &s.rollout.jitter)? as u64,
        deactivate: s.revocation.deactivate,
        grace_ms: duration_ms(path, &at("revocation.grace"), &s.revocation.grace)?,
        delete: s.revocation.delete,
        monitor_ms: duration_ms(path, &at("revocation.monitor"), &s.revocation.monitor)?,
        require_evidence: s.revocation.require_evidence,
        usage_granularity_ms: duration_ms(path, &at("revocation.usage_granularity"), &s.revocation.usage_granularity)?,
        grace_use: match s.revocation.on_use_during_grace.as_str() {
            "reactivate" => super::machine::GraceUse::Reactivate,
            "proceed" => super::machine::GraceUse::Proceed,
            other => {
                return Err(ConfigError::field(
                    path,
                    at("revocation.on_use_during_grace"),
                    format!("expected \"reactivate\" or \"proceed\", got {other:?}"),
                ));
            }
        },
        check_every_ms: duration_ms(path, &at("revocation.check_every"), &s.revocation.check_every)?.max(1000),
        use_after_switch: match s.revocation.on_use_after_switch.as_str() {
            "hold" => super::machine::UseAfterSwitch::Hold,
            "revoke" => super::machine::UseAfterSwitch::Revoke,
            other => {
                return Err(ConfigError::field(
                    path,
                    at("revocation.on_use_after_switch"),
                    format!("expected \"hold\" or \"revoke\", got {other:?}"),
                ));
            }
        },
    })
}

pub(crate) fn validate(path: &Path, raw: Vec<RawSecret>) -> Result<Vec<SecretSpec>, ConfigError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let base = path.parent().unwrap_or(Path::new("."));
    for (i, mut s) in raw.into_iter().enumerate() {
        let at = |f: &str| format!("secret[{i}] ({:?}).{f}", s.name);
        rekey_common::config::check_secret_name(&s.name)
            .map_err(|m| ConfigError::field(path, format!("secret[{i}].name"), m))?;
        if !seen.insert(s.name.clone()) {
            return Err(ConfigError::field(path, at("name"), "this secret is declared twice"));
        }
        check_consumer_rule(path, &at, &s)?;
        s.provider.resolve_paths(base);
        s.provider.validate().map_err(|(f, m)| ConfigError::field(path, at(&format!("provider.{f}")), m))?;
        for (j, sink) in s.sinks.iter_mut().enumerate() {
            sink.resolve_paths(base);
            sink.validate().map_err(|(f, m)| ConfigError::field(path, at(&format!("sinks[{j}].{f}")), m))?;
        }
        if s.revocation.deactivate && !s.provider.can_deactivate() {
            return Err(ConfigError::field(
                path,
                at("revocation.deactivate"),
                format!(
                    "the {} provider has no deactivate operation configured: configure provider.deactivate, or set revocation.deactivate = false (the old version is then deleted after the rollout)",
                    s.provider.kind()
                ),
            ));
        }
        let policy = policy(path, &at, &s)?;
        out.push(SecretSpec {
            name: s.name,
            description: s.description,
            provider: s.provider,
            sinks: s.sinks,
            selector: s.selector,
            hosts: s.hosts,
            all_agents: s.all_agents,
            policy,
        });
    }
    Ok(out)
}

/// Serde's path for a parse error inside `[[secret]]` is `secret[N]...`; add
/// the secret's name so the operator finds it without counting blocks.
pub(crate) fn name_secret_in_error(e: ConfigError, text: &str) -> ConfigError {
    let ConfigError::Field { path, field, message } = e else { return e };
    let Some(rest) = field.strip_prefix("secret[") else {
        return ConfigError::Field { path, field, message };
    };
    let Some((idx, tail)) = rest.split_once(']') else {
        return ConfigError::Field { path, field, message };
    };
    let name = idx.parse::<usize>().ok().and_then(|i| {
        let v: toml::Value = toml::from_str(text).ok()?;
        v.get("secret")?.as_array()?.get(i)?.get("name")?.as_str().map(str::to_string)
    });
    let field = match name {
        Some(n) => format!("secret[{idx}] ({n:?}){tail}"),
        None => field,
    };
    ConfigError::Field { path, field, message }
}
