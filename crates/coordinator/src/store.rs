//! The coordinator's durable state, in sled, behind a typed API so the engine
//! never sees sled (it can be replaced without touching callers).
//!
//! Trees: `meta` (CA certificate, sealed CA key, sealed DEK), `tokens` (join
//! tokens by id, secret part hashed), `agents` (registry by name), `revoked`
//! (certificate serial → agent name), `operators` (serial → operator name).
//! Every mutating call flushes before it returns: a caller that got `Ok` may
//! act on it (reply, deliver, revoke) knowing it survives a crash.

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path} is locked by another process (is another rekeyd running on this data dir?)")]
    Locked { path: PathBuf },
    #[error("cannot open store at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("store at {path} is still held {waited:?} after close (a clone of the store is still alive?)")]
    StillHeld { path: PathBuf, waited: std::time::Duration },
    #[error("store i/o")]
    Sled(#[from] sled::Error),
    #[error("corrupt record in tree {tree} at key {key}")]
    Corrupt {
        tree: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        }
    }
}

/// Why [`Store::update_agent`] wrote nothing.
enum UpdateAbort<E> {
    Refused(E),
    Store(StoreError),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenRecord {
    pub id: String,
    /// SHA-256 of the token's secret part, hex. The token itself is never stored.
    pub secret_sha256: String,
    pub host: String,
    pub labels: BTreeMap<String, String>,
    pub created_unix: i64,
    pub expires_unix: i64,
    pub created_by: String,
    pub used_unix: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct AgentRecord {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub enrolled_unix: i64,
    /// Serial of the newest certificate issued to this agent.
    pub cert_serial: String,
    pub cert_not_after_unix: i64,
    /// Every serial issued to this enrollment that may still be unexpired.
    pub serials: Vec<String>,
    pub agent_version: String,
    pub secrets: Vec<String>,
    pub last_seen_unix: i64,
    pub revoked_unix: Option<i64>,
    pub revoked_by: Option<String>,
}

/// Outcome of trying to redeem a join token.
#[derive(Debug, Clone, PartialEq)]
pub enum Redeem {
    Ok(TokenRecord),
    Unknown,
    AlreadyUsed { used_unix: i64 },
    Expired { expires_unix: i64 },
}

#[derive(Clone)]
pub struct Store {
    path: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    tokens: sled::Tree,
    agents: sled::Tree,
    revoked: sled::Tree,
    operators: sled::Tree,
}

/// How long [`Store::close`] waits for sled's threads to release the lock.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether some open file description holds sled's lock (an `flock` on the
/// `db` file, as sled takes it). A missing file is not locked.
fn lock_is_held(dir: &Path) -> bool {
    let Ok(file) = std::fs::OpenOptions::new().read(true).write(true).open(dir.join("db")) else {
        return false;
    };
    match file.try_lock() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        Err(std::fs::TryLockError::WouldBlock) => true,
        Err(std::fs::TryLockError::Error(_)) => false,
    }
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

fn decode<T: DeserializeOwned>(tree: &'static str, key: &[u8], v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|source| StoreError::Corrupt {
        tree,
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new().path(path).open().map_err(|source| {
            if lock_is_held(path) {
                StoreError::Locked { path: path.to_path_buf() }
            } else {
                StoreError::Open { path: path.to_path_buf(), source }
            }
        })?;
        Ok(Store {
            path: path.to_path_buf(),
            meta: db.open_tree("meta")?,
            tokens: db.open_tree("tokens")?,
            agents: db.open_tree("agents")?,
            revoked: db.open_tree("revoked")?,
            operators: db.open_tree("operators")?,
            db,
        })
    }

    /// Flushes, lets go of every handle, and returns once sled's background
    /// threads have really released the directory, so this process can open it
    /// again at once (tests, backup/restore, migrations). Dropping a `Store` is
    /// not enough: sled's flusher and I/O pool may hold the lock a little
    /// longer. Every other clone must be dropped first.
    pub fn close(self) -> Result<(), StoreError> {
        self.db.flush()?;
        let path = self.path.clone();
        drop(self);
        let start = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(1);
        while lock_is_held(&path) {
            if start.elapsed() > CLOSE_WAIT {
                return Err(StoreError::StillHeld { path, waited: start.elapsed() });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(50));
        }
        Ok(())
    }

    /// The underlying database, for subsystems that own further trees.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.get(key)?.map(|v| v.to_vec()))
    }

