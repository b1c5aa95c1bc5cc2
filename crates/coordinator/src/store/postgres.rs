//! The shared backend: PostgreSQL, for several rekeyd replicas.
//!
//! Every tree is rows of one table (`rekey_kv (tree, key, value)`), so the
//! typed layers above are the same code on sled and here. Transactions run
//! at `SERIALIZABLE` and are retried on serialization failures, as sled
//! retries its optimistic ones. Commits are durable (synchronous commit).
//!
//! **Fencing.** While this replica leads, the first statement of every
//! transaction locks the lease row (`FOR SHARE`) and checks that it still
//! holds it under its epoch with time to spare. A replica that took over
//! bumped the epoch, so a deposed leader — paused, partitioned — can never
//! commit after it: its write fails with [`StoreError::Fenced`] and the
//! fence's `on_lost` hook runs (rekeyd exits at once; systemd restarts it as
//! a follower). A takeover waits for in-flight writes holding the share lock.
//!
//! **Threads.** Calls are synchronous, like sled's: each runs on this
//! backend's own small tokio runtime, and the caller waits on a channel — so
//! the backend may be called from any thread, inside a runtime or not.
//! A lost connection before commit is retried for up to [`DB_WAIT`] (the
//! leader waits for a restarting database); a failure *at* commit is
//! reported, never retried (it may have committed).

use super::StoreError;
use super::backend::{Aborted, Backend, Entry, Tree, Txn};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio_postgres::error::SqlState;
use tokio_postgres::{IsolationLevel, Row};

/// The schema this rekeyd writes. Migrations are applied in order at start;
/// a database with a newer version is refused.
pub const SCHEMA_VERSION: u32 = 1;

const MIGRATIONS: &[(u32, &str)] = &[(
    1,
    "CREATE TABLE rekey_kv (
         tree text NOT NULL,
         key bytea NOT NULL,
         value bytea NOT NULL,
         PRIMARY KEY (tree, key)
     );
     CREATE TABLE rekey_lease (
         id integer PRIMARY KEY CHECK (id = 1),
         holder text,
         address text,
         epoch bigint NOT NULL,
         renewed_at timestamptz,
         expires_at timestamptz NOT NULL
     );
     INSERT INTO rekey_lease (id, epoch, expires_at) VALUES (1, 0, 'epoch');
     CREATE TABLE rekey_replicas (
         id text PRIMARY KEY,
         address text NOT NULL,
         version text NOT NULL,
         last_seen timestamptz NOT NULL
     );",
)];

/// How long a call waits for a database that is down or restarting.
pub const DB_WAIT: Duration = Duration::from_secs(30);
/// Conflicting attempts of one transaction before giving up.
const MAX_ATTEMPTS: u32 = 200;

/// Who may write, and how writes are fenced.
#[derive(Debug, Clone, PartialEq)]
pub enum FenceMode {
    /// Offline tools (`rekeyd init`, `migrate`, `restore`): writes unfenced.
    Offline,
    /// A follower: reads only; every write is refused.
    Follower,
    /// The leader: every write checks the lease in its transaction.
    Leader {
        id: String,
        epoch: u64,
        /// A write needs at least this much lease left (so an act that
        /// follows a commit happens while the lease surely still holds).
        margin_ms: i64,
    },
}

/// The fencing state shared by the backend and the lease keeper.
pub struct Fence {
    mode: RwLock<FenceMode>,
    on_lost: Mutex<Option<LostHook>>,
}

/// What runs when a write finds the lease lost (given the lost epoch).
type LostHook = Box<dyn Fn(u64) + Send + Sync>;

impl Fence {
    pub fn new(mode: FenceMode) -> Arc<Fence> {
        Arc::new(Fence { mode: RwLock::new(mode), on_lost: Mutex::new(None) })
    }

    pub fn mode(&self) -> FenceMode {
        self.mode.read().expect("fence lock").clone()
    }

    pub fn set(&self, mode: FenceMode) {
        *self.mode.write().expect("fence lock") = mode;
    }

