//! The real providers against real servers: AWS IAM on moto, Vault on
//! OpenBao, the `http` provider on the demo SaaS API, the `command` provider
//! with a script. Engine-level tests drive a real rekeyd with scripted agents
//! over real mTLS; provider-level tests call the providers directly to
//! replay a `create` interrupted at the worst moment.

use rekey_providers::{CreateRequest, Provider, ProviderConfig, ProviderError, ProviderState, VersionStatus};
use rekey_tests::fixtures::{DemoApi, Moto, OpenBao, random_suffix, write_secret_file};
use rekey_tests::scripted::ScriptedAgent;
use rekey_tests::{Coordinator, wait_for};
use rekey_types::v1::{self, AuditRecordView, HostState, RotationState, RotationView, VersionView};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// ---------------------------------------------------------------- helpers

pub(crate) struct Fleet {
    pub tmp: tempfile::TempDir,
    pub c: Coordinator,
    pub agents: Vec<ScriptedAgent>,
}

/// A coordinator with `catalog` and `n` scripted agents consuming `secrets`.
pub(crate) fn fleet(n: usize, secrets: &[&str], catalog: impl FnOnce(&Path) -> String) -> Fleet {
    rustls::crypto::ring::default_provider().install_default().ok();
    let tmp = tempfile::Builder::new().prefix("rekey-providers-").tempdir().unwrap();
    let c = Coordinator::start(&tmp.path().join("c"), &catalog(tmp.path()));
    let agents = (1..=n)
        .map(|i| ScriptedAgent::enroll(&c, tmp.path(), &format!("host-{i}"), secrets, &["env=test"]))
        .collect::<Vec<_>>();
    wait_for("agents connected", || agents.iter().all(|a| c.is_connected(&a.name)));
    Fleet { tmp, c, agents }
}

pub(crate) fn start(c: &Coordinator, secret: &str) -> String {
    c.cli_ok(&["rotate", "start", secret]).trim().to_string()
}

pub(crate) fn wait_state(c: &Coordinator, id: &str, states: &[RotationState]) -> RotationView {
    let mut last = None;
    wait_for(&format!("rotation {id} to reach {states:?}"), || {
        let r = c.rotation(id);
        let reached = states.contains(&r.state);
        last = Some(r);
        reached
    });
    last.expect("polled")
}

/// Starts a rotation and waits until it completes or halts.
fn rotate(c: &Coordinator, secret: &str) -> RotationView {
    let id = start(c, secret);
    wait_state(c, &id, &[RotationState::Completed, RotationState::Halted, RotationState::Aborted])
}

fn states(r: &RotationView) -> Vec<RotationState> {
    r.timeline.iter().map(|t| t.state).collect()
}

fn versions(c: &Coordinator, secret: &str) -> Vec<VersionView> {
    c.versions(secret)
}

fn audit(c: &Coordinator) -> Vec<AuditRecordView> {
    c.audit()
}

/// Every host healthy on the rotation's new version, with the expected fingerprint.
fn assert_all_healthy(r: &RotationView, agents: &[ScriptedAgent], secret: &str) {
    let expected = r.expected_fingerprint.as_deref().unwrap();
    for (name, h) in &r.hosts {
        assert_eq!(h.state, HostState::Healthy, "{name}: {r:#?}");
        assert_eq!(h.fingerprint.as_deref(), Some(expected), "{name}");
    }
    for a in agents {
        assert_eq!(a.applied(secret).unwrap().0, r.new_version.as_deref().unwrap(), "{}", a.name);
    }
}

/// The values delivered with a version, by field order (fields are sent in name order).
fn delivered_fields(agent: &ScriptedAgent, first_field_value: &str) -> Vec<String> {
    let seen: Vec<String> = agent.values_seen().into_iter().map(|v| String::from_utf8(v).unwrap()).collect();
    let i = seen.iter().position(|v| v == first_field_value).expect("value delivered");
    seen[i..].to_vec()
}

