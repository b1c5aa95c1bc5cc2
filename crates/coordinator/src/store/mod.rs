//! The coordinator's durable state, in sled, behind a typed API so the engine
//! never sees sled (it can be replaced without touching callers).
//!
//! Trees: `meta` (CA certificate, sealed CA key, sealed DEK), `tokens` (join
//! tokens by id, secret part hashed), `agents` (registry by name), `revoked`
//! (certificate serial → agent or operator name), `operators` (certificate
//! serial → operator name: which serials are operator credentials issued here),
//! `operator_records` (operator name → [`OperatorRecord`]: role, serials, who
//! created and who revoked it). A serial in `operators` whose name has no
//! record (a store from before roles) is migrated at open to an `admin` record.
//! Every mutating call flushes before it returns: a caller that got `Ok` may
//! act on it (reply, deliver, revoke) knowing it survives a crash.

pub mod backend;
pub mod sled_backend;

use backend::Aborted;
pub use backend::{Backend, Entry, Tree, Txn};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sled_backend::SledBackend;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// A transaction met a concurrent one; the backend runs it again.
    #[error("transaction conflict (retried)")]
    Conflict,
    /// A transaction's closure refused to commit (nothing written).
    #[error("transaction aborted")]
    Aborted,
    #[error("database")]
    Postgres(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// This replica no longer holds the lease: another took over (epoch
    /// moved on) or it could not renew in time. Nothing was written.
    #[error("this coordinator is no longer the leader (lease epoch {epoch} lost): write refused")]
    Fenced { epoch: u64 },
    /// A follower tried to write (only the leader writes).
    #[error("this coordinator is a follower: only the leader writes to the store")]
    NotLeader,
    #[error("the store's schema is version {found}, newer than this rekeyd knows ({known}): upgrade rekeyd")]
    SchemaTooNew { found: u32, known: u32 },
    #[error("corrupt record in tree {tree} at key {key}")]
    Corrupt {
        tree: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Why [`Store::update_agent`] wrote nothing.
enum UpdateAbort<E> {
    Refused(E),
    Store(StoreError),
}

impl<E> From<StoreError> for UpdateAbort<E> {
    fn from(e: StoreError) -> Self {
        UpdateAbort::Store(e)
    }
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

/// What an operator may do. Ordered: each role may do everything the roles
/// before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorRole {
    /// Read-only: lists, status, reports, audit, alerts.
    Viewer,
    /// A viewer that also runs rotations, incidents, exclusions and scope scans.
    Rotator,
    /// Everything, including join tokens, agent revocation and operators.
    Admin,
}

impl OperatorRole {
    pub const ALL: [OperatorRole; 3] = [OperatorRole::Admin, OperatorRole::Rotator, OperatorRole::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            OperatorRole::Viewer => "viewer",
            OperatorRole::Rotator => "rotator",
            OperatorRole::Admin => "admin",
        }
    }

    /// Whether this role may do what `needed` may.
    pub fn allows(self, needed: OperatorRole) -> bool {
        self >= needed
    }
}

impl std::fmt::Display for OperatorRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for OperatorRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        OperatorRole::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown operator role {s:?}: expected admin, rotator or viewer"))
    }
}

/// An operator: a name with a role and the certificates issued to it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OperatorRecord {
    pub name: String,
    pub role: OperatorRole,
    /// Every certificate serial issued to this operator.
    pub serials: Vec<String>,
    /// 0 for an operator migrated from a store without roles.
    pub created_unix: i64,
    pub created_by: String,
    pub revoked_unix: Option<i64>,
    pub revoked_by: Option<String>,
}

/// Operator names: what a certificate URI, a table and an audit record carry
/// without surprises.
pub fn valid_operator_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && !name.starts_with(['-', '.'])
}

/// Who created the operators found in a store from before roles.
pub const MIGRATED_CREATOR: &str = "unknown (created before operator roles)";

/// Why an operator change was refused (nothing written).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OperatorRefused {
    #[error("operator {0} already exists (names are never reused, even after revocation)")]
    Exists(String),
    #[error("no operator named {0:?}")]
    Unknown(String),
    #[error("operator {name} was already revoked at {at} by {by}")]
    AlreadyRevoked { name: String, at: String, by: String },
}

/// Outcome of trying to redeem a join token.
#[derive(Debug, Clone, PartialEq)]
pub enum Redeem {
    Ok(TokenRecord),
    Unknown,
    AlreadyUsed { used_unix: i64 },
    Expired { expires_unix: i64 },
}

