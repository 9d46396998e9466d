//! Differential desync corpus (issue 11): request and response cases, each the bytes of
//! a published or hand-written payload and the outcome dynagate must have, run against
//! the real binary in front of recording backends; the same request cases run against
//! nginx and HAProxy too, and dynagate must be at least as strict as each (`compare`).
//!
//! The corpus is `requests.toml` and `responses.toml` beside this file; `corpus.rs`
//! says how they are written.

#[path = "../e2e/harness.rs"]
#[allow(dead_code)]
mod harness;

mod corpus;
mod haproxy;
mod nginx;
mod recorder;
mod wire;

use corpus::{show_short, unescape, RequestCase, ResponseCase, Template};
use harness::{Gateway, TempDir};
use recorder::{Canned, Kind, Record, Recorder, Then};
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use wire::{Exchange, Opts};

/// A gateway with one worker (so a poisoned pooled connection is the one the next
/// request gets) in front of recording backends, routed like this:
///
/// | host | prefix | upstream |
/// |---|---|---|
/// | corpus.test | `/` | main |
/// | corpus.test | `/public` | public |
/// | pub.test | `/public` | public (nothing else on pub.test) |
/// | any host | `/anyhost/` | main |
/// | methods.test | `/` (GET only) | main |
/// | upgrade.test | `/` | main (answers 101 to an upgrade of `/ws…`) |
/// | uhost.test | `/` (upstream_host internal.test) | main |
/// | orig.test | `/public` (forward_original_path) | public |
/// | stream.test | `/` (request_buffering off: bodies stream) | main |
/// | refused.test | `/` | a port nobody listens on |
/// | empty.test | `/` | an upstream without servers |
/// | hung.test | `/` | a server that never answers (read_timeout 300ms) |
/// | probe.test | `/` | probe |
/// | resp.test | `/` | resp (canned responses) |
struct Env {
    gw: Gateway,
    _dir: TempDir,
    main: Recorder,
    public: Recorder,
    probe: Recorder,
    resp: Recorder,
    refused: SocketAddr,
    hung: SocketAddr,
    _hung_task: tokio::task::JoinHandle<()>,
}