/// No secret value an agent received appears in the coordinator's logs, the
/// audit log or the CLI's output (ids that are also version ids are public).
fn assert_no_secret_leaked(c: &Coordinator, agents: &[ScriptedAgent], public: &[&str], more_secrets: &[&str]) {
    let mut haystack = c.logs();
    haystack.push_str(&c.cli_ok(&["audit"]));
    haystack.push_str(&c.cli_ok(&["audit", "-o", "json"]));
    haystack.push_str(&c.cli_ok(&["rotate", "list", "-o", "json"]));
    for r in c.rotations(None) {
        haystack.push_str(&c.cli_ok(&["rotate", "status", &r.id]));
        haystack.push_str(&c.cli_ok(&["rotate", "status", &r.id, "-o", "json"]));
    }
    let mut secrets: Vec<String> = agents
        .iter()
        .flat_map(|a| a.values_seen())
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .filter(|v| !public.contains(&v.as_str()))
        .collect();
    secrets.extend(more_secrets.iter().map(|s| s.to_string()));
    assert!(!secrets.is_empty());
    for s in secrets {
        assert!(s.len() >= 8, "a suspiciously short secret: {s:?}");
        assert!(!haystack.contains(&s), "a secret value leaked into logs, audit or CLI output");
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

/// An in-memory provider state that can fail writes of a created version
/// (as if rekeyd died between the provider's call and recording its answer).
#[derive(Default)]
struct MemState {
    map: Mutex<BTreeMap<String, Vec<u8>>>,
    crash_before_recording: Mutex<bool>,
}

impl ProviderState for MemState {
    fn get(&self, k: &str) -> Result<Option<rekey_common::secret::SecretBytes>, String> {
        Ok(self.map.lock().unwrap().get(k).map(|v| rekey_common::secret::SecretBytes::new(v.clone())))
    }
    fn put(&self, k: &str, v: &[u8]) -> Result<(), String> {
        if *self.crash_before_recording.lock().unwrap() && String::from_utf8_lossy(v).contains("\"created\":{") {
            return Err("simulated crash before the result was recorded".into());
        }
        self.map.lock().unwrap().insert(k.into(), v.to_vec());
        Ok(())
    }
    fn remove(&self, k: &str) -> Result<(), String> {
        self.map.lock().unwrap().remove(k);
        Ok(())
    }
    fn keys(&self) -> Result<Vec<String>, String> {
        Ok(self.map.lock().unwrap().keys().cloned().collect())
    }
}

/// A provider built from its config (as in a `[[secret]]` block, here as JSON).
fn provider_from(config: Value, state: Arc<dyn ProviderState>) -> Arc<dyn Provider> {
    let config: ProviderConfig = serde_json::from_value(config.clone()).unwrap_or_else(|e| panic!("{e}: {config}"));
    config.validate().unwrap();
    rekey_providers::build(&config, state).unwrap()
}

fn req(rotation: &str, previous: Option<&str>) -> CreateRequest {
    CreateRequest { secret: "s".into(), rotation_id: rotation.into(), previous_version: previous.map(str::to_string) }
}

// ---------------------------------------------------------------- AWS IAM on moto

pub(crate) mod iam {
    use super::*;
    use aws_sdk_iam::Client;
    use aws_sdk_iam::config::{BehaviorVersion, Credentials, Region};
    use aws_sdk_iam::types::StatusType;

    pub fn client(url: &str, key: &str, secret: &str) -> Client {
        use aws_smithy_http_client::tls::{Provider as Tls, rustls_provider::CryptoMode};
        let http = aws_smithy_http_client::Builder::new().tls_provider(Tls::Rustls(CryptoMode::Ring)).build_https();
        let conf = aws_sdk_iam::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(url)
            .credentials_provider(Credentials::new(key, secret, None, None, "test"))
            .http_client(http)
            .build();
        Client::from_conf(conf)
    }

    /// A moto world: an admin user whose key rekeyd uses (from a 0600
    /// credentials file), and an app user with keys in the given states.
    pub struct World {
        pub moto: Moto,
        pub user: String,
        pub credentials_file: PathBuf,
        /// (id, secret) of the app user's keys, in creation order.
        pub keys: Vec<(String, String)>,
        _dir: tempfile::TempDir,
    }

    pub fn world(key_states: &[StatusType]) -> World {
        let moto = Moto::start();
        let sfx = random_suffix();
        let (admin, user) = (format!("rekey-admin-{sfx}"), format!("app-{sfx}"));
        let setup = client(&moto.url, "AKIASETUPSETUPSETUP0", "setup-secret-not-checked-yet");
        let dir = tempfile::tempdir().unwrap();
        let credentials_file = dir.path().join("aws-credentials");
        let keys = block_on(async {
            setup.create_user().user_name(&admin).send().await.unwrap();
            let all = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;
            setup.put_user_policy().user_name(&admin).policy_name("all").policy_document(all).send().await.unwrap();
            let k = setup.create_access_key().user_name(&admin).send().await.unwrap();
            let k = k.access_key().unwrap();
            write_secret_file(
                &credentials_file,
                &format!(
                    "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                    k.access_key_id(),
                    k.secret_access_key()
                ),
            );
            setup.create_user().user_name(&user).send().await.unwrap();
            let get_user =
                r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iam:GetUser","Resource":"*"}]}"#;
            setup
                .put_user_policy()
                .user_name(&user)
                .policy_name("get-user")
                .policy_document(get_user)
                .send()
                .await
                .unwrap();
            let mut keys = Vec::new();
            for st in key_states {
                let k = setup.create_access_key().user_name(&user).send().await.unwrap();
                let k = k.access_key().unwrap();
                if *st != StatusType::Active {
                    setup
                        .update_access_key()
                        .user_name(&user)
                        .access_key_id(k.access_key_id())
                        .status(st.clone())
                        .send()
                        .await
                        .unwrap();
                }
                keys.push((k.access_key_id().to_string(), k.secret_access_key().to_string()));
            }
            keys
        });
        moto.enable_auth();
        World { moto, user, credentials_file, keys, _dir: dir }
    }

    impl World {
        pub fn catalog(&self, secret: &str) -> String {
            format!(
                r#"
[[secret]]
name = "{secret}"
all_agents = true
provider = {{ kind = "aws-iam", user_name = "{user}", region = "us-east-1", endpoint_url = "{url}", credentials_file = "{creds}" }}
[secret.rollout]
canary = 1
waves = ["100%"]
host_deadline = "20s"
[secret.revocation]
grace = "1s"
monitor = "0s"
check_every = "1s"
"#,
                user = self.user,
                url = self.moto.url,
                creds = self.credentials_file.display()
            )
        }

        pub fn provider_config(&self) -> Value {
            json!({
                "kind": "aws-iam", "user_name": self.user, "region": "us-east-1",
                "endpoint_url": self.moto.url, "credentials_file": self.credentials_file,
            })
        }

        /// The app user's keys as IAM lists them: (id, active?).
        pub fn keys_now(&self) -> Vec<(String, bool)> {
            let creds = std::fs::read_to_string(&self.credentials_file).unwrap();
            let get = |k: &str| {
                creds
                    .lines()
                    .find_map(|l| l.split_once('=').filter(|(n, _)| n.trim() == k))
                    .unwrap()
                    .1
                    .trim()
                    .to_string()
            };
            let admin = client(&self.moto.url, &get("aws_access_key_id"), &get("aws_secret_access_key"));
            let out = block_on(admin.list_access_keys().user_name(&self.user).send()).unwrap();
            out.access_key_metadata()
                .iter()
                .map(|k| (k.access_key_id().unwrap().to_string(), k.status() == Some(&StatusType::Active)))
                .collect()
        }

        /// A signed `GetUser` with the app user's key: Ok, or the error code moto answered
        /// (moto wraps auth errors in `<Errors>`, which the SDK does not parse: read the body).
        pub fn get_user_with(&self, key: &str, secret: &str) -> Result<(), String> {
            use aws_sdk_iam::error::ProvideErrorMetadata;
            let c = client(&self.moto.url, key, secret);
            block_on(c.get_user().user_name(&self.user).send()).map(|_| ()).map_err(|e| {
                if let Some(code) = e.code() {
                    return code.to_string();
                }
                let body = e.raw_response().and_then(|r| r.body().bytes()).unwrap_or_default();
                let body = String::from_utf8_lossy(body);
                match body.split_once("<Code>").and_then(|(_, rest)| rest.split_once("</Code>")) {
                    Some((code, _)) => code.to_string(),
                    None => format!("{e:?}"),
                }
            })
        }
    }
}

#[test]
fn aws_iam_rotation_moves_every_host_to_a_new_key_and_revokes_the_old_one() {
    let w = iam::world(&[aws_sdk_iam::types::StatusType::Active]);
    let (old_id, old_secret) = w.keys[0].clone();
    assert_eq!(w.get_user_with(&old_id, &old_secret), Ok(()), "the deployed key works before the rotation");
    let f = fleet(3, &["aws-app"], |_| w.catalog("aws-app"));

    let r = rotate(&f.c, "aws-app");
    assert_eq!(r.state, RotationState::Completed, "{r:#?}");
    assert_eq!(r.old_version.as_deref(), Some(old_id.as_str()), "the key in use is found at IAM");
    let new_id = r.new_version.clone().unwrap();
    assert_ne!(new_id, old_id);
    assert_all_healthy(&r, &f.agents, "aws-app");
    // Revocation in order: deactivate, grace, delete.
    let st = states(&r);
    let pos = |s: RotationState| st.iter().position(|x| *x == s).unwrap_or_else(|| panic!("{s} missing from {st:?}"));
    use RotationState::{Deactivating, Deleting, Grace, Verified};
    assert!(pos(Verified) < pos(Deactivating) && pos(Deactivating) < pos(Grace) && pos(Grace) < pos(Deleting));
    // IAM holds the new key only; the old one is refused, the new one accepted.
    assert_eq!(w.keys_now(), vec![(new_id.clone(), true)]);
    let fields = delivered_fields(&f.agents[0], &new_id);
    let new_secret = fields[1].clone();
    assert_eq!(w.get_user_with(&old_id, &old_secret), Err("InvalidClientTokenId".to_string()));
    assert_eq!(w.get_user_with(&new_id, &new_secret), Ok(()));
    let vs = versions(&f.c, "aws-app");
    assert_eq!(vs.len(), 1, "{vs:?}");
    assert_eq!((vs[0].id.as_str(), vs[0].status), (new_id.as_str(), v1::VersionStatus::Active));
    assert_no_secret_leaked(&f.c, &f.agents, &[&old_id, &new_id], &[&old_secret]);
}

#[test]
fn aws_iam_deletes_a_stale_inactive_key_first_and_audits_it() {
    use aws_sdk_iam::types::StatusType;
    let w = iam::world(&[StatusType::Inactive, StatusType::Active]);
    let (stale, current) = (w.keys[0].0.clone(), w.keys[1].0.clone());
    let f = fleet(2, &["aws-app"], |_| w.catalog("aws-app"));
    let r = rotate(&f.c, "aws-app");
    assert_eq!(r.state, RotationState::Completed, "{r:#?}");
    assert_eq!(r.old_version.as_deref(), Some(current.as_str()));
    let new_id = r.new_version.clone().unwrap();
    assert_eq!(w.keys_now(), vec![(new_id.clone(), true)]);
    let notes: Vec<String> = audit(&f.c)
        .iter()
        .filter(|a| a.action == "provider.note")
        .map(|a| a.details["note"].as_str().unwrap().to_string())
        .collect();
    assert!(
        notes.iter().any(|n| n.contains(&format!("deleted stale inactive access key {stale}"))),
        "the stale key's deletion is audited: {notes:?}"
    );
    assert_no_secret_leaked(&f.c, &f.agents, &[&current, &new_id, &stale], &[]);
}

#[test]
fn aws_iam_refuses_two_active_keys_naming_both_and_changes_nothing() {
    use aws_sdk_iam::types::StatusType;
    let w = iam::world(&[StatusType::Active, StatusType::Active]);
    let before = w.keys_now();
    let f = fleet(1, &["aws-app"], |_| w.catalog("aws-app"));
    let out = f.c.cli(&["rotate", "start", "aws-app", "--wait"]);
    assert!(!out.status.success(), "a refused rotation must not exit 0");
    // The start looks at the provider first: refused before any rotation exists.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&w.keys[0].0) && err.contains(&w.keys[1].0), "both keys named: {err}");
    assert!(f.c.rotations(None).is_empty(), "no rotation was started");
    // Skipping the preflight does not skip reality: the provider refuses to
    // create a third key, the rotation halts naming both, nothing is created.
    let id =
        f.c.cli_ok(&["rotate", "start", "aws-app", "--skip-preflight", "--reason", "try anyway"]).trim().to_string();
    let r = wait_state(&f.c, &id, &[RotationState::Halted]);
    let reason = r.halt_reason.as_deref().unwrap();
    assert!(
        reason.contains(&w.keys[0].0) && reason.contains(&w.keys[1].0) && reason.contains("two active access keys"),
        "{reason}"
    );
    assert_eq!(w.keys_now(), before, "nothing changed at IAM");
    assert!(f.agents[0].deliveries().is_empty(), "nothing was delivered");
}

#[test]
fn aws_iam_create_replayed_after_a_crash_never_leaves_a_third_key() {
    let w = iam::world(&[aws_sdk_iam::types::StatusType::Active]);
    let current = w.keys[0].0.clone();
    let state = Arc::new(MemState::default());
    let p = provider_from(w.provider_config(), state.clone());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    assert_eq!(rt.block_on(p.current()).unwrap().unwrap().id, current);
    // Crash between CreateAccessKey and recording its answer: the key exists, its secret is lost.
    *state.crash_before_recording.lock().unwrap() = true;
    let e = rt.block_on(p.create(&req("rot-crash", Some(&current)))).unwrap_err();
    assert!(matches!(e, ProviderError::State { .. }), "{e}");
    *state.crash_before_recording.lock().unwrap() = false;
    let orphan: Vec<String> = w.keys_now().into_iter().map(|(id, _)| id).filter(|id| *id != current).collect();
    assert_eq!(orphan.len(), 1, "the interrupted call created a key");
    // The replay (same rotation id) deletes the orphan and creates one key.
    let v = rt.block_on(p.create(&req("rot-crash", Some(&current)))).unwrap();
    assert!(v.notes.iter().any(|n| n.contains(&format!("deleted access key {}", orphan[0]))), "{:?}", v.notes);
    let ids: Vec<String> = w.keys_now().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&current) && ids.contains(&v.id) && !ids.contains(&orphan[0]));
    // Recorded: another replay returns the same key and changes nothing.
    let again = rt.block_on(p.create(&req("rot-crash", Some(&current)))).unwrap();
    assert_eq!(again.id, v.id);
    assert_eq!(again.fields["secret_access_key"], v.fields["secret_access_key"]);
    assert_eq!(w.keys_now().len(), 2);
    // The new key is usable at once; the status operations are idempotent.
    let secret = String::from_utf8(v.fields["secret_access_key"].expose().to_vec()).unwrap();
    let before_ms = rekey_common::time::now_unix_ms();
    assert_eq!(w.get_user_with(&v.id, &secret), Ok(()));
    // moto records the use: when (to the millisecond: its answer carries a
    // fraction, so the resolution says 1 ms), and where (service and region).
    match rt.block_on(p.last_used(&v.id)).unwrap() {
        rekey_providers::LastUsed::At(u) => {
            assert!(u.resolution_ms == 1 || (u.resolution_ms == 1000 && u.at_ms % 1000 == 0), "{u:?}");
            assert!(u.may_be_at_or_after(before_ms) && u.at_ms <= rekey_common::time::now_unix_ms(), "{u:?}");
            assert_eq!(u.source.as_deref(), Some("iam in us-east-1"), "{u:?}");
        }
        other => panic!("the use was not reported: {other:?}"),
    }
    assert_eq!(p.field_names(), ["access_key_id", "secret_access_key"]);
    rt.block_on(p.deactivate(&current)).unwrap();
    rt.block_on(p.deactivate(&current)).unwrap();
    let list = rt.block_on(p.list()).unwrap();
    assert_eq!(list.iter().find(|k| k.id == current).unwrap().status, VersionStatus::Inactive);
    rt.block_on(p.delete(&current)).unwrap();
    // Gone: every operation on it says NotFound (the engine records it as revoked).
    assert!(matches!(rt.block_on(p.delete(&current)), Err(ProviderError::NotFound { .. })));
    assert!(matches!(rt.block_on(p.last_used(&current)), Err(ProviderError::NotFound { .. })));
    assert!(matches!(rt.block_on(p.deactivate(&current)), Err(ProviderError::NotFound { .. })));
    assert!(matches!(rt.block_on(p.reactivate(&current)), Err(ProviderError::NotFound { .. })));
    assert_eq!(w.keys_now(), vec![(v.id.clone(), true)]);
}

