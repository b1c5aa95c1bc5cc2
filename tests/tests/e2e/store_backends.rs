//! The PostgreSQL store on a real server: fencing by lease epoch, followers
//! that cannot write, versioned migrations, serializable concurrency, and
//! `rekeyd migrate --from-sled`.

use rekey_common::secret::SecretBytes;
use rekey_coordinator::config::HaConfig;
use rekey_coordinator::store::postgres::{Fence, FenceMode, PgBackend, PgOptions};
use rekey_coordinator::store::{Store, StoreError, Tree};
use rekey_tests::postgres::Postgres;
use rekey_tests::{Coordinator, bins, wait_for};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

fn options(pg: &Postgres, db: &str) -> PgOptions {
    PgOptions {
        url: pg.url(db),
        password: Some(SecretBytes::new(pg.admin_password.clone().into_bytes())),
        ca_file: None,
        pool_size: 4,
    }
}

fn ha(id: &str, ttl: Duration) -> HaConfig {
    HaConfig { id: id.into(), advertise: format!("{id}.test:7400"), lease_ttl: ttl }
}

fn server(db: &str) -> Postgres {
    let pg = Postgres::start();
    pg.create_database(db);
    pg
}

#[test]
fn a_deposed_leader_cannot_commit_after_another_replica_took_over() {
    let pg = server("fence");
    let ttl = Duration::from_secs(2);
    let (ha_a, ha_b) = (ha("a", ttl), ha("b", ttl));
    let a = Arc::new(PgBackend::connect(&options(&pg, "fence"), Fence::new(FenceMode::Follower)).unwrap());
    let b = Arc::new(PgBackend::connect(&options(&pg, "fence"), Fence::new(FenceMode::Follower)).unwrap());
    let epoch_a = a.try_acquire(&ha_a).unwrap().expect("the first replica takes the free lease");
    a.fence().set(FenceMode::Leader { id: "a".into(), epoch: epoch_a, margin_ms: 0 });
    let lost = Arc::new(AtomicU64::new(0));
    let seen = lost.clone();
    a.fence().on_lost(move |e| seen.store(e, Ordering::SeqCst));
    let store_a = Store::with_backend(a.clone()).unwrap();
    store_a.put(Tree::Meta, b"k", b"from a").unwrap();

    // While a's lease lives, b cannot take it.
    assert_eq!(b.try_acquire(&ha_b).unwrap(), None);
    // a stops renewing (paused, partitioned); once its lease expired, b takes over.
    let mut epoch_b = None;
    wait_for("b to take the expired lease", || {
        epoch_b = b.try_acquire(&ha_b).unwrap();
        epoch_b.is_some()
    });
    let epoch_b = epoch_b.unwrap();
    assert!(epoch_b > epoch_a, "a takeover bumps the epoch");
    b.fence().set(FenceMode::Leader { id: "b".into(), epoch: epoch_b, margin_ms: 0 });
    let store_b = Store::with_backend(b.clone()).unwrap();
    store_b.put(Tree::Meta, b"k", b"from b").unwrap();

    // a wakes up: its next write is refused by the epoch check, nothing lands.
    let err = store_a.put(Tree::Meta, b"k", b"late write from a").unwrap_err();
    assert!(matches!(err, StoreError::Fenced { epoch } if epoch == epoch_a), "{err}");
    assert_eq!(lost.load(Ordering::SeqCst), epoch_a, "the lost-lease hook ran with a's epoch");
    assert_eq!(store_b.get(Tree::Meta, b"k").unwrap().as_deref(), Some(&b"from b"[..]));
    assert!(!a.renew(&ha_a, epoch_a).unwrap(), "a cannot renew a lease it lost");
    let lease = b.lease().unwrap();
    assert_eq!((lease.holder.as_deref(), lease.epoch), (Some("b"), epoch_b));
}

#[test]
fn a_follower_reads_what_the_leader_wrote_and_cannot_write() {
    let pg = server("follow");
    let leader = Arc::new(PgBackend::connect(&options(&pg, "follow"), Fence::new(FenceMode::Follower)).unwrap());
    let epoch = leader.try_acquire(&ha("l", Duration::from_secs(30))).unwrap().unwrap();
    leader.fence().set(FenceMode::Leader { id: "l".into(), epoch, margin_ms: 1000 });
    let follower = Arc::new(PgBackend::connect(&options(&pg, "follow"), Fence::new(FenceMode::Follower)).unwrap());
    let (ls, fs) = (Store::with_backend(leader).unwrap(), Store::with_backend(follower).unwrap());
    // Keys are ordered bytes; prefix scans stop at the prefix.
    for k in [&b"a\x00x"[..], b"a\x00y", b"a\xff", b"b"] {
        ls.put(Tree::ProviderState, k, b"v").unwrap();
    }
    let keys: Vec<Vec<u8>> = fs.scan(Tree::ProviderState, b"a").unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec![b"a\x00x".to_vec(), b"a\x00y".to_vec(), b"a\xff".to_vec()]);
    assert_eq!(fs.last(Tree::ProviderState).unwrap().unwrap().0, b"b");
    assert!(matches!(fs.put(Tree::Meta, b"x", b"y"), Err(StoreError::NotLeader)));
    assert_eq!(ls.get(Tree::Meta, b"x").unwrap(), None);
    // An aborted transaction writes nothing.
    let r: Result<(), StoreError> = ls.transaction(true, |t| {
        t.put(Tree::Meta, b"half", b"written")?;
        Err(StoreError::Aborted)
    });
    assert!(r.is_err());
    assert_eq!(fs.get(Tree::Meta, b"half").unwrap(), None);
}