    /// Runs when a write finds the lease lost (rekeyd: exit at once).
    pub fn on_lost(&self, f: impl Fn(u64) + Send + Sync + 'static) {
        *self.on_lost.lock().expect("fence lock") = Some(Box::new(f));
    }

    pub(crate) fn lost(&self, epoch: u64) {
        if let Some(f) = self.on_lost.lock().expect("fence lock").as_ref() {
            f(epoch);
        }
    }
}

/// How to reach the database (from `[store]` in coordinator.toml).
#[derive(Clone)]
pub struct PgOptions {
    /// `postgres://USER@HOST:PORT/DB?sslmode=...` — never with a password.
    pub url: String,
    pub password: Option<rekey_common::secret::SecretBytes>,
    /// Roots for `sslmode=require|verify-ca|verify-full` (system roots if unset).
    pub ca_file: Option<std::path::PathBuf>,
    pub pool_size: usize,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions").field("url", &self.url).field("pool_size", &self.pool_size).finish()
    }
}

pub struct PgBackend {
    /// Always `Some` until dropped (then shut down without blocking, which
    /// is allowed even inside another runtime).
    rt: Option<tokio::runtime::Runtime>,
    pool: Pool,
    fence: Arc<Fence>,
    schema_version: u32,
}

fn pg_error(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Postgres(Box::new(e))
}

/// A conflict the transaction should be retried after.
fn is_conflict(e: &tokio_postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED)
}

/// The database went away (restart, network): worth waiting for.
fn is_unavailable(e: &StoreError) -> bool {
    match e {
        StoreError::Postgres(inner) => {
            if let Some(pe) = inner.downcast_ref::<tokio_postgres::Error>() {
                return pe.is_closed()
                    || pe.code().is_none()
                    || pe.code() == Some(&SqlState::ADMIN_SHUTDOWN)
                    || pe.code() == Some(&SqlState::CANNOT_CONNECT_NOW);
            }
            inner.downcast_ref::<deadpool_postgres::PoolError>().is_some()
        }
        _ => false,
    }
}

fn map_err(e: tokio_postgres::Error) -> StoreError {
    if is_conflict(&e) { StoreError::Conflict } else { pg_error(e) }
}

impl PgBackend {
    /// Connects, applies pending migrations (refusing a newer schema), and
    /// returns a backend whose writes follow `fence`.
    pub fn connect(opts: &PgOptions, fence: Arc<Fence>) -> Result<PgBackend, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("rekeyd-postgres")
            .enable_all()
            .build()
            .map_err(pg_error)?;
        let pool = {
            let _guard = rt.enter();
            build_pool(opts)?
        };
        let mut b = PgBackend { rt: Some(rt), pool, fence, schema_version: 0 };
        b.schema_version = b.call(migrate)?;
        Ok(b)
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime present until drop")
    }

    pub fn schema_version(&self) -> u32 {
        self.schema_version
    }

    pub fn fence(&self) -> &Arc<Fence> {
        &self.fence
    }

    /// Runs `f` on the backend's runtime with a pooled connection and waits
    /// for it, retrying while the database is unavailable (up to [`DB_WAIT`]).
    pub(crate) fn call<T: Send + 'static>(&self, f: impl PgCall<T>) -> Result<T, StoreError> {
        self.call_until(Instant::now() + DB_WAIT, f)
    }

    /// As [`PgBackend::call`], without waiting for an unavailable database
    /// (the lease keeper must notice at once).
    pub(crate) fn call_once<T: Send + 'static>(&self, f: impl PgCall<T>) -> Result<T, StoreError> {
        self.call_until(Instant::now(), f)
    }

    fn call_until<T: Send + 'static>(&self, deadline: Instant, f: impl PgCall<T>) -> Result<T, StoreError> {
        let f = Arc::new(f);
        loop {
            let (tx, rx) = sync_channel(1);
            let (pool, f2) = (self.pool.clone(), f.clone());
            self.rt().spawn(async move {
                let r = match pool.get().await {
                    Ok(mut c) => f2(&mut c).await,
                    Err(e) => Err(pg_error(e)),
                };
                let _ = tx.send(r);
            });
            let r = rx.recv().map_err(|_| pg_error(std::io::Error::other("postgres worker stopped")))?;
            match r {
                Err(e) if is_unavailable(&e) && Instant::now() < deadline => {
                    tracing::warn!(error = %rekey_common::error::Chain(&e), "database unavailable; waiting");
                    std::thread::sleep(Duration::from_millis(250));
                }
                other => return other,
            }
        }
    }
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// What [`PgBackend::call`] runs: a function of a pooled client returning a
/// boxed future that borrows it.
pub(crate) trait PgCall<T>:
    for<'c> Fn(&'c mut tokio_postgres::Client) -> futures_box::Boxed<'c, Result<T, StoreError>> + Send + Sync + 'static
{
}

