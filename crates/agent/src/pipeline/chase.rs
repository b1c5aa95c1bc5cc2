//! Resolving a declared path the way a root process on a host with hostile
//! service users must: component by component from `/`, each directory
//! opened with `openat(O_DIRECTORY | O_NOFOLLOW)` relative to its parent's
//! descriptor — systemd's `chase()` with `CHASE_SAFE`, plus a symlink rule.
//!
//! - A symlink anywhere on the path is refused unless the file's config sets
//!   `follow_symlinks = true`; even then only a link owned by root or by the
//!   agent's own user is followed (at most [`MAX_LINKS`] of them). A link
//!   planted by a service user is never followed.
//! - An *unsafe transition* is refused: a directory owned by a user other
//!   than root (and the agent's own user) holding an entry owned by yet
//!   another user who is not root either. That is systemd's rule, so a
//!   service user cannot make the agent reach another user's files through
//!   a directory it controls.
//! - The result is the *opened* directory and the final name: the caller
//!   reads the file, creates the temp file, renames and fsyncs relative to
//!   that descriptor ([`super::files`]), so nothing can be swapped between
//!   the check and the use. The final entry is opened with `O_NOFOLLOW`.
//!
//! `..` is resolved against the directories already opened (never by asking
//! the kernel for `..` of a directory a user could have moved).

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat};
use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Symlinks followed while resolving one path (the kernel's own limit is 40).
pub const MAX_LINKS: u32 = 32;

/// Why a path was refused. Every message names the path and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ChaseError {
    #[error("{path} is not an absolute path")]
    NotAbsolute { path: PathBuf },
    #[error(
        "{path} is a symlink (to {}) and this file's config does not allow following symlinks \
         (follow_symlinks = true)", .target.display()
    )]
    Symlink { path: PathBuf, target: PathBuf },
    #[error(
        "{path} is a symlink owned by uid {uid}; only a symlink owned by root or by the agent's own user is followed"
    )]
    UntrustedSymlink { path: PathBuf, uid: u32 },
    #[error(
        "unsafe path transition: {dir} is owned by uid {dir_uid} but {path} in it is owned by uid {uid} \
         (a directory owned by a user other than root may only hold entries of that user or root)"
    )]
    UnsafeTransition { dir: PathBuf, dir_uid: u32, path: PathBuf, uid: u32 },
    #[error("too many levels of symlinks resolving {path}")]
    TooManyLinks { path: PathBuf },
    #[error("directory {path} does not exist")]
    MissingDir { path: PathBuf },
    #[error("{path} is not a directory")]
    NotDir { path: PathBuf },
    #[error("{path} is not a regular file")]
    NotFile { path: PathBuf },
    #[error("{path} changed while it was being resolved")]
    Changed { path: PathBuf },
    #[error("cannot open {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path, e: Errno) -> ChaseError {
    ChaseError::Io { path: path.to_path_buf(), source: io::Error::from(e) }
}

/// Root, or the user the agent runs as: the owners whose links and
/// directories the agent trusts.
pub fn trusted(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// systemd's `unsafe_transition`, with the agent's own user counted as root.
fn unsafe_transition(dir_uid: u32, entry_uid: u32) -> bool {
    !trusted(dir_uid) && entry_uid != dir_uid && !trusted(entry_uid)
}

/// An opened directory on the resolved path.
struct Dir {
    file: File,
    uid: u32,
    path: PathBuf,
}

/// A resolved path: the opened directory that holds the final entry, and
/// its name in it.
#[derive(Debug)]
pub struct Chased {
    /// The directory, opened `O_RDONLY | O_DIRECTORY` (fsync works on it).
    pub dir: File,
    pub dir_uid: u32,
    /// The final component (never `.` or `..`).
    pub name: OsString,
    /// The resolved path (symlinks it was allowed to follow expanded).
    pub path: PathBuf,
    /// `lstat` of the entry while resolving; `None`: it did not exist.
    pub entry: Option<Entry>,
}

/// What the final entry was while resolving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub dev: u64,
    pub ino: u64,
    pub uid: u32,
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// The normal components of `p`, with `..` kept (resolved while walking).
fn components(p: &Path) -> impl Iterator<Item = OsString> + '_ {
    p.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_os_string()),
        Component::ParentDir => Some(OsString::from("..")),
        _ => None,
    })
}

fn open_dir(parent: &File, name: &OsStr, path: &Path) -> Result<File, ChaseError> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    match openat(parent, name, flags, Mode::empty()) {
        Ok(fd) => Ok(File::from(fd)),
        // Replaced by a symlink or a file since the lstat.
        Err(Errno::ELOOP | Errno::ENOTDIR) => Err(ChaseError::Changed { path: path.to_path_buf() }),
        Err(e) => Err(io_err(path, e)),
    }
}

