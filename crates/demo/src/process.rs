//! Pidfiles and process liveness for the demo service.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::Path;
use std::time::{Duration, Instant};

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
    let deadline = Instant::now() + grace;
    while is_running(pid) {
        if Instant::now() > deadline {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let hard = Instant::now() + Duration::from_secs(2);
            while is_running(pid) && Instant::now() < hard {
                std::thread::sleep(Duration::from_millis(20));
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(pid)
}

/// Removes `pidfile` if it still names this process.
pub fn remove_own_pidfile(pidfile: &Path) {
    if read_pid(pidfile) == Some(std::process::id() as i32) {
        let _ = std::fs::remove_file(pidfile);
    }
}
