//! Hands the coordinator's commands to the pipeline without ever blocking
//! the session: one worker task per restart group (the secrets that share a
//! restart, or a secret alone: [`crate::config::AgentConfig::restart_group`]), fed through a
//! bounded queue, so commands for a secret run in the order they arrived (a
//! `Rollback` never overtakes the `Delivery` it undoes), the same service is
//! never restarted by two commands at once, and an apply keeps running when
//! the session drops.
//!
//! Batching: a delivery of a secret that shares its restart waits up to
//! `[apply] batch_window` (3 s by default) for its siblings' deliveries —
//! less as soon as every sibling's has arrived, or another command for the
//! group comes in — and they are applied together behind one restart and
//! one health check ([`Pipeline::deliver_together`]).

use crate::pipeline::Pipeline;
use rekey_proto::v1::{Delivery, Purge, Rollback};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Commands queued per secret (of a restart group) before new ones are refused.
pub const QUEUE_DEPTH: usize = 16;

/// What the coordinator can ask of the pipeline.
#[derive(Debug)]
pub enum Command {
    Deliver(Delivery),
    Rollback(Rollback),
    Purge(Purge),
}

impl Command {
    fn secret(&self) -> &str {
        match self {
            Command::Deliver(d) => &d.secret,
            Command::Rollback(r) => &r.secret,
            Command::Purge(p) => &p.secret,
        }
    }
}

pub struct Dispatcher {
    pipeline: Pipeline,
    queues: HashMap<String, mpsc::Sender<Command>>,
    tracker: TaskTracker,
    /// Workers stop taking commands.
    stopping: CancellationToken,
    /// Workers drop the command in progress (the journal undoes it at next start).
    abort: CancellationToken,
}

impl Dispatcher {
    /// Spawns one worker per restart group of the secrets the config declares.
    pub fn start(pipeline: Pipeline) -> Dispatcher {
        let tracker = TaskTracker::new();
        let stopping = CancellationToken::new();
        let abort = CancellationToken::new();
        let mut queues = HashMap::new();
        let config = pipeline.config();
        let mut groups: Vec<(String, BTreeSet<String>)> = Vec::new();
        for name in config.secret_names() {
            let key = config.restart_group(&name);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => drop(members.insert(name)),
                None => groups.push((key, BTreeSet::from([name]))),
            }
        }
        for (key, members) in groups {
            let (tx, rx) = mpsc::channel(QUEUE_DEPTH * members.len());
            let span = if members.len() == 1 {
                tracing::info_span!("apply", secret = %members.first().expect("one"))
            } else {
                tracing::info_span!("apply", restart = %key)
            };
            let w = Worker { pipeline: pipeline.clone(), members: members.clone(), window: config.batch_window };
            tracker.spawn(w.run(rx, stopping.clone(), abort.clone()).instrument(span));
            for m in members {
                queues.insert(m, tx.clone());
            }
        }
        Dispatcher { pipeline, queues, tracker, stopping, abort }
    }

    /// Queues a command; never waits. An undeclared secret or a full queue
    /// is refused at once with a report.
    pub fn submit(&self, cmd: Command) {
        let Some(tx) = self.queues.get(cmd.secret()) else {
            let reason = self.pipeline.undeclared(cmd.secret());
            match cmd {
                Command::Deliver(d) => drop(self.pipeline.refuse(&d.rotation_id, &d.secret, &d.version_id, reason)),
                Command::Rollback(r) => drop(self.pipeline.refuse(&r.rotation_id, &r.secret, &r.version_id, reason)),
                Command::Purge(p) => {
                    tracing::warn!(secret = %p.secret, version = %p.version_id, "purge ignored: {reason}")
                }
            }
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(cmd) | mpsc::error::TrySendError::Closed(cmd)) = tx.try_send(cmd) {
            let reason = format!("agent busy: {QUEUE_DEPTH} commands already queued for secret {}", cmd.secret());
            match cmd {
                Command::Deliver(d) => drop(self.pipeline.refuse(&d.rotation_id, &d.secret, &d.version_id, reason)),
                Command::Rollback(r) => drop(self.pipeline.refuse(&r.rotation_id, &r.secret, &r.version_id, reason)),
                Command::Purge(p) => {
                    tracing::warn!(secret = %p.secret, version = %p.version_id, "purge dropped: {reason}")
                }
            }
        }
    }

    /// Stops taking commands, lets the one in progress finish for up to
    /// `grace`, then drops it: its journal rolls it back at next start.
    pub async fn shutdown(self, grace: Duration) {
        self.stopping.cancel();
        drop(self.queues);
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            tracing::warn!(
                grace_s = grace.as_secs(),
                "an apply is still running at shutdown; it stops now and is rolled back at next start"
            );
            self.abort.cancel();
            self.tracker.wait().await;
        }
    }
}

