//! `command`: any other key source, through operator-supplied executables.
//! Each operation (`create`, `delete`, and optionally `deactivate`,
//! `reactivate`, `list`, `last_used`) is an argv array run without a shell,
//! with a JSON request on stdin and (for `create`, `list`, `last_used`) a
//! JSON answer on stdout. The contract is in `docs/providers.md`:
//!
//! - stdin: `{"op", "secret", "rotation_id", "previous_version", "version", "replay"}`
//! - `create` prints `{"id": "...", "fields": {"name": "value", ...}, "notes": [...]}`
//! - `list` prints `{"versions": [{"id", "status": "active"|"inactive", "created_unix"}]}`
//! - `last_used` prints `{"last_used": null | "never" | TIME, "source": "…"}`
//!   where TIME is unix seconds (an integer, or with a fraction) or an RFC
//!   3339 string, or `{"last_used_ms": UNIX_MS}`; optional `"resolution_ms"`
//!   says how coarse the time is (default: as written, see [`crate::timestamp`]),
//!   optional `"source"` where the use came from (never a secret). A time
//!   that cannot be read is an error, never "no usage".
//! - exit 0: done; 3: the version does not exist; 75: temporary failure
//!   (retried); anything else: failed. stderr is quoted in errors, with every
//!   value the provider knows replaced by `<redacted>`.
//!
//! The environment is cleared: a command sees `PATH`, `HOME`, `LANG`, the
//! variables named in `pass_env` and those set in `env` — never rekeyd's
//! master key. Each run has a deadline, after which it is killed.
//!
//! Idempotency of `create` per rotation id: the versions the list shows are
//! recorded (intent) before running `create`, the new version (id and fields,
//! sealed) right after. A replay returns the recorded version; if only the
//! intent is there, versions that appeared since are revoked (when `list` is
//! configured: `deactivate` first for an active one, when configured, then
//! `delete`), and `create` runs again with `"replay": true` so the command
//! can clean up what only it can see.
//!
//! `delete` follows the same order: with `list` and `deactivate` configured,
//! an active version is deactivated before it is deleted.

use crate::journal::{Created, External, Journal, create_once};
use crate::util::{excerpt, redact};
use crate::{
    CreateRequest, FieldError, LastUsed, NewVersion, Provider, ProviderError, ProviderState, VersionInfo, VersionStatus,
};
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const KIND: &str = "command";

/// Exit status meaning "this version does not exist".
pub const EXIT_NOT_FOUND: i32 = 3;
/// Exit status meaning "temporary failure, try again" (sysexits EX_TEMPFAIL).
pub const EXIT_TEMPFAIL: i32 = 75;

/// Output beyond this is cut (a runaway command cannot exhaust memory).
const MAX_OUTPUT: u64 = 1 << 20;

fn default_timeout() -> String {
    "60s".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    pub create: Vec<String>,
    pub delete: Vec<String>,
    #[serde(default)]
    pub deactivate: Option<Vec<String>>,
    #[serde(default)]
    pub reactivate: Option<Vec<String>>,
    #[serde(default)]
    pub list: Option<Vec<String>>,
    #[serde(default)]
    pub last_used: Option<Vec<String>>,
    /// Deadline of one run.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Names of rekeyd's environment variables passed to the commands.
    #[serde(default)]
    pub pass_env: Vec<String>,
    /// Extra (non-secret) variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the directory of the config file).
    #[serde(default)]
    pub working_dir: Option<PathBuf>,
    /// The names of the fields `create` prints (optional): known before a
    /// version exists (for dry runs), and checked on every create.
    #[serde(default)]
    pub fields: Option<Vec<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Create,
    Deactivate,
    Reactivate,
    Delete,
    List,
    LastUsed,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Deactivate => "deactivate",
            Op::Reactivate => "reactivate",
            Op::Delete => "delete",
            Op::List => "list",
            Op::LastUsed => "last_used",
        }
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| is_executable(p))
}

