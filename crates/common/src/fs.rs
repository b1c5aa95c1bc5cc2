//! Atomic file replacement, the one way rekey's binaries write a file that
//! must never be seen half-written or briefly readable by others.
//!
//! [`write_atomic`] is: a fresh temp file beside the target ([`tmp_path`],
//! created 0600 with `O_EXCL`, so the new content is never readable by
//! others, even briefly, and a planted symlink is refused rather than
//! followed), the content, owner then mode set on the open file, fsync,
//! rename over the target, fsync of the directory. A crash leaves either the
//! old or the new file, never a mix; a leftover temp file is removed by the
//! next write of the same target.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The temp file an atomic write of `path` uses: one per target, hidden,
/// beside it (same file system, so the rename is atomic).
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    path.with_file_name(format!(".{name}.rekey-tmp"))
}

/// Replaces `path` atomically with `content` and `mode`, owned by the writer.
/// The directory must exist.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_owned(path, content, mode, None, None)
}

/// [`write_atomic`] with an owner and group (`None`: whatever a new file
/// gets, i.e. the writer's). Only an id that differs from the new file's is
/// set, so an unprivileged writer may "keep" its own ownership.
pub fn write_atomic_owned(
    path: &Path,
    content: &[u8],
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
) -> io::Result<()> {
    let tmp = tmp_path(path);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    let result = (|| {
        f.write_all(content)?;
        set_owner_then_mode(&f, mode, uid, gid)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn set_owner_then_mode(f: &File, mode: u32, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let created = f.metadata()?;
    let uid = uid.filter(|u| *u != created.uid());
    let gid = gid.filter(|g| *g != created.gid());
    if uid.is_some() || gid.is_some() {
        // Owner before mode: chown clears set-id bits.
        std::os::unix::fs::fchown(f, uid, gid)?;
    }
    f.set_permissions(fs::Permissions::from_mode(mode))
}

/// Removes `path` (and a leftover temp file of it) and makes the removal
/// durable. A missing file is not an error.
pub fn remove_durably(path: &Path) -> io::Result<()> {
    let _ = fs::remove_file(tmp_path(path));
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    sync_dir(path)
}

/// fsync of the directory holding `path`: makes a rename or removal in it durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(p: &Path) -> (u32, u32, u32) {
        let m = fs::metadata(p).unwrap();
        (m.mode() & 0o7777, m.uid(), m.gid())
    }

    #[test]
    fn writes_the_mode_asked_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret.env");
        write_atomic(&p, b"K=v\n", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"K=v\n");
        assert_eq!(meta(&p).0, 0o600);
        write_atomic(&p, b"K=w\n", 0o644).unwrap();
        assert_eq!((fs::read(&p).unwrap().as_slice(), meta(&p).0), (&b"K=w\n"[..], 0o644));
        assert!(!tmp_path(&p).exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn the_temp_file_is_hidden_beside_the_target() {
        assert_eq!(tmp_path(Path::new("/etc/app/f.env")), Path::new("/etc/app/.f.env.rekey-tmp"));
        assert_eq!(tmp_path(Path::new("f")), Path::new(".f.rekey-tmp"));
    }

    #[test]
    fn a_stale_temp_file_or_planted_symlink_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, b"keep").unwrap();
        std::os::unix::fs::symlink(&elsewhere, tmp_path(&p)).unwrap();
        write_atomic(&p, b"v", 0o600).unwrap();
        assert_eq!(fs::read(&elsewhere).unwrap(), b"keep");
        assert_eq!(fs::read(&p).unwrap(), b"v");
    }

    #[test]
    fn a_failed_write_leaves_the_target_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty directory where the target is: the rename fails.
        let d = dir.path().join("d");
        fs::create_dir(&d).unwrap();
        fs::write(d.join("x"), b"old").unwrap();
        assert!(write_atomic(&d, b"new", 0o600).is_err());
        assert!(!tmp_path(&d).exists());
        assert_eq!(fs::read(d.join("x")).unwrap(), b"old");
    }

    /// As root: a given owner is set; either way the mode is the one asked.
    #[test]
    fn owner_and_mode_are_set() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("app.conf");
        // Files we create are ours: as root, give this one away.
        let (_, me, my_group) = meta(dir.path());
        let (uid, gid) = if me == 0 { (65534, 65534) } else { (me, my_group) };
        write_atomic_owned(&p, b"new", 0o640, Some(uid), Some(gid)).unwrap();
        assert_eq!(meta(&p), (0o640, uid, gid));
    }

    #[test]
    fn removal_is_durable_and_a_missing_file_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"v", 0o600).unwrap();
        fs::write(tmp_path(&p), b"leftover").unwrap();
        remove_durably(&p).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        remove_durably(&p).unwrap();
    }
}