#[test]
fn migrations_apply_once_and_a_newer_schema_is_refused() {
    let pg = server("schema");
    let opts = options(&pg, "schema");
    let first = PgBackend::connect(&opts, Fence::new(FenceMode::Offline)).unwrap();
    let again = PgBackend::connect(&opts, Fence::new(FenceMode::Offline)).unwrap();
    assert_eq!((first.schema_version(), again.schema_version()), (1, 1));
    assert_eq!(pg.psql("schema", "select count(*) from rekey_schema"), "1");
    pg.psql("schema", "insert into rekey_schema (version, rekeyd_version) values (99, 'from the future')");
    let err = PgBackend::connect(&opts, Fence::new(FenceMode::Offline)).err().expect("refused");
    assert!(matches!(err, StoreError::SchemaTooNew { found: 99, known: 1 }), "{err}");
    assert!(err.to_string().contains("upgrade rekeyd"), "{err}");
}

#[test]
fn concurrent_writers_on_postgres_never_share_an_alert_number() {
    let pg = server("alerts");
    let b = Arc::new(PgBackend::connect(&options(&pg, "alerts"), Fence::new(FenceMode::Offline)).unwrap());
    let store = Store::with_backend(b).unwrap();
    let (alerts, _) = rekey_coordinator::alerts::Alerts::open(&store, None).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let a = alerts.clone();
            std::thread::spawn(move || {
                (0..10)
                    .map(|_| {
                        let kind = rekey_coordinator::alerts::AlertKind::LeftoverFound;
                        let sev = rekey_coordinator::alerts::Severity::Warning;
                        a.raise(kind, sev, "k", None, "m".into(), serde_json::json!({})).unwrap().seq
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    all.sort();
    assert_eq!(all, (1..=40).collect::<Vec<_>>(), "serializable transactions keep the numbers dense");
}

#[test]
fn migrate_from_sled_copies_every_tree_and_verifies_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sled_c = Coordinator::start(&tmp.path().join("c"), "");
    sled_c.token("web-1", &[]);
    let audit_before = sled_c.audit().len();
    sled_c.stop();
    let pg = server("migrated");
    // Same data dir and master key, now on PostgreSQL.
    let config = tmp.path().join("c/pg.toml");
    let text = std::fs::read_to_string(&sled_c.config).unwrap();
    std::fs::write(&config, format!("{text}\n{}", pg.store_toml("migrated"))).unwrap();
    let rekeyd = |args: &[&str]| {
        std::process::Command::new(&bins().rekeyd).arg("--config").arg(&config).args(args).output().unwrap()
    };
    let data = tmp.path().join("c/data");
    let out = rekeyd(&["migrate", "--from-sled", data.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("{audit_before} records")), "{stdout}");
    // Only into an empty database.
    let out = rekeyd(&["migrate", "--from-sled", data.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds rekey state"));
    // A password in the URL is refused: it belongs in a 0600 file.
    let bad = tmp.path().join("c/bad.toml");
    let url_with_pw = pg.url("migrated").replace("rekey_admin@", "rekey_admin:hunter2@");
    std::fs::write(&bad, format!("{text}\n[store]\nbackend = \"postgres\"\nurl = \"{url_with_pw}\"\n")).unwrap();
    let out = std::process::Command::new(&bins().rekeyd).arg("--config").arg(&bad).arg("run").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("store.url") && err.contains("password_file"), "{err}");
    assert!(!err.contains("hunter2"), "the password was echoed: {err}");
    let on_pg = rekey_coordinator::config::Config::from_file(&config).unwrap();
    let (store, _) =
        rekey_coordinator::ha::open_store(&on_pg, rekey_coordinator::store::postgres::FenceMode::Offline).unwrap();
    assert_eq!(store.list_operators().unwrap().len(), 1);
    assert_eq!(store.scan(Tree::Tokens, b"").unwrap().len(), 1, "the join token came along");
}
