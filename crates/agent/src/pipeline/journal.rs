//! The pipeline's durable state, in the agent's state dir:
//!
//! - `journal/<secret>.json`: the apply (or rollback) in progress for a
//!   secret — stage, files with their backup paths, modes and owners,
//!   whether a restart began. Rewritten atomically *before* each step, so a
//!   crash at any instant leaves a record of what may have changed.
//! - `backups/<secret>/<attempt>/`: the previous content of each file
//!   (`0`, `1`, ... mode 0600, dirs 0700) and `meta.json` naming the version
//!   they hold, deleted when the coordinator purges that version or a later
//!   version supersedes it.
//! - `applied.json`: per secret, the version applied and healthy, its keyed
//!   fingerprint, and the backups that can undo it.
//! - `fingerprint.key` (0600): a local key to recognise a re-delivered value.
//!
//! None of these files holds a secret value except the backups (the previous
//! content of the declared files, kept private until purged).

use super::files::{self, Meta};
use rekey_common::fs;
use rekey_common::secret::SecretBytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// Where an operation stood. Each is written before the step it names begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalStage {
    /// Backups being written; no declared file touched yet.
    Prepared,
    /// Declared files being replaced.
    Applying,
    Restarting,
    CheckingHealth,
    /// Healthy; recording the result.
    Committing,
    RollingBack,
    /// Rolled back: every file is back (its backups gone) and the applied
    /// state says the previous version; the restart and the health check on
    /// those files are what remains.
    Restored,
}

