//! JSON bodies of the admin API → the model's types → `Config::apply`.
//!
//! The input is tried as each body the admin API decodes (`Upstream` for PUT
//! /v1/upstreams/{name}, `Server` for POST .../servers, `ServerPatch` for PATCH
//! .../servers/{address}, `Route` for PUT /v1/routes/{id}) and, as text, as a dyups body
//! (nginx `server …;`); every command the API builds from it is applied to a small fixed
//! configuration. No panic, and for each command:
//! - refused: a 400/404/409 error, and the configuration is unchanged;
//! - accepted: its changes are empty exactly when the configuration did not change;
//!   replaying them forwards gives the new configuration, and rewinding the revision
//!   they make gives back the old one; the result is still valid (every route's upstream
//!   exists, every entity passes validation); each changed entity and the change list
//!   come back equal through JSON (as the store keeps them); applying a put again
//!   changes nothing.
#![no_main]

use dynagate_model::nginx::{parse_servers, render_servers};
use dynagate_model::validate::{validate_route, validate_upstream};
use dynagate_model::{
    Change, Command, Config, RegistryStatus, Revision, Route, Server, ServerPatch, Upstream,
};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn base() -> &'static Config {
    static BASE: OnceLock<Config> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut c = Config::default();
        let mut fed = Server::new("10.0.0.9:80");
        fed.registry = Some(RegistryStatus::Passing);
        for command in [
            Command::PutUpstream {
                upstream: Box::new(Upstream::new(
                    "shop",
                    vec![Server::new("127.0.0.1:9001"), Server::new("127.0.0.1:9002")],
                )),
                force: false,
            },
            Command::PutUpstream {
                upstream: Box::new(Upstream::new("one", vec![Server::new("127.0.0.1:9101")])),
                force: false,
            },
            Command::SyncRegistry {
                upstream: "fed".into(),
                servers: vec![fed],
            },
            Command::PutRoute {
                route: Route::new("r1", &["shop.example.com"], "/", "shop"),
            },
            Command::PutRoute {
                route: Route::new("r2", &[], "/api", "fed"),
            },
        ] {
            c = c.apply(command).expect("base configuration").config;
        }
        c
    })
}

/// Applies `command` to `before` and checks the result; the new configuration if accepted.
fn check(before: &Config, command: Command) -> Option<Config> {
    let again = command.clone();
    let shown = format!("{command:?}");
    let snapshot = before.clone();
    let applied = match before.apply(command) {
        Ok(a) => a,
        Err(e) => {
            assert!(matches!(e.status(), 400 | 404 | 409), "{shown}: {e}");
            assert_eq!(
                before, &snapshot,
                "refused {shown} changed the configuration"
            );
            return None;
        }
    };
    let after = &applied.config;
    assert_eq!(
        applied.changes.is_empty(),
        after == before,
        "{shown}: changes {:?} do not match the configurations",
        applied.changes
    );
    let mut forwards = before.clone();
    forwards.replay(&applied.changes, true);
    assert_eq!(&forwards, after, "{shown}: replaying its changes");
    let revision = Revision {
        number: 8,
        time_ms: 0,
        summary: applied.summary.clone(),
        changes: applied.changes.clone(),
    };
    assert_eq!(
        &after.rewind(&[revision.clone()], 7),
        before,
        "{shown}: rewinding"
    );

    for route in after.routes.values() {
        assert!(
            after.upstreams.contains_key(&route.upstream),
            "{shown}: dangling route"
        );
        validate_route(route).unwrap_or_else(|e| panic!("{shown}: accepted invalid route: {e}"));
    }
    for up in after.upstreams.values() {
        validate_upstream(up).unwrap_or_else(|e| panic!("{shown}: accepted invalid upstream: {e}"));
    }
    // As the store writes and reads them.
    for change in &applied.changes {
        match change {
            Change::Upstream { after: Some(u), .. } => {
                let json = serde_json::to_string(&**u).expect("serialize");
                let back: Upstream = serde_json::from_str(&json).unwrap_or_else(|e| {
                    panic!("{shown}: stored upstream does not load: {e}: {json}")
                });
                assert_eq!(
                    &back, &**u,
                    "{shown}: upstream changes through JSON: {json}"
                );
            }
            Change::Route { after: Some(r), .. } => {
                let json = serde_json::to_string(&**r).expect("serialize");
                let back: Route = serde_json::from_str(&json)
                    .unwrap_or_else(|e| panic!("{shown}: stored route does not load: {e}: {json}"));
                assert_eq!(&back, &**r, "{shown}: route changes through JSON: {json}");
            }
            _ => {}
        }
    }
    let json = serde_json::to_string(&revision.changes).expect("serialize");
    let back: Vec<Change> = serde_json::from_str(&json).expect("stored changes load");
    assert_eq!(back, revision.changes);

    if matches!(
        again,
        Command::PutUpstream { .. } | Command::PutRoute { .. } | Command::SetServers { .. }
    ) {
        let twice = after
            .apply(again)
            .unwrap_or_else(|e| panic!("{shown} again: {e}"));
        assert!(
            twice.changes.is_empty(),
            "{shown} again changed {:?}",
            twice.changes
        );
    }
    Some(applied.config)
}

