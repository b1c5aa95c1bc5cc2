//! `coordinator.toml`: parsed into a raw struct (unknown fields refused), then
//! validated into [`Config`]. Errors name the file and the field.

use rekey_common::config::ConfigError;
use rekey_common::time::serde_duration;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: SocketAddr,
    data_dir: PathBuf,
    master_key_file: PathBuf,
    /// Extra DNS names / IPs for the server certificate (informational: clients
    /// verify the fixed name `rekeyd`).
    #[serde(default)]
    server_names: Vec<String>,
    #[serde(default)]
    pki: RawPki,
    #[serde(default)]
    sessions: RawSessions,
    #[serde(default, rename = "secret")]
    secrets: Vec<crate::engine::catalog::RawSecret>,
    #[serde(default)]
    alerts: RawAlerts,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    ha: RawHa,
    #[serde(default)]
    console: RawConsole,
    #[serde(default)]
    metrics: RawMetrics,
}

/// `[metrics]`: rekeyd's Prometheus listener (off unless `listen` is set).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<SocketAddr>,
}

/// `[store]`: where rekeyd keeps its state.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    /// `sled` (default: embedded, in the data dir) or `postgres` (shared, HA).
    backend: Option<String>,
    url: Option<String>,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    ca_file: Option<PathBuf>,
    pool_size: Option<usize>,
}

/// `[ha]`: this replica among several on one PostgreSQL store.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHa {
    id: Option<String>,
    advertise: Option<String>,
    lease_ttl: Option<String>,
}

/// Where the state lives.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// One sled database in `data_dir/store` (one replica).
    Sled,
    Postgres(crate::store::postgres::PgOptions),
}

/// This replica's identity and lease (meaningful with PostgreSQL).
#[derive(Debug, Clone)]
pub struct HaConfig {
    /// Stable replica id (default: host name and listen port).
    pub id: String,
    /// `HOST:PORT` agents and operators reach this replica at.
    pub advertise: String,
    pub lease_ttl: Duration,
}

/// `[console]`: the read-only web console (off unless `listen` is set).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConsole {
    listen: Option<SocketAddr>,
    /// A non-loopback `listen` is refused unless this is set too.
    allow_remote: bool,
    #[serde(with = "serde_duration")]
    session_ttl: Duration,
}

impl Default for RawConsole {
    fn default() -> Self {
        RawConsole { listen: None, allow_remote: false, session_ttl: Duration::from_secs(8 * 3600) }
    }
}

/// The web console's listener and sessions (`[console]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleConfig {
    pub listen: SocketAddr,
    /// How long a console session (its cookie) lasts after login.
    pub session_ttl: Duration,
}

/// A console session lasts at most this long: a login is an operator at a
/// keyboard, not a service account.
const MAX_CONSOLE_SESSION: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    /// POST every alert here as signed JSON.
    webhook_url: Option<String>,
    /// Key of the HMAC-SHA256 body signature: a file (0600) or an environment variable.
    webhook_secret_file: Option<PathBuf>,
    webhook_secret_env: Option<String>,
    #[serde(default)]
    webhook_attempts: Option<u32>,
    /// Slack and PagerDuty routes (`[[alerts.route]]`).
    #[serde(default)]
    route: Vec<crate::alert_routes::RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPki {
    #[serde(with = "serde_duration")]
    agent_cert_ttl: Duration,
    #[serde(with = "serde_duration")]
    operator_cert_ttl: Duration,
    #[serde(with = "serde_duration")]
    default_token_ttl: Duration,
    #[serde(with = "serde_duration")]
    max_token_ttl: Duration,
}

