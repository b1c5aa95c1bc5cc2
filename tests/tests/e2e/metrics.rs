//! rekeyd's Prometheus metrics during a real rotation (scripted agents over
//! real mTLS), read with a real exposition parser; the example alerting rules
//! in deploy/prometheus name only metrics rekeyd exports; `rekey rotate
//! watch` follows the server's stream; the CLI survives a closed pipe.

use prometheus_parse::{Scrape, Value};
use rekey_tests::scripted::{Behavior, ScriptedAgent};
use rekey_tests::{Coordinator, bins, wait_for, workspace_root};
use rekey_types::v1::{HostState, RotationState};
use std::collections::BTreeSet;
use std::process::{Command, Stdio};

const SECRET: &str = "api-key";

const CATALOG: &str = r#"
[metrics]
listen = "127.0.0.1:0"

[[secret]]
name = "api-key"
provider = { kind = "random", length = 40, prefix = "ak_" }
selector = { env = "test" }
[secret.rollout]
canary = 1
waves = ["100%"]
host_deadline = "20s"
[secret.revocation]
monitor = "0s"
grace = "1s"
"#;

struct Fleet {
    _tmp: tempfile::TempDir,
    c: Coordinator,
    agents: Vec<ScriptedAgent>,
}

fn fleet(n: usize) -> Fleet {
    rustls::crypto::ring::default_provider().install_default().ok();
    let tmp = tempfile::Builder::new().prefix("rekey-metrics-").tempdir().unwrap();
    let c = Coordinator::start(&tmp.path().join("c"), CATALOG);
    let agents = (1..=n)
        .map(|i| ScriptedAgent::enroll(&c, tmp.path(), &format!("host-{i}"), &[SECRET], &["env=test"]))
        .collect::<Vec<_>>();
    wait_for("agents connected", || agents.iter().all(|a| c.is_connected(&a.name)));
    Fleet { _tmp: tmp, c, agents }
}

fn scrape(c: &Coordinator) -> Scrape {
    let text = c.metrics();
    assert!(text.trim_end().ends_with("# EOF"), "an OpenMetrics exposition ends with # EOF:\n{text}");
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("a valid exposition")
}

/// The value of the sample `metric` whose labels include `labels` (0 if absent).
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(b) => b.iter().map(|c| c.count).fold(0.0, f64::max),
            Value::Summary(_) => f64::NAN,
        })
        .sum()
}

fn wait_state(c: &Coordinator, id: &str, states: &[RotationState]) {
    wait_for(&format!("rotation {id} in {states:?}"), || states.contains(&c.rotation(id).state));
}

