//! Secrets that share a restart: three secrets consumed by one demo service,
//! restarted by one command that refuses to run twice at once (it takes a
//! lock directory, or fails with "concurrent restart") and counts its runs.
//! Delivered together they are applied behind one restart; delivered at the
//! same moment without batching they are never restarted concurrently; a
//! failed shared health check rolls all of them back. The demo-key's check
//! requires the *new* key id (`{{ version_id }}`), so a service still using
//! the old key fails it.

use super::*;
use rekey_agent::dispatch::{Command as AgentCommand, Dispatcher};

const OTHERS: [&str; 2] = ["db-password", "queue-token"];

/// agent.toml: demo-key (the service's key), and two more secrets whose
/// files the service's restart also picks up.
fn shared_config(host: &Host, window: &str) -> AgentConfig {
    let d = host.dir.path().display().to_string();
    let service: Vec<String> = host.service_argv().iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "mkdir {d}/restart.lock 2>/dev/null || {{ echo concurrent restart >&2; exit 1; }}; \
         echo run >> {d}/restarts; sleep 0.3; {}; rc=$?; rmdir {d}/restart.lock; exit $rc",
        service.join(" ")
    );
    let restart = format!(
        "[secret.restart]\nkind = \"command\"\ncommand = [\"/bin/sh\", \"-c\", {script:?}]\ntimeout = \"30s\"\n"
    );
    let health = |body: &str| {
        format!(
            "[secret.health]\nkind = \"http\"\nurl = \"{}\"\nbody_contains = \"{body}\"\nretries = 3\ninterval = \"100ms\"\ntimeout = \"2s\"\n",
            host.health_url()
        )
    };
    let mut text = format!(
        "state_dir = \"state\"\n[apply]\nbatch_window = \"{window}\"\n\
         [[secret]]\nname = \"{SECRET}\"\n[[secret.file]]\npath = \"{d}/creds.env\"\nkind = \"env-file\"\nkeys = {{ DEMO_API_KEY = \"value\" }}\n{restart}{}",
        health("ok: the api accepts key {{ version_id }}")
    );
    for name in OTHERS {
        text.push_str(&format!(
            "[[secret]]\nname = \"{name}\"\n[[secret.file]]\npath = \"{d}/{name}.conf\"\nkind = \"template\"\ntemplate = \"{name} = {{{{ value }}}}\\n\"\n{restart}{}",
            health("ok")
        ));
    }
    AgentConfig::from_str(&host.path("agent.toml"), &text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn delivery_of(secret: &str, version: &str, value: &str) -> Delivery {
    Delivery {
        rotation_id: format!("rot-{secret}"),
        secret: secret.into(),
        version_id: version.into(),
        fields: vec![SecretField { name: "value".into(), value: value.as_bytes().to_vec() }],
        fingerprint_key: FP_KEY.to_vec(),
        ..Default::default()
    }
}

fn restarts(host: &Host) -> usize {
    std::fs::read_to_string(host.path("restarts")).unwrap_or_default().lines().count()
}

/// The three deliveries of one round: demo-key gets `demo` (id, value).
fn round(demo: (&str, &str), n: u32) -> Vec<Delivery> {
    let mut ds = vec![delivery_of(SECRET, demo.0, demo.1)];
    for name in OTHERS {
        ds.push(delivery_of(name, &format!("{name}-v{n}"), &format!("{name}-VALUE-{n}-0123456789")));
    }
    ds
}

/// Reports from the outbox until every secret has a final one.
async fn final_reports(outbox: &Outbox) -> Vec<StageReport> {
    let mut all = Vec::new();
    let done = |all: &Vec<StageReport>| {
        [SECRET, OTHERS[0], OTHERS[1]].iter().all(|s| {
            all.iter().any(|r: &StageReport| {
                r.secret == *s && [Healthy as i32, RolledBack as i32, Refused as i32].contains(&r.stage)
            })
        })
    };
    wait_for("a final report of every secret", || {
        all.extend(outbox.take_unsent(0));
        done(&all)
    })
    .await;
    all
}

fn stages_of(reports: &[StageReport], secret: &str) -> Vec<Stage> {
    stages(&reports.iter().filter(|r| r.secret == secret).cloned().collect::<Vec<_>>())
}

/// The outbox keeps only a secret's newest report (a failure with its
/// rollback): a poll sees some of the stages, in order, ending with the last.
fn assert_progress(got: &[Stage], full: &[Stage], what: &str) {
    let mut rest = full.iter();
    let ordered = got.iter().all(|g| rest.any(|f| f == g));
    assert!(ordered && got.last() == full.last(), "{what}: {got:?} is not a run of {full:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_delivered_together_get_one_restart_and_all_become_healthy() {
    let host = Host::new();
    host.start_service();
    host.wait_healthy().await;
    let outbox = Outbox::new();
    let pipeline = Pipeline::open(&shared_config(&host, "5s"), outbox.clone()).unwrap();
    let dispatcher = Dispatcher::start(pipeline.clone());
    let before = restarts(&host);
    for d in round((&host.key2.0, &host.key2.1), 1) {
        dispatcher.submit(AgentCommand::Deliver(d));
    }
    let reports = final_reports(&outbox).await;
    for s in [SECRET, OTHERS[0], OTHERS[1]] {
        assert_progress(
            &stages_of(&reports, s),
            &[Delivered, Applied, Restarted, Healthy],
            &format!("{s}: {reports:?}"),
        );
    }
    assert_eq!(restarts(&host) - before, 1, "three secrets sharing a restart were restarted more than once");
    let creds = String::from_utf8(host.files().0).unwrap();
    assert!(creds.contains(&format!("DEMO_API_KEY={}", host.key2.1)));
    for name in OTHERS {
        let text = std::fs::read_to_string(host.path(&format!("{name}.conf"))).unwrap();
        assert_eq!(text, format!("{name} = {name}-VALUE-1-0123456789\n"));
    }
    let (_, body) = http(&format!("127.0.0.1:{}", host.port), "GET", "/health", None, None).unwrap();
    assert!(body.contains(&host.key2.0), "{body}");
    dispatcher.shutdown(Duration::from_secs(5)).await;
    host.assert_no_leak();
}

/// No batching (window 0) and three applies started at the same instant
/// through the pipeline API: the restart lock runs the restarts one after
/// the other (the command would fail if two overlapped) and every health
/// check sees a settled service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_restart_never_runs_concurrently() {
    let host = Host::new();
    host.start_service();
    host.wait_healthy().await;
    let pipeline = Pipeline::open(&shared_config(&host, "0s"), Outbox::new()).unwrap();
    let before = restarts(&host);
    let mut tasks = Vec::new();
    for d in round((&host.key2.0, &host.key2.1), 1) {
        let p = pipeline.clone();
        tasks.push(tokio::spawn(async move { p.deliver(d).await }));
    }
    for t in tasks {
        let reports = t.await.unwrap();
        assert_eq!(stages(&reports), [Delivered, Applied, Restarted, Healthy], "{reports:?}");
    }
    assert_eq!(restarts(&host) - before, 3);
    assert!(!host.path("restart.lock").exists());
}

/// The service keeps using the old key: demo-key's check wants the new key
/// id and fails; all three secrets are restored together, with one more
/// restart. Then the real new key passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_shared_check_rolls_back_every_secret_of_the_batch() {
    let host = Host::new();
    host.start_service();
    host.wait_healthy().await;
    let pipeline = Pipeline::open(&shared_config(&host, "5s"), Outbox::new()).unwrap();
    let creds_before = host.files().0;
    let before = restarts(&host);
    // Version id of the new key, value of the old one: the service still
    // reports the old key id.
    let reports = pipeline.deliver_together(round((&host.key2.0, &host.key1.1), 1)).await;
    for s in [SECRET, OTHERS[0], OTHERS[1]] {
        let got = stages_of(&reports, s);
        assert_progress(&got, &[Delivered, Applied, Restarted, Failed, RolledBack], &format!("{s}: {reports:?}"));
        assert!(got.contains(&Failed), "{s}: the failure is kept with its rollback: {reports:?}");
    }
    let failed = reports.iter().find(|r| r.secret == OTHERS[0] && r.stage == Failed as i32).unwrap();
    assert!(
        failed.error.starts_with(&format!(
            "health check {} returned 200 without \"ok: the api accepts key {}\" in the body, 3 tries over",
            host.health_url(),
            host.key2.0
        )),
        "{}",
        failed.error
    );
    let together = format!("(applied together with {SECRET}, {}, which share this restart)", OTHERS[1]);
    assert!(failed.error.ends_with(&together), "{}", failed.error);
    assert_eq!(restarts(&host) - before, 2, "one restart forward, one for the rollback");
    assert_eq!(host.files().0, creds_before);
    for name in OTHERS {
        assert!(!host.path(&format!("{name}.conf")).exists(), "{name}.conf was created by the failed apply");
    }
    host.wait_healthy().await;

    let reports = pipeline.deliver_together(round((&host.key2.0, &host.key2.1), 2)).await;
    assert!(reports.iter().filter(|r| r.stage == Healthy as i32).count() == 3, "{reports:?}");
    assert_eq!(restarts(&host) - before, 3);
    host.assert_no_leak();
}