impl Default for RawPki {
    fn default() -> Self {
        RawPki {
            agent_cert_ttl: Duration::from_secs(24 * 3600),
            operator_cert_ttl: Duration::from_secs(365 * 86_400),
            default_token_ttl: Duration::from_secs(3600),
            max_token_ttl: Duration::from_secs(7 * 86_400),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSessions {
    #[serde(with = "serde_duration")]
    heartbeat_interval: Duration,
    /// A session with no message for this long is closed.
    #[serde(with = "serde_duration")]
    silence_timeout: Duration,
}

impl Default for RawSessions {
    fn default() -> Self {
        RawSessions { heartbeat_interval: Duration::from_secs(10), silence_timeout: Duration::from_secs(35) }
    }
}

/// Validated coordinator configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub master_key_file: PathBuf,
    pub server_names: Vec<String>,
    pub agent_cert_ttl: Duration,
    pub operator_cert_ttl: Duration,
    pub default_token_ttl: Duration,
    pub max_token_ttl: Duration,
    pub heartbeat_interval: Duration,
    pub silence_timeout: Duration,
    pub secrets: Vec<crate::engine::catalog::SecretSpec>,
    pub webhook: Option<crate::alerts::Webhook>,
    pub store: StoreConfig,
    pub ha: HaConfig,
    /// The web console, when `[console] listen` is set.
    pub console: Option<ConsoleConfig>,
    /// Slack and PagerDuty routes of alerts (`[[alerts.route]]`).
    pub alert_routes: Vec<crate::alert_routes::Route>,
    /// Where `/metrics` is served (`[metrics] listen`); none: not served.
    pub metrics_listen: Option<SocketAddr>,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::from_str(path, &text)
    }

    pub fn from_str(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = rekey_common::config::parse_toml(path, text)
            .map_err(|e| crate::engine::catalog::name_secret_in_error(e, text))?;
        Self::validate(path, raw)
    }

    /// The catalog entry for `name`.
    pub fn secret(&self, name: &str) -> Option<&crate::engine::catalog::SecretSpec> {
        self.secrets.iter().find(|s| s.name == name)
    }

    fn validate(path: &Path, raw: RawConfig) -> Result<Config, ConfigError> {
        // Relative paths are relative to the config file, as people expect.
        let base = path.parent().unwrap_or(Path::new("."));
        let data_dir = base.join(&raw.data_dir);
        let master_key_file = base.join(&raw.master_key_file);
        if raw.pki.agent_cert_ttl < Duration::from_secs(2) {
            return Err(ConfigError::field(path, "pki.agent_cert_ttl", "must be at least 2s"));
        }
        if raw.pki.agent_cert_ttl < Duration::from_secs(300) {
            tracing::warn!(
                ttl = %humantime::format_duration(raw.pki.agent_cert_ttl),
                "pki.agent_cert_ttl is very short: agents offline longer than that must be re-enrolled"
            );
        }
        if raw.pki.default_token_ttl > raw.pki.max_token_ttl {
            return Err(ConfigError::field(path, "pki.default_token_ttl", "must not exceed pki.max_token_ttl"));
        }
        if raw.sessions.heartbeat_interval.is_zero() {
            return Err(ConfigError::field(path, "sessions.heartbeat_interval", "must be greater than zero"));
        }
        if raw.sessions.silence_timeout < raw.sessions.heartbeat_interval * 2 {
            return Err(ConfigError::field(
                path,
                "sessions.silence_timeout",
                "must be at least twice sessions.heartbeat_interval",
            ));
        }
        if master_key_file.starts_with(&data_dir) {
            tracing::warn!(
                path = %master_key_file.display(),
                "master_key_file lies inside data_dir: a copy of the data dir then carries its own key; keep it elsewhere in production"
            );
        }
        let secrets = crate::engine::catalog::validate(path, raw.secrets)?;
        let mut alerts = raw.alerts;
        let alert_routes = crate::alert_routes::validate(path, base, std::mem::take(&mut alerts.route))?;
        let webhook = Self::webhook(path, base, alerts)?;
        let store = store_config(path, base, raw.store)?;
        let ha = ha_config(path, raw.ha, raw.listen, &store)?;
        let console = Self::console(path, raw.console)?;
        Ok(Config {
            store,
            ha,
            console,
            webhook,
            metrics_listen: raw.metrics.listen,
            alert_routes,
            secrets,
            path: path.to_path_buf(),
            listen: raw.listen,
            data_dir,
            master_key_file,
            server_names: raw.server_names,
            agent_cert_ttl: raw.pki.agent_cert_ttl,
            operator_cert_ttl: raw.pki.operator_cert_ttl,
            default_token_ttl: raw.pki.default_token_ttl,
            max_token_ttl: raw.pki.max_token_ttl,
            heartbeat_interval: raw.sessions.heartbeat_interval,
            silence_timeout: raw.sessions.silence_timeout,
        })
    }

    fn console(path: &Path, raw: RawConsole) -> Result<Option<ConsoleConfig>, ConfigError> {
        let Some(listen) = raw.listen else {
            if raw.allow_remote {
                return Err(ConfigError::field(path, "console.allow_remote", "is set but console.listen is not"));
            }
            return Ok(None);
        };
        if !listen.ip().is_loopback() && !raw.allow_remote {
            return Err(ConfigError::field(
                path,
                "console.listen",
                format!(
                    "{listen} is not a loopback address: the console shows the whole fleet and is meant for \
                     127.0.0.1 (reach it from elsewhere through an SSH tunnel); set console.allow_remote = true \
                     to serve it on {listen} anyway"
                ),
            ));
        }
        if raw.session_ttl < Duration::from_secs(60) || raw.session_ttl > MAX_CONSOLE_SESSION {
            return Err(ConfigError::field(path, "console.session_ttl", "expected between 1m and 24h"));
        }
        Ok(Some(ConsoleConfig { listen, session_ttl: raw.session_ttl }))
    }

    fn webhook(path: &Path, base: &Path, raw: RawAlerts) -> Result<Option<crate::alerts::Webhook>, ConfigError> {
        let Some(url) = raw.webhook_url else {
            if raw.webhook_secret_file.is_some() || raw.webhook_secret_env.is_some() {
                return Err(ConfigError::field(
                    path,
                    "alerts.webhook_url",
                    "a webhook secret is set but no webhook_url",
                ));
            }
            return Ok(None);
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ConfigError::field(
                path,
                "alerts.webhook_url",
                format!("expected an http(s) URL, got {url:?}"),
            ));
        }
        let key = match (raw.webhook_secret_file, raw.webhook_secret_env) {
            (Some(f), None) => {
                use std::os::unix::fs::PermissionsExt;
                let f = base.join(f);
                let meta = std::fs::metadata(&f).map_err(|e| {
                    ConfigError::field(path, "alerts.webhook_secret_file", format!("cannot read {}: {e}", f.display()))
                })?;
                if meta.permissions().mode() & 0o077 != 0 {
                    return Err(ConfigError::field(
                        path,
                        "alerts.webhook_secret_file",
                        format!("{} is readable by group or others; chmod 600 it", f.display()),
                    ));
                }
                let text = std::fs::read_to_string(&f).map_err(|e| {
                    ConfigError::field(path, "alerts.webhook_secret_file", format!("cannot read {}: {e}", f.display()))
                })?;
                text.trim().as_bytes().to_vec()
            }
            (None, Some(var)) => std::env::var(&var)
                .map_err(|_| {
                    ConfigError::field(
                        path,
                        "alerts.webhook_secret_env",
                        format!("environment variable {var} is not set"),
                    )
                })?
                .into_bytes(),
            _ => {
                return Err(ConfigError::field(
                    path,
                    "alerts.webhook_secret_file",
                    "set exactly one of webhook_secret_file or webhook_secret_env (the body is always signed)",
                ));
            }
        };
        if key.len() < 16 {
            return Err(ConfigError::field(path, "alerts", "the webhook secret must be at least 16 bytes"));
        }
        Ok(Some(crate::alerts::Webhook {
            url,
            key: std::sync::Arc::new(rekey_common::secret::SecretBytes::new(key)),
            max_attempts: raw.webhook_attempts.unwrap_or(5).clamp(1, 20),
            first_backoff: Duration::from_millis(500),
        }))
    }

