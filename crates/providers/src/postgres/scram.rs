//! SCRAM-SHA-256 password verifiers, computed here as libpq's
//! `PQencryptPasswordConn` (and psql's `\password`) does, so that `ALTER
//! ROLE … PASSWORD` carries the verifier and never the password: the
//! plaintext reaches neither the server nor its statement log.
//!
//! `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (RFC 5803),
//! with `SaltedPassword = PBKDF2-HMAC-SHA256(password, salt, iterations)`,
//! `StoredKey = SHA256(HMAC(SaltedPassword, "Client Key"))` and `ServerKey =
//! HMAC(SaltedPassword, "Server Key")`, base64 throughout.
//!
//! libpq first normalises the password with SASLprep; rekey's generated
//! passwords are ASCII letters and digits, which SASLprep leaves unchanged,
//! so the verifier is the same.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::rand::{SecureRandom, SystemRandom};
use ring::{digest, hmac, pbkdf2};
use std::num::NonZeroU32;

/// PostgreSQL's default (`scram_iterations`).
pub const ITERATIONS: u32 = 4096;
pub const SALT_LEN: usize = 16;

/// The verifier of `password` with a fresh random salt.
pub fn verifier(password: &[u8]) -> Result<String, String> {
    let mut salt = [0u8; SALT_LEN];
    SystemRandom::new().fill(&mut salt).map_err(|_| "the system random generator failed".to_string())?;
    Ok(verifier_with(password, &salt, ITERATIONS))
}

/// The verifier of `password` with a given salt and iteration count.
pub fn verifier_with(password: &[u8], salt: &[u8], iterations: u32) -> String {
    let iterations = NonZeroU32::new(iterations.max(1)).expect("at least one iteration");
    let mut salted = [0u8; 32];
    pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA256, iterations, salt, password, &mut salted);
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&key, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
    let server_key = hmac::sign(&key, b"Server Key");
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored_key.as_ref()),
        STANDARD.encode(server_key.as_ref())
    )
}

/// Whether `v` has the verifier's shape and only characters that are safe
/// inside an SQL string literal (base64, digits, `$`, `:` and the prefix).
pub fn is_verifier(v: &str) -> bool {
    v.strip_prefix("SCRAM-SHA-256$").is_some_and(|rest| {
        rest.chars().all(|c| c.is_ascii_alphanumeric() || "+/=$:".contains(c)) && rest.split('$').count() == 2
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verifier_matches_a_known_vector() {
        // The vector of the postgres-protocol crate's test, itself checked
        // against libpq's PQencryptPasswordConn.
        let salt: Vec<u8> = (1..=16).collect();
        assert_eq!(
            verifier_with(b"secret", &salt, 4096),
            "SCRAM-SHA-256$4096:AQIDBAUGBwgJCgsMDQ4PEA==$8rrDg00OqaiWXJ7p+sCgHEIaBSHY89ZJl3mfIsf32oY=:05L1f+yZbiN8O0AnO40Og85NNRhvzTS57naKRWCcsIA="
        );
    }

    #[test]
    fn fresh_verifiers_are_salted_and_literal_safe() {
        let (a, b) = (verifier(b"pw").unwrap(), verifier(b"pw").unwrap());
        assert_ne!(a, b, "a fresh salt each time");
        assert!(is_verifier(&a) && a.starts_with("SCRAM-SHA-256$4096:"), "{a}");
        assert!(!a.contains("pw"));
        assert!(!is_verifier("SCRAM-SHA-256$4096:x$y:z'; drop role x; --"));
        assert!(!is_verifier("md5abc"));
    }
}
