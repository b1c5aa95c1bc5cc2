//! The simulated outside world: the provider's versions, the hosts' apply
//! steps, and the record of what happened (the trace a failing seed prints,
//! the invariants broken, the faults injected).
//!
//! One [`World`] per simulated run, shared by the provider (inside rekeyd's
//! engine), the agents' command runner, the operator and the harness. The
//! simulation runs on one thread, so a mutex is never contended; it is there
//! because the provider must be `Send + Sync`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rekey_coordinator::engine::machine::HostState;
use rekey_coordinator::engine::state::EngineState;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub type Shared = Arc<Mutex<World>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    Inactive,
    Deleted,
}

#[derive(Debug, Clone)]
pub struct Version {
    pub id: String,
    /// The rotation whose create made it; `None` for the initial version and drift.
    pub rotation: Option<String>,
    pub status: Status,
    pub value: String,
    /// Made or last changed outside rekey (drift): rekey is not blamed for it.
    pub drifted: bool,
}

/// What a provider call or an apply step does this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFault {
    None,
    /// Refused before acting (a transient error).
    Fail,
    /// Answers only after a long time (then acts and answers).
    Hang,
    /// Acts, then the answer is lost (the caller sees a transient error).
    LoseAnswer,
    /// Acts twice, as a duplicated request would (idempotent operations).
    Twice,
    /// Acts, then rekeyd crashes before the answer arrives.
    CrashAfter,
}

/// What an apply step (a restart or a health check) does this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyFault {
    None,
    Fail,
    Hang,
    /// The agent's host crashes in the middle of the step.
    Crash,
}

/// Counts of what was injected, by kind, for the summary.
pub type Counts = BTreeMap<&'static str, u64>;

pub struct World {
    rng: StdRng,
    timing: StdRng,
    pub versions: BTreeMap<String, Version>,
    next_version: u64,
    /// Provider and apply faults are drawn only while this is set.
    pub faults_on: bool,
    /// Probability of a fault per provider call / per apply step.
    pub provider_fault_rate: f64,
    pub apply_fault_rate: f64,
    /// Host name → the file its agent writes the secret to.
    pub host_files: BTreeMap<String, PathBuf>,
    /// Hosts an operator asked to exclude, or whose agent was revoked: the
    /// host-side invariants no longer speak for them.
    pub excused: BTreeSet<String>,
    /// Agent → simulated time (ms since the epoch) its revocation committed.
    pub revoked_at: BTreeMap<String, i64>,
    /// Host → the versions it has applied or rolled back to (restart steps).
    pub applied: BTreeMap<String, BTreeSet<String>>,
    /// Join tokens the operator created, by host.
    pub tokens: BTreeMap<String, String>,
    pub ca_fingerprint: String,
    /// Hosts whose software asked to be crashed (an apply step, a provider call).
    pub crash_requests: Vec<String>,
    /// What happened, in order, with the simulated time.
    pub trace: Vec<String>,
    pub violations: Vec<String>,
    pub injected: Counts,
    /// The simulated time now (ms since the epoch), kept by the harness.
    pub now_ms: i64,
    /// Simulated time since the run began, for the trace.
    pub elapsed: std::time::Duration,
    /// The provider keeps its create journal (off: what rekey did before it,
    /// to show the simulation catches the bug the journal fixes).
    pub journal: bool,
    /// The next create acts, then rekeyd crashes before the answer.
    pub crash_next_create: bool,
    /// The host whose next rollback restart crashes it (a forced fault).
    pub crash_rollback_of: Option<String>,
    /// The host whose next restart hangs (a forced fault).
    pub hang_apply_of: Option<String>,
    /// The store as rekeyd committed it (for invariants on its records).
    pub reader: Option<EngineState>,
}

impl World {
    pub fn new(seed: u64) -> World {
        let mut w = World {
            rng: StdRng::seed_from_u64(seed ^ 0x5eed_5eed),
            timing: StdRng::seed_from_u64(seed ^ 0x7171_7171),
            versions: BTreeMap::new(),
            next_version: 0,
            faults_on: true,
            provider_fault_rate: 0.15,
            apply_fault_rate: 0.08,
            host_files: BTreeMap::new(),
            excused: BTreeSet::new(),
            revoked_at: BTreeMap::new(),
            applied: BTreeMap::new(),
            tokens: BTreeMap::new(),
            ca_fingerprint: String::new(),
            crash_requests: Vec::new(),
            trace: Vec::new(),
            violations: Vec::new(),
            injected: Counts::new(),
            now_ms: 0,
            elapsed: std::time::Duration::ZERO,
            journal: true,
            crash_next_create: false,
            reader: None,
            crash_rollback_of: None,
            hang_apply_of: None,
        };
        // The version in use before rekey's first rotation.
        w.add_version(None, false);
        w
    }

    pub fn shared(seed: u64) -> Shared {
        Arc::new(Mutex::new(World::new(seed)))
    }

    pub fn note(&mut self, what: impl Into<String>) {
        let line = format!("{:>8.3}s {}", self.elapsed.as_secs_f64(), what.into());
        self.trace.push(line);
    }

    pub fn count(&mut self, kind: &'static str) {
        *self.injected.entry(kind).or_default() += 1;
    }

    pub fn violation(&mut self, what: impl Into<String>) {
        let what = what.into();
        if self.violations.contains(&what) {
            return;
        }
        self.note(format!("INVARIANT BROKEN: {what}"));
        self.violations.push(what);
    }

    pub fn add_version(&mut self, rotation: Option<String>, drifted: bool) -> Version {
        let id = format!("v{}", self.next_version);
        self.next_version += 1;
        let value = format!("val-{id}-{:08x}", self.rng.random::<u32>());
        let v = Version { id: id.clone(), rotation, status: Status::Active, value, drifted };
        self.versions.insert(id, v.clone());
        v
    }

