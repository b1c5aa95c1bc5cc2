//! `postgres`: PostgreSQL login passwords. A version is a role and the
//! rotation that set its password (`app_green@rot-…`); its fields are
//! `username` and `password`.
//!
//! Strategies:
//! - `alternating` (default, zero downtime): two login roles `<role>_blue`
//!   and `<role>_green`, members of `<role>` (which holds the grants). A
//!   rotation sets a new password on the role not in use and gives it LOGIN;
//!   "deactivate" is `NOLOGIN`, "reactivate" is `LOGIN`, "delete" sets an
//!   unusable random password (a role is never dropped: it may own objects).
//! - `single`: `ALTER ROLE <role> PASSWORD` in place. Not zero downtime:
//!   from the create on, hosts not yet switched cannot open new connections
//!   (the plan says so). The old version is gone the moment the new one is
//!   set, so it is reported `NotFound` (already revoked) afterwards.
//!
//! Which version a role holds is in the role's comment ([`sql::Marker`]):
//! the database itself is the record, so every operation is idempotent and
//! an operation on a version whose role has moved on is `NotFound` — it can
//! never touch the role a newer version lives on.
//!
//! Passwords reach the server only as SCRAM-SHA-256 verifiers computed here
//! ([`scram`]). Usage evidence: the sessions of the version's role in
//! `pg_stat_activity` (client address, port, application name, start),
//! observed at each check and remembered in the provider state.
//!
//! Owns: short-lived admin connections ([`conn`]), the create journal in its
//! provider state (the password chosen before the `ALTER ROLE`, so a replay
//! sets the same one), the `seen/<version>` records of observed sessions.

pub mod conn;
mod provider;
pub mod scram;
pub mod sql;

use crate::FieldError;
use crate::credential::Source;
use conn::Target;
pub use provider::PostgresProvider;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const KIND: &str = "postgres";

/// Longest base role name: PostgreSQL's 63 bytes less `_green`.
const MAX_ROLE: usize = 57;

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    #[default]
    Alternating,
    Single,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// rekey's admin connection, without a password:
    /// `postgres://rekey_admin@db:5432/app?sslmode=verify-full`.
    pub url: String,
    /// The admin password, alone in a file (mode 0600), or an environment variable.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// alternating: the role holding the grants (logins `<role>_blue`,
    /// `<role>_green`); single: the login role itself.
    pub role: String,
    #[serde(default)]
    pub strategy: Strategy,
    /// alternating: run the bootstrap statements before each create.
    #[serde(default)]
    pub bootstrap: bool,
    /// After deactivating a version, end its role's remaining sessions.
    #[serde(default)]
    pub terminate_old_sessions: bool,
    /// PEM roots to verify the server's certificate (default: the system's).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Length of generated passwords (letters and digits).
    #[serde(default = "default_length")]
    pub password_length: usize,
    /// Deadline of one connection or statement.
    #[serde(default = "default_timeout")]
    pub timeout: String,
}

fn default_length() -> usize {
    32
}

fn default_timeout() -> String {
    "30s".into()
}

impl PostgresConfig {
    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        crate::util::resolve_opt(base, &mut self.password_file);
        crate::util::resolve_opt(base, &mut self.ca_file);
    }

    fn password_source(&self) -> Result<Option<Source>, FieldError> {
        Source::pick("password", &self.password_file, &self.password_env, false)
    }

    fn target(&self) -> Result<Target, FieldError> {
        let timeout =
            crate::util::duration("timeout", &self.timeout, Duration::from_secs(1), Duration::from_secs(600))?;
        Target::parse(&self.url, self.ca_file.as_deref(), self.password_source()?, timeout)
    }

    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        if !sql::valid_role(&self.role, MAX_ROLE) {
            return Err((
                "role".into(),
                format!(
                    "{:?} is not a role name rekey accepts: lowercase letters, digits and _, at most {MAX_ROLE} bytes",
                    self.role
                ),
            ));
        }
        if !(16..=128).contains(&self.password_length) {
            return Err(("password_length".into(), "must be between 16 and 128".into()));
        }
        if self.strategy == Strategy::Single && self.bootstrap {
            return Err(("bootstrap".into(), "only the alternating strategy has a bootstrap (a pair of roles)".into()));
        }
        let target = self.target()?;
        if target.user() == self.role || self.pair().iter().any(|r| r == target.user()) {
            return Err((
                "url".into(),
                "connects as the role being rotated: rekey needs an admin role of its own".into(),
            ));
        }
        if let Some(src) = self.password_source()? {
            src.check("password")?;
        }
        if let Some(ca) = &self.ca_file {
            std::fs::metadata(ca).map_err(|e| ("ca_file".to_string(), format!("cannot read {}: {e}", ca.display())))?;
        }
        Ok(())
    }

    fn pair(&self) -> [String; 2] {
        [format!("{}_blue", self.role), format!("{}_green", self.role)]
    }

    /// What a plan should tell before a rotation (not a problem).
    pub fn plan_warnings(&self) -> Vec<String> {
        match self.strategy {
            Strategy::Single => vec![format!(
                "postgres strategy \"single\" is not zero-downtime: the password of role {} changes in place when the \
                 rotation creates the new version, so hosts not yet switched cannot open new connections until they \
                 are (existing sessions stay up), and a host that fails and rolls back returns to a password that no longer \
                 works; use strategy \"alternating\" for zero downtime",
                self.role
            )],
            Strategy::Alternating => vec![],
        }
    }

    /// The bootstrap SQL of the alternating strategy (empty for single).
    pub fn bootstrap_sql(&self) -> String {
        match self.strategy {
            Strategy::Single => String::new(),
            Strategy::Alternating => {
                let [b, g] = self.pair();
                sql::bootstrap_script(&self.role, [&b, &g])
            }
        }
    }
}