fn root() -> Result<Dir, ChaseError> {
    let slash = Path::new("/");
    let fd = openat(AT_FDCWD, slash, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| io_err(slash, e))?;
    let file = File::from(fd);
    let uid = file.metadata().map_err(|source| ChaseError::Io { path: slash.into(), source })?.uid();
    Ok(Dir { file, uid, path: slash.into() })
}

fn check_transition(dir: &Dir, path: &Path, uid: u32) -> Result<(), ChaseError> {
    if unsafe_transition(dir.uid, uid) {
        return Err(ChaseError::UnsafeTransition { dir: dir.path.clone(), dir_uid: dir.uid, path: path.into(), uid });
    }
    Ok(())
}

/// Resolves `path` (absolute) to its directory, opened, and final name.
/// `follow`: symlinks owned by root or the agent's user are followed.
pub fn chase(path: &Path, follow: bool) -> Result<Chased, ChaseError> {
    if !path.is_absolute() {
        return Err(ChaseError::NotAbsolute { path: path.into() });
    }
    let mut todo: VecDeque<OsString> = components(path).collect();
    let mut stack = vec![root()?];
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            if stack.len() > 1 {
                stack.pop();
            }
            continue;
        }
        let cur = stack.last().expect("the root stays on the stack");
        let here = cur.path.join(&name);
        let last = todo.is_empty();
        let st = match fstatat(&cur.file, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Some(st),
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(io_err(&here, e)),
        };
        let Some(st) = st else {
            if !last {
                return Err(ChaseError::MissingDir { path: here });
            }
            let dir = stack.pop().expect("the root stays on the stack");
            return Ok(Chased { dir: dir.file, dir_uid: dir.uid, name, path: here, entry: None });
        };
        if kind(&st) == SFlag::S_IFLNK {
            let target = PathBuf::from(readlinkat(&cur.file, name.as_os_str()).map_err(|e| io_err(&here, e))?);
            if !follow {
                return Err(ChaseError::Symlink { path: here, target });
            }
            if !trusted(st.st_uid) {
                return Err(ChaseError::UntrustedSymlink { path: here, uid: st.st_uid });
            }
            links += 1;
            if links > MAX_LINKS {
                return Err(ChaseError::TooManyLinks { path: path.into() });
            }
            if target.is_absolute() {
                stack.truncate(1);
            }
            for c in components(&target).collect::<Vec<_>>().into_iter().rev() {
                todo.push_front(c);
            }
            continue;
        }
        check_transition(cur, &here, st.st_uid)?;
        let entry = Entry { dev: st.st_dev, ino: st.st_ino, uid: st.st_uid };
        if last {
            let dir = stack.pop().expect("the root stays on the stack");
            return Ok(Chased { dir: dir.file, dir_uid: dir.uid, name, path: here, entry: Some(entry) });
        }
        if kind(&st) != SFlag::S_IFDIR {
            return Err(ChaseError::NotDir { path: here });
        }
        let file = open_dir(&cur.file, &name, &here)?;
        let m = file.metadata().map_err(|source| ChaseError::Io { path: here.clone(), source })?;
        if (m.dev(), m.ino()) != (entry.dev, entry.ino) {
            return Err(ChaseError::Changed { path: here });
        }
        check_transition(cur, &here, m.uid())?;
        stack.push(Dir { file, uid: m.uid(), path: here });
    }
    // Only `/`, or a path ending in `..`: not a file.
    Err(ChaseError::NotFile { path: path.into() })
}

impl Chased {
    /// Opens the final entry for reading (`O_NOFOLLOW`, non-blocking so a
    /// FIFO cannot hang the agent). `None`: it does not exist. Refuses
    /// anything but a regular file, and an unsafe transition into it.
    pub fn open_file(&self) -> Result<Option<File>, ChaseError> {
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
        let file = match openat(&self.dir, self.name.as_os_str(), flags, Mode::empty()) {
            Ok(fd) => File::from(fd),
            Err(Errno::ENOENT) => return Ok(None),
            // A symlink now stands where the resolution found a file (or the
            // link it was allowed to follow was swapped): refuse.
            Err(Errno::ELOOP) => return Err(ChaseError::Changed { path: self.path.clone() }),
            Err(e) => return Err(io_err(&self.path, e)),
        };
        let m = file.metadata().map_err(|source| ChaseError::Io { path: self.path.clone(), source })?;
        if !m.is_file() {
            return Err(ChaseError::NotFile { path: self.path.clone() });
        }
        if unsafe_transition(self.dir_uid, m.uid()) {
            let dir = self.path.parent().unwrap_or(Path::new("/")).to_path_buf();
            return Err(ChaseError::UnsafeTransition {
                dir,
                dir_uid: self.dir_uid,
                path: self.path.clone(),
                uid: m.uid(),
            });
        }
        Ok(Some(file))
    }
}

