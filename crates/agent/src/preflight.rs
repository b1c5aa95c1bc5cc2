//! The agent's side of `rekey rotate plan`: a dry run of one secret's apply
//! pipeline before any new version exists, using only this host's own
//! `agent.toml`. Nothing is written and nothing is restarted:
//!
//! - every declared file is resolved (the [`crate::pipeline::chase`] rules),
//!   read and rendered with the placeholder fields, its owner and mode
//!   reported; a `replace` file must hold the current value it will replace;
//! - the restart must exist: a systemd unit systemd knows (`systemctl show`),
//!   a command whose program exists and is executable, a pidfile naming a
//!   live process running the configured executable;
//! - the health check must pass now, against the version running now.
//!
//! The answer is one [`PreflightResult`] with one [`PreflightCheck`] per
//! check, `ok = false` with an actionable detail for each problem; details
//! are scrubbed of every value the request carried. Every check is bounded
//! in time ([`HEALTH_BUDGET`], [`SYSTEMCTL_TIMEOUT`]) and at most
//! [`MAX_CONCURRENT`] dry runs run at once, each in a task that ends with the
//! session ([`Preflights::spawn`]).

use crate::config::{AgentConfig, HealthConfig, RestartAction, RestartConfig, SecretConfig};
use crate::pipeline::actions::{self, CommandValues};
use crate::pipeline::render::{Fields, Scrubber};
use crate::pipeline::{FilePlan, dry_run_file};
use rekey_proto::v1::{AgentMessage, Preflight, PreflightCheck, PreflightResult, agent_message};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Bound on the health check of a dry run (all its tries).
pub const HEALTH_BUDGET: Duration = Duration::from_secs(15);
/// At most this many tries of the health check in a dry run.
pub const HEALTH_TRIES: u32 = 3;
/// Bound on `systemctl show`.
pub const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(5);
/// Dry runs at once; more are answered "agent busy".
pub const MAX_CONCURRENT: usize = 4;
/// How long a finished result may wait for room on the session's stream.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

fn check(subject: impl Into<String>, ok: bool, detail: impl Into<String>) -> PreflightCheck {
    PreflightCheck { subject: subject.into(), ok, detail: detail.into() }
}

/// Runs dry runs for the session.
pub struct Preflights {
    config: Arc<AgentConfig>,
    slots: Arc<Semaphore>,
}

impl Preflights {
    pub fn new(config: &AgentConfig) -> Preflights {
        Preflights { config: Arc::new(config.clone()), slots: Arc::new(Semaphore::new(MAX_CONCURRENT)) }
    }

    /// Starts a dry run in a task of its own and returns at once; the result
    /// goes to `out` (the session's outbound channel). `session` ends it.
    pub fn spawn(&self, req: Preflight, out: mpsc::Sender<AgentMessage>, session: CancellationToken) {
        let span = tracing::info_span!("preflight", secret = %req.secret, request = %req.request_id);
        let config = self.config.clone();
        let slot = self.slots.clone().try_acquire_owned();
        tokio::spawn(
            async move {
                let result = match slot {
                    Ok(_slot) => tokio::select! {
                        r = run(&config, req) => r,
                        _ = session.cancelled() => return tracing::info!("preflight cancelled with its session"),
                    },
                    Err(_) => {
                        let busy = format!("agent busy: {MAX_CONCURRENT} preflights are already running; try again");
                        PreflightResult {
                            request_id: req.request_id,
                            secret: req.secret.clone(),
                            checks: vec![check(format!("secret {}", req.secret), false, busy)],
                        }
                    }
                };
                let failed = result.checks.iter().filter(|c| !c.ok).count();
                tracing::info!(checks = result.checks.len(), failed, "preflight answered");
                let msg = AgentMessage { msg: Some(agent_message::Msg::PreflightResult(result)) };
                if out.send_timeout(msg, SEND_TIMEOUT).await.is_err() {
                    tracing::warn!("preflight result dropped: session not sending");
                }
            }
            .instrument(span),
        );
    }
}