async fn env(tag: &str) -> Env {
    let dir = TempDir::new(tag);
    // The spec's body limit (100 MiB), so the 413 paths are reached whatever the default.
    let cfg = dir.path().join("dynagate.toml");
    std::fs::write(&cfg, "[limits]\nmax_body_bytes = 104857600\n").unwrap();
    let gw = Gateway::start_with(
        dir.path(),
        &["--workers", "1", "--config", cfg.to_str().unwrap()],
    )
    .await;
    let main = Recorder::start(Kind::Plain).await;
    let public = Recorder::start(Kind::Plain).await;
    let probe = Recorder::start(Kind::Probe).await;
    let resp = Recorder::start(Kind::Plain).await;
    let refused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (hung, hung_task) = harness::hung_server().await;
    let upstream = |servers: Vec<SocketAddr>, read_timeout: &str| {
        json!({
            "servers": servers.iter().map(|a| json!({"address": a.to_string()})).collect::<Vec<_>>(),
            "retries": 0,
            "max_fails": 0,
            "outlier": {"consecutive_failures": 0},
            "connect_timeout": "1s",
            "read_timeout": read_timeout,
        })
    };
    for (name, servers, timeout) in [
        ("main", vec![main.addr], "5s"),
        ("public", vec![public.addr], "5s"),
        ("probe", vec![probe.addr], "5s"),
        ("resp", vec![resp.addr], "2s"),
        ("refused", vec![refused], "5s"),
        ("empty", vec![], "5s"),
        ("hung", vec![hung], "300ms"),
    ] {
        gw.ok(
            "PUT",
            &format!("/v1/upstreams/{name}"),
            upstream(servers, timeout),
        )
        .await;
    }
    for (id, route) in [
        (
            "main",
            json!({"hosts": ["corpus.test"], "path_prefix": "/", "upstream": "main"}),
        ),
        (
            "main-public",
            json!({"hosts": ["corpus.test"], "path_prefix": "/public", "upstream": "public"}),
        ),
        (
            "pub",
            json!({"hosts": ["pub.test"], "path_prefix": "/public", "upstream": "public"}),
        ),
        (
            "any",
            json!({"hosts": [], "path_prefix": "/anyhost/", "upstream": "main"}),
        ),
        (
            "methods",
            json!({"hosts": ["methods.test"], "path_prefix": "/", "methods": ["GET"], "upstream": "main"}),
        ),
        (
            "upgrade",
            json!({"hosts": ["upgrade.test"], "path_prefix": "/", "upstream": "main"}),
        ),
        (
            "uhost",
            json!({"hosts": ["uhost.test"], "path_prefix": "/", "upstream": "main", "upstream_host": "internal.test"}),
        ),
        (
            "orig",
            json!({"hosts": ["orig.test"], "path_prefix": "/public", "upstream": "public", "forward_original_path": true}),
        ),
        (
            "stream",
            json!({"hosts": ["stream.test"], "path_prefix": "/", "upstream": "main", "request_buffering": false}),
        ),
        (
            "refused",
            json!({"hosts": ["refused.test"], "path_prefix": "/", "upstream": "refused"}),
        ),
        (
            "empty",
            json!({"hosts": ["empty.test"], "path_prefix": "/", "upstream": "empty"}),
        ),
        (
            "hung",
            json!({"hosts": ["hung.test"], "path_prefix": "/", "upstream": "hung"}),
        ),
        (
            "probe",
            json!({"hosts": ["probe.test"], "path_prefix": "/", "upstream": "probe"}),
        ),
        (
            "resp",
            json!({"hosts": ["resp.test"], "path_prefix": "/", "upstream": "resp"}),
        ),
    ] {
        gw.ok("PUT", &format!("/v1/routes/{id}"), route).await;
    }
    // The probe route answers before any case runs.
    let ex = wire::exchange(
        gw.proxy,
        wire::PROBE,
        &Opts {
            answers: 1,
            head: false,
            probe: false,
            tunnel: false,
        },
    )
    .await;
    assert!(ex.probe_answered, "probe through the gateway: {ex:?}");
    Env {
        gw,
        _dir: dir,
        main,
        public,
        probe,
        resp,
        refused,
        hung,
        _hung_task: hung_task,
    }
}

/// Where the report goes: the cargo target directory.
fn target_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return d.into();
    }
    match option_env!("CARGO_TARGET_TMPDIR") {
        Some(t) => std::path::Path::new(t)
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| "target".into()),
        None => "target".into(),
    }
}

struct ReqOutcome {
    ex: Exchange,
    main: Record,
    public: Record,
}

impl ReqOutcome {
    fn forwarded_bytes(&self) -> usize {
        self.main.bytes.len() + self.public.bytes.len()
    }
    fn delivered(&self) -> usize {
        self.main.complete + self.public.complete
    }
}

async fn run_request(
    addr: SocketAddr,
    main: &Recorder,
    public: &Recorder,
    case: &RequestCase,
) -> ReqOutcome {
    main.reset().await;
    public.reset().await;
    let req = unescape(&case.request).unwrap();
    let ex = wire::exchange(
        addr,
        &req,
        &Opts {
            answers: case.answers(),
            head: req.starts_with(b"HEAD "),
            probe: true,
            tunnel: case.tunnel == Some(true),
        },
    )
    .await;
    // Bytes the gateway wrote after its answer (a smuggled rest) land within this.
    tokio::time::sleep(Duration::from_millis(15)).await;
    ReqOutcome {
        ex,
        main: main.record(),
        public: public.record(),
    }
}

fn describe(ex: &Exchange) -> String {
    let statuses = ex.statuses();
    let mut s = if statuses.len() > 4 {
        format!("{:?}…({} answers)", &statuses[..3], statuses.len())
    } else {
        format!("{statuses:?}")
    };
    if ex.switched {
        s.push_str(" switched");
    }
    if let Some(p) = &ex.partial {
        s.push_str(&format!(" then {} bytes of an unfinished answer", p.len()));
    }
    if ex.capped {
        s.push_str(" (read capped at 1 MiB)");
    }
    if ex.closed {
        s.push_str(" closed");
    } else if ex.probe_answered {
        s.push_str(" open");
    }
    s
}

