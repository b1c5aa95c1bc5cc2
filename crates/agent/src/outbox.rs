//! Stage reports waiting to reach the coordinator.
//!
//! The pipeline pushes reports whether or not a session is up; the session
//! sends them after `Welcome` and as they come. A report stays here until
//! the coordinator has provably read it: the session stream is ordered and
//! the coordinator answers heartbeats in order, so an ack for a heartbeat
//! sent *after* the report means the report was read. A session that drops
//! before that sends them again on the next `Welcome` (the coordinator sees
//! duplicates, never gaps).
//!
//! Only the latest report per (rotation, secret) is kept — except that a
//! `FAILED` followed by `ROLLED_BACK` is kept whole, as the pair carries the
//! reason. Bounded: beyond [`MAX_KEYS`] the oldest entries are dropped.

use rekey_proto::v1::{Stage, StageReport};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Distinct (rotation, secret) pairs kept.
pub const MAX_KEYS: usize = 1024;

#[derive(Clone, Default)]
pub struct Outbox {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
}

#[derive(Default)]
struct State {
    entries: BTreeMap<(String, String), Vec<Entry>>,
    /// Push order, for sending in the order reports were made.
    next: u64,
}

struct Entry {
    report: StageReport,
    order: u64,
    /// The last heartbeat sequence number sent before this report went out
    /// in the current session; `None`: not sent in this session.
    sent_after: Option<u64>,
}

impl Outbox {
    pub fn new() -> Outbox {
        Outbox::default()
    }

    /// Queues a report, replacing older ones for the same rotation and secret.
    pub fn push(&self, report: StageReport) {
        let mut s = self.state.lock().expect("outbox lock");
        let order = s.next;
        s.next += 1;
        let key = (report.rotation_id.clone(), report.secret.clone());
        let list = s.entries.entry(key).or_default();
        let keep_failure = report.stage == Stage::RolledBack as i32
            && list.last().is_some_and(|e| e.report.stage == Stage::Failed as i32);
        if !keep_failure {
            list.clear();
        }
        list.push(Entry { report, order, sent_after: None });
        if s.entries.len() > MAX_KEYS {
            // Drop the entry whose newest report is oldest.
            let oldest = s
                .entries
                .iter()
                .min_by_key(|(_, v)| v.last().map(|e| e.order).unwrap_or(0))
                .map(|(k, _)| k.clone())
                .expect("not empty");
            s.entries.remove(&oldest);
        }
        drop(s);
        self.notify.notify_one();
    }

    /// A new session: everything not yet acknowledged is to be sent again.
    pub fn session_started(&self) {
        let mut s = self.state.lock().expect("outbox lock");
        for e in s.entries.values_mut().flatten() {
            e.sent_after = None;
        }
    }

    /// Reports not yet sent in this session, in the order they were made,
    /// marked as sent after heartbeat `last_heartbeat`.
    pub fn take_unsent(&self, last_heartbeat: u64) -> Vec<StageReport> {
        let mut s = self.state.lock().expect("outbox lock");
        let mut out: Vec<(u64, StageReport)> = Vec::new();
        for e in s.entries.values_mut().flatten() {
            if e.sent_after.is_none() {
                e.sent_after = Some(last_heartbeat);
                out.push((e.order, e.report.clone()));
            }
        }
        out.sort_by_key(|(o, _)| *o);
        out.into_iter().map(|(_, r)| r).collect()
    }

    /// The coordinator answered heartbeat `seq`: every report sent before it was read.
    pub fn acknowledged(&self, seq: u64) {
        let mut s = self.state.lock().expect("outbox lock");
        for list in s.entries.values_mut() {
            list.retain(|e| e.sent_after.is_none_or(|m| m >= seq));
        }
        s.entries.retain(|_, v| !v.is_empty());
    }

    /// Reports not yet acknowledged.
    pub fn len(&self) -> usize {
        self.state.lock().expect("outbox lock").entries.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves when a report was pushed since the last call (a push with no
    /// one waiting is remembered).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(rotation: &str, secret: &str, stage: Stage) -> StageReport {
        StageReport {
            rotation_id: rotation.into(),
            secret: secret.into(),
            version_id: "v2".into(),
            stage: stage as i32,
            ..Default::default()
        }
    }

    fn stages(v: &[StageReport]) -> Vec<i32> {
        v.iter().map(|r| r.stage).collect()
    }

    #[test]
    fn keeps_the_latest_per_rotation_and_secret_and_failure_pairs() {
        let o = Outbox::new();
        o.push(r("r1", "a", Stage::Delivered));
        o.push(r("r1", "a", Stage::Applied));
        o.push(r("r1", "b", Stage::Delivered));
        o.push(r("r1", "a", Stage::Failed));
        o.push(r("r1", "a", Stage::RolledBack));
        let sent = o.take_unsent(0);
        assert_eq!(stages(&sent), vec![Stage::Delivered as i32, Stage::Failed as i32, Stage::RolledBack as i32]);
        assert_eq!(sent[0].secret, "b");
        // A fresh attempt replaces the old story.
        o.push(r("r1", "a", Stage::Delivered));
        assert_eq!(o.len(), 2);
    }

    #[test]
    fn unacknowledged_reports_are_resent_after_a_new_session() {
        let o = Outbox::new();
        o.push(r("r1", "a", Stage::Healthy));
        assert_eq!(o.take_unsent(3).len(), 1);
        assert!(o.take_unsent(3).is_empty(), "sent once per session");
        // The session dropped before an ack: the next Welcome resends.
        o.session_started();
        assert_eq!(o.take_unsent(0).len(), 1);
        // An ack for a heartbeat sent before the report proves nothing.
        o.acknowledged(0);
        assert_eq!(o.len(), 1);
        o.acknowledged(1);
        assert!(o.is_empty());
    }

    #[test]
    fn a_report_replaced_after_sending_is_sent_again() {
        let o = Outbox::new();
        o.push(r("r1", "a", Stage::Delivered));
        o.take_unsent(1);
        o.push(r("r1", "a", Stage::Applied));
        assert_eq!(stages(&o.take_unsent(1)), vec![Stage::Applied as i32]);
        o.acknowledged(2);
        assert!(o.is_empty());
    }

    #[test]
    fn bounded() {
        let o = Outbox::new();
        for i in 0..MAX_KEYS + 10 {
            o.push(r(&format!("r{i}"), "a", Stage::Healthy));
        }
        assert_eq!(o.len(), MAX_KEYS);
        let kept = o.take_unsent(0);
        assert_eq!(kept.first().unwrap().rotation_id, "r10");
    }

    #[tokio::test]
    async fn a_push_wakes_the_session_even_if_it_was_not_waiting() {
        let o = Outbox::new();
        o.push(r("r1", "a", Stage::Healthy));
        tokio::time::timeout(std::time::Duration::from_secs(1), o.changed()).await.unwrap();
    }
}