/// The dry run of `req.secret` on this host.
pub async fn run(config: &AgentConfig, req: Preflight) -> PreflightResult {
    let mut result = PreflightResult { request_id: req.request_id.clone(), secret: req.secret.clone(), checks: vec![] };
    let Some(secret) = config.secret(&req.secret) else {
        result.checks.push(check(
            format!("secret {}", req.secret),
            false,
            format!(
                "secret {} is not declared in {}: declare it there, or take this host out of the secret's consumers",
                req.secret,
                config.path.display()
            ),
        ));
        return result;
    };
    let (placeholder, current) =
        match (Fields::from_proto(req.placeholder_fields), Fields::from_proto(req.current_fields)) {
            (Ok(p), Ok(c)) if !p.is_empty() => (p, c),
            (Ok(_), Ok(_)) => {
                result.checks.push(check("request", false, "invalid preflight request: no placeholder field"));
                return result;
            }
            (Err(e), _) | (_, Err(e)) => {
                result.checks.push(check("request", false, format!("invalid preflight request: {e}")));
                return result;
            }
        };
    let scrub = Scrubber::new(&[&placeholder, &current]);
    for f in &secret.files {
        let plan = dry_run_file(f, &placeholder, &current, &req.current_version_id, &scrub);
        let subject = format!("file {}", f.path.display());
        result.checks.push(match plan {
            Ok(plan) => check(subject, true, file_detail(f.content.kind(), &plan)),
            Err(why) => check(subject, false, format!("{why} ({})", f.field)),
        });
    }
    if let Some(r) = &secret.restart {
        let c = restart_check(r, &scrub).await;
        result.checks.push(c);
    }
    if let Some(h) = &secret.health {
        let values = CommandValues {
            version_id: &req.current_version_id,
            fields: &current,
            source: "the current version does not carry",
        };
        result.checks.push(health_check(secret, h, &values, &scrub).await);
    }
    result
}

fn owner(id: Option<u32>) -> String {
    id.map(|i| i.to_string()).unwrap_or_else(|| "the agent's".into())
}

/// What a file's dry run found, for an operator.
pub fn file_detail(kind: &str, plan: &FilePlan) -> String {
    let will = format!("mode {:04o}, owner uid {}, group gid {}", plan.mode, owner(plan.uid), owner(plan.gid));
    let path = plan.path.display();
    match plan.before {
        Some(m) => {
            let now = format!("mode {:04o}, owner uid {}, group gid {}", m.mode, m.uid, m.gid);
            let changes = if (Some(m.uid), Some(m.gid), m.mode) == (plan.uid, plan.gid, plan.mode) {
                "kept".to_string()
            } else {
                format!("will be {will}")
            };
            format!("regular file {path}, {now} ({changes}); {kind} renders with the new version's fields")
        }
        None => format!("{path} does not exist yet: it will be created with {will}; {kind} renders"),
    }
}

/// The restart exists: a unit systemd knows, an executable program, a live
/// process running the configured executable.
async fn restart_check(r: &RestartConfig, scrub: &Scrubber) -> PreflightCheck {
    match &r.action {
        RestartAction::Systemd { unit } => {
            let subject = format!("restart systemd {unit}");
            match systemd_unit_state(unit, scrub).await {
                Ok(state) if state == "loaded" => check(subject, true, format!("systemd knows unit {unit} (loaded)")),
                Ok(state) => check(
                    subject,
                    false,
                    format!("systemd does not know unit {unit} (LoadState={state}): check [secret.restart] unit"),
                ),
                Err(why) => check(subject, false, why),
            }
        }
        RestartAction::Command(spec) => {
            let subject = format!("restart command {}", spec.program());
            let path = std::env::var_os("PATH").unwrap_or_default();
            match executable(spec.program(), &path.to_string_lossy()) {
                Ok(found) => check(subject, true, format!("{} exists and is executable", found.display())),
                Err(why) => check(subject, false, why),
            }
        }
        RestartAction::Signal { pidfile, signal, executable } => {
            let subject = format!("restart signal {} to pidfile {}", signal.as_str(), pidfile.display());
            match actions::signal_target(pidfile, executable) {
                Ok(pid) => check(subject, true, format!("process {pid} runs {}", executable.display())),
                Err(e) => check(subject, false, scrub.scrub(&rekey_common::error::chain(&e))),
            }
        }
    }
}

