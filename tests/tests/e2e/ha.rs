//! Three real rekeyd replicas on one real PostgreSQL, real agents that know
//! all three: the leader SIGKILLed mid-rollout, the leader SIGSTOPped past
//! its lease (split brain), the database restarted mid-rotation. Every time
//! the rotation completes with exactly one new version and the old revoked.

use rekey_tests::postgres::Postgres;
use rekey_tests::{Agent, bins, free_port, read_log, wait_for};
use rekey_types::v1::{CoordinatorsView, HostState, JoinTokenView, RotationState, RotationView, VersionView};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const SECRET: &str = "api-key";
const TTL_S: u64 = 4;

fn catalog() -> String {
    format!(
        r#"
[[secret]]
name = "{SECRET}"
provider = {{ kind = "random", length = 40, prefix = "ak_" }}
selector = {{ env = "test" }}
[secret.rollout]
canary = 0
# The canary ring first, then a pause for the operator: a rollout in flight.
waves = [{{ selector = {{ ring = "canary" }}, pause_after = true }}, "100%"]
host_deadline = "30s"
[secret.revocation]
monitor = "0s"
grace = "1s"
"#
    )
}

/// One rekeyd replica process.
struct Replica {
    id: String,
    dir: PathBuf,
    config: PathBuf,
    port: u16,
    child: Option<Child>,
    runs: u32,
}

impl Replica {
    fn new(root: &Path, i: usize, pg: &Postgres) -> Replica {
        let id = format!("r{i}");
        let dir = root.join(&id);
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let config = dir.join("coordinator.toml");
        let text = format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"data\"\nmaster_key_file = \"master.key\"\n{}\n{}\n\
             [ha]\nid = \"{id}\"\nadvertise = \"127.0.0.1:{port}\"\nlease_ttl = \"{TTL_S}s\"\n",
            catalog(),
            pg.store_toml("rekey")
        );
        std::fs::write(&config, text).unwrap();
        Replica { id, dir, config, port, child: None, runs: 0 }
    }

    fn log(&self) -> PathBuf {
        self.dir.join(format!("rekeyd.{}.log", self.runs))
    }

    fn start(&mut self) {
        self.runs += 1;
        let log = std::fs::File::create(self.log()).unwrap();
        let child = Command::new(&bins().rekeyd)
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn logs(&self) -> String {
        (1..=self.runs).map(|i| read_log(&self.dir.join(format!("rekeyd.{i}.log")))).collect::<Vec<_>>().join("\n")
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The exit code once the process ended by itself.
    fn wait_exit(&mut self) -> i32 {
        let child = self.child.as_mut().expect("running");
        let mut code = None;
        wait_for(&format!("{} to exit", self.id), || {
            code = child.try_wait().unwrap().map(|st| st.code().unwrap_or(-1));
            code.is_some()
        });
        self.child = None;
        code.unwrap()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- {} logs ---\n{}", self.id, self.logs());
        }
    }
}

struct Cluster {
    replicas: Vec<Replica>,
    agents: Vec<Agent>,
    operator: PathBuf,
    pg: Postgres,
    _tmp: tempfile::TempDir,
}

impl Cluster {
    /// Three replicas (r1 initializes the store and leads first) and three agents.
    fn start() -> Cluster {
        let tmp = tempfile::Builder::new().prefix("rekey-ha-").tempdir().unwrap();
        let pg = Postgres::start();
        pg.create_database("rekey");
        let mut replicas: Vec<Replica> = (1..=3).map(|i| Replica::new(tmp.path(), i, &pg)).collect();
        replicas[0].start();
        let addr_file = replicas[0].dir.join("data/rekeyd.addr");
        wait_for("r1 to lead and serve", || addr_file.exists());
        let key = std::fs::read(replicas[0].dir.join("master.key")).unwrap();
        for r in &mut replicas[1..] {
            rekey_tests::fixtures::write_secret_file(
                &r.dir.join("master.key"),
                &String::from_utf8(key.clone()).unwrap(),
            );
            r.start();
        }
        let operator = replicas[0].dir.join("data/operator");
        let mut c = Cluster { replicas, agents: Vec::new(), operator, pg, _tmp: tmp };
        wait_for("three replicas in `rekey coordinators`", || {
            c.try_coordinators().is_some_and(|v| v.replicas.len() == 3 && v.leader.as_deref() == Some("r1"))
        });
        let addrs = c.addresses();
        for (i, ring) in [(1, "canary"), (2, "main"), (3, "main")] {
            let name = format!("host-{i}");
            let mut a = Agent::new(c._tmp.path(), &name, &[SECRET]);
            let v: JoinTokenView = c.view(&[
                "token",
                "create",
                "--host",
                &name,
                "--label",
                "env=test",
                "--label",
                &format!("ring={ring}"),
            ]);
            let out = a.enroll(&addrs, &v.token, &v.ca_fingerprint);
            assert!(out.status.success(), "enroll: {}", String::from_utf8_lossy(&out.stderr));
            a.start();
            c.agents.push(a);
        }
        wait_for("agents connected to the leader", || c.connected() == 3);
        c
    }

    fn addresses(&self) -> String {
        self.replicas.iter().map(|r| format!("127.0.0.1:{}", r.port)).collect::<Vec<_>>().join(",")
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(&bins().cli)
            .arg("--operator-dir")
            .arg(&self.operator)
            .arg("--coordinator")
            .arg(self.addresses())
            .args(args)
            .output()
            .unwrap()
    }

