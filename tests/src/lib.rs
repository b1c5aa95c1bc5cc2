//! Fixtures for rekey's end-to-end tests: real `rekeyd`, `rekey-agent` and
//! `rekey` processes talking mTLS on loopback, each in its own temp dir.
//!
//! Waits poll a condition with a deadline (never a fixed sleep); every child
//! process is killed when its fixture drops; logs are printed when a test fails.
//! Process handling (spawning with a log, signals, waits, free ports) is
//! [`rekey_demo::process`], shared with `rekey demo`.
//! What the CLI prints with `-o json` is read back as the `rekey_types::v1`
//! views ([`Coordinator::rotation`], [`Coordinator::agents`], ...), so a test
//! reads typed fields and a renamed field fails to compile.

pub mod bench;
pub mod fixtures;
pub mod postgres;
pub mod scripted;
pub mod sim;

use anyhow::{Context, Result, anyhow, bail};
use rekey_demo::process::{self, Signal, spawn_logged, wait_until};
use rekey_types::v1::{
    AgentView, AlertView, AuditRecordView, IncidentView, JoinTokenView, RotationSummary, RotationView, ScopeView,
    SecretView, VersionView,
};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::sync::OnceLock;

/// Paths of the binaries under test.
pub struct Bins {
    pub rekeyd: PathBuf,
    pub agent: PathBuf,
    pub cli: PathBuf,
    pub demo_api: PathBuf,
    pub demo_service: PathBuf,
}

/// Builds the binaries once per test process (a no-op when `cargo test
/// --workspace` already built them) and returns their paths.
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        let root = workspace_root();
        // Benchmarks built with --release measure release binaries.
        let release = std::env::current_exe().is_ok_and(|p| p.components().any(|c| c.as_os_str() == "release"));
        let mut args = vec![
            "build",
            "--quiet",
            "-p",
            "rekey-coordinator",
            "-p",
            "rekey-agent",
            "-p",
            "rekey-cli",
            "-p",
            "rekey-demo",
            "--bins",
        ];
        if release {
            args.push("--release");
        }
        let status = rekey_demo::process::cargo()
            .args(&args)
            .current_dir(&root)
            .status()
            .expect("run cargo build for the binaries under test");
        assert!(status.success(), "building the binaries under test failed");
        let dir = target_dir().join(if release { "release" } else { "debug" });
        Bins {
            rekeyd: dir.join("rekeyd"),
            agent: dir.join("rekey-agent"),
            cli: dir.join("rekey"),
            demo_api: dir.join("rekey-demo-api"),
            demo_service: dir.join("rekey-demo-service"),
        }
    })
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The cargo target dir (honours CARGO_TARGET_DIR).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

pub use rekey_common::testing::budget;

/// Polls `f` until it returns true; panics naming `what` once the test budget
/// ([`budget`], `REKEY_TEST_BUDGET`) has passed. A wait is on a condition,
/// never on elapsed time, so the budget only bounds a broken test.
pub fn wait_for(what: &str, f: impl FnMut() -> bool) {
    if let Err(e) = wait_until(what, budget(), f) {
        panic!("{e}");
    }
}

pub fn free_port() -> u16 {
    process::free_port().expect("free port")
}

pub use process::read_log;

/// Where a test coordinator keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// The embedded default: sled in the data dir.
    Sled,
    /// A real PostgreSQL server of its own (`pgserver`), one database.
    Postgres,
}

/// A real `rekeyd` process with its own data dir and master key.
pub struct Coordinator {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    pub store: StoreKind,
    /// The PostgreSQL server of a [`StoreKind::Postgres`] coordinator.
    pub postgres: Option<postgres::Postgres>,
    child: Option<Child>,
    starts: u32,
}

impl Coordinator {
    /// Writes a config into `dir` (with `extra` TOML appended) and starts rekeyd.
    pub fn start(dir: &Path, extra: &str) -> Coordinator {
        Coordinator::start_on(dir, extra, StoreKind::Sled)
    }

