//! High availability on a shared PostgreSQL store: the lease, the replicas,
//! and what a follower answers.
//!
//! One row (`rekey_lease`) names the leader, its epoch and when its lease
//! expires (by the database's clock). A follower takes the lease once it
//! has expired, bumping the epoch; the leader renews it every
//! `lease_ttl / 5`. Every write of the leader checks the lease in its own
//! transaction ([`crate::store::postgres`]: fencing), so a deposed leader
//! never commits after a successor took over.
//!
//! A leader that cannot renew (the database refuses, or it has not managed
//! to within `lease_ttl - lease_ttl/4` of its last renewal) stops acting at
//! once: [`ensure_leading`] refuses every side effect from then on, and the
//! process exits with [`EXIT_LEASE_LOST`] (systemd restarts it as a
//! follower — the Kubernetes controllers' answer to a lost lease: no state
//! in memory survives into the next term).
//!
//! A follower serves no engine: it answers `rekey coordinators` and tells
//! every other caller (agents' sessions and enrollments, operators) where the
//! leader is (`UNAVAILABLE` with `rekey-leader: HOST:PORT` metadata). When
//! it takes the lease it stops its follower server and starts as a leader,
//! reading everything afresh from the store.

use crate::config::{Config, HaConfig, StoreConfig};
use crate::store::postgres::{Fence, FenceMode, PgBackend};
use crate::store::{Store, StoreError};
use rekey_types::v1::{CoordinatorsView, ReplicaView, StoreBackend};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use crate::leading::{EXIT_LEASE_LOST, NotLeading, ensure_leading};
use crate::leading::{LEADERSHIP, Leadership, lost};

/// The lease as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRow {
    pub holder: Option<String>,
    pub address: Option<String>,
    pub epoch: u64,
    /// Milliseconds since the last renewal (database clock).
    pub age_ms: Option<i64>,
    pub expired: bool,
}

