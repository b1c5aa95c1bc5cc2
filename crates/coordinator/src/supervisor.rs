//! One supervisor for every long-running task of `rekeyd`.
//!
//! A task is `async fn run(self, stop: CancellationToken) -> Result<(), E>`
//! that returns only when `stop` is cancelled. Any other end — an error, a
//! panic, or an `Ok` before it was asked to stop — is a failure: the
//! supervisor logs which task ended and why, stops every other task, and
//! [`Supervisor::wait`] returns the failure so `main` exits non-zero (systemd
//! restarts the process; the store makes that safe, every transition being
//! committed before its side effect).
//!
//! Shutdown runs in two phases: the front tasks (the gRPC server) stop first,
//! so no agent report or operator command arrives at a stopped engine; then
//! the back tasks (engine, campaigns, tripwire, alert webhook) stop.

use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Which shutdown phase a task belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serves the outside world; stopped first.
    Front,
    /// Background work the front tasks feed; stopped once they are gone.
    Back,
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("task {task} failed: {why}")]
    TaskFailed { task: &'static str, why: String },
    #[error("tasks {0:?} did not stop within the drain timeout")]
    DrainTimeout(Vec<&'static str>),
}

type Outcome = (&'static str, Phase, Result<(), String>);

/// Runs named tasks; the first one to end on its own stops them all.
pub struct Supervisor {
    tasks: JoinSet<Outcome>,
    names: Vec<(&'static str, Phase)>,
    front: CancellationToken,
    back: CancellationToken,
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor {
            tasks: JoinSet::new(),
            names: Vec::new(),
            front: CancellationToken::new(),
            back: CancellationToken::new(),
        }
    }
}

impl Supervisor {
    /// Spawns `task(stop)` under a span named after it.
    pub fn spawn<F, Fut, E>(&mut self, name: &'static str, phase: Phase, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::error::Error + 'static,
    {
        let stop = match phase {
            Phase::Front => self.front.clone(),
            Phase::Back => self.back.clone(),
        };
        let fut = task(stop);
        self.names.push((name, phase));
        self.tasks.spawn(
            async move { (name, phase, fut.await.map_err(|e| rekey_common::error::chain(&e))) }
                .instrument(tracing::info_span!("task", name)),
        );
    }

    /// Waits for `shutdown` or the first task to end, whichever comes first;
    /// then stops everything in two phases, each bounded by `drain`. Returns
    /// the first failure, if any task failed.
    pub async fn wait(mut self, shutdown: CancellationToken, drain: Duration) -> Result<(), SupervisorError> {
        let mut failure = None;
        tokio::select! {
            _ = shutdown.cancelled() => tracing::info!("shutdown requested, stopping tasks"),
            Some(joined) = self.tasks.join_next() => {
                let (task, why) = describe_early_end(joined);
                tracing::error!(task, why = %why, "a task ended on its own: stopping rekeyd");
                self.names.retain(|(n, _)| *n != task);
                failure = Some(SupervisorError::TaskFailed { task, why });
            }
        }
        self.front.cancel();
        self.drain_phase(Phase::Front, drain, &mut failure).await;
        self.back.cancel();
        self.drain_phase(Phase::Back, drain, &mut failure).await;
        failure.map_or(Ok(()), Err)
    }

    /// Joins tasks until none of `phase` is left (or `drain` passes),
    /// recording the first error among them.
    async fn drain_phase(&mut self, phase: Phase, drain: Duration, failure: &mut Option<SupervisorError>) {
        let deadline = tokio::time::Instant::now() + drain;
        while self.names.iter().any(|(_, p)| *p == phase) {
            let joined = match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                Ok(Some(j)) => j,
                Ok(None) => break,
                Err(_) => {
                    let late: Vec<_> = self.names.iter().filter(|(_, p)| *p == phase).map(|(n, _)| *n).collect();
                    tracing::error!(tasks = ?late, "tasks did not stop in time");
                    failure.get_or_insert(SupervisorError::DrainTimeout(late));
                    self.tasks.abort_all();
                    self.names.clear();
                    return;
                }
            };
            let (task, result) = match joined {
                Ok((task, _, result)) => (task, result),
                Err(e) => ("unknown", Err(join_error(e))),
            };
            self.names.retain(|(n, _)| *n != task);
            if let Err(why) = result {
                tracing::error!(task, why = %why, "task failed while stopping");
                failure.get_or_insert(SupervisorError::TaskFailed { task, why });
            }
        }
    }
}

fn join_error(e: tokio::task::JoinError) -> String {
    if e.is_panic() { "panicked".to_string() } else { "cancelled".to_string() }
}

/// Why a task that was not asked to stop ended.
fn describe_early_end(joined: Result<Outcome, tokio::task::JoinError>) -> (&'static str, String) {
    match joined {
        Ok((task, _, Ok(()))) => (task, "returned before shutdown".to_string()),
        Ok((task, _, Err(why))) => (task, why),
        Err(e) => ("unknown", join_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Debug, thiserror::Error)]
    #[error("boom")]
    struct Boom(#[source] std::io::Error);

    async fn until_stopped(stop: CancellationToken, log: Arc<Mutex<Vec<&'static str>>>, name: &'static str) {
        stop.cancelled().await;
        log.lock().unwrap().push(name);
    }

    #[tokio::test]
    async fn the_first_failure_stops_every_task_and_is_returned() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut s = Supervisor::default();
        let l = log.clone();
        s.spawn("server", Phase::Front, move |stop| async move {
            until_stopped(stop, l, "server").await;
            Ok::<(), Boom>(())
        });
        s.spawn("engine", Phase::Back, |_stop| async move { Err(Boom(std::io::Error::other("disk on fire"))) });
        let err = s.wait(CancellationToken::new(), Duration::from_secs(5)).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("engine") && text.contains("boom: disk on fire"), "{text}");
        assert_eq!(*log.lock().unwrap(), vec!["server"]);
    }

    #[tokio::test]
    async fn a_task_that_returns_or_panics_early_is_a_failure() {
        let mut s = Supervisor::default();
        s.spawn("campaigns", Phase::Back, |_stop| async { Ok::<(), Boom>(()) });
        let err = s.wait(CancellationToken::new(), Duration::from_secs(5)).await.unwrap_err();
        assert!(err.to_string().contains("campaigns failed: returned before shutdown"), "{err}");

        let mut s = Supervisor::default();
        s.spawn("tripwire", Phase::Back, |_stop| async {
            if true {
                panic!("bug");
            }
            Ok::<(), Boom>(())
        });
        let err = s.wait(CancellationToken::new(), Duration::from_secs(5)).await.unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
    }

    #[tokio::test]
    async fn shutdown_stops_the_front_before_the_back() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut s = Supervisor::default();
        let (l1, l2) = (log.clone(), log.clone());
        s.spawn("engine", Phase::Back, move |stop| async move {
            until_stopped(stop, l1, "engine").await;
            Ok::<(), Boom>(())
        });
        s.spawn("server", Phase::Front, move |stop| async move {
            until_stopped(stop, l2, "server").await;
            // The server drains for a while; the engine must still be running.
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<(), Boom>(())
        });
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        s.wait(shutdown, Duration::from_secs(5)).await.unwrap();
        assert_eq!(*log.lock().unwrap(), vec!["server", "engine"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ignores_stop_is_reported() {
        let mut s = Supervisor::default();
        s.spawn("stuck", Phase::Back, |_stop| async {
            std::future::pending::<()>().await;
            Ok::<(), Boom>(())
        });
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let err = s.wait(shutdown, Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, SupervisorError::DrainTimeout(ref t) if t == &["stuck"]), "{err}");
    }
}
