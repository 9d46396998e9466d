//! dynagate's model: routes, upstreams and servers, the validated commands that change
//! them, and the revision record of every accepted change. Pure: no I/O, no clocks.

pub mod config;
pub mod duration;
pub mod error;
pub mod nginx;
pub mod types;
pub mod validate;

pub use config::{Applied, Change, Command, Config, Revision};
pub use error::ModelError;
pub use types::{
    Balance, CheckKind, HashMethod, HealthCheck, Outlier, RegistryStatus, Route, Server,
    ServerPatch, ServerState, TcpHandshake, Upstream,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        let c = Config::default();
        let a = c
            .apply(Command::PutUpstream {
                upstream: Box::new(Upstream::new(
                    "shop",
                    vec![Server::new("127.0.0.1:9001"), Server::new("127.0.0.1:9002")],
                )),
                force: false,
            })
            .unwrap();
        a.config
            .apply(Command::PutRoute {
                route: Route::new("r1", &["shop.example.com"], "/", "shop"),
            })
            .unwrap()
            .config
    }

    #[test]
    fn refusals_change_nothing() {
        let c = base();
        let err = c
            .apply(Command::DeleteUpstream {
                name: "shop".into(),
            })
            .unwrap_err();
        assert_eq!(err.status(), 409);
        assert!(err.to_string().contains("r1"));
        let c2 = c
            .apply(Command::RemoveServer {
                upstream: "shop".into(),
                address: "127.0.0.1:9001".into(),
                force: false,
            })
            .unwrap()
            .config;
        let err = c2
            .apply(Command::RemoveServer {
                upstream: "shop".into(),
                address: "127.0.0.1:9002".into(),
                force: false,
            })
            .unwrap_err();
        assert_eq!(err.status(), 409);
        let ok = c2
            .apply(Command::RemoveServer {
                upstream: "shop".into(),
                address: "127.0.0.1:9002".into(),
                force: true,
            })
            .unwrap();
        assert!(ok.config.upstream("shop").unwrap().servers.is_empty());
        let err = c
            .apply(Command::PutRoute {
                route: Route::new("r2", &[], "/", "missing"),
            })
            .unwrap_err();
        assert_eq!(err.status(), 400);
        let err = c
            .apply(Command::PutRoute {
                route: Route::new("r3", &["shop.example.com"], "/", "shop"),
            })
            .unwrap_err();
        assert_eq!(err.status(), 409);
        let dup = Upstream::new(
            "x",
            vec![Server::new("127.0.0.1:1"), Server::new("127.0.0.1:1")],
        );
        let err = c
            .apply(Command::PutUpstream {
                upstream: Box::new(dup),
                force: false,
            })
            .unwrap_err();
        assert!(err.to_string().contains("servers[1].address"), "{err}");
    }

    #[test]
    fn changes_name_only_touched_entities_and_rewind_restores() {
        let c = base();
        let a = c
            .apply(Command::UpdateServer {
                upstream: "shop".into(),
                address: "127.0.0.1:9001".into(),
                patch: ServerPatch {
                    state: Some(ServerState::Drain),
                    ..Default::default()
                },
            })
            .unwrap();
        assert_eq!(a.changes.len(), 1);
        let rev = Revision {
            number: 3,
            time_ms: 0,
            summary: a.summary.clone(),
            changes: a.changes.clone(),
        };
        let back = a.config.rewind(&[rev], 2);
        assert_eq!(back, c);
        let restored = a
            .config
            .apply(Command::Restore {
                config: back,
                revision: 2,
            })
            .unwrap();
        assert_eq!(restored.changes.len(), 1);
        assert_eq!(restored.config, c);
    }

    #[test]
    fn upstream_json_defaults_and_unknown_fields() {
        let u: Upstream = serde_json::from_str(r#"{"servers":[{"address":"127.0.0.1:9001","weight":1}],"balance":"round_robin","retries":2}"#).unwrap();
        assert_eq!(u.retries, 2);
        assert_eq!(u.connect_timeout, std::time::Duration::from_secs(5));
        let err = serde_json::from_str::<Upstream>(r#"{"servers":[],"bogus":1}"#).unwrap_err();
        assert!(err.to_string().contains("bogus"));
        let text = serde_json::to_string(&u).unwrap();
        let back: Upstream = serde_json::from_str(&text).unwrap();
        assert_eq!(back, u);
    }

    #[test]
    fn route_json_without_forward_original_path_loads_as_false() {
        // A route stored before the field existed.
        let old =
            r#"{"id":"r","hosts":["a.example"],"path_prefix":"/api","methods":[],"upstream":"u"}"#;
        let r: Route = serde_json::from_str(old).unwrap();
        assert!(!r.forward_original_path);
        assert_eq!(r, Route::new("r", &["a.example"], "/api", "u"));
        // Off is not written, so stored JSON stays as it was.
        assert!(!serde_json::to_string(&r)
            .unwrap()
            .contains("forward_original_path"));
        let on = Route {
            forward_original_path: true,
            ..r
        };
        let text = serde_json::to_string(&on).unwrap();
        assert!(text.contains(r#""forward_original_path":true"#), "{text}");
        assert_eq!(serde_json::from_str::<Route>(&text).unwrap(), on);
    }

    #[test]
    fn tcp_handshake_defaults_to_half_open_and_only_fits_tcp_checks() {
        let up = |check: &str| -> Upstream {
            serde_json::from_str(&format!(
                r#"{{"name":"u","servers":[{{"address":"127.0.0.1:9001"}}],"health_check":{check}}}"#
            ))
            .unwrap()
        };
        let tcp = up(r#"{"type":"tcp"}"#);
        validate::validate_upstream(&tcp).unwrap();
        let hc = tcp.health_check.unwrap();
        assert_eq!(hc.tcp_handshake.unwrap_or_default(), TcpHandshake::HalfOpen);
        assert!(!serde_json::to_string(&hc)
            .unwrap()
            .contains("tcp_handshake"));
        let full = up(r#"{"type":"tcp","tcp_handshake":"full"}"#);
        validate::validate_upstream(&full).unwrap();
        let err = validate::validate_upstream(&up(r#"{"type":"http","tcp_handshake":"full"}"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("health_check.tcp_handshake"), "{err}");
        let bad = r#"{"servers":[],"health_check":{"type":"tcp","tcp_handshake":"syn"}}"#;
        assert!(serde_json::from_str::<Upstream>(bad).is_err());
    }

    #[test]
    fn registry_fed_membership_is_read_only_and_keeps_overrides() {
        let member = |addr: &str, status: RegistryStatus| Server {
            registry: Some(status),
            ..Server::new(addr)
        };
        let c = Config::default();
        let a = c
            .apply(Command::SyncRegistry {
                upstream: "web".into(),
                servers: vec![
                    member("127.0.0.1:1", RegistryStatus::Passing),
                    member("127.0.0.1:2", RegistryStatus::Passing),
                ],
            })
            .unwrap();
        assert!(a.config.upstreams["web"].registry_fed);
        // Operator drains one; the next sync keeps the drain and updates health.
        let b = a
            .config
            .apply(Command::UpdateServer {
                upstream: "web".into(),
                address: "127.0.0.1:1".into(),
                patch: ServerPatch {
                    state: Some(ServerState::Drain),
                    ..Default::default()
                },
            })
            .unwrap();
        let c2 = b
            .config
            .apply(Command::SyncRegistry {
                upstream: "web".into(),
                servers: vec![
                    member("127.0.0.1:1", RegistryStatus::Critical),
                    member("127.0.0.1:3", RegistryStatus::Passing),
                ],
            })
            .unwrap()
            .config;
        let web = &c2.upstreams["web"];
        assert_eq!(web.servers.len(), 2);
        assert_eq!(web.servers[0].state, ServerState::Drain);
        assert_eq!(web.servers[0].registry, Some(RegistryStatus::Critical));
        assert_eq!(web.servers[1].state, ServerState::Up);
        let weight = ServerPatch {
            weight: Some(5),
            ..Default::default()
        };
        let err = c2
            .apply(Command::UpdateServer {
                upstream: "web".into(),
                address: "127.0.0.1:3".into(),
                patch: weight,
            })
            .unwrap_err();
        assert_eq!(err.status(), 409);
        // Membership writes are refused; settings may change.
        for cmd in [
            Command::AddServer {
                upstream: "web".into(),
                server: Server::new("127.0.0.1:9"),
            },
            Command::RemoveServer {
                upstream: "web".into(),
                address: "127.0.0.1:3".into(),
                force: true,
            },
            Command::SetServers {
                upstream: "web".into(),
                servers: vec![Server::new("127.0.0.1:9")],
            },
            Command::DeleteUpstream { name: "web".into() },
        ] {
            assert_eq!(c2.apply(cmd).unwrap_err().status(), 409);
        }
        let mut settings = Upstream::new("web", vec![]);
        settings.retries = 3;
        let d = c2
            .apply(Command::PutUpstream {
                upstream: Box::new(settings),
                force: false,
            })
            .unwrap()
            .config;
        assert_eq!(d.upstreams["web"].retries, 3);
        assert_eq!(d.upstreams["web"].servers.len(), 2);
        // An admin-managed upstream of the same name is never overwritten by the registry.
        let admin = Config::default()
            .apply(Command::PutUpstream {
                upstream: Box::new(Upstream::new("api", vec![Server::new("127.0.0.1:5")])),
                force: false,
            })
            .unwrap()
            .config;
        let err = admin
            .apply(Command::SyncRegistry {
                upstream: "api".into(),
                servers: vec![],
            })
            .unwrap_err();
        assert_eq!(err.status(), 409);
    }

    #[test]
    fn registry_sync_batch_is_one_revision() {
        let member = |addr: &str| Server {
            registry: Some(RegistryStatus::Passing),
            ..Server::new(addr)
        };
        let base = Config::default()
            .apply(Command::SyncRegistry {
                upstream: "a".into(),
                servers: vec![member("127.0.0.1:1")],
            })
            .unwrap()
            .config
            .apply(Command::UpdateServer {
                upstream: "a".into(),
                address: "127.0.0.1:1".into(),
                patch: ServerPatch {
                    state: Some(ServerState::Drain),
                    ..Default::default()
                },
            })
            .unwrap()
            .config;
        let applied = base
            .apply(Command::SyncRegistryBatch {
                upstreams: vec![
                    (
                        "a".into(),
                        vec![member("127.0.0.1:1"), member("127.0.0.1:2")],
                    ),
                    ("b".into(), vec![member("127.0.0.1:3")]),
                    ("c".into(), vec![]),
                ],
            })
            .unwrap();
        assert_eq!(applied.summary, "registry sync of 3 upstreams: a, b, c");
        let keys: Vec<&str> = applied
            .changes
            .iter()
            .map(|c| match c {
                Change::Upstream { key, .. } => key.as_str(),
                Change::Route { key, .. } => key.as_str(),
            })
            .collect();
        assert_eq!(keys, ["a", "b", "c"]);
        let a = &applied.config.upstreams["a"];
        assert_eq!(a.servers.len(), 2);
        assert_eq!(a.servers[0].state, ServerState::Drain, "override kept");
        assert!(applied.config.upstreams["c"].registry_fed);
        // One refused upstream refuses the batch.
        let admin = base
            .apply(Command::PutUpstream {
                upstream: Box::new(Upstream::new("api", vec![Server::new("127.0.0.1:5")])),
                force: false,
            })
            .unwrap()
            .config;
        let err = admin
            .apply(Command::SyncRegistryBatch {
                upstreams: vec![
                    ("b".into(), vec![member("127.0.0.1:3")]),
                    ("api".into(), vec![member("127.0.0.1:4")]),
                ],
            })
            .unwrap_err();
        assert_eq!(err.status(), 409);
    }
}
