//! Scope scans: where do a secret's values occur across the fleet?
//!
//! [`prepare`] picks the versions to look for (the current one, a rotation's
//! new one, the old one while its value is still held — or only one of them)
//! and turns each field's value into a target: a keyed fingerprint
//! `HMAC-SHA256(salt, needle)` under a fresh per-scan salt, and the needle's
//! length. Values never leave the coordinator. [`PreparedScan::run`] asks
//! every connected agent — not only the consumers: the point is to find
//! copies nobody declared — and collects their `ScanResult`s until all
//! answered or the timeout passed. Only the secret's consumers (agents that
//! declare it and that its selector picks; they hold the value anyway) get
//! the targets. Every other agent gets a *blind* request — a fresh salt and
//! nothing else — and answers with the salted HMACs of its files' tokens;
//! [`match_blind`] (pure) matches them here against the targets, so no
//! non-consumer ever holds a fingerprint or a length it could test guesses of
//! a value against. [`build_map`] (pure) turns the answers,
//! the agent registry and the catalog into a [`ConsumerMap`]: host → file →
//! version (`current`, `new`, `old`), occurrences no agent config declares,
//! leftovers of an old version, hosts that declare the secret but do not have
//! it, hosts that did not answer.
//!
//! Tasks and channels: none of its own. A scan runs in the admin call (or the
//! tripwire) that asked for it, through a [`Scanner`] holding the handles a
//! scan needs; [`Scans`] is the registry of scans in flight (at most
//! [`MAX_IN_FLIGHT`]), each with a bounded channel (one slot per host asked)
//! that the agents' session tasks feed through [`Scans::deliver`].

use crate::config::Config;
use crate::engine::driver::is_consumer;
use crate::engine::machine::{Rotation, RotationState};
use crate::engine::state::{EngineState, SecretRecord, StateError};
use crate::sessions::Sessions;
use crate::store::{AgentRecord, Store, StoreError};
use rekey_common::time::now_unix_ms;
use rekey_proto::v1::{CoordinatorMessage, ScanMatch, ScanRequest, ScanResult, ScanTarget, coordinator_message};
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a scan waits for the agents unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// Scans in flight at once.
pub const MAX_IN_FLIGHT: usize = 8;
/// A value with delimiters is searched by its longest run without any, if
/// at least this long (shorter runs would match too much by chance).
pub const MIN_PARTIAL_NEEDLE: usize = 12;
/// The rules both sides apply (token delimiters, bounds), defined once.
use rekey_proto::scan::{
    DELIMITERS, MAX_MATCHES as MAX_MATCHES_PER_HOST, MAX_NEEDLE, MAX_SKIPPED_LISTED as MAX_SKIPPED_PER_HOST,
    MAX_TARGETS,
};

/// Below this estimate (length × log2 of the character classes used) a
/// searched value is flagged `weak` in the report.
pub const WEAK_BELOW_BITS: f64 = 80.0;

/// A rough upper bound of a value's entropy in bits: its length times log2 of
/// the size of the character classes it uses (lower case, upper case, digits,
/// other printable ASCII, other bytes).
pub fn entropy_estimate(value: &[u8]) -> f64 {
    let mut alphabet = 0u32;
    type Class = (fn(&u8) -> bool, u32);
    let classes: [Class; 5] = [
        (u8::is_ascii_lowercase, 26),
        (u8::is_ascii_uppercase, 26),
        (u8::is_ascii_digit, 10),
        (|b| b.is_ascii_graphic() && !b.is_ascii_alphanumeric(), 32),
        (|b| !b.is_ascii_graphic(), 162),
    ];
    for (is, size) in classes {
        if value.iter().any(is) {
            alphabet += size;
        }
    }
    if alphabet < 2 {
        return 0.0;
    }
    value.len() as f64 * f64::from(alphabet).log2()
}

/// The `weak` note of a searched value, if its estimate is under the floor.
/// Says nothing of the value but the estimate.
pub fn weakness(value: &[u8]) -> Option<String> {
    let bits = entropy_estimate(value);
    (bits < WEAK_BELOW_BITS).then(|| {
        format!(
            "about {} bits of entropy (estimated from length and character classes), under {WEAK_BELOW_BITS}: guessable; rotate to a stronger value",
            bits.floor()
        )
    })
}

/// The part a version plays for the secret at the time of the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// What the hosts should run now.
    Current,
    /// Being rolled out by the active rotation, not yet verified.
    New,
    /// Replaced by a rotation: any copy left is a leftover.
    Old,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Current => "current",
            Role::New => "new",
            Role::Old => "old",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("unknown secret {0:?} (see `rekey secrets`)")]
    UnknownSecret(String),
    #[error("unknown rotation {0:?} (see `rekey rotate list`)")]
    UnknownRotation(String),
    #[error("rotation {rotation} rotates {actual}, not {secret}")]
    WrongRotation { rotation: String, actual: String, secret: String },
    #[error("invalid version {0:?}: expected current, new or old")]
    BadFilter(String),
    #[error("timeout of {0}s is over the limit of {max}s", max = MAX_TIMEOUT.as_secs())]
    BadTimeout(u32),
    #[error("{secret} has no {role} version: {why}")]
    NoVersion { secret: String, role: Role, why: String },
    #[error("the old value of {secret} is no longer held by the coordinator (forgotten at revocation)")]
    OldValueForgotten { secret: String },
    #[error("the {role} value of {secret} (version {version}) is not held by the coordinator")]
    ValueNotHeld { secret: String, role: Role, version: String },
    #[error("nothing of {secret} can be searched for: {why}")]
    NothingSearchable { secret: String, why: String },
    #[error("{0} scans are already running; try again when one has finished")]
    TooManyScans(usize),
    #[error("cannot read the engine state")]
    State(#[from] StateError),
    #[error("cannot read the agent registry")]
    Store(#[from] StoreError),
    #[error("the system random number generator failed")]
    Random,
}

/// Which of the secret's versions to look for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Every version whose value the coordinator holds.
    All,
    Only(Role),
}

