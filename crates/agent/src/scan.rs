//! Scope scans: where do a secret's values occur on this host?
//!
//! The coordinator sends a [`ScanRequest`]: per target (secret, version,
//! field) a keyed fingerprint `HMAC-SHA256(salt, needle)` and the needle's
//! length — never a value. The agent searches every file its own
//! `agent.toml` declares plus the `[scan]` roots, and answers with a
//! [`ScanResult`]: every match (path, 1-based line, secret, version, field,
//! whether this host declares that path for that secret), what it read,
//! what it skipped and why, and whether it hit a limit.
//!
//! Matching without the value ([`Matcher`], pure): each line is split into
//! tokens on bytes that cannot be part of a key
//! ([`DELIMITERS`](rekey_proto::scan::DELIMITERS)); for every target length
//! L, every window of length L of every token at least L long is
//! fingerprinted and compared in constant time with the targets of that
//! length. Tokens longer than [`MAX_NEEDLE`] are only compared whole (a bound
//! on the work per token). The delimiters and the limits a request must keep
//! are the protocol's ([`rekey_proto::scan`]).
//!
//! Blind requests ([`scan_blind`]): an agent that is not a consumer of the
//! secret gets only a salt — no fingerprint, no length, nothing it could test
//! a guess of the value against. It answers with `HMAC-SHA256(salt, token)`
//! of every distinct whole token of [`MIN_BLIND_TOKEN`] to [`MAX_NEEDLE`]
//! bytes per file (with the line of its first occurrence), at most
//! [`MAX_BLIND_TOKENS`]; the coordinator, which holds the values, matches.
//!
//! Walking ([`scan_files`], blocking I/O) is bounded: directory depth, file
//! size, number of files, wall-clock time, number of matches reported.
//! Binary files (a NUL byte in the first 8 KiB), special files, other file
//! systems and symlinks leading out of their root are skipped and counted;
//! an unreadable file is counted, never fatal. Nothing is written.
//!
//! Tasks: [`Scans::spawn`] runs one scan at a time in a task of its own
//! (span `scan{id}`) around a blocking thread, so the session keeps
//! heart-beating; the answer goes up the session's bounded outbound channel.
//! A scan ends early when its session ends; a second request while one runs
//! is answered at once with an error.

use crate::config::{AgentConfig, ScanConfig};
use rekey_common::error::Chain;
use rekey_proto::scan::{
    MAX_BLIND_TOKENS, MAX_MATCHES, MAX_NEEDLE, MAX_SKIPPED_LISTED, MAX_TARGETS, MIN_BLIND_TOKEN, SALT_LEN, is_delimiter,
};
use rekey_proto::v1::{
    AgentMessage, BlindFile, BlindToken, ScanMatch, ScanRequest, ScanResult, ScanSkip, ScanTarget, agent_message,
};
use ring::hmac;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// A NUL byte in this many first bytes marks a file as binary.
const BINARY_PROBE: usize = 8192;
/// Lines scanned between two checks of the deadline.
const LINES_PER_CHECK: usize = 256;
/// How long the answer may wait for room in the session's outbound channel.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScanError {
    #[error("malformed scan request: {0}")]
    Malformed(String),
    #[error("a scan is already running on this host")]
    Busy,
}

/// One thing to look for: a keyed fingerprint and the length of its needle.
#[derive(Debug, Clone)]
pub struct Target {
    pub secret: String,
    pub version_id: String,
    pub field: String,
    fingerprint: [u8; 32],
}

/// The pure matching core: fingerprints windows of tokens and compares them
/// with the targets.
pub struct Matcher {
    key: hmac::Key,
    targets: Vec<Target>,
    /// Distinct needle lengths, ascending, each with the targets of that length.
    by_len: Vec<(usize, Vec<usize>)>,
}

impl Matcher {
    pub fn new(salt: &[u8], targets: &[ScanTarget]) -> Result<Matcher, ScanError> {
        if !SALT_LEN.contains(&salt.len()) {
            return Err(ScanError::Malformed(format!(
                "salt of {} bytes, expected {} to {}",
                salt.len(),
                SALT_LEN.start(),
                SALT_LEN.end()
            )));
        }
        if targets.is_empty() {
            return Err(ScanError::Malformed("no targets".into()));
        }
        if targets.len() > MAX_TARGETS {
            return Err(ScanError::Malformed(format!("{} targets, at most {MAX_TARGETS}", targets.len())));
        }
        let mut out = Vec::with_capacity(targets.len());
        let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, t) in targets.iter().enumerate() {
            let what = || format!("target {} ({} {} {})", i, t.secret, t.version_id, t.field);
            let len = t.length as usize;
            if len == 0 || len > MAX_NEEDLE {
                return Err(ScanError::Malformed(format!("{}: length {len}, expected 1 to {MAX_NEEDLE}", what())));
            }
            let fingerprint: [u8; 32] = decode_hex(&t.fingerprint)
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
                .ok_or_else(|| ScanError::Malformed(format!("{}: fingerprint is not 64 hex digits", what())))?;
            by_len.entry(len).or_default().push(out.len());
            out.push(Target {
                secret: t.secret.clone(),
                version_id: t.version_id.clone(),
                field: t.field.clone(),
                fingerprint,
            });
        }
        Ok(Matcher { key: hmac::Key::new(hmac::HMAC_SHA256, salt), targets: out, by_len: by_len.into_iter().collect() })
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Indices of the targets found in `line` (each once, ascending).
    pub fn scan_line(&self, line: &[u8]) -> Vec<usize> {
        let mut hits = Vec::new();
        for token in line.split(|b| is_delimiter(*b)).filter(|t| !t.is_empty()) {
            for (len, idxs) in &self.by_len {
                let len = *len;
                if token.len() < len {
                    break; // lengths are ascending
                }
                if token.len() > MAX_NEEDLE && token.len() != len {
                    continue;
                }
                for window in token.windows(len) {
                    let tag = hmac::sign(&self.key, window);
                    for &i in idxs {
                        if constant_time_eq(tag.as_ref(), &self.targets[i].fingerprint) {
                            hits.push(i);
                        }
                    }
                }
            }
        }
        hits.sort_unstable();
        hits.dedup();
        hits
    }
}

