//! `rekey coordinators`: the replicas sharing the store, which one leads,
//! its lease and epoch, the schema version, and which replica answered.
//! Any replica answers it (a read).

use crate::table::Table;
use crate::{Client, Output, output};
use anyhow::Result;
use rekey_common::time::{format_duration_ms, now_unix_ms};
use rekey_proto::v1::ListCoordinatorsRequest;
use rekey_types::v1::CoordinatorsView;
use std::fmt::Write;

pub(crate) async fn run(client: &Client, out: Output) -> Result<()> {
    let req = client.request(ListCoordinatorsRequest {});
    let v: CoordinatorsView = client.view(client.inner.clone().list_coordinators(req).await)?;
    let addr = client.addr();
    output(out, &v, |v| print!("{}", render(v, &addr, now_unix_ms())));
    Ok(())
}

/// The table: a summary (store, leader, epoch, lease), who answered, then one
/// row per replica. `reached` is the address this CLI called; `now_ms` the clock.
pub(crate) fn render(v: &CoordinatorsView, reached: &str, now_ms: i64) -> String {
    let mut s = String::new();
    let leader = match (&v.leader, v.lease_age_ms) {
        (Some(id), Some(age)) => format!(
            "{id} (epoch {}, lease renewed {} ago, ttl {})",
            v.epoch,
            format_duration_ms(age),
            format_duration_ms(v.lease_ttl_ms)
        ),
        (Some(id), None) => format!("{id} (epoch {})", v.epoch),
        (None, _) => format!("none: an election is in progress (last epoch {})", v.epoch),
    };
    let _ = writeln!(s, "store:       {} (schema version {})", v.backend, v.schema_version);
    let _ = writeln!(s, "leader:      {leader}");
    let _ = writeln!(s, "answered by: {} at {reached}", v.answered_by);
    let _ = writeln!(s);
    if v.replicas.is_empty() {
        let _ = writeln!(s, "no replica has announced itself yet");
        return s;
    }
    let mut t = Table::new(["ID", "ADDRESS", "ROLE", "LAST SEEN", "VERSION"]);
    for r in &v.replicas {
        let mut id = r.id.clone();
        if r.id == v.answered_by {
            id.push_str(" *");
        }
        let seen = if r.last_seen_ms <= 0 {
            "never".to_string()
        } else {
            format!("{} ago", format_duration_ms(now_ms - r.last_seen_ms))
        };
        let role = if r.leader { "leader" } else { "follower" };
        t.row([id, r.address.clone(), role.to_string(), seen, r.version.clone()]);
    }
    let _ = write!(s, "{t}");
    let _ = writeln!(s, "(* answered this call)");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rekey_types::v1::{ReplicaView, StoreBackend};

    fn replica(id: &str, port: u16, leader: bool, last_seen_ms: i64) -> ReplicaView {
        ReplicaView {
            id: id.into(),
            address: format!("10.0.0.{port}:7400"),
            leader,
            last_seen_ms,
            version: "0.1.0".into(),
        }
    }

    fn view(leader: Option<&str>) -> CoordinatorsView {
        CoordinatorsView {
            backend: StoreBackend::Postgres,
            schema_version: 3,
            leader: leader.map(String::from),
            epoch: 7,
            lease_age_ms: leader.map(|_| 1_250),
            lease_ttl_ms: 10_000,
            answered_by: "rekeyd-2".into(),
            replicas: vec![
                replica("rekeyd-1", 1, leader.is_some(), 1_000_000 - 800),
                replica("rekeyd-2", 2, false, 1_000_000 - 1_500),
                replica("rekeyd-3", 3, false, 0),
            ],
        }
    }

    #[test]
    fn the_table_names_the_leader_its_lease_and_who_answered() {
        let text = render(&view(Some("rekeyd-1")), "10.0.0.2:7400", 1_000_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "store:       postgres (schema version 3)");
        assert_eq!(lines[1], "leader:      rekeyd-1 (epoch 7, lease renewed 1.250s ago, ttl 10.000s)");
        assert_eq!(lines[2], "answered by: rekeyd-2 at 10.0.0.2:7400");
        let row = |id: &str| lines.iter().find(|l| l.starts_with(id)).copied().unwrap_or_else(|| panic!("{text}"));
        let cells = |id| row(id).split_whitespace().collect::<Vec<_>>();
        assert_eq!(cells("rekeyd-1"), ["rekeyd-1", "10.0.0.1:7400", "leader", "0.800s", "ago", "0.1.0"]);
        assert_eq!(cells("rekeyd-2"), ["rekeyd-2", "*", "10.0.0.2:7400", "follower", "1.500s", "ago", "0.1.0"]);
        assert_eq!(cells("rekeyd-3"), ["rekeyd-3", "10.0.0.3:7400", "follower", "never", "0.1.0"]);
        assert!(lines[4].starts_with("ID") && lines[4].contains("LAST SEEN"), "{text}");
    }

    #[test]
    fn an_election_in_progress_is_said_plainly() {
        let text = render(&view(None), "10.0.0.2:7400", 1_000_000);
        assert!(text.contains("leader:      none: an election is in progress (last epoch 7)\n"), "{text}");
        assert!(!text.contains(" leader "), "no replica shows as leader: {text}");
        let empty = CoordinatorsView { replicas: vec![], ..view(None) };
        assert!(render(&empty, "a:1", 0).ends_with("\nno replica has announced itself yet\n"));
    }
}