impl Filter {
    pub fn parse(s: &str) -> Result<Filter, ScopeError> {
        Ok(match s.trim() {
            "" | "all" => Filter::All,
            "current" => Filter::Only(Role::Current),
            "new" => Filter::Only(Role::New),
            "old" => Filter::Only(Role::Old),
            other => return Err(ScopeError::BadFilter(other.to_string())),
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Filter::All => "all",
            Filter::Only(r) => r.as_str(),
        }
    }
}

impl std::fmt::Display for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an operator asked for.
#[derive(Debug, Clone)]
pub struct Query {
    pub secret: String,
    pub filter: Filter,
    /// Look at this rotation rather than the active or last one.
    pub rotation: Option<String>,
    pub timeout: Duration,
}

impl Query {
    /// From the wire: an empty version means every version (or, with a
    /// rotation, that rotation's old version); a zero timeout the default.
    pub fn new(secret: String, version: &str, rotation: String, timeout_seconds: u32) -> Result<Query, ScopeError> {
        let rotation = Some(rotation).filter(|r| !r.trim().is_empty());
        let filter = match (Filter::parse(version)?, &rotation) {
            (Filter::All, Some(_)) if version.trim().is_empty() => Filter::Only(Role::Old),
            (f, _) => f,
        };
        let timeout = match timeout_seconds {
            0 => DEFAULT_TIMEOUT,
            n if u64::from(n) > MAX_TIMEOUT.as_secs() => return Err(ScopeError::BadTimeout(n)),
            n => Duration::from_secs(u64::from(n)),
        };
        Ok(Query { secret, filter, rotation, timeout })
    }
}

/// The versions of a secret with the part each plays, most relevant first.
/// `context` is the rotation the scan is about (the active one, the last
/// one, or one the operator named).
pub fn version_roles(rec: &SecretRecord, context: Option<&Rotation>) -> Vec<(Role, String)> {
    let mut out: Vec<(Role, String)> = Vec::new();
    let mut add = |role: Role, v: &Option<String>| {
        if let Some(v) = v
            && !out.iter().any(|(_, x)| x == v)
        {
            out.push((role, v.clone()));
        }
    };
    let current = &rec.current_version;
    match context {
        Some(r) if r.state.is_past_verification() => {
            // Every host confirmed the new version: it is what runs now, even
            // before the rotation completes and the record says so.
            let active = rec.active_rotation.as_deref() == Some(r.id.as_str());
            if active || r.new_version == *current {
                add(Role::Current, &r.new_version);
                add(Role::Old, &r.old_version);
            } else {
                // An earlier rotation: both its versions were replaced since.
                add(Role::Current, current);
                add(Role::Old, &r.old_version);
                add(Role::Old, &r.new_version);
            }
        }
        Some(r) if r.state == RotationState::Aborted => {
            add(Role::Current, current);
            add(Role::Old, &r.old_version);
        }
        Some(r) => {
            add(Role::Current, current);
            add(Role::Current, &r.old_version);
            add(Role::New, &r.new_version);
        }
        None => add(Role::Current, current),
    }
    out.sort_by_key(|(role, _)| *role);
    out
}

/// What is searched for one field of one version.
#[derive(Debug, PartialEq)]
pub enum Needle<'a> {
    Whole(&'a [u8]),
    /// The longest run of the value without a delimiter.
    Part(&'a [u8]),
    /// Cannot be searched, and why.
    Unsearchable(String),
}

pub fn needle(value: &[u8]) -> Needle<'_> {
    if value.is_empty() {
        return Needle::Unsearchable("empty value".into());
    }
    let longest = value.split(|b| DELIMITERS.contains(b)).max_by_key(|r| r.len()).unwrap_or(&[]);
    let n = if longest.len() == value.len() {
        Needle::Whole(value)
    } else if longest.len() >= MIN_PARTIAL_NEEDLE {
        Needle::Part(longest)
    } else {
        return Needle::Unsearchable(format!(
            "the value contains separator characters and no run of at least {MIN_PARTIAL_NEEDLE} bytes without them"
        ));
    };
    match n {
        Needle::Whole(b) | Needle::Part(b) if b.len() > MAX_NEEDLE => {
            Needle::Unsearchable(format!("longer than {MAX_NEEDLE} bytes"))
        }
        n => n,
    }
}

/// A version and field searched for.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Searched {
    pub version: String,
    pub role: Role,
    pub field: String,
    /// Only part of the value is searched (it contains separator characters).
    pub partial: bool,
    /// The value looks guessable (low estimated entropy), and why.
    pub weak: Option<String>,
}

/// A version or field not searched for, and why.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NotSearched {
    pub version: String,
    pub role: Role,
    pub field: Option<String>,
    pub reason: String,
}

