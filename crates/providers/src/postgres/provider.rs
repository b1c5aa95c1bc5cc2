//! The [`Provider`] operations of `postgres` (see the module docs).

use super::sql::{self, Marker, ident, literal, role_of};
use super::{KIND, PostgresConfig, Strategy, scram};
use crate::journal::{Attempt, Created, Journal, to_fields};
use crate::{CreateRequest, LastUsed, NewVersion, Provider, ProviderError, ProviderState, VersionInfo, VersionStatus};
use async_trait::async_trait;
use rekey_common::time::{format_unix_ms, now_unix, now_unix_ms};
use ring::rand::{SecureRandom, SystemRandom};
use std::sync::Arc;
use tokio_postgres::Client;

use super::conn::{Target, pg_error};

/// Sessions named in a use's source; more are counted.
const NAMED_SESSIONS: usize = 5;

pub struct PostgresProvider {
    config: PostgresConfig,
    target: Target,
    state: Arc<dyn ProviderState>,
}

/// One managed role as the catalog shows it.
#[derive(Debug, Clone)]
struct Role {
    name: String,
    login: bool,
    marker: Option<Marker>,
}

impl Role {
    /// Whether `version` is the one this role holds now.
    fn holds(&self, version: &str) -> bool {
        match &self.marker {
            Some(m) => m.version == version && !m.deleted,
            // Before rekey marked it, a login role's own password is its bare name.
            None => version == self.name && self.login,
        }
    }

    /// The version this role holds, if any.
    fn version(&self) -> Option<VersionInfo> {
        let status = if self.login { VersionStatus::Active } else { VersionStatus::Inactive };
        match &self.marker {
            Some(m) if !m.deleted => Some(VersionInfo { id: m.version.clone(), status, created_unix: m.created_unix }),
            Some(_) => None,
            None if self.login => Some(VersionInfo { id: self.name.clone(), status, created_unix: None }),
            None => None,
        }
    }
}

fn not_found(version: &str) -> ProviderError {
    ProviderError::NotFound { provider: KIND, version: version.to_string() }
}

fn generate(len: usize) -> Result<String, ProviderError> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let rng = SystemRandom::new();
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        rng.fill(&mut buf).map_err(|_| ProviderError::failed(KIND, "the system random generator failed"))?;
        // Rejection sampling: 248 = 4 × 62, so every letter is equally likely.
        out.extend(
            buf.iter().filter(|b| **b < 248).map(|b| ALPHABET[(*b % 62) as usize] as char).take(len - out.len()),
        );
    }
    Ok(out)
}

/// The last sessions rekey saw of a version's role (kept after they close).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Seen {
    at_ms: i64,
    source: String,
}

impl PostgresProvider {
    pub fn new(config: PostgresConfig, state: Arc<dyn ProviderState>) -> Result<Self, ProviderError> {
        let target = config.target().map_err(|(f, m)| ProviderError::failed(KIND, format!("{f}: {m}")))?;
        Ok(PostgresProvider { config, target, state })
    }

