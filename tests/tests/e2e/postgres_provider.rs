//! The `postgres` provider (issue #17) against a real PostgreSQL 16 from the
//! fixture, run with `log_statement = 'all'` so every statement rekey sends
//! is in the server's log — and no password value may be.
//!
//! Provider level: every trait method on the real server (both strategies,
//! idempotency, NotFound once a version's role has moved on or was revoked,
//! usage from `pg_stat_activity`). Fleet level: real rekeyd, real agents and
//! real demo services logged in to PostgreSQL — a rotation with alternating
//! roles that no client notices, a forgotten service on the old role that
//! holds revocation and is named by its address, and a campaign that rotates
//! a demo API key and the database password together.

use super::providers::{demo_provider, start, wait_state};
use rekey_common::secret::SecretBytes;
use rekey_demo::pg::Session;
use rekey_providers::{
    CreateRequest, LastUsed, Provider, ProviderConfig, ProviderError, ProviderState, VersionInfo, VersionStatus,
};
use rekey_tests::fixtures::{DemoApi, write_secret_file};
use rekey_tests::postgres::Postgres;
use rekey_tests::{Agent, Coordinator, wait_for};
use rekey_types::v1::{self, IncidentState, RotationState};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// ---------------------------------------------------------------- helpers

const INITIAL_PASSWORD: &str = "initial-app-password-0";

/// A server logging every statement, a database `app` with a table, and the
/// existing login role `app` (password [`INITIAL_PASSWORD`]) that may read it.
fn database() -> Postgres {
    let pg = Postgres::start_with(&[("log_statement", "all")]);
    pg.create_database("app");
    pg.psql(
        "app",
        &format!(
            "CREATE ROLE app LOGIN PASSWORD '{INITIAL_PASSWORD}'; \
             CREATE TABLE items (id int); INSERT INTO items VALUES (1), (2); GRANT SELECT ON items TO app"
        ),
    );
    pg
}