fn judge_request(case: &RequestCase, o: &ReqOutcome) -> Vec<String> {
    let mut p = Vec::new();
    let ex = &o.ex;
    if let Some(g) = &ex.garbage {
        p.push(format!("client got {g}"));
    }
    let statuses = ex.statuses();
    if ex.capped {
        p.push(format!(
            "answers: expected {}, read 1 MiB of them ({}+ answers: {:?}…)",
            case.answers(),
            statuses.len(),
            &statuses[..statuses.len().min(3)]
        ));
    } else if statuses.len() != case.answers() {
        p.push(format!(
            "answers: expected {}, got {} {:?}",
            case.answers(),
            statuses.len(),
            statuses
        ));
    }
    let want: Vec<u16> = case.statuses.clone().unwrap_or_else(|| vec![case.status]);
    for (i, w) in want.iter().enumerate() {
        match statuses.get(i) {
            Some(g) if g == w => {}
            Some(g) => p.push(format!("status of answer {}: expected {w}, got {g}", i + 1)),
            None if i == 0 => p.push(format!("status: expected {w}, got no answer")),
            None => {}
        }
    }
    let tunnel = case.tunnel == Some(true);
    if tunnel {
        if ex.tunnel_ok != Some(true) {
            p.push(format!(
                "tunnel: expected the upgraded connection to echo, got {:?}",
                ex.tunnel_ok
            ));
        }
    } else {
        match case.closed {
            Some(true) if !ex.closed => p.push(format!(
                "expected the connection closed; it stayed open{}",
                if ex.probe_answered {
                    " and served the next request"
                } else {
                    ""
                }
            )),
            Some(false) if ex.closed => {
                p.push("expected the connection kept open; it was closed".into())
            }
            _ => {}
        }
        if ex.switched {
            p.push("the gateway switched protocols (101) for a request that did not ask".into());
        } else if !ex.closed && !ex.probe_answered && !ex.capped && ex.garbage.is_none() {
            p.push(format!(
                "the connection stayed open but the next request was not answered \
                 (the gateway took it as part of this one?){}",
                ex.partial
                    .as_ref()
                    .map(|b| format!("; an unfinished answer: {:?}", show_short(b, 160)))
                    .unwrap_or_default()
            ));
        }
    }
    let (target, other, other_name) = if case.route() == "public" {
        (&o.public, &o.main, "main")
    } else {
        (&o.main, &o.public, "public")
    };
    let template = Template::parse(&case.backend).unwrap();
    if template.partial {
        if target.complete > 0 {
            p.push(format!(
                "backend: expected no complete request, got {} ({:?})",
                target.complete,
                show_short(&target.bytes, 200)
            ));
        }
    } else if let Err(e) = template.check(&target.bytes, &case.bodies().unwrap()) {
        p.push(format!(
            "backend ({}): {e}; it received {} complete request(s) {:?}{}: {:?}",
            case.route(),
            target.complete,
            target.targets,
            target
                .unparsable
                .map(|why| format!(" and bytes a strict origin refuses ({why})"))
                .unwrap_or_default(),
            show_short(&target.bytes, 300)
        ));
    }
    if !other.bytes.is_empty() {
        p.push(format!(
            "backend {other_name} should receive nothing, got {:?}",
            show_short(&other.bytes, 200)
        ));
    }
    p
}

fn label(name: &str, class: &str, note: &Option<String>) -> String {
    match note {
        Some(n) => format!("{name} [{class}] ({n})"),
        None => format!("{name} [{class}]"),
    }
}