    /// As [`Coordinator::start`], on the given store (PostgreSQL: a server
    /// of its own, started here and stopped with the coordinator).
    pub fn start_on(dir: &Path, extra: &str, store: StoreKind) -> Coordinator {
        std::fs::create_dir_all(dir).expect("mkdir");
        let port = free_port();
        let config = dir.join("coordinator.toml");
        let (pg, store_toml) = match store {
            StoreKind::Sled => (None, String::new()),
            StoreKind::Postgres => {
                let pg = postgres::Postgres::start();
                pg.create_database("rekey");
                let toml = pg.store_toml("rekey");
                (Some(pg), toml)
            }
        };
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndata_dir = \"data\"\nmaster_key_file = \"master.key\"\n{extra}\n{store_toml}"
            ),
        )
        .expect("write config");
        let mut c = Coordinator {
            dir: dir.to_path_buf(),
            config,
            port,
            log: dir.join("rekeyd.log"),
            store,
            postgres: pg,
            child: None,
            starts: 0,
        };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        let addr_file = self.dir.join("data/rekeyd.addr");
        let _ = std::fs::remove_file(&addr_file);
        let _ = std::fs::remove_file(self.dir.join("data/metrics.addr"));
        self.starts += 1;
        self.log = self.dir.join(format!("rekeyd.{}.log", self.starts));
        let child = spawn_logged(Command::new(&bins().rekeyd).arg("--config").arg(&self.config).arg("run"), &self.log)
            .expect("spawn rekeyd");
        self.child = Some(child);
        let log = self.log.clone();
        wait_for("rekeyd to listen", || {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(st)) = child.try_wait()
            {
                panic!("rekeyd exited early with {st}:\n{}", read_log(&log));
            }
            addr_file.exists()
        });
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Process id of the running rekeyd.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn operator_dir(&self) -> PathBuf {
        self.dir.join("data/operator")
    }

    /// SIGKILL: no drain, no flush beyond what was already made durable.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            process::signal_and_wait(&mut c, Signal::SIGKILL);
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        process::signal_and_wait(&mut self.child.take()?, Signal::SIGTERM)
    }

    /// Starts again on the same port and data dir.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn logs(&self) -> String {
        (1..=self.starts).map(|i| read_log(&self.dir.join(format!("rekeyd.{i}.log")))).collect::<Vec<_>>().join("\n")
    }

    /// Runs the `rekey` CLI against this coordinator.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_as(&self.operator_dir(), args)
    }

    /// Runs the `rekey` CLI against this coordinator with the operator
    /// credential in `operator_dir` (e.g. one made by `rekey operator create`).
    pub fn cli_as(&self, operator_dir: &Path, args: &[&str]) -> Output {
        Command::new(&bins().cli)
            .arg("--operator-dir")
            .arg(operator_dir)
            .arg("--coordinator")
            .arg(self.addr())
            .args(args)
            .output()
            .expect("run rekey")
    }

    /// Runs the CLI, requires success, returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "rekey {args:?} failed: {}\n--- rekeyd log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8(out.stdout).expect("utf8")
    }

    /// Runs the CLI with `-o json`, requires success, returns its output untyped.
    /// Prefer [`Coordinator::cli_view`] and the typed accessors below.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        self.cli_view(args)
    }

    /// Runs the CLI with `-o json`, requires success, and reads its output as
    /// the view `T` (a `rekey_types::v1` type): what an operator's tooling reads.
    pub fn cli_view<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.cli_ok(&a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("rekey {args:?} -o json is not a {}: {e}\n{out}", std::any::type_name::<T>()))
    }

    /// `rekey token create`; returns (token, ca fingerprint).
    pub fn token(&self, host: &str, extra: &[&str]) -> (String, String) {
        let mut args = vec!["token", "create", "--host", host];
        args.extend(extra);
        let v: JoinTokenView = self.cli_view(&args);
        (v.token, v.ca_fingerprint)
    }

    /// `rekey agents`.
    pub fn agents(&self) -> Vec<AgentView> {
        self.cli_view(&["agents"])
    }

    pub fn agent(&self, name: &str) -> Option<AgentView> {
        self.agents().into_iter().find(|a| a.name == name)
    }

    pub fn is_connected(&self, name: &str) -> bool {
        self.agent(name).is_some_and(|a| a.connected)
    }

    /// `rekey rotate status ID`.
    pub fn rotation(&self, id: &str) -> RotationView {
        self.cli_view(&["rotate", "status", id])
    }

    /// `rekey rotate list [--secret SECRET]`, newest first.
    pub fn rotations(&self, secret: Option<&str>) -> Vec<RotationSummary> {
        match secret {
            Some(s) => self.cli_view(&["rotate", "list", "--secret", s]),
            None => self.cli_view(&["rotate", "list"]),
        }
    }

    /// `rekey secrets`.
    pub fn secrets(&self) -> Vec<SecretView> {
        self.cli_view(&["secrets"])
    }

    /// `rekey secrets`, the one named `name`.
    pub fn secret(&self, name: &str) -> SecretView {
        self.secrets().into_iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no secret {name} in the catalog"))
    }

    /// `rekey versions SECRET`, oldest first.
    pub fn versions(&self, secret: &str) -> Vec<VersionView> {
        self.cli_view(&["versions", secret])
    }

    /// `rekey audit`, oldest first.
    pub fn audit(&self) -> Vec<AuditRecordView> {
        self.cli_view(&["audit"])
    }

    /// `rekey alerts`, newest first.
    pub fn alerts(&self) -> Vec<AlertView> {
        self.cli_view(&["alerts"])
    }

    /// `rekey incident status ID`.
    pub fn incident(&self, id: &str) -> IncidentView {
        self.cli_view(&["incident", "status", id])
    }

    /// `rekey scope SECRET ARGS...`.
    pub fn scope(&self, secret: &str, args: &[&str]) -> ScopeView {
        let mut a = vec!["scope", secret];
        a.extend(args);
        self.cli_view(&a)
    }

    /// One scrape of rekeyd's `/metrics` (needs `[metrics] listen`): the body.
    pub fn metrics(&self) -> String {
        let file = self.dir.join("data/metrics.addr");
        wait_for("rekeyd's metrics listener", || file.exists());
        let addr = std::fs::read_to_string(&file).expect("rekeyd wrote metrics.addr");
        let (status, body) = http_get(addr.trim(), "/metrics").expect("scrape /metrics");
        assert_eq!(status, 200, "scrape failed: {body}");
        body
    }
}