    fn journal(&self) -> Journal<'_> {
        Journal { provider: KIND, state: &*self.state }
    }

    /// The roles versions may live on: the pair (and the base role, whose
    /// own password is the version before the first rotation), or the one role.
    fn managed(&self) -> Vec<String> {
        match self.config.strategy {
            Strategy::Single => vec![self.config.role.clone()],
            Strategy::Alternating => {
                let [b, g] = self.config.pair();
                vec![self.config.role.clone(), b, g]
            }
        }
    }

    async fn roles(&self, client: &Client) -> Result<Vec<Role>, ProviderError> {
        let rows = client
            .query(
                "SELECT rolname::text, rolcanlogin, pg_catalog.shobj_description(oid, 'pg_authid') \
                 FROM pg_catalog.pg_roles WHERE rolname = ANY($1)",
                &[&self.managed()],
            )
            .await
            .map_err(|e| pg_error("read roles", &e))?;
        Ok(rows
            .iter()
            .map(|r| Role { name: r.get(0), login: r.get(1), marker: Marker::parse(r.get::<_, Option<&str>>(2)) })
            .collect())
    }

    /// The role holding `version`; NotFound when no managed role holds it.
    async fn holder(&self, client: &Client, version: &str) -> Result<Role, ProviderError> {
        let role = role_of(version);
        if !self.managed().iter().any(|m| m == role) {
            return Err(not_found(version));
        }
        self.roles(client)
            .await?
            .into_iter()
            .find(|r| r.name == role && r.holds(version))
            .ok_or_else(|| not_found(version))
    }

    async fn exec(&self, client: &mut Client, op: &str, statements: &[String]) -> Result<(), ProviderError> {
        let tx = client.transaction().await.map_err(|e| pg_error(op, &e))?;
        for s in statements {
            tx.batch_execute(s).await.map_err(|e| pg_error(op, &e))?;
        }
        tx.commit().await.map_err(|e| pg_error(op, &e))
    }

    async fn bootstrap(&self, client: &mut Client) -> Result<(), ProviderError> {
        let [b, g] = self.config.pair();
        self.exec(client, "bootstrap", &sql::bootstrap(&self.config.role, [&b, &g])).await
    }

    /// The role a new version goes to, and notes on what it held before.
    async fn choose(&self, client: &Client, previous: Option<&str>) -> Result<(String, Vec<String>), ProviderError> {
        if self.config.strategy == Strategy::Single {
            return Ok((self.config.role.clone(), vec![]));
        }
        let roles = self.roles(client).await?;
        let [blue, green] = self.config.pair();
        let find = |n: &str| roles.iter().find(|r| r.name == n);
        let target = match previous.map(role_of) {
            Some(p) if p == blue => green.clone(),
            Some(p) if p == green => blue.clone(),
            // From the base role or nothing: the one not logging in, else the older.
            _ => {
                let age = |n: &str| find(n).map(|r| (r.login, r.marker.as_ref().and_then(|m| m.created_unix)));
                if age(&green) < age(&blue) { green.clone() } else { blue.clone() }
            }
        };
        let Some(role) = find(&target) else {
            return Err(ProviderError::failed(
                KIND,
                format!(
                    "role {target} does not exist: run the bootstrap SQL for role {} (docs/providers.md) or set bootstrap = true",
                    self.config.role
                ),
            ));
        };
        let member = client
            .query_one("SELECT pg_catalog.pg_has_role($1, $2, 'USAGE')", &[&target, &self.config.role])
            .await
            .map_err(|e| pg_error("check membership", &e))?;
        if !member.get::<_, bool>(0) {
            return Err(ProviderError::failed(
                KIND,
                format!(
                    "role {target} does not inherit the privileges of {}: run the bootstrap SQL (docs/providers.md) or set bootstrap = true",
                    self.config.role
                ),
            ));
        }
        let sessions = self.sessions(client, &target).await?;
        if !sessions.is_empty() {
            return Err(ProviderError::failed(
                KIND,
                format!(
                    "role {target}, the one not in use, has {}: something still logs in with it; end those sessions (or set terminate_old_sessions = true for the next rotations) and start again",
                    describe(&target, &sessions)
                ),
            ));
        }
        let mut notes = vec![];
        if let Some(v) = role.version() {
            notes.push(format!(
                "role {target} held version {v} (not the one being replaced); its password is replaced",
                v = v.id
            ));
        }
        Ok((target, notes))
    }

    /// `ALTER ROLE … LOGIN PASSWORD '<verifier>'` and the marker, in one transaction.
    async fn set_password(
        &self,
        client: &mut Client,
        role: &str,
        version: &str,
        password: &str,
    ) -> Result<(), ProviderError> {
        let verifier = scram::verifier(password.as_bytes()).map_err(|m| ProviderError::failed(KIND, m))?;
        assert!(scram::is_verifier(&verifier), "a verifier is literal-safe");
        let marker = Marker { version: version.to_string(), created_unix: Some(now_unix()), deleted: false };
        let statements =
            [format!("ALTER ROLE {} WITH LOGIN PASSWORD {}", ident(role), literal(&verifier)), marker.comment_on(role)];
        self.exec(client, &format!("set the password of role {role}"), &statements).await
    }

    /// The sessions logged in as `role`: (address, application, start ms).
    async fn sessions(&self, client: &Client, role: &str) -> Result<Vec<(String, String, i64)>, ProviderError> {
        let rows = client
            .query(
                "SELECT host(client_addr), client_port, coalesce(application_name, ''), \
                 (extract(epoch FROM backend_start) * 1000)::int8 \
                 FROM pg_catalog.pg_stat_activity WHERE usename = $1 AND pid <> pg_catalog.pg_backend_pid() \
                 ORDER BY backend_start",
                &[&role],
            )
            .await
            .map_err(|e| pg_error("read pg_stat_activity", &e))?;
        Ok(rows
            .iter()
            .map(|r| {
                let addr = match (r.get::<_, Option<String>>(0), r.get::<_, Option<i32>>(1)) {
                    (Some(a), Some(p)) => format!("{a}:{p}"),
                    (None, Some(_)) => "local socket".to_string(),
                    _ => "address hidden (grant pg_read_all_stats to rekey's admin role)".to_string(),
                };
                (addr, r.get(2), r.get::<_, Option<i64>>(3).unwrap_or_default())
            })
            .collect())
    }

    async fn terminate(&self, client: &Client, role: &str) -> Result<(), ProviderError> {
        let n = client
            .execute(
                "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity \
                 WHERE usename = $1 AND pid <> pg_catalog.pg_backend_pid()",
                &[&role],
            )
            .await
            .map_err(|e| pg_error(&format!("terminate the sessions of {role}"), &e))?;
        if n > 0 {
            tracing::warn!(role, sessions = n, "terminated the remaining sessions of a deactivated role");
        }
        Ok(())
    }

    fn seen_key(version: &str) -> String {
        format!("seen/{version}")
    }

    fn state_err(message: String) -> ProviderError {
        ProviderError::State { provider: KIND, message }
    }
}