// ---------------------------------------------------------------- Vault on OpenBao

fn vault_token_file(dir: &Path, token: &str) -> PathBuf {
    let f = dir.join(format!("vault-{}.token", random_suffix()));
    write_secret_file(&f, token);
    f
}

#[test]
fn a_vault_sink_holds_every_new_version_and_its_failure_halts_before_delivery() {
    let bao = OpenBao::start();
    let sfx = random_suffix();
    let f = fleet(2, &["db", "db-bad"], |dir| {
        let good = vault_token_file(dir, &bao.token);
        let bad = vault_token_file(dir, "not-a-valid-token");
        format!(
            r#"
[[secret]]
name = "db"
all_agents = true
provider = {{ kind = "random", length = 32, prefix = "pw_" }}
sinks = [{{ kind = "vault", address = "{addr}", path = "rekey-{sfx}/{{secret}}", token_file = "{good}" }}]
[secret.revocation]
grace = "1s"
monitor = "0s"
check_every = "1s"

[[secret]]
name = "db-bad"
all_agents = true
provider = {{ kind = "random", length = 32 }}
sinks = [{{ kind = "vault", address = "{addr}", path = "rekey-{sfx}/{{secret}}", token_file = "{bad}" }}]
"#,
            addr = bao.addr,
            good = good.display(),
            bad = bad.display()
        )
    });
    let mut previous = String::new();
    for round in 1..=2 {
        let r = rotate(&f.c, "db");
        assert_eq!(r.state, RotationState::Completed, "round {round}: {r:#?}");
        let version = r.new_version.as_deref().unwrap();
        let (status, kv) = bao.api("GET", &format!("secret/data/rekey-{sfx}/db"), None);
        assert_eq!(status, 200, "{kv}");
        // Deliveries carry the new value and the previous one: the sink holds the new.
        let held = kv["data"]["data"]["value"].as_str().unwrap().to_string();
        let seen: Vec<String> = f.agents[0].values_seen().into_iter().map(|v| String::from_utf8(v).unwrap()).collect();
        assert!(seen.contains(&held) && held != previous, "the sink holds the new delivered value");
        assert_eq!(kv["data"]["data"].as_object().unwrap().len(), 1, "{kv}");
        previous = held;
        assert_eq!(kv["data"]["metadata"]["version"], round, "one KV version per rotation");
        let custom = &kv["data"]["metadata"]["custom_metadata"];
        assert_eq!(custom["rekey_rotation_id"], r.id.as_str());
        assert_eq!(custom["rekey_version"], version);
        assert_eq!(custom["rekey_secret"], "db");
        assert!(custom["rekey_written_at"].as_str().unwrap().ends_with('Z'));
    }
    let writes = audit(&f.c).into_iter().filter(|a| a.action == "sink.write").count();
    assert_eq!(writes, 2, "every sink write is audited");

    let r = rotate(&f.c, "db-bad");
    assert_eq!(r.state, RotationState::Halted, "{r:#?}");
    let reason = r.halt_reason.as_deref().unwrap();
    assert!(reason.contains(&format!("sink vault secret/rekey-{sfx}/db-bad")) && reason.contains("403"), "{reason}");
    assert!(
        f.agents.iter().all(|a| a.deliveries().iter().all(|(rot, _)| *rot != r.id)),
        "nothing delivered when the sink failed"
    );
    assert_no_secret_leaked(&f.c, &f.agents, &[], &[]);
}

