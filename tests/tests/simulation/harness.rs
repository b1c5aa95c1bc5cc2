//! One simulated run: the real rekeyd (engine, driver, sessions, admin
//! service, sled store, provider journals) and real agents (session,
//! dispatcher, pipeline writing real files) as turmoil hosts on a simulated
//! clock and network, an operator client, and the fault schedule drawn from
//! the seed. Invariants are checked after every step.

use crate::provider::SimProvider;
use crate::world::{ApplyFault, Shared, World};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rekey_coordinator::config::Config;
use rekey_coordinator::engine::driver::SecretBackends;
use rekey_coordinator::engine::machine::{HostState, RotationState};
use rekey_coordinator::engine::state::EngineState;
use rekey_coordinator::server::Coordinator;
use rekey_coordinator::store::Store;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

pub const COORDINATOR: &str = "rekeyd";
pub const PORT: u16 = 7443;
pub const SECRET: &str = "db";
const STEP: Duration = Duration::from_millis(5);
/// Store invariants are read every this many steps (and at the end).
const SWEEP_EVERY: u64 = 20;
/// A delivery sent just before a revocation committed may still reach its
/// first apply step this long after the operator saw the revocation return.
const REVOKED_MARGIN_MS: i64 = 2000;

/// What one seed does.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub hosts: usize,
    pub rotations: usize,
    /// Faults stop at this simulated time; then the liveness bound runs.
    pub faults_until: Duration,
    /// Extra faults a regression test forces at given times.
    pub forced: Vec<(Duration, Fault)>,
    /// Faults drawn from the seed (schedule, provider, apply, operator
    /// commands); off, only `forced` and the options below happen.
    pub random_faults: bool,
    /// The provider keeps its create journal (see [`World::journal`]).
    pub journal: bool,
    /// The first create acts, then rekeyd crashes before the answer.
    pub crash_first_create: bool,
    /// The operator revokes this agent at this time (a race with its hello
    /// when the schedule restarts it then).
    pub revoke: Option<(Duration, String)>,
    /// The operator aborts the first rotation as soon as it rolls out.
    pub abort_in_rollout: bool,
    /// A host whose first restart back to the old version (a rollback)
    /// crashes it mid-step.
    pub crash_rollback_of: Option<String>,
    /// A host whose first restart hangs (until the agent's restart timeout).
    pub hang_apply_of: Option<String>,
}

impl Options {
    pub fn seed(seed: u64) -> Options {
        Options {
            seed,
            hosts: 4,
            rotations: 2,
            faults_until: Duration::from_secs(60),
            forced: vec![],
            random_faults: true,
            journal: true,
            crash_first_create: false,
            revoke: None,
            abort_in_rollout: false,
            crash_rollback_of: None,
            hang_apply_of: None,
        }
    }
}

/// A fault the harness injects from outside the hosts.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    CrashCoordinator { down: Duration },
    CrashAgent { host: String, down: Duration },
    Partition { host: String, heal_after: Duration },
    Latency { max: Duration, for_: Duration },
    Drift,
}

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Fault::CrashCoordinator { .. } => "rekeyd crash and restart",
            Fault::CrashAgent { .. } => "agent crash and restart",
            Fault::Partition { .. } => "partition and heal",
            Fault::Latency { .. } => "message delay",
            Fault::Drift => "drift (scheduled)",
        }
    }
}

/// The fault schedule of a seed: when, what.
pub fn schedule(o: &Options) -> Vec<(Duration, Fault)> {
    let mut rng = StdRng::seed_from_u64(o.seed);
    let mut out = o.forced.clone();
    if o.random_faults {
        let mut t = Duration::from_millis(rng.random_range(500..4000));
        while t < o.faults_until {
            let host = format!("h{}", rng.random_range(1..=o.hosts));
            let f = match rng.random_range(0..10) {
                0..=2 => Fault::CrashCoordinator { down: Duration::from_millis(rng.random_range(50..3000)) },
                3..=4 => Fault::CrashAgent { host, down: Duration::from_millis(rng.random_range(50..5000)) },
                5..=6 => Fault::Partition { host, heal_after: Duration::from_millis(rng.random_range(100..15_000)) },
                7..=8 => Fault::Latency {
                    max: Duration::from_millis(rng.random_range(20..800)),
                    for_: Duration::from_millis(rng.random_range(500..10_000)),
                },
                _ => Fault::Drift,
            };
            out.push((t, f));
            t += Duration::from_millis(rng.random_range(300..6000));
        }
    }
    out.sort_by_key(|(t, _)| *t);
    out
}

