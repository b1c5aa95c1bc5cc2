//! Pins the JSON shape of every v1 view: each representative view must
//! serialize to exactly the checked-in document in `tests/shape/`, and that
//! document must read back into the same view. A renamed field, a changed
//! enum spelling or a retyped value fails here; if the change is meant, it is
//! a breaking one (see `rekey_types::v1`): a `v2` module, not an edit of these
//! files. Set `REKEY_BLESS_SHAPES=1` to write the documents for a new view.

use rekey_types::v1::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::PathBuf;

fn check<T: Serialize + DeserializeOwned + PartialEq + Debug>(name: &str, view: &T) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/shape").join(format!("{name}.json"));
    let actual = serde_json::to_value(view).expect("serialize");
    if std::env::var_os("REKEY_BLESS_SHAPES").is_some() && !path.exists() {
        std::fs::write(&path, serde_json::to_string_pretty(&actual).unwrap() + "\n").expect("write shape");
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let expected: serde_json::Value = serde_json::from_str(&text).expect("shape file is json");
    assert_eq!(
        actual,
        expected,
        "{name}: the view's JSON no longer matches {}:\n{}",
        path.display(),
        serde_json::to_string_pretty(&actual).unwrap()
    );
    let back: T = serde_json::from_value(expected).unwrap_or_else(|e| panic!("{name}: shape does not read back: {e}"));
    assert_eq!(&back, view, "{name}: round trip");
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

const T0: i64 = 1_760_000_000_000;

fn host(state: HostState, wave: usize, history: &[(HostState, i64)]) -> HostView {
    HostView {
        state,
        wave,
        delivered_ms: Some(T0 + 1_000),
        updated_ms: history.last().map(|h| h.1).unwrap_or(T0),
        fingerprint: (state == HostState::Healthy).then(|| "hmac-sha256:5f2c0e".to_string()),
        error: None,
        exclusion: None,
        rollback_pending: false,
        redeliver_at_ms: None,
        history: history.to_vec(),
        reported_ms: history.last().map(|h| h.1),
        received_ms: history.last().map(|h| h.1 + 40),
    }
}

fn rotation() -> RotationView {
    use HostState::*;
    let mut hosts = BTreeMap::new();
    hosts.insert(
        "host-1".to_string(),
        host(Healthy, 0, &[(Pending, T0), (Delivered, T0 + 1_000), (Applied, T0 + 1_200), (Healthy, T0 + 1_900)]),
    );
    let mut failed = host(RolledBack, 1, &[(Pending, T0), (Delivered, T0 + 2_000), (Failed, T0 + 2_500)]);
    failed.error = Some("health check http://127.0.0.1:8080/health returned 503, 5 tries over 30s".into());
    failed.history.push((RolledBack, T0 + 3_000));
    failed.updated_ms = T0 + 3_000;
    hosts.insert("host-2".to_string(), failed);
    let mut gone = host(Excluded, 1, &[(Pending, T0), (Unreachable, T0 + 20_000), (Excluded, T0 + 30_000)]);
    gone.delivered_ms = None;
    gone.error = Some("no report within 20s".into());
    gone.exclusion = Some(ExclusionView {
        by: "operator/admin".into(),
        reason: "host decommissioned (INC-42)".into(),
        at_ms: T0 + 30_000,
    });
    hosts.insert("host-3".to_string(), gone);
    RotationView {
        id: "rot-3f9a1c".into(),
        secret: "api-key".into(),
        state: RotationState::Halted,
        paused: false,
        started_by: "operator/admin".into(),
        created_ms: T0,
        updated_ms: T0 + 30_000,
        policy: PolicyView {
            canary: 1,
            waves: vec![Amount::Percent(50), Amount::Percent(100)],
            selector_waves: vec![SelectorWaveView { selector: labels(&[("env", "staging")]), pause_after: true }],
            failure_budget: Amount::Count(0),
            host_deadline_ms: 20_000,
            jitter_ms: 0,
            deactivate: true,
            grace_ms: 600_000,
            delete: true,
            monitor_ms: 259_200_000,
            require_evidence: true,
            usage_granularity_ms: 0,
            grace_use: GraceUse::Reactivate,
            check_every_ms: 60_000,
            use_after_switch: UseAfterSwitch::Hold,
        },
        old_version: Some("v-old".into()),
        new_version: Some("v-new".into()),
        expected_fingerprint: Some("hmac-sha256:5f2c0e".into()),
        waves: vec![vec!["host-1".into()], vec!["host-2".into(), "host-3".into()]],
        current_wave: 1,
        pause_after: vec![0],
        hosts,
        halt_reason: Some("host-2 failed: health check returned 503 (failure budget 0)".into()),
        halted_from: Some(RotationState::RollingOut),
        phase_until_ms: None,
        delete_new_issued: false,
        timeline: vec![
            TimelineEntryView { at_ms: T0, state: RotationState::Planned, note: "planned".into() },
            TimelineEntryView { at_ms: T0 + 10, state: RotationState::Generating, note: "generating".into() },
            TimelineEntryView { at_ms: T0 + 900, state: RotationState::RollingOut, note: "canary".into() },
            TimelineEntryView { at_ms: T0 + 3_000, state: RotationState::Halted, note: "host-2 failed".into() },
        ],
        evidence: vec![
            EvidenceView {
                at_ms: T0 + 40,
                phase: RotationState::RollingOut,
                usage: Some(Usage::At(T0 - 5_000)),
                error: None,
                source: Some("iam in eu-west-1".into()),
                verdict: "used before the switch".into(),
            },
            EvidenceView {
                at_ms: T0 + 50,
                phase: RotationState::Verified,
                usage: Some(Usage::Unknown),
                error: None,
                source: None,
                verdict: "no usage data".into(),
            },
            EvidenceView {
                at_ms: T0 + 60,
                phase: RotationState::Grace,
                usage: None,
                error: Some("provider unavailable".into()),
                source: None,
                verdict: "check failed".into(),
            },
        ],
        evidence_ok: false,
        usage_check_pending: false,
        next_check_ms: None,
        deactivated_ms: None,
        reactivating: false,
        alerted_use_ms: None,
        waiting_on: Some("host-2 failed: health check returned 503 (failure budget 0)".into()),
        blocking_hosts: vec![("host-2".into(), HostState::RolledBack)],
        failure_budget_hosts: 0,
        evidence_since_ms: None,
        old_revoked_ms: None,
        decisions: vec![DecisionView {
            kind: DecisionKind::Abandon,
            by: "operator/admin".into(),
            reason: "superseded by INC-43".into(),
            at_ms: T0 + 31_000,
            from: RotationState::Halted,
            hosts_on_new: false,
        }],
        exits: vec![ExitView {
            verb: "resume".into(),
            command: "rekey rotate resume rot-3f9a1c".into(),
            what: "retry the failed step or hosts".into(),
        }],
    }
}

#[test]
fn rotation_view() {
    check("rotation", &rotation());
}

#[test]
fn rotation_summary() {
    check(
        "rotation_summary",
        &vec![RotationSummary {
            id: "rot-3f9a1c".into(),
            secret: "api-key".into(),
            state: RotationState::RollingOut,
            paused: true,
            started_by: "operator/admin".into(),
            created_ms: T0,
            updated_ms: T0 + 5_000,
            hosts: 3,
            healthy: 1,
            wave: 1,
            waves: 2,
            waiting_on: Some("paused by an operator".into()),
        }],
    );
}

#[test]
fn secret_and_version_views() {
    check(
        "secrets",
        &vec![
            SecretView {
                name: "api-key".into(),
                description: "the payments API key".into(),
                provider: "random".into(),
                selector: labels(&[("env", "prod")]),
                current_version: Some("v-new".into()),
                current_version_adopted: false,
                active_rotation: None,
                last_rotation: Some(LastRotationView {
                    id: "rot-3f9a1c".into(),
                    state: RotationState::Completed,
                    started_ms: T0,
                    updated_ms: T0 + 90_000,
                }),
                consumers: vec!["host-1".into(), "host-2".into()],
            },
            SecretView {
                name: "db-password".into(),
                description: String::new(),
                provider: "command".into(),
                selector: BTreeMap::new(),
                current_version: Some("AKIAOLD".into()),
                current_version_adopted: true,
                active_rotation: Some("rot-4b1e07".into()),
                last_rotation: Some(LastRotationView {
                    id: "rot-4b1e07".into(),
                    state: RotationState::Grace,
                    started_ms: T0 + 100_000,
                    updated_ms: T0 + 160_000,
                }),
                consumers: vec![],
            },
        ],
    );
    check(
        "versions",
        &vec![
            VersionView {
                id: "AKIAOLD".into(),
                status: VersionStatus::Inactive,
                created_unix: Some(1_760_000_000),
                current: false,
            },
            VersionView { id: "AKIANEW".into(), status: VersionStatus::Active, created_unix: None, current: true },
        ],
    );
}

#[test]
fn incident_view() {
    let mut secrets = BTreeMap::new();
    secrets.insert(
        "vendor-a".to_string(),
        IncidentSecretView {
            rotation: Some("rot-000001".into()),
            error: None,
            state: IncidentSecretState::Rotation(RotationState::Completed),
            hosts: Some(3),
            healthy: Some(3),
            waiting_on: None,
        },
    );
    secrets.insert(
        "vendor-b".to_string(),
        IncidentSecretView {
            rotation: None,
            error: Some("no agent consumes secret \"vendor-b\"".into()),
            state: IncidentSecretState::Campaign(CampaignState::NotStarted),
            hosts: None,
            healthy: None,
            waiting_on: None,
        },
    );
    secrets.insert(
        "vendor-c".to_string(),
        IncidentSecretView {
            rotation: None,
            error: None,
            state: IncidentSecretState::Campaign(CampaignState::Waiting),
            hosts: None,
            healthy: None,
            waiting_on: None,
        },
    );
    check(
        "incident",
        &IncidentView {
            id: "inc-a1b2c3".into(),
            name: "vendor breach".into(),
            pattern: "vendor-*".into(),
            concurrency: 2,
            opened_by: "operator/admin".into(),
            opened_ms: T0,
            closed_by: None,
            closed_ms: None,
            secrets,
            summary: [("completed".to_string(), 1), ("not_started".to_string(), 1), ("waiting".to_string(), 1)].into(),
            state: IncidentState::Running,
            order: vec!["vendor-c".into(), "vendor-a".into(), "vendor-b".into()],
            needs_operator: vec![
                "vendor-b: not started: no agent consumes secret \"vendor-b\"; fix that and rotate it by hand \
                 (`rekey rotate start vendor-b`), or close the incident"
                    .into(),
            ],
        },
    );
}

#[test]
fn audit_and_alert_views() {
    check(
        "audit",
        &vec![AuditRecordView {
            seq: 7,
            at_ms: T0,
            actor: "operator/admin".into(),
            action: "host.state".into(),
            details: serde_json::json!({"rotation": "rot-3f9a1c", "host": "host-3", "to": "excluded", "reason": "gone"}),
            prev_hash: "9d1e".into(),
            hash: "a07c".into(),
        }],
    );
    check(
        "audit_verify",
        &AuditVerifyView {
            ok: false,
            records: 12,
            head: "a07c".into(),
            first_broken: Some(BrokenLink { seq: 3, problem: "record 3 was altered".into() }),
        },
    );
    check(
        "alerts",
        &vec![AlertView {
            seq: 1,
            at_ms: T0,
            kind: AlertKind::OldVersionUsedDuringGrace,
            severity: Severity::Critical,
            secret: "api-key".into(),
            rotation: Some("rot-3f9a1c".into()),
            message: "the old version v-old of api-key was used during grace".into(),
            details: serde_json::json!({"version": "v-old", "used_ms": T0 - 1}),
            delivery: "delivered".into(),
        }],
    );
}

#[test]
fn agent_views() {
    check(
        "agents",
        &vec![AgentView {
            name: "host-1".into(),
            labels: labels(&[("env", "test"), ("index", "1")]),
            connected: true,
            revoked: false,
            last_seen: "2025-10-09 08:53:20 UTC".into(),
            agent_version: "0.1.0".into(),
            cert_serial: "4f1d".into(),
            cert_expires: "2025-10-10 08:53:20 UTC".into(),
            enrolled: "2025-10-09 08:50:00 UTC".into(),
            secrets: vec!["api-key".into()],
        }],
    );
    check(
        "token",
        &JoinTokenView {
            host: "host-1".into(),
            token: "0a1b2c3d.EXAMPLE".into(),
            ca_fingerprint: "sha256:ab12".into(),
            expires: "2025-10-09 09:53:20 UTC".into(),
            coordinator: "127.0.0.1:7400".into(),
        },
    );
    check("agent_revoked", &AgentRevokedView { revoked: "host-2".into(), session_closed: true });
}

#[test]
fn operator_views() {
    check(
        "operators",
        &vec![
            OperatorView {
                name: "admin".into(),
                role: OperatorRole::Admin,
                serials: vec!["4f1d".into()],
                created_unix: 1_760_000_000,
                created_by: "rekeyd (init)".into(),
                revoked: false,
                revoked_unix: None,
                revoked_by: None,
            },
            OperatorView {
                name: "night-shift".into(),
                role: OperatorRole::Viewer,
                serials: vec!["7a2e".into()],
                created_unix: 1_760_000_600,
                created_by: "operator/admin".into(),
                revoked: true,
                revoked_unix: Some(1_760_086_400),
                revoked_by: Some("operator/admin".into()),
            },
        ],
    );
}

#[test]
fn scope_view() {
    let line = |n, version: &str, role| ScopeFileLine { line: n, version: version.into(), role, field: "value".into() };
    let occurrence = |path: &str, n, version: &str, role, declared| OccurrenceView {
        host: "host-1".into(),
        path: path.into(),
        line: n,
        version: version.into(),
        role,
        field: "value".into(),
        declared,
        partial: false,
    };
    let answered = ScopeHostView {
        host: "host-1".into(),
        labels: labels(&[("env", "prod")]),
        connected: true,
        status: ScanStatus::Answered,
        error: None,
        declares_secret: true,
        selected: true,
        declared_not_found: false,
        files: vec![
            ScopeFileView {
                path: "/etc/app/env".into(),
                declared: true,
                versions: vec![ScopeFileVersion { version: "v-new".into(), role: VersionRole::Current }],
                lines: vec![line(3, "v-new", VersionRole::Current)],
            },
            ScopeFileView {
                path: "/home/deploy/.env.bak".into(),
                declared: false,
                versions: vec![ScopeFileVersion { version: "v-old".into(), role: VersionRole::Old }],
                lines: vec![line(1, "v-old", VersionRole::Old), line(9, "v-old", VersionRole::Old)],
            },
        ],
        files_scanned: 42,
        bytes_scanned: 81_920,
        skipped: [("binary".to_string(), 1)].into(),
        skipped_files: vec![
            SkippedFileView { path: "/etc/app/app.bin".into(), reason: "binary".into(), detail: String::new() },
            SkippedFileView {
                path: "/etc/app/secret.d".into(),
                reason: "unreadable".into(),
                detail: "permission denied".into(),
            },
        ],
        truncated: false,
        limit: None,
        elapsed_ms: Some(35),
    };
    let silent = ScopeHostView {
        host: "host-2".into(),
        labels: BTreeMap::new(),
        connected: false,
        status: ScanStatus::NotAnswering,
        error: Some("not connected".into()),
        declares_secret: true,
        selected: true,
        declared_not_found: false,
        files: vec![],
        files_scanned: 0,
        bytes_scanned: 0,
        skipped: BTreeMap::new(),
        skipped_files: vec![],
        truncated: false,
        limit: None,
        elapsed_ms: None,
    };
    let leftovers = vec![
        occurrence("/home/deploy/.env.bak", 1, "v-old", VersionRole::Old, false),
        occurrence("/home/deploy/.env.bak", 9, "v-old", VersionRole::Old, false),
    ];
    check(
        "scope",
        &ScopeView {
            scan_id: "scan-77aa".into(),
            secret: "api-key".into(),
            filter: "all".into(),
            rotation: Some("rot-3f9a1c".into()),
            leftover_scan: false,
            started_ms: T0,
            elapsed_ms: 512,
            timeout_seconds: 20,
            searched: vec![
                SearchedView {
                    version: "v-new".into(),
                    role: VersionRole::Current,
                    field: "value".into(),
                    partial: false,
                    weak: None,
                },
                SearchedView {
                    version: "v-old".into(),
                    role: VersionRole::Old,
                    field: "value".into(),
                    partial: true,
                    weak: Some("about 47 bits of entropy (estimated from length and character classes), under 80: guessable; rotate to a stronger value".into()),
                },
            ],
            not_searched: vec![NotSearchedView {
                version: "v-older".into(),
                role: VersionRole::Old,
                field: None,
                reason: "the old value is no longer held".into(),
            }],
            hosts: vec![answered, silent],
            undeclared: leftovers.clone(),
            leftovers,
            summary: ScopeSummary {
                hosts_asked: 2,
                answered: 1,
                not_answering: vec!["host-2".into()],
                errors: vec![],
                hosts_with_value: vec!["host-1".into()],
                occurrences: 3,
                undeclared: 2,
                leftovers: 2,
                declared_not_found: vec![],
                truncated: vec![],
            },
        },
    );
}

#[test]
fn plan_view() {
    let c =
        |subject: &str, ok: bool, detail: &str| PlanCheckView { subject: subject.into(), ok, detail: detail.into() };
    let missing = "does not exist (declared in agent.toml secret[0].file[0])";
    check(
        "plan",
        &PlanView {
            secret: "api-key".into(),
            recorded_version: Some("k_1".into()),
            old_version: Some("k_2".into()),
            fields: vec!["value".into()],
            provider: PlanProviderView {
                kind: "http".into(),
                listed: true,
                error: None,
                versions: vec![VersionView {
                    id: "k_2".into(),
                    status: VersionStatus::Active,
                    created_unix: Some(1_760_000_000),
                    current: false,
                }],
                drift: vec!["k_2".into()],
                findings: vec![
                    "the recorded current version k_1 is not at the provider (rotated outside rekey?): \
                     the active version k_2 is taken as the old one"
                        .into(),
                ],
            },
            waves: vec![
                PlanWaveView {
                    index: 0,
                    canary: true,
                    hosts: vec![PlanHostView {
                        name: "host-1".into(),
                        status: PlanHostStatus::Ready,
                        checks: vec![
                            c("file /srv/app/key.env", true, "owner app:app, mode 0600"),
                            c("restart systemd app.service", true, "unit exists"),
                            c("health http://127.0.0.1:8080/health", true, "200"),
                        ],
                    }],
                },
                PlanWaveView {
                    index: 1,
                    canary: false,
                    hosts: vec![
                        PlanHostView {
                            name: "host-2".into(),
                            status: PlanHostStatus::Failed,
                            checks: vec![c("file /srv/app/kye.env", false, missing)],
                        },
                        PlanHostView { name: "host-3".into(), status: PlanHostStatus::NotConnected, checks: vec![] },
                    ],
                },
            ],
            problems: vec![
                PlanProblemView {
                    host: Some("host-2".into()),
                    subject: "file /srv/app/kye.env".into(),
                    detail: missing.into(),
                },
                PlanProblemView {
                    host: Some("host-3".into()),
                    subject: "connection".into(),
                    detail: "agent host-3 is not connected".into(),
                },
            ],
            ok: false,
            wait_seconds: 20,
            elapsed_ms: 1_250,
        },
    );
}

#[test]
fn enum_spellings_are_the_documented_ones() {
    let all = |v: Vec<String>| v.join(" ");
    assert_eq!(
        all(RotationState::ALL
            .iter()
            .map(|s| serde_json::to_value(s).unwrap().as_str().unwrap().to_string())
            .collect()),
        "planned generating rolling_out halted verified deactivating grace deleting monitoring completed aborting aborted"
    );
    assert_eq!(
        all(HostState::ALL.iter().map(|s| s.to_string()).collect()),
        "pending delivered applied restarted healthy failed rolled_back unreachable excluded"
    );
    for s in RotationState::ALL {
        assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        let back: IncidentSecretState = serde_json::from_value(s.as_str().into()).unwrap();
        assert_eq!(back, IncidentSecretState::Rotation(*s));
    }
    for s in HostState::ALL {
        assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
    }
    assert_eq!(
        all(AlertKind::ALL.iter().map(|s| s.to_string()).collect()),
        "old_version_used old_version_used_during_grace old_version_used_after_revocation leftover_found"
    );
    assert_eq!(all(OperatorRole::ALL.iter().map(|s| s.to_string()).collect()), "admin rotator viewer");
    assert_eq!(
        all(PlanHostStatus::ALL.iter().map(|s| s.to_string()).collect()),
        "ready failed not_connected no_answer"
    );
    let waiting: IncidentSecretState = serde_json::from_str("\"waiting\"").unwrap();
    assert_eq!(waiting, IncidentSecretState::Campaign(CampaignState::Waiting));
    assert!(serde_json::from_str::<RotationState>("\"RollingOut\"").is_err());
    assert_eq!(Amount::Percent(25).to_string(), "25%");
    // Tables pad enum cells: Display honours width and alignment.
    assert_eq!(format!("[{:<8}]", RotationState::Halted), "[halted  ]");
    assert_eq!(format!("[{:>9}]", IncidentSecretState::Campaign(CampaignState::Waiting)), "[  waiting]");
    assert_eq!(VIEWS_VERSION, 1);
}
