//! A small HTTP/1.1 client for the admin API (used by `dynagate ctl` and the tests): one
//! connection per call, bearer token, optional JSON body, answer as `(status, body)`.
//!
//! `Client::send` is async; `Client::send_blocking` runs it on a private current-thread
//! runtime and must not be called from inside a Tokio runtime.

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// Default time for one whole call: connect, send, and read the answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError(pub String);

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ClientError {}

/// An answer from the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<serde_json::Value, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            ClientError(format!(
                "admin API answered {} with a body that is not JSON: {e}",
                self.status
            ))
        })
    }
}

#[derive(Clone)]
pub struct Client {
    /// `host:port` to connect to and to send as `Host`.
    authority: String,
    /// Path prefix from the URL, without a trailing `/` (usually empty).
    base_path: String,
    token: String,
    timeout: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("authority", &self.authority)
            .field("base_path", &self.base_path)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// `admin` is `http://host:port[/prefix]` or `host:port`. A wildcard listen address
    /// (`0.0.0.0`, `[::]`) is reached through loopback.
    pub fn new(admin: &str, token: &str) -> Result<Client, ClientError> {
        let (authority, base_path) = parse_admin(admin)?;
        Ok(Client {
            authority,
            base_path,
            token: token.trim().to_string(),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// `host:port` this client connects to.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Sends `method path_and_query` with `body` as JSON (if any).
    pub async fn send(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&[u8]>,
    ) -> Result<Reply, ClientError> {
        let content_type = body.map(|_| "application/json");
        self.send_raw(method, path_and_query, body, content_type)
            .await
    }

    /// Like `send`, with any content type (the dyups API takes `text/plain`).
    pub async fn send_raw(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&[u8]>,
        content_type: Option<&str>,
    ) -> Result<Reply, ClientError> {
        let call = self.call(method, path_and_query, body, content_type);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(ClientError(format!(
                "admin API at {} did not answer within {}s",
                self.authority,
                self.timeout.as_secs()
            ))),
        }
    }

    /// `send` for synchronous callers: runs on a private current-thread runtime.
    pub fn send_blocking(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&[u8]>,
    ) -> Result<Reply, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError(format!("cannot start a runtime: {e}")))?;
        rt.block_on(self.send(method, path_and_query, body))
    }

    async fn call(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&[u8]>,
        content_type: Option<&str>,
    ) -> Result<Reply, ClientError> {
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| ClientError(format!("{method:?} is not an HTTP method")))?;
        if !path_and_query.starts_with('/') {
            return Err(ClientError(format!(
                "path {path_and_query:?} must start with /"
            )));
        }
        let uri = format!("{}{}", self.base_path, path_and_query);
        let mut request = Request::builder()
            .method(method)
            .uri(&uri)
            .header(HOST, &self.authority)
            .header(
                USER_AGENT,
                concat!("dynagate-ctl/", env!("CARGO_PKG_VERSION")),
            )
            .header(AUTHORIZATION, format!("Bearer {}", self.token));
        if let Some(ct) = content_type {
            request = request.header(CONTENT_TYPE, ct);
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))
            .map_err(|e| ClientError(format!("cannot build the request for {uri:?}: {e}")))?;

        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| {
                ClientError(format!(
                    "cannot connect to the admin API at {}: {e}",
                    self.authority
                ))
            })?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError(format!("admin API at {}: {e}", self.authority)))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| ClientError(format!("admin API at {}: {e}", self.authority)))?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| {
                    ClientError(format!(
                        "admin API at {}: reading the answer: {e}",
                        self.authority
                    ))
                })?
                .to_bytes();
            Ok(Reply { status, body })
        }
        .await;
        driver.abort();
        result
    }
}

/// Splits an admin URL or address into `host:port` and a path prefix.
fn parse_admin(admin: &str) -> Result<(String, String), ClientError> {
    let text = admin.trim();
    let bad = |why: &str| ClientError(format!("admin address {text:?} {why}"));
    let (rest, default_port) = if let Some(rest) = text.strip_prefix("http://") {
        (rest, Some(80))
    } else if text.starts_with("https://") {
        return Err(bad(
            "uses https, which the admin API does not serve; use http:// over loopback or a tunnel",
        ));
    } else if text.contains("://") {
        return Err(bad(
            "has an unsupported scheme; use http://host:port or host:port",
        ));
    } else {
        (text, None)
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("has no host:port"));
    }
    // Split host and port, keeping IPv6 brackets.
    let (host, port) = if let Some(v6end) = authority
        .strip_prefix('[')
        .and_then(|a| a.find(']').map(|i| i + 1))
    {
        let host = &authority[..=v6end];
        match &authority[v6end + 1..] {
            "" => (host, None),
            p => (
                host,
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| bad("has junk after the IPv6 address"))?,
                ),
            ),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port: u16 = match port {
        Some(p) => p
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("has an invalid port"))?,
        None => default_port.ok_or_else(|| bad("has no port (use host:port)"))?,
    };
    let host = match host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        Ok(IpAddr::V4(ip)) if ip.is_unspecified() => "127.0.0.1".to_string(),
        Ok(IpAddr::V6(ip)) if ip.is_unspecified() => "[::1]".to_string(),
        Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
        Ok(IpAddr::V4(ip)) => ip.to_string(),
        Err(_) if host.is_empty() || host.starts_with('[') => {
            return Err(bad("has an invalid host"))
        }
        Err(_) => host.to_string(),
    };
    Ok((format!("{host}:{port}"), path.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_admin_addresses() {
        let ok = |s: &str| parse_admin(s).unwrap();
        assert_eq!(ok("127.0.0.1:9180"), ("127.0.0.1:9180".into(), "".into()));
        assert_eq!(
            ok("http://127.0.0.1:9180/"),
            ("127.0.0.1:9180".into(), "".into())
        );
        assert_eq!(
            ok("http://localhost:9180/admin/"),
            ("localhost:9180".into(), "/admin".into())
        );
        assert_eq!(
            ok("http://example.com"),
            ("example.com:80".into(), "".into())
        );
        assert_eq!(ok("0.0.0.0:9180"), ("127.0.0.1:9180".into(), "".into()));
        assert_eq!(ok("[::]:9180"), ("[::1]:9180".into(), "".into()));
        assert_eq!(ok("http://[::1]:9180"), ("[::1]:9180".into(), "".into()));
        for bad in [
            "",
            "localhost",
            "https://x:1",
            "ftp://x:1",
            "x:0",
            "x:99999",
            "[::1",
            "[::1]x:80",
            "user@x:1",
            ":80",
        ] {
            assert!(parse_admin(bad).is_err(), "{bad}");
        }
    }
}
