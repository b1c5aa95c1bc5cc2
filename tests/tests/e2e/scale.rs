//! The load benchmark (`tests/examples/scale.rs`) at a small N, so it cannot
//! rot: every step runs against a real rekeyd, and what it measures must be
//! true of the run (all hosts enrolled, connected, back after a restart,
//! both rotations completed on every host). Nothing about time is asserted.

use rekey_coordinator::store::AgentRecord;
use rekey_proto::v1::ListAgentsRequest;
use rekey_tests::Coordinator;
use rekey_tests::bench::{self, BenchOptions};
use rekey_types::v1::{AgentView, PlanView};
use std::time::Duration;

#[test]
fn the_load_benchmark_runs_end_to_end_at_small_n() {
    rustls::crypto::ring::default_provider().install_default().ok();
    let tmp = tempfile::Builder::new().prefix("rekey-scale-").tempdir().unwrap();
    let opts = BenchOptions {
        hosts: 12,
        apply: Duration::from_millis(5),
        idle: Duration::from_secs(1),
        deadline: rekey_tests::budget(),
        ..BenchOptions::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let f = rt.block_on(bench::run(tmp.path(), &opts)).expect("benchmark run");
    println!("{f}");
    assert_eq!(f.hosts, 12);
    assert!(f.rss_idle_kib > 0 && f.rss_before_kib > 0, "rekeyd's RSS read from /proc");
    assert!(f.agent.binary_bytes > 0 && f.agent.rss_kib > 0 && f.agent.threads > 0, "{:?}", f.agent);
    assert!(f.agent.anon_kib > 0 && f.agent.anon_kib < f.agent.rss_kib, "{:?}", f.agent);
    assert!(f.reconnect_sessions >= 12, "every host got a new session after the restart: {}", f.reconnect_sessions);
    assert_eq!(f.rotations.len(), 2);
    for r in &f.rotations {
        assert_eq!((r.state.as_str(), r.healthy, r.failed), ("completed", 12, 0), "{}", r.label);
        assert!(r.to_completed >= r.to_verified && r.to_verified > Duration::ZERO, "{}: {r:?}", r.label);
        assert!(r.write_bytes > 0, "{}: rekeyd's writes read from /proc", r.label);
        assert!(r.host_events >= 48, "{}: 4 reports per host", r.label);
        assert!(r.confirm_max_ms >= r.confirm_median_ms && r.confirm_median_ms >= 5, "apply takes 5 ms: {r:?}");
    }
    // canary + ten 10 % waves over 12 hosts, and one wave.
    assert_eq!(f.rotations[0].waves, 11);
    assert_eq!(f.rotations[1].waves, 1);
    for read in &f.reads {
        assert!(read.ok && read.bytes > 0, "{read:?}");
    }
}

fn seeded(n: usize, secrets: &[&str], labels: impl Fn(usize) -> Vec<(&'static str, &'static str)>) -> Vec<AgentRecord> {
    (1..=n).map(|i| bench::seeded_agent(&format!("h{i}"), &labels(i), secrets)).collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Found at 10,000 hosts: a start refused by the preflight named every host
/// in its error, the error travels in HTTP/2 trailers, and the client closed
/// the connection (`GOAWAY too_many_continuations`) instead of showing it.
#[test]
fn a_start_refused_for_thousands_of_hosts_reaches_the_cli_as_a_bounded_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Coordinator::start(&tmp.path().join("c"), &bench::catalog());
    // 5,000 consumers that never connect: the preflight finds 5,000 problems.
    bench::seed_registry(&mut c, &seeded(5000, &[bench::ONE_WAVE_SECRET], |_| vec![("env", "bench")])).unwrap();

    let out = c.cli(&["rotate", "start", bench::ONE_WAVE_SECRET]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(!err.contains("GOAWAY") && !err.contains("continuation"), "{err}");
    assert!(err.contains("the preflight of bench-one-wave found 5000 problem(s); no key was generated"), "{err}");
    // The first 20 in wave (natural) order, then a count; never all 5,000.
    assert!(err.contains("h1: connection: agent h1 is not connected"), "{err}");
    assert!(err.contains("h20: connection:") && !err.contains("h21: connection:"), "{err}");
    assert!(err.contains("and 4980 more"), "{err}");
    assert!(err.contains("rekey rotate plan bench-one-wave"), "points to the whole list: {err}");
    assert!(err.len() < rekey_common::error::MAX_MESSAGE + 200, "{} bytes", err.len());

    // Nothing started, and the whole list is in the plan's body.
    let list = c.cli(&["rotate", "list", "-o", "json"]);
    assert!(list.status.success(), "{}", text(&list.stderr));
    assert!(!text(&list.stdout).contains(bench::ONE_WAVE_SECRET), "{}", text(&list.stdout));
    let plan = c.cli(&["rotate", "plan", bench::ONE_WAVE_SECRET, "-o", "json"]);
    let plan: PlanView = serde_json::from_slice(&plan.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&plan.stderr)));
    assert_eq!((plan.ok, plan.problems.len()), (false, 5000));
}