    /// The version whose value `content` (a host's file) holds.
    pub fn version_of_value(content: &str) -> Option<String> {
        let rest = content.split("val-").nth(1)?;
        Some(rest.split('-').next()?.to_string())
    }

    /// Timing jitter (backoff, restarts) in `0..=max_ms`, from its own
    /// stream so that timings do not shift the fault draws.
    pub fn jitter(&mut self, max_ms: u64) -> u64 {
        self.timing.random_range(0..=max_ms)
    }

    pub fn draw_call_fault(&mut self, idempotent: bool) -> CallFault {
        if !self.faults_on || !self.rng.random_bool(self.provider_fault_rate) {
            return CallFault::None;
        }
        let f = match self.rng.random_range(0..5) {
            0 => CallFault::Fail,
            1 => CallFault::Hang,
            2 => CallFault::LoseAnswer,
            3 if idempotent => CallFault::Twice,
            3 => CallFault::Fail,
            _ => CallFault::CrashAfter,
        };
        self.count(match f {
            CallFault::Fail => "provider: fail",
            CallFault::Hang => "provider: hang",
            CallFault::LoseAnswer => "provider: answer lost after acting",
            CallFault::Twice => "provider: acted twice",
            CallFault::CrashAfter => "provider: rekeyd crashed mid-call",
            CallFault::None => unreachable!(),
        });
        f
    }

    pub fn draw_apply_fault(&mut self) -> ApplyFault {
        if !self.faults_on || !self.rng.random_bool(self.apply_fault_rate) {
            return ApplyFault::None;
        }
        let f = match self.rng.random_range(0..3) {
            0 => ApplyFault::Fail,
            1 => ApplyFault::Hang,
            _ => ApplyFault::Crash,
        };
        self.count(match f {
            ApplyFault::Fail => "apply: fail",
            ApplyFault::Hang => "apply: hang",
            ApplyFault::Crash => "apply: agent crashed mid-apply",
            ApplyFault::None => unreachable!(),
        });
        f
    }

    /// Provider drift: a change rekey did not make.
    pub fn drift(&mut self) {
        let live: Vec<String> =
            self.versions.values().filter(|v| v.status != Status::Deleted).map(|v| v.id.clone()).collect();
        match self.rng.random_range(0..3) {
            0 => {
                let v = self.add_version(None, true);
                self.count("drift: version created outside rekey");
                self.note(format!("drift: {} created outside rekey", v.id));
            }
            n if !live.is_empty() => {
                let id = live[self.rng.random_range(0..live.len())].clone();
                let v = self.versions.get_mut(&id).expect("listed");
                v.drifted = true;
                v.status = if n == 1 { Status::Inactive } else { Status::Deleted };
                let what = if n == 1 { "deactivated" } else { "deleted" };
                self.count(if n == 1 {
                    "drift: version deactivated outside rekey"
                } else {
                    "drift: version deleted outside rekey"
                });
                self.note(format!("drift: {id} {what} outside rekey"));
            }
            _ => {}
        }
    }

    /// The version each host's file holds now (`None`: no file yet, the
    /// host still runs on what it had before rekey: the initial version).
    pub fn host_versions(&self) -> BTreeMap<String, Option<String>> {
        self.host_files
            .iter()
            .map(|(h, f)| (h.clone(), std::fs::read_to_string(f).ok().and_then(|c| World::version_of_value(&c))))
            .collect()
    }

    /// Invariant: every host rekey still speaks for runs on a version that is
    /// valid at the provider, unless the outside world (drift) broke it.
    pub fn check_hosts(&mut self, when: &str) {
        for (host, v) in self.host_versions() {
            if self.excused.contains(&host) {
                continue;
            }
            let id = v.unwrap_or_else(|| "v0".to_string());
            let Some(ver) = self.versions.get(&id) else {
                self.violation(format!("{when}: host {host} holds {id}, which the provider never had"));
                continue;
            };
            if ver.status != Status::Active && !ver.drifted {
                let status = ver.status;
                self.violation(format!("{when}: host {host} runs on {id}, which rekey made {status:?}"));
            }
        }
    }

    /// Invariant 1, on rekey's own records: when rekey deactivates or
    /// deletes a rotation's old version, every target host of that rotation
    /// has confirmed the new one or was excluded.
    pub fn check_old_revocation(&mut self, version: &str, what: &str) {
        let Some(rotations) = self.reader.as_ref().and_then(|r| r.list_rotations().ok()) else { return };
        for r in rotations.iter().filter(|r| r.old_version.as_deref() == Some(version) && !r.state.is_terminal()) {
            let unconfirmed: Vec<String> = r
                .hosts
                .iter()
                .filter(|(_, h)| {
                    h.state != HostState::Healthy && h.state != HostState::Excluded && h.exclusion.is_none()
                })
                .map(|(n, h)| format!("{n} ({:?})", h.state))
                .collect();
            if !unconfirmed.is_empty() {
                self.violation(format!("{what} {version}: old version of {} while {unconfirmed:?} unconfirmed", r.id));
            }
        }
    }

    /// Invariant: at most one new version of a rotation exists at a time.
    pub fn check_versions(&mut self) {
        let mut live: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for v in self.versions.values() {
            if let (Some(r), false) = (&v.rotation, v.status == Status::Deleted) {
                live.entry(r).or_default().push(&v.id);
            }
        }
        let broken: Vec<String> = live
            .into_iter()
            .filter(|(_, vs)| vs.len() > 1)
            .map(|(r, vs)| format!("rotation {r} has {} new versions at the provider: {vs:?}", vs.len()))
            .collect();
        for b in broken {
            if !self.violations.contains(&b) {
                self.violation(b);
            }
        }
    }
}
