//! The rollout planner: pure, deterministic, no I/O.
//!
//! A rollout is a list of waves. Selector waves (`{ selector = { env =
//! "staging" } }`) go first, in the order given: each takes every target
//! whose labels match and that no earlier selector wave took (first match
//! wins). Size waves (`3`, `"25%"`) then split the targets no selector wave
//! took (the *pool*): each is the cumulative share of the pool reached once
//! it is done, percentages rounded down with at least one new host per wave
//! (Ansible's `serial` rule). Hosts left after the last entry form a final
//! wave. The canary is the first `canary` hosts of that order, alone in wave 0.
//!
//! Hosts are taken in the *natural order* of their names ([`natural_cmp`]):
//! runs of digits compare as numbers, so `h2` comes before `h10` and wave 0
//! of `h1..h250` is `h1, h2, h3`, not `h1, h10, h100`.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// Natural order of host names: runs of ASCII digits compare by numeric
/// value (`h2 < h10`, `web9.b < web10.a`), everything else byte by byte.
/// Names equal in that order (`h02` and `h2`) fall back to plain string
/// order, so the order is total and `Equal` only for equal names.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    while let (Some(&cx), Some(&cy)) = (x.first(), y.first()) {
        let ord = if cx.is_ascii_digit() && cy.is_ascii_digit() {
            let (dx, rx) = split_digits(x);
            let (dy, ry) = split_digits(y);
            (x, y) = (rx, ry);
            compare_numbers(dx, dy)
        } else {
            (x, y) = (&x[1..], &y[1..]);
            cx.cmp(&cy)
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    x.len().cmp(&y.len()).then_with(|| a.cmp(b))
}

fn split_digits(s: &[u8]) -> (&[u8], &[u8]) {
    let n = s.iter().take_while(|c| c.is_ascii_digit()).count();
    s.split_at(n)
}

/// Compares two digit runs by value without parsing (any length works).
fn compare_numbers(a: &[u8], b: &[u8]) -> Ordering {
    let a = &a[a.iter().take_while(|&&c| c == b'0').count()..];
    let b = &b[b.iter().take_while(|&&c| c == b'0').count()..];
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// A size given as a count of hosts or a percentage of the targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    Count(usize),
    Percent(u32),
}

impl Amount {
    /// Parses `3` or `"25%"`.
    pub fn parse(s: &str) -> Result<Amount, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let p: u32 = p.trim().parse().map_err(|_| format!("invalid percentage {s:?}"))?;
            if p > 100 {
                return Err(format!("percentage {s:?} is over 100%"));
            }
            Ok(Amount::Percent(p))
        } else {
            s.parse()
                .map(Amount::Count)
                .map_err(|_| format!("expected a host count or a percentage like \"25%\", got {s:?}"))
        }
    }

    /// Hosts this amount means out of `total` as a cumulative wave size:
    /// percentages round down (25% of 30 is 7); the planner then gives every
    /// wave at least one new host, as Ansible's `serial` does.
    pub fn resolve_wave(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n.min(total),
            Amount::Percent(p) => total * p as usize / 100,
        }
    }

    /// Hosts this amount means out of `total`, rounding percentages down
    /// (for failure budgets: 10% of 5 hosts tolerates 0 failures).
    pub fn resolve_down(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n,
            Amount::Percent(p) => total * p as usize / 100,
        }
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// A wave chosen by labels: every target carrying all of them (that no
/// earlier selector wave took).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectorWave {
    pub selector: BTreeMap<String, String>,
    /// Once this wave is confirmed, the rollout pauses until an operator's
    /// `rekey rotate resume`.
    #[serde(default)]
    pub pause_after: bool,
}

impl SelectorWave {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// `env=staging,tier=web`.
    pub fn describe(&self) -> String {
        self.selector.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    }
}

/// A host the rollout may reach, with the labels it enrolled with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// The waves of one rotation, in delivery order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Host names per wave; wave 0 is the canary when there is one.
    pub waves: Vec<Vec<String>>,
    /// What chose each wave: `canary`, `env=staging`, `25%`, `3`, `rest`.
    pub kinds: Vec<String>,
    /// Waves (indices into `waves`) after which the rollout pauses for an
    /// operator; never the last wave (nothing is left to hold back).
    pub pause_after: Vec<usize>,
    /// Selector waves that matched no target (skipped).
    pub empty: Vec<String>,
}

/// One wave before the canary is carved out.
struct Group {
    hosts: Vec<String>,
    kind: String,
    pause_after: bool,
}