/// `rekey agents` over a registry of thousands: a page by default, cut by
/// rekeyd; filters by state, label and name part; bad input refused naming
/// the flag and what it expects.
#[test]
fn rekey_agents_at_thousands_shows_a_page_and_filters_on_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Coordinator::start(&tmp.path().join("c"), "");
    let mut agents = seeded(3000, &[], |i| if i % 10 == 0 { vec![("role", "web")] } else { vec![("role", "db")] });
    agents[6].revoked_unix = Some(rekey_common::time::now_unix()); // h7
    bench::seed_registry(&mut c, &agents).unwrap();
    let mut real = rekey_tests::Agent::new(tmp.path(), "real-agent", &[]);
    real.enroll_ok(&c, &["role=edge"]);
    real.start();
    rekey_tests::wait_for("real-agent connected", || c.is_connected("real-agent"));

    let names = |args: &[&str]| -> Vec<String> {
        let out = c.cli(&[&["agents", "-o", "json"], args].concat());
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        let v: Vec<AgentView> = serde_json::from_slice(&out.stdout).unwrap();
        v.into_iter().map(|a| a.name).collect()
    };
    let table = c.cli(&["agents"]);
    let stdout = text(&table.stdout);
    assert!(table.status.success(), "{}", text(&table.stderr));
    assert_eq!(stdout.lines().count(), 1 + 1000 + 1, "header, 1000 rows, footer");
    assert!(stdout.trim_end().ends_with("showing 1000 of 3001 agents, use --limit 0 for all"), "{stdout}");
    let five = text(&c.cli(&["agents", "--limit", "5"]).stdout);
    assert_eq!(five.lines().count(), 1 + 5 + 1, "{five}");
    assert!(five.contains("showing 5 of 3001 agents"), "{five}");
    assert_eq!(names(&[]).len(), 3001, "-o json lists all by default");
    assert_eq!(names(&["--limit", "0"]).len(), 3001);

    assert_eq!(names(&["--filter", "connected"]), ["real-agent"]);
    assert_eq!(names(&["--filter", "revoked"]), ["h7"]);
    let web = names(&["--filter", "disconnected", "--filter", "role=web"]);
    assert_eq!(web.len(), 300);
    assert!(web.iter().all(|n| n[1..].parse::<usize>().unwrap() % 10 == 0), "{web:?}");
    let mut h299 = names(&["--filter", "h299"]);
    h299.sort();
    assert_eq!(h299.len(), 11, "h299 and h2990..h2999: {h299:?}");
    assert_eq!(names(&["--filter", "role=none"]), Vec::<String>::new());
    let none = c.cli(&["agents", "--filter", "role=none"]);
    assert_eq!(text(&none.stdout).trim(), "no agent matches --filter role=none");

    for (bad, why) in [
        ("a b", "host names hold no such character"),
        ("=web", "the label key is empty"),
        ("role=a b", "the label value has a character labels cannot hold"),
    ] {
        let out = c.cli(&["agents", "--filter", bad]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{bad}");
        assert!(
            err.contains(&format!("--filter: invalid filter {bad:?}: {why}; expected connected, disconnected")),
            "{err}"
        );
    }
    for bad in ["--limit=-1", "--limit=all"] {
        let out = c.cli(&["agents", bad]);
        let err = text(&out.stderr);
        assert!(!out.status.success() && err.contains("invalid value") && err.contains("'--limit <N>'"), "{err}");
    }

    // rekeyd itself cuts the page and checks the terms (other API clients).
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut admin = rekey_tests::sim::admin(&c.addr(), &c.operator_dir()).await.unwrap();
        let r = admin.list_agents(ListAgentsRequest { limit: 10, filters: vec![] }).await.unwrap().into_inner();
        assert_eq!((r.agents.len(), r.total), (10, 3001));
        let e = admin.list_agents(ListAgentsRequest { limit: 0, filters: vec!["a;b".into()] }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("invalid filter \"a;b\": host names hold no such character"), "{e:?}");
    });
    real.kill();
}
