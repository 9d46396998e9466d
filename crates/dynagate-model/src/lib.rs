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
pub use types::{Balance, Route, Server, ServerPatch, ServerState, Upstream};

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        let c = Config::default();
        let a = c
            .apply(Command::PutUpstream {
                upstream: Upstream::new(
                    "shop",
                    vec![Server::new("127.0.0.1:9001"), Server::new("127.0.0.1:9002")],
                ),
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
                upstream: dup,
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
}
