//! The driver alone: a fake agent link and a fake provider record, for every
//! side effect, what the store held at the moment the driver acted. The rule
//! under test is "commit the transition, then act": a create must find the
//! rotation already `generating` on disk, a delivery its host already
//! `delivered`, a deactivation `deactivating`, and so on.

use super::*;
use crate::crypto::Key;
use rekey_common::secret::SecretBytes;
use rekey_providers::{NewVersion, VersionInfo};
use std::sync::Mutex;

const SECRET: &str = "api-key";

/// One side effect and the persisted state it found.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    action: &'static str,
    host: Option<String>,
    /// The rotation's persisted state when the driver acted.
    rotation: RotationState,
    /// The host's persisted state, for per-host actions.
    host_state: Option<machine::HostState>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// The rotation as the store holds it right now (the active one, else the newest).
fn persisted(state: &EngineState) -> Rotation {
    let rec = state.get_secret(SECRET).unwrap();
    let id = rec.active_rotation.or(rec.last_rotation).expect("a rotation exists");
    state.get_rotation(&id).unwrap().expect("rotation persisted")
}

fn record(state: &EngineState, log: &Log, action: &'static str, host: Option<&str>) {
    let rot = persisted(state);
    let host_state = host.map(|h| rot.hosts[h].state);
    log.lock().unwrap().push(Seen { action, host: host.map(str::to_string), rotation: rot.state, host_state });
}

/// Agents that always accept; deliveries are handed to the test, which plays
/// the agents' reports.
struct FakeLink {
    state: EngineState,
    log: Log,
    deliveries: mpsc::UnboundedSender<(String, Delivery)>,
}

impl AgentLink for FakeLink {
    fn is_connected(&self, _host: &str) -> bool {
        true
    }
    fn deliver(&self, host: &str, d: Delivery) -> Result<(), crate::engine::link::LinkError> {
        record(&self.state, &self.log, "deliver", Some(host));
        let _ = self.deliveries.send((host.to_string(), d));
        Ok(())
    }
    fn rollback(
        &self,
        host: &str,
        _rotation: &str,
        _secret: &str,
        _version: &str,
    ) -> Result<(), crate::engine::link::LinkError> {
        record(&self.state, &self.log, "rollback", Some(host));
        Ok(())
    }
    fn purge(&self, host: &str, _secret: &str, _version: &str) -> Result<(), crate::engine::link::LinkError> {
        record(&self.state, &self.log, "purge", Some(host));
        Ok(())
    }
}

struct FakeProvider {
    state: EngineState,
    log: Log,
    /// While set, `create` records the call and then never answers (the
    /// coordinator dies with the call in flight).
    hang_create: std::sync::atomic::AtomicBool,
    /// What `list` answers (nothing until a test sets it).
    listing: Mutex<Vec<VersionInfo>>,
}

#[async_trait::async_trait]
impl Provider for FakeProvider {
    fn kind(&self) -> &'static str {
        "fake"
    }
    /// A version in use before rekey's first rotation: there is an old one to revoke.
    async fn current(&self) -> Result<Option<VersionInfo>, ProviderError> {
        Ok(Some(VersionInfo {
            id: "v-before".into(),
            status: rekey_providers::VersionStatus::Active,
            created_unix: None,
        }))
    }
    async fn create(&self, req: &CreateRequest) -> Result<NewVersion, ProviderError> {
        record(&self.state, &self.log, "create", None);
        if self.hang_create.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        // Idempotent per rotation id, as every real provider's create is.
        let mut fields = rekey_providers::Fields::new();
        fields.insert("value".into(), SecretBytes::new(format!("tok_{}", req.rotation_id).into_bytes()));
        Ok(NewVersion { id: format!("v-{}", req.rotation_id), fields, notes: vec![] })
    }
    async fn deactivate(&self, _v: &str) -> Result<(), ProviderError> {
        record(&self.state, &self.log, "deactivate", None);
        Ok(())
    }
    async fn reactivate(&self, _v: &str) -> Result<(), ProviderError> {
        record(&self.state, &self.log, "reactivate", None);
        Ok(())
    }
    async fn delete(&self, v: &str) -> Result<(), ProviderError> {
        let rot = persisted(&self.state);
        let which = if rot.new_version.as_deref() == Some(v) { "delete_new" } else { "delete_old" };
        record(&self.state, &self.log, which, None);
        Ok(())
    }
    async fn list(&self) -> Result<Vec<VersionInfo>, ProviderError> {
        Ok(self.listing.lock().unwrap().clone())
    }
}

