//! File system steps of an apply: reading a declared file, replacing it
//! atomically, removing it, private dirs, owners by name.
//!
//! A declared file is reached only through [`chase`] (no symlink the config
//! did not allow, no unsafe transition), and everything after that — the
//! read, the temp file, the rename, the fsync of the directory — happens
//! relative to the directory descriptor it opened, so a service user cannot
//! swap a component between the check and the use.

use super::chase::{ChaseError, Chased, chase};
use crate::config::IdSpec;
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::Mode;
use nix::unistd::{UnlinkatFlags, unlinkat};
use rekey_common::secret::SecretBytes;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Why a declared file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    Path(#[from] ChaseError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What a declared file looked like before the apply.
pub struct Current {
    /// Where it was found: its opened directory and name. Writes go there.
    pub at: Chased,
    /// `None`: the file does not exist.
    pub meta: Option<Meta>,
    pub content: Option<SecretBytes>,
}

impl Current {
    /// The path actually written (a symlink the config allows, expanded).
    pub fn target(&self) -> &Path {
        &self.at.path
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Reads a declared file, resolved by [`chase`] (`follow`: the file's
/// `follow_symlinks`). A symlink it may follow is expanded: the file it
/// points to is what gets replaced, so the link stays in place.
pub fn read_current(path: &Path, follow: bool) -> Result<Current, FileError> {
    let at = chase(path, follow)?;
    let Some(mut f) = at.open_file()? else {
        return Ok(Current { at, meta: None, content: None });
    };
    let m = f.metadata()?;
    let mut buf = Vec::with_capacity(m.len() as usize);
    f.read_to_end(&mut buf)?;
    Ok(Current {
        at,
        meta: Some(Meta { mode: m.mode() & 0o7777, uid: m.uid(), gid: m.gid() }),
        content: Some(SecretBytes::new(buf)),
    })
}

/// The temp file of an atomic replace of `name`: hidden, beside it.
fn tmp_name(name: &OsString) -> OsString {
    let mut t = OsString::from(".");
    t.push(name);
    t.push(".rekey-tmp");
    t
}

fn unlink_if_exists(dir: &File, name: &OsString) -> io::Result<()> {
    match unlinkat(dir, name.as_os_str(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Replaces the file at `at` atomically: a temp file created 0600 with
/// `O_EXCL | O_NOFOLLOW` in the same opened directory, the content, owner
/// then mode, fsync, `renameat` over the name, fsync of the directory.
pub fn replace(at: &Chased, content: &[u8], mode: u32, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let tmp = tmp_name(&at.name);
    unlink_if_exists(&at.dir, &tmp)?;
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut f = File::from(openat(&at.dir, tmp.as_os_str(), flags, Mode::from_bits_truncate(0o600))?);
    let result = (|| {
        f.write_all(content)?;
        let created = f.metadata()?;
        let uid = uid.filter(|u| *u != created.uid());
        let gid = gid.filter(|g| *g != created.gid());
        if uid.is_some() || gid.is_some() {
            // Owner before mode: chown clears set-id bits.
            std::os::unix::fs::fchown(&f, uid, gid)?;
        }
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        renameat(&at.dir, tmp.as_os_str(), &at.dir, at.name.as_os_str())?;
        at.dir.sync_all()
    })();
    if result.is_err() {
        let _ = unlink_if_exists(&at.dir, &tmp);
    }
    result
}

/// Removes the file at `at` (and a leftover temp file of it), durably. A
/// missing file is not an error.
pub fn remove(at: &Chased) -> io::Result<()> {
    let _ = unlink_if_exists(&at.dir, &tmp_name(&at.name));
    match unlinkat(&at.dir, at.name.as_os_str(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) => at.dir.sync_all(),
        Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes a leftover temp file beside `path` (resolved without following
/// anything): what an apply interrupted before writing that file may leave.
pub fn remove_temp(path: &Path) {
    if let Ok(at) = chase(path, false) {
        let _ = unlink_if_exists(&at.dir, &tmp_name(&at.name));
    }
}

/// Creates `dir` (and missing parents) with mode 0700, and makes `dir` itself 0700.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
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

    fn meta(p: &Path) -> Meta {
        read_current(p, false).unwrap().meta.unwrap()
    }

    fn write(p: &Path, content: &[u8], mode: u32, uid: Option<u32>, gid: Option<u32>) {
        replace(&chase(p, false).unwrap(), content, mode, uid, gid).unwrap();
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
        write(&p, b"new", m.mode, Some(m.uid), Some(m.gid));
        assert_eq!(fs::read(&p).unwrap(), b"new");
        let after = meta(&p);
        assert_eq!(after.mode, 0o640);
        if is_root {
            assert_eq!((after.uid, after.gid), (65534, 65534));
        }
        // A configured mode and owner win.
        write(&p, b"newer", 0o400, Some(0), Some(0));
        assert_eq!(meta(&p), Meta { mode: 0o400, uid: 0, gid: 0 });
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left");
    }

    /// Only where the config allows it (and the link is root's or the
    /// agent's): then the target is replaced and the link stays.
    #[test]
    fn symlinked_files_are_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.conf");
        let link = dir.path().join("link.conf");
        fs::write(&real, b"old").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = read_current(&link, false).err().unwrap().to_string();
        assert!(e.contains("link.conf is a symlink"), "{e}");
        let cur = read_current(&link, true).unwrap();
        assert_eq!(cur.target(), real);
        replace(&cur.at, b"new", 0o600, None, None).unwrap();
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(fs::read(&link).unwrap(), b"new");
    }

    /// A symlink planted at the temp file's name is replaced, not followed.
    #[test]
    fn a_planted_temp_file_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, b"keep").unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join(".f.rekey-tmp")).unwrap();
        write(&p, b"v", 0o600, None, None);
        assert_eq!(fs::read(&elsewhere).unwrap(), b"keep");
        assert_eq!(fs::read(&p).unwrap(), b"v");
    }

    #[test]
    fn missing_file_and_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let cur = read_current(&dir.path().join("nope"), false).unwrap();
        assert!(cur.meta.is_none() && cur.content.is_none());
        let e = read_current(&dir.path().join("no/such/file"), false).err().unwrap();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let e = read_current(dir.path(), false).err().unwrap();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        remove(&cur.at).unwrap();
        write(&dir.path().join("x"), b"v", 0o600, None, None);
        fs::write(dir.path().join(".x.rekey-tmp"), b"leftover").unwrap();
        remove(&chase(&dir.path().join("x"), false).unwrap()).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn private_dirs_are_0700_parents_included() {
        let dir = tempfile::tempdir().unwrap();
        private_dir(&dir.path().join("a/b")).unwrap();
        for d in ["a", "a/b"] {
            assert_eq!(fs::metadata(dir.path().join(d)).unwrap().mode() & 0o777, 0o700, "{d}");
        }
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
