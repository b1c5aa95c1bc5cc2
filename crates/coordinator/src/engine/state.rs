//! The engine's durable state, in the coordinator's store (any backend):
//! `rotations` (id → rotation without its hosts), `rotation_hosts`
//! (id NUL host → that host's status: one record per host, so a host event
//! rewrites one small record, not the whole rotation), `secrets` (name → current version, active and
//! last rotation), `versions` (secret/version → fields, sealed with the DEK),
//! `provider_state` (per-secret provider data, sealed), `audit` (the chain).
//!
//! A rotation and the audit records of its transition are written in one
//! transaction and flushed before the caller performs any side effect.

use super::machine::Rotation;
use crate::audit::{AuditEntry, AuditRecord, GENESIS};
use crate::crypto::Key;
use crate::store::{Store, StoreError, Tree, Txn};
use rekey_common::error::Chain;
use rekey_common::secret::SecretBytes;
use rekey_providers::{Fields, ProviderState};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("corrupt {what}: {message}")]
    Corrupt { what: String, message: String },
    #[error("secret {secret} already has an active rotation {rotation}")]
    AlreadyRotating { secret: String, rotation: String },
    #[error("cannot seal or open {0}")]
    Crypto(String),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SecretRecord {
    pub name: String,
    pub current_version: Option<String>,
    pub active_rotation: Option<String>,
    pub last_rotation: Option<String>,
    pub last_completed_ms: Option<i64>,
}

#[derive(Clone)]
pub struct EngineState {
    store: Store,
    dek: Arc<Key>,
    /// Told the chain's head after every flushed append (none in unit tests).
    checkpoint: Option<Arc<crate::checkpoint::Checkpointer>>,
    /// Bumped after every committed rotation change (campaigns wake on it).
    rotation_changes: Arc<tokio::sync::watch::Sender<u64>>,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StateError {
    StateError::Corrupt { what: what.to_string(), message: e.to_string() }
}

const AUDIT_HEAD: &[u8] = b"head";

impl EngineState {
    pub fn open(store: &Store, dek: Arc<Key>) -> Result<EngineState, StateError> {
        Ok(EngineState {
            store: store.clone(),
            dek,
            checkpoint: None,
            rotation_changes: Arc::new(tokio::sync::watch::Sender::new(0)),
        })
    }

    /// From now on every flushed append to the audit chain moves the
    /// checkpoint (verify the store against it first).
    pub fn with_checkpoint(mut self, cp: Arc<crate::checkpoint::Checkpointer>) -> EngineState {
        self.checkpoint = Some(cp);
        self
    }

