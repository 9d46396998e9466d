//! Issue 11 on the HTTP/2 path: a client speaking HTTP/2 prior knowledge cannot reach a
//! backend outside its route's path prefix, forge underscore headers, or confuse the
//! host, and the backend sees the normalised path (or, if the route says so, the
//! original bytes).

use crate::harness::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What an echo backend received: one "path-and-query\nname: value\n..." per request.
type Seen = Arc<Mutex<Vec<String>>>;

/// An HTTP/1 backend that answers 200 with the request's target and headers as it
/// received them, and records them.
async fn echo_backend() -> (SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let mut text = format!("{}\n", req.uri());
                        for (k, v) in req.headers() {
                            text.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
                        }
                        seen.lock().unwrap().push(text.clone());
                        Ok::<_, std::convert::Infallible>(http::Response::new(full(text)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// A gateway with one echo backend behind `routes` (id, host, prefix, options).
async fn gateway(
    dir: &TempDir,
    routes: &[(&str, &str, &str, serde_json::Value)],
) -> (Gateway, Seen) {
    let gw = Gateway::start(dir.path()).await;
    let (addr, seen) = echo_backend().await;
    gw.ok(
        "PUT",
        "/v1/upstreams/echo",
        serde_json::json!({"servers": [{"address": addr.to_string()}]}),
    )
    .await;
    for (id, host, prefix, extra) in routes {
        let mut body =
            serde_json::json!({"hosts": [host], "path_prefix": prefix, "upstream": "echo"});
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        gw.ok("PUT", &format!("/v1/routes/{id}"), body).await;
    }
    (gw, seen)
}

/// Sends `req` over a new HTTP/2 connection; the status and the body.
async fn h2_send(gw: &Gateway, req: Request<BoxBody>) -> (StatusCode, String) {
    let mut client = h2_connect(gw.proxy).await;
    let resp = client.send_request(req).await.expect("h2 request");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn h2_get(gw: &Gateway, uri: &str) -> (StatusCode, String) {
    h2_send(gw, Request::get(uri).body(full("")).unwrap()).await
}

/// The target line the backend received, from an echo answer.
fn target(body: &str) -> &str {
    body.lines().next().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_cannot_leave_the_route_prefix() {
    let dir = TempDir::new("h2-dots");
    let (gw, seen) = gateway(
        &dir,
        &[("public", "h2.example", "/public", serde_json::json!({}))],
    )
    .await;
    for path in [
        "/public/../admin-only",
        "/public/%2e%2e/admin-only",
        "/public/%2E%2e/admin-only",
        "/public/.%2E/admin-only",
        "/public/x/../../admin-only",
    ] {
        let (status, body) = h2_get(&gw, &format!("http://h2.example{path}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert!(
            body.contains("\"/admin-only\""),
            "routed as /admin-only: {body}"
        );
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "nothing reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_sees_the_normalised_path_and_the_query_as_sent() {
    let dir = TempDir::new("h2-norm");
    let (gw, _) = gateway(
        &dir,
        &[("public", "h2.example", "/public", serde_json::json!({}))],
    )
    .await;
    for (sent, received) in [
        ("/public/./x", "/public/x"),
        ("/public//x", "/public/x"),
        ("/public/a/../x/", "/public/x/"),
        ("/public/%7Euser/%2fetc", "/public/~user/%2Fetc"),
        ("/public/a/./b?q=./../%2e&r", "/public/a/b?q=./../%2e&r"),
        // Already normal: forwarded as it came.
        ("/public/caf%C3%A9?x=1", "/public/caf%C3%A9?x=1"),
    ] {
        let (status, body) = h2_get(&gw, &format!("http://h2.example{sent}")).await;
        assert_eq!(status, StatusCode::OK, "{sent}: {body}");
        assert_eq!(target(&body), received, "{sent}");
    }
    // An encoded dot-dot can still move within the prefix.
    let (status, body) = h2_get(&gw, "http://h2.example/public/a/%2e%2e/b").await;
    assert_eq!((status, target(&body)), (StatusCode::OK, "/public/b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_original_path_sends_the_client_bytes_but_routes_on_the_normal_form() {
    let dir = TempDir::new("h2-orig");
    let (gw, seen) = gateway(
        &dir,
        &[(
            "raw",
            "h2.example",
            "/raw",
            serde_json::json!({"forward_original_path": true}),
        )],
    )
    .await;
    let (status, body) = h2_get(&gw, "http://h2.example/raw/./a//b/%2e%2E/c%2f?q=%2e").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(target(&body), "/raw/./a//b/%2e%2E/c%2f?q=%2e");
    // Routing still uses the normalised path: out of the prefix is out of the route.
    let (status, _) = h2_get(&gw, "http://h2.example/raw/../elsewhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // And a path that does not normalise is refused whatever the route says.
    let (status, _) = h2_get(&gw, "http://h2.example/raw/../../x").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_that_do_not_normalise_are_refused_with_400() {
    let dir = TempDir::new("h2-bad-path");
    let (gw, seen) = gateway(&dir, &[("any", "h2.example", "/", serde_json::json!({}))]).await;
    for (path, why) in [
        ("/..", "path climbs above the root"),
        ("/a/../../x", "path climbs above the root"),
        ("/%2e%2e/x", "path climbs above the root"),
        ("/a%zz", "invalid percent-encoding in path"),
        ("/a%4", "invalid percent-encoding in path"),
        ("/a%00b", "NUL in path"),
    ] {
        let (status, body) = h2_get(&gw, &format!("http://h2.example{path}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert!(body.contains(why), "{path}: {body}");
    }
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_headers_are_not_forwarded() {
    let dir = TempDir::new("h2-underscore");
    let (gw, _) = gateway(&dir, &[("any", "h2.example", "/", serde_json::json!({}))]).await;
    let req = Request::get("http://h2.example/x")
        .header("x_user", "admin")
        .header("x-user", "guest")
        .header("x-trace_id", "1")
        .body(full(""))
        .unwrap();
    let (status, body) = h2_send(&gw, req).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("x-user: guest\n"), "{body}");
    assert!(!body.contains('_'), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_or_conflicting_authority_is_refused_with_400() {
    let dir = TempDir::new("h2-authority");
    let (gw, seen) = gateway(&dir, &[("any", "h2.example", "/", serde_json::json!({}))]).await;
    // :authority values hyper's client sends but the Host rules refuse.
    for (uri, why) in [
        ("http://a..b/", ".. in host"),
        ("http://user@h2.example/", "invalid character in host"),
        ("http://h2.example:99999/", "port above 65535"),
        ("http://h2.example:/", "empty port"),
        ("http://h_2.example!/", "invalid character in host"),
    ] {
        let req = Request::get(uri).body(full("")).unwrap();
        let (status, body) = h2_send(&gw, req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        assert!(body.contains(why), "{uri}: {body}");
    }
    // A Host header naming another site than :authority.
    let req = Request::get("http://h2.example/")
        .header("host", "other.example")
        .body(full(""))
        .unwrap();
    let (status, body) = h2_send(&gw, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("Host differs from :authority"), "{body}");
    assert!(seen.lock().unwrap().is_empty());

    // The same authority written differently is the same: case, default port.
    let req = Request::get("http://h2.example/")
        .header("host", "H2.Example:80")
        .body(full(""))
        .unwrap();
    let (status, body) = h2_send(&gw, req).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("\nhost: h2.example\n"),
        "the authority wins: {body}"
    );
    assert!(body.contains("\nx-forwarded-host: h2.example\n"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_without_authority_is_validated_and_used() {
    let dir = TempDir::new("h2-host");
    let (gw, _) = gateway(&dir, &[("any", "h2.example", "/", serde_json::json!({}))]).await;
    // A relative URI: hyper's client sends no :authority, only the Host header.
    let req = Request::get("/x")
        .header("host", "h2.example")
        .body(full(""))
        .unwrap();
    let (status, body) = h2_send(&gw, req).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let req = Request::get("/x")
        .header("host", "h2..example")
        .body(full(""))
        .unwrap();
    assert_eq!(h2_send(&gw, req).await.0, StatusCode::BAD_REQUEST);
    let req = Request::get("/x").body(full("")).unwrap();
    let (status, body) = h2_send(&gw, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("no :authority and no Host"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_other_than_origin_form_are_refused_with_400() {
    let dir = TempDir::new("h2-target");
    let (gw, seen) = gateway(&dir, &[("any", "h2.example", "/", serde_json::json!({}))]).await;
    for method in ["OPTIONS", "GET"] {
        let req = Request::builder()
            .method(method)
            .uri("*")
            .header("host", "h2.example")
            .body(full(""))
            .unwrap();
        let (status, body) = h2_send(&gw, req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} *: {body}");
        assert!(body.contains("not origin-form"), "{body}");
    }
    let req = Request::get("ftp://h2.example/x").body(full("")).unwrap();
    let (status, body) = h2_send(&gw, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("scheme"), "{body}");
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connection_tokens_cannot_strip_content_length() {
    let dir = TempDir::new("h2-conn");
    let gw = Gateway::start(dir.path()).await;
    // A backend that names its own framing and a private header in Connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                loop {
                    while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = got.drain(..end + 4).collect::<Vec<u8>>();
                        let body: &[u8] = if head.starts_with(b"HEAD ") {
                            b""
                        } else {
                            b"hello"
                        };
                        let answer = [
                            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\
                               Connection: content-length, x-private\r\nX-Private: 1\r\n\r\n"[..],
                            body,
                        ]
                        .concat();
                        if s.write_all(&answer).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    gw.ok(
        "PUT",
        "/v1/upstreams/raw",
        serde_json::json!({"servers": [{"address": addr.to_string()}]}),
    )
    .await;
    gw.put_route("r", &["h2.example"], "/", "raw").await;
    let mut client = h2_connect(gw.proxy).await;
    let resp = client
        .send_request(Request::get("http://h2.example/").body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], "5");
    assert!(!resp.headers().contains_key("x-private"));
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello");
    // HEAD: no body follows, so only the header says how long the resource is (hyper
    // would write a content-length of 0 from the empty body if it had been stripped).
    let resp = client
        .send_request(Request::head("http://h2.example/").body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], "5");
    assert!(!resp.headers().contains_key("x-private"));
}