impl CommandConfig {
    fn argvs(&self) -> Vec<(Op, &Vec<String>)> {
        let mut v = vec![(Op::Create, &self.create), (Op::Delete, &self.delete)];
        for (op, a) in [
            (Op::Deactivate, &self.deactivate),
            (Op::Reactivate, &self.reactivate),
            (Op::List, &self.list),
            (Op::LastUsed, &self.last_used),
        ] {
            if let Some(a) = a {
                v.push((op, a));
            }
        }
        v
    }

    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        for argv in [Some(&mut self.create), Some(&mut self.delete)]
            .into_iter()
            .chain([self.deactivate.as_mut(), self.reactivate.as_mut(), self.list.as_mut(), self.last_used.as_mut()])
            .flatten()
        {
            // A program given as a relative path is relative to the config file; a bare name is looked up in PATH.
            if let Some(p) = argv.first_mut()
                && p.contains('/')
                && Path::new(p.as_str()).is_relative()
            {
                *p = base.join(p.as_str()).display().to_string();
            }
        }
        match &mut self.working_dir {
            Some(d) => crate::util::resolve(base, d),
            None => self.working_dir = Some(base.to_path_buf()),
        }
    }

    pub fn can_deactivate(&self) -> bool {
        self.deactivate.is_some()
    }

    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        for (op, argv) in self.argvs() {
            let field = op.as_str();
            let Some(program) = argv.first() else {
                return Err((field.into(), "an empty command: give [program, args...]".into()));
            };
            let found =
                if program.contains('/') { is_executable(Path::new(program)) } else { find_in_path(program).is_some() };
            if !found {
                return Err((field.into(), format!("{program} is not an executable file")));
            }
        }
        crate::util::duration("timeout", &self.timeout, Duration::from_secs(1), Duration::from_secs(3600))?;
        for (i, v) in self.pass_env.iter().enumerate() {
            if v.is_empty() || v.contains('=') {
                return Err((format!("pass_env[{i}]"), format!("{v:?} is not an environment variable name")));
            }
            if v.starts_with("REKEYD_") {
                return Err((format!("pass_env[{i}]"), format!("{v} belongs to rekeyd and is never passed on")));
            }
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') {
                return Err((format!("env.{k}"), "not an environment variable name".into()));
            }
        }
        if let Some(d) = &self.working_dir
            && !d.is_dir()
        {
            return Err(("working_dir".into(), format!("{} is not a directory", d.display())));
        }
        if let Some(fields) = &self.fields {
            if fields.is_empty() {
                return Err(("fields".into(), "name at least one field (e.g. [\"value\"]), or leave it out".into()));
            }
            for (i, f) in fields.iter().enumerate() {
                if f.is_empty() || !f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                    return Err((
                        format!("fields[{i}]"),
                        format!("{f:?} is not a field name (letters, digits, _ and -)"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// What one run produced.
struct Run {
    stdout: Vec<u8>,
}

pub struct CommandProvider {
    config: CommandConfig,
    timeout: Duration,
    state: Arc<dyn ProviderState>,
}

impl CommandProvider {
    pub fn new(config: CommandConfig, state: Arc<dyn ProviderState>) -> Result<Self, ProviderError> {
        let timeout = crate::util::duration_or(&config.timeout, Duration::from_secs(60));
        Ok(CommandProvider { config, timeout, state })
    }

    fn argv(&self, op: Op) -> Option<&Vec<String>> {
        match op {
            Op::Create => Some(&self.config.create),
            Op::Delete => Some(&self.config.delete),
            Op::Deactivate => self.config.deactivate.as_ref(),
            Op::Reactivate => self.config.reactivate.as_ref(),
            Op::List => self.config.list.as_ref(),
            Op::LastUsed => self.config.last_used.as_ref(),
        }
    }

    /// The command for `argv`: no shell, a cleared environment (but `PATH`,
    /// `HOME`, `LANG`, `TMPDIR`, `pass_env` and `env`), pipes, its own
    /// process group.
    fn command(&self, argv: &[String]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout kills what it started too.
            .process_group(0)
            .kill_on_drop(true);
        let inherited =
            ["PATH", "HOME", "LANG", "TMPDIR"].into_iter().chain(self.config.pass_env.iter().map(String::as_str));
        for k in inherited {
            if let Some(v) = std::env::var_os(k) {
                cmd.env(k, v);
            }
        }
        cmd.envs(&self.config.env);
        if let Some(d) = &self.config.working_dir {
            cmd.current_dir(d);
        }
        cmd
    }

    /// Runs the command of `op` with `request` on stdin.
    async fn run(&self, op: Op, request: Value, version: Option<&str>) -> Result<Run, ProviderError> {
        let argv = self
            .argv(op)
            .ok_or_else(|| ProviderError::failed(KIND, format!("no {} command is configured", op.as_str())))?;
        let what = format!("{} command {}", op.as_str(), argv[0]);
        let mut child = self
            .command(argv)
            .spawn()
            .map_err(|e| ProviderError::failed(KIND, format!("{what}: cannot start: {e}")))?;
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let input = serde_json::to_vec(&request).expect("json");
        let io = async {
            // A command may exit without reading stdin: that is its business.
            let _ = stdin.write_all(&input).await;
            drop(stdin);
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let (mut so, mut se) = ((&mut stdout).take(MAX_OUTPUT), (&mut stderr).take(MAX_OUTPUT));
            let (a, b) = tokio::join!(so.read_to_end(&mut out), se.read_to_end(&mut err));
            a.and(b).map(|_| (out, err))
        };
        let result = tokio::time::timeout(self.timeout, async {
            let (out, err) = io.await?;
            let status = child.wait().await?;
            Ok::<_, std::io::Error>((status, out, err))
        })
        .await;
        let (status, out, err) = match result {
            Err(_) => {
                // The group we created for it (its id is the child's pid): the child and what it started.
                if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 1) {
                    let _ =
                        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
                let _ = child.kill().await;
                return Err(ProviderError::transient(
                    KIND,
                    format!("{what} did not finish within {} and was killed", self.config.timeout),
                ));
            }
            Ok(Err(e)) => return Err(ProviderError::failed(KIND, format!("{what}: {e}"))),
            Ok(Ok(x)) => x,
        };
        if status.success() {
            return Ok(Run { stdout: out });
        }
        // Redact what the provider knows, and any string the command printed on stdout.
        let mut known = self.journal().known_values();
        if let Ok(v) = serde_json::from_slice::<Value>(&out) {
            collect_strings(&v, &mut known);
        }
        let secrets: Vec<&[u8]> = known.iter().map(|s| s.as_bytes()).collect();
        let stderr = redact(&excerpt(&String::from_utf8_lossy(&err), 500), &secrets);
        let stderr = if stderr.is_empty() { String::new() } else { format!(": {stderr}") };
        match status.code() {
            Some(EXIT_NOT_FOUND) if version.is_some() => {
                Err(ProviderError::NotFound { provider: KIND, version: version.unwrap_or_default().to_string() })
            }
            Some(EXIT_TEMPFAIL) => {
                Err(ProviderError::transient(KIND, format!("{what} failed temporarily (exit {EXIT_TEMPFAIL}){stderr}")))
            }
            Some(c) => Err(ProviderError::failed(KIND, format!("{what} exited with status {c}{stderr}"))),
            None => Err(ProviderError::failed(KIND, format!("{what} was killed by a signal{stderr}"))),
        }
    }

    fn request(&self, op: Op, req: Option<&CreateRequest>, version: Option<&str>, replay: bool) -> Value {
        serde_json::json!({
            "op": op.as_str(),
            "secret": req.map(|r| r.secret.as_str()),
            "rotation_id": req.map(|r| r.rotation_id.as_str()),
            "previous_version": req.and_then(|r| r.previous_version.as_deref()),
            "version": version,
            "replay": replay,
        })
    }

    async fn by_id(&self, op: Op, version: &str) -> Result<(), ProviderError> {
        self.run(op, self.request(op, None, Some(version), false), Some(version)).await.map(|_| ())
    }

    /// Deletes `version` in the revoke order: an active version (as listed,
    /// or by `status` when the caller has it) is deactivated first when a
    /// deactivate command is configured. NotFound when it is gone.
    async fn revoke(&self, version: &str, status: Option<VersionStatus>) -> Result<(), ProviderError> {
        if self.config.deactivate.is_some() {
            let status = match status {
                Some(s) => Some(s),
                // Absent from the list: `delete` decides (exit 3 = gone).
                None => {
                    self.list_versions().await?.and_then(|l| l.into_iter().find(|v| v.id == version)).map(|v| v.status)
                }
            };
            if status == Some(VersionStatus::Active) {
                self.by_id(Op::Deactivate, version).await?;
            }
        }
        self.by_id(Op::Delete, version).await
    }

    async fn list_versions(&self) -> Result<Option<Vec<VersionInfo>>, ProviderError> {
        if self.config.list.is_none() {
            return Ok(None);
        }
        let run = self.run(Op::List, self.request(Op::List, None, None, false), None).await?;
        let what = format!("list command {}", self.config.list.as_ref().expect("configured")[0]);
        let v: Value = serde_json::from_slice(&run.stdout)
            .map_err(|_| ProviderError::failed(KIND, format!("{what} printed something that is not JSON")))?;
        let items = v
            .get("versions")
            .and_then(Value::as_array)
            .ok_or_else(|| ProviderError::failed(KIND, format!("{what} printed JSON without a \"versions\" array")))?;
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let id =
                item.get("id").and_then(Value::as_str).filter(|s| !s.is_empty()).ok_or_else(|| {
                    ProviderError::failed(KIND, format!("{what}: versions[{i}] has no \"id\" string"))
                })?;
            let status = match item.get("status").and_then(Value::as_str) {
                Some("active") | None => VersionStatus::Active,
                Some("inactive") => VersionStatus::Inactive,
                Some(other) => {
                    return Err(ProviderError::failed(
                        KIND,
                        format!("{what}: versions[{i}].status is {other:?}, expected \"active\" or \"inactive\""),
                    ));
                }
            };
            out.push(VersionInfo {
                id: id.to_string(),
                status,
                created_unix: item.get("created_unix").and_then(Value::as_i64),
            });
        }
        Ok(Some(out))
    }
}

/// Reads `last_used`'s answer (see the module docs); the error names the key
/// and what was found.
fn parse_last_used(v: &Value) -> Result<LastUsed, String> {
    use crate::timestamp::{TimeFormat, parse};
    let stamp = match (v.get("last_used_ms"), v.get("last_used")) {
        (Some(ms), _) if !ms.is_null() => {
            parse(ms, TimeFormat::UnixMs).map_err(|e| format!("\"last_used_ms\": {e}"))?
        }
        (_, Some(Value::String(s))) if s == "never" => return Ok(LastUsed::Never),
        (_, Some(Value::Null) | None) => return Ok(LastUsed::Unknown),
        (_, Some(t)) => parse(t, TimeFormat::Auto).map_err(|e| format!("\"last_used\": {e} or \"never\" or null"))?,
    };
    let resolution_ms = match v.get("resolution_ms") {
        None | Some(Value::Null) => stamp.resolution_ms,
        Some(r) => r.as_i64().filter(|r| (1..=86_400_000).contains(r)).ok_or_else(|| {
            format!(
                "\"resolution_ms\": found {}, expected milliseconds from 1 to 86400000",
                crate::timestamp::describe(r)
            )
        })?,
    };
    let source = match v.get("source") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(excerpt(s, 200)),
        Some(other) => {
            return Err(format!("\"source\": found {}, expected a string", crate::timestamp::describe(other)));
        }
    };
    Ok(LastUsed::at(stamp.at_ms, resolution_ms, source))
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| collect_strings(x, out)),
        _ => {}
    }
}

/// Reads `create`'s answer, never quoting it (it holds the secret).
fn parse_created(what: &str, stdout: &[u8]) -> Result<(Created, Vec<String>), ProviderError> {
    let bad = |m: String| ProviderError::failed(KIND, format!("{what}: {m}"));
    let v: Value = serde_json::from_slice(stdout).map_err(|_| bad("printed something that is not JSON".into()))?;
    let id = v
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("no \"id\" string in its output".into()))?;
    let fields = v
        .get("fields")
        .and_then(Value::as_object)
        .filter(|o| !o.is_empty())
        .ok_or_else(|| bad("no \"fields\" object (field name to value) in its output".into()))?;
    let mut pairs = Vec::new();
    for (k, val) in fields {
        let s = val
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad(format!("field {k:?} is not a non-empty string")))?;
        pairs.push((k.clone(), s.to_string()));
    }
    let notes = v
        .get("notes")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default();
    Ok((
        Created { id: id.to_string(), fields: pairs, created_unix: v.get("created_unix").and_then(Value::as_i64) },
        notes,
    ))
}