    /// The audit chain's head as stored: (sequence, hash).
    pub fn audit_head(&self) -> Result<(u64, String), StateError> {
        Ok(match self.store.get(Tree::Audit, AUDIT_HEAD)? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| corrupt("audit head", e))?,
            None => (0, GENESIS.to_string()),
        })
    }

    /// Moves the checkpoint to the chain's new head. A failed
    /// checkpoint write leaves it behind the store (safe) and is logged.
    fn flush_audited(&self) -> Result<(), StateError> {
        if let Some(cp) = &self.checkpoint {
            let (seq, hash) = self.audit_head()?;
            if let Err(e) = cp.record(seq, &hash) {
                tracing::error!(error = %Chain(&e), "checkpoint not written");
            } else if self.store.meta_get(crate::checkpoint::META_KEY)?.is_none() {
                self.store.meta_put(crate::checkpoint::META_KEY, b"1")?;
            }
        }
        Ok(())
    }

    pub fn get_rotation(&self, id: &str) -> Result<Option<Rotation>, StateError> {
        self.store.get(Tree::Rotations, id.as_bytes())?.map(|v| self.assemble(id, &v)).transpose()
    }

    pub fn list_rotations(&self) -> Result<Vec<Rotation>, StateError> {
        self.store
            .scan(Tree::Rotations, b"")?
            .into_iter()
            .map(|(k, v)| self.assemble(&String::from_utf8_lossy(&k), &v))
            .collect()
    }

    /// A rotation's record with its hosts' records put back in.
    fn assemble(&self, id: &str, head: &[u8]) -> Result<Rotation, StateError> {
        let mut rot: Rotation = serde_json::from_slice(head).map_err(|e| corrupt(&format!("rotation {id}"), e))?;
        if rot.hosts_apart {
            for (k, v) in self.store.scan(Tree::RotationHosts, &host_key(id, ""))? {
                let host = String::from_utf8_lossy(&k[id.len() + 1..]).into_owned();
                let h = serde_json::from_slice(&v).map_err(|e| corrupt(&format!("rotation {id} host {host}"), e))?;
                rot.hosts.insert(host, h);
            }
        }
        Ok(rot)
    }

    pub fn get_secret(&self, name: &str) -> Result<SecretRecord, StateError> {
        Ok(match self.store.get(Tree::Secrets, name.as_bytes())? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| corrupt(&format!("secret {name}"), e))?,
            None => SecretRecord { name: name.to_string(), ..Default::default() },
        })
    }

    /// Registers a new rotation as the secret's active one (refused if one is active).
    pub fn begin(&self, rot: &Rotation, audit: Vec<AuditEntry>) -> Result<(), StateError> {
        let now = rot.created_ms;
        let (head, records) = whole(rot);
        self.store.transaction(true, |t| {
            let mut rec = secret_in(t, &rot.secret)?;
            if let Some(active) = &rec.active_rotation {
                return Err(StateError::AlreadyRotating { secret: rot.secret.clone(), rotation: active.clone() });
            }
            rec.active_rotation = Some(rot.id.clone());
            rec.last_rotation = Some(rot.id.clone());
            t.put(Tree::Secrets, rot.secret.as_bytes(), &serde_json::to_vec(&rec).expect("json"))?;
            t.put(Tree::Rotations, rot.id.as_bytes(), &head)?;
            for (k, v) in &records {
                t.put(Tree::RotationHosts, k, v)?;
            }
            append_audit(t, now, &audit)
        })?;
        self.flush_audited()
    }

    /// Persists the whole rotation (its record and every host's) with its
    /// audit records; see [`EngineState::commit_change`].
    pub fn commit(&self, rot: &Rotation, audit: Vec<AuditEntry>) -> Result<(), StateError> {
        let (head, _) = whole(rot);
        let hosts: Vec<&str> = rot.hosts.keys().map(String::as_str).collect();
        self.commit_change(rot, Some(&head), &hosts, audit)
    }

    /// Persists what one transition changed, with its audit records, in one
    /// transaction, durable before it returns: the rotation's own record
    /// when `head` is given (see [`Rotation::head_record`]) and the records
    /// of `hosts` only — O(1) bytes per host event, whatever the fleet size.
    /// When the rotation ended, releases the secret (and records the new
    /// current version when it completed).
    pub fn commit_change(
        &self,
        rot: &Rotation,
        head: Option<&[u8]>,
        hosts: &[&str],
        audit: Vec<AuditEntry>,
    ) -> Result<(), StateError> {
        self.change(true, rot, head, hosts, audit)?;
        self.flush_changes()
    }

    /// [`EngineState::commit_change`], committed but not necessarily durable
    /// yet (sled: until the next flush; PostgreSQL commits durably anyway).
    /// The caller must [`EngineState::flush_changes`] before acting on it:
    /// a batch of host reports shares one flush.
    pub fn stage_change(
        &self,
        rot: &Rotation,
        head: Option<&[u8]>,
        hosts: &[&str],
        audit: Vec<AuditEntry>,
    ) -> Result<(), StateError> {
        self.change(false, rot, head, hosts, audit)
    }

    /// Makes every staged change durable (one fsync for the batch), then
    /// tells whoever waits on rotation changes.
    pub fn flush_changes(&self) -> Result<(), StateError> {
        let flushed = self.store.flush().map_err(StateError::from).and_then(|()| self.flush_audited());
        self.rotation_changes.send_modify(|n| *n = n.wrapping_add(1));
        flushed
    }

    fn change(
        &self,
        durable: bool,
        rot: &Rotation,
        head: Option<&[u8]>,
        hosts: &[&str],
        audit: Vec<AuditEntry>,
    ) -> Result<(), StateError> {
        let now = rot.updated_ms;
        let records: Vec<HostRecord> = hosts
            .iter()
            .filter_map(|n| rot.hosts.get(*n).map(|h| (host_key(&rot.id, n), serde_json::to_vec(h).expect("json"))))
            .collect();
        self.store.transaction(durable, |t| {
            if let Some(head) = head {
                t.put(Tree::Rotations, rot.id.as_bytes(), head)?;
            }
            for (k, v) in &records {
                t.put(Tree::RotationHosts, k, v)?;
            }
            // Completed, or monitoring (the rotation's work is done; it only watches):
            // the secret is free for its next rotation.
            if rot.state.is_terminal() || rot.state == super::machine::RotationState::Monitoring {
                let mut rec = secret_in(t, &rot.secret)?;
                if rec.active_rotation.as_deref() == Some(rot.id.as_str()) {
                    rec.active_rotation = None;
                    if rot.leaves_new_current() {
                        rec.current_version = rot.new_version.clone();
                        rec.last_completed_ms = Some(rot.updated_ms);
                    }
                    t.put(Tree::Secrets, rot.secret.as_bytes(), &serde_json::to_vec(&rec).expect("json"))?;
                }
            }
            append_audit(t, now, &audit)
        })
    }

    /// Changes whenever a rotation's change is committed: a campaign starts
    /// its next secret as soon as a rollout slot frees, not on its next poll.
    pub fn rotation_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.rotation_changes.subscribe()
    }

    /// Writes an incident (campaign) and its audit records in one transaction.
    pub fn put_incident(&self, inc: &super::incident::Incident, audit: Vec<AuditEntry>) -> Result<(), StateError> {
        let now = rekey_common::time::now_unix_ms();
        self.store.transaction(true, |t| {
            t.put(Tree::Incidents, inc.id.as_bytes(), &serde_json::to_vec(inc).expect("json"))?;
            append_audit(t, now, &audit)
        })?;
        self.flush_audited()
    }

    pub fn get_incident(&self, id: &str) -> Result<Option<super::incident::Incident>, StateError> {
        self.store
            .get(Tree::Incidents, id.as_bytes())?
            .map(|v| serde_json::from_slice(&v).map_err(|e| corrupt(&format!("incident {id}"), e)))
            .transpose()
    }

    pub fn list_incidents(&self) -> Result<Vec<super::incident::Incident>, StateError> {
        self.store
            .scan(Tree::Incidents, b"")?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| corrupt("incident", e)))
            .collect()
    }

    /// Appends audit records outside a rotation (e.g. agent revocation).
    pub fn audit(&self, now_ms: i64, entries: Vec<AuditEntry>) -> Result<(), StateError> {
        self.store.transaction(true, |t| append_audit(t, now_ms, &entries))?;
        self.flush_audited()
    }

    pub fn audit_records(&self) -> Result<Vec<AuditRecord>, StateError> {
        self.store
            .scan(Tree::Audit, b"")?
            .into_iter()
            .filter(|(k, _)| k.as_slice() != AUDIT_HEAD)
            .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| corrupt("audit record", e)))
            .collect()
    }

    /// Overwrites one audit record as stored. Only for tests that prove
    /// tampering is detected.
    #[doc(hidden)]
    pub fn tamper_audit_record(&self, rec: &AuditRecord) -> Result<(), StateError> {
        Ok(self.store.put(Tree::Audit, &rec.seq.to_be_bytes(), &serde_json::to_vec(rec).expect("json"))?)
    }

    fn version_key(secret: &str, version: &str) -> String {
        format!("{secret}\u{0}{version}")
    }

    /// Stores a version's fields sealed with the DEK (before anyone refers to it).
    pub fn put_version(&self, secret: &str, version: &str, fields: &Fields) -> Result<(), StateError> {
        let plain: Vec<(&str, String)> = fields.iter().map(|(k, v)| (k.as_str(), hex::encode(v.expose()))).collect();
        let plain = SecretBytes::new(serde_json::to_vec(&plain).expect("json"));
        let key = Self::version_key(secret, version);
        let sealed = self
            .dek
            .seal(&format!("rekey/version/{key}"), plain.expose())
            .map_err(|e| StateError::Crypto(e.to_string()))?;
        Ok(self.store.put(Tree::Versions, key.as_bytes(), &sealed)?)
    }

    pub fn get_version(&self, secret: &str, version: &str) -> Result<Option<Fields>, StateError> {
        let key = Self::version_key(secret, version);
        let Some(sealed) = self.store.get(Tree::Versions, key.as_bytes())? else { return Ok(None) };
        let plain =
            self.dek.open(&format!("rekey/version/{key}"), &sealed).map_err(|e| StateError::Crypto(e.to_string()))?;
        let pairs: Vec<(String, String)> =
            serde_json::from_slice(plain.expose()).map_err(|e| corrupt("sealed version", e))?;
        pairs
            .into_iter()
            .map(|(k, v)| Ok((k, SecretBytes::new(hex::decode(v).map_err(|e| corrupt("sealed version", e))?))))
            .collect::<Result<Fields, StateError>>()
            .map(Some)
    }

    /// Stores a rotation's fingerprint key sealed with the DEK (before the
    /// rotation is committed).
    pub fn put_fingerprint_key(&self, rotation: &str, key: &[u8]) -> Result<(), StateError> {
        let sealed = self
            .dek
            .seal(&format!("rekey/fingerprint-key/{rotation}"), key)
            .map_err(|e| StateError::Crypto(e.to_string()))?;
        Ok(self.store.put(Tree::FingerprintKeys, rotation.as_bytes(), &sealed)?)
    }

    /// The key of a rotation's fingerprints: the sealed one, or for a
    /// rotation recorded before keys were sealed, the one in its record.
    pub fn fingerprint_key(&self, rot: &Rotation) -> Result<SecretBytes, StateError> {
        match self.store.get(Tree::FingerprintKeys, rot.id.as_bytes())? {
            Some(sealed) => self
                .dek
                .open(&format!("rekey/fingerprint-key/{}", rot.id), &sealed)
                .map_err(|e| StateError::Crypto(e.to_string())),
            None => Ok(SecretBytes::new(hex::decode(&rot.fingerprint_key).map_err(|e| corrupt("fingerprint key", e))?)),
        }
    }

    /// Forgets a revoked version's value.
    pub fn remove_version(&self, secret: &str, version: &str) -> Result<(), StateError> {
        Ok(self.store.remove(Tree::Versions, Self::version_key(secret, version).as_bytes())?)
    }

    /// The sealed key-value space given to the provider of `secret`.
    pub fn provider_state(&self, secret: &str) -> Arc<dyn ProviderState> {
        Arc::new(SealedProviderState {
            store: self.store.clone(),
            prefix: format!("{secret}\u{0}"),
            dek: self.dek.clone(),
        })
    }
}