    /// Whether the state is shared with other replicas (PostgreSQL).
    pub fn is_shared_store(&self) -> bool {
        matches!(self.store, StoreConfig::Postgres(_))
    }

    pub fn store_dir(&self) -> PathBuf {
        self.data_dir.join("store")
    }

    /// Whether this data dir holds a store already (an initialized
    /// coordinator). With PostgreSQL: whether the data dir exists (the
    /// database says the rest when opened).
    pub fn is_initialized(&self) -> bool {
        match self.store {
            StoreConfig::Sled => self.store_dir().join("db").exists(),
            StoreConfig::Postgres(_) => self.data_dir.join("ca.pem").exists(),
        }
    }

    pub fn operator_dir(&self) -> PathBuf {
        self.data_dir.join("operator")
    }

    /// Where the bound metrics address is written at each start (with `[metrics] listen`).
    pub fn metrics_addr_file(&self) -> PathBuf {
        self.data_dir.join("metrics.addr")
    }

    /// Where the bound listen address is written at each start (useful with port 0).
    pub fn addr_file(&self) -> PathBuf {
        self.data_dir.join("rekeyd.addr")
    }
}

/// A secret read from a file that must be 0600, or from an environment variable.
fn read_secret(
    path: &Path,
    base: &Path,
    field_file: &str,
    file: Option<PathBuf>,
    field_env: &str,
    env: Option<String>,
) -> Result<Option<Vec<u8>>, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    match (file, env) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => {
            Err(ConfigError::field(path, field_file, format!("set one of {field_file} or {field_env}, not both")))
        }
        (Some(f), None) => {
            let f = base.join(f);
            let cannot =
                |e: std::io::Error| ConfigError::field(path, field_file, format!("cannot read {}: {e}", f.display()));
            let meta = std::fs::metadata(&f).map_err(cannot)?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(ConfigError::field(
                    path,
                    field_file,
                    format!("{} is readable by group or others; chmod 600 it", f.display()),
                ));
            }
            Ok(Some(std::fs::read_to_string(&f).map_err(cannot)?.trim_end_matches(['\n', '\r']).as_bytes().to_vec()))
        }
        (None, Some(var)) => std::env::var(&var)
            .map(|v| Some(v.into_bytes()))
            .map_err(|_| ConfigError::field(path, field_env, format!("environment variable {var} is not set"))),
    }
}

