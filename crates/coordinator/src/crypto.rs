//! Envelope encryption of everything secret the coordinator keeps at rest.
//!
//! The **master key** (256 bits, from `master_key_file` or `REKEYD_MASTER_KEY`)
//! never enters the data dir. It seals the CA private key and the store's
//! **data-encryption key** (DEK); the DEK seals secret values in the store.
//! Sealed blobs are `v1 || nonce(12) || AES-256-GCM(ciphertext || tag)` with a
//! purpose label as associated data, so a blob cannot be moved to another slot.

use rekey_common::secret::SecretBytes;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

const VERSION: u8 = 1;
pub const KEY_LEN: usize = 32;
pub const MASTER_KEY_ENV: &str = "REKEYD_MASTER_KEY";

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("cannot read master key file {path}")]
    ReadMaster {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write master key file {path}")]
    WriteMaster {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("master key {origin} is malformed: expected 64 hexadecimal characters (256 bits)")]
    MalformedMaster { origin: String },
    #[error("master key file {path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    MasterPermissions { path: PathBuf, mode: u32 },
    #[error("cannot decrypt {label}: wrong master key for this data dir, or the data was altered")]
    Open { label: String },
    #[error("sealed {label} is truncated or of an unknown format")]
    Format { label: String },
    #[error("system random number generator failed")]
    Random,
}

/// A 256-bit AES-GCM key. Zeroized on drop; never printed.
pub struct Key {
    bytes: Zeroizing<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Key {
    pub fn generate() -> Result<Key, CryptoError> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        SystemRandom::new().fill(bytes.as_mut()).map_err(|_| CryptoError::Random)?;
        Ok(Key { bytes })
    }

    fn from_hex(text: &str, origin: &str) -> Result<Key, CryptoError> {
        let raw = Zeroizing::new(
            hex::decode(text.trim()).map_err(|_| CryptoError::MalformedMaster { origin: origin.to_string() })?,
        );
        if raw.len() != KEY_LEN {
            return Err(CryptoError::MalformedMaster { origin: origin.to_string() });
        }
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        bytes.copy_from_slice(&raw);
        Ok(Key { bytes })
    }

    fn from_slice(raw: &[u8], label: &str) -> Result<Key, CryptoError> {
        if raw.len() != KEY_LEN {
            return Err(CryptoError::Format { label: label.to_string() });
        }
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        bytes.copy_from_slice(raw);
        Ok(Key { bytes })
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, self.bytes.as_ref()).expect("32-byte key"))
    }

    /// Encrypts `plaintext` for the slot named `label`.
    pub fn seal(&self, label: &str, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| CryptoError::Random)?;
        let mut buf = plaintext.to_vec();
        self.aead()
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(label.as_bytes()), &mut buf)
            .map_err(|_| CryptoError::Random)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buf.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(out)
    }

    /// Decrypts a blob sealed for `label`.
    pub fn open(&self, label: &str, sealed: &[u8]) -> Result<SecretBytes, CryptoError> {
        if sealed.len() < 1 + NONCE_LEN + AES_256_GCM.tag_len() || sealed[0] != VERSION {
            return Err(CryptoError::Format { label: label.to_string() });
        }
        let nonce = Nonce::try_assume_unique_for_key(&sealed[1..1 + NONCE_LEN])
            .map_err(|_| CryptoError::Format { label: label.to_string() })?;
        let mut buf = sealed[1 + NONCE_LEN..].to_vec();
        let len = self
            .aead()
            .open_in_place(nonce, Aad::from(label.as_bytes()), &mut buf)
            .map_err(|_| CryptoError::Open { label: label.to_string() })?
            .len();
        buf.truncate(len);
        Ok(SecretBytes::new(buf))
    }

    /// A subkey for `label` (HMAC-SHA256 of the label under this key), for
    /// MACs that must not reuse the encryption key.
    pub fn derive(&self, label: &str) -> Zeroizing<[u8; KEY_LEN]> {
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.bytes.as_ref());
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        out.copy_from_slice(ring::hmac::sign(&k, label.as_bytes()).as_ref());
        out
    }

    /// [`Key::derive`] as a key of its own (e.g. to seal backups while the
    /// master key itself is no longer held in memory).
    pub fn derive_key(&self, label: &str) -> Key {
        Key { bytes: self.derive(label) }
    }

    /// Seals another key (the DEK) under this one.
    pub fn wrap(&self, label: &str, key: &Key) -> Result<Vec<u8>, CryptoError> {
        self.seal(label, key.bytes.as_ref())
    }

    pub fn unwrap_key(&self, label: &str, sealed: &[u8]) -> Result<Key, CryptoError> {
        let raw = self.open(label, sealed)?;
        Key::from_slice(raw.expose(), label)
    }
}

/// Where the master key comes from: the environment wins over the file.
pub fn load_master_key(file: &Path) -> Result<Key, CryptoError> {
    if let Ok(v) = std::env::var(MASTER_KEY_ENV) {
        return Key::from_hex(&v, MASTER_KEY_ENV);
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(file).map_err(|source| CryptoError::ReadMaster { path: file.to_path_buf(), source })?,
    );
    check_private(file)?;
    Key::from_hex(&text, &file.display().to_string())
}

/// Whether a master key is provided (environment or an existing file).
pub fn master_key_configured(file: &Path) -> bool {
    std::env::var(MASTER_KEY_ENV).is_ok() || file.exists()
}

/// Creates a new master key file (0600) unless the environment provides one or
/// the file exists. Returns true when a new file was written.
pub fn ensure_master_key(file: &Path) -> Result<bool, CryptoError> {
    if std::env::var(MASTER_KEY_ENV).is_ok() || file.exists() {
        return Ok(false);
    }
    let key = Key::generate()?;
    let text = Zeroizing::new(format!("{}\n", hex::encode(key.bytes.as_ref())));
    write_private(file, text.as_bytes())
        .map_err(|source| CryptoError::WriteMaster { path: file.to_path_buf(), source })?;
    Ok(true)
}

fn check_private(file: &Path) -> Result<(), CryptoError> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(file).map_err(|source| CryptoError::ReadMaster { path: file.to_path_buf(), source })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CryptoError::MasterPermissions { path: file.to_path_buf(), mode });
    }
    Ok(())
}

/// Writes a file readable only by its owner: created 0600 beside the target,
/// fsynced, renamed over it, directory fsynced ([`rekey_common::fs::write_atomic`]).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    rekey_common::fs::write_atomic(path, bytes, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_roundtrip_and_binding() {
        let k = Key::generate().unwrap();
        let sealed = k.seal("ca-key", b"very secret").unwrap();
        assert!(!sealed.windows(11).any(|w| w == b"very secret"));
        assert_eq!(k.open("ca-key", &sealed).unwrap().expose(), b"very secret");
        // Another slot, another key, or a flipped bit: refused.
        assert!(matches!(k.open("dek", &sealed), Err(CryptoError::Open { .. })));
        assert!(matches!(Key::generate().unwrap().open("ca-key", &sealed), Err(CryptoError::Open { .. })));
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(k.open("ca-key", &bad).is_err());
        assert!(matches!(k.open("ca-key", &[1, 2, 3]), Err(CryptoError::Format { .. })));
    }

    #[test]
    fn master_key_file_is_created_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("master.key");
        assert!(ensure_master_key(&f).unwrap());
        assert!(!ensure_master_key(&f).unwrap());
        load_master_key(&f).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load_master_key(&f), Err(CryptoError::MasterPermissions { .. })));
        std::fs::write(&f, "abc").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(load_master_key(&f), Err(CryptoError::MalformedMaster { .. })));
    }
}
