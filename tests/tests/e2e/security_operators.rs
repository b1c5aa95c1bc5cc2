//! Operators and roles (issue #11 item 2): operators are created, listed and
//! revoked by audited commands, each call is allowed by the caller's role
//! (viewer, rotator, admin), a revoked operator is refused on every call, and
//! `rekeyd operator recover` is the only way to a new admin credential
//! besides an admin — offline, on the coordinator host.

use rekey_tests::{Agent, Coordinator, wait_for};
use rekey_types::v1::{AuditRecordView, OperatorRole, OperatorView, RotationView};
use serde::de::DeserializeOwned;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

const CATALOG: &str = r#"
[[secret]]
name = "api-key"
provider = { kind = "random", length = 40 }
selector = { env = "test" }
"#;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("rekey-operators-").tempdir().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The CLI as the operator in `dir`, `-o json`, required to succeed.
fn view_as<T: DeserializeOwned>(c: &Coordinator, dir: &Path, args: &[&str]) -> T {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let out = c.cli_as(dir, &a);
    assert!(out.status.success(), "rekey {args:?} as {} failed: {}", dir.display(), stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("rekey {args:?}: {e}"))
}

/// The CLI as the operator in `dir`, required to fail; returns its error.
fn refused_as(c: &Coordinator, dir: &Path, args: &[&str]) -> String {
    let out = c.cli_as(dir, args);
    assert!(!out.status.success(), "rekey {args:?} as {} was allowed", dir.display());
    stderr(&out)
}

