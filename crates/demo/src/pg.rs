//! The demo service's PostgreSQL session: one login with the credential from
//! its env-file, kept open (so `pg_stat_activity` shows the service), and a
//! query per health check.

use crate::credentials::parse_env_value;
use rekey_common::secret::SecretBytes;
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_postgres::{Client, Config, NoTls};

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("the credentials file has no {0}")]
    Missing(&'static str),
    #[error("{0} is not UTF-8 text")]
    NotText(&'static str),
    #[error("--postgres {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("login as {user} refused: {source}")]
    Login { user: String, source: tokio_postgres::Error },
    #[error("no answer from postgres within {0:?}")]
    Timeout(Duration),
    #[error("query failed: {0}")]
    Query(tokio_postgres::Error),
}

const DEADLINE: Duration = Duration::from_secs(5);

pub struct Session {
    config: Config,
    user: String,
    client: Mutex<Option<Client>>,
}

fn text(v: SecretBytes, name: &'static str) -> Result<String, PgError> {
    String::from_utf8(v.expose().to_vec()).map_err(|_| PgError::NotText(name))
}

impl Session {
    /// Logs in to `url` with `PGUSER`/`PGPASSWORD` from `credentials` (an env-file's bytes).
    pub async fn open(url: &str, credentials: &[u8], app_name: &str) -> Result<Session, PgError> {
        let user = text(parse_env_value(credentials, "PGUSER").ok_or(PgError::Missing("PGUSER"))?, "PGUSER")?;
        let password = parse_env_value(credentials, "PGPASSWORD").ok_or(PgError::Missing("PGPASSWORD"))?;
        let mut config =
            Config::from_str(url).map_err(|e| PgError::Url { url: url.to_string(), message: e.to_string() })?;
        if config.get_password().is_some() {
            return Err(PgError::Url { url: url.to_string(), message: "must not hold a password".into() });
        }
        config.user(&user).password(password.expose()).application_name(app_name).connect_timeout(DEADLINE);
        let s = Session { config, user, client: Mutex::new(None) };
        s.connect().await.map(|c| *s.client.try_lock().expect("not shared yet") = Some(c))?;
        Ok(s)
    }

    async fn connect(&self) -> Result<Client, PgError> {
        let (client, conn) = tokio::time::timeout(DEADLINE, self.config.connect(NoTls))
            .await
            .map_err(|_| PgError::Timeout(DEADLINE))?
            .map_err(|source| PgError::Login { user: self.user.clone(), source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!(error = %e, "postgres session ended");
            }
        });
        Ok(client)
    }

    /// Runs a query on the session (logging in again if it was closed);
    /// answers the role it is logged in as.
    pub async fn check(&self) -> Result<String, PgError> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            *slot = Some(self.connect().await?);
        }
        let client = slot.as_ref().expect("connected");
        let row = tokio::time::timeout(DEADLINE, client.query_one("SELECT session_user::text", &[]))
            .await
            .map_err(|_| PgError::Timeout(DEADLINE))?;
        match row {
            Ok(r) => Ok(r.get(0)),
            Err(e) => {
                *slot = None;
                Err(PgError::Query(e))
            }
        }
    }
}
