//! Backups of the coordinator's store: every tree, exported while rekeyd
//! runs or not, sealed under the master key (AES-256-GCM), and restored into
//! an empty data dir with a fresh checkpoint.
//!
//! Consistency: the export is taken between two reads of the audit chain's
//! head and retried until the head did not move, so every audited change
//! (rotations, revocations, enrollments, tokens, operator actions) is either
//! wholly in the backup or wholly after it. Unaudited bookkeeping (an agent's
//! last-seen time) may be a little newer than the head.

use crate::checkpoint::Checkpointer;
use crate::crypto::Key;
use crate::engine::state::EngineState;
use crate::store::{Store, StoreError, Tree};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const FORMAT: &str = "rekey-backup";
const SEAL_LABEL: &str = "rekey backup v1";

/// The key backups are sealed with: derived from the master key, so a
/// running rekeyd can seal one without keeping the master key itself, and a
/// backup opens only with the master key of its coordinator.
pub fn seal_key(master: &Key) -> Key {
    master.derive_key(SEAL_LABEL)
}
/// Exports tried before giving up on a store that keeps changing.
const ATTEMPTS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    State(#[from] crate::engine::state::StateError),
    #[error("cannot seal or open the backup")]
    Crypto(#[from] crate::crypto::CryptoError),
    #[error("the store kept changing during {ATTEMPTS} export attempts; try again")]
    Busy,
    #[error("{path} is not a rekey backup: {why}")]
    Format { path: PathBuf, why: String },
    #[error(
        "the data dir {data_dir} already holds a store: restore only into an empty data dir \
         (move {data_dir}/store away first, or pass --force to have it moved aside)"
    )]
    NotEmpty { data_dir: PathBuf },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error("{data_dir} is not initialized: nothing to back up")]
    NotInitialized { data_dir: PathBuf },
    #[error(
        "rekeyd is running on this data dir (its store is locked): use `rekey backup --out FILE` for an online backup, or stop rekeyd to restore"
    )]
    Running,
    #[error("cannot open the store: {0}")]
    Open(String),
}

/// What a backup file says about itself (readable without the master key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub format: String,
    pub version: u32,
    pub created_ms: i64,
    /// The audit chain's head at the time of the backup.
    pub audit_seq: u64,
    pub audit_hash: String,
}

#[derive(Serialize, Deserialize)]
struct FileFormat {
    #[serde(flatten)]
    summary: Summary,
    /// base64 of the sealed payload.
    sealed: String,
}

/// Every tree: (name, [(key, value)]), base64.
#[derive(Serialize, Deserialize)]
struct Payload {
    trees: Vec<(String, Vec<(String, String)>)>,
}

/// `rekeyd backup`: a sealed backup of a stopped coordinator's store. While
/// rekeyd runs, the store is locked: `rekey backup` asks the running one
/// (the admin service's `Backup` call, same format).
pub fn backup_offline(config: &crate::config::Config, out: &Path) -> Result<Summary, BackupError> {
    if !config.is_initialized() {
        return Err(BackupError::NotInitialized { data_dir: config.data_dir.clone() });
    }
    let master = crate::crypto::load_master_key(&config.master_key_file)?;
    let store = Store::open(&config.store_dir()).map_err(|e| match e {
        StoreError::Locked { .. } => BackupError::Running,
        other => BackupError::Store(other),
    })?;
    let (ca, _) = crate::pki::Ca::load_or_create(&store, &master).map_err(|e| BackupError::Open(e.to_string()))?;
    let state = EngineState::open(&store, ca.dek())?;
    let (summary, bytes) = export(&store, &state, &seal_key(&master))?;
    write(out, &bytes)?;
    Ok(summary)
}

/// `rekeyd restore`: the backup into this config's data dir (rekeyd stopped).
pub fn restore_offline(config: &crate::config::Config, file: &Path, force: bool) -> Result<Summary, BackupError> {
    if !crate::crypto::master_key_configured(&config.master_key_file) {
        return Err(BackupError::Open(format!(
            "no master key at {} (and REKEYD_MASTER_KEY unset): a backup opens only with the master key it was sealed under",
            config.master_key_file.display()
        )));
    }
    let master = crate::crypto::load_master_key(&config.master_key_file)?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| BackupError::Write { path: config.data_dir.clone(), source })?;
    if config.store_dir().exists() {
        // Fails with a clear message while a rekeyd holds it.
        Store::open(&config.store_dir())
            .map_err(|e| match e {
                StoreError::Locked { .. } => BackupError::Running,
                other => BackupError::Store(other),
            })?
            .close()?;
    }
    restore(file, &config.data_dir, &master, force)
}

