//! The side effects outside the file system: running a declared command,
//! restarting the consuming service, checking its health.
//!
//! Commands run without a shell, in their own process group, with a
//! deadline. Secret values reach them only through declared environment
//! variables or stdin. If the caller's future is dropped (shutdown, an
//! aborted apply) the whole process group is killed. Captured output is
//! scrubbed of the versions' values before it is used in a message.

use super::render::{Expect, Fields, Scrubber};
use crate::config::{CaBundle, CommandSpec, HealthCheck, HealthConfig, HttpUrl, RestartAction, RestartConfig};
use http_body_util::BodyExt;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use rekey_common::error::chain;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Output kept from a command, per stream.
const OUTPUT_CAP: usize = 8 * 1024;
/// How long to wait for output after the command exited (a daemon it
/// started may hold the pipes open forever).
const OUTPUT_GRACE: Duration = Duration::from_millis(200);
/// Body read from an HTTP health endpoint.
const BODY_CAP: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} did not finish within {}", fmt_duration(*.after))]
    Timeout { program: String, after: Duration },
    #[error("{program} exited with {}{}", fmt_status(*.status), fmt_tail(.output))]
    Exit { program: String, status: ExitStatus, output: String },
    #[error("{what} of {program} needs field {field}, which {available}")]
    NoField { program: String, what: String, field: String, available: String },
    #[error("cannot read pidfile {path}")]
    Pidfile {
        path: PathBuf,
        #[source]
        source: super::files::FileError,
    },
    #[error("pidfile {path} does not hold a process id")]
    BadPidfile { path: PathBuf },
    #[error("process {pid} named by {path} is not running")]
    NotRunning { pid: i32, path: PathBuf },
    #[error("cannot tell which program process {pid} named by pidfile {path} runs; refusing to signal it")]
    UnknownExe {
        pid: i32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "process {pid} named by pidfile {path} runs {}, not the configured executable {}; refusing to signal it",
        .exe.display(), .expected.display()
    )]
    WrongProcess { pid: i32, path: PathBuf, exe: PathBuf, expected: PathBuf },
    #[error("cannot send {signal} to process {pid}")]
    Signal {
        signal: Signal,
        pid: i32,
        #[source]
        source: nix::Error,
    },
}

fn fmt_status(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("status {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => s.to_string(),
    }
}

fn fmt_tail(output: &str) -> String {
    if output.is_empty() { String::new() } else { format!(": {output}") }
}

/// `850ms`, `2.5s`, `30s`, `2m 5s`: short and readable in a report.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 10_000 {
        let tenths = (ms + 50) / 100;
        if tenths.is_multiple_of(10) {
            format!("{}s", tenths / 10)
        } else {
            format!("{}.{}s", tenths / 10, tenths % 10)
        }
    } else if ms < 120_000 {
        format!("{}s", (ms + 500) / 1000)
    } else {
        let s = (ms + 500) / 1000;
        format!("{}m {}s", s / 60, s % 60)
    }
}

/// The last non-empty line of a command's output, bounded, scrubbed.
fn last_line(stderr: &[u8], stdout: &[u8], scrub: &Scrubber) -> String {
    let pick =
        |b: &[u8]| String::from_utf8_lossy(b).lines().map(str::trim).rfind(|l| !l.is_empty()).map(str::to_string);
    let line = pick(stderr).or_else(|| pick(stdout)).unwrap_or_default();
    let line = scrub.scrub(&line);
    if line.chars().count() > 200 { format!("{}…", line.chars().take(200).collect::<String>()) } else { line }
}

