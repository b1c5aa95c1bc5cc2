//! `rekey-demo`: a small world to rotate secrets in, for demos and tests.
//!
//! - **`rekey-demo-api`** stands in for a SaaS provider's key API ([`api`]).
//!   Admin calls carry `Authorization: Bearer ADMIN_TOKEN` (from
//!   `--admin-token-file` or `REKEY_DEMO_ADMIN_TOKEN`):
//!   `POST /v1/keys {"name"}` → 201 `{"id": "key_…", "secret": "dk_…", "created_at"}`
//!   (the only time the secret is shown), `GET /v1/keys` (no secrets; status
//!   as a string and as `enabled`, last use in whole seconds, fractional
//!   seconds and milliseconds, and `last_used_by`, the caller's User-Agent),
//!   `POST /v1/keys/{id}/deactivate`, `POST /v1/keys/{id}/activate`,
//!   `DELETE /v1/keys/{id}` (409 `key is active; deactivate first` while the
//!   key is active, as real key APIs answer). Clients call `GET /v1/whoami` with
//!   `Authorization: Bearer <key secret>`: 200 `{"id", "name"}` for an active
//!   key (recording its use), 401 otherwise. Only SHA-256 digests of
//!   key secrets are kept (`--state FILE` persists them as JSON). Every call
//!   is logged, never a secret.
//!
//! - **`rekey-demo-service`** consumes one key. It reads its credentials
//!   file (env-file format, `DEMO_API_KEY=dk_…`) **only at start**, and a
//!   file it cannot read, or a value that is not a demo key, makes it exit
//!   non-zero at once. `GET /health` answers 200 while the API accepts the
//!   key (`/v1/whoami`), 503 with a short reason (never the key) otherwise.
//!
//!   **AWS mode** (`--aws-sts URL [--aws-region R]` instead of `--api`): the
//!   credentials file holds `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`,
//!   and `/health` is a SigV4-signed STS `GetCallerIdentity` ([`aws`]): 200
//!   while AWS (or moto) accepts the key.
//!
//!   **PostgreSQL mode** (`--postgres postgres://HOST:PORT/DB` instead of
//!   `--api`): the credentials file holds `PGUSER` and `PGPASSWORD`; the
//!   service logs in at start (a refused login fails the start) and keeps
//!   its session, and `/health` runs a query on it ([`pg`]): 200 while it is
//!   logged in as its role.
//!
//!   How rekey-agent restarts it, for real:
//!   - **Restart command** (stop, then start): `rekey-demo-service --detach
//!     --replace --pidfile FILE ...` sends SIGTERM to the process in the
//!     pidfile and waits for it to exit (it drains and exits 0 on SIGTERM),
//!     then starts a new one in its own process group and returns once it
//!     is listening (exit 0) — or returns the new process's failure if it
//!     dies at start (exit 1), so a bad credential fails the agent's
//!     restart stage instead of its health check.
//!   - **Signal**: on SIGHUP the service re-executes itself (same pid, same
//!     arguments), which re-reads the credentials file. If the new file is
//!     unreadable the process exits; a signal cannot bring it back, so use
//!     the restart command where a rollback must revive the service.
//!
//! The library holds what the binaries share: the API's state and routes,
//! the credentials parser, a minimal HTTP/1 client. Beyond them:
//!
//! - [`walkthrough`]: `rekey demo`, the whole product on one machine (the
//!   CLI's `demo` verb calls it with its admin client);
//! - [`process`]: pidfiles, and the process handling everything that runs
//!   the real binaries shares — the demo, the e2e fixtures (`tests/`):
//!   spawning with a log, signalling, waiting on a condition with a
//!   deadline, free ports.
//!
//! Links no cloud SDK and no gRPC stack, so the CLI may depend on it.

pub mod api;
pub mod aws;
pub mod credentials;
pub mod http_client;
pub mod pg;
pub mod process;
pub mod walkthrough;
