//! The load benchmark behind `tests/examples/scale.rs` (run by hand, in a
//! release build) and its small-N smoke run in the e2e suite (so it cannot
//! rot). A real `rekeyd` process and N simulated hosts ([`crate::sim`]) in
//! this process: real enrollment, real mTLS sessions, the real protocol.
//! It measures and returns figures; it asserts nothing about time.
//!
//! Steps: enroll N; connect all N; idle (RSS per session, CPU at idle);
//! SIGKILL and restart rekeyd, time until all N are back; one rotation in
//! canary + 10 % waves and one in a single 100 % wave, each consumed by all
//! N (start → verified → completed, rekeyd CPU-seconds, bytes rekeyd wrote
//! per host event, delivery → confirmation per host); the admin read paths
//! through the real `rekey` CLI (latency, output size).

use crate::sim::{self, Fleet, SimOptions};
use crate::{Coordinator, bins};
use anyhow::{Context, Result, bail};
use rekey_proto::v1::admin_service_client::AdminServiceClient;
use rekey_proto::v1::{GetRotationRequest, ListRotationsRequest, StartRotationRequest};
use rekey_types::v1::{HostState, RotationState, RotationSummary, RotationView};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// The two secrets every simulated host consumes.
pub const WAVES_SECRET: &str = "bench-waves";
pub const ONE_WAVE_SECRET: &str = "bench-one-wave";

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub hosts: usize,
    /// How long each simulated apply takes, and the share that fails.
    pub apply: Duration,
    pub fail_rate: f64,
    /// How long to sit idle for the idle-CPU figure.
    pub idle: Duration,
    /// Enrollments in flight at once.
    pub enroll_concurrency: usize,
    /// Give up waiting for anything after this long.
    pub deadline: Duration,
    /// rekeyd's store: sled (default) or a PostgreSQL of its own.
    pub store: crate::StoreKind,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            hosts: 1000,
            apply: Duration::ZERO,
            fail_rate: 0.0,
            idle: Duration::from_secs(20),
            enroll_concurrency: 16,
            deadline: Duration::from_secs(600),
            store: crate::StoreKind::Sled,
        }
    }
}

/// One rotation as measured.
#[derive(Debug, Clone, Default)]
pub struct RotationFigures {
    pub label: String,
    pub state: String,
    pub waves: usize,
    pub healthy: usize,
    pub failed: usize,
    pub to_verified: Duration,
    pub to_completed: Duration,
    pub cpu_s: f64,
    pub write_bytes: u64,
    /// Stage reports rekeyd received (4 per successful host).
    pub host_events: u64,
    /// Delivery → the host's own time of its healthy step, median and max.
    pub confirm_median_ms: i64,
    pub confirm_max_ms: i64,
    /// Delivery → rekeyd's receipt of the healthy report, median and max.
    pub receipt_median_ms: i64,
    pub receipt_max_ms: i64,
}

/// One real `rekey-agent` process, idle through the same window.
#[derive(Debug, Clone, Default)]
pub struct AgentFigures {
    pub binary_bytes: u64,
    pub rss_kib: u64,
    /// The part of it that is the agent's own memory (heap, stacks); the
    /// rest is clean pages of its binary and libc, shared with the page cache.
    pub anon_kib: u64,
    /// Context switches (its own wake-ups) per minute at idle, all threads.
    pub wakeups_per_min: f64,
    pub threads: u64,
}