/// Selector waves take their matching hosts (first match wins); returns the
/// groups and the hosts left for the size waves, both in natural name order.
fn selector_groups(hosts: Vec<Target>, stages: &[SelectorWave], empty: &mut Vec<String>) -> (Vec<Group>, Vec<String>) {
    let mut groups: Vec<Group> =
        stages.iter().map(|s| Group { hosts: Vec::new(), kind: s.describe(), pause_after: s.pause_after }).collect();
    let mut pool = Vec::new();
    for t in hosts {
        match stages.iter().position(|s| s.matches(&t.labels)) {
            Some(i) => groups[i].hosts.push(t.name),
            None => pool.push(t.name),
        }
    }
    empty.extend(groups.iter().filter(|g| g.hosts.is_empty()).map(|g| g.kind.clone()));
    groups.retain(|g| !g.hosts.is_empty());
    (groups, pool)
}

/// Size waves over the pool, whose first `done` hosts are already in the
/// canary: cumulative, rounded down, at least one new host each.
fn size_groups(pool: &[String], mut done: usize, waves: &[Amount]) -> Vec<Group> {
    let total = pool.len();
    let mut out = Vec::new();
    for w in waves {
        let upto = w.resolve_wave(total).max(done + 1).min(total);
        if upto > done {
            out.push(Group { hosts: pool[done..upto].to_vec(), kind: w.to_string(), pause_after: false });
            done = upto;
        }
    }
    if done < total {
        out.push(Group { hosts: pool[done..].to_vec(), kind: "rest".into(), pause_after: false });
    }
    out
}