/// The worker of one restart group.
struct Worker {
    pipeline: Pipeline,
    /// The group's secrets.
    members: BTreeSet<String>,
    window: Duration,
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<Command>, stopping: CancellationToken, abort: CancellationToken) {
        let mut next: Option<Command> = None;
        loop {
            let cmd = match next.take() {
                Some(c) => c,
                None => tokio::select! {
                    biased;
                    _ = stopping.cancelled() => return,
                    cmd = rx.recv() => match cmd { Some(c) => c, None => return },
                },
            };
            let pipeline = &self.pipeline;
            let run = async {
                match cmd {
                    Command::Deliver(d) => {
                        let batch = self.collect(d, &mut rx, &mut next, &stopping).await;
                        drop(pipeline.deliver_together(batch).await)
                    }
                    Command::Rollback(r) => drop(pipeline.rollback(r).await),
                    Command::Purge(p) => drop(pipeline.purge(p).await),
                }
            };
            tokio::select! {
                _ = abort.cancelled() => return,
                () = run => {}
            }
        }
    }

    /// The deliveries to apply with `first`: its siblings' arriving within
    /// the window. Stops early once every secret of the group has one, or
    /// when another kind of command (or a second delivery of a secret
    /// already in the batch) arrives: that one is kept in `next`, so the
    /// order of each secret's commands is kept.
    async fn collect(
        &self,
        first: Delivery,
        rx: &mut mpsc::Receiver<Command>,
        next: &mut Option<Command>,
        stopping: &CancellationToken,
    ) -> Vec<Delivery> {
        let mut batch = vec![first];
        if self.members.len() < 2 || self.window.is_zero() {
            return batch;
        }
        let deadline = tokio::time::Instant::now() + self.window;
        while batch.len() < self.members.len() {
            tokio::select! {
                biased;
                _ = stopping.cancelled() => break,
                _ = tokio::time::sleep_until(deadline) => break,
                cmd = rx.recv() => match cmd {
                    Some(Command::Deliver(d)) if batch.iter().all(|b| b.secret != d.secret) => batch.push(d),
                    Some(other) => {
                        *next = Some(other);
                        break;
                    }
                    None => break,
                },
            }
        }
        if batch.len() > 1 {
            let names: Vec<&str> = batch.iter().map(|d| d.secret.as_str()).collect();
            tracing::info!(secrets = ?names, "deliveries batched behind one restart");
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;
    use crate::outbox::Outbox;
    use rekey_proto::v1::{SecretField, Stage};

    /// Commands for a secret run in arrival order (a rollback never overtakes
    /// the delivery it undoes); an undeclared secret is refused at once.
    #[tokio::test]
    async fn commands_run_in_order_and_undeclared_secrets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "state_dir = 'state'\n[[secret]]\nname = 'api'\n[[secret.file]]\npath = '{}/api.conf'\nkind = 'template'\ntemplate = 'k={{{{ value }}}}'\n[secret.restart]\nkind = 'command'\ncommand = ['/bin/sleep', '0.2']\n",
            dir.path().display()
        );
        let config = AgentConfig::from_str(&dir.path().join("agent.toml"), &text).unwrap();
        let outbox = Outbox::new();
        let pipeline = Pipeline::open(&config, outbox.clone()).unwrap();
        let d = Dispatcher::start(pipeline.clone());
        let delivery = |secret: &str| Delivery {
            rotation_id: "r1".into(),
            secret: secret.into(),
            version_id: "v1".into(),
            fields: vec![SecretField { name: "value".into(), value: b"VALUE-1".to_vec() }],
            ..Default::default()
        };
        d.submit(Command::Deliver(delivery("api")));
        d.submit(Command::Rollback(Rollback {
            rotation_id: "r1".into(),
            secret: "api".into(),
            version_id: "v1".into(),
        }));
        d.submit(Command::Deliver(delivery("other")));
        let refused = outbox.take_unsent(0);
        assert_eq!(refused.len(), 1);
        assert_eq!((refused[0].secret.as_str(), refused[0].stage), ("other", Stage::Refused as i32));

        let deadline = tokio::time::Instant::now() + rekey_common::testing::budget();
        loop {
            let sent = outbox.take_unsent(0);
            if sent.iter().any(|r| r.stage == Stage::RolledBack as i32) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no rollback report");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Delivered, then rolled back: the file it created is gone again.
        assert!(!dir.path().join("api.conf").exists());
        assert!(pipeline.applied().is_empty());
        d.shutdown(Duration::from_secs(5)).await;
    }
}
