//! The audit log: append-only and hash-chained. Each record's hash covers the
//! previous record's hash and the record's own canonical JSON, so altering,
//! removing or reordering any record breaks every link after it.
//! Records name ids, hosts, fingerprints and operators — never secret values.

use serde::{Deserialize, Serialize};

/// Hash of the (virtual) record before the first one.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub at_ms: i64,
    /// `operator/NAME`, `agent/HOST`, or `rekeyd` for the engine itself.
    pub actor: String,
    pub action: String,
    pub details: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

/// An entry to append; seq, chain and hash are filled in by the store.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub actor: String,
    pub action: String,
    pub details: serde_json::Value,
}

impl AuditEntry {
    pub fn new(actor: impl Into<String>, action: impl Into<String>, details: serde_json::Value) -> Self {
        AuditEntry { actor: actor.into(), action: action.into(), details }
    }
}

/// The hash of a record given its predecessor's hash.
pub fn record_hash(seq: u64, at_ms: i64, actor: &str, action: &str, details: &serde_json::Value, prev: &str) -> String {
    // serde_json's Value keeps object keys sorted (no preserve_order feature):
    // a canonical encoding.
    let body = serde_json::json!({ "seq": seq, "at_ms": at_ms, "actor": actor, "action": action, "details": details });
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(prev.as_bytes());
    ctx.update(body.to_string().as_bytes());
    hex::encode(ctx.finish())
}

impl AuditRecord {
    pub fn seal(seq: u64, at_ms: i64, entry: AuditEntry, prev_hash: &str) -> AuditRecord {
        let hash = record_hash(seq, at_ms, &entry.actor, &entry.action, &entry.details, prev_hash);
        AuditRecord {
            seq,
            at_ms,
            actor: entry.actor,
            action: entry.action,
            details: entry.details,
            prev_hash: prev_hash.to_string(),
            hash,
        }
    }
}

/// Result of walking the chain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verification {
    pub records: u64,
    pub head: String,
    /// The first record whose link does not hold, and why.
    pub first_broken: Option<(u64, String)>,
}

/// Verifies records given in sequence order.
pub fn verify<'a>(records: impl IntoIterator<Item = &'a AuditRecord>) -> Verification {
    let mut prev = GENESIS.to_string();
    let mut n = 0;
    for (expected_seq, r) in (1u64..).zip(records) {
        n += 1;
        let problem = if r.seq != expected_seq {
            Some(format!("expected record {expected_seq}, found {} (a record was removed or reordered)", r.seq))
        } else if r.prev_hash != prev {
            Some("its link to the previous record does not match (a record before it was altered or removed)".into())
        } else if record_hash(r.seq, r.at_ms, &r.actor, &r.action, &r.details, &r.prev_hash) != r.hash {
            Some("its content does not match its hash (the record was altered)".into())
        } else {
            None
        };
        if let Some(p) = problem {
            return Verification { records: n, head: prev, first_broken: Some((r.seq, p)) };
        }
        prev = r.hash.clone();
    }
    Verification { records: n, head: prev, first_broken: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|i| {
                let r = AuditRecord::seal(
                    i,
                    i as i64,
                    AuditEntry::new("operator/admin", "rotation.start", serde_json::json!({"i": i})),
                    &prev,
                );
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies_and_any_alteration_is_located() {
        let c = chain(5);
        let v = verify(&c);
        assert_eq!((v.records, v.first_broken.clone()), (5, None));
        assert_eq!(v.head, c[4].hash);

        let mut altered = c.clone();
        altered[2].actor = "operator/mallory".into();
        assert_eq!(verify(&altered).first_broken.unwrap().0, 3);

        let mut removed = c.clone();
        removed.remove(1);
        assert_eq!(verify(&removed).first_broken.unwrap().0, 3);

        // Re-hashing the altered record does not help: the next link breaks.
        let mut rehashed = c.clone();
        rehashed[2].details = serde_json::json!({"i": 99});
        rehashed[2].hash =
            record_hash(3, 3, &rehashed[2].actor, &rehashed[2].action, &rehashed[2].details, &rehashed[2].prev_hash);
        assert_eq!(verify(&rehashed).first_broken.unwrap().0, 4);
    }
}
