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
//! is lost, so the provider finds what appeared since the intent and revokes
//! it in the provider's own order — deactivated first where the API refuses
//! to delete an active key, then deleted (its secret is unrecoverable, so it
//! cannot be adopted) — before creating exactly one again. A revocation that
//! fails halfway (deactivated, not deleted) is finished by the next replay.
//!
//! [`create_once`] is that procedure, written once for every provider whose
//! versions live at an external API and can be listed ([`External`]: `command`,
//! `http`, `aws-iam`). It is what keeps "no second new key after a crash"
//! true; `vault` writes a value it chose itself and replays it instead.

use crate::{CreateRequest, Fields, NewVersion, ProviderError, ProviderState, VersionInfo};
use async_trait::async_trait;
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

/// A provider whose versions are made by an external call (an API, a
/// command) and can usually be listed: what [`create_once`] needs from it.
#[async_trait]
pub trait External: Sync {
    /// What a version is called in notes and logs ("key", "access key").
    const NOUN: &'static str;

    fn journal(&self) -> Journal<'_>;

    /// The versions that exist now; `None` when the provider cannot list them.
    async fn versions(&self) -> Result<Option<Vec<VersionInfo>>, ProviderError>;

    /// Revokes a version an interrupted attempt created, as listed (with its
    /// status), in the provider's revoke order; one already gone is fine.
    async fn delete_orphan(&self, orphan: &VersionInfo) -> Result<(), ProviderError>;

    /// The external call: the new version and notes about it. `replay`: an
    /// earlier attempt of this rotation was interrupted before its answer was
    /// recorded (what could be listed of it is deleted already).
    async fn create_new(&self, req: &CreateRequest, replay: bool) -> Result<(Created, Vec<String>), ProviderError>;

    /// The versions to record as existing before the external call, and notes
    /// on what was done to make room. `current`: the list taken before the
    /// replay check, without the orphans deleted since. By default the
    /// provider lists again.
    async fn before_create(
        &self,
        req: &CreateRequest,
        current: Option<Vec<VersionInfo>>,
    ) -> Result<(Vec<String>, Vec<String>), ProviderError> {
        let _ = (req, current);
        Ok((ids(self.versions().await?.unwrap_or_default()), vec![]))
    }

    /// How an orphan is named in the note saying it was deleted.
    fn orphan_name(&self, id: &str) -> String {
        format!("{} {id}", Self::NOUN)
    }

    /// The note for a replay when the provider cannot list what an
    /// interrupted attempt may have left.
    fn unlisted_orphan_note(&self) -> Option<String> {
        None
    }
}

fn ids(versions: Vec<VersionInfo>) -> Vec<String> {
    versions.into_iter().map(|v| v.id).collect()
}

/// `create`, idempotent per rotation id across crashes: the version already
/// recorded for `req.rotation_id` if it still exists; otherwise (after
/// deleting what an interrupted attempt left) intent recorded, external call,
/// result recorded.
pub async fn create_once<P: External>(p: &P, req: &CreateRequest) -> Result<NewVersion, ProviderError> {
    let journal = p.journal();
    journal.forget_others(&req.rotation_id)?;
    let mut notes = Vec::new();
    let mut replay = false;
    let mut listed = p.versions().await?;
    if let Some(a) = journal.load(&req.rotation_id)? {
        notes = a.notes.clone();
        if let Some(c) = &a.created {
            let gone = listed.as_ref().is_some_and(|l| !l.iter().any(|v| v.id == c.id));
            if !gone {
                return Ok(NewVersion { id: c.id.clone(), fields: c.fields(), notes });
            }
            notes.push(format!(
                "{} {} created by an earlier attempt of this rotation no longer exists; creating another",
                P::NOUN,
                c.id
            ));
        } else {
            replay = true;
            delete_orphans(p, &a, listed.as_mut(), &mut notes).await?;
        }
    }
    let (existing, room) = p.before_create(req, listed).await?;
    notes.extend(room);
    let mut attempt =
        Attempt { rotation_id: req.rotation_id.clone(), existing, planned: None, notes: notes.clone(), created: None };
    journal.save(&attempt)?;
    let (created, more) = p.create_new(req, replay).await?;
    notes.extend(more);
    attempt.notes = notes.clone();
    attempt.created = Some(created.clone());
    journal.save(&attempt)?;
    Ok(NewVersion { id: created.id.clone(), fields: created.fields(), notes })
}