/// A plain HTTP/1.0 GET on loopback: (status, body).
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no HTTP header in {text:?}"))?;
    let status =
        head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| anyhow!("bad status line"))?;
    Ok((status, body.to_string()))
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- rekeyd logs ({}) ---\n{}", self.dir.display(), self.logs());
        }
    }
}

/// A real `rekey-agent` with its own state dir and config.
pub struct Agent {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    runs: u32,
}

impl Agent {
    /// Prepares dir and config (consuming `secrets`); does not enroll.
    pub fn new(dir: &Path, name: &str, secrets: &[&str]) -> Agent {
        let dir = dir.join(format!("agent-{name}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let config = dir.join("agent.toml");
        let mut text =
            String::from("state_dir = \"state\"\n[reconnect]\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n");
        for s in secrets {
            text.push_str(&format!("[[secret]]\nname = \"{s}\"\n"));
        }
        std::fs::write(&config, text).expect("write agent config");
        Agent { name: name.to_string(), log: dir.join("agent.log"), dir, config, child: None, runs: 0 }
    }

    /// Prepares dir and writes `config_text` as its agent.toml verbatim (use
    /// `state_dir = "state"` so [`Agent::state_dir`] is right).
    pub fn with_config(dir: &Path, name: &str, config_text: &str) -> Agent {
        let dir = dir.join(format!("agent-{name}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let config = dir.join("agent.toml");
        std::fs::write(&config, config_text).expect("write agent config");
        Agent { name: name.to_string(), log: dir.join("agent.log"), dir, config, child: None, runs: 0 }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// `rekey-agent enroll`; returns the process output.
    pub fn enroll(&self, coordinator: &str, token: &str, fingerprint: &str) -> Output {
        Command::new(&bins().agent)
            .args([
                "enroll",
                "--force",
                "--coordinator",
                coordinator,
                "--token",
                token,
                "--ca-fingerprint",
                fingerprint,
            ])
            .arg("--state-dir")
            .arg(self.state_dir())
            .output()
            .expect("run rekey-agent enroll")
    }

    pub fn enroll_ok(&self, c: &Coordinator, labels: &[&str]) {
        let mut extra = Vec::new();
        for l in labels {
            extra.extend(["--label", l]);
        }
        let (token, fp) = c.token(&self.name, &extra);
        let out = self.enroll(&c.addr(), &token, &fp);
        assert!(out.status.success(), "enroll {} failed: {}", self.name, String::from_utf8_lossy(&out.stderr));
    }

    pub fn start(&mut self) {
        self.runs += 1;
        self.log = self.dir.join(format!("agent.{}.log", self.runs));
        let mut cmd = Command::new(&bins().agent);
        cmd.arg("run").arg("--config").arg(&self.config);
        self.child = Some(spawn_logged(&mut cmd, &self.log).expect("spawn rekey-agent"));
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            process::signal_and_wait(&mut c, Signal::SIGKILL);
        }
    }

    /// Process id of the running agent.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits for the agent process to exit by itself; returns its status and log.
    pub fn wait_exit(&mut self) -> Result<(ExitStatus, String)> {
        let child = self.child.as_mut().ok_or_else(|| anyhow!("agent {} not running", self.name))?;
        let mut exited = Ok(None);
        let waited = wait_until(&format!("agent {} to exit", self.name), budget(), || {
            exited = child.try_wait();
            !matches!(exited, Ok(None))
        });
        let log = read_log(&self.log);
        match (waited, exited.context("wait")?) {
            (Ok(()), Some(status)) => {
                self.child = None;
                Ok((status, log))
            }
            _ => bail!("agent {} still running after {:?}:\n{log}", self.name, budget()),
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn logs(&self) -> String {
        (1..=self.runs).map(|i| read_log(&self.dir.join(format!("agent.{i}.log")))).collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- agent {} logs ---\n{}", self.name, self.logs());
        }
    }
}

/// A coordinator and N enrolled, running agents, all connected.
pub struct TestCluster {
    // Dropped in this order: the processes (which print their logs when a
    // test failed) before the directory holding those logs.
    pub agents: Vec<Agent>,
    pub coordinator: Coordinator,
    pub tmp: tempfile::TempDir,
}

impl TestCluster {
    pub fn new(n: usize, secrets: &[&str]) -> TestCluster {
        Self::with_config(n, secrets, "")
    }

    pub fn with_config(n: usize, secrets: &[&str], coordinator_extra: &str) -> TestCluster {
        rustls::crypto::ring::default_provider().install_default().ok();
        let tmp = tempfile::Builder::new().prefix("rekey-test-").tempdir().expect("tempdir");
        let coordinator = Coordinator::start(&tmp.path().join("coordinator"), coordinator_extra);
        let mut agents = Vec::new();
        for i in 1..=n {
            let mut a = Agent::new(tmp.path(), &format!("host-{i}"), secrets);
            a.enroll_ok(&coordinator, &[&format!("index={i}"), "env=test"]);
            a.start();
            agents.push(a);
        }
        let c = TestCluster { tmp, agents, coordinator };
        c.wait_all_connected();
        c
    }

    pub fn wait_all_connected(&self) {
        wait_for("all agents connected", || {
            let list = self.coordinator.agents();
            self.agents.iter().all(|a| list.iter().any(|x| x.name == a.name && x.connected))
        });
    }
}
