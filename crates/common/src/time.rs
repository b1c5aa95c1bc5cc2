//! Wall-clock helpers. Core logic takes `now` as an argument; only the edges
//! call [`now_unix`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where "now" comes from when not from the system clock: a simulation's
/// clock (see [`install_clock`]). Never set in rekeyd, the agent or the CLI.
static CLOCK: std::sync::OnceLock<fn() -> Option<Duration>> = std::sync::OnceLock::new();

/// Makes [`now_unix`] and [`now_unix_ms`] read `source` first, for the whole
/// process: the deterministic simulation installs its simulated clock
/// (`turmoil::since_epoch`), which answers `None` outside a simulated host,
/// where the system clock is read as always. Once per process; false if a
/// clock was installed already.
pub fn install_clock(source: fn() -> Option<Duration>) -> bool {
    CLOCK.set(source).is_ok()
}

fn since_epoch() -> Duration {
    if let Some(now) = CLOCK.get().and_then(|source| source()) {
        return now;
    }
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Where timing jitter comes from when not from the OS's RNG (see [`install_jitter`]).
static JITTER: std::sync::OnceLock<fn(u64) -> Option<u64>> = std::sync::OnceLock::new();

/// Makes [`jitter`] ask `source` first, for the whole process: the
/// deterministic simulation installs its seeded RNG (`None` outside a
/// simulated host), so a seed replays the same reconnect and restart
/// timings. Never called by rekeyd, the agent or the CLI. Once per process.
pub fn install_jitter(source: fn(u64) -> Option<u64>) -> bool {
    JITTER.set(source).is_ok()
}

/// A random duration in `0..=max`, to spread timings (backoff, restart and
/// rollout jitter). Not for anything secret.
pub fn jitter(max: Duration) -> Duration {
    let max_ms = max.as_millis().min(u64::MAX as u128) as u64;
    if let Some(ms) = JITTER.get().and_then(|source| source(max_ms)) {
        return Duration::from_millis(ms.min(max_ms));
    }
    use rand::Rng;
    rand::rng().random_range(Duration::ZERO..=max)
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    since_epoch().as_secs() as i64
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> i64 {
    since_epoch().as_millis() as i64
}

/// RFC 3339 (UTC, seconds) for a Unix timestamp; `-` for zero (never happened).
pub fn format_unix(secs: i64) -> String {
    if secs <= 0 {
        return "-".to_string();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs as u64)).to_string()
}

/// RFC 3339 (UTC, milliseconds) for a Unix time in milliseconds, e.g.
/// `2026-12-02T11:38:35.123Z`; `-` for zero (never happened). For records
/// kept in milliseconds, where whole seconds would hide the order of events.
pub fn format_unix_ms(ms: i64) -> String {
    if ms <= 0 {
        return "-".to_string();
    }
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms as u64)).to_string()
}

/// A duration in milliseconds as `0.250s`, `14.620s` under two minutes, then
/// `3m`, `2h5m`: sub-second where it matters, coarse where it does not.
pub fn format_duration_ms(ms: i64) -> String {
    let ms = ms.max(0);
    let s = ms / 1000;
    if s < 120 {
        format!("{s}.{:03}s", ms % 1000)
    } else if s < 7200 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{}h{}m", s / 3600, s % 3600 / 60)
    }
}

/// "3m ago" / "in 23h" relative to `now`, coarse and readable.
pub fn format_relative(secs: i64, now: i64) -> String {
    if secs <= 0 {
        return "never".to_string();
    }
    let delta = now - secs;
    let (abs, future) = if delta >= 0 { (delta, false) } else { (-delta, true) };
    let text = if abs < 60 {
        format!("{abs}s")
    } else if abs < 3600 {
        format!("{}m", abs / 60)
    } else if abs < 86_400 {
        format!("{}h", abs / 3600)
    } else {
        format!("{}d", abs / 86_400)
    };
    if future { format!("in {text}") } else { format!("{text} ago") }
}

/// Parses "90s", "15m", "24h", "7d" (humantime syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e} (expected e.g. 90s, 15m, 24h)"))
}

/// Serde support for durations written as humantime strings in TOML.
pub mod serde_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*v).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times_read_naturally() {
        assert_eq!(format_relative(100, 130), "30s ago");
        assert_eq!(format_relative(100 + 7200, 100), "in 2h");
        assert_eq!(format_relative(0, 100), "never");
    }

    #[test]
    fn millisecond_times_keep_their_fraction() {
        assert_eq!(format_unix_ms(1_764_675_515_123), "2025-12-02T11:38:35.123Z");
        assert_eq!(format_unix_ms(0), "-");
        assert_eq!(format_duration_ms(250), "0.250s");
        assert_eq!(format_duration_ms(14_620), "14.620s");
        assert_eq!(format_duration_ms(185_000), "3m5s");
        assert_eq!(format_duration_ms(7_500_000), "2h5m");
    }

    #[test]
    fn durations_parse_and_reject_garbage() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert!(parse_duration("soon").unwrap_err().contains("expected"));
    }
}
