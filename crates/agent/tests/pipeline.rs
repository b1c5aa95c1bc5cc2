//! The apply pipeline against real files and real processes: a real
//! `rekey-demo-api` (the "provider") and a real `rekey-demo-service` that
//! reads its key at start and is healthy only while the API accepts it.
//!
//! Each test starts its own API and service on free loopback ports in its
//! own temp dir, waits by polling with deadlines, and kills what it started
//! when it ends. Agent logs are captured and checked for secret values.

use rekey_agent::config::AgentConfig;
use rekey_agent::outbox::Outbox;
use rekey_agent::pipeline::Pipeline;
use rekey_common::secret::fingerprint_fields;
use rekey_proto::v1::{AppliedVersion, Delivery, Purge, Rollback, SecretField, Stage, StageReport};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const SECRET: &str = "demo-key";
const ADMIN: &str = "admin-token-for-tests";
const FP_KEY: &[u8] = b"rotation-fingerprint-key";

// ---------------------------------------------------------------- fixtures

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root")
}

struct DemoBins {
    api: PathBuf,
    service: PathBuf,
}

/// Builds the demo binaries once per test process (a no-op when already built).
fn bins() -> &'static DemoBins {
    static BINS: OnceLock<DemoBins> = OnceLock::new();
    BINS.get_or_init(|| {
        let root = workspace_root();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "rekey-demo", "--bins"])
            .current_dir(&root)
            .status()
            .expect("run cargo build for the demo binaries");
        assert!(status.success(), "building the demo binaries failed");
        let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
        let dir = target.join("debug");
        DemoBins { api: dir.join("rekey-demo-api"), service: dir.join("rekey-demo-service") }
    })
}

