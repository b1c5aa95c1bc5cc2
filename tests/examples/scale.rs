//! The load benchmark: a real rekeyd and N simulated hosts in this process
//! (real enrollment, mTLS sessions and protocol; see `rekey_tests::bench`).
//! Prints figures; asserts nothing about time. Run it in a release build:
//!
//!     cargo run --release -p rekey-tests --example scale -- 10000 [APPLY_MS] [FAIL_RATE] [IDLE_S]
//!
//! `REKEY_BENCH_STORE=postgres` runs rekeyd on a PostgreSQL of its own
//! (`pgserver`, as the tests do) instead of sled: the same figures, per store.
//!
//! The method and the figures measured so far are in docs/benchmarks.md.

use rekey_tests::bench::{self, BenchOptions};
use std::time::Duration;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    rekey_common::tls::install_crypto_provider();
    let arg = |i: usize| std::env::args().nth(i);
    let d = BenchOptions::default();
    let opts = BenchOptions {
        hosts: arg(1).and_then(|a| a.parse().ok()).unwrap_or(d.hosts),
        apply: arg(2).and_then(|a| a.parse().ok()).map(Duration::from_millis).unwrap_or(d.apply),
        fail_rate: arg(3).and_then(|a| a.parse().ok()).unwrap_or(d.fail_rate),
        idle: arg(4).and_then(|a| a.parse().ok()).map(Duration::from_secs).unwrap_or(d.idle),
        store: match std::env::var("REKEY_BENCH_STORE").as_deref() {
            Ok("postgres") => rekey_tests::StoreKind::Postgres,
            Ok("sled") | Err(_) => rekey_tests::StoreKind::Sled,
            Ok(other) => anyhow::bail!("REKEY_BENCH_STORE={other:?}: expected sled or postgres"),
        },
        ..d
    };
    let limit = bench::raise_fd_limit();
    println!("store                      {:?}", opts.store);
    println!("descriptor limit           {limit} (each of rekeyd and this process holds one per host)");
    let tmp = tempfile::Builder::new().prefix("rekey-scale-").tempdir()?;
    let figures = bench::run(tmp.path(), &opts).await?;
    print!("{figures}");
    Ok(())
}