/// The salt's key of a blind request.
pub fn blind_key(salt: &[u8]) -> Result<hmac::Key, ScanError> {
    if !SALT_LEN.contains(&salt.len()) {
        return Err(ScanError::Malformed(format!(
            "salt of {} bytes, expected {} to {}",
            salt.len(),
            SALT_LEN.start(),
            SALT_LEN.end()
        )));
    }
    Ok(hmac::Key::new(hmac::HMAC_SHA256, salt))
}

/// What a scan looks for: targets (a consumer's request), or every token
/// (a blind request, matched by the coordinator).
#[derive(Clone, Copy)]
enum Search<'a> {
    Targeted(&'a Matcher),
    Blind(&'a hmac::Key),
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes().chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

/// What a scan may read and for how long.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Every declared file, with the secret that declares it.
    pub declared: Vec<(PathBuf, String)>,
    pub limits: ScanConfig,
    /// Never entered: the agent's state dir, whose private backups hold
    /// values by design (rekey's own copies, purged after revocation).
    pub exclude: Vec<PathBuf>,
}

impl Plan {
    pub fn from_config(config: &AgentConfig) -> Plan {
        let declared =
            config.secrets.iter().flat_map(|s| s.files.iter().map(|f| (f.path.clone(), s.name.clone()))).collect();
        Plan { declared, limits: config.scan.clone(), exclude: vec![config.state_dir.clone()] }
    }
}

/// Why a scan stopped early, in the order they are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Cancelled,
    Timeout,
    MaxFiles,
    /// A blind scan sent as many token fingerprints as it may.
    Tokens,
}

/// Accumulates one scan's result while walking.
struct Walk<'a> {
    search: Search<'a>,
    /// Token fingerprints sent so far (blind requests).
    blind_tokens: usize,
    plan: &'a Plan,
    /// Canonical declared path → secrets declaring it.
    declared: HashMap<PathBuf, Vec<String>>,
    /// Canonical directories never entered.
    excluded: Vec<PathBuf>,
    deadline: Instant,
    stop: &'a AtomicBool,
    stopped: Option<Stop>,
    limits_hit: Vec<String>,
    /// (device, inode) of files read and directories entered.
    seen_files: HashSet<(u64, u64)>,
    seen_dirs: HashSet<(u64, u64)>,
    files_considered: u64,
    result: ScanResult,
}