fn app_url(pg: &Postgres) -> String {
    format!("postgres://127.0.0.1:{}/app", pg.port)
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

/// Logs in as `user` and reads the table: the role it acts as, or the refusal.
async fn login_async(url: &str, user: &str, password: &str, app: &str) -> Result<String, String> {
    let creds = format!("PGUSER={user}\nPGPASSWORD={password}\n");
    let s = Session::open(url, creds.as_bytes(), app).await.map_err(|e| e.to_string())?;
    s.check().await.map_err(|e| e.to_string())
}

fn login(pg: &Postgres, user: &str, password: &str) -> Result<String, String> {
    block_on(login_async(&app_url(pg), user, password, "rekey-test"))
}

fn can_login(pg: &Postgres, role: &str) -> bool {
    pg.psql("app", &format!("SELECT rolcanlogin FROM pg_roles WHERE rolname = '{role}'")) == "t"
}

#[derive(Default)]
struct Mem(Mutex<BTreeMap<String, Vec<u8>>>);

impl ProviderState for Mem {
    fn get(&self, k: &str) -> Result<Option<SecretBytes>, String> {
        Ok(self.0.lock().unwrap().get(k).map(|v| SecretBytes::new(v.clone())))
    }
    fn put(&self, k: &str, v: &[u8]) -> Result<(), String> {
        self.0.lock().unwrap().insert(k.into(), v.to_vec());
        Ok(())
    }
    fn remove(&self, k: &str) -> Result<(), String> {
        self.0.lock().unwrap().remove(k);
        Ok(())
    }
    fn keys(&self) -> Result<Vec<String>, String> {
        Ok(self.0.lock().unwrap().keys().cloned().collect())
    }
}

fn config(pg: &Postgres, extra: serde_json::Value) -> ProviderConfig {
    let mut c = json!({
        "kind": "postgres", "url": pg.url("app"), "password_file": pg.password_file, "role": "app",
        "bootstrap": true, "timeout": "10s",
    });
    c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    serde_json::from_value(c).unwrap()
}

fn provider(pg: &Postgres, extra: serde_json::Value) -> Arc<dyn Provider> {
    let c = config(pg, extra);
    c.validate().unwrap();
    rekey_providers::build(&c, Arc::new(Mem::default())).unwrap()
}

fn req(rotation: &str, previous: Option<&str>) -> CreateRequest {
    CreateRequest { secret: "db".into(), rotation_id: rotation.into(), previous_version: previous.map(str::to_string) }
}

fn field(v: &rekey_providers::NewVersion, name: &str) -> String {
    String::from_utf8(v.fields[name].expose().to_vec()).unwrap()
}

fn is_not_found<T: std::fmt::Debug>(r: Result<T, ProviderError>) -> bool {
    matches!(r, Err(ProviderError::NotFound { .. }))
}

fn assert_no_password_in_log(pg: &Postgres, passwords: &[&str]) {
    let log = pg.log();
    assert!(log.contains("ALTER ROLE"), "log_statement = 'all' logs rekey's statements");
    for p in passwords {
        assert!(!log.contains(p), "a password value is in the server's statement log");
    }
}

// ---------------------------------------------------------------- provider level

/// Every operation on the real server with alternating roles: the pair is
/// bootstrapped from `app`, a version alternates between them, and an
/// operation on a version whose role moved on is NotFound (never touching
/// the role in use).
#[test]
fn alternating_roles_on_a_real_server_every_operation() {
    let pg = database();
    let p = provider(&pg, json!({}));
    let url = app_url(&pg);
    block_on(async {
        // Before any rotation: the existing login role is the current version.
        let current = p.current().await.unwrap().expect("the app role is the current version");
        assert_eq!((current.id.as_str(), current.status), ("app", VersionStatus::Active));
        let v1 = p.create(&req("rot-1", Some("app"))).await.unwrap();
        assert_eq!((v1.id.as_str(), field(&v1, "username").as_str()), ("app_blue@rot-1", "app_blue"));
        let pw1 = field(&v1, "password");
        // Idempotent per rotation: the same version, password and role again.
        let again = p.create(&req("rot-1", Some("app"))).await.unwrap();
        assert_eq!((again.id.clone(), field(&again, "password")), (v1.id.clone(), pw1.clone()));
        let mut listed = p.list().await.unwrap();
        listed.sort_by(|a, b| a.id.cmp(&b.id));
        let ids: Vec<(&str, VersionStatus)> = listed.iter().map(|v| (v.id.as_str(), v.status)).collect();
        assert_eq!(ids, [("app", VersionStatus::Active), ("app_blue@rot-1", VersionStatus::Active)]);
        // The old version: deactivate (twice), reactivate, delete, then NotFound.
        p.deactivate("app").await.unwrap();
        p.deactivate("app").await.unwrap();
        assert!(!can_login(&pg, "app"));
        assert!(p.list().await.unwrap().contains(&VersionInfo {
            id: "app".into(),
            status: VersionStatus::Inactive,
            created_unix: None
        }));
        p.reactivate("app").await.unwrap();
        assert_eq!(login_async(&url, "app", INITIAL_PASSWORD, "t").await.unwrap(), "app");
        p.delete("app").await.unwrap();
        assert!(login_async(&url, "app", INITIAL_PASSWORD, "t").await.is_err(), "the old password no longer works");
        assert!(!can_login(&pg, "app"), "a deleted version's role stays NOLOGIN (never dropped)");
        assert!(is_not_found(p.delete("app").await));
        assert!(is_not_found(p.deactivate("app").await) && is_not_found(p.reactivate("app").await));
        assert!(is_not_found(p.last_used("app").await));
        // The new login reads what the base role may read.
        assert_eq!(login_async(&url, "app_blue", &pw1, "t").await.unwrap(), "app_blue");
        let count = pg.psql(
            "app",
            "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member \
                                     WHERE r.rolname IN ('app_blue', 'app_green')",
        );
        assert_eq!(count, "2", "both logins are members of app (the bootstrap ran twice, idempotently)");
        // The next rotation goes to the other role; rot-1's role is untouched by it.
        let v2 = p.create(&req("rot-2", Some(&v1.id))).await.unwrap();
        assert_eq!(field(&v2, "username"), "app_green");
        let pw2 = field(&v2, "password");
        assert_eq!(p.current().await.unwrap().unwrap().id, v2.id, "the newest live login is current");
        p.deactivate(&v1.id).await.unwrap();
        assert!(login_async(&url, "app_blue", &pw1, "t").await.is_err(), "NOLOGIN refuses the old role");
        p.delete(&v1.id).await.unwrap();
        // A third rotation reuses app_blue: rot-1's version id no longer names it.
        let v3 = p.create(&req("rot-3", Some(&v2.id))).await.unwrap();
        assert_eq!(v3.id, "app_blue@rot-3");
        assert!(is_not_found(p.deactivate(&v1.id).await), "a superseded version never touches the role in use");
        assert!(can_login(&pg, "app_blue"));
        assert!(is_not_found(p.deactivate("someone_else@rot-1").await), "a role rekey does not manage");
        // (The test's own CREATE ROLE put the initial password in the log; rekey's never are.)
        assert_no_password_in_log(&pg, &[&pw1, &pw2, &field(&v3, "password")]);
    });
}

/// Usage evidence: sessions of the version's role, named by address and
/// application; remembered once they disconnect; none at all → never.
#[test]
fn usage_is_read_from_pg_stat_activity_with_the_client_address() {
    let pg = database();
    let p = provider(&pg, json!({ "terminate_old_sessions": true }));
    block_on(async {
        assert_eq!(p.last_used("app").await.unwrap(), LastUsed::Never);
        let url = app_url(&pg);
        let creds = format!("PGUSER=app\nPGPASSWORD={INITIAL_PASSWORD}\n");
        let held = Session::open(&url, creds.as_bytes(), "billing-cron").await.unwrap();
        assert_eq!(held.check().await.unwrap(), "app");
        let before = rekey_common::time::now_unix_ms();
        let LastUsed::At(u) = p.last_used("app").await.unwrap() else { panic!("a connected session is a use") };
        let source = u.source.clone().unwrap();
        assert!(u.at_ms >= before && u.resolution_ms == 1, "{u:?}");
        assert!(source.contains("1 session of role app: 127.0.0.1:") && source.contains("(billing-cron)"), "{source}");
        // Deactivation with terminate_old_sessions ends the session.
        p.deactivate("app").await.unwrap();
        assert!(held.check().await.is_err(), "the old role's session was terminated");
        let LastUsed::At(seen) = p.last_used("app").await.unwrap() else { panic!("remembered") };
        assert_eq!(seen.at_ms, u.at_ms);
        assert!(seen.source.unwrap().contains("disconnected since"));
    });
}

/// `single`: the password changes in place, the old version is gone at once
/// (NotFound: the engine records it as revoked), and the plan warns.
#[test]
fn the_single_strategy_changes_the_password_in_place() {
    let pg = database();
    let c = config(&pg, json!({ "strategy": "single", "bootstrap": false }));
    assert!(c.plan_warnings()[0].contains("not zero-downtime"), "{:?}", c.plan_warnings());
    assert!(!c.reports_usage(), "in place, sessions cannot tell the old password from the new");
    let p = provider(&pg, json!({ "strategy": "single", "bootstrap": false }));
    let url = app_url(&pg);
    block_on(async {
        assert_eq!(p.current().await.unwrap().unwrap().id, "app");
        let v = p.create(&req("rot-1", Some("app"))).await.unwrap();
        assert_eq!((v.id.as_str(), field(&v, "username").as_str()), ("app@rot-1", "app"));
        let pw = field(&v, "password");
        assert_eq!(login_async(&url, "app", &pw, "t").await.unwrap(), "app");
        assert!(
            login_async(&url, "app", INITIAL_PASSWORD, "t").await.is_err(),
            "the old password stopped working at create"
        );
        assert!(is_not_found(p.deactivate("app").await) && is_not_found(p.delete("app").await));
        assert!(can_login(&pg, "app"), "the NotFound old version never touched the role");
        let list = p.list().await.unwrap();
        assert_eq!(list.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(), ["app@rot-1"]);
        let roles = pg.psql("app", "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'app_%'");
        assert_eq!(roles, "0", "no pair is created in place");
        assert_no_password_in_log(&pg, &[&pw]);
    });
}

/// `rekey rotate plan` of a secret with the single strategy says it is not
/// zero-downtime (a finding, not a problem: the plan is otherwise ready).
#[test]
fn the_plan_says_the_single_strategy_is_not_zero_downtime() {
    let pg = database();
    let tmp = tempfile::Builder::new().prefix("rekey-pg-plan-").tempdir().unwrap();
    let catalog = db_catalog(&pg, "").replace("bootstrap = true,", "strategy = \"single\",");
    let c = Coordinator::start(&tmp.path().join("c"), &catalog);
    let hosts = db_fleet(&pg, &c, tmp.path(), 1, &|_| String::new());
    let _services = Services(hosts.iter().map(|h| h.dir.join("service.pid")).collect());
    wait_for("agents connected", || hosts.iter().all(|h| c.is_connected(&h.agent.name)));
    let plan = c.cli_ok(&["rotate", "plan", "db-app"]);
    assert!(plan.contains("not zero-downtime") && plan.contains("role app changes in place"), "{plan}");
    let view: v1::PlanView = c.cli_view(&["rotate", "plan", "db-app"]);
    assert!(view.ok, "a warning does not stop the rotation: {:?}", view.problems);
    assert_eq!(view.old_version.as_deref(), Some("app"));
    assert_eq!(view.fields, ["password", "username"]);
}

/// Bad settings are refused naming the field, and nothing is changed.
#[test]
fn bad_postgres_settings_are_refused_naming_the_field() {
    let pg = Postgres::start();
    pg.create_database("app");
    let loose = pg.password_file.with_extension("loose");
    std::fs::write(&loose, &pg.admin_password).unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let err = |extra: serde_json::Value| config(&pg, extra).validate().unwrap_err();
    let (f, m) = err(json!({ "password_file": loose }));
    assert_eq!(f, "password_file");
    assert!(m.contains("mode 0644") && m.contains("chmod 600"), "{m}");
    let with_pw = format!("postgres://rekey_admin:{}@127.0.0.1:{}/app", pg.admin_password, pg.port);
    let (f, m) = err(json!({ "url": with_pw }));
    assert_eq!(f, "url");
    assert!(m.contains("password_file") && !m.contains(&pg.admin_password), "{m}");
    assert_eq!(err(json!({ "role": "App-1" })).0, "role");
    assert_eq!(err(json!({ "url": format!("{}?sslmode=prefer", pg.url("app")) })).0, "url");
    assert_eq!(err(json!({ "strategy": "single" })).0, "bootstrap");
    // A role without the pair and no bootstrap: a create says what to run.
    pg.psql("app", "CREATE ROLE app LOGIN");
    let p = provider(&pg, json!({ "bootstrap": false }));
    let e = block_on(p.create(&req("rot-1", Some("app")))).unwrap_err().to_string();
    assert!(e.contains("role app_blue does not exist") && e.contains("bootstrap"), "{e}");
}

// ---------------------------------------------------------------- fleet level

struct Host {
    agent: Agent,
    dir: PathBuf,
    port: u16,
}

/// Stops the demo services by their pidfiles when the test ends.
struct Services(Vec<PathBuf>);

impl Drop for Services {
    fn drop(&mut self) {
        for p in &self.0 {
            if let Ok(pid) = std::fs::read_to_string(p) {
                let _ = std::process::Command::new("kill").arg(pid.trim()).status();
            }
        }
    }
}

/// Starts a demo service in PostgreSQL mode with `credentials`; its argv (the agent's restart command).
fn service(pg: &Postgres, dir: &Path, name: &str, port: u16, credentials: &str) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    write_secret_file(&dir.join("db.env"), credentials);
    let d = dir.display();
    let args: Vec<String> = [
        rekey_tests::bins().demo_service.display().to_string(),
        "--detach".into(),
        "--replace".into(),
        "--pidfile".into(),
        format!("{d}/service.pid"),
        "--credentials".into(),
        format!("{d}/db.env"),
        "--postgres".into(),
        app_url(pg),
        "--app-name".into(),
        name.into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--log".into(),
        format!("{d}/service.log"),
    ]
    .into();
    let out = std::process::Command::new(&args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "service {name}: {}", String::from_utf8_lossy(&out.stderr));
    args
}

