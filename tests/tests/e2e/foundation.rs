//! Foundation: enrollment, the trust model's refusals, sessions, registry,
//! restarts, revocation, bad input.

use crate::grpc;
use rekey_common::tls;
use rekey_proto::PROTOCOL_VERSION;
use rekey_proto::v1::{
    AgentMessage, CreateTokenRequest, EnrollRequest, Heartbeat, Hello, ListAgentsRequest, agent_message,
    coordinator_message,
};
use rekey_tests::{Agent, Coordinator, TestCluster, wait_for};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("rekey-test-").tempdir().unwrap()
}

#[test]
fn two_agents_enroll_connect_and_are_listed() {
    let c = TestCluster::new(2, &["api-key", "db-password"]);
    let agents = c.coordinator.agents();
    assert_eq!(agents.len(), 2);
    for (i, a) in agents.iter().enumerate() {
        assert_eq!(a.name, format!("host-{}", i + 1));
        assert!(a.connected);
        assert!(!a.revoked);
        assert_eq!(a.labels["env"], "test");
        assert_eq!(a.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(a.secrets, ["api-key", "db-password"]);
        assert!(a.cert_expires.starts_with("20"), "{a:?}");
    }
    // The private key stays on the host, readable by its owner only.
    let id = c.agents[0].state_dir().join("identity.pem");
    assert_eq!(std::fs::metadata(&id).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(std::fs::read_to_string(&id).unwrap().contains("PRIVATE KEY"));
    // The human table shows the same.
    let table = c.coordinator.cli_ok(&["agents"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("host-2") && table.contains("connected") && table.contains("env=test"), "{table}");
}

#[test]
fn a_token_is_single_use() {
    let dir = tmp();
    let c = Coordinator::start(&dir.path().join("c"), "");
    let (token, fp) = c.token("web-1", &[]);
    let a = Agent::new(dir.path(), "web-1", &[]);
    assert!(a.enroll(&c.addr(), &token, &fp).status.success());
    let b = Agent::new(dir.path(), "web-1b", &[]);
    let out = b.enroll(&c.addr(), &token, &fp);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already used"), "{}", stderr(&out));
    assert!(!b.state_dir().join("identity.pem").exists());
    // Only one agent exists.
    assert_eq!(c.agents().len(), 1);
}

#[test]
fn an_expired_token_is_refused() {
    let dir = tmp();
    let c = Coordinator::start(&dir.path().join("c"), "");
    let (token, fp) = c.token("web-1", &["--ttl", "1s"]);
    let a = Agent::new(dir.path(), "web-1", &[]);
    std::thread::sleep(Duration::from_millis(2100));
    let out = a.enroll(&c.addr(), &token, &fp);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("expired"), "{}", stderr(&out));
    assert!(c.agents().is_empty());
}

#[test]
fn unknown_and_malformed_tokens_are_refused() {
    let dir = tmp();
    let c = Coordinator::start(&dir.path().join("c"), "");
    let (token, fp) = c.token("web-1", &[]);
    let a = Agent::new(dir.path(), "web-1", &[]);
    let (id, _) = token.split_once('.').unwrap();
    let forged = format!("{id}.{}", "0".repeat(32));
    let out = a.enroll(&c.addr(), &forged, &fp);
    assert!(stderr(&out).contains("unknown join token"), "{}", stderr(&out));
    let out = a.enroll(&c.addr(), "not-a-token", &fp);
    assert!(stderr(&out).contains("malformed join token"), "{}", stderr(&out));
    // The real token was not spent by those attempts.
    assert!(a.enroll(&c.addr(), &token, &fp).status.success());
}

#[test]
fn a_wrong_ca_fingerprint_never_sends_the_token() {
    let dir = tmp();
    let a_coord = Coordinator::start(&dir.path().join("a"), "");
    let b_coord = Coordinator::start(&dir.path().join("b"), "");
    let (_, fp_a) = a_coord.token("x", &[]);
    let (token_b, fp_b) = b_coord.token("web-1", &[]);
    assert_ne!(fp_a, fp_b);
    let agent = Agent::new(dir.path(), "web-1", &[]);
    // Pinned to A, talking to B: refused before the token leaves the host.
    let out = agent.enroll(&b_coord.addr(), &token_b, &fp_a);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("does not match --ca-fingerprint") && err.contains("was not sent"), "{err}");
    assert!(err.contains(&fp_b), "the error should show what B presented: {err}");
    // B never received it: the token is still unused and enrolls with the right pin.
    assert!(!b_coord.logs().contains("agent enrolled"));
    assert!(agent.enroll(&b_coord.addr(), &token_b, &fp_b).status.success());
    // A garbage fingerprint is refused before any connection.
    let out = agent.enroll(&b_coord.addr(), &token_b, "sha256:zz");
    assert!(stderr(&out).contains("invalid --ca-fingerprint"), "{}", stderr(&out));
}

#[test]
fn a_client_without_certificate_gets_nothing_but_enrollment() {
    let dir = tmp();
    let c = Coordinator::start(&dir.path().join("c"), "");
    let rt = grpc::rt();
    let cfg = tls::anonymous_client_config(&grpc::ca_of(&c.operator_dir())).unwrap();
    rt.block_on(async {
        let mut admin = grpc::admin(&c.addr(), cfg.clone()).await.unwrap();
        let e = admin.list_agents(ListAgentsRequest::default()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("requires a client certificate"), "{e:?}");
        let e = admin.create_token(CreateTokenRequest { host: "evil".into(), ..Default::default() }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut agent = grpc::agent(&c.addr(), cfg).await.unwrap();
        let hello = AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello { protocol_version: PROTOCOL_VERSION, ..Default::default() })),
        };
        let e = agent.session(tokio_stream::iter(vec![hello])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    });
    assert!(c.agents().is_empty());
}

