//! The operator: a turmoil client that enrolls the fleet, starts rotations
//! and, at moments drawn from the seed, pauses, resumes, aborts, excludes a
//! host, revokes an agent, forces revocation, starts a second rotation or
//! opens an incident campaign — all through the real admin API over mTLS.
//! When its rotations are over (or the faults have stopped), it waits for
//! every rotation to reach a terminal or operator-waiting state within the
//! liveness bound.

use crate::harness::{Options, SECRET};
use crate::world::Shared;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rekey_coordinator::engine::machine::{Rotation, RotationState};
use rekey_coordinator::engine::state::EngineState;
use rekey_proto::v1::admin_service_client::AdminServiceClient;
use rekey_proto::v1::{
    Control, ControlRotationRequest, CreateTokenRequest, GetRotationRequest, ListAgentsRequest, OpenIncidentRequest,
    RevokeAgentRequest, StartRotationRequest,
};
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::Channel;

/// Once faults stop, every rotation must settle within this (simulated).
const LIVENESS: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(250);

pub struct Operator {
    world: Shared,
    rng: StdRng,
    hosts: usize,
    rotations: usize,
    faults_until: Duration,
    operator_dir: PathBuf,
    client: Option<AdminServiceClient<Channel>>,
    revoked_one: bool,
    /// Operator commands at random moments (off in forced scenarios).
    random_commands: bool,
    /// Abort the first rotation as soon as it rolls out.
    abort_in_rollout: bool,
    /// The store as rekeyd committed it, for the liveness judgement.
    reader: EngineState,
}

/// A rotation as the operator reads it.
struct View {
    id: String,
    state: String,
    paused: bool,
}

impl Operator {
    pub fn new(o: &Options, world: Shared, operator_dir: PathBuf, reader: EngineState) -> Operator {
        Operator {
            world,
            rng: StdRng::seed_from_u64(o.seed.wrapping_add(7)),
            hosts: o.hosts,
            rotations: o.rotations,
            faults_until: o.faults_until,
            operator_dir,
            client: None,
            revoked_one: o.revoke.is_some(),
            reader,
            abort_in_rollout: o.abort_in_rollout,
            random_commands: o.random_faults,
        }
    }

    fn note(&self, what: String) {
        self.world.lock().expect("world").note(format!("operator: {what}"));
    }

    async fn admin(&mut self) -> Option<AdminServiceClient<Channel>> {
        if self.client.is_none() {
            let addr = format!("{}:{}", crate::harness::COORDINATOR, crate::harness::PORT);
            self.client = rekey_tests::sim::admin(&addr, &self.operator_dir).await.ok();
        }
        self.client.clone()
    }