fn db_secret_config(dir: &Path, restart: &[String], port: u16) -> String {
    let d = dir.display();
    let cmd = restart.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ");
    format!(
        "[[secret]]\nname = \"db-app\"\n  [[secret.file]]\n  path = \"{d}/db.env\"\n  kind = \"env-file\"\n  \
         keys = {{ PGUSER = \"username\", PGPASSWORD = \"password\" }}\n  \
         [secret.restart]\n  kind = \"command\"\n  command = [{cmd}]\n  timeout = \"20s\"\n  \
         [secret.health]\n  kind = \"http\"\n  url = \"http://127.0.0.1:{port}/health\"\n  body_contains = \"postgres accepts\"\n  \
         retries = 10\n  interval = \"300ms\"\n  timeout = \"3s\"\n"
    )
}

fn db_catalog(pg: &Postgres, extra_revocation: &str) -> String {
    format!(
        r#"
[[secret]]
name = "db-app"
all_agents = true
provider = {{ kind = "postgres", url = "{url}", password_file = "{pw}", role = "app", bootstrap = true, timeout = "10s" }}
[secret.rollout]
canary = 1
waves = ["100%"]
host_deadline = "30s"
[secret.revocation]
grace = "1s"
monitor = "0s"
check_every = "1s"
{extra_revocation}
"#,
        url = pg.url("app"),
        pw = pg.password_file.display()
    )
}

