//! The apply pipeline: what the agent does with a delivered secret version,
//! on this host, only as its own `agent.toml` declares.
//!
//! Per version, reported stage by stage:
//!
//! ```text
//! delivered → applied (files written) → restarted → healthy (+ keyed fingerprint)
//!     any failure → FAILED (reason) → restore every file, restart, re-check → ROLLED_BACK
//! ```
//!
//! - Nothing with a side effect happens before every file has been read and
//!   rendered: a broken template or a missing file fails with nothing touched.
//! - The journal (see [`journal`]) is written before each step; backups of
//!   the previous content are written before any declared file is replaced.
//!   [`Pipeline::recover`] undoes whatever an interrupted apply changed.
//! - Applies are serialized per secret. A duplicate delivery of the version
//!   being applied is ignored; a re-delivery of the version applied and
//!   healthy (same values) is answered `HEALTHY` without touching anything.
//! - Secret values live in [`SecretBytes`]; reports, logs and the journal
//!   carry names, paths, versions and fingerprints only.
//!
//! Every public operation returns the reports it made (also pushed to the
//! [`Outbox`] for the session), so tests and callers can see what happened.

pub mod actions;
mod batch;
pub mod chase;
pub mod files;
pub mod journal;
pub mod render;

use crate::config::{AgentConfig, FileConfig, HealthConfig, RestartConfig, SecretConfig};
use crate::outbox::Outbox;
use actions::{ActionError, CommandValues, HealthFailure};
use journal::{
    AppliedRecord, AppliedState, BackupMeta, FileMeta, FileRecord, FileStep, Journal, JournalStage, Op, PreviousRecord,
    Store,
};
use rand::Rng;
use rekey_common::error::{Chain, chain};
use rekey_common::secret::SecretBytes;
use rekey_common::time::now_unix_ms;
use rekey_proto::v1::{AppliedVersion, Delivery, Purge, Rollback, Stage, StageReport};
use render::{Fields, RenderError, Scrubber};
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A coordinator cannot make a host wait longer than this before restarting.
const MAX_JITTER: Duration = Duration::from_secs(15 * 60);

/// The pipeline could not start.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot use the agent state dir {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{field} ({path}) and {other_field} ({other_path}) are the same file: \
         a file may be declared only once, so that a rollback of one secret never undoes another's change"
    )]
    SameFile { field: String, path: PathBuf, other_field: String, other_path: PathBuf },
}

/// What identifies a declared file on this host: its device and inode, or
/// for a file not created yet, its directory's and its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum FileId {
    Inode(u64, u64),
    New(u64, u64, std::ffi::OsString),
}

/// At start: no two declared paths may reach the same file (`..`, a symlink
/// the config allows, a hard link). Resolution failures are only logged
/// here: the apply refuses that file with the reason, and a service user
/// must not be able to stop the agent by planting a link.
fn check_distinct_files(config: &AgentConfig) -> Result<(), PipelineError> {
    use std::os::unix::fs::MetadataExt;
    let mut seen: HashMap<FileId, (String, PathBuf)> = HashMap::new();
    for f in config.secrets.iter().flat_map(|s| &s.files) {
        let at = match chase::chase(&f.path, f.follow_symlinks) {
            Ok(at) => at,
            Err(e) => {
                tracing::warn!(path = %f.path.display(), field = %f.field, error = %Chain(&e), "declared file cannot be resolved; its applies will fail until this is fixed");
                continue;
            }
        };
        let id = match at.entry {
            Some(e) => FileId::Inode(e.dev, e.ino),
            None => match at.dir.metadata() {
                Ok(m) => FileId::New(m.dev(), m.ino(), at.name.clone()),
                Err(_) => continue,
            },
        };
        if let Some((other_field, other_path)) = seen.get(&id) {
            return Err(PipelineError::SameFile {
                field: f.field.clone(),
                path: f.path.clone(),
                other_field: other_field.clone(),
                other_path: other_path.clone(),
            });
        }
        seen.insert(id, (f.field.clone(), f.path.clone()));
    }
    Ok(())
}

/// Why a step failed. A report's error is this with its sources, on one line.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: files::FileError,
    },
    #[error("cannot render {path}")]
    Render {
        path: PathBuf,
        #[source]
        source: RenderError,
    },
    #[error("cannot set the owner of {path}: {field}: {message}")]
    Owner { path: PathBuf, field: String, message: String },
    #[error("cannot back up {path}")]
    Backup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot restore {path}")]
    Restore {
        path: PathBuf,
        #[source]
        source: files::FileError,
    },
    #[error("cannot record progress in {path}")]
    Journal {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot record the applied version in {path}")]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("restart failed")]
    Restart(#[source] ActionError),
    #[error("signal restart refused")]
    SignalTarget(#[source] ActionError),
    #[error(transparent)]
    Health(HealthFailure),
    #[error("its backups are gone: {why}")]
    NoBackup { why: String },
}

/// A declared file, read and rendered, not yet written.
struct Prepared {
    /// Where it was read: the opened directory and name it is written to.
    at: chase::Chased,
    before: Option<FileMeta>,
    old: Option<SecretBytes>,
    new: SecretBytes,
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
}

/// Makes the reports of one operation: logs each, pushes it to the outbox,
/// keeps a copy for the caller.
struct Reporter<'a> {
    outbox: &'a Outbox,
    rotation_id: String,
    secret: String,
    version_id: String,
    made: Vec<StageReport>,
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Unspecified => "unspecified",
        Stage::Delivered => "delivered",
        Stage::Applied => "applied",
        Stage::Restarted => "restarted",
        Stage::Healthy => "healthy",
        Stage::Failed => "failed",
        Stage::RolledBack => "rolled_back",
        Stage::Refused => "refused",
    }
}