/// A secret's record as the transaction sees it (a default one if none).
/// A host's (key, record) in `rotation_hosts`.
type HostRecord = (Vec<u8>, Vec<u8>);

/// A rotation's own record (hosts apart) and every host's (key, record).
fn whole(rot: &Rotation) -> (Vec<u8>, Vec<HostRecord>) {
    let mut head = rot.clone();
    head.hosts = Default::default();
    head.hosts_apart = true;
    let records = rot.hosts.iter().map(|(n, h)| (host_key(&rot.id, n), serde_json::to_vec(h).expect("json"))).collect();
    (serde_json::to_vec(&head).expect("json"), records)
}

/// A host's record: rotation id, NUL, host name (a prefix scan finds them all).
fn host_key(rotation: &str, host: &str) -> Vec<u8> {
    format!("{rotation}\u{0}{host}").into_bytes()
}

fn secret_in(t: &mut dyn Txn, name: &str) -> Result<SecretRecord, StateError> {
    Ok(match t.get(Tree::Secrets, name.as_bytes())? {
        Some(v) => serde_json::from_slice(&v).map_err(|e| corrupt("secret", e))?,
        None => SecretRecord { name: name.to_string(), ..Default::default() },
    })
}

/// Appends `entries` to the audit chain inside the caller's transaction.
pub(crate) fn append_audit(t: &mut dyn Txn, now_ms: i64, entries: &[AuditEntry]) -> Result<(), StateError> {
    if entries.is_empty() {
        return Ok(());
    }
    let (mut seq, mut prev) = match t.get(Tree::Audit, AUDIT_HEAD)? {
        Some(v) => serde_json::from_slice::<(u64, String)>(&v).map_err(|e| corrupt("audit head", e))?,
        None => (0, GENESIS.to_string()),
    };
    for e in entries {
        seq += 1;
        let rec = AuditRecord::seal(seq, now_ms, e.clone(), &prev);
        prev = rec.hash.clone();
        t.put(Tree::Audit, &seq.to_be_bytes(), &serde_json::to_vec(&rec).expect("json"))?;
    }
    t.put(Tree::Audit, AUDIT_HEAD, &serde_json::to_vec(&(seq, prev)).expect("json"))?;
    Ok(())
}

