//! The one place where the engine's types become the admin API's views
//! (`rekey_types::v1`). The admin service serializes exactly these views;
//! nothing else decides what a read model looks like on the wire.
//!
//! Not exposed: the rotation's fingerprint key. With it and a fingerprint,
//! anyone could test guesses of the secret offline; only the coordinator and
//! the secret's consumers may hold it.

use crate::alerts::{Alert, AlertKind, Severity};
use crate::audit::{AuditRecord, Verification};
use crate::engine::campaign::Incident;
use crate::engine::catalog::SecretSpec;
use crate::engine::driver::waiting_on;
use crate::engine::machine::{self, Rotation};
use crate::engine::plan;
use crate::engine::state::SecretRecord;
use crate::scope;
use crate::store::{OperatorRecord, OperatorRole};
use rekey_providers::{VersionInfo, VersionStatus};
use rekey_types::v1 as view;

impl From<machine::RotationState> for view::RotationState {
    fn from(s: machine::RotationState) -> Self {
        use machine::RotationState as S;
        match s {
            S::Planned => Self::Planned,
            S::Generating => Self::Generating,
            S::RollingOut => Self::RollingOut,
            S::Halted => Self::Halted,
            S::Verified => Self::Verified,
            S::Deactivating => Self::Deactivating,
            S::Grace => Self::Grace,
            S::Deleting => Self::Deleting,
            S::Monitoring => Self::Monitoring,
            S::Completed => Self::Completed,
            S::Aborting => Self::Aborting,
            S::Aborted => Self::Aborted,
            // v1 has no `abandoned` value: `aborted` with an `abandon` decision.
            S::Abandoned => Self::Aborted,
        }
    }
}

impl From<machine::HostState> for view::HostState {
    fn from(s: machine::HostState) -> Self {
        use machine::HostState as S;
        match s {
            S::Pending => Self::Pending,
            S::Delivered => Self::Delivered,
            S::Applied => Self::Applied,
            S::Restarted => Self::Restarted,
            S::Healthy => Self::Healthy,
            S::Failed => Self::Failed,
            S::RolledBack => Self::RolledBack,
            S::Unreachable => Self::Unreachable,
            S::Excluded => Self::Excluded,
        }
    }
}

impl From<plan::Amount> for view::Amount {
    fn from(a: plan::Amount) -> Self {
        match a {
            plan::Amount::Count(n) => Self::Count(n),
            plan::Amount::Percent(p) => Self::Percent(p),
        }
    }
}

impl From<machine::Usage> for view::Usage {
    fn from(u: machine::Usage) -> Self {
        match u {
            machine::Usage::Unknown => Self::Unknown,
            machine::Usage::Never => Self::Never,
            machine::Usage::At(t) => Self::At(t),
            // v1 has no `gone` value: nothing can use it any more (the verdict says why).
            machine::Usage::Gone => Self::Never,
        }
    }
}

impl From<&machine::Policy> for view::PolicyView {
    fn from(p: &machine::Policy) -> Self {
        view::PolicyView {
            canary: p.canary,
            waves: p.waves.iter().copied().map(Into::into).collect(),
            selector_waves: p
                .selector_waves
                .iter()
                .map(|w| view::SelectorWaveView { selector: w.selector.clone(), pause_after: w.pause_after })
                .collect(),
            failure_budget: p.failure_budget.into(),
            host_deadline_ms: p.host_deadline_ms,
            jitter_ms: p.jitter_ms,
            deactivate: p.deactivate,
            grace_ms: p.grace_ms,
            delete: p.delete,
            monitor_ms: p.monitor_ms,
            require_evidence: p.require_evidence,
            usage_granularity_ms: p.usage_granularity_ms,
            grace_use: match p.grace_use {
                machine::GraceUse::Reactivate => view::GraceUse::Reactivate,
                machine::GraceUse::Proceed => view::GraceUse::Proceed,
            },
            check_every_ms: p.check_every_ms,
            use_after_switch: match p.use_after_switch {
                machine::UseAfterSwitch::Hold => view::UseAfterSwitch::Hold,
                machine::UseAfterSwitch::Revoke => view::UseAfterSwitch::Revoke,
            },
        }
    }
}

impl From<&machine::HostStatus> for view::HostView {
    fn from(h: &machine::HostStatus) -> Self {
        view::HostView {
            state: h.state.into(),
            wave: h.wave,
            delivered_ms: h.delivered_ms,
            updated_ms: h.updated_ms,
            fingerprint: h.fingerprint.clone(),
            error: h.error.clone(),
            exclusion: h.exclusion.as_ref().map(|e| view::ExclusionView {
                by: e.by.clone(),
                reason: e.reason.clone(),
                at_ms: e.at_ms,
            }),
            rollback_pending: h.rollback_pending,
            redeliver_at_ms: h.redeliver_at_ms,
            history: h.history.iter().map(|(s, t)| ((*s).into(), *t)).collect(),
            reported_ms: h.last_report.map(|r| r.host_ms),
            received_ms: h.last_report.map(|r| r.received_ms),
        }
    }
}

impl From<&machine::EvidenceEntry> for view::EvidenceView {
    fn from(e: &machine::EvidenceEntry) -> Self {
        view::EvidenceView {
            at_ms: e.at_ms,
            phase: e.phase.into(),
            usage: e.usage.map(Into::into),
            error: e.error.clone(),
            source: e.source.clone(),
            verdict: e.verdict.clone(),
        }
    }
}

