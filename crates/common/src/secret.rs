//! Secret values as a type: `Debug` and `Display` never show the bytes, the
//! memory is zeroized on drop, and reading the value takes an explicit call
//! to [`SecretBytes::expose`].

use secrecy::{ExposeSecret, SecretBox};
use std::fmt;

/// Bytes of a secret value (a token, a password, a secret access key).
pub struct SecretBytes(SecretBox<Vec<u8>>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretBytes(SecretBox::new(Box::new(bytes)))
    }

    /// The raw bytes. Every call site is a place a value could leak: keep them few.
    pub fn expose(&self) -> &[u8] {
        self.0.expose_secret()
    }

    pub fn len(&self) -> usize {
        self.expose().len()
    }

    pub fn is_empty(&self) -> bool {
        self.expose().is_empty()
    }
}

impl Clone for SecretBytes {
    fn clone(&self) -> Self {
        SecretBytes::new(self.expose().to_vec())
    }
}

impl PartialEq for SecretBytes {
    fn eq(&self, other: &Self) -> bool {
        // Constant time for equal lengths: no early exit on the first differing byte.
        let (a, b) = (self.expose(), other.expose());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted {} bytes>", self.len())
    }
}

impl fmt::Display for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(v: Vec<u8>) -> Self {
        SecretBytes::new(v)
    }
}

/// Keyed fingerprint of a value: `hmac-sha256:` + the first 16 bytes in hex.
/// With a per-rotation key it proves which version a host loaded without
/// revealing the value or allowing an offline guess across rotations.
pub fn keyed_fingerprint(key: &[u8], value: &[u8]) -> String {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&k, value);
    format!("hmac-sha256:{}", hex::encode(&tag.as_ref()[..16]))
}

/// Keyed fingerprint of a whole secret version (all its named fields), the
/// value an agent reports as "loaded" and the coordinator expects. Fields are
/// taken in name order, each length-prefixed, so no two versions collide by
/// concatenation.
pub fn fingerprint_fields<'a>(key: &[u8], fields: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut v: Vec<(&str, &[u8])> = fields.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut ctx = ring::hmac::Context::with_key(&k);
    for (name, value) in v {
        ctx.update(&(name.len() as u64).to_be_bytes());
        ctx.update(name.as_bytes());
        ctx.update(&(value.len() as u64).to_be_bytes());
        ctx.update(value);
    }
    format!("hmac-sha256:{}", hex::encode(&ctx.sign().as_ref()[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = SecretBytes::new(b"AKIAEXAMPLESECRET".to_vec());
        assert_eq!(format!("{s:?}"), "<redacted 17 bytes>");
        assert_eq!(format!("{s}"), "<redacted>");
        assert_eq!(s.expose(), b"AKIAEXAMPLESECRET");
    }

    #[test]
    fn field_fingerprints_are_order_independent_and_unambiguous() {
        let a = fingerprint_fields(b"k", [("id", &b"AK"[..]), ("secret", &b"xyz"[..])]);
        let b = fingerprint_fields(b"k", [("secret", &b"xyz"[..]), ("id", &b"AK"[..])]);
        assert_eq!(a, b);
        let c = fingerprint_fields(b"k", [("id", &b"AKx"[..]), ("secret", &b"yz"[..])]);
        assert_ne!(a, c);
    }

    #[test]
    fn fingerprints_depend_on_key_and_value() {
        let a = keyed_fingerprint(b"k1", b"v");
        assert_ne!(a, keyed_fingerprint(b"k2", b"v"));
        assert_ne!(a, keyed_fingerprint(b"k1", b"w"));
        assert_eq!(a, keyed_fingerprint(b"k1", b"v"));
        assert!(!a.contains('v'));
    }
}