struct SealedProviderState {
    store: Store,
    prefix: String,
    dek: Arc<Key>,
}

impl ProviderState for SealedProviderState {
    fn get(&self, key: &str) -> Result<Option<SecretBytes>, String> {
        let k = format!("{}{key}", self.prefix);
        let Some(v) = self.store.get(Tree::ProviderState, k.as_bytes()).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        self.dek.open(&format!("rekey/provider/{k}"), &v).map(Some).map_err(|e| e.to_string())
    }
    fn put(&self, key: &str, value: &[u8]) -> Result<(), String> {
        let k = format!("{}{key}", self.prefix);
        let sealed = self.dek.seal(&format!("rekey/provider/{k}"), value).map_err(|e| e.to_string())?;
        self.store.put(Tree::ProviderState, k.as_bytes(), &sealed).map_err(|e| e.to_string())
    }
    fn remove(&self, key: &str) -> Result<(), String> {
        self.store.remove(Tree::ProviderState, format!("{}{key}", self.prefix).as_bytes()).map_err(|e| e.to_string())
    }
    fn keys(&self) -> Result<Vec<String>, String> {
        Ok(self
            .store
            .scan(Tree::ProviderState, self.prefix.as_bytes())
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[self.prefix.len()..]).into_owned())
            .collect())
    }
}