fn store_config(path: &Path, base: &Path, raw: RawStore) -> Result<StoreConfig, ConfigError> {
    match raw.backend.as_deref().unwrap_or("sled") {
        "sled" => {
            if raw.url.is_some() || raw.password_file.is_some() || raw.password_env.is_some() {
                return Err(ConfigError::field(path, "store.url", "only for backend = \"postgres\""));
            }
            Ok(StoreConfig::Sled)
        }
        "postgres" => {
            let url = raw.url.ok_or_else(|| {
                ConfigError::field(
                    path,
                    "store.url",
                    "required with backend = \"postgres\" (postgres://USER@HOST:PORT/DB)",
                )
            })?;
            let parsed: tokio_postgres::Config = url.parse().map_err(|e| {
                ConfigError::field(path, "store.url", format!("expected postgres://USER@HOST:PORT/DB: {e}"))
            })?;
            if parsed.get_password().is_some() {
                return Err(ConfigError::field(
                    path,
                    "store.url",
                    "carries a password: put it in store.password_file (0600) or store.password_env instead",
                ));
            }
            let password = read_secret(
                path,
                base,
                "store.password_file",
                raw.password_file,
                "store.password_env",
                raw.password_env,
            )?;
            Ok(StoreConfig::Postgres(crate::store::postgres::PgOptions {
                url,
                password: password.map(rekey_common::secret::SecretBytes::new),
                ca_file: raw.ca_file.map(|f| base.join(f)),
                pool_size: raw.pool_size.unwrap_or(8).clamp(1, 64),
            }))
        }
        other => {
            Err(ConfigError::field(path, "store.backend", format!("expected \"sled\" or \"postgres\", got {other:?}")))
        }
    }
}

