//! The create journal the external providers keep in their [`ProviderState`]
//! so that `create` is idempotent per rotation id across a coordinator crash.
//!
//! One record per rotation, `create/<rotation id>`, written in two steps:
//! 1. **intent**, before the external call: the versions that existed before
//!    (and, where the provider generates the value itself, the value to write);
//! 2. **created**, right after the call returned: the new version's id and
//!    fields (the state store seals them).
//!
//! A replay finds either the created version (returned as is) or only the
//! intent: then the external call may or may not have happened and its answer
//! is lost, so the provider finds what appeared since the intent and deletes
//! it (its secret is unrecoverable) before creating again.

use crate::{Fields, ProviderError, ProviderState};
use rekey_common::secret::SecretBytes;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "create/";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Attempt {
    pub rotation_id: String,
    /// Version ids that existed before the external call.
    pub existing: Vec<String>,
    /// Fields chosen before the call (providers that generate the value).
    #[serde(default)]
    pub planned: Option<Vec<(String, String)>>,
    /// Notes gathered before the call (e.g. a stale key deleted), returned with the version.
    #[serde(default)]
    pub notes: Vec<String>,
    #[serde(default)]
    pub created: Option<Created>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Created {
    pub id: String,
    pub fields: Vec<(String, String)>,
    #[serde(default)]
    pub created_unix: Option<i64>,
}

impl Created {
    pub fn fields(&self) -> Fields {
        to_fields(&self.fields)
    }
}

pub fn to_fields(pairs: &[(String, String)]) -> Fields {
    pairs.iter().map(|(k, v)| (k.clone(), SecretBytes::new(v.as_bytes().to_vec()))).collect()
}

/// Fields as (name, UTF-8 value) pairs; a value that is not UTF-8 is refused.
pub fn from_fields(provider: &'static str, fields: &Fields) -> Result<Vec<(String, String)>, ProviderError> {
    fields
        .iter()
        .map(|(k, v)| {
            let s = std::str::from_utf8(v.expose())
                .map_err(|_| ProviderError::failed(provider, format!("field {k} is not UTF-8 text")))?;
            Ok((k.clone(), s.to_string()))
        })
        .collect()
}

pub struct Journal<'a> {
    pub provider: &'static str,
    pub state: &'a dyn ProviderState,
}

impl Journal<'_> {
    fn err(&self, message: String) -> ProviderError {
        ProviderError::State { provider: self.provider, message }
    }

    pub fn load(&self, rotation_id: &str) -> Result<Option<Attempt>, ProviderError> {
        let Some(raw) = self.state.get(&format!("{PREFIX}{rotation_id}")).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        serde_json::from_slice(raw.expose())
            .map(Some)
            .map_err(|e| self.err(format!("corrupt create record of {rotation_id}: {e}")))
    }

    pub fn save(&self, a: &Attempt) -> Result<(), ProviderError> {
        let json = SecretBytes::new(serde_json::to_vec(a).expect("serializable"));
        self.state.put(&format!("{PREFIX}{}", a.rotation_id), json.expose()).map_err(|e| self.err(e))
    }

    fn all(&self) -> Result<Vec<Attempt>, ProviderError> {
        let mut out = Vec::new();
        for k in self.state.keys().map_err(|e| self.err(e))? {
            if let Some(id) = k.strip_prefix(PREFIX)
                && let Some(a) = self.load(id)?
            {
                out.push(a);
            }
        }
        Ok(out)
    }

    /// Drops what other rotations left without a version: at most one
    /// rotation per secret is active, so their attempts are settled. Records
    /// of versions that exist stay until the version is deleted (so their
    /// values can be redacted from a command's or an API's output).
    pub fn forget_others(&self, rotation_id: &str) -> Result<(), ProviderError> {
        for a in self.all()? {
            if a.rotation_id != rotation_id && a.created.is_none() {
                self.state.remove(&format!("{PREFIX}{}", a.rotation_id)).map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }

    /// Drops the record of a deleted version (no copy of its value kept).
    pub fn forget_version(&self, version: &str) -> Result<(), ProviderError> {
        for a in self.all()? {
            if a.created.as_ref().is_some_and(|c| c.id == version) {
                self.state.remove(&format!("{PREFIX}{}", a.rotation_id)).map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }

    /// Every value this journal holds (to redact them from error output).
    pub fn known_values(&self) -> Vec<String> {
        let mut out = Vec::new();
        for a in self.all().unwrap_or_default() {
            out.extend(a.planned.iter().flatten().map(|(_, v)| v.clone()));
            out.extend(a.created.iter().flat_map(|c| c.fields.iter().map(|(_, v)| v.clone())));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Mem;

    #[test]
    fn records_roundtrip_and_are_forgotten() {
        let m = Mem::default();
        let j = Journal { provider: "t", state: &m };
        let mut a = Attempt {
            rotation_id: "rot-1".into(),
            existing: vec!["k0".into()],
            planned: None,
            notes: vec![],
            created: None,
        };
        j.save(&a).unwrap();
        assert_eq!(j.load("rot-1").unwrap().unwrap(), a);
        a.created = Some(Created { id: "k1".into(), fields: vec![("value".into(), "v".into())], created_unix: None });
        j.save(&a).unwrap();
        j.save(&Attempt { rotation_id: "rot-0".into(), created: None, ..a.clone() }).unwrap();
        j.forget_others("rot-2").unwrap();
        assert!(j.load("rot-0").unwrap().is_none(), "a settled attempt without a version is dropped");
        assert!(j.load("rot-1").unwrap().is_some(), "a live version's record stays");
        assert_eq!(j.known_values(), vec!["v".to_string()]);
        j.forget_version("k1").unwrap();
        assert!(j.load("rot-1").unwrap().is_none());
    }
}