impl JournalStage {
    pub fn name(self) -> &'static str {
        match self {
            JournalStage::Prepared => "prepared",
            JournalStage::Applying => "applying",
            JournalStage::Restarting => "restarting",
            JournalStage::CheckingHealth => "checking_health",
            JournalStage::Committing => "committing",
            JournalStage::RollingBack => "rolling_back",
            JournalStage::Restored => "restored",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// A delivered version being applied.
    Apply,
    /// A coordinator rollback of an applied version.
    Rollback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileStep {
    /// Not touched yet.
    Pending,
    /// May have been replaced: restore it on rollback.
    Writing,
}

/// One declared file in a journal or a backup set. Paths, metadata and the
/// backup's name: no content.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileRecord {
    pub path: PathBuf,
    /// Mode, owner and group before the apply; `None`: the file did not exist.
    pub before: Option<FileMeta>,
    /// The backup's file name inside the backup dir (when the file existed).
    pub backup: Option<String>,
    pub step: FileStep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl From<Meta> for FileMeta {
    fn from(m: Meta) -> Self {
        FileMeta { mode: m.mode, uid: m.uid, gid: m.gid }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Journal {
    pub op: Op,
    pub secret: String,
    pub rotation_id: String,
    pub version_id: String,
    /// The version the backups hold (what a rollback returns to).
    pub previous_version_id: String,
    pub stage: JournalStage,
    /// Name of the backup set under `backups/<secret>/`, if any file was declared.
    pub backup_dir: Option<String>,
    pub files: Vec<FileRecord>,
    /// A restart began: a rollback must restart again.
    pub restarted: bool,
    /// Set at `committing`.
    pub fingerprint: Option<String>,
    pub local_fingerprint: Option<String>,
    pub started_at_ms: i64,
}

/// `backups/<secret>/<attempt>/meta.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupMeta {
    pub secret: String,
    /// The version whose files these are.
    pub holds_version: String,
    /// The version whose apply made this backup.
    pub for_version: String,
    pub created_at_ms: i64,
    pub files: Vec<FileRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PreviousRecord {
    pub version_id: String,
    pub fingerprint: String,
    pub local_fingerprint: String,
}

/// A version applied and healthy on this host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AppliedRecord {
    pub version_id: String,
    pub rotation_id: String,
    /// Keyed with the delivery's fingerprint key: what HEALTHY reported.
    pub fingerprint: String,
    /// Keyed with this agent's own key: recognises a re-delivery of the same values.
    pub local_fingerprint: String,
    pub applied_at_ms: i64,
    /// The backup set that undoes this version (`None` once purged).
    pub backup_dir: Option<String>,
    /// What was applied before, if this agent applied it (restored by a rollback).
    pub previous: Option<PreviousRecord>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppliedState {
    pub secrets: BTreeMap<String, AppliedRecord>,
}

/// The pipeline's files in the state dir.
pub struct Store {
    dir: PathBuf,
}

/// A secret name as a file name: `/` and `.` and `%` escaped, so the mapping
/// is one to one and never `..`.
pub fn file_key(secret: &str) -> String {
    let mut s = String::with_capacity(secret.len());
    for c in secret.chars() {
        match c {
            '/' => s.push_str("%2F"),
            '.' => s.push_str("%2E"),
            '%' => s.push_str("%25"),
            c => s.push(c),
        }
    }
    s
}

fn damaged(path: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{} is damaged: {e}", path.display()))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    fs::write_atomic(path, &json, 0o600)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| damaged(path, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Store {
    /// Creates the pipeline's directories (0700) in `state_dir`.
    pub fn open(state_dir: &Path) -> io::Result<Store> {
        files::private_dir(state_dir)?;
        files::private_dir(&state_dir.join("journal"))?;
        files::private_dir(&state_dir.join("backups"))?;
        Ok(Store { dir: state_dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn journal_path(&self, secret: &str) -> PathBuf {
        self.dir.join("journal").join(format!("{}.json", file_key(secret)))
    }

    pub fn write_journal(&self, j: &Journal) -> io::Result<()> {
        write_json(&self.journal_path(&j.secret), j)
    }

    pub fn read_journal(&self, secret: &str) -> io::Result<Option<Journal>> {
        read_json(&self.journal_path(secret))
    }

    pub fn remove_journal(&self, secret: &str) -> io::Result<()> {
        fs::remove_durably(&self.journal_path(secret))
    }

    /// Every journal left behind, with the path of each that cannot be read.
    pub fn journals(&self) -> io::Result<Vec<Result<Journal, (PathBuf, io::Error)>>> {
        let mut out = Vec::new();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(self.dir.join("journal"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for p in paths {
            out.push(match read_json::<Journal>(&p) {
                Ok(Some(j)) => Ok(j),
                Ok(None) => continue,
                Err(e) => Err((p, e)),
            });
        }
        Ok(out)
    }

    pub fn backups_root(&self, secret: &str) -> PathBuf {
        self.dir.join("backups").join(file_key(secret))
    }

    pub fn backup_dir(&self, secret: &str, name: &str) -> PathBuf {
        self.backups_root(secret).join(name)
    }

    /// Writes the previous content of each file (0600) and the set's meta.json.
    pub fn write_backups(&self, meta: &BackupMeta, name: &str, contents: &[Option<&SecretBytes>]) -> io::Result<()> {
        let dir = self.backup_dir(&meta.secret, name);
        files::private_dir(&dir)?;
        for (rec, content) in meta.files.iter().zip(contents) {
            if let (Some(b), Some(c)) = (&rec.backup, content) {
                fs::write_atomic(&dir.join(b), c.expose(), 0o600)?;
            }
        }
        write_json(&dir.join("meta.json"), meta)
    }

    pub fn read_backup(&self, secret: &str, dir: &str, file: &str) -> io::Result<SecretBytes> {
        std::fs::read(self.backup_dir(secret, dir).join(file)).map(SecretBytes::new)
    }

    pub fn backup_meta(&self, secret: &str, dir: &str) -> io::Result<Option<BackupMeta>> {
        read_json(&self.backup_dir(secret, dir).join("meta.json"))
    }

    /// Names of the backup sets of a secret.
    pub fn backup_sets(&self, secret: &str) -> io::Result<Vec<String>> {
        match std::fs::read_dir(self.backups_root(secret)) {
            Ok(rd) => {
                let mut v: Vec<String> =
                    rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().into_string().ok()).collect();
                v.sort();
                Ok(v)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    pub fn remove_backup_set(&self, secret: &str, dir: &str) -> io::Result<()> {
        match std::fs::remove_dir_all(self.backup_dir(secret, dir)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn applied_path(&self) -> PathBuf {
        self.dir.join("applied.json")
    }

    pub fn load_applied(&self) -> io::Result<AppliedState> {
        Ok(read_json(&self.applied_path())?.unwrap_or_default())
    }

    pub fn save_applied(&self, state: &AppliedState) -> io::Result<()> {
        write_json(&self.applied_path(), state)
    }

    /// This agent's fingerprint key, made on first use.
    pub fn local_key(&self) -> io::Result<SecretBytes> {
        let path = self.dir.join("fingerprint.key");
        match std::fs::read(&path) {
            Ok(k) if k.len() == 32 => return Ok(SecretBytes::new(k)),
            Ok(_) => return Err(damaged(&path, "expected 32 bytes")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut k = vec![0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut k);
        let k = SecretBytes::new(k);
        fs::write_atomic(&path, k.expose(), 0o600)?;
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys_are_one_to_one_and_safe() {
        assert_eq!(file_key("api-key"), "api-key");
        assert_eq!(file_key("team/aws.prod"), "team%2Faws%2Eprod");
        assert_eq!(file_key(".."), "%2E%2E");
        assert_ne!(file_key("a/b"), file_key("a%2Fb"));
    }

    #[test]
    fn journal_and_state_round_trip_privately() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state")).unwrap();
        let j = Journal {
            op: Op::Apply,
            secret: "team/api".into(),
            rotation_id: "r1".into(),
            version_id: "v2".into(),
            previous_version_id: "v1".into(),
            stage: JournalStage::Applying,
            backup_dir: Some("1-ab".into()),
            files: vec![FileRecord {
                path: "/etc/app.env".into(),
                before: Some(FileMeta { mode: 0o640, uid: 0, gid: 0 }),
                backup: Some("0".into()),
                step: FileStep::Writing,
            }],
            restarted: false,
            fingerprint: None,
            local_fingerprint: None,
            started_at_ms: 1,
        };
        store.write_journal(&j).unwrap();
        let mode = std::fs::metadata(store.journal_path("team/api")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = store.read_journal("team/api").unwrap().unwrap();
        assert_eq!(back.stage, JournalStage::Applying);
        assert_eq!(store.journals().unwrap().len(), 1);
        store.remove_journal("team/api").unwrap();
        assert!(store.journals().unwrap().is_empty());

        let meta = BackupMeta {
            secret: "team/api".into(),
            holds_version: "v1".into(),
            for_version: "v2".into(),
            created_at_ms: 1,
            files: j.files.clone(),
        };
        let old = SecretBytes::new(b"OLD".to_vec());
        store.write_backups(&meta, "1-ab", &[Some(&old)]).unwrap();
        let f = store.backup_dir("team/api", "1-ab").join("0");
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        let d = store.backup_dir("team/api", "1-ab");
        assert_eq!(std::fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(store.read_backup("team/api", "1-ab", "0").unwrap().expose(), b"OLD");
        assert_eq!(store.backup_sets("team/api").unwrap(), vec!["1-ab"]);
        store.remove_backup_set("team/api", "1-ab").unwrap();
        assert!(store.backup_sets("team/api").unwrap().is_empty());

        let k1 = store.local_key().unwrap();
        assert_eq!(k1, store.local_key().unwrap());
    }
}