/// A rotation with every host's state and what it waits on.
impl From<&Rotation> for view::RotationView {
    fn from(r: &Rotation) -> Self {
        view::RotationView {
            id: r.id.clone(),
            secret: r.secret.clone(),
            state: r.state.into(),
            paused: r.paused,
            started_by: r.started_by.clone(),
            created_ms: r.created_ms,
            updated_ms: r.updated_ms,
            policy: (&r.policy).into(),
            old_version: r.old_version.clone(),
            new_version: r.new_version.clone(),
            expected_fingerprint: r.expected_fingerprint.clone(),
            waves: r.waves.clone(),
            pause_after: r.pause_after.clone(),
            current_wave: r.current_wave,
            hosts: r.hosts.iter().map(|(n, h)| (n.clone(), h.into())).collect(),
            halt_reason: r.halt_reason.clone(),
            halted_from: r.halted_from.map(Into::into),
            phase_until_ms: r.phase_until_ms,
            delete_new_issued: r.delete_new_issued,
            timeline: r
                .timeline
                .iter()
                .map(|t| view::TimelineEntryView { at_ms: t.at_ms, state: t.state.into(), note: t.note.clone() })
                .collect(),
            evidence: r.evidence.iter().map(Into::into).collect(),
            evidence_ok: r.evidence_ok,
            usage_check_pending: r.usage_check_pending,
            next_check_ms: r.next_check_ms,
            deactivated_ms: r.deactivated_ms,
            reactivating: r.reactivating,
            alerted_use_ms: r.alerted_use_ms,
            waiting_on: waiting_on(r),
            blocking_hosts: r.blocking_hosts().into_iter().map(|(h, s)| (h, s.into())).collect(),
            failure_budget_hosts: r.failure_budget(),
            evidence_since_ms: r.evidence_since_ms,
            old_revoked_ms: r.old_revoked_ms,
            decisions: r.decisions.iter().map(Into::into).collect(),
            exits: machine::exits(r).into_iter().map(Into::into).collect(),
        }
    }
}

impl From<&machine::Decision> for view::DecisionView {
    fn from(d: &machine::Decision) -> Self {
        view::DecisionView {
            kind: match d.kind {
                machine::DecisionKind::Revoke => view::DecisionKind::Revoke,
                machine::DecisionKind::Finish => view::DecisionKind::Finish,
                machine::DecisionKind::Abandon => view::DecisionKind::Abandon,
            },
            by: d.by.clone(),
            reason: d.reason.clone(),
            at_ms: d.at_ms,
            from: d.from.into(),
            hosts_on_new: d.hosts_on_new,
        }
    }
}

impl From<machine::Exit> for view::ExitView {
    fn from(e: machine::Exit) -> Self {
        view::ExitView { verb: e.verb.to_string(), command: e.command, what: e.what.to_string() }
    }
}

fn healthy(r: &Rotation) -> usize {
    r.hosts.values().filter(|h| h.state == machine::HostState::Healthy).count()
}

/// A row of the rotation list.
impl From<&Rotation> for view::RotationSummary {
    fn from(r: &Rotation) -> Self {
        view::RotationSummary {
            id: r.id.clone(),
            secret: r.secret.clone(),
            state: r.state.into(),
            paused: r.paused,
            started_by: r.started_by.clone(),
            created_ms: r.created_ms,
            updated_ms: r.updated_ms,
            hosts: r.hosts.len(),
            healthy: healthy(r),
            wave: r.current_wave,
            waves: r.waves.len(),
            waiting_on: waiting_on(r),
        }
    }
}

/// A catalog entry with its record, its last rotation and its consumers.
pub(crate) fn secret(
    spec: &SecretSpec,
    rec: &SecretRecord,
    last: Option<&Rotation>,
    consumers: Vec<String>,
) -> view::SecretView {
    // No completed rotation recorded a version yet: the one the last rotation
    // took from the provider as its old version is still what the hosts run
    // (until a rotation completes, the record is what changes).
    let adopted = last.and_then(|r| r.old_version.clone());
    view::SecretView {
        name: spec.name.clone(),
        description: spec.description.clone(),
        provider: spec.provider.kind().to_string(),
        selector: spec.selector.clone(),
        current_version: rec.current_version.clone().or(adopted.clone()),
        current_version_adopted: rec.current_version.is_none() && adopted.is_some(),
        active_rotation: rec.active_rotation.clone(),
        last_rotation: last.map(|r| view::LastRotationView {
            id: r.id.clone(),
            state: r.state.into(),
            started_ms: r.created_ms,
            updated_ms: r.updated_ms,
        }),
        consumers,
    }
}