    /// One admin call, retried (new connection) while rekeyd is down or
    /// unreachable; a refusal is returned as is.
    async fn call<T, F, Fut>(&mut self, f: F) -> Result<T, tonic::Status>
    where
        F: Fn(AdminServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        for _ in 0..200 {
            let Some(c) = self.admin().await else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            match tokio::time::timeout(Duration::from_secs(10), f(c)).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) if s.code() != tonic::Code::Unavailable && s.code() != tonic::Code::Unknown => {
                    return Err(s);
                }
                _ => {
                    self.client = None;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        Err(tonic::Status::unavailable("rekeyd unreachable for the whole retry budget"))
    }

    pub async fn run(mut self) -> turmoil::Result {
        self.enroll_fleet().await;
        for n in 0..self.rotations {
            let Some(id) = self.start().await else { continue };
            self.note(format!("rotation {n}: {id}"));
            self.steer(&id).await;
        }
        self.wait_liveness().await;
        Ok(())
    }

    async fn enroll_fleet(&mut self) {
        for i in 1..=self.hosts {
            let host = format!("h{i}");
            let labels = [("env".to_string(), "sim".to_string())].into();
            let req = CreateTokenRequest { host: host.clone(), labels, ttl_seconds: 3600 };
            let Ok(t) = self
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.create_token(req).await }
                })
                .await
            else {
                continue;
            };
            let mut w = self.world.lock().expect("world");
            w.tokens.insert(host, t.token);
            w.ca_fingerprint = t.ca_fingerprint;
        }
        // Until every agent is connected (bounded: faults may keep one away).
        for _ in 0..240 {
            let connected =
                match self.call(|mut c| async move { c.list_agents(ListAgentsRequest::default()).await }).await {
                    Ok(l) => l.agents.iter().filter(|a| a.connected).count(),
                    Err(_) => 0,
                };
            if connected == self.hosts {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn start(&mut self) -> Option<String> {
        for _ in 0..40 {
            let req = StartRotationRequest { secret: SECRET.into(), skip_preflight: true, reason: "simulation".into() };
            match self
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.start_rotation(req).await }
                })
                .await
            {
                Ok(r) => return parse(&r.json).map(|v| v.id),
                Err(s) => self.note(format!("start refused: {}", s.message())),
            }
            // Another rotation may still be active (e.g. one this operator
            // lost the answer of): wait for it.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        None
    }

    async fn get(&mut self, id: &str) -> Option<View> {
        let req = GetRotationRequest { id: id.to_string() };
        let r = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.get_rotation(req).await }
            })
            .await
            .ok()?;
        parse(&r.json)
    }

    /// Until the rotation is over, operator commands at random moments.
    async fn steer(&mut self, id: &str) {
        for _ in 0..2000 {
            tokio::time::sleep(POLL).await;
            let Some(v) = self.get(id).await else { continue };
            if matches!(v.state.as_str(), "completed" | "aborted" | "abandoned" | "monitoring") {
                return;
            }
            if self.abort_in_rollout && v.state == "rolling_out" {
                self.abort_in_rollout = false;
                self.control(id, Control::Abort, "").await;
                continue;
            }
            if v.state == "halted" || v.paused {
                // Out of an operator-waiting state: resume, or abort.
                let action = if self.rng.random_bool(0.7) { Control::Resume } else { Control::Abort };
                self.control(id, action, "").await;
                continue;
            }
            if self.random_commands && self.rng.random_bool(0.04) {
                self.random_command(id).await;
            }
        }
    }

    async fn control(&mut self, id: &str, action: Control, host: &str) {
        let req = ControlRotationRequest {
            id: id.to_string(),
            action: action as i32,
            host: host.to_string(),
            reason: "simulated operator".into(),
        };
        let r = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.control_rotation(req).await }
            })
            .await;
        let what = format!("{action:?} {host}");
        match r {
            Ok(_) => self.note(format!("{what} on {id}: done")),
            Err(s) => self.note(format!("{what} on {id}: refused: {}", s.message())),
        }
    }

    async fn random_command(&mut self, id: &str) {
        let host = format!("h{}", self.rng.random_range(1..=self.hosts));
        let pick = self.rng.random_range(0..8);
        let kind = match pick {
            0 => "operator: pause",
            1 => "operator: resume",
            2 => "operator: abort",
            3 => "operator: exclude a host",
            4 if !self.revoked_one => "operator: revoke an agent",
            5 => "operator: revoke the old version despite the evidence",
            6 => "operator: start a second rotation",
            _ => "operator: open an incident campaign",
        };
        self.world.lock().expect("world").count(kind);
        match pick {
            0 => self.control(id, Control::Pause, "").await,
            1 => self.control(id, Control::Resume, "").await,
            2 => self.control(id, Control::Abort, "").await,
            3 => {
                // Excused before the call: once it may have committed, the
                // host-side invariants no longer speak for it.
                self.world.lock().expect("world").excused.insert(host.clone());
                self.control(id, Control::Exclude, &host).await
            }
            4 if !self.revoked_one => self.revoke_agent(&host).await,
            5 => self.control(id, Control::Revoke, "").await,
            6 => {
                let again =
                    StartRotationRequest { secret: SECRET.into(), skip_preflight: true, reason: "second".into() };
                let r = self
                    .call(|mut c| {
                        let req = again.clone();
                        async move { c.start_rotation(req).await }
                    })
                    .await;
                if r.is_ok() {
                    self.note("a second rotation of the same secret was accepted".into());
                }
            }
            _ => {
                let req = OpenIncidentRequest {
                    name: format!("sim-{}", self.rng.random::<u16>()),
                    secrets: "*".into(),
                    concurrency: 1,
                    first: vec![],
                };
                let r = self
                    .call(|mut c| {
                        let req = req.clone();
                        async move { c.open_incident(req).await }
                    })
                    .await;
                self.note(format!(
                    "campaign: {}",
                    r.map(|_| "opened".to_string()).unwrap_or_else(|s| s.message().to_string())
                ));
            }
        }
    }

    async fn revoke_agent(&mut self, host: &str) {
        self.revoked_one = true;
        self.world.lock().expect("world").excused.insert(host.to_string());
        let req = RevokeAgentRequest { name: host.to_string() };
        let r = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.revoke_agent(req).await }
            })
            .await;
        let mut w = self.world.lock().expect("world");
        if r.is_ok() {
            let now = w.now_ms;
            w.revoked_at.insert(host.to_string(), now);
        }
        w.note(format!("operator: revoke agent {host}: {}", if r.is_ok() { "done" } else { "refused" }));
    }

    /// Liveness: once faults stop, every rotation settles within the bound
    /// (judged on the store, see [`settled`]).
    async fn wait_liveness(&mut self) {
        while turmoil::elapsed() < self.faults_until {
            tokio::time::sleep(POLL).await;
        }
        let deadline = turmoil::elapsed() + LIVENESS;
        let mut open = Vec::new();
        while turmoil::elapsed() < deadline {
            open = match self.reader.list_rotations() {
                Ok(all) => {
                    all.iter().filter(|r| !settled(r)).map(|r| format!("{} {}", r.id, r.state.as_str())).collect()
                }
                Err(e) => vec![format!("store unreadable: {e}")],
            };
            if open.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.world
            .lock()
            .expect("world")
            .violation(format!("liveness: {LIVENESS:?} after the faults stopped, still unsettled: {open:?}"));
    }
}