/// Prints a summary and panics listing every failing case (gap cases are reported,
/// not failed).
fn verdict(
    what: &str,
    total: usize,
    failures: &[(String, Vec<String>)],
    gaps: &[(String, Vec<String>)],
    started: Instant,
) {
    eprintln!(
        "{what}: {} of {total} cases pass, {} fail, {} outside the spec differ ({:.1}s)",
        total - failures.len() - gaps.len(),
        failures.len(),
        gaps.len(),
        started.elapsed().as_secs_f64()
    );
    for (name, problems) in gaps {
        eprintln!("  gap {name}: {}", problems.join("; "));
    }
    if !failures.is_empty() {
        let mut msg = format!("{} of {total} {what} cases fail:\n", failures.len());
        for (name, problems) in failures {
            let _ = writeln!(msg, "- {name}: {}", problems.join("; "));
        }
        panic!("{msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_corpus_matches_expected_outcomes() {
    let file = corpus::load_requests();
    let env = env("desync-req").await;
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut gaps = Vec::new();
    let mut total = 0;
    for case in file.case.iter().filter(|c| c.h2 != Some(true)) {
        total += 1;
        let o = run_request(env.gw.proxy, &env.main, &env.public, case).await;
        let problems = judge_request(case, &o);
        if problems.is_empty() {
            continue;
        }
        let label = label(&case.name, &case.class, &case.note);
        if case.gap.is_some() {
            gaps.push((label, problems));
        } else {
            failures.push((label, problems));
        }
    }
    verdict("request", total, &failures, &gaps, started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_early_answer_is_sent_once() {
    let file = corpus::load_requests();
    let env = env("desync-early").await;
    let mut failures = Vec::new();
    let mut total = 0;
    let started = Instant::now();
    for case in file.case.iter().filter(|c| c.early == Some(true)) {
        total += 1;
        env.main.reset().await;
        env.public.reset().await;
        let req = unescape(&case.request).unwrap();
        // No probe here: read until the gateway closes or is quiet for 200 ms.
        let (n, _, statuses) = wire::count_answers(
            env.gw.proxy,
            &req,
            req.starts_with(b"HEAD "),
            Duration::from_millis(200),
        )
        .await;
        if n != case.answers() {
            failures.push((
                format!("{} [{}]", case.name, case.class),
                vec![format!(
                    "expected {} answer(s), got {n} ({:?}…)",
                    case.answers(),
                    &statuses[..statuses.len().min(3)]
                )],
            ));
        }
    }
    assert!(
        total >= 9,
        "the corpus marks only {total} early-answer cases"
    );
    verdict("early-answer", total, &failures, &[], started);
}

struct RespOutcome {
    ex: Exchange,
    follow: Exchange,
    record: Record,
}

async fn run_response(env: &Env, case: &ResponseCase) -> RespOutcome {
    env.resp.reset().await;
    env.resp.can(
        &case.name,
        Canned {
            bytes: unescape(&case.response).unwrap(),
            then: corpus::then(&case.then).unwrap(),
        },
    );
    env.resp.can(
        "__follow",
        Canned {
            bytes: b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nfollow-up".to_vec(),
            then: Then::Keep,
        },
    );
    let req = case.request_bytes().unwrap();
    let ex = wire::exchange(
        env.gw.proxy,
        &req,
        &Opts {
            answers: 1,
            head: req.starts_with(b"HEAD "),
            probe: true,
            tunnel: false,
        },
    )
    .await;
    let follow = wire::exchange(
        env.gw.proxy,
        b"GET /resp/__follow HTTP/1.1\r\nHost: resp.test\r\n\r\n",
        &Opts {
            answers: 1,
            head: false,
            probe: false,
            tunnel: false,
        },
    )
    .await;
    RespOutcome {
        ex,
        follow,
        record: env.resp.record(),
    }
}

fn judge_response(case: &ResponseCase, o: &RespOutcome) -> Vec<String> {
    let mut p = Vec::new();
    let ex = &o.ex;
    if let Some(g) = &ex.garbage {
        p.push(format!("client got {g}"));
    }
    if ex.capped {
        p.push("read 1 MiB of answers".into());
    }
    let finals = ex.finals();
    if finals.len() > 1 {
        p.push(format!(
            "expected one answer, got {}: {:?}",
            finals.len(),
            ex.statuses()
        ));
    }
    let first = finals.first();
    if case.broken_body == Some(true) {
        let ok = match first {
            Some(r) if r.status == 502 => true,
            Some(r) => !r.complete && ex.closed,
            None => false,
        };
        if !ok {
            p.push(format!(
                "expected a 502, or a cut body and the connection closed; got {} ({:?})",
                describe(ex),
                show_short(&ex.raw(), 300)
            ));
        }
    } else {
        match first {
            Some(r) if r.status == case.status => {}
            Some(r) => p.push(format!(
                "status: expected {}, got {}",
                case.status, r.status
            )),
            None => p.push(format!("status: expected {}, got no answer", case.status)),
        }
        if let Some(t) = &case.client {
            let t = Template::parse(t).unwrap();
            if let Err(e) = t.check(&ex.raw(), &case.bodies().unwrap()) {
                p.push(format!("client bytes: {e}"));
            }
        }
        match case.closed {
            Some(true) if !ex.closed => p.push("expected the client connection closed".into()),
            Some(false) if ex.closed => p.push("expected the client connection kept open".into()),
            _ => {}
        }
        if !ex.closed && !ex.probe_answered && ex.garbage.is_none() && !ex.switched {
            p.push(format!(
                "the connection stayed open but the next request was not answered{}",
                ex.partial
                    .as_ref()
                    .map(|b| format!("; an unfinished answer: {:?}", show_short(b, 160)))
                    .unwrap_or_default()
            ));
        }
    }
    let follow_ok = o.follow.first_status() == Some(200)
        && o.follow
            .finals()
            .first()
            .is_some_and(|r| r.body == b"follow-up");
    if !follow_ok {
        p.push(format!(
            "next request on a new connection (pool poisoned?): expected 200 follow-up, got {} {:?}{}",
            describe(&o.follow),
            o.follow
                .finals()
                .first()
                .map(|r| show_short(&r.body, 80))
                .unwrap_or_default(),
            o.follow
                .garbage
                .as_ref()
                .map(|g| format!(" ({g})"))
                .unwrap_or_default()
        ));
    }
    let _ = &o.record;
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_corpus_matches_expected_outcomes() {
    let file = corpus::load_responses();
    let env = env("desync-resp").await;
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut gaps = Vec::new();
    let mut total = 0;
    for case in file.case.iter().filter(|c| c.h2 != Some(true)) {
        total += 1;
        let o = run_response(&env, case).await;
        let problems = judge_response(case, &o);
        if problems.is_empty() {
            continue;
        }
        let label = label(&case.name, &case.class, &case.note);
        if case.gap.is_some() {
            gaps.push((label, problems));
        } else {
            failures.push((label, problems));
        }
    }
    verdict("response", total, &failures, &gaps, started);
}

#[test]
fn the_corpus_covers_every_finding() {
    let req = corpus::load_requests();
    let resp = corpus::load_responses();
    let total = req.case.len() + resp.case.len();
    assert!(total >= 250, "{total} cases; the corpus wants at least 250");
    let mut classes: BTreeMap<String, usize> = BTreeMap::new();
    for c in &req.case {
        *classes.entry(c.class.clone()).or_default() += 1;
    }
    for c in &resp.case {
        *classes.entry(c.class.clone()).or_default() += 1;
    }
    for finding in 1..=8 {
        let prefix = format!("f{finding}-");
        assert!(
            classes.keys().any(|k| k.starts_with(&prefix)),
            "no case for finding {finding}; classes: {classes:?}"
        );
    }
    eprintln!(
        "corpus: {} request cases, {} response cases; by class: {classes:?}",
        req.case.len(),
        resp.case.len()
    );
}

fn nginx_version(bin: &std::path::Path) -> String {
    std::process::Command::new(bin)
        .arg("-v")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .replace("nginx version: ", "")
        })
        .unwrap_or_default()
}

/// A proxy the request cases are compared with, in front of the same backends.
struct Peer {
    /// As the report names it: `nginx`, `HAProxy`.
    name: &'static str,
    /// Its test's and report section's name: `nginx`, `haproxy`.
    key: &'static str,
    addr: SocketAddr,
    /// Its version and configuration, for the report.
    about: String,
    /// The case's annotation for this proxy (`nginx = "…"`, `haproxy = "…"`): it refuses
    /// the case by design and the spec accepts it knowingly.
    accepted: fn(&RequestCase) -> Option<&String>,
}

/// The proxies of the report, in its column order.
const PEERS: [(&str, &str); 2] = [("nginx", "nginx"), ("haproxy", "HAProxy")];

/// A table cell: `|` escaped, so a row splits on ` | `.
fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

fn forwarded(o: &ReqOutcome) -> String {
    if o.forwarded_bytes() == 0 {
        "nothing".to_string()
    } else {
        format!("{} req, {} B", o.delivered(), o.forwarded_bytes())
    }
}

/// Every request case through dynagate and through `peer`: where the peer refuses
/// (answers >= 400, or nothing, and forwards nothing) dynagate forwards nothing either,
/// unless the case says why the peer is stricter by design; and dynagate never delivers
/// more requests to a backend than it answered. Writes the peer's report section and
/// rebuilds the whole report from the sections there are, then fails on any violation.
async fn compare(env: &Env, peer: &Peer) {
    let file = corpus::load_requests();
    let started = Instant::now();
    let name = peer.name;
    let mut violations = Vec::new();
    let mut table =
        format!("| case | class | spec | dynagate | {name} | |\n|---|---|---|---|---|---|\n");
    // Cases the peer refuses that the spec lets through.
    let mut spec_gaps = String::new();
    let (mut refuses, mut stricter, mut documented) = (0, 0, 0);
    let cases: Vec<&RequestCase> = file.case.iter().filter(|c| c.h2 != Some(true)).collect();
    for case in &cases {
        let d = run_request(env.gw.proxy, &env.main, &env.public, case).await;
        let n = run_request(peer.addr, &env.main, &env.public, case).await;
        let n_refused = n.forwarded_bytes() == 0 && n.ex.first_status().is_none_or(|s| s >= 400);
        let d_refused = d.forwarded_bytes() == 0 && d.ex.first_status().is_none_or(|s| s >= 400);
        // The spec lets a chunked body with bad framing start upstream (it streams);
        // what must never happen is a complete request reaching the backend.
        let partial_ok = Template::parse(&case.backend).unwrap().partial && d.delivered() == 0;
        let accepted = (peer.accepted)(case);
        let label = label(&case.name, &case.class, &case.note);
        let mut mark = String::new();
        if n_refused {
            refuses += 1;
            if case.status < 400 {
                let _ = writeln!(
                    spec_gaps,
                    "- `{}` ({}): {name} {}; the spec expects {}{}",
                    case.name,
                    case.class,
                    describe(&n.ex),
                    case.status,
                    accepted
                        .map(|w| format!(" — accepted knowingly: {w}"))
                        .unwrap_or_default()
                );
            }
            if d.forwarded_bytes() > 0 {
                if let Some(why) = accepted {
                    documented += 1;
                    mark.push_str(&format!("{name} stricter, by design ({why}) "));
                } else if partial_ok {
                    documented += 1;
                    mark.push_str(&format!(
                        "{name} stricter: dynagate started the request upstream (spec allows) "
                    ));
                } else {
                    violations.push((
                        label.clone(),
                        vec![format!(
                            "{name} refuses ({}) and forwards nothing; dynagate answers {} and forwards {:?}",
                            describe(&n.ex),
                            describe(&d.ex),
                            show_short(&[d.main.bytes.clone(), d.public.bytes.clone()].concat(), 160)
                        )],
                    ));
                    mark.push_str(&format!("**{name} stricter** "));
                }
            }
        } else if d_refused {
            stricter += 1;
            mark.push_str("dynagate stricter ");
        }
        let answered = d.ex.statuses().len();
        if d.delivered() > answered {
            violations.push((
                label.clone(),
                vec![format!(
                    "dynagate delivered {} requests to the backend and answered {answered}",
                    d.delivered()
                )],
            ));
            mark.push_str("**dynagate smuggles** ");
        }
        if n.delivered() > n.ex.statuses().len() {
            mark.push_str(&format!("({name} delivers more than it answers) "));
        }
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} |",
            case.name,
            case.class,
            case.statuses
                .as_ref()
                .map(|s| format!("{s:?}"))
                .unwrap_or_else(|| case.status.to_string()),
            cell(&format!("{}; {}", describe(&d.ex), forwarded(&d))),
            cell(&format!("{}; {}", describe(&n.ex), forwarded(&n))),
            cell(mark.trim())
        );
    }
    let section = format!(
        "## dynagate and {name}\n\n\
         Written by `cargo test -p dynagate --test desync dynagate_is_at_least_as_strict_as_{key}`\n\
         ({about}).\n\n\
         {name} refuses {refuses} of {total} cases; dynagate refuses {stricter} more that {name} forwards; \
         {documented} differences are accepted by design; {} violations.\n\n\
         ### Cases {name} refuses and the spec lets through\n\n{}\n### By case\n\n{table}",
        violations.len(),
        if spec_gaps.is_empty() { "none\n".to_string() } else { spec_gaps },
        key = peer.key,
        about = peer.about,
        total = cases.len(),
    );
    let dir = target_dir();
    let report = dir.join("desync-report.md");
    {
        // The comparison tests run at once: the one that rebuilds the report last has
        // read every section written before.
        static REPORT: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = REPORT.lock().unwrap_or_else(|e| e.into_inner());
        let _ = std::fs::write(dir.join(format!("desync-report-{}.md", peer.key)), section);
        let _ = std::fs::write(&report, combined_report(&dir, &cases));
    }
    eprintln!("report: {}", report.display());
    verdict(
        &format!("{name} comparison"),
        cases.len(),
        &violations,
        &[],
        started,
    );
}

/// A section's table: case name → its cells (class, spec, dynagate, the peer, notes).
fn section_rows(section: &str) -> BTreeMap<String, Vec<String>> {
    let table = section.split("\n### By case\n").nth(1).unwrap_or("");
    table
        .lines()
        .filter_map(|l| {
            let inner = l.strip_prefix("| ")?.strip_suffix('|')?;
            let mut cells: Vec<String> = inner.split(" | ").map(|c| c.trim().to_string()).collect();
            (cells.len() == 6 && cells[0] != "case").then(|| {
                let name = cells.remove(0);
                (name, cells)
            })
        })
        .collect()
}

/// `desync-report.md`: the sections in `dir` (one per comparison test) and one table of
/// every case with a column per proxy.
fn combined_report(dir: &std::path::Path, cases: &[&RequestCase]) -> String {
    let sections: Vec<(&str, Option<String>)> = PEERS
        .iter()
        .map(|(key, name)| {
            (
                *name,
                std::fs::read_to_string(dir.join(format!("desync-report-{key}.md"))).ok(),
            )
        })
        .collect();
    let rows: Vec<BTreeMap<String, Vec<String>>> = sections
        .iter()
        .map(|(_, s)| s.as_deref().map(section_rows).unwrap_or_default())
        .collect();
    let mut out = String::from(
        "# Desync corpus: dynagate, nginx and HAProxy side by side\n\n\
         Each request case of `crates/dynagate/tests/desync/requests.toml` goes to dynagate and to\n\
         each other proxy, configured like the gateway in front of the same recording backends\n\
         (`nginx.rs`, `haproxy.rs` there say how). Each comparison test\n\
         (`dynagate_is_at_least_as_strict_as_nginx`, `..._haproxy`) writes its own section,\n\
         `desync-report-nginx.md` / `desync-report-haproxy.md` beside this file, then rebuilds this\n\
         file from the sections it finds, so the order the tests run in does not matter; a section\n\
         is as recent as its test's last run (\"not run\": none yet, or the proxy is not installed).\n\n\
         Spec: the status the corpus expects. Statuses: the final answers on the connection before\n\
         the probe request; `closed`: the proxy closed the connection; `open`: it went on to answer\n\
         the probe. Then what the backends received: complete requests / bytes, or nothing.\n\n",
    );
    for (name, section) in &sections {
        match section {
            Some(s) => {
                out.push_str(s.split("\n### By case\n").next().unwrap_or(""));
                out.push('\n');
            }
            None => {
                let _ = writeln!(out, "## dynagate and {name}\n\nnot run\n");
            }
        }
    }
    out.push_str("## All cases\n\n| case | class | spec | dynagate |");
    for (name, _) in &sections {
        let _ = write!(out, " {name} |");
    }
    out.push_str(" |\n|---|---|---|---|");
    for _ in &sections {
        out.push_str("---|");
    }
    out.push_str("---|\n");
    for case in cases {
        let of: Vec<Option<&Vec<String>>> = rows.iter().map(|r| r.get(&case.name)).collect();
        let Some(first) = of.iter().flatten().next() else {
            continue;
        };
        // dynagate's cell from the first section; another run that saw it otherwise is said.
        let mut dynagate = first[2].clone();
        for ((name, _), r) in sections.iter().zip(&of) {
            if let Some(r) = r {
                if r[2] != first[2] {
                    let _ = write!(dynagate, " (in the {name} run: {})", r[2]);
                }
            }
        }
        let _ = write!(
            out,
            "| {} | {} | {} | {dynagate} |",
            case.name, first[0], first[1]
        );
        for r in &of {
            let _ = write!(out, " {} |", r.map(|r| r[3].as_str()).unwrap_or("not run"));
        }
        let notes: Vec<String> = sections
            .iter()
            .zip(&of)
            .filter_map(|((name, _), r)| {
                r.filter(|r| !r[4].is_empty())
                    .map(|r| format!("vs {name}: {}", r[4]))
            })
            .collect();
        let _ = writeln!(out, " {} |", notes.join("; "));
    }
    out
}

/// The same request cases through nginx (Debian's nginx-light, configured like the
/// gateway): see `compare`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynagate_is_at_least_as_strict_as_nginx() {
    let Some(bin) = nginx::binary() else {
        eprintln!("NOTICE: nginx is not installed; the nginx comparison is skipped (CI installs nginx-light)");
        return;
    };
    let env = env("desync-nginx").await;
    let nginx = nginx::Nginx::start(&bin, &upstreams(&env)).await;
    let peer = Peer {
        name: "nginx",
        key: "nginx",
        addr: nginx.addr,
        about: format!(
            "{}: `proxy_http_version 1.1`, `proxy_set_header Connection \"\"`, request buffering on",
            nginx_version(&bin)
        ),
        accepted: |c| c.nginx.as_ref(),
    };
    compare(&env, &peer).await;
}

/// The same request cases through HAProxy (Debian's haproxy, its defaults, routed like
/// the gateway): see `compare` and `haproxy.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynagate_is_at_least_as_strict_as_haproxy() {
    let Some(bin) = haproxy::binary() else {
        eprintln!("NOTICE: haproxy is not installed; the HAProxy comparison is skipped (CI installs haproxy)");
        return;
    };
    let env = env("desync-haproxy").await;
    let haproxy = haproxy::Haproxy::start(&bin, &upstreams(&env)).await;
    let peer = Peer {
        name: "HAProxy",
        key: "haproxy",
        addr: haproxy.addr,
        about: format!(
            "HAProxy {}: `mode http` and its defaults: no `option accept-invalid-http-request`, \
             no `option http-buffer-request` (bodies stream), `http-reuse safe`, keep-alive",
            haproxy::version(&bin)
        ),
        accepted: |c| c.haproxy.as_ref(),
    };
    compare(&env, &peer).await;
}

fn upstreams(env: &Env) -> nginx::Upstreams {
    nginx::Upstreams {
        main: env.main.addr,
        public: env.public.addr,
        probe: env.probe.addr,
        refused: env.refused,
        hung: env.hung,
    }
}