impl LeaseRow {
    /// The leader's advertised address, if someone holds a live lease.
    pub fn live_leader(&self) -> Option<&str> {
        if self.expired { None } else { self.address.as_deref() }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl PgBackend {
    /// Takes the lease if nobody holds a live one (or this replica held it in
    /// a previous life); returns the new epoch.
    pub fn try_acquire(&self, ha: &HaConfig) -> Result<Option<u64>, StoreError> {
        let (id, addr, ttl) = (ha.id.clone(), ha.advertise.clone(), secs(ha.lease_ttl));
        self.call(move |c| {
            let (id, addr) = (id.clone(), addr.clone());
            Box::pin(async move {
                let row = c
                    .query_opt(
                        "UPDATE rekey_lease SET holder = $1, address = $2, epoch = epoch + 1,
                                renewed_at = clock_timestamp(),
                                expires_at = clock_timestamp() + make_interval(secs => $3)
                          WHERE id = 1 AND (holder IS NULL OR holder = $1 OR expires_at < clock_timestamp())
                          RETURNING epoch",
                        &[&id, &addr, &ttl],
                    )
                    .await
                    .map_err(|e| StoreError::Postgres(Box::new(e)))?;
                Ok(row.map(|r| r.get::<_, i64>(0) as u64))
            })
        })
    }

    /// Renews this leader's lease; `false` when it is no longer ours.
    pub fn renew(&self, ha: &HaConfig, epoch: u64) -> Result<bool, StoreError> {
        let (id, ttl) = (ha.id.clone(), secs(ha.lease_ttl));
        self.call_once(move |c| {
            let id = id.clone();
            Box::pin(async move {
                let n = c
                    .execute(
                        "UPDATE rekey_lease SET renewed_at = clock_timestamp(),
                                expires_at = clock_timestamp() + make_interval(secs => $3)
                          WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > clock_timestamp()",
                        &[&id, &(epoch as i64), &ttl],
                    )
                    .await
                    .map_err(|e| StoreError::Postgres(Box::new(e)))?;
                Ok(n == 1)
            })
        })
    }

    /// Gives the lease up (a clean shutdown: a follower takes over at once).
    pub fn release(&self, ha: &HaConfig, epoch: u64) -> Result<(), StoreError> {
        let id = ha.id.clone();
        self.call_once(move |c| {
            let id = id.clone();
            Box::pin(async move {
                c.execute(
                    "UPDATE rekey_lease SET expires_at = clock_timestamp() WHERE id = 1 AND holder = $1 AND epoch = $2",
                    &[&id, &(epoch as i64)],
                )
                .await
                .map_err(|e| StoreError::Postgres(Box::new(e)))?;
                Ok(())
            })
        })
    }

    /// This replica is alive (for `rekey coordinators`).
    pub fn heartbeat(&self, ha: &HaConfig) -> Result<(), StoreError> {
        let (id, addr) = (ha.id.clone(), ha.advertise.clone());
        self.call_once(move |c| {
            let (id, addr) = (id.clone(), addr.clone());
            Box::pin(async move {
                c.execute(
                    "INSERT INTO rekey_replicas (id, address, version, last_seen) VALUES ($1, $2, $3, clock_timestamp())
                     ON CONFLICT (id) DO UPDATE SET address = $2, version = $3, last_seen = clock_timestamp()",
                    &[&id, &addr, &env!("CARGO_PKG_VERSION")],
                )
                .await
                .map_err(|e| StoreError::Postgres(Box::new(e)))?;
                Ok(())
            })
        })
    }

    pub fn lease(&self) -> Result<LeaseRow, StoreError> {
        self.call(|c| {
            Box::pin(async move {
                let r = c
                    .query_one(
                        "SELECT holder, address, epoch,
                                (extract(epoch from clock_timestamp() - renewed_at) * 1000)::bigint,
                                expires_at < clock_timestamp()
                           FROM rekey_lease WHERE id = 1",
                        &[],
                    )
                    .await
                    .map_err(|e| StoreError::Postgres(Box::new(e)))?;
                Ok(LeaseRow {
                    holder: r.get(0),
                    address: r.get(1),
                    epoch: r.get::<_, i64>(2) as u64,
                    age_ms: r.get(3),
                    expired: r.get(4),
                })
            })
        })
    }

    /// Every replica that announced itself: (id, address, version, last seen ms).
    pub fn replicas(&self) -> Result<Vec<(String, String, String, i64)>, StoreError> {
        self.call(|c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT id, address, version, (extract(epoch from last_seen) * 1000)::bigint
                           FROM rekey_replicas ORDER BY id",
                        &[],
                    )
                    .await
                    .map_err(|e| StoreError::Postgres(Box::new(e)))?;
                Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect())
            })
        })
    }
}

/// Opens the store `config` names. With PostgreSQL the backend writes as
/// `mode` says (offline tools: unfenced; a replica: follower, then leader).
pub fn open_store(config: &Config, mode: FenceMode) -> Result<(Store, Option<Arc<PgBackend>>), StoreError> {
    match &config.store {
        StoreConfig::Sled => Ok((Store::open(&config.store_dir())?, None)),
        StoreConfig::Postgres(opts) => {
            let backend = Arc::new(PgBackend::connect(opts, Fence::new(mode))?);
            Ok((Store::with_backend(backend.clone())?, Some(backend)))
        }
    }
}

