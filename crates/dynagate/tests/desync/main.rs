//! Differential desync corpus (issue 11): request and response cases, each the bytes of
//! a published or hand-written payload and the outcome dynagate must have, run against
//! the real binary in front of recording backends; the same request cases run against
//! nginx too, and dynagate must be at least as strict.
//!
//! The corpus is `requests.toml` and `responses.toml` beside this file; `corpus.rs`
//! says how they are written.

#[path = "../e2e/harness.rs"]
#[allow(dead_code)]
mod harness;

mod corpus;
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

/// The same request cases through nginx (Debian's nginx-light, configured like the
/// gateway): where nginx refuses and forwards nothing, dynagate forwards nothing too, and
/// dynagate never delivers more requests than it answered. Writes the side-by-side table
/// to `<target>/desync-report.md`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynagate_is_at_least_as_strict_as_nginx() {
    let Some(bin) = nginx::binary() else {
        eprintln!("NOTICE: nginx is not installed; the nginx comparison is skipped (CI installs nginx-light)");
        return;
    };
    let file = corpus::load_requests();
    let env = env("desync-nginx").await;
    let nginx = nginx::Nginx::start(
        &bin,
        &nginx::Upstreams {
            main: env.main.addr,
            public: env.public.addr,
            probe: env.probe.addr,
            refused: env.refused,
            hung: env.hung,
        },
    )
    .await;
    let started = Instant::now();
    let mut violations = Vec::new();
    let mut table = String::from(
        "| case | class | spec | dynagate | dynagate forwarded | nginx | nginx forwarded | |\n|---|---|---|---|---|---|---|---|\n",
    );
    // Cases nginx refuses (answers >= 400, forwards nothing) that the spec lets through.
    let mut spec_gaps = String::new();
    let (mut nginx_refuses, mut stricter, mut documented) = (0, 0, 0);
    for case in file.case.iter().filter(|c| c.h2 != Some(true)) {
        let d = run_request(env.gw.proxy, &env.main, &env.public, case).await;
        let n = run_request(nginx.addr, &env.main, &env.public, case).await;
        let n_status = n.ex.first_status();
        let n_refused = n.forwarded_bytes() == 0 && n_status.is_none_or(|s| s >= 400);
        let d_refused = d.forwarded_bytes() == 0 && d.ex.first_status().is_none_or(|s| s >= 400);
        // The spec lets a chunked body with bad framing start upstream (it streams);
        // what must never happen is a complete request reaching the backend.
        let partial_ok = Template::parse(&case.backend).unwrap().partial && d.delivered() == 0;
        let label = label(&case.name, &case.class, &case.note);
        let mut mark = String::new();
        if n_refused {
            nginx_refuses += 1;
            if case.status < 400 {
                let _ = writeln!(
                    spec_gaps,
                    "- `{}` ({}): nginx {}; the spec expects {}{}",
                    case.name,
                    case.class,
                    describe(&n.ex),
                    case.status,
                    case.nginx
                        .as_ref()
                        .map(|w| format!(" — accepted knowingly: {w}"))
                        .unwrap_or_default()
                );
            }
            if d.forwarded_bytes() > 0 {
                if let Some(why) = &case.nginx {
                    documented += 1;
                    mark.push_str(&format!("nginx stricter, by design ({why}) "));
                } else if partial_ok {
                    documented += 1;
                    mark.push_str(
                        "nginx stricter: dynagate started the request upstream (spec allows) ",
                    );
                } else {
                    violations.push((
                        label.clone(),
                        vec![format!(
                            "nginx refuses ({}) and forwards nothing; dynagate answers {} and forwards {:?}",
                            describe(&n.ex),
                            describe(&d.ex),
                            show_short(&[d.main.bytes.clone(), d.public.bytes.clone()].concat(), 160)
                        )],
                    ));
                    mark.push_str("**nginx stricter** ");
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
            mark.push_str("(nginx delivers more than it answers) ");
        }
        let fwd = |o: &ReqOutcome| {
            if o.forwarded_bytes() == 0 {
                "nothing".to_string()
            } else {
                format!("{} req, {} B", o.delivered(), o.forwarded_bytes())
            }
        };
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            case.name,
            case.class,
            case.statuses
                .as_ref()
                .map(|s| format!("{s:?}"))
                .unwrap_or_else(|| case.status.to_string()),
            describe(&d.ex),
            fwd(&d),
            describe(&n.ex),
            fwd(&n),
            mark.trim()
        );
    }
    let report = format!(
        "# Desync corpus: dynagate and nginx side by side\n\n\
         Generated by `cargo test -p dynagate --test desync dynagate_is_at_least_as_strict_as_nginx`\n\
         (nginx {}: `proxy_http_version 1.1`, `proxy_set_header Connection \"\"`, request buffering on).\n\
         Each request case of `crates/dynagate/tests/desync/requests.toml` goes to both proxies in front\n\
         of the same recording backends. Spec: the status the corpus expects. Statuses: the final answers\n\
         on the connection before the probe request; `closed`: the proxy closed the connection; `open`: it\n\
         went on to answer the probe. Forwarded: complete requests / bytes the backends received.\n\n\
         nginx refuses {nginx_refuses} cases; dynagate refuses {stricter} more that nginx forwards; \
         {documented} differences are accepted by design; {} violations.\n\n\
         ## Cases nginx refuses and the spec lets through\n\n{}\n## All cases\n\n{table}",
        nginx_version(&bin),
        violations.len(),
        if spec_gaps.is_empty() { "none\n".to_string() } else { spec_gaps }
    );
    let path = target_dir().join("desync-report.md");
    let _ = std::fs::write(&path, &report);
    eprintln!("report: {}", path.display());
    let total = file.case.iter().filter(|c| c.h2 != Some(true)).count();
    verdict("nginx comparison", total, &violations, &[], started);
}