/// The typed store over one [`Backend`]. Cheap to clone (shared).
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
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
    /// The embedded sled store in `path` (created if missing).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::with_backend(Arc::new(SledBackend::open(path)?))
    }

    /// A store over any backend (migrations of old records run here).
    pub fn with_backend(backend: Arc<dyn Backend>) -> Result<Store, StoreError> {
        let store = Store { backend };
        store.migrate_operators()?;
        Ok(store)
    }

    pub fn backend_kind(&self) -> rekey_types::v1::StoreBackend {
        self.backend.kind()
    }

    /// A store from before roles knows operators only as serial → name: each
    /// such name becomes an `admin` record holding its serials.
    fn migrate_operators(&self) -> Result<(), StoreError> {
        let mut legacy: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (serial, name) in self.scan(Tree::Operators, b"")? {
            let name = String::from_utf8_lossy(&name).into_owned();
            if self.get(Tree::OperatorRecords, name.as_bytes())?.is_none() {
                legacy.entry(name).or_default().push(String::from_utf8_lossy(&serial).into_owned());
            }
        }
        for (name, serials) in legacy {
            let rec = OperatorRecord {
                name: name.clone(),
                role: OperatorRole::Admin,
                serials,
                created_unix: 0,
                created_by: MIGRATED_CREATOR.to_string(),
                revoked_unix: None,
                revoked_by: None,
            };
            self.put(Tree::OperatorRecords, name.as_bytes(), &encode(&rec))?;
        }
        Ok(())
    }

    /// Flushes, lets go of every handle, and returns once the backend has
    /// really released the store (sled: its background threads let go of the
    /// directory lock), so this process can open it again at once (tests,
    /// backup/restore, migrations). Every other clone must be dropped first.
    pub fn close(self) -> Result<(), StoreError> {
        self.backend.close()?;
        let sled_path =
            (self.backend.kind() == rekey_types::v1::StoreBackend::Sled).then(|| self.sled_path()).flatten();
        drop(self);
        match sled_path {
            Some(path) => SledBackend::wait_released(&path),
            None => Ok(()),
        }
    }

    fn sled_path(&self) -> Option<PathBuf> {
        self.backend.as_any().downcast_ref::<SledBackend>().map(|b| b.path().to_path_buf())
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.backend.flush()
    }

    // ---- the generic key-value layer (for the typed layers on top) ----

    pub fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.backend.get(tree, key)
    }

    /// Every entry whose key starts with `prefix`, in key order.
    pub fn scan(&self, tree: Tree, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        self.backend.scan(tree, prefix)
    }

    pub fn last(&self, tree: Tree) -> Result<Option<Entry>, StoreError> {
        self.backend.last(tree)
    }

    /// One durable write.
    pub fn put(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.transaction(true, |tx| tx.put(tree, key, value))
    }

    /// One durable removal.
    pub fn remove(&self, tree: Tree, key: &[u8]) -> Result<(), StoreError> {
        self.transaction(true, |tx| tx.remove(tree, key))
    }

    /// Runs `f` in one serializable transaction: committed (durably when
    /// `durable`) if it returns `Ok`, nothing written if it returns `Err`.
    /// `f` may run more than once (after a conflict); it must not act
    /// outside the transaction.
    pub fn transaction<T, E: From<StoreError>>(
        &self,
        durable: bool,
        mut f: impl FnMut(&mut dyn Txn) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut out: Option<Result<T, E>> = None;
        let r = self.backend.transaction(durable, &mut |tx| match f(tx) {
            Ok(v) => {
                out = Some(Ok(v));
                Ok(())
            }
            Err(e) => {
                out = Some(Err(e));
                Err(Aborted)
            }
        });
        match (r, out) {
            (Ok(()), Some(out)) | (Err(StoreError::Aborted), Some(out)) => out,
            (Err(e), _) => Err(e.into()),
            (Ok(()), None) => unreachable!("a committed transaction ran its closure"),
        }
    }

    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(Tree::Meta, key.as_bytes())
    }

    pub fn meta_put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.put(Tree::Meta, key.as_bytes(), value)
    }

    pub fn put_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.put(Tree::Tokens, t.id.as_bytes(), &encode(t))
    }

    pub fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.get(Tree::Tokens, id.as_bytes())?.map(|v| decode("tokens", id.as_bytes(), &v)).transpose()
    }

    /// Atomically checks and marks a token used. `secret_sha256` must already
    /// be the hash of the presented secret; compared in constant time.
    pub fn redeem_token(&self, id: &str, secret_sha256: &str, now: i64) -> Result<Redeem, StoreError> {
        self.transaction(true, |t| {
            let Some(raw) = t.get(Tree::Tokens, id.as_bytes())? else { return Ok(Redeem::Unknown) };
            let mut rec: TokenRecord = decode("tokens", id.as_bytes(), &raw)?;
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
            t.put(Tree::Tokens, id.as_bytes(), &encode(&rec))?;
            Ok(Redeem::Ok(rec))
        })
    }

    pub fn get_agent(&self, name: &str) -> Result<Option<AgentRecord>, StoreError> {
        self.get(Tree::Agents, name.as_bytes())?.map(|v| decode("agents", name.as_bytes(), &v)).transpose()
    }

    /// Changes one agent record atomically: `f` sees the stored record and
    /// either edits it (committed, and flushed when `durable`) or refuses
    /// with its own error (nothing written). A concurrent change — a
    /// revocation committed in between — makes the backend run `f` again on
    /// the new record, so no update is ever based on a stale read. `None`:
    /// no such agent.
    pub fn update_agent<T, E>(
        &self,
        name: &str,
        durable: bool,
        f: impl Fn(&mut AgentRecord) -> Result<T, E>,
    ) -> Result<Option<Result<T, E>>, StoreError> {
        let out = self.transaction(durable, |agents| {
            let Some(raw) = agents.get(Tree::Agents, name.as_bytes())? else { return Ok(None) };
            let mut rec: AgentRecord = decode("agents", name.as_bytes(), &raw)?;
            match f(&mut rec) {
                Ok(v) => {
                    agents.put(Tree::Agents, name.as_bytes(), &encode(&rec))?;
                    Ok(Some(v))
                }
                Err(e) => Err(UpdateAbort::Refused(e)),
            }
        });
        match out {
            Ok(v) => Ok(v.map(Ok)),
            Err(UpdateAbort::Refused(e)) => Ok(Some(Err(e))),
            Err(UpdateAbort::Store(e)) => Err(e),
        }
    }

    pub fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.scan(Tree::Agents, b"")?.into_iter().map(|(k, v)| decode("agents", &k, &v)).collect()
    }

    /// Records a (re-)enrollment: a previous enrollment of the same name has
    /// its certificates revoked, so a re-provisioned host cannot be impersonated
    /// by its old key.
    pub fn enroll_agent(&self, rec: &AgentRecord, _now: i64) -> Result<(), StoreError> {
        self.transaction(true, |t| {
            if let Some(old) = t.get(Tree::Agents, rec.name.as_bytes())? {
                let old: AgentRecord = decode("agents", rec.name.as_bytes(), &old)?;
                for s in &old.serials {
                    t.put(Tree::Revoked, s.as_bytes(), rec.name.as_bytes())?;
                }
            }
            t.put(Tree::Agents, rec.name.as_bytes(), &encode(rec))
        })
    }

    /// Marks the agent revoked and every certificate serial it was issued.
    /// Returns the updated record, or None for an unknown name.
    pub fn revoke_agent(&self, name: &str, by: &str, now: i64) -> Result<Option<AgentRecord>, StoreError> {
        self.transaction(true, |t| {
            let Some(raw) = t.get(Tree::Agents, name.as_bytes())? else { return Ok(None) };
            let mut rec: AgentRecord = decode("agents", name.as_bytes(), &raw)?;
            for s in &rec.serials {
                t.put(Tree::Revoked, s.as_bytes(), name.as_bytes())?;
            }
            if rec.revoked_unix.is_none() {
                rec.revoked_unix = Some(now);
                rec.revoked_by = Some(by.to_string());
            }
            t.put(Tree::Agents, name.as_bytes(), &encode(&rec))?;
            Ok(Some(rec))
        })
    }

    pub fn revoked_serials(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.scan(Tree::Revoked, b"")?.into_iter().map(|(k, _)| String::from_utf8_lossy(&k).into_owned()).collect())
    }

    /// Records a new operator and its first certificate serial, atomically;
    /// refused if the name was ever used.
    pub fn create_operator(&self, rec: &OperatorRecord) -> Result<Result<(), OperatorRefused>, StoreError> {
        self.transaction(true, |t| {
            if t.get(Tree::OperatorRecords, rec.name.as_bytes())?.is_some() {
                return Ok(Err(OperatorRefused::Exists(rec.name.clone())));
            }
            t.put(Tree::OperatorRecords, rec.name.as_bytes(), &encode(rec))?;
            for s in &rec.serials {
                t.put(Tree::Operators, s.as_bytes(), rec.name.as_bytes())?;
            }
            Ok(Ok(()))
        })
    }

    pub fn get_operator(&self, name: &str) -> Result<Option<OperatorRecord>, StoreError> {
        self.get(Tree::OperatorRecords, name.as_bytes())?
            .map(|v| decode("operator_records", name.as_bytes(), &v))
            .transpose()
    }

    /// The operator a certificate serial was issued to, if it was issued here.
    pub fn operator_by_serial(&self, serial: &str) -> Result<Option<OperatorRecord>, StoreError> {
        let Some(name) = self.get(Tree::Operators, serial.as_bytes())? else { return Ok(None) };
        self.get_operator(&String::from_utf8_lossy(&name))
    }

    /// Every operator, by name.
    pub fn list_operators(&self) -> Result<Vec<OperatorRecord>, StoreError> {
        self.scan(Tree::OperatorRecords, b"")?.into_iter().map(|(k, v)| decode("operator_records", &k, &v)).collect()
    }

    /// Marks the operator revoked and every serial it was issued, in one
    /// transaction. Returns the updated record.
    pub fn revoke_operator(
        &self,
        name: &str,
        by: &str,
        now: i64,
    ) -> Result<Result<OperatorRecord, OperatorRefused>, StoreError> {
        self.transaction(true, |t| {
            let Some(raw) = t.get(Tree::OperatorRecords, name.as_bytes())? else {
                return Ok(Err(OperatorRefused::Unknown(name.to_string())));
            };
            let mut rec: OperatorRecord = decode("operator_records", name.as_bytes(), &raw)?;
            if let (Some(at), Some(by)) = (rec.revoked_unix, rec.revoked_by.clone()) {
                return Ok(Err(OperatorRefused::AlreadyRevoked {
                    name: name.to_string(),
                    at: rekey_common::time::format_unix(at),
                    by,
                }));
            }
            for s in &rec.serials {
                t.put(Tree::Revoked, s.as_bytes(), format!("operator/{name}").as_bytes())?;
            }
            rec.revoked_unix = Some(now);
            rec.revoked_by = Some(by.to_string());
            t.put(Tree::OperatorRecords, name.as_bytes(), &encode(&rec))?;
            Ok(Ok(rec))
        })
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

    fn operator(name: &str, role: OperatorRole, serial: &str) -> OperatorRecord {
        OperatorRecord {
            name: name.into(),
            role,
            serials: vec![serial.into()],
            created_unix: 1,
            created_by: "operator/admin".into(),
            revoked_unix: None,
            revoked_by: None,
        }
    }

    #[test]
    fn operators_are_created_once_revoked_once_and_legacy_serials_read_as_admin() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A store from before roles: serial → name only.
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            db.open_tree("operators").unwrap().insert("0a", "admin").unwrap();
            db.flush().unwrap();
        }
        while sled_backend::lock_is_held(dir.path()) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let s = Store::open(dir.path()).unwrap();
        let admin = s.operator_by_serial("0a").unwrap().unwrap();
        assert_eq!(
            (admin.name.as_str(), admin.role, admin.serials.clone()),
            ("admin", OperatorRole::Admin, vec!["0a".into()])
        );
        assert_eq!(admin.created_by, MIGRATED_CREATOR);

        s.create_operator(&operator("ann", OperatorRole::Viewer, "0b")).unwrap().unwrap();
        let again = s.create_operator(&operator("ann", OperatorRole::Admin, "0c")).unwrap();
        assert_eq!(again, Err(OperatorRefused::Exists("ann".into())));
        assert!(s.operator_by_serial("0c").unwrap().is_none(), "a refused create wrote its serial");
        assert_eq!(s.operator_by_serial("0b").unwrap().unwrap().role, OperatorRole::Viewer);

        let rec = s.revoke_operator("ann", "operator/admin", 50).unwrap().unwrap();
        assert_eq!((rec.revoked_unix, rec.revoked_by.as_deref()), (Some(50), Some("operator/admin")));
        assert!(s.revoked_serials().unwrap().contains(&"0b".to_string()));
        let twice = s.revoke_operator("ann", "operator/admin", 60).unwrap().unwrap_err();
        assert!(matches!(twice, OperatorRefused::AlreadyRevoked { .. }), "{twice}");
        assert_eq!(s.revoke_operator("bob", "x", 1).unwrap(), Err(OperatorRefused::Unknown("bob".into())));
        // A revoked name is not reused.
        assert!(s.create_operator(&operator("ann", OperatorRole::Viewer, "0d")).unwrap().is_err());
        let names: Vec<String> = s.list_operators().unwrap().into_iter().map(|o| o.name).collect();
        assert_eq!(names, ["admin", "ann"]);
    }

    #[test]
    fn roles_are_ordered_and_spelled() {
        use OperatorRole::*;
        assert!(Admin.allows(Rotator) && Admin.allows(Viewer) && Rotator.allows(Viewer));
        assert!(!Viewer.allows(Rotator) && !Rotator.allows(Admin));
        for r in OperatorRole::ALL {
            assert_eq!(r.as_str().parse::<OperatorRole>().unwrap(), r);
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
        assert!("root".parse::<OperatorRole>().unwrap_err().contains("admin, rotator or viewer"));
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
            s.create_operator(&operator(&format!("op-{i}"), OperatorRole::Admin, &format!("{i:02}"))).unwrap().unwrap();
            s.close().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.operator_by_serial("19").unwrap().unwrap().name, "op-19");
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