/// `create` runs with `"replay": true` after an interrupted attempt, so the
/// command can clean up what only it can see (without a `list` command,
/// rekey sees nothing).
#[async_trait]
impl External for CommandProvider {
    const NOUN: &'static str = "version";

    fn journal(&self) -> Journal<'_> {
        Journal { provider: KIND, state: &*self.state }
    }

    async fn versions(&self) -> Result<Option<Vec<VersionInfo>>, ProviderError> {
        self.list_versions().await
    }

    async fn delete_orphan(&self, orphan: &VersionInfo) -> Result<(), ProviderError> {
        match self.revoke(&orphan.id, Some(orphan.status)).await {
            Ok(()) | Err(ProviderError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn create_new(&self, req: &CreateRequest, replay: bool) -> Result<(Created, Vec<String>), ProviderError> {
        let run = self.run(Op::Create, self.request(Op::Create, Some(req), None, replay), None).await?;
        let what = format!("create command {}", self.config.create[0]);
        let (created, notes) = parse_created(&what, &run.stdout)?;
        if let Some(declared) = &self.config.fields {
            let mut printed: Vec<&str> = created.fields.iter().map(|(k, _)| k.as_str()).collect();
            let mut want: Vec<&str> = declared.iter().map(String::as_str).collect();
            printed.sort_unstable();
            want.sort_unstable();
            if printed != want {
                // Its answer is not recorded: a replay (on resume) revokes what it made, if it can list.
                let cleanup = if self.config.list.is_some() {
                    "it is revoked when the rotation resumes"
                } else {
                    "delete it with the provider's own tools (no list command is configured)"
                };
                return Err(ProviderError::failed(
                    KIND,
                    format!(
                        "{what} printed the fields {}, but provider.fields declares {}; version {}: {cleanup}",
                        printed.join(", "),
                        want.join(", "),
                        created.id
                    ),
                ));
            }
        }
        Ok((created, notes))
    }
}

#[async_trait]
impl Provider for CommandProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn current(&self) -> Result<Option<VersionInfo>, ProviderError> {
        let Some(list) = self.list_versions().await? else { return Ok(None) };
        let active: Vec<VersionInfo> = list.into_iter().filter(|v| v.status == VersionStatus::Active).collect();
        Ok(if active.len() == 1 { active.into_iter().next() } else { None })
    }

    async fn create(&self, req: &CreateRequest) -> Result<NewVersion, ProviderError> {
        create_once(self, req).await
    }

    async fn deactivate(&self, version: &str) -> Result<(), ProviderError> {
        if self.config.deactivate.is_none() {
            return Err(ProviderError::failed(
                KIND,
                "no deactivate command is configured; configure provider.deactivate or set revocation.deactivate = false",
            ));
        }
        self.by_id(Op::Deactivate, version).await
    }

    async fn reactivate(&self, version: &str) -> Result<(), ProviderError> {
        self.by_id(Op::Reactivate, version).await
    }

    async fn delete(&self, version: &str) -> Result<(), ProviderError> {
        let result = self.revoke(version, None).await;
        if matches!(result, Ok(()) | Err(ProviderError::NotFound { .. })) {
            self.journal().forget_version(version)?;
        }
        result
    }

    async fn list(&self) -> Result<Vec<VersionInfo>, ProviderError> {
        self.list_versions().await?.ok_or_else(|| ProviderError::failed(KIND, "no list command is configured"))
    }

    fn field_names(&self) -> Vec<String> {
        self.config.fields.clone().unwrap_or_default()
    }

    async fn last_used(&self, version: &str) -> Result<LastUsed, ProviderError> {
        if self.config.last_used.is_none() {
            return Ok(LastUsed::Unknown);
        }
        let run = self.run(Op::LastUsed, self.request(Op::LastUsed, None, Some(version), false), Some(version)).await?;
        let what = format!("last_used command {}", self.config.last_used.as_ref().expect("configured")[0]);
        let v: Value = serde_json::from_slice(&run.stdout)
            .map_err(|_| ProviderError::failed(KIND, format!("{what} printed something that is not JSON")))?;
        parse_last_used(&v).map_err(|m| ProviderError::failed(KIND, format!("{what}: {version}: {m}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Mem;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;

    /// A fake key store in a directory, driven by a shell script (the way an
    /// operator would write one): keys are files `<id>` holding `status value`.
    /// Like real key APIs, it refuses to delete an active key.
    const SCRIPT: &str = r#"#!/bin/sh
set -eu
req=$(cat)
field() { printf '%s' "$req" | sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }
db="$KEYS_DIR"
case "$1" in
create)
  [ -f "$db/fail-create" ] && { echo "upstream said no for token $(cat "$db"/*.key 2>/dev/null | head -c 200)" >&2; exit 1; }
  [ -f "$db/tempfail" ] && { echo "busy" >&2; exit 75; }
  [ -f "$db/hang" ] && sleep 30
  n=$(ls "$db" | grep -c '\.key$' || true); id="k$((n+1))-$(field rotation_id)"
  val="sv_$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
  echo "active $val" > "$db/$id.key"
  [ -f "$db/garbage" ] && { echo "not json $val"; exit 0; }
  printf '{"id":"%s","fields":{"value":"%s"},"notes":["replay=%s"]}\n' "$id" "$val" "$(printf '%s' "$req" | sed -n 's/.*"replay":\([a-z]*\).*/\1/p')"
  ;;
deactivate|reactivate|delete)
  v=$(field version); f="$db/$v.key"
  [ -f "$f" ] || { echo "no such key $v" >&2; exit 3; }
  val=$(cut -d' ' -f2 "$f")
  case "$1" in
    deactivate) echo "inactive $val" > "$f";;
    reactivate) echo "active $val" > "$f";;
    delete) case "$(cut -d' ' -f1 "$f")" in active) echo "key $v is active; deactivate first" >&2; exit 1;; esac; rm "$f";;
  esac
  ;;
