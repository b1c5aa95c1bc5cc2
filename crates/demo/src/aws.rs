//! The demo service's AWS mode: proves its access key works with a
//! SigV4-signed STS `GetCallerIdentity` (the call every AWS SDK can make with
//! any valid key, and which needs no permission). Signing is done here with
//! ring (HMAC-SHA256, SHA-256), following the published SigV4 algorithm.

use http_body_util::BodyExt;
use rekey_common::error::chain;
use rekey_common::secret::SecretBytes;
use std::time::Duration;

const BODY: &str = "Action=GetCallerIdentity&Version=2011-06-15";
const CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data))
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), data).as_ref().to_vec()
}

/// `YYYYMMDDTHHMMSSZ` for a Unix time.
fn amz_date(unix: i64) -> String {
    rekey_common::time::format_unix(unix).replace(['-', ':'], "")
}

/// The SigV4 `Authorization` header of the STS request (pure, for tests).
pub fn authorization(host: &str, region: &str, access_key_id: &str, secret: &[u8], amz_date: &str) -> String {
    let date = &amz_date[..8];
    let canonical = format!(
        "POST\n/\n\ncontent-type:{CONTENT_TYPE}\nhost:{host}\nx-amz-date:{amz_date}\n\ncontent-type;host;x-amz-date\n{}",
        sha256_hex(BODY.as_bytes())
    );
    let scope = format!("{date}/{region}/sts/aws4_request");
    let to_sign = format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}", sha256_hex(canonical.as_bytes()));
    let mut k = b"AWS4".to_vec();
    k.extend_from_slice(secret);
    let k = hmac(&hmac(&hmac(&hmac(&k, date.as_bytes()), region.as_bytes()), b"sts"), b"aws4_request");
    format!(
        "AWS4-HMAC-SHA256 Credential={access_key_id}/{scope}, SignedHeaders=content-type;host;x-amz-date, Signature={}",
        hex::encode(hmac(&k, to_sign.as_bytes()))
    )
}

/// Calls STS `GetCallerIdentity` at `endpoint` (`http://host:port`); returns
/// the status and, on failure, the AWS error code.
pub async fn get_caller_identity(
    endpoint: &str,
    region: &str,
    access_key_id: &str,
    secret: &SecretBytes,
) -> Result<(u16, String), String> {
    let uri: http::Uri = endpoint.parse().map_err(|e| format!("invalid --aws-sts {endpoint:?}: {e}"))?;
    let auth = uri.authority().ok_or_else(|| format!("{endpoint:?} has no host"))?.clone();
    let port = auth.port_u16().unwrap_or(80);
    let stream = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect((auth.host(), port)))
        .await
        .map_err(|_| format!("cannot connect to {auth} within 3s"))?
        .map_err(|e| format!("cannot connect to {auth}: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| chain(&e))?;
    let conn = tokio::spawn(conn);
    let date = amz_date(rekey_common::time::now_unix());
    let mut authz =
        http::HeaderValue::from_str(&authorization(auth.as_str(), region, access_key_id, secret.expose(), &date))
            .map_err(|e| e.to_string())?;
    authz.set_sensitive(true);
    let req = http::Request::post("/")
        .header(http::header::HOST, auth.as_str())
        .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
        .header("x-amz-date", &date)
        .header(http::header::AUTHORIZATION, authz)
        .body(http_body_util::Full::new(hyper::body::Bytes::from_static(BODY.as_bytes())))
        .map_err(|e| e.to_string())?;
    let result = async {
        let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
            .await
            .map_err(|_| "no answer from sts within 5s".to_string())?
            .map_err(|e| chain(&e))?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| chain(e.as_ref()))?
            .to_bytes();
        let body = String::from_utf8_lossy(&body);
        let code = body
            .split_once("<Code>")
            .and_then(|(_, rest)| rest.split_once("</Code>"))
            .map(|(c, _)| c.to_string())
            .unwrap_or_default();
        Ok((status, code))
    }
    .await;
    conn.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_like_the_published_algorithm() {
        // Fixed inputs → a fixed, deterministic signature; a change in the
        // canonical request or the key derivation changes it.
        let a = authorization(
            "sts.amazonaws.com",
            "us-east-1",
            "AKIDEXAMPLE",
            b"wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "20150830T123600Z",
        );
        assert!(a.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/sts/aws4_request, "), "{a}");
        assert!(a.contains("SignedHeaders=content-type;host;x-amz-date, Signature="));
        let sig = a.rsplit("Signature=").next().unwrap();
        assert_eq!(sig.len(), 64);
        let b = authorization("sts.amazonaws.com", "us-east-1", "AKIDEXAMPLE", b"another-secret", "20150830T123600Z");
        assert_ne!(a, b);
        assert!(!a.contains("wJalrXUtnFEMI"), "the secret never appears in the header");
        assert_eq!(amz_date(1_440_938_160), "20150830T123600Z");
    }
}
