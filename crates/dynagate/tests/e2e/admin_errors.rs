use crate::harness::*;
use serde_json::{json, Value};

async fn state(gw: &Gateway) -> (Value, Value, Value) {
    let (_, ups) = gw.admin("GET", "/v1/upstreams", None).await;
    let (_, routes) = gw.admin("GET", "/v1/routes", None).await;
    let (_, revs) = gw.admin("GET", "/v1/revisions", None).await;
    // Live counters may move; compare the configuration only.
    let specs: Vec<Value> = ups
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            let mut u = u.clone();
            u.as_object_mut().unwrap().remove("live");
            u
        })
        .collect();
    (Value::Array(specs), routes, revs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_changes_leave_the_state_unchanged() {
    let dir = TempDir::new("admin-errors");
    let gw = Gateway::start(dir.path()).await;
    let a = Backend::start("a").await;
    gw.put_upstream("shop", &[&a]).await;
    gw.put_route("r1", &["shop.example.com"], "/", "shop").await;
    let before = state(&gw).await;

    // 401: no token, wrong token, token in the wrong scheme.
    for token in [None, Some("wrong-token-wrong-token"), Some("")] {
        let (status, _) = gw
            .admin_raw(
                "PUT",
                "/v1/upstreams/x",
                Some(json!({"servers": []}).to_string()),
                token,
            )
            .await;
        assert_eq!(status, 401, "{token:?}");
    }
    let (status, _) = gw.admin_raw("GET", "/v1/upstreams", None, None).await;
    assert_eq!(status, 401);

    let addr = a.addr.to_string();
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        (
            "PUT",
            "/v1/upstreams/shop".into(),
            Some(r#"{"servers":[],"bogus":1}"#.into()),
            400,
            "bogus",
        ),
        (
            "PUT",
            "/v1/upstreams/shop".into(),
            Some(r#"{"servers":[{"address":"nonsense"}]}"#.into()),
            400,
            "address",
        ),
        (
            "PUT",
            "/v1/upstreams/shop".into(),
            Some(format!(
                r#"{{"servers":[{{"address":"{addr}","weight":0}}]}}"#
            )),
            400,
            "weight",
        ),
        (
            "PUT",
            "/v1/upstreams/shop".into(),
            Some(format!(
                r#"{{"servers":[{{"address":"{addr}","weight":100000}}]}}"#
            )),
            400,
            "weight",
        ),
        (
            "PUT",
            "/v1/upstreams/shop".into(),
            Some(format!(
                r#"{{"servers":[{{"address":"{addr}"}},{{"address":"{addr}"}}]}}"#
            )),
            400,
            "duplicate",
        ),
        (
            "PUT",
            "/v1/upstreams/shop".into(),
            Some("{not json".into()),
            400,
            "",
        ),
        (
            "PUT",
            "/v1/upstreams/shop".into(),
            Some(r#"{"servers":[]}"#.into()),
            409,
            "force",
        ),
        (
            "PUT",
            "/v1/routes/r2".into(),
            Some(r#"{"path_prefix":"/","upstream":"missing"}"#.into()),
            400,
            "upstream",
        ),
        (
            "PUT",
            "/v1/routes/r2".into(),
            Some(r#"{"path_prefix":"nope","upstream":"shop"}"#.into()),
            400,
            "path_prefix",
        ),
        (
            "PUT",
            "/v1/routes/r2".into(),
            Some(r#"{"hosts":["shop.example.com"],"path_prefix":"/","upstream":"shop"}"#.into()),
            409,
            "r1",
        ),
        ("DELETE", "/v1/upstreams/shop".into(), None, 409, "r1"),
        (
            "DELETE",
            format!("/v1/upstreams/shop/servers/{addr}"),
            None,
            409,
            "last server",
        ),
        (
            "POST",
            "/v1/upstreams/shop/servers".into(),
            Some(format!(r#"{{"address":"{addr}"}}"#)),
            409,
            "already",
        ),
        (
            "PATCH",
            format!("/v1/upstreams/shop/servers/{addr}"),
            Some(r#"{"state":"sideways"}"#.into()),
            400,
            "state",
        ),
        (
            "PATCH",
            "/v1/upstreams/shop/servers/127.0.0.1:1".into(),
            Some(r#"{"state":"drain"}"#.into()),
            404,
            "no server",
        ),
        ("DELETE", "/v1/routes/nope".into(), None, 404, "nope"),
        ("GET", "/v1/upstreams/nope".into(), None, 404, "nope"),
        (
            "POST",
            "/v1/revisions/999/rollback".into(),
            None,
            404,
            "999",
        ),
    ];
    for (method, path, body, want, mention) in cases {
        let (status, v) = gw
            .admin_raw(method, &path, body.clone(), Some(&gw.token))
            .await;
        assert_eq!(status, want, "{method} {path} {body:?} -> {v}");
        assert!(
            v.to_string().contains(mention),
            "{method} {path}: error {v} should mention {mention:?}"
        );
        assert_eq!(
            state(&gw).await,
            before,
            "{method} {path} changed the state"
        );
    }
}
