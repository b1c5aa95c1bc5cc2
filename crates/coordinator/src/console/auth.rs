//! Console access: one-time login links and the sessions they open.
//!
//! `rekey console` (an operator call over mTLS, so it proves who asks) gets a
//! link holding a random 256-bit token, valid once and for [`LOGIN_TTL`].
//! Visiting it trades the token for a session cookie (another random 256-bit
//! value) bound to that operator's name and role. Only SHA-256 hashes of the
//! tokens and cookies are kept, in memory: a restart of rekeyd logs everyone
//! out, and a memory dump shows no usable credential.

use crate::config::ConsoleConfig;
use crate::store::OperatorRole;
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// How long a login link is valid (and it is valid once).
pub const LOGIN_TTL: Duration = Duration::from_secs(60);
/// Unused links kept at most: a burst of `rekey console` cannot grow memory.
const MAX_PENDING: usize = 64;
/// Open console sessions at most; the oldest is ended to make room.
const MAX_SESSIONS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("the web console is off: set [console] listen = \"127.0.0.1:PORT\" in {}", .0.display())]
    Off(PathBuf),
    #[error("the web console is not listening yet; try again in a moment")]
    NotListening,
    #[error("{0} console login links are waiting to be used; try again in a minute")]
    TooMany(usize),
    #[error("system random number generator failed")]
    Random,
}

/// Who a console session (or a pending login) is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub operator: String,
    pub role: OperatorRole,
    pub expires_ms: i64,
}

/// A login link as `rekey console` prints it.
#[derive(Debug)]
pub struct LoginLink {
    pub url: String,
    pub expires_ms: i64,
    /// How long the session it opens lasts.
    pub session: Duration,
}

type Hash = [u8; 32];

#[derive(Default)]
struct Inner {
    pending: HashMap<Hash, Grant>,
    sessions: HashMap<Hash, Grant>,
}

/// The console's logins and sessions; cheap to clone (one shared table).
#[derive(Clone)]
pub struct Logins {
    config: Option<ConsoleConfig>,
    config_path: PathBuf,
    addr: Arc<OnceLock<SocketAddr>>,
    inner: Arc<Mutex<Inner>>,
}

fn hash(token: &str) -> Hash {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().try_into().expect("sha-256 is 32 bytes")
}

