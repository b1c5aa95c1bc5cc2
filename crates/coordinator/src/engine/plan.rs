//! The rollout planner: pure, deterministic, no I/O.

use serde::{Deserialize, Serialize};

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

    /// Hosts this amount means out of `total`, rounding percentages up
    /// (for wave sizes: 10% of 5 hosts is 1 host, not 0).
    pub fn resolve_up(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n.min(total),
            Amount::Percent(p) => (total * p as usize).div_ceil(100),
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

/// Splits `targets` (sorted for determinism) into waves: wave 0 is the canary
/// (`canary` hosts, skipped when 0); each later entry of `waves` is the
/// *cumulative* share of all targets reached once that wave is done. Hosts
/// left after the last entry form a final wave, so every target is covered.
pub fn plan_waves(targets: &[String], canary: usize, waves: &[Amount]) -> Vec<Vec<String>> {
    let mut hosts: Vec<String> = targets.to_vec();
    hosts.sort();
    hosts.dedup();
    let total = hosts.len();
    let mut out = Vec::new();
    let mut done = canary.min(total);
    if done > 0 {
        out.push(hosts[..done].to_vec());
    }
    for w in waves {
        let upto = w.resolve_up(total).max(done);
        if upto > done {
            out.push(hosts[done..upto].to_vec());
            done = upto;
        }
    }
    if done < total {
        out.push(hosts[done..].to_vec());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("h{i:02}")).collect()
    }

    #[test]
    fn canary_then_cumulative_waves() {
        let p = plan_waves(&names(10), 1, &[Amount::Percent(50), Amount::Percent(100)]);
        assert_eq!(p.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 4, 5]);
        let p = plan_waves(&names(5), 1, &[Amount::Count(3)]);
        assert_eq!(p.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 2, 2]);
        assert!(plan_waves(&[], 1, &[Amount::Percent(100)]).is_empty());
        assert_eq!(plan_waves(&names(3), 0, &[]), vec![names(3)]);
    }

    #[test]
    fn amounts_parse_and_round() {
        assert_eq!(Amount::parse("25%").unwrap(), Amount::Percent(25));
        assert_eq!(Amount::parse("3").unwrap(), Amount::Count(3));
        assert!(Amount::parse("150%").is_err());
        assert!(Amount::parse("many").is_err());
        assert_eq!(Amount::Percent(10).resolve_up(5), 1);
        assert_eq!(Amount::Percent(10).resolve_down(5), 0);
    }

    proptest! {
        /// Every target is in exactly one wave, none is empty, the canary comes first.
        #[test]
        fn waves_partition_the_targets(n in 0usize..60, canary in 0usize..5,
                                       ws in proptest::collection::vec(prop_oneof![(0usize..70).prop_map(Amount::Count), (0u32..=100).prop_map(Amount::Percent)], 0..5)) {
            let t = names(n);
            let p = plan_waves(&t, canary, &ws);
            let flat: Vec<String> = p.iter().flatten().cloned().collect();
            prop_assert_eq!(flat, t);
            prop_assert!(p.iter().all(|w| !w.is_empty()));
            if canary > 0 && n > 0 { prop_assert_eq!(p[0].len(), canary.min(n)); }
        }
    }
}