/// `path` with `.` dropped and `..` applied lexically (`/a/../b` → `/b`;
/// `..` above `/` stays at `/`). For comparing declared paths.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir => out.push("/"),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn chown(p: &Path, uid: u32) {
        std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
    }

    #[test]
    fn plain_paths_resolve_to_their_directory_and_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/f"), b"x").unwrap();
        let c = chase(&dir.path().join("d/./f"), false).unwrap();
        assert_eq!(c.name, "f");
        assert_eq!(c.path, dir.path().join("d/f"));
        assert!(c.entry.is_some());
        assert!(c.open_file().unwrap().is_some());
        let c = chase(&dir.path().join("d/../d/missing"), false).unwrap();
        assert_eq!((c.path.clone(), c.entry), (dir.path().join("d/missing"), None));
        assert!(c.open_file().unwrap().is_none());
        let e = chase(&dir.path().join("nope/f"), false).unwrap_err().to_string();
        assert!(e.starts_with("directory ") && e.ends_with("nope does not exist"), "{e}");
        let e = chase(&dir.path().join("d/f/g"), false).unwrap_err().to_string();
        assert!(e.ends_with("d/f is not a directory"), "{e}");
        let e = chase(dir.path(), false).unwrap().open_file().unwrap_err().to_string();
        assert!(e.ends_with("is not a regular file"), "{e}");
        assert!(matches!(chase(Path::new("rel/f"), false), Err(ChaseError::NotAbsolute { .. })));
    }

    #[test]
    fn symlinks_are_refused_unless_allowed_and_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("v2.conf"), b"x").unwrap();
        symlink("v2.conf", d.join("current.conf")).unwrap();
        std::fs::create_dir(d.join("real")).unwrap();
        symlink(d.join("real"), d.join("linkdir")).unwrap();
        // Final component and intermediate directory alike.
        let e = chase(&d.join("current.conf"), false).unwrap_err().to_string();
        assert!(e.contains("current.conf is a symlink (to v2.conf)") && e.contains("follow_symlinks = true"), "{e}");
        let e = chase(&d.join("linkdir/f"), false).unwrap_err().to_string();
        assert!(e.contains("linkdir is a symlink"), "{e}");
        // Allowed: expanded to the target.
        let c = chase(&d.join("current.conf"), true).unwrap();
        assert_eq!(c.path, d.join("v2.conf"));
        assert_eq!(chase(&d.join("linkdir/f"), true).unwrap().path, d.join("real/f"));
        // A relative link with `..` resolves against the opened directories.
        symlink("../v2.conf", d.join("real/up.conf")).unwrap();
        assert_eq!(chase(&d.join("real/up.conf"), true).unwrap().path, d.join("v2.conf"));
        // A loop ends.
        symlink("loop-b", d.join("loop-a")).unwrap();
        symlink("loop-a", d.join("loop-b")).unwrap();
        let e = chase(&d.join("loop-a"), true).unwrap_err().to_string();
        assert!(e.starts_with("too many levels of symlinks"), "{e}");
        if is_root() {
            // A link owned by another user is never followed.
            chown(&d.join("current.conf"), 65534);
            let e = chase(&d.join("current.conf"), true).unwrap_err().to_string();
            assert!(e.contains("is a symlink owned by uid 65534; only a symlink owned by root"), "{e}");
        }
    }

    /// As root: a directory owned by a service user may hold its own files
    /// and root's, not a third user's.
    #[test]
    fn unsafe_transitions_are_refused() {
        if !is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let svc = dir.path().join("svc");
        std::fs::create_dir(&svc).unwrap();
        chown(&svc, 65534);
        for (name, uid) in [("own", 65534), ("roots", 0), ("other", 65533)] {
            std::fs::write(svc.join(name), b"x").unwrap();
            chown(&svc.join(name), uid);
        }
        assert!(chase(&svc.join("own"), false).unwrap().open_file().unwrap().is_some());
        assert!(chase(&svc.join("roots"), false).unwrap().open_file().unwrap().is_some());
        let e = chase(&svc.join("other"), false).unwrap_err().to_string();
        assert!(e.starts_with("unsafe path transition: ") && e.contains("owned by uid 65534 but"), "{e}");
        assert!(e.contains("other in it is owned by uid 65533"), "{e}");
        // The same for a directory on the way.
        std::fs::create_dir(svc.join("sub")).unwrap();
        chown(&svc.join("sub"), 65533);
        let e = chase(&svc.join("sub/f"), false).unwrap_err().to_string();
        assert!(e.starts_with("unsafe path transition: "), "{e}");
    }

    #[test]
    fn normalize_applies_dots_lexically() {
        assert_eq!(normalize(Path::new("/etc/app/../app/./a.conf")), Path::new("/etc/app/a.conf"));
        assert_eq!(normalize(Path::new("/../etc//a")), Path::new("/etc/a"));
    }
}