fn ha_config(path: &Path, raw: RawHa, listen: SocketAddr, store: &StoreConfig) -> Result<HaConfig, ConfigError> {
    let shared = matches!(store, StoreConfig::Postgres(_));
    if !shared && (raw.advertise.is_some() || raw.lease_ttl.is_some()) {
        return Err(ConfigError::field(path, "ha", "needs [store] backend = \"postgres\" (sled has one replica)"));
    }
    let lease_ttl = match raw.lease_ttl {
        Some(t) => rekey_common::time::parse_duration(&t).map_err(|e| ConfigError::field(path, "ha.lease_ttl", e))?,
        None => Duration::from_secs(10),
    };
    if lease_ttl < Duration::from_secs(2) || lease_ttl > Duration::from_secs(300) {
        return Err(ConfigError::field(path, "ha.lease_ttl", "expected between 2s and 5m"));
    }
    let advertise = match raw.advertise {
        Some(a) => {
            let ok = a.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(ConfigError::field(path, "ha.advertise", format!("expected HOST:PORT, got {a:?}")));
            }
            a
        }
        None if shared && listen.ip().is_unspecified() => {
            return Err(ConfigError::field(
                path,
                "ha.advertise",
                "required when listen is a wildcard address: the HOST:PORT agents and operators reach this replica at",
            ));
        }
        None => listen.to_string(),
    };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    let id = raw.id.unwrap_or_else(|| format!("{host}:{}", listen.port()));
    Ok(HaConfig { id, advertise, lease_ttl })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const OK: &str = r#"