fn random_token() -> Result<String, LoginError> {
    let mut b = [0u8; 32];
    SystemRandom::new().fill(&mut b).map_err(|_| LoginError::Random)?;
    Ok(hex::encode(b))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Logins {
    /// `config` is `[console]` (None: the console is off).
    pub fn new(config: Option<ConsoleConfig>, config_path: PathBuf) -> Logins {
        Logins { config, config_path, addr: Arc::default(), inner: Arc::default() }
    }

    pub fn config(&self) -> Option<&ConsoleConfig> {
        self.config.as_ref()
    }

    /// Told once the listener is bound (the port may have been 0).
    pub(crate) fn set_addr(&self, addr: SocketAddr) {
        let _ = self.addr.set(addr);
    }

    /// The address login links point to: the bound one, as loopback when it
    /// listens on every address.
    pub fn url_base(&self) -> Option<String> {
        let addr = *self.addr.get()?;
        let ip = if addr.ip().is_unspecified() { "127.0.0.1".parse().expect("ip") } else { addr.ip() };
        Some(format!("http://{}", SocketAddr::new(ip, addr.port())))
    }

    /// A new one-time login link for `operator` with `role`.
    pub fn create(&self, operator: &str, role: OperatorRole, now_ms: i64) -> Result<LoginLink, LoginError> {
        let Some(config) = &self.config else { return Err(LoginError::Off(self.config_path.clone())) };
        let base = self.url_base().ok_or(LoginError::NotListening)?;
        let token = random_token()?;
        let expires_ms = now_ms + ms(LOGIN_TTL);
        let mut inner = self.inner.lock().expect("console logins lock");
        inner.pending.retain(|_, g| g.expires_ms > now_ms);
        if inner.pending.len() >= MAX_PENDING {
            return Err(LoginError::TooMany(inner.pending.len()));
        }
        inner.pending.insert(hash(&token), Grant { operator: operator.to_string(), role, expires_ms });
        Ok(LoginLink { url: format!("{base}/login?token={token}"), expires_ms, session: config.session_ttl })
    }

    /// Trades a login token for a new session: its cookie value and grant.
    /// A token works once, before it expires; anything else is `None`.
    pub fn redeem(&self, token: &str, now_ms: i64) -> Result<Option<(String, Grant)>, LoginError> {
        let ttl = self.config.as_ref().map_or(Duration::ZERO, |c| c.session_ttl);
        let mut inner = self.inner.lock().expect("console logins lock");
        let Some(pending) = inner.pending.remove(&hash(token)) else { return Ok(None) };
        if pending.expires_ms <= now_ms {
            return Ok(None);
        }
        let cookie = random_token()?;
        let grant = Grant { expires_ms: now_ms + ms(ttl), ..pending };
        inner.sessions.retain(|_, g| g.expires_ms > now_ms);
        if inner.sessions.len() >= MAX_SESSIONS {
            let oldest = inner.sessions.iter().min_by_key(|(_, g)| g.expires_ms).map(|(k, _)| *k);
            if let Some(k) = oldest {
                inner.sessions.remove(&k);
            }
        }
        inner.sessions.insert(hash(&cookie), grant.clone());
        Ok(Some((cookie, grant)))
    }

    /// The session a cookie value opens, if it is one and has not expired.
    pub fn session(&self, cookie: &str, now_ms: i64) -> Option<Grant> {
        let mut inner = self.inner.lock().expect("console logins lock");
        let key = hash(cookie);
        match inner.sessions.get(&key) {
            Some(g) if g.expires_ms > now_ms => Some(g.clone()),
            Some(_) => {
                inner.sessions.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends every session of `operator` (it was revoked).
    pub fn end_sessions_of(&self, operator: &str) {
        self.inner.lock().expect("console logins lock").sessions.retain(|_, g| g.operator != operator);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logins() -> Logins {
        let l = Logins::new(
            Some(ConsoleConfig { listen: "127.0.0.1:0".parse().unwrap(), session_ttl: Duration::from_secs(3600) }),
            "/etc/rekey/coordinator.toml".into(),
        );
        l.set_addr("127.0.0.1:7402".parse().unwrap());
        l
    }

    fn token_of(url: &str) -> &str {
        url.split_once("token=").unwrap().1
    }

    #[test]
    fn a_login_link_works_once_before_it_expires_and_opens_a_session_bound_to_the_operator() {
        let l = logins();
        let link = l.create("ann", OperatorRole::Viewer, 1_000).unwrap();
        assert!(link.url.starts_with("http://127.0.0.1:7402/login?token="), "{}", link.url);
        assert_eq!(token_of(&link.url).len(), 64, "256 bits, hex");
        assert_eq!(link.expires_ms, 61_000);
        let (cookie, grant) = l.redeem(token_of(&link.url), 2_000).unwrap().unwrap();
        assert_eq!((grant.operator.as_str(), grant.role), ("ann", OperatorRole::Viewer));
        assert_eq!(grant.expires_ms, 2_000 + 3_600_000);
        assert_ne!(cookie, token_of(&link.url));
        assert!(l.redeem(token_of(&link.url), 2_001).unwrap().is_none(), "single use");
        assert_eq!(l.session(&cookie, 3_000), Some(grant));
        assert!(l.session(&cookie, 2_000 + 3_600_000).is_none(), "expired");
        assert!(l.session(&cookie, 3_000).is_none(), "an expired session is gone");
        assert!(l.session("nonsense", 3_000).is_none());

        let late = l.create("bob", OperatorRole::Admin, 10_000).unwrap();
        assert!(l.redeem(token_of(&late.url), 70_000).unwrap().is_none(), "a link expires after 60 s");

        let link = l.create("ann", OperatorRole::Viewer, 1_000).unwrap();
        let (cookie, _) = l.redeem(token_of(&link.url), 1_000).unwrap().unwrap();
        l.end_sessions_of("ann");
        assert!(l.session(&cookie, 1_001).is_none(), "a revoked operator's session ends");
    }

    #[test]
    fn the_table_is_bounded_and_an_off_console_says_how_to_turn_it_on() {
        let l = logins();
        for _ in 0..MAX_PENDING {
            l.create("ann", OperatorRole::Viewer, 0).unwrap();
        }
        assert!(matches!(l.create("ann", OperatorRole::Viewer, 0), Err(LoginError::TooMany(64))));
        l.create("ann", OperatorRole::Viewer, 60_000).expect("expired links make room");

        let off = Logins::new(None, "/etc/rekey/coordinator.toml".into());
        let e = off.create("ann", OperatorRole::Viewer, 0).unwrap_err().to_string();
        assert!(e.contains("[console] listen") && e.contains("/etc/rekey/coordinator.toml"), "{e}");
        let unbound = Logins::new(logins().config.clone(), "x".into());
        assert!(matches!(unbound.create("ann", OperatorRole::Viewer, 0), Err(LoginError::NotListening)));
    }
}
