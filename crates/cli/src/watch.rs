//! `rekey rotate watch` and `rotate start --wait`: follow a rotation through
//! the coordinator's `WatchRotation` stream (a view after every committed
//! change) rather than polling. On a terminal: one progress line per wave
//! (hosts done / failed / pending) under a line with the state and its
//! reason, drawn with indicatif. Otherwise: one plain line per change.
//! Against a coordinator without the stream, it polls as before.
//!
//! Exit: 0 once the rotation completed or is monitoring; an error (exit 1)
//! naming why when it halted, aborted or was abandoned.

use crate::{Client, Output, print_json, rotate};
use anyhow::{Result, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rekey_proto::v1::GetRotationRequest;
use rekey_types::v1::{HostState, RotationState, RotationView};
use std::io::IsTerminal;
use std::time::Duration;

/// How a wave stands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WaveCount {
    pub(crate) done: usize,
    pub(crate) failed: usize,
    pub(crate) pending: usize,
}

impl WaveCount {
    fn total(self) -> usize {
        self.done + self.failed + self.pending
    }
}

/// Hosts of every wave: healthy or excluded are done; failed, rolled back or
/// unreachable are failed; the rest are on their way.
pub(crate) fn waves(v: &RotationView) -> Vec<WaveCount> {
    let mut out = vec![WaveCount::default(); v.waves.len()];
    for h in v.hosts.values() {
        let Some(w) = out.get_mut(h.wave) else { continue };
        match h.state {
            HostState::Healthy | HostState::Excluded => w.done += 1,
            HostState::Failed | HostState::RolledBack | HostState::Unreachable => w.failed += 1,
            _ => w.pending += 1,
        }
    }
    out
}

fn wave_name(v: &RotationView, i: usize) -> String {
    if i == 0 && v.policy.canary > 0 { "canary".into() } else { format!("wave {i}") }
}

/// The state line: state, pause, and why it halted or what it waits on.
pub(crate) fn state_line(v: &RotationView) -> String {
    let mut s = format!("{} {}: {}", v.id, v.secret, v.state);
    if v.paused {
        s.push_str(" (paused)");
    }
    if let Some(why) = v.halt_reason.as_deref().filter(|_| v.state == RotationState::Halted) {
        s.push_str(&format!(" — {why}"));
    } else if let Some(w) = &v.waiting_on {
        s.push_str(&format!(" — waiting on {w}"));
    }
    s
}

/// `Some(Ok)` once the rotation's work is done, `Some(Err(why))` once it
/// needs an operator or ended without completing (aborted or abandoned), `None` while it runs.
pub(crate) fn ending(v: &RotationView) -> Option<std::result::Result<(), String>> {
    match v.state {
        RotationState::Completed | RotationState::Monitoring => Some(Ok(())),
        RotationState::Halted | RotationState::Aborted => {
            let why = v.halt_reason.as_deref().or(v.timeline.last().map(|e| e.note.as_str())).unwrap_or("");
            Some(Err(format!("rotation {} {}: {why}", v.id, v.state)))
        }
        _ => None,
    }
}

/// Where each change is shown.
enum Display {
    Bars { multi: MultiProgress, header: ProgressBar, bars: Vec<ProgressBar> },
    Lines { last: String },
    Quiet,
}

impl Display {
    fn new(out: Output) -> Display {
        match out {
            Output::Json => Display::Quiet,
            Output::Table if std::io::stdout().is_terminal() => {
                let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
                let header = multi.add(ProgressBar::new_spinner());
                header.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("template"));
                header.enable_steady_tick(Duration::from_millis(120));
                Display::Bars { multi, header, bars: Vec::new() }
            }
            Output::Table => Display::Lines { last: String::new() },
        }
    }

    fn show(&mut self, v: &RotationView) {
        match self {
            Display::Quiet => {}
            Display::Lines { last } => {
                let line = rotate::summary(v);
                if line != *last {
                    println!("{line}");
                    *last = line;
                }
            }
            Display::Bars { multi, header, bars } => {
                header.set_message(state_line(v));
                let style = ProgressStyle::with_template("  {prefix:<8} [{bar:30}] {pos}/{len} {msg}")
                    .expect("template")
                    .progress_chars("=> ");
                for (i, w) in waves(v).into_iter().enumerate() {
                    if bars.len() <= i {
                        let bar = multi.add(ProgressBar::new(w.total() as u64));
                        bar.set_style(style.clone());
                        bar.set_prefix(wave_name(v, i));
                        bars.push(bar);
                    }
                    let bar = &bars[i];
                    bar.set_length(w.total() as u64);
                    bar.set_position((w.done + w.failed) as u64);
                    bar.set_message(format!("{} done, {} failed, {} pending", w.done, w.failed, w.pending));
                }
            }
        }
    }

    /// Leaves the last drawing on screen.
    fn finish(self, v: &RotationView) {
        if let Display::Bars { header, bars, .. } = self {
            header.finish_with_message(state_line(v));
            for b in bars {
                b.finish();
            }
        }
    }
}