/// Reading several records to build a list of views failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error(transparent)]
    State(#[from] crate::engine::state::StateError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Every catalog entry as `rekey secrets` and the console show it: its
/// record, its last rotation and its consumers.
pub(crate) fn secrets(
    config: &crate::config::Config,
    state: &crate::engine::state::EngineState,
    store: &crate::store::Store,
) -> Result<Vec<view::SecretView>, ReadError> {
    let mut out = Vec::with_capacity(config.secrets.len());
    for spec in &config.secrets {
        let rec = state.get_secret(&spec.name)?;
        let consumers = crate::engine::driver::consumers(store, spec)?;
        let last = match &rec.last_rotation {
            Some(id) => state.get_rotation(id)?,
            None => None,
        };
        out.push(secret(spec, &rec, last.as_ref(), consumers));
    }
    Ok(out)
}

/// An enrolled agent as `rekey agents -o json` and the console show it;
/// `connected` is whether its session is open now.
pub(crate) fn agent(a: &crate::store::AgentRecord, connected: bool, now_unix: i64) -> view::AgentView {
    use rekey_common::time::format_unix;
    view::AgentView {
        name: a.name.clone(),
        labels: a.labels.clone(),
        connected,
        revoked: a.revoked_unix.is_some(),
        last_seen: format_unix(if connected { now_unix } else { a.last_seen_unix }),
        agent_version: a.agent_version.clone(),
        cert_serial: a.cert_serial.clone(),
        cert_expires: format_unix(a.cert_not_after_unix),
        enrolled: format_unix(a.enrolled_unix),
        secrets: a.secrets.clone(),
    }
}

/// `ListAgents`' answer: the agents matching every filter, by name, at most
/// `limit` of them (0: all), and how many matched. Filtered and cut here, so
/// a 10,000-host registry never crosses the wire when a page is asked for.
pub(crate) fn agents_page(
    records: Vec<crate::store::AgentRecord>,
    connected: impl Fn(&str) -> bool,
    filters: &[view::AgentFilter],
    limit: usize,
    now_unix: i64,
) -> (Vec<rekey_proto::v1::AgentInfo>, u32) {
    let mut matching: Vec<(crate::store::AgentRecord, bool)> = records
        .into_iter()
        .map(|a| {
            let connected = connected(&a.name);
            (a, connected)
        })
        .filter(|(a, connected)| {
            filters.iter().all(|f| f.matches(&a.name, &a.labels, *connected, a.revoked_unix.is_some()))
        })
        .collect();
    matching.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let total = u32::try_from(matching.len()).unwrap_or(u32::MAX);
    if limit > 0 {
        matching.truncate(limit);
    }
    let agents = matching
        .into_iter()
        .map(|(a, connected)| rekey_proto::v1::AgentInfo {
            connected,
            last_seen_unix: if connected { now_unix } else { a.last_seen_unix },
            revoked: a.revoked_unix.is_some(),
            name: a.name,
            labels: a.labels.into_iter().collect(),
            agent_version: a.agent_version,
            cert_not_after_unix: a.cert_not_after_unix,
            secrets: a.secrets,
            enrolled_unix: a.enrolled_unix,
            cert_serial: a.cert_serial,
        })
        .collect();
    (agents, total)
}

/// A provider's version, marked if it is the catalog's current one.
impl From<OperatorRole> for view::OperatorRole {
    fn from(r: OperatorRole) -> Self {
        match r {
            OperatorRole::Admin => Self::Admin,
            OperatorRole::Rotator => Self::Rotator,
            OperatorRole::Viewer => Self::Viewer,
        }
    }
}

impl From<&OperatorRecord> for view::OperatorView {
    fn from(r: &OperatorRecord) -> Self {
        view::OperatorView {
            name: r.name.clone(),
            role: r.role.into(),
            serials: r.serials.clone(),
            created_unix: r.created_unix,
            created_by: r.created_by.clone(),
            revoked: r.revoked_unix.is_some(),
            revoked_unix: r.revoked_unix,
            revoked_by: r.revoked_by.clone(),
        }
    }
}

pub(crate) fn version(v: &VersionInfo, current: Option<&str>) -> view::VersionView {
    view::VersionView {
        id: v.id.clone(),
        status: match v.status {
            VersionStatus::Active => view::VersionStatus::Active,
            VersionStatus::Inactive => view::VersionStatus::Inactive,
        },
        created_unix: v.created_unix,
        current: current == Some(v.id.as_str()),
    }
}

/// What only an operator can settle about one secret of an incident, if anything.
fn needs_operator(name: &str, p: &crate::engine::incident::SecretProgress, rot: Option<&Rotation>) -> Option<String> {
    match (rot, &p.error) {
        (None, Some(error)) => Some(format!(
            "{name}: not started: {error}; fix that and rotate it by hand (`rekey rotate start {name}`), or close the incident"
        )),
        (Some(r), _) if r.state == machine::RotationState::Halted => Some(format!(
            "{name}: rotation {} halted: {}",
            r.id,
            r.halt_reason.as_deref().unwrap_or("see `rekey rotate status`")
        )),
        (Some(r), _) if r.paused && r.state == machine::RotationState::RollingOut => {
            Some(format!("{name}: rotation {} {}", r.id, waiting_on(r).unwrap_or_default()))
        }
        _ => None,
    }
}

/// An incident with the live state of each of its rotations; `rotation`
/// looks a rotation up by id. It is `done` only once every secret's rotation
/// ended: a secret that could not start keeps it open and is listed in
/// `needs_operator`.
pub(crate) fn incident<E>(
    inc: &Incident,
    mut rotation: impl FnMut(&str) -> Result<Option<Rotation>, E>,
) -> Result<view::IncidentView, E> {
    let mut secrets = std::collections::BTreeMap::new();
    let mut summary: std::collections::BTreeMap<String, usize> = Default::default();
    let mut needs = Vec::new();
    let order = inc.start_order();
    for name in &order {
        let p = &inc.secrets[name];
        let rot = match &p.rotation {
            Some(id) => rotation(id)?,
            None => None,
        };
        let state = match (&rot, &p.error) {
            (Some(r), _) => view::IncidentSecretState::Rotation(r.state.into()),
            (None, Some(_)) => view::IncidentSecretState::Campaign(view::CampaignState::NotStarted),
            (None, None) => view::IncidentSecretState::Campaign(view::CampaignState::Waiting),
        };
        *summary.entry(state.as_str().to_string()).or_default() += 1;
        needs.extend(needs_operator(name, p, rot.as_ref()).filter(|_| inc.is_open()));
        secrets.insert(
            name.clone(),
            view::IncidentSecretView {
                rotation: p.rotation.clone(),
                error: p.error.clone(),
                state,
                hosts: rot.as_ref().map(|r| r.hosts.len()),
                healthy: rot.as_ref().map(healthy),
                waiting_on: rot.as_ref().and_then(waiting_on),
            },
        );
    }
    let done = |s: &str| matches!(s, "completed" | "monitoring" | "aborted");
    let state = if !inc.is_open() {
        view::IncidentState::Closed
    } else if summary.keys().all(|k| done(k)) {
        view::IncidentState::Done
    } else {
        view::IncidentState::Running
    };
    Ok(view::IncidentView {
        id: inc.id.clone(),
        name: inc.name.clone(),
        pattern: inc.pattern.clone(),
        concurrency: inc.concurrency,
        opened_by: inc.opened_by.clone(),
        opened_ms: inc.opened_ms,
        closed_by: inc.closed_by.clone(),
        closed_ms: inc.closed_ms,
        secrets,
        summary,
        state,
        order,
        needs_operator: needs,
    })
}

impl From<&Alert> for view::AlertView {
    fn from(a: &Alert) -> Self {
        view::AlertView {
            seq: a.seq,
            at_ms: a.at_ms,
            kind: match a.kind {
                AlertKind::OldVersionUsed => view::AlertKind::OldVersionUsed,
                AlertKind::OldVersionUsedDuringGrace => view::AlertKind::OldVersionUsedDuringGrace,
                AlertKind::OldVersionUsedAfterRevocation => view::AlertKind::OldVersionUsedAfterRevocation,
                AlertKind::LeftoverFound => view::AlertKind::LeftoverFound,
            },
            severity: match a.severity {
                Severity::Warning => view::Severity::Warning,
                Severity::Critical => view::Severity::Critical,
            },
            secret: a.secret.clone(),
            rotation: a.rotation.clone(),
            message: a.message.clone(),
            details: a.details.clone(),
            delivery: a.delivery.clone(),
        }
    }
}

impl From<&AuditRecord> for view::AuditRecordView {
    fn from(r: &AuditRecord) -> Self {
        view::AuditRecordView {
            seq: r.seq,
            at_ms: r.at_ms,
            actor: r.actor.clone(),
            action: r.action.clone(),
            details: r.details.clone(),
            prev_hash: r.prev_hash.clone(),
            hash: r.hash.clone(),
        }
    }
}

impl From<&Verification> for view::AuditVerifyView {
    fn from(v: &Verification) -> Self {
        view::AuditVerifyView {
            ok: v.first_broken.is_none(),
            records: v.records,
            head: v.head.clone(),
            first_broken: v
                .first_broken
                .as_ref()
                .map(|(seq, why)| view::BrokenLink { seq: *seq, problem: why.clone() }),
        }
    }
}

impl From<scope::Role> for view::VersionRole {
    fn from(r: scope::Role) -> Self {
        match r {
            scope::Role::Current => Self::Current,
            scope::Role::New => Self::New,
            scope::Role::Old => Self::Old,
        }
    }
}

impl From<&scope::Occurrence> for view::OccurrenceView {
    fn from(o: &scope::Occurrence) -> Self {
        view::OccurrenceView {
            host: o.host.clone(),
            path: o.path.clone(),
            line: o.line,
            version: o.version.clone(),
            role: o.role.into(),
            field: o.field.clone(),
            declared: o.declared,
            partial: o.partial,
        }
    }
}

impl From<&scope::HostScope> for view::ScopeHostView {
    fn from(h: &scope::HostScope) -> Self {
        view::ScopeHostView {
            host: h.host.clone(),
            labels: h.labels.clone(),
            connected: h.connected,
            status: match h.status {
                scope::HostStatus::Answered => view::ScanStatus::Answered,
                scope::HostStatus::Error => view::ScanStatus::Error,
                scope::HostStatus::NotAnswering => view::ScanStatus::NotAnswering,
            },
            error: h.error.clone(),
            declares_secret: h.declares_secret,
            selected: h.selected,
            declared_not_found: h.declared_not_found,
            files: h.files.iter().map(file).collect(),
            files_scanned: h.files_scanned,
            bytes_scanned: h.bytes_scanned,
            skipped: h.skipped.clone(),
            skipped_files: h
                .skipped_files
                .iter()
                .map(|s| view::SkippedFileView {
                    path: s.path.clone(),
                    reason: s.reason.clone(),
                    detail: s.detail.clone(),
                })
                .collect(),
            truncated: h.truncated,
            limit: h.limit.clone(),
            elapsed_ms: h.elapsed_ms,
        }
    }
}

fn file(f: &scope::FileScope) -> view::ScopeFileView {
    view::ScopeFileView {
        path: f.path.clone(),
        declared: f.declared,
        versions: f
            .versions
            .iter()
            .map(|v| view::ScopeFileVersion { version: v.version.clone(), role: v.role.into() })
            .collect(),
        lines: f
            .lines
            .iter()
            .map(|l| view::ScopeFileLine {
                line: l.line,
                version: l.version.clone(),
                role: l.role.into(),
                field: l.field.clone(),
            })
            .collect(),
    }
}

/// The consumer map of a scope scan.
impl From<&scope::ConsumerMap> for view::ScopeView {
    fn from(m: &scope::ConsumerMap) -> Self {
        let s = &m.summary;
        view::ScopeView {
            scan_id: m.scan_id.clone(),
            secret: m.secret.clone(),
            filter: m.filter.clone(),
            rotation: m.rotation.clone(),
            leftover_scan: m.leftover_scan,
            started_ms: m.started_ms,
            elapsed_ms: m.elapsed_ms,
            timeout_seconds: m.timeout_seconds,
            searched: m
                .searched
                .iter()
                .map(|x| view::SearchedView {
                    version: x.version.clone(),
                    role: x.role.into(),
                    field: x.field.clone(),
                    partial: x.partial,
                    weak: x.weak.clone(),
                })
                .collect(),
            not_searched: m
                .not_searched
                .iter()
                .map(|x| view::NotSearchedView {
                    version: x.version.clone(),
                    role: x.role.into(),
                    field: x.field.clone(),
                    reason: x.reason.clone(),
                })
                .collect(),
            hosts: m.hosts.iter().map(Into::into).collect(),
            undeclared: m.undeclared.iter().map(Into::into).collect(),
            leftovers: m.leftovers.iter().map(Into::into).collect(),
            summary: view::ScopeSummary {
                hosts_asked: s.hosts_asked,
                answered: s.answered,
                not_answering: s.not_answering.clone(),
                errors: s.errors.clone(),
                hosts_with_value: s.hosts_with_value.clone(),
                occurrences: s.occurrences,
                undeclared: s.undeclared,
                leftovers: s.leftovers,
                declared_not_found: s.declared_not_found.clone(),
                truncated: s.truncated.clone(),
            },
        }
    }
}

/// A rotation's preflight (`rekey rotate plan`): hosts by wave with their
/// checks, the provider's findings, and every problem.
pub(crate) fn plan(p: &crate::preflight::Plan) -> view::PlanView {
    use crate::preflight::{HostCheck, ProviderCheck};
    let host = |name: &String| {
        let (status, checks) = match p.hosts.get(name) {
            Some(HostCheck::Answered(c)) if c.iter().all(|c| c.ok) => (view::PlanHostStatus::Ready, c.as_slice()),
            Some(HostCheck::Answered(c)) => (view::PlanHostStatus::Failed, c.as_slice()),
            Some(HostCheck::NotConnected(_)) => (view::PlanHostStatus::NotConnected, &[][..]),
            Some(HostCheck::NoAnswer) | None => (view::PlanHostStatus::NoAnswer, &[][..]),
        };
        let checks = checks
            .iter()
            .map(|c| view::PlanCheckView { subject: c.subject.clone(), ok: c.ok, detail: c.detail.clone() })
            .collect();
        view::PlanHostView { name: name.clone(), status, checks }
    };
    let waves = p
        .waves
        .iter()
        .enumerate()
        .map(|(index, w)| view::PlanWaveView {
            index,
            canary: index == 0 && p.canary,
            hosts: w.iter().map(host).collect(),
        })
        .collect();
    let mut provider = match &p.provider {
        ProviderCheck::Listed { versions, reconciliation } => {
            let mut sorted = versions.clone();
            sorted.sort_by(|a, b| a.created_unix.cmp(&b.created_unix).then(a.id.cmp(&b.id)));
            view::PlanProviderView {
                kind: p.provider_kind.clone(),
                listed: true,
                error: None,
                versions: sorted.iter().map(|v| version(v, p.recorded.as_deref())).collect(),
                drift: reconciliation.unknown_active.clone(),
                findings: reconciliation.findings(),
            }
        }
        ProviderCheck::NotListable | ProviderCheck::Failed(_) => view::PlanProviderView {
            kind: p.provider_kind.clone(),
            listed: false,
            error: Some(match &p.provider {
                ProviderCheck::Failed(e) => e.clone(),
                _ => "its config has no list request: nothing to reconcile with".into(),
            }),
            versions: vec![],
            drift: vec![],
            findings: vec![],
        },
    };
    provider.findings.extend(p.warnings.iter().cloned());
    if p.fields.is_empty() {
        provider.findings.push(
            "field names unknown: the provider cannot tell them before a create and rekey holds no current version, \
             so the dry run rendered without fields (a template naming one fails there, not necessarily at run time)"
                .into(),
        );
    }
    let problems: Vec<view::PlanProblemView> = p
        .problems()
        .into_iter()
        .map(|x| view::PlanProblemView { host: x.host, subject: x.subject, detail: x.detail })
        .collect();
    view::PlanView {
        secret: p.secret.clone(),
        recorded_version: p.recorded.clone(),
        old_version: p.old_version.clone(),
        fields: p.fields.clone(),
        provider,
        waves,
        ok: problems.is_empty(),
        problems,
        wait_seconds: p.wait.as_secs(),
        elapsed_ms: p.elapsed_ms,
    }
}

#[cfg(test)]
mod tests {
    //! The views keep the JSON the admin API answered before they existed:
    //! each test builds the document the old untyped code built and compares.

    use super::*;
    use crate::engine::campaign::SecretProgress;
    use crate::engine::machine::{Event, Exclusion, Stage};
    use serde_json::{Value, json};

    fn rotation() -> Rotation {
        let policy = machine::Policy {
            waves: vec![plan::Amount::Percent(50), plan::Amount::Percent(100)],
            failure_budget: plan::Amount::Percent(40),
            ..machine::Policy::default()
        };
        let waves = vec![vec!["h1".into()], vec!["h2".into(), "h3".into()], vec!["h4".into()]];
        let mut r = Rotation::new(
            "rot-1".into(),
            "api-key".into(),
            "operator/admin".into(),
            policy,
            Some("v1".into()),
            waves,
            "00ff".into(),
            10,
        );
        let report = |host: &str, stage, fingerprint: &str, error: &str| Event::Report {
            host: host.into(),
            version: "v2".into(),
            stage,
            fingerprint: fingerprint.into(),
            error: error.into(),
            at_ms: 0,
        };
        let events = vec![
            Event::Begin,
            Event::Generated { version: "v2".into(), fingerprint: "hmac-sha256:new".into() },
            report("h1", Stage::Delivered, "", ""),
            report("h1", Stage::Healthy, "hmac-sha256:new", ""),
            report("h2", Stage::Delivered, "", ""),
            report("h2", Stage::Failed, "", "health check returned 503"),
            report("h2", Stage::RolledBack, "", ""),
            Event::Exclude { host: "h3".into(), by: "operator/admin".into(), reason: "decommissioned".into() },
        ];
        for (i, e) in events.into_iter().enumerate() {
            let _ = machine::handle(&mut r, e, 20 + i as i64);
        }
        // Fields no short event sequence reaches, so that every one is compared.
        r.evidence.push(machine::EvidenceEntry {
            at_ms: 40,
            phase: machine::RotationState::RollingOut,
            usage: Some(machine::Usage::At(5)),
            error: None,
            source: Some("iam in us-east-1".into()),
            verdict: "used before the switch".into(),
        });
        r.decisions.push(machine::Decision {
            kind: machine::DecisionKind::Finish,
            by: "operator/admin".into(),
            reason: "done by hand".into(),
            at_ms: 41,
            from: machine::RotationState::Verified,
            hosts_on_new: true,
        });
        r.evidence_since_ms = Some(42);
        r.old_revoked_ms = Some(43);
        r.next_check_ms = Some(99);
        r.hosts.get_mut("h4").unwrap().exclusion =
            Some(Exclusion { by: "operator/bob".into(), reason: "gone".into(), at_ms: 50 });
        r
    }

    #[test]
    fn a_rotation_view_is_the_stored_rotation_without_its_fingerprint_key() {
        let r = rotation();
        let states: Vec<_> = r.hosts.values().map(|h| h.state.as_str()).collect();
        assert_eq!(states, ["healthy", "rolled_back", "excluded", "delivered"], "a rotation with every kind of host");
        // What `admin::rotation_view` answered before the views.
        let mut old = serde_json::to_value(&r).unwrap();
        old["waiting_on"] = json!(waiting_on(&r));
        old["blocking_hosts"] = json!(r.blocking_hosts().into_iter().map(|(h, s)| (h, s.as_str())).collect::<Vec<_>>());
        old["failure_budget_hosts"] = json!(r.failure_budget());
        old["exits"] = json!(
            machine::exits(&r)
                .into_iter()
                .map(|e| json!({ "verb": e.verb, "command": e.command, "what": e.what }))
                .collect::<Vec<_>>()
        );
        // The host's last report times are two flat fields in the view.
        for h in old["hosts"].as_object_mut().unwrap().values_mut() {
            let h = h.as_object_mut().unwrap();
            let last = h.remove("last_report").unwrap();
            h.insert("reported_ms".into(), last.get("host_ms").cloned().unwrap_or(json!(null)));
            h.insert("received_ms".into(), last.get("received_ms").cloned().unwrap_or(json!(null)));
        }
        // How the store keeps hosts is not part of the view.
        assert_eq!(old.as_object_mut().unwrap().remove("hosts_apart"), Some(json!(true)));
        let key = old.as_object_mut().unwrap().remove("fingerprint_key");
        assert_eq!(key, Some(json!("00ff")));

        let new = serde_json::to_value(view::RotationView::from(&r)).unwrap();
        assert_eq!(new, old);
        assert!(!serde_json::to_string(&view::RotationView::from(&r)).unwrap().contains("00ff"));
    }

    #[test]
    fn a_secret_shows_the_version_a_rotation_adopted_until_one_completes() {
        let spec = SecretSpec {
            name: "api-key".into(),
            description: String::new(),
            provider: serde_json::from_value(json!({"kind": "random"})).unwrap(),
            sinks: vec![],
            selector: Default::default(),
            hosts: None,
            all_agents: false,
            priority: 0,
            policy: machine::Policy::default(),
        };
        let r = rotation();
        let mut rec =
            SecretRecord { name: "api-key".into(), active_rotation: Some(r.id.clone()), ..Default::default() };
        let v = secret(&spec, &rec, Some(&r), vec![]);
        assert_eq!(v.current_version.as_deref(), Some("v1"), "the provider's key rekey took as the old version");
        assert!(v.current_version_adopted);

        rec.current_version = Some("v2".into());
        let v = secret(&spec, &rec, Some(&r), vec![]);
        assert_eq!(v.current_version.as_deref(), Some("v2"));
        assert!(!v.current_version_adopted, "a version a rotation installed is not adopted");

        let v = secret(&spec, &SecretRecord::default(), None, vec![]);
        assert_eq!((v.current_version, v.current_version_adopted), (None, false), "never rotated: unknown");
    }

    #[test]
    fn a_rotation_summary_is_the_old_list_row() {
        let r = rotation();
        let old = json!({
            "id": r.id, "secret": r.secret, "state": r.state.as_str(), "paused": r.paused,
            "started_by": r.started_by, "created_ms": r.created_ms, "updated_ms": r.updated_ms,
            "hosts": r.hosts.len(), "healthy": 1,
            "wave": r.current_wave, "waves": r.waves.len(),
            "waiting_on": waiting_on(&r),
        });
        assert_eq!(serde_json::to_value(view::RotationSummary::from(&r)).unwrap(), old);
    }

    #[test]
    fn an_incident_view_has_each_secret_s_live_state() {
        let r = rotation();
        let progress = |rotation: Option<&str>, error: Option<&str>| SecretProgress {
            rotation: rotation.map(str::to_string),
            error: error.map(str::to_string),
        };
        let mut inc = Incident {
            id: "inc-abc123".into(),
            name: "breach".into(),
            pattern: "*".into(),
            concurrency: 2,
            opened_by: "operator/admin".into(),
            opened_ms: 5,
            closed_by: None,
            closed_ms: None,
            secrets: [
                ("a".to_string(), progress(Some("rot-1"), None)),
                ("b".to_string(), progress(None, Some("no agent consumes secret \"b\""))),
                ("c".to_string(), progress(None, None)),
            ]
            .into(),
            order: vec!["c".into(), "a".into()],
        };
        let lookup = |id: &str| -> Result<Option<Rotation>, ()> { Ok((id == "rot-1").then(|| r.clone())) };
        let v = serde_json::to_value(incident(&inc, lookup).unwrap()).unwrap();
        let state = r.state.as_str();
        assert_eq!(
            v,
            json!({
                "id": "inc-abc123", "name": "breach", "pattern": "*", "concurrency": 2,
                "opened_by": "operator/admin", "opened_ms": 5, "closed_by": null, "closed_ms": null,
                "secrets": {
                    "a": {"rotation": "rot-1", "error": null, "state": state,
                          "hosts": 4, "healthy": 1, "waiting_on": waiting_on(&r)},
                    "b": {"rotation": null, "error": "no agent consumes secret \"b\"", "state": "not_started",
                          "hosts": null, "healthy": null, "waiting_on": null},
                    "c": {"rotation": null, "error": null, "state": "waiting",
                          "hosts": null, "healthy": null, "waiting_on": null},
                },
                "summary": {state: 1, "not_started": 1, "waiting": 1},
                "state": "running",
                // The given order first, then the secrets it does not name.
                "order": ["c", "a", "b"],
                "needs_operator": [
                    "b: not started: no agent consumes secret \"b\"; fix that and rotate it by hand \
                     (`rekey rotate start b`), or close the incident",
                ],
            })
        );
        // Everything else ended, but b never started: not done, and an operator is asked for.
        inc.secrets.remove("c");
        inc.secrets.remove("a");
        let v = incident(&inc, lookup).unwrap();
        assert_eq!(v.state, view::IncidentState::Running);
        assert_eq!(v.needs_operator.len(), 1);
        inc.secrets.insert("b".into(), progress(Some("rot-1"), None));
        let mut completed = r.clone();
        completed.state = machine::RotationState::Completed;
        let v = incident(&inc, |_| -> Result<Option<Rotation>, ()> { Ok(Some(completed.clone())) }).unwrap();
        assert_eq!((v.state, v.needs_operator.len()), (view::IncidentState::Done, 0));
        inc.closed_ms = Some(9);
        assert_eq!(incident(&inc, lookup).unwrap().state, view::IncidentState::Closed);
    }

    #[test]
    fn a_scope_view_is_the_consumer_map() {
        let occurrence = |declared| scope::Occurrence {
            host: "h1".into(),
            path: "/etc/app/env".into(),
            line: 3,
            version: "v1".into(),
            role: scope::Role::Old,
            field: "value".into(),
            declared,
            partial: true,
        };
        let host = |status, skipped: &str| scope::HostScope {
            host: "h1".into(),
            labels: [("env".to_string(), "prod".to_string())].into(),
            connected: true,
            status,
            error: Some("no answer within 20s".into()),
            declares_secret: true,
            selected: false,
            declared_not_found: true,
            files: vec![scope::FileScope {
                path: "/etc/app/env".into(),
                declared: true,
                versions: vec![scope::FileVersion { version: "v1".into(), role: scope::Role::Current }],
                lines: vec![scope::Line {
                    line: 3,
                    version: "v1".into(),
                    role: scope::Role::New,
                    field: "value".into(),
                }],
            }],
            files_scanned: 4,
            bytes_scanned: 400,
            skipped: [("binary".to_string(), 1)].into(),
            skipped_files: vec![scope::Skipped {
                path: "/bin/x".into(),
                reason: "binary".into(),
                detail: skipped.into(),
            }],
            truncated: true,
            limit: Some("500 matches".into()),
            elapsed_ms: Some(7),
        };
        let map = scope::ConsumerMap {
            scan_id: "scan-1".into(),
            secret: "api-key".into(),
            filter: "all".into(),
            rotation: Some("rot-1".into()),
            leftover_scan: false,
            started_ms: 1,
            elapsed_ms: 2,
            timeout_seconds: 20,
            searched: vec![scope::Searched {
                version: "v1".into(),
                role: scope::Role::Current,
                field: "value".into(),
                partial: false,
                weak: None,
            }],
            not_searched: vec![scope::NotSearched {
                version: "v0".into(),
                role: scope::Role::Old,
                field: Some("value".into()),
                reason: "empty value".into(),
            }],
            hosts: vec![
                host(scope::HostStatus::Answered, ""),
                host(scope::HostStatus::Error, "x"),
                host(scope::HostStatus::NotAnswering, ""),
            ],
            undeclared: vec![occurrence(false)],
            leftovers: vec![occurrence(true)],
            summary: scope::Summary {
                hosts_asked: 3,
                answered: 1,
                not_answering: vec!["h3".into()],
                errors: vec!["h2".into()],
                hosts_with_value: vec!["h1".into()],
                occurrences: 2,
                undeclared: 1,
                leftovers: 1,
                declared_not_found: vec!["h1".into()],
                truncated: vec!["h1".into()],
            },
        };
        let old: Value = serde_json::to_value(&map).unwrap();
        assert_eq!(serde_json::to_value(view::ScopeView::from(&map)).unwrap(), old);
    }

    #[test]
    fn versions_audit_and_alerts_keep_their_documents() {
        let v = VersionInfo { id: "v2".into(), status: VersionStatus::Inactive, created_unix: Some(7) };
        let old = json!({"id": v.id, "status": v.status, "created_unix": v.created_unix, "current": true});
        assert_eq!(serde_json::to_value(version(&v, Some("v2"))).unwrap(), old);
        assert_eq!(serde_json::to_value(version(&v, None)).unwrap()["current"], false);

        for first_broken in [None, Some((3, "record 3 was altered".to_string()))] {
            let ver = Verification { records: 4, head: "abcd".into(), first_broken };
            let old = json!({
                "ok": ver.first_broken.is_none(),
                "records": ver.records,
                "head": ver.head,
                "first_broken": ver.first_broken.as_ref().map(|(seq, why)| json!({"seq": seq, "problem": why})),
            });
            assert_eq!(serde_json::to_value(view::AuditVerifyView::from(&ver)).unwrap(), old);
        }

        let rec = AuditRecord {
            seq: 1,
            at_ms: 2,
            actor: "operator/admin".into(),
            action: "rotation.start".into(),
            details: json!({"rotation": "rot-1", "x": null}),
            prev_hash: "00".into(),
            hash: "11".into(),
        };
        assert_eq!(
            serde_json::to_value(view::AuditRecordView::from(&rec)).unwrap(),
            serde_json::to_value(&rec).unwrap()
        );

        let alert = Alert {
            seq: 1,
            at_ms: 2,
            kind: AlertKind::OldVersionUsed,
            severity: Severity::Critical,
            secret: "api-key".into(),
            rotation: None,
            message: "used".into(),
            details: json!({"version": "v1"}),
            delivery: "failed: 500".into(),
        };
        assert_eq!(serde_json::to_value(view::AlertView::from(&alert)).unwrap(), serde_json::to_value(&alert).unwrap());
    }

    #[test]
    fn a_plan_shows_each_host_in_its_wave_with_its_status_and_every_problem() {
        use crate::preflight::{HostCheck, Plan, ProviderCheck};
        use std::collections::BTreeMap;
        let check = |ok: bool| rekey_proto::v1::PreflightCheck {
            subject: "file /srv/key.env".into(),
            ok,
            detail: if ok { "exists".into() } else { "does not exist".into() },
        };
        let listed = vec![VersionInfo { id: "v1".into(), status: VersionStatus::Active, created_unix: Some(1) }];
        let reconciliation = crate::engine::reconcile::reconcile(Some("v1"), &Default::default(), &listed, None);
        let p = Plan {
            secret: "api-key".into(),
            provider_kind: "random".into(),
            recorded: Some("v1".into()),
            old_version: Some("v1".into()),
            provider: ProviderCheck::Listed { versions: listed, reconciliation },
            fields: vec![],
            waves: vec![vec!["a".into()], vec!["b".into(), "c".into()]],
            canary: true,
            hosts: BTreeMap::from([
                ("a".to_string(), HostCheck::Answered(vec![check(true)])),
                ("b".to_string(), HostCheck::Answered(vec![check(true), check(false)])),
                ("c".to_string(), HostCheck::NoAnswer),
            ]),
            blockers: vec![],
            warnings: vec!["strategy \"single\" is not zero-downtime".into()],
            wait: std::time::Duration::from_secs(20),
            elapsed_ms: 5,
        };
        let v = plan(&p);
        let statuses: Vec<(String, view::PlanHostStatus)> =
            v.waves.iter().flat_map(|w| w.hosts.iter().map(|h| (h.name.clone(), h.status))).collect();
        use view::PlanHostStatus::*;
        assert_eq!(statuses, [("a".into(), Ready), ("b".into(), Failed), ("c".into(), NoAnswer)]);
        assert!(v.waves[0].canary && !v.waves[1].canary);
        assert!(!v.ok);
        let hosts: Vec<Option<&str>> = v.problems.iter().map(|x| x.host.as_deref()).collect();
        assert_eq!(hosts, [Some("b"), Some("c")]);
        assert!(v.provider.listed && v.provider.versions[0].current);
        assert!(v.provider.findings.iter().any(|f| f.starts_with("field names unknown")), "{:?}", v.provider.findings);
        assert!(v.provider.findings.iter().any(|f| f.contains("not zero-downtime")), "{:?}", v.provider.findings);
        assert!(!v.problems.iter().any(|x| x.detail.contains("zero-downtime")), "a warning is not a problem");
    }
}