/// What `rekey coordinators` shows, from any replica.
pub fn coordinators_view(store: &Store, ha: &HaConfig) -> Result<CoordinatorsView, StoreError> {
    let Some(pg) = store.postgres() else {
        return Ok(CoordinatorsView {
            backend: StoreBackend::Sled,
            schema_version: 1,
            leader: Some(ha.id.clone()),
            epoch: 0,
            lease_age_ms: None,
            lease_ttl_ms: 0,
            answered_by: ha.id.clone(),
            replicas: vec![ReplicaView {
                id: ha.id.clone(),
                address: ha.advertise.clone(),
                leader: true,
                last_seen_ms: rekey_common::time::now_unix_ms(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            }],
        });
    };
    let lease = pg.lease()?;
    let leader = if lease.expired { None } else { lease.holder.clone() };
    let replicas = pg
        .replicas()?
        .into_iter()
        .map(|(id, address, version, last_seen_ms)| ReplicaView {
            leader: leader.as_deref() == Some(id.as_str()),
            id,
            address,
            last_seen_ms,
            version,
        })
        .collect();
    Ok(CoordinatorsView {
        backend: StoreBackend::Postgres,
        schema_version: pg.schema_version(),
        leader,
        epoch: lease.epoch,
        lease_age_ms: lease.age_ms,
        lease_ttl_ms: ha.lease_ttl.as_millis() as i64,
        answered_by: ha.id.clone(),
        replicas,
    })
}

/// Waits (as a follower, heartbeating) until this replica takes the lease;
/// returns its epoch. `serving` tells whether the follower server still
/// runs (it stops when the lease is taken).
pub fn wait_for_lease(pg: &PgBackend, ha: &HaConfig, stop: &std::sync::atomic::AtomicBool) -> Option<u64> {
    let period = ha.lease_ttl / 5;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if let Err(e) = pg.heartbeat(ha) {
            tracing::warn!(error = %rekey_common::error::Chain(&e), "replica heartbeat failed");
        }
        match pg.try_acquire(ha) {
            Ok(Some(epoch)) => return Some(epoch),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %rekey_common::error::Chain(&e), "cannot read the lease"),
        }
        std::thread::sleep(period);
    }
    None
}

/// Becomes the leader under `epoch`: writes are fenced from now on, side
/// effects allowed until the lease could have run out, and a thread keeps
/// renewing it (and exits the process when it cannot).
pub fn lead(pg: Arc<PgBackend>, ha: HaConfig, epoch: u64) {
    let margin = ha.lease_ttl / 4;
    pg.fence().set(FenceMode::Leader { id: ha.id.clone(), epoch, margin_ms: margin.as_millis() as i64 });
    pg.fence().on_lost(|epoch| lost(epoch, "a write found the lease taken by another replica"));
    let _ = LEADERSHIP.set(Leadership { epoch, valid_until: Mutex::new(Instant::now() + ha.lease_ttl - margin) });
    tracing::info!(id = %ha.id, epoch, "this coordinator is the leader");
    std::thread::Builder::new()
        .name("rekeyd-lease".into())
        .spawn(move || keep_lease(&pg, &ha, epoch))
        .expect("spawn the lease keeper");
}

fn keep_lease(pg: &PgBackend, ha: &HaConfig, epoch: u64) {
    let margin = ha.lease_ttl / 4;
    let leadership = LEADERSHIP.get().expect("set before the keeper starts");
    loop {
        std::thread::sleep(ha.lease_ttl / 5);
        let sent = Instant::now();
        match pg.renew(ha, epoch) {
            Ok(true) => *leadership.valid_until.lock().expect("lease lock") = sent + ha.lease_ttl - margin,
            Ok(false) => lost(epoch, "another replica holds the lease"),
            Err(e) => tracing::warn!(error = %rekey_common::error::Chain(&e), epoch, "cannot renew the lease"),
        }
        let _ = pg.heartbeat(ha);
        if Instant::now() >= *leadership.valid_until.lock().expect("lease lock") {
            lost(epoch, "the lease could not be renewed in time");
        }
    }
}

/// On a clean shutdown: hand the lease over at once.
pub fn step_down(pg: &PgBackend, ha: &HaConfig) {
    if let Some(l) = LEADERSHIP.get() {
        match pg.release(ha, l.epoch) {
            Ok(()) => tracing::info!(epoch = l.epoch, "lease released"),
            Err(e) => tracing::warn!(error = %rekey_common::error::Chain(&e), "cannot release the lease"),
        }
    }
}