/// Everything the agent logged, across tests (one global subscriber).
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("rekey_agent=debug,info"))
            .with_ansi(false)
            .with_writer(move || Capture(writer.clone()))
            .try_init()
            .ok();
        buf
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `f` until true; panics naming `what` after the test budget
/// (`REKEY_TEST_BUDGET`): waits are on conditions, never on elapsed time.
async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let timeout = rekey_common::testing::budget();
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One HTTP/1.1 request, `Connection: close`. `Err` if it cannot connect.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(b) = bearer {
        req.push_str(&format!("Authorization: Bearer {b}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| format!("bad response {out:?}"))?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

fn kill(pid: i32) {
    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
}

/// A real `rekey-demo-api`.
struct DemoApi {
    addr: String,
    child: Child,
}

impl DemoApi {
    fn start(dir: &Path) -> DemoApi {
        let addr_file = dir.join("api.addr");
        let log = std::fs::File::create(dir.join("api.log")).unwrap();
        let mut child = Command::new(&bins().api)
            .args(["--listen", "127.0.0.1:0", "--addr-file"])
            .arg(&addr_file)
            .env("REKEY_DEMO_ADMIN_TOKEN", ADMIN)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start rekey-demo-api");
        let deadline = Instant::now() + rekey_common::testing::budget();
        while !addr_file.exists() {
            assert!(child.try_wait().unwrap().is_none(), "rekey-demo-api exited at start");
            assert!(Instant::now() < deadline, "rekey-demo-api did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        DemoApi { addr: std::fs::read_to_string(&addr_file).unwrap(), child }
    }

    /// Creates a key; returns (id, secret).
    fn create_key(&self, name: &str) -> (String, String) {
        let (status, body) =
            http(&self.addr, "POST", "/v1/keys", Some(ADMIN), Some(&format!("{{\"name\": \"{name}\"}}"))).unwrap();
        assert_eq!(status, 201, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        (v["id"].as_str().unwrap().to_string(), v["secret"].as_str().unwrap().to_string())
    }

    fn keys(&self) -> Vec<serde_json::Value> {
        let (status, body) = http(&self.addr, "GET", "/v1/keys", Some(ADMIN), None).unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    fn last_used(&self, id: &str) -> Option<i64> {
        self.keys().into_iter().find(|k| k["id"] == id).and_then(|k| k["last_used_at"].as_i64())
    }
}

impl Drop for DemoApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A host: a temp dir with the service's files, the demo service, the agent config.
struct Host {
    dir: tempfile::TempDir,
    api: DemoApi,
    port: u16,
    key1: (String, String),
    key2: (String, String),
}

const CREDS_BEFORE: &str =
    "# demo service credentials\r\nOTHER=keep me  # untouched\nDEMO_API_KEY=KEY1\nexport TRAILING=1";

impl Host {
    fn new() -> Host {
        logs();
        let dir = tempfile::Builder::new().prefix("rekey-pipeline-").tempdir().unwrap();
        let api = DemoApi::start(dir.path());
        let key1 = api.create_key("web-1");
        let key2 = api.create_key("web-2");
        let host = Host { dir, api, port: free_port(), key1, key2 };
        let creds = host.path("creds.env");
        std::fs::write(&creds, CREDS_BEFORE.replace("KEY1", &host.key1.1)).unwrap();
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o640)).unwrap();
        if is_root() {
            std::os::unix::fs::chown(&creds, Some(65534), Some(65534)).unwrap();
        }
        std::fs::write(host.path("app.json"), format!("{{\"api_key\": \"{}\"}}\n", host.key1.1)).unwrap();
        host
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn health_url(&self) -> String {
        format!("http://127.0.0.1:{}/health", self.port)
    }

    /// The restart command: stop the service in the pidfile, start a new one.
    fn service_argv(&self) -> Vec<String> {
        let p = |n: &str| self.path(n).display().to_string();
        vec![
            bins().service.display().to_string(),
            "--detach".into(),
            "--replace".into(),
            "--credentials".into(),
            p("creds.env"),
            "--api".into(),
            format!("http://{}", self.api.addr),
            "--listen".into(),
            format!("127.0.0.1:{}", self.port),
            "--pidfile".into(),
            p("svc.pid"),
            "--log".into(),
            p("svc.log"),
        ]
    }

    fn start_service(&self) {
        let argv = self.service_argv();
        let out = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
        assert!(out.status.success(), "the demo service did not start: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn service_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.path("svc.pid")).ok()?.trim().parse().ok()
    }

    fn health(&self) -> Option<u16> {
        http(&format!("127.0.0.1:{}", self.port), "GET", "/health", None, None).ok().map(|(s, _)| s)
    }

    async fn wait_healthy(&self) {
        wait_for("the demo service to be healthy", || self.health() == Some(200)).await;
    }

    /// agent.toml with the given file/restart/health blocks (placeholders
    /// @DIR@, @RESTART@, @HEALTH_URL@ are filled in).
    fn config(&self, blocks: &str) -> AgentConfig {
        let argv: Vec<String> = self.service_argv().iter().map(|a| format!("{a:?}")).collect();
        let text = format!("state_dir = \"state\"\n[[secret]]\nname = \"{SECRET}\"\n{blocks}")
            .replace("@RESTART@", &format!("[{}]", argv.join(", ")))
            .replace("@HEALTH_URL@", &self.health_url())
            .replace("@DIR@", &self.dir.path().display().to_string())
            .replace("@SERVICE@", &bins().service.display().to_string());
        AgentConfig::from_str(&self.path("agent.toml"), &text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn files(&self) -> (Vec<u8>, Vec<u8>) {
        (std::fs::read(self.path("creds.env")).unwrap(), std::fs::read(self.path("app.json")).unwrap())
    }

    fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    /// No value of either key in the agent's logs, journal or applied state.
    fn assert_no_leak(&self) {
        let logs = log_text();
        let mut state = std::fs::read_to_string(self.state_dir().join("applied.json")).unwrap_or_default();
        if let Ok(rd) = std::fs::read_dir(self.state_dir().join("journal")) {
            for e in rd {
                state.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap());
            }
        }
        for (_, secret) in [&self.key1, &self.key2] {
            assert!(!logs.contains(secret.as_str()), "a key value appears in the agent logs");
            assert!(!state.contains(secret.as_str()), "a key value appears in the agent state");
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(pid) = self.service_pid() {
            kill(pid);
        }
        if std::thread::panicking() {
            eprintln!(
                "--- demo service log ---\n{}",
                std::fs::read_to_string(self.path("svc.log")).unwrap_or_default()
            );
            let logs = log_text();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!("--- agent log (last lines) ---\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// The standard declaration: env-file + template, restart command, HTTP health.
const STANDARD: &str = r#"
[[secret.file]]
path = "@DIR@/creds.env"
kind = "env-file"
keys = { DEMO_API_KEY = "value" }
[[secret.file]]
path = "@DIR@/app.json"
kind = "template"
template = '''
{"api_key": "{{ value }}"}
'''
[secret.restart]
kind = "command"
command = @RESTART@
timeout = "20s"
[secret.health]
kind = "http"
url = "@HEALTH_URL@"
body_contains = "ok"
retries = 3
interval = "100ms"
timeout = "2s"
"#;

/// [`STANDARD`] with a restart that blocks (writing its pid to
/// `blocker.pid`) while the file `block` exists, then starts the service.
fn blocking_restart_config(host: &Host) -> AgentConfig {
    let script = format!(
        "if [ -e {dir}/block ]; then echo $$ > {dir}/blocker.pid; sleep 60; fi; exec \"$0\" \"$@\"",
        dir = host.dir.path().display()
    );
    let mut argv = vec!["/bin/sh".to_string(), "-c".into(), script];
    argv.extend(host.service_argv());
    let argv: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
    host.config(&STANDARD.replace("@RESTART@", &format!("[{}]", argv.join(", "))))
}

/// Until the blocked restart command (killed with its dropped future) is gone.
async fn wait_blocker_gone(host: &Host) {
    let blocker: i32 = std::fs::read_to_string(host.path("blocker.pid")).unwrap().trim().parse().unwrap();
    wait_for("the blocked restart command to die", || {
        std::fs::read_to_string(format!("/proc/{blocker}/stat"))
            .map(|s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
            .unwrap_or(true)
    })
    .await;
}

fn delivery(version: &str, value: &str, previous: Option<(&str, &str)>) -> Delivery {
    Delivery {
        rotation_id: "rot-1".into(),
        secret: SECRET.into(),
        version_id: version.into(),
        fields: vec![SecretField { name: "value".into(), value: value.as_bytes().to_vec() }],
        previous_version_id: previous.map(|p| p.0.to_string()).unwrap_or_default(),
        previous_fields: previous
            .map(|p| vec![SecretField { name: "value".into(), value: p.1.as_bytes().to_vec() }])
            .unwrap_or_default(),
        restart_jitter_ms: 50,
        fingerprint_key: FP_KEY.to_vec(),
    }
}

fn stages(reports: &[StageReport]) -> Vec<Stage> {
    reports.iter().map(|r| Stage::try_from(r.stage).unwrap()).collect()
}

use Stage::{Applied, Delivered, Failed, Healthy, Refused, Restarted, RolledBack};

// ---------------------------------------------------------------- tests

/// Hostile service users: planted symlinks, unsafe transitions, duplicate
/// declarations, forged pidfiles.
#[path = "pipeline/trust.rs"]
mod trust;

/// Secrets sharing a restart: one restart per batch, never two at once.
#[path = "pipeline/shared.rs"]
mod shared;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_delivery_reaches_healthy_with_the_right_fingerprint() {
    let host = Host::new();
    host.start_service();
    host.wait_healthy().await;
    let before_pid = host.service_pid().unwrap();
    let config = host.config(STANDARD);
    let pipeline = Pipeline::open(&config, Outbox::new()).unwrap();
    assert!(pipeline.recover().await.is_empty());

    let (key1, key2) = (&host.key1.1, &host.key2.1);
    let reports = pipeline.deliver(delivery("v2", key2, Some(("v1", key1)))).await;
    assert_eq!(stages(&reports), [Delivered, Applied, Restarted, Healthy], "{reports:?}");
    let fingerprint = fingerprint_fields(FP_KEY, [("value", key2.as_bytes())]);
    assert_eq!(reports[3].fingerprint, fingerprint);
    assert!(reports.iter().all(|r| r.error.is_empty() && r.version_id == "v2" && r.rotation_id == "rot-1"));

    // The files: only the key changed, mode and owner kept.
    let creds = std::fs::read_to_string(host.path("creds.env")).unwrap();
    assert_eq!(creds, CREDS_BEFORE.replace("KEY1", key2));
    let m = std::fs::metadata(host.path("creds.env")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o640);
    if is_root() {
        assert_eq!((m.uid(), m.gid()), (65534, 65534));
    }
    assert_eq!(std::fs::read_to_string(host.path("app.json")).unwrap(), format!("{{\"api_key\": \"{key2}\"}}\n"));

    // A new process, healthy on the new key.
    assert_ne!(host.service_pid().unwrap(), before_pid);
    assert_eq!(host.health(), Some(200));
    assert!(host.api.last_used(&host.key2.0).is_some(), "the new key was never used");

    let applied =
        vec![AppliedVersion { secret: SECRET.into(), version_id: "v2".into(), fingerprint: fingerprint.clone() }];
    assert_eq!(pipeline.applied(), applied);
    // The session sends the latest report per rotation and secret.
    assert_eq!(stages(&pipeline.outbox().take_unsent(0)), [Healthy]);

    // Re-delivery: HEALTHY at once, nothing touched (same files, same process).
    let inode = std::fs::metadata(host.path("creds.env")).unwrap().ino();
    let pid = host.service_pid();
    let again = pipeline.deliver(delivery("v2", key2, Some(("v1", key1)))).await;
    assert_eq!(stages(&again), [Healthy]);
    assert_eq!(again[0].fingerprint, fingerprint);
    assert_eq!(std::fs::metadata(host.path("creds.env")).unwrap().ino(), inode);
    assert_eq!(host.service_pid(), pid);

    // A completed apply survives an agent restart.
    drop(pipeline);
    let restarted = Pipeline::open(&config, Outbox::new()).unwrap();
    assert!(restarted.recover().await.is_empty());
    assert_eq!(restarted.applied(), applied);
    host.assert_no_leak();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_template_fails_before_touching_anything() {
    let host = Host::new();
    host.start_service();
    host.wait_healthy().await;
    let pid = host.service_pid();
    let before = host.files();
    let blocks =
        STANDARD.replace(r#"{"api_key": "{{ value }}"}"#, r#"{"api_key": "{{ value }}", "region": "{{ region }}"}"#);
    let pipeline = Pipeline::open(&host.config(&blocks), Outbox::new()).unwrap();
    let reports = pipeline.deliver(delivery("v2", &host.key2.1, Some(("v1", &host.key1.1)))).await;
    assert_eq!(stages(&reports), [Delivered, Failed, RolledBack], "{reports:?}");
    let error = &reports[1].error;
    assert!(error.contains("cannot render") && error.contains("app.json"), "{error}");
    assert!(error.contains("undefined variable `region`"), "{error}");
    assert_eq!(host.files(), before);
    assert_eq!(host.service_pid(), pid, "nothing to restart");
    assert_eq!(host.health(), Some(200));
    assert!(pipeline.applied().is_empty());
    host.assert_no_leak();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_that_will_not_start_is_rolled_back() {
    let host = Host::new();
    host.start_service();
    host.wait_healthy().await;
    let before = host.files();
    let pipeline = Pipeline::open(&host.config(STANDARD), Outbox::new()).unwrap();
    // Not a demo key: the new service exits at start.
    let reports = pipeline.deliver(delivery("v2", "not-a-demo-key-value", Some(("v1", &host.key1.1)))).await;
    assert_eq!(stages(&reports), [Delivered, Applied, Failed, RolledBack], "{reports:?}");
    let error = &reports[2].error;
    assert!(error.starts_with("restart failed: ") && error.contains("exited with status 1"), "{error}");
    assert!(error.contains("the service exited with status 1 during start"), "{error}");
    assert_eq!(host.files(), before, "files restored byte for byte");
    assert_eq!(host.health(), Some(200), "healthy again on the old key");
    assert!(pipeline.applied().is_empty());
    assert!(std::fs::read_dir(host.state_dir().join("journal")).unwrap().next().is_none());
    host.assert_no_leak();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_that_never_passes_is_rolled_back() {
    let host = Host::new();
    host.start_service();
    host.wait_healthy().await;
    let before = host.files();
    let pipeline = Pipeline::open(&host.config(STANDARD), Outbox::new()).unwrap();
    // Well formed, but the API does not know it.
    let unknown = "dk_000000000000000000000000000000000000";
    let reports = pipeline.deliver(delivery("v2", unknown, Some(("v1", &host.key1.1)))).await;
    assert_eq!(stages(&reports), [Delivered, Applied, Restarted, Failed, RolledBack], "{reports:?}");
    let error = &reports[3].error;
    let expected = format!("health check {} returned 503, 3 tries over ", host.health_url());
    assert!(error.starts_with(&expected), "{error}");
    assert!(!error.contains(unknown), "{error}");
    assert_eq!(host.files(), before);
    assert_eq!(host.health(), Some(200));
    assert!(!log_text().contains(unknown));
    host.assert_no_leak();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_file_is_a_clean_failure() {
    let host = Host::new();
    host.start_service();
    host.wait_healthy().await;
    let pid = host.service_pid();
    let before = host.files();
    let blocks = format!("{STANDARD}\n[[secret.file]]\npath = \"@DIR@/legacy.conf\"\nkind = \"replace\"\n");
    // [[secret.file]] after [secret.health] still belongs to the secret.
    let pipeline = Pipeline::open(&host.config(&blocks), Outbox::new()).unwrap();
    let reports = pipeline.deliver(delivery("v2", &host.key2.1, Some(("v1", &host.key1.1)))).await;
    assert_eq!(stages(&reports), [Delivered, Failed, RolledBack], "{reports:?}");
    let error = &reports[1].error;
    assert!(error.contains("legacy.conf") && error.contains("the file does not exist"), "{error}");
    assert_eq!(host.files(), before);
    assert_eq!(host.service_pid(), pid);
    assert_eq!(host.health(), Some(200));
    host.assert_no_leak();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_secret_is_refused() {
    let host = Host::new();
    let pipeline = Pipeline::open(&host.config(STANDARD), Outbox::new()).unwrap();
    let mut d = delivery("v2", &host.key2.1, None);
    d.secret = "someone-elses-key".into();
    let before = host.files();
    let reports = pipeline.deliver(d).await;
    assert_eq!(stages(&reports), [Refused]);
    assert_eq!(
        reports[0].error,
        format!("secret someone-elses-key is not declared in {}", host.path("agent.toml").display())
    );
    assert_eq!(host.files(), before);
    assert!(std::fs::read_dir(host.state_dir().join("journal")).unwrap().next().is_none());
    let r = pipeline
        .rollback(Rollback { rotation_id: "rot-1".into(), secret: "someone-elses-key".into(), version_id: "v2".into() })
        .await;
    assert_eq!(stages(&r), [Refused]);
    assert!(log_text().contains("someone-elses-key is not declared"));
    host.assert_no_leak();
}

/// The agent dies in the middle of a rollback's restart (found by the
/// simulation: it used to come back with no journal, no backup and the new
/// version still recorded as applied, so every later rollback failed and an
/// abort waited forever). The journal now outlives the restored files: a new
/// pipeline redoes only the restart and check, and reports the rollback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_interrupted_mid_restart_is_finished_at_start() {
    let host = Host::new();
    host.start_service();
    host.wait_healthy().await;
    let before = host.files();
    let config = blocking_restart_config(&host);
    let pipeline = Pipeline::open(&config, Outbox::new()).unwrap();
    let reports = pipeline.deliver(delivery("v2", &host.key2.1, Some(("v1", &host.key1.1)))).await;
    assert_eq!(stages(&reports), [Delivered, Applied, Restarted, Healthy], "{reports:?}");

    // The coordinator asks for the rollback; its restart blocks.
    std::fs::write(host.path("block"), "").unwrap();
    let p = pipeline.clone();
    let r = Rollback { rotation_id: "rot-1".into(), secret: SECRET.into(), version_id: "v2".into() };
    let task = tokio::spawn(async move { p.rollback(r).await });
    wait_for("the rollback's restart to block", || host.path("blocker.pid").exists()).await;
    assert_eq!(host.files(), before, "the files are back before the restart");
    let journal = std::fs::read_to_string(host.state_dir().join("journal/demo-key.json")).unwrap();
    assert!(journal.contains("\"stage\": \"restored\""), "{journal}");
    assert!(pipeline.applied().iter().all(|a| a.version_id != "v2"), "v2 still recorded as applied");

    // "Crash" mid-restart.
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    drop(pipeline);
    wait_blocker_gone(&host).await;
    std::fs::remove_file(host.path("block")).unwrap();
    let pid_before_recovery = host.service_pid();

    // Start again: the restart is redone and the rollback reported.
    let outbox = Outbox::new();
    let pipeline = Pipeline::open(&config, outbox.clone()).unwrap();
    let reports = pipeline.recover().await;
    assert_eq!(stages(&reports), [RolledBack], "{reports:?}");
    assert_eq!(reports[0].version_id, "v2");
    assert_eq!(host.files(), before);
    assert_ne!(host.service_pid(), pid_before_recovery, "the service was restarted on the restored files");
    assert_eq!(host.health(), Some(200));
    assert!(pipeline.applied().iter().all(|a| a.version_id != "v2"));
    assert!(std::fs::read_dir(host.state_dir().join("journal")).unwrap().next().is_none());
    // Asked again (the coordinator did not hear the first answer): nothing to undo, rolled back.
    let r = Rollback { rotation_id: "rot-1".into(), secret: SECRET.into(), version_id: "v2".into() };
    assert_eq!(stages(&pipeline.rollback(r).await), [RolledBack]);
    host.assert_no_leak();
}

/// The agent dies mid-restart (the apply future is dropped while its restart
/// command blocks); a new pipeline on the same state dir undoes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_apply_is_rolled_back_at_start() {
    let host = Host::new();
    host.start_service();
    host.wait_healthy().await;
    let before = host.files();
    let config = blocking_restart_config(&host);
    std::fs::write(host.path("block"), "").unwrap();

    let pipeline = Pipeline::open(&config, Outbox::new()).unwrap();
    let p = pipeline.clone();
    let d = delivery("v2", &host.key2.1, Some(("v1", &host.key1.1)));
    let task = tokio::spawn(async move { p.deliver(d).await });
    wait_for("the restart command to block", || host.path("blocker.pid").exists()).await;
    // Mid-apply: the new key is on disk, the journal says where we are.
    assert!(std::fs::read_to_string(host.path("creds.env")).unwrap().contains(&host.key2.1));
    let journal = std::fs::read_to_string(host.state_dir().join("journal/demo-key.json")).unwrap();
    assert!(journal.contains("\"stage\": \"restarting\""), "{journal}");
    assert!(!journal.contains(&host.key1.1) && !journal.contains(&host.key2.1), "the journal holds a value");

    // "Crash": drop the apply; its restart command is killed with it.
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    drop(pipeline);
    wait_blocker_gone(&host).await;
    std::fs::remove_file(host.path("block")).unwrap();

    // Start again: recovery restores, restarts, checks, and reports the truth.
    let outbox = Outbox::new();
    let pipeline = Pipeline::open(&config, outbox.clone()).unwrap();
    let reports = pipeline.recover().await;
    assert_eq!(stages(&reports), [Failed, RolledBack], "{reports:?}");
    assert_eq!(reports[0].error, "apply of v2 interrupted by agent restart at stage restarting; rolled back");
    assert_eq!((reports[0].rotation_id.as_str(), reports[0].version_id.as_str()), ("rot-1", "v2"));
    assert_eq!(host.files(), before, "files restored byte for byte");
    assert_eq!(host.health(), Some(200));
    assert!(pipeline.applied().is_empty());
    assert!(std::fs::read_dir(host.state_dir().join("journal")).unwrap().next().is_none());
    // Queued for the session, which sends them after the next Welcome.
    assert_eq!(stages(&outbox.take_unsent(0)), [Failed, RolledBack]);

    // The coordinator may now deliver again: a fresh attempt succeeds.
    let reports = pipeline.deliver(delivery("v2", &host.key2.1, Some(("v1", &host.key1.1)))).await;
    assert_eq!(stages(&reports), [Delivered, Applied, Restarted, Healthy], "{reports:?}");
    host.assert_no_leak();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_delivery_while_applying_starts_no_second_apply() {
    let host = Host::new();
    host.start_service();
    host.wait_healthy().await;
    let script = format!("echo restart >> {}/restarts; sleep 0.5; exec \"$0\" \"$@\"", host.dir.path().display());
    let mut argv = vec!["/bin/sh".to_string(), "-c".into(), script];
    argv.extend(host.service_argv());
    let argv: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
    let config = host.config(&STANDARD.replace("@RESTART@", &format!("[{}]", argv.join(", "))));
    let pipeline = Pipeline::open(&config, Outbox::new()).unwrap();
    let d = || delivery("v2", &host.key2.1, Some(("v1", &host.key1.1)));

    let (first, second) = tokio::join!(pipeline.deliver(d()), async {
        wait_for("the first apply to start", || host.path("restarts").exists()).await;
        pipeline.deliver(d()).await
    });
    assert_eq!(stages(&first), [Delivered, Applied, Restarted, Healthy], "{first:?}");
    assert!(second.is_empty(), "a duplicate started work: {second:?}");
    assert_eq!(std::fs::read_to_string(host.path("restarts")).unwrap().lines().count(), 1);
    // Afterwards, a re-delivery is answered from the applied state.
    assert_eq!(stages(&pipeline.deliver(d()).await), [Healthy]);
    assert_eq!(std::fs::read_to_string(host.path("restarts")).unwrap().lines().count(), 1);
    assert!(log_text().contains("duplicate delivery ignored"));
    host.assert_no_leak();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_rollback_restores_and_purge_deletes_backups() {
    let host = Host::new();
    host.start_service();
    host.wait_healthy().await;
    let before = host.files();
    let pipeline = Pipeline::open(&host.config(STANDARD), Outbox::new()).unwrap();
    let d = || delivery("v2", &host.key2.1, Some(("v1", &host.key1.1)));
    let rollback = || Rollback { rotation_id: "rot-1".into(), secret: SECRET.into(), version_id: "v2".into() };
    assert_eq!(stages(&pipeline.deliver(d()).await), [Delivered, Applied, Restarted, Healthy]);

    let reports = pipeline.rollback(rollback()).await;
    assert_eq!(stages(&reports), [RolledBack], "{reports:?}");
    assert_eq!(host.files(), before, "files restored byte for byte");
    let m = std::fs::metadata(host.path("creds.env")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o640);
    if is_root() {
        assert_eq!(m.uid(), 65534);
    }
    host.wait_healthy().await;
    assert!(pipeline.applied().is_empty());

    // Idempotent: v2 is not applied any more, nothing is touched.
    let pid = host.service_pid();
    assert_eq!(stages(&pipeline.rollback(rollback()).await), [RolledBack]);
    assert_eq!(host.service_pid(), pid);

    // Apply again, then the coordinator revokes v1: its backup goes.
    assert_eq!(stages(&pipeline.deliver(d()).await), [Delivered, Applied, Restarted, Healthy]);
    let backups = host.state_dir().join("backups/demo-key");
    assert_eq!(std::fs::read_dir(&backups).unwrap().count(), 1);
    let purge = |v: &str| Purge { secret: SECRET.into(), version_id: v.into() };
    assert_eq!(pipeline.purge(purge("v0")).await, 0);
    assert_eq!(pipeline.purge(purge("v1")).await, 1);
    assert_eq!(std::fs::read_dir(&backups).unwrap().count(), 0);
    let reports = pipeline.rollback(rollback()).await;
    assert_eq!(stages(&reports), [Failed]);
    assert!(reports[0].error.contains("cannot roll back v2: its backups are gone"), "{:?}", reports[0]);
    assert_eq!(host.health(), Some(200));
    host.assert_no_leak();
}

/// A signal restart: the demo service re-executes itself on SIGHUP and
/// re-reads its credentials (same pid).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_restart_reloads_the_service() {
    let host = Host::new();
    host.start_service();
    host.wait_healthy().await;
    let pid = host.service_pid().unwrap();
    let blocks = STANDARD.replace(
        "kind = \"command\"\ncommand = @RESTART@\ntimeout = \"20s\"",
        "kind = \"signal\"\npidfile = \"@DIR@/svc.pid\"\nsignal = \"HUP\"\nexecutable = \"@SERVICE@\"",
    );
    let pipeline = Pipeline::open(&host.config(&blocks), Outbox::new()).unwrap();
    let reports = pipeline.deliver(delivery("v2", &host.key2.1, Some(("v1", &host.key1.1)))).await;
    assert_eq!(stages(&reports), [Delivered, Applied, Restarted, Healthy], "{reports:?}");
    assert_eq!(host.service_pid(), Some(pid), "re-executed in place");
    assert!(host.api.last_used(&host.key2.0).is_some(), "the service did not reload its key");
    host.assert_no_leak();
}
