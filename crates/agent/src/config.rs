//! `agent.toml`: what this host consumes, how each secret reaches its files,
//! how the consuming service is restarted and how its health is checked, and
//! how to reach the coordinator.
//!
//! Unknown fields are refused; every error names the file and the field
//! (`secret[0].file[1].template`). Everything a delivery can make the agent do
//! is declared here: the coordinator can never name a path or a command.
//!
//! Validation happens at load (syntax, paths, templates compiled, durations,
//! signals); user and group *names* are resolved when a file is written, so a
//! config can name a service account that is created after the agent starts.

use rekey_common::config::{ConfigError, load_toml, parse_toml};
use rekey_common::time::{parse_duration, serde_duration};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// `host:port` of rekeyd; defaults to the address used at enrollment.
    coordinator: Option<String>,
    /// Several replicas' `host:port`, tried in order (exclusive with `coordinator`).
    coordinators: Option<Vec<String>>,
    state_dir: PathBuf,
    #[serde(default)]
    reconnect: RawReconnect,
    #[serde(default, rename = "secret")]
    secrets: Vec<RawSecret>,
    scan: Option<RawScan>,
    apply: Option<RawApply>,
}

/// `[apply]`: how deliveries of secrets that share a restart are batched.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApply {
    batch_window: Option<String>,
}

/// `[scan]`: where and how far scope scans look beyond the declared files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScan {
    #[serde(default)]
    roots: Vec<PathBuf>,
    max_depth: Option<u32>,
    max_file_size: Option<ByteSize>,
    max_files: Option<u64>,
    timeout: Option<String>,
}

/// A size in bytes as written in the config: an integer, or a string with a
/// unit (`"512KiB"`, `"1MiB"`, `"10MB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ByteSize(u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"1MiB\", \"512KiB\" or a number of bytes")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| E::custom(format!("size {v} is negative")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map(ByteSize).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `"1MiB"`, `"512 KiB"`, `"10MB"`, `"4096"` into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {text:?}: expected a number and a unit, e.g. \"1MiB\" or \"512KiB\""))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "ki" | "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mi" | "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gi" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "invalid size {text:?}: unknown unit {other:?} (expected B, KB, KiB, MB, MiB, GB, GiB)"
            ));
        }
    };
    n.checked_mul(mult).ok_or_else(|| format!("invalid size {text:?}: too large"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawReconnect {
    #[serde(with = "serde_duration")]
    initial_backoff: Duration,
    #[serde(with = "serde_duration")]
    max_backoff: Duration,
}

impl Default for RawReconnect {
    fn default() -> Self {
        RawReconnect { initial_backoff: Duration::from_millis(500), max_backoff: Duration::from_secs(30) }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    name: String,
    /// Fields whose values are not secret (an AWS access key id): a health
    /// check's expected body or output may name them.
    #[serde(default)]
    public_fields: Vec<String>,
    #[serde(default, rename = "file")]
    files: Vec<RawFile>,
    restart: Option<RawRestart>,
    health: Option<RawHealth>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "kebab-case")]
enum RawFileKind {
    Template,
    Replace,
    EnvFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    path: PathBuf,
    kind: RawFileKind,
    template: Option<String>,
    template_file: Option<PathBuf>,
    field: Option<String>,
    keys: Option<BTreeMap<String, String>>,
    mode: Option<String>,
    owner: Option<IdSpec>,
    group: Option<IdSpec>,
    #[serde(default)]
    follow_symlinks: bool,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "kebab-case")]
enum RawRestartKind {
    Systemd,
    Command,
    Signal,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    kind: RawRestartKind,
    unit: Option<String>,
    command: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    stdin: Option<String>,
    pidfile: Option<PathBuf>,
    signal: Option<String>,
    executable: Option<PathBuf>,
    jitter: Option<String>,
    timeout: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "kebab-case")]
enum RawHealthKind {
    Http,
    Tcp,
    Command,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: RawHealthKind,
    url: Option<String>,
    status: Option<u16>,
    body_contains: Option<String>,
    ca_file: Option<PathBuf>,
    output_contains: Option<String>,
    address: Option<String>,
    command: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    stdin: Option<String>,
    retries: Option<u32>,
    interval: Option<String>,
    timeout: Option<String>,
}

/// A user or group as written in the config: a name, or a numeric id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdSpec {
    Id(u32),
    Name(String),
}

impl fmt::Display for IdSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdSpec::Id(n) => write!(f, "{n}"),
            IdSpec::Name(s) => f.write_str(s),
        }
    }
}