/// `rekey operator create NAME --role ROLE --out DIR` as the initial admin.
fn create(c: &Coordinator, name: &str, role: &str, dir: &Path) -> OperatorView {
    c.cli_view(&["operator", "create", name, "--role", role, "--out", dir.to_str().unwrap()])
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_viewer_can_list_but_cannot_start_a_rotation_or_create_a_token() {
    let dir = tmp();
    let c = Coordinator::start(&dir.path().join("c"), CATALOG);
    let viewer = dir.path().join("viewer");
    let v = create(&c, "night-shift", "viewer", &viewer);
    assert_eq!((v.role, v.created_by.as_str(), v.revoked), (OperatorRole::Viewer, "operator/admin", false));
    // The credential was made here: key 0600, and no private key ever reached rekeyd.
    assert_eq!(mode(&viewer.join("operator.key")), 0o600);
    assert_eq!(mode(&viewer) & 0o077, 0);
    for f in ["operator.pem", "ca.pem", "rekey.toml"] {
        assert!(viewer.join(f).exists(), "{f} missing");
    }
    assert!(!c.logs().contains("PRIVATE KEY"), "a private key reached rekeyd's log");

    // Reads work, with the rekey.toml written into the dir.
    let out = std::process::Command::new(&rekey_tests::bins().cli)
        .arg("--operator-dir")
        .arg(&viewer)
        .args(["secrets", "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let _: Vec<serde_json::Value> = view_as(&c, &viewer, &["agents"]);
    let _: Vec<RotationView> = view_as(&c, &viewer, &["rotate", "list"]);
    let ops: Vec<OperatorView> = view_as(&c, &viewer, &["operator", "list"]);
    assert_eq!(ops.len(), 2, "{ops:?}");

    // Writes are refused, naming the operator, its role and the role needed.
    let err = refused_as(&c, &viewer, &["rotate", "start", "api-key"]);
    assert!(
        err.contains("operator night-shift has role viewer and may not start a rotation: that needs role rotator"),
        "{err}"
    );
    let err = refused_as(&c, &viewer, &["token", "create", "--host", "web-9"]);
    assert!(err.contains("may not create a join token: that needs role admin"), "{err}");
    let err = refused_as(&c, &viewer, &["operator", "create", "x", "--role", "admin", "--out", "/nonexistent/x"]);
    assert!(err.contains("may not create an operator: that needs role admin"), "{err}");
    assert!(c.rotations(None).is_empty(), "a refused start changed something");
}

#[test]
fn a_rotator_can_start_a_rotation_but_cannot_create_a_token_or_revoke_an_agent() {
    let dir = tmp();
    let c = Coordinator::start(&dir.path().join("c"), CATALOG);
    let mut a = Agent::new(dir.path(), "web-1", &["api-key"]);
    a.enroll_ok(&c, &["env=test"]);
    a.start();
    wait_for("web-1 to connect", || c.is_connected("web-1"));
    let rotator = dir.path().join("rotator");
    create(&c, "ops-1", "rotator", &rotator);

    let r: RotationView = view_as(&c, &rotator, &["rotate", "start", "api-key"]);
    assert_eq!((r.secret.as_str(), r.started_by.as_str()), ("api-key", "operator/ops-1"));

    let err = refused_as(&c, &rotator, &["token", "create", "--host", "web-9"]);
    assert!(
        err.contains("operator ops-1 has role rotator and may not create a join token: that needs role admin"),
        "{err}"
    );
    let err = refused_as(&c, &rotator, &["agent", "revoke", "web-1"]);
    assert!(err.contains("may not revoke an agent: that needs role admin"), "{err}");
    let err = refused_as(&c, &rotator, &["operator", "revoke", "admin"]);
    assert!(err.contains("may not revoke an operator: that needs role admin"), "{err}");
    assert!(!c.agent("web-1").unwrap().revoked);
}

#[test]
fn a_revoked_operator_is_refused_on_every_call_and_the_list_shows_roles_and_revocation() {
    let dir = tmp();
    let mut c = Coordinator::start(&dir.path().join("c"), CATALOG);
    let temp = dir.path().join("temp");
    create(&c, "temp", "viewer", &temp);
    create(&c, "ops", "rotator", &dir.path().join("ops"));
    let _: Vec<serde_json::Value> = view_as(&c, &temp, &["agents"]);

    let v: OperatorView = c.cli_view(&["operator", "revoke", "temp"]);
    assert_eq!((v.revoked, v.revoked_by.as_deref()), (true, Some("operator/admin")));
    for args in [&["agents"][..], &["operator", "list"], &["audit"]] {
        let err = refused_as(&c, &temp, args);
        assert!(err.contains("operator temp was revoked at ") && err.contains(" by operator/admin"), "{err}");
    }

    let ops: Vec<OperatorView> = c.cli_view(&["operator", "list"]);
    let by = |n: &str| ops.iter().find(|o| o.name == n).unwrap_or_else(|| panic!("{n} not listed: {ops:?}")).clone();
    assert_eq!(
        (by("admin").role, by("admin").created_by.as_str(), by("admin").revoked),
        (OperatorRole::Admin, "rekeyd (init)", false)
    );
    assert_eq!((by("temp").role, by("temp").revoked), (OperatorRole::Viewer, true));
    assert_eq!((by("ops").role, by("ops").revoked), (OperatorRole::Rotator, false));
    let table = c.cli_ok(&["operator", "list"]);
    assert!(table.contains("ROLE") && table.contains("rotator") && table.contains("revoked "), "{table}");

    // Each change is audited with who did it.
    let audit: Vec<AuditRecordView> = c.audit();
    let find = |action: &str, op: &str| {
        audit.iter().any(|r| r.action == action && r.actor == "operator/admin" && r.details["operator"] == op)
    };
    assert!(find("operator.create", "temp") && find("operator.create", "ops") && find("operator.revoke", "temp"));

    // Names are not reused; a second revoke says when the first was.
    let err = String::from_utf8_lossy(
        &c.cli(&["operator", "create", "temp", "--role", "admin", "--out", dir.path().join("t2").to_str().unwrap()])
            .stderr,
    )
    .into_owned();
    assert!(err.contains("operator temp already exists"), "{err}");
    let err = String::from_utf8_lossy(&c.cli(&["operator", "revoke", "temp"]).stderr).into_owned();
    assert!(err.contains("already revoked"), "{err}");

    // The revocation survives a restart.
    c.restart();
    let err = refused_as(&c, &temp, &["agents"]);
    assert!(err.contains("operator temp was revoked"), "{err}");
}

#[test]
fn rekeyd_operator_recover_refuses_while_rekeyd_runs_and_issues_a_working_admin() {
    let dir = tmp();
    let mut c = Coordinator::start(&dir.path().join("c"), CATALOG);
    // The only admin locks itself out.
    c.cli_ok(&["operator", "revoke", "admin"]);
    let err = String::from_utf8_lossy(&c.cli(&["agents"]).stderr).into_owned();
    assert!(err.contains("operator admin was revoked"), "{err}");

    let out_dir = dir.path().join("recovered");
    let recover = |c: &Coordinator| {
        std::process::Command::new(&rekey_tests::bins().rekeyd)
            .arg("--config")
            .arg(&c.config)
            .args(["operator", "recover", "--name", "rescue", "--out"])
            .arg(&out_dir)
            .output()
            .unwrap()
    };
    let out = recover(&c);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("rekeyd is running") && err.contains("stop rekeyd"), "{err}");
    assert!(!out_dir.join("operator.key").exists(), "a refused recover wrote a credential");

    c.stop();
    let out = recover(&c);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(mode(&out_dir.join("operator.key")), 0o600);
    // Never over an existing credential.
    let out = recover(&c);
    assert!(!out.status.success() && stderr(&out).contains("already holds an operator credential"), "{}", stderr(&out));

    c.restart();
    let (token, _) = {
        let v: rekey_types::v1::JoinTokenView = view_as(&c, &out_dir, &["token", "create", "--host", "web-9"]);
        (v.token, v.ca_fingerprint)
    };
    assert!(!token.is_empty());
    let ops: Vec<OperatorView> = view_as(&c, &out_dir, &["operator", "list"]);
    let rescue = ops.iter().find(|o| o.name == "rescue").expect("rescue listed");
    assert_eq!((rescue.role, rescue.created_by.as_str()), (OperatorRole::Admin, "rekeyd (recover on host)"));
    assert_eq!(ops.len(), 2, "a restart minted a credential: {ops:?}");
    let audit: Vec<AuditRecordView> = view_as(&c, &out_dir, &["audit"]);
    assert!(
        audit.iter().any(|r| r.action == "operator.recover"
            && r.actor == "rekeyd (recover on host)"
            && r.details["operator"] == "rescue"),
        "{audit:?}"
    );
    let v: serde_json::Value = view_as(&c, &out_dir, &["audit", "verify"]);
    assert_eq!(v["ok"], true, "{v}");
}