thread_local! {
    /// The world of the simulation running on this thread (the seams the
    /// process installs are plain functions; they find it here).
    static CURRENT: RefCell<Option<Shared>> = const { RefCell::new(None) };
}

fn current() -> Option<Shared> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Installs the simulation's clock, network and command runner into the
/// production seams, once per process. Outside a simulated host each of
/// them falls back to the real thing.
pub fn install_seams() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // `REKEY_SIM_LOG=rekey=debug`: the hosts' own logs, for a seed under study.
        if let Ok(filter) = std::env::var("REKEY_SIM_LOG") {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        }
        rekey_common::tls::install_crypto_provider();
        rekey_common::time::install_clock(turmoil::since_epoch);
        rekey_common::time::install_jitter(jitter);
        rekey_common::tls::install_dialer(dial);
        rekey_agent::pipeline::actions::install_command_runner(run_command);
    });
}

/// Timing jitter from the run's seeded RNG, inside a simulated host.
fn jitter(max_ms: u64) -> Option<u64> {
    if !turmoil::in_simulation() {
        return None;
    }
    let world = current()?;
    let ms = world.lock().expect("world").jitter(max_ms);
    Some(ms)
}

fn dial(authority: String) -> rekey_common::tls::Dialing {
    Box::pin(async move {
        if !turmoil::in_simulation() {
            return Ok(Box::new(tokio::net::TcpStream::connect(authority).await?) as Box<dyn rekey_common::tls::Conn>);
        }
        let s = turmoil::net::TcpStream::connect(authority).await?;
        Ok(Box::new(s) as Box<dyn rekey_common::tls::Conn>)
    })
}

/// Restarts and health checks of the simulated hosts: `["/bin/true", "sim",
/// STEP, HOST]`. Before the step the file holds what the agent just wrote,
/// so that is when the host-side invariant is checked.
fn run_command(argv: Vec<String>, version: String) -> rekey_agent::pipeline::actions::SimulatedRun {
    Box::pin(async move {
        let Some(world) = current() else { return Ok(vec![]) };
        let (step, host) = (argv.get(2).cloned().unwrap_or_default(), argv.get(3).cloned().unwrap_or_default());
        let fault = {
            let mut w = world.lock().expect("world");
            w.check_hosts(&format!("{host} {step} of {version}"));
            // A version it never had: a delivery. (Restoring one it had is
            // its own rollback of an apply that was in flight.)
            let seen = w.applied.entry(host.clone()).or_insert_with(|| ["v0".to_string(), String::new()].into());
            let first_time = seen.insert(version.clone());
            if let Some(at) = w.revoked_at.get(&host).copied()
                && first_time
                && w.now_ms > at + REVOKED_MARGIN_MS
            {
                let late = w.now_ms - at;
                w.violation(format!("revoked agent {host} applied {version} {late} ms after its revocation"));
            }
            let rollback = step == "restart" && version == "v0" && w.applied[&host].len() > 2;
            let f = if rollback && w.crash_rollback_of.as_deref() == Some(host.as_str()) {
                w.crash_rollback_of = None;
                w.count("apply: agent crashed mid-rollback (forced)");
                ApplyFault::Crash
            } else if step == "restart" && w.hang_apply_of.as_deref() == Some(host.as_str()) {
                w.hang_apply_of = None;
                w.count("apply: hang (forced)");
                ApplyFault::Hang
            } else {
                w.draw_apply_fault()
            };
            w.note(format!("{host}: {step} of {version} ({f:?})"));
            if f == ApplyFault::Crash {
                w.crash_requests.push(host.clone());
            }
            f
        };
        match fault {
            ApplyFault::None => Ok(vec![]),
            ApplyFault::Fail => Err(format!("simulated {step} failure")),
            ApplyFault::Hang | ApplyFault::Crash => {
                std::future::pending::<()>().await;
                unreachable!()
            }
        }
    })
}

/// turmoil's listener as the server's [`rekey_common::tls::Listener`].
pub struct SimListener(pub turmoil::net::TcpListener);