/// `2 sessions of app_blue: 127.0.0.1:50432 (host-4) since …, …`.
fn describe(role: &str, sessions: &[(String, String, i64)]) -> String {
    let n = sessions.len();
    let mut named: Vec<String> = sessions
        .iter()
        .take(NAMED_SESSIONS)
        .map(|(addr, app, start)| {
            let app = if app.is_empty() { String::new() } else { format!(" ({app})") };
            format!("{addr}{app} since {}", format_unix_ms(*start))
        })
        .collect();
    if n > NAMED_SESSIONS {
        named.push(format!("and {} more", n - NAMED_SESSIONS));
    }
    let s = if n == 1 { "session" } else { "sessions" };
    format!("{n} {s} of role {role}: {}", named.join(", "))
}

#[async_trait]
impl Provider for PostgresProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn field_names(&self) -> Vec<String> {
        vec!["password".into(), "username".into()]
    }

    async fn current(&self) -> Result<Option<VersionInfo>, ProviderError> {
        let mut active: Vec<VersionInfo> =
            self.list().await?.into_iter().filter(|v| v.status == VersionStatus::Active).collect();
        active.sort_by_key(|v| v.created_unix.unwrap_or(0));
        Ok(active.pop())
    }

    async fn create(&self, req: &CreateRequest) -> Result<NewVersion, ProviderError> {
        let journal = self.journal();
        let attempt = journal.load(&req.rotation_id)?;
        if let Some(Attempt { created: Some(c), notes, .. }) = &attempt {
            return Ok(NewVersion { id: c.id.clone(), fields: c.fields(), notes: notes.clone() });
        }
        journal.forget_others(&req.rotation_id)?;
        let mut client = self.target.connect().await?;
        if self.config.bootstrap {
            self.bootstrap(&mut client).await?;
        }
        let planned = attempt.and_then(|a| a.planned.map(|p| (p, a.notes)));
        let (planned, notes) = match planned {
            // A replay: the same role and password as the interrupted attempt.
            Some(p) => p,
            None => {
                let (role, notes) = self.choose(&client, req.previous_version.as_deref()).await?;
                let planned = vec![
                    ("password".to_string(), generate(self.config.password_length)?),
                    ("username".to_string(), role.clone()),
                    ("version".to_string(), format!("{role}@{}", req.rotation_id)),
                ];
                let intent = Attempt {
                    rotation_id: req.rotation_id.clone(),
                    existing: vec![],
                    planned: Some(planned.clone()),
                    notes: notes.clone(),
                    created: None,
                };
                journal.save(&intent)?;
                (planned, notes)
            }
        };
        let get = |k: &str| planned.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
        let (role, version, password) = (get("username"), get("version"), get("password"));
        if role.is_empty() || version.is_empty() || password.is_empty() {
            return Err(Self::state_err(format!("the create record of {} is incomplete", req.rotation_id)));
        }
        self.set_password(&mut client, &role, &version, &password).await?;
        if self.config.strategy == Strategy::Single
            && let Some(previous) = &req.previous_version
        {
            // In place, the previous password stopped working just now: no copy of it is kept.
            journal.forget_version(previous)?;
        }
        let fields = vec![("password".to_string(), password), ("username".to_string(), role)];
        let created = Created { id: version.clone(), fields: fields.clone(), created_unix: Some(now_unix()) };
        journal.save(&Attempt {
            rotation_id: req.rotation_id.clone(),
            existing: vec![],
            planned: None,
            notes: notes.clone(),
            created: Some(created),
        })?;
        Ok(NewVersion { id: version, fields: to_fields(&fields), notes })
    }

    async fn deactivate(&self, version: &str) -> Result<(), ProviderError> {
        let mut client = self.target.connect().await?;
        let role = self.holder(&client, version).await?;
        let mut statements = vec![format!("ALTER ROLE {} NOLOGIN", ident(&role.name))];
        if role.marker.is_none() {
            // The bare version stays listed (inactive) once it cannot log in.
            statements.push(
                Marker { version: version.to_string(), created_unix: None, deleted: false }.comment_on(&role.name),
            );
        }
        self.exec(&mut client, &format!("deactivate role {}", role.name), &statements).await?;
        if self.config.terminate_old_sessions {
            self.terminate(&client, &role.name).await?;
        }
        Ok(())
    }

    async fn reactivate(&self, version: &str) -> Result<(), ProviderError> {
        let mut client = self.target.connect().await?;
        let role = self.holder(&client, version).await?;
        let statements = [format!("ALTER ROLE {} LOGIN", ident(&role.name))];
        self.exec(&mut client, &format!("reactivate role {}", role.name), &statements).await
    }

    async fn delete(&self, version: &str) -> Result<(), ProviderError> {
        let mut client = self.target.connect().await?;
        let role = self.holder(&client, version).await?;
        // An unusable password: random, never delivered, never stored.
        let unusable = generate(64)?;
        let verifier = scram::verifier(unusable.as_bytes()).map_err(|m| ProviderError::failed(KIND, m))?;
        let created = role.marker.as_ref().and_then(|m| m.created_unix);
        let statements = [
            format!("ALTER ROLE {} WITH NOLOGIN PASSWORD {}", ident(&role.name), literal(&verifier)),
            Marker { version: version.to_string(), created_unix: created, deleted: true }.comment_on(&role.name),
        ];
        self.exec(&mut client, &format!("delete version {version} of role {}", role.name), &statements).await?;
        if self.config.terminate_old_sessions {
            self.terminate(&client, &role.name).await?;
        }
        self.journal().forget_version(version)?;
        self.state.remove(&Self::seen_key(version)).map_err(Self::state_err)
    }

    async fn list(&self) -> Result<Vec<VersionInfo>, ProviderError> {
        let client = self.target.connect().await?;
        Ok(self.roles(&client).await?.iter().filter_map(Role::version).collect())
    }

    /// Sessions of the version's role now (the use is now), else the last
    /// sessions rekey saw, else never (PostgreSQL keeps no login history).
    async fn last_used(&self, version: &str) -> Result<LastUsed, ProviderError> {
        let client = self.target.connect().await?;
        let role = self.holder(&client, version).await?;
        let sessions = self.sessions(&client, &role.name).await?;
        let key = Self::seen_key(version);
        if !sessions.is_empty() {
            let seen = Seen { at_ms: now_unix_ms(), source: describe(&role.name, &sessions) };
            let json = serde_json::to_vec(&seen).expect("serializable");
            self.state.put(&key, &json).map_err(Self::state_err)?;
            return Ok(LastUsed::at(seen.at_ms, 1, Some(seen.source)));
        }
        match self.state.get(&key).map_err(Self::state_err)? {
            Some(raw) => {
                let seen: Seen = serde_json::from_slice(raw.expose())
                    .map_err(|e| Self::state_err(format!("corrupt record of sessions seen for {version}: {e}")))?;
                Ok(LastUsed::at(seen.at_ms, 1, Some(format!("{} (disconnected since)", seen.source))))
            }
            None => Ok(LastUsed::Never),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_passwords_are_long_alphanumeric_and_distinct() {
        let (a, b) = (generate(32).unwrap(), generate(32).unwrap());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn a_role_holds_its_marked_version_or_its_own_bare_login() {
        let bare = Role { name: "app".into(), login: true, marker: None };
        assert!(bare.holds("app") && !bare.holds("app@rot-1"));
        assert_eq!(bare.version().unwrap().status, VersionStatus::Active);
        let group = Role { login: false, ..bare.clone() };
        assert!(!group.holds("app") && group.version().is_none(), "a group role is no version");
        let m = |deleted| Some(Marker { version: "app_blue@rot-1".into(), created_unix: Some(5), deleted });
        let blue = Role { name: "app_blue".into(), login: false, marker: m(false) };
        assert!(blue.holds("app_blue@rot-1") && !blue.holds("app_blue@rot-0") && !blue.holds("app_blue"));
        assert_eq!(blue.version().unwrap().status, VersionStatus::Inactive);
        let gone = Role { marker: m(true), ..blue };
        assert!(!gone.holds("app_blue@rot-1") && gone.version().is_none());
    }

    #[test]
    fn sessions_are_described_by_address_and_application_and_bounded() {
        let s: Vec<_> = (0..7).map(|i| (format!("10.0.0.{i}:5000"), "svc".to_string(), 0)).collect();
        let d = describe("app_blue", &s);
        assert!(d.starts_with("7 sessions of role app_blue: 10.0.0.0:5000 (svc) since "), "{d}");
        assert!(d.ends_with("and 2 more") && !d.contains("10.0.0.6"), "{d}");
    }
}