#[test]
fn the_vault_provider_rotates_a_kv_secret_in_openbao() {
    let bao = OpenBao::start();
    let path = format!("apps/api-{}", random_suffix());
    let (status, _) =
        bao.api("POST", &format!("secret/data/{path}"), Some(json!({ "data": { "value": "initial-value-1" } })));
    assert_eq!(status, 200);
    let f = fleet(2, &["api"], |dir| {
        let token = vault_token_file(dir, &bao.token);
        format!(
            r#"
[[secret]]
name = "api"
all_agents = true
provider = {{ kind = "vault", address = "{addr}", path = "{path}", token_file = "{token}", generate = {{ length = 40, prefix = "vk_" }} }}
[secret.revocation]
grace = "1s"
monitor = "0s"
check_every = "1s"
"#,
            addr = bao.addr,
            token = token.display()
        )
    });
    let r = rotate(&f.c, "api");
    assert_eq!(r.state, RotationState::Completed, "{r:#?}");
    assert_eq!(r.old_version.as_deref(), Some("kv-1"), "the current KV version is found");
    assert_eq!(r.new_version.as_deref(), Some("kv-2"));
    assert_all_healthy(&r, &f.agents, "api");
    let value =
        f.agents[0].values_seen().into_iter().map(|v| String::from_utf8(v).unwrap()).find(|v| v.starts_with("vk_"));
    let (_, kv) = bao.api("GET", &format!("secret/data/{path}"), None);
    assert_eq!(kv["data"]["data"]["value"].as_str(), value.as_deref());
    assert_eq!(kv["data"]["metadata"]["custom_metadata"]["rekey_rotation_id"], r.id.as_str());
    // The old version was soft-deleted (deactivated), then destroyed.
    let (_, meta) = bao.api("GET", &format!("secret/metadata/{path}"), None);
    assert_eq!(meta["data"]["versions"]["1"]["destroyed"], true, "{meta:#}");
    assert_eq!(meta["data"]["versions"]["2"]["deletion_time"], "");
    let vs = versions(&f.c, "api");
    assert_eq!(vs.len(), 1, "{vs:?}");
    assert_eq!((vs[0].id.as_str(), vs[0].status), ("kv-2", v1::VersionStatus::Active));
    assert_no_secret_leaked(&f.c, &f.agents, &[], &["initial-value-1"]);
}

#[test]
fn the_vault_provider_replays_a_lost_write_without_a_second_version() {
    let bao = OpenBao::start();
    let dir = tempfile::tempdir().unwrap();
    let token = vault_token_file(dir.path(), &bao.token);
    let path = format!("apps/replay-{}", random_suffix());
    let state = Arc::new(MemState::default());
    let p = provider_from(
        json!({ "kind": "vault", "address": bao.addr, "path": path, "token_file": token }),
        state.clone(),
    );
    block_on(async {
        assert!(p.current().await.unwrap().is_none(), "nothing at the path yet");
        *state.crash_before_recording.lock().unwrap() = true;
        assert!(p.create(&req("rot-v", None)).await.is_err());
        *state.crash_before_recording.lock().unwrap() = false;
        let v = p.create(&req("rot-v", None)).await.unwrap();
        assert_eq!(v.id, "kv-1", "the value written before the crash is found, not written again");
        let again = p.create(&req("rot-v", None)).await.unwrap();
        assert_eq!((again.id.as_str(), &again.fields["value"]), ("kv-1", &v.fields["value"]));
        let v2 = p.create(&req("rot-w", Some("kv-1"))).await.unwrap();
        assert_eq!(v2.id, "kv-2");
        p.deactivate("kv-1").await.unwrap();
        let list = p.list().await.unwrap();
        assert_eq!(list.iter().find(|x| x.id == "kv-1").unwrap().status, VersionStatus::Inactive);
        p.reactivate("kv-1").await.unwrap();
        p.delete("kv-1").await.unwrap();
        assert_eq!(p.list().await.unwrap().iter().map(|x| x.id.as_str()).collect::<Vec<_>>(), vec!["kv-2"]);
        // Destroyed, or never written: NotFound for every operation.
        for gone in ["kv-1", "kv-9"] {
            assert!(matches!(p.delete(gone).await, Err(ProviderError::NotFound { .. })), "{gone}");
            assert!(matches!(p.deactivate(gone).await, Err(ProviderError::NotFound { .. })), "{gone}");
            assert!(matches!(p.reactivate(gone).await, Err(ProviderError::NotFound { .. })), "{gone}");
        }
        assert_eq!(p.field_names(), ["value"]);
        assert_eq!(p.current().await.unwrap().unwrap().id, "kv-2");
    });
}

// ---------------------------------------------------------------- http on the demo API

pub(crate) fn demo_provider(base_url: &str, token_file: &Path) -> String {
    format!(
        r#"[secret.provider]
kind = "http"
base_url = "{base_url}"
token_file = "{token}"
timeout = "5s"
create = {{ url = "/v1/keys", body = {{ name = "rekey-{{secret}}-{{rotation_id}}" }}, id_pointer = "/id", fields = {{ value = "/secret" }} }}
delete = {{ url = "/v1/keys/{{id}}" }}
deactivate = {{ url = "/v1/keys/{{id}}/deactivate" }}
reactivate = {{ url = "/v1/keys/{{id}}/activate" }}
list = {{ url = "/v1/keys", status_pointer = "/status", created_pointer = "/created_at", last_used_pointer = "/last_used_at_ms", last_used_format = "unix_ms", last_used_source_pointer = "/last_used_by" }}
"#,
        token = token_file.display()
    )
}

#[test]
fn the_http_provider_rotates_demo_api_keys() {
    let api = DemoApi::start();
    let (status, k0) = api.admin("POST", "/v1/keys", Some(json!({ "name": "initial" })));
    assert_eq!(status, 201, "{k0}");
    let (old_id, old_secret) = (k0["id"].as_str().unwrap().to_string(), k0["secret"].as_str().unwrap().to_string());
    assert_eq!(api.whoami(&old_secret), 200);
    let f = fleet(3, &["saas"], |_| {
        format!(
            "[[secret]]\nname = \"saas\"\nall_agents = true\n{}[secret.revocation]\ngrace = \"1s\"\nmonitor = \"0s\"\ncheck_every = \"1s\"\n",
            demo_provider(&api.url, &api.admin_token_file)
        )
    });
    let r = rotate(&f.c, "saas");
    assert_eq!(r.state, RotationState::Completed, "{r:#?}");
    assert_eq!(r.old_version.as_deref(), Some(old_id.as_str()));
    assert_all_healthy(&r, &f.agents, "saas");
    let new_id = r.new_version.clone().unwrap();
    let new_secret = f.agents[0]
        .values_seen()
        .into_iter()
        .map(|v| String::from_utf8(v).unwrap())
        .find(|v| v.starts_with("dk_") && *v != old_secret)
        .unwrap();
    assert_eq!(api.whoami(&new_secret), 200, "the new key works");
    assert_eq!(api.whoami(&old_secret), 401, "the old key is revoked");
    let (_, keys) = api.admin("GET", "/v1/keys", None);
    let ids: Vec<&str> = keys.as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![new_id.as_str()]);
    assert!(keys[0]["name"].as_str().unwrap().starts_with("rekey-saas-rot-"), "{keys}");
    assert_no_secret_leaked(&f.c, &f.agents, &[], &[&old_secret, &api.admin_token]);
}

/// The demo API's config for the `http` provider, as a JSON provider config.
fn demo_provider_json(api: &DemoApi, list: Value) -> Value {
    json!({
        "kind": "http", "base_url": api.url, "token_file": api.admin_token_file, "timeout": "5s",
        "create": { "url": "/v1/keys", "body": { "name": "rekey-{secret}-{rotation_id}" }, "fields": { "value": "/secret" } },
        "delete": { "url": "/v1/keys/{id}" },
        "deactivate": { "url": "/v1/keys/{id}/deactivate" },
        "reactivate": { "url": "/v1/keys/{id}/activate" },
        "list": list,
    })
}