struct World {
    _dir: tempfile::TempDir,
    store: Store,
    state: EngineState,
    config: Arc<Config>,
    log: Log,
    provider: Arc<FakeProvider>,
    handle: EngineHandle,
    deliveries: mpsc::UnboundedReceiver<(String, Delivery)>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), EngineError>>,
}

/// A running engine: its handle, the deliveries it sends, how to stop it.
type Running = (
    EngineHandle,
    mpsc::UnboundedReceiver<(String, Delivery)>,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), EngineError>>,
);

/// An engine over `store`, acting through a fresh fake link.
fn spawn_engine(
    config: &Arc<Config>,
    store: &Store,
    state: &EngineState,
    log: &Log,
    provider: &Arc<FakeProvider>,
) -> Running {
    let (tx, deliveries) = mpsc::unbounded_channel();
    let link = Arc::new(FakeLink { state: state.clone(), log: log.clone(), deliveries: tx });
    let (alerts, _) = Alerts::open(store, None).unwrap();
    let backends = HashMap::from([(SECRET.to_string(), SecretBackends { provider: provider.clone(), sinks: vec![] })]);
    let (engine, handle) = Engine::with_backends(config.clone(), store.clone(), state.clone(), link, alerts, backends);
    let stop = CancellationToken::new();
    let task = tokio::spawn(engine.run(stop.clone()));
    (handle, deliveries, stop, task)
}

impl World {
    /// An engine over a real sled store with `hosts` enrolled consumers,
    /// one canary, and no grace or monitoring wait.
    fn start(hosts: &[&str]) -> World {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let state = EngineState::open(&store, Arc::new(Key::generate().unwrap())).unwrap();
        for h in hosts {
            let rec = crate::store::AgentRecord {
                name: h.to_string(),
                labels: [("env".to_string(), "test".to_string())].into(),
                secrets: vec![SECRET.to_string()],
                ..Default::default()
            };
            store.enroll_agent(&rec, 1).unwrap();
        }
        let toml = format!(
            r#"
listen = "127.0.0.1:0"
data_dir = "data"
master_key_file = "/nonexistent/master.key"
[[secret]]
name = "{SECRET}"
selector = {{ env = "test" }}
provider = {{ kind = "random", length = 32 }}
[secret.rollout]
canary = 1
[secret.revocation]
grace = "0s"
monitor = "0s"
"#
        );
        let config = Arc::new(Config::from_str(&dir.path().join("coordinator.toml"), &toml).unwrap());
        let log: Log = Arc::default();
        let provider = Arc::new(FakeProvider {
            state: state.clone(),
            log: log.clone(),
            hang_create: false.into(),
            listing: Mutex::default(),
        });
        let (handle, deliveries, stop, task) = spawn_engine(&config, &store, &state, &log, &provider);
        World { _dir: dir, store, state, config, log, provider, handle, deliveries, stop, task }
    }

    /// Kills the engine (its in-memory state is gone; the store stays) and
    /// starts a new one on the same store, as a restarted rekeyd would.
    async fn restart(&mut self) {
        self.stop.cancel();
        self.task.abort();
        let _ = (&mut self.task).await;
        let (handle, deliveries, stop, task) =
            spawn_engine(&self.config, &self.store, &self.state, &self.log, &self.provider);
        (self.handle, self.deliveries, self.stop, self.task) = (handle, deliveries, stop, task);
    }

