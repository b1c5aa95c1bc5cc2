//! The agent on a host whose service users may be hostile, end to end: a
//! real coordinator, real agents enrolled with join tokens kept out of argv,
//! and a rotation that meets a symlink planted in a service user's directory.

use rekey_tests::{Agent, Coordinator, bins, wait_for};
use serde_json::Value;
use std::os::unix::fs::{MetadataExt, PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const SECRET: &str = "app-token";
const NOBODY: u32 = 65534;

fn catalog() -> String {
    format!(
        r#"
[[secret]]
name = "{SECRET}"
provider = {{ kind = "random", length = 32, prefix = "tok_" }}
all_agents = true
[secret.rollout]
canary = 0
host_deadline = "60s"
[secret.revocation]
monitor = "0s"
grace = "1s"
"#
    )
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// `rekey-agent enroll` without `--token`: the caller adds the token's source.
fn enroll(a: &Agent, c: &Coordinator, fingerprint: &str, setup: impl FnOnce(&mut Command)) -> Output {
    let mut cmd = Command::new(&bins().agent);
    cmd.args(["enroll", "--coordinator", &c.addr(), "--ca-fingerprint", fingerprint])
        .arg("--state-dir")
        .arg(a.state_dir())
        .env_remove("REKEY_JOIN_TOKEN")
        .stdin(Stdio::null());
    setup(&mut cmd);
    cmd.output().expect("run rekey-agent enroll")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file and directory under `dir`, itself included.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

fn assert_private(state: &Path) {
    for p in walk(state) {
        let mode = std::fs::symlink_metadata(&p).unwrap().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is group/other accessible (mode {mode:04o})", p.display());
    }
}

#[test]
fn join_tokens_stay_out_of_argv_and_the_state_dir_is_private() {
    rustls::crypto::ring::default_provider().install_default().ok();
    let tmp = tempfile::Builder::new().prefix("rekey-sec-agent-").tempdir().unwrap();
    let c = Coordinator::start(&tmp.path().join("c"), &catalog());

    // `token create` prints an enroll command with a token file, never the token.
    let table = c.cli_ok(&["token", "create", "--host", "printed"]);
    let line = table.lines().find(|l| l.contains("rekey-agent enroll")).expect("an enroll command");
    let token = table.lines().find_map(|l| l.strip_prefix("join token:")).unwrap().trim();
    assert!(line.contains("--token-file /root/rekey-join.token") && !line.contains(token), "{table}");

    // A token file others can read is refused before anything is sent or written.
    let mut file_agent = Agent::new(tmp.path(), "by-file", &[SECRET]);
    let (token, fp) = c.token("by-file", &[]);
    let token_file = tmp.path().join("by-file.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = enroll(&file_agent, &c, &fp, |cmd| {
        cmd.arg("--token-file").arg(&token_file);
    });
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!(
            "token file {} is accessible by group or others (mode 0644); run chmod 600 on it",
            token_file.display()
        )),
        "{}",
        stderr(&out)
    );
    assert!(!file_agent.state_dir().join("identity.pem").exists());
    // The same (unspent) token from a 0600 file enrolls.
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = enroll(&file_agent, &c, &fp, |cmd| {
        cmd.arg("--token-file").arg(&token_file);
    });
    assert!(out.status.success(), "{}", stderr(&out));

    // From the environment.
    let mut env_agent = Agent::new(tmp.path(), "by-env", &[SECRET]);
    let (token, fp) = c.token("by-env", &[]);
    let out = enroll(&env_agent, &c, &fp, |cmd| {
        cmd.env("REKEY_JOIN_TOKEN", &token);
    });
    assert!(out.status.success(), "{}", stderr(&out));

    // umask 077 and 0700 dirs: nothing in either state dir is for other users.
    for a in [&file_agent, &env_agent] {
        assert_private(&a.state_dir());
        assert!(a.state_dir().join("identity.pem").exists());
    }
    file_agent.start();
    env_agent.start();
    wait_for("both agents connected", || c.is_connected("by-file") && c.is_connected("by-env"));
    // The journal, backups and key the running agent made are private too.
    for a in [&file_agent, &env_agent] {
        wait_for("the pipeline's state", || a.state_dir().join("fingerprint.key").exists());
        assert_private(&a.state_dir());
    }
}

/// The declared file was replaced by a service user's symlink to a root-only
/// file: the rotation fails on that host with the reason, and the target is
/// left as it was.
#[test]
fn a_planted_symlink_fails_the_rotation_on_that_host_and_leaves_the_target_alone() {
    rustls::crypto::ring::default_provider().install_default().ok();
    let tmp = tempfile::Builder::new().prefix("rekey-sec-agent-").tempdir().unwrap();
    let c = Coordinator::start(&tmp.path().join("c"), &catalog());
    let host = tmp.path().join("host");
    let svc = host.join("svc");
    std::fs::create_dir_all(&svc).unwrap();
    // Stands for /etc/important.conf.
    let important = host.join("important.conf");
    std::fs::write(&important, "root-only = true\n").unwrap();
    std::fs::set_permissions(&important, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = svc.join("app.conf");
    symlink(&important, &link).unwrap();
    if is_root() {
        lchown(&svc, Some(NOBODY), Some(NOBODY)).unwrap();
        lchown(&link, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let config = format!(
        "state_dir = \"state\"\n[reconnect]\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n\
         [[secret]]\nname = \"{SECRET}\"\n[[secret.file]]\npath = \"{}\"\nkind = \"template\"\n\
         template = \"token = {{{{ value }}}}\\n\"\n",
        link.display()
    );
    let mut a = Agent::with_config(tmp.path(), "host-1", &config);
    a.enroll_ok(&c, &[]);
    a.start();
    wait_for("host-1 connected", || c.is_connected("host-1"));

    // The preflight sees it first: the dry run resolves the path as an apply would.
    let plan = c.cli(&["rotate", "plan", SECRET]);
    let text = String::from_utf8_lossy(&plan.stdout).into_owned() + &String::from_utf8_lossy(&plan.stderr);
    assert!(!plan.status.success() && text.contains("host-1") && text.contains("symlink"), "{text}");
    assert!(!c.cli(&["rotate", "start", SECRET]).status.success(), "start refused while the plan has a problem");
    // And the apply refuses it too, when an operator skips the preflight.
    let id = c
        .cli_ok(&["rotate", "start", SECRET, "--skip-preflight", "--reason", "test the apply's own check"])
        .trim()
        .to_string();
    let mut r = Value::Null;
    // The rollout halts on the host's "failed"; its "rolled back" follows.
    wait_for(&format!("{id} halted, host-1 rolled back"), || {
        r = c.cli_json(&["rotate", "status", &id]);
        r["state"] == "halted" && r["hosts"]["host-1"]["state"] == "rolled_back"
    });
    let h = &r["hosts"]["host-1"];
    assert_eq!(h["state"], "rolled_back", "{r:#}");
    let err = h["error"].as_str().unwrap();
    assert!(
        err.contains(&format!("{} is a symlink (to {})", link.display(), important.display()))
            && err.contains("follow_symlinks = true"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&important).unwrap(), "root-only = true\n");
    assert_eq!(std::fs::metadata(&important).unwrap().mode() & 0o7777, 0o600);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_dir(&svc).unwrap().count(), 1, "nothing else was written beside the link");
}