pub struct SimStream(turmoil::net::TcpStream);

impl rekey_common::tls::Listener for SimListener {
    type Io = SimStream;

    async fn accept(&self) -> std::io::Result<(SimStream, SocketAddr)> {
        let (s, peer) = self.0.accept().await?;
        Ok((SimStream(s), peer))
    }
}

impl tonic::transport::server::Connected for SimStream {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.0.local_addr().ok(),
            remote_addr: self.0.peer_addr().ok(),
        }
    }
}

impl AsyncRead for SimStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

fn coordinator_toml() -> String {
    format!(
        r#"listen = "0.0.0.0:{PORT}"
data_dir = "data"
master_key_file = "master.key"
server_names = ["{COORDINATOR}"]

[sessions]
heartbeat_interval = "2s"
silence_timeout = "7s"

[[secret]]
name = "{SECRET}"
selector = {{ env = "sim" }}
provider = {{ kind = "random" }}
[secret.rollout]
canary = 1
waves = ["50%", "100%"]
failure_budget = 1
host_deadline = "20s"
[secret.revocation]
grace = "2s"
monitor = "3s"
check_every = "1s"
"#
    )
}

fn agent_toml(host: &str, dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"coordinator = "{COORDINATOR}:{PORT}"
state_dir = "{d}/state"
[reconnect]
initial_backoff = "200ms"
max_backoff = "2s"

[[secret]]
name = "{SECRET}"
  [[secret.file]]
  path = "{d}/service.env"
  kind = "template"
  template = "value={{{{ value }}}}\n"
  [secret.restart]
  kind = "command"
  command = ["/bin/true", "sim", "restart", "{host}"]
  timeout = "5s"
  [secret.health]
  kind = "command"
  command = ["/bin/true", "sim", "health", "{host}"]
  retries = 2
  interval = "500ms"
  timeout = "3s"
"#
    )
}

/// What stays on disk between rekeyd's lives: the data dir and the store.
struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    config: Config,
    store: Store,
    reader: EngineState,
}

fn setup(o: &Options) -> anyhow::Result<Setup> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_path_buf();
    let path = root.join("rekeyd.toml");
    std::fs::write(&path, coordinator_toml())?;
    let config = Config::from_file(&path)?;
    // rekeyd init: master key, store, CA, operator credential.
    drop(Coordinator::init(config.clone())?);
    let (store, _) =
        rekey_coordinator::ha::open_store(&config, rekey_coordinator::store::postgres::FenceMode::Offline)?;
    let master = rekey_coordinator::crypto::load_master_key(&config.master_key_file)?;
    let (ca, _) = rekey_coordinator::pki::Ca::load_or_create(&store, &master)?;
    let reader = EngineState::open(&store, ca.dek())?;
    for i in 1..=o.hosts {
        let host = format!("h{i}");
        let hdir = root.join(&host);
        std::fs::create_dir_all(&hdir)?;
        std::fs::write(hdir.join("agent.toml"), agent_toml(&host, &hdir))?;
    }
    Ok(Setup { _dir: dir, root, config, store, reader })
}

/// The outcome of one seed.
pub struct Outcome {
    pub seed: u64,
    pub schedule: Vec<(Duration, Fault)>,
    pub trace: Vec<String>,
    pub violations: Vec<String>,
    pub injected: crate::world::Counts,
    pub steps: u64,
    pub simulated: Duration,
    pub rotations: Vec<(String, String)>,
}

impl Outcome {
    /// What a failing seed prints: the seed, the schedule, the broken
    /// invariants and the end of the trace.
    pub fn report(&self) -> String {
        let mut s = format!("seed {} broke {} invariant(s):\n", self.seed, self.violations.len());
        for v in &self.violations {
            s += &format!("  - {v}\n");
        }
        s += "fault schedule:\n";
        for (t, f) in &self.schedule {
            s += &format!("  {:>8.3}s {f:?}\n", t.as_secs_f64());
        }
        s += &format!("rotations: {:?}\n", self.rotations);
        let file = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("simulation-seed-{}.trace", self.seed));
        if std::fs::write(&file, self.trace.join("\n")).is_ok() {
            s += &format!("full trace: {}\n", file.display());
        }
        let from = self.trace.len().saturating_sub(80);
        s += &format!("trace (last {} of {} lines):\n", self.trace.len() - from, self.trace.len());
        for l in &self.trace[from..] {
            s += &format!("  {l}\n");
        }
        s += &format!(
            "reproduce: REKEY_SIM_SEED={} cargo test -p rekey-tests --test simulation -- --ignored one_seed --nocapture\n",
            self.seed
        );
        s
    }
}

