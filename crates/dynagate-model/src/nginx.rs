//! The nginx `upstream {}` server syntax that ngx_http_dyups_module accepts:
//! `server 127.0.0.1:8089 weight=2;server 127.0.0.1:8088 backup;`

use crate::error::ModelError;
use crate::types::{Server, ServerState};
use crate::validate::{validate_address, validate_weight};

/// Parses a dyups body into servers. Parameters nginx accepts that have no meaning here
/// (`max_conns`, `slow_start`) are refused rather than silently ignored.
pub fn parse_servers(body: &str) -> Result<Vec<Server>, ModelError> {
    let mut servers = Vec::new();
    for (i, stmt) in body.split(';').enumerate() {
        let stmt = stmt.trim();
        if stmt.is_empty() {
            continue;
        }
        let field = format!("statement {}", i + 1);
        let mut words = stmt.split_ascii_whitespace();
        if words.next() != Some("server") {
            return Err(ModelError::invalid(
                field,
                format!("{stmt:?} does not start with `server`"),
            ));
        }
        let address = words
            .next()
            .ok_or_else(|| ModelError::invalid(&field, "server needs an address"))?;
        validate_address(&format!("{field}.address"), address)?;
        let mut server = Server::new(address);
        for word in words {
            match word.split_once('=') {
                Some(("weight", v)) => {
                    let w: u32 = v.parse().map_err(|_| {
                        ModelError::invalid(
                            format!("{field}.weight"),
                            format!("{v:?} is not a number"),
                        )
                    })?;
                    validate_weight(&format!("{field}.weight"), w)?;
                    server.weight = w;
                }
                // max_fails / fail_timeout are per upstream here; accepted for compatibility.
                Some(("max_fails", v)) | Some(("fail_timeout", v)) if !v.is_empty() => {}
                None if word == "backup" => server.backup = true,
                None if word == "down" => server.state = ServerState::Down,
                // What `render_servers` prints for a draining server, so output round-trips.
                None if word == "drain" => server.state = ServerState::Drain,
                _ => {
                    return Err(ModelError::invalid(
                        field,
                        format!("unsupported server parameter {word:?}"),
                    ))
                }
            }
        }
        servers.push(server);
    }
    if servers.is_empty() {
        return Err(ModelError::invalid(
            "body",
            "no `server host:port;` statement found",
        ));
    }
    Ok(servers)
}

/// Renders servers the way dyups' `GET /upstream/{name}` and `/detail` show them.
pub fn render_servers(servers: &[Server]) -> String {
    let mut out = String::new();
    for s in servers {
        out.push_str("server ");
        out.push_str(&s.address);
        if s.weight != 1 {
            out.push_str(&format!(" weight={}", s.weight));
        }
        if s.backup {
            out.push_str(" backup");
        }
        match s.state {
            ServerState::Up => {}
            ServerState::Drain => out.push_str(" drain"),
            ServerState::Down => out.push_str(" down"),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dyups_bodies() {
        let s = parse_servers("server 127.0.0.1:8089 weight=2;server 127.0.0.1:8088;").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].weight, 2);
        assert_eq!(s[1].address, "127.0.0.1:8088");
        let s =
            parse_servers("server a.local:80 backup; server b.local:80 down max_fails=3;").unwrap();
        assert!(s[0].backup);
        assert_eq!(s[1].state, ServerState::Down);
        let drained = parse_servers("server a.local:80 drain;").unwrap();
        assert_eq!(parse_servers(&render_servers(&drained)).unwrap(), drained);
        assert!(parse_servers("").is_err());
        assert!(parse_servers("server 1.2.3.4;").is_err());
        assert!(parse_servers("serve 1.2.3.4:80;").is_err());
        assert!(parse_servers("server 1.2.3.4:80 weight=0;").is_err());
        assert!(parse_servers("server 1.2.3.4:80 slow_start=3s;").is_err());
    }
}