impl Walk<'_> {
    fn should_stop(&mut self) -> bool {
        if self.stopped.is_none() {
            if self.stop.load(Ordering::Relaxed) {
                self.stopped = Some(Stop::Cancelled);
            } else if Instant::now() >= self.deadline {
                self.stopped = Some(Stop::Timeout);
            }
        }
        self.stopped.is_some()
    }

    fn hit_limit(&mut self, what: String) {
        self.result.truncated = true;
        if !self.limits_hit.contains(&what) {
            self.limits_hit.push(what);
        }
    }

    fn skip(&mut self, path: &Path, reason: &str, detail: String) {
        *self.result.skipped_counts.entry(reason.to_string()).or_default() += 1;
        if self.result.skipped.len() < MAX_SKIPPED_LISTED {
            self.result.skipped.push(ScanSkip { path: path.display().to_string(), reason: reason.into(), detail });
        }
    }

    /// A declared file: read wherever it is (a symlink is followed, as the
    /// pipeline writes through it).
    fn declared_file(&mut self, path: &Path) {
        let real = match std::fs::canonicalize(path) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return self.skip(path, "missing", String::new()),
            Err(e) => return self.skip(path, "unreadable", e.to_string()),
        };
        match std::fs::metadata(&real) {
            Ok(m) if m.is_file() => self.file(path, &real, &m),
            Ok(_) => self.skip(path, "special", "not a regular file".into()),
            Err(e) => self.skip(path, "unreadable", e.to_string()),
        }
    }

    /// One root: a directory walked depth first, or a single file.
    fn root(&mut self, root: &Path) {
        let canonical = match std::fs::canonicalize(root) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return self.skip(root, "missing", String::new()),
            Err(e) => return self.skip(root, "unreadable", e.to_string()),
        };
        let meta = match std::fs::metadata(&canonical) {
            Ok(m) => m,
            Err(e) => return self.skip(root, "unreadable", e.to_string()),
        };
        if meta.is_file() {
            return self.file(root, &canonical, &meta);
        }
        if !meta.is_dir() {
            return self.skip(root, "special", "not a regular file or directory".into());
        }
        if self.excluded.iter().any(|x| canonical.starts_with(x)) {
            return self.skip(root, "agent_state", String::new());
        }
        self.walk(root, &canonical, meta.dev());
    }

    /// Depth first, entries in name order; a stack bounded by depth × fan-out
    /// of what was already listed, and every push is a real directory entry.
    fn walk(&mut self, root: &Path, canonical: &Path, root_dev: u64) {
        let mut stack: Vec<(PathBuf, PathBuf, u32)> = vec![(root.to_path_buf(), canonical.to_path_buf(), 0)];
        while let Some((shown, real, depth)) = stack.pop() {
            if self.should_stop() {
                return;
            }
            let Some(entries) = self.list_dir(&shown, &real) else { continue };
            let mut subdirs = Vec::new();
            for (name, entry_real) in entries {
                if self.should_stop() {
                    return;
                }
                let entry_shown = shown.join(&name);
                let Some((target, meta)) = self.resolve(&entry_shown, entry_real, canonical) else { continue };
                if meta.is_dir() {
                    subdirs.extend(self.subdir(entry_shown, target, &meta, root_dev, depth));
                } else if meta.is_file() {
                    self.file(&entry_shown, &target, &meta);
                } else {
                    self.skip(&entry_shown, "special", String::new());
                }
            }
            // Reverse so the stack pops them in name order.
            stack.extend(subdirs.into_iter().rev());
        }
    }

    /// A directory's entries in name order; `None` if it was listed already
    /// (a loop of links) or cannot be read (counted).
    fn list_dir(&mut self, shown: &Path, real: &Path) -> Option<Vec<(std::ffi::OsString, PathBuf)>> {
        let meta = match std::fs::metadata(real) {
            Ok(m) => m,
            Err(e) => {
                self.skip(shown, "unreadable", e.to_string());
                return None;
            }
        };
        if !self.seen_dirs.insert((meta.dev(), meta.ino())) {
            return None;
        }
        let mut entries: Vec<(std::ffi::OsString, PathBuf)> = match std::fs::read_dir(real) {
            Ok(rd) => rd.filter_map(Result::ok).map(|e| (e.file_name(), e.path())).collect(),
            Err(e) => {
                self.skip(shown, "unreadable", e.to_string());
                return None;
            }
        };
        entries.sort();
        Some(entries)
    }

    /// What an entry is: itself, or for a symlink its target — followed only
    /// if it stays inside the root `canonical`. `None`: skipped (counted).
    fn resolve(&mut self, shown: &Path, real: PathBuf, canonical: &Path) -> Option<(PathBuf, std::fs::Metadata)> {
        let lmeta = match std::fs::symlink_metadata(&real) {
            Ok(m) => m,
            Err(e) => {
                self.skip(shown, "unreadable", e.to_string());
                return None;
            }
        };
        if !lmeta.file_type().is_symlink() {
            return Some((real, lmeta));
        }
        let target = match std::fs::canonicalize(&real) {
            Ok(t) => t,
            Err(e) => {
                self.skip(shown, "unreadable", format!("broken symlink: {e}"));
                return None;
            }
        };
        if !target.starts_with(canonical) {
            self.skip(shown, "symlink_outside_root", String::new());
            return None;
        }
        match std::fs::metadata(&target) {
            Ok(m) => Some((target, m)),
            Err(e) => {
                self.skip(shown, "unreadable", e.to_string());
                None
            }
        }
    }

    /// A directory to descend into, unless it is the agent's state, on
    /// another file system, or deeper than the limit (each counted).
    fn subdir(
        &mut self,
        shown: PathBuf,
        target: PathBuf,
        meta: &std::fs::Metadata,
        root_dev: u64,
        depth: u32,
    ) -> Option<(PathBuf, PathBuf, u32)> {
        if self.excluded.contains(&target) {
            self.skip(&shown, "agent_state", String::new());
        } else if meta.dev() != root_dev {
            self.skip(&shown, "other_filesystem", String::new());
        } else if depth >= self.plan.limits.max_depth {
            self.skip(&shown, "too_deep", String::new());
            self.hit_limit(format!("max_depth {}", self.plan.limits.max_depth));
        } else {
            return Some((shown, target, depth + 1));
        }
        None
    }

    /// Reads and searches one regular file (`shown` is the path reported,
    /// `real` the one opened).
    fn file(&mut self, shown: &Path, real: &Path, meta: &std::fs::Metadata) {
        if self.should_stop() || !self.seen_files.insert((meta.dev(), meta.ino())) {
            return;
        }
        if self.files_considered >= self.plan.limits.max_files {
            self.stopped = Some(Stop::MaxFiles);
            return;
        }
        self.files_considered += 1;
        let max = self.plan.limits.max_file_size;
        if meta.len() > max {
            return self.skip(shown, "too_large", format!("{} bytes, limit {max}", meta.len()));
        }
        let content = match read_bounded(real, max) {
            Ok(Some(c)) => c,
            Ok(None) => return self.skip(shown, "too_large", format!("grew past the limit of {max} bytes")),
            Err(e) => return self.skip(shown, "unreadable", e.to_string()),
        };
        if content[..content.len().min(BINARY_PROBE)].contains(&0) {
            return self.skip(shown, "binary", String::new());
        }
        self.result.files_scanned += 1;
        self.result.bytes_scanned += content.len() as u64;
        let matcher = match self.search {
            Search::Targeted(m) => m,
            Search::Blind(key) => return self.blind_file(shown, real, &content, key),
        };
        // Resolved on the first match only: most files match nothing.
        let mut declaring: Option<Vec<String>> = None;
        for (i, line) in content.split(|b| *b == b'\n').enumerate() {
            if i % LINES_PER_CHECK == LINES_PER_CHECK - 1 && self.should_stop() {
                return;
            }
            for t in matcher.scan_line(line) {
                if self.result.matches.len() >= MAX_MATCHES {
                    self.hit_limit(format!("max_matches {MAX_MATCHES}"));
                    return;
                }
                let target = &matcher.targets()[t];
                let declaring = declaring.get_or_insert_with(|| self.declaring(shown, real));
                self.result.matches.push(ScanMatch {
                    path: shown.display().to_string(),
                    line: u32::try_from(i + 1).unwrap_or(u32::MAX),
                    secret: target.secret.clone(),
                    version_id: target.version_id.clone(),
                    field: target.field.clone(),
                    declared: declaring.contains(&target.secret),
                });
            }
        }
    }

    /// A blind request: the salted HMAC of every distinct token of the file
    /// (line of its first occurrence), within the scan's token budget.
    fn blind_file(&mut self, shown: &Path, real: &Path, content: &[u8], key: &hmac::Key) {
        let mut seen: HashSet<&[u8]> = HashSet::new();
        let mut tokens = Vec::new();
        let mut full = false;
        'lines: for (i, line) in content.split(|b| *b == b'\n').enumerate() {
            if i % LINES_PER_CHECK == LINES_PER_CHECK - 1 && self.should_stop() {
                break;
            }
            for token in line.split(|b| is_delimiter(*b)) {
                if !(MIN_BLIND_TOKEN..=MAX_NEEDLE).contains(&token.len()) || !seen.insert(token) {
                    continue;
                }
                if self.blind_tokens >= MAX_BLIND_TOKENS {
                    full = true;
                    break 'lines;
                }
                self.blind_tokens += 1;
                tokens.push(BlindToken {
                    tag: hmac::sign(key, token).as_ref().to_vec(),
                    line: u32::try_from(i + 1).unwrap_or(u32::MAX),
                });
            }
        }
        if !tokens.is_empty() {
            let declared_for = self.declaring(shown, real);
            self.result.blind_files.push(BlindFile { path: shown.display().to_string(), declared_for, tokens });
        }
        if full {
            self.hit_limit(format!("max_tokens {MAX_BLIND_TOKENS}"));
            self.stopped.get_or_insert(Stop::Tokens);
        }
    }

    /// The secrets whose agent.toml entry names this file (by the path as
    /// written, or the file it resolves to).
    fn declaring(&self, shown: &Path, real: &Path) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in [shown, real] {
            let canonical = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            for key in [p.to_path_buf(), canonical] {
                if let Some(s) = self.declared.get(&key) {
                    out.extend(s.iter().cloned());
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

/// The whole file if it holds at most `max` bytes; `None` if it is larger.
/// Opened non-blocking and without following a symlink swapped in since it
/// was listed, so a FIFO or a race cannot hang or redirect the scan.
fn read_bounded(path: &Path, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut buf = Vec::new();
    f.take(max + 1).read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= max).then_some(buf))
}

/// Runs one scan to the end (blocking I/O): the declared files, then the
/// roots, within the plan's limits and before `deadline` or `stop`.
pub fn scan_files(plan: &Plan, matcher: &Matcher, scan_id: &str, deadline: Instant, stop: &AtomicBool) -> ScanResult {
    scan(plan, Search::Targeted(matcher), scan_id, deadline, stop)
}

/// Runs one blind scan to the end (blocking I/O): like [`scan_files`], but
/// answers with the salted HMACs of the tokens found (`blind_files`).
pub fn scan_blind(plan: &Plan, key: &hmac::Key, scan_id: &str, deadline: Instant, stop: &AtomicBool) -> ScanResult {
    scan(plan, Search::Blind(key), scan_id, deadline, stop)
}

fn scan(plan: &Plan, search: Search<'_>, scan_id: &str, deadline: Instant, stop: &AtomicBool) -> ScanResult {
    let started = Instant::now();
    let mut declared: HashMap<PathBuf, Vec<String>> = HashMap::new();
    for (path, secret) in &plan.declared {
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
        for key in [path.clone(), canonical] {
            let list = declared.entry(key).or_default();
            if !list.contains(secret) {
                list.push(secret.clone());
            }
        }
    }
    let excluded = plan.exclude.iter().filter_map(|p| std::fs::canonicalize(p).ok()).collect();
    let mut walk = Walk {
        search,
        blind_tokens: 0,
        plan,
        declared,
        excluded,
        deadline,
        stop,
        stopped: None,
        limits_hit: Vec::new(),
        seen_files: HashSet::new(),
        seen_dirs: HashSet::new(),
        files_considered: 0,
        result: ScanResult { scan_id: scan_id.to_string(), ..Default::default() },
    };
    let mut files: Vec<&PathBuf> = plan.declared.iter().map(|(p, _)| p).collect();
    files.sort();
    files.dedup();
    for f in files {
        walk.declared_file(f);
    }
    for root in &plan.limits.roots {
        walk.root(root);
    }
    match walk.stopped {
        Some(Stop::Timeout) => {
            let t = deadline.saturating_duration_since(started);
            walk.hit_limit(format!(
                "timeout {}",
                humantime::format_duration(Duration::from_millis(t.as_millis() as u64))
            ))
        }
        Some(Stop::MaxFiles) => walk.hit_limit(format!("max_files {}", plan.limits.max_files)),
        Some(Stop::Cancelled) => walk.hit_limit("cancelled".into()),
        Some(Stop::Tokens) => {}
        None => {}
    }
    let mut result = walk.result;
    result.limit = walk.limits_hit.join(", ");
    result.elapsed_ms = started.elapsed().as_millis() as u64;
    result
}

/// Runs scope scans for the session, one at a time.
#[derive(Clone)]
pub struct Scans {
    plan: Arc<Plan>,
    busy: Arc<AtomicBool>,
}

/// Frees the scan slot when the scan's task ends, however it ends.
struct SlotGuard(Arc<AtomicBool>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Scans {
    pub fn new(config: &AgentConfig) -> Scans {
        Scans { plan: Arc::new(Plan::from_config(config)), busy: Arc::new(AtomicBool::new(false)) }
    }

    /// How long a scan may run: the local `[scan] timeout`, shortened to
    /// what the coordinator will wait for.
    fn budget(&self, req: &ScanRequest) -> Duration {
        let local = self.plan.limits.timeout;
        if req.timeout_ms == 0 { local } else { local.min(Duration::from_millis(req.timeout_ms)) }
    }

    /// Starts a scan in a task of its own and returns at once; the result is
    /// sent on `out` (the session's outbound channel). `session` ends it early.
    pub fn spawn(&self, req: ScanRequest, out: mpsc::Sender<AgentMessage>, session: CancellationToken) {
        let span = tracing::info_span!("scan", id = %req.scan_id);
        if self.busy.swap(true, Ordering::AcqRel) {
            let result =
                ScanResult { scan_id: req.scan_id.clone(), error: ScanError::Busy.to_string(), ..Default::default() };
            tracing::warn!(parent: &span, "scan refused: another scan is running");
            tokio::spawn(send(out, result).instrument(span));
            return;
        }
        let guard = SlotGuard(self.busy.clone());
        let plan = self.plan.clone();
        let budget = self.budget(&req);
        tokio::spawn(
            async move {
                let _guard = guard;
                let search = if req.blind {
                    blind_key(&req.salt).map(Owned::Blind)
                } else {
                    Matcher::new(&req.salt, &req.targets).map(Owned::Targeted)
                };
                let search = match search {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %Chain(&e), "scan refused");
                        let result = ScanResult { scan_id: req.scan_id, error: e.to_string(), ..Default::default() };
                        return send(out, result).await;
                    }
                };
                tracing::info!(
                    blind = req.blind,
                    targets = req.targets.len(),
                    declared_files = plan.declared.len(),
                    roots = plan.limits.roots.len(),
                    budget_ms = budget.as_millis() as u64,
                    "scope scan started"
                );
                let stop = Arc::new(AtomicBool::new(false));
                let deadline = Instant::now() + budget;
                let mut work = tokio::task::spawn_blocking({
                    let stop = stop.clone();
                    let id = req.scan_id.clone();
                    move || match &search {
                        Owned::Targeted(m) => scan_files(&plan, m, &id, deadline, &stop),
                        Owned::Blind(k) => scan_blind(&plan, k, &id, deadline, &stop),
                    }
                });
                let joined = tokio::select! {
                    r = &mut work => r,
                    _ = session.cancelled() => {
                        // The session is gone: nobody to answer. Wait for the
                        // thread to notice, so the slot is free when we return.
                        stop.store(true, Ordering::Relaxed);
                        let _ = work.await;
                        tracing::info!("scope scan cancelled with its session");
                        return;
                    }
                };
                let result = match joined {
                    Ok(r) => r,
                    Err(e) => ScanResult {
                        scan_id: req.scan_id,
                        error: format!("scan task failed: {e}"),
                        ..Default::default()
                    },
                };
                tracing::info!(
                    files = result.files_scanned,
                    bytes = result.bytes_scanned,
                    matches = result.matches.len(),
                    blind_files = result.blind_files.len(),
                    skipped = result.skipped_counts.values().sum::<u64>(),
                    truncated = result.truncated,
                    limit = %result.limit,
                    elapsed_ms = result.elapsed_ms,
                    "scope scan finished"
                );
                send(out, result).await;
            }
            .instrument(span),
        );
    }
}

