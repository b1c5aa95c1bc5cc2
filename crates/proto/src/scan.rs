//! The rules of a scope scan both sides must agree on (`ScanRequest` and
//! `ScanResult` in `agent.proto`): how the agent cuts lines into tokens, and
//! the limits the coordinator builds requests within and the agent enforces.

use std::ops::RangeInclusive;

/// Bytes that end a token: ASCII whitespace, quotes, backtick and the
/// punctuation that separates keys from what surrounds them in config
/// files. The coordinator never sends a needle containing one of them (for a
/// value that contains one, it searches the value's longest run without any).
pub const DELIMITERS: &[u8] = b" \t\r\n\x0b\x0c\"'`=:,;()[]{}<>&|";

/// Whether `b` ends a token ([`DELIMITERS`]).
pub fn is_delimiter(b: u8) -> bool {
    DELIMITERS.contains(&b)
}

/// Targets per request; the agent refuses more.
pub const MAX_TARGETS: usize = 64;

/// The longest needle; also the longest token whose windows the agent
/// compares (a longer token is only compared whole).
pub const MAX_NEEDLE: usize = 4096;

/// Matches an agent reports per scan; beyond, its result says `truncated`.
pub const MAX_MATCHES: usize = 500;

/// Skipped files an agent lists by path per scan (all are counted by reason).
pub const MAX_SKIPPED_LISTED: usize = 100;

/// Shortest token an agent fingerprints for a blind request: shorter values
/// are found only on their consumers.
pub const MIN_BLIND_TOKEN: usize = 8;

/// Token fingerprints an agent sends per blind scan (distinct per file);
/// beyond, its result says `truncated`.
pub const MAX_BLIND_TOKENS: usize = 20_000;

/// Salt lengths, in bytes, the agent accepts.
pub const SALT_LEN: RangeInclusive<usize> = 16..=64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delimiters_are_exactly_the_documented_ones() {
        for b in b" \t\r\n\x0b\x0c\"'`=:,;()[]{}<>&|" {
            assert!(is_delimiter(*b), "{}", *b as char);
        }
        for b in b"abzAZ09_-+/.~!@#$%^*?" {
            assert!(!is_delimiter(*b), "{}", *b as char);
        }
        assert_eq!(DELIMITERS.len(), 23);
    }
}