/// Runs one seed to the end; the outcome lists any invariant broken.
pub fn run(o: Options) -> anyhow::Result<Outcome> {
    install_seams();
    let world = World::shared(o.seed);
    CURRENT.with(|c| *c.borrow_mut() = Some(world.clone()));
    let result = run_in(&o, &world);
    CURRENT.with(|c| *c.borrow_mut() = None);
    result
}

fn run_in(o: &Options, world: &Shared) -> anyhow::Result<Outcome> {
    let s = setup(o)?;
    let schedule = schedule(o);
    {
        let mut w = world.lock().expect("world");
        w.journal = o.journal;
        w.reader = Some(s.reader.clone());
        w.crash_rollback_of = o.crash_rollback_of.clone();
        w.hang_apply_of = o.hang_apply_of.clone();
        if !o.random_faults {
            // A forced scenario alone: no drawn provider or apply faults.
            w.provider_fault_rate = 0.0;
            w.apply_fault_rate = 0.0;
        }
        w.crash_next_create = o.crash_first_create;
        for i in 1..=o.hosts {
            w.host_files.insert(format!("h{i}"), s.root.join(format!("h{i}/service.env")));
        }
    }
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(3600))
        .tick_duration(STEP)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(5))
        .epoch(SystemTime::now())
        .rng_seed(o.seed)
        .build();
    add_coordinator(&mut sim, &s, world);
    for i in 1..=o.hosts {
        add_agent(&mut sim, &format!("h{i}"), &s.root, world);
    }
    let operator = crate::operator::Operator::new(o, world.clone(), s.config.operator_dir(), s.reader.clone());
    sim.client("operator", operator.run());
    if let Some((at, host)) = o.revoke.clone() {
        let dir = s.config.operator_dir();
        sim.client("security", crate::operator::revoke_at(world.clone(), dir, at, host));
    }
    drive(&mut sim, o, &s, world, schedule)
}

fn add_coordinator(sim: &mut turmoil::Sim<'_>, s: &Setup, world: &Shared) {
    let (config, store, world) = (s.config.clone(), s.store.clone(), world.clone());
    sim.host(COORDINATOR, move || {
        let (config, store, world) = (config.clone(), store.clone(), world.clone());
        async move {
            world.lock().expect("world").note("rekeyd starts");
            let w = world.clone();
            let build = move |_: &rekey_coordinator::engine::catalog::SecretSpec, state| {
                Ok(SecretBackends { provider: Arc::new(SimProvider { world: w.clone(), state }), sinks: vec![] })
            };
            let c = match Coordinator::init_with_backends(config, store, false, &build) {
                Ok(c) => c,
                Err(e) => {
                    world.lock().expect("world").violation(format!("rekeyd cannot start: {e}"));
                    return Ok(());
                }
            };
            let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
            let addr = listener.local_addr()?;
            let r = c.serve_on(SimListener(listener), addr, CancellationToken::new(), Duration::from_secs(5), |_| {});
            if let Err(e) = r.await {
                world.lock().expect("world").note(format!("rekeyd stopped: {e}"));
            }
            std::future::pending::<()>().await;
            Ok(())
        }
    });
}

fn add_agent(sim: &mut turmoil::Sim<'_>, host: &str, root: &Path, world: &Shared) {
    let (dir, world, name) = (root.join(host), world.clone(), host.to_string());
    sim.host(host, move || {
        let (dir, world, name) = (dir.clone(), world.clone(), name.clone());
        async move {
            world.lock().expect("world").note(format!("{name}: agent starts"));
            if let Err(e) = agent(&dir, &name, &world).await {
                world.lock().expect("world").note(format!("{name}: agent stopped: {e}"));
            }
            std::future::pending::<()>().await;
            Ok(())
        }
    });
}

