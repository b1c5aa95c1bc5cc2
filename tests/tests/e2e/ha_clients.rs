//! The client side of several rekeyd replicas: agents and the CLI find the
//! leader by themselves.
//!
//! The follower here is a real tonic server built from the generated
//! `AgentService`/`AdminService` traits, over real mTLS with a server
//! certificate issued by the real rekeyd's CA (same CA, same name, as every
//! replica presents). It refuses every call the way a follower refuses
//! those only the leader serves (`rekey_common::ha::follower_status`),
//! pointing at the real rekeyd, or at nobody (an election). The real
//! agents and the real CLI are pointed at it first.

use rekey_common::ha;
use rekey_common::tls;
use rekey_coordinator::{config::Config, crypto, pki::Ca, store::Store};
use rekey_proto::v1::admin_service_server::{AdminService, AdminServiceServer};
use rekey_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use rekey_proto::v1::*;
use rekey_tests::{Agent, Coordinator, free_port, wait_for};
use rekey_types::v1::{HostState, JoinTokenView, RotationState, RotationView};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

const SECRET: &str = "app-token";

fn catalog() -> String {
    format!(
        r#"
[[secret]]
name = "{SECRET}"
all_agents = true
provider = {{ kind = "random", length = 32, prefix = "tok_" }}
[secret.rollout]
canary = 0
host_deadline = "60s"
[secret.revocation]
monitor = "0s"
grace = "1s"
"#
    )
}

/// An agent consuming the secret into `dir/app.conf`, looking for the
/// coordinator at `coordinators` (a TOML value).
fn agent_config(dir: &Path, coordinators: &str) -> String {
    format!(
        r#"coordinators = {coordinators}
state_dir = "state"
[reconnect]
initial_backoff = "100ms"
max_backoff = "1s"

[[secret]]
name = "{SECRET}"
  [[secret.file]]
  path = "{}/app.conf"
  kind = "template"
  template = "token = {{{{ value }}}}\n"
"#,
        dir.display()
    )
}

/// The fake follower's calls, by RPC name, in order.
type Calls = Arc<Mutex<Vec<&'static str>>>;

#[derive(Clone)]
struct Refuser {
    leader: Option<String>,
    calls: Calls,
}

impl Refuser {
    fn refuse<T>(&self, rpc: &'static str) -> Result<T, Status> {
        self.calls.lock().unwrap().push(rpc);
        Err(ha::follower_status("fake-follower", self.leader.as_deref()))
    }
}

#[tonic::async_trait]
impl AgentService for Refuser {
    async fn enroll(&self, _: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        self.refuse("Enroll")
    }

    type SessionStream = tokio_stream::Empty<Result<CoordinatorMessage, Status>>;

    async fn session(&self, _: Request<Streaming<AgentMessage>>) -> Result<Response<Self::SessionStream>, Status> {
        self.refuse("Session")
    }
}

/// Every admin call refused the same way (a macro, so the list is the proto's).
macro_rules! refuse_admin {
    ($($rpc:ident($req:ident) -> $resp:ident;)*) => {
        #[tonic::async_trait]
        impl AdminService for Refuser {
            $(async fn $rpc(&self, _: Request<$req>) -> Result<Response<$resp>, Status> {
                self.refuse(stringify!($rpc))
            })*

            type WatchRotationStream = tokio_stream::Empty<Result<JsonResponse, Status>>;

            async fn watch_rotation(
                &self,
                _: Request<GetRotationRequest>,
            ) -> Result<Response<Self::WatchRotationStream>, Status> {
                self.refuse("watch_rotation")
            }
        }
    };
}

refuse_admin! {
    create_token(CreateTokenRequest) -> CreateTokenResponse;
    list_agents(ListAgentsRequest) -> ListAgentsResponse;
    revoke_agent(RevokeAgentRequest) -> RevokeAgentResponse;
    list_secrets(ListSecretsRequest) -> JsonResponse;
    start_rotation(StartRotationRequest) -> JsonResponse;
    plan_rotation(PlanRotationRequest) -> JsonResponse;
    get_rotation(GetRotationRequest) -> JsonResponse;
    list_rotations(ListRotationsRequest) -> JsonResponse;
    control_rotation(ControlRotationRequest) -> JsonResponse;
    list_versions(ListVersionsRequest) -> JsonResponse;
    list_audit(ListAuditRequest) -> JsonResponse;
    open_incident(OpenIncidentRequest) -> JsonResponse;
    list_alerts(ListAlertsRequest) -> JsonResponse;
    get_incident(GetIncidentRequest) -> JsonResponse;
    list_incidents(ListIncidentsRequest) -> JsonResponse;
    close_incident(GetIncidentRequest) -> JsonResponse;
    get_report(GetReportRequest) -> ReportResponse;
    verify_audit(VerifyAuditRequest) -> JsonResponse;
    backup(BackupRequest) -> BackupResponse;
    scope(ScopeRequest) -> JsonResponse;
    create_operator(CreateOperatorRequest) -> CreateOperatorResponse;
    list_operators(ListOperatorsRequest) -> JsonResponse;
    revoke_operator(RevokeOperatorRequest) -> JsonResponse;
    list_coordinators(ListCoordinatorsRequest) -> JsonResponse;
    create_console_login(CreateConsoleLoginRequest) -> CreateConsoleLoginResponse;
}

