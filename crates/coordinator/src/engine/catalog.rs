//! The secret catalog: `[[secret]]` blocks of `coordinator.toml`, validated
//! into [`SecretSpec`]s. A config error names the file, the secret and the field.
//! Relative paths in provider and sink settings (credential files, commands)
//! are relative to the config file.

use super::machine::Policy;
use super::plan::{Amount, SelectorWave};
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
    /// Campaigns start higher priorities first (then catalog order).
    #[serde(default)]
    priority: i64,
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
    /// Counts, percentages, or `{ selector = {..}, pause_after = bool }`
    /// tables; checked by [`waves`] for an error that names the entry.
    #[serde(default = "all")]
    waves: Vec<toml::Value>,
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
fn all() -> Vec<toml::Value> {
    vec![toml::Value::String("100%".into())]
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
    /// `reactivate` (alert, reactivate the old version, halt) or `proceed`
    /// (alert only). Unset: `reactivate` where the provider can reactivate,
    /// else `proceed`.
    #[serde(default)]
    on_use_during_grace: Option<String>,
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
            on_use_during_grace: None,
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
    /// Campaigns start higher priorities first (then catalog order).
    pub priority: i64,
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

const WAVE_EXPECTED: &str =
    "expected a host count (3), a percentage (\"25%\") or { selector = { label = \"value\" }, pause_after = true }";

/// One `{ selector = {..}, pause_after = .. }` entry of `rollout.waves`.
fn selector_wave(path: &Path, field: &str, t: &toml::Table, s: &RawSecret) -> Result<SelectorWave, ConfigError> {
    if let Some(k) = t.keys().find(|k| !["selector", "pause_after"].contains(&k.as_str())) {
        return Err(ConfigError::field(
            path,
            format!("{field}.{k}"),
            format!("unknown key {k:?}: a wave table takes `selector` and `pause_after`"),
        ));
    }
    let pause_after = match t.get("pause_after") {
        None => false,
        Some(toml::Value::Boolean(b)) => *b,
        Some(v) => {
            return Err(ConfigError::field(
                path,
                format!("{field}.pause_after"),
                format!("expected true or false, got {v}"),
            ));
        }
    };
    let sel_field = format!("{field}.selector");
    let Some(toml::Value::Table(sel)) = t.get("selector") else {
        return Err(ConfigError::field(
            path,
            sel_field,
            "expected a table of labels, e.g. selector = { env = \"staging\" }",
        ));
    };
    if sel.is_empty() {
        return Err(ConfigError::field(
            path,
            sel_field,
            "an empty selector matches every host: name at least one label",
        ));
    }
    let mut selector = BTreeMap::new();
    for (k, v) in sel {
        let (true, toml::Value::String(v)) = (!k.is_empty(), v) else {
            return Err(ConfigError::field(
                path,
                format!("{sel_field}.{k}"),
                "expected a label name and a string value",
            ));
        };
        if s.selector.get(k).is_some_and(|want| want != v) {
            return Err(ConfigError::field(
                path,
                format!("{sel_field}.{k}"),
                format!(
                    "the secret's own selector requires {k} = {:?}: this wave can never match a consumer",
                    s.selector[k]
                ),
            ));
        }
        selector.insert(k.clone(), v.clone());
    }
    Ok(SelectorWave { selector, pause_after })
}

/// `rollout.waves`: selector waves first, then counts and percentages, each
/// size larger than the one before of its kind (they are cumulative).
fn waves(
    path: &Path,
    at: &dyn Fn(&str) -> String,
    s: &RawSecret,
) -> Result<(Vec<SelectorWave>, Vec<Amount>), ConfigError> {
    let (mut selectors, mut sizes) = (Vec::<SelectorWave>::new(), Vec::<Amount>::new());
    for (j, w) in s.rollout.waves.iter().enumerate() {
        let field = at(&format!("rollout.waves[{j}]"));
        let size = match w {
            toml::Value::Table(t) => {
                if !sizes.is_empty() {
                    return Err(ConfigError::field(
                        path,
                        field,
                        "selector waves go first, before any count or percentage",
                    ));
                }
                let wave = selector_wave(path, &field, t, s)?;
                if let Some(k) = selectors.iter().position(|x| x.selector == wave.selector) {
                    return Err(ConfigError::field(
                        path,
                        field,
                        format!("repeats waves[{k}]: it would never get a host"),
                    ));
                }
                selectors.push(wave);
                continue;
            }
            toml::Value::Integer(n) if *n >= 1 => Amount::Count(*n as usize),
            toml::Value::String(x) => Amount::parse(x).map_err(|m| ConfigError::field(path, &field, m))?,
            toml::Value::Integer(n) => {
                return Err(ConfigError::field(path, field, format!("{n} hosts: a wave reaches at least 1 host")));
            }
            other => return Err(ConfigError::field(path, field, format!("{WAVE_EXPECTED}, got {other}"))),
        };
        if size == Amount::Percent(0) || size == Amount::Count(0) {
            return Err(ConfigError::field(path, field, "a wave of 0 reaches no host: use at least 1 or \"1%\""));
        }
        let not_larger = |p: &&Amount| match (**p, size) {
            (Amount::Count(a), Amount::Count(b)) => b <= a,
            (Amount::Percent(a), Amount::Percent(b)) => b <= a,
            _ => false,
        };
        if let Some(p) = sizes.iter().rev().find(not_larger) {
            return Err(ConfigError::field(
                path,
                field,
                format!("waves are cumulative: {size} must be larger than the {p} before it"),
            ));
        }
        sizes.push(size);
    }
    Ok((selectors, sizes))
}

/// The rotation policy of one `[[secret]]` (its rollout and revocation tables).
fn policy(path: &Path, at: &dyn Fn(&str) -> String, s: &RawSecret) -> Result<Policy, ConfigError> {
    let (selector_waves, waves) = self::waves(path, at, s)?;
    let failure_budget = amount(path, &at("rollout.failure_budget"), &s.rollout.failure_budget)?;
    let host_deadline_ms = duration_ms(path, &at("rollout.host_deadline"), &s.rollout.host_deadline)?;
    if host_deadline_ms < 1000 {
        return Err(ConfigError::field(path, at("rollout.host_deadline"), "must be at least 1s"));
    }
    Ok(Policy {
        canary: s.rollout.canary,
        waves,
        selector_waves,
        failure_budget,
        host_deadline_ms,
        jitter_ms: duration_ms(path, &at("rollout.jitter"), &s.rollout.jitter)? as u64,
        deactivate: s.revocation.deactivate,
        grace_ms: duration_ms(path, &at("revocation.grace"), &s.revocation.grace)?,
        delete: s.revocation.delete,
        monitor_ms: duration_ms(path, &at("revocation.monitor"), &s.revocation.monitor)?,
        require_evidence: s.revocation.require_evidence,
        usage_granularity_ms: duration_ms(path, &at("revocation.usage_granularity"), &s.revocation.usage_granularity)?,
        grace_use: match s.revocation.on_use_during_grace.as_deref() {
            None if s.provider.can_reactivate() => super::machine::GraceUse::Reactivate,
            None => super::machine::GraceUse::Proceed,
            Some("reactivate") if s.revocation.deactivate && !s.provider.can_reactivate() => {
                return Err(ConfigError::field(
                    path,
                    at("revocation.on_use_during_grace"),
                    format!(
                        "\"reactivate\" needs a reactivate operation and the {} provider has none configured: \
                         configure provider.reactivate, or set on_use_during_grace = \"proceed\"",
                        s.provider.kind()
                    ),
                ));
            }
            Some("reactivate") => super::machine::GraceUse::Reactivate,
            Some("proceed") => super::machine::GraceUse::Proceed,
            Some(other) => {
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
            priority: s.priority,
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

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::engine::plan::{Amount, SelectorWave};
    use std::path::Path;

    const PATH: &str = "/etc/rekey/coordinator.toml";

    fn config(rollout: &str) -> Result<Config, String> {
        let text = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nmaster_key_file = \"/nonexistent/master.key\"\n\
             [[secret]]\nname = \"api-key\"\nselector = {{ app = \"web\" }}\nprovider = {{ kind = \"random\" }}\n\
             [secret.rollout]\n{rollout}\n"
        );
        Config::from_str(Path::new(PATH), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn selector_waves_parse_before_the_size_waves() {
        let c =
            config("canary = 1\nwaves = [{ selector = { env = \"staging\" }, pause_after = true }, \"25%\", \"100%\"]")
                .unwrap();
        let p = &c.secrets[0].policy;
        assert_eq!(
            p.selector_waves,
            vec![SelectorWave { selector: [("env".to_string(), "staging".to_string())].into(), pause_after: true }]
        );
        assert_eq!(p.waves, vec![Amount::Percent(25), Amount::Percent(100)]);
        assert_eq!(c.secrets[0].priority, 0);
        let c = config("waves = [{ selector = { env = \"staging\", app = \"web\" } }, 3]").unwrap();
        assert!(!c.secrets[0].policy.selector_waves[0].pause_after);
    }

    /// Each refusal names the file, the entry and what was expected.
    #[test]
    fn wave_specs_that_cannot_work_are_refused_at_load() {
        let at = "secret[0] (\"api-key\").rollout.waves";
        for (waves, field, needle) in [
            ("[{ selector = {} }]", "[0].selector", "an empty selector matches every host"),
            ("[{ pause_after = true }]", "[0].selector", "expected a table of labels"),
            ("[{ selector = { env = \"staging\" }, pause = true }]", "[0].pause", "unknown key \"pause\""),
            ("[{ selector = { env = 1 } }]", "[0].selector.env", "a string value"),
            ("[{ selector = { env = \"s\" }, pause_after = \"yes\" }]", "[0].pause_after", "true or false"),
            ("[{ selector = { app = \"db\" } }]", "[0].selector.app", "can never match a consumer"),
            ("[\"0%\"]", "[0]", "a wave of 0 reaches no host"),
            ("[0]", "[0]", "0 hosts"),
            ("[-2]", "[0]", "-2 hosts"),
            ("[\"150%\"]", "[0]", "over 100%"),
            ("[true]", "[0]", "expected a host count"),
            ("[\"50%\", \"25%\"]", "[1]", "cumulative: 25% must be larger than the 50%"),
            ("[3, 3]", "[1]", "cumulative"),
            ("[\"25%\", { selector = { env = \"staging\" } }]", "[1]", "selector waves go first"),
            ("[{ selector = { env = \"a\" } }, { selector = { env = \"a\" } }]", "[1]", "repeats waves[0]"),
        ] {
            let e = config(&format!("waves = {waves}")).unwrap_err();
            assert!(e.contains(PATH) && e.contains(&format!("{at}{field}")) && e.contains(needle), "{waves}: {e}");
        }
        // A count after a percentage cannot be compared at load: both are kept.
        assert!(config("waves = [\"50%\", 3]").is_ok());
    }

    #[test]
    fn priority_is_read_from_the_catalog() {
        let text = String::from(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nmaster_key_file = \"/nonexistent/master.key\"\n\
             [[secret]]\nname = \"fleet-key\"\npriority = 10\nall_agents = true\nprovider = { kind = \"random\" }\n",
        );
        assert_eq!(Config::from_str(Path::new(PATH), &text).unwrap().secrets[0].priority, 10);
        let bad = text.replace("priority = 10", "priority = \"high\"");
        let e = Config::from_str(Path::new(PATH), &bad).unwrap_err().to_string();
        assert!(e.contains("priority"), "{e}");
    }
}