/// `n` real agents, each with a demo service logged in to PostgreSQL as
/// `app`; `extra` adds agent config (more secrets).
fn db_fleet(pg: &Postgres, c: &Coordinator, tmp: &Path, n: usize, extra: &dyn Fn(&Path) -> String) -> Vec<Host> {
    (1..=n)
        .map(|i| {
            let name = format!("host-{i}");
            let dir = tmp.join(format!("svc-{name}"));
            let port = rekey_tests::free_port();
            let restart = service(pg, &dir, &name, port, &format!("PGUSER=app\nPGPASSWORD={INITIAL_PASSWORD}\n"));
            let config = format!(
                "state_dir = \"state\"\n[reconnect]\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n\n{}{}",
                db_secret_config(&dir, &restart, port),
                extra(&dir)
            );
            let mut agent = Agent::with_config(tmp, &name, &config);
            agent.enroll_ok(c, &[]);
            agent.start();
            Host { agent, dir, port }
        })
        .collect()
}

fn health(port: u16) -> (u16, String) {
    rekey_tests::fixtures::http(&format!("127.0.0.1:{port}"), "GET", "/health", &[], b"")
        .map(|(s, b)| (s, String::from_utf8_lossy(&b).into_owned()))
        .unwrap_or((0, String::new()))
}