/// A follower on its own runtime, with a certificate from `c`'s CA.
struct Follower {
    addr: String,
    calls: Calls,
    stop: CancellationToken,
    _rt: tokio::runtime::Runtime,
}

impl Follower {
    /// Stops `c` for a moment to read its CA from the store (sled is
    /// single-process), issues a server certificate, and starts `c` again.
    fn start(c: &mut Coordinator, leader: Option<String>) -> Follower {
        tls::install_crypto_provider();
        c.stop();
        let config = Config::from_file(&c.config).expect("coordinator config");
        let master = crypto::load_master_key(&config.master_key_file).expect("master key");
        let (chain, key, ca) = {
            let store = Store::open(&config.store_dir()).expect("store");
            let (ca, _) = Ca::load_or_create(&store, &master).expect("ca");
            let (chain, key) = ca.issue_server(&[], std::time::Duration::from_secs(3600)).expect("server cert");
            (chain, key, ca.cert_der().clone())
        };
        c.restart();
        let server_tls = tls::server_config(&[ca], chain, key).expect("server tls");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let calls = Calls::default();
        let refuser = Refuser { leader, calls: calls.clone() };
        let stop = CancellationToken::new();
        let _in_rt = rt.enter();
        let incoming = tls::tls_incoming(listener, server_tls, tls::AcceptLimits::default(), stop.clone());
        let stopped = stop.clone();
        rt.spawn(
            tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(refuser.clone()))
                .add_service(AdminServiceServer::new(refuser))
                .serve_with_incoming_shutdown(incoming, async move { stopped.cancelled().await }),
        );
        Follower { addr, calls, stop, _rt: rt }
    }

    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The CLI with the coordinator's operator credential and `args` as given
/// (`--coordinator` included).
fn cli(c: &Coordinator, args: &[&str]) -> std::process::Output {
    std::process::Command::new(&rekey_tests::bins().cli)
        .arg("--operator-dir")
        .arg(c.operator_dir())
        .args(args)
        .env_remove("REKEY_COORDINATOR")
        .output()
        .expect("run rekey")
}

/// A dead address: a port nothing listens on.
fn dead() -> String {
    format!("127.0.0.1:{}", free_port())
}