/// Kills the command's process group unless it finished: a dropped future
/// (aborted apply, shutdown) must not leave a restart half running.
struct GroupGuard {
    pgid: Option<i32>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

async fn read_capped<R: AsyncRead + Unpin>(mut r: R) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => {
                let room = OUTPUT_CAP.saturating_sub(out.len());
                out.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// Values for a command, where they come from: the version being applied,
/// or (rolling back) the previous one, or none (recovery after a crash).
#[derive(Clone, Copy)]
pub struct CommandValues<'a> {
    /// The version these values are of ("" when not known), for health
    /// expectations that name it.
    pub version_id: &'a str,
    pub fields: &'a Fields,
    /// For the message when a field is missing: "the new version does not carry".
    pub source: &'a str,
}

/// What a simulated command does instead of a process: its stdout, or the
/// failure a non-zero exit would report.
pub type SimulatedRun = std::pin::Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send>>;

/// Runs declared commands in place of processes, for the deterministic
/// simulation: given the argv and the version id the values are of.
pub type CommandRunner = fn(Vec<String>, String) -> SimulatedRun;

static RUNNER: OnceLock<CommandRunner> = OnceLock::new();

/// Makes every declared command of this process (restarts, command health
/// checks) run through `runner` instead of spawning a process; the deadline,
/// the errors and everything around them stay the agent's own. For the
/// deterministic simulation only; never called by `rekey-agent`. Once per
/// process; false if one was installed already.
pub fn install_command_runner(runner: CommandRunner) -> bool {
    RUNNER.set(runner).is_ok()
}

async fn run_simulated(
    runner: CommandRunner,
    spec: &CommandSpec,
    values: &CommandValues<'_>,
    timeout: Duration,
) -> Result<Vec<u8>, ActionError> {
    use std::os::unix::process::ExitStatusExt;
    let program = spec.program().to_string();
    match tokio::time::timeout(timeout, runner(spec.argv.clone(), values.version_id.to_string())).await {
        Ok(Ok(stdout)) => Ok(stdout),
        Ok(Err(output)) => Err(ActionError::Exit { program, status: ExitStatus::from_raw(1 << 8), output }),
        Err(_) => Err(ActionError::Timeout { program, after: timeout }),
    }
}

/// Runs a declared command to completion within `timeout`.
pub async fn run_command(
    spec: &CommandSpec,
    values: &CommandValues<'_>,
    timeout: Duration,
    scrub: &Scrubber,
) -> Result<(), ActionError> {
    run_command_output(spec, values, timeout, scrub).await.map(drop)
}

/// Runs a declared command to completion within `timeout`; its stdout
/// (bounded) when it exits 0.
pub async fn run_command_output(
    spec: &CommandSpec,
    values: &CommandValues<'_>,
    timeout: Duration,
    scrub: &Scrubber,
) -> Result<Vec<u8>, ActionError> {
    if let Some(runner) = RUNNER.get() {
        return run_simulated(*runner, spec, values, timeout).await;
    }
    let program = spec.program().to_string();
    let mut cmd = tokio::process::Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .stdin(if spec.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for (var, field) in &spec.env {
        let v = values.fields.get(field).ok_or_else(|| ActionError::NoField {
            program: program.clone(),
            what: format!("environment variable {var}"),
            field: field.clone(),
            available: values.source.to_string(),
        })?;
        cmd.env(var, std::ffi::OsStr::from_bytes(v.expose()));
    }
    let stdin_value = match &spec.stdin {
        Some(field) => Some(values.fields.get(field).ok_or_else(|| ActionError::NoField {
            program: program.clone(),
            what: "stdin".into(),
            field: field.clone(),
            available: values.source.to_string(),
        })?),
        None => None,
    };
    let mut child = cmd.spawn().map_err(|source| ActionError::Spawn { program: program.clone(), source })?;
    let mut guard = GroupGuard { pgid: child.id().map(|p| p as i32) };
    if let (Some(mut stdin), Some(v)) = (child.stdin.take(), stdin_value) {
        // A command that does not read its stdin is not an error.
        let _ = stdin.write_all(v.expose()).await;
    }
    let out = tokio::spawn(read_capped(child.stdout.take().expect("piped")));
    let err = tokio::spawn(read_capped(child.stderr.take().expect("piped")));
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(ActionError::Spawn { program, source }),
        Err(_) => {
            drop(guard);
            let _ = child.kill().await;
            return Err(ActionError::Timeout { program, after: timeout });
        }
    };
    // Exited: what it left running in its group (a daemon) is its business.
    guard.pgid = None;
    let collect = async {
        let stdout = out.await.unwrap_or_default();
        let stderr = err.await.unwrap_or_default();
        (stdout, stderr)
    };
    let (stdout, stderr) = tokio::time::timeout(OUTPUT_GRACE, collect).await.unwrap_or_default();
    if status.success() {
        return Ok(stdout);
    }
    Err(ActionError::Exit { program, status, output: last_line(&stderr, &stdout, scrub) })
}

/// A live process, not a zombie waiting for its parent.
fn is_running(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(s) => s.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')).unwrap_or(true),
        Err(_) => true,
    }
}