impl<'a> Reporter<'a> {
    fn new(outbox: &'a Outbox, rotation_id: &str, secret: &str, version_id: &str) -> Self {
        Reporter {
            outbox,
            rotation_id: rotation_id.into(),
            secret: secret.into(),
            version_id: version_id.into(),
            made: Vec::new(),
        }
    }

    fn emit(&mut self, stage: Stage, fingerprint: String, error: String) {
        let (secret, version, rotation, name) = (&self.secret, &self.version_id, &self.rotation_id, stage_name(stage));
        match stage {
            Stage::Failed | Stage::Refused => {
                tracing::warn!(%secret, %version, %rotation, stage = name, %error, "stage report")
            }
            _ => tracing::info!(%secret, %version, %rotation, stage = name, "stage report"),
        }
        let r = StageReport {
            rotation_id: self.rotation_id.clone(),
            secret: self.secret.clone(),
            version_id: self.version_id.clone(),
            stage: stage as i32,
            fingerprint,
            error,
            at_unix_ms: now_unix_ms(),
        };
        self.outbox.push(r.clone());
        self.made.push(r);
    }

    fn stage(&mut self, stage: Stage) {
        self.emit(stage, String::new(), String::new());
    }

    fn healthy(&mut self, fingerprint: String) {
        self.emit(Stage::Healthy, fingerprint, String::new());
    }

    fn failed(&mut self, error: String) {
        self.emit(Stage::Failed, String::new(), error);
    }

    fn refused(&mut self, error: String) {
        self.emit(Stage::Refused, String::new(), error);
    }
}

/// Cloneable handle on the pipeline of one agent (one state dir).
#[derive(Clone)]
pub struct Pipeline {
    inner: Arc<Inner>,
}

struct Inner {
    config: AgentConfig,
    store: Store,
    outbox: Outbox,
    /// The cached `applied.json`; written through.
    applied: Mutex<AppliedState>,
    /// One lock per secret: applies, rollbacks and purges of a secret run one at a time.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// One lock per restart group: the same restart never runs twice at once.
    restart_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// (secret, version) deliveries being handled right now.
    in_flight: Mutex<HashSet<(String, String)>>,
    local_key: SecretBytes,
}

/// Marks a delivery in flight until dropped (also when its future is dropped).
struct InFlight<'a> {
    inner: &'a Inner,
    key: (String, String),
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.inner.in_flight.lock().expect("in-flight lock").remove(&self.key);
    }
}

fn report_error(e: &dyn std::error::Error, scrub: &Scrubber) -> String {
    scrub.scrub(&chain(e))
}

fn backup_set_name() -> String {
    format!("{}-{:04x}", now_unix_ms(), rand::rng().random::<u16>())
}

impl Pipeline {
    /// Opens the pipeline's state in the config's state dir (creating it).
    /// Call [`Pipeline::recover`] before handling deliveries.
    pub fn open(config: &AgentConfig, outbox: Outbox) -> Result<Pipeline, PipelineError> {
        check_distinct_files(config)?;
        let err = |source| PipelineError::StateDir { path: config.state_dir.clone(), source };
        let store = Store::open(&config.state_dir).map_err(err)?;
        let applied = store.load_applied().map_err(err)?;
        let local_key = store.local_key().map_err(err)?;
        for s in &config.secrets {
            if s.files.is_empty() && s.restart.is_none() && s.health.is_none() {
                tracing::warn!(
                    secret = %s.name,
                    "secret declares no file, restart or health check: its deliveries are acknowledged without any change on this host"
                );
            }
        }
        Ok(Pipeline {
            inner: Arc::new(Inner {
                config: config.clone(),
                store,
                outbox,
                applied: Mutex::new(applied),
                locks: Mutex::new(HashMap::new()),
                restart_locks: Mutex::new(HashMap::new()),
                in_flight: Mutex::new(HashSet::new()),
                local_key,
            }),
        })
    }

    pub fn config(&self) -> &AgentConfig {
        &self.inner.config
    }

    pub fn outbox(&self) -> &Outbox {
        &self.inner.outbox
    }

    /// What is applied and healthy, per declared secret (for `Hello.applied`).
    pub fn applied(&self) -> Vec<AppliedVersion> {
        let applied = self.inner.applied.lock().expect("applied lock");
        applied
            .secrets
            .iter()
            .filter(|(s, _)| self.inner.config.secret(s).is_some())
            .map(|(s, r)| AppliedVersion {
                secret: s.clone(),
                version_id: r.version_id.clone(),
                fingerprint: r.fingerprint.clone(),
            })
            .collect()
    }

    /// Why a secret is refused.
    pub fn undeclared(&self, secret: &str) -> String {
        format!("secret {secret} is not declared in {}", self.inner.config.path.display())
    }

