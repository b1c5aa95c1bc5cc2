//! Hands the coordinator's commands to the pipeline without ever blocking
//! the session: one worker task per declared secret, fed through a bounded
//! queue, so commands for a secret run in the order they arrived (a
//! `Rollback` never overtakes the `Delivery` it undoes) and an apply keeps
//! running when the session drops.

use crate::pipeline::Pipeline;
use rekey_proto::v1::{Delivery, Purge, Rollback};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Commands queued per secret before new ones are refused.
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
    /// Spawns one worker per secret the config declares.
    pub fn start(pipeline: Pipeline) -> Dispatcher {
        let tracker = TaskTracker::new();
        let stopping = CancellationToken::new();
        let abort = CancellationToken::new();
        let mut queues = HashMap::new();
        for name in pipeline.config().secret_names() {
            let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
            let span = tracing::info_span!("apply", secret = %name);
            tracker.spawn(worker(pipeline.clone(), rx, stopping.clone(), abort.clone()).instrument(span));
            queues.insert(name, tx);
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

async fn worker(
    pipeline: Pipeline,
    mut rx: mpsc::Receiver<Command>,
    stopping: CancellationToken,
    abort: CancellationToken,
) {
    loop {
        let cmd = tokio::select! {
            biased;
            _ = stopping.cancelled() => return,
            cmd = rx.recv() => match cmd { Some(c) => c, None => return },
        };
        let run = async {
            match cmd {
                Command::Deliver(d) => drop(pipeline.deliver(d).await),
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