#[test]
fn a_certificate_from_another_ca_is_refused() {
    let dir = tmp();
    let a = Coordinator::start(&dir.path().join("a"), "");
    let b = Coordinator::start(&dir.path().join("b"), "");
    // B's operator credential, trusting A's CA for the server side: the
    // handshake completes from the client's view but A refuses the client.
    let ob = b.operator_dir();
    let chain = tls::certs_from_pem(&std::fs::read_to_string(ob.join("operator.pem")).unwrap(), "op").unwrap();
    let key = tls::key_from_pem(&std::fs::read_to_string(ob.join("operator.key")).unwrap(), "op").unwrap();
    let cfg = tls::client_config(&grpc::ca_of(&a.operator_dir()), chain, key).unwrap();
    grpc::rt().block_on(async {
        match grpc::admin(&a.addr(), cfg).await {
            Err(_) => {}
            Ok(mut admin) => {
                let r = admin.create_token(CreateTokenRequest { host: "evil".into(), ..Default::default() }).await;
                assert!(r.is_err(), "a foreign operator certificate was accepted");
            }
        }
    });
    // The CLI with B's credential against A: one clear line, non-zero exit.
    let out = std::process::Command::new(&rekey_tests::bins().cli)
        .args(["--operator-dir"])
        .arg(&ob)
        .args(["--coordinator", &a.addr(), "agents"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).starts_with("rekey: error: "), "{}", stderr(&out));
    assert!(a.logs().lines().all(|l| !l.contains("join token created")));
}

#[test]
fn an_agent_certificate_cannot_call_the_admin_api() {
    let c = TestCluster::new(1, &[]);
    let cfg = grpc::agent_config(&c.agents[0].state_dir(), &c.coordinator.operator_dir());
    grpc::rt().block_on(async {
        let mut admin = grpc::admin(&c.coordinator.addr(), cfg).await.unwrap();
        let e = admin.list_agents(ListAgentsRequest::default()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("agent certificates cannot call the admin API"), "{e:?}");
        let e = admin.create_token(CreateTokenRequest { host: "evil".into(), ..Default::default() }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    });
}

#[test]
fn a_revoked_agent_is_cut_off_and_stays_out() {
    let mut c = TestCluster::new(2, &[]);
    let out = c.coordinator.cli_ok(&["agent", "revoke", "host-1"]);
    assert!(out.contains("revoked agent host-1") && out.contains("session was closed"), "{out}");
    // The live agent is told and stops with a clear message; never a silent retry loop.
    let (status, log) = c.agents[0].wait_exit().unwrap();
    assert!(!status.success());
    assert!(log.contains("was revoked"), "{log}");
    let a = c.coordinator.agent("host-1").unwrap();
    assert!(a.revoked);
    assert!(!a.connected);
    // Restarted, it is refused on its first call and stops again.
    c.agents[0].start();
    let (status, log) = c.agents[0].wait_exit().unwrap();
    assert!(!status.success());
    assert!(log.contains("revoked"), "{log}");
    // Its certificate opens no session, even speaking the protocol directly.
    let cfg = grpc::agent_config(&c.agents[0].state_dir(), &c.coordinator.operator_dir());
    grpc::rt().block_on(async {
        let mut agent = grpc::agent(&c.coordinator.addr(), cfg).await.unwrap();
        let hello = AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello { protocol_version: PROTOCOL_VERSION, ..Default::default() })),
        };
        let e = agent.session(tokio_stream::iter(vec![hello])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    });
    // The other agent is untouched.
    assert!(c.coordinator.is_connected("host-2"));
    // Revoking an unknown name is a clear error.
    let out = c.coordinator.cli(&["agent", "revoke", "nope"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no agent named \"nope\""), "{}", stderr(&out));
    // Revocation survives a coordinator restart.
    c.coordinator.restart();
    c.agents[0].start();
    let (status, _) = c.agents[0].wait_exit().unwrap();
    assert!(!status.success());
    wait_for("host-2 back", || c.coordinator.is_connected("host-2"));
}

