//! Deliveries applied together. Secrets that share a restart on this host
//! (the same systemd unit, command line or pidfile:
//! [`crate::config::RestartAction::key`]) and are delivered together (a
//! campaign; the dispatcher collects them for `[apply] batch_window`) are
//! written together, restarted **once** and health-checked once per distinct
//! check; each then reports its own stages. A failure of any step restores
//! the files of all of them, restarts once more and re-checks.
//!
//! The same restart never runs twice at once: every operation that may
//! restart (apply, rollback, recovery) holds its restart group's lock
//! ([`Pipeline::restart_lock`]) from its first file to its last check, taken
//! after the secrets' own locks (in name order), so a health check never
//! runs while a sibling restarts the service.

use super::*;

/// A delivery admitted to a batch: declared, valid, not a duplicate of one
/// in flight.
pub(super) struct Member<'a> {
    secret: &'a SecretConfig,
    d: Delivery,
    fields: Fields,
    previous: Fields,
    rep: Reporter<'a>,
    _flight: InFlight<'a>,
}

/// A member on its way: files read and rendered, journal made.
struct Applying<'a> {
    m: Member<'a>,
    fingerprint: String,
    local_fingerprint: String,
    prepared: Vec<Prepared>,
    j: Journal,
}

impl Applying<'_> {
    fn values(&self) -> CommandValues<'_> {
        CommandValues {
            version_id: &self.m.d.version_id,
            fields: &self.m.fields,
            source: "the new version does not carry",
        }
    }
}

/// Values of the version a rollback returns to.
fn old_values<'a>(version_id: &'a str, fields: &'a Fields) -> CommandValues<'a> {
    CommandValues { version_id, fields, source: "the previous version does not carry" }
}

/// The restart a group runs once: the first member's, with the longest timeout.
fn group_restart<'a>(secrets: impl Iterator<Item = &'a SecretConfig>) -> Option<RestartConfig> {
    let mut out: Option<RestartConfig> = None;
    for r in secrets.filter_map(|s| s.restart.as_ref()) {
        match &mut out {
            None => out = Some(r.clone()),
            Some(o) => o.timeout = o.timeout.max(r.timeout),
        }
    }
    out
}

impl Pipeline {
    /// The lock of one restart group (a [`crate::config::AgentConfig::restart_group`]).
    pub(super) fn restart_lock(&self, group: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner.restart_locks.lock().expect("restart locks").entry(group.to_string()).or_default().clone()
    }

    /// Applies deliveries; those of secrets that share a restart are applied
    /// together, behind one restart. A second version of the same secret
    /// waits for the first. Returns every report made.
    pub async fn deliver_together(&self, ds: Vec<Delivery>) -> Vec<StageReport> {
        let mut made = Vec::new();
        let mut groups: Vec<(String, Vec<Member<'_>>)> = Vec::new();
        for d in ds {
            let m = match self.admit(d) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(reports) => {
                    made.extend(reports);
                    continue;
                }
            };
            let key = self.inner.config.restart_group(&m.d.secret);
            match groups.iter_mut().find(|(k, ms)| *k == key && ms.iter().all(|o| o.d.secret != m.d.secret)) {
                Some((_, ms)) => ms.push(m),
                None => groups.push((key, vec![m])),
            }
        }
        for (key, members) in groups {
            made.extend(self.deliver_group(&key, members).await);
        }
        made
    }

