//! A scripted agent: enrolled for real (the `rekey-agent enroll` binary), it
//! speaks the real protocol over real mTLS, but its apply step is a script
//! (succeed, fail, hang) so tests can drive the engine into every corner.
//! It keeps what it "applied" across reconnects and reports it in its hello,
//! like the real agent, and answers dry runs (`Preflight`) with scripted checks.

use crate::{Agent, Coordinator};
use rekey_common::secret::fingerprint_fields;
use rekey_common::tls;
use rekey_proto::PROTOCOL_VERSION;
use rekey_proto::v1::agent_service_client::AgentServiceClient;
use rekey_proto::v1::{
    AgentMessage, AppliedVersion, Delivery, Heartbeat, Hello, PreflightCheck, PreflightResult, Stage, StageReport,
    agent_message, coordinator_message,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, PartialEq)]
pub enum Behavior {
    /// Report delivered → applied → restarted → healthy.
    Succeed,
    /// Report delivered → applied → failed (reason) → rolled back.
    Fail(String),
    /// Report delivered, then nothing (a stuck apply).
    Hang,
}

#[derive(Default)]
struct Shared {
    behavior: BTreeMap<String, Behavior>,
    /// secret → (version, fingerprint) currently applied.
    applied: BTreeMap<String, (String, String)>,
    /// secret → (version, fingerprint) before the last apply (for rollback).
    previous: BTreeMap<String, Option<(String, String)>>,
    deliveries: Vec<(String, String)>,
    rollbacks: Vec<(String, String)>,
    purges: Vec<(String, String)>,
    values_seen: Vec<Vec<u8>>,
    scans: Vec<rekey_proto::v1::ScanRequest>,
    /// secret → the checks its dry run answers (default: one passing check).
    preflight: BTreeMap<String, Vec<PreflightCheck>>,
    preflights: Vec<rekey_proto::v1::Preflight>,
    connected: bool,
}

pub struct ScriptedAgent {
    pub name: String,
    pub state_dir: PathBuf,
    addr: String,
    secrets: Vec<String>,
    shared: Arc<Mutex<Shared>>,
    stop: Option<CancellationToken>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ScriptedAgent {
    /// Enrolls `name` (with `labels`) at `c` and starts its session.
    pub fn enroll(c: &Coordinator, dir: &Path, name: &str, secrets: &[&str], labels: &[&str]) -> ScriptedAgent {
        let a = Agent::new(dir, name, secrets);
        a.enroll_ok(c, labels);
        let mut s = ScriptedAgent {
            name: name.to_string(),
            state_dir: a.state_dir(),
            addr: c.addr(),
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            shared: Arc::default(),
            stop: None,
            thread: None,
        };
        s.start();
        s
    }

    /// What this agent does with deliveries of `secret` from now on.
    pub fn set_behavior(&self, secret: &str, b: Behavior) {
        self.shared.lock().unwrap().behavior.insert(secret.to_string(), b);
    }

    /// What the dry run of `secret` answers from now on: (subject, ok, detail) each.
    pub fn set_preflight(&self, secret: &str, checks: &[(&str, bool, &str)]) {
        let checks = checks
            .iter()
            .map(|(s, ok, d)| PreflightCheck { subject: s.to_string(), ok: *ok, detail: d.to_string() })
            .collect();
        self.shared.lock().unwrap().preflight.insert(secret.to_string(), checks);
    }

    /// Every dry run asked of this agent.
    pub fn preflights(&self) -> Vec<rekey_proto::v1::Preflight> {
        self.shared.lock().unwrap().preflights.clone()
    }

    pub fn applied(&self, secret: &str) -> Option<(String, String)> {
        self.shared.lock().unwrap().applied.get(secret).cloned()
    }

    pub fn deliveries(&self) -> Vec<(String, String)> {
        self.shared.lock().unwrap().deliveries.clone()
    }

    pub fn rollbacks(&self) -> Vec<(String, String)> {
        self.shared.lock().unwrap().rollbacks.clone()
    }

    pub fn purges(&self) -> Vec<(String, String)> {
        self.shared.lock().unwrap().purges.clone()
    }

    /// Every secret value this agent received (to check none leaked elsewhere).
    pub fn values_seen(&self) -> Vec<Vec<u8>> {
        self.shared.lock().unwrap().values_seen.clone()
    }

    /// Every scope-scan request this agent received, as received (it
    /// answers each with an empty result: it found nothing).
    pub fn scan_requests(&self) -> Vec<rekey_proto::v1::ScanRequest> {
        self.shared.lock().unwrap().scans.clone()
    }

    pub fn is_connected(&self) -> bool {
        self.shared.lock().unwrap().connected
    }

    /// Cuts the agent off (as if its host went away).
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            s.cancel();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.shared.lock().unwrap().connected = false;
    }

    /// (Re)connects; keeps reconnecting until stopped.
    pub fn start(&mut self) {
        self.stop();
        let stop = CancellationToken::new();
        self.stop = Some(stop.clone());
        let (addr, dir, secrets, shared) =
            (self.addr.clone(), self.state_dir.clone(), self.secrets.clone(), self.shared.clone());
        self.thread = Some(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                while !stop.is_cancelled() {
                    let _ = session(&addr, &dir, &secrets, &shared, &stop).await;
                    shared.lock().unwrap().connected = false;
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            });
        }));
    }
}

impl Drop for ScriptedAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

fn now_ms() -> i64 {
    rekey_common::time::now_unix_ms()
}