/// `systemctl show --property=LoadState --value UNIT`: `loaded`, `not-found`, ...
async fn systemd_unit_state(unit: &str, scrub: &Scrubber) -> Result<String, String> {
    let spec = crate::config::CommandSpec::plain(vec![
        "systemctl".into(),
        "show".into(),
        "--property=LoadState".into(),
        "--value".into(),
        unit.into(),
    ]);
    let none = Fields::default();
    let values = CommandValues { version_id: "", fields: &none, source: "is not needed" };
    match actions::run_command_output(&spec, &values, SYSTEMCTL_TIMEOUT, scrub).await {
        Ok(out) => Ok(String::from_utf8_lossy(&out).trim().to_string()),
        Err(actions::ActionError::Spawn { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Err("systemctl is not installed: this host does not run systemd; use kind = \"command\" or \"signal\""
                .into())
        }
        Err(e) => Err(format!("cannot ask systemd about {unit}: {}", rekey_common::error::chain(&e))),
    }
}

/// Finds `program` as the restart would run it (a path, or a name looked
/// up in `path_var`) and checks it is an executable regular file.
pub fn executable(program: &str, path_var: &str) -> Result<PathBuf, String> {
    let check = |p: &Path| -> Result<(), String> {
        let m = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        if !m.is_file() {
            return Err(format!("{} is not a regular file", p.display()));
        }
        if m.permissions().mode() & 0o111 == 0 {
            return Err(format!("{} is not executable (mode {:04o})", p.display(), m.permissions().mode() & 0o7777));
        }
        Ok(())
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return check(&p).map(|()| p);
    }
    for dir in path_var.split(':').filter(|d| !d.is_empty()) {
        let p = Path::new(dir).join(program);
        if check(&p).is_ok() {
            return Ok(p);
        }
    }
    Err(format!("{program} is not found in the agent's PATH ({path_var}): give its absolute path"))
}

/// The health check passes now, against the running (current) version:
/// at most [`HEALTH_TRIES`] tries, within [`HEALTH_BUDGET`].
async fn health_check(
    secret: &SecretConfig,
    h: &HealthConfig,
    values: &CommandValues<'_>,
    scrub: &Scrubber,
) -> PreflightCheck {
    let subject = format!("health {}", actions::target(&h.check));
    let h = HealthConfig { retries: h.retries.min(HEALTH_TRIES), ..h.clone() };
    let unchecked = match actions::expected_text(&h.check, values) {
        Ok(None) if actions::expectation(&h.check).is_some() => {
            "; the expected text names the version and no current version is known, so it was not matched"
        }
        Ok(_) => "",
        Err(why) => return check(subject, false, format!("{} ({})", scrub.scrub(&why), secret.name)),
    };
    let first = values.version_id.is_empty();
    match tokio::time::timeout(HEALTH_BUDGET, actions::check_health(&h, values, scrub)).await {
        Ok(Ok(())) => check(subject, true, format!("passes now{unchecked}")),
        // Nothing deployed yet: the service may not run before its first version.
        Ok(Err(e)) if first => check(
            subject,
            true,
            format!("fails now ({e}); not required before the first version is deployed — the apply checks it after"),
        ),
        Ok(Err(e)) => {
            check(subject, false, format!("{e}: it must pass before the rotation (with the current version)"))
        }
        Err(_) if first => check(
            subject,
            true,
            format!(
                "did not answer within {}s; not required before the first version is deployed",
                HEALTH_BUDGET.as_secs()
            ),
        ),
        Err(_) => check(subject, false, format!("did not answer within {}s", HEALTH_BUDGET.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rekey_proto::v1::SecretField;

    fn field(name: &str, value: &str) -> SecretField {
        SecretField { name: name.into(), value: value.as_bytes().to_vec() }
    }

    fn request(secret: &str, current: Option<(&str, &str)>) -> Preflight {
        Preflight {
            request_id: "req-1".into(),
            secret: secret.into(),
            placeholder_fields: vec![field("value", "PLACEHOLDER-0000")],
            current_version_id: current.map(|c| c.0.to_string()).unwrap_or_default(),
            current_fields: current.map(|c| vec![field("value", c.1)]).unwrap_or_default(),
        }
    }

    fn config(dir: &Path, body: &str) -> AgentConfig {
        let text = format!(
            "state_dir = 'state'\n[[secret]]\nname = 'api'\n{}",
            body.replace("DIR", &dir.display().to_string())
        );
        AgentConfig::from_str(&dir.join("agent.toml"), &text).unwrap()
    }

    fn by_subject<'a>(r: &'a PreflightResult, prefix: &str) -> &'a PreflightCheck {
        r.checks.iter().find(|c| c.subject.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix}: {r:?}"))
    }

    #[tokio::test]
    async fn an_undeclared_secret_is_one_failed_check() {
        let dir = tempfile::tempdir().unwrap();
        let r = run(&config(dir.path(), ""), request("other", None)).await;
        assert_eq!(r.request_id, "req-1");
        assert_eq!(r.checks.len(), 1);
        assert!(!r.checks[0].ok);
        assert!(r.checks[0].detail.starts_with("secret other is not declared in "), "{:?}", r.checks[0]);
    }

    /// Files are rendered but never written; a replace file must hold the
    /// current value; a missing program and a failing health check are
    /// problems; no value appears in any detail.
    #[tokio::test]
    async fn the_dry_run_reports_every_problem_and_writes_nothing() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("app.env"), "API_KEY=CURRENT-VALUE-1\n").unwrap();
        std::fs::set_permissions(d.join("app.env"), std::fs::Permissions::from_mode(0o640)).unwrap();
        std::fs::write(d.join("legacy.ini"), "key = SOMETHING-ELSE\n").unwrap();
        let c = config(
            d,
            "[[secret.file]]\npath = 'DIR/app.env'\nkind = 'env-file'\nkeys = { API_KEY = 'value' }\n\
             [[secret.file]]\npath = 'DIR/legacy.ini'\nkind = 'replace'\n\
             [[secret.file]]\npath = 'DIR/new.json'\nkind = 'template'\ntemplate = '{{ value }}'\nmode = '0644'\n\
             [[secret.file]]\npath = 'DIR/missing/x.conf'\nkind = 'template'\ntemplate = '{{ value }}'\n\
             [secret.restart]\nkind = 'command'\ncommand = ['DIR/no-such-restart']\n\
             [secret.health]\nkind = 'command'\ncommand = ['/bin/sh', '-c', 'echo bad $V >&2; exit 3']\nenv = { V = 'value' }\nretries = 1\n",
        );
        let before = std::fs::read(d.join("app.env")).unwrap();
        let r = run(&c, request("api", Some(("v1", "CURRENT-VALUE-1")))).await;
        assert_eq!(r.checks.len(), 6, "{r:?}");

        let env = by_subject(&r, &format!("file {}/app.env", d.display()));
        assert!(env.ok, "{env:?}");
        let m = std::fs::metadata(d.join("app.env")).unwrap();
        assert!(
            env.detail.contains(&format!("mode 0640, owner uid {}, group gid {} (kept)", m.uid(), m.gid())),
            "{env:?}"
        );
        let legacy = by_subject(&r, &format!("file {}/legacy.ini", d.display()));
        assert!(
            !legacy.ok && legacy.detail.contains("does not contain the previous value of field value (version v1)"),
            "{legacy:?}"
        );
        assert!(legacy.detail.ends_with("(secret[0].file[1])"), "{legacy:?}");
        let new = by_subject(&r, &format!("file {}/new.json", d.display()));
        assert!(new.ok && new.detail.contains("does not exist yet: it will be created with mode 0644"), "{new:?}");
        let missing = by_subject(&r, &format!("file {}/missing/x.conf", d.display()));
        assert!(!missing.ok && missing.detail.contains("missing does not exist"), "{missing:?}");
        let restart = by_subject(&r, "restart command");
        assert!(!restart.ok && restart.detail.contains("no-such-restart: No such file"), "{restart:?}");
        let health = by_subject(&r, "health command /bin/sh");
        assert!(!health.ok && health.detail.contains("exited with status 3: bad <redacted>"), "{health:?}");

        // Nothing written, nothing created; no value in any detail.
        assert_eq!(std::fs::read(d.join("app.env")).unwrap(), before);
        assert!(!d.join("new.json").exists());
        let all = format!("{r:?}");
        assert!(!all.contains("CURRENT-VALUE") && !all.contains("PLACEHOLDER"), "{all}");
    }

    #[tokio::test]
    async fn a_working_host_passes_every_check() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("legacy.ini"), "key = CURRENT-VALUE-1\n").unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = config(
            d,
            &format!(
                "[[secret.file]]\npath = 'DIR/legacy.ini'\nkind = 'replace'\n\
                 [secret.restart]\nkind = 'command'\ncommand = ['true']\n\
                 [secret.health]\nkind = 'tcp'\naddress = '{}'\n",
                l.local_addr().unwrap()
            ),
        );
        let r = run(&c, request("api", Some(("v1", "CURRENT-VALUE-1")))).await;
        assert!(r.checks.iter().all(|c| c.ok), "{r:?}");
        assert_eq!(r.checks.len(), 3);
        assert!(by_subject(&r, "restart command true").detail.ends_with("/true exists and is executable"));
        assert_eq!(by_subject(&r, "health tcp").detail, "passes now");
    }

    #[test]
    fn executables_are_found_like_the_restart_runs_them() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("restart-app");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = executable(script.to_str().unwrap(), "").unwrap_err();
        assert!(e.ends_with("is not executable (mode 0644)"), "{e}");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(executable("restart-app", &format!("/nonexistent:{}", dir.path().display())).unwrap(), script);
        let e = executable("restart-app", "/usr/bin").unwrap_err();
        assert!(e.starts_with("restart-app is not found in the agent's PATH (/usr/bin)"), "{e}");
        assert!(executable(dir.path().to_str().unwrap(), "").unwrap_err().ends_with("is not a regular file"));
    }

    /// A health check that hangs does not hang the dry run.
    #[tokio::test(start_paused = true)]
    async fn a_hanging_health_check_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(
            dir.path(),
            "[secret.health]\nkind = 'command'\ncommand = ['/bin/sleep', '3600']\ntimeout = '1h'\nretries = 1\n",
        );
        let r = run(&c, request("api", Some(("v1", "CURRENT-VALUE-1")))).await;
        let h = by_subject(&r, "health command /bin/sleep");
        assert!(!h.ok && h.detail == format!("did not answer within {}s", HEALTH_BUDGET.as_secs()), "{h:?}");
        // Before a first version is deployed the service need not answer: noted, not a problem.
        let r = run(&c, request("api", None)).await;
        let h = by_subject(&r, "health command /bin/sleep");
        assert!(h.ok && h.detail.contains("not required before the first version"), "{h:?}");
    }

    /// The health check runs against the version running now: its expected
    /// text names the current version (or, with none known, is skipped and
    /// the detail says so).
    #[tokio::test]
    async fn the_health_check_expects_the_current_version() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(
            dir.path(),
            "[secret.health]\nkind = 'command'\ncommand = ['/bin/echo', 'serving v1']\noutput_contains = 'serving {{ version_id }}'\nretries = 1\n",
        );
        let r = run(&c, request("api", Some(("v1", "CURRENT-VALUE-1")))).await;
        assert_eq!(by_subject(&r, "health").detail, "passes now", "{r:?}");
        let r = run(&c, request("api", Some(("v0", "CURRENT-VALUE-0")))).await;
        let h = by_subject(&r, "health");
        assert!(!h.ok && h.detail.contains("exited 0 without \"serving v0\" in its output"), "{h:?}");
        let r = run(&c, request("api", None)).await;
        let h = by_subject(&r, "health");
        assert!(h.ok && h.detail.ends_with("no current version is known, so it was not matched"), "{h:?}");
    }
}