/// Terminal, or waiting for an operator (DESIGN invariant 8: an exit that
/// is an audited decision): halted, paused, or monitoring (the secret is free
/// again; it completes when the window ends).
fn settled(r: &Rotation) -> bool {
    r.state.is_terminal() || r.paused || matches!(r.state, RotationState::Halted | RotationState::Monitoring)
}

fn parse(json: &str) -> Option<View> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(View {
        id: v["id"].as_str()?.to_string(),
        state: v["state"].as_str().unwrap_or_default().to_string(),
        paused: v["paused"].as_bool().unwrap_or(false),
    })
}

/// A second operator that revokes `host` at exactly `at` (simulated), on a
/// connection opened beforehand: to land the revocation inside an agent's
/// reconnect (its TLS handshake done, its hello on the way).
pub async fn revoke_at(world: Shared, operator_dir: PathBuf, at: Duration, host: String) -> turmoil::Result {
    let addr = format!("{}:{}", crate::harness::COORDINATOR, crate::harness::PORT);
    tokio::time::sleep(at.saturating_sub(Duration::from_millis(400))).await;
    world.lock().expect("world").excused.insert(host.clone());
    let mut client = loop {
        match rekey_tests::sim::admin(&addr, &operator_dir).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    tokio::time::sleep(at.saturating_sub(turmoil::elapsed())).await;
    let r = client.revoke_agent(RevokeAgentRequest { name: host.clone() }).await;
    let mut w = world.lock().expect("world");
    if r.is_ok() {
        let now = w.now_ms;
        w.revoked_at.insert(host.clone(), now);
    }
    w.note(format!("operator: revoke agent {host}: {}", if r.is_ok() { "done" } else { "refused" }));
    Ok(())
}