    fn view<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.cli(&a);
        assert!(out.status.success(), "rekey {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn try_coordinators(&self) -> Option<CoordinatorsView> {
        let out = self.cli(&["coordinators", "-o", "json"]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
    }

    fn connected(&self) -> usize {
        let out = self.cli(&["agents", "-o", "json"]);
        if !out.status.success() {
            return 0;
        }
        let agents: Vec<rekey_types::v1::AgentView> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        agents.iter().filter(|a| a.connected).count()
    }

    fn rotation(&self, id: &str) -> Option<RotationView> {
        let out = self.cli(&["rotate", "status", id, "-o", "json"]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
    }

    fn wait_until(&self, id: &str, what: &str, f: impl Fn(&RotationView) -> bool) -> RotationView {
        let mut last = None;
        wait_for(&format!("rotation {id}: {what}"), || {
            last = self.rotation(id);
            last.as_ref().is_some_and(&f)
        });
        last.unwrap()
    }

    /// A rotation started and waiting for the operator after its canary wave.
    fn start_paused(&self) -> (String, String) {
        let out = self.cli(&["rotate", "start", SECRET]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let r = self.wait_until(&id, "paused after the canary ring", |r| r.paused);
        assert_eq!(r.hosts["host-1"].state, HostState::Healthy);
        assert_eq!(r.hosts["host-2"].state, HostState::Pending, "the pause holds the second wave");
        (id, r.new_version.expect("a new version before the pause"))
    }

    /// Resumes (through whichever replica leads), waits for the end, and
    /// checks the one promise: one new version, on every host, the old gone.
    fn finish(&self, id: &str, new_version: &str) {
        wait_for("resume accepted by the leader", || self.cli(&["rotate", "resume", id]).status.success());
        let r = self.wait_until(id, "completed", |r| r.state == RotationState::Completed);
        assert_eq!(r.new_version.as_deref(), Some(new_version), "a second new version was created");
        for h in ["host-1", "host-2", "host-3"] {
            assert_eq!(r.hosts[h].state, HostState::Healthy, "{h}");
        }
        let vs: Vec<VersionView> = self.view(&["versions", SECRET]);
        assert_eq!(vs.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(), [new_version], "provider holds {vs:?}");
        let out = self.cli(&["audit", "verify"]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("intact"));
    }

    fn leader(&self) -> Option<CoordinatorsView> {
        self.try_coordinators().filter(|v| v.leader.is_some())
    }
}

#[test]
fn the_leader_killed_mid_rollout_is_replaced_and_the_rotation_completes_once() {
    let mut c = Cluster::start();
    let (id, new_version) = c.start_paused();
    let before = c.leader().unwrap();
    c.replicas[0].kill();
    let killed = Instant::now();
    let mut after = None;
    wait_for("a new leader", || {
        after = c.leader().filter(|v| v.leader.as_deref() != Some("r1"));
        after.is_some()
    });
    let took = killed.elapsed();
    let after = after.unwrap();
    eprintln!("failover: a new leader ({:?}) {took:?} after SIGKILL (lease_ttl {TTL_S}s)", after.leader);
    assert!(after.epoch > before.epoch, "a new term has a new epoch");
    assert!(took < Duration::from_secs(TTL_S * 4), "no new leader within {took:?}");
    wait_for("agents reconnected to the new leader", || c.connected() == 3);
    c.finish(&id, &new_version);
    let new = c.replicas.iter().find(|r| Some(r.id.as_str()) == after.leader.as_deref()).unwrap();
    assert!(new.logs().contains("resuming rotation"), "the new leader resumed the rotation from the store");
}

#[test]
fn a_paused_leader_that_lost_its_lease_is_fenced_and_steps_down() {
    let mut c = Cluster::start();
    let (id, new_version) = c.start_paused();
    c.replicas[0].signal("-STOP");
    let mut after = None;
    wait_for("another replica to take over from the paused leader", || {
        after = c.leader().filter(|v| v.leader.as_deref() != Some("r1"));
        after.is_some()
    });
    // The new leader makes progress while the old one is frozen.
    wait_for("agents on the new leader", || c.connected() == 3);
    c.finish(&id, &new_version);
    // The old leader wakes up: it finds its lease gone and exits at once.
    c.replicas[0].signal("-CONT");
    let code = c.replicas[0].wait_exit();
    assert_eq!(code, 75, "a deposed leader exits with EX_TEMPFAIL to rejoin as a follower");
    let logs = c.replicas[0].logs();
    assert!(logs.contains("lease lost"), "{logs}");
    // Nothing it might still have done reached the provider or the store.
    let vs: Vec<VersionView> = c.view(&["versions", SECRET]);
    assert_eq!(vs.len(), 1, "{vs:?}");
    // Restarted, it rejoins as a follower.
    c.replicas[0].start();
    wait_for("r1 back as a follower", || {
        c.try_coordinators().is_some_and(|v| v.replicas.len() == 3 && v.leader.as_deref() != Some("r1"))
            && c.replicas[0].logs().contains("as a follower")
    });
}

#[test]
fn a_database_restart_mid_rotation_is_waited_out() {
    let mut c = Cluster::start();
    let (id, new_version) = c.start_paused();
    c.pg.stop();
    std::thread::sleep(Duration::from_millis(1500));
    c.pg.start_again();
    // Whoever leads once the database is back (the same leader if it kept
    // its lease) continues the rotation.
    wait_for("a leader after the database restart", || c.leader().is_some());
    wait_for("agents connected", || c.connected() == 3);
    c.finish(&id, &new_version);
}