fn report(d: &Delivery, stage: Stage, fingerprint: &str, error: &str) -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Report(StageReport {
            rotation_id: d.rotation_id.clone(),
            secret: d.secret.clone(),
            version_id: d.version_id.clone(),
            stage: stage as i32,
            fingerprint: fingerprint.to_string(),
            error: error.to_string(),
            at_unix_ms: now_ms(),
        })),
    }
}

async fn session(
    addr: &str,
    dir: &Path,
    secrets: &[String],
    shared: &Arc<Mutex<Shared>>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    tls::install_crypto_provider();
    let pem = std::fs::read_to_string(dir.join("identity.pem"))?;
    let ca = tls::certs_from_pem(&std::fs::read_to_string(dir.join("ca.pem"))?, "ca")?;
    let cfg = tls::client_config(&ca, tls::certs_from_pem(&pem, "id")?, tls::key_from_pem(&pem, "id")?)?;
    let channel = tls::connect(addr, cfg).await?;
    let (tx, rx) = mpsc::channel(64);
    let applied: Vec<AppliedVersion> = shared
        .lock()
        .unwrap()
        .applied
        .iter()
        .map(|(s, (v, f))| AppliedVersion { secret: s.clone(), version_id: v.clone(), fingerprint: f.clone() })
        .collect();
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "scripted".into(),
            secrets: secrets.to_vec(),
            applied,
        })),
    })
    .await?;
    let mut inbound =
        AgentServiceClient::new(channel).session(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    shared.lock().unwrap().connected = true;
    let mut hb = tokio::time::interval(Duration::from_secs(2));
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = hb.tick() => { tx.send(AgentMessage { msg: Some(agent_message::Msg::Heartbeat(Heartbeat { seq: 1 })) }).await?; continue }
            m = inbound.message() => match m? { Some(m) => m, None => return Ok(()) },
        };
        match msg.msg {
            Some(coordinator_message::Msg::Delivery(d)) => {
                let fields: Vec<(&str, &[u8])> =
                    d.fields.iter().map(|f| (f.name.as_str(), f.value.as_slice())).collect();
                let fp = fingerprint_fields(&d.fingerprint_key, fields);
                let behavior = {
                    let mut s = shared.lock().unwrap();
                    s.deliveries.push((d.rotation_id.clone(), d.version_id.clone()));
                    s.values_seen.extend(d.fields.iter().map(|f| f.value.clone()));
                    s.values_seen.extend(d.previous_fields.iter().map(|f| f.value.clone()));
                    s.behavior.get(&d.secret).cloned().unwrap_or(Behavior::Succeed)
                };
                // Already on this version: answer healthy without re-applying.
                let already = shared.lock().unwrap().applied.get(&d.secret).is_some_and(|(v, _)| *v == d.version_id);
                if already {
                    tx.send(report(&d, Stage::Healthy, &fp, "")).await?;
                    continue;
                }
                tx.send(report(&d, Stage::Delivered, "", "")).await?;
                match behavior {
                    Behavior::Hang => {}
                    Behavior::Succeed => {
                        tx.send(report(&d, Stage::Applied, "", "")).await?;
                        {
                            let mut s = shared.lock().unwrap();
                            let prev = s.applied.get(&d.secret).cloned();
                            s.previous.insert(d.secret.clone(), prev);
                            s.applied.insert(d.secret.clone(), (d.version_id.clone(), fp.clone()));
                        }
                        tx.send(report(&d, Stage::Restarted, "", "")).await?;
                        tx.send(report(&d, Stage::Healthy, &fp, "")).await?;
                    }
                    Behavior::Fail(reason) => {
                        tx.send(report(&d, Stage::Applied, "", "")).await?;
                        tx.send(report(&d, Stage::Failed, "", &reason)).await?;
                        tx.send(report(&d, Stage::RolledBack, "", &reason)).await?;
                    }
                }
            }
            Some(coordinator_message::Msg::Rollback(r)) => {
                {
                    let mut s = shared.lock().unwrap();
                    s.rollbacks.push((r.rotation_id.clone(), r.version_id.clone()));
                    if s.applied.get(&r.secret).is_some_and(|(v, _)| *v == r.version_id) {
                        match s.previous.remove(&r.secret).flatten() {
                            Some(p) => s.applied.insert(r.secret.clone(), p),
                            None => s.applied.remove(&r.secret),
                        };
                    }
                }
                let d = Delivery {
                    rotation_id: r.rotation_id,
                    secret: r.secret,
                    version_id: r.version_id,
                    ..Default::default()
                };
                tx.send(report(&d, Stage::RolledBack, "", "")).await?;
            }
            Some(coordinator_message::Msg::Purge(p)) => {
                shared.lock().unwrap().purges.push((p.secret, p.version_id));
            }
            Some(coordinator_message::Msg::Scan(req)) => {
                let result = rekey_proto::v1::ScanResult { scan_id: req.scan_id.clone(), ..Default::default() };
                shared.lock().unwrap().scans.push(req);
                tx.send(AgentMessage { msg: Some(agent_message::Msg::ScanResult(result)) }).await?;
            }
            Some(coordinator_message::Msg::Preflight(p)) => {
                let checks = {
                    let mut s = shared.lock().unwrap();
                    s.preflights.push(p.clone());
                    s.preflight.get(&p.secret).cloned().unwrap_or_else(|| {
                        vec![PreflightCheck { subject: "scripted dry run".into(), ok: true, detail: "ok".into() }]
                    })
                };
                let r = PreflightResult { request_id: p.request_id, secret: p.secret, checks };
                tx.send(AgentMessage { msg: Some(agent_message::Msg::PreflightResult(r)) }).await?;
            }
            Some(coordinator_message::Msg::Revoked(_)) => return Ok(()),
            _ => {}
        }
    }
}
