//! The consumer map: where a secret's values occur across the fleet
//! (`rekey scope SECRET`). Agents compare keyed fingerprints of tokens in
//! their files; they are never sent a value, and nothing here holds one.

use super::string_enum;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

string_enum! {
    /// The part a version plays for the secret at the time of the scan.
    pub enum VersionRole {
        /// What the hosts should run now.
        Current = "current",
        /// Being rolled out by the active rotation, not yet verified.
        New = "new",
        /// Replaced by a rotation: any copy left is a leftover.
        Old = "old",
    }
}

string_enum! {
    /// How a host answered a scan.
    pub enum ScanStatus {
        /// It searched and answered.
        Answered = "answered",
        /// The agent answered that it could not scan (`error` says why).
        Error = "error",
        /// Not connected, not reachable, or no answer before the timeout.
        NotAnswering = "not_answering",
    }
}

/// A version and field searched for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchedView {
    pub version: String,
    pub role: VersionRole,
    /// The field of the version (`value`, or a named field such as `secret_access_key`).
    pub field: String,
    /// Only part of the value is searched (it contains separator characters).
    pub partial: bool,
    /// Set when the value looks guessable (its entropy, estimated from its
    /// length and character classes, is under the floor): why. Null otherwise.
    #[serde(default)]
    pub weak: Option<String>,
}

/// A version, or one of its fields, not searched for, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotSearchedView {
    pub version: String,
    pub role: VersionRole,
    /// Null when the whole version could not be searched.
    pub field: Option<String>,
    pub reason: String,
}

/// One place a value was found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OccurrenceView {
    pub host: String,
    pub path: String,
    /// 1-based.
    pub line: u32,
    pub version: String,
    pub role: VersionRole,
    pub field: String,
    /// The host's agent.toml declares this path for this secret.
    pub declared: bool,
    /// Found by the part of the value without separators.
    pub partial: bool,
}

/// A version found in a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScopeFileVersion {
    pub version: String,
    pub role: VersionRole,
}

/// One line of a file holding a value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScopeFileLine {
    pub line: u32,
    pub version: String,
    pub role: VersionRole,
    pub field: String,
}

/// A file of a host holding one or more of the secret's values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScopeFileView {
    pub path: String,
    /// The host's agent.toml declares this path for this secret.
    pub declared: bool,
    /// The versions found in it, each once.
    pub versions: Vec<ScopeFileVersion>,
    pub lines: Vec<ScopeFileLine>,
}

/// A file the agent did not search, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkippedFileView {
    pub path: String,
    /// A short reason such as `missing`, `unreadable`, `special`, `binary`, `too_large`.
    pub reason: String,
    /// More about it (absent when there is nothing more).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// One host asked, and what it found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScopeHostView {
    pub host: String,
    pub labels: BTreeMap<String, String>,
    pub connected: bool,
    pub status: ScanStatus,
    /// Why the host did not answer, or what it answered instead of a scan.
    pub error: Option<String>,
    /// Its agent.toml declares the secret.
    pub declares_secret: bool,
    /// The catalog's selector picks it.
    pub selected: bool,
    /// It declares the secret, answered, and no declared file holds a searched version.
    pub declared_not_found: bool,
    pub files: Vec<ScopeFileView>,
    pub files_scanned: u64,
    pub bytes_scanned: u64,
    /// Files not searched, counted by reason.
    pub skipped: BTreeMap<String, u64>,
    /// Files not searched (the first ones).
    pub skipped_files: Vec<SkippedFileView>,
    /// The scan stopped at a limit before it searched everything.
    pub truncated: bool,
    /// Which limit, when truncated.
    pub limit: Option<String>,
    pub elapsed_ms: Option<u64>,
}

/// The consumer map in numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScopeSummary {
    pub hosts_asked: usize,
    pub answered: usize,
    pub not_answering: Vec<String>,
    /// Hosts whose agent could not scan.
    pub errors: Vec<String>,
    /// Hosts where any searched version was found.
    pub hosts_with_value: Vec<String>,
    pub occurrences: usize,
    /// Occurrences in files no agent config declares for the secret.
    pub undeclared: usize,
    /// Occurrences of an old version.
    pub leftovers: usize,
    /// Hosts that declare the secret but where it was not found.
    pub declared_not_found: Vec<String>,
    /// Hosts whose scan stopped at a limit.
    pub truncated: Vec<String>,
}

/// Where a secret's values are: host → file → line → version, undeclared
/// copies and leftovers. `rekey scope SECRET -o json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScopeView {
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
    pub searched: Vec<SearchedView>,
    pub not_searched: Vec<NotSearchedView>,
    /// Every host asked, by name.
    pub hosts: Vec<ScopeHostView>,
    /// Every occurrence in a file no agent config declares for the secret.
    pub undeclared: Vec<OccurrenceView>,
    /// Every occurrence of an old version.
    pub leftovers: Vec<OccurrenceView>,
    pub summary: ScopeSummary,
}
