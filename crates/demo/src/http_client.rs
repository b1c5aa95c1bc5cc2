//! A minimal HTTP/1.1 client (one request per connection) over hyper, for
//! the demo service's calls to the demo API.

use http_body_util::BodyExt;
use rekey_common::error::chain;
use std::time::Duration;

/// A parsed `http://host:port[/prefix]` base URL.
#[derive(Debug, Clone)]
pub struct BaseUrl {
    host: String,
    port: u16,
    authority: String,
    prefix: String,
}

impl BaseUrl {
    pub fn parse(text: &str) -> Result<BaseUrl, String> {
        let uri: http::Uri = text.parse().map_err(|e| format!("invalid URL {text:?}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("expected an http:// URL, got {text:?}"));
        }
        let auth = uri.authority().ok_or_else(|| format!("{text:?} has no host"))?;
        Ok(BaseUrl {
            host: auth.host().trim_start_matches('[').trim_end_matches(']').to_string(),
            port: auth.port_u16().unwrap_or(80),
            authority: auth.as_str().to_string(),
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }
}

/// GET `base` + `path` with an optional bearer token; returns status and body.
pub async fn get(
    base: &BaseUrl,
    path: &str,
    bearer: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), String> {
    tokio::time::timeout(timeout, get_inner(base, path, bearer))
        .await
        .map_err(|_| format!("no answer within {}ms", timeout.as_millis()))?
}

async fn get_inner(base: &BaseUrl, path: &str, bearer: Option<&[u8]>) -> Result<(u16, Vec<u8>), String> {
    let stream = tokio::net::TcpStream::connect((base.host.as_str(), base.port))
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", base.authority))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| chain(&e))?;
    let conn = tokio::spawn(conn);
    let mut req = http::Request::get(format!("{}{path}", base.prefix)).header(http::header::HOST, &base.authority);
    if let Some(token) = bearer {
        let mut v = b"Bearer ".to_vec();
        v.extend_from_slice(token);
        let mut value =
            http::HeaderValue::from_bytes(&v).map_err(|_| "the token is not a valid header value".to_string())?;
        value.set_sensitive(true);
        req = req.header(http::header::AUTHORIZATION, value);
    }
    let req = req.body(http_body_util::Empty::<hyper::body::Bytes>::new()).map_err(|e| e.to_string())?;
    let result = async {
        let resp = sender.send_request(req).await.map_err(|e| chain(&e))?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| chain(e.as_ref()))?
            .to_bytes()
            .to_vec();
        Ok((status, body))
    }
    .await;
    conn.abort();
    result
}