impl<T, F> PgCall<T> for F where
    F: for<'c> Fn(&'c mut tokio_postgres::Client) -> futures_box::Boxed<'c, Result<T, StoreError>>
        + Send
        + Sync
        + 'static
{
}

/// A boxed future borrowing a client (what [`PgBackend::call`] runs).
pub(crate) mod futures_box {
    pub type Boxed<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
}

fn build_pool(opts: &PgOptions) -> Result<Pool, StoreError> {
    use std::str::FromStr;
    let mut cfg = tokio_postgres::Config::from_str(&opts.url).map_err(pg_error)?;
    if let Some(pw) = &opts.password {
        cfg.password(pw.expose());
    }
    cfg.connect_timeout(Duration::from_secs(5));
    cfg.application_name("rekeyd");
    let mgr_cfg = ManagerConfig { recycling_method: RecyclingMethod::Fast };
    let mgr = match cfg.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => Manager::from_config(cfg, tokio_postgres::NoTls, mgr_cfg),
        _ => Manager::from_config(cfg, tls_connector(opts)?, mgr_cfg),
    };
    Pool::builder(mgr)
        .max_size(opts.pool_size.max(1))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(pg_error)
}

/// rustls (ring) with the configured roots, or the system's.
fn tls_connector(opts: &PgOptions) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    match &opts.ca_file {
        Some(path) => {
            let pem = std::fs::read_to_string(path).map_err(pg_error)?;
            let what = format!("store.ca_file {}", path.display());
            for cert in rekey_common::tls::certs_from_pem(&pem, &what).map_err(pg_error)? {
                roots.add(cert).map_err(pg_error)?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(pg_error)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Applies what is missing, under an advisory lock (replicas starting at
/// once apply each migration once). Returns the schema version.
fn migrate(c: &mut tokio_postgres::Client) -> futures_box::Boxed<'_, Result<u32, StoreError>> {
    Box::pin(async move {
        let tx = c.transaction().await.map_err(map_err)?;
        tx.batch_execute(
            "SELECT pg_advisory_xact_lock(7277034461);
             CREATE TABLE IF NOT EXISTS rekey_schema (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now(),
                 rekeyd_version text NOT NULL
             );",
        )
        .await
        .map_err(map_err)?;
        let row = tx.query_one("SELECT coalesce(max(version), 0) FROM rekey_schema", &[]).await.map_err(map_err)?;
        let found = row.get::<_, i32>(0) as u32;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew { found, known: SCHEMA_VERSION });
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
            tx.batch_execute(sql).await.map_err(map_err)?;
            tx.execute(
                "INSERT INTO rekey_schema (version, rekeyd_version) VALUES ($1, $2)",
                &[&(*version as i32), &env!("CARGO_PKG_VERSION")],
            )
            .await
            .map_err(map_err)?;
            tracing::info!(version, "applied store schema migration");
        }
        tx.commit().await.map_err(map_err)?;
        Ok(SCHEMA_VERSION.max(found))
    })
}

/// The smallest key greater than every key starting with `prefix`
/// (`None`: no upper bound).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn entry(r: &Row) -> Entry {
    (r.get(0), r.get(1))
}

/// One operation inside a transaction, sent to the task holding it.
enum Op {
    Get(Tree, Vec<u8>),
    Put(Tree, Vec<u8>, Vec<u8>),
    Remove(Tree, Vec<u8>),
    Commit,
    Rollback,
}

type Reply = Result<Option<Vec<u8>>, StoreError>;

