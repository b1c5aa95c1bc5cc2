//! `rekey demo`: the whole product on one machine, for real, in a minute.
//!
//! In a temporary directory it starts a real `rekeyd` (its own CA and
//! store), the demo SaaS API, N real `rekey-agent`s enrolled over mTLS, each
//! managing a real `rekey-demo-service` that authenticates to the API with a
//! key; then it plans and rotates that key with live progress — once
//! cleanly; then a `rotate plan` catches a misconfigured host before any key
//! exists (and `rotate start` refuses), the demo fixes it; then a host whose
//! mistake only shows at run time fails, rolls back and halts the rollout
//! until the demo fixes it — and prints the incident report. Every process
//! it started is stopped at the end (unless `--keep`).
//!
//! The `rekey` CLI owns the verb and the admin connection: it calls [`run`]
//! with its own client behind [`Admin`], so this crate needs no gRPC stack
//! and the CLI no copy of the story. Processes are started and stopped with
//! [`crate::process`], the same helpers the e2e fixtures use.

use crate::process::{self, free_port, spawn_logged, wait_until};
use anyhow::{Context, Result, anyhow, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nix::sys::signal::Signal;
use rekey_types::v1::{HostState, PlanHostStatus, PlanView, RotationState, RotationView};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "demo-api-key";

#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    /// How many hosts (agents with a demo service each).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(2..=50))]
    pub hosts: u16,
    /// Leave everything running afterwards, to explore with `rekey` commands.
    #[arg(long)]
    pub keep: bool,
    /// Work in this directory instead of a temporary one.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// The admin calls the demo makes, as the operator CLI makes them (its own
/// connection, protocol header and error wording).
// The demo runs in its caller's task, never spawned: no `Send` bound needed.
#[allow(async_fn_in_trait)]
pub trait Admin: Sized {
    /// Connects with the operator credential in `operator_dir` to `addr`.
    async fn connect(operator_dir: &Path, addr: String) -> Result<Self>;
    /// A join token for `host` with `labels`: (token, CA fingerprint).
    async fn create_token(&mut self, host: &str, labels: &[(&str, &str)], ttl_seconds: u64)
    -> Result<(String, String)>;
    /// How many enrolled agents are connected now.
    async fn connected_agents(&mut self) -> Result<usize>;
    /// Starts a rotation of `secret` (the coordinator runs the preflight
    /// first and refuses on a problem); its view.
    async fn start_rotation(&mut self, secret: &str) -> Result<RotationView>;
    /// The preflight of a rotation of `secret` (`rekey rotate plan`).
    async fn plan_rotation(&mut self, secret: &str) -> Result<PlanView>;
    /// A rotation's view.
    async fn rotation(&mut self, id: &str) -> Result<RotationView>;
    /// Resumes a halted rotation.
    async fn resume(&mut self, id: &str) -> Result<()>;
    /// A rotation's report in `format` (`md`, `json`).
    async fn report(&mut self, id: &str, format: &str) -> Result<String>;
    /// A one-time login link for the web console (`rekey console`).
    async fn console_login(&mut self) -> Result<String>;
}

/// Runs the demo (see the module doc); `A` is the operator CLI's client.
pub async fn run<A: Admin>(args: DemoArgs) -> Result<()> {
    let b = bins()?;
    let mut w = World::new(&args)?;
    println!("rekey demo — everything runs on this machine, in {}", w.dir.display());
    let api = start_api(&mut w, &b)?;
    let (mut c, coord, op_dir) = start_coordinator::<A>(&mut w, &b, &api).await?;
    let hosts = start_hosts(&mut w, &mut c, &b, &api, &coord, args.hosts).await?;
    let mut demo = Demo { w, b, api, c, hosts };
    let (r1, new_key) = demo.clean_rotation().await?;
    demo.caught_by_the_plan().await?;
    let r2 = demo.failing_rotation(&new_key).await?;
    demo.report_and_hints(&r1, &r2, &op_dir).await
}

struct Bins {
    rekeyd: PathBuf,
    agent: PathBuf,
    api: PathBuf,
    service: PathBuf,
}

/// The sibling binaries; when run through cargo and one is missing, build them.
fn bins() -> Result<Bins> {
    let exe = std::env::current_exe().context("cannot locate the rekey binary")?;
    let dir = exe.parent().ok_or_else(|| anyhow!("rekey binary has no directory"))?.to_path_buf();
    let b = Bins {
        rekeyd: dir.join("rekeyd"),
        agent: dir.join("rekey-agent"),
        api: dir.join("rekey-demo-api"),
        service: dir.join("rekey-demo-service"),
    };
    let missing = [&b.rekeyd, &b.agent, &b.api, &b.service].iter().any(|p| !p.exists());
    // Under `cargo run` the others are built every time (a no-op when they
    // are current): binaries left from an older checkout must not be used.
    if missing || std::env::var_os("CARGO").is_some() {
        // Run through `cargo run`, or from a cargo target dir: build the rest.
        let in_target = dir.components().any(|c| c.as_os_str() == "target");
        if std::env::var_os("CARGO").is_none() && !in_target {
            bail!(
                "the demo needs rekeyd, rekey-agent, rekey-demo-api and rekey-demo-service next to {}: \
                 build them with `cargo build --release --workspace`",
                exe.display()
            );
        }
        eprintln!("building rekeyd, rekey-agent and the demo binaries (if needed)…");
        let mut cmd = crate::process::cargo();
        if let Some(root) = dir.ancestors().find(|d| d.join("Cargo.toml").exists()) {
            cmd.current_dir(root);
        }
        cmd.args(["build", "--quiet", "-p", "rekey-coordinator", "-p", "rekey-agent", "-p", "rekey-demo", "--bins"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let st = cmd.status().context("cannot run cargo build")?;
        if !st.success() {
            bail!("building the demo binaries failed");
        }
    }
    Ok(b)
}

/// Everything the demo started; stopped on drop unless kept.
struct World {
    dir: PathBuf,
    /// Removed on drop; `None` for `--dir` or `--keep`.
    _tmp: Option<tempfile::TempDir>,
    children: Vec<(String, Child)>,
    service_pidfiles: Vec<PathBuf>,
    keep: bool,
}

impl World {
    fn new(args: &DemoArgs) -> Result<World> {
        let (dir, tmp) = match &args.dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (d.canonicalize()?, None)
            }
            None => {
                let t = tempfile::Builder::new().prefix("rekey-demo-").tempdir()?;
                // Kept: the directory must outlive this process.
                if args.keep { (t.keep(), None) } else { (t.path().to_path_buf(), Some(t)) }
            }
        };
        Ok(World { dir, _tmp: tmp, children: Vec::new(), service_pidfiles: Vec::new(), keep: args.keep })
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<()> {
        let child =
            spawn_logged(cmd, &self.dir.join(format!("{name}.log"))).with_context(|| format!("cannot start {name}"))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    fn kill(&mut self, name: &str) {
        if let Some(pos) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut c) = self.children.remove(pos);
            process::signal_and_wait(&mut c, Signal::SIGKILL);
        }
    }

    fn wait(&self, what: &str, timeout: Duration, f: impl FnMut() -> bool) -> Result<()> {
        wait_until(what, timeout, f).map_err(Into::into)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for (_, c) in self.children.iter_mut().rev() {
            process::signal_and_wait(c, Signal::SIGKILL);
        }
        for p in &self.service_pidfiles {
            process::stop(p, Duration::from_secs(5));
        }
    }
}

/// A plain HTTP/1.1 request to the demo API on loopback (no TLS there).
fn http(addr: &str, method: &str, path: &str, bearer: &str, body: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("cannot reach the demo API at {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// The demo API as the demo set it up: its address, its admin token file,
/// and the first key, deployed by hand before rekey (the key to rotate).
struct Api {
    addr: String,
    admin_file: PathBuf,
    first_id: String,
    first_secret: String,
}

struct Host {
    name: String,
    dir: PathBuf,
    port: u16,
}

fn service_cmd(b: &Bins, h: &Host, api: &str) -> Vec<String> {
    let d = h.dir.display();
    vec![
        b.service.display().to_string(),
        "--detach".into(),
        "--replace".into(),
        "--pidfile".into(),
        format!("{d}/service.pid"),
        "--credentials".into(),
        format!("{d}/service.env"),
        "--api".into(),
        format!("http://{api}"),
        "--listen".into(),
        format!("127.0.0.1:{}", h.port),
        "--log".into(),
        format!("{d}/service.log"),
    ]
}

/// How a host's agent.toml is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    Fine,
    /// Names a credentials file that does not exist (a typo): any dry run sees it.
    MissingFile,
    /// Renders the key through a template with a stray `| upper`: the file,
    /// the restart and the health check are all fine now; only the service's
    /// next key is wrong, which the API refuses — a run-time failure.
    MangledKey,
}

/// The host's agent.toml as `setup` says.
fn agent_toml(b: &Bins, h: &Host, api: &str, setup: Setup) -> String {
    let d = h.dir.display();
    let creds = if setup == Setup::MissingFile { format!("{d}/servce.env") } else { format!("{d}/service.env") };
    let content = if setup == Setup::MangledKey {
        "kind = \"template\"\n  template = \"# demo service credentials\\nDEMO_API_KEY={{ value | upper }}\\n\""
            .to_string()
    } else {
        "kind = \"env-file\"\n  keys = { DEMO_API_KEY = \"value\" }".to_string()
    };
    let cmd = service_cmd(b, h, api).iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ");
    format!(
        r#"# rekey-agent config for {name} (written by `rekey demo`)
state_dir = "state"
[reconnect]
initial_backoff = "200ms"
max_backoff = "2s"

[[secret]]
name = "{SECRET}"
  [[secret.file]]
  path = "{creds}"
  {content}
  [secret.restart]
  kind = "command"
  command = [{cmd}]
  timeout = "20s"
  [secret.health]
  kind = "http"
  url = "http://127.0.0.1:{port}/health"
  retries = 10
  interval = "300ms"
  timeout = "2s"
"#,
        name = h.name,
        port = h.port,
    )
}

fn coordinator_toml(port: u16, api: &str, admin_token_file: &Path) -> String {
    format!(
        r#"# rekeyd config (written by `rekey demo`)
listen = "127.0.0.1:{port}"
data_dir = "data"
master_key_file = "master.key"

# Prometheus metrics on a free loopback port (rekeyd writes it to data/metrics.addr).
[metrics]
listen = "127.0.0.1:0"

[[secret]]
name = "{SECRET}"
description = "API key the demo services use to call the demo SaaS API"
selector = {{ env = "demo" }}
{provider}
[secret.rollout]
canary = 1
# Percentages round down (at least one host per wave): with 5 hosts, the
# canary, then 2, then 2.
waves = ["60%", "100%"]
failure_budget = 0
host_deadline = "60s"
jitter = "1s"
[secret.revocation]
deactivate = true
grace = "3s"
delete = true
# After deletion, watch the old key for use (72 h by default; short for the demo).
monitor = "1h"
check_every = "5s"
"#,
        provider = provider_toml(api, admin_token_file),
    )
}

/// The demo API's key endpoints, as an `http` provider.
fn provider_toml(api: &str, admin_token_file: &Path) -> String {
    format!(
        r#"[secret.provider]
kind = "http"
base_url = "http://{api}"
token_file = "{token}"
timeout = "5s"
create = {{ url = "/v1/keys", body = {{ name = "demo-services {{rotation_id}}" }}, id_pointer = "/id", fields = {{ value = "/secret" }} }}
delete = {{ url = "/v1/keys/{{id}}" }}
deactivate = {{ url = "/v1/keys/{{id}}/deactivate" }}
reactivate = {{ url = "/v1/keys/{{id}}/activate" }}
list = {{ url = "/v1/keys", status_pointer = "/status", created_pointer = "/created_at", last_used_pointer = "/last_used_at_ms", last_used_format = "unix_ms", last_used_source_pointer = "/last_used_by" }}
"#,
        token = admin_token_file.display()
    )
}

fn step(n: u32, text: &str) {
    println!("\n== {n}. {text}");
}

fn hex_token() -> String {
    use rand::Rng;
    let mut b = [0u8; 16];
    rand::rng().fill(&mut b);
    hex::encode(b)
}

/// A file only its owner may read, replaced atomically.
fn write_private(path: &Path, text: &str) -> Result<()> {
    rekey_common::fs::write_atomic(path, text.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Step 1: the demo API, and the first key issued by hand.
fn start_api(w: &mut World, b: &Bins) -> Result<Api> {
    step(1, "the demo SaaS API (stands in for a provider's key dashboard)");
    let admin_token = format!("adm_{}", hex_token());
    let admin_file = w.dir.join("api-admin.token");
    write_private(&admin_file, &admin_token)?;
    let addr_file = w.dir.join("api.addr");
    let state = w.dir.join("api-state.json");
    w.spawn(
        "demo-api",
        Command::new(&b.api)
            .args(["--listen", "127.0.0.1:0", "--addr-file"])
            .arg(&addr_file)
            .arg("--admin-token-file")
            .arg(&admin_file)
            .arg("--state")
            .arg(state),
    )?;
    w.wait("the demo API", Duration::from_secs(15), || addr_file.exists())?;
    let addr = std::fs::read_to_string(&addr_file)?.trim().to_string();
    let (st, body) = http(&addr, "POST", "/v1/keys", &admin_token, r#"{"name":"demo-services"}"#)?;
    if st != 201 {
        bail!("the demo API refused to create the first key: HTTP {st}");
    }
    let first: Value = serde_json::from_str(&body)?;
    let first_id = first["id"].as_str().unwrap_or_default().to_string();
    let first_secret = first["secret"].as_str().unwrap_or_default().to_string();
    println!("   listening on {addr}; issued key {first_id} (deployed by hand, before rekey — the key to rotate)");
    Ok(Api { addr, admin_file, first_id, first_secret })
}

/// Step 2: rekeyd, initialised and running; returns a connected client, its
/// address and the operator credential's directory.
async fn start_coordinator<A: Admin>(w: &mut World, b: &Bins, api: &Api) -> Result<(A, String, PathBuf)> {
    step(2, "rekeyd, the coordinator: its own CA, encrypted store, audit chain");
    let port = free_port()?;
    let cfg = w.dir.join("coordinator.toml");
    let console = format!("\n[console]\nlisten = \"127.0.0.1:{}\"\n", free_port()?);
    std::fs::write(&cfg, coordinator_toml(port, &api.addr, &api.admin_file) + &console)?;
    let out = Command::new(&b.rekeyd).arg("--config").arg(&cfg).arg("init").output()?;
    if !out.status.success() {
        bail!("rekeyd init failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    w.spawn("rekeyd", Command::new(&b.rekeyd).arg("--config").arg(&cfg).arg("run"))?;
    let coord = format!("127.0.0.1:{port}");
    let op_dir = w.dir.join("data/operator");
    let addr_file = w.dir.join("data/rekeyd.addr");
    w.wait("rekeyd", Duration::from_secs(15), || addr_file.exists())?;
    let mut c = A::connect(&op_dir, coord.clone()).await?;
    println!("   listening on {coord}; operator credential in {}", op_dir.display());
    let link = c.console_login().await?;
    println!("   web console, live (a one-time login link, valid for 60 s): {link}");
    let metrics = w.dir.join("data/metrics.addr");
    w.wait("rekeyd's metrics", Duration::from_secs(15), || metrics.exists())?;
    println!("   metrics at http://{}/metrics", std::fs::read_to_string(&metrics)?.trim());
    Ok((c, coord, op_dir))
}

/// Step 3: per host a demo service on the first key and an enrolled agent.
async fn start_hosts<A: Admin>(
    w: &mut World,
    c: &mut A,
    b: &Bins,
    api: &Api,
    coord: &str,
    n: u16,
) -> Result<Vec<Host>> {
    step(3, &format!("{n} hosts: a demo service using the key, and an enrolled rekey-agent each"));
    let mut hosts = Vec::new();
    for i in 1..=n {
        let h = Host { name: format!("host-{i}"), dir: w.dir.join(format!("host-{i}")), port: free_port()? };
        std::fs::create_dir_all(&h.dir)?;
        let creds = format!("# demo service credentials\nDEMO_API_KEY={}\n", api.first_secret);
        write_private(&h.dir.join("service.env"), &creds)?;
        let cmd = service_cmd(b, &h, &api.addr);
        let st = Command::new(&cmd[0]).args(&cmd[1..]).stdin(Stdio::null()).output()?;
        if !st.status.success() {
            bail!("demo service of {} did not start (see {}/service.log)", h.name, h.dir.display());
        }
        w.service_pidfiles.push(h.dir.join("service.pid"));
        enroll(c, b, &h, coord).await?;
        std::fs::write(h.dir.join("agent.toml"), agent_toml(b, &h, &api.addr, Setup::Fine))?;
        start_agent(w, b, &h)?;
        println!(
            "   {}: service on 127.0.0.1:{} (health {}), agent enrolled over mTLS",
            h.name,
            h.port,
            health(h.port).unwrap_or(0)
        );
        hosts.push(h);
    }
    wait_connected(c, hosts.len()).await?;
    println!("   all {} agents connected", hosts.len());
    Ok(hosts)
}

async fn enroll<A: Admin>(c: &mut A, b: &Bins, h: &Host, coord: &str) -> Result<()> {
    let (token, fingerprint) = c.create_token(&h.name, &[("env", "demo")], 600).await?;
    let out = Command::new(&b.agent)
        .args(["enroll", "--coordinator", coord, "--token", &token, "--ca-fingerprint", &fingerprint])
        .arg("--state-dir")
        .arg(h.dir.join("state"))
        .output()?;
    if !out.status.success() {
        bail!("enrolling {} failed: {}", h.name, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn start_agent(w: &mut World, b: &Bins, h: &Host) -> Result<()> {
    w.spawn(
        &format!("agent-{}", h.name),
        Command::new(&b.agent).arg("run").arg("--config").arg(h.dir.join("agent.toml")),
    )
}

async fn wait_connected<A: Admin>(c: &mut A, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if c.connected_agents().await? >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the agents did not all connect within 30s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn health(port: u16) -> Option<u16> {
    http(&format!("127.0.0.1:{port}"), "GET", "/health", "", "").ok().map(|(s, _)| s)
}

fn key_of(h: &Host) -> Result<String> {
    let text = std::fs::read_to_string(h.dir.join("service.env"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("DEMO_API_KEY="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .ok_or_else(|| anyhow!("{}: no DEMO_API_KEY", h.dir.join("service.env").display()))
}

fn check_all_healthy(hosts: &[Host]) -> Result<()> {
    let mut line = BTreeMap::new();
    for h in hosts {
        let st = health(h.port).unwrap_or(0);
        line.insert(h.name.clone(), st);
    }
    println!("   {}", line.iter().map(|(n, s)| format!("{n}: {s}")).collect::<Vec<_>>().join("  "));
    if let Some((n, s)) = line.iter().find(|(_, s)| **s != 200) {
        bail!("{n}'s service is not healthy (HTTP {s})");
    }
    Ok(())
}

/// The demo once everything runs: the two rotations and the report.
struct Demo<A> {
    w: World,
    b: Bins,
    api: Api,
    c: A,
    hosts: Vec<Host>,
}

impl<A: Admin> Demo<A> {
    async fn start(&mut self) -> Result<String> {
        let id = self.c.start_rotation(SECRET).await?.id;
        println!("   rotation {id} started");
        Ok(id)
    }

    /// The API's answer to a call with `key`.
    fn whoami(&self, key: &str) -> Result<u16> {
        Ok(http(&self.api.addr, "GET", "/v1/whoami", key, "")?.0)
    }

    /// Rewrites a host's agent.toml as `setup` says and restarts its agent.
    /// Waits until the coordinator has seen the old session end, so the
    /// next plan asks the new agent rather than a dead session.
    async fn reconfigure(&mut self, i: usize, setup: Setup) -> Result<()> {
        let h = &self.hosts[i];
        std::fs::write(h.dir.join("agent.toml"), agent_toml(&self.b, h, &self.api.addr, setup))?;
        self.w.kill(&format!("agent-{}", h.name));
        let n = self.hosts.len();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.c.connected_agents().await? >= n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        start_agent(&mut self.w, &self.b, &self.hosts[i])?;
        wait_connected(&mut self.c, n).await
    }

    /// `rekey rotate plan`, printed briefly: every wave's hosts, then each problem.
    async fn plan(&mut self) -> Result<PlanView> {
        let p = self.c.plan_rotation(SECRET).await?;
        let listed = if p.provider.listed { "credentials work, versions listed" } else { "not listed" };
        println!("   $ rekey rotate plan {SECRET}");
        println!(
            "   provider {}: {listed}; the key to replace: {}",
            p.provider.kind,
            p.old_version.as_deref().unwrap_or("-")
        );
        for w in &p.waves {
            let hosts: Vec<String> = w
                .hosts
                .iter()
                .map(|h| {
                    if h.status == PlanHostStatus::Ready {
                        h.name.clone()
                    } else {
                        format!("{} ({})", h.name, h.status)
                    }
                })
                .collect();
            let name = if w.canary { "canary".to_string() } else { format!("wave {}", w.index) };
            println!("   {name:>7}: {}", hosts.join(", "));
        }
        for x in &p.problems {
            println!("   problem: {}: {}: {}", x.host.as_deref().unwrap_or("-"), x.subject, x.detail);
        }
        Ok(p)
    }

    /// Step 4: a planned, clean rotation; returns its id and the new key.
    async fn clean_rotation(&mut self) -> Result<(String, String)> {
        step(4, "plan, then rotate the API key: canary → waves → every service healthy → deactivate → grace → delete");
        let p = self.plan().await?;
        if !p.ok {
            bail!("the plan of a healthy fleet found {} problem(s)", p.problems.len());
        }
        println!("   no problems: every host rendered its files and passed its checks with a placeholder key");
        let r1 = self.start().await?;
        let r1v = follow(&mut self.c, &r1, &SETTLED, 0).await?;
        if !matches!(r1v.state, RotationState::Monitoring | RotationState::Completed) {
            bail!("the first rotation ended {}: {}", r1v.state, r1v.halt_reason.unwrap_or_default());
        }
        let new_key = key_of(&self.hosts[0])?;
        let old_status = self.whoami(&self.api.first_secret)?;
        let new_status = self.whoami(&new_key)?;
        println!("   old key {}: demo API answers {old_status} (revoked); new key: {new_status}", self.api.first_id);
        if old_status != 401 || new_status != 200 {
            bail!(
                "expected the old key refused (401) and the new one accepted (200), got {old_status} and {new_status}"
            );
        }
        check_all_healthy(&self.hosts)?;
        Ok((r1, new_key))
    }

    /// Step 5: a misconfigured host caught by the plan before any key
    /// exists; `rotate start` refuses too; the demo fixes it.
    async fn caught_by_the_plan(&mut self) -> Result<()> {
        let i = 1;
        let bad = self.hosts[i].name.clone();
        step(5, &format!("{bad} misconfigured (its agent.toml names a file that does not exist): the plan catches it"));
        self.reconfigure(i, Setup::MissingFile).await?;
        let p = self.plan().await?;
        if p.ok || !p.problems.iter().any(|x| x.host.as_deref() == Some(bad.as_str())) {
            bail!("the plan should have named {bad} as a problem");
        }
        match self.c.start_rotation(SECRET).await {
            Ok(r) => bail!("rotate start should refuse while {bad} fails its preflight; it started {}", r.id),
            Err(e) => {
                let first = e.to_string().lines().next().unwrap_or_default().to_string();
                println!("   $ rekey rotate start {SECRET}\n   refused: {first}");
            }
        }
        println!("   caught by the preflight: no key was generated, nothing to roll back. Fixing {bad}.");
        self.reconfigure(i, Setup::Fine).await
    }

    /// Steps 6 and 7: a rotation that halts on a host whose mistake only
    /// shows at run time, then completes once it is fixed; returns its id.
    async fn failing_rotation(&mut self, new_key: &str) -> Result<String> {
        // The third host (the last with --hosts 2): never the canary.
        let i = 2.min(self.hosts.len() - 1);
        let bad = self.hosts[i].name.clone();
        step(
            6,
            &format!(
                "rotate again, with {bad} rendering the key through a template with a stray `| upper`: \
                 it passes the plan (the file, restart and health check are fine now), only the real key is wrong"
            ),
        );
        self.reconfigure(i, Setup::MangledKey).await?;
        let p = self.plan().await?;
        if !p.ok {
            bail!("this mistake only shows at run time, yet the plan found {} problem(s)", p.problems.len());
        }
        let r2 = self.start().await?;
        let r2v = follow(&mut self.c, &r2, &SETTLED, 0).await?;
        if r2v.state != RotationState::Halted {
            bail!("expected the rollout to halt on {bad}, it is {}", r2v.state);
        }
        let seen = r2v.timeline.len();
        println!(
            "   {bad} failed once its service restarted on the mangled key, and rolled back by itself ({}); the rollout halted before revoking anything",
            r2v.hosts.get(&bad).map_or("?", |h| h.state.as_str())
        );
        // The canary already runs the new key; the others still use the old one.
        let st = self.whoami(new_key)?;
        println!("   the old key is still valid ({st}); every service is healthy:");
        if st != 200 {
            bail!("the old key must still be valid while the rollout is halted, the API answers {st}");
        }
        check_all_healthy(&self.hosts)?;

        step(7, &format!("fix {bad} and resume: it gets the new version, then the old key is revoked"));
        self.reconfigure(i, Setup::Fine).await?;
        self.c.resume(&r2).await?;
        let r2v = follow(&mut self.c, &r2, &SETTLED, seen).await?;
        if !matches!(r2v.state, RotationState::Monitoring | RotationState::Completed) {
            bail!("the second rotation ended {}: {}", r2v.state, r2v.halt_reason.unwrap_or_default());
        }
        let st = self.whoami(new_key)?;
        println!("   the previous key is now refused ({st}); every service runs on the new one:");
        check_all_healthy(&self.hosts)?;
        if st != 401 {
            bail!("the previous key should be revoked, the API answers {st}");
        }
        Ok(r2)
    }

    /// Step 8: the report, and where to look next (only with `--keep`: the
    /// directory and the processes are gone otherwise).
    async fn report_and_hints(&mut self, r1: &str, r2: &str, op_dir: &Path) -> Result<()> {
        step(8, "the incident report (Markdown; `--format json` for machines)");
        let report = self.c.report(r2, "md").await?;
        println!("\n{report}");

        let dir = self.w.dir.display();
        if !self.w.keep {
            println!("== where to look next");
            println!("   rerun with --keep to leave everything running and explore it with `rekey` commands");
            println!("\nstopping every process the demo started and removing {dir}");
            return Ok(());
        }
        println!("== where to look next");
        let op = op_dir.display();
        println!("   rekey --operator-dir {op} agents");
        println!("   rekey --operator-dir {op} rotate plan {SECRET}");
        println!("   rekey --operator-dir {op} rotate list");
        println!("   rekey --operator-dir {op} rotate status {r2}");
        println!("   rekey --operator-dir {op} report {r1}");
        println!("   rekey --operator-dir {op} audit verify");
        println!("   rekey --operator-dir {op} console   (a new login link for the web console)");
        println!("   logs and configs: {dir}");
        let pids: Vec<String> = self.w.children.iter().map(|(_, c)| c.id().to_string()).collect();
        println!(
            "\nleft running (--keep). Stop everything with:\n   kill {} $(cat {dir}/host-*/service.pid)",
            pids.join(" ")
        );
        Ok(())
    }
}

/// The states a demo rotation can stop in.
const SETTLED: [RotationState; 4] =
    [RotationState::Completed, RotationState::Monitoring, RotationState::Halted, RotationState::Aborted];

/// Follows a rotation with a progress bar per wave until it settles in one
/// of `until`; prints each timeline event as it happens.
async fn follow<A: Admin>(c: &mut A, id: &str, until: &[RotationState], seen_before: usize) -> Result<RotationView> {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
    let mut bars: Vec<ProgressBar> = Vec::new();
    let mut seen_timeline = seen_before;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let r = c.rotation(id).await?;
        if bars.is_empty() && !r.waves.is_empty() {
            bars = wave_bars(&multi, &r);
        }
        for e in r.timeline.iter().skip(seen_timeline) {
            // stdout, so the story is there without a terminal too.
            multi.suspend(|| println!("   {:<13} {}", e.state.as_str(), e.note));
        }
        seen_timeline = r.timeline.len();
        for (i, pb) in bars.iter().enumerate() {
            let (done, parts) = wave_progress(r.waves.get(i).map(Vec::as_slice).unwrap_or_default(), &r);
            pb.set_position(done);
            pb.set_message(parts);
        }
        if until.contains(&r.state) {
            for pb in &bars {
                pb.finish();
            }
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!("rotation {id} did not reach {until:?} within 3 minutes (it is {})", r.state);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// One progress bar per wave (the first is the canary when there is one).
fn wave_bars(multi: &MultiProgress, r: &RotationView) -> Vec<ProgressBar> {
    let style = ProgressStyle::with_template("  {prefix:>7} [{bar:24.green/white}] {pos}/{len} {msg}")
        .expect("static template")
        .progress_chars("=> ");
    let canary = r.policy.canary > 0;
    let mut bars = Vec::new();
    for (i, w) in r.waves.iter().enumerate() {
        let pb = multi.add(ProgressBar::new(w.len() as u64));
        pb.set_style(style.clone());
        pb.set_prefix(if i == 0 && canary { "canary".to_string() } else { format!("wave {i}") });
        bars.push(pb);
    }
    bars
}

/// How many hosts of a wave are settled, and `host:state` for each.
fn wave_progress(wave: &[String], r: &RotationView) -> (u64, String) {
    let mut done = 0;
    let mut parts = Vec::new();
    for name in wave {
        let st = r.hosts.get(name).map(|h| h.state);
        if st.is_some_and(|s| {
            matches!(
                s,
                HostState::Healthy
                    | HostState::Failed
                    | HostState::RolledBack
                    | HostState::Unreachable
                    | HostState::Excluded
            )
        }) {
            done += 1;
        }
        parts.push(format!("{name}:{}", st.map_or("?", HostState::as_str)));
    }
    (done, parts.join(" "))
}