async fn agent(dir: &Path, name: &str, world: &Shared) -> anyhow::Result<()> {
    let state_dir = dir.join("state");
    if rekey_agent::identity::Identity::load(&state_dir).is_err() {
        loop {
            let (token, pin) = {
                let w = world.lock().expect("world");
                (w.tokens.get(name).cloned(), w.ca_fingerprint.clone())
            };
            if let Some(token) = token {
                let coordinators = [format!("{COORDINATOR}:{PORT}")];
                let opts = rekey_agent::enroll::EnrollOptions {
                    coordinators: &coordinators,
                    token: &token,
                    ca_fingerprint: &pin,
                    state_dir: &state_dir,
                    force: true,
                };
                match rekey_agent::enroll::enroll(opts).await {
                    Ok(_) => break,
                    Err(e) => world.lock().expect("world").note(format!("{name}: enroll failed: {e}")),
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let config = rekey_agent::config::AgentConfig::from_file(&dir.join("agent.toml"))?;
    rekey_agent::session::run(config, CancellationToken::new()).await?;
    Ok(())
}

/// Steps the simulation: faults from the schedule and from the hosts'
/// requests, invariants after every step, until the operator is done.
fn drive(
    sim: &mut turmoil::Sim<'_>,
    o: &Options,
    s: &Setup,
    world: &Shared,
    schedule: Vec<(Duration, Fault)>,
) -> anyhow::Result<Outcome> {
    let mut pending: std::collections::VecDeque<(Duration, Fault)> = schedule.clone().into();
    // (time, host): crashed hosts to start again.
    let mut restarts: Vec<(Duration, String)> = Vec::new();
    let mut heals: Vec<(Duration, String)> = Vec::new();
    let mut latency_until: Option<Duration> = None;
    let mut memory = Memory::default();
    let mut rng = StdRng::seed_from_u64(o.seed.wrapping_mul(31));
    let mut steps = 0u64;
    loop {
        let now = sim.elapsed();
        {
            let mut w = world.lock().expect("world");
            w.now_ms = sim.since_epoch().as_millis() as i64;
            w.elapsed = now;
        }
        let faults_on = now < o.faults_until;
        world.lock().expect("world").faults_on = faults_on;
        while pending.front().is_some_and(|(t, _)| *t <= now) {
            let (_, f) = pending.pop_front().expect("front");
            if faults_on || o.forced.iter().any(|(_, g)| *g == f) {
                inject(sim, world, &f, now, &mut restarts, &mut heals, &mut latency_until);
            }
        }
        settle_hosts(sim, world, now, faults_on, &mut rng, &mut restarts, &mut heals, &mut latency_until);
        let done = sim.step().map_err(|e| anyhow::anyhow!("simulation error: {e}"))?;
        steps += 1;
        world.lock().expect("world").check_versions();
        if steps.is_multiple_of(SWEEP_EVERY) || done {
            memory.sweep(&s.reader, world)?;
        }
        if done {
            break;
        }
    }
    memory.sweep(&s.reader, world)?;
    memory.audit(&s.reader, world)?;
    let w = world.lock().expect("world");
    Ok(Outcome {
        seed: o.seed,
        schedule,
        trace: w.trace.clone(),
        violations: w.violations.clone(),
        injected: w.injected.clone(),
        steps,
        simulated: sim.elapsed(),
        rotations: memory.last.iter().map(|(id, st)| (id.clone(), st.clone())).collect(),
    })
}

/// Crashes the hosts that asked for it, restarts and heals what is due, and
/// (once faults stop) heals everything.
#[allow(clippy::too_many_arguments, reason = "the driver's loop state, split out to keep the loop readable")]
fn settle_hosts(
    sim: &mut turmoil::Sim<'_>,
    world: &Shared,
    now: Duration,
    faults_on: bool,
    rng: &mut StdRng,
    restarts: &mut Vec<(Duration, String)>,
    heals: &mut Vec<(Duration, String)>,
    latency_until: &mut Option<Duration>,
) {
    let requested = std::mem::take(&mut world.lock().expect("world").crash_requests);
    for host in requested {
        if sim.is_host_running(host.as_str()) {
            sim.crash(host.as_str());
            let down = Duration::from_millis(rng.random_range(20..3000));
            world.lock().expect("world").note(format!("{host} crashed (requested), back in {down:?}"));
            restarts.push((now + down, host));
        }
    }
    for (_, host) in restarts.extract_if(.., |(t, _)| *t <= now) {
        sim.bounce(host.as_str());
    }
    for (_, host) in heals.extract_if(.., |(t, _)| *t <= now) {
        sim.repair(COORDINATOR, host.as_str());
        world.lock().expect("world").note(format!("partition of {host} healed"));
    }
    if latency_until.is_some_and(|t| t <= now) || (!faults_on && latency_until.is_some()) {
        sim.set_max_message_latency(Duration::from_millis(5));
        *latency_until = None;
    }
    if !faults_on {
        // Heal everything once faults stop (liveness is judged from here).
        for (_, host) in heals.drain(..) {
            sim.repair(COORDINATOR, host.as_str());
        }
        for (_, host) in restarts.drain(..) {
            sim.bounce(host.as_str());
        }
    }
}

fn inject(
    sim: &mut turmoil::Sim<'_>,
    world: &Shared,
    f: &Fault,
    now: Duration,
    restarts: &mut Vec<(Duration, String)>,
    heals: &mut Vec<(Duration, String)>,
    latency_until: &mut Option<Duration>,
) {
    let mut w = world.lock().expect("world");
    w.count(f.kind());
    w.note(format!("fault: {f:?}"));
    drop(w);
    match f {
        Fault::CrashCoordinator { down } => {
            if sim.is_host_running(COORDINATOR) {
                sim.crash(COORDINATOR);
                restarts.push((now + *down, COORDINATOR.to_string()));
            }
        }
        Fault::CrashAgent { host, down } => {
            if sim.is_host_running(host.as_str()) {
                sim.crash(host.as_str());
                restarts.push((now + *down, host.clone()));
            }
        }
        Fault::Partition { host, heal_after } => {
            sim.partition(COORDINATOR, host.as_str());
            heals.push((now + *heal_after, host.clone()));
        }
        Fault::Latency { max, for_ } => {
            sim.set_max_message_latency(*max);
            *latency_until = Some(now + *for_);
        }
        Fault::Drift => world.lock().expect("world").drift(),
    }
}

/// What the store said at earlier sweeps, to check that nothing committed
/// is lost.
#[derive(Default)]
struct Memory {
    /// (rotation, host) that confirmed the new version.
    confirmed: BTreeSet<(String, String)>,
    /// Rotation → its last state, for the outcome.
    last: BTreeMap<String, String>,
}

impl Memory {
    /// The store invariants: one active rotation per secret, no
    /// confirmation lost. (A revoked agent receiving nothing is checked
    /// where it would show: its apply steps, see `run_command`.)
    fn sweep(&mut self, reader: &EngineState, world: &Shared) -> anyhow::Result<()> {
        let rotations = reader.list_rotations()?;
        let mut w = world.lock().expect("world");
        // Monitoring watches an old version already deleted: the secret is free again.
        let active: Vec<&str> = rotations
            .iter()
            .filter(|r| !r.state.is_terminal() && r.state != RotationState::Monitoring)
            .map(|r| r.id.as_str())
            .collect();
        if active.len() > 1 && !w.violations.iter().any(|v| v.contains("active rotations")) {
            w.violation(format!("{} active rotations of {SECRET}: {active:?}", active.len()));
        }
        for r in &rotations {
            self.last.insert(r.id.clone(), r.state.as_str().to_string());
            let aborting = matches!(r.state, RotationState::Aborting | RotationState::Aborted);
            for (host, h) in &r.hosts {
                let key = (r.id.clone(), host.clone());
                if h.state == HostState::Healthy {
                    self.confirmed.insert(key);
                } else if self.confirmed.contains(&key) && !aborting && h.exclusion.is_none() {
                    w.violation(format!("rotation {} lost the confirmation of {host} (now {:?})", r.id, h.state));
                    self.confirmed.remove(&key);
                }
            }
        }
        Ok(())
    }

    fn audit(&self, reader: &EngineState, world: &Shared) -> anyhow::Result<()> {
        let records = reader.audit_records()?;
        let v = rekey_coordinator::audit::verify(&records);
        if let Some((seq, why)) = v.first_broken {
            world.lock().expect("world").violation(format!("audit chain broken at record {seq}: {why}"));
        }
        Ok(())
    }
}