#[test]
fn an_agent_and_the_cli_pointed_at_a_follower_end_up_on_the_leader() {
    let tmp = tempfile::Builder::new().prefix("rekey-ha-").tempdir().unwrap();
    let mut c = Coordinator::start(&tmp.path().join("c"), &catalog());
    let leader = c.addr();
    let f = Follower::start(&mut c, Some(leader));
    let both = format!("{},{}", f.addr, c.addr());

    // (b) A change refused by the follower is sent on to the leader, and -v says so.
    let out = cli(&c, &["--coordinator", &both, "-v", "token", "create", "--host", "host-1", "-o", "json"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("{} is a follower; sending the call to the leader at {}", f.addr, c.addr())),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("{} answered", c.addr())), "{stderr}");
    assert_eq!(f.calls(), ["create_token"], "the follower was asked first");
    let token: JoinTokenView = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(token.coordinator, c.addr(), "the view names the replica that made the token");

    // Enrollment follows the hint too; the token was made on the leader.
    let dir = tmp.path().join("agent-host-1");
    std::fs::create_dir_all(&dir).unwrap();
    let config = agent_config(&dir, &format!("[\"{}\", \"{}\"]", f.addr, c.addr()));
    let mut agent = Agent::with_config(tmp.path(), "host-1", &config);
    let out = agent.enroll(&both, &token.token, &token.ca_fingerprint);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("with {}", c.addr())), "{}", text(&out.stdout));
    assert_eq!(f.calls(), ["create_token", "Enroll"]);

    // (a) The agent asks the follower first, moves to the leader at once, and
    // a rotation completes on it.
    agent.start();
    wait_for("host-1 connected to the leader", || c.is_connected("host-1"));
    assert_eq!(f.calls(), ["create_token", "Enroll", "Session"]);
    assert!(agent.logs().contains("a follower named the leader, moving there"), "{}", agent.logs());
    let out = cli(&c, &["--coordinator", &both, "rotate", "start", SECRET, "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = serde_json::from_slice::<RotationView>(&out.stdout).unwrap().id;
    let mut last = None;
    wait_for("the rotation completes", || {
        let r = c.rotation(&id);
        let done = r.state == RotationState::Completed;
        last = Some(r);
        done
    });
    let r = last.unwrap();
    assert_eq!(r.hosts["host-1"].state, HostState::Healthy);
    let conf = std::fs::read_to_string(dir.join("app.conf")).unwrap();
    assert!(conf.starts_with("token = tok_"), "the new value was applied");

    // Reads are served by the first replica that answers: the follower here
    // refuses them, so the CLI moved to the leader; `rotate status` works.
    let out = cli(&c, &["--coordinator", &both, "rotate", "status", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn dead_addresses_are_skipped_and_no_leader_is_said_plainly() {
    let tmp = tempfile::Builder::new().prefix("rekey-ha-").tempdir().unwrap();
    let mut c = Coordinator::start(&tmp.path().join("c"), &catalog());
    let f = Follower::start(&mut c, None);
    let gone = dead();

    // (c) An agent given [dead, rekeyd] connects to rekeyd.
    let dir = tmp.path().join("agent-host-1");
    std::fs::create_dir_all(&dir).unwrap();
    let mut agent =
        Agent::with_config(tmp.path(), "host-1", &agent_config(&dir, &format!("[\"{gone}\", \"{}\"]", c.addr())));
    let (token, fp) = c.token("host-1", &[]);
    let out = agent.enroll(&format!("{gone},{}", c.addr()), &token, &fp);
    assert!(out.status.success(), "{}", text(&out.stderr));
    agent.start();
    wait_for("host-1 connected past the dead address", || c.is_connected("host-1"));
    assert!(agent.logs().contains("coordinator not reachable, trying the next"), "{}", agent.logs());

    // The CLI reads from the first replica that answers.
    let out = cli(&c, &["--coordinator", &gone, "--coordinator", &c.addr(), "agents"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("host-1"), "{}", text(&out.stdout));

    // A follower that knows no leader, and nothing else up: one clear line.
    let out = cli(&c, &["--coordinator", &format!("{},{gone}", f.addr), "token", "create", "--host", "x"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "rekey: error: no leader: an election is in progress or every replica is down; tried {} (a follower; no leader is known), {gone} (",
            f.addr
        )),
        "{stderr}"
    );
    assert_eq!(f.calls(), ["create_token"]);

    // Enrollment with no leader reachable says what it tried.
    let other = Agent::new(tmp.path(), "host-2", &[SECRET]);
    let (token, fp) = c.token("host-2", &[]);
    let out = other.enroll(&format!("{},{gone}", f.addr), &token, &fp);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("no coordinator accepted the enrollment (no leader reachable): tried "), "{stderr}");
    assert!(stderr.contains(&format!("{} (this coordinator (fake-follower) is a follower;", f.addr)), "{stderr}");
    assert!(!other.state_dir().join("identity.pem").exists(), "nothing enrolled");
    // The token was not spent: the leader takes it.
    let out = other.enroll(&c.addr(), &token, &fp);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn bad_coordinator_addresses_are_refused_naming_the_file_and_field() {
    let tmp = tempfile::Builder::new().prefix("rekey-ha-").tempdir().unwrap();
    let cases = [
        (
            "coordinator = \"a:1\"\ncoordinators = [\"b:2\"]\n",
            "field `coordinators`: give either `coordinator` (one address) or `coordinators` (a list), not both",
        ),
        ("coordinators = []\n", "field `coordinators`: expected at least one HOST:PORT, got an empty list"),
        ("coordinators = [\"a:1\", \"b:http\"]\n", "field `coordinators[1]`: expected HOST:PORT, got \"b:http\""),
        ("coordinator = \"nohost\"\n", "field `coordinator`: expected HOST:PORT, got \"nohost\""),
    ];
    for (i, (fields, want)) in cases.iter().enumerate() {
        let name = format!("bad-{i}");
        let mut agent = Agent::with_config(tmp.path(), &name, &format!("{fields}state_dir = \"state\"\n"));
        agent.start();
        let (status, log) = agent.wait_exit().unwrap();
        assert!(!status.success(), "{name} must not run");
        let config = agent.config.display().to_string();
        assert!(log.contains(&format!("{config}: {want}")), "{name}: want {want:?} in:\n{log}");
        assert!(!agent.state_dir().exists(), "{name}: nothing was created");
    }

    // The command lines say which argument is wrong.
    let agent = Agent::new(tmp.path(), "host-x", &[]);
    let out = agent.enroll("127.0.0.1:1,nohost", "t.t", &format!("sha256:{}", "0".repeat(64)));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("invalid --coordinator: expected HOST:PORT, got \"nohost\""), "{out:?}");
    assert!(!agent.state_dir().exists());
    let out = std::process::Command::new(&rekey_tests::bins().cli)
        .args(["--operator-dir", "/nonexistent", "--coordinator", "a:1,", "agents"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert_eq!(stderr, "rekey: error: invalid --coordinator: expected HOST:PORT, got \"\"\n");
}