/// #19: rekeyd killed while the create call was in flight leaves an *active*
/// orphan at an API that refuses to delete active keys (the demo API answers
/// 409). The replay of `create` with the same rotation id revokes the orphan
/// in the API's order (deactivate, then delete) and makes exactly one new
/// key: no refused DELETE, no second new key.
#[test]
fn an_active_orphan_is_deactivated_before_it_is_deleted_and_one_key_is_made() {
    let api = DemoApi::start();
    let (_, k0) = api.admin("POST", "/v1/keys", Some(json!({ "name": "initial" })));
    let old = k0["id"].as_str().unwrap().to_string();
    let state = Arc::new(MemState::default());
    let list = json!({ "url": "/v1/keys", "status_pointer": "/status" });
    let p = provider_from(demo_provider_json(&api, list), state.clone());
    let keys = || -> Vec<(String, String)> {
        let (_, ks) = api.admin("GET", "/v1/keys", None);
        ks.as_array()
            .unwrap()
            .iter()
            .map(|k| (k["id"].as_str().unwrap().into(), k["status"].as_str().unwrap().into()))
            .collect()
    };
    block_on(async {
        // The create call succeeds at the API, rekeyd dies before recording its answer.
        *state.crash_before_recording.lock().unwrap() = true;
        assert!(matches!(p.create(&req("rot-crash", Some(&old))).await, Err(ProviderError::State { .. })));
        *state.crash_before_recording.lock().unwrap() = false;
        let orphan: Vec<(String, String)> = keys().into_iter().filter(|(id, _)| *id != old).collect();
        assert_eq!(orphan.len(), 1, "the interrupted call created a key");
        assert_eq!(orphan[0].1, "active", "the orphan is active, as the API made it");
        let orphan = orphan[0].0.clone();

        let v = p.create(&req("rot-crash", Some(&old))).await.unwrap();
        assert!(v.notes.iter().any(|n| n.contains(&format!("deleted key {orphan}"))), "{:?}", v.notes);
        let now = keys();
        assert_eq!(now.len(), 2, "the old key and exactly one new key: {now:?}");
        assert!(now.contains(&(old.clone(), "active".into())) && now.contains(&(v.id.clone(), "active".into())));
        // The new key works; a further replay returns it and creates nothing.
        let value = String::from_utf8(v.fields["value"].expose().to_vec()).unwrap();
        assert_eq!(api.whoami(&value), 200);
        assert_eq!(p.create(&req("rot-crash", Some(&old))).await.unwrap().id, v.id);
        assert_eq!(keys().len(), 2);
    });
    let log = api.logs();
    let deletes: Vec<&str> = log.lines().filter(|l| l.contains("DELETE") && l.contains("status=")).collect();
    assert_eq!(deletes.len(), 1, "one DELETE, of the orphan: {log}");
    assert!(deletes[0].contains(&orphan_path(&log)) && deletes[0].contains("status=204"), "{log}");
    assert!(!log.contains("status=409"), "the API refused a DELETE:\n{log}");
}

/// The path of the only deactivate call in a demo API log, as a DELETE path.
fn orphan_path(log: &str) -> String {
    let line = log.lines().find(|l| l.contains("/deactivate") && l.contains("status=200")).expect("a deactivate call");
    let path = line.split("path=").nth(1).unwrap().split_whitespace().next().unwrap();
    path.trim_end_matches("/deactivate").to_string()
}

/// #16/#19: the demo API's list in the shapes real APIs use — a boolean
/// status, unix seconds with a fraction, milliseconds — read exactly, with
/// the use's source (the caller's User-Agent); a pointer to a string that is
/// not a time is an error, not "no usage".
#[test]
fn the_http_provider_reads_booleans_fractions_milliseconds_and_the_source_of_a_use() {
    let api = DemoApi::start();
    let (_, k) = api.admin("POST", "/v1/keys", Some(json!({ "name": "billing" })));
    let (id, secret) = (k["id"].as_str().unwrap().to_string(), k["secret"].as_str().unwrap().to_string());
    let (_, k2) = api.admin("POST", "/v1/keys", Some(json!({ "name": "spare" })));
    let spare = k2["id"].as_str().unwrap().to_string();
    assert_eq!(api.admin("POST", &format!("/v1/keys/{spare}/deactivate"), None).0, 200);
    let build = |list: Value| provider_from(demo_provider_json(&api, list), Arc::new(MemState::default()));
    let fractional = build(json!({
        "url": "/v1/keys", "status_pointer": "/enabled", "active_values": [true], "created_pointer": "/created_at",
        "last_used_pointer": "/last_used_unix", "last_used_source_pointer": "/last_used_by",
    }));
    let millis = build(json!({
        "url": "/v1/keys", "status_pointer": "/enabled", "active_values": [true],
        "last_used_pointer": "/last_used_at_ms", "last_used_format": "unix_ms",
    }));
    let wrong = build(json!({ "url": "/v1/keys", "last_used_pointer": "/name" }));
    block_on(async {
        let list = fractional.list().await.unwrap();
        let status = |i: &str| list.iter().find(|v| v.id == i).map(|v| v.status);
        assert_eq!((status(&id), status(&spare)), (Some(VersionStatus::Active), Some(VersionStatus::Inactive)));
        assert!(list.iter().all(|v| v.created_unix.is_some_and(|t| t > 1_600_000_000)), "{list:?}");
        assert_eq!(fractional.last_used(&id).await.unwrap(), rekey_providers::LastUsed::Never);

        let before = rekey_common::time::now_unix_ms();
        let auth = format!("Bearer {secret}");
        let ua = [("Authorization", auth.as_str()), ("User-Agent", "billing-worker/2.1 host-7")];
        let (st, _) = rekey_tests::fixtures::http(&api.addr, "GET", "/v1/whoami", &ua, b"").unwrap();
        assert_eq!(st, 200);
        let after = rekey_common::time::now_unix_ms();
        let rekey_providers::LastUsed::At(f) = fractional.last_used(&id).await.unwrap() else { panic!("no use") };
        assert!(
            f.resolution_ms <= 100 && f.at_ms >= before - 1 && f.at_ms <= after,
            "{f:?} not in [{before}, {after}]"
        );
        assert_eq!(f.source.as_deref(), Some("billing-worker/2.1 host-7"));
        let rekey_providers::LastUsed::At(m) = millis.last_used(&id).await.unwrap() else { panic!("no use") };
        assert_eq!((m.resolution_ms, m.source.as_deref()), (1, None));
        assert!(m.at_ms >= before && m.at_ms <= after && (m.at_ms - f.at_ms).abs() <= 1, "{m:?} vs {f:?}");
        let e = wrong.last_used(&id).await.unwrap_err().to_string();
        assert!(e.contains(&format!("key {id}: list.last_used_pointer /name: found the string \"billing\"")), "{e}");
        // Deleting the active key (as an abort deletes a new version) follows
        // the API's order; then it is gone, and every provider says so alike.
        fractional.delete(&id).await.unwrap();
        assert!(matches!(fractional.delete(&id).await, Err(ProviderError::NotFound { .. })));
        assert!(matches!(fractional.deactivate(&id).await, Err(ProviderError::NotFound { .. })));
        assert!(matches!(fractional.last_used(&id).await, Err(ProviderError::NotFound { .. })));
    });
    let log = api.logs();
    assert!(!log.contains(&secret));
    assert!(!log.contains("status=409"), "a refused DELETE:\n{log}");
}

/// #16: a usage setting that can never yield a time is refused when the
/// config is loaded, naming the file, the secret, the field and what is expected.
#[test]
fn a_usage_pointer_that_can_never_yield_a_time_is_refused_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("api.token");
    write_secret_file(&token, "t");
    let path = tmp.path().join("coordinator.toml");
    let config = |list: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nmaster_key_file = \"master.key\"\n\n[[secret]]\nname = \"saas\"\nall_agents = true\n[secret.provider]\nkind = \"http\"\nbase_url = \"http://127.0.0.1:1\"\ntoken_file = \"{}\"\ncreate = {{ url = \"/v1/keys\", fields = {{ value = \"/secret\" }} }}\ndelete = {{ url = \"/v1/keys/{{id}}\" }}\ndeactivate = {{ url = \"/v1/keys/{{id}}/deactivate\" }}\nlist = {{ url = \"/v1/keys\", {list} }}\n",
            token.display()
        )
    };
    let load = |list: &str| rekey_coordinator::config::Config::from_str(&path, &config(list)).map(|_| ());
    load("last_used_pointer = \"/last_used_at\", last_used_format = \"unix\"").unwrap();
    for (list, words) in [
        ("last_used_pointer = \"last_used_at\"", &["provider.list.last_used_pointer", "must start with /"][..]),
        ("last_used_pointer = \"\"", &["provider.list.last_used_pointer", "not be empty"]),
        ("last_used_format = \"unix\"", &["provider.list.last_used_format", "without list.last_used_pointer"]),
        (
            "last_used_pointer = \"/t\", last_used_format = \"epoch\"",
            &["provider.list.last_used_format", "epoch", "unix_ms"],
        ),
        ("status_pointer = \"/s\", active_values = []", &["provider.list.active_values", "at least one"]),
    ] {
        let e = load(list).unwrap_err().to_string();
        assert!(e.contains("coordinator.toml"), "{e}");
        for w in words {
            assert!(e.contains(w), "{w:?} not in {e:?}");
        }
    }
}