#[test]
fn agents_and_tokens_survive_a_coordinator_crash_and_agents_reconnect() {
    let mut c = TestCluster::new(2, &["api-key"]);
    let (spare_token, fp) = c.coordinator.token("late-host", &[]);
    c.coordinator.kill();
    // Agents notice and back off; nothing else to do while it is down.
    c.coordinator.restart();
    c.wait_all_connected();
    let agents = c.coordinator.agents();
    assert_eq!(agents.len(), 2);
    assert!(agents.iter().all(|a| a.secrets == ["api-key"]));
    // The token issued before the crash still works after it.
    let late = Agent::new(c.tmp.path(), "late-host", &[]);
    let out = late.enroll(&c.coordinator.addr(), &spare_token, &fp);
    assert!(out.status.success(), "{}", stderr(&out));
    // A clean stop (SIGTERM) drains and exits 0; agents come back again.
    assert!(c.coordinator.stop().unwrap().success());
    c.coordinator.restart();
    c.wait_all_connected();
    for a in &mut c.agents {
        assert!(a.is_running(), "agent {} gave up while the coordinator was down", a.name);
    }
}

#[test]
fn certificates_renew_on_the_stream_and_expired_ones_stop_the_agent() {
    // 6s certificates: renewal at ~2/3 of the lifetime.
    let c = TestCluster::with_config(1, &[], "[pki]\nagent_cert_ttl = \"6s\"\n");
    let first = c.coordinator.agent("host-1").unwrap().cert_serial;
    wait_for("certificate renewal", || c.coordinator.agent("host-1").unwrap().cert_serial != first);
    // Past the first certificate's lifetime the agent is still connected.
    std::thread::sleep(Duration::from_secs(3));
    assert!(c.coordinator.is_connected("host-1"));
    assert!(c.agents[0].logs().contains("certificate renewed"));

    // An agent enrolled with such a certificate and left offline past its
    // expiry stops with instructions instead of retrying.
    let mut offline = Agent::new(c.tmp.path(), "sleepy", &[]);
    offline.enroll_ok(&c.coordinator, &[]);
    std::thread::sleep(Duration::from_millis(6500));
    offline.start();
    let (status, log) = offline.wait_exit().unwrap();
    assert!(!status.success());
    assert!(log.contains("expired") && log.contains("rekey token create --host sleepy"), "{log}");
    assert!(log.contains("rekey-agent enroll --force"), "{log}");
}

#[test]
fn a_protocol_version_mismatch_names_both_versions() {
    let c = TestCluster::new(1, &[]);
    let cfg = grpc::agent_config(&c.agents[0].state_dir(), &c.coordinator.operator_dir());
    grpc::rt().block_on(async {
        let mut agent = grpc::agent(&c.coordinator.addr(), cfg.clone()).await.unwrap();
        let hello =
            AgentMessage { msg: Some(agent_message::Msg::Hello(Hello { protocol_version: 99, ..Default::default() })) };
        let e = agent.session(tokio_stream::iter(vec![hello])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("v99") && e.message().contains(&format!("v{PROTOCOL_VERSION}")), "{e:?}");
        // A session must start with hello.
        let hb = AgentMessage { msg: Some(agent_message::Msg::Heartbeat(Heartbeat { seq: 1 })) };
        let e = agent.session(tokio_stream::iter(vec![hb])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        // Enrollment checks the version too, before looking at the token.
        let anon = tls::anonymous_client_config(&grpc::ca_of(&c.coordinator.operator_dir())).unwrap();
        let mut enroll = grpc::agent(&c.coordinator.addr(), anon).await.unwrap();
        let e = enroll
            .enroll(EnrollRequest { protocol_version: 7, token: "x.y".into(), ..Default::default() })
            .await
            .unwrap_err();
        assert!(e.message().contains("v7"), "{e:?}");
    });
    // The real agent's session was not disturbed.
    assert!(c.coordinator.is_connected("host-1"));
}

#[test]
fn a_good_session_gets_welcome_and_heartbeat_acks() {
    let c = TestCluster::new(1, &[]);
    // Open a second session with the same certificate, speaking the protocol by hand.
    let cfg = grpc::agent_config(&c.agents[0].state_dir(), &c.coordinator.operator_dir());
    grpc::rt().block_on(async {
        let mut agent = grpc::agent(&c.coordinator.addr(), cfg).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello { protocol_version: PROTOCOL_VERSION, ..Default::default() })),
        })
        .await
        .unwrap();
        let mut inbound = agent.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
        let m = inbound.message().await.unwrap().unwrap();
        assert!(matches!(m.msg, Some(coordinator_message::Msg::Welcome(ref w)) if w.host == "host-1"), "{m:?}");
        tx.send(AgentMessage { msg: Some(agent_message::Msg::Heartbeat(Heartbeat { seq: 42 })) }).await.unwrap();
        let m = inbound.message().await.unwrap().unwrap();
        assert!(matches!(m.msg, Some(coordinator_message::Msg::HeartbeatAck(ref a)) if a.seq == 42), "{m:?}");
    });
}

