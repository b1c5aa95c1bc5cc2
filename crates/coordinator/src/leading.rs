//! Whether this process may still act as the leader: the one check every
//! side effect makes (provider calls, messages to agents). Set by
//! [`crate::ha::lead`]; with sled (one replica) it is never set and always
//! allows. Imports nothing from the crate, so the modules that check it
//! (sessions, the driver) depend on nothing of HA.

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// rekeyd's exit code when it lost the lease (EX_TEMPFAIL: restart it).
pub const EXIT_LEASE_LOST: i32 = 75;

/// The leadership of this process: until when it may still act.
pub(crate) struct Leadership {
    pub(crate) epoch: u64,
    /// Acting is refused from this instant on (moved forward by each renewal).
    pub(crate) valid_until: Mutex<Instant>,
}

pub(crate) static LEADERSHIP: OnceLock<Leadership> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
#[error("this coordinator's lease (epoch {epoch}) ran out: it no longer acts")]
pub struct NotLeading {
    pub epoch: u64,
}

/// Refuses a side effect (a provider call, a delivery to an agent) once this
/// leader's lease may have run out. Always `Ok` with sled (one replica).
pub fn ensure_leading() -> Result<(), NotLeading> {
    match LEADERSHIP.get() {
        None => Ok(()),
        Some(l) if Instant::now() < *l.valid_until.lock().expect("lease lock") => Ok(()),
        Some(l) => {
            lost(l.epoch, "the lease could not be renewed in time");
            Err(NotLeading { epoch: l.epoch })
        }
    }
}

/// Stops acting at once: logs and exits (the supervisor, systemd, restarts
/// this replica as a follower).
pub(crate) fn lost(epoch: u64, why: &str) {
    tracing::error!(epoch, why, "lease lost: this coordinator stops acting and exits to rejoin as a follower");
    eprintln!("rekeyd: lease lost (epoch {epoch}): {why}; exiting to rejoin as a follower");
    std::process::exit(EXIT_LEASE_LOST);
}