/// A stand-in API that misbehaves by path prefix: `/5xx` answers 503, `/slow`
/// never answers in time, `/partial` creates a key but omits its secret,
/// `/text` answers plain text. Deletes answer 204 and are recorded.
struct BadApi {
    url: String,
    deleted: Arc<Mutex<Vec<String>>>,
}

fn bad_api() -> BadApi {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let deleted = Arc::new(Mutex::new(Vec::new()));
    let d = deleted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(200) {
            let Ok(mut conn) = conn else { continue };
            let d = d.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                let _ = std::io::Read::read_exact(&mut reader, &mut body);
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("").to_string());
                let (status, body) = match (method, path.as_str()) {
                    ("DELETE", p) => {
                        d.lock().unwrap().push(p.to_string());
                        ("204 No Content", String::new())
                    }
                    (_, p) if p.starts_with("/5xx") => ("503 Service Unavailable", r#"{"error":"maintenance"}"#.into()),
                    (_, p) if p.starts_with("/slow") => {
                        std::thread::sleep(Duration::from_secs(3));
                        ("201 Created", "{}".into())
                    }
                    (_, p) if p.starts_with("/partial") => {
                        ("201 Created", r#"{"id":"key_partial","token":"sk_live_partial_should_not_leak"}"#.into())
                    }
                    _ => ("201 Created", "sk_live_plain_should_not_leak".into()),
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    BadApi { url, deleted }
}

#[test]
fn http_provider_failures_halt_the_rotation_with_a_precise_error() {
    let api = DemoApi::start();
    let bad = bad_api();
    let secrets = ["h-5xx", "h-slow", "h-partial", "h-text", "h-creds"];
    let f = fleet(1, &secrets, |dir| {
        let wrong = dir.join("wrong.token");
        write_secret_file(&wrong, "wrong-admin-token");
        let mut cat = String::new();
        for (name, base, token) in [
            ("h-5xx", format!("{}/5xx", bad.url), &api.admin_token_file),
            ("h-slow", format!("{}/slow", bad.url), &api.admin_token_file),
            ("h-partial", format!("{}/partial", bad.url), &api.admin_token_file),
            ("h-text", format!("{}/text", bad.url), &api.admin_token_file),
            ("h-creds", api.url.clone(), &wrong),
        ] {
            let provider = format!(
                r#"[secret.provider]
kind = "http"
base_url = "{base}"
token_file = "{token}"
timeout = "1s"
create = {{ url = "/v1/keys", body = {{ name = "x" }}, fields = {{ value = "/secret" }} }}
delete = {{ url = "/v1/keys/{{id}}" }}
"#,
                token = token.display()
            );
            cat.push_str(&format!(
                "[[secret]]\nname = \"{name}\"\nall_agents = true\n{provider}[secret.revocation]\nmonitor = \"0s\"\ndeactivate = false\n\n"
            ));
        }
        cat
    });
    let ids: Vec<String> = secrets.iter().map(|s| start(&f.c, s)).collect();
    let reasons: Vec<String> = ids
        .iter()
        .map(|id| {
            let r = wait_state(&f.c, id, &[RotationState::Halted, RotationState::Completed]);
            assert_eq!(r.state, RotationState::Halted, "{r:#?}");
            r.halt_reason.unwrap()
        })
        .collect();
    let expect = [
        vec!["provider failed creating the new version", "POST ", "/5xx/v1/keys answered 503", "maintenance"],
        vec!["/slow/v1/keys", "timed out after 1s"],
        vec![
            "/partial/v1/keys: the response has no string at /secret for field value",
            "keys id, token",
            "key_partial it created was deleted",
        ],
        vec!["/text/v1/keys answered 201 Created with a body that is not JSON"],
        vec!["answered 401 Unauthorized", "refused rekey's credentials from credentials file", "wrong.token"],
    ];
    for (reason, words) in reasons.iter().zip(expect) {
        for w in words {
            assert!(reason.contains(w), "{w:?} not in {reason:?}");
        }
        assert!(!reason.contains("should_not_leak") && !reason.contains("wrong-admin-token"), "{reason}");
    }
    assert_eq!(*bad.deleted.lock().unwrap(), vec!["/partial/v1/keys/key_partial".to_string()]);
    assert!(f.agents[0].deliveries().is_empty());
    let logs = f.c.logs();
    assert!(
        !logs.contains("should_not_leak") && !logs.contains("wrong-admin-token") && !logs.contains(&api.admin_token)
    );
}

// ---------------------------------------------------------------- command

/// A key store kept in files by a shell script, as an operator would write
/// one: `<id>.key` holds `status value`. Flags in the store make it fail.
const KEYS_SCRIPT: &str = r#"#!/bin/sh
set -eu
req=$(cat)
field() { printf '%s' "$req" | sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }
db="$KEYS_DIR"
case "$1" in
create)
  [ -f "$db/fail" ] && { echo "quota exceeded; current keys: $(cat "$db"/*.key | tr '\n' ' ')" >&2; exit 1; }
  [ -f "$db/hang" ] && sleep 20
  id="k-$(field rotation_id)"
  val="cv_$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  echo "active $val" > "$db/$id.key"
  printf '{"id":"%s","fields":{"value":"%s"}}\n' "$id" "$val"
  ;;
deactivate|delete)
  f="$db/$(field version).key"
  [ -f "$f" ] || exit 3
  if [ "$1" = delete ]; then rm "$f"; else echo "inactive $(cut -d' ' -f2 "$f")" > "$f"; fi
  ;;
list)
  printf '{"versions":['; sep=""
  for f in "$db"/*.key; do [ -e "$f" ] || continue
    printf '%s{"id":"%s","status":"%s"}' "$sep" "$(basename "$f" .key)" "$(cut -d' ' -f1 "$f")"; sep=","; done
  printf ']}\n'
  ;;
esac
"#;

#[test]
fn the_command_provider_rotates_and_its_failures_halt_with_redacted_stderr() {
    use std::os::unix::fs::PermissionsExt;
    let f = fleet(2, &["cmd"], |dir| {
        let script = dir.join("keys.sh");
        std::fs::write(&script, KEYS_SCRIPT).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(dir.join("db")).unwrap();
        let s = script.display();
        format!(
            r#"
[[secret]]
name = "cmd"
all_agents = true
[secret.provider]
kind = "command"
create = ["{s}", "create"]
deactivate = ["{s}", "deactivate"]
delete = ["{s}", "delete"]
list = ["{s}", "list"]
timeout = "1s"
env = {{ KEYS_DIR = "{db}" }}
[secret.revocation]
grace = "1s"
monitor = "0s"
check_every = "1s"
"#,
            db = dir.join("db").display()
        )
    });
    let db = f.tmp.path().join("db");
    let r1 = rotate(&f.c, "cmd");
    assert_eq!(r1.state, RotationState::Completed, "{r1:#?}");
    let r2 = rotate(&f.c, "cmd");
    assert_eq!(r2.state, RotationState::Completed, "{r2:#?}");
    assert_eq!(r2.old_version, r1.new_version);
    assert_all_healthy(&r2, &f.agents, "cmd");
    let v2 = r2.new_version.as_deref().unwrap();
    let vs = versions(&f.c, "cmd");
    assert_eq!(vs.len(), 1, "{vs:?}");
    assert_eq!(vs[0].id, v2);

    // The command fails and prints the current key on stderr: halted, redacted.
    std::fs::write(db.join("fail"), "").unwrap();
    let r3 = rotate(&f.c, "cmd");
    assert_eq!(r3.state, RotationState::Halted, "{r3:#?}");
    let reason = r3.halt_reason.as_deref().unwrap();
    assert!(reason.contains("create command") && reason.contains("exited with status 1"), "{reason}");
    assert!(reason.contains("quota exceeded; current keys: active <redacted>"), "{reason}");
    f.c.cli_ok(&["rotate", "abort", &r3.id]);
    wait_state(&f.c, &r3.id, &[RotationState::Aborted]);

    // A command that hangs is killed at its deadline.
    std::fs::remove_file(db.join("fail")).unwrap();
    std::fs::write(db.join("hang"), "").unwrap();
    let r4 = rotate(&f.c, "cmd");
    assert_eq!(r4.state, RotationState::Halted, "{r4:#?}");
    assert!(r4.halt_reason.as_deref().unwrap().contains("did not finish within 1s and was killed"), "{r4:#?}");
    assert_no_secret_leaked(&f.c, &f.agents, &[], &[]);
}

// ---------------------------------------------------------------- config errors

#[test]
fn a_provider_credentials_file_readable_by_others_is_refused_naming_secret_and_field() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "t0ken-value").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = tmp.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nmaster_key_file = \"master.key\"\n\n[[secret]]\nname = \"vaulted\"\nall_agents = true\nprovider = {{ kind = \"vault\", address = \"http://127.0.0.1:1\", path = \"a/b\", token_file = \"{}\" }}\n",
            token.display()
        ),
    )
    .unwrap();
    let e = rekey_coordinator::config::Config::from_file(&config).unwrap_err().to_string();
    assert!(e.contains("secret[0] (\"vaulted\").provider.token_file") && e.contains("mode 0644"), "{e}");
    assert!(!e.contains("t0ken-value"));
}

/// The commented examples of every provider and sink in deploy/coordinator.toml
/// parse and validate once uncommented (with their files in place).
#[test]
fn the_deploy_examples_of_every_provider_parse() {
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(rekey_tests::workspace_root().join("deploy/coordinator.toml")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let catalog = &text[text.find("# [[secret]]").expect("catalog examples")..];
    // Example lines are "# key = ..." / "# [..."; explanations are "# # ...".
    let mut uncommented: String = catalog
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    for file in ["vault.token", "aws-credentials", "approle.role-id", "approle.secret-id", "saas-admin.token"] {
        let p = tmp.path().join(file);
        write_secret_file(&p, "x");
        uncommented = uncommented.replace(&format!("/etc/rekey/{file}"), &p.display().to_string());
    }
    let script = tmp.path().join("legacy-token");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    uncommented = uncommented.replace("/usr/local/lib/rekey/legacy-token", &script.display().to_string());
    assert!(!uncommented.contains("/etc/rekey/"), "an example file is not substituted:\n{uncommented}");
    let head = "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nmaster_key_file = \"master.key\"\n";
    let path = tmp.path().join("coordinator.toml");
    let config = rekey_coordinator::config::Config::from_str(&path, &format!("{head}{uncommented}"))
        .unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    let kinds: Vec<&str> = config.secrets.iter().map(|s| s.provider.kind()).collect();
    assert_eq!(kinds, vec!["random", "aws-iam", "vault", "http", "command"]);
    assert_eq!(config.secrets[0].sinks.len(), 1);
}

#[test]
fn a_vault_sink_logs_in_with_approle_and_writes_once_per_version() {
    let bao = OpenBao::start();
    let sfx = random_suffix();
    let (st, body) = bao.api("POST", "sys/auth/approle", Some(json!({ "type": "approle" })));
    assert!(st == 204 || st == 400, "enable approle: {st} {body}"); // 400: already enabled on a shared server
    let policy = format!(
        "path \"secret/data/sink-{sfx}/*\" {{ capabilities = [\"create\", \"read\", \"update\"] }}\n\
         path \"secret/metadata/sink-{sfx}/*\" {{ capabilities = [\"read\", \"update\"] }}\n"
    );
    assert_eq!(bao.api("PUT", &format!("sys/policies/acl/rekey-{sfx}"), Some(json!({ "policy": policy }))).0, 204);
    let role = format!("auth/approle/role/rekey-{sfx}");
    assert_eq!(bao.api("POST", &role, Some(json!({ "token_policies": [format!("rekey-{sfx}")] }))).0, 204);
    let role_id = bao.api("GET", &format!("{role}/role-id"), None).1["data"]["role_id"].as_str().unwrap().to_string();
    let secret_id =
        bao.api("POST", &format!("{role}/secret-id"), None).1["data"]["secret_id"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (rf, sf) = (dir.path().join("role-id"), dir.path().join("secret-id"));
    write_secret_file(&rf, &role_id);
    write_secret_file(&sf, &secret_id);
    let config: rekey_providers::SinkConfig = serde_json::from_value(json!({
        "kind": "vault", "address": bao.addr, "path": format!("sink-{sfx}/{{secret}}"),
        "role_id_file": rf, "secret_id_file": sf,
    }))
    .unwrap();
    config.validate().unwrap();
    let sink = rekey_providers::build_sink(&config, "svc").unwrap();
    let fields: rekey_providers::Fields =
        [("token".to_string(), rekey_common::secret::SecretBytes::new(b"tk_approle_value_1".to_vec()))].into();
    let w = rekey_providers::SinkWrite { secret: "svc", rotation_id: "rot-a", version: "v-a", fields: &fields };
    let first = block_on(sink.write(&w)).unwrap();
    assert!(first.starts_with("wrote version v-a of svc") && first.ends_with("kv version 1"), "{first}");
    let again = block_on(sink.write(&w)).unwrap();
    assert!(again.starts_with("already held") && again.ends_with("kv version 1"), "{again}");
    let (_, kv) = bao.api("GET", &format!("secret/data/sink-{sfx}/svc"), None);
    assert_eq!(kv["data"]["data"], json!({ "token": "tk_approle_value_1" }));
    assert_eq!(kv["data"]["metadata"]["custom_metadata"]["rekey_version"], "v-a");
    // A path the role may not write: a precise, non-retryable refusal.
    let denied: rekey_providers::SinkConfig = serde_json::from_value(json!({
        "kind": "vault", "address": bao.addr, "path": "elsewhere/{secret}", "role_id_file": rf, "secret_id_file": sf,
    }))
    .unwrap();
    let e = block_on(rekey_providers::build_sink(&denied, "svc").unwrap().write(&w)).unwrap_err();
    assert!(!e.retryable() && e.to_string().contains("403"), "{e}");
    assert!(!e.to_string().contains("tk_approle_value_1"));
}

// ---------------------------------------------------------------- breach response on moto

/// A webhook receiver on loopback: records (signature header, body) of every POST.
pub(crate) struct Hook {
    pub url: String,
    pub got: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

pub(crate) fn hook() -> Hook {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for s in l.incoming().take(50).flatten() {
            let mut r = BufReader::new(s.try_clone().unwrap());
            let (mut sig, mut len) = (String::new(), 0usize);
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("x-rekey-signature:") {
                    sig = v.trim().to_string();
                }
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = r.read_exact(&mut body);
            g.lock().unwrap().push((sig, String::from_utf8_lossy(&body).into_owned()));
            let mut s = s;
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    Hook { url, got }
}

/// DESIGN "the retired key as a tripwire": use of the old key after its
/// deactivation (a signed IAM GetUser — moto records last use, also for an
/// inactive key) raises a signed webhook alert and, with the reactivate
/// policy, halts the rotation with the key active again.
#[test]
fn use_of_the_deactivated_key_alerts_the_webhook_and_reactivates_it() {
    let w = iam::world(&[aws_sdk_iam::types::StatusType::Active]);
    let (old_id, old_secret) = w.keys[0].clone();
    let h = hook();
    let key_file = w.credentials_file.with_file_name("webhook.key");
    write_secret_file(&key_file, "webhook-signing-secret-0123456789");
    let f = fleet(2, &["aws-app"], |_| {
        w.catalog("aws-app").replace("grace = \"1s\"", "grace = \"60s\"")
            + &format!("\n[alerts]\nwebhook_url = \"{}\"\nwebhook_secret_file = \"{}\"\n", h.url, key_file.display())
    });
    let id = start(&f.c, "aws-app");
    wait_state(&f.c, &id, &[RotationState::Grace]);
    assert_eq!(w.keys_now().iter().find(|(k, _)| *k == old_id).map(|(_, a)| *a), Some(false), "old key deactivated");
    // Evidence before deactivation: the provider was asked and saw no use after the switch.
    let r = f.c.rotation(&id);
    let ev = &r.evidence;
    assert!(ev.iter().any(|e| e.phase == RotationState::Verified && e.verdict.contains("ok")), "{ev:?}");

    // Someone still uses the old key (a forgotten host, or the attacker).
    std::thread::sleep(Duration::from_millis(1100));
    let _ = w.get_user_with(&old_id, &old_secret);
    let r = wait_state(&f.c, &id, &[RotationState::Halted]);
    assert!(r.halt_reason.as_deref().unwrap().contains("reactivated"), "{r:#?}");
    assert_eq!(w.keys_now().iter().find(|(k, _)| *k == old_id).map(|(_, a)| *a), Some(true), "old key active again");
    // Everyone is still on the new key; abort makes no sense any more, resume re-checks.
    assert!(!f.c.cli(&["rotate", "abort", &id]).status.success());

    // The webhook got a signed alert naming the key id, never a secret.
    wait_for("webhook", || !h.got.lock().unwrap().is_empty());
    let (sig, body) = h.got.lock().unwrap()[0].clone();
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"webhook-signing-secret-0123456789");
    assert_eq!(sig, format!("sha256={}", hex::encode(ring::hmac::sign(&k, body.as_bytes()).as_ref())), "bad signature");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["alert"]["kind"], "old_version_used_during_grace");
    assert_eq!(v["alert"]["severity"], "critical");
    assert!(v["alert"]["message"].as_str().unwrap().contains(&old_id));
    assert!(!body.contains(&old_secret));
    let alerts = f.c.alerts();
    assert_eq!(alerts[0].kind, v1::AlertKind::OldVersionUsedDuringGrace);
    wait_for("delivery recorded", || f.c.alerts()[0].delivery == "delivered");
    let report = f.c.cli_ok(&["report", &id]);
    assert!(report.contains("## Revocation evidence") && report.contains("after it was deactivated"), "{report}");
    for a in &f.agents {
        for s in a.values_seen() {
            let s = String::from_utf8_lossy(&s).into_owned();
            if s.starts_with("AKIA") {
                continue; // access key ids are public identifiers, named on purpose
            }
            assert!(!body.contains(&s) && !report.contains(&s) && !f.c.logs().contains(&s), "a secret value leaked");
        }
    }
}

/// Evidence-gated revocation: every host confirmed, but the provider shows the
/// old key used after they all switched — an undeclared consumer. Revocation
/// is held (the old key stays active), an alert is raised, the rotation halts.
#[test]
fn revocation_is_held_when_the_old_key_is_used_after_every_host_switched() {
    let w = iam::world(&[aws_sdk_iam::types::StatusType::Active]);
    let (old_id, old_secret) = w.keys[0].clone();
    let f = fleet(2, &["aws-app"], |_| w.catalog("aws-app").replace("check_every = \"1s\"", "check_every = \"4s\""));
    let id = start(&f.c, "aws-app");
    wait_state(&f.c, &id, &[RotationState::Verified]);
    std::thread::sleep(Duration::from_millis(1500));
    let _ = w.get_user_with(&old_id, &old_secret); // the forgotten consumer
    let r = wait_state(&f.c, &id, &[RotationState::Halted, RotationState::Deactivating, RotationState::Grace]);
    assert_eq!(r.state, RotationState::Halted, "revocation went ahead despite the use: {r:#?}");
    let reason = r.halt_reason.as_deref().unwrap();
    assert!(reason.contains(&old_id) && reason.contains("rekey scope"), "{reason}");
    assert_eq!(
        w.keys_now().iter().find(|(k, _)| *k == old_id).map(|(_, a)| *a),
        Some(true),
        "old key must stay active"
    );
    let alerts = f.c.alerts();
    assert_eq!(alerts[0].kind, v1::AlertKind::OldVersionUsed);
    assert_eq!(alerts[0].delivery, "not_configured");
    let status = f.c.cli_ok(&["rotate", "status", &id]);
    assert!(status.contains("revocation evidence") && status.contains("revocation held"), "{status}");
}

/// AWS end to end with real agents: an IAM user's key is deployed on 3 hosts,
/// each running the demo service in AWS mode (its /health is a SigV4-signed STS
/// GetCallerIdentity against moto); the rotation rewrites every host's
/// credentials file, restarts every service, confirms each healthy on the new
/// key, then revokes the old one — which moto refuses from then on.
#[test]
fn aws_keys_rotate_on_real_agents_with_services_checking_sts() {
    use rekey_tests::Agent;
    let w = iam::world(&[aws_sdk_iam::types::StatusType::Active]);
    let (old_id, old_secret) = w.keys[0].clone();
    let tmp = tempfile::Builder::new().prefix("rekey-aws-agents-").tempdir().unwrap();
    let c = Coordinator::start(&tmp.path().join("c"), &w.catalog("aws-app"));
    let svc = rekey_tests::bins().demo_service.display().to_string();
    let mut pidfiles = Vec::new();
    let mut hosts = Vec::new();
    for i in 1..=3 {
        let name = format!("host-{i}");
        let dir = tmp.path().join(format!("svc-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        write_secret_file(
            &dir.join("aws.env"),
            &format!("AWS_ACCESS_KEY_ID={old_id}\nAWS_SECRET_ACCESS_KEY={old_secret}\nAWS_REGION=us-east-1\n"),
        );
        let port = rekey_tests::free_port();
        let d = dir.display();
        let args: Vec<String> = [
            svc.as_str(),
            "--detach",
            "--replace",
            "--pidfile",
            &format!("{d}/service.pid"),
            "--credentials",
            &format!("{d}/aws.env"),
            "--aws-sts",
            &w.moto.url,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log",
            &format!("{d}/service.log"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = std::process::Command::new(&args[0]).args(&args[1..]).output().unwrap();
        assert!(out.status.success(), "service {name}: {}", String::from_utf8_lossy(&out.stderr));
        pidfiles.push(dir.join("service.pid"));
        let cmd = args.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ");
        let config = format!(
            "state_dir = \"state\"\n[reconnect]\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n\n\
             [[secret]]\nname = \"aws-app\"\n  [[secret.file]]\n  path = \"{d}/aws.env\"\n  kind = \"env-file\"\n  \
             keys = {{ AWS_ACCESS_KEY_ID = \"access_key_id\", AWS_SECRET_ACCESS_KEY = \"secret_access_key\" }}\n  \
             [secret.restart]\n  kind = \"command\"\n  command = [{cmd}]\n  timeout = \"20s\"\n  \
             [secret.health]\n  kind = \"http\"\n  url = \"http://127.0.0.1:{port}/health\"\n  body_contains = \"aws accepts\"\n  \
             retries = 10\n  interval = \"300ms\"\n  timeout = \"3s\"\n"
        );
        let mut a = Agent::with_config(tmp.path(), &name, &config);
        a.enroll_ok(&c, &[]);
        a.start();
        hosts.push((a, dir, port));
    }
    struct Kill(Vec<PathBuf>);
    impl Drop for Kill {
        fn drop(&mut self) {
            for p in &self.0 {
                if let Ok(pid) = std::fs::read_to_string(p) {
                    let _ = std::process::Command::new("kill").arg(pid.trim()).status();
                }
            }
        }
    }
    let _kill = Kill(pidfiles);
    wait_for("agents connected", || hosts.iter().all(|(a, _, _)| c.is_connected(&a.name)));
    let health = |port: u16| {
        rekey_tests::fixtures::http(&format!("127.0.0.1:{port}"), "GET", "/health", &[], b"").map(|r| r.0).unwrap_or(0)
    };
    for (_, _, port) in &hosts {
        assert_eq!(health(*port), 200, "services start healthy on the deployed key");
    }

    let out = c.cli(&["rotate", "start", "aws-app", "--wait"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), c.logs());
    let mut new_id = String::new();
    for (a, dir, port) in &hosts {
        let env = std::fs::read_to_string(dir.join("aws.env")).unwrap();
        assert!(!env.contains(&old_id) && !env.contains(&old_secret), "{}: old key still in its file", a.name);
        assert!(env.contains("AWS_REGION=us-east-1"), "{}: other lines must be kept", a.name);
        new_id = env.lines().find_map(|l| l.strip_prefix("AWS_ACCESS_KEY_ID=")).unwrap().to_string();
        assert_eq!(health(*port), 200, "{} is not healthy on the new key", a.name);
    }
    let new_secret = std::fs::read_to_string(hosts[0].1.join("aws.env"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("AWS_SECRET_ACCESS_KEY=").map(str::to_string))
        .unwrap();
    // Revoked at AWS: the old key is refused, the new one works.
    assert_eq!(w.get_user_with(&old_id, &old_secret), Err("InvalidClientTokenId".to_string()));
    assert_eq!(w.get_user_with(&new_id, &new_secret), Ok(()));
    assert_eq!(w.keys_now(), vec![(new_id.clone(), true)]);
    for (a, _, _) in &hosts {
        assert!(!a.logs().contains(&new_secret) && !a.logs().contains(&old_secret), "{}: a secret in its log", a.name);
    }
    assert!(!c.logs().contains(&new_secret) && !c.logs().contains(&old_secret), "a secret in rekeyd's log");
}