/// Reads a pidfile: a positive process id on the first line. Resolved like
/// a declared file: a symlink on the way is followed only if root (or the
/// agent's user) owns it (`/var/run -> /run`), an unsafe transition is refused.
pub fn read_pidfile(path: &Path) -> Result<i32, ActionError> {
    use std::io::Read;
    let err = |e: super::files::FileError| ActionError::Pidfile { path: path.to_path_buf(), source: e };
    let at = super::chase::chase(path, true).map_err(|e| err(e.into()))?;
    let mut f = at
        .open_file()
        .map_err(|e| err(e.into()))?
        .ok_or_else(|| err(std::io::Error::from(nix::errno::Errno::ENOENT).into()))?;
    let mut text = String::new();
    // A pid is short: read a bounded prefix, whatever the file holds.
    (&mut f).take(64).read_to_string(&mut text).map_err(|e| err(e.into()))?;
    text.lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
        .filter(|p| *p > 1)
        .ok_or_else(|| ActionError::BadPidfile { path: path.to_path_buf() })
}

/// The pidfile is trusted only if the process it names runs the configured
/// executable: `/proc/PID/exe` (the kernel's record, not the process's own
/// argv) must be that file, compared after resolving the configured path's
/// symlinks. A binary replaced by an upgrade reads `PATH (deleted)`: it is
/// still that program.
fn check_executable(pid: i32, pidfile: &Path, expected: &Path) -> Result<(), ActionError> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map_err(|source| ActionError::UnknownExe {
        pid,
        path: pidfile.to_path_buf(),
        source,
    })?;
    let exe = match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(s) => PathBuf::from(s),
        None => exe,
    };
    let canonical = std::fs::canonicalize(expected).unwrap_or_else(|_| expected.to_path_buf());
    if exe == canonical || exe == expected {
        return Ok(());
    }
    Err(ActionError::WrongProcess { pid, path: pidfile.to_path_buf(), exe, expected: expected.to_path_buf() })
}

/// The process a signal restart would signal: named by the pidfile,
/// running, and running the configured executable. Checked before any file
/// is written, and again right before the signal.
pub fn signal_target(pidfile: &Path, executable: &Path) -> Result<i32, ActionError> {
    let pid = read_pidfile(pidfile)?;
    if !is_running(pid) {
        return Err(ActionError::NotRunning { pid, path: pidfile.to_path_buf() });
    }
    check_executable(pid, pidfile, executable)?;
    Ok(pid)
}

/// Runs the declared restart once (no jitter here: the caller waits first).
pub async fn restart(r: &RestartConfig, values: &CommandValues<'_>, scrub: &Scrubber) -> Result<(), ActionError> {
    match &r.action {
        RestartAction::Systemd { unit } => {
            let spec = CommandSpec::plain(vec!["systemctl".into(), "restart".into(), unit.clone()]);
            run_command(&spec, values, r.timeout, scrub).await
        }
        RestartAction::Command(spec) => run_command(spec, values, r.timeout, scrub).await,
        RestartAction::Signal { pidfile, signal, executable } => {
            let pid = signal_target(pidfile, executable)?;
            kill(Pid::from_raw(pid), *signal).map_err(|source| ActionError::Signal { signal: *signal, pid, source })
        }
    }
}

/// Why a health check did not pass: "health check URL returned 503, 5 tries over 30s".
#[derive(Debug)]
pub struct HealthFailure {
    pub target: String,
    pub last: String,
    /// 0: the check could not be run at all (`last` says why).
    pub tries: u32,
    pub elapsed: Duration,
}

impl fmt::Display for HealthFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tries == 0 {
            return write!(f, "health check {} {}", self.target, self.last);
        }
        let tries = if self.tries == 1 { "1 try".to_string() } else { format!("{} tries", self.tries) };
        write!(f, "health check {} {}, {tries} over {}", self.target, self.last, fmt_duration(self.elapsed))
    }
}

impl std::error::Error for HealthFailure {}

/// What a check is, for messages: the URL, `tcp HOST:PORT`, `command PROGRAM`.
pub fn target(check: &HealthCheck) -> String {
    match check {
        HealthCheck::Http { url, .. } => url.to_string(),
        HealthCheck::Tcp { address } => format!("tcp {address}"),
        HealthCheck::Command { command, .. } => format!("command {}", command.program()),
    }
}

/// The system's root certificates, read once.
fn system_roots() -> Result<Arc<rustls::RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<rustls::RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut store = rustls::RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err("no system root certificate could be loaded; set ca_file".to_string());
            }
            Ok(Arc::new(store))
        })
        .clone()
}