struct PgTxn {
    ops: tokio::sync::mpsc::UnboundedSender<(Op, SyncSender<Reply>)>,
    writable: bool,
    conflict: bool,
    failed: Option<StoreError>,
}

impl PgTxn {
    fn send(&mut self, op: Op) -> Reply {
        let (tx, rx) = sync_channel(1);
        self.ops.send((op, tx)).map_err(|_| pg_error(std::io::Error::other("transaction task ended")))?;
        let r = rx.recv().map_err(|_| pg_error(std::io::Error::other("transaction task ended")))?;
        match &r {
            Err(StoreError::Conflict) => self.conflict = true,
            Err(e) if is_unavailable(e) => self.failed = Some(pg_error(std::io::Error::other(e.to_string()))),
            _ => {}
        }
        r
    }
}

impl Txn for PgTxn {
    fn get(&mut self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.send(Op::Get(tree, key.to_vec()))
    }
    fn put(&mut self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if !self.writable {
            return Err(StoreError::NotLeader);
        }
        self.send(Op::Put(tree, key.to_vec(), value.to_vec())).map(|_| ())
    }
    fn remove(&mut self, tree: Tree, key: &[u8]) -> Result<(), StoreError> {
        if !self.writable {
            return Err(StoreError::NotLeader);
        }
        self.send(Op::Remove(tree, key.to_vec())).map(|_| ())
    }
}

/// Holds one transaction open on a pooled connection and runs its ops.
async fn txn_task(
    pool: Pool,
    fence: FenceMode,
    mut ops: tokio::sync::mpsc::UnboundedReceiver<(Op, SyncSender<Reply>)>,
    ready: SyncSender<Result<(), StoreError>>,
) {
    let mut client = match pool.get().await {
        Ok(c) => c,
        Err(e) => return drop(ready.send(Err(pg_error(e)))),
    };
    let tx = match client.build_transaction().isolation_level(IsolationLevel::Serializable).start().await {
        Ok(tx) => tx,
        Err(e) => return drop(ready.send(Err(map_err(e)))),
    };
    if let FenceMode::Leader { id, epoch, margin_ms } = &fence {
        let held = tx
            .query_opt(
                "SELECT 1 FROM rekey_lease WHERE id = 1 AND holder = $1 AND epoch = $2
                   AND expires_at > clock_timestamp() + make_interval(secs => $3::float8 / 1000.0) FOR SHARE",
                &[id, &(*epoch as i64), &(*margin_ms as f64)],
            )
            .await;
        match held {
            Ok(Some(_)) => {}
            Ok(None) => return drop(ready.send(Err(StoreError::Fenced { epoch: *epoch }))),
            Err(e) => return drop(ready.send(Err(map_err(e)))),
        }
    }
    if ready.send(Ok(())).is_err() {
        return;
    }
    while let Some((op, reply)) = ops.recv().await {
        let r = match op {
            Op::Get(t, k) => tx
                .query_opt("SELECT value FROM rekey_kv WHERE tree = $1 AND key = $2", &[&t.name(), &k])
                .await
                .map(|r| r.map(|r| r.get(0)))
                .map_err(map_err),
            Op::Put(t, k, v) => tx
                .execute(
                    "INSERT INTO rekey_kv (tree, key, value) VALUES ($1, $2, $3)
                     ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value",
                    &[&t.name(), &k, &v],
                )
                .await
                .map(|_| None)
                .map_err(map_err),
            Op::Remove(t, k) => tx
                .execute("DELETE FROM rekey_kv WHERE tree = $1 AND key = $2", &[&t.name(), &k])
                .await
                .map(|_| None)
                .map_err(map_err),
            Op::Commit => {
                let r = tx.commit().await.map(|_| None).map_err(map_err);
                let _ = reply.send(r);
                return;
            }
            Op::Rollback => {
                let _ = tx.rollback().await;
                let _ = reply.send(Ok(None));
                return;
            }
        };
        let _ = reply.send(r);
    }
}

