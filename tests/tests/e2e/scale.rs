//! The load benchmark (`tests/examples/scale.rs`) at a small N, so it cannot
//! rot: every step runs against a real rekeyd, and what it measures must be
//! true of the run (all hosts enrolled, connected, back after a restart,
//! both rotations completed on every host). Nothing about time is asserted.

use rekey_tests::bench::{self, BenchOptions};
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
