//! File system steps of an apply: reading a declared file, private dirs,
//! owners by name. Replacing a file (atomically, with its mode and owner)
//! and removing it durably are [`rekey_common::fs`]'s `write_atomic_owned`
//! and `remove_durably`: a temp file created 0600 beside the target, owner
//! then mode, fsync, rename, fsync of the directory.

use crate::config::IdSpec;
use rekey_common::secret::SecretBytes;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What a declared file looked like before the apply.
pub struct Current {
    /// The path actually written: the target of a symlink, else the path.
    pub target: PathBuf,
    /// `None`: the file does not exist.
    pub meta: Option<Meta>,
    pub content: Option<SecretBytes>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Reads a declared file. A symlink is followed: the file it points to is
/// what gets replaced, so the link stays in place.
pub fn read_current(path: &Path) -> io::Result<Current> {
    let target = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => fs::canonicalize(path)?,
        Ok(_) => path.to_path_buf(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let dir = path.parent().unwrap_or(Path::new("/"));
            if !dir.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("directory {} does not exist", dir.display()),
                ));
            }
            return Ok(Current { target: path.to_path_buf(), meta: None, content: None });
        }
        Err(e) => return Err(e),
    };
    let mut f = File::open(&target)?;
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    let mut buf = Vec::with_capacity(m.len() as usize);
    f.read_to_end(&mut buf)?;
    Ok(Current {
        target,
        meta: Some(Meta { mode: m.mode() & 0o7777, uid: m.uid(), gid: m.gid() }),
        content: Some(SecretBytes::new(buf)),
    })
}

/// Creates `dir` (and parents) with mode 0700.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// A user name or id, as a uid.
pub fn resolve_user(spec: &IdSpec) -> Result<u32, String> {
    match spec {
        IdSpec::Id(n) => Ok(*n),
        IdSpec::Name(name) => match nix::unistd::User::from_name(name) {
            Ok(Some(u)) => Ok(u.uid.as_raw()),
            Ok(None) => Err(format!("no user named {name}")),
            Err(e) => Err(format!("cannot look up user {name}: {e}")),
        },
    }
}

/// A group name or id, as a gid.
pub fn resolve_group(spec: &IdSpec) -> Result<u32, String> {
    match spec {
        IdSpec::Id(n) => Ok(*n),
        IdSpec::Name(name) => match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => Ok(g.gid.as_raw()),
            Ok(None) => Err(format!("no group named {name}")),
            Err(e) => Err(format!("cannot look up group {name}: {e}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rekey_common::fs::{remove_durably, write_atomic, write_atomic_owned};

    fn meta(p: &Path) -> Meta {
        read_current(p).unwrap().meta.unwrap()
    }

    /// As root: the existing file's mode and owner (uid 65534) survive the
    /// replacement when the caller passes them back, as the pipeline does.
    #[test]
    fn atomic_write_preserves_mode_and_owner() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("app.conf");
        fs::write(&p, b"old").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let is_root = nix::unistd::Uid::effective().is_root();
        if is_root {
            std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
        }
        let m = meta(&p);
        write_atomic_owned(&p, b"new", m.mode, Some(m.uid), Some(m.gid)).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        let after = meta(&p);
        assert_eq!(after.mode, 0o640);
        if is_root {
            assert_eq!((after.uid, after.gid), (65534, 65534));
        }
        // A configured mode and owner win.
        write_atomic_owned(&p, b"newer", 0o400, Some(0), Some(0)).unwrap();
        assert_eq!(meta(&p), Meta { mode: 0o400, uid: 0, gid: 0 });
    }

    #[test]
    fn symlinked_files_are_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.conf");
        let link = dir.path().join("link.conf");
        fs::write(&real, b"old").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let cur = read_current(&link).unwrap();
        assert_eq!(cur.target, fs::canonicalize(&real).unwrap());
        write_atomic(&cur.target, b"new", 0o600).unwrap();
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(fs::read(&link).unwrap(), b"new");
    }

    #[test]
    fn missing_file_and_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let cur = read_current(&dir.path().join("nope")).unwrap();
        assert!(cur.meta.is_none() && cur.content.is_none());
        let e = read_current(&dir.path().join("no/such/file")).err().unwrap();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let e = read_current(dir.path()).err().unwrap();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        remove_durably(&dir.path().join("nope")).unwrap();
    }

    #[test]
    fn users_and_groups_resolve_by_name_or_id() {
        assert_eq!(resolve_user(&IdSpec::Name("root".into())), Ok(0));
        assert_eq!(resolve_user(&IdSpec::Id(65534)), Ok(65534));
        assert_eq!(resolve_group(&IdSpec::Name("root".into())), Ok(0));
        assert_eq!(
            resolve_user(&IdSpec::Name("no-such-user-xyz".into())),
            Err("no user named no-such-user-xyz".into())
        );
        assert_eq!(
            resolve_group(&IdSpec::Name("no-such-group-xyz".into())),
            Err("no group named no-such-group-xyz".into())
        );
    }
}
