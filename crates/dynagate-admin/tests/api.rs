//! The admin API over real HTTP, against a real Controller and SQLite store.

mod common;

use common::{upstream_body, Harness, TOKEN};
use dynagate_admin::client::Client;
use serde_json::{json, Value};

const SHOP: &str = "/v1/upstreams/shop";

/// An upstream `shop` with two servers and a route `r1` to it (revisions 1 and 2).
async fn seeded() -> Harness {
    let h = Harness::start().await;
    let out = h
        .ok(
            "PUT",
            SHOP,
            Some(&upstream_body(&["127.0.0.1:9001", "127.0.0.1:9002"])),
        )
        .await;
    assert_eq!(out["revision"], 1);
    let route = r#"{"hosts":["shop.example.com"],"path_prefix":"/","upstream":"shop"}"#;
    let out = h.ok("PUT", "/v1/routes/r1", Some(route)).await;
    assert_eq!(out["revision"], 2);
    h
}

/// Asserts a refused call: its status, an error naming `needle`, and no state change.
async fn refused(
    h: &Harness,
    method: &str,
    path: &str,
    body: Option<&str>,
    status: u16,
    needle: &str,
) {
    let before = h.state().await;
    let reply = h.call(method, path, body).await;
    let text = reply.text();
    assert_eq!(reply.status, status, "{method} {path} {body:?}: {text}");
    let value: Value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text}"));
    let message = value["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {text}"));
    assert!(
        message.contains(needle),
        "{method} {path}: {message:?} does not name {needle:?}"
    );
    assert_eq!(h.state().await, before, "{method} {path} changed the state");
}

