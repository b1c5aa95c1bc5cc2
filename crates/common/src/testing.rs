//! The one time budget every test that waits for real processes derives its
//! deadlines from.
//!
//! Tests wait on conditions (a file appears, a rotation reaches a state), never
//! on elapsed time alone; the budget only bounds how long a broken test hangs.
//! It is generous by default so a loaded 2-core machine never trips it, and
//! `REKEY_TEST_BUDGET` (seconds, or a humantime duration such as `5m`) changes
//! it for everyone at once.

use std::time::Duration;

/// Default budget for one wait: long enough for a debug build on a busy
/// machine, short enough that a hung test still fails within minutes.
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(180);

/// The budget for one wait on a condition (`REKEY_TEST_BUDGET`, default 180 s).
/// An unparseable value panics naming the variable: a typo must not silently
/// turn into the default.
pub fn budget() -> Duration {
    match std::env::var("REKEY_TEST_BUDGET") {
        Err(_) => DEFAULT_BUDGET,
        Ok(v) => parse_budget(&v)
            .unwrap_or_else(|| panic!("REKEY_TEST_BUDGET={v:?}: expected seconds (e.g. 300) or a duration (e.g. 5m)")),
    }
}

fn parse_budget(v: &str) -> Option<Duration> {
    let v = v.trim();
    v.parse::<u64>().map(Duration::from_secs).ok().or_else(|| humantime::parse_duration(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_reads_seconds_or_durations() {
        assert_eq!(parse_budget("300"), Some(Duration::from_secs(300)));
        assert_eq!(parse_budget(" 5m "), Some(Duration::from_secs(300)));
        assert_eq!(parse_budget("soon"), None);
    }
}