    /// Reports `REFUSED` with `reason` (nothing else happens).
    pub fn refuse(&self, rotation_id: &str, secret: &str, version_id: &str, reason: String) -> Vec<StageReport> {
        let mut rep = Reporter::new(&self.inner.outbox, rotation_id, secret, version_id);
        rep.refused(reason);
        rep.made
    }

    fn lock_for(&self, secret: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner.locks.lock().expect("locks").entry(secret.to_string()).or_default().clone()
    }

    fn applied_record(&self, secret: &str) -> Option<AppliedRecord> {
        self.inner.applied.lock().expect("applied lock").secrets.get(secret).cloned()
    }

    /// Changes `applied.json` (written before the cache is updated).
    fn update_applied(&self, f: impl FnOnce(&mut AppliedState)) -> Result<(), StepError> {
        let mut applied = self.inner.applied.lock().expect("applied lock");
        let mut next = applied.clone();
        f(&mut next);
        self.inner
            .store
            .save_applied(&next)
            .map_err(|source| StepError::State { path: self.inner.store.applied_path(), source })?;
        *applied = next;
        Ok(())
    }

    fn journal(&self, j: &Journal) -> Result<(), StepError> {
        self.inner
            .store
            .write_journal(j)
            .map_err(|source| StepError::Journal { path: self.inner.store.journal_path(&j.secret), source })
    }

    /// Applies a delivered version. Returns the reports it made.
    pub async fn deliver(&self, d: Delivery) -> Vec<StageReport> {
        self.deliver_together(vec![d]).await
    }

    /// Records a healthy version (journal at `committing`), drops the
    /// backups it supersedes, ends the journal.
    fn commit(&self, j: &Journal) -> Result<(), StepError> {
        self.update_applied(|state| {
            let previous = state.secrets.get(&j.secret).and_then(|r| {
                if r.version_id == j.version_id {
                    r.previous.clone()
                } else {
                    Some(PreviousRecord {
                        version_id: r.version_id.clone(),
                        fingerprint: r.fingerprint.clone(),
                        local_fingerprint: r.local_fingerprint.clone(),
                    })
                }
            });
            state.secrets.insert(
                j.secret.clone(),
                AppliedRecord {
                    version_id: j.version_id.clone(),
                    rotation_id: j.rotation_id.clone(),
                    fingerprint: j.fingerprint.clone().unwrap_or_default(),
                    local_fingerprint: j.local_fingerprint.clone().unwrap_or_default(),
                    applied_at_ms: now_unix_ms(),
                    backup_dir: j.backup_dir.clone(),
                    previous,
                },
            );
        })?;
        // Older backup sets hold versions nothing can roll back to any more.
        let store = &self.inner.store;
        for set in store.backup_sets(&j.secret).unwrap_or_default() {
            if j.backup_dir.as_deref() != Some(set.as_str())
                && let Err(e) = store.remove_backup_set(&j.secret, &set)
            {
                tracing::warn!(secret = %j.secret, set = %set, error = %Chain(&e), "cannot remove a superseded backup");
            }
        }
        if let Err(e) = store.remove_journal(&j.secret) {
            tracing::warn!(secret = %j.secret, error = %Chain(&e), "cannot remove the journal of a completed apply");
        }
        Ok(())
    }

    /// Undoes one operation: [`Pipeline::undo_group`] of one.
    async fn undo(
        &self,
        secret: Option<&SecretConfig>,
        j: &mut Journal,
        values: CommandValues<'_>,
        scrub: &Scrubber,
    ) -> Result<(), String> {
        self.undo_group(&mut [(secret, j, values)], scrub).await.pop().expect("one result")
    }

    /// Puts a file back. The journal holds the path that was written (a
    /// followed symlink already expanded), so it is resolved again without
    /// following anything: a link planted since is refused, not written through.
    fn restore_file(&self, secret: &str, backup_dir: Option<&str>, rec: &FileRecord) -> Result<(), StepError> {
        let err = |e: files::FileError| StepError::Restore { path: rec.path.clone(), source: e };
        let at = chase::chase(&rec.path, false).map_err(|e| err(e.into()))?;
        match (&rec.before, &rec.backup, backup_dir) {
            (Some(meta), Some(b), Some(dir)) => {
                let content = self.inner.store.read_backup(secret, dir, b).map_err(|e| err(e.into()))?;
                files::replace(&at, content.expose(), meta.mode, Some(meta.uid), Some(meta.gid))
                    .map_err(|e| err(e.into()))
            }
            (Some(_), _, _) => Err(err(io::Error::new(io::ErrorKind::NotFound, "its backup is missing").into())),
            // It did not exist before the apply.
            (None, _, _) => files::remove(&at).map_err(|e| err(e.into())),
        }
    }

    /// A journal left by an earlier operation on this secret in this process
    /// (a dropped apply, or a restore that failed): undo it before anything else.
    async fn settle_leftover(&self, secret: &str) -> Result<(), String> {
        match self.inner.store.read_journal(secret) {
            Ok(None) => Ok(()),
            Ok(Some(j)) => {
                let version = j.version_id.clone();
                let reports = self.recover_one(j, "").await;
                if reports.iter().any(|r| r.stage == Stage::RolledBack as i32 || r.stage == Stage::Healthy as i32) {
                    Ok(())
                } else {
                    Err(format!(
                        "an earlier operation on secret {secret} (version {version}) could not be undone; see the agent log"
                    ))
                }
            }
            Err(e) => Err(format!("cannot read the journal of secret {secret}: {e}")),
        }
    }

