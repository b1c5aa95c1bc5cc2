//! The PostgreSQL fixture itself: a real server from `pgserver`, password
//! authentication, and a restart that keeps the data.

use rekey_tests::postgres::Postgres;

#[test]
fn postgres_fixture_runs_a_real_server_that_survives_a_restart() {
    let mut pg = Postgres::start();
    let version = pg.psql("postgres", "show server_version");
    assert!(version.starts_with("16."), "unexpected server version {version}");
    pg.create_database("fixture_check");
    pg.psql("fixture_check", "create table t (v text); insert into t values ('kept')");
    // A wrong password is refused: authentication is really on.
    let mut wrong = Postgres::start_with(&[]);
    wrong.admin_password = "not-the-password".into();
    assert!(wrong.try_psql("postgres", "select 1").is_err(), "a wrong password was accepted");
    pg.stop();
    assert!(pg.try_psql("fixture_check", "select 1").is_err(), "the server still answers after stop");
    pg.start_again();
    assert_eq!(pg.psql("fixture_check", "select v from t"), "kept");
    let mode = std::fs::metadata(&pg.password_file).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    assert_eq!(mode.unwrap() & 0o777, 0o600);
}