    pub fn meta_put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.meta.insert(key, value)?;
        self.flush()
    }

    pub fn put_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.tokens.insert(t.id.as_bytes(), encode(t))?;
        self.flush()
    }

    pub fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.tokens.get(id)?.map(|v| decode("tokens", id.as_bytes(), &v)).transpose()
    }

    /// Atomically checks and marks a token used. `secret_sha256` must already
    /// be the hash of the presented secret; compared in constant time.
    pub fn redeem_token(&self, id: &str, secret_sha256: &str, now: i64) -> Result<Redeem, StoreError> {
        let out = self.tokens.transaction(|t| {
            let Some(raw) = t.get(id)? else { return Ok(Redeem::Unknown) };
            let mut rec: TokenRecord =
                decode("tokens", id.as_bytes(), &raw).map_err(ConflictableTransactionError::Abort)?;
            if !constant_time_eq(rec.secret_sha256.as_bytes(), secret_sha256.as_bytes()) {
                return Ok(Redeem::Unknown);
            }
            if let Some(used_unix) = rec.used_unix {
                return Ok(Redeem::AlreadyUsed { used_unix });
            }
            if now >= rec.expires_unix {
                return Ok(Redeem::Expired { expires_unix: rec.expires_unix });
            }
            rec.used_unix = Some(now);
            t.insert(id.as_bytes(), encode(&rec))?;
            Ok(Redeem::Ok(rec))
        })?;
        self.flush()?;
        Ok(out)
    }

    pub fn get_agent(&self, name: &str) -> Result<Option<AgentRecord>, StoreError> {
        self.agents.get(name)?.map(|v| decode("agents", name.as_bytes(), &v)).transpose()
    }

    /// Changes one agent record atomically: `f` sees the stored record and
    /// either edits it (committed, and flushed when `durable`) or refuses
    /// with its own error (nothing written). A concurrent change — a
    /// revocation committed in between — makes sled run `f` again on the new
    /// record, so no update is ever based on a stale read. `None`: no such
    /// agent.
    pub fn update_agent<T, E>(
        &self,
        name: &str,
        durable: bool,
        f: impl Fn(&mut AgentRecord) -> Result<T, E>,
    ) -> Result<Option<Result<T, E>>, StoreError> {
        let out = self.agents.transaction(|agents| {
            let Some(raw) = agents.get(name.as_bytes())? else { return Ok(None) };
            let mut rec: AgentRecord = decode("agents", name.as_bytes(), &raw)
                .map_err(|e| ConflictableTransactionError::Abort(UpdateAbort::Store(e)))?;
            match f(&mut rec) {
                Ok(v) => {
                    agents.insert(name.as_bytes(), encode(&rec))?;
                    Ok(Some(v))
                }
                Err(e) => Err(ConflictableTransactionError::Abort(UpdateAbort::Refused(e))),
            }
        });
        let out = match out {
            Ok(v) => v.map(Ok),
            Err(TransactionError::Abort(UpdateAbort::Refused(e))) => return Ok(Some(Err(e))),
            Err(TransactionError::Abort(UpdateAbort::Store(e))) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(StoreError::Sled(e)),
        };
        if durable {
            self.flush()?;
        }
        Ok(out)
    }

    pub fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.agents
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode("agents", &k, &v)
            })
            .collect()
    }

    /// Records a (re-)enrollment: a previous enrollment of the same name has
    /// its certificates revoked, so a re-provisioned host cannot be impersonated
    /// by its old key.
    pub fn enroll_agent(&self, rec: &AgentRecord, now: i64) -> Result<(), StoreError> {
        (&self.agents, &self.revoked).transaction(|(agents, revoked)| {
            if let Some(old) = agents.get(rec.name.as_bytes())? {
                let old: AgentRecord =
                    decode("agents", rec.name.as_bytes(), &old).map_err(ConflictableTransactionError::Abort)?;
                for s in &old.serials {
                    revoked.insert(s.as_bytes(), rec.name.as_bytes())?;
                }
            }
            agents.insert(rec.name.as_bytes(), encode(rec))?;
            let _ = now;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })?;
        self.flush()
    }

    /// Marks the agent revoked and every certificate serial it was issued.
    /// Returns the updated record, or None for an unknown name.
    pub fn revoke_agent(&self, name: &str, by: &str, now: i64) -> Result<Option<AgentRecord>, StoreError> {
        let out = (&self.agents, &self.revoked).transaction(|(agents, revoked)| {
            let Some(raw) = agents.get(name.as_bytes())? else { return Ok(None) };
            let mut rec: AgentRecord =
                decode("agents", name.as_bytes(), &raw).map_err(ConflictableTransactionError::Abort)?;
            for s in &rec.serials {
                revoked.insert(s.as_bytes(), name.as_bytes())?;
            }
            if rec.revoked_unix.is_none() {
                rec.revoked_unix = Some(now);
                rec.revoked_by = Some(by.to_string());
            }
            agents.insert(name.as_bytes(), encode(&rec))?;
            Ok(Some(rec))
        })?;
        self.flush()?;
        Ok(out)
    }

    pub fn revoked_serials(&self) -> Result<Vec<String>, StoreError> {
        self.revoked.iter().keys().map(|k| Ok(String::from_utf8_lossy(&k?).into_owned())).collect()
    }

    pub fn put_operator(&self, serial: &str, name: &str) -> Result<(), StoreError> {
        self.operators.insert(serial.as_bytes(), name.as_bytes())?;
        self.flush()
    }

    pub fn is_operator_serial(&self, serial: &str) -> Result<bool, StoreError> {
        Ok(self.operators.contains_key(serial.as_bytes())?)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: &str, expires: i64) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            secret_sha256: "abc".into(),
            host: "web-1".into(),
            labels: BTreeMap::new(),
            created_unix: 0,
            expires_unix: expires,
            created_by: "operator/admin".into(),
            used_unix: None,
        }
    }

    #[test]
    fn tokens_redeem_once_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.put_token(&token("t1", 100)).unwrap();
        s.put_token(&token("t2", 100)).unwrap();
        assert_eq!(s.redeem_token("nope", "abc", 10).unwrap(), Redeem::Unknown);
        assert_eq!(s.redeem_token("t1", "abd", 10).unwrap(), Redeem::Unknown);
        assert!(matches!(s.redeem_token("t1", "abc", 10).unwrap(), Redeem::Ok(_)));
        assert_eq!(s.redeem_token("t1", "abc", 11).unwrap(), Redeem::AlreadyUsed { used_unix: 10 });
        assert_eq!(s.redeem_token("t2", "abc", 100).unwrap(), Redeem::Expired { expires_unix: 100 });
        // An expired token stays unused: redeeming it changed nothing.
        assert_eq!(s.get_token("t2").unwrap().unwrap().used_unix, None);
    }

    #[test]
    fn state_survives_reopen_and_revocation_covers_all_serials() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let rec = AgentRecord { name: "a".into(), serials: vec!["01".into(), "02".into()], ..Default::default() };
            s.enroll_agent(&rec, 1).unwrap();
            s.revoke_agent("a", "operator/admin", 5).unwrap().unwrap();
            assert!(s.revoke_agent("zzz", "x", 5).unwrap().is_none());
            s.close().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let a = s.get_agent("a").unwrap().unwrap();
        assert_eq!(a.revoked_unix, Some(5));
        assert_eq!(a.revoked_by.as_deref(), Some("operator/admin"));
        let mut r = s.revoked_serials().unwrap();
        r.sort();
        assert_eq!(r, vec!["01", "02"]);
    }

    #[test]
    fn close_releases_the_directory_and_a_held_lock_is_named() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..20 {
            let s = Store::open(dir.path()).unwrap();
            s.put_operator(&format!("{i:02}"), "admin").unwrap();
            s.close().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert!(s.is_operator_serial("19").unwrap());
        // While it is open, a second open says the lock is held, not "corrupt".
        let err = Store::open(dir.path()).err().expect("second open refused");
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("another rekeyd"), "{err}");
        // A clone still alive keeps the lock: close says so instead of lying.
        let clone = s.clone();
        let waited = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(clone);
        });
        s.close().unwrap();
        waited.join().unwrap();
        Store::open(dir.path()).unwrap().close().unwrap();
    }

    #[test]
    fn agent_updates_see_a_revocation_committed_after_their_caller_read() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let rec = AgentRecord { name: "a".into(), serials: vec!["01".into()], ..Default::default() };
        s.enroll_agent(&rec, 1).unwrap();
        // A session read the record before the revocation…
        let stale = s.get_agent("a").unwrap().unwrap();
        assert!(stale.revoked_unix.is_none());
        s.revoke_agent("a", "operator/admin", 5).unwrap().unwrap();
        // …its update runs on the stored record, sees the revocation, writes nothing.
        let r = s
            .update_agent("a", true, |rec| {
                if rec.revoked_unix.is_some() {
                    return Err("revoked");
                }
                rec.last_seen_unix = 99;
                Ok(())
            })
            .unwrap();
        assert_eq!(r, Some(Err("revoked")));
        let now = s.get_agent("a").unwrap().unwrap();
        assert_eq!((now.revoked_unix, now.last_seen_unix), (Some(5), 0));
        // An accepted change is committed; an unknown agent is None.
        let r = s.update_agent("a", false, |rec| {
            rec.secrets = vec!["x".into()];
            Ok::<_, ()>(7)
        });
        assert_eq!(r.unwrap(), Some(Ok(7)));
        assert_eq!(s.get_agent("a").unwrap().unwrap().secrets, vec!["x"]);
        assert_eq!(s.update_agent("zzz", true, |_| Ok::<_, ()>(())).unwrap(), None);
    }
}