    /// At start: undoes (or completes) whatever a crash interrupted, and
    /// reports it. Run before the first session.
    pub async fn recover(&self) -> Vec<StageReport> {
        let store = &self.inner.store;
        let mut made = Vec::new();
        let journals = match store.journals() {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(dir = %store.dir().display(), error = %Chain(&e), "cannot list the apply journals");
                return made;
            }
        };
        let mut interrupted: Vec<(String, Vec<Journal>)> = Vec::new();
        for item in journals {
            let j = match item {
                Ok(j) => j,
                Err((path, e)) => {
                    tracing::error!(
                        path = %path.display(), error = %Chain(&e),
                        "cannot read an apply journal; the files it names may need a manual check; moved aside"
                    );
                    let _ = std::fs::rename(&path, path.with_extension("damaged"));
                    continue;
                }
            };
            if j.op == Op::Apply && j.stage != JournalStage::Committing {
                // Undone with the other interrupted applies of its restart group.
                let key = self.inner.config.restart_group(&j.secret);
                match interrupted.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, js)) => js.push(j),
                    None => interrupted.push((key, vec![j])),
                }
                continue;
            }
            let lock = self.lock_for(&j.secret);
            let _serial = lock.lock().await;
            let restart = self.restart_lock(&self.inner.config.restart_group(&j.secret));
            let _restart = restart.lock().await;
            made.extend(self.recover_one(j, " by agent restart").await);
        }
        for (key, js) in interrupted {
            made.extend(self.recover_group(&key, js).await);
        }
        self.remove_orphan_backups();
        made
    }

    /// Interrupted applies of one restart group (a batch the agent was
    /// applying when it died): every file restored, one restart, one check.
    async fn recover_group(&self, key: &str, mut js: Vec<Journal>) -> Vec<StageReport> {
        js.sort_by(|a, b| a.secret.cmp(&b.secret));
        let mut _serial = Vec::with_capacity(js.len());
        for j in &js {
            _serial.push(self.lock_for(&j.secret).lock_owned().await);
        }
        let _restart = self.restart_lock(key).lock_owned().await;
        let none = Fields::default();
        let held: Vec<String> = js.iter().map(|j| j.previous_version_id.clone()).collect();
        let whats: Vec<String> = js
            .iter()
            .map(|j| {
                tracing::warn!(secret = %j.secret, version = %j.version_id, stage = j.stage.name(), "found an interrupted operation");
                format!("apply of {} interrupted by agent restart at stage {}", j.version_id, j.stage.name())
            })
            .collect();
        let mut reps: Vec<Reporter<'_>> =
            js.iter().map(|j| Reporter::new(&self.inner.outbox, &j.rotation_id, &j.secret, &j.version_id)).collect();
        let results = {
            let mut items: Vec<(Option<&SecretConfig>, &mut Journal, CommandValues<'_>)> = js
                .iter_mut()
                .zip(&held)
                .map(|(j, held)| {
                    let values = CommandValues {
                        version_id: held,
                        fields: &none,
                        source: "is not available when recovering an interrupted apply",
                    };
                    (self.inner.config.secret(&j.secret), j, values)
                })
                .collect();
            self.undo_group(&mut items, &Scrubber::default()).await
        };
        let mut made = Vec::new();
        for ((j, (rep, what)), result) in js.iter().zip(reps.iter_mut().zip(&whats)).zip(results) {
            match result {
                Ok(()) => {
                    rep.failed(format!("{what}; rolled back"));
                    rep.stage(Stage::RolledBack);
                }
                Err(e) => {
                    self.forget(&j.secret);
                    rep.failed(format!("{what}; rollback failed: {e}"));
                }
            }
            made.append(&mut rep.made);
        }
        made
    }

    async fn recover_one(&self, mut j: Journal, cause: &str) -> Vec<StageReport> {
        let mut rep = Reporter::new(&self.inner.outbox, &j.rotation_id, &j.secret, &j.version_id);
        let secret = self.inner.config.secret(&j.secret);
        let none = Fields::default();
        let held = j.previous_version_id.clone();
        let values = CommandValues {
            version_id: &held,
            fields: &none,
            source: "is not available when recovering an interrupted apply",
        };
        let scrub = Scrubber::default();
        let at = j.stage.name();
        tracing::warn!(secret = %j.secret, version = %j.version_id, stage = at, "found an interrupted operation");
        match (j.op, j.stage) {
            (Op::Apply, JournalStage::Committing) => match self.commit(&j) {
                Ok(()) => rep.healthy(j.fingerprint.clone().unwrap_or_default()),
                Err(e) => {
                    let what = format!("apply of {} interrupted{cause} at stage {at}", j.version_id);
                    match self.undo(secret, &mut j, values, &scrub).await {
                        Ok(()) => {
                            rep.failed(format!("{what}; cannot complete it: {}; rolled back", chain(&e)));
                            rep.stage(Stage::RolledBack);
                        }
                        Err(e2) => rep.failed(format!("{what}; rollback failed: {e2}")),
                    }
                }
            },
            (Op::Apply, _) => {
                let what = format!("apply of {} interrupted{cause} at stage {at}", j.version_id);
                match self.undo(secret, &mut j, values, &scrub).await {
                    Ok(()) => {
                        rep.failed(format!("{what}; rolled back"));
                        rep.stage(Stage::RolledBack);
                    }
                    Err(e) => {
                        self.forget(&j.secret);
                        rep.failed(format!("{what}; rollback failed: {e}"));
                    }
                }
            }
            (Op::Rollback, _) => {
                let what = format!("rollback of {} interrupted{cause}", j.version_id);
                let result = self.undo(secret, &mut j, values, &scrub).await;
                self.rolled_back_to_previous(&j.secret, &j.version_id);
                match result {
                    Ok(()) => rep.stage(Stage::RolledBack),
                    Err(e) => {
                        self.forget(&j.secret);
                        rep.failed(format!("{what}; rollback failed: {e}"));
                    }
                }
            }
        }
        rep.made
    }

    /// Nothing is known healthy for this secret any more.
    fn forget(&self, secret: &str) {
        if let Err(e) = self.update_applied(|s| {
            s.secrets.remove(secret);
        }) {
            tracing::error!(%secret, error = %Chain(&e), "cannot update the applied state");
        }
    }

    /// After a rollback of `version`: what was applied before it, if known.
    fn rolled_back_to_previous(&self, secret: &str, version: &str) {
        let result = self.update_applied(|s| {
            let Some(rec) = s.secrets.get(secret) else { return };
            if rec.version_id != version {
                return;
            }
            match rec.previous.clone() {
                Some(p) => {
                    s.secrets.insert(
                        secret.to_string(),
                        AppliedRecord {
                            version_id: p.version_id,
                            rotation_id: String::new(),
                            fingerprint: p.fingerprint,
                            local_fingerprint: p.local_fingerprint,
                            applied_at_ms: now_unix_ms(),
                            backup_dir: None,
                            previous: None,
                        },
                    );
                }
                None => {
                    s.secrets.remove(secret);
                }
            }
        });
        if let Err(e) = result {
            tracing::error!(%secret, error = %Chain(&e), "cannot update the applied state");
        }
    }

    /// Backup sets neither an applied version nor a journal refers to.
    fn remove_orphan_backups(&self) {
        let store = &self.inner.store;
        let applied = self.inner.applied.lock().expect("applied lock").clone();
        let Ok(rd) = std::fs::read_dir(store.dir().join("backups")) else { return };
        let keep: HashSet<(String, String)> = applied
            .secrets
            .iter()
            .filter_map(|(s, r)| r.backup_dir.clone().map(|b| (journal::file_key(s), b)))
            .collect();
        for secret_dir in rd.filter_map(|e| e.ok()) {
            let key = secret_dir.file_name().to_string_lossy().into_owned();
            let Ok(sets) = std::fs::read_dir(secret_dir.path()) else { continue };
            for set in sets.filter_map(|e| e.ok()) {
                let name = set.file_name().to_string_lossy().into_owned();
                if !keep.contains(&(key.clone(), name.clone())) {
                    tracing::info!(backup = %set.path().display(), "removing a backup nothing refers to");
                    let _ = std::fs::remove_dir_all(set.path());
                }
            }
        }
    }

    /// Undoes an applied version on the coordinator's request. A version that
    /// is not applied here is reported `ROLLED_BACK` with nothing done.
    pub async fn rollback(&self, r: Rollback) -> Vec<StageReport> {
        let mut rep = Reporter::new(&self.inner.outbox, &r.rotation_id, &r.secret, &r.version_id);
        let Some(secret) = self.inner.config.secret(&r.secret) else {
            rep.refused(self.undeclared(&r.secret));
            return rep.made;
        };
        let lock = self.lock_for(&r.secret);
        let _serial = lock.lock().await;
        let restart = self.restart_lock(&self.inner.config.restart_group(&r.secret));
        let _restart = restart.lock().await;
        if let Err(e) = self.settle_leftover(&r.secret).await {
            rep.failed(e);
            return rep.made;
        }
        let Some(rec) = self.applied_record(&r.secret).filter(|rec| rec.version_id == r.version_id) else {
            tracing::info!(secret = %r.secret, version = %r.version_id, "rollback of a version that is not applied here: nothing to undo");
            rep.stage(Stage::RolledBack);
            return rep.made;
        };
        let no_backup = |why: String| StepError::NoBackup { why };
        let meta = match rec.backup_dir.as_deref() {
            None if secret.files.is_empty() => None,
            None => {
                let e = no_backup("purged after the previous version was revoked".into());
                rep.failed(format!("cannot roll back {}: {}", r.version_id, chain(&e)));
                return rep.made;
            }
            Some(dir) => match self.inner.store.backup_meta(&r.secret, dir) {
                Ok(Some(m)) => Some(m),
                Ok(None) => {
                    let e = no_backup(format!("{} is missing", self.inner.store.backup_dir(&r.secret, dir).display()));
                    rep.failed(format!("cannot roll back {}: {}", r.version_id, chain(&e)));
                    return rep.made;
                }
                Err(e) => {
                    rep.failed(format!("cannot roll back {}: {e}", r.version_id));
                    return rep.made;
                }
            },
        };
        let mut j = Journal {
            op: Op::Rollback,
            secret: r.secret.clone(),
            rotation_id: r.rotation_id.clone(),
            version_id: r.version_id.clone(),
            previous_version_id: meta.as_ref().map(|m| m.holds_version.clone()).unwrap_or_default(),
            stage: JournalStage::RollingBack,
            backup_dir: rec.backup_dir.clone(),
            files: meta
                .map(|m| m.files.into_iter().map(|f| FileRecord { step: FileStep::Writing, ..f }).collect())
                .unwrap_or_default(),
            // The service runs the version being undone: restart it.
            restarted: true,
            fingerprint: None,
            local_fingerprint: None,
            started_at_ms: now_unix_ms(),
        };
        if let Err(e) = self.journal(&j) {
            rep.failed(format!("cannot roll back {}: {}", r.version_id, chain(&e)));
            return rep.made;
        }
        let none = Fields::default();
        let held = j.previous_version_id.clone();
        let values = CommandValues {
            version_id: &held,
            fields: &none,
            source: "is not available when the coordinator asks for a rollback",
        };
        let result = self.undo(Some(secret), &mut j, values, &Scrubber::default()).await;
        self.rolled_back_to_previous(&r.secret, &r.version_id);
        match result {
            Ok(()) => rep.stage(Stage::RolledBack),
            Err(e) => {
                self.forget(&r.secret);
                rep.failed(format!("rollback of {} failed: {e}", r.version_id));
            }
        }
        rep.made
    }

    /// Deletes the backups holding `version` (revoked at the provider).
    /// Returns how many backup sets were removed.
    pub async fn purge(&self, p: Purge) -> usize {
        if self.inner.config.secret(&p.secret).is_none() {
            tracing::warn!(secret = %p.secret, version = %p.version_id, "purge ignored: {}", self.undeclared(&p.secret));
            return 0;
        }
        let lock = self.lock_for(&p.secret);
        let _serial = lock.lock().await;
        let store = &self.inner.store;
        let mut removed = Vec::new();
        for set in store.backup_sets(&p.secret).unwrap_or_default() {
            match store.backup_meta(&p.secret, &set) {
                Ok(Some(m)) if m.holds_version == p.version_id => match store.remove_backup_set(&p.secret, &set) {
                    Ok(()) => removed.push(set),
                    Err(e) => {
                        tracing::error!(secret = %p.secret, set = %set, error = %Chain(&e), "cannot remove a backup")
                    }
                },
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(secret = %p.secret, set = %set, error = %Chain(&e), "cannot read a backup's meta.json")
                }
            }
        }
        if !removed.is_empty() {
            let result = self.update_applied(|s| {
                if let Some(rec) = s.secrets.get_mut(&p.secret)
                    && rec.backup_dir.as_ref().is_some_and(|b| removed.contains(b))
                {
                    rec.backup_dir = None;
                }
            });
            if let Err(e) = result {
                tracing::error!(secret = %p.secret, error = %Chain(&e), "cannot update the applied state");
            }
        }
        tracing::info!(secret = %p.secret, version = %p.version_id, removed = removed.len(), "purged the backups holding this version");
        removed.len()
    }
}