/// Follows rotation `id` until it completes (Ok) or needs an operator (an
/// error naming why). `interval`: the polling period against a coordinator
/// without `WatchRotation`.
pub(crate) async fn follow(client: &mut Client, out: Output, id: &str, interval: Duration) -> Result<()> {
    let mut display = Display::new(out);
    let last = match stream(client, id, &mut display).await? {
        Some(v) => v,
        None => poll(client, id, interval, &mut display).await?,
    };
    display.finish(&last);
    if out == Output::Json {
        print_json(&last);
    }
    match ending(&last) {
        Some(Err(why)) => bail!("{why}"),
        _ => Ok(()),
    }
}

/// The stream until an ending; `None` if the coordinator does not offer it.
async fn stream(client: &mut Client, id: &str, display: &mut Display) -> Result<Option<RotationView>> {
    loop {
        let req = client.request(GetRotationRequest { id: id.to_string() });
        let mut s = match client.inner.clone().watch_rotation(req).await {
            Ok(s) => s.into_inner(),
            Err(st) if st.code() == tonic::Code::Unimplemented => return Ok(None),
            Err(st) => return Err(client.explain(st)),
        };
        while let Some(doc) = s.message().await.map_err(|st| client.explain(st))? {
            let v: RotationView = client.view(Ok(tonic::Response::new(doc)))?;
            display.show(&v);
            if ending(&v).is_some() {
                return Ok(Some(v));
            }
        }
        // The coordinator ended the stream (a restart, a shutdown): follow again.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn poll(client: &mut Client, id: &str, interval: Duration, display: &mut Display) -> Result<RotationView> {
    loop {
        let req = client.request(GetRotationRequest { id: id.to_string() });
        let v: RotationView = client.view(client.inner.clone().get_rotation(req).await)?;
        display.show(&v);
        if ending(&v).is_some() {
            return Ok(v);
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented sample view (crates/types/tests/shape), with these hosts and state.
    fn view(hosts: &[(&str, usize, &str)], state: &str) -> RotationView {
        let mut v: serde_json::Value =
            serde_json::from_str(include_str!("../../types/tests/shape/rotation.json")).expect("sample json");
        let sample = v["hosts"]["host-1"].clone();
        let mut map = serde_json::Map::new();
        for (name, wave, st) in hosts {
            let mut h = sample.clone();
            h["wave"] = (*wave).into();
            h["state"] = (*st).into();
            map.insert(name.to_string(), h);
        }
        v["hosts"] = map.into();
        v["waves"] = serde_json::json!([["a"], ["b", "c", "d"]]);
        v["state"] = state.into();
        v["id"] = "r1".into();
        v["secret"] = "api".into();
        v["paused"] = false.into();
        v["policy"]["canary"] = 1.into();
        v["halt_reason"] = "health check failed on b".into();
        serde_json::from_value(v).expect("a rotation view")
    }

    #[test]
    fn waves_count_done_failed_and_pending_hosts() {
        let v =
            view(&[("a", 0, "healthy"), ("b", 1, "failed"), ("c", 1, "applied"), ("d", 1, "excluded")], "rolling_out");
        let w = waves(&v);
        assert_eq!(w[0], WaveCount { done: 1, failed: 0, pending: 0 });
        assert_eq!(w[1], WaveCount { done: 1, failed: 1, pending: 1 });
        assert_eq!(wave_name(&v, 0), "canary");
        assert_eq!(wave_name(&v, 1), "wave 1");
        assert_eq!(ending(&v), None);
    }

    #[test]
    fn a_halt_ends_the_watch_with_its_reason_and_monitoring_ends_it_well() {
        let halted = view(&[("a", 0, "healthy")], "halted");
        assert_eq!(ending(&halted), Some(Err("rotation r1 halted: health check failed on b".into())));
        assert!(state_line(&halted).contains("halted — health check failed on b"), "{}", state_line(&halted));
        assert_eq!(ending(&view(&[], "monitoring")), Some(Ok(())));
        assert!(matches!(ending(&view(&[], "aborted")), Some(Err(_))));
    }
}
