//! `rekey console`: a one-time login link for the web console (read-only;
//! any operator role). The link is a credential: it opens a console session
//! as this operator, once, within 60 seconds.

use crate::{Client, Output, output};
use anyhow::Result;
use rekey_common::time::format_unix;
use rekey_proto::v1::CreateConsoleLoginRequest;
use serde::Serialize;

/// `rekey console -o json`.
#[derive(Serialize)]
struct ConsoleLogin {
    url: String,
    /// The link works once, until then (formatted UTC).
    expires: String,
    /// How long the console session it opens lasts.
    session_seconds: u64,
}

pub async fn run(client: &Client, out: Output) -> Result<()> {
    let req = client.request(CreateConsoleLoginRequest {});
    let r = client.inner.clone().create_console_login(req).await.map_err(|s| client.explain(s))?.into_inner();
    let v = ConsoleLogin {
        url: r.url,
        expires: format_unix(i64::try_from(r.expires_unix).unwrap_or(i64::MAX)),
        session_seconds: r.session_seconds,
    };
    output(out, &v, |v| {
        println!("open this link in a browser on this machine (it works once, until {}):", v.expires);
        println!("{}", v.url);
        let port = v.url.rsplit_once(':').and_then(|(_, rest)| rest.split('/').next()).unwrap_or("PORT");
        println!(
            "the session lasts {}; the console is read-only. From another machine, tunnel first: \
             ssh -L {port}:127.0.0.1:{port} COORDINATOR_HOST",
            humantime::format_duration(std::time::Duration::from_secs(v.session_seconds))
        );
    });
    Ok(())
}