/// Reads and renders every declared file, checks a signal restart's target
/// and that the health check's expected text can be made for the new
/// version. No side effect.
fn prepare(
    secret: &SecretConfig,
    fields: &Fields,
    previous: &Fields,
    version_id: &str,
    previous_version: &str,
    scrub: &Scrubber,
) -> Result<Vec<Prepared>, StepError> {
    if let Some(RestartConfig { action: crate::config::RestartAction::Signal { pidfile, executable, .. }, .. }) =
        &secret.restart
    {
        actions::signal_target(pidfile, executable).map_err(StepError::SignalTarget)?;
    }
    if let Some(h) = &secret.health {
        let values = CommandValues { version_id, fields, source: "the new version does not carry" };
        actions::expected_text(&h.check, &values).map_err(|last| {
            StepError::Health(HealthFailure {
                target: actions::target(&h.check),
                last: scrub.scrub(&last),
                tries: 0,
                elapsed: Duration::ZERO,
            })
        })?;
    }
    secret.files.iter().map(|f| prepare_file(f, fields, previous, previous_version, scrub)).collect()
}

/// What writing a declared file would do, found without writing anything
/// (a preflight's dry run).
#[derive(Debug, Clone, PartialEq)]
pub struct FilePlan {
    /// The path that would be written (a followed symlink expanded).
    pub path: PathBuf,
    /// The file now; `None`: it does not exist and would be created.
    pub before: Option<FileMeta>,
    /// Mode and owner it would have (`None`: the agent's own).
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Resolves, reads and renders one declared file with `fields` (the
/// previous version's `previous`), exactly as an apply would, and writes
/// nothing. The error is one line, scrubbed of every value.
pub fn dry_run_file(
    f: &FileConfig,
    fields: &Fields,
    previous: &Fields,
    previous_version: &str,
    scrub: &Scrubber,
) -> Result<FilePlan, String> {
    let p = prepare_file(f, fields, previous, previous_version, scrub).map_err(|e| report_error(&e, scrub))?;
    Ok(FilePlan { path: p.at.path, before: p.before, mode: p.mode, uid: p.uid, gid: p.gid })
}

/// Reads one declared file (resolved by [`chase`]), renders its new content
/// and resolves the owner and mode it will have. No side effect.
fn prepare_file(
    f: &FileConfig,
    fields: &Fields,
    previous: &Fields,
    previous_version: &str,
    scrub: &Scrubber,
) -> Result<Prepared, StepError> {
    let cur = files::read_current(&f.path, f.follow_symlinks)
        .map_err(|source| StepError::Read { path: f.path.clone(), source })?;
    let new = render::render(&f.content, cur.content.as_ref(), fields, previous, previous_version, scrub)
        .map_err(|source| StepError::Render { path: f.path.clone(), source })?;
    let owner = |spec: &Option<crate::config::IdSpec>,
                 which: &str,
                 resolve: fn(&crate::config::IdSpec) -> Result<u32, String>,
                 existing: Option<u32>| {
        match spec {
            Some(s) => resolve(s).map(Some).map_err(|message| StepError::Owner {
                path: f.path.clone(),
                field: format!("{}.{which}", f.field),
                message,
            }),
            None => Ok(existing),
        }
    };
    let uid = owner(&f.owner, "owner", files::resolve_user, cur.meta.map(|m| m.uid))?;
    let gid = owner(&f.group, "group", files::resolve_group, cur.meta.map(|m| m.gid))?;
    let mode = f.mode.or(cur.meta.map(|m| m.mode)).unwrap_or(0o600);
    Ok(Prepared { at: cur.at, before: cur.meta.map(FileMeta::from), old: cur.content, new, mode, uid, gid })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rekey_proto::v1::SecretField;
    use std::path::Path;

    fn delivery(secret: &str, version: &str, value: &str, previous: Option<(&str, &str)>) -> Delivery {
        Delivery {
            rotation_id: "rot-1".into(),
            secret: secret.into(),
            version_id: version.into(),
            fields: vec![SecretField { name: "value".into(), value: value.as_bytes().to_vec() }],
            previous_version_id: previous.map(|p| p.0.to_string()).unwrap_or_default(),
            previous_fields: previous
                .map(|p| vec![SecretField { name: "value".into(), value: p.1.as_bytes().to_vec() }])
                .unwrap_or_default(),
            restart_jitter_ms: 0,
            fingerprint_key: b"fp-key".to_vec(),
        }
    }

    fn stages(r: &[StageReport]) -> Vec<&'static str> {
        r.iter().map(|r| stage_name(Stage::try_from(r.stage).unwrap())).collect()
    }

    fn setup(files: &str) -> (tempfile::TempDir, Pipeline) {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "state_dir = 'state'\n[[secret]]\nname = 'api'\n{}",
            files.replace("DIR", &dir.path().display().to_string())
        );
        let config = AgentConfig::from_str(&dir.path().join("agent.toml"), &text).unwrap();
        let p = Pipeline::open(&config, Outbox::new()).unwrap();
        (dir, p)
    }

