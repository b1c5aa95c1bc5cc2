//! Regression tests for what an attacker or an accident could use (issue
//! "trust hardening"), each against real processes over real mTLS.

use rekey_common::tls;
use rekey_proto::PROTOCOL_VERSION;
use rekey_proto::v1::agent_service_client::AgentServiceClient;
use rekey_proto::v1::{AgentMessage, Hello, agent_message};
use rekey_tests::{Agent, Coordinator, budget, wait_for};
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("rekey-security-").tempdir().unwrap()
}

/// Opens an agent session with the agent's real identity and sends nothing:
/// the hello is held back until the caller sends it on the returned sender.
/// The call itself completes only when the coordinator answers the session.
async fn session_holding_hello(
    addr: &str,
    state_dir: &Path,
) -> (mpsc::Sender<AgentMessage>, tokio::task::JoinHandle<Result<(), tonic::Status>>) {
    tls::install_crypto_provider();
    let pem = std::fs::read_to_string(state_dir.join("identity.pem")).unwrap();
    let ca = tls::certs_from_pem(&std::fs::read_to_string(state_dir.join("ca.pem")).unwrap(), "ca").unwrap();
    let cfg = tls::client_config(&ca, tls::certs_from_pem(&pem, "id").unwrap(), tls::key_from_pem(&pem, "id").unwrap())
        .unwrap();
    let channel = tls::connect(addr, cfg).await.unwrap();
    let (tx, rx) = mpsc::channel(8);
    let call = tokio::spawn(async move {
        let mut inbound = AgentServiceClient::new(channel)
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        // Accepted: read until the coordinator ends the stream.
        while inbound.message().await?.is_some() {}
        Ok(())
    });
    (tx, call)
}

fn hello() -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "held".into(),
            secrets: vec![],
            applied: vec![],
        })),
    }
}