/// The `name`/`id` in the path: the body's if it has one (the API refuses a mismatch),
/// else one that exists.
fn key_or(body: &str, default: &str) -> String {
    if body.is_empty() {
        default.to_string()
    } else {
        body.to_string()
    }
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    if let Ok(mut upstream) = serde_json::from_slice::<Upstream>(data) {
        upstream.name = key_or(&upstream.name, "shop");
        for force in [false, true] {
            check(
                base,
                Command::PutUpstream {
                    upstream: Box::new(upstream.clone()),
                    force,
                },
            );
        }
        // Created fresh, then deleted again.
        let name = upstream.name.clone();
        if let Some(c) = check(
            &Config::default(),
            Command::PutUpstream {
                upstream: Box::new(upstream),
                force: false,
            },
        ) {
            check(&c, Command::DeleteUpstream { name });
        }
    }
    if let Ok(server) = serde_json::from_slice::<Server>(data) {
        for upstream in ["shop", "one", "fed", "missing"] {
            let added = check(
                base,
                Command::AddServer {
                    upstream: upstream.into(),
                    server: server.clone(),
                },
            );
            if let Some(c) = added {
                for force in [false, true] {
                    check(
                        &c,
                        Command::RemoveServer {
                            upstream: upstream.into(),
                            address: server.address.clone(),
                            force,
                        },
                    );
                }
            }
        }
        check(
            base,
            Command::SetServers {
                upstream: "shop".into(),
                servers: vec![server.clone(), Server::new("127.0.0.1:9001")],
            },
        );
    }
    if let Ok(patch) = serde_json::from_slice::<ServerPatch>(data) {
        for (upstream, address) in [
            ("shop", "127.0.0.1:9001"),
            ("fed", "10.0.0.9:80"),
            ("shop", "127.0.0.1:1"),
            ("missing", "127.0.0.1:9001"),
        ] {
            check(
                base,
                Command::UpdateServer {
                    upstream: upstream.into(),
                    address: address.into(),
                    patch: patch.clone(),
                },
            );
        }
    }
    if let Ok(mut route) = serde_json::from_slice::<Route>(data) {
        route.id = key_or(&route.id, "r1");
        let id = route.id.clone();
        if let Some(c) = check(base, Command::PutRoute { route }) {
            if let Some(c) = check(&c, Command::DeleteRoute { id }) {
                for name in ["shop", "fed", "one"] {
                    check(&c, Command::DeleteUpstream { name: name.into() });
                }
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(servers) = parse_servers(text) {
            let rendered = render_servers(&servers).replace('\n', ";");
            assert_eq!(
                parse_servers(&rendered).ok().as_ref(),
                Some(&servers),
                "dyups servers do not read back from {rendered:?}"
            );
            for upstream in ["shop", "fed", "new"] {
                check(
                    base,
                    Command::SetServers {
                        upstream: upstream.into(),
                        servers: servers.clone(),
                    },
                );
            }
        }
    }
});