    fn all_state_text(dir: &Path) -> String {
        let mut s = std::fs::read_to_string(dir.join("applied.json")).unwrap_or_default();
        for e in std::fs::read_dir(dir.join("journal")).unwrap() {
            s.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap());
        }
        s
    }

    /// The journal records steps, paths and versions, never a value; backups
    /// (which do hold the previous value) are 0600 in 0700 dirs.
    #[tokio::test]
    async fn journal_holds_no_value_and_backups_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, p) = setup(
            "[[secret.file]]\npath = 'DIR/app.env'\nkind = 'env-file'\nkeys = { API_KEY = 'value' }\n\
             [secret.health]\nkind = 'command'\ncommand = ['/bin/sh', '-c', 'if grep -q NEW-VALUE DIR/app.env; then cp DIR/state/journal/api.json DIR/journal-copy; exit 1; fi']\nretries = 1\n",
        );
        std::fs::write(dir.path().join("app.env"), "API_KEY=OLD-VALUE-111\n").unwrap();
        let reports = p.deliver(delivery("api", "v2", "NEW-VALUE-222", Some(("v1", "OLD-VALUE-111")))).await;
        assert_eq!(stages(&reports), ["delivered", "applied", "restarted", "failed", "rolled_back"]);
        assert!(
            reports[3].error.starts_with("health check command /bin/sh exited with status 1, 1 try over"),
            "{:?}",
            reports[3]
        );
        let journal = std::fs::read_to_string(dir.path().join("journal-copy")).unwrap();
        assert!(journal.contains("checking_health") && journal.contains("app.env"), "{journal}");
        assert!(!journal.contains("NEW-VALUE") && !journal.contains("OLD-VALUE"), "{journal}");
        assert_eq!(std::fs::read_to_string(dir.path().join("app.env")).unwrap(), "API_KEY=OLD-VALUE-111\n");

        // Succeeds with a passing check: a backup of the old value, private.
        let (dir, p) =
            setup("[[secret.file]]\npath = 'DIR/app.env'\nkind = 'env-file'\nkeys = { API_KEY = 'value' }\n");
        std::fs::write(dir.path().join("app.env"), "API_KEY=OLD-VALUE-111\n").unwrap();
        let reports = p.deliver(delivery("api", "v2", "NEW-VALUE-222", Some(("v1", "OLD-VALUE-111")))).await;
        assert_eq!(stages(&reports), ["delivered", "applied", "restarted", "healthy"]);
        let state = dir.path().join("state");
        let text = all_state_text(&state);
        assert!(!text.contains("VALUE-"), "{text}");
        let root = state.join("backups/api");
        let set = std::fs::read_dir(&root).unwrap().next().unwrap().unwrap().path();
        assert_eq!(std::fs::metadata(&set).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(set.join("0")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(set.join("0")).unwrap(), "API_KEY=OLD-VALUE-111\n");
        let meta = std::fs::read_to_string(set.join("meta.json")).unwrap();
        assert!(!meta.contains("VALUE-") && meta.contains("\"holds_version\": \"v1\""), "{meta}");
    }

    #[tokio::test]
    async fn new_files_are_0600_and_configured_mode_and_owner_apply() {
        use std::os::unix::fs::MetadataExt;
        let (dir, p) = setup(
            "[[secret.file]]\npath = 'DIR/new.conf'\nkind = 'template'\ntemplate = 'k={{ value }}'\n\
             [[secret.file]]\npath = 'DIR/owned.conf'\nkind = 'template'\ntemplate = 'k={{ value }}'\nmode = '0640'\nowner = 65534\ngroup = 65534\n",
        );
        let reports = p.deliver(delivery("api", "v1", "VALUE-1", None)).await;
        assert_eq!(stages(&reports), ["delivered", "applied", "restarted", "healthy"], "{reports:?}");
        let m = std::fs::metadata(dir.path().join("new.conf")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o600);
        let m = std::fs::metadata(dir.path().join("owned.conf")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o640);
        if nix::unistd::Uid::effective().is_root() {
            assert_eq!((m.uid(), m.gid()), (65534, 65534));
        }
        // A rollback of this first version removes the files it created.
        let r =
            p.rollback(Rollback { rotation_id: "rot-1".into(), secret: "api".into(), version_id: "v1".into() }).await;
        assert_eq!(stages(&r), ["rolled_back"]);
        assert!(!dir.path().join("new.conf").exists() && !dir.path().join("owned.conf").exists());
        assert!(p.applied().is_empty());
    }

    /// Two declared paths that reach one file — a symlink the config allows,
    /// a hard link — stop the agent at start, naming both entries.
    #[test]
    fn a_file_declared_twice_through_a_link_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("real.conf"), "x").unwrap();
        std::os::unix::fs::symlink("real.conf", d.join("link.conf")).unwrap();
        std::fs::hard_link(d.join("real.conf"), d.join("hard.conf")).unwrap();
        let secrets = |second: &str| {
            format!(
                "state_dir = 'state'\n[[secret]]\nname = 'a'\n[[secret.file]]\npath = 'DIR/real.conf'\nkind = 'replace'\n\
                 [[secret]]\nname = 'b'\n[[secret.file]]\n{second}\nkind = 'replace'\n"
            )
            .replace("DIR", &d.display().to_string())
        };
        for second in ["path = 'DIR/link.conf'\nfollow_symlinks = true", "path = 'DIR/hard.conf'"] {
            let config = AgentConfig::from_str(&d.join("agent.toml"), &secrets(second)).unwrap();
            let e = Pipeline::open(&config, Outbox::new()).err().unwrap().to_string();
            assert!(e.starts_with("secret[1].file[0] ("), "{e}");
            assert!(e.contains("and secret[0].file[0] (") && e.contains("are the same file"), "{e}");
        }
        // Not following the link, it is not the same file (and is refused at apply).
        let config = AgentConfig::from_str(&d.join("agent.toml"), &secrets("path = 'DIR/link.conf'")).unwrap();
        Pipeline::open(&config, Outbox::new()).unwrap();
        // A file not created yet is identified by its directory and name.
        let config = AgentConfig::from_str(&d.join("agent.toml"), &secrets("path = 'DIR/new.conf'")).unwrap();
        Pipeline::open(&config, Outbox::new()).unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::os::unix::fs::symlink("sub", d.join("sublink")).unwrap();
        let text =
            secrets("path = 'DIR/sublink/new.conf'\nfollow_symlinks = true").replace("real.conf", "sub/new.conf");
        let config = AgentConfig::from_str(&d.join("agent.toml"), &text).unwrap();
        let e = Pipeline::open(&config, Outbox::new()).err().unwrap().to_string();
        assert!(e.contains("are the same file"), "{e}");
    }

    #[tokio::test]
    async fn unknown_owner_fails_before_anything_is_written() {
        let (dir, p) = setup(
            "[[secret.file]]\npath = 'DIR/a.conf'\nkind = 'template'\ntemplate = '{{ value }}'\nowner = 'no-such-user-xyz'\n",
        );
        let reports = p.deliver(delivery("api", "v1", "VALUE-1", None)).await;
        assert_eq!(stages(&reports), ["delivered", "failed", "rolled_back"]);
        assert!(
            reports[1].error.contains("secret[0].file[0].owner: no user named no-such-user-xyz"),
            "{:?}",
            reports[1]
        );
        assert!(!dir.path().join("a.conf").exists());
    }
}
