//! The store's checkpoint: the audit chain's head (sequence and hash) kept in
//! a small file beside the store, MACed with a key derived from the master
//! key, and rewritten after every flushed append to the chain.
//!
//! Every state change that matters appends to the audit chain in the same
//! transaction, so the chain's head is a cheap witness of how far the store
//! got. At start, a store whose chain is behind the checkpoint, disagrees
//! with it, or is broken is refused with what was lost and how to restore —
//! sled recovering an older state from a damaged file must not silently roll
//! the coordinator back (a completed rotation re-delivered, a revocation
//! forgotten).
//!
//! The checkpoint is written (atomically) only after the store is flushed, so
//! it is never ahead of durable state; a crash between the two leaves it
//! behind, which is safe. A missing checkpoint file is refused once the store says one was
//! written (the `checkpointed` meta key).

use crate::audit::{AuditRecord, GENESIS};
use crate::crypto::Key;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const LABEL: &str = "rekey checkpoint v1";
pub const FILE_NAME: &str = "checkpoint.json";
/// Meta key set (in the store) once a checkpoint file exists.
pub const META_KEY: &str = "checkpointed";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read the checkpoint {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path} is malformed or fails its MAC (tampered, or written under another master key)")]
    Invalid { path: PathBuf },
    #[error(
        "the store is missing its checkpoint {path}: the store says one was written. The data dir was altered; \
         restore the newest backup (rekeyd restore FILE)"
    )]
    Missing { path: PathBuf },
    #[error(
        "the store is behind its checkpoint: its audit chain ends at record {store_seq}, the checkpoint written at \
         {written} says record {checkpoint_seq} was committed. Records {first_lost}..={checkpoint_seq} and the state \
         they recorded are lost (a damaged or older copy of the store). Restore the newest backup (rekeyd restore \
         FILE); do not run on this store"
    )]
    Behind { store_seq: u64, checkpoint_seq: u64, first_lost: u64, written: String },
    #[error(
        "the store disagrees with its checkpoint: audit record {seq} has another hash than the one checkpointed. \
         Restore the newest backup (rekeyd restore FILE)"
    )]
    Diverged { seq: u64 },
    #[error(
        "the store's audit chain is broken at record {seq} ({problem}); restore the newest backup (rekeyd restore FILE)"
    )]
    Broken { seq: u64, problem: String },
    #[error("cannot write the checkpoint {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Body {
    seq: u64,
    hash: String,
    written_ms: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    #[serde(flatten)]
    body: Body,
    /// HMAC-SHA256 of the body's JSON, hex.
    mac: String,
}

/// Writes and checks the checkpoint of one data dir.
pub struct Checkpointer {
    path: PathBuf,
    key: ring::hmac::Key,
    /// The highest sequence written, so racing writers never move it back.
    last: Mutex<u64>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer").field("path", &self.path).finish()
    }
}

