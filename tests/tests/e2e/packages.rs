//! The Debian packages (`scripts/build-debs.sh`, `just deb`): built from the
//! debug binaries the suite already has, then inspected with `dpkg-deb` —
//! contents, modes, units, maintainer scripts — and the packaged CLI run.
//! Needs cargo-deb; without it the test says so and skips, unless
//! `REKEY_REQUIRE_DEB=1` (set by `.ci/run`) makes that a failure. The
//! completions and man pages themselves are checked without cargo-deb.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Path in the package → its `ls`-style mode (`-rwxr-xr-x`).
fn contents(deb: &Path) -> BTreeMap<String, String> {
    run(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.get(5)?.trim_start_matches('.').to_string(), f.first()?.to_string()))
        })
        .collect()
}

/// The maintainer scripts and control files, by name.
fn control(deb: &Path, dir: &Path) -> BTreeMap<String, String> {
    run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(dir));
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
        .collect()
}

fn cargo_deb_available() -> bool {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    Command::new(cargo).args(["deb", "--version"]).output().is_ok_and(|o| o.status.success())
}

fn build(out: &Path) -> (PathBuf, PathBuf) {
    rekey_tests::bins();
    run(Command::new(rekey_tests::workspace_root().join("scripts/build-debs.sh"))
        .args(["--no-build", "--fast", "dev"])
        .arg(out)
        .env("CARGO_TARGET_DIR", rekey_tests::target_dir()));
    let find = |prefix: &str| {
        std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix}*.deb in {}", out.display()))
    };
    (find("rekeyd_"), find("rekey-agent_"))
}

fn assert_has(files: &BTreeMap<String, String>, package: &str, paths: &[(&str, &str)]) {
    for (path, mode) in paths {
        let got = files.get(*path).unwrap_or_else(|| panic!("{package} lacks {path}: {:#?}", files.keys()));
        assert_eq!(got, mode, "{package}: mode of {path}");
    }
}

#[test]
fn debian_packages_hold_binaries_units_docs_and_private_state_dirs() {
    if !cargo_deb_available() {
        assert!(
            std::env::var_os("REKEY_REQUIRE_DEB").is_none(),
            "REKEY_REQUIRE_DEB is set but cargo-deb is not installed (cargo install --locked cargo-deb)"
        );
        eprintln!(
            "SKIPPED: cargo-deb is not installed (cargo install --locked cargo-deb); the packages were not checked"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (rekeyd, agent) = build(&tmp.path().join("debs"));
    let (d, a) = (contents(&rekeyd), contents(&agent));
    let (exe, file) = ("-rwxr-xr-x", "-rw-r--r--");
    assert_has(
        &d,
        "rekeyd",
        &[
            ("/usr/bin/rekeyd", exe),
            ("/usr/bin/rekey", exe),
            ("/usr/lib/systemd/system/rekeyd.service", file),
            ("/etc/rekey/coordinator.toml.example", file),
            ("/usr/share/man/man8/rekeyd.8", file),
            ("/usr/share/man/man8/rekeyd-operator-recover.8", file),
            ("/usr/share/man/man1/rekey.1", file),
            ("/usr/share/man/man1/rekey-rotate-start.1", file),
            ("/usr/share/man/man1/rekey-scope.1", file),
            ("/usr/share/bash-completion/completions/rekey", file),
            ("/usr/share/bash-completion/completions/rekeyd", file),
            ("/usr/share/zsh/vendor-completions/_rekey", file),
            ("/usr/share/fish/vendor_completions.d/rekey.fish", file),
            ("/usr/share/doc/rekeyd/README.md", file),
        ],
    );
    assert_has(
        &a,
        "rekey-agent",
        &[
            ("/usr/bin/rekey-agent", exe),
            ("/usr/lib/systemd/system/rekey-agent.service", file),
            ("/etc/rekey/agent.toml.example", file),
            ("/usr/share/man/man8/rekey-agent.8", file),
            ("/usr/share/man/man8/rekey-agent-enroll.8", file),
            ("/usr/share/bash-completion/completions/rekey-agent", file),
            ("/usr/share/zsh/vendor-completions/_rekey-agent", file),
            ("/usr/share/fish/vendor_completions.d/rekey-agent.fish", file),
        ],
    );
    // Both packages install on one host: no file belongs to both.
    let shared: Vec<&String> =
        d.iter().filter(|(p, m)| !m.starts_with('d') && a.contains_key(*p)).map(|(p, _)| p).collect();
    assert!(shared.is_empty(), "files in both packages: {shared:?}");
    // Neither package ships a config an unconfigured service would start with.
    for files in [&d, &a] {
        assert!(!files.contains_key("/etc/rekey/coordinator.toml") && !files.contains_key("/etc/rekey/agent.toml"));
    }
    check_installed_tree(&rekeyd, &agent, &tmp.path().join("root"));
    check_maintainer_scripts(&rekeyd, &agent, tmp.path());
}

/// The units are the hardened ones in deploy/, and name binaries the packages
/// ship; the packaged CLI runs and completes its verbs.
fn check_installed_tree(rekeyd: &Path, agent: &Path, root: &Path) {
    for deb in [rekeyd, agent] {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root));
    }
    let repo = rekey_tests::workspace_root();
    for unit in ["rekeyd.service", "rekey-agent.service"] {
        let packaged = std::fs::read_to_string(root.join("usr/lib/systemd/system").join(unit)).unwrap();
        let source = std::fs::read_to_string(repo.join("deploy/systemd").join(unit)).unwrap();
        assert_eq!(packaged, source, "{unit} is packaged as written in deploy/systemd");
        let exec = packaged.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart");
        let bin = exec.split_whitespace().next().unwrap();
        assert!(root.join(bin.trim_start_matches('/')).is_file(), "{unit} runs {bin}, which no package ships");
    }
    let version = run(Command::new(root.join("usr/bin/rekey")).arg("--version"));
    assert!(version.starts_with("rekey "), "{version}");
    let bash = std::fs::read_to_string(root.join("usr/share/bash-completion/completions/rekey")).unwrap();
    for verb in ["rotate", "scope", "incident", "alerts"] {
        assert!(bash.contains(verb), "the packaged bash completion lacks {verb}");
    }
    let page = std::fs::read_to_string(root.join("usr/share/man/man8/rekeyd.8")).unwrap();
    assert!(page.contains(".TH rekeyd 8") && page.contains("init"), "{page}");
}