    /// Checks a delivery; `Err` carries the refusal's report, `Ok(None)` a
    /// duplicate of a delivery being applied (ignored).
    fn admit(&self, mut d: Delivery) -> Result<Option<Member<'_>>, Vec<StageReport>> {
        let inner = &*self.inner;
        let mut rep = Reporter::new(&inner.outbox, &d.rotation_id, &d.secret, &d.version_id);
        let Some(secret) = inner.config.secret(&d.secret) else {
            rep.refused(self.undeclared(&d.secret));
            return Err(rep.made);
        };
        if d.version_id.is_empty() {
            rep.refused("the delivery carries no version id".into());
            return Err(rep.made);
        }
        let fields = match Fields::from_proto(std::mem::take(&mut d.fields)) {
            Ok(f) if !f.is_empty() => f,
            Ok(_) => {
                rep.refused(format!("the delivery of version {} carries no field", d.version_id));
                return Err(rep.made);
            }
            Err(e) => {
                rep.refused(format!("invalid delivery: {e}"));
                return Err(rep.made);
            }
        };
        let previous = match Fields::from_proto(std::mem::take(&mut d.previous_fields)) {
            Ok(f) => f,
            Err(e) => {
                rep.refused(format!("invalid delivery: previous version: {e}"));
                return Err(rep.made);
            }
        };
        let key = (d.secret.clone(), d.version_id.clone());
        if !inner.in_flight.lock().expect("in-flight lock").insert(key.clone()) {
            tracing::info!(secret = %d.secret, version = %d.version_id, "duplicate delivery ignored: this version is being applied");
            return Ok(None);
        }
        let flight = InFlight { inner, key };
        Ok(Some(Member { secret, d, fields, previous, rep, _flight: flight }))
    }

    /// One restart group's deliveries: locks, leftovers, re-deliveries, then the apply.
    async fn deliver_group(&self, key: &str, mut members: Vec<Member<'_>>) -> Vec<StageReport> {
        members.sort_by(|a, b| a.d.secret.cmp(&b.d.secret));
        let mut _serial = Vec::with_capacity(members.len());
        for m in &members {
            _serial.push(self.lock_for(&m.d.secret).lock_owned().await);
        }
        let _restart = self.restart_lock(key).lock_owned().await;
        let mut made = Vec::new();
        let mut ready = Vec::new();
        for mut m in members {
            if let Err(e) = self.settle_leftover(&m.d.secret).await {
                m.rep.failed(e);
                made.append(&mut m.rep.made);
                continue;
            }
            let fingerprint = m.fields.fingerprint(&m.d.fingerprint_key);
            let local_fingerprint = m.fields.fingerprint(self.inner.local_key.expose());
            if let Some(rec) = self.applied_record(&m.d.secret)
                && rec.version_id == m.d.version_id
            {
                if rec.local_fingerprint == local_fingerprint {
                    tracing::info!(secret = %m.d.secret, version = %m.d.version_id, "version already applied and healthy; nothing to do");
                    m.rep.healthy(fingerprint);
                    made.append(&mut m.rep.made);
                    continue;
                }
                tracing::warn!(secret = %m.d.secret, version = %m.d.version_id, "this version was applied with other values; applying it again");
            }
            m.rep.stage(Stage::Delivered);
            ready.push((m, fingerprint, local_fingerprint));
        }
        if ready.len() > 1 {
            let names: Vec<&str> = ready.iter().map(|(m, ..)| m.d.secret.as_str()).collect();
            tracing::info!(restart = %key, secrets = ?names, "applying together: one restart, one health check");
        }
        made.extend(self.apply_group(ready).await);
        made
    }

    /// Prepares every member (a member that cannot be prepared fails alone,
    /// with nothing changed), then applies the rest together.
    async fn apply_group(&self, ready: Vec<(Member<'_>, String, String)>) -> Vec<StageReport> {
        let scrub = {
            let sets: Vec<&Fields> = ready.iter().flat_map(|(m, ..)| [&m.fields, &m.previous]).collect();
            Scrubber::new(&sets)
        };
        let mut made = Vec::new();
        let mut group = Vec::new();
        for (mut m, fingerprint, local_fingerprint) in ready {
            let held = if m.d.previous_version_id.is_empty() {
                self.applied_record(&m.secret.name).map(|r| r.version_id).unwrap_or_default()
            } else {
                m.d.previous_version_id.clone()
            };
            match prepare(m.secret, &m.fields, &m.previous, &m.d.version_id, &held, &scrub) {
                Ok(prepared) => {
                    let j = new_journal(&m.d, held, &prepared);
                    group.push(Applying { m, fingerprint, local_fingerprint, prepared, j });
                }
                Err(e) => {
                    m.rep.failed(report_error(&e, &scrub));
                    tracing::info!(secret = %m.secret.name, version = %m.d.version_id, "nothing was changed");
                    m.rep.stage(Stage::RolledBack);
                    made.append(&mut m.rep.made);
                }
            }
        }
        if group.is_empty() {
            return made;
        }
        let result = self.forward_group(&mut group, &scrub).await;
        match result {
            Ok(()) => self.commit_group(&mut group, &scrub).await,
            Err(e) => self.fail_group(&mut group, report_error(&e, &scrub), &scrub).await,
        }
        for a in &mut group {
            made.append(&mut a.m.rep.made);
        }
        made
    }

    /// Backups, files, one restart, the health checks; each journal written
    /// before each step.
    async fn forward_group(&self, group: &mut [Applying<'_>], scrub: &Scrubber) -> Result<(), StepError> {
        for a in group.iter_mut() {
            self.journal(&a.j)?;
            self.write_backups(&a.j, &a.prepared)?;
            a.j.stage = JournalStage::Applying;
            for (i, p) in a.prepared.iter().enumerate() {
                a.j.files[i].step = FileStep::Writing;
                self.journal(&a.j)?;
                files::replace(&p.at, p.new.expose(), p.mode, p.uid, p.gid)
                    .map_err(|source| StepError::Write { path: p.at.path.clone(), source })?;
                tracing::debug!(secret = %a.j.secret, path = %p.at.path.display(), mode = format!("{:o}", p.mode), "file written");
            }
        }
        for a in group.iter_mut() {
            a.m.rep.stage(Stage::Applied);
        }
        if let Some(r) = group_restart(group.iter().map(|a| a.m.secret)) {
            let jitter_ms = group.iter().map(|a| a.m.d.restart_jitter_ms).max().unwrap_or(0);
            let max = r.jitter.max(Duration::from_millis(jitter_ms)).min(MAX_JITTER);
            if !max.is_zero() {
                let wait = rekey_common::time::jitter(max);
                tracing::info!(wait_ms = wait.as_millis() as u64, "waiting before the restart (jitter)");
                tokio::time::sleep(wait).await;
            }
            for a in group.iter_mut() {
                a.j.stage = JournalStage::Restarting;
                a.j.restarted = true;
                self.journal(&a.j)?;
            }
            actions::restart(&r, &group[0].values(), scrub).await.map_err(StepError::Restart)?;
        }
        for a in group.iter_mut() {
            a.m.rep.stage(Stage::Restarted);
        }
        for a in group.iter_mut().filter(|a| a.m.secret.health.is_some()) {
            a.j.stage = JournalStage::CheckingHealth;
            self.journal(&a.j)?;
        }
        let checks: Vec<(&SecretConfig, CommandValues<'_>)> = group.iter().map(|a| (a.m.secret, a.values())).collect();
        self.check_group_health(&checks, scrub).await
    }

    /// Every member's health check, each distinct check (and expected text) once.
    async fn check_group_health(
        &self,
        members: &[(&SecretConfig, CommandValues<'_>)],
        scrub: &Scrubber,
    ) -> Result<(), StepError> {
        let mut done: Vec<(&HealthConfig, Option<String>)> = Vec::new();
        for (secret, values) in members {
            let Some(h) = &secret.health else { continue };
            let expected = actions::expected_text(&h.check, values).ok().flatten();
            if done.iter().any(|(dh, de)| *dh == h && *de == expected) {
                continue;
            }
            actions::check_health(h, values, scrub).await.map_err(StepError::Health)?;
            done.push((h, expected));
        }
        Ok(())
    }

    /// Healthy: each member records its version; one whose record cannot be
    /// written is undone on its own.
    async fn commit_group(&self, group: &mut [Applying<'_>], scrub: &Scrubber) {
        for a in group.iter_mut() {
            a.j.stage = JournalStage::Committing;
            a.j.fingerprint = Some(a.fingerprint.clone());
            a.j.local_fingerprint = Some(a.local_fingerprint.clone());
            match self.journal(&a.j).and_then(|()| self.commit(&a.j)) {
                Ok(()) => a.m.rep.healthy(a.fingerprint.clone()),
                Err(e) => {
                    let reason = report_error(&e, scrub);
                    a.m.rep.failed(reason.clone());
                    let held = a.j.previous_version_id.clone();
                    let mut undo = [(Some(a.m.secret), &mut a.j, old_values(&held, &a.m.previous))];
                    match self.undo_group(&mut undo, scrub).await.pop().expect("one result") {
                        Ok(()) => a.m.rep.stage(Stage::RolledBack),
                        Err(e) => a.m.rep.failed(format!("{reason}; rollback failed: {e}")),
                    }
                }
            }
        }
    }

    /// A step failed: every member reports it and all are undone together.
    async fn fail_group(&self, group: &mut [Applying<'_>], reason: String, scrub: &Scrubber) {
        let names: Vec<String> = group.iter().map(|a| a.m.d.secret.clone()).collect();
        for a in group.iter_mut() {
            let others: Vec<&str> = names.iter().filter(|n| **n != a.m.d.secret).map(String::as_str).collect();
            let why = if others.is_empty() {
                reason.clone()
            } else {
                format!("{reason} (applied together with {}, which share this restart)", others.join(", "))
            };
            a.m.rep.failed(why);
        }
        let held: Vec<String> = group.iter().map(|a| a.j.previous_version_id.clone()).collect();
        let results = {
            let mut undo: Vec<(Option<&SecretConfig>, &mut Journal, CommandValues<'_>)> = group
                .iter_mut()
                .zip(&held)
                .map(|(a, held)| (Some(a.m.secret), &mut a.j, old_values(held, &a.m.previous)))
                .collect();
            self.undo_group(&mut undo, scrub).await
        };
        for (a, r) in group.iter_mut().zip(results) {
            match r {
                Ok(()) => a.m.rep.stage(Stage::RolledBack),
                Err(e) => a.m.rep.failed(format!("{reason}; rollback failed: {e}")),
            }
        }
    }

    /// Restores every file each journal marks as possibly written (members
    /// and files in reverse order), then restarts once if any member's
    /// restart began and re-checks if anything changed. Once a member's files
    /// are back its backups go; its journal goes once the restart and check
    /// ran (a crash before that redoes them at the next start): a failing
    /// restart or health check is reported, not retried. One result per
    /// member, its error scrubbed.
    pub(super) async fn undo_group(
        &self,
        items: &mut [(Option<&SecretConfig>, &mut Journal, CommandValues<'_>)],
        scrub: &Scrubber,
    ) -> Vec<Result<(), String>> {
        let mut results: Vec<Result<(), String>> = items.iter().map(|_| Ok(())).collect();
        let (mut changed, mut restarted) = (false, false);
        for (i, (_, j, _)) in items.iter_mut().enumerate().rev() {
            restarted |= j.restarted;
            match self.restore_all(j) {
                Ok(c) => changed |= c || j.restarted,
                Err(e) => {
                    changed = true;
                    results[i] = Err(report_error(&e, scrub));
                }
            }
        }
        let restored: Vec<bool> = results.iter().map(Result::is_ok).collect();
        let results = self.restart_after_undo(items, results, changed, restarted, scrub).await;
        // Restarted and checked (or reported): nothing is left to redo. A
        // member whose files could not be put back keeps its journal.
        for ((_, j, _), _) in items.iter().zip(restored).filter(|(_, ok)| *ok) {
            if let Err(e) = self.inner.store.remove_journal(&j.secret) {
                tracing::warn!(secret = %j.secret, error = %Chain(&e), "cannot remove the journal of a rollback");
            }
        }
        results
    }

    /// The restart and health check after an undo put the files back.
    async fn restart_after_undo(
        &self,
        items: &[(Option<&SecretConfig>, &mut Journal, CommandValues<'_>)],
        mut results: Vec<Result<(), String>>,
        changed: bool,
        restarted: bool,
        scrub: &Scrubber,
    ) -> Vec<Result<(), String>> {
        let declared: Vec<(&SecretConfig, CommandValues<'_>)> = items
            .iter()
            .filter_map(|(s, _, v)| {
                s.map(|s| (s, CommandValues { version_id: v.version_id, fields: v.fields, source: v.source }))
            })
            .collect();
        if declared.is_empty() {
            if changed {
                tracing::warn!("secret no longer declared: files restored, no restart or health check to run");
            }
            return results;
        }
        let tail = async {
            if restarted && let Some(r) = group_restart(declared.iter().map(|(s, _)| *s)) {
                actions::restart(&r, &declared[0].1, scrub).await.map_err(StepError::Restart)?;
            }
            if changed {
                self.check_group_health(&declared, scrub).await?;
            }
            Ok::<(), StepError>(())
        };
        if let Err(e) = tail.await {
            let e = report_error(&e, scrub);
            for r in results.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(e.clone());
            }
        }
        results
    }

    /// Puts back one journal's files, records that they are back (stage
    /// `Restored`, the applied state on the previous version), then drops
    /// the backups. The journal stays until the restart and health check ran
    /// ([`Pipeline::undo_group`]): a crash before then redoes only those.
    /// Whether any file was touched.
    fn restore_all(&self, j: &mut Journal) -> Result<bool, StepError> {
        let store = &self.inner.store;
        if j.stage == JournalStage::Restored {
            // Files already back; the restart that followed was interrupted.
            return Ok(true);
        }
        j.stage = JournalStage::RollingBack;
        if let Err(e) = self.journal(j) {
            tracing::warn!(secret = %j.secret, error = %Chain(&e), "cannot record the rollback; rolling back anyway");
        }
        let mut changed = false;
        for rec in j.files.iter().rev() {
            if rec.step == FileStep::Pending {
                files::remove_temp(&rec.path);
                continue;
            }
            changed = true;
            self.restore_file(&j.secret, j.backup_dir.as_deref(), rec)?;
            tracing::info!(secret = %j.secret, path = %rec.path.display(), "file restored");
        }
        j.stage = JournalStage::Restored;
        if let Err(e) = self.journal(j) {
            // The backups stay (a later start removes them once nothing refers to them).
            tracing::warn!(secret = %j.secret, error = %Chain(&e), "cannot record the restored files");
            return Ok(changed);
        }
        self.rolled_back_to_previous(&j.secret, &j.version_id);
        if let Some(b) = &j.backup_dir
            && let Err(e) = store.remove_backup_set(&j.secret, b)
        {
            tracing::warn!(secret = %j.secret, error = %Chain(&e), "cannot remove a used backup");
        }
        Ok(changed)
    }

    /// The backups of the files a journal is about to replace.
    fn write_backups(&self, j: &Journal, prepared: &[Prepared]) -> Result<(), StepError> {
        let store = &self.inner.store;
        let Some(name) = &j.backup_dir else { return Ok(()) };
        let meta = BackupMeta {
            secret: j.secret.clone(),
            holds_version: j.previous_version_id.clone(),
            for_version: j.version_id.clone(),
            created_at_ms: now_unix_ms(),
            files: j.files.clone(),
        };
        let contents: Vec<Option<&SecretBytes>> = prepared.iter().map(|p| p.old.as_ref()).collect();
        store
            .write_backups(&meta, name, &contents)
            .map_err(|source| StepError::Backup { path: store.backup_dir(&j.secret, name), source })
    }
}

/// The journal of an apply, before its first step.
fn new_journal(d: &Delivery, held: String, prepared: &[Prepared]) -> Journal {
    Journal {
        op: Op::Apply,
        secret: d.secret.clone(),
        rotation_id: d.rotation_id.clone(),
        version_id: d.version_id.clone(),
        previous_version_id: held,
        stage: JournalStage::Prepared,
        backup_dir: (!prepared.is_empty()).then(backup_set_name),
        files: prepared
            .iter()
            .enumerate()
            .map(|(i, p)| FileRecord {
                path: p.at.path.clone(),
                before: p.before,
                backup: p.old.as_ref().map(|_| i.to_string()),
                step: FileStep::Pending,
            })
            .collect(),
        restarted: false,
        fingerprint: None,
        local_fingerprint: None,
        started_at_ms: now_unix_ms(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;
    use rekey_proto::v1::SecretField;

    fn config(dir: &std::path::Path) -> AgentConfig {
        let d = dir.display();
        let restart = format!("echo run >> {d}/restarts; if [ -e {d}/block ]; then sleep 30; fi");
        let mut text = "state_dir = 'state'\n".to_string();
        for name in ["a", "b"] {
            text.push_str(&format!(
                "[[secret]]\nname = '{name}'\n[[secret.file]]\npath = '{d}/{name}.conf'\nkind = 'template'\n\
                 template = '{name}={{{{ value }}}}'\n[secret.restart]\nkind = 'command'\ncommand = ['/bin/sh', '-c', {restart:?}]\n\
                 [secret.health]\nkind = 'command'\ncommand = ['/bin/sh', '-c', 'echo check >> {d}/checks']\n"
            ));
        }
        AgentConfig::from_str(&dir.join("agent.toml"), &text).unwrap()
    }

    fn delivery(secret: &str) -> Delivery {
        Delivery {
            rotation_id: "rot".into(),
            secret: secret.into(),
            version_id: format!("{secret}-v2"),
            fields: vec![SecretField { name: "value".into(), value: format!("NEW-{secret}-VALUE").into_bytes() }],
            ..Default::default()
        }
    }

    fn count(path: &std::path::Path) -> usize {
        std::fs::read_to_string(path).unwrap_or_default().lines().count()
    }

    /// Two secrets sharing a restart, delivered together: one restart, one
    /// check (identical checks run once).
    #[tokio::test]
    async fn a_batch_restarts_and_checks_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = Pipeline::open(&config(dir.path()), crate::outbox::Outbox::new()).unwrap();
        let reports = p.deliver_together(vec![delivery("a"), delivery("b")]).await;
        assert_eq!(reports.iter().filter(|r| r.stage == Stage::Healthy as i32).count(), 2, "{reports:?}");
        assert_eq!((count(&dir.path().join("restarts")), count(&dir.path().join("checks"))), (1, 1));
        assert_eq!(std::fs::read_to_string(dir.path().join("b.conf")).unwrap(), "b=NEW-b-VALUE");
    }

    /// The agent dies while a batch restarts: at start both secrets are
    /// restored together, behind one more restart.
    #[tokio::test]
    async fn an_interrupted_batch_is_recovered_with_one_restart() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for name in ["a", "b"] {
            std::fs::write(d.join(format!("{name}.conf")), format!("{name}=OLD")).unwrap();
        }
        std::fs::write(d.join("block"), "").unwrap();
        let p = Pipeline::open(&config(d), crate::outbox::Outbox::new()).unwrap();
        let task = tokio::spawn(async move { p.deliver_together(vec![delivery("a"), delivery("b")]).await });
        let deadline = std::time::Instant::now() + rekey_common::testing::budget();
        while count(&d.join("restarts")) == 0 {
            assert!(std::time::Instant::now() < deadline, "the restart never began");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert_eq!(std::fs::read_to_string(d.join("a.conf")).unwrap(), "a=NEW-a-VALUE");
        std::fs::remove_file(d.join("block")).unwrap();

        let p = Pipeline::open(&config(d), crate::outbox::Outbox::new()).unwrap();
        let reports = p.recover().await;
        for name in ["a", "b"] {
            let mine: Vec<&StageReport> = reports.iter().filter(|r| r.secret == name).collect();
            assert_eq!(mine.len(), 2, "{reports:?}");
            assert_eq!(
                mine[0].error,
                format!("apply of {name}-v2 interrupted by agent restart at stage restarting; rolled back")
            );
            assert_eq!(mine[1].stage, Stage::RolledBack as i32);
            assert_eq!(std::fs::read_to_string(d.join(format!("{name}.conf"))).unwrap(), format!("{name}=OLD"));
        }
        assert_eq!(count(&d.join("restarts")), 2, "the interrupted restart, then one for both rollbacks");
        assert_eq!(count(&d.join("checks")), 1);
    }
}