impl Checkpointer {
    pub fn new(data_dir: &Path, master: &Key) -> Checkpointer {
        let derived = master.derive(LABEL);
        Checkpointer {
            path: data_dir.join(FILE_NAME),
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref()),
            last: Mutex::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn mac(&self, body: &Body) -> String {
        let bytes = serde_json::to_vec(body).expect("json");
        hex::encode(ring::hmac::sign(&self.key, &bytes).as_ref())
    }

    /// Records that the store durably holds the chain up to `seq` / `hash`.
    /// Call only after the store was flushed.
    pub fn record(&self, seq: u64, hash: &str) -> Result<(), CheckpointError> {
        let mut last = self.last.lock().expect("checkpoint lock");
        if seq <= *last && *last != 0 {
            return Ok(());
        }
        let body = Body { seq, hash: hash.to_string(), written_ms: rekey_common::time::now_unix_ms() };
        let file = FileFormat { version: 1, mac: self.mac(&body), body };
        let text = serde_json::to_vec_pretty(&file).expect("json");
        rekey_common::fs::write_atomic(&self.path, &text, 0o600)
            .map_err(|source| CheckpointError::Write { path: self.path.clone(), source })?;
        *last = seq;
        Ok(())
    }

    /// The checkpoint on disk, if any, after checking its MAC.
    fn read(&self) -> Result<Option<Body>, CheckpointError> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CheckpointError::Read { path: self.path.clone(), source }),
        };
        let invalid = || CheckpointError::Invalid { path: self.path.clone() };
        let file: FileFormat = serde_json::from_slice(&text).map_err(|_| invalid())?;
        let expected = hex::decode(&file.mac).map_err(|_| invalid())?;
        let bytes = serde_json::to_vec(&file.body).expect("json");
        ring::hmac::verify(&self.key, &bytes, &expected).map_err(|_| invalid())?;
        Ok(Some(file.body))
    }

    /// Checks the store's audit chain against the checkpoint. `checkpointed`:
    /// the store says a checkpoint was written before.
    pub fn verify(&self, records: &[AuditRecord], checkpointed: bool) -> Result<(), CheckpointError> {
        let v = crate::audit::verify(records);
        if let Some((seq, problem)) = v.first_broken {
            return Err(CheckpointError::Broken { seq, problem });
        }
        let store_seq = records.last().map_or(0, |r| r.seq);
        let Some(cp) = self.read()? else {
            return if checkpointed { Err(CheckpointError::Missing { path: self.path.clone() }) } else { Ok(()) };
        };
        if store_seq < cp.seq {
            return Err(CheckpointError::Behind {
                store_seq,
                checkpoint_seq: cp.seq,
                first_lost: store_seq + 1,
                written: rekey_common::time::format_unix(cp.written_ms / 1000),
            });
        }
        let at = if cp.seq == 0 { GENESIS } else { records[(cp.seq - 1) as usize].hash.as_str() };
        if at != cp.hash {
            return Err(CheckpointError::Diverged { seq: cp.seq });
        }
        *self.last.lock().expect("checkpoint lock") = cp.seq;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditEntry;

    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let r = AuditRecord::seal(seq, 1000, AuditEntry::new("t", "x", serde_json::json!({ "n": seq })), &prev);
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    #[test]
    fn a_store_behind_or_beside_its_checkpoint_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let master = Key::generate().unwrap();
        let cp = Checkpointer::new(dir.path(), &master);
        let records = chain(111);
        // Nothing written yet, nothing claimed: a fresh store is fine.
        cp.verify(&records, false).unwrap();
        cp.record(111, &records[110].hash).unwrap();
        cp.verify(&records, true).unwrap();
        // An older copy of the store (96 of 111 records) is refused, naming the loss.
        let err = Checkpointer::new(dir.path(), &master).verify(&records[..96], true).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, CheckpointError::Behind { store_seq: 96, checkpoint_seq: 111, .. }), "{text}");
        assert!(text.contains("97..=111") && text.contains("rekeyd restore"), "{text}");
        // Another chain of the same length: diverged.
        let mut other = chain(111);
        other[110] = AuditRecord::seal(111, 2000, AuditEntry::new("t", "y", serde_json::json!({})), &other[109].hash);
        assert!(matches!(cp.verify(&other, true), Err(CheckpointError::Diverged { seq: 111 })));
        // A broken chain never passes, checkpoint or not.
        let mut broken = records.clone();
        broken[50].action = "edited".into();
        assert!(matches!(cp.verify(&broken, false), Err(CheckpointError::Broken { seq: 51, .. })));
        // Another master key cannot vouch for it; a deleted file is noticed.
        let stranger = Checkpointer::new(dir.path(), &Key::generate().unwrap());
        assert!(matches!(stranger.verify(&records, true), Err(CheckpointError::Invalid { .. })));
        std::fs::remove_file(cp.path()).unwrap();
        assert!(matches!(cp.verify(&records, true), Err(CheckpointError::Missing { .. })));
    }

    #[test]
    fn racing_writers_never_move_the_checkpoint_back() {
        let dir = tempfile::tempdir().unwrap();
        let master = Key::generate().unwrap();
        let cp = Checkpointer::new(dir.path(), &master);
        let records = chain(3);
        cp.record(3, &records[2].hash).unwrap();
        cp.record(2, &records[1].hash).unwrap();
        let fresh = Checkpointer::new(dir.path(), &master);
        fresh.verify(&records, true).unwrap();
        assert!(matches!(fresh.verify(&records[..2], true), Err(CheckpointError::Behind { checkpoint_seq: 3, .. })));
    }
}