/// TLS 1.2/1.3 with ring, verifying the server against `ca` or the system roots.
fn tls_client(ca: Option<&CaBundle>) -> Result<tokio_rustls::TlsConnector, String> {
    let roots = match ca {
        None => system_roots()?,
        Some(ca) => {
            let mut store = rustls::RootCertStore::empty();
            for der in &ca.certs {
                store
                    .add(rustls_pki_types::CertificateDer::from(der.clone()))
                    .map_err(|e| format!("cannot use a certificate of {}: {e}", ca.path.display()))?;
            }
            Arc::new(store)
        }
    };
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// One GET; returns the status and up to [`BODY_CAP`] of the body.
async fn http_get(url: &HttpUrl, ca: Option<&CaBundle>) -> Result<(u16, Vec<u8>), String> {
    let stream = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("failed: cannot connect to {}:{}: {e}", url.host, url.port))?;
    if !url.tls {
        return http_request(stream, url).await;
    }
    let connector = tls_client(ca).map_err(|e| format!("failed: {e}"))?;
    let name = rustls_pki_types::ServerName::try_from(url.host.clone())
        .map_err(|e| format!("failed: {:?} is not a valid TLS server name: {e}", url.host))?;
    let tls = connector
        .connect(name, stream)
        .await
        .map_err(|e| format!("failed: TLS handshake with {}:{}: {}", url.host, url.port, chain(&e)))?;
    http_request(tls, url).await
}

async fn http_request<S>(stream: S, url: &HttpUrl) -> Result<(u16, Vec<u8>), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| format!("failed: {}", chain(&e)))?;
    let conn = tokio::spawn(conn);
    let _abort = AbortOnDrop(conn);
    let req = http::Request::get(url.path.as_str())
        .header(http::header::HOST, url.authority.as_str())
        .header(http::header::USER_AGENT, concat!("rekey-agent/", env!("CARGO_PKG_VERSION")))
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| format!("failed: {e}"))?;
    let resp = sender.send_request(req).await.map_err(|e| format!("failed: {}", chain(&e)))?;
    let status = resp.status().as_u16();
    let body = http_body_util::Limited::new(resp.into_body(), BODY_CAP)
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    Ok((status, body))
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One attempt: `Ok` if healthy, else what went wrong ("returned 503").
/// `expected`: the check's expectation rendered for the version.
async fn check_once(
    check: &HealthCheck,
    expected: Option<&str>,
    values: &CommandValues<'_>,
    timeout: Duration,
    scrub: &Scrubber,
) -> Result<(), String> {
    match check {
        HealthCheck::Http { url, status, ca, .. } => {
            let (got, body) = tokio::time::timeout(timeout, http_get(url, ca.as_ref()))
                .await
                .map_err(|_| format!("timed out after {}", fmt_duration(timeout)))??;
            if got != *status {
                return Err(format!("returned {got}"));
            }
            if let Some(needle) = expected
                && !String::from_utf8_lossy(&body).contains(needle)
            {
                return Err(format!("returned {got} without {needle:?} in the body"));
            }
            Ok(())
        }
        HealthCheck::Tcp { address } => {
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address.as_str())).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("failed: {e}")),
                Err(_) => Err(format!("timed out after {}", fmt_duration(timeout))),
            }
        }
        HealthCheck::Command { command, .. } => match run_command_output(command, values, timeout, scrub).await {
            Ok(out) => match expected {
                Some(needle) if !String::from_utf8_lossy(&out).contains(needle) => {
                    Err(format!("exited 0 without {needle:?} in its output"))
                }
                _ => Ok(()),
            },
            Err(ActionError::Exit { status, output, .. }) => {
                Err(format!("exited with {}{}", fmt_status(status), fmt_tail(&output)))
            }
            Err(ActionError::Timeout { after, .. }) => Err(format!("timed out after {}", fmt_duration(after))),
            Err(e) => Err(format!("failed: {}", chain(&e))),
        },
    }
}

/// The check's expected text, if it has one (`body_contains`, `output_contains`).
pub fn expectation(check: &HealthCheck) -> Option<&Expect> {
    match check {
        HealthCheck::Http { body_contains, .. } => body_contains.as_ref(),
        HealthCheck::Command { output_contains, .. } => output_contains.as_ref(),
        HealthCheck::Tcp { .. } => None,
    }
}