list)
  printf '{"versions":['; sep=""
  for f in "$db"/*.key; do [ -e "$f" ] || continue; id=$(basename "$f" .key); st=$(cut -d' ' -f1 "$f"); printf '%s{"id":"%s","status":"%s"}' "$sep" "$id" "$st"; sep=","; done
  printf ']}\n'
  ;;
esac
"#;

    fn setup() -> (tempfile::TempDir, CommandConfig) {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("keys.sh");
        std::fs::write(&script, SCRIPT).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(dir.path().join("db")).unwrap();
        let s = script.display().to_string();
        let argv = |op: &str| vec![s.clone(), op.to_string()];
        let mut config = CommandConfig {
            create: argv("create"),
            delete: argv("delete"),
            deactivate: Some(argv("deactivate")),
            reactivate: Some(argv("reactivate")),
            list: Some(argv("list")),
            last_used: None,
            timeout: "2s".into(),
            pass_env: vec![],
            env: [("KEYS_DIR".to_string(), dir.path().join("db").display().to_string())].into(),
            working_dir: None,
            fields: None,
        };
        config.resolve_paths(dir.path());
        config.validate().unwrap();
        (dir, config)
    }

    fn req(rot: &str) -> CreateRequest {
        CreateRequest { secret: "saas".into(), rotation_id: rot.into(), previous_version: None }
    }

    #[tokio::test]
    async fn the_lifecycle_runs_through_the_contract() {
        let (_dir, config) = setup();
        let p = CommandProvider::new(config, Arc::new(Mem::default())).unwrap();
        let a = p.create(&req("rot-1")).await.unwrap();
        assert!(a.id.starts_with("k1-rot-1"), "{}", a.id);
        assert!(std::str::from_utf8(a.fields["value"].expose()).unwrap().starts_with("sv_"));
        assert_eq!(a.notes, vec!["replay=false"]);
        let again = p.create(&req("rot-1")).await.unwrap();
        assert_eq!((again.id.clone(), again.fields["value"].clone()), (a.id.clone(), a.fields["value"].clone()));
        assert_eq!(p.current().await.unwrap().unwrap().id, a.id);
        p.deactivate(&a.id).await.unwrap();
        assert_eq!(p.list().await.unwrap()[0].status, VersionStatus::Inactive);
        p.reactivate(&a.id).await.unwrap();
        p.delete(&a.id).await.unwrap();
        // Gone (exit 3, or absent from the list): every operation says so.
        assert!(matches!(p.delete(&a.id).await, Err(ProviderError::NotFound { .. })));
        assert!(matches!(p.deactivate(&a.id).await, Err(ProviderError::NotFound { .. })));
        assert!(matches!(p.reactivate(&a.id).await, Err(ProviderError::NotFound { .. })));
        assert!(p.list().await.unwrap().is_empty());
        assert_eq!(p.last_used(&a.id).await.unwrap(), LastUsed::Unknown);
    }

    #[tokio::test]
    async fn a_lost_answer_is_replayed_without_leaving_two_versions() {
        let (dir, config) = setup();
        let state = Arc::new(Mem::default());
        let p = CommandProvider::new(config, state.clone()).unwrap();
        // The command creates a key but its answer is unusable (as if rekeyd died before recording it).
        std::fs::write(dir.path().join("db/garbage"), "").unwrap();
        let e = p.create(&req("rot-7")).await.unwrap_err().to_string();
        assert!(e.contains("not JSON") && !e.contains("sv_"), "{e}");
        assert_eq!(p.list().await.unwrap().len(), 1);
        std::fs::remove_file(dir.path().join("db/garbage")).unwrap();
        let v = p.create(&req("rot-7")).await.unwrap();
        let list = p.list().await.unwrap();
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(list[0].id, v.id);
        assert!(v.notes.iter().any(|n| n.starts_with("deleted version k1-rot-7")), "{:?}", v.notes);
        assert!(v.notes.contains(&"replay=true".to_string()), "{:?}", v.notes);
    }

    #[tokio::test]
    async fn declared_fields_are_known_before_a_create_and_checked_after() {
        let (_dir, mut config) = setup();
        assert!(CommandProvider::new(config.clone(), Arc::new(Mem::default())).unwrap().field_names().is_empty());
        config.fields = Some(vec!["value".into()]);
        config.validate().unwrap();
        let p = CommandProvider::new(config.clone(), Arc::new(Mem::default())).unwrap();
        assert_eq!(p.field_names(), ["value"]);
        p.create(&req("rot-1")).await.unwrap();
        config.fields = Some(vec!["token".into()]);
        let state = Arc::new(Mem::default());
        let p = CommandProvider::new(config.clone(), state.clone()).unwrap();
        let e = p.create(&req("rot-2")).await.unwrap_err().to_string();
        assert!(e.contains("printed the fields value, but provider.fields declares token"), "{e}");
        assert!(e.contains("revoked when the rotation resumes") && !e.contains("sv_"), "{e}");
        // Fixed and resumed: the refused version is revoked, one version made.
        config.fields = Some(vec!["value".into()]);
        let p = CommandProvider::new(config.clone(), state).unwrap();
        let v = p.create(&req("rot-2")).await.unwrap();
        let ids: Vec<String> = p.list().await.unwrap().into_iter().map(|v| v.id).collect();
        assert_eq!(ids.iter().filter(|i| i.contains("rot-2")).collect::<Vec<_>>(), [&v.id]);
        config.fields = Some(vec!["a b".into()]);
        assert_eq!(config.validate().unwrap_err().0, "fields[0]");
    }

    #[tokio::test]
    async fn failures_are_precise_and_redacted() {
        let (dir, config) = setup();
        let p = CommandProvider::new(config, Arc::new(Mem::default())).unwrap();
        let v = p.create(&req("rot-1")).await.unwrap();
        let value = String::from_utf8(v.fields["value"].expose().to_vec()).unwrap();
        std::fs::write(dir.path().join("db/fail-create"), "").unwrap();
        let e = p.create(&req("rot-2")).await.unwrap_err();
        let msg = e.to_string();
        assert!(!e.retryable());
        assert!(msg.contains("create command") && msg.contains("exited with status 1"), "{msg}");
        assert!(msg.contains("upstream said no for token") && msg.contains("<redacted>"), "{msg}");
        assert!(!msg.contains(&value), "the secret leaked: {msg}");
        std::fs::remove_file(dir.path().join("db/fail-create")).unwrap();
        std::fs::write(dir.path().join("db/tempfail"), "").unwrap();
        let e = p.create(&req("rot-2")).await.unwrap_err();
        assert!(e.retryable() && e.to_string().contains("failed temporarily"), "{e}");
        std::fs::remove_file(dir.path().join("db/tempfail")).unwrap();
        std::fs::write(dir.path().join("db/hang"), "").unwrap();
        let started = std::time::Instant::now();
        let e = p.create(&req("rot-2")).await.unwrap_err();
        assert!(e.to_string().contains("did not finish within 2s"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn last_used_answers_are_read_with_resolution_and_source_or_refused() {
        let lu = |v: Value| parse_last_used(&v);
        assert_eq!(lu(json!({"last_used": 1714564800})).unwrap(), LastUsed::at(1_714_564_800_000, 1000, None));
        assert_eq!(
            lu(json!({"last_used": 1714564800.125, "source": "10.1.2.3 (host-7)"})).unwrap(),
            LastUsed::at(1_714_564_800_125, 1, Some("10.1.2.3 (host-7)".into()))
        );
        assert_eq!(
            lu(json!({"last_used": "2024-05-01T12:00:00Z", "resolution_ms": 60000})).unwrap(),
            LastUsed::at(1_714_564_800_000, 60_000, None)
        );
        assert_eq!(lu(json!({"last_used_ms": 1714564800250i64})).unwrap(), LastUsed::at(1_714_564_800_250, 1, None));
        assert_eq!(lu(json!({"last_used": "never"})).unwrap(), LastUsed::Never);
        assert_eq!(lu(json!({"last_used": null})).unwrap(), LastUsed::Unknown);
        let e = lu(json!({"last_used": true})).unwrap_err();
        assert!(e.contains("\"last_used\": found the boolean true, expected"), "{e}");
        assert!(lu(json!({"last_used": "soon"})).unwrap_err().contains("the string \"soon\""));
        assert!(lu(json!({"last_used": 1, "resolution_ms": 0})).unwrap_err().contains("resolution_ms"));
        assert!(lu(json!({"last_used": 1, "source": 7})).unwrap_err().contains("\"source\": found the number 7"));
    }

    #[test]
    fn config_errors_name_the_field() {
        let (dir, mut c) = setup();
        c.deactivate = Some(vec!["/nonexistent/x".into()]);
        assert_eq!(c.validate().unwrap_err().0, "deactivate");
        c.deactivate = None;
        c.pass_env = vec!["REKEYD_MASTER_KEY".into()];
        assert_eq!(c.validate().unwrap_err().0, "pass_env[0]");
        c.pass_env = vec![];
        c.create = vec![];
        assert_eq!(c.validate().unwrap_err().0, "create");
        drop(dir);
    }
}