fn env_value(dir: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(dir.join("db.env")).unwrap();
    text.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).unwrap_or_default().to_string()
}

/// Logs in with each host's rendered credential, again and again, until
/// stopped; counts (logins, failures) and collects the roles that logged in.
fn client_loop<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    url: String,
    dirs: Vec<PathBuf>,
    stop: &'s AtomicBool,
    counts: &'s (AtomicUsize, AtomicUsize),
    failures: &'s Mutex<Vec<String>>,
    users: &'s Mutex<std::collections::BTreeSet<String>>,
) {
    s.spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        while !stop.load(Ordering::SeqCst) {
            for d in &dirs {
                let (user, pw) = (env_value(d, "PGUSER"), env_value(d, "PGPASSWORD"));
                counts.0.fetch_add(1, Ordering::SeqCst);
                match rt.block_on(login_async(&url, &user, &pw, "client-loop")) {
                    Ok(_) => drop(users.lock().unwrap().insert(user)),
                    Err(e) => {
                        counts.1.fetch_add(1, Ordering::SeqCst);
                        failures.lock().unwrap().push(format!("{}: {user}: {e}", d.display()));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

/// Three hosts move from `app` to `app_blue` while a client logs in with
/// every host's rendered credential throughout: zero failures; each service
/// really is logged in as the new role; the old role ends NOLOGIN with an
/// unusable password; no password in the server's statement log.
#[test]
fn an_alternating_rotation_keeps_every_service_querying_and_ends_the_old_role() {
    let pg = database();
    let tmp = tempfile::Builder::new().prefix("rekey-pg-fleet-").tempdir().unwrap();
    let c = Coordinator::start(&tmp.path().join("c"), &db_catalog(&pg, ""));
    let hosts = db_fleet(&pg, &c, tmp.path(), 3, &|_| String::new());
    let _services = Services(hosts.iter().map(|h| h.dir.join("service.pid")).collect());
    wait_for("agents connected", || hosts.iter().all(|h| c.is_connected(&h.agent.name)));
    for h in &hosts {
        assert_eq!(health(h.port), (200, "ok: postgres accepts role app\n".into()));
    }
    let plan = c.cli_ok(&["rotate", "plan", "db-app"]);
    assert!(!plan.contains("not zero-downtime"), "alternating needs no warning: {plan}");
    let (stop, counts, failures) =
        (AtomicBool::new(false), (AtomicUsize::new(0), AtomicUsize::new(0)), Mutex::default());
    let users = Mutex::default();
    let dirs: Vec<PathBuf> = hosts.iter().map(|h| h.dir.clone()).collect();
    std::thread::scope(|s| {
        client_loop(s, app_url(&pg), dirs, &stop, &counts, &failures, &users);
        wait_for("the client loop to log in", || counts.0.load(Ordering::SeqCst) >= 3);
        let id = start(&c, "db-app");
        let r = wait_state(&c, &id, &[RotationState::Completed, RotationState::Halted, RotationState::Aborted]);
        stop.store(true, Ordering::SeqCst);
        assert_eq!(r.state, RotationState::Completed, "{r:#?}\n{}", c.logs());
        assert_eq!(r.old_version.as_deref(), Some("app"));
        assert_eq!(r.new_version.as_deref(), Some(format!("app_blue@{id}").as_str()));
    });
    let (queries, failed) = (counts.0.load(Ordering::SeqCst), counts.1.load(Ordering::SeqCst));
    let users = users.into_inner().unwrap();
    assert!(
        users.contains("app") && users.contains("app_blue"),
        "the client loop ran across the switch ({queries} logins as {users:?})"
    );
    assert_eq!(failed, 0, "failed logins during the rotation: {:?}", failures.lock().unwrap());
    let new_pw = env_value(&hosts[0].dir, "PGPASSWORD");
    for h in &hosts {
        assert_eq!(env_value(&h.dir, "PGUSER"), "app_blue", "{}", h.agent.name);
        assert_eq!(health(h.port), (200, "ok: postgres accepts role app_blue\n".into()), "{}", h.agent.name);
        let log = h.agent.logs();
        assert!(!log.contains(&new_pw) && !log.contains(INITIAL_PASSWORD), "{}: a password in its log", h.agent.name);
    }
    let sessions = pg.psql(
        "app",
        "SELECT string_agg(DISTINCT usename::text, ',') FROM pg_stat_activity WHERE application_name LIKE 'host-%'",
    );
    assert_eq!(sessions, "app_blue", "every service is logged in with the new role");
    assert!(!can_login(&pg, "app"), "the old role ends NOLOGIN");
    assert!(login(&pg, "app", INITIAL_PASSWORD).is_err());
    assert_no_password_in_log(&pg, &[&new_pw]);
    assert!(!c.logs().contains(&new_pw), "a password in rekeyd's log");
}

/// A service nobody told about (not behind an agent) stays logged in as
/// `app`: revocation is held, the alert names its address and application;
/// the operator's revoke ends it, and terminate_old_sessions cuts it off.
#[test]
fn a_forgotten_service_on_the_old_role_holds_revocation_and_is_named() {
    let pg = database();
    let tmp = tempfile::Builder::new().prefix("rekey-pg-forgotten-").tempdir().unwrap();
    let catalog = db_catalog(&pg, "").replace("bootstrap = true,", "bootstrap = true, terminate_old_sessions = true,");
    let c = Coordinator::start(&tmp.path().join("c"), &catalog);
    let hosts = db_fleet(&pg, &c, tmp.path(), 2, &|_| String::new());
    let forgotten_port = rekey_tests::free_port();
    let forgotten = tmp.path().join("forgotten");
    let creds = format!("PGUSER=app\nPGPASSWORD={INITIAL_PASSWORD}\n");
    service(&pg, &forgotten, "billing-forgotten", forgotten_port, &creds);
    let mut pidfiles: Vec<PathBuf> = hosts.iter().map(|h| h.dir.join("service.pid")).collect();
    pidfiles.push(forgotten.join("service.pid"));
    let _services = Services(pidfiles);
    wait_for("agents connected", || hosts.iter().all(|h| c.is_connected(&h.agent.name)));
    let id = start(&c, "db-app");
    let r = wait_state(&c, &id, &[RotationState::Halted, RotationState::Completed]);
    assert_eq!(r.state, RotationState::Halted, "{r:#?}");
    let alert = c.alerts().into_iter().find(|a| a.kind == v1::AlertKind::OldVersionUsed).expect("an alert");
    assert!(
        alert.message.contains("127.0.0.1:") && alert.message.contains("billing-forgotten"),
        "the alert names the client: {}",
        alert.message
    );
    assert!(can_login(&pg, "app"), "held: the old role still logs in");
    assert_eq!(health(forgotten_port).0, 200, "the forgotten service still works while held");
    c.cli_ok(&["rotate", "revoke", &id, "--reason", "billing is retired; its host is forgotten"]);
    let r = wait_state(&c, &id, &[RotationState::Completed]);
    assert_eq!(r.state, RotationState::Completed);
    assert!(!can_login(&pg, "app"));
    wait_for("the forgotten service to be cut off", || health(forgotten_port).0 == 503);
    for h in &hosts {
        assert_eq!(health(h.port), (200, "ok: postgres accepts role app_blue\n".into()));
    }
}

/// One incident rotates a demo API key and the database password together;
/// both old credentials are refused afterwards and every host works on both.
#[test]
fn a_campaign_rotates_an_api_key_and_a_database_password_together() {
    let pg = database();
    let api = DemoApi::start();
    let (status, k0) = api.admin("POST", "/v1/keys", Some(json!({ "name": "initial" })));
    assert_eq!(status, 201, "{k0}");
    let old_key = k0["secret"].as_str().unwrap().to_string();
    let tmp = tempfile::Builder::new().prefix("rekey-pg-campaign-").tempdir().unwrap();
    let catalog = format!(
        "{}\n[[secret]]\nname = \"api-key\"\nall_agents = true\n{}[secret.revocation]\ngrace = \"1s\"\nmonitor = \"0s\"\ncheck_every = \"1s\"\n",
        db_catalog(&pg, ""),
        demo_provider(&api.url, &api.admin_token_file)
    );
    let c = Coordinator::start(&tmp.path().join("c"), &catalog);
    let api_secret = |dir: &Path| {
        write_secret_file(&dir.join("api.env"), &format!("DEMO_API_KEY={old_key}\n"));
        let d = dir.display();
        format!(
            "\n[[secret]]\nname = \"api-key\"\n  [[secret.file]]\n  path = \"{d}/api.env\"\n  kind = \"env-file\"\n  \
             keys = {{ DEMO_API_KEY = \"value\" }}\n  [secret.restart]\n  kind = \"command\"\n  command = [\"/bin/true\"]\n  \
             [secret.health]\n  kind = \"command\"\n  command = [\"/bin/sh\", \"-c\", \"grep -q '^DEMO_API_KEY=dk_' {d}/api.env\"]\n"
        )
    };
    let hosts = db_fleet(&pg, &c, tmp.path(), 2, &api_secret);
    let _services = Services(hosts.iter().map(|h| h.dir.join("service.pid")).collect());
    wait_for("agents connected", || hosts.iter().all(|h| c.is_connected(&h.agent.name)));
    let out = c.cli(&["incident", "open", "leaked env dump", "--secrets", "*", "--first", "api-key", "--wait"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), c.logs());
    let incidents = c.cli_view::<Vec<v1::IncidentView>>(&["incident", "list"]);
    let inc = c.incident(&incidents[0].id);
    assert_eq!(inc.state, IncidentState::Done, "{inc:#?}");
    assert_eq!(api.whoami(&old_key), 401, "the old API key is revoked");
    assert!(login(&pg, "app", INITIAL_PASSWORD).is_err(), "the old database password is revoked");
    for h in &hosts {
        let text = std::fs::read_to_string(h.dir.join("api.env")).unwrap();
        let new_key = text.lines().find_map(|l| l.strip_prefix("DEMO_API_KEY=")).unwrap();
        assert_eq!(api.whoami(new_key), 200, "{}: the new API key works", h.agent.name);
        assert_eq!(health(h.port), (200, "ok: postgres accepts role app_blue\n".into()), "{}", h.agent.name);
    }
}
