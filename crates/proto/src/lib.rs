//! The rekey wire protocol: `rekey.v1.AgentService` (enrollment and the agent's
//! live session) and `rekey.v1.AdminService` (the operator CLI), generated at
//! build time from `proto/rekey/v1/` with protox — no system `protoc`.
//!
//! Owns no tasks. The only hand-written code is the redacting `Debug` of
//! [`v1::SecretField`], the one message that carries secret bytes, and the
//! rules of a scope scan both sides apply ([`scan`]).

/// Version of the agent protocol. Bumped on any incompatible change; a peer
/// speaking another version is refused with both numbers in the error.
pub const PROTOCOL_VERSION: u32 = 1;

/// gRPC metadata key carrying the client's protocol version on admin calls.
pub const PROTOCOL_HEADER: &str = "rekey-protocol-version";

pub mod scan;

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("rekey.v1");

    impl std::fmt::Debug for SecretField {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("SecretField")
                .field("name", &self.name)
                .field("value", &format_args!("<redacted {} bytes>", self.value.len()))
                .finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::v1::*;

    #[test]
    fn secret_field_debug_never_prints_the_value() {
        let d = Delivery {
            fields: vec![SecretField { name: "token".into(), value: b"hunter2-super-secret".to_vec() }],
            ..Default::default()
        };
        let s = format!("{d:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("redacted 20 bytes"), "{s}");
    }
}