/// Issue item 1: a session waiting for its hello when the agent is revoked
/// is closed at once, and the revocation stays — the old code wrote the
/// record it had read before the hello back over the revocation.
#[test]
fn a_revoke_closes_a_session_still_waiting_for_hello_and_stays_revoked() {
    let dir = tmp();
    let c = Coordinator::start(&dir.path().join("c"), "");
    let a = Agent::new(dir.path(), "held-1", &[]);
    a.enroll_ok(&c, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tx, call) = rt.block_on(session_holding_hello(&c.addr(), &a.state_dir()));
    // Let the coordinator read the record and start waiting for the hello.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!call.is_finished(), "the session must be waiting for the hello");
    c.cli_ok(&["agent", "revoke", "held-1"]);
    // Refused because of the revocation, long before the 10 s hello timeout.
    let status = rt.block_on(async {
        tokio::time::timeout(budget(), call).await.expect("the session ends").unwrap().unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
    // (The hello timeout would have answered DeadlineExceeded "no hello within 10s".)
    // The hello arriving late changes nothing.
    let _ = rt.block_on(tx.send(hello()));
    let agent = c.agent("held-1").unwrap();
    assert_eq!((agent.revoked, agent.connected), (true, false), "{agent:?}");

    // A fresh session with the revoked certificate is refused too, hello or not.
    let (tx, call) = rt.block_on(session_holding_hello(&c.addr(), &a.state_dir()));
    let _ = rt.block_on(tx.send(hello()));
    let status = rt.block_on(async { tokio::time::timeout(budget(), call).await.unwrap().unwrap().unwrap_err() });
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    wait_for("the registry to show held-1 revoked and offline", || {
        c.agent("held-1").is_some_and(|a| a.revoked && !a.connected)
    });
}

fn rekeyd(c: &Coordinator, args: &[&str]) -> std::process::Output {
    std::process::Command::new(&rekey_tests::bins().rekeyd)
        .arg("--config")
        .arg(&c.config)
        .args(args)
        .output()
        .expect("run rekeyd")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

fn audit_len(c: &Coordinator) -> usize {
    c.audit().len()
}

/// Issue item 5: a store that went back in time (sled recovering an older
/// state, an older copy restored by hand) is refused with what was lost.
#[test]
fn a_store_behind_its_checkpoint_is_refused_and_says_what_was_lost() {
    let dir = tmp();
    let mut c = Coordinator::start(&dir.path().join("c"), "");
    c.token("web-1", &[]);
    c.stop();
    let store = c.dir.join("data/store");
    let older = dir.path().join("older-store");
    copy_dir(&store, &older);
    c.restart();
    for h in ["web-2", "web-3", "web-4"] {
        c.token(h, &[]);
    }
    let records = audit_len(&c);
    c.stop();

    std::fs::remove_dir_all(&store).unwrap();
    copy_dir(&older, &store);
    let out = rekeyd(&c, &["run"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("behind its checkpoint") && err.contains("rekeyd restore"), "{err}");
    assert!(err.contains(&format!("..={records}")), "names the lost records: {err}");
    assert!(!err.contains("another rekeyd"), "{err}");
}

/// Issue item 5: one flipped byte in sled's file never yields a silent
/// rollback: rekeyd either refuses the store or runs on exactly the state it had.
#[test]
fn a_flipped_byte_is_refused_or_changes_nothing() {
    let dir = tmp();
    let mut c = Coordinator::start(&dir.path().join("c"), "");
    for h in ["web-1", "web-2", "web-3"] {
        c.token(h, &[]);
    }
    let records = audit_len(&c);
    c.stop();
    let db = c.dir.join("data/store/db");
    let mut bytes = std::fs::read(&db).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&db, bytes).unwrap();
    let mut child = std::process::Command::new(&rekey_tests::bins().rekeyd)
        .arg("--config")
        .arg(&c.config)
        .arg("run")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let addr_file = c.dir.join("data/rekeyd.addr");
    let _ = std::fs::remove_file(&addr_file);
    let mut exited = None;
    wait_for("rekeyd to refuse the store or to listen", || {
        exited = child.try_wait().unwrap();
        exited.is_some() || addr_file.exists()
    });
    match exited {
        Some(status) => {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(!status.success());
            assert!(!err.contains("another rekeyd"), "a damaged store is not a held lock: {err}");
        }
        None => {
            // It ran: then on the whole state, not an older one.
            let now = audit_len(&c);
            let _ = child.kill();
            let _ = child.wait();
            assert!(now >= records, "rekeyd ran on an older state: {now} audit records, had {records}");
        }
    }
}

/// Issue items 2 and 6: rekeyd never creates a credential or a master key by
/// itself on an initialized data dir; `rekeyd fingerprint` creates nothing.
#[test]
fn an_initialized_data_dir_gets_no_new_credential_or_master_key() {
    let dir = tmp();
    let mut c = Coordinator::start(&dir.path().join("c"), "");
    let (_, fp) = c.token("web-1", &[]);
    // Read-only and lock-free: works while rekeyd runs.
    let out = rekeyd(&c, &["fingerprint"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), fp);
    // The data dir and the store are private whatever the umask.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&c.dir.join("data")), 0o700);
    for e in std::fs::read_dir(c.dir.join("data/store")).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(mode(&p) & 0o077, 0, "{} is {:o}", p.display(), mode(&p));
    }
    // A second rekeyd on the same data dir is told why it cannot start.
    let err = stderr(&rekeyd(&c, &["run"]));
    assert!(err.contains("another rekeyd"), "{err}");
    c.stop();

    // The operator moved the credential off the host: a restart mints nothing.
    let moved = dir.path().join("operator-elsewhere");
    std::fs::rename(c.operator_dir(), &moved).unwrap();
    c.restart();
    assert!(!c.operator_dir().exists(), "rekeyd recreated the operator dir");
    let out = std::process::Command::new(&rekey_tests::bins().cli)
        .arg("--operator-dir")
        .arg(&moved)
        .arg("--coordinator")
        .arg(c.addr())
        .args(["agents", "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "the moved credential still works: {}", stderr(&out));
    c.stop();

    // A removed master key is refused, and no new one is written.
    std::fs::remove_file(c.dir.join("master.key")).unwrap();
    let out = rekeyd(&c, &["run"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("master key") && err.contains("missing"), "{err}");
    assert!(!c.dir.join("master.key").exists(), "rekeyd wrote a new master key");

    // On an empty dir, fingerprint says to init and creates nothing.
    let fresh = dir.path().join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    std::fs::write(fresh.join("c.toml"), "listen = \"127.0.0.1:1\"\ndata_dir = \"data\"\nmaster_key_file = \"mk\"\n")
        .unwrap();
    let out = std::process::Command::new(&rekey_tests::bins().rekeyd)
        .arg("--config")
        .arg(fresh.join("c.toml"))
        .arg("fingerprint")
        .output()
        .unwrap();
    assert!(!out.status.success() && stderr(&out).contains("rekeyd init"), "{}", stderr(&out));
    assert!(!fresh.join("data").exists() && !fresh.join("mk").exists(), "fingerprint created state");
}

/// Issue item 5: `rekeyd backup` / `rekeyd restore` round trip; the backup is
/// sealed, opens only with the master key, and restores only into an empty
/// data dir (or with --force).
#[test]
fn a_sealed_backup_restores_the_coordinator_and_nothing_else() {
    let dir = tmp();
    let mut c = Coordinator::start(&dir.path().join("c"), "");
    let a = Agent::new(dir.path(), "kept-1", &[]);
    a.enroll_ok(&c, &[]);
    // A running coordinator's store is locked: the offline command says what to use.
    let backup = dir.path().join("rekey.backup");
    let err = stderr(&rekeyd(&c, &["backup", "--out", backup.to_str().unwrap()]));
    assert!(err.contains("rekey backup"), "{err}");
    // …and `rekey backup` takes one online, through the admin API.
    let online = dir.path().join("online.backup");
    c.cli_ok(&["backup", "--out", online.to_str().unwrap()]);
    c.stop();
    let out = rekeyd(&c, &["backup", "--out", backup.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&backup).unwrap();
    assert!(!text.contains("kept-1") && !text.contains("PRIVATE KEY"), "the backup is not sealed");

    // Later changes, then the store is lost.
    c.restart();
    let b = Agent::new(dir.path(), "later-1", &[]);
    b.enroll_ok(&c, &[]);
    c.stop();
    // Not over an existing store without --force.
    let out = rekeyd(&c, &["restore", backup.to_str().unwrap()]);
    assert!(!out.status.success() && stderr(&out).contains("--force"), "{}", stderr(&out));
    std::fs::remove_dir_all(c.dir.join("data/store")).unwrap();
    std::fs::remove_file(c.dir.join("data/checkpoint.json")).unwrap();
    // Another master key cannot open it, and writes nothing.
    let wrong = dir.path().join("wrong.toml");
    let cfg = std::fs::read_to_string(&c.config).unwrap().replace("master.key", "wrong.key");
    std::fs::write(&wrong, cfg).unwrap();
    let key = dir.path().join("c/wrong.key");
    std::fs::write(&key, format!("{}\n", "cd".repeat(32))).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = std::process::Command::new(&rekey_tests::bins().rekeyd)
        .arg("--config")
        .arg(&wrong)
        .args(["restore", backup.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!c.dir.join("data/store").exists(), "a failed restore wrote a store");

    let out = rekeyd(&c, &["restore", backup.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.restart();
    assert!(c.agent("kept-1").is_some(), "the backed-up enrollment is back");
    assert!(c.agent("later-1").is_none(), "nothing after the backup");
    let v = c.cli_json(&["audit", "verify"]);
    assert_eq!(v["ok"], true, "{v}");

    // The online backup restores the same way (over the store, with --force).
    c.stop();
    let out = rekeyd(&c, &["restore", "--force", online.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.restart();
    assert!(c.agent("kept-1").is_some() && c.agent("later-1").is_none());
}