/// The maintainer scripts: the system user, 0700 state dirs, units neither
/// enabled nor started at install, and valid shell.
fn check_maintainer_scripts(rekeyd: &Path, agent: &Path, tmp: &Path) {
    let d = control(rekeyd, &tmp.join("ctl-rekeyd"));
    let a = control(agent, &tmp.join("ctl-rekey-agent"));
    let postinst = &d["postinst"];
    assert!(postinst.contains("adduser --system --group --home /var/lib/rekeyd"), "{postinst}");
    assert!(postinst.contains("install -d -m 0700 -o rekeyd -g rekeyd /var/lib/rekeyd"), "{postinst}");
    assert!(a["postinst"].contains("install -d -m 0700 -o root -g root /var/lib/rekey-agent"), "{}", a["postinst"]);
    for (package, scripts) in [("rekeyd", &d), ("rekey-agent", &a)] {
        let post = &scripts["postinst"];
        assert!(post.contains("daemon-reload"), "{package}: the unit is registered with systemd");
        assert!(!post.contains("deb-systemd-invoke start"), "{package}: started before it is configured");
        // Enabled only again on upgrade where the operator had enabled it.
        let lines: Vec<&str> = post.lines().collect();
        for (i, _) in lines.iter().enumerate().filter(|(_, l)| l.contains("deb-systemd-helper enable")) {
            let guarded = lines[i.saturating_sub(3)..i].iter().any(|p| p.contains("was-enabled"));
            assert!(guarded, "{package}: enabled before it is configured:\n{post}");
        }
        assert!(scripts["conffiles"].contains("/etc/rekey/"), "{package}: the config example is a conffile");
        for name in ["postinst", "postrm", "prerm"] {
            let path = tmp.join(format!("ctl-{package}")).join(name);
            let check = Command::new("sh").arg("-n").arg(&path).output().unwrap();
            assert!(check.status.success(), "{package} {name}: {}", String::from_utf8_lossy(&check.stderr));
        }
    }
    let control = &d["control"];
    assert!(control.contains("Package: rekeyd") && control.contains("adduser"), "{control}");
}

/// Without cargo-deb too: every binary prints completions and writes man
/// pages that name its subcommands, without a config or a coordinator.
#[test]
fn every_binary_generates_completions_and_man_pages_for_its_subcommands() {
    let bins = rekey_tests::bins();
    let tmp = tempfile::tempdir().unwrap();
    for (bin, section, verbs) in [
        (&bins.rekeyd, "8", &["init", "run", "fingerprint", "backup", "restore", "operator"][..]),
        (&bins.agent, "8", &["enroll", "run"][..]),
        (&bins.cli, "1", &["rotate", "scope", "incident", "alerts", "report"][..]),
    ] {
        let name = bin.file_name().unwrap().to_string_lossy().into_owned();
        for shell in ["bash", "zsh", "fish"] {
            let script = run(Command::new(bin).args(["completions", shell]));
            for verb in verbs {
                assert!(script.contains(verb), "{name} {shell} completions lack {verb}");
            }
        }
        let dir = tmp.path().join(&name);
        run(Command::new(bin).arg("man").arg("--out").arg(&dir));
        for verb in verbs {
            let page = dir.join(format!("{name}-{verb}.{section}"));
            let text = std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
            assert!(text.contains(&format!(".TH {name}-{verb} {section}")), "{}", page.display());
        }
        let top = std::fs::read_to_string(dir.join(format!("{name}.{section}"))).unwrap();
        assert!(verbs.iter().all(|v| top.contains(v)), "{name}.{section} lists every verb");
    }
}