#[cfg(test)]
mod fingerprint_key_tests {
    use super::*;

    #[test]
    fn fingerprint_keys_are_sealed_apart_and_old_records_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let state = EngineState::open(&store, Arc::new(Key::generate().unwrap())).unwrap();
        let policy = super::super::machine::Policy::default();
        let key = [7u8; 32];
        // A rotation recorded before keys were sealed: its key is in the record.
        let old =
            Rotation::new("rot-old".into(), "s".into(), "op".into(), policy.clone(), None, vec![], hex::encode(key), 0);
        assert_eq!(state.fingerprint_key(&old).unwrap().expose(), &key);
        // Since: sealed in its own tree, nothing in the record.
        let new = Rotation::new("rot-new".into(), "s".into(), "op".into(), policy, None, vec![], String::new(), 0);
        let fresh = [9u8; 32];
        state.put_fingerprint_key(&new.id, &fresh).unwrap();
        assert_eq!(state.fingerprint_key(&new).unwrap().expose(), &fresh);
        assert!(!serde_json::to_string(&new).unwrap().contains("fingerprint_key"));
        let raw = store.get(Tree::FingerprintKeys, b"rot-new").unwrap().unwrap();
        assert!(!raw.windows(fresh.len()).any(|w| w == fresh), "stored in plaintext");
    }
}

#[cfg(test)]
mod host_record_tests {
    use super::*;
    use crate::engine::machine::{HostState, Policy};

    fn rotation(n: usize) -> Rotation {
        let names: Vec<String> = (1..=n).map(|i| format!("h{i}")).collect();
        Rotation::new("rot-1".into(), "s".into(), "op".into(), Policy::default(), None, vec![names], String::new(), 0)
    }

    fn open() -> (tempfile::TempDir, Store, EngineState) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let state = EngineState::open(&store, Arc::new(Key::generate().unwrap())).unwrap();
        (dir, store, state)
    }

    #[test]
    fn a_host_event_rewrites_that_hosts_record_and_nothing_else() {
        let (_dir, store, state) = open();
        let mut rot = rotation(1000);
        state.begin(&rot, vec![]).unwrap();
        assert_eq!(store.scan(Tree::RotationHosts, b"").unwrap().len(), 1000, "one record per host");
        let head = store.get(Tree::Rotations, b"rot-1").unwrap().unwrap();
        assert!(!String::from_utf8_lossy(&head).contains("\"history\""), "no host status in the rotation's record");
        let other = store.get(Tree::RotationHosts, &host_key("rot-1", "h8")).unwrap().unwrap();

        rot.hosts.get_mut("h7").unwrap().state = HostState::Healthy;
        state.stage_change(&rot, None, &["h7"], vec![]).unwrap();
        state.flush_changes().unwrap();
        assert_eq!(store.get(Tree::Rotations, b"rot-1").unwrap().unwrap(), head, "the rotation's record untouched");
        assert_eq!(store.get(Tree::RotationHosts, &host_key("rot-1", "h8")).unwrap().unwrap(), other);
        let back = state.get_rotation("rot-1").unwrap().unwrap();
        assert_eq!(back.hosts["h7"].state, HostState::Healthy);
        assert_eq!(back, rot, "record and host records read back as the rotation");
        assert_eq!(state.list_rotations().unwrap(), vec![rot]);
    }

    #[test]
    fn a_record_from_before_hosts_were_apart_reads_whole_and_moves_them_out_on_commit() {
        let (_dir, store, state) = open();
        let mut old = rotation(3);
        old.hosts_apart = false;
        store.put(Tree::Rotations, b"rot-1", &serde_json::to_vec(&old).unwrap()).unwrap();
        let back = state.get_rotation("rot-1").unwrap().unwrap();
        assert_eq!(back.hosts.len(), 3, "inline hosts still read");
        state.commit(&back, vec![]).unwrap();
        assert_eq!(store.scan(Tree::RotationHosts, b"").unwrap().len(), 3);
        let again = state.get_rotation("rot-1").unwrap().unwrap();
        assert!(again.hosts_apart);
        assert_eq!(again.hosts, old.hosts);
    }
}