/// Deletes every listed version the interrupted attempt `a` did not see
/// before its call (its secret was never recorded), and drops it from `listed`.
async fn delete_orphans<P: External>(
    p: &P,
    a: &Attempt,
    listed: Option<&mut Vec<VersionInfo>>,
    notes: &mut Vec<String>,
) -> Result<(), ProviderError> {
    let Some(listed) = listed else {
        notes.extend(p.unlisted_orphan_note());
        return Ok(());
    };
    for v in listed.iter().filter(|v| !a.existing.contains(&v.id)) {
        p.delete_orphan(v).await?;
        let name = p.orphan_name(&v.id);
        tracing::warn!("deleted {name} orphaned by an interrupted create");
        notes.push(format!(
            "deleted {name}: created by an interrupted attempt of this rotation, its secret was never recorded"
        ));
    }
    listed.retain(|v| a.existing.contains(&v.id));
    Ok(())
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

    /// An external API in memory: `lose_answer` makes the next create
    /// succeed at the API but fail before its answer is recorded.
    struct Api {
        state: Mem,
        keys: std::sync::Mutex<Vec<VersionInfo>>,
        listable: bool,
        lose_answer: std::sync::atomic::AtomicBool,
        replays: std::sync::Mutex<Vec<bool>>,
    }

    impl Api {
        fn new(listable: bool) -> Api {
            Api {
                state: Mem::default(),
                keys: Default::default(),
                listable,
                lose_answer: false.into(),
                replays: Default::default(),
            }
        }
        fn ids(&self) -> Vec<String> {
            self.keys.lock().unwrap().iter().map(|v| v.id.clone()).collect()
        }
    }

    #[async_trait]
    impl External for Api {
        const NOUN: &'static str = "key";
        fn journal(&self) -> Journal<'_> {
            Journal { provider: "t", state: &self.state }
        }
        async fn versions(&self) -> Result<Option<Vec<VersionInfo>>, ProviderError> {
            Ok(self.listable.then(|| self.keys.lock().unwrap().clone()))
        }
        async fn delete_orphan(&self, orphan: &VersionInfo) -> Result<(), ProviderError> {
            self.keys.lock().unwrap().retain(|v| v.id != orphan.id);
            Ok(())
        }
        fn unlisted_orphan_note(&self) -> Option<String> {
            Some("cannot see".into())
        }
        async fn create_new(&self, _: &CreateRequest, replay: bool) -> Result<(Created, Vec<String>), ProviderError> {
            let mut replays = self.replays.lock().unwrap();
            replays.push(replay);
            let id = format!("k{}", replays.len());
            let mut keys = self.keys.lock().unwrap();
            keys.push(VersionInfo { id: id.clone(), status: crate::VersionStatus::Active, created_unix: None });
            if self.lose_answer.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Err(ProviderError::State { provider: "t", message: "crashed".into() });
            }
            Ok((
                Created {
                    id: id.clone(),
                    fields: vec![("value".into(), format!("secret-of-{id}"))],
                    created_unix: None,
                },
                vec![],
            ))
        }
    }

    fn req(rotation: &str) -> CreateRequest {
        CreateRequest { secret: "s".into(), rotation_id: rotation.into(), previous_version: None }
    }

    #[tokio::test]
    async fn a_recorded_version_is_returned_again_and_nothing_is_created() {
        let api = Api::new(true);
        let v = create_once(&api, &req("rot-1")).await.unwrap();
        let again = create_once(&api, &req("rot-1")).await.unwrap();
        assert_eq!((again.id.as_str(), again.fields["value"].expose()), (v.id.as_str(), &b"secret-of-k1"[..]));
        assert_eq!(api.ids(), ["k1"]);
        assert_eq!(*api.replays.lock().unwrap(), [false]);
    }

    #[tokio::test]
    async fn a_lost_answer_is_replayed_without_a_second_new_version() {
        let api = Api::new(true);
        create_once(&api, &req("rot-0")).await.unwrap();
        api.lose_answer.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(create_once(&api, &req("rot-1")).await.is_err());
        assert_eq!(api.ids(), ["k1", "k2"], "the lost call created a key");
        let v = create_once(&api, &req("rot-1")).await.unwrap();
        assert_eq!(api.ids(), ["k1", "k3"], "the orphan is gone, one new key");
        assert_eq!(v.id, "k3");
        assert_eq!(
            v.notes,
            ["deleted key k2: created by an interrupted attempt of this rotation, its secret was never recorded"]
        );
        assert_eq!(*api.replays.lock().unwrap(), [false, false, true]);
        // The record names what existed before the call that succeeded.
        assert_eq!(api.journal().load("rot-1").unwrap().unwrap().existing, ["k1"]);
    }

    #[tokio::test]
    async fn a_recorded_version_deleted_since_is_made_again_and_said_so() {
        let api = Api::new(true);
        create_once(&api, &req("rot-1")).await.unwrap();
        api.keys.lock().unwrap().clear();
        let v = create_once(&api, &req("rot-1")).await.unwrap();
        assert_eq!(v.id, "k2");
        assert_eq!(
            v.notes,
            ["key k1 created by an earlier attempt of this rotation no longer exists; creating another"]
        );
    }

    #[tokio::test]
    async fn without_a_list_the_recorded_version_is_trusted_and_a_replay_is_noted() {
        let api = Api::new(false);
        let v = create_once(&api, &req("rot-1")).await.unwrap();
        assert_eq!(create_once(&api, &req("rot-1")).await.unwrap().id, v.id);
        api.lose_answer.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(create_once(&api, &req("rot-2")).await.is_err());
        let v2 = create_once(&api, &req("rot-2")).await.unwrap();
        assert_eq!(v2.notes, ["cannot see"]);
        assert_eq!(*api.replays.lock().unwrap(), [false, false, true]);
    }
}