impl PgBackend {
    /// One attempt: open, run `f`, commit. `Ok(true)`: committed;
    /// `Ok(false)`: retry (a conflict, or the database came back).
    fn attempt(&self, f: &mut dyn FnMut(&mut dyn Txn) -> Result<(), Aborted>) -> Result<bool, StoreError> {
        let mode = self.fence.mode();
        let (ops_tx, ops_rx) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = sync_channel(1);
        self.rt().spawn(txn_task(self.pool.clone(), mode.clone(), ops_rx, ready_tx));
        let ready = ready_rx.recv().map_err(|_| pg_error(std::io::Error::other("transaction task ended")))?;
        match ready {
            Err(StoreError::Fenced { epoch }) => {
                tracing::error!(epoch, "lease lost: this coordinator is no longer the leader; write refused");
                self.fence.lost(epoch);
                return Err(StoreError::Fenced { epoch });
            }
            Err(StoreError::Conflict) => return Ok(false),
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        let writable = !matches!(mode, FenceMode::Follower);
        let mut tx = PgTxn { ops: ops_tx, writable, conflict: false, failed: None };
        let out = f(&mut tx);
        if tx.conflict {
            let _ = tx.send(Op::Rollback);
            return Ok(false);
        }
        if let Some(e) = tx.failed.take() {
            return Err(e);
        }
        if out.is_err() {
            let _ = tx.send(Op::Rollback);
            return Err(StoreError::Aborted);
        }
        match tx.send(Op::Commit) {
            Ok(_) => Ok(true),
            Err(StoreError::Conflict) => Ok(false),
            // Not retried: the commit may have reached the server.
            Err(e) => Err(e),
        }
    }
}

impl Backend for PgBackend {
    fn kind(&self) -> rekey_types::v1::StoreBackend {
        rekey_types::v1::StoreBackend::Postgres
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_vec();
        self.call(move |c| {
            let key = key.clone();
            Box::pin(async move {
                let r = c
                    .query_opt("SELECT value FROM rekey_kv WHERE tree = $1 AND key = $2", &[&tree.name(), &key])
                    .await
                    .map_err(map_err)?;
                Ok(r.map(|r| r.get(0)))
            })
        })
    }

    fn scan(&self, tree: Tree, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        let (start, end) = (prefix.to_vec(), prefix_end(prefix));
        self.call(move |c| {
            let (start, end) = (start.clone(), end.clone());
            Box::pin(async move {
                let rows = match &end {
                    Some(end) => {
                        c.query(
                            "SELECT key, value FROM rekey_kv WHERE tree = $1 AND key >= $2 AND key < $3 ORDER BY key",
                            &[&tree.name(), &start, end],
                        )
                        .await
                    }
                    None => {
                        c.query(
                            "SELECT key, value FROM rekey_kv WHERE tree = $1 AND key >= $2 ORDER BY key",
                            &[&tree.name(), &start],
                        )
                        .await
                    }
                }
                .map_err(map_err)?;
                Ok(rows.iter().map(entry).collect())
            })
        })
    }

    fn last(&self, tree: Tree) -> Result<Option<Entry>, StoreError> {
        self.call(move |c| {
            Box::pin(async move {
                let r = c
                    .query_opt(
                        "SELECT key, value FROM rekey_kv WHERE tree = $1 ORDER BY key DESC LIMIT 1",
                        &[&tree.name()],
                    )
                    .await
                    .map_err(map_err)?;
                Ok(r.as_ref().map(entry))
            })
        })
    }

    fn transaction(
        &self,
        _durable: bool,
        f: &mut dyn FnMut(&mut dyn Txn) -> Result<(), Aborted>,
    ) -> Result<(), StoreError> {
        let deadline = Instant::now() + DB_WAIT;
        let mut conflicts = 0;
        loop {
            match self.attempt(f) {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    conflicts += 1;
                    if conflicts >= MAX_ATTEMPTS {
                        return Err(StoreError::Conflict);
                    }
                    std::thread::sleep(Duration::from_millis(conflicts.min(20) as u64));
                }
                Err(e) if is_unavailable(&e) && Instant::now() < deadline => {
                    tracing::warn!(error = %rekey_common::error::Chain(&e), "database unavailable; waiting");
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn close(&self) -> Result<(), StoreError> {
        self.pool.close();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_ends_bound_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }
}