#[tokio::test]
async fn every_call_needs_the_token() {
    let h = seeded().await;
    let before = h.state().await;
    let wrong = Client::new(&h.addr.to_string(), "test-token-5f1c0e9a7b3d2c4f").unwrap();
    let short = Client::new(&h.addr.to_string(), &TOKEN[..TOKEN.len() - 1]).unwrap();
    let calls: &[(&str, &str, Option<&str>)] = &[
        ("GET", "/v1/upstreams", None),
        ("GET", SHOP, None),
        ("DELETE", "/v1/routes/r1", None),
        ("PUT", SHOP, Some(r#"{"servers":[]}"#)),
        ("POST", "/v1/revisions/1/rollback", None),
        ("GET", "/list", None),
        ("DELETE", "/upstream/shop", None),
        ("GET", "/no/such/path", None),
        ("PATCH", "/v1/upstreams", None),
    ];
    for (method, path, body) in calls {
        for client in [&wrong, &short] {
            let reply = client
                .send(method, path, body.map(str::as_bytes))
                .await
                .unwrap();
            assert_eq!(reply.status, 401, "{method} {path}");
            let v = reply.json().unwrap();
            assert!(v["error"].as_str().unwrap().contains("token"), "{v}");
        }
    }
    // No Authorization header at all, and other schemes.
    for auth in [
        "",
        "Authorization: Basic dGVzdDp0ZXN0\r\n",
        "Authorization: Bearer\r\n",
        "Authorization: bearer \r\n",
    ] {
        let req =
            format!("GET /v1/upstreams HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
        let resp = h.raw(req.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 401"), "{auth:?}: {resp}");
        assert!(
            resp.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{resp}"
        );
        assert!(resp.contains(r#"{"error":"#), "{resp}");
    }
    // The token twice is refused too.
    let req = format!(
        "GET /v1/upstreams HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    assert!(h.raw(req.as_bytes()).await.starts_with("HTTP/1.1 401"));
    // Scheme is case-insensitive.
    let req = format!("GET /v1/upstreams HTTP/1.1\r\nHost: x\r\nAuthorization: bearer {TOKEN}\r\nConnection: close\r\n\r\n");
    assert!(h.raw(req.as_bytes()).await.starts_with("HTTP/1.1 200"));
    assert_eq!(h.state().await, before);
}

#[tokio::test]
async fn invalid_input_is_400_naming_the_field_and_changes_nothing() {
    let h = seeded().await;
    let one = |addr: &str, weight: &str| {
        format!(r#"{{"servers":[{{"address":"{addr}","weight":{weight}}}]}}"#)
    };
    let cases: Vec<(&str, String, Option<String>, &str)> = vec![
        (
            "PUT",
            SHOP.into(),
            Some(r#"{"servers":[],"bogus":1}"#.into()),
            "unknown field `bogus`",
        ),
        (
            "PUT",
            SHOP.into(),
            Some(r#"{"servers":[{"address":"a:1","port":1}]}"#.into()),
            "servers[0].port: unknown field `port`",
        ),
        (
            "PUT",
            SHOP.into(),
            Some(one("127.0.0.1", "1")),
            "servers[0].address",
        ),
        (
            "PUT",
            SHOP.into(),
            Some(one("::1:80", "1")),
            "servers[0].address",
        ),
        (
            "PUT",
            SHOP.into(),
            Some(one("127.0.0.1:9001", "0")),
            "servers[0].weight",
        ),
        (
            "PUT",
            SHOP.into(),
            Some(one("127.0.0.1:9001", "1001")),
            "servers[0].weight",
        ),
        (
            "PUT",
            SHOP.into(),
            Some(one("127.0.0.1:9001", "\"x\"")),
            "servers[0].weight: invalid type",
        ),
        (
            "PUT",
            SHOP.into(),
            Some(one("127.0.0.1:9001", "-1")),
            "servers[0].weight",
        ),
        (
            "PUT",
            SHOP.into(),
            Some(upstream_body(&["127.0.0.1:9001", "127.0.0.1:9001"])),
            "servers[1].address",
        ),
        (
            "PUT",
            SHOP.into(),
            Some(r#"{"servers":["#.into()),
            "line 1 column",
        ),
        ("PUT", SHOP.into(), Some("".into()), "body: EOF"),
        (
            "PUT",
            SHOP.into(),
            Some("[]".into()),
            "body: expected a JSON object",
        ),
        (
            "PUT",
            SHOP.into(),
            Some(r#"{"servers":[]} x"#.into()),
            "body: trailing characters",
        ),
        (
            "PUT",
            SHOP.into(),
            Some(r#"{"name":"other","servers":[]}"#.into()),
            "name: \"other\"",
        ),
        (
            "PUT",
            SHOP.into(),
            Some(r#"{"retries":21}"#.into()),
            "retries",
        ),
        (
            "PUT",
            SHOP.into(),
            Some(r#"{"connect_timeout":"5 parsecs"}"#.into()),
            "connect_timeout",
        ),
        (
            "PUT",
            SHOP.into(),
            Some(r#"{"balance":"fastest"}"#.into()),
            "balance",
        ),
        (
            "PUT",
            "/v1/upstreams/bad%20name".into(),
            Some(upstream_body(&["127.0.0.1:1"])),
            "name",
        ),
        (
            "PUT",
            format!("{SHOP}?force=maybe"),
            Some(upstream_body(&["127.0.0.1:1"])),
            "force",
        ),
        (
            "PUT",
            format!("{SHOP}?forse=true"),
            Some(upstream_body(&["127.0.0.1:1"])),
            "forse",
        ),
        (
            "POST",
            format!("{SHOP}/servers"),
            Some(r#"{"address":"nohost"}"#.into()),
            "server.address",
        ),
        (
            "POST",
            format!("{SHOP}/servers"),
            Some(r#"{"address":"127.0.0.1:9009","weight":0}"#.into()),
            "server.weight",
        ),
        (
            "POST",
            format!("{SHOP}/servers"),
            Some(r#"{"address":"127.0.0.1:9009","drain":true}"#.into()),
            "unknown field `drain`",
        ),
        (
            "POST",
            format!("{SHOP}/servers"),
            Some(r#"{"weight":2}"#.into()),
            "missing field `address`",
        ),
        (
            "PATCH",
            format!("{SHOP}/servers/127.0.0.1:9001"),
            Some("{}".into()),
            "body",
        ),
        (
            "PATCH",
            format!("{SHOP}/servers/127.0.0.1:9001"),
            Some(r#"{"weight":0}"#.into()),
            "weight",
        ),
        (
            "PATCH",
            format!("{SHOP}/servers/127.0.0.1:9001"),
            Some(r#"{"state":"sleeping"}"#.into()),
            "state: unknown variant",
        ),
        (
            "PATCH",
            format!("{SHOP}/servers/127.0.0.1:9001"),
            Some(r#"{"address":"x:1"}"#.into()),
            "unknown field `address`",
        ),
        (
            "DELETE",
            format!("{SHOP}/servers/127.0.0.1:9001?force=1"),
            None,
            "force",
        ),
        (
            "PUT",
            "/v1/routes/r2".into(),
            Some(r#"{"hosts":["a.example.com"],"upstream":"missing"}"#.into()),
            "upstream: upstream \"missing\" does not exist",
        ),
        (
            "PUT",
            "/v1/routes/r2".into(),
            Some(r#"{"hosts":["A.example.com"],"upstream":"shop"}"#.into()),
            "hosts[0]",
        ),
        (
            "PUT",
            "/v1/routes/r2".into(),
            Some(r#"{"path_prefix":"nope","upstream":"shop"}"#.into()),
            "path_prefix",
        ),
        (
            "PUT",
            "/v1/routes/r2".into(),
            Some(r#"{"methods":["get"],"upstream":"shop"}"#.into()),
            "methods[0]",
        ),
        (
            "PUT",
            "/v1/routes/r2".into(),
            Some(r#"{"hosts":["b.example.com"]}"#.into()),
            "missing field `upstream`",
        ),
        (
            "PUT",
            "/v1/routes/r2".into(),
            Some(r#"{"id":"r3","upstream":"shop"}"#.into()),
            "id: \"r3\"",
        ),
        ("GET", "/v1/revisions?limit=x".into(), None, "limit"),
        ("GET", "/v1/revisions?limit=0".into(), None, "limit"),
        ("GET", "/v1/revisions?limit=-1".into(), None, "limit"),
        ("GET", "/v1/revisions?since=1".into(), None, "since"),
        (
            "GET",
            "/v1/upstreams?x=1".into(),
            None,
            "x: unknown query parameter",
        ),
        (
            "POST",
            "/v1/revisions/one/rollback".into(),
            None,
            "revision",
        ),
        ("POST", "/v1/revisions/-1/rollback".into(), None, "revision"),
        (
            "GET",
            "/v1/upstreams/%zz".into(),
            None,
            "upstream name in path",
        ),
        ("GET", "/v1/upstreams/%C3%28".into(), None, "UTF-8"),
    ];
    for (method, path, body, needle) in &cases {
        refused(&h, method, path, body.as_deref(), 400, needle).await;
    }
}

#[tokio::test]
async fn missing_things_are_404_and_conflicts_409() {
    let h = seeded().await;
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        (
            "GET",
            "/v1/upstreams/nope",
            None,
            404,
            "upstream \"nope\" does not exist",
        ),
        ("DELETE", "/v1/upstreams/nope", None, 404, "nope"),
        ("GET", "/v1/upstreams/nope/servers", None, 404, "nope"),
        (
            "POST",
            "/v1/upstreams/nope/servers",
            Some(r#"{"address":"127.0.0.1:1"}"#),
            404,
            "nope",
        ),
        (
            "GET",
            "/v1/upstreams/shop/servers/127.0.0.1:1",
            None,
            404,
            "127.0.0.1:1",
        ),
        (
            "PATCH",
            "/v1/upstreams/shop/servers/127.0.0.1:1",
            Some(r#"{"weight":2}"#),
            404,
            "127.0.0.1:1",
        ),
        (
            "DELETE",
            "/v1/upstreams/shop/servers/127.0.0.1:1",
            None,
            404,
            "127.0.0.1:1",
        ),
        ("GET", "/v1/routes/nope", None, 404, "route \"nope\""),
        ("DELETE", "/v1/routes/nope", None, 404, "nope"),
        (
            "POST",
            "/v1/revisions/99/rollback",
            None,
            404,
            "revision 99",
        ),
        ("GET", "/v1/nothing", None, 404, "no such endpoint"),
        (
            "GET",
            "/v1/upstreams/shop/servers/127.0.0.1:9001/extra",
            None,
            404,
            "no such endpoint",
        ),
        ("GET", "/v1/upstreams/", None, 404, "no such endpoint"),
        // `GET /` redirects to the dashboard; other methods stay unknown.
        ("DELETE", "/", None, 404, "no such endpoint"),
        ("GET", "/upstream", None, 404, "no such endpoint"),
        // 409: would empty, duplicate, in use, same match.
        ("PUT", SHOP, Some(r#"{"servers":[]}"#), 409, "force=true"),
        (
            "POST",
            "/v1/upstreams/shop/servers",
            Some(r#"{"address":"127.0.0.1:9001"}"#),
            409,
            "already has server",
        ),
        ("DELETE", SHOP, None, 409, "used by routes: r1"),
        (
            "PUT",
            "/v1/routes/r9",
            Some(r#"{"hosts":["shop.example.com"],"upstream":"shop"}"#),
            409,
            "route \"r1\"",
        ),
    ];
    for (method, path, body, status, needle) in cases {
        refused(&h, method, path, *body, *status, needle).await;
    }
    // The last server needs force.
    h.ok("DELETE", "/v1/upstreams/shop/servers/127.0.0.1:9002", None)
        .await;
    refused(
        &h,
        "DELETE",
        "/v1/upstreams/shop/servers/127.0.0.1:9001",
        None,
        409,
        "last server",
    )
    .await;
    refused(
        &h,
        "DELETE",
        "/v1/upstreams/shop/servers/127.0.0.1:9001?force=false",
        None,
        409,
        "force=true",
    )
    .await;
    let out = h
        .ok(
            "DELETE",
            "/v1/upstreams/shop/servers/127.0.0.1:9001?force=true",
            None,
        )
        .await;
    assert_eq!(out["changed"], true);
    let (_, up) = h.json("GET", SHOP, None).await;
    assert_eq!(up["servers"], json!([]));
}

#[tokio::test]
async fn wrong_methods_are_405_with_allow() {
    let h = seeded().await;
    let cases: &[(&str, &str, &str)] = &[
        ("POST", "/v1/upstreams", "GET"),
        ("DELETE", "/v1/upstreams", "GET"),
        ("POST", SHOP, "GET, PUT, DELETE"),
        ("PATCH", SHOP, "GET, PUT, DELETE"),
        ("PUT", "/v1/upstreams/shop/servers", "GET, POST"),
        (
            "PUT",
            "/v1/upstreams/shop/servers/127.0.0.1:9001",
            "GET, PATCH, DELETE",
        ),
        ("POST", "/v1/routes", "GET"),
        ("PATCH", "/v1/routes/r1", "GET, PUT, DELETE"),
        ("DELETE", "/v1/revisions", "GET"),
        ("GET", "/v1/revisions/1/rollback", "POST"),
        ("PUT", "/upstream/shop", "GET, POST, DELETE"),
        ("POST", "/list", "GET"),
        ("DELETE", "/detail", "GET"),
    ];
    for (method, path, allow) in cases {
        let before = h.state().await;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let resp = h.raw(req.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 405"), "{method} {path}: {resp}");
        assert!(
            resp.to_ascii_lowercase()
                .contains(&format!("allow: {}", allow.to_ascii_lowercase())),
            "{method} {path}: {resp}"
        );
        assert_eq!(h.state().await, before);
    }
}

#[tokio::test]
async fn bodies_over_16_mib_are_413() {
    let h = seeded().await;
    let before = h.state().await;
    // Announced length: refused before reading.
    let req = format!(
        "PUT {SHOP} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{{",
        16 * 1024 * 1024 + 1
    );
    let resp = h.raw(req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(resp.contains("body"), "{resp}");
    // Chunked: refused once the limit is crossed. The body is valid JSON up to there
    // (a long string), so only the size can be the reason.
    let mut req = format!(
        "PUT {SHOP} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    let mut body = br#"{"name":""#.to_vec();
    body.resize(16 * 1024 * 1024 + 10, b'a');
    body.extend_from_slice(br#""}"#);
    for chunk in body.chunks(1 << 20) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let addr = h.addr;
    let resp = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut rd, mut wr) = stream.split();
        let writer = async {
            let _ = wr.write_all(&req).await; // the server may stop reading early
        };
        let mut out = Vec::new();
        let reader = async {
            let _ = rd.read_to_end(&mut out).await;
        };
        tokio::join!(writer, reader);
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    // Just under the limit is read (and refused for its content, not its size).
    let mut body = br#"{"servers":[],"x":""#.to_vec();
    body.resize(16 * 1024 * 1024 - 2, b'a');
    body.extend_from_slice(br#""}"#);
    let reply = h.client.send("PUT", SHOP, Some(&body)).await.unwrap();
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(h.state().await, before);
}

#[tokio::test]
async fn upstream_and_server_calls() {
    let h = Harness::start().await;
    assert_eq!(h.json("GET", "/v1/upstreams", None).await, (200, json!([])));
    assert_eq!(h.json("GET", "/v1/revisions", None).await, (200, json!([])));
    // Create, with and without the name in the body.
    let out = h
        .ok("PUT", SHOP, Some(&upstream_body(&["127.0.0.1:9001"])))
        .await;
    assert_eq!(
        out,
        json!({"revision":1,"summary":"create upstream shop","changed":true})
    );
    let body = r#"{"name":"cart","servers":[{"address":"cart.internal:80","weight":3,"backup":true}],"read_timeout":"2s"}"#;
    assert_eq!(
        h.ok("PUT", "/v1/upstreams/cart", Some(body)).await["revision"],
        2
    );
    // The same state again: no new revision.
    let out = h
        .ok("PUT", SHOP, Some(&upstream_body(&["127.0.0.1:9001"])))
        .await;
    assert_eq!(out["changed"], false);
    assert_eq!(out["revision"], 2);
    // GET one: spec + live.
    let (status, up) = h.json("GET", "/v1/upstreams/cart", None).await;
    assert_eq!(status, 200);
    assert_eq!(up["name"], "cart");
    assert_eq!(up["read_timeout"], "2s");
    assert_eq!(up["connect_timeout"], "5s");
    assert_eq!(up["servers"][0]["weight"], 3);
    let live = &up["live"][0];
    assert_eq!(live["address"], "cart.internal:80");
    assert_eq!(live["state"], "up");
    assert_eq!(live["backup"], true);
    assert_eq!(live["in_flight"], 0);
    assert_eq!(live["passive_unhealthy"], false);
    // GET all, ordered by name.
    let (_, all) = h.json("GET", "/v1/upstreams", None).await;
    let names: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cart", "shop"]);
    // Add servers, including IPv6.
    let out = h
        .ok(
            "POST",
            "/v1/upstreams/shop/servers",
            Some(r#"{"address":"127.0.0.1:9002","weight":5}"#),
        )
        .await;
    assert_eq!(out["revision"], 3);
    h.ok(
        "POST",
        "/v1/upstreams/shop/servers",
        Some(r#"{"address":"[::1]:80"}"#),
    )
    .await;
    let (_, servers) = h.json("GET", "/v1/upstreams/shop/servers", None).await;
    assert_eq!(servers.as_array().unwrap().len(), 3);
    // PATCH: drain, weight, backup.
    let out = h
        .ok(
            "PATCH",
            "/v1/upstreams/shop/servers/127.0.0.1:9002",
            Some(r#"{"state":"drain","weight":7}"#),
        )
        .await;
    assert_eq!(
        out["summary"],
        "update server 127.0.0.1:9002 of shop: weight=7 state=drain"
    );
    let (_, s) = h
        .json("GET", "/v1/upstreams/shop/servers/127.0.0.1:9002", None)
        .await;
    assert_eq!(
        (s["state"].as_str(), s["weight"].as_u64()),
        (Some("drain"), Some(7))
    );
    h.ok(
        "PATCH",
        "/v1/upstreams/shop/servers/%5B%3A%3A1%5D%3A80",
        Some(r#"{"backup":true}"#),
    )
    .await;
    let (_, s) = h
        .json("GET", "/v1/upstreams/shop/servers/%5B%3A%3A1%5D%3A80", None)
        .await;
    assert_eq!(s["backup"], true);
    // DELETE a server by its encoded IPv6 address, and one by the raw form.
    h.ok(
        "DELETE",
        "/v1/upstreams/shop/servers/%5B%3A%3A1%5D%3A80",
        None,
    )
    .await;
    h.ok(
        "POST",
        "/v1/upstreams/shop/servers",
        Some(r#"{"address":"[::1]:81"}"#),
    )
    .await;
    let req = format!(
        "DELETE /v1/upstreams/shop/servers/[::1]:81 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    let resp = h.raw(req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let (_, up) = h.json("GET", SHOP, None).await;
    let addrs: Vec<&str> = up["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["address"].as_str().unwrap())
        .collect();
    assert_eq!(addrs, ["127.0.0.1:9001", "127.0.0.1:9002"]);
    // Replace with ?force=true to empty, then delete.
    let out = h
        .ok(
            "PUT",
            "/v1/upstreams/shop?force=true",
            Some(r#"{"servers":[]}"#),
        )
        .await;
    assert_eq!(out["summary"], "replace upstream shop");
    let out = h.ok("DELETE", SHOP, None).await;
    assert_eq!(out["summary"], "delete upstream shop");
    assert_eq!(h.call("GET", SHOP, None).await.status, 404);
    assert_eq!(h.controller.revision(), out["revision"].as_u64().unwrap());
}

#[tokio::test]
async fn route_calls() {
    let h = seeded().await;
    let (status, routes) = h.json("GET", "/v1/routes", None).await;
    assert_eq!(status, 200);
    assert_eq!(routes[0]["id"], "r1");
    assert_eq!(routes[0]["hosts"], json!(["shop.example.com"]));
    let body = r#"{"id":"api","hosts":["*.example.com"],"path_prefix":"/api/","methods":["GET","POST"],"upstream":"shop","upstream_host":"internal.shop"}"#;
    let out = h.ok("PUT", "/v1/routes/api", Some(body)).await;
    assert_eq!(out["summary"], "create route api -> shop");
    let (status, route) = h.json("GET", "/v1/routes/api", None).await;
    assert_eq!(status, 200);
    assert_eq!(route, serde_json::from_str::<Value>(body).unwrap());
    // Switch upstream.
    h.ok(
        "PUT",
        "/v1/upstreams/shop2",
        Some(&upstream_body(&["127.0.0.1:9100"])),
    )
    .await;
    let out = h
        .ok(
            "PUT",
            "/v1/routes/api",
            Some(r#"{"hosts":["*.example.com"],"path_prefix":"/api/","upstream":"shop2"}"#),
        )
        .await;
    assert_eq!(out["summary"], "route api: switch upstream shop -> shop2");
    let (_, routes) = h.json("GET", "/v1/routes", None).await;
    assert_eq!(routes.as_array().unwrap().len(), 2);
    let out = h.ok("DELETE", "/v1/routes/api", None).await;
    assert_eq!(out["summary"], "delete route api");
    assert_eq!(h.call("GET", "/v1/routes/api", None).await.status, 404);
    // Now shop2 is unused and can go.
    h.ok("DELETE", "/v1/upstreams/shop2", None).await;
}

#[tokio::test]
async fn revisions_and_rollback() {
    let h = seeded().await; // 1: create shop, 2: create r1
    h.ok(
        "PATCH",
        "/v1/upstreams/shop/servers/127.0.0.1:9001",
        Some(r#"{"weight":9}"#),
    )
    .await; // 3
    h.ok("DELETE", "/v1/routes/r1", None).await; // 4
    h.ok("DELETE", SHOP, None).await; // 5
    let (status, revs) = h.json("GET", "/v1/revisions", None).await;
    assert_eq!(status, 200);
    let numbers: Vec<u64> = revs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [5, 4, 3, 2, 1]);
    assert_eq!(revs[0]["summary"], "delete upstream shop");
    assert!(revs[0]["time_ms"].as_u64().unwrap() > 1_600_000_000_000);
    let (_, revs) = h.json("GET", "/v1/revisions?limit=2", None).await;
    assert_eq!(revs.as_array().unwrap().len(), 2);
    assert_eq!(revs[1]["number"], 4);
    // Back to 3: shop (weight 9) and r1 return, as revision 6.
    let out = h.ok("POST", "/v1/revisions/3/rollback", None).await;
    assert_eq!(
        out,
        json!({"revision":6,"summary":"rollback to revision 3","changed":true})
    );
    let (_, up) = h.json("GET", SHOP, None).await;
    assert_eq!(up["servers"][0]["weight"], 9);
    assert_eq!(h.json("GET", "/v1/routes/r1", None).await.0, 200);
    // To 1: the route goes, shop has weight 1 again.
    h.ok("POST", "/v1/revisions/1/rollback", None).await;
    let (_, up) = h.json("GET", SHOP, None).await;
    assert_eq!(up["servers"][0]["weight"], 1);
    assert_eq!(h.json("GET", "/v1/routes", None).await.1, json!([]));
    // To 0: empty.
    h.ok("POST", "/v1/revisions/0/rollback", None).await;
    assert_eq!(h.json("GET", "/v1/upstreams", None).await.1, json!([]));
    assert_eq!(h.controller.revision(), 8);
}

#[tokio::test]
async fn dyups_interface() {
    let h = Harness::start().await;
    let text = |status: u16, body: &str| (status, body.to_string());
    let call = |method: &'static str, path: &'static str, body: Option<&'static str>| {
        let h = &h;
        async move {
            let r = h
                .client
                .send_raw(method, path, body.map(str::as_bytes), Some("text/plain"))
                .await
                .unwrap();
            (r.status, r.text())
        }
    };
    assert_eq!(call("GET", "/list", None).await, text(204, ""));
    assert_eq!(call("GET", "/detail", None).await, text(204, ""));
    // POST creates.
    let body = "server 127.0.0.1:8089 weight=2;server 127.0.0.1:8088;";
    assert_eq!(
        call("POST", "/upstream/dyhost", Some(body)).await,
        text(200, "success")
    );
    assert_eq!(
        call("GET", "/upstream/dyhost", None).await,
        text(
            200,
            "server 127.0.0.1:8089 weight=2\nserver 127.0.0.1:8088\n"
        )
    );
    // The JSON API sees it, with default settings.
    let (_, up) = h.json("GET", "/v1/upstreams/dyhost", None).await;
    assert_eq!(up["retries"], 1);
    // POST on an upstream with its own settings keeps them.
    h.ok(
        "PUT",
        "/v1/upstreams/host1",
        Some(r#"{"servers":[{"address":"127.0.0.1:8088"}],"retries":4}"#),
    )
    .await;
    assert_eq!(
        call(
            "POST",
            "/upstream/host1",
            Some("server 127.0.0.1:8090 backup;\nserver 127.0.0.1:8091 down;")
        )
        .await,
        text(200, "success")
    );
    let (_, up) = h.json("GET", "/v1/upstreams/host1", None).await;
    assert_eq!(up["retries"], 4);
    assert_eq!(up["servers"][0]["backup"], true);
    assert_eq!(up["servers"][1]["state"], "down");
    assert_eq!(
        call("GET", "/list", None).await,
        text(200, "dyhost\nhost1\n")
    );
    assert_eq!(
        call("GET", "/detail", None).await,
        text(
            200,
            "dyhost\nserver 127.0.0.1:8089 weight=2\nserver 127.0.0.1:8088\n\nhost1\nserver 127.0.0.1:8090 backup\nserver 127.0.0.1:8091 down\n\n"
        )
    );
    // Errors are plain text and change nothing.
    let before = h.state().await;
    for (body, needle) in [
        ("server 127.0.0.1;", "statement 1.address"),
        ("server 127.0.0.1:1 weight=0;", "statement 1.weight"),
        ("upstream x;", "statement 1"),
        ("", "no `server"),
        ("server 127.0.0.1:1 slow_start=1s;", "slow_start"),
    ] {
        let r = h
            .client
            .send_raw("POST", "/upstream/dyhost", Some(body.as_bytes()), None)
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert!(r.text().contains(needle), "{body}: {}", r.text());
        assert!(!r.text().starts_with('{'));
    }
    let r = h
        .client
        .send_raw("POST", "/upstream/dyhost", Some(&[0xff, 0xfe]), None)
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let r = h
        .client
        .send_raw(
            "POST",
            "/upstream/bad%20name",
            Some(b"server 127.0.0.1:1;"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(call("GET", "/upstream/nope", None).await.0, 404);
    assert_eq!(call("DELETE", "/upstream/nope", None).await.0, 404);
    assert_eq!(call("GET", "/list?x=1", None).await.0, 400);
    assert_eq!(h.state().await, before);
    // DELETE refuses while a route uses the upstream, naming it.
    h.ok(
        "PUT",
        "/v1/routes/dy",
        Some(r#"{"hosts":["dyhost"],"upstream":"dyhost"}"#),
    )
    .await;
    let (status, msg) = call("DELETE", "/upstream/dyhost", None).await;
    assert_eq!(status, 409);
    assert!(msg.contains("dy"), "{msg}");
    h.ok("DELETE", "/v1/routes/dy", None).await;
    assert_eq!(
        call("DELETE", "/upstream/dyhost", None).await,
        text(200, "success")
    );
    assert_eq!(call("GET", "/list", None).await, text(200, "host1\n"));
    // Every dyups write is a revision like any other.
    let (_, revs) = h.json("GET", "/v1/revisions?limit=1", None).await;
    assert_eq!(revs[0]["summary"], "delete upstream dyhost");
}

#[tokio::test]
async fn hostile_requests_get_answers_not_panics() {
    let h = seeded().await;
    let before = h.state().await;
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let requests: Vec<String> = vec![
        format!("GET /v1/upstreams/%%%% HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"),
        format!("GET /v1/upstreams/{} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n", "a".repeat(8000)),
        format!("GET //////// HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"),
        format!("GET /v1/upstreams?%% HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"),
        format!("GET /v1/revisions?limit=99999999999999999999999 HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"),
        format!("PATCH /v1/upstreams/shop/servers/%00 HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"),
        format!("PUT /v1/upstreams/shop HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"),
        format!("PUT /v1/upstreams/shop HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0x10\r\nConnection: close\r\n\r\n"),
        format!("PUT /v1/upstreams/shop HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n"),
        format!("PUT /v1/upstreams/shop HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{{\"servers\":{}{}}}", 20_012, "[".repeat(10_000), "]".repeat(10_000)),
        "GARBAGE\r\n\r\n".to_string(),
    ];
    let mut requests: Vec<Vec<u8>> = requests.into_iter().map(String::into_bytes).collect();
    let mut binary = format!("PUT /v1/upstreams/shop HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 5\r\nConnection: close\r\n\r\n").into_bytes();
    binary.extend_from_slice(&[0xff, 0xfe, 0x00, b'{', b'}']);
    requests.push(binary);
    for req in &requests {
        let resp = h.raw(req).await;
        let status: u16 = resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        assert!(
            (400..500).contains(&status),
            "{:?} -> {resp:?}",
            String::from_utf8_lossy(&req[..req.len().min(80)])
        );
    }
    assert_eq!(h.state().await, before);
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_call_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut h = Harness::start().await;
    let body = upstream_body(&["127.0.0.1:9001"]);
    // Send the head and half the body, then shut down, then the rest.
    let mut stream = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let head = format!(
        "PUT {SHOP} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body.as_bytes()[..10]).await.unwrap();
    // An idle keep-alive connection must not hold the shutdown up.
    let idle = h.call("GET", "/v1/upstreams", None).await;
    assert_eq!(idle.status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    h.signal_stop();
    let server = h.take_server();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(
        !server.is_finished(),
        "serve returned with a call in flight"
    );
    // New connections are refused once shutdown began (the listener is closed).
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(h.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(refused, "still accepting after shutdown");
    stream.write_all(&body.as_bytes()[10..]).await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut resp),
    )
    .await
    .unwrap()
    .unwrap();
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains(r#""revision":1"#), "{resp}");
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(h.controller.revision(), 1);
}

#[tokio::test]
async fn acknowledged_changes_survive_a_restart() {
    let h = seeded().await;
    h.ok(
        "PATCH",
        "/v1/upstreams/shop/servers/127.0.0.1:9002",
        Some(r#"{"state":"down"}"#),
    )
    .await;
    let before = h.state().await;
    let controller = h.controller.clone();
    let dir = h.stop().await;
    drop(controller); // release the store
    let h = Harness::start_in(dir).await;
    let after = h.state().await;
    assert_eq!(
        (after.routes, after.revision),
        (before.routes, before.revision)
    );
    // Live counters start afresh; the configuration is the same.
    let spec = |text: &str| {
        let mut v: Value = serde_json::from_str(text).unwrap();
        for up in v.as_array_mut().unwrap() {
            up.as_object_mut().unwrap().remove("live");
        }
        v
    };
    assert_eq!(spec(&after.upstreams), spec(&before.upstreams));
    assert_eq!(spec(&after.upstreams)[0]["servers"][1]["state"], "down");
}

#[test]
fn blocking_client_works_outside_a_runtime() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let h = rt.block_on(seeded());
    let client = Client::new(&format!("http://{}/", h.addr), TOKEN).unwrap();
    let reply = std::thread::spawn(move || client.send_blocking("GET", "/v1/routes/r1", None))
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json().unwrap()["upstream"], "shop");
    let down =
        Client::new("127.0.0.1:1", TOKEN)
            .unwrap()
            .send_blocking("GET", "/v1/upstreams", None);
    assert!(down.unwrap_err().to_string().contains("cannot connect"));
    drop(h);
    drop(rt);
}

/// Sends `GET path` with optional extra header lines; returns the status and the whole
/// answer (head and body) as text.
async fn raw_get(h: &Harness, path: &str, extra: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n");
    let resp = h.raw(req.as_bytes()).await;
    let status = resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, resp)
}

fn header<'a>(resp: &'a str, name: &str) -> Option<&'a str> {
    let head = resp.split("\r\n\r\n").next().unwrap_or("");
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test]
async fn dashboard_files_need_no_token_and_carry_a_strict_policy() {
    let h = seeded().await;
    for (path, ty, needle) in [
        ("/ui/", "text/html; charset=utf-8", "<title>dynagate"),
        (
            "/ui/index.html",
            "text/html; charset=utf-8",
            "data-testid=\"login-form\"",
        ),
        (
            "/ui/app.js",
            "text/javascript; charset=utf-8",
            "Authorization",
        ),
        ("/ui/style.css", "text/css; charset=utf-8", "{"),
        ("/ui/favicon.svg", "image/svg+xml", "<svg"),
    ] {
        let (status, resp) = raw_get(&h, path, "").await;
        assert_eq!(status, 200, "{path}: {resp}");
        assert_eq!(header(&resp, "content-type"), Some(ty), "{path}");
        assert_eq!(header(&resp, "cache-control"), Some("no-cache"), "{path}");
        let csp = header(&resp, "content-security-policy").unwrap();
        assert!(
            csp.starts_with("default-src 'none'; script-src 'self';"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(header(&resp, "x-content-type-options"), Some("nosniff"));
        assert!(resp.contains(needle), "{path} lacks {needle:?}");
        // The files hold no data: nothing from the state leaks into them.
        assert!(!resp.contains("127.0.0.1:9001"), "{path}");
    }
    for path in ["/", "/ui"] {
        let (status, resp) = raw_get(&h, path, "").await;
        assert_eq!(status, 302, "{path}: {resp}");
        assert_eq!(header(&resp, "location"), Some("/ui/"));
    }
    let (status, resp) = raw_get(&h, "/ui/secret.json", "").await;
    assert_eq!(status, 404, "{resp}");
    // Revalidation: the ETag answers 304.
    let (_, resp) = raw_get(&h, "/ui/app.js", "").await;
    let etag = header(&resp, "etag").unwrap().to_string();
    let (status, _) = raw_get(&h, "/ui/app.js", &format!("If-None-Match: {etag}\r\n")).await;
    assert_eq!(status, 304);
    // Only reads: a write to the dashboard is 405 and to `/` stays a 401.
    let reply = h.call("POST", "/ui/", Some("{}")).await;
    assert_eq!(reply.status, 405);
    let anonymous = Client::new(&h.addr.to_string(), "nope").unwrap();
    let reply = anonymous.send("DELETE", "/", None).await.unwrap();
    assert_eq!(reply.status, 401);
}

#[tokio::test]
async fn status_and_metrics() {
    let h = seeded().await;
    let (status, v) = h.json("GET", "/v1/status", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["revision"], 2);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["uptime_s"].as_u64().unwrap() < 60, "{v}");
    let reply = h.call("POST", "/v1/status", None).await;
    assert_eq!(reply.status, 405);

    let (status, resp) = raw_get(
        &h,
        "/metrics",
        &format!("Authorization: Bearer {TOKEN}\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(
        header(&resp, "content-type"),
        Some("text/plain; version=0.0.4")
    );
    assert!(resp.contains("# TYPE "), "{resp}");
    assert!(resp.contains("127.0.0.1:9001"), "{resp}");
    let reply = h.call("POST", "/metrics", None).await;
    assert_eq!(reply.status, 405);
    assert_eq!(
        reply.text(),
        "method POST is not allowed here; allowed: GET\n"
    );

    // Without the token: 401, unless metrics are open; the rest stays closed either way.
    for path in ["/metrics", "/v1/status"] {
        let (status, resp) = raw_get(&h, path, "").await;
        assert_eq!(status, 401, "{path}: {resp}");
    }
    let open = Harness::start_with(common::TempDir::new(), true).await;
    let (status, resp) = raw_get(&open, "/metrics", "").await;
    assert_eq!(status, 200, "{resp}");
    assert!(resp.contains("dynagate_config_revision 0"), "{resp}");
    for path in ["/v1/status", "/v1/upstreams", "/list"] {
        let (status, resp) = raw_get(&open, path, "").await;
        assert_eq!(status, 401, "{path}: {resp}");
    }
}

#[tokio::test]
async fn changes_report_where_their_time_went() {
    let h = Harness::start().await;
    let body = upstream_body(&["127.0.0.1:9001"]);
    let req = format!(
        "PUT {SHOP} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let resp = h.raw(req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let timing = header(&resp, "server-timing").expect("a Server-Timing header");
    let phases: Vec<(&str, f64)> = timing
        .split(',')
        .map(|p| {
            let (name, dur) = p.trim().split_once(";dur=").expect("name;dur=ms");
            (name, dur.parse().expect("milliseconds"))
        })
        .collect();
    assert_eq!(
        phases.iter().map(|p| p.0).collect::<Vec<_>>(),
        ["model", "store", "publish"]
    );
    assert!(phases.iter().all(|p| p.1 >= 0.0), "{timing}");
}