listen = "127.0.0.1:7400"
data_dir = "data"
master_key_file = "/etc/rekey/master.key"
"#;

    #[test]
    fn minimal_config_gets_defaults_and_relative_paths() {
        let c = Config::from_str(Path::new("/etc/rekey/coordinator.toml"), OK).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/etc/rekey/data"));
        assert_eq!(c.agent_cert_ttl, Duration::from_secs(86_400));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(10));
    }

    #[test]
    fn the_secret_catalog_parses_with_defaults_and_errors_name_the_secret() {
        let p = Path::new("/etc/rekey/coordinator.toml");
        let text = format!(
            "{OK}\n[[secret]]\nname = \"api-key\"\nprovider = {{ kind = \"random\", length = 40 }}\nselector = {{ env = \"prod\" }}\n\
             [secret.rollout]\ncanary = 2\nwaves = [\"50%\", 10]\nfailure_budget = \"10%\"\n"
        );
        let c = Config::from_str(p, &text).unwrap();
        let s = c.secret("api-key").unwrap();
        assert_eq!(s.policy.canary, 2);
        assert_eq!(
            s.policy.waves,
            vec![crate::engine::plan::Amount::Percent(50), crate::engine::plan::Amount::Count(10)]
        );
        assert_eq!(s.policy.grace_ms, 600_000);
        assert!(s.selects("web-1", &[("env".to_string(), "prod".to_string())].into()));
        assert!(!s.selects("web-1", &Default::default()));
        // Least privilege: a secret must name its consumers.
        let bare = text.replace("selector = { env = \"prod\" }", "");
        let e = Config::from_str(p, &bare).unwrap_err().to_string();
        assert!(e.contains("secret[0] (\"api-key\").selector") && e.contains("names no consumers"), "{e}");
        let all = Config::from_str(p, &text.replace("selector = { env = \"prod\" }", "all_agents = true")).unwrap();
        assert!(all.secrets[0].selects("any", &Default::default()));
        let listed =
            Config::from_str(p, &text.replace("selector = { env = \"prod\" }", "hosts = [\"web-1\"]")).unwrap();
        assert!(listed.secrets[0].selects("web-1", &Default::default()));
        assert!(!listed.secrets[0].selects("web-2", &Default::default()));
        let both = text.replace("selector = { env = \"prod\" }", "selector = { env = \"prod\" }\nall_agents = true");
        assert!(Config::from_str(p, &both).unwrap_err().to_string().contains("all_agents"));

        let bad = text.replace("canary = 2", "canary = 2\ncanaries = 3");
        let e = Config::from_str(p, &bad).unwrap_err().to_string();
        assert!(
            e.contains("coordinator.toml") && e.contains("\"api-key\"") && e.contains("unknown field `canaries`"),
            "{e}"
        );
        let bad = text.replace("\"50%\"", "\"150%\"");
        let e = Config::from_str(p, &bad).unwrap_err().to_string();
        assert!(e.contains("secret[0] (\"api-key\").rollout.waves[0]") && e.contains("over 100%"), "{e}");
        let bad = text.replace("length = 40", "length = 2");
        let e = Config::from_str(p, &bad).unwrap_err().to_string();
        assert!(e.contains("provider.length"), "{e}");
        // A name that would climb out of a path (agent state, Vault) is refused.
        let bad = text.replace("name = \"api-key\"", "name = \"../../x\"");
        let e = Config::from_str(p, &bad).unwrap_err().to_string();
        assert!(e.contains("secret[0].name") && e.contains("invalid secret name \"../../x\""), "{e}");
        let bad = text.replace("kind = \"random\"", "kind = \"magic\"");
        let e = Config::from_str(p, &bad).unwrap_err().to_string();
        assert!(e.contains("api-key") && e.contains("magic"), "{e}");
        let dup =
            format!("{text}\n[[secret]]\nname = \"api-key\"\nprovider = {{ kind = \"random\" }}\nall_agents = true\n");
        let e = Config::from_str(p, &dup).unwrap_err().to_string();
        assert!(e.contains("declared twice"), "{e}");
    }

    /// A grace policy that cannot work is refused at load; unset, it follows the provider.
    #[test]
    fn reactivate_on_grace_use_needs_a_provider_that_can_reactivate() {
        let p = Path::new("/etc/rekey/coordinator.toml");
        let secret = |reactivate: &str, grace: &str| {
            format!(
                "{OK}\n[[secret]]\nname = \"saas\"\nall_agents = true\n[secret.provider]\nkind = \"http\"\n\
                 base_url = \"http://127.0.0.1:9\"\ntoken_env = \"PATH\"\n\
                 create = {{ url = \"/v1/keys\", fields = {{ value = \"/secret\" }} }}\n\
                 delete = {{ url = \"/v1/keys/{{id}}\" }}\ndeactivate = {{ url = \"/v1/keys/{{id}}/off\" }}\n{reactivate}\
                 [secret.revocation]\n{grace}"
            )
        };
        let e = Config::from_str(p, &secret("", "on_use_during_grace = \"reactivate\"\n")).unwrap_err().to_string();
        assert!(
            e.contains("coordinator.toml")
                && e.contains("revocation.on_use_during_grace")
                && e.contains("configure provider.reactivate"),
            "{e}"
        );
        let c = Config::from_str(p, &secret("", "")).unwrap();
        assert_eq!(
            c.secrets[0].policy.grace_use,
            crate::engine::machine::GraceUse::Proceed,
            "unset: what the provider can"
        );
        let with = "reactivate = { url = \"/v1/keys/{id}/on\" }\n";
        let c = Config::from_str(p, &secret(with, "")).unwrap();
        assert_eq!(c.secrets[0].policy.grace_use, crate::engine::machine::GraceUse::Reactivate);
        let e = Config::from_str(p, &secret(with, "on_use_after_switch = \"maybe\"\n")).unwrap_err().to_string();
        assert!(e.contains("revocation.on_use_after_switch") && e.contains("\"hold\" or \"revoke\""), "{e}");
    }

    #[test]
    fn errors_name_file_and_field() {
        let p = Path::new("/etc/rekey/coordinator.toml");
        let e = Config::from_str(p, &format!("{OK}\n[pki]\nagent_cert_ttl = \"soon\"")).unwrap_err().to_string();
        assert!(e.contains("coordinator.toml") && e.contains("pki.agent_cert_ttl"), "{e}");
        let e = Config::from_str(p, &format!("{OK}\nlisten_port = 3")).unwrap_err().to_string();
        assert!(e.contains("unknown field `listen_port`"), "{e}");
        let e =
            Config::from_str(p, &format!("{OK}\n[sessions]\nheartbeat_interval = \"30s\"\nsilence_timeout = \"40s\""))
                .unwrap_err()
                .to_string();
        assert!(e.contains("field `sessions.silence_timeout`"), "{e}");
        let e = Config::from_str(p, "data_dir = 'x'\nmaster_key_file = 'y'").unwrap_err().to_string();
        assert!(e.contains("missing field `listen`"), "{e}");
    }

    #[test]
    fn the_console_is_off_by_default_and_loopback_unless_remote_is_explicit() {
        let p = Path::new("/etc/rekey/coordinator.toml");
        assert_eq!(Config::from_str(p, OK).unwrap().console, None);
        let c = Config::from_str(p, &format!("{OK}\n[console]\nlisten = \"127.0.0.1:7402\"")).unwrap();
        let console = c.console.unwrap();
        assert_eq!(console.listen, "127.0.0.1:7402".parse().unwrap());
        assert_eq!(console.session_ttl, Duration::from_secs(8 * 3600));
        let e = Config::from_str(p, &format!("{OK}\n[console]\nlisten = \"0.0.0.0:7402\"")).unwrap_err().to_string();
        assert!(e.contains("coordinator.toml") && e.contains("console.listen"), "{e}");
        assert!(e.contains("not a loopback address") && e.contains("SSH tunnel") && e.contains("allow_remote"), "{e}");
        let remote = format!("{OK}\n[console]\nlisten = \"0.0.0.0:7402\"\nallow_remote = true");
        assert_eq!(Config::from_str(p, &remote).unwrap().console.unwrap().listen.port(), 7402);
        let e = Config::from_str(p, &format!("{OK}\n[console]\nallow_remote = true")).unwrap_err().to_string();
        assert!(e.contains("console.allow_remote"), "{e}");
        let e = Config::from_str(p, &format!("{OK}\n[console]\nlisten = \"127.0.0.1:1\"\nsession_ttl = \"30d\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("console.session_ttl") && e.contains("between 1m and 24h"), "{e}");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// deploy/coordinator.toml is documentation people copy: it must parse.
    #[test]
    fn the_deploy_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/coordinator.toml");
        let c = Config::from_file(&path).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/rekeyd"));
    }

    #[test]
    fn the_store_section_is_checked_and_never_takes_a_password_inline() {
        use super::tests::OK;
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("coordinator.toml");
        let cfg = |extra: &str| Config::from_str(&p, &format!("{OK}\n{extra}"));
        assert!(matches!(cfg("").unwrap().store, StoreConfig::Sled));
        let err = |extra: &str| cfg(extra).unwrap_err().to_string();
        assert!(err("[store]\nbackend = \"mysql\"").contains("expected \"sled\" or \"postgres\""));
        assert!(err("[store]\nbackend = \"postgres\"").contains("store.url"));
        let inline = err("[store]\nbackend = \"postgres\"\nurl = \"postgres://u:hunter2@db/rekey\"");
        assert!(inline.contains("store.password_file") && !inline.contains("hunter2"), "{inline}");
        let pw = dir.path().join("db.password");
        std::fs::write(&pw, "s3cret\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
        let pg = "[store]\nbackend = \"postgres\"\nurl = \"postgres://u@db/rekey\"\npassword_file = \"db.password\"";
        assert!(err(pg).contains("chmod 600"));
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = cfg(pg).unwrap();
        let StoreConfig::Postgres(o) = &c.store else { panic!("not postgres") };
        assert_eq!(o.password.as_ref().unwrap().expose(), b"s3cret");
        assert!(!format!("{o:?}").contains("s3cret"));
        assert_eq!((c.ha.advertise.as_str(), c.ha.lease_ttl), ("127.0.0.1:7400", Duration::from_secs(10)));
        assert!(err("[ha]\nlease_ttl = \"5s\"").contains("needs [store] backend"));
        assert!(err(&format!("{pg}\n[ha]\nlease_ttl = \"1s\"")).contains("ha.lease_ttl"));
        assert!(err(&format!("{pg}\n[ha]\nadvertise = \"nope\"")).contains("HOST:PORT"));
    }
}
