//! The client side of several rekeyd replicas: how a follower says where the
//! leader is, and in which order an agent or the CLI tries its addresses.
//!
//! A follower answers the calls only the leader may serve with
//! `UNAVAILABLE`, a message naming itself and the leader, and the ASCII
//! metadata [`LEADER_METADATA`] holding the leader's advertised
//! `HOST:PORT` (absent while no leader is known, e.g. during an election).
//! [`follower_status`] builds that answer and [`refusal`] reads it, so both
//! sides share one definition.
//!
//! [`Coordinators`] is the pure address selection both clients use: a pass
//! tries the last known leader first, then every configured address in
//! order; a leader named by a follower is tried next, at once; a pass ends
//! when every address was tried, or after a bounded number of attempts so
//! that stale hints naming each other cannot spin without a backoff.

use std::collections::VecDeque;

/// The gRPC metadata key in which a follower names the leader's address.
pub const LEADER_METADATA: &str = "rekey-leader";

/// The words every follower refusal's message carries.
const FOLLOWER_MARK: &str = "is a follower";

/// What a follower's refusal says about the leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The leader is at this `HOST:PORT`.
    Leader(String),
    /// No leader is known right now (an election is in progress).
    NoLeader,
}

/// The status a follower answers a call only the leader serves with.
pub fn follower_status(id: &str, leader: Option<&str>) -> tonic::Status {
    let message = match leader {
        Some(addr) => format!("this coordinator ({id}) {FOLLOWER_MARK}; the leader is at {addr}"),
        None => format!("this coordinator ({id}) {FOLLOWER_MARK}; no leader is known (an election is in progress)"),
    };
    let mut status = tonic::Status::unavailable(message);
    if let Some(value) = leader.and_then(|a| a.parse().ok()) {
        status.metadata_mut().insert(LEADER_METADATA, value);
    }
    status
}

/// A follower's refusal, if `status` is one. A leader hint that is not a
/// valid `HOST:PORT` counts as no hint.
pub fn refusal(status: &tonic::Status) -> Option<Refusal> {
    if status.code() != tonic::Code::Unavailable {
        return None;
    }
    let hint = status.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok()).map(str::trim);
    match hint {
        Some(addr) if check_address(addr).is_ok() => Some(Refusal::Leader(addr.to_string())),
        _ if status.message().contains(FOLLOWER_MARK) || hint.is_some() => Some(Refusal::NoLeader),
        _ => None,
    }
}

/// A coordinator address must be `HOST:PORT` (an IPv6 host in brackets).
pub fn check_address(addr: &str) -> Result<(), String> {
    let bad = || format!("expected HOST:PORT, got {addr:?}");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && !host.contains(['/', ' ', '\t', '@'])
        && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')));
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(()),
        _ => Err(bad()),
    }
}

/// Addresses as given on a command line or in a file: each item may hold
/// several separated by commas. Trimmed, checked, duplicates dropped (first
/// kept); at least one.
pub fn parse_addresses<S: AsRef<str>>(items: &[S]) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for item in items {
        for a in item.as_ref().split(',').map(str::trim) {
            check_address(a)?;
            if !out.iter().any(|x| x == a) {
                out.push(a.to_string());
            }
        }
    }
    if out.is_empty() {
        return Err("expected at least one HOST:PORT, got none".into());
    }
    Ok(out)
}

/// Which coordinator address to try next (pure: no I/O, no clock).
#[derive(Debug, Clone)]
pub struct Coordinators {
    configured: Vec<String>,
    /// The last address that answered as the leader; tried first.
    leader: Option<String>,
    /// The addresses this pass has still to try, in order.
    pass: VecDeque<String>,
    attempts: usize,
}

impl Coordinators {
    /// `configured` must not be empty (see [`parse_addresses`]).
    pub fn new(configured: Vec<String>) -> Coordinators {
        assert!(!configured.is_empty(), "at least one coordinator address");
        let mut c = Coordinators { configured, leader: None, pass: VecDeque::new(), attempts: 0 };
        c.new_pass();
        c
    }

    pub fn configured(&self) -> &[String] {
        &self.configured
    }

    /// The last address that answered as the leader.
    pub fn leader(&self) -> Option<&str> {
        self.leader.as_deref()
    }

    /// The next address of this pass; `None` when the pass is over (wait the
    /// backoff, then [`Coordinators::new_pass`]).
    pub fn next_address(&mut self) -> Option<String> {
        if self.attempts >= self.max_attempts() {
            return None;
        }
        let addr = self.pass.pop_front()?;
        self.attempts += 1;
        Some(addr)
    }

    /// Starts a pass: the last leader first, then the configured addresses in order.
    pub fn new_pass(&mut self) {
        self.pass = self.leader.iter().chain(&self.configured).cloned().collect();
        let mut seen = Vec::new();
        self.pass.retain(|a| {
            let first = !seen.contains(a);
            seen.push(a.clone());
            first
        });
        self.attempts = 0;
    }