/// The check's expected text for the version in `values`. With no version
/// known at all (recovery after a crash) an expectation that names the
/// version cannot be evaluated: the check then runs without it, and says so.
pub fn expected_text(check: &HealthCheck, values: &CommandValues<'_>) -> Result<Option<String>, String> {
    let Some(e) = expectation(check) else { return Ok(None) };
    match e.render(values.version_id, values.fields) {
        Ok(text) => Ok(Some(text)),
        Err(_) if values.fields.is_empty() && !e.is_fixed() => {
            tracing::warn!(target = %target(check), "no version is known here: checking without the expected text");
            Ok(None)
        }
        Err(why) => Err(format!("cannot be evaluated for version {:?}: {why}", values.version_id)),
    }
}

/// Checks until one attempt passes or `retries` attempts failed.
pub async fn check_health(h: &HealthConfig, values: &CommandValues<'_>, scrub: &Scrubber) -> Result<(), HealthFailure> {
    let start = Instant::now();
    let expected = expected_text(&h.check, values).map_err(|why| HealthFailure {
        target: target(&h.check),
        last: scrub.scrub(&why),
        tries: 0,
        elapsed: Duration::ZERO,
    })?;
    let mut last = String::new();
    for attempt in 1..=h.retries {
        match check_once(&h.check, expected.as_deref(), values, h.timeout, scrub).await {
            Ok(()) => {
                tracing::debug!(target = %target(&h.check), attempt, "health check passed");
                return Ok(());
            }
            Err(why) => {
                tracing::debug!(target = %target(&h.check), attempt, reason = %scrub.scrub(&why), "health check failed");
                last = why;
            }
        }
        if attempt < h.retries {
            tokio::time::sleep(h.interval).await;
        }
    }
    Err(HealthFailure {
        target: target(&h.check),
        last: scrub.scrub(&last),
        tries: h.retries,
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn sh(script: &str) -> CommandSpec {
        CommandSpec::plain(vec!["/bin/sh".into(), "-c".into(), script.into()])
    }

    fn none() -> CommandValues<'static> {
        static EMPTY: std::sync::OnceLock<Fields> = std::sync::OnceLock::new();
        CommandValues { version_id: "", fields: EMPTY.get_or_init(Fields::default), source: "no version is available" }
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(fmt_duration(Duration::from_millis(2500)), "2.5s");
        assert_eq!(fmt_duration(Duration::from_millis(3000)), "3s");
        assert_eq!(fmt_duration(Duration::from_secs(30)), "30s");
        assert_eq!(fmt_duration(Duration::from_secs(125)), "2m 5s");
    }

    #[tokio::test]
    async fn secrets_reach_commands_by_env_and_stdin_only() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let mut spec = sh(&format!("printf '%s|' \"$API_KEY\" > {0}; cat >> {0}", out.display()));
        spec.env = BTreeMap::from([("API_KEY".to_string(), "value".to_string())]);
        spec.stdin = Some("value".into());
        let fields = Fields::from_pairs([("value", &b"s3cret-value"[..])]);
        let values = CommandValues { version_id: "v1", fields: &fields, source: "the new version does not carry" };
        run_command(&spec, &values, Duration::from_secs(5), &Scrubber::default()).await.unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "s3cret-value|s3cret-value");

        spec.env = BTreeMap::from([("API_KEY".to_string(), "nope".to_string())]);
        let e = run_command(&spec, &values, Duration::from_secs(5), &Scrubber::default()).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "environment variable API_KEY of /bin/sh needs field nope, which the new version does not carry"
        );
    }

    #[tokio::test]
    async fn failures_are_reported_with_scrubbed_output() {
        let fields = Fields::from_pairs([("value", &b"s3cret-value"[..])]);
        let scrub = Scrubber::new(&[&fields]);
        let e = run_command(
            &sh("echo noise; echo \"bad key s3cret-value\" >&2; exit 3"),
            &none(),
            Duration::from_secs(5),
            &scrub,
        )
        .await
        .unwrap_err()
        .to_string();
        assert_eq!(e, "/bin/sh exited with status 3: bad key <redacted>");
        let e = run_command(&sh("sleep 5"), &none(), Duration::from_millis(200), &scrub).await.unwrap_err();
        assert_eq!(e.to_string(), "/bin/sh did not finish within 200ms");
        let e = run_command(&CommandSpec::plain(vec!["/no/such/prog".into()]), &none(), Duration::from_secs(1), &scrub)
            .await
            .unwrap_err();
        assert!(chain(&e).starts_with("cannot run /no/such/prog: "), "{e}");
    }

    /// A daemon started by the command keeps the pipes open: the command's
    /// exit, not EOF, ends the wait.
    #[tokio::test]
    async fn a_daemon_holding_the_pipes_does_not_block() {
        let t = Instant::now();
        run_command(&sh("sleep 3 & exit 0"), &none(), Duration::from_secs(5), &Scrubber::default()).await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn dropping_the_future_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let spec = sh(&format!("echo $$ > {}; sleep 30", pidfile.display()));
        let (values, scrub) = (none(), Scrubber::default());
        let mut fut = Box::pin(run_command(&spec, &values, Duration::from_secs(60), &scrub));
        // Drop the future only once the command is really running (its pid
        // is written), however slowly a loaded machine starts it.
        let deadline = Instant::now() + rekey_common::testing::budget();
        let pid = loop {
            tokio::select! {
                _ = &mut fut => panic!("the command ended by itself"),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            if let Ok(pid) = read_pidfile(&pidfile) {
                break pid;
            }
            assert!(Instant::now() < deadline, "the command never wrote its pid");
        };
        drop(fut);
        let deadline = Instant::now() + rekey_common::testing::budget();
        while is_running(pid) {
            assert!(Instant::now() < deadline, "process {pid} survived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn health_checks_report_what_failed() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = HealthConfig {
            check: HealthCheck::Tcp { address: addr.clone() },
            retries: 2,
            interval: Duration::from_millis(10),
            timeout: Duration::from_secs(1),
        };
        check_health(&h, &none(), &Scrubber::default()).await.unwrap();
        drop(l);
        let e = check_health(&h, &none(), &Scrubber::default()).await.unwrap_err().to_string();
        assert!(e.starts_with(&format!("health check tcp {addr} failed: ")) && e.contains(", 2 tries over "), "{e}");

        let h = HealthConfig {
            check: HealthCheck::Command { command: sh("exit 4"), output_contains: None },
            retries: 1,
            ..h
        };
        let e = check_health(&h, &none(), &Scrubber::default()).await.unwrap_err().to_string();
        assert!(e.starts_with("health check command /bin/sh exited with status 4, 1 try over "), "{e}");
    }

    #[tokio::test]
    async fn signal_restart_needs_a_live_process() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("app.pid");
        let r = RestartConfig {
            action: RestartAction::Signal {
                pidfile: pidfile.clone(),
                signal: Signal::SIGHUP,
                executable: "/bin/sleep".into(),
            },
            jitter: Duration::ZERO,
            timeout: Duration::from_secs(1),
        };
        let e = restart(&r, &none(), &Scrubber::default()).await.unwrap_err();
        assert!(e.to_string().starts_with("cannot read pidfile"), "{e}");
        std::fs::write(&pidfile, "garbage\n").unwrap();
        let e = restart(&r, &none(), &Scrubber::default()).await.unwrap_err();
        assert!(e.to_string().contains("does not hold a process id"), "{e}");
        // A process that runs something else is never signalled.
        let mut other = std::process::Command::new("/bin/sh").args(["-c", "sleep 30; exit 0"]).spawn().unwrap();
        std::fs::write(&pidfile, format!("{}\n", other.id())).unwrap();
        let e = restart(&r, &none(), &Scrubber::default()).await.unwrap_err().to_string();
        assert!(e.starts_with(&format!("process {} named by pidfile {} runs ", other.id(), pidfile.display())), "{e}");
        assert!(e.ends_with("not the configured executable /bin/sleep; refusing to signal it"), "{e}");
        assert!(other.try_wait().unwrap().is_none(), "the unrelated process was signalled");
        other.kill().unwrap();
        other.wait().unwrap();
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        std::fs::write(&pidfile, format!("{}\n", child.id())).unwrap();
        restart(&r, &none(), &Scrubber::default()).await.unwrap();
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(Signal::SIGHUP as i32));
        let e = restart(&r, &none(), &Scrubber::default()).await.unwrap_err();
        assert!(e.to_string().contains("is not running"), "{e}");
    }

    /// A real https server (rustls, a certificate for 127.0.0.1 signed by an
    /// rcgen CA) answering every GET with `body`. Returns its address and
    /// the CA's PEM.
    async fn https_server(body: &'static str) -> (std::net::SocketAddr, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let resp =
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                    let _ = tls.write_all(resp.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        (addr, ca_cert.pem())
    }

    fn https_config(dir: &Path, url: &str, ca_pem: Option<&str>, expect: &str) -> HealthConfig {
        let mut text = format!(
            "state_dir = 's'\n[[secret]]\nname = 'aws'\npublic_fields = ['access_key_id']\n[secret.health]\n\
             kind = 'http'\nurl = '{url}'\nbody_contains = '{expect}'\nretries = 1\ntimeout = '5s'\n"
        );
        if let Some(pem) = ca_pem {
            std::fs::write(dir.join("ca.pem"), pem).unwrap();
            text.push_str("ca_file = 'ca.pem'\n");
        }
        let c = crate::config::AgentConfig::from_str(&dir.join("agent.toml"), &text).unwrap();
        c.secret("aws").unwrap().health.clone().unwrap()
    }

    /// https health checks verify the server against the configured CA (or
    /// the system roots) and can require the version's public fields.
    #[tokio::test]
    async fn https_checks_verify_the_server_and_match_the_new_version() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, ca_pem) = https_server("ok: serving access key AKIANEW1234\n").await;
        let url = format!("https://127.0.0.1:{}/health", addr.port());
        let fields =
            Fields::from_pairs([("access_key_id", &b"AKIANEW1234"[..]), ("secret_access_key", &b"wJalr-secret"[..])]);
        let new = CommandValues { version_id: "v2", fields: &fields, source: "the new version does not carry" };
        let scrub = Scrubber::default();

        let h = https_config(dir.path(), &url, Some(&ca_pem), "serving access key {{ access_key_id }}");
        check_health(&h, &new, &scrub).await.unwrap();

        // The service still reports the old key id: the check fails.
        let old_fields = Fields::from_pairs([("access_key_id", &b"AKIAOLD0000"[..])]);
        let old =
            CommandValues { version_id: "v1", fields: &old_fields, source: "the previous version does not carry" };
        let e = check_health(&h, &old, &scrub).await.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "health check {url} returned 200 without \"serving access key AKIAOLD0000\" in the body, 1 try"
            )),
            "{e}"
        );

        // Another CA: the handshake is refused.
        let (_, other_ca) = https_server("x").await;
        let h = https_config(dir.path(), &url, Some(&other_ca), "ok");
        let e = check_health(&h, &new, &scrub).await.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("health check {url} failed: TLS handshake with 127.0.0.1:{}: ", addr.port())),
            "{e}"
        );
        assert!(e.to_lowercase().contains("certificate"), "{e}");

        // The system roots do not know the test CA either.
        let h = https_config(dir.path(), &url, None, "ok");
        assert!(check_health(&h, &new, &scrub).await.is_err());

        // A config whose ca_file holds no certificate is refused at load.
        std::fs::write(dir.path().join("ca.pem"), "not a certificate\n").unwrap();
        let text = format!(
            "state_dir = 's'\n[[secret]]\nname = 'a'\n[secret.health]\nkind = 'http'\nurl = '{url}'\nca_file = 'ca.pem'\n"
        );
        let e = crate::config::AgentConfig::from_str(&dir.path().join("agent.toml"), &text).unwrap_err().to_string();
        assert!(
            e.contains("field `secret[0].health.ca_file`") && e.contains("expected at least one PEM certificate"),
            "{e}"
        );
    }

    /// A version that lacks a field the expectation names cannot be checked:
    /// said before anything runs.
    #[test]
    fn an_expectation_the_version_cannot_fill_is_an_error() {
        let public = std::collections::BTreeSet::from(["access_key_id".to_string()]);
        let e = Expect::parse("key {{ access_key_id }}", &public).unwrap();
        let check = HealthCheck::Command { command: sh("true"), output_contains: Some(e) };
        let fields = Fields::from_pairs([("value", &b"abcdef"[..])]);
        let values = CommandValues { version_id: "v2", fields: &fields, source: "the new version does not carry" };
        let err = expected_text(&check, &values).unwrap_err();
        assert_eq!(
            err,
            "cannot be evaluated for version \"v2\": the checked version has no field access_key_id (it has value)"
        );
        // Nothing known at all (recovery): checked without the text.
        assert_eq!(expected_text(&check, &none()).unwrap(), None);
    }
}