#[test]
fn metrics_follow_a_real_rotation_and_carry_no_value() {
    let mut f = fleet(3);
    let before = scrape(&f.c);
    assert_eq!(value(&before, "rekey_agents", &[("state", "enrolled")]), 3.0);
    assert_eq!(value(&before, "rekey_agents_connected", &[]), 3.0);
    assert_eq!(value(&before, "rekey_token_enrollments_total", &[]), 3.0);
    assert!(value(&before, "rekey_sessions_opened_total", &[]) >= 3.0);
    assert_eq!(value(&before, "rekey_deliveries_total", &[]), 0.0);
    assert_eq!(value(&before, "rekey_rotations", &[("state", "completed")]), 0.0);
    let now = rekey_common::time::now_unix() as f64;
    let expiry = value(&before, "rekey_agent_cert_soonest_expiry_timestamp_seconds", &[]);
    assert!(expiry > now && expiry < now + 2.0 * 86_400.0, "expiry {expiry} vs now {now}");
    let audit_before = value(&before, "rekey_audit_head_sequence", &[]);
    assert!(audit_before > 0.0);

    // host-3 fails: the rotation halts after the canary and one healthy host.
    f.agents[2].set_behavior(SECRET, Behavior::Fail("health check returned 503".into()));
    let id = f.c.cli_ok(&["rotate", "start", SECRET]).trim().to_string();
    wait_state(&f.c, &id, &[RotationState::Halted]);
    let healthy = |id: &str| f.c.rotation(id).hosts.values().filter(|h| h.state == HostState::Healthy).count();
    wait_for("host-1 and host-2 healthy", || healthy(&id) == 2);
    let during = scrape(&f.c);
    let rot = [("rotation", id.as_str()), ("secret", SECRET)];
    assert_eq!(value(&during, "rekey_rotation_halted", &rot), 1.0);
    assert_eq!(value(&during, "rekey_rotations", &[("state", "halted")]), 1.0);
    assert_eq!(value(&during, "rekey_rotation_hosts", &[rot[0], ("state", "healthy")]), 2.0);
    let failed = value(&during, "rekey_rotation_hosts", &[rot[0], ("state", "rolled_back")])
        + value(&during, "rekey_rotation_hosts", &[rot[0], ("state", "failed")]);
    assert_eq!(failed, 1.0);
    assert_eq!(value(&during, "rekey_rotation_waves", &rot), 2.0);
    assert_eq!(value(&during, "rekey_rotation_wave", &rot), 1.0);
    assert!(value(&during, "rekey_deliveries_total", &[("secret", SECRET)]) >= 3.0);
    assert!(value(&during, "rekey_reports_total", &[("stage", "healthy")]) >= 2.0);
    assert!(value(&during, "rekey_reports_total", &[("stage", "failed")]) >= 1.0);
    let create = [("secret", SECRET), ("provider", "random"), ("operation", "create")];
    assert_eq!(
        value(&during, "rekey_provider_calls_total", &[create[0], create[1], create[2], ("outcome", "ok")]),
        1.0
    );
    assert_eq!(value(&during, "rekey_provider_call_duration_seconds", &create), 1.0, "one create timed");
    assert!(value(&during, "rekey_audit_head_sequence", &[]) > audit_before, "the audit head moves");
    let during_text = f.c.metrics();

    f.c.cli_ok(&["rotate", "exclude", &id, "host-3", "--reason", "INC-1: broken host"]);
    f.c.cli_ok(&["rotate", "resume", &id]);
    wait_state(&f.c, &id, &[RotationState::Completed]);
    let after = scrape(&f.c);
    assert_eq!(value(&after, "rekey_rotations", &[("state", "completed")]), 1.0);
    assert_eq!(value(&after, "rekey_rotation_halted", &rot), 0.0, "a finished rotation is not active");
    let list = [("secret", SECRET), ("operation", "list"), ("outcome", "ok")];
    assert!(value(&after, "rekey_provider_calls_total", &list) >= 1.0, "a start lists the provider's versions");
    assert!(value(&after, "rekey_audit_head_sequence", &[]) > value(&during, "rekey_audit_head_sequence", &[]));
    assert!(value(&after, "rekey_deliveries_total", &[]) >= value(&during, "rekey_deliveries_total", &[]));
    let out = watch_follows_the_stream(&mut f);
    // The second rotation had an old version to revoke: deleted at the provider.
    let delete = [("secret", SECRET), ("operation", "delete"), ("outcome", "ok")];
    wait_for("the old version deleted", || value(&scrape(&f.c), "rekey_provider_calls_total", &delete) >= 1.0);
    assert_eq!(value(&scrape(&f.c), "rekey_provider_errors_total", &[("secret", SECRET)]), 0.0);

    // No value and no fingerprint in any scrape.
    let texts = [f.c.metrics(), format!("{during:?}"), out.to_string()];
    let r = f.c.rotation(&id);
    let fingerprints: Vec<&str> = r.hosts.values().filter_map(|h| h.fingerprint.as_deref()).collect();
    assert!(!fingerprints.is_empty());
    for t in &texts {
        for a in &f.agents {
            for v in a.values_seen() {
                assert!(!t.contains(String::from_utf8_lossy(&v).as_ref()), "a secret value in the metrics");
            }
        }
        for fp in &fingerprints {
            let hex = fp.rsplit(':').next().unwrap_or(fp);
            assert!(!t.contains(hex), "a fingerprint in the metrics");
        }
    }
    // Per-rotation families exist while a rotation is active: the rules are
    // checked against a scrape during the halt and one at the end.
    check_rules_against(&format!("{during_text}{}", f.c.metrics()));
}