/// Voluntary + involuntary context switches of every thread of `pid`.
fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .map(|t| {
            let s = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// One admin read through the CLI.
#[derive(Debug, Clone)]
pub struct ReadFigures {
    pub command: String,
    pub ok: bool,
    pub latency: Duration,
    pub bytes: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub hosts: usize,
    pub enroll: Duration,
    pub first_connect: Duration,
    pub rss_before_kib: u64,
    pub rss_idle_kib: u64,
    pub idle_cpu_pct: f64,
    pub idle_window: Duration,
    pub restart_ready: Duration,
    pub reconnect: Duration,
    pub reconnect_errors: u64,
    pub reconnect_sessions: u64,
    /// Failed attempts of the whole run (first connect and reconnect) by
    /// kind, most frequent first (at most 3).
    pub reconnect_error_kinds: Vec<(String, u64)>,
    /// The real `rekey-agent` beside the simulated ones (this build's binary).
    pub agent: AgentFigures,
    pub rotations: Vec<RotationFigures>,
    pub reads: Vec<ReadFigures>,
}

/// The coordinator's catalog: two secrets consumed by every simulated host
/// (labelled `env=bench`).
pub fn catalog() -> String {
    let secret = |name: &str, canary: usize, waves: &str| {
        format!(
            "[[secret]]\nname = \"{name}\"\nprovider = {{ kind = \"random\", length = 32 }}\nselector = {{ env = \"bench\" }}\n\
             [secret.rollout]\ncanary = {canary}\nwaves = {waves}\nfailure_budget = \"5%\"\nhost_deadline = \"10m\"\n\
             [secret.revocation]\ngrace = \"0s\"\nmonitor = \"0s\"\n"
        )
    };
    let tenths: Vec<String> = (1..=10).map(|i| format!("\"{}%\"", i * 10)).collect();
    format!(
        "{}\n{}",
        secret(WAVES_SECRET, 1, &format!("[{}]", tenths.join(", "))),
        secret(ONE_WAVE_SECRET, 0, "[\"100%\"]")
    )
}

/// Stops `c` (gracefully), writes `agents` into its registry in one
/// transaction, and starts it again: a registry of thousands of hosts in a
/// second, for tests of what rekeyd says about many hosts. These agents hold
/// no certificate and never connect. Sled only.
pub fn seed_registry(c: &mut Coordinator, agents: &[rekey_coordinator::store::AgentRecord]) -> Result<()> {
    use rekey_coordinator::store::{Store, Tree};
    c.stop();
    {
        let store = Store::open(&c.dir.join("data/store")).context("open the coordinator's sled store")?;
        store.transaction(true, |t| {
            for a in agents {
                // The store's own encoding of a record, checked by the read below.
                let json = serde_json::to_vec(a).expect("agent records serialize");
                t.put(Tree::Agents, a.name.as_bytes(), &json)?;
            }
            Ok::<_, rekey_coordinator::store::StoreError>(())
        })?;
        let names: std::collections::HashSet<String> = store.list_agents()?.into_iter().map(|a| a.name).collect();
        if !agents.iter().all(|a| names.contains(&a.name)) {
            bail!("the seeded agents do not read back from the store");
        }
    }
    c.restart();
    Ok(())
}

/// A registry record for [`seed_registry`]: enrolled now, consuming `secrets`.
pub fn seeded_agent(name: &str, labels: &[(&str, &str)], secrets: &[&str]) -> rekey_coordinator::store::AgentRecord {
    let now = rekey_common::time::now_unix();
    rekey_coordinator::store::AgentRecord {
        name: name.to_string(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        enrolled_unix: now,
        cert_serial: format!("seeded-{name}"),
        cert_not_after_unix: now + 86_400,
        serials: vec![format!("seeded-{name}")],
        secrets: secrets.iter().map(|s| s.to_string()).collect(),
        last_seen_unix: now,
        ..Default::default()
    }
}

/// Reads `field` (in KiB) from /proc/PID/status.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU seconds of a process so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based).
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks as f64 / 100.0
}

/// Bytes the process asked the kernel to write to storage so far.
pub fn write_bytes(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix("write_bytes: ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Raises this process's soft descriptor limit to the hard one (rekeyd,
/// started from here, inherits it); returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Ok((soft, _)) => soft,
        Err(_) => 0,
    }
}

async fn wait_async(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > deadline {
            bail!("{what}: not reached after {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(t.elapsed())
}

/// Runs every step; `dir` holds rekeyd's data and logs.
pub async fn run(dir: &Path, opts: &BenchOptions) -> Result<Figures> {
    let mut fig = Figures { hosts: opts.hosts, ..Default::default() };
    let mut c = Coordinator::start_on(&dir.join("rekeyd"), &catalog(), opts.store);
    let pid = |c: &Coordinator| c.pid().context("rekeyd is not running");
    let op = c.operator_dir();
    let names: Vec<String> = (1..=opts.hosts).map(|i| format!("h{i}")).collect();
    let labels = HashMap::from([("env".to_string(), "bench".to_string())]);
    let t = Instant::now();
    let ids = sim::enroll(&c.addr(), &op, &names, &labels, opts.enroll_concurrency).await?;
    fig.enroll = t.elapsed();
    fig.rss_before_kib = status_kib(pid(&c)?, "VmRSS:");

    let sim = SimOptions {
        secrets: vec![WAVES_SECRET.into(), ONE_WAVE_SECRET.into()],
        apply: opts.apply,
        fail_rate: opts.fail_rate,
        ..SimOptions::default()
    };
    let ca = std::fs::read_to_string(op.join("ca.pem"))?;
    let fleet = Fleet::start(&c.addr(), &ca, ids, sim)?;
    let n = opts.hosts;
    fig.first_connect = wait_async("all hosts connected", opts.deadline, || fleet.connected() == n).await?;

    // One real agent beside them (consuming nothing), idle through the same window.
    let mut agent = crate::Agent::new(dir, "real-agent", &[]);
    agent.enroll_ok(&c, &[]);
    agent.start();
    let apid = agent.pid().context("rekey-agent is not running")?;
    let t = Instant::now();
    while !c.is_connected(&agent.name) {
        if t.elapsed() > opts.deadline {
            bail!("the real agent did not connect:\n{}", agent.logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Idle: let the handshakes' garbage settle, then a window of heartbeats only.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu0, ctx0, t0) = (cpu_seconds(pid(&c)?), context_switches(apid), Instant::now());
    tokio::time::sleep(opts.idle).await;
    fig.idle_window = t0.elapsed();
    fig.idle_cpu_pct = (cpu_seconds(pid(&c)?) - cpu0) / fig.idle_window.as_secs_f64() * 100.0;
    fig.rss_idle_kib = status_kib(pid(&c)?, "VmRSS:");
    fig.agent = AgentFigures {
        binary_bytes: std::fs::metadata(&bins().agent).map(|m| m.len()).unwrap_or(0),
        rss_kib: status_kib(apid, "VmRSS:"),
        anon_kib: status_kib(apid, "RssAnon:"),
        wakeups_per_min: (context_switches(apid) - ctx0) as f64 * 60.0 / fig.idle_window.as_secs_f64(),
        threads: status_kib(apid, "Threads:"),
    };
    agent.kill();

    // Cold reconnect: SIGKILL rekeyd and start it again on the same data.
    let (errors0, sessions0) = (load(&fleet.stats.connect_errors), load(&fleet.stats.sessions));
    let t = Instant::now();
    c.restart();
    fig.restart_ready = t.elapsed();
    fig.reconnect = wait_async("all hosts reconnected", opts.deadline, || fleet.connected() == n).await?;
    fig.reconnect += fig.restart_ready;
    fig.reconnect_errors = load(&fleet.stats.connect_errors) - errors0;
    fig.reconnect_sessions = load(&fleet.stats.sessions) - sessions0;
    let mut kinds: Vec<(String, u64)> =
        fleet.stats.error_kinds.lock().expect("error kinds lock").iter().map(|(k, n)| (k.clone(), *n)).collect();
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    kinds.truncate(3);
    fig.reconnect_error_kinds = kinds;

    let mut admin = sim::admin(&c.addr(), &op).await?;
    for (label, secret) in [("canary + 10 % waves", WAVES_SECRET), ("one 100 % wave", ONE_WAVE_SECRET)] {
        let r = rotation(&mut admin, pid(&c)?, secret, label, &fleet, opts.deadline).await?;
        fig.rotations.push(r);
    }
    let id = latest(&mut admin, WAVES_SECRET).await?.context("no rotation")?;
    fig.reads = reads(&c, &id);
    fleet.stop().await;
    Ok(fig)
}

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(std::sync::atomic::Ordering::Relaxed)
}

async fn latest(admin: &mut AdminServiceClient<Channel>, secret: &str) -> Result<Option<String>> {
    let json = admin.list_rotations(ListRotationsRequest { secret: secret.into() }).await?.into_inner().json;
    let list: Vec<RotationSummary> = serde_json::from_str(&json)?;
    Ok(list.into_iter().next().map(|r| r.id))
}

/// Starts a rotation of `secret`, waits for its end, and measures it.
async fn rotation(
    admin: &mut AdminServiceClient<Channel>,
    pid: u32,
    secret: &str,
    label: &str,
    fleet: &Fleet,
    deadline: Duration,
) -> Result<RotationFigures> {
    let (cpu0, io0, reports0) = (cpu_seconds(pid), write_bytes(pid), load(&fleet.stats.reports));
    let t = Instant::now();
    let started = admin
        .start_rotation(StartRotationRequest { secret: secret.into(), ..Default::default() })
        .await
        .with_context(|| format!("start {secret}"))?
        .into_inner()
        .json;
    let id = serde_json::from_str::<RotationView>(&started).map(|r| r.id).context("start answer")?;
    // Poll the cheap summary, not the whole rotation.
    loop {
        let json = admin.list_rotations(ListRotationsRequest { secret: secret.into() }).await?.into_inner().json;
        let list: Vec<RotationSummary> = serde_json::from_str(&json)?;
        if list.iter().any(|r| r.id == id && (r.state.is_terminal() || r.state == RotationState::Halted)) {
            break;
        }
        if t.elapsed() > deadline {
            bail!("rotation {id} of {secret} did not end within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (cpu_s, write_bytes) = (cpu_seconds(pid) - cpu0, write_bytes(pid) - io0);
    let json = admin.get_rotation(GetRotationRequest { id: id.clone() }).await?.into_inner().json;
    let r: RotationView = serde_json::from_str(&json)?;
    let at = |s: RotationState| r.timeline.iter().find(|e| e.state == s).map(|e| e.at_ms - r.created_ms);
    let ms = |v: Option<i64>| Duration::from_millis(v.unwrap_or(0).max(0) as u64);
    let mut confirm = Vec::new();
    let mut receipt = Vec::new();
    for h in r.hosts.values().filter(|h| h.state == HostState::Healthy) {
        if let (Some(d), Some(ok)) = (h.delivered_ms, h.first_at(HostState::Healthy)) {
            confirm.push(ok - d);
            receipt.push(h.received_ms.unwrap_or(ok) - d);
        }
    }
    let (cm, cx) = median_max(&mut confirm);
    let (rm, rx) = median_max(&mut receipt);
    Ok(RotationFigures {
        label: label.into(),
        state: format!("{:?}", r.state).to_lowercase(),
        waves: r.waves.len(),
        healthy: r.hosts.values().filter(|h| h.state == HostState::Healthy).count(),
        failed: r.hosts.values().filter(|h| matches!(h.state, HostState::Failed | HostState::RolledBack)).count(),
        to_verified: ms(at(RotationState::Verified)),
        to_completed: ms(at(RotationState::Completed)),
        cpu_s,
        write_bytes,
        host_events: load(&fleet.stats.reports) - reports0,
        confirm_median_ms: cm,
        confirm_max_ms: cx,
        receipt_median_ms: rm,
        receipt_max_ms: rx,
    })
}

fn median_max(v: &mut [i64]) -> (i64, i64) {
    v.sort_unstable();
    (v.get(v.len() / 2).copied().unwrap_or(0), v.last().copied().unwrap_or(0))
}

/// The admin read paths an operator uses, through the real CLI.
fn reads(c: &Coordinator, id: &str) -> Vec<ReadFigures> {
    let cmds: Vec<Vec<&str>> = vec![
        vec!["agents"],
        vec!["agents", "--limit", "0"],
        vec!["agents", "--filter", "disconnected"],
        vec!["agents", "-o", "json"],
        vec!["rotate", "status", id],
        vec!["rotate", "status", id, "--hosts", "all"],
        vec!["rotate", "status", id, "-o", "json"],
        vec!["report", id],
    ];
    let _ = bins();
    cmds.into_iter()
        .map(|args| {
            let t = Instant::now();
            let out = c.cli(&args);
            ReadFigures {
                command: format!("rekey {}", args.join(" ").replace(id, "ID")),
                ok: out.status.success(),
                latency: t.elapsed(),
                bytes: out.stdout.len(),
            }
        })
        .collect()
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.hosts as f64;
        let per = self.rss_idle_kib.saturating_sub(self.rss_before_kib) as f64 / n;
        writeln!(f, "hosts                      {}", self.hosts)?;
        writeln!(f, "enroll                     {:.1} s ({:.0} hosts/s)", secs(self.enroll), n / secs(self.enroll))?;
        writeln!(f, "first connect, all at once {:.2} s", secs(self.first_connect))?;
        writeln!(
            f,
            "rekeyd RSS                 {} KiB enrolled, {} KiB with all connected",
            self.rss_before_kib, self.rss_idle_kib
        )?;
        writeln!(f, "RSS per idle session       {per:.1} KiB")?;
        writeln!(
            f,
            "rekeyd CPU at idle         {:.2} % of one core over {:.0} s",
            self.idle_cpu_pct,
            secs(self.idle_window)
        )?;
        writeln!(
            f,
            "restart → all reconnected  {:.2} s (rekeyd listening after {:.2} s; {} failed attempts retried, {} sessions)",
            secs(self.reconnect),
            secs(self.restart_ready),
            self.reconnect_errors,
            self.reconnect_sessions
        )?;
        for (kind, n) in &self.reconnect_error_kinds {
            writeln!(f, "  {n:>6} × {kind}")?;
        }
        let a = &self.agent;
        writeln!(
            f,
            "real rekey-agent           {} bytes stripped, {} KiB RSS idle ({} KiB anonymous), {} threads, {:.1} wake-ups/min idle",
            a.binary_bytes, a.rss_kib, a.anon_kib, a.threads, a.wakeups_per_min
        )?;
        for r in &self.rotations {
            writeln!(
                f,
                "rotation: {} ({} waves) → {}, {} healthy, {} failed",
                r.label, r.waves, r.state, r.healthy, r.failed
            )?;
            writeln!(f, "  start → verified         {:.2} s", secs(r.to_verified))?;
            writeln!(f, "  start → completed        {:.2} s", secs(r.to_completed))?;
            writeln!(f, "  rekeyd CPU               {:.2} s", r.cpu_s)?;
            let per_event = r.write_bytes as f64 / r.host_events.max(1) as f64;
            writeln!(
                f,
                "  rekeyd wrote             {} bytes, {per_event:.0} per host event ({} events)",
                r.write_bytes, r.host_events
            )?;
            writeln!(
                f,
                "  delivery → healthy       median {} ms, slowest {} ms (host's clock)",
                r.confirm_median_ms, r.confirm_max_ms
            )?;
            writeln!(
                f,
                "  delivery → receipt       median {} ms, slowest {} ms (rekeyd's clock)",
                r.receipt_median_ms, r.receipt_max_ms
            )?;
        }
        let mut reads = String::new();
        for r in &self.reads {
            let _ = writeln!(
                reads,
                "  {:<44} {:>8.0} ms {:>10} bytes{}",
                r.command,
                r.latency.as_secs_f64() * 1000.0,
                r.bytes,
                if r.ok { "" } else { "  FAILED" }
            );
        }
        write!(f, "admin reads (CLI)\n{reads}")
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}