    /// Plays the agent: answers the next delivery with `stage` (and the
    /// fingerprint of what it received when healthy).
    async fn answer_next(&mut self, stage: v1::Stage) -> String {
        let (host, d) = tokio::time::timeout(rekey_common::testing::budget(), self.deliveries.recv())
            .await
            .expect("a delivery within the budget")
            .expect("link open");
        let fingerprint =
            fingerprint_fields(&d.fingerprint_key, d.fields.iter().map(|(k, v)| (k.as_str(), v.expose())));
        let report = v1::StageReport {
            rotation_id: d.rotation_id,
            secret: d.secret,
            version_id: d.version_id,
            stage: stage as i32,
            fingerprint: if stage == v1::Stage::Healthy { fingerprint } else { String::new() },
            error: if stage == v1::Stage::Healthy { String::new() } else { "health check failed".into() },
            at_unix_ms: now_unix_ms(),
        };
        self.handle.agent_event(AgentEvent::Report { host: host.clone(), report }).await;
        host
    }

    async fn wait_state(&self, want: RotationState) -> Rotation {
        let deadline = tokio::time::Instant::now() + rekey_common::testing::budget();
        loop {
            let rot = persisted(&self.state);
            if rot.state == want {
                return rot;
            }
            assert!(tokio::time::Instant::now() < deadline, "rotation stuck in {:?}, wanted {want:?}", rot.state);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> Vec<Seen> {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
        self.log.lock().unwrap().clone()
    }
}

fn actions(log: &[Seen]) -> Vec<&'static str> {
    log.iter().map(|s| s.action).collect()
}

#[tokio::test]
async fn a_rotation_commits_each_transition_before_its_side_effect() {
    let mut w = World::start(&["h1", "h2", "h3"]);
    w.handle.start(SECRET, "operator/test").await.unwrap();
    for _ in 0..3 {
        w.answer_next(v1::Stage::Healthy).await;
    }
    let done = w.wait_state(RotationState::Completed).await;
    let log = w.stop().await;

    assert_eq!(
        actions(&log),
        ["create", "deliver", "deliver", "deliver", "deactivate", "delete_old", "purge", "purge", "purge"],
        "{log:#?}\n{:#?}",
        done.timeline
    );
    for seen in &log {
        match seen.action {
            "create" => assert_eq!(seen.rotation, RotationState::Generating, "{seen:?}"),
            "deliver" => {
                assert_eq!(seen.rotation, RotationState::RollingOut, "{seen:?}");
                assert_eq!(seen.host_state, Some(machine::HostState::Delivered), "{seen:?}");
            }
            "deactivate" => assert_eq!(seen.rotation, RotationState::Deactivating, "{seen:?}"),
            "delete_old" => assert_eq!(seen.rotation, RotationState::Deleting, "{seen:?}"),
            // Purged only once the deletion is on record.
            "purge" => {
                assert!(matches!(seen.rotation, RotationState::Monitoring | RotationState::Completed), "{seen:?}")
            }
            other => panic!("unexpected action {other}"),
        }
    }
    // The canary went first: one delivery, then (after its report) the others.
    assert_eq!(log[1].host.as_deref(), Some("h1"));
}

#[tokio::test]
async fn an_abort_commits_the_rollbacks_and_the_deletion_before_sending_them() {
    let mut w = World::start(&["h1", "h2"]);
    let rot = w.handle.start(SECRET, "operator/test").await.unwrap();
    // The canary fails: the rollout halts with the old version untouched.
    w.answer_next(v1::Stage::Failed).await;
    w.wait_state(RotationState::Halted).await;
    w.handle.control(&rot.id, Event::Abort { by: "operator/test".into() }, "operator/test").await.unwrap();
    let report = v1::StageReport {
        rotation_id: rot.id.clone(),
        secret: SECRET.into(),
        version_id: persisted(&w.state).new_version.unwrap(),
        stage: v1::Stage::RolledBack as i32,
        at_unix_ms: now_unix_ms(),
        ..Default::default()
    };
    w.handle.agent_event(AgentEvent::Report { host: "h1".into(), report }).await;
    w.wait_state(RotationState::Aborted).await;
    let log = w.stop().await;

    assert_eq!(actions(&log), ["create", "deliver", "rollback", "delete_new"], "{log:#?}");
    let rollback = &log[2];
    assert_eq!((rollback.rotation, rollback.host.as_deref()), (RotationState::Aborting, Some("h1")));
    assert_eq!(log[3].rotation, RotationState::Aborting);
    // Nothing touched the old version.
    assert!(!actions(&log).iter().any(|a| matches!(*a, "deactivate" | "delete_old")));
}

#[tokio::test]
async fn an_engine_killed_during_create_creates_again_for_the_same_rotation_and_finishes() {
    let mut w = World::start(&["h1"]);
    w.provider.hang_create.store(true, std::sync::atomic::Ordering::SeqCst);
    let rot = w.handle.start(SECRET, "operator/test").await.unwrap();
    let deadline = tokio::time::Instant::now() + rekey_common::testing::budget();
    while actions(&w.log.lock().unwrap()) != ["create"] {
        assert!(tokio::time::Instant::now() < deadline, "create never called");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Killed with the provider call in flight; the store says `generating`.
    w.provider.hang_create.store(false, std::sync::atomic::Ordering::SeqCst);
    w.restart().await;
    w.answer_next(v1::Stage::Healthy).await;
    let done = w.wait_state(RotationState::Completed).await;
    let log = w.stop().await;

    assert_eq!(actions(&log), ["create", "create", "deliver", "deactivate", "delete_old", "purge"], "{log:#?}");
    assert!(log[..2].iter().all(|s| s.rotation == RotationState::Generating), "{log:#?}");
    // The replayed create asked for the same rotation: one new version only.
    assert_eq!(
        (done.id.as_str(), done.new_version.as_deref()),
        (rot.id.as_str(), Some(format!("v-{}", rot.id).as_str()))
    );
}

fn active(ids: &[&str]) -> Vec<VersionInfo> {
    ids.iter()
        .map(|id| VersionInfo {
            id: id.to_string(),
            status: rekey_providers::VersionStatus::Active,
            created_unix: None,
        })
        .collect()
}

/// Issue 19, case 1: the recorded version was rotated away outside rekey.
/// The start takes the one active version as the old one (audited as drift)
/// and revokes it; two unknown active versions are refused before any create.
#[tokio::test]
async fn a_start_reconciles_the_recorded_version_with_the_providers_list() {
    let mut w = World::start(&["h1"]);
    let first = w.handle.start(SECRET, "operator/test").await.unwrap();
    w.answer_next(v1::Stage::Healthy).await;
    w.wait_state(RotationState::Completed).await;
    let recorded = w.state.get_secret(SECRET).unwrap().current_version.unwrap();
    assert_eq!(recorded, format!("v-{}", first.id));

    // Gone at the provider; another key, made by hand, is active.
    *w.provider.listing.lock().unwrap() = active(&["v-by-hand"]);
    let second = w.handle.start(SECRET, "operator/test").await.unwrap();
    assert_eq!(second.old_version.as_deref(), Some("v-by-hand"));
    let drift: Vec<_> = w.state.audit_records().unwrap().into_iter().filter(|r| r.action == "rotation.drift").collect();
    assert_eq!(drift.len(), 1);
    assert_eq!(drift[0].details["rotation"], second.id.as_str());
    assert_eq!(drift[0].details["recorded_version"], recorded.as_str());
    assert_eq!(drift[0].details["old_version"], "v-by-hand");
    w.answer_next(v1::Stage::Healthy).await;
    w.wait_state(RotationState::Completed).await;

    // Two unknown active keys and the record gone: refused, nothing created.
    *w.provider.listing.lock().unwrap() = active(&["v-x", "v-y"]);
    let creates_before = actions(&w.log.lock().unwrap()).iter().filter(|a| **a == "create").count();
    let err = w.handle.start(SECRET, "operator/test").await.unwrap_err();
    assert!(
        matches!(&err, EngineError::Refused(m) if m.contains("v-x, v-y") && m.contains("no key generated")),
        "{err}"
    );
    assert!(w.state.get_secret(SECRET).unwrap().active_rotation.is_none());
    let log = w.stop().await;
    assert_eq!(actions(&log).iter().filter(|a| **a == "create").count(), creates_before);
}