/// A request's search, owned by the scan's thread.
enum Owned {
    Targeted(Matcher),
    Blind(hmac::Key),
}

async fn send(out: mpsc::Sender<AgentMessage>, result: ScanResult) {
    let msg = AgentMessage { msg: Some(agent_message::Msg::ScanResult(result)) };
    match out.send_timeout(msg, SEND_TIMEOUT).await {
        Ok(()) => {}
        Err(mpsc::error::SendTimeoutError::Timeout(_)) => tracing::warn!("scan result dropped: session not sending"),
        Err(mpsc::error::SendTimeoutError::Closed(_)) => tracing::info!("scan result dropped: session ended"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const SALT: &[u8] = b"0123456789abcdef-per-scan-salt";

    fn target(secret: &str, version: &str, value: &[u8]) -> ScanTarget {
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, SALT), value);
        ScanTarget {
            secret: secret.into(),
            version_id: version.into(),
            field: "value".into(),
            fingerprint: tag.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
            length: value.len() as u32,
        }
    }

    fn matcher(values: &[&[u8]]) -> Matcher {
        let t: Vec<ScanTarget> = values.iter().enumerate().map(|(i, v)| target("s", &format!("v{i}"), v)).collect();
        Matcher::new(SALT, &t).unwrap()
    }

    #[test]
    fn finds_a_value_inside_tokens_between_delimiters() {
        let m = matcher(&[b"tok_AbC123xyz"]);
        for line in [
            &b"tok_AbC123xyz"[..],
            b"API_KEY=tok_AbC123xyz",
            b"export API_KEY=\"tok_AbC123xyz\"",
            b"{\"key\": \"tok_AbC123xyz\", \"x\": 1}",
            b"url = https://u:tok_AbC123xyz@host/path",
            b"Authorization: Bearer tok_AbC123xyz\r",
            b"<key>tok_AbC123xyz</key>",
            b"cmd --token=`tok_AbC123xyz`|x",
            // Inside a longer token: the windows find it.
            b"prefixtok_AbC123xyzsuffix",
            b"x_tok_AbC123xyz/more",
        ] {
            assert_eq!(m.scan_line(line), vec![0], "{}", String::from_utf8_lossy(line));
        }
        for line in [&b"tok_AbC123xy"[..], b"tok_AbC123xyZ", b"tok_AbC123 xyz", b"", b"   ", b"tok_AbC=123xyz"] {
            assert!(m.scan_line(line).is_empty(), "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn several_targets_and_lengths_each_reported_once_per_line() {
        let m = matcher(&[b"short-key-1", b"a-much-longer-key-value-2", b"short-key-3"]);
        assert_eq!(m.scan_line(b"a=short-key-1 b=short-key-1 c=a-much-longer-key-value-2"), vec![0, 1]);
        assert_eq!(m.scan_line(b"short-key-3;short-key-1"), vec![0, 2]);
    }

    #[test]
    fn long_tokens_are_only_compared_whole() {
        let value = vec![b'k'; 40];
        let m = matcher(&[&value]);
        let mut long = vec![b'x'; MAX_NEEDLE + 1];
        long[100..140].copy_from_slice(&value);
        assert!(m.scan_line(&long).is_empty(), "windows of an over-long token are not searched");
        let mut ok = vec![b'x'; MAX_NEEDLE];
        ok[100..140].copy_from_slice(&value);
        assert_eq!(m.scan_line(&ok), vec![0]);
        // A token as long as a target is compared whole whatever its length.
        let big = vec![b'z'; MAX_NEEDLE];
        assert_eq!(matcher(&[&big]).scan_line(&big), vec![0]);
    }

    #[test]
    fn a_different_salt_finds_nothing() {
        let t = target("s", "v1", b"tok_secret_value");
        let m = Matcher::new(b"another-salt-of-16+ bytes", &[t]).unwrap();
        assert!(m.scan_line(b"tok_secret_value").is_empty());
    }

    #[test]
    fn malformed_requests_are_refused_with_a_reason() {
        let good = target("s", "v1", b"value-123");
        let err = |salt: &[u8], t: Vec<ScanTarget>| Matcher::new(salt, &t).err().unwrap().to_string();
        assert!(err(b"short", vec![good.clone()]).contains("salt of 5 bytes"));
        assert!(err(SALT, vec![]).contains("no targets"));
        assert!(err(SALT, vec![good.clone(); MAX_TARGETS + 1]).contains("at most 64"));
        let mut t = good.clone();
        t.fingerprint = "zz".repeat(32);
        assert!(err(SALT, vec![t]).contains("64 hex digits"));
        let mut t = good.clone();
        t.fingerprint.pop();
        assert!(err(SALT, vec![t]).contains("64 hex digits"));
        let mut t = good.clone();
        t.length = 0;
        assert!(err(SALT, vec![t]).contains("length 0"));
        let mut t = good;
        t.length = MAX_NEEDLE as u32 + 1;
        assert!(err(SALT, vec![t]).contains("expected 1 to 4096"));
    }

    fn plan(declared: Vec<(PathBuf, &str)>, roots: Vec<PathBuf>) -> Plan {
        Plan {
            declared: declared.into_iter().map(|(p, s)| (p, s.to_string())).collect(),
            limits: ScanConfig { roots, ..ScanConfig::default() },
            exclude: Vec::new(),
        }
    }

    fn run(plan: &Plan, m: &Matcher) -> ScanResult {
        scan_files(plan, m, "scan-1", Instant::now() + Duration::from_secs(30), &AtomicBool::new(false))
    }

    const VALUE: &[u8] = b"tok_9f8e7d6c5b4a39281706";

    #[test]
    fn walks_declared_files_and_roots_and_says_what_is_declared() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        let declared = root.join("app.conf");
        std::fs::write(&declared, b"# managed\ntoken = tok_9f8e7d6c5b4a39281706\n").unwrap();
        std::fs::write(root.join("a/b/copy.txt"), b"one\ntwo\nleaked: tok_9f8e7d6c5b4a39281706\n").unwrap();
        std::fs::write(root.join("a/other.txt"), b"nothing here\n").unwrap();
        // Declared for another secret: a match there is not "declared" for ours.
        let other = d.path().join("other.env");
        std::fs::write(&other, b"X=tok_9f8e7d6c5b4a39281706\n").unwrap();
        let p = plan(vec![(declared.clone(), "s"), (other.clone(), "t")], vec![root.clone()]);
        let r = run(&p, &matcher(&[VALUE]));
        assert!(r.error.is_empty() && !r.truncated, "{r:?}");
        let found: Vec<(String, u32, bool)> = r.matches.iter().map(|m| (m.path.clone(), m.line, m.declared)).collect();
        assert_eq!(
            found,
            vec![
                // Declared files first, in path order; then the roots.
                (other.display().to_string(), 1, false),
                (declared.display().to_string(), 2, true),
                (root.join("a/b/copy.txt").display().to_string(), 3, false),
            ]
        );
        // The declared file under the root is read once.
        assert_eq!(r.files_scanned, 4, "{r:?}");
        assert_eq!(r.matches[1].version_id, "v0");
    }

    #[test]
    fn a_blind_scan_answers_salted_token_hmacs_per_file_and_no_match() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let declared = root.join("app.conf");
        std::fs::write(&declared, b"token = tok_9f8e7d6c5b4a39281706\nagain tok_9f8e7d6c5b4a39281706 short\n").unwrap();
        std::fs::write(root.join("copy.txt"), b"x\nleaked: \"tok_9f8e7d6c5b4a39281706\"\n").unwrap();
        let p = plan(vec![(declared.clone(), "s")], vec![root.clone()]);
        let key = blind_key(SALT).unwrap();
        let r = scan_blind(&p, &key, "scan-b", Instant::now() + Duration::from_secs(30), &AtomicBool::new(false));
        assert!(r.error.is_empty() && !r.truncated && r.matches.is_empty(), "{r:?}");
        let tag = hmac::sign(&key, VALUE).as_ref().to_vec();
        let files: Vec<(String, Vec<String>, Vec<u32>)> = r
            .blind_files
            .iter()
            .map(|f| {
                (
                    f.path.clone(),
                    f.declared_for.clone(),
                    f.tokens.iter().filter(|t| t.tag == tag).map(|t| t.line).collect(),
                )
            })
            .collect();
        assert_eq!(
            files,
            vec![
                // Each distinct token once per file, at its first line; "token",
                // "again" and "short" are under the minimum length.
                (declared.display().to_string(), vec!["s".to_string()], vec![1]),
                (root.join("copy.txt").display().to_string(), vec![], vec![2]),
            ]
        );
        assert_eq!(r.blind_files[0].tokens.len(), 1, "{r:?}");
        assert_eq!(r.blind_files[1].tokens.len(), 1, "{r:?}");
        assert!(blind_key(b"short").is_err());
    }

    #[test]
    fn skips_binary_large_special_and_outside_files_and_counts_them() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret.txt"), VALUE).unwrap();
        let mut bin = b"ELF\0\0".to_vec();
        bin.extend_from_slice(VALUE);
        std::fs::write(root.join("blob.bin"), &bin).unwrap();
        let mut big = vec![b'#'; 2 << 20];
        big.extend_from_slice(VALUE);
        std::fs::write(root.join("big.log"), &big).unwrap();
        symlink(&outside, root.join("link-out")).unwrap();
        symlink(root.join("inside.txt"), root.join("link-in")).unwrap();
        std::fs::write(root.join("inside.txt"), [VALUE, b"\n"].concat()).unwrap();
        symlink(d.path().join("nowhere"), root.join("broken")).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(root.join("socket")).unwrap();
        let p = plan(vec![(d.path().join("missing.conf"), "s")], vec![root.clone(), d.path().join("no-root")]);
        let r = run(&p, &matcher(&[VALUE]));
        // Only inside.txt matches (once: the symlink to it is the same file).
        let paths: Vec<&str> = r.matches.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(paths.len(), 1, "{r:?}");
        assert!(paths[0].ends_with("inside.txt") || paths[0].ends_with("link-in"), "{paths:?}");
        let count = |k: &str| r.skipped_counts.get(k).copied().unwrap_or(0);
        assert_eq!(count("binary"), 1, "{r:?}");
        assert_eq!(count("too_large"), 1, "{r:?}");
        assert_eq!(count("symlink_outside_root"), 1, "{r:?}");
        assert_eq!(count("missing"), 2, "declared file and root: {r:?}");
        assert_eq!(count("unreadable"), 1, "broken link: {r:?}");
        assert_eq!(count("special"), 1, "a socket: {r:?}");
        assert!(r.skipped.iter().any(|s| s.path.ends_with("big.log") && s.reason == "too_large"));
        assert_eq!(r.files_scanned, 1);
        assert!(!r.truncated);
    }

    #[test]
    fn the_agents_own_state_is_never_searched_and_declared_symlinks_are_followed() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        std::fs::create_dir_all(state.join("backups/s/1")).unwrap();
        std::fs::write(state.join("backups/s/1/app.conf"), VALUE).unwrap();
        let real = d.path().join("real.conf");
        std::fs::write(&real, [b"k=", VALUE].concat()).unwrap();
        let link = d.path().join("etc-app.conf");
        symlink(&real, &link).unwrap();
        let mut p = plan(vec![(link.clone(), "s")], vec![d.path().to_path_buf()]);
        p.exclude = vec![state.clone()];
        let r = run(&p, &matcher(&[VALUE]));
        let found: Vec<(&str, bool)> = r.matches.iter().map(|m| (m.path.as_str(), m.declared)).collect();
        assert_eq!(found, vec![(link.to_str().unwrap(), true)], "{r:?}");
        assert_eq!(r.skipped_counts["agent_state"], 1, "{r:?}");
        // A root inside the state dir is refused too.
        let mut p = plan(vec![], vec![state.join("backups")]);
        p.exclude = vec![state];
        let r = run(&p, &matcher(&[VALUE]));
        assert!(r.matches.is_empty() && r.skipped_counts["agent_state"] == 1, "{r:?}");
    }

    #[test]
    fn limits_truncate_and_say_which() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("1/2/3")).unwrap();
        std::fs::write(root.join("1/2/3/deep.txt"), VALUE).unwrap();
        for i in 0..5 {
            std::fs::write(root.join(format!("f{i}.txt")), VALUE).unwrap();
        }
        let m = matcher(&[VALUE]);
        let mut p = plan(vec![], vec![root.clone()]);
        p.limits.max_depth = 1;
        let r = run(&p, &m);
        assert!(r.truncated && r.limit.contains("max_depth 1"), "{r:?}");
        assert_eq!(r.matches.len(), 5);
        assert_eq!(r.skipped_counts["too_deep"], 1);

        p.limits.max_depth = 8;
        p.limits.max_files = 3;
        let r = run(&p, &m);
        assert!(r.truncated && r.limit.contains("max_files 3"), "{r:?}");
        assert_eq!(r.files_scanned, 3);

        p.limits.max_files = 100;
        let r = scan_files(&p, &m, "x", Instant::now(), &AtomicBool::new(false));
        assert!(r.truncated && r.limit.starts_with("timeout"), "{r:?}");
        assert_eq!(r.files_scanned, 0);
        let r = scan_files(&p, &m, "x", Instant::now() + Duration::from_secs(9), &AtomicBool::new(true));
        assert!(r.truncated && r.limit == "cancelled", "{r:?}");
    }

    #[test]
    fn matches_are_bounded() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("many.txt");
        let line = [VALUE, b"\n"].concat();
        std::fs::write(&f, line.repeat(MAX_MATCHES + 10)).unwrap();
        let r = run(&plan(vec![], vec![f]), &matcher(&[VALUE]));
        assert_eq!(r.matches.len(), MAX_MATCHES);
        assert!(r.truncated && r.limit.contains("max_matches"), "{r:?}");
    }

    #[tokio::test]
    async fn a_second_scan_while_one_runs_is_refused_and_results_go_up_the_session() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("app.conf");
        std::fs::write(&f, [b"k=", VALUE].concat()).unwrap();
        let config = AgentConfig::from_str(
            &d.path().join("agent.toml"),
            &format!(
                "state_dir = 's'\n[[secret]]\nname = 's'\n[[secret.file]]\npath = '{}'\nkind = 'replace'\n",
                f.display()
            ),
        )
        .unwrap();
        let scans = Scans::new(&config);
        let (tx, mut rx) = mpsc::channel(4);
        let req = ScanRequest {
            scan_id: "scan-a".into(),
            salt: SALT.to_vec(),
            targets: vec![target("s", "v1", VALUE)],
            timeout_ms: 5000,
            blind: false,
        };
        // Hold the slot as a running scan would.
        scans.busy.store(true, Ordering::Release);
        scans.spawn(ScanRequest { scan_id: "scan-b".into(), ..req.clone() }, tx.clone(), CancellationToken::new());
        let Some(agent_message::Msg::ScanResult(r)) = rx.recv().await.unwrap().msg else { panic!() };
        assert_eq!((r.scan_id.as_str(), r.error.as_str()), ("scan-b", "a scan is already running on this host"));
        scans.busy.store(false, Ordering::Release);

        scans.spawn(req, tx, CancellationToken::new());
        let Some(agent_message::Msg::ScanResult(r)) = rx.recv().await.unwrap().msg else { panic!() };
        assert_eq!(r.scan_id, "scan-a");
        assert_eq!(r.matches.len(), 1);
        assert!(r.matches[0].declared && r.matches[0].line == 1, "{r:?}");
        // The slot is free again.
        tokio::time::timeout(Duration::from_secs(5), async {
            while scans.busy.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
    }
}