#[test]
fn garbage_on_the_wire_and_bad_csrs_change_nothing() {
    use std::io::Write;
    let dir = tmp();
    let c = Coordinator::start(&dir.path().join("c"), "");
    // Raw garbage instead of a TLS handshake, a few times.
    for i in 0..5u8 {
        let mut s = std::net::TcpStream::connect(c.addr()).unwrap();
        let _ = s.write_all(&[0x16, 0x03, 0x01, 0xff, i, 0, 0, 0, 1, 2, 3]);
        let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n");
    }
    // A CSR that does not verify: refused, and the token is not spent.
    let (token, fp) = c.token("web-1", &[]);
    let anon = tls::anonymous_client_config(&grpc::ca_of(&c.operator_dir())).unwrap();
    grpc::rt().block_on(async {
        let mut enroll = grpc::agent(&c.addr(), anon).await.unwrap();
        let e = enroll
            .enroll(EnrollRequest {
                protocol_version: PROTOCOL_VERSION,
                token: token.clone(),
                csr_der: b"\x30\x03garbage".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("certificate signing request"), "{e:?}");
    });
    let a = Agent::new(dir.path(), "web-1", &[]);
    assert!(a.enroll(&c.addr(), &token, &fp).status.success());
    // Invalid operator input is refused with the reason.
    let out = c.cli(&["token", "create", "--host", "bad host"]);
    assert!(stderr(&out).contains("invalid host name"), "{}", stderr(&out));
    let out = c.cli(&["token", "create", "--host", "ok", "--ttl", "30d"]);
    assert!(stderr(&out).contains("exceeds"), "{}", stderr(&out));
    let out = c.cli(&["token", "create", "--host", "ok", "--label", "novalue"]);
    assert!(stderr(&out).contains("KEY=VALUE"), "{}", stderr(&out));
    assert_eq!(c.agents().len(), 1);
}

#[test]
fn malformed_configs_name_the_file_and_the_field_and_change_nothing() {
    let dir = tmp();
    let cfg = dir.path().join("coordinator.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:notaport\"\ndata_dir = \"data\"\nmaster_key_file = \"mk\"\n").unwrap();
    let out =
        std::process::Command::new(&rekey_tests::bins().rekeyd).arg("--config").arg(&cfg).arg("run").output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("coordinator.toml") && err.contains("field `listen`"), "{err}");
    assert!(!dir.path().join("data").exists() && !dir.path().join("mk").exists(), "a bad config created state");

    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:1\"\ndata_dir = \"data\"\nmaster_key_file = \"mk\"\n[pki]\nagent_cert_tll = \"1h\"\n",
    )
    .unwrap();
    let out =
        std::process::Command::new(&rekey_tests::bins().rekeyd).arg("--config").arg(&cfg).arg("init").output().unwrap();
    assert!(stderr(&out).contains("unknown field `agent_cert_tll`"), "{}", stderr(&out));

    let acfg = dir.path().join("agent.toml");
    std::fs::write(&acfg, "state_dir = \"s\"\n[[secret]]\nname = \"api key\"\n").unwrap();
    let out =
        std::process::Command::new(&rekey_tests::bins().agent).arg("run").arg("--config").arg(&acfg).output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("agent.toml") && err.contains("secret[0].name"), "{err}");

    // A wrong master key is refused without touching the data.
    let c = Coordinator::start(&dir.path().join("c"), "");
    let mut c = c;
    c.kill();
    std::fs::write(c.dir.join("master.key"), format!("{}\n", "ab".repeat(32))).unwrap();
    let out = std::process::Command::new(&rekey_tests::bins().rekeyd)
        .arg("--config")
        .arg(&c.config)
        .arg("run")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("wrong master key"), "{}", stderr(&out));
}
