//! Processes, for everything that runs rekey's real binaries: the demo
//! service's pidfiles, `rekey demo` ([`crate::walkthrough`]) and the e2e
//! fixtures (`tests/`).
//!
//! - pidfiles and liveness: [`read_pid`], [`is_running`], [`stop`],
//!   [`remove_own_pidfile`];
//! - children: [`spawn_logged`] (stdout and stderr to a log file),
//!   [`signal_and_wait`], [`read_log`];
//! - waiting: [`wait_until`] polls a condition until a deadline — a wait is on
//!   a condition, never a fixed sleep;
//! - [`free_port`] on loopback;
//! - [`cargo`]: a nested `cargo build` that sees the environment a person's would.

use nix::sys::signal::kill;
use nix::unistd::Pid;
use std::io::{self, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The signals [`signal_and_wait`] sends (so callers need not depend on nix).
pub use nix::sys::signal::Signal;

/// A `cargo` command (the one running us, if any) for a nested build of
/// sibling binaries. Cargo gives a program it runs the variables of that
/// program's package (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, …); a nested
/// build that inherits them is not the build a person runs — ring's build
/// script watches `CARGO_MANIFEST_DIR`, so ring and everything above it
/// (rustls, tonic, every binary) would be rebuilt twice: once here, once at
/// the next plain `cargo build`. Those variables are removed; the ones a user
/// sets (`CARGO_TARGET_DIR`, `CARGO_HOME`, `CARGO_PROFILE_*`, …) are kept.
pub fn cargo() -> Command {
    const SET_FOR_A_PACKAGE: &[&str] = &[
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        if SET_FOR_A_PACKAGE.contains(&k) || k.starts_with("CARGO_PKG_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// The pid in a pidfile, if it holds one.
pub fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok().filter(|p| *p > 1)
}

/// A live process (a zombie waiting for its parent counts as gone).
pub fn is_running(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')).unwrap_or(true),
        Err(_) => true,
    }
}

/// Stops the process named by `pidfile`: SIGTERM, then SIGKILL after `grace`.
/// Returns the pid it stopped, if any.
pub fn stop(pidfile: &Path, grace: Duration) -> Option<i32> {
    let pid = read_pid(pidfile)?;
    if !is_running(pid) {
        return None;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    if wait_until("the process to exit", grace, || !is_running(pid)).is_err() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = wait_until("the process to die", Duration::from_secs(2), || !is_running(pid));
    }
    Some(pid)
}

/// Removes `pidfile` if it still names this process.
pub fn remove_own_pidfile(pidfile: &Path) {
    if read_pid(pidfile) == Some(std::process::id() as i32) {
        let _ = std::fs::remove_file(pidfile);
    }
}

/// A condition that did not come true in time.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {after:?} waiting for {what}")]
pub struct TimedOut {
    pub what: String,
    pub after: Duration,
}

/// Polls `f` (every 20 ms at first, backing off to 250 ms) until it returns
/// true, or fails naming `what` once `timeout` has passed.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<(), TimedOut> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        if f() {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(TimedOut { what: what.to_string(), after: timeout });
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// Starts `cmd` with stdin closed and stdout and stderr written to a fresh
/// `log` file, logging at `info` (`RUST_LOG`).
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> io::Result<Child> {
    let out = std::fs::File::create(log)?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err).env("RUST_LOG", "info").spawn()
}

/// Sends `signal` to `child` and reaps it: SIGKILL for a crash, SIGTERM for
/// a clean stop (waits as long as the child takes to drain).
pub fn signal_and_wait(child: &mut Child, signal: Signal) -> Option<ExitStatus> {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
    child.wait().ok()
}

/// A log file's text so far (empty if it cannot be read).
pub fn read_log(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// A TCP port free on 127.0.0.1 right now (the OS picks it).
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_end_when_the_condition_holds_or_name_what_timed_out() {
        let mut calls = 0;
        wait_until("the third call", Duration::from_secs(10), || {
            calls += 1;
            calls == 3
        })
        .unwrap();
        assert_eq!(calls, 3);
        let started = Instant::now();
        let e = wait_until("never", Duration::from_millis(100), || false).unwrap_err();
        assert_eq!(e.to_string(), "timed out after 100ms waiting for never");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_spawned_child_logs_to_its_file_and_is_reaped_on_signal() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("child.log");
        let mut child =
            spawn_logged(Command::new("/bin/sh").args(["-c", "echo started; echo oops >&2; exec sleep 30"]), &log)
                .unwrap();
        wait_until("the child's output", Duration::from_secs(30), || read_log(&log).contains("oops")).unwrap();
        assert_eq!(read_log(&log), "started\noops\n");
        let pid = child.id() as i32;
        let status = signal_and_wait(&mut child, Signal::SIGKILL).unwrap();
        assert!(!status.success());
        assert!(!is_running(pid));
        assert_eq!(read_log(&dir.path().join("missing.log")), "");
    }

    #[test]
    fn pidfiles_name_live_processes_and_stop_ends_them() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("x.pid");
        assert_eq!(read_pid(&pidfile), None);
        let mut child = Command::new("/bin/sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        std::fs::write(&pidfile, format!("{pid}\n")).unwrap();
        assert_eq!(read_pid(&pidfile), Some(pid));
        assert!(is_running(pid));
        // Reap it as soon as it dies, as a parent would.
        let reaper = std::thread::spawn(move || child.wait());
        assert_eq!(stop(&pidfile, Duration::from_secs(10)), Some(pid));
        reaper.join().unwrap().unwrap();
        assert!(!is_running(pid));
        assert_eq!(stop(&pidfile, Duration::from_secs(1)), None, "nothing left to stop");
        assert!(free_port().unwrap() > 0);
    }
}
