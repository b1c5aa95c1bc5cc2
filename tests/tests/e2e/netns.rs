//! A host cut off from the network, for real: the coordinator and one agent
//! live in two network namespaces joined by a veth pair (addresses only
//! inside namespaces this test creates); the agent's link is taken down in
//! the middle of a rotation. Needs root (CI runs as root); elsewhere the test
//! says it was skipped and why.

use rekey_tests::{bins, free_port, read_log, wait_for};
use rekey_types::v1::{AgentView, HostState, JoinTokenView, RotationState, RotationView, VersionStatus, VersionView};
use serde::de::DeserializeOwned;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Net {
    c: String,
    a: String,
    children: Vec<Child>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for ch in &mut self.children {
            let _ = ch.kill();
            let _ = ch.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.c]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
    }
}

/// The CLI's `-o json` output as its view.
fn view<T: DeserializeOwned>(json: String) -> T {
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("not a {}: {e}\n{json}", std::any::type_name::<T>()))
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn skip_reason() -> Option<String> {
    if Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() != "0").unwrap_or(true) {
        return Some("not root: network namespaces need CAP_SYS_ADMIN".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("the `ip` command (iproute2) is missing".into());
    }
    None
}

fn in_ns(ns: &str, program: &Path) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

#[test]
fn a_host_cut_off_blocks_revocation_until_its_link_comes_back() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED a_host_cut_off_blocks_revocation_until_its_link_comes_back: {why}");
        return;
    }
    let b = bins();
    let tag = format!("{:x}", std::process::id() & 0xffff);
    let mut net = Net { c: format!("rkc{tag}"), a: format!("rka{tag}"), children: Vec::new() };
    let (vc, va) = (format!("rkvc{tag}"), format!("rkva{tag}"));
    // Addresses exist only inside the two namespaces this test owns.
    let octet = (std::process::id() % 200 + 20) as u8;
    let (addr_c, addr_a) = (format!("10.231.{octet}.1"), format!("10.231.{octet}.2"));
    ip(&["netns", "add", &net.c]);
    ip(&["netns", "add", &net.a]);
    ip(&["link", "add", &vc, "netns", &net.c, "type", "veth", "peer", "name", &va, "netns", &net.a]);
    ip(&["-n", &net.c, "addr", "add", &format!("{addr_c}/24"), "dev", &vc]);
    ip(&["-n", &net.a, "addr", "add", &format!("{addr_a}/24"), "dev", &va]);
    for (ns, dev) in [(&net.c, &vc), (&net.a, &va)] {
        ip(&["-n", ns, "link", "set", dev, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }

    let tmp = tempfile::Builder::new().prefix("rekey-netns-").tempdir().unwrap();
    let dir = tmp.path();
    let port = free_port();
    let coord = format!("{addr_c}:{port}");
    std::fs::write(
        dir.join("coordinator.toml"),
        format!(
            "listen = \"{coord}\"\ndata_dir = \"data\"\nmaster_key_file = \"master.key\"\n\
             [sessions]\nheartbeat_interval = \"1s\"\nsilence_timeout = \"3s\"\n\
             [[secret]]\nname = \"net-token\"\nall_agents = true\nprovider = {{ kind = \"random\" }}\n\
             [secret.rollout]\ncanary = 0\nhost_deadline = \"10s\"\n\
             [secret.revocation]\ngrace = \"1s\"\nmonitor = \"0s\"\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("rekeyd.log")).unwrap();
    net.children.push(
        in_ns(&net.c, &b.rekeyd)
            .arg("--config")
            .arg(dir.join("coordinator.toml"))
            .arg("run")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_for("rekeyd", || dir.join("data/rekeyd.addr").exists());
    let cli = |args: &[&str]| -> String {
        let out = in_ns(&net.c, &b.cli)
            .arg("--operator-dir")
            .arg(dir.join("data/operator"))
            .args(["--coordinator", &coord])
            .args(args)
            .args(["-o", "json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "rekey {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    // Two agents: "near" shares the coordinator's namespace, "far" is across the veth.
    for (name, ns) in [("near", net.c.clone()), ("far", net.a.clone())] {
        let t: JoinTokenView = view(cli(&["token", "create", "--host", name]));
        let state = dir.join(format!("{name}-state"));
        let out = in_ns(&ns, &b.agent)
            .args(["enroll", "--coordinator", &coord, "--token", &t.token])
            .args(["--ca-fingerprint", &t.ca_fingerprint])
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap();
        assert!(out.status.success(), "enroll {name}: {}", String::from_utf8_lossy(&out.stderr));
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "state_dir = \"{}\"\n[reconnect]\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n[[secret]]\nname = \"net-token\"\n",
                state.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        net.children.push(
            in_ns(&ns, &b.agent)
                .arg("run")
                .arg("--config")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }
    let connected = |name: &str| view::<Vec<AgentView>>(cli(&["agents"])).iter().any(|a| a.name == name && a.connected);
    wait_for("both agents connected", || connected("near") && connected("far"));
    let start = || view::<RotationView>(cli(&["rotate", "start", "net-token"])).id;
    let status = |id: &str| -> RotationView { view(cli(&["rotate", "status", id])) };
    let first = start();
    wait_for("first version everywhere", || status(&first).state == RotationState::Completed);
    let v1 = status(&first).new_version.unwrap();

    // Cut the far host's cable.
    ip(&["-n", &net.a, "link", "set", &va, "down"]);
    wait_for("the coordinator notices the silence", || !connected("far"));
    // The preflight would refuse a start with a consumer cut off: skipped, on purpose.
    let skip = ["rotate", "start", "net-token", "--skip-preflight", "--reason", "far is cut off: the path under test"];
    let id = view::<RotationView>(cli(&skip)).id;
    wait_for("far unreachable, near healthy", || {
        let r = status(&id);
        r.hosts["far"].state == HostState::Unreachable && r.hosts["near"].state == HostState::Healthy
    });
    std::thread::sleep(Duration::from_secs(3));
    let r = status(&id);
    assert_eq!(r.state, RotationState::RollingOut, "an unreachable host must block revocation: {r:#?}");
    assert!(r.waiting_on.as_deref().unwrap().contains("far"), "{r:#?}");
    let versions: Vec<VersionView> = view(cli(&["versions", "net-token"]));
    assert!(
        versions.iter().any(|v| v.id == v1 && v.status == VersionStatus::Active),
        "the old version must stay active while a host is cut off: {versions:#?}"
    );

    // Plug it back in: the agent reconnects, gets the version, revocation follows.
    ip(&["-n", &net.a, "link", "set", &va, "up"]);
    let mut last = None;
    wait_for("the rotation completes once the host is back", || {
        let r = status(&id);
        let done = r.state == RotationState::Completed;
        last = Some(r);
        done
    });
    assert_eq!(last.expect("polled").hosts["far"].state, HostState::Healthy);
    assert!(read_log(&dir.join("far.log")).contains("session established"));
}