    /// A follower named the leader: it is tried next, in this pass.
    pub fn follow(&mut self, leader: &str) {
        self.pass.retain(|a| a != leader);
        self.pass.push_front(leader.to_string());
    }

    /// `addr` answered as the leader: remembered for the next pass.
    pub fn found(&mut self, addr: &str) {
        self.leader = Some(addr.to_string());
    }

    /// Hints may name an address twice (a leader that changed while we
    /// moved); twice the list, plus one, bounds a pass.
    fn max_attempts(&self) -> usize {
        2 * self.configured.len() + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn pass(c: &mut Coordinators) -> Vec<String> {
        std::iter::from_fn(|| c.next_address()).collect()
    }

    #[test]
    fn a_pass_tries_every_address_in_order_then_ends() {
        let mut c = Coordinators::new(addrs(&["a:1", "b:2", "c:3"]));
        assert_eq!(pass(&mut c), addrs(&["a:1", "b:2", "c:3"]));
        assert_eq!(c.next_address(), None, "the pass is over until a new one starts");
        c.new_pass();
        assert_eq!(pass(&mut c), addrs(&["a:1", "b:2", "c:3"]));
    }

    #[test]
    fn a_hint_is_tried_at_once_and_the_found_leader_leads_the_next_pass() {
        let mut c = Coordinators::new(addrs(&["a:1", "b:2", "c:3"]));
        assert_eq!(c.next_address().as_deref(), Some("a:1"));
        c.follow("c:3");
        assert_eq!(c.next_address().as_deref(), Some("c:3"), "the hinted leader comes next, not b");
        c.found("c:3");
        assert_eq!(c.leader(), Some("c:3"));
        c.new_pass();
        assert_eq!(pass(&mut c), addrs(&["c:3", "a:1", "b:2"]));
    }

    #[test]
    fn a_hint_outside_the_list_is_tried_and_remembered_only_once_it_answers() {
        let mut c = Coordinators::new(addrs(&["a:1", "b:2"]));
        assert_eq!(c.next_address().as_deref(), Some("a:1"));
        c.follow("z:9");
        assert_eq!(c.next_address().as_deref(), Some("z:9"));
        // It did not answer: the list goes on, and the next pass ignores it.
        assert_eq!(pass(&mut c), addrs(&["b:2"]));
        c.new_pass();
        assert_eq!(pass(&mut c), addrs(&["a:1", "b:2"]));
        c.found("z:9");
        c.new_pass();
        assert_eq!(pass(&mut c), addrs(&["z:9", "a:1", "b:2"]));
    }

    #[test]
    fn followers_naming_each_other_cannot_spin_without_a_backoff() {
        let mut c = Coordinators::new(addrs(&["a:1", "b:2"]));
        let mut tried = Vec::new();
        while let Some(a) = c.next_address() {
            tried.push(a.clone());
            c.follow(if a == "a:1" { "b:2" } else { "a:1" });
        }
        assert_eq!(tried.len(), 5, "{tried:?}");
    }

    #[test]
    fn addresses_are_host_port_and_lists_split_on_commas() {
        assert_eq!(parse_addresses(&["a:1, b:2", "a:1", "[::1]:7443"]).unwrap(), addrs(&["a:1", "b:2", "[::1]:7443"]));
        for bad in ["nohost", "h:", ":80", "h:0", "h:99999", "http://h:80", "h :1", "::1:80", "a:1,,b:2"] {
            let e = parse_addresses(&[bad]).unwrap_err();
            assert!(e.starts_with("expected HOST:PORT, got "), "{bad}: {e}");
        }
        assert_eq!(parse_addresses::<&str>(&[]).unwrap_err(), "expected at least one HOST:PORT, got none");
    }

    #[test]
    fn a_follower_refusal_names_the_leader_or_none() {
        let s = follower_status("rekeyd-2", Some("10.0.0.1:7443"));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(s.message(), "this coordinator (rekeyd-2) is a follower; the leader is at 10.0.0.1:7443");
        assert_eq!(refusal(&s), Some(Refusal::Leader("10.0.0.1:7443".into())));
        assert_eq!(refusal(&follower_status("rekeyd-2", None)), Some(Refusal::NoLeader));
        // A plain transport failure is not a refusal; a garbled hint is no hint.
        assert_eq!(refusal(&tonic::Status::unavailable("connection refused")), None);
        let mut s = tonic::Status::unavailable("x");
        s.metadata_mut().insert(LEADER_METADATA, "not an address".parse().unwrap());
        assert_eq!(refusal(&s), Some(Refusal::NoLeader));
        let mut s = tonic::Status::permission_denied("this coordinator (x) is a follower");
        s.metadata_mut().insert(LEADER_METADATA, "a:1".parse().unwrap());
        assert_eq!(refusal(&s), None, "only UNAVAILABLE is a refusal");
    }
}