/// Splits `targets` (in the natural order of their names, for determinism)
/// into waves; see the module documentation for the rules.
pub fn plan_waves(targets: &[Target], canary: usize, stages: &[SelectorWave], waves: &[Amount]) -> Plan {
    let mut hosts: Vec<Target> = targets.to_vec();
    hosts.sort_by(|a, b| natural_cmp(&a.name, &b.name));
    hosts.dedup_by(|a, b| a.name == b.name);
    let mut plan = Plan::default();
    let (mut groups, pool) = selector_groups(hosts, stages, &mut plan.empty);
    // The canary: the first `canary` hosts in delivery order, alone in wave
    // 0 — but never past a wave that pauses (staging stays ahead of production).
    let mut canary_hosts = Vec::new();
    let mut canary_pauses = false;
    for g in groups.iter_mut() {
        let take = canary.saturating_sub(canary_hosts.len()).min(g.hosts.len());
        canary_hosts.extend(g.hosts.drain(..take));
        if g.hosts.is_empty() && g.pause_after {
            // The canary took the whole wave: the pause follows the canary.
            canary_pauses = true;
            break;
        }
    }
    let from_pool = if canary_pauses { 0 } else { canary.saturating_sub(canary_hosts.len()).min(pool.len()) };
    canary_hosts.extend(pool[..from_pool].iter().cloned());
    groups.extend(size_groups(&pool, from_pool, waves));
    if !canary_hosts.is_empty() {
        groups.insert(0, Group { hosts: canary_hosts, kind: "canary".into(), pause_after: canary_pauses });
    }
    groups.retain(|g| !g.hosts.is_empty());
    let last = groups.len().saturating_sub(1);
    for (i, g) in groups.into_iter().enumerate() {
        if g.pause_after && i < last {
            plan.pause_after.push(i);
        }
        plan.waves.push(g.hosts);
        plan.kinds.push(g.kind);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("h{i:02}")).collect()
    }

    fn targets(n: usize) -> Vec<Target> {
        names(n).into_iter().map(|name| Target { name, labels: BTreeMap::new() }).collect()
    }

    /// Hosts h00.. with `env=staging` on every `every`th host, `env=prod` on the others.
    fn labelled(n: usize, every: usize) -> Vec<Target> {
        names(n)
            .into_iter()
            .enumerate()
            .map(|(i, name)| {
                let env = if i % every == 0 { "staging" } else { "prod" };
                Target { name, labels: BTreeMap::from([("env".to_string(), env.to_string())]) }
            })
            .collect()
    }

    fn staging(pause_after: bool) -> SelectorWave {
        SelectorWave { selector: BTreeMap::from([("env".into(), "staging".into())]), pause_after }
    }

    fn sizes(p: &Plan) -> Vec<usize> {
        p.waves.iter().map(Vec::len).collect()
    }

    #[test]
    fn canary_then_cumulative_waves() {
        let p = plan_waves(&targets(10), 1, &[], &[Amount::Percent(50), Amount::Percent(100)]);
        assert_eq!(sizes(&p), vec![1, 4, 5]);
        assert_eq!(p.kinds, vec!["canary", "50%", "100%"]);
        let p = plan_waves(&targets(5), 1, &[], &[Amount::Count(3)]);
        assert_eq!(sizes(&p), vec![1, 2, 2]);
        assert_eq!(p.kinds, vec!["canary", "3", "rest"]);
        assert!(plan_waves(&[], 1, &[], &[Amount::Percent(100)]).waves.is_empty());
        assert_eq!(plan_waves(&targets(3), 0, &[], &[]).waves, vec![names(3)]);
    }

    /// Ansible's `serial` rule: a percentage rounds down, and every wave gets
    /// at least one host. 25% steps over 30 hosts are 7, 8, 7, 8 (they were
    /// 8, 7, 8, 7 when percentages rounded up).
    #[test]
    fn percentages_round_down_with_at_least_one_host() {
        let quarters = [Amount::Percent(25), Amount::Percent(50), Amount::Percent(75), Amount::Percent(100)];
        assert_eq!(sizes(&plan_waves(&targets(30), 0, &[], &quarters)), vec![7, 8, 7, 8]);
        // 10% of 5 is 0: the wave still takes one host, then 20% (1) another.
        let small = [Amount::Percent(10), Amount::Percent(20), Amount::Percent(100)];
        assert_eq!(sizes(&plan_waves(&targets(5), 0, &[], &small)), vec![1, 1, 3]);
        assert_eq!(sizes(&plan_waves(&targets(30), 0, &[], &[Amount::Percent(25)])), vec![7, 23]);
    }

    #[test]
    fn amounts_parse_and_round() {
        assert_eq!(Amount::parse("25%").unwrap(), Amount::Percent(25));
        assert_eq!(Amount::parse("3").unwrap(), Amount::Count(3));
        assert!(Amount::parse("150%").is_err());
        assert!(Amount::parse("many").is_err());
        assert_eq!(Amount::Percent(25).resolve_wave(30), 7);
        assert_eq!(Amount::Count(40).resolve_wave(30), 30);
        assert_eq!(Amount::Percent(10).resolve_down(5), 0);
    }

    #[test]
    fn a_selector_wave_takes_every_matching_host_first_and_pauses_after() {
        // 12 hosts, h00 h04 h08 staging; canary 1 comes out of the staging wave.
        let p = plan_waves(&labelled(12, 4), 1, &[staging(true)], &[Amount::Percent(25), Amount::Percent(100)]);
        assert_eq!(p.waves[0], vec!["h00"]);
        assert_eq!(p.waves[1], vec!["h04", "h08"]);
        assert_eq!(p.kinds, vec!["canary", "env=staging", "25%", "100%"]);
        // Percentages apply to the 9 production hosts: 25% → 2, then 7.
        assert_eq!(sizes(&p), vec![1, 2, 2, 7]);
        assert!(p.waves[2..].iter().flatten().all(|h| !["h00", "h04", "h08"].contains(&h.as_str())));
        assert_eq!(p.pause_after, vec![1], "paused once staging is confirmed, before production");
    }

    #[test]
    fn the_canary_never_reaches_past_a_pausing_wave() {
        // One staging host, canary 2: the canary is that host alone, and the pause follows it.
        let p = plan_waves(&labelled(6, 6), 2, &[staging(true)], &[Amount::Percent(100)]);
        assert_eq!(p.waves, vec![vec!["h00".to_string()], names(6)[1..].to_vec()]);
        assert_eq!(p.pause_after, vec![0]);
        // Without the pause the canary takes its two hosts in delivery order.
        let p = plan_waves(&labelled(6, 6), 2, &[staging(false)], &[Amount::Percent(100)]);
        assert_eq!(sizes(&p), vec![2, 4]);
        assert!(p.pause_after.is_empty());
    }

    #[test]
    fn first_matching_selector_wave_wins_and_empty_ones_are_named() {
        let ring0 = SelectorWave { selector: BTreeMap::from([("env".into(), "staging".into())]), pause_after: false };
        let none = SelectorWave { selector: BTreeMap::from([("env".into(), "qa".into())]), pause_after: true };
        // Every host is staging: the second staging wave and the qa wave get nothing.
        let all_staging = labelled(4, 1);
        let p = plan_waves(&all_staging, 0, &[ring0.clone(), staging(true), none], &[Amount::Percent(100)]);
        assert_eq!(p.waves, vec![names(4)]);
        assert_eq!(p.empty, vec!["env=staging", "env=qa"]);
        assert!(p.pause_after.is_empty(), "a pause after the last wave holds nothing back");
    }

    #[test]
    fn hosts_are_taken_in_natural_name_order() {
        let hosts: Vec<Target> = ["h10", "h1", "h100", "h2", "h11", "h3"]
            .iter()
            .map(|n| Target { name: n.to_string(), labels: BTreeMap::new() })
            .collect();
        let p = plan_waves(&hosts, 1, &[], &[Amount::Percent(50), Amount::Percent(100)]);
        assert_eq!(p.waves, vec![vec!["h1"], vec!["h2", "h3"], vec!["h10", "h11", "h100"]]);
    }

    #[test]
    fn natural_order_compares_digit_runs_by_value() {
        let mut v = vec![
            "web10.b",
            "web9.z",
            "web10.a",
            "db",
            "h02",
            "h2",
            "h1",
            "a99999999999999999999999",
            "a100000000000000000000000",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            vec![
                "a99999999999999999999999",
                "a100000000000000000000000",
                "db",
                "h1",
                "h02",
                "h2",
                "web9.z",
                "web10.a",
                "web10.b"
            ]
        );
        assert_eq!(natural_cmp("h2", "h2"), Ordering::Equal);
        assert_eq!(natural_cmp("h", "h1"), Ordering::Less);
    }

    fn amount() -> impl Strategy<Value = Amount> {
        prop_oneof![(1usize..70).prop_map(Amount::Count), (1u32..=100).prop_map(Amount::Percent)]
    }

    proptest! {
        /// The natural order is a total order: antisymmetric, transitive, and
        /// `Equal` only for equal names.
        #[test]
        fn natural_order_is_total(mut v in proptest::collection::vec("[a0-2.]{0,6}", 0..30)) {
            v.sort_by(|a, b| natural_cmp(a, b));
            for w in v.windows(2) {
                prop_assert_ne!(natural_cmp(&w[0], &w[1]), Ordering::Greater);
                prop_assert_eq!(natural_cmp(&w[1], &w[0]), natural_cmp(&w[0], &w[1]).reverse());
                prop_assert_eq!(natural_cmp(&w[0], &w[1]) == Ordering::Equal, w[0] == w[1]);
            }
            for a in &v { for b in &v { for c in &v {
                if natural_cmp(a, b) != Ordering::Greater && natural_cmp(b, c) != Ordering::Greater {
                    prop_assert_ne!(natural_cmp(a, c), Ordering::Greater);
                }
            }}}
        }

        /// Every target is in exactly one wave, none is empty, the canary comes first.
        #[test]
        fn waves_partition_the_targets(n in 0usize..60, canary in 0usize..5,
                                       ws in proptest::collection::vec(amount(), 0..5)) {
            let t = targets(n);
            let p = plan_waves(&t, canary, &[], &ws);
            let flat: Vec<String> = p.waves.iter().flatten().cloned().collect();
            prop_assert_eq!(flat, names(n));
            prop_assert!(p.waves.iter().all(|w| !w.is_empty()));
            if canary > 0 && n > 0 { prop_assert_eq!(p.waves[0].len(), canary.min(n)); }
        }

        /// After the canary, each size wave ends at max(floor(share), previous
        /// end + 1), capped at the targets: the rounding rule, wave by wave.
        #[test]
        fn wave_sizes_follow_the_floor_rule(n in 1usize..80, canary in 0usize..4,
                                            ws in proptest::collection::vec(amount(), 1..5)) {
            let p = plan_waves(&targets(n), canary, &[], &ws);
            let mut done = canary.min(n);
            let mut expect = if done > 0 { vec![done] } else { Vec::new() };
            for w in &ws {
                let end = match w { Amount::Count(c) => *c, Amount::Percent(q) => n * *q as usize / 100 };
                let end = end.max(done + 1).min(n);
                if end > done { expect.push(end - done); done = end; }
            }
            if done < n { expect.push(n - done); }
            prop_assert_eq!(sizes(&p), expect);
        }

        /// With selector waves: every host in exactly one wave; a host in a
        /// selector wave matches it and no earlier one; size waves hold no
        /// host any selector wave matches.
        #[test]
        fn selector_waves_partition_and_first_match_wins(n in 0usize..40, every in 1usize..5, canary in 0usize..3,
                                                         pause in any::<bool>(), ws in proptest::collection::vec(amount(), 0..3)) {
            let t = labelled(n, every);
            let prod = SelectorWave { selector: BTreeMap::from([("env".into(), "prod".into())]), pause_after: false };
            let p = plan_waves(&t, canary, &[staging(pause), prod], &ws);
            let mut flat: Vec<String> = p.waves.iter().flatten().cloned().collect();
            flat.sort();
            prop_assert_eq!(flat, names(n));
            prop_assert!(p.waves.iter().all(|w| !w.is_empty()));
            let is_staging = |h: &str| t.iter().any(|x| x.name == h && x.labels["env"] == "staging");
            // Delivery order: every staging host before any production host.
            let order: Vec<bool> = p.waves.iter().flatten().map(|h| is_staging(h)).collect();
            prop_assert!(order.windows(2).all(|w| w[0] || !w[1]), "{:?}", p.waves);
            for &i in &p.pause_after {
                prop_assert!(i + 1 < p.waves.len());
                prop_assert!(p.waves[..=i].iter().flatten().all(|h| is_staging(h)));
                prop_assert!(p.waves[i + 1..].iter().flatten().all(|h| !is_staging(h)));
            }
            prop_assert_eq!(p.kinds.len(), p.waves.len());
        }
    }
}