/// `rekey rotate watch` follows the server's stream: asked to poll once an
/// hour, it still sees the rotation end as soon as host-3 is excluded. Its
/// output (not a terminal) is one line per change.
fn watch_follows_the_stream(f: &mut Fleet) -> String {
    use std::io::{BufRead, Read};
    f.agents[2].stop();
    wait_for("host-3 gone", || !f.c.is_connected("host-3"));
    let id = f.c.cli_ok(&["rotate", "start", SECRET, "--skip-preflight", "--reason", "host-3 stays out"]);
    let id = id.trim();
    let dir = f.c.operator_dir();
    let mut watch = Command::new(&bins().cli)
        .args(["--operator-dir", dir.to_str().unwrap(), "--coordinator", &f.c.addr()])
        .args(["rotate", "watch", id, "--interval", "1h"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(watch.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.starts_with('['), "the first view at once: {first:?}");
    f.c.cli_ok(&["rotate", "exclude", id, "host-3", "--reason", "INC-1: host-3 is gone"]);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = watch.wait().unwrap();
    let mut err = String::new();
    watch.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "watch: {first}{rest}\n{err}");
    let out = format!("{first}{rest}");
    assert!(out.lines().count() >= 2, "a line per change: {out}");
    assert!(out.lines().last().is_some_and(|l| l.starts_with("[monitoring]") || l.starts_with("[completed]")), "{out}");
    out
}

/// Metric names an exposition declares, as PromQL names them (counters
/// with `_total`, histograms with `_bucket`/`_sum`/`_count`, infos with
/// `_info`), whether or not a sample exists yet.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let (Some("#"), Some("TYPE"), Some(name), Some(kind)) = (w.next(), w.next(), w.next(), w.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "info" => &["_info"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    names
}

/// deploy/prometheus parses, scrapes rekeyd, and its rules cover the four
/// alerts the docs promise using only metrics rekeyd exports.
fn check_rules_against(text: &str) {
    let dir = workspace_root().join("deploy/prometheus");
    let config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("prometheus.yml")).unwrap()).expect("prometheus.yml");
    let job = &config["scrape_configs"][0];
    assert_eq!(job["metrics_path"].as_str(), Some("/metrics"));
    let target = job["static_configs"][0]["targets"][0].as_str().unwrap();
    assert!(target.starts_with("127.0.0.1:"), "the example scrapes loopback: {target}");
    let rule_file = config["rule_files"][0].as_str().unwrap();
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join(rule_file)).unwrap()).expect("rules parse");
    let rules = rules["groups"][0]["rules"].as_sequence().expect("a rule group");
    let names: Vec<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    for wanted in
        ["RekeyAgentDisconnected", "RekeyRotationHalted", "RekeyOldKeyUsedAfterSwitch", "RekeyAgentCertificateExpiring"]
    {
        assert!(names.contains(&wanted), "{wanted} missing from {names:?}");
    }
    let exported = exported(text);
    assert!(exported.contains("rekey_rotation_halted") && exported.contains("rekey_provider_calls_total"));
    for r in rules {
        let expr = r["expr"].as_str().expect("every rule has an expr");
        let used: Vec<&str> = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|t| t.starts_with("rekey_"))
            .collect();
        assert!(!used.is_empty(), "{expr}");
        for m in used {
            assert!(exported.contains(m), "rule {:?} uses {m}, which rekeyd does not export", r["alert"]);
        }
        assert!(r["annotations"]["summary"].as_str().is_some_and(|s| !s.is_empty()));
    }
}

/// `rekey … | head` must not panic: a closed pipe ends the CLI quietly
/// with 141, as a tool killed by SIGPIPE does.
#[test]
fn the_cli_survives_a_closed_pipe() {
    let f = fleet(1);
    let id = f.c.cli_ok(&["rotate", "start", SECRET, "--wait"]).lines().next().unwrap_or_default().to_string();
    let id = id.trim_start_matches("rotation ").trim_end_matches(" started").to_string();
    let dir = f.c.operator_dir();
    let base = ["--operator-dir", dir.to_str().unwrap(), "--coordinator", &f.c.addr()];
    for args in [
        vec!["rotate", "status", id.as_str()],
        vec!["rotate", "list", "-o", "json"],
        vec!["agents"],
        vec!["audit"],
        vec!["completions", "bash"],
    ] {
        let mut child = Command::new(&bins().cli)
            .args(base)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader is gone before anything is written
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "rekey {args:?} panicked: {err}");
        // clap's completion writer ignores write errors: it ends 0, without a panic.
        let expected = if args[0] == "completions" { [0, 141] } else { [141, 141] };
        assert!(out.status.code().is_some_and(|c| expected.contains(&c)), "rekey {args:?}: {:?} {err}", out.status);
    }
}