/// A sealed backup of `store` (safe to call while rekeyd serves).
pub fn export(store: &Store, state: &EngineState, seal: &Key) -> Result<(Summary, Vec<u8>), BackupError> {
    for _ in 0..ATTEMPTS {
        let before = state.audit_head()?;
        let mut trees = Vec::new();
        for tree in Tree::ALL {
            let entries = store.scan(tree, b"")?.into_iter().map(|(k, v)| (B64.encode(k), B64.encode(v))).collect();
            trees.push((B64.encode(tree.name()), entries));
        }
        if state.audit_head()? != before {
            continue;
        }
        let payload = serde_json::to_vec(&Payload { trees }).expect("json");
        let summary = Summary {
            format: FORMAT.into(),
            version: 1,
            created_ms: rekey_common::time::now_unix_ms(),
            audit_seq: before.0,
            audit_hash: before.1,
        };
        let sealed = seal.seal(SEAL_LABEL, &payload)?;
        let file = FileFormat { summary: summary.clone(), sealed: B64.encode(sealed) };
        return Ok((summary, serde_json::to_vec_pretty(&file).expect("json")));
    }
    Err(BackupError::Busy)
}

/// Entries written per transaction while loading a backup.
const LOAD_BATCH: usize = 500;

/// Writes every tree of `payload` into `store`. A tree this rekeyd does not
/// know is refused unless empty (sled's default tree in old backups is).
fn load(store: &Store, payload: Payload, path: &Path) -> Result<(), BackupError> {
    let format = |why: String| BackupError::Format { path: path.to_path_buf(), why };
    let decode = |s: &str| B64.decode(s).map_err(|e| format(e.to_string()));
    for (name, entries) in payload.trees {
        let name = String::from_utf8_lossy(&decode(&name)?).into_owned();
        let Some(tree) = Tree::from_name(&name) else {
            if entries.is_empty() {
                continue;
            }
            return Err(format(format!("unknown tree {name:?} with {} entries", entries.len())));
        };
        let entries =
            entries.iter().map(|(k, v)| Ok((decode(k)?, decode(v)?))).collect::<Result<Vec<_>, BackupError>>()?;
        for chunk in entries.chunks(LOAD_BATCH) {
            store.transaction(true, |t| {
                for (k, v) in chunk {
                    t.put(tree, k, v)?;
                }
                Ok::<_, StoreError>(())
            })?;
        }
    }
    Ok(())
}

/// Writes a sealed backup file (0600, atomically).
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    crate::crypto::write_private(path, bytes).map_err(|source| BackupError::Write { path: path.to_path_buf(), source })
}

/// Reads a backup's summary without opening it.
pub fn summary(path: &Path) -> Result<Summary, BackupError> {
    Ok(read(path)?.summary)
}

fn read(path: &Path) -> Result<FileFormat, BackupError> {
    let bytes = std::fs::read(path).map_err(|source| BackupError::Read { path: path.to_path_buf(), source })?;
    let file: FileFormat = serde_json::from_slice(&bytes)
        .map_err(|e| BackupError::Format { path: path.to_path_buf(), why: e.to_string() })?;
    if file.summary.format != FORMAT || file.summary.version != 1 {
        return Err(BackupError::Format {
            path: path.to_path_buf(),
            why: format!("format {} version {}", file.summary.format, file.summary.version),
        });
    }
    Ok(file)
}

/// Restores `backup` into `data_dir` (whose store must be absent, or is moved
/// aside with `force`), then writes a checkpoint for the restored chain.
/// Nothing is written before the backup is opened with the master key.
pub fn restore(backup: &Path, data_dir: &Path, master: &Key, force: bool) -> Result<Summary, BackupError> {
    let file = read(backup)?;
    let sealed =
        B64.decode(&file.sealed).map_err(|e| BackupError::Format { path: backup.to_path_buf(), why: e.to_string() })?;
    let payload = seal_key(master).open(SEAL_LABEL, &sealed)?;
    let payload: Payload = serde_json::from_slice(payload.expose())
        .map_err(|e| BackupError::Format { path: backup.to_path_buf(), why: e.to_string() })?;
    let store_dir = data_dir.join("store");
    if store_dir.exists() {
        if !force {
            return Err(BackupError::NotEmpty { data_dir: data_dir.to_path_buf() });
        }
        let aside = data_dir.join(format!("store.replaced-{}", rekey_common::time::now_unix()));
        std::fs::rename(&store_dir, &aside).map_err(|source| BackupError::Write { path: aside, source })?;
    }
    let store = Store::open(&store_dir)?;
    load(&store, payload, backup)?;
    store.meta_put(crate::checkpoint::META_KEY, b"1")?;
    store.flush()?;
    Checkpointer::new(data_dir, master).record(file.summary.audit_seq, &file.summary.audit_hash)?;
    store.close()?;
    Ok(file.summary)
}