/// One place a value was found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Occurrence {
    pub host: String,
    pub path: String,
    pub line: u32,
    pub version: String,
    pub role: Role,
    pub field: String,
    /// The host's agent.toml declares this path for this secret.
    pub declared: bool,
    pub partial: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileVersion {
    pub version: String,
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Line {
    pub line: u32,
    pub version: String,
    pub role: Role,
    pub field: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileScope {
    pub path: String,
    pub declared: bool,
    pub versions: Vec<FileVersion>,
    pub lines: Vec<Line>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostStatus {
    Answered,
    /// The agent answered that it could not scan.
    Error,
    /// Not connected, not reachable, or no answer before the timeout.
    NotAnswering,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HostScope {
    pub host: String,
    pub labels: BTreeMap<String, String>,
    pub connected: bool,
    pub status: HostStatus,
    /// Why the host did not answer, or what it answered instead of a scan.
    pub error: Option<String>,
    /// Its agent.toml declares the secret.
    pub declares_secret: bool,
    /// The catalog's selector picks it.
    pub selected: bool,
    /// It declares the secret, answered, and no declared file holds a searched version.
    pub declared_not_found: bool,
    pub files: Vec<FileScope>,
    pub files_scanned: u64,
    pub bytes_scanned: u64,
    pub skipped: BTreeMap<String, u64>,
    pub skipped_files: Vec<Skipped>,
    pub truncated: bool,
    pub limit: Option<String>,
    pub elapsed_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Summary {
    pub hosts_asked: usize,
    pub answered: usize,
    pub not_answering: Vec<String>,
    pub errors: Vec<String>,
    pub hosts_with_value: Vec<String>,
    pub occurrences: usize,
    pub undeclared: usize,
    pub leftovers: usize,
    pub declared_not_found: Vec<String>,
    pub truncated: Vec<String>,
}

/// Where a secret's values are: the answer of `rekey scope`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ConsumerMap {
    pub scan_id: String,
    pub secret: String,
    /// `all`, `current`, `new` or `old`.
    pub filter: String,
    /// The rotation whose versions were looked at, if any.
    pub rotation: Option<String>,
    /// Only old versions were searched: every occurrence is a leftover.
    pub leftover_scan: bool,
    pub started_ms: i64,
    pub elapsed_ms: u64,
    pub timeout_seconds: u64,
    pub searched: Vec<Searched>,
    pub not_searched: Vec<NotSearched>,
    pub hosts: Vec<HostScope>,
    /// Every occurrence in a file no agent config declares for the secret.
    pub undeclared: Vec<Occurrence>,
    /// Every occurrence of an old version.
    pub leftovers: Vec<Occurrence>,
    pub summary: Summary,
}

/// One slot per host asked; the first answer of each host is kept.
struct InFlight {
    waiting: BTreeSet<String>,
    tx: mpsc::Sender<(String, ScanResult)>,
}

/// The registry of scans in flight, shared with the agents' sessions.
#[derive(Clone, Default)]
pub struct Scans {
    inner: Arc<Mutex<HashMap<String, InFlight>>>,
}

/// Removes its scan from the registry when dropped (however the scan ends).
struct Registration {
    scans: Scans,
    id: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.scans.inner.lock().expect("scans lock").remove(&self.id);
    }
}

impl Scans {
    fn register(
        &self,
        id: &str,
        hosts: &BTreeSet<String>,
    ) -> Result<(Registration, mpsc::Receiver<(String, ScanResult)>), ScopeError> {
        let mut map = self.inner.lock().expect("scans lock");
        if map.len() >= MAX_IN_FLIGHT {
            return Err(ScopeError::TooManyScans(map.len()));
        }
        let (tx, rx) = mpsc::channel(hosts.len().max(1));
        map.insert(id.to_string(), InFlight { waiting: hosts.clone(), tx });
        Ok((Registration { scans: self.clone(), id: id.to_string() }, rx))
    }

    /// An agent's answer: routed to the scan that asked it, once; an answer
    /// nobody waits for (late, duplicate, unknown scan, host not asked) is dropped.
    pub fn deliver(&self, host: &str, result: ScanResult) {
        let mut map = self.inner.lock().expect("scans lock");
        let Some(scan) = map.get_mut(&result.scan_id) else {
            tracing::info!(agent = %host, scan = %result.scan_id, "scan result for no scan in flight dropped");
            return;
        };
        if !scan.waiting.remove(host) {
            tracing::warn!(agent = %host, scan = %result.scan_id, "unexpected scan result dropped");
            return;
        }
        // One slot per host asked, each used once: this cannot be full.
        let _ = scan.tx.try_send((host.to_string(), result));
    }

    pub fn in_flight(&self) -> usize {
        self.inner.lock().expect("scans lock").len()
    }
}

/// A scan ready to send: what it looks for and whom it asks.
pub struct PreparedScan {
    pub id: String,
    pub query: Query,
    pub rotation: Option<String>,
    pub hosts_asked: Vec<String>,
    pub searched: Vec<Searched>,
    pub not_searched: Vec<NotSearched>,
    /// For the consumers: the targets (they hold the values anyway).
    request: ScanRequest,
    /// For everyone else: the salt only.
    blind: ScanRequest,
    /// Hosts asked that get the targeted request.
    consumers: BTreeSet<String>,
    agents: Vec<AgentRecord>,
    selector: BTreeMap<String, String>,
}

fn random_bytes(n: usize) -> Result<Vec<u8>, ScopeError> {
    let mut b = vec![0u8; n];
    SystemRandom::new().fill(&mut b).map_err(|_| ScopeError::Random)?;
    Ok(b)
}

/// What a scan needs: the catalog, the engine's state (versions, rotations),
/// the agent registry, the live sessions and the registry of scans in flight.
/// Cheap to clone.
#[derive(Clone)]
pub struct Scanner {
    config: Arc<Config>,
    state: EngineState,
    store: Store,
    sessions: Sessions,
    scans: Scans,
}

impl Scanner {
    pub fn new(config: Arc<Config>, state: EngineState, store: Store, sessions: Sessions) -> Scanner {
        Scanner { config, state, store, sessions, scans: Scans::default() }
    }

    /// The registry the agents' sessions deliver scan results to.
    pub fn scans(&self) -> &Scans {
        &self.scans
    }

    /// Chooses the versions, reads their values (sealed store), computes the
    /// targets, and lists the hosts to ask. Sends nothing.
    pub fn prepare(&self, query: &Query) -> Result<PreparedScan, ScopeError> {
        prepare(self, query)
    }

    /// Prepares and runs a scan in one go.
    pub async fn run(&self, query: &Query) -> Result<ConsumerMap, ScopeError> {
        prepare(self, query)?.run(self).await
    }
}

fn prepare(scanner: &Scanner, query: &Query) -> Result<PreparedScan, ScopeError> {
    let secret = &query.secret;
    let spec = scanner.config.secret(secret).ok_or_else(|| ScopeError::UnknownSecret(secret.clone()))?;
    let state = &scanner.state;
    let rec = state.get_secret(secret)?;
    let context = scan_context(state, query, &rec)?;
    let chosen = chosen_versions(query, &rec, context.as_ref())?;
    let salt = random_bytes(32)?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &salt);
    let Targets { targets, searched, not_searched } = build_targets(state, query, &chosen, &key)?;

    let agents: Vec<AgentRecord> =
        scanner.store.list_agents()?.into_iter().filter(|a| a.revoked_unix.is_none()).collect();
    let mut hosts_asked: Vec<String> =
        agents.iter().filter(|a| scanner.sessions.is_connected(&a.name)).map(|a| a.name.clone()).collect();
    hosts_asked.sort();
    let id = format!("scan-{}", hex::encode(random_bytes(6)?));
    // The agents stop a little before the coordinator does, so a truncated
    // answer still arrives.
    let margin = (query.timeout / 5).min(Duration::from_secs(2));
    let timeout_ms = (query.timeout - margin).as_millis() as u64;
    let blind = ScanRequest { scan_id: id.clone(), salt: salt.clone(), targets: Vec::new(), timeout_ms, blind: true };
    let request = ScanRequest { scan_id: id.clone(), salt, targets, timeout_ms, blind: false };
    let consumers = agents.iter().filter(|a| is_consumer(a, spec)).map(|a| a.name.clone()).collect();
    Ok(PreparedScan {
        id,
        query: query.clone(),
        rotation: context.map(|r| r.id),
        hosts_asked,
        searched,
        not_searched,
        request,
        blind,
        consumers,
        agents,
        selector: spec.selector.clone(),
    })
}

/// The rotation whose versions a scan looks at: the one asked for, else the
/// secret's active or last one.
fn scan_context(state: &EngineState, query: &Query, rec: &SecretRecord) -> Result<Option<Rotation>, ScopeError> {
    let secret = &query.secret;
    Ok(match &query.rotation {
        Some(id) => {
            let r = state.get_rotation(id)?.ok_or_else(|| ScopeError::UnknownRotation(id.clone()))?;
            if r.secret != *secret {
                return Err(ScopeError::WrongRotation {
                    rotation: id.clone(),
                    actual: r.secret,
                    secret: secret.clone(),
                });
            }
            Some(r)
        }
        None => match rec.active_rotation.as_ref().or(rec.last_rotation.as_ref()) {
            Some(id) => state.get_rotation(id)?,
            None => None,
        },
    })
}

/// The (role, version) pairs to look for, after the query's filter.
fn chosen_versions(
    query: &Query,
    rec: &SecretRecord,
    context: Option<&Rotation>,
) -> Result<Vec<(Role, String)>, ScopeError> {
    let secret = &query.secret;
    let roles = version_roles(rec, context);
    let chosen: Vec<(Role, String)> = match query.filter {
        Filter::All => roles,
        Filter::Only(role) => roles.into_iter().filter(|(r, _)| *r == role).collect(),
    };
    if chosen.is_empty() {
        let role = match query.filter {
            Filter::Only(r) => r,
            Filter::All => Role::Current,
        };
        let why = match (role, context) {
            (Role::New, _) => "no rotation of it is rolling out".to_string(),
            (Role::Old, None) => "it was never rotated".to_string(),
            (Role::Old, Some(r)) => format!("rotation {} is {}", r.id, r.state.as_str()),
            (Role::Current, _) => "it was never rotated: start a rotation to give it one".to_string(),
        };
        return Err(ScopeError::NoVersion { secret: secret.clone(), role, why });
    }
    Ok(chosen)
}

/// Why no field of the chosen versions can be searched, for the error.
fn why_nothing(not_searched: &[NotSearched]) -> String {
    not_searched
        .iter()
        .map(|n| match &n.field {
            Some(f) => format!("{} ({}) field {f}: {}", n.version, n.role, n.reason),
            None => format!("{} ({}): {}", n.version, n.role, n.reason),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// What a scan sends (fingerprints and lengths) and what it reports as
/// searched or not.
struct Targets {
    targets: Vec<ScanTarget>,
    searched: Vec<Searched>,
    not_searched: Vec<NotSearched>,
}

fn build_targets(
    state: &EngineState,
    query: &Query,
    chosen: &[(Role, String)],
    key: &ring::hmac::Key,
) -> Result<Targets, ScopeError> {
    let secret = &query.secret;
    let mut targets = Vec::new();
    let mut searched = Vec::new();
    let mut not_searched = Vec::new();
    for (role, version) in chosen {
        let Some(fields) = state.get_version(secret, version)? else {
            match (query.filter, role) {
                (Filter::Only(_), Role::Old) => return Err(ScopeError::OldValueForgotten { secret: secret.clone() }),
                (Filter::Only(_), _) => {
                    return Err(ScopeError::ValueNotHeld {
                        secret: secret.clone(),
                        role: *role,
                        version: version.clone(),
                    });
                }
                _ => {}
            }
            let reason = if *role == Role::Old {
                "the old value is no longer held by the coordinator (forgotten at revocation)"
            } else {
                "the value is not held by the coordinator"
            };
            not_searched.push(NotSearched {
                version: version.clone(),
                role: *role,
                field: None,
                reason: reason.into(),
            });
            continue;
        };
        for (field, value) in &fields {
            let (bytes, partial) = match needle(value.expose()) {
                Needle::Whole(b) => (b, false),
                Needle::Part(b) => (b, true),
                Needle::Unsearchable(reason) => {
                    not_searched.push(NotSearched {
                        version: version.clone(),
                        role: *role,
                        field: Some(field.clone()),
                        reason,
                    });
                    continue;
                }
            };
            if targets.len() >= MAX_TARGETS {
                not_searched.push(NotSearched {
                    version: version.clone(),
                    role: *role,
                    field: Some(field.clone()),
                    reason: format!("more than {MAX_TARGETS} fields in one scan"),
                });
                continue;
            }
            targets.push(ScanTarget {
                secret: secret.clone(),
                version_id: version.clone(),
                field: field.clone(),
                fingerprint: hex::encode(ring::hmac::sign(key, bytes).as_ref()),
                length: bytes.len() as u32,
            });
            let weak = weakness(value.expose());
            searched.push(Searched { version: version.clone(), role: *role, field: field.clone(), partial, weak });
        }
    }
    if targets.is_empty() {
        return Err(ScopeError::NothingSearchable { secret: secret.clone(), why: why_nothing(&not_searched) });
    }
    Ok(Targets { targets, searched, not_searched })
}

impl PreparedScan {
    /// Asks every host, waits for the answers (bounded by the query's
    /// timeout), and builds the consumer map.
    pub async fn run(self, scanner: &Scanner) -> Result<ConsumerMap, ScopeError> {
        let started_ms = now_unix_ms();
        let started = tokio::time::Instant::now();
        let deadline = started + self.query.timeout;
        let asked: BTreeSet<String> = self.hosts_asked.iter().cloned().collect();
        let (_registration, mut rx) = scanner.scans.register(&self.id, &asked)?;
        let mut unreachable: BTreeMap<String, String> = BTreeMap::new();
        let mut waiting = asked.clone();
        for host in &asked {
            let req = if self.consumers.contains(host) { &self.request } else { &self.blind };
            let msg = CoordinatorMessage { msg: Some(coordinator_message::Msg::Scan(req.clone())) };
            if let Err(e) = scanner.sessions.send(host, msg) {
                waiting.remove(host);
                unreachable.insert(host.clone(), e.to_string());
            }
        }
        tracing::info!(
            scan = %self.id,
            secret = %self.query.secret,
            targets = self.request.targets.len(),
            hosts = waiting.len(),
            targeted = waiting.iter().filter(|h| self.consumers.contains(*h)).count(),
            "scope scan sent"
        );
        let mut answers: BTreeMap<String, ScanResult> = BTreeMap::new();
        while !waiting.is_empty() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((host, mut result))) => {
                    waiting.remove(&host);
                    if self.consumers.contains(&host) {
                        result.blind_files.clear();
                    } else {
                        // It had no targets: any match it claims is made up.
                        result.matches.clear();
                        match_blind(&self.query.secret, &self.request.targets, &mut result);
                    }
                    answers.insert(host, result);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let timeout_s = self.query.timeout.as_secs();
        for host in waiting {
            unreachable.insert(host, format!("no answer within {timeout_s}s"));
        }
        let map = build_map(Inputs {
            scan_id: &self.id,
            secret: &self.query.secret,
            filter: self.query.filter,
            rotation: self.rotation.as_deref(),
            started_ms,
            elapsed_ms: started.elapsed().as_millis() as u64,
            timeout_seconds: timeout_s,
            searched: &self.searched,
            not_searched: &self.not_searched,
            agents: &self.agents,
            connected: &|h| scanner.sessions.is_connected(h),
            selector: &self.selector,
            answers,
            unreachable,
        });
        tracing::info!(
            scan = %self.id,
            answered = map.summary.answered,
            not_answering = map.summary.not_answering.len(),
            occurrences = map.summary.occurrences,
            undeclared = map.summary.undeclared,
            leftovers = map.summary.leftovers,
            "scope scan finished"
        );
        Ok(map)
    }
}

/// A blind answer matched here: every token whose salted HMAC is a
/// target's fingerprint becomes a match (path, line, version, field;
/// `declared` if the host declares the file for `secret`), bounded like an
/// agent's own matches. Empties `result.blind_files`. Pure.
pub fn match_blind(secret: &str, targets: &[ScanTarget], result: &mut ScanResult) {
    let mut index: HashMap<Vec<u8>, Vec<&ScanTarget>> = HashMap::new();
    for t in targets {
        if let Ok(tag) = hex::decode(&t.fingerprint) {
            index.entry(tag).or_default().push(t);
        }
    }
    let mut matches = Vec::new();
    let mut full = false;
    'files: for file in std::mem::take(&mut result.blind_files) {
        let declared = file.declared_for.iter().any(|s| s == secret);
        for token in &file.tokens {
            let Some(found) = index.get(&token.tag) else { continue };
            for t in found {
                if matches.len() >= MAX_MATCHES_PER_HOST {
                    full = true;
                    break 'files;
                }
                matches.push(ScanMatch {
                    path: file.path.clone(),
                    line: token.line,
                    secret: secret.to_string(),
                    version_id: t.version_id.clone(),
                    field: t.field.clone(),
                    declared,
                });
            }
        }
    }
    matches.sort_by(|a, b| (&a.path, a.line).cmp(&(&b.path, b.line)));
    result.matches = matches;
    if full {
        result.truncated = true;
        let limit = format!("max_matches {MAX_MATCHES_PER_HOST}");
        result.limit = if result.limit.is_empty() { limit } else { format!("{}, {limit}", result.limit) };
    }
}

/// Occurrences named in the audit record of a scan's outcome.
const AUDIT_OCCURRENCES: usize = 50;

/// What the audit log keeps of a scan's outcome: counts, the hosts that did
/// not answer, and where undeclared copies and leftovers are (bounded).
/// Paths and versions only — never a value or a fingerprint.
pub fn audit_summary(map: &ConsumerMap) -> serde_json::Value {
    let place = |o: &Occurrence| serde_json::json!({ "host": o.host, "path": o.path, "line": o.line, "version": o.version, "role": o.role });
    serde_json::json!({
        "scan": map.scan_id,
        "secret": map.secret,
        "answered": map.summary.answered,
        "not_answering": map.summary.not_answering,
        "errors": map.summary.errors,
        "hosts_with_value": map.summary.hosts_with_value,
        "occurrences": map.summary.occurrences,
        "undeclared": map.undeclared.iter().take(AUDIT_OCCURRENCES).map(place).collect::<Vec<_>>(),
        "undeclared_count": map.summary.undeclared,
        "leftovers": map.leftovers.iter().take(AUDIT_OCCURRENCES).map(place).collect::<Vec<_>>(),
        "leftover_count": map.summary.leftovers,
        "declared_not_found": map.summary.declared_not_found,
        "truncated": map.summary.truncated,
    })
}

/// Everything [`build_map`] needs.
pub struct Inputs<'a> {
    pub scan_id: &'a str,
    pub secret: &'a str,
    pub filter: Filter,
    pub rotation: Option<&'a str>,
    pub started_ms: i64,
    pub elapsed_ms: u64,
    pub timeout_seconds: u64,
    pub searched: &'a [Searched],
    pub not_searched: &'a [NotSearched],
    /// The registry (revoked agents left out).
    pub agents: &'a [AgentRecord],
    pub connected: &'a dyn Fn(&str) -> bool,
    pub selector: &'a BTreeMap<String, String>,
    pub answers: BTreeMap<String, ScanResult>,
    /// Hosts asked that could not be reached or did not answer, and why.
    pub unreachable: BTreeMap<String, String>,
}

/// The consumer map from the agents' answers (pure).
pub fn build_map(mut i: Inputs<'_>) -> ConsumerMap {
    let leftover_scan = i.filter == Filter::Only(Role::Old);
    // What was asked: an agent's match for anything else is ignored.
    let asked: HashMap<(&str, &str), &Searched> =
        i.searched.iter().map(|s| ((s.version.as_str(), s.field.as_str()), s)).collect();
    let mut hosts = Vec::new();
    let mut undeclared = Vec::new();
    let mut leftovers = Vec::new();
    let mut summary = Summary::default();
    let mut agents: Vec<&AgentRecord> = i.agents.iter().collect();
    agents.sort_by(|a, b| a.name.cmp(&b.name));
    for a in agents {
        let connected = (i.connected)(&a.name);
        let declares_secret = a.secrets.iter().any(|s| s == i.secret);
        let selected = i.selector.iter().all(|(k, v)| a.labels.get(k) == Some(v));
        let mut h = HostScope::unasked(a, connected, declares_secret, selected);
        let answer = i.answers.remove(&a.name);
        match (answer, i.unreachable.get(&a.name)) {
            (Some(r), _) if !r.error.is_empty() => {
                summary.hosts_asked += 1;
                h.status = HostStatus::Error;
                h.error = Some(r.error);
                summary.errors.push(a.name.clone());
            }
            (Some(r), _) => {
                summary.hosts_asked += 1;
                summary.answered += 1;
                let matches = record_answer(&mut h, r, &mut summary);
                let (files, occurrences) = host_files(&a.name, i.secret, matches, &asked);
                h.files = files;
                summary.occurrences += occurrences.len();
                for occ in occurrences {
                    if !occ.declared {
                        undeclared.push(occ.clone());
                    }
                    if occ.role == Role::Old {
                        leftovers.push(occ);
                    }
                }
                if !h.files.is_empty() {
                    summary.hosts_with_value.push(a.name.clone());
                }
                h.declared_not_found = declares_secret && !leftover_scan && !h.files.iter().any(|f| f.declared);
                if h.declared_not_found {
                    summary.declared_not_found.push(a.name.clone());
                }
            }
            (None, Some(why)) => {
                summary.hosts_asked += 1;
                h.error = Some(why.clone());
                summary.not_answering.push(a.name.clone());
            }
            (None, None) => {
                h.error = Some("not connected".into());
                summary.not_answering.push(a.name.clone());
            }
        }
        hosts.push(h);
    }
    summary.undeclared = undeclared.len();
    summary.leftovers = leftovers.len();
    ConsumerMap {
        scan_id: i.scan_id.to_string(),
        secret: i.secret.to_string(),
        filter: i.filter.as_str().to_string(),
        rotation: i.rotation.map(str::to_string),
        leftover_scan,
        started_ms: i.started_ms,
        elapsed_ms: i.elapsed_ms,
        timeout_seconds: i.timeout_seconds,
        searched: i.searched.to_vec(),
        not_searched: i.not_searched.to_vec(),
        hosts,
        undeclared,
        leftovers,
        summary,
    }
}

impl HostScope {
    /// A host's entry before its answer is looked at.
    fn unasked(a: &AgentRecord, connected: bool, declares_secret: bool, selected: bool) -> HostScope {
        HostScope {
            host: a.name.clone(),
            labels: a.labels.clone(),
            connected,
            status: HostStatus::NotAnswering,
            error: None,
            declares_secret,
            selected,
            declared_not_found: false,
            files: Vec::new(),
            files_scanned: 0,
            bytes_scanned: 0,
            skipped: BTreeMap::new(),
            skipped_files: Vec::new(),
            truncated: false,
            limit: None,
            elapsed_ms: None,
        }
    }
}

/// Copies an answer's counters into the host's entry; returns its matches
/// (bounded).
fn record_answer(h: &mut HostScope, r: ScanResult, summary: &mut Summary) -> Vec<ScanMatch> {
    h.status = HostStatus::Answered;
    h.files_scanned = r.files_scanned;
    h.bytes_scanned = r.bytes_scanned;
    h.skipped = r.skipped_counts.into_iter().collect();
    h.skipped_files = r
        .skipped
        .into_iter()
        .take(MAX_SKIPPED_PER_HOST)
        .map(|s| Skipped { path: s.path, reason: s.reason, detail: s.detail })
        .collect();
    h.truncated = r.truncated || r.matches.len() > MAX_MATCHES_PER_HOST;
    h.limit = Some(r.limit).filter(|l| !l.is_empty());
    h.elapsed_ms = Some(r.elapsed_ms);
    if h.truncated {
        summary.truncated.push(h.host.clone());
    }
    r.matches.into_iter().take(MAX_MATCHES_PER_HOST).collect()
}

/// A host's files holding what was asked (other matches are ignored), and
/// every occurrence in them.
fn host_files(
    host: &str,
    secret: &str,
    matches: Vec<ScanMatch>,
    asked: &HashMap<(&str, &str), &Searched>,
) -> (Vec<FileScope>, Vec<Occurrence>) {
    let mut files: BTreeMap<String, FileScope> = BTreeMap::new();
    let mut occurrences = Vec::new();
    for m in matches {
        if m.secret != secret {
            continue;
        }
        let Some(s) = asked.get(&(m.version_id.as_str(), m.field.as_str())) else { continue };
        let f = files.entry(m.path.clone()).or_insert_with(|| FileScope {
            path: m.path.clone(),
            declared: m.declared,
            versions: Vec::new(),
            lines: Vec::new(),
        });
        f.declared |= m.declared;
        if !f.versions.iter().any(|v| v.version == s.version) {
            f.versions.push(FileVersion { version: s.version.clone(), role: s.role });
        }
        f.lines.push(Line { line: m.line, version: s.version.clone(), role: s.role, field: s.field.clone() });
        occurrences.push(Occurrence {
            host: host.to_string(),
            path: m.path,
            line: m.line,
            version: s.version.clone(),
            role: s.role,
            field: s.field.clone(),
            declared: m.declared,
            partial: s.partial,
        });
    }
    let mut files: Vec<FileScope> = files.into_values().collect();
    for f in &mut files {
        f.lines.sort_by_key(|l| l.line);
        f.versions.sort_by_key(|v| v.role);
    }
    (files, occurrences)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rekey_proto::v1::{ScanMatch, ScanSkip};

    fn rotation(state: RotationState, old: Option<&str>, new: Option<&str>) -> Rotation {
        let policy = crate::engine::machine::Policy::default();
        let mut r = Rotation::new("rot-1".into(), "api".into(), "op".into(), policy, None, Vec::new(), "00".into(), 0);
        r.state = state;
        r.old_version = old.map(str::to_string);
        r.new_version = new.map(str::to_string);
        r
    }

    fn rec(current: Option<&str>, active: Option<&str>) -> SecretRecord {
        SecretRecord {
            name: "api".into(),
            current_version: current.map(str::to_string),
            active_rotation: active.map(str::to_string),
            last_rotation: Some("rot-1".into()),
            last_completed_ms: None,
        }
    }

    fn roles(v: Vec<(Role, String)>) -> Vec<String> {
        v.into_iter().map(|(r, s)| format!("{r} {s}")).collect()
    }

    /// What the coordinator would send a consumer for `value`, and what a
    /// blind agent would answer for `lines` of one file.
    fn blind_case(value: &[u8], path: &str, declared_for: &[&str], lines: &[&[u8]]) -> (Vec<ScanTarget>, ScanResult) {
        let salt = b"per-scan-salt-of-32-bytes-......";
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, salt);
        let bytes = match needle(value) {
            Needle::Whole(b) | Needle::Part(b) => b,
            Needle::Unsearchable(r) => panic!("{r}"),
        };
        let target = ScanTarget {
            secret: "api".into(),
            version_id: "v1".into(),
            field: "value".into(),
            fingerprint: hex::encode(ring::hmac::sign(&key, bytes).as_ref()),
            length: bytes.len() as u32,
        };
        // The agent's side of a blind scan: whole tokens, each once per file.
        let mut tokens = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, line) in lines.iter().enumerate() {
            for t in line.split(|b| DELIMITERS.contains(b)) {
                if t.len() >= rekey_proto::scan::MIN_BLIND_TOKEN && seen.insert(t.to_vec()) {
                    tokens.push(rekey_proto::v1::BlindToken {
                        tag: ring::hmac::sign(&key, t).as_ref().to_vec(),
                        line: i as u32 + 1,
                    });
                }
            }
        }
        let file = rekey_proto::v1::BlindFile {
            path: path.into(),
            declared_for: declared_for.iter().map(|s| s.to_string()).collect(),
            tokens,
        };
        (vec![target], ScanResult { scan_id: "scan-1".into(), blind_files: vec![file], ..Default::default() })
    }

    #[test]
    fn blind_answers_are_matched_by_the_coordinator_whole_and_partial() {
        let value = b"tok_9f8e7d6c5b4a39281706";
        let (targets, mut r) =
            blind_case(value, "/tmp/leak.txt", &[], &[b"nothing here at all", b"KEY=\"tok_9f8e7d6c5b4a39281706\""]);
        match_blind("api", &targets, &mut r);
        assert!(r.blind_files.is_empty() && !r.truncated);
        assert_eq!(
            r.matches,
            vec![ScanMatch {
                path: "/tmp/leak.txt".into(),
                line: 2,
                secret: "api".into(),
                version_id: "v1".into(),
                field: "value".into(),
                declared: false,
            }]
        );
        // A value with separators is matched by its longest run (the
        // partial-needle rule), in a file the host declares for the secret.
        let value = b"user:abcdefghijklmnopqrstu";
        let (targets, mut r) =
            blind_case(value, "/etc/app.env", &["api"], &[b"x", b"x", b"DSN=user:abcdefghijklmnopqrstu"]);
        match_blind("api", &targets, &mut r);
        assert_eq!(r.matches.len(), 1);
        assert_eq!((r.matches[0].line, r.matches[0].declared), (3, true));
        // Another value, or the same under another salt, matches nothing.
        let (targets, mut r) = blind_case(b"tok_other_value_1234", "/tmp/x", &[], &[b"tok_9f8e7d6c5b4a39281706"]);
        match_blind("api", &targets, &mut r);
        assert!(r.matches.is_empty());
        let (_, mut r) = blind_case(value, "/tmp/x", &[], &[b"abcdefghijklmnopqrstu"]);
        let other_salt = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"another-salt-of-32-bytes-.......");
        let t = ScanTarget {
            fingerprint: hex::encode(ring::hmac::sign(&other_salt, b"abcdefghijklmnopqrstu").as_ref()),
            ..Default::default()
        };
        match_blind("api", &[t], &mut r);
        assert!(r.matches.is_empty());
    }

    #[test]
    fn blind_matches_are_bounded() {
        let line = b"tok_9f8e7d6c5b4a39281706";
        let lines: Vec<&[u8]> = vec![line; 3];
        let (targets, mut r) = blind_case(line, "/a", &[], &lines);
        // One file's tokens are distinct; many files can hold the value.
        let file = r.blind_files[0].clone();
        r.blind_files = (0..MAX_MATCHES_PER_HOST + 5)
            .map(|i| rekey_proto::v1::BlindFile { path: format!("/f{i:04}"), ..file.clone() })
            .collect();
        match_blind("api", &targets, &mut r);
        assert_eq!(r.matches.len(), MAX_MATCHES_PER_HOST);
        assert!(r.truncated && r.limit.contains("max_matches"), "{}", r.limit);
    }

    #[test]
    fn weak_values_are_flagged_without_the_value() {
        assert!(weakness(b"hunter22").is_some());
        assert!(weakness(b"Summer2024!").is_some());
        let w = weakness(b"hunter22").unwrap();
        assert!(!w.contains("hunter"), "{w}");
        assert!(weakness(b"tok_9f8e7d6c5b4a39281706").is_none());
        assert!(weakness(b"AKIAEXAMPLEEXAMPLE12wJalrXUtnFEMI").is_none());
    }

    #[test]
    fn roles_follow_the_rotation() {
        use RotationState as S;
        // Never rotated.
        assert!(version_roles(&rec(None, None), None).is_empty());
        // First rotation rolling out: only a new version.
        let r = rotation(S::RollingOut, None, Some("v1"));
        assert_eq!(roles(version_roles(&rec(None, Some("rot-1")), Some(&r))), vec!["new v1"]);
        // Rolling out over v1.
        let r = rotation(S::RollingOut, Some("v1"), Some("v2"));
        assert_eq!(roles(version_roles(&rec(Some("v1"), Some("rot-1")), Some(&r))), vec!["current v1", "new v2"]);
        // Verified and revoking: the new one is current, the old one old.
        for s in [S::Verified, S::Deactivating, S::Grace, S::Deleting, S::Monitoring] {
            let r = rotation(s, Some("v1"), Some("v2"));
            assert_eq!(
                roles(version_roles(&rec(Some("v1"), Some("rot-1")), Some(&r))),
                vec!["current v2", "old v1"],
                "{s:?}"
            );
        }
        // Completed.
        let r = rotation(S::Completed, Some("v1"), Some("v2"));
        assert_eq!(roles(version_roles(&rec(Some("v2"), None), Some(&r))), vec!["current v2", "old v1"]);
        // An older completed rotation named explicitly: both its versions are old.
        let r = rotation(S::Completed, Some("v1"), Some("v2"));
        assert_eq!(roles(version_roles(&rec(Some("v3"), None), Some(&r))), vec!["current v3", "old v1", "old v2"]);
        // Aborted: the new version was deleted; the old one is still current.
        let r = rotation(S::Aborted, Some("v1"), Some("v2"));
        assert_eq!(roles(version_roles(&rec(Some("v1"), None), Some(&r))), vec!["current v1"]);
    }

    #[test]
    fn queries_parse_strictly() {
        let q = Query::new("api".into(), "", String::new(), 0).unwrap();
        assert_eq!((q.filter, q.rotation, q.timeout), (Filter::All, None, DEFAULT_TIMEOUT));
        let q = Query::new("api".into(), "", "rot-1".into(), 5).unwrap();
        assert_eq!((q.filter, q.timeout), (Filter::Only(Role::Old), Duration::from_secs(5)));
        let q = Query::new("api".into(), "new", "rot-1".into(), 0).unwrap();
        assert_eq!(q.filter, Filter::Only(Role::New));
        assert!(matches!(Query::new("api".into(), "older", String::new(), 0), Err(ScopeError::BadFilter(_))));
        assert!(matches!(Query::new("api".into(), "", String::new(), 301), Err(ScopeError::BadTimeout(301))));
    }

    #[test]
    fn needles_avoid_delimiters() {
        assert_eq!(needle(b"tok_abcdef"), Needle::Whole(b"tok_abcdef"));
        assert_eq!(needle(b"AKIA/abc+def"), Needle::Whole(b"AKIA/abc+def"));
        assert_eq!(needle(b"c2VjcmV0LXZhbHVlLWhlcmU="), Needle::Part(b"c2VjcmV0LXZhbHVlLWhlcmU"));
        assert!(matches!(needle(b"a=b:c d"), Needle::Unsearchable(_)));
        assert!(matches!(needle(b""), Needle::Unsearchable(_)));
        assert!(matches!(needle(&[b'x'; MAX_NEEDLE + 1]), Needle::Unsearchable(_)));
    }

    fn agent(name: &str, secrets: &[&str]) -> AgentRecord {
        AgentRecord {
            name: name.into(),
            labels: BTreeMap::from([("env".to_string(), "prod".to_string())]),
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn hit(path: &str, line: u32, version: &str, declared: bool) -> ScanMatch {
        ScanMatch {
            path: path.into(),
            line,
            secret: "api".into(),
            version_id: version.into(),
            field: "value".into(),
            declared,
        }
    }

    #[test]
    fn the_map_says_where_what_is_declared_and_who_did_not_answer() {
        let searched = vec![
            Searched { version: "v2".into(), role: Role::Current, field: "value".into(), partial: false, weak: None },
            Searched { version: "v1".into(), role: Role::Old, field: "value".into(), partial: false, weak: None },
        ];
        let agents = vec![
            agent("web-1", &["api"]),
            agent("web-2", &["api"]),
            agent("web-3", &["api"]),
            agent("batch", &[]),
            agent("gone", &["api"]),
            agent("broken", &[]),
        ];
        let answers = BTreeMap::from([
            (
                "web-1".to_string(),
                ScanResult {
                    scan_id: "s".into(),
                    matches: vec![
                        hit("/etc/app.env", 3, "v2", true),
                        hit("/srv/copy.txt", 1, "v2", false),
                        hit("/srv/copy.txt", 9, "v1", false),
                        // Not asked for: ignored.
                        hit("/x", 1, "v0", false),
                        ScanMatch { secret: "other".into(), ..hit("/y", 1, "v2", false) },
                    ],
                    files_scanned: 10,
                    bytes_scanned: 1000,
                    skipped: vec![ScanSkip {
                        path: "/srv/blob".into(),
                        reason: "binary".into(),
                        detail: String::new(),
                    }],
                    skipped_counts: [("binary".to_string(), 1)].into(),
                    ..Default::default()
                },
            ),
            ("web-2".to_string(), ScanResult { scan_id: "s".into(), files_scanned: 2, ..Default::default() }),
            (
                "batch".to_string(),
                ScanResult {
                    scan_id: "s".into(),
                    matches: vec![hit("/home/u/notes", 4, "v2", false)],
                    truncated: true,
                    limit: "max_files 3".into(),
                    ..Default::default()
                },
            ),
            (
                "broken".to_string(),
                ScanResult {
                    scan_id: "s".into(),
                    error: "a scan is already running on this host".into(),
                    ..Default::default()
                },
            ),
        ]);
        let unreachable = BTreeMap::from([("web-3".to_string(), "no answer within 20s".to_string())]);
        let selector = BTreeMap::from([("env".to_string(), "prod".to_string())]);
        let connected = |h: &str| h != "gone";
        let m = build_map(Inputs {
            scan_id: "scan-1",
            secret: "api",
            filter: Filter::All,
            rotation: Some("rot-1"),
            started_ms: 1,
            elapsed_ms: 2,
            timeout_seconds: 20,
            searched: &searched,
            not_searched: &[],
            agents: &agents,
            connected: &connected,
            selector: &selector,
            answers,
            unreachable,
        });
        let s = &m.summary;
        assert_eq!(s.hosts_asked, 5);
        assert_eq!(s.answered, 3);
        assert_eq!(s.not_answering, vec!["gone", "web-3"]);
        assert_eq!(s.errors, vec!["broken"]);
        assert_eq!(s.hosts_with_value, vec!["batch", "web-1"]);
        assert_eq!((s.occurrences, s.undeclared, s.leftovers), (4, 3, 1));
        assert_eq!(s.declared_not_found, vec!["web-2"]);
        assert_eq!(s.truncated, vec!["batch"]);
        let host = |n: &str| m.hosts.iter().find(|h| h.host == n).unwrap();
        let w1 = host("web-1");
        assert_eq!(w1.files.len(), 2);
        assert_eq!((w1.files[0].path.as_str(), w1.files[0].declared), ("/etc/app.env", true));
        let copy = &w1.files[1];
        assert!(!copy.declared);
        assert_eq!(
            copy.versions.iter().map(|v| (v.version.as_str(), v.role)).collect::<Vec<_>>(),
            [("v2", Role::Current), ("v1", Role::Old)]
        );
        assert_eq!(w1.skipped["binary"], 1);
        assert!(!w1.declared_not_found && w1.declares_secret && w1.selected);
        assert_eq!(m.leftovers[0].path, "/srv/copy.txt");
        assert_eq!(m.leftovers[0].line, 9);
        let gone = host("gone");
        assert_eq!(
            (gone.status, gone.connected, gone.error.as_deref()),
            (HostStatus::NotAnswering, false, Some("not connected"))
        );
        assert_eq!(host("web-3").error.as_deref(), Some("no answer within 20s"));
        assert_eq!(host("broken").status, HostStatus::Error);
        let b = host("batch");
        assert!(!b.declares_secret && b.truncated && b.limit.as_deref() == Some("max_files 3"));
        // The JSON names what the CLI and scripts rely on.
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["hosts"][0]["status"], "answered");
        assert_eq!(v["undeclared"][0]["role"], "current");
        assert_eq!(v["filter"], "all");
    }

    #[test]
    fn a_leftover_scan_does_not_call_clean_hosts_missing() {
        let searched =
            vec![Searched { version: "v1".into(), role: Role::Old, field: "value".into(), partial: false, weak: None }];
        let agents = vec![agent("web-1", &["api"])];
        let answers = BTreeMap::from([("web-1".to_string(), ScanResult::default())]);
        let m = build_map(Inputs {
            scan_id: "scan-1",
            secret: "api",
            filter: Filter::Only(Role::Old),
            rotation: None,
            started_ms: 0,
            elapsed_ms: 0,
            timeout_seconds: 20,
            searched: &searched,
            not_searched: &[],
            agents: &agents,
            connected: &|_| true,
            selector: &BTreeMap::new(),
            answers,
            unreachable: BTreeMap::new(),
        });
        assert!(m.leftover_scan);
        assert!(m.summary.declared_not_found.is_empty());
    }

    #[tokio::test]
    async fn results_reach_only_the_scan_that_asked_once_per_host() {
        let scans = Scans::default();
        let hosts: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        let (reg, mut rx) = scans.register("scan-1", &hosts).unwrap();
        let r = |id: &str| ScanResult { scan_id: id.into(), ..Default::default() };
        scans.deliver("a", r("scan-1"));
        scans.deliver("a", r("scan-1")); // duplicate
        scans.deliver("c", r("scan-1")); // not asked
        scans.deliver("b", r("scan-2")); // another scan
        assert_eq!(rx.recv().await.unwrap().0, "a");
        assert!(rx.try_recv().is_err());
        scans.deliver("b", r("scan-1"));
        assert_eq!(rx.recv().await.unwrap().0, "b");
        assert_eq!(scans.in_flight(), 1);
        drop(reg);
        assert_eq!(scans.in_flight(), 0);
        scans.deliver("a", r("scan-1")); // late: dropped, no panic

        let regs: Vec<_> = (0..MAX_IN_FLIGHT).map(|i| scans.register(&format!("s{i}"), &hosts).unwrap()).collect();
        assert!(matches!(scans.register("one-more", &hosts), Err(ScopeError::TooManyScans(_))));
        drop(regs);
        assert!(scans.register("one-more", &hosts).is_ok());
    }
}
