//! The simulated provider rekeyd's real engine calls: versions live in the
//! [`World`] (they outlive rekeyd's crashes, as a provider's do), `create`
//! goes through the real create journal ([`journal::create_once`]) in the
//! real sealed provider state, and every call may fail, hang, lose its
//! answer after acting, act twice, or have rekeyd crash right after acting.

use crate::world::{CallFault, Shared, Status, World};
use async_trait::async_trait;
use rekey_common::secret::SecretBytes;
use rekey_providers::journal::{self, Created, External, Journal};
use rekey_providers::{
    CreateRequest, Fields, NewVersion, Provider, ProviderError, ProviderState, VersionInfo, VersionStatus,
};
use std::sync::Arc;
use std::time::Duration;

const KIND: &str = "sim";
/// A hung call answers after this long (simulated).
const HANG: Duration = Duration::from_secs(90);

pub struct SimProvider {
    pub world: Shared,
    pub state: Arc<dyn ProviderState>,
}

fn transient(message: &str) -> ProviderError {
    ProviderError::Failed { provider: KIND, message: message.to_string(), retryable: true }
}

fn info(v: &crate::world::Version) -> VersionInfo {
    let status = if v.status == Status::Active { VersionStatus::Active } else { VersionStatus::Inactive };
    VersionInfo { id: v.id.clone(), status, created_unix: None }
}

impl SimProvider {
    fn lock(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().expect("world lock")
    }

    /// Runs one call: draws its fault, acts (once or twice) and answers as
    /// the fault says.
    async fn call<T>(
        &self,
        what: String,
        idempotent: bool,
        act: impl Fn(&mut World) -> Result<T, ProviderError>,
    ) -> Result<T, ProviderError> {
        let fault = {
            let mut w = self.lock();
            if what.starts_with("create") && std::mem::take(&mut w.crash_next_create) {
                w.count("provider: rekeyd crashed mid-create (forced)");
                CallFault::CrashAfter
            } else {
                w.draw_call_fault(idempotent)
            }
        };
        match fault {
            CallFault::Fail => {
                self.lock().note(format!("provider {what}: refused (fault)"));
                return Err(transient("simulated outage"));
            }
            CallFault::Hang => {
                self.lock().note(format!("provider {what}: hangs"));
                tokio::time::sleep(HANG).await;
            }
            _ => {}
        }
        let (out, crash) = {
            let mut w = self.lock();
            let out = act(&mut w);
            if fault != CallFault::None || what != "list" {
                w.note(format!("provider {what}: {}", if out.is_ok() { "done" } else { "error" }));
            }
            match fault {
                CallFault::Twice => {
                    let _ = act(&mut w);
                    w.note(format!("provider {what}: acted a second time"));
                    (out, false)
                }
                CallFault::LoseAnswer => {
                    w.note(format!("provider {what}: answer lost"));
                    (Err(transient("connection reset after the request was sent")), false)
                }
                CallFault::CrashAfter => {
                    w.note(format!("provider {what}: rekeyd crashes before the answer"));
                    w.crash_requests.push(crate::harness::COORDINATOR.to_string());
                    (out, true)
                }
                _ => (out, false),
            }
        };
        if crash {
            // The harness crashes rekeyd before this task runs again.
            std::future::pending::<()>().await;
        }
        out
    }

    fn set_status(
        &self,
        version: &str,
        to: Status,
        what: &'static str,
    ) -> impl Fn(&mut World) -> Result<(), ProviderError> {
        let version = version.to_string();
        move |w: &mut World| {
            let v = w.versions.get_mut(&version).filter(|v| v.status != Status::Deleted);
            let Some(v) = v else {
                return Err(ProviderError::NotFound { provider: KIND, version: version.clone() });
            };
            v.status = to;
            v.drifted = false;
            w.note(format!("{what} {version}"));
            if to != Status::Active {
                // The moment a version stops working: every host must be off it.
                w.check_hosts(&format!("{what} {version}"));
                w.check_old_revocation(&version, what);
            }
            Ok(())
        }
    }
}

#[async_trait]
impl External for SimProvider {
    const NOUN: &'static str = "version";

    fn journal(&self) -> Journal<'_> {
        Journal { provider: KIND, state: &*self.state }
    }

    async fn versions(&self) -> Result<Option<Vec<VersionInfo>>, ProviderError> {
        let listed = self.call("list".into(), true, |w| {
            Ok(w.versions.values().filter(|v| v.status != Status::Deleted).map(info).collect())
        });
        Ok(Some(listed.await?))
    }

    async fn delete_orphan(&self, orphan: &VersionInfo) -> Result<(), ProviderError> {
        match self
            .call(
                format!("delete orphan {}", orphan.id),
                true,
                self.set_status(&orphan.id, Status::Deleted, "deleted orphan"),
            )
            .await
        {
            Err(ProviderError::NotFound { .. }) => Ok(()),
            r => r,
        }
    }

    async fn create_new(&self, req: &CreateRequest, _replay: bool) -> Result<(Created, Vec<String>), ProviderError> {
        let rotation = req.rotation_id.clone();
        let v = self
            .call(format!("create for {rotation}"), false, |w| {
                let v = w.add_version(Some(rotation.clone()), false);
                w.note(format!("created {} for {rotation}", v.id));
                w.check_versions();
                Ok(v)
            })
            .await?;
        Ok((Created { id: v.id, fields: vec![("value".into(), v.value)], created_unix: None }, vec![]))
    }
}

#[async_trait]
impl Provider for SimProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn current(&self) -> Result<Option<VersionInfo>, ProviderError> {
        self.call("current".into(), true, |w| {
            Ok(w.versions.values().rev().find(|v| v.status == Status::Active && v.rotation.is_none()).map(info))
        })
        .await
    }

    fn field_names(&self) -> Vec<String> {
        vec!["value".into()]
    }

    async fn create(&self, req: &CreateRequest) -> Result<NewVersion, ProviderError> {
        if self.lock().journal {
            return journal::create_once(self, req).await;
        }
        // Without the journal: a create whose answer was lost is made again.
        let (c, notes) = self.create_new(req, false).await?;
        Ok(NewVersion { id: c.id.clone(), fields: c.fields(), notes })
    }

    async fn deactivate(&self, version: &str) -> Result<(), ProviderError> {
        self.call(format!("deactivate {version}"), true, self.set_status(version, Status::Inactive, "deactivated"))
            .await
    }

    async fn reactivate(&self, version: &str) -> Result<(), ProviderError> {
        self.call(format!("reactivate {version}"), true, self.set_status(version, Status::Active, "reactivated")).await
    }

    async fn delete(&self, version: &str) -> Result<(), ProviderError> {
        self.call(format!("delete {version}"), true, self.set_status(version, Status::Deleted, "deleted")).await?;
        let _ = self.journal().forget_version(version);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<VersionInfo>, ProviderError> {
        Ok(self.versions().await?.unwrap_or_default())
    }
}

/// The initial version's value, for hosts that start with it.
#[allow(dead_code)]
pub fn fields_of(value: &str) -> Fields {
    [("value".to_string(), SecretBytes::new(value.as_bytes().to_vec()))].into()
}
