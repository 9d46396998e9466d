use crate::harness::*;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Backend name -> membership intervals: (added, before the call; removed, after the answer).
type Intervals = HashMap<String, Vec<(Instant, Option<Instant>)>>;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Member {
    Absent,
    Up,
    Drain,
}

/// While a bounded load runs, 1000+ membership operations are applied. No request may
/// fail, and every response must come from a server that was a member of the upstream
/// at some moment while the request was being routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_under_load_loses_nothing() {
    let dir = TempDir::new("churn");
    let gw = Gateway::start(dir.path()).await;
    let mut backends = Vec::new();
    for i in 0..6 {
        backends.push(Backend::start(&format!("b{i}")).await);
    }
    gw.put_upstream("u", &[&backends[0], &backends[1]]).await;
    gw.put_route("r", &[], "/", "u").await;

    let t0 = Instant::now();
    // name -> membership intervals [added (before the call), removed (after the answer)]
    let intervals: Arc<Mutex<Intervals>> = Arc::new(Mutex::new(HashMap::new()));
    for b in &backends[..2] {
        intervals
            .lock()
            .unwrap()
            .insert(b.name.clone(), vec![(t0, None)]);
    }
    let mut state = [Member::Absent; 6];
    state[0] = Member::Up;
    state[1] = Member::Up;

    let stop = Arc::new(AtomicBool::new(false));
    let mut loaders = Vec::new();
    for _ in 0..4 {
        let client = gw.client.clone();
        let url = format!("http://{}/", gw.proxy);
        let stop = stop.clone();
        loaders.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                match client
                    .request(http::Request::get(&url).body(full("")).unwrap())
                    .await
                {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let backend = resp
                            .headers()
                            .get("x-backend")
                            .map(|v| v.to_str().unwrap().to_string());
                        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                        match (status, backend) {
                            (200, Some(b)) => seen.push((b, start, Instant::now())),
                            (s, b) => failures.push(format!("status {s} from {b:?}")),
                        }
                    }
                    Err(e) => failures.push(format!("client error {e}")),
                }
            }
            (seen, failures)
        }));
    }

    let mut rng: u64 = 0x2545F4914F6CDD1D;
    let mut ops = 0;
    while ops < 1000 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let i = (rng % 6) as usize;
        let up_count = state.iter().filter(|s| **s == Member::Up).count();
        let addr = backends[i].addr.to_string();
        let name = backends[i].name.clone();
        match state[i] {
            Member::Absent => {
                intervals
                    .lock()
                    .unwrap()
                    .entry(name)
                    .or_default()
                    .push((Instant::now(), None));
                gw.ok("POST", "/v1/upstreams/u/servers", json!({"address": addr}))
                    .await;
                state[i] = Member::Up;
            }
            Member::Up if up_count > 2 => {
                if rng.is_multiple_of(3) {
                    // Straight removal of a serving server: in-flight requests finish.
                    gw.ok(
                        "DELETE",
                        &format!("/v1/upstreams/u/servers/{addr}"),
                        json!(null),
                    )
                    .await;
                    let done = Instant::now();
                    if let Some(last) = intervals
                        .lock()
                        .unwrap()
                        .get_mut(&name)
                        .and_then(|v| v.last_mut())
                    {
                        last.1 = Some(done);
                    }
                    state[i] = Member::Absent;
                } else {
                    gw.ok(
                        "PATCH",
                        &format!("/v1/upstreams/u/servers/{addr}"),
                        json!({"state": "drain"}),
                    )
                    .await;
                    state[i] = Member::Drain;
                }
            }
            Member::Up => continue,
            Member::Drain => {
                if rng.is_multiple_of(4) {
                    gw.ok(
                        "PATCH",
                        &format!("/v1/upstreams/u/servers/{addr}"),
                        json!({"state": "up"}),
                    )
                    .await;
                    state[i] = Member::Up;
                } else {
                    gw.ok(
                        "DELETE",
                        &format!("/v1/upstreams/u/servers/{addr}"),
                        json!(null),
                    )
                    .await;
                    let done = Instant::now();
                    if let Some(last) = intervals
                        .lock()
                        .unwrap()
                        .get_mut(&name)
                        .and_then(|v| v.last_mut())
                    {
                        last.1 = Some(done);
                    }
                    state[i] = Member::Absent;
                }
            }
        }
        ops += 1;
    }
    stop.store(true, Ordering::Relaxed);

    let intervals = intervals.lock().unwrap().clone();
    let mut total = 0;
    for l in loaders {
        let (seen, failures) = l.await.unwrap();
        assert!(
            failures.is_empty(),
            "failed requests during churn: {:?}",
            &failures[..failures.len().min(5)]
        );
        for (backend, start, end) in &seen {
            let ok = intervals.get(backend).is_some_and(|list| {
                list.iter()
                    .any(|(added, removed)| *added <= *end && removed.is_none_or(|r| r >= *start))
            });
            assert!(ok, "{backend} answered a request while not a member");
        }
        total += seen.len();
    }
    assert!(
        total > 500,
        "load too small to mean anything: {total} requests"
    );
    eprintln!("churn: {ops} operations, {total} requests, 0 failures");
}
