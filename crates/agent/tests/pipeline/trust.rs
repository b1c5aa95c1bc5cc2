//! The agent runs as root; the service users whose config directories it
//! writes may be hostile. Each test plants what such a user could, in a
//! directory owned by `nobody` (uid 65534) inside a temp dir, and checks
//! that the apply refuses it with a clear reason and writes nothing.
//! Without root (no chown) the ownership cases are skipped, and say so.

use super::*;
use std::os::unix::fs::{lchown, symlink};

const NOBODY: u32 = 65534;
const NEW_VALUE: &str = "tok_NEW-VALUE-d41d8cd98f";

/// A temp dir with `svc/`, the config dir a service user owns.
struct Box {
    dir: tempfile::TempDir,
}

impl Box {
    fn new() -> Box {
        logs();
        let dir = tempfile::Builder::new().prefix("rekey-trust-").tempdir().unwrap();
        std::fs::create_dir(dir.path().join("svc")).unwrap();
        if is_root() {
            lchown(dir.path().join("svc"), Some(NOBODY), Some(NOBODY)).unwrap();
        }
        Box { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A file planted by (and owned by) the service user.
    fn plant_link(&self, link: &str, target: &Path) {
        symlink(target, self.path(link)).unwrap();
        if is_root() {
            lchown(self.path(link), Some(NOBODY), Some(NOBODY)).unwrap();
        }
    }

    fn config(&self, blocks: &str) -> Result<AgentConfig, String> {
        let text = format!("state_dir = \"state\"\n[[secret]]\nname = \"{SECRET}\"\n{blocks}")
            .replace("@DIR@", &self.dir.path().display().to_string());
        AgentConfig::from_str(&self.path("agent.toml"), &text).map_err(|e| e.to_string())
    }

    fn pipeline(&self, blocks: &str) -> Pipeline {
        let config = self.config(blocks).unwrap_or_else(|e| panic!("{e}"));
        Pipeline::open(&config, Outbox::new()).unwrap()
    }

    /// Every entry of `svc/` (no temp file may be left behind).
    fn svc_entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.path("svc"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

fn template(path: &str, extra: &str) -> String {
    format!(
        "[[secret.file]]\npath = \"@DIR@/{path}\"\nkind = \"template\"\ntemplate = \"token={{{{ value }}}}\\n\"\n{extra}\n"
    )
}

/// Bytes, mode, owner: what must not change.
fn snapshot(p: &Path) -> (Vec<u8>, u32, u32, u32) {
    let m = std::fs::metadata(p).unwrap();
    (std::fs::read(p).unwrap(), m.mode() & 0o7777, m.uid(), m.gid())
}

/// Delivers `NEW_VALUE` and expects a failure with nothing touched; returns the reason.
async fn refused(pipeline: &Pipeline) -> String {
    let reports = pipeline.deliver(delivery("v2", NEW_VALUE, None)).await;
    assert_eq!(stages(&reports), [Delivered, Failed, RolledBack], "{reports:?}");
    assert!(pipeline.applied().is_empty());
    let reason = reports[1].error.clone();
    assert!(!reason.contains(NEW_VALUE) && !log_text().contains(NEW_VALUE), "the value leaked");
    reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_link_to_a_root_only_file_is_refused_and_nothing_is_written() {
    let b = Box::new();
    // Stands for /etc/important.conf: root's, 0600.
    let important = b.path("important.conf");
    std::fs::write(&important, "root-only = true\n").unwrap();
    std::fs::set_permissions(&important, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = snapshot(&important);
    b.plant_link("svc/app.conf", &important);
    let entries = b.svc_entries();

    let reason = refused(&b.pipeline(&template("svc/app.conf", ""))).await;
    let link = b.path("svc/app.conf");
    assert_eq!(
        reason,
        format!(
            "cannot read {0}: {0} is a symlink (to {1}) and this file's config does not allow following symlinks \
             (follow_symlinks = true)",
            link.display(),
            important.display()
        )
    );
    assert_eq!(snapshot(&important), before, "the root-only target changed");
    assert_eq!(b.svc_entries(), entries);

    // Even where the config allows links, one planted by the service user is not followed.
    if is_root() {
        let reason = refused(&b.pipeline(&template("svc/app.conf", "follow_symlinks = true"))).await;
        assert!(
            reason.ends_with(&format!(
                "{} is a symlink owned by uid 65534; only a symlink owned by root or by the agent's own user is followed",
                link.display()
            )),
            "{reason}"
        );
        assert_eq!(snapshot(&important), before);
        assert_eq!(b.svc_entries(), entries);
    } else {
        eprintln!("skipped the follow_symlinks case: needs root to chown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_link_to_a_world_readable_file_is_refused_and_nothing_is_written() {
    let b = Box::new();
    // The service user's own world-readable file: the secret must not land there.
    let leak = b.path("svc/leak.txt");
    std::fs::write(&leak, "").unwrap();
    std::fs::set_permissions(&leak, std::fs::Permissions::from_mode(0o644)).unwrap();
    if is_root() {
        lchown(&leak, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let before = snapshot(&leak);
    b.plant_link("svc/other.conf", Path::new("leak.txt"));
    let entries = b.svc_entries();

    for extra in ["", "follow_symlinks = true"] {
        if !extra.is_empty() && !is_root() {
            eprintln!("skipped the follow_symlinks case: needs root to chown");
            continue;
        }
        let reason = refused(&b.pipeline(&template("svc/other.conf", extra))).await;
        let other = b.path("svc/other.conf").display().to_string();
        assert!(reason.starts_with(&format!("cannot read {other}: {other} is a symlink ")), "{reason}");
        assert_eq!(snapshot(&leak), before, "the secret reached the world-readable file");
        assert_eq!(b.svc_entries(), entries);
    }
}

/// systemd's rule: a directory of a service user may hold its own files and
/// root's, not a third user's (which it could have hard-linked or moved there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_path_transition_is_refused() {
    if !is_root() {
        eprintln!("skipped: needs root to chown");
        return;
    }
    let b = Box::new();
    let third = b.path("svc/third.conf");
    std::fs::write(&third, "token=old\n").unwrap();
    lchown(&third, Some(NOBODY - 1), Some(NOBODY - 1)).unwrap();
    let before = snapshot(&third);
    let reason = refused(&b.pipeline(&template("svc/third.conf", ""))).await;
    assert!(
        reason.contains(&format!(
            "unsafe path transition: {} is owned by uid 65534 but {} in it is owned by uid 65533",
            b.path("svc").display(),
            third.display()
        )),
        "{reason}"
    );
    assert_eq!(snapshot(&third), before);
}

/// The legitimate case: root's own `current.conf -> v2.conf`, allowed by
/// the config. The target is replaced, the link stays, a rollback restores
/// the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_owned_symlink_is_written_through_when_the_config_allows_it() {
    let b = Box::new();
    std::fs::create_dir_all(b.path("etc/app")).unwrap();
    let v2 = b.path("etc/app/v2.conf");
    std::fs::write(&v2, "token=old\n").unwrap();
    std::fs::set_permissions(&v2, std::fs::Permissions::from_mode(0o640)).unwrap();
    let current = b.path("etc/app/current.conf");
    symlink("v2.conf", &current).unwrap();

    // Not allowed: refused like any other link.
    let reason = refused(&b.pipeline(&template("etc/app/current.conf", ""))).await;
    assert!(reason.contains("current.conf is a symlink (to v2.conf)"), "{reason}");

    let pipeline = b.pipeline(&template("etc/app/current.conf", "follow_symlinks = true"));
    let reports = pipeline.deliver(delivery("v2", NEW_VALUE, None)).await;
    assert_eq!(stages(&reports), [Delivered, Applied, Restarted, Healthy], "{reports:?}");
    assert_eq!(std::fs::read_to_string(&v2).unwrap(), format!("token={NEW_VALUE}\n"));
    assert_eq!(std::fs::read_link(&current).unwrap(), Path::new("v2.conf"), "the link stays");
    assert_eq!(std::fs::metadata(&v2).unwrap().mode() & 0o7777, 0o640, "mode kept");
    let r = pipeline
        .rollback(Rollback { rotation_id: "rot-1".into(), secret: SECRET.into(), version_id: "v2".into() })
        .await;
    assert_eq!(stages(&r), [RolledBack], "{r:?}");
    assert_eq!(std::fs::read_to_string(&v2).unwrap(), "token=old\n");
    assert!(std::fs::symlink_metadata(&current).unwrap().file_type().is_symlink());
}

#[test]
fn a_file_declared_twice_is_refused_at_load_or_start() {
    let b = Box::new();
    std::fs::create_dir_all(b.path("etc/app")).unwrap();
    std::fs::write(b.path("etc/app/v2.conf"), "x").unwrap();
    symlink("v2.conf", b.path("etc/app/current.conf")).unwrap();
    let two = |first: &str, second: &str| {
        format!("{}[[secret]]\nname = \"other\"\n{}", template(first, ""), template(second, "follow_symlinks = true"))
    };
    // Through `..`: at load, naming both entries.
    let e = b.config(&two("etc/app/v2.conf", "etc/app/../app/./v2.conf")).err().unwrap();
    assert!(
        e.contains("secret[1].file[0].path") && e.contains("v2.conf is already declared by secret[0].file[0]"),
        "{e}"
    );
    // Through a symlink: at start, by device and inode.
    let config = b.config(&two("etc/app/v2.conf", "etc/app/current.conf")).unwrap();
    let e = Pipeline::open(&config, Outbox::new()).err().unwrap().to_string();
    assert!(e.starts_with("secret[1].file[0] (") && e.contains("and secret[0].file[0] ("), "{e}");
    assert!(e.contains("are the same file"), "{e}");
}

/// A pidfile the service user can write names an unrelated (root) process:
/// it is not signalled, and the apply fails before writing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pidfile_naming_an_unrelated_process_is_refused() {
    let b = Box::new();
    let mut victim = Command::new("sleep").arg("60").spawn().unwrap();
    let pidfile = b.path("svc/app.pid");
    std::fs::write(&pidfile, format!("{}\n", victim.id())).unwrap();
    if is_root() {
        lchown(&pidfile, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    std::fs::write(b.path("svc/app.conf"), "token=old\n").unwrap();
    if is_root() {
        lchown(b.path("svc/app.conf"), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let blocks = format!(
        "{}[secret.restart]\nkind = \"signal\"\npidfile = \"@DIR@/svc/app.pid\"\nsignal = \"TERM\"\nexecutable = \"{}\"\n",
        template("svc/app.conf", ""),
        bins().service.display()
    );
    let reason = refused(&b.pipeline(&blocks)).await;
    assert!(
        reason.starts_with(&format!(
            "signal restart refused: process {} named by pidfile {} runs ",
            victim.id(),
            pidfile.display()
        )),
        "{reason}"
    );
    assert!(
        reason.contains(&format!("not the configured executable {}; refusing to signal it", bins().service.display()))
    );
    assert!(victim.try_wait().unwrap().is_none(), "the unrelated process was signalled");
    assert_eq!(std::fs::read_to_string(b.path("svc/app.conf")).unwrap(), "token=old\n");
    victim.kill().unwrap();
    victim.wait().unwrap();
}