impl<'de> Deserialize<'de> for IdSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = IdSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a user or group name, or a numeric id")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<IdSpec, E> {
                u32::try_from(v).map(IdSpec::Id).map_err(|_| E::custom(format!("id {v} is out of range")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<IdSpec, E> {
                u32::try_from(v).map(IdSpec::Id).map_err(|_| E::custom(format!("id {v} is out of range")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IdSpec, E> {
                if v.is_empty() {
                    return Err(E::custom("empty name"));
                }
                Ok(match v.parse::<u32>() {
                    Ok(n) => IdSpec::Id(n),
                    Err(_) => IdSpec::Name(v.to_string()),
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// A secret this host consumes, and everything the agent does with a new version.
#[derive(Debug, Clone)]
pub struct SecretConfig {
    pub name: String,
    /// Fields declared not secret: health expectations may name them.
    pub public_fields: BTreeSet<String>,
    /// Written in order; restored in reverse order on rollback.
    pub files: Vec<FileConfig>,
    pub restart: Option<RestartConfig>,
    pub health: Option<HealthConfig>,
}

/// One file the secret is written to.
#[derive(Debug, Clone)]
pub struct FileConfig {
    pub path: PathBuf,
    pub content: FileContent,
    /// Permission bits; `None` keeps the existing file's (0600 for a new file).
    pub mode: Option<u32>,
    /// `None` keeps the existing file's owner (the agent's for a new file).
    pub owner: Option<IdSpec>,
    pub group: Option<IdSpec>,
    /// A symlink on the path (owned by root or the agent's user) is
    /// followed; otherwise any symlink is refused. See [`crate::pipeline::chase`].
    pub follow_symlinks: bool,
    /// Where this entry sits in agent.toml, e.g. `secret[0].file[1]`, for messages.
    pub field: String,
}

pub use crate::pipeline::render::FileContent;

/// A command run without a shell. Secret values reach it only through the
/// environment (`env`: variable → field) or its stdin (`stdin`: field), never
/// its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandSpec {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub stdin: Option<String>,
}

impl CommandSpec {
    pub fn plain(argv: Vec<String>) -> Self {
        CommandSpec { argv, env: BTreeMap::new(), stdin: None }
    }

    /// `argv[0]`, for messages.
    pub fn program(&self) -> &str {
        self.argv.first().map(String::as_str).unwrap_or("")
    }
}

#[derive(Debug, Clone)]
pub struct RestartConfig {
    pub action: RestartAction,
    /// The restart waits a random time up to max(jitter, the delivery's restart_jitter_ms).
    pub jitter: Duration,
    /// Bound on a restart command (or `systemctl`).
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RestartAction {
    /// `systemctl restart UNIT`.
    Systemd {
        unit: String,
    },
    Command(CommandSpec),
    /// A signal to the process whose id is in `pidfile`, only if that
    /// process runs `executable` (`/proc/PID/exe`): a pidfile a service user
    /// can write must not aim the agent's signal at another process.
    Signal {
        pidfile: PathBuf,
        signal: nix::sys::signal::Signal,
        executable: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    pub check: HealthCheck,
    /// Attempts in total (at least 1).
    pub retries: u32,
    /// Pause between attempts.
    pub interval: Duration,
    /// Bound on one attempt.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HealthCheck {
    /// GET `url`; passes on `status` (and `body_contains`, if set). For an
    /// https URL, `ca` is the configured CA bundle (`None`: the system roots).
    Http { url: HttpUrl, status: u16, body_contains: Option<Expect>, ca: Option<CaBundle> },
    /// A TCP connection to `address` (host:port) succeeds.
    Tcp { address: String },
    /// The command exits 0 (and its stdout contains `output_contains`, if set).
    Command { command: CommandSpec, output_contains: Option<Expect> },
}

pub use crate::pipeline::render::Expect;

/// The certificates of a configured `ca_file` (DER), read and parsed at load.
#[derive(Clone, PartialEq)]
pub struct CaBundle {
    pub path: PathBuf,
    pub certs: Vec<Vec<u8>>,
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaBundle({}, {} certificates)", self.path.display(), self.certs.len())
    }
}

/// A parsed `http[s]://host:port/path` URL.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpUrl {
    pub text: String,
    /// `https`: TLS (rustls, ring) verified against the system roots or `ca_file`.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    /// `host[:port]` as written, for the Host header.
    pub authority: String,
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub path: PathBuf,
    /// The coordinator replicas to try, in order (`coordinator` or
    /// `coordinators`); empty: the addresses given at enrollment.
    pub coordinators: Vec<String>,
    pub state_dir: PathBuf,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub secrets: Vec<SecretConfig>,
    /// Scope scans: extra roots and bounds (defaults when `[scan]` is absent).
    pub scan: ScanConfig,
    /// How long a delivery of a secret that shares its restart with others
    /// waits for theirs, so they are applied behind one restart.
    pub batch_window: Duration,
}

/// Where a scope scan looks besides the declared files, and how far.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanConfig {
    /// Absolute directories (or files) searched in addition to every declared file.
    pub roots: Vec<PathBuf>,
    /// Directory levels below a root that are entered (0: the root's own entries only).
    pub max_depth: u32,
    /// Larger files are skipped (and counted).
    pub max_file_size: u64,
    /// Files read per scan, declared files included.
    pub max_files: u64,
    /// Wall-clock bound on one scan.
    pub timeout: Duration,
}

pub const DEFAULT_SCAN_MAX_DEPTH: u32 = 8;
pub const DEFAULT_SCAN_MAX_FILE_SIZE: u64 = 1 << 20;
pub const DEFAULT_SCAN_MAX_FILES: u64 = 20_000;
pub const DEFAULT_SCAN_TIMEOUT: Duration = Duration::from_secs(30);
/// The scanner holds one file in memory at a time: keep that bounded.
pub const MAX_SCAN_FILE_SIZE: u64 = 64 << 20;
const MAX_SCAN_ROOTS: usize = 64;
const MAX_SCAN_TIMEOUT: Duration = Duration::from_secs(600);

impl Default for ScanConfig {
    fn default() -> Self {
        ScanConfig {
            roots: Vec::new(),
            max_depth: DEFAULT_SCAN_MAX_DEPTH,
            max_file_size: DEFAULT_SCAN_MAX_FILE_SIZE,
            max_files: DEFAULT_SCAN_MAX_FILES,
            timeout: DEFAULT_SCAN_TIMEOUT,
        }
    }
}

fn validate_scan(path: &Path, raw: Option<RawScan>) -> Result<ScanConfig, ConfigError> {
    let Some(raw) = raw else { return Ok(ScanConfig::default()) };
    if raw.roots.len() > MAX_SCAN_ROOTS {
        return Err(ConfigError::field(path, "scan.roots", format!("at most {MAX_SCAN_ROOTS} roots")));
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    for (i, r) in raw.roots.into_iter().enumerate() {
        if !r.is_absolute() {
            return Err(ConfigError::field(
                path,
                format!("scan.roots[{i}]"),
                format!("expected an absolute path, got {:?}", r.display().to_string()),
            ));
        }
        if !roots.contains(&r) {
            roots.push(r);
        }
    }
    let max_file_size = raw.max_file_size.map(|b| b.0).unwrap_or(DEFAULT_SCAN_MAX_FILE_SIZE);
    if max_file_size == 0 || max_file_size > MAX_SCAN_FILE_SIZE {
        return Err(ConfigError::field(
            path,
            "scan.max_file_size",
            format!("must be greater than zero and at most 64MiB, got {max_file_size} bytes"),
        ));
    }
    let max_files = raw.max_files.unwrap_or(DEFAULT_SCAN_MAX_FILES);
    if max_files == 0 {
        return Err(ConfigError::field(path, "scan.max_files", "must be at least 1"));
    }
    let max_depth = raw.max_depth.unwrap_or(DEFAULT_SCAN_MAX_DEPTH);
    if max_depth > 64 {
        return Err(ConfigError::field(path, "scan.max_depth", format!("must be at most 64, got {max_depth}")));
    }
    let timeout = duration(path, "scan.timeout".into(), raw.timeout, DEFAULT_SCAN_TIMEOUT)?;
    if timeout.is_zero() || timeout > MAX_SCAN_TIMEOUT {
        return Err(ConfigError::field(path, "scan.timeout", "must be greater than zero and at most 10m"));
    }
    Ok(ScanConfig { roots, max_depth, max_file_size, max_files, timeout })
}

/// `coordinator = "h:p"` or `coordinators = ["h1:p", "h2:p"]`, not both;
/// neither: the addresses given at enrollment (an empty list).
fn coordinators(path: &Path, one: Option<String>, list: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    use rekey_common::ha::{check_address, parse_addresses};
    match (one, list) {
        (Some(_), Some(_)) => Err(ConfigError::field(
            path,
            "coordinators",
            "give either `coordinator` (one address) or `coordinators` (a list), not both",
        )),
        (Some(one), None) => {
            check_address(&one).map_err(|m| ConfigError::field(path, "coordinator", m))?;
            Ok(vec![one])
        }
        (None, Some(list)) => {
            if list.is_empty() {
                return Err(ConfigError::field(
                    path,
                    "coordinators",
                    "expected at least one HOST:PORT, got an empty list",
                ));
            }
            for (i, a) in list.iter().enumerate() {
                check_address(a).map_err(|m| ConfigError::field(path, format!("coordinators[{i}]"), m))?;
            }
            Ok(parse_addresses(&list).expect("each address checked"))
        }
        (None, None) => Ok(Vec::new()),
    }
}

const DEFAULT_RESTART_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_HEALTH_RETRIES: u32 = 5;
const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

impl AgentConfig {
    pub fn from_file(path: &Path) -> Result<AgentConfig, ConfigError> {
        Self::validate(path, load_toml(path)?)
    }

    pub fn from_str(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
        Self::validate(path, parse_toml(path, text)?)
    }

    fn validate(path: &Path, raw: RawConfig) -> Result<AgentConfig, ConfigError> {
        let base = path.parent().unwrap_or(Path::new("."));
        let coordinators = coordinators(path, raw.coordinator, raw.coordinators)?;
        if raw.reconnect.initial_backoff.is_zero() || raw.reconnect.initial_backoff > raw.reconnect.max_backoff {
            return Err(ConfigError::field(
                path,
                "reconnect.initial_backoff",
                "must be greater than zero and at most reconnect.max_backoff",
            ));
        }
        let mut seen = BTreeSet::new();
        // Every declared file, once: a file shared by two secrets could not be
        // rolled back for one without undoing the other.
        let mut paths: BTreeMap<PathBuf, String> = BTreeMap::new();
        let mut secrets = Vec::new();
        for (i, s) in raw.secrets.into_iter().enumerate() {
            rekey_common::config::check_secret_name(&s.name)
                .map_err(|m| ConfigError::field(path, format!("secret[{i}].name"), m))?;
            if !seen.insert(s.name.clone()) {
                return Err(ConfigError::field(
                    path,
                    format!("secret[{i}].name"),
                    format!("secret {:?} is declared twice", s.name),
                ));
            }
            let mut files = Vec::new();
            for (j, f) in s.files.into_iter().enumerate() {
                let field = format!("secret[{i}].file[{j}]");
                let file = validate_file(path, base, &field, f)?;
                if let Some(other) = paths.insert(file.path.clone(), field.clone()) {
                    return Err(ConfigError::field(
                        path,
                        format!("{field}.path"),
                        format!("{} is already declared by {other}", file.path.display()),
                    ));
                }
                files.push(file);
            }
            let public_fields = public_fields(path, i, s.public_fields)?;
            let restart = s.restart.map(|r| validate_restart(path, &format!("secret[{i}].restart"), r)).transpose()?;
            let health = s
                .health
                .map(|h| validate_health(path, base, &format!("secret[{i}].health"), h, &public_fields))
                .transpose()?;
            secrets.push(SecretConfig { name: s.name, public_fields, files, restart, health });
        }
        check_shared_restarts(path, &secrets)?;
        let batch_window = match raw.apply.and_then(|a| a.batch_window) {
            None => DEFAULT_BATCH_WINDOW,
            Some(text) => {
                let d = parse_duration(&text).map_err(|e| ConfigError::field(path, "apply.batch_window", e))?;
                if d > MAX_BATCH_WINDOW {
                    return Err(ConfigError::field(path, "apply.batch_window", "must be at most 60s"));
                }
                d
            }
        };
        Ok(AgentConfig {
            path: path.to_path_buf(),
            coordinators,
            state_dir: base.join(raw.state_dir),
            initial_backoff: raw.reconnect.initial_backoff,
            max_backoff: raw.reconnect.max_backoff,
            secrets,
            scan: validate_scan(path, raw.scan)?,
            batch_window,
        })
    }

    pub fn secret_names(&self) -> Vec<String> {
        self.secrets.iter().map(|s| s.name.clone()).collect()
    }

    pub fn secret(&self, name: &str) -> Option<&SecretConfig> {
        self.secrets.iter().find(|s| s.name == name)
    }

    /// The restart group of a secret: its restart's [`RestartAction::key`],
    /// or (no restart) a group of its own.
    pub fn restart_group(&self, secret: &str) -> String {
        match self.secret(secret).and_then(|s| s.restart.as_ref()) {
            Some(r) => r.action.key(),
            None => format!("secret {secret}"),
        }
    }

    /// The other declared secrets that share `secret`'s restart.
    pub fn siblings(&self, secret: &str) -> Vec<String> {
        let group = self.restart_group(secret);
        self.secrets
            .iter()
            .filter(|s| s.name != secret && self.restart_group(&s.name) == group)
            .map(|s| s.name.clone())
            .collect()
    }
}

/// Delivered secrets that share a restart wait this long for each other by default.
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_secs(3);
const MAX_BATCH_WINDOW: Duration = Duration::from_secs(60);

impl RestartAction {
    /// What "the same restart" means on a host: the same systemd unit
    /// (`app` is `app.service`), the same command line, or the same pidfile.
    /// Secrets with the same key are restarted once for a batch, and never
    /// concurrently.
    pub fn key(&self) -> String {
        match self {
            RestartAction::Systemd { unit } => format!("systemd {}", systemd_unit(unit)),
            RestartAction::Command(spec) => format!("command {:?}", spec.argv),
            RestartAction::Signal { pidfile, .. } => {
                format!("signal {}", crate::pipeline::chase::normalize(pidfile).display())
            }
        }
    }
}

/// systemd's own rule: a name without a unit type suffix is a service.
fn systemd_unit(unit: &str) -> String {
    const TYPES: [&str; 11] =
        ["service", "socket", "target", "mount", "automount", "timer", "path", "slice", "scope", "device", "swap"];
    match unit.rsplit_once('.') {
        Some((_, t)) if TYPES.contains(&t) => unit.to_string(),
        _ => format!("{unit}.service"),
    }
}

/// `public_fields`: non-empty, distinct names.
fn public_fields(path: &Path, i: usize, names: Vec<String>) -> Result<BTreeSet<String>, ConfigError> {
    let mut out = BTreeSet::new();
    for (k, n) in names.into_iter().enumerate() {
        check_field_name(path, format!("secret[{i}].public_fields[{k}]"), &n)?;
        if n == crate::pipeline::render::VERSION_ID {
            return Err(ConfigError::field(
                path,
                format!("secret[{i}].public_fields[{k}]"),
                "version_id is always available to health checks; list only the version's fields",
            ));
        }
        out.insert(n);
    }
    Ok(out)
}

/// Secrets that share a restart are restarted once for all of them, so the
/// restart must not depend on which one: no value through env or stdin, the
/// same signal and executable.
fn check_shared_restarts(path: &Path, secrets: &[SecretConfig]) -> Result<(), ConfigError> {
    for (i, s) in secrets.iter().enumerate() {
        let Some(r) = &s.restart else { continue };
        let Some((j, first)) = secrets[..i]
            .iter()
            .enumerate()
            .find_map(|(j, o)| o.restart.as_ref().filter(|o| o.action.key() == r.action.key()).map(|o| (j, o)))
        else {
            continue;
        };
        let err =
            |field: &str, what: String| Err(ConfigError::field(path, format!("secret[{i}].restart.{field}"), what));
        match (&r.action, &first.action) {
            (RestartAction::Command(a), RestartAction::Command(b)) => {
                for (spec, k) in [(a, i), (b, j)] {
                    if !spec.env.is_empty() || spec.stdin.is_some() {
                        return err(
                            "command",
                            format!(
                                "secret[{i}] and secret[{j}] share this restart command, so it runs once for both; \
                                 it cannot take a value from one secret's version (secret[{k}] sets env or stdin): \
                                 let the command read the files instead"
                            ),
                        );
                    }
                }
            }
            (
                RestartAction::Signal { signal: a, executable: ea, .. },
                RestartAction::Signal { signal: b, executable: eb, .. },
            ) => {
                if a != b {
                    return err(
                        "signal",
                        format!(
                            "secret[{j}] signals the same pidfile with {b}: secrets that share a restart must send the same signal"
                        ),
                    );
                }
                if ea != eb {
                    return err(
                        "executable",
                        format!(
                            "secret[{j}] names {} for the same pidfile: expected the same executable",
                            eb.display()
                        ),
                    );
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// "only valid with kind = ..." for a field set on the wrong kind.
fn only_for(path: &Path, field: String, kind: &str) -> ConfigError {
    ConfigError::field(path, field, format!("only valid with kind = \"{kind}\""))
}

fn required(path: &Path, field: String, kind: &str) -> ConfigError {
    ConfigError::field(path, field, format!("required with kind = \"{kind}\""))
}

fn duration(path: &Path, field: String, value: Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(s) => parse_duration(&s).map_err(|e| ConfigError::field(path, field, e)),
    }
}

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn check_field_name(path: &Path, field: String, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(ConfigError::field(path, field, "expected the name of a field of the secret, e.g. \"value\""));
    }
    Ok(())
}

fn validate_file(path: &Path, base: &Path, field: &str, f: RawFile) -> Result<FileConfig, ConfigError> {
    if !f.path.is_absolute() {
        return Err(ConfigError::field(
            path,
            format!("{field}.path"),
            format!("expected an absolute path, got {:?}", f.path.display().to_string()),
        ));
    }
    if crate::pipeline::chase::normalize(&f.path).file_name().is_none() {
        return Err(ConfigError::field(path, format!("{field}.path"), "expected the path of a file"));
    }
    check_kind_fields(path, field, &f)?;
    let content = match f.kind {
        RawFileKind::Template => {
            let (source, at) = template_source(path, base, field, f.template, f.template_file)?;
            crate::pipeline::render::check_template(&source)
                .map_err(|e| ConfigError::field(path, at, format!("invalid template: {e}")))?;
            FileContent::Template { source }
        }
        RawFileKind::Replace => {
            if let Some(name) = &f.field {
                check_field_name(path, format!("{field}.field"), name)?;
            }
            FileContent::Replace { field: f.field }
        }
        RawFileKind::EnvFile => FileContent::EnvFile { keys: env_file_keys(path, field, f.keys)? },
    };
    let mode = f.mode.map(|m| file_mode(path, field, &m)).transpose()?;
    Ok(FileConfig {
        // `/etc/app/../app/a.conf` is `/etc/app/a.conf`: declared paths are
        // compared (and resolved) without dot components.
        path: crate::pipeline::chase::normalize(&f.path),
        content,
        mode,
        owner: f.owner,
        group: f.group,
        follow_symlinks: f.follow_symlinks,
        field: field.to_string(),
    })
}

/// Refuses the settings of another kind of file (a `template` on an env-file…).
fn check_kind_fields(path: &Path, field: &str, f: &RawFile) -> Result<(), ConfigError> {
    use RawFileKind as K;
    if f.kind != K::Template {
        if f.template.is_some() {
            return Err(only_for(path, format!("{field}.template"), "template"));
        }
        if f.template_file.is_some() {
            return Err(only_for(path, format!("{field}.template_file"), "template"));
        }
    }
    if f.kind != K::Replace && f.field.is_some() {
        return Err(only_for(path, format!("{field}.field"), "replace"));
    }
    if f.kind != K::EnvFile && f.keys.is_some() {
        return Err(only_for(path, format!("{field}.keys"), "env-file"));
    }
    Ok(())
}

/// A template's text (inline, or read from `template_file` relative to the
/// config's directory) and the field to name in its errors.
fn template_source(
    path: &Path,
    base: &Path,
    field: &str,
    template: Option<String>,
    template_file: Option<PathBuf>,
) -> Result<(String, String), ConfigError> {
    match (template, template_file) {
        (Some(t), None) => Ok((t, format!("{field}.template"))),
        (None, Some(file)) => {
            let file = base.join(file);
            let text = std::fs::read_to_string(&file).map_err(|e| {
                ConfigError::field(
                    path,
                    format!("{field}.template_file"),
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            Ok((text, format!("{field}.template_file")))
        }
        (Some(_), Some(_)) => Err(ConfigError::field(
            path,
            format!("{field}.template"),
            "give either template or template_file, not both",
        )),
        (None, None) => Err(ConfigError::field(
            path,
            format!("{field}.template"),
            "required with kind = \"template\" (or template_file)",
        )),
    }
}

/// An env-file's `KEY = "field"` map: at least one entry, valid names.
fn env_file_keys(
    path: &Path,
    field: &str,
    keys: Option<BTreeMap<String, String>>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let keys = keys.ok_or_else(|| required(path, format!("{field}.keys"), "env-file"))?;
    if keys.is_empty() {
        return Err(ConfigError::field(path, format!("{field}.keys"), "expected at least one KEY = \"field\" entry"));
    }
    for (k, v) in &keys {
        if !is_env_name(k) {
            return Err(ConfigError::field(
                path,
                format!("{field}.keys.{k}"),
                format!("{k:?} is not a valid env-file key (letters, digits, '_', not starting with a digit)"),
            ));
        }
        check_field_name(path, format!("{field}.keys.{k}"), v)?;
    }
    Ok(keys)
}

/// An octal mode, `"0640"` or `"0o640"`.
fn file_mode(path: &Path, field: &str, m: &str) -> Result<u32, ConfigError> {
    let digits = m.strip_prefix("0o").unwrap_or(m);
    u32::from_str_radix(digits, 8).ok().filter(|v| *v <= 0o7777 && !digits.is_empty()).ok_or_else(|| {
        ConfigError::field(path, format!("{field}.mode"), format!("expected an octal mode like \"0640\", got {m:?}"))
    })
}

fn validate_command(
    path: &Path,
    field: &str,
    command: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    stdin: Option<String>,
) -> Result<CommandSpec, ConfigError> {
    let argv = command.ok_or_else(|| required(path, format!("{field}.command"), "command"))?;
    if argv.is_empty() || argv[0].is_empty() {
        return Err(ConfigError::field(
            path,
            format!("{field}.command"),
            "expected the program and its arguments, e.g. [\"/usr/bin/systemctl\", \"reload\", \"app\"]",
        ));
    }
    let env = env.unwrap_or_default();
    for (var, f) in &env {
        if !is_env_name(var) {
            return Err(ConfigError::field(
                path,
                format!("{field}.env.{var}"),
                format!("{var:?} is not a valid environment variable name"),
            ));
        }
        check_field_name(path, format!("{field}.env.{var}"), f)?;
    }
    if let Some(f) = &stdin {
        check_field_name(path, format!("{field}.stdin"), f)?;
    }
    Ok(CommandSpec { argv, env, stdin })
}

fn validate_restart(path: &Path, field: &str, r: RawRestart) -> Result<RestartConfig, ConfigError> {
    use RawRestartKind as K;
    if r.kind != K::Systemd && r.unit.is_some() {
        return Err(only_for(path, format!("{field}.unit"), "systemd"));
    }
    if r.kind != K::Command {
        for (set, name) in [(r.command.is_some(), "command"), (r.env.is_some(), "env"), (r.stdin.is_some(), "stdin")] {
            if set {
                return Err(only_for(path, format!("{field}.{name}"), "command"));
            }
        }
    }
    if r.kind != K::Signal {
        for (set, name) in
            [(r.pidfile.is_some(), "pidfile"), (r.signal.is_some(), "signal"), (r.executable.is_some(), "executable")]
        {
            if set {
                return Err(only_for(path, format!("{field}.{name}"), "signal"));
            }
        }
    }
    let action = match r.kind {
        K::Systemd => {
            let unit = r.unit.ok_or_else(|| required(path, format!("{field}.unit"), "systemd"))?;
            if unit.is_empty() || unit.starts_with('-') || unit.contains(char::is_whitespace) {
                return Err(ConfigError::field(
                    path,
                    format!("{field}.unit"),
                    format!("expected a systemd unit name like \"app.service\", got {unit:?}"),
                ));
            }
            RestartAction::Systemd { unit }
        }
        K::Command => RestartAction::Command(validate_command(path, field, r.command, r.env, r.stdin)?),
        K::Signal => {
            let pidfile = r.pidfile.ok_or_else(|| required(path, format!("{field}.pidfile"), "signal"))?;
            if !pidfile.is_absolute() {
                return Err(ConfigError::field(path, format!("{field}.pidfile"), "expected an absolute path"));
            }
            let name = r.signal.unwrap_or_else(|| "HUP".into());
            let signal = parse_signal(&name).ok_or_else(|| {
                ConfigError::field(
                    path,
                    format!("{field}.signal"),
                    format!("unknown signal {name:?}: expected HUP, TERM, INT, QUIT, USR1 or USR2"),
                )
            })?;
            let executable = r.executable.ok_or_else(|| {
                ConfigError::field(
                    path,
                    format!("{field}.executable"),
                    "required with kind = \"signal\": the absolute path of the program the pidfile's process runs \
                     (its /proc/PID/exe), e.g. \"/usr/sbin/nginx\"",
                )
            })?;
            if !executable.is_absolute() {
                return Err(ConfigError::field(path, format!("{field}.executable"), "expected an absolute path"));
            }
            RestartAction::Signal { pidfile, signal, executable }
        }
    };
    Ok(RestartConfig {
        action,
        jitter: duration(path, format!("{field}.jitter"), r.jitter, Duration::ZERO)?,
        timeout: duration(path, format!("{field}.timeout"), r.timeout, DEFAULT_RESTART_TIMEOUT)?,
    })
}

fn parse_signal(name: &str) -> Option<nix::sys::signal::Signal> {
    use nix::sys::signal::Signal::*;
    let upper = name.to_ascii_uppercase();
    Some(match upper.strip_prefix("SIG").unwrap_or(&upper) {
        "HUP" => SIGHUP,
        "TERM" => SIGTERM,
        "INT" => SIGINT,
        "QUIT" => SIGQUIT,
        "USR1" => SIGUSR1,
        "USR2" => SIGUSR2,
        _ => return None,
    })
}

/// Parses `http[s]://host[:port]/path`.
fn parse_http_url(text: &str) -> Result<HttpUrl, String> {
    let uri: http::Uri = text.parse().map_err(|e| format!("invalid URL {text:?}: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(format!("expected an http:// or https:// URL, got {text:?}")),
    };
    let authority = uri.authority().ok_or_else(|| format!("{text:?} has no host"))?;
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
    if host.is_empty() {
        return Err(format!("{text:?} has no host"));
    }
    let path = uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    let path = if path.is_empty() { "/".into() } else { path };
    Ok(HttpUrl {
        text: text.to_string(),
        tls,
        host,
        port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
        path,
        authority: authority.as_str().to_string(),
    })
}

/// Reads a PEM CA bundle (relative to the config's directory): at least one certificate.
fn ca_bundle(path: &Path, base: &Path, field: &str, file: PathBuf) -> Result<CaBundle, ConfigError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let file = base.join(file);
    let bad = |what: String| ConfigError::field(path, format!("{field}.ca_file"), what);
    let text = std::fs::read(&file).map_err(|e| bad(format!("cannot read {}: {e}", file.display())))?;
    let certs: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(&text)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("{}: expected PEM certificates: {e}", file.display())))?;
    if certs.is_empty() {
        return Err(bad(format!("{}: expected at least one PEM certificate (BEGIN CERTIFICATE)", file.display())));
    }
    Ok(CaBundle { path: file, certs })
}

fn expect(
    path: &Path,
    field: String,
    text: Option<String>,
    public: &BTreeSet<String>,
) -> Result<Option<Expect>, ConfigError> {
    text.map(|t| Expect::parse(&t, public).map_err(|e| ConfigError::field(path, field, e))).transpose()
}

/// Refuses the settings of another kind of health check (a `url` on a tcp check…).
fn check_health_kind_fields(path: &Path, field: &str, h: &RawHealth) -> Result<(), ConfigError> {
    use RawHealthKind as K;
    if h.kind != K::Http {
        for (set, name) in [
            (h.url.is_some(), "url"),
            (h.status.is_some(), "status"),
            (h.body_contains.is_some(), "body_contains"),
            (h.ca_file.is_some(), "ca_file"),
        ] {
            if set {
                return Err(only_for(path, format!("{field}.{name}"), "http"));
            }
        }
    }
    if h.kind != K::Tcp && h.address.is_some() {
        return Err(only_for(path, format!("{field}.address"), "tcp"));
    }
    if h.kind != K::Command {
        for (set, name) in [
            (h.command.is_some(), "command"),
            (h.env.is_some(), "env"),
            (h.stdin.is_some(), "stdin"),
            (h.output_contains.is_some(), "output_contains"),
        ] {
            if set {
                return Err(only_for(path, format!("{field}.{name}"), "command"));
            }
        }
    }
    Ok(())
}

fn validate_health(
    path: &Path,
    base: &Path,
    field: &str,
    h: RawHealth,
    public: &BTreeSet<String>,
) -> Result<HealthConfig, ConfigError> {
    use RawHealthKind as K;
    check_health_kind_fields(path, field, &h)?;
    let check = match h.kind {
        K::Http => {
            let url = h.url.ok_or_else(|| required(path, format!("{field}.url"), "http"))?;
            let url = parse_http_url(&url).map_err(|e| ConfigError::field(path, format!("{field}.url"), e))?;
            let status = h.status.unwrap_or(200);
            if !(100..=599).contains(&status) {
                return Err(ConfigError::field(
                    path,
                    format!("{field}.status"),
                    format!("expected an HTTP status code, got {status}"),
                ));
            }
            if h.ca_file.is_some() && !url.tls {
                return Err(ConfigError::field(path, format!("{field}.ca_file"), "only valid with an https:// url"));
            }
            let ca = h.ca_file.map(|f| ca_bundle(path, base, field, f)).transpose()?;
            let body_contains = expect(path, format!("{field}.body_contains"), h.body_contains, public)?;
            HealthCheck::Http { url, status, body_contains, ca }
        }
        K::Tcp => {
            let address = h.address.ok_or_else(|| required(path, format!("{field}.address"), "tcp"))?;
            if address
                .rsplit_once(':')
                .and_then(|(host, p)| p.parse::<u16>().ok().filter(|_| !host.is_empty()))
                .is_none()
            {
                return Err(ConfigError::field(
                    path,
                    format!("{field}.address"),
                    format!("expected HOST:PORT, got {address:?}"),
                ));
            }
            HealthCheck::Tcp { address }
        }
        K::Command => HealthCheck::Command {
            command: validate_command(path, field, h.command, h.env, h.stdin)?,
            output_contains: expect(path, format!("{field}.output_contains"), h.output_contains, public)?,
        },
    };
    let retries = h.retries.unwrap_or(DEFAULT_HEALTH_RETRIES);
    if retries == 0 {
        return Err(ConfigError::field(path, format!("{field}.retries"), "must be at least 1"));
    }
    let timeout = duration(path, format!("{field}.timeout"), h.timeout, DEFAULT_HEALTH_TIMEOUT)?;
    if timeout.is_zero() {
        return Err(ConfigError::field(path, format!("{field}.timeout"), "must be greater than zero"));
    }
    Ok(HealthConfig {
        check,
        retries,
        interval: duration(path, format!("{field}.interval"), h.interval, DEFAULT_HEALTH_INTERVAL)?,
        timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_str(Path::new("/etc/rekey/agent.toml"), text)
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_and_names_bad_fields() {
        let p = Path::new("/etc/rekey/agent.toml");
        let c = AgentConfig::from_str(p, "state_dir = 'state'\n[[secret]]\nname = 'api-key'\n").unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/etc/rekey/state"));
        assert_eq!(c.secret_names(), vec!["api-key"]);

        let e =
            AgentConfig::from_str(p, "state_dir = 's'\n[[secret]]\nname = 'a'\n[[secret]]\nname = 'a'\n").unwrap_err();
        assert!(e.to_string().contains("secret[1].name"), "{e}");
        let e = AgentConfig::from_str(p, "state_dir = 's'\ncoordinator = 'nohost'").unwrap_err();
        assert!(e.to_string().contains("field `coordinator`"), "{e}");
        let e = AgentConfig::from_str(p, "state_dir = 's'\n[[secret]]\nname = 'a'\npath = '/x'\n").unwrap_err();
        assert!(e.to_string().contains("secret[0]") && e.to_string().contains("unknown field `path`"), "{e}");
        let e = AgentConfig::from_str(p, "[reconnect]\nmax_backoff='1s'").unwrap_err();
        assert!(e.to_string().contains("missing field `state_dir`"), "{e}");
    }

    #[test]
    fn one_coordinator_or_a_list_of_replicas_never_both() {
        assert!(parse("state_dir = 's'").unwrap().coordinators.is_empty(), "the enrollment's addresses");
        assert_eq!(parse("state_dir = 's'\ncoordinator = 'a:1'").unwrap().coordinators, ["a:1"]);
        let c = parse("state_dir = 's'\ncoordinators = ['a:1', 'b:2', 'a:1', '[::1]:3']").unwrap();
        assert_eq!(c.coordinators, ["a:1", "b:2", "[::1]:3"], "in order, once each");
        assert_eq!(
            err("state_dir = 's'\ncoordinator = 'a:1'\ncoordinators = ['b:2']"),
            "/etc/rekey/agent.toml: field `coordinators`: give either `coordinator` (one address) or \
             `coordinators` (a list), not both"
        );
        assert_eq!(
            err("state_dir = 's'\ncoordinators = []"),
            "/etc/rekey/agent.toml: field `coordinators`: expected at least one HOST:PORT, got an empty list"
        );
        assert_eq!(
            err("state_dir = 's'\ncoordinators = ['a:1', 'b']"),
            "/etc/rekey/agent.toml: field `coordinators[1]`: expected HOST:PORT, got \"b\""
        );
        assert_eq!(
            err("state_dir = 's'\ncoordinator = 'a:1,b:2'"),
            "/etc/rekey/agent.toml: field `coordinator`: expected HOST:PORT, got \"a:1,b:2\""
        );
        let e = err("state_dir = 's'\ncoordinators = 'a:1'");
        assert!(e.contains("field `coordinators`") && e.contains("sequence"), "{e}");
    }

    const FULL: &str = r#"
state_dir = "state"
[[secret]]
name = "api"
  [[secret.file]]
  path = "/etc/app/app.env"
  kind = "env-file"
  keys = { API_KEY = "value" }
  mode = "0640"
  owner = "root"
  group = 0
  [[secret.file]]
  path = "/etc/app/config.json"
  kind = "template"
  template = '{"key": "{{ value }}"}'
  [[secret.file]]
  path = "/etc/app/legacy.conf"
  kind = "replace"
  [secret.restart]
  kind = "command"
  command = ["/usr/bin/app-restart", "--graceful"]
  env = { API_KEY = "value" }
  stdin = "value"
  jitter = "2s"
  timeout = "30s"
  [secret.health]
  kind = "http"
  url = "http://127.0.0.1:8080/health?deep=1"
  status = 204
  body_contains = "ok"
  retries = 3
  interval = "500ms"
  timeout = "1s"
[[secret]]
name = "db"
  [secret.restart]
  kind = "signal"
  pidfile = "/run/db.pid"
  signal = "SIGUSR1"
  executable = "/usr/lib/postgresql/bin/postgres"
  [secret.health]
  kind = "tcp"
  address = "127.0.0.1:5432"
[[secret]]
name = "svc"
  [secret.restart]
  kind = "systemd"
  unit = "svc.service"
  [secret.health]
  kind = "command"
  command = ["/usr/bin/check"]
  env = { TOKEN = "token" }
"#;

    #[test]
    fn parses_every_kind() {
        let c = parse(FULL).unwrap();
        let api = c.secret("api").unwrap();
        assert_eq!(api.files.len(), 3);
        assert_eq!(api.files[0].mode, Some(0o640));
        assert_eq!(api.files[0].owner, Some(IdSpec::Name("root".into())));
        assert_eq!(api.files[0].group, Some(IdSpec::Id(0)));
        assert_eq!(api.files[1].field, "secret[0].file[1]");
        assert!(matches!(&api.files[0].content, FileContent::EnvFile { keys } if keys["API_KEY"] == "value"));
        assert!(matches!(&api.files[2].content, FileContent::Replace { field: None }));
        let r = api.restart.as_ref().unwrap();
        assert_eq!(r.jitter, Duration::from_secs(2));
        assert_eq!(r.timeout, Duration::from_secs(30));
        let RestartAction::Command(cmd) = &r.action else { panic!("{r:?}") };
        assert_eq!(cmd.argv, ["/usr/bin/app-restart", "--graceful"]);
        assert_eq!(cmd.stdin.as_deref(), Some("value"));
        let h = api.health.as_ref().unwrap();
        assert_eq!((h.retries, h.interval, h.timeout), (3, Duration::from_millis(500), Duration::from_secs(1)));
        let HealthCheck::Http { url, status, body_contains, ca } = &h.check else { panic!() };
        assert_eq!((url.host.as_str(), url.port, url.path.as_str()), ("127.0.0.1", 8080, "/health?deep=1"));
        assert_eq!((*status, body_contains.as_ref().map(Expect::source)), (204, Some("ok")));
        assert!(!url.tls && ca.is_none());

        let db = c.secret("db").unwrap();
        assert_eq!(
            db.restart.as_ref().unwrap().action,
            RestartAction::Signal {
                pidfile: "/run/db.pid".into(),
                signal: nix::sys::signal::Signal::SIGUSR1,
                executable: "/usr/lib/postgresql/bin/postgres".into(),
            }
        );
        let h = db.health.as_ref().unwrap();
        assert_eq!((h.retries, h.interval, h.timeout), (5, Duration::from_secs(2), Duration::from_secs(5)));
        assert_eq!(h.check, HealthCheck::Tcp { address: "127.0.0.1:5432".into() });
        let svc = c.secret("svc").unwrap();
        assert_eq!(svc.restart.as_ref().unwrap().action, RestartAction::Systemd { unit: "svc.service".into() });
    }

    #[test]
    fn template_file_is_read_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.j2"), "KEY={{ value }}\n").unwrap();
        let p = dir.path().join("agent.toml");
        let text = "state_dir = 's'\n[[secret]]\nname = 'a'\n[[secret.file]]\npath = '/x/y'\nkind = 'template'\ntemplate_file = 't.j2'\n";
        let c = AgentConfig::from_str(&p, text).unwrap();
        assert!(
            matches!(&c.secrets[0].files[0].content, FileContent::Template { source } if source == "KEY={{ value }}\n")
        );
        let e = AgentConfig::from_str(&p, &text.replace("t.j2", "missing.j2")).unwrap_err().to_string();
        assert!(e.contains("field `secret[0].file[0].template_file`") && e.contains("missing.j2"), "{e}");
    }

    /// Every validation error names the file and the exact field.
    #[test]
    fn every_error_names_file_and_field() {
        let head = "state_dir = 's'\n[[secret]]\nname = 'a'\n";
        let file = |body: &str| format!("{head}[[secret.file]]\npath = '/etc/x'\n{body}\n");
        let restart = |body: &str| format!("{head}[secret.restart]\n{body}\n");
        let health = |body: &str| format!("{head}[secret.health]\n{body}\n");
        let cases: Vec<(String, &str, &str)> = vec![
            (file("kind = 'template'"), "secret[0].file[0].template", "required"),
            (file("kind = 'template'\ntemplate = '{{ value'"), "secret[0].file[0].template", "invalid template"),
            (file("kind = 'template'\ntemplate = 'x'\ntemplate_file = 'y'"), "secret[0].file[0].template", "not both"),
            (
                file("kind = 'replace'\ntemplate = 'x'"),
                "secret[0].file[0].template",
                "only valid with kind = \"template\"",
            ),
            (file("kind = 'template'\ntemplate = 'x'\nfield = 'v'"), "secret[0].file[0].field", "replace"),
            (file("kind = 'replace'\nkeys = { A = 'v' }"), "secret[0].file[0].keys", "env-file"),
            (file("kind = 'env-file'"), "secret[0].file[0].keys", "required"),
            (file("kind = 'env-file'\nkeys = {}"), "secret[0].file[0].keys", "at least one"),
            (file("kind = 'env-file'\nkeys = { '1A' = 'v' }"), "secret[0].file[0].keys.1A", "not a valid env-file key"),
            (file("kind = 'env-file'\nkeys = { A = '' }"), "secret[0].file[0].keys.A", "name of a field"),
            (file("kind = 'replace'\nmode = '0999'"), "secret[0].file[0].mode", "octal mode"),
            (file("kind = 'replace'\nmode = '10000'"), "secret[0].file[0].mode", "octal mode"),
            (file("kind = 'replace'\nowner = -1"), "secret[0].file[0].owner", "out of range"),
            (file("kind = 'replace'\ngroup = true"), "secret[0].file[0].group", "name, or a numeric id"),
            (file("kind = 'copy'"), "secret[0].file[0].kind", "unknown variant"),
            (file("kind = 'replace'\nmod = '0600'"), "secret[0].file[0].mod", "unknown field `mod`"),
            (file("path2 = 1"), "secret[0].file[0].path2", "unknown field `path2`"),
            (
                format!("{head}[[secret.file]]\npath = 'rel/x'\nkind = 'replace'\n"),
                "secret[0].file[0].path",
                "absolute path",
            ),
            (
                format!(
                    "{head}[[secret.file]]\npath = '/etc/x'\nkind = 'replace'\n[[secret]]\nname = 'b'\n[[secret.file]]\npath = '/etc/x'\nkind = 'replace'\n"
                ),
                "secret[1].file[0].path",
                "already declared by secret[0].file[0]",
            ),
            // The same file through `..`: compared after normalization.
            (
                format!(
                    "{head}[[secret.file]]\npath = '/etc/app/x.conf'\nkind = 'replace'\n[[secret]]\nname = 'b'\n[[secret.file]]\npath = '/etc/app/../app/./x.conf'\nkind = 'replace'\n"
                ),
                "secret[1].file[0].path",
                "/etc/app/x.conf is already declared by secret[0].file[0]",
            ),
            (file("kind = 'replace'\nfollow_symlinks = 'yes'"), "secret[0].file[0].follow_symlinks", "a boolean"),
            (restart("kind = 'systemd'"), "secret[0].restart.unit", "required"),
            (restart("kind = 'systemd'\nunit = '--now'"), "secret[0].restart.unit", "unit name"),
            (
                restart("kind = 'systemd'\nunit = 'a'\ncommand = ['x']"),
                "secret[0].restart.command",
                "kind = \"command\"",
            ),
            (restart("kind = 'command'"), "secret[0].restart.command", "required"),
            (restart("kind = 'command'\ncommand = []"), "secret[0].restart.command", "program and its arguments"),
            (
                restart("kind = 'command'\ncommand = ['x']\nenv = { 'A-B' = 'v' }"),
                "secret[0].restart.env.A-B",
                "variable name",
            ),
            (restart("kind = 'command'\ncommand = ['x']\nstdin = ''"), "secret[0].restart.stdin", "name of a field"),
            (restart("kind = 'command'\ncommand = ['x']\npidfile = '/p'"), "secret[0].restart.pidfile", "signal"),
            (
                restart("kind = 'command'\ncommand = ['x']\njitter = 'soon'"),
                "secret[0].restart.jitter",
                "invalid duration",
            ),
            (
                restart("kind = 'command'\ncommand = ['x']\ntimeout = 'x'"),
                "secret[0].restart.timeout",
                "invalid duration",
            ),
            (restart("kind = 'signal'"), "secret[0].restart.pidfile", "required"),
            (restart("kind = 'signal'\npidfile = 'x.pid'"), "secret[0].restart.pidfile", "absolute"),
            (restart("kind = 'signal'\npidfile = '/x.pid'"), "secret[0].restart.executable", "required"),
            (
                restart("kind = 'signal'\npidfile = '/x.pid'\nexecutable = 'bin/app'"),
                "secret[0].restart.executable",
                "absolute",
            ),
            (restart("kind = 'command'\ncommand = ['x']\nexecutable = '/x'"), "secret[0].restart.executable", "signal"),
            (
                restart("kind = 'signal'\npidfile = '/x.pid'\nsignal = 'KILL'"),
                "secret[0].restart.signal",
                "unknown signal",
            ),
            (restart("kind = 'reboot'"), "secret[0].restart.kind", "unknown variant"),
            (
                restart("kind = 'signal'\npidfile = '/x.pid'\nshell = 'sh'"),
                "secret[0].restart.shell",
                "unknown field `shell`",
            ),
            (health("kind = 'http'"), "secret[0].health.url", "required"),
            (health("kind = 'http'\nurl = 'ftp://x/'"), "secret[0].health.url", "http:// or https:// URL"),
            (
                health("kind = 'http'\nurl = 'http://x/'\nca_file = 'ca.pem'"),
                "secret[0].health.ca_file",
                "only valid with an https:// url",
            ),
            (
                health("kind = 'http'\nurl = 'https://x/'\nca_file = '/no/such/ca.pem'"),
                "secret[0].health.ca_file",
                "cannot read /no/such/ca.pem",
            ),
            (
                health("kind = 'http'\nurl = 'http://x/'\nbody_contains = 'key {{ secret_access_key }}'"),
                "secret[0].health.body_contains",
                "uses `secret_access_key`, which is not a public field: expected `version_id` or a field listed in this secret's public_fields (none is declared)",
            ),
            (
                health("kind = 'command'\ncommand = ['x']\noutput_contains = '{{ value }}'"),
                "secret[0].health.output_contains",
                "uses `value`, which is not a public field",
            ),
            (
                health("kind = 'tcp'\naddress = 'h:1'\noutput_contains = 'x'"),
                "secret[0].health.output_contains",
                "command",
            ),
            (
                health("kind = 'http'\nurl = 'http://x/'\nbody_contains = '{{ version_id'"),
                "secret[0].health.body_contains",
                "invalid template",
            ),
            (health("kind = 'http'\nurl = 'http://x/'\nstatus = 42"), "secret[0].health.status", "status code"),
            (health("kind = 'http'\nurl = 'http://x/'\naddress = 'a:1'"), "secret[0].health.address", "tcp"),
            (health("kind = 'tcp'\naddress = 'nohost'"), "secret[0].health.address", "HOST:PORT"),
            (health("kind = 'tcp'\naddress = 'h:1'\nurl = 'http://x/'"), "secret[0].health.url", "http"),
            (health("kind = 'command'\ncommand = ['x']\nretries = 0"), "secret[0].health.retries", "at least 1"),
            (
                health("kind = 'command'\ncommand = ['x']\ntimeout = '0s'"),
                "secret[0].health.timeout",
                "greater than zero",
            ),
            (
                health("kind = 'command'\ncommand = ['x']\ninterval = 'x'"),
                "secret[0].health.interval",
                "invalid duration",
            ),
            (health("kind = 'tcp'\naddress = 'h:1'\nstdin = 'v'"), "secret[0].health.stdin", "command"),
            (
                health("kind = 'tcp'\naddress = 'h:1'\ndeadline = '1s'"),
                "secret[0].health.deadline",
                "unknown field `deadline`",
            ),
        ];
        for (text, field, what) in cases {
            let e = err(&text);
            assert!(e.starts_with("/etc/rekey/agent.toml: "), "{e}\n--- for ---\n{text}");
            assert!(e.contains(&format!("field `{field}`")), "expected field {field} in: {e}\n--- for ---\n{text}");
            assert!(e.contains(what), "expected {what:?} in: {e}\n--- for ---\n{text}");
        }
    }
}

#[cfg(test)]
mod group_tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_str(Path::new("/etc/rekey/agent.toml"), &format!("state_dir = 's'\n{text}"))
    }

    fn secret(name: &str, restart: &str) -> String {
        format!("[[secret]]\nname = '{name}'\n[secret.restart]\n{restart}\n")
    }

    /// "Shares a restart": the same unit (`app` is `app.service`), the same
    /// command line, the same pidfile.
    #[test]
    fn restart_groups_follow_the_unit_the_command_or_the_pidfile() {
        let c = parse(
            &[
                secret("a", "kind = 'systemd'\nunit = 'app'"),
                secret("b", "kind = 'systemd'\nunit = 'app.service'"),
                secret("c", "kind = 'systemd'\nunit = 'app.socket'"),
                secret("d", "kind = 'command'\ncommand = ['/bin/restart', 'x']"),
                secret("e", "kind = 'command'\ncommand = ['/bin/restart', 'x']\ntimeout = '5s'"),
                secret("f", "kind = 'command'\ncommand = ['/bin/restart', 'y']"),
                secret("g", "kind = 'signal'\npidfile = '/run/x/../app.pid'\nexecutable = '/bin/app'"),
                secret("h", "kind = 'signal'\npidfile = '/run/app.pid'\nexecutable = '/bin/app'"),
                "[[secret]]\nname = 'i'\n[[secret]]\nname = 'j'\n".into(),
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(c.siblings("a"), ["b"]);
        assert_eq!(c.restart_group("a"), "systemd app.service");
        assert!(c.siblings("c").is_empty());
        assert_eq!(c.siblings("d"), ["e"]);
        assert!(c.siblings("f").is_empty());
        assert_eq!(c.siblings("h"), ["g"]);
        // No restart: a group of its own.
        assert!(c.siblings("i").is_empty() && c.restart_group("i") != c.restart_group("j"));
        assert_eq!(c.batch_window, DEFAULT_BATCH_WINDOW);
        assert_eq!(parse("[apply]\nbatch_window = '500ms'").unwrap().batch_window, Duration::from_millis(500));
    }

    #[test]
    fn a_shared_restart_that_depends_on_one_secret_is_refused() {
        for (text, field, what) in [
            (
                [
                    secret("a", "kind = 'command'\ncommand = ['/bin/r']"),
                    secret("b", "kind = 'command'\ncommand = ['/bin/r']\nenv = { K = 'value' }"),
                ]
                .concat(),
                "secret[1].restart.command",
                "secret[1] and secret[0] share this restart command, so it runs once for both; it cannot take a value from one secret's version (secret[1] sets env or stdin)",
            ),
            (
                [
                    secret("a", "kind = 'signal'\npidfile = '/p'\nexecutable = '/bin/x'"),
                    secret("b", "kind = 'signal'\npidfile = '/p'\nexecutable = '/bin/x'\nsignal = 'USR1'"),
                ]
                .concat(),
                "secret[1].restart.signal",
                "secret[0] signals the same pidfile with SIGHUP",
            ),
            (
                [
                    secret("a", "kind = 'signal'\npidfile = '/p'\nexecutable = '/bin/x'"),
                    secret("b", "kind = 'signal'\npidfile = '/p'\nexecutable = '/bin/y'"),
                ]
                .concat(),
                "secret[1].restart.executable",
                "secret[0] names /bin/x for the same pidfile",
            ),
            ("[apply]\nbatch_window = '2m'".into(), "apply.batch_window", "at most 60s"),
            ("[apply]\nbatch_window = 'soon'".into(), "apply.batch_window", "invalid duration"),
            ("[apply]\nwindow = '1s'".into(), "apply.window", "unknown field"),
            ("[[secret]]\nname = 'a'\npublic_fields = ['']".into(), "secret[0].public_fields[0]", "name of a field"),
            (
                "[[secret]]\nname = 'a'\npublic_fields = ['version_id']".into(),
                "secret[0].public_fields[0]",
                "always available",
            ),
        ] {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.starts_with("/etc/rekey/agent.toml: "), "{e}");
            assert!(e.contains(&format!("field `{field}`")), "expected field {field} in: {e}");
            assert!(e.contains(what), "expected {what:?} in: {e}");
        }
    }

    /// A health check may name the version id and the public fields, never
    /// another field.
    #[test]
    fn health_expectations_name_only_public_fields() {
        let c = parse(
            "[[secret]]\nname = 'aws'\npublic_fields = ['access_key_id']\n[secret.health]\nkind = 'http'\n\
             url = 'https://127.0.0.1:8443/whoami'\nbody_contains = '{{ access_key_id }} {{ version_id }}'\n",
        )
        .unwrap();
        let h = c.secret("aws").unwrap().health.as_ref().unwrap();
        let HealthCheck::Http { url, body_contains: Some(e), .. } = &h.check else { panic!("{h:?}") };
        assert!(url.tls && url.port == 8443);
        let fields = crate::pipeline::render::Fields::from_pairs([
            ("access_key_id", &b"AKIANEW"[..]),
            ("secret_access_key", &b"s3cr3t-s3cr3t"[..]),
        ]);
        assert_eq!(e.render("v2", &fields).unwrap(), "AKIANEW v2");
        let e = parse(
            "[[secret]]\nname = 'aws'\npublic_fields = ['access_key_id']\n[secret.health]\nkind = 'http'\n\
             url = 'http://x/'\nbody_contains = '{{ secret_access_key }}'\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("field `secret[0].health.body_contains`"), "{e}");
        assert!(e.contains("uses `secret_access_key`, which is not a public field: expected `version_id` or a field listed in this secret's public_fields (access_key_id)"), "{e}");
    }
}

#[cfg(test)]
mod scan_tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_str(Path::new("/etc/rekey/agent.toml"), &format!("state_dir = 's'\n{text}"))
    }

    #[test]
    fn scan_defaults_and_values() {
        assert_eq!(parse("").unwrap().scan, ScanConfig::default());
        let c = parse(
            "[scan]\nroots = ['/etc', '/opt/app', '/etc']\nmax_depth = 3\nmax_file_size = '512KiB'\nmax_files = 10\ntimeout = '5s'\n",
        )
        .unwrap();
        assert_eq!(c.scan.roots, vec![PathBuf::from("/etc"), PathBuf::from("/opt/app")]);
        assert_eq!(
            (c.scan.max_depth, c.scan.max_file_size, c.scan.max_files, c.scan.timeout),
            (3, 512 * 1024, 10, Duration::from_secs(5))
        );
        assert_eq!(parse("[scan]\nmax_file_size = 4096").unwrap().scan.max_file_size, 4096);
        assert_eq!(parse("[scan]\nmax_file_size = '2 MB'").unwrap().scan.max_file_size, 2_000_000);
    }

    #[test]
    fn scan_errors_name_file_and_field() {
        for (text, field, what) in [
            ("roots = ['etc']", "scan.roots[0]", "absolute path"),
            ("roots = ['/a', 'b']", "scan.roots[1]", "absolute path"),
            ("max_file_size = '1 parsec'", "scan.max_file_size", "unknown unit"),
            ("max_file_size = 'big'", "scan.max_file_size", "invalid size"),
            ("max_file_size = 0", "scan.max_file_size", "greater than zero"),
            ("max_file_size = '1GiB'", "scan.max_file_size", "at most 64MiB"),
            ("max_file_size = -1", "scan.max_file_size", "negative"),
            ("max_files = 0", "scan.max_files", "at least 1"),
            ("max_depth = 65", "scan.max_depth", "at most 64"),
            ("timeout = 'soon'", "scan.timeout", "invalid duration"),
            ("timeout = '0s'", "scan.timeout", "greater than zero"),
            ("timeout = '2h'", "scan.timeout", "at most 10m"),
            ("root = ['/etc']", "scan.root", "unknown field `root`"),
        ] {
            let e = parse(&format!("[scan]\n{text}\n")).unwrap_err().to_string();
            assert!(e.starts_with("/etc/rekey/agent.toml: "), "{e}");
            assert!(e.contains(&format!("field `{field}`")), "expected field {field} in: {e}");
            assert!(e.contains(what), "expected {what:?} in: {e}");
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("10kb"), Ok(10_000));
        assert_eq!(parse_size("7"), Ok(7));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// deploy/agent.toml is documentation people copy: it must parse.
    #[test]
    fn the_deploy_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/agent.toml");
        let c = AgentConfig::from_file(&path).unwrap();
        assert!(!c.secrets.is_empty());
        // It documents every kind of file, restart and health check.
        let files: BTreeSet<&str> = c.secrets.iter().flat_map(|s| &s.files).map(|f| f.content.kind()).collect();
        assert_eq!(files, BTreeSet::from(["env-file", "replace", "template"]));
        let restarts: BTreeSet<&str> = c
            .secrets
            .iter()
            .filter_map(|s| s.restart.as_ref())
            .map(|r| match r.action {
                RestartAction::Systemd { .. } => "systemd",
                RestartAction::Command(_) => "command",
                RestartAction::Signal { .. } => "signal",
            })
            .collect();
        assert_eq!(restarts.len(), 3, "{restarts:?}");
        let checks: BTreeSet<&str> = c
            .secrets
            .iter()
            .filter_map(|s| s.health.as_ref())
            .map(|h| match h.check {
                HealthCheck::Http { .. } => "http",
                HealthCheck::Tcp { .. } => "tcp",
                HealthCheck::Command { .. } => "command",
            })
            .collect();
        assert_eq!(checks.len(), 3, "{checks:?}");
    }

    /// The `[scan]` example is commented out (it names hosts' real paths):
    /// uncommented, it parses and says what it documents.
    #[test]
    fn the_deploy_scan_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/agent.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let block: Vec<&str> = text
            .lines()
            .skip_while(|l| l.trim() != "# [scan]")
            .take_while(|l| l.starts_with('#'))
            .map(|l| l.strip_prefix("# ").unwrap_or(""))
            .filter(|l| !l.starts_with(' ') && !l.is_empty())
            .collect();
        assert!(block.first() == Some(&"[scan]"), "no commented [scan] example in {}", path.display());
        let c = AgentConfig::from_str(&path, &format!("state_dir = 's'\n{}\n", block.join("\n"))).unwrap();
        assert!(!c.scan.roots.is_empty());
        assert_eq!(c.scan.max_depth, DEFAULT_SCAN_MAX_DEPTH);
        assert_eq!(c.scan.max_file_size, DEFAULT_SCAN_MAX_FILE_SIZE);
        assert_eq!(c.scan.max_files, DEFAULT_SCAN_MAX_FILES);
        assert_eq!(c.scan.timeout, DEFAULT_SCAN_TIMEOUT);
    }
}
