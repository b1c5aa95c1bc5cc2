//! `rekey demo`: the whole product on one machine. The story lives in
//! [`rekey_demo::walkthrough`]; the CLI lends it the admin client every
//! other verb uses, so the demo connects, names protocol versions and words
//! errors exactly as `rekey` does.

use crate::{Client, connect_to};
use anyhow::Result;
use rekey_demo::walkthrough::Admin;
use rekey_proto::v1::{
    Control, ControlRotationRequest, CreateTokenRequest, GetReportRequest, GetRotationRequest, ListAgentsRequest,
    PlanRotationRequest, StartRotationRequest,
};
use rekey_types::v1::{PlanView, RotationView};
use std::path::Path;

pub use rekey_demo::walkthrough::DemoArgs;

pub async fn run(args: DemoArgs) -> Result<()> {
    rekey_demo::walkthrough::run::<Client>(args).await
}

impl Admin for Client {
    async fn connect(operator_dir: &Path, addr: String) -> Result<Self> {
        connect_to(operator_dir, &[addr], false).await
    }

    async fn create_token(
        &mut self,
        host: &str,
        labels: &[(&str, &str)],
        ttl_seconds: u64,
    ) -> Result<(String, String)> {
        let req = self.request(CreateTokenRequest {
            host: host.to_string(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ttl_seconds,
        });
        let r = self.inner.clone().create_token(req).await.map_err(|s| self.explain(s))?.into_inner();
        Ok((r.token, r.ca_fingerprint))
    }

    async fn connected_agents(&mut self) -> Result<usize> {
        let r = self
            .inner
            .clone()
            .list_agents(self.request(ListAgentsRequest::default()))
            .await
            .map_err(|s| self.explain(s))?;
        Ok(r.into_inner().agents.iter().filter(|a| a.connected).count())
    }

    async fn start_rotation(&mut self, secret: &str) -> Result<RotationView> {
        let req = self.request(StartRotationRequest { secret: secret.into(), ..Default::default() });
        self.view(self.inner.clone().start_rotation(req).await)
    }

    async fn plan_rotation(&mut self, secret: &str) -> Result<PlanView> {
        let req = self.request(PlanRotationRequest { secret: secret.into(), wait_seconds: 0 });
        self.view(self.inner.clone().plan_rotation(req).await)
    }

    async fn rotation(&mut self, id: &str) -> Result<RotationView> {
        let req = self.request(GetRotationRequest { id: id.to_string() });
        self.view(self.inner.clone().get_rotation(req).await)
    }

    async fn resume(&mut self, id: &str) -> Result<()> {
        let req = self.request(ControlRotationRequest {
            id: id.to_string(),
            action: Control::Resume as i32,
            host: String::new(),
            reason: String::new(),
        });
        self.inner.clone().control_rotation(req).await.map_err(|s| self.explain(s))?;
        Ok(())
    }

    async fn report(&mut self, id: &str, format: &str) -> Result<String> {
        let req = self.request(GetReportRequest { id: id.to_string(), format: format.into() });
        Ok(self.inner.clone().get_report(req).await.map_err(|s| self.explain(s))?.into_inner().content)
    }

    async fn console_login(&mut self) -> Result<String> {
        let req = self.request(rekey_proto::v1::CreateConsoleLoginRequest {});
        Ok(self.inner.clone().create_console_login(req).await.map_err(|s| self.explain(s))?.into_inner().url)
    }
}
