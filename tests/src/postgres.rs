//! A real PostgreSQL 16 server for the tests, from the PyPI package
//! `pgserver` (its `pginstall/bin/{initdb,postgres,psql}`), installed with
//! the other fixtures under `target/test-fixtures/venv`.
//!
//! PostgreSQL refuses to run as root: when the tests run as root (CI), the
//! cluster's directory is given to `nobody` and `initdb`/`postgres` run as
//! `nobody` through `setpriv` (which execs: the child is postgres itself, so
//! signals reach it; `runuser` does not pass SIGINT on). The server listens on a free loopback port
//! only, with SCRAM-SHA-256 password authentication for TCP; the admin
//! password is in a 0600 file ([`Postgres::password_file`]), never in a URL.
//! [`Postgres::stop`] and [`Postgres::start_again`] restart it on the same
//! port and data (a database restart mid-test). Dropping it kills the server.

use crate::fixtures::{random_suffix, site_package_file, write_secret_file};
use crate::{free_port, read_log, wait_for};
use rekey_demo::process::{Signal, signal_and_wait};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub const ADMIN_USER: &str = "rekey_admin";

pub struct Postgres {
    pub port: u16,
    pub admin_user: String,
    pub admin_password: String,
    /// The admin password, alone in a 0600 file owned by the test.
    pub password_file: PathBuf,
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    settings: Vec<(String, String)>,
    as_nobody: bool,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

impl Postgres {
    /// A fresh cluster with default settings.
    pub fn start() -> Postgres {
        Postgres::start_with(&[])
    }

    /// A fresh cluster started with extra `-c name=value` settings (e.g.
    /// `("log_statement", "all")`).
    pub fn start_with(settings: &[(&str, &str)]) -> Postgres {
        let bin = site_package_file("pgserver/pginstall/bin/postgres").parent().expect("bin dir").to_path_buf();
        let dir = tempfile::Builder::new().prefix("rekey-postgres-").tempdir().expect("tempdir");
        let as_nobody = is_root();
        let data = dir.path().join("data");
        let admin_password = format!("pw-{}-{}", random_suffix(), random_suffix());
        let password_file = dir.path().join("admin.password");
        write_secret_file(&password_file, &admin_password);
        // initdb reads the password from a file the server's user can read.
        let pwfile = dir.path().join("initdb.pw");
        std::fs::write(&pwfile, &admin_password).expect("write initdb password");
        if as_nobody {
            chown_nobody(dir.path());
            chown_nobody(&pwfile);
        }
        let mut initdb = server_command(&bin.join("initdb"), as_nobody);
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", ADMIN_USER, "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8"])
            .arg(format!("--pwfile={}", pwfile.display()));
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_file(&pwfile);
        let mut pg = Postgres {
            port: free_port(),
            admin_user: ADMIN_USER.to_string(),
            admin_password,
            password_file,
            bin,
            log: dir.path().join("postgres.log"),
            data,
            settings: settings.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            as_nobody,
            child: None,
            _dir: dir,
        };
        pg.start_again();
        pg
    }

    /// `postgres://USER@127.0.0.1:PORT/DB` — no password (it is in
    /// [`Postgres::password_file`]).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{}@127.0.0.1:{}/{db}", self.admin_user, self.port)
    }

    /// The `[store]` section of a coordinator.toml using database `db`.
    pub fn store_toml(&self, db: &str) -> String {
        format!(
            "[store]\nbackend = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\npool_size = 4\n",
            self.url(db),
            self.password_file.display()
        )
    }

    /// Starts the server on its port and data (after [`Postgres::stop`]).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "postgres is already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("open postgres log");
        if self.as_nobody {
            chown_nobody(&self.log);
        }
        let mut cmd = server_command(&self.bin.join("postgres"), self.as_nobody);
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.data.display()));
        for (k, v) in &self.settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let log = self.log.clone();
        wait_for("postgres to accept connections", || {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("postgres exited with {st}:\n{}", read_log(&log));
            }
            self.try_psql("postgres", "select 1").is_ok()
        });
    }

    /// Fast shutdown (SIGINT: active sessions are ended), waiting for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_and_wait(&mut child, Signal::SIGINT);
        }
    }

    /// Creates a database owned by the admin user.
    pub fn create_database(&self, name: &str) {
        self.psql("postgres", &format!("create database \"{name}\""));
    }

    /// Runs SQL with the bundled `psql` as the admin user; returns its
    /// unaligned, tuples-only output. Panics with psql's error on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql).unwrap_or_else(|e| panic!("psql {sql:?}: {e}"))
    }

    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", &self.admin_user, "-d", db])
            .args(["-v", "ON_ERROR_STOP=1", "-X", "-A", "-t", "-c", sql])
            .env("PGPASSWORD", &self.admin_password)
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- postgres log ---\n{}", read_log(&self.log));
        }
    }
}

fn server_command(bin: &Path, as_nobody: bool) -> Command {
    if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn chown_nobody(path: &Path) {
    let st = Command::new("chown").args(["-R", "nobody:nogroup"]).arg(path).status().expect("run chown");
    assert!(st.success(), "chown nobody {} failed", path.display());
}
