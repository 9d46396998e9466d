//! Validation of every field an operator can set. Errors name the field at fault.

use crate::error::ModelError;
use crate::types::{Route, Server, Upstream};
use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

pub const MAX_WEIGHT: u32 = 1000;
pub const MAX_RETRIES: u32 = 20;
pub const MAX_SERVERS: usize = 10_000;
pub const MAX_KEEPALIVE: u32 = 10_000;

/// Upstream names and route ids: 1–200 characters of `A-Z a-z 0-9 . _ - : @`.
pub fn validate_name(field: &str, name: &str) -> Result<(), ModelError> {
    if name.is_empty() {
        return Err(ModelError::invalid(field, "must not be empty"));
    }
    if name.len() > 200 {
        return Err(ModelError::invalid(field, "must be at most 200 characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@')))
    {
        return Err(ModelError::invalid(
            field,
            format!("{name:?} contains {c:?}; allowed are letters, digits and . _ - : @"),
        ));
    }
    Ok(())
}

/// A DNS name: labels of letters, digits and hyphens, at most 253 characters.
fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `host:port` where host is an IPv4 address, a bracketed IPv6 address or a DNS name.
pub fn validate_address(field: &str, address: &str) -> Result<(), ModelError> {
    let bad = |why: &str| ModelError::invalid(field, format!("{address:?} {why}"));
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| bad("is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| bad("has no valid port (1-65535)"))?;
    if port == 0 {
        return Err(bad("has port 0"));
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>()
            .map_err(|_| bad("has an invalid IPv6 address"))?;
        return Ok(());
    }
    if host.contains(':') {
        return Err(bad("must put an IPv6 address in brackets, like [::1]:80"));
    }
    if host.parse::<IpAddr>().is_ok() || is_dns_name(host) {
        Ok(())
    } else {
        Err(bad("has an invalid host"))
    }
}

pub fn validate_weight(field: &str, weight: u32) -> Result<(), ModelError> {
    if weight == 0 || weight > MAX_WEIGHT {
        return Err(ModelError::invalid(
            field,
            format!("{weight} is out of range 1-{MAX_WEIGHT}"),
        ));
    }
    Ok(())
}

pub fn validate_server(field: &str, server: &Server) -> Result<(), ModelError> {
    validate_address(&format!("{field}.address"), &server.address)?;
    validate_weight(&format!("{field}.weight"), server.weight)
}

fn validate_timeout(
    field: &str,
    d: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ModelError> {
    if d < min || d > max {
        return Err(ModelError::invalid(
            field,
            format!(
                "{} is out of range {}-{}",
                crate::duration::format_duration(d),
                crate::duration::format_duration(min),
                crate::duration::format_duration(max)
            ),
        ));
    }
    Ok(())
}

pub fn validate_upstream(up: &Upstream) -> Result<(), ModelError> {
    validate_name("name", &up.name)?;
    if up.servers.len() > MAX_SERVERS {
        return Err(ModelError::invalid(
            "servers",
            format!("at most {MAX_SERVERS} servers per upstream"),
        ));
    }
    let mut seen = HashSet::new();
    for (i, s) in up.servers.iter().enumerate() {
        validate_server(&format!("servers[{i}]"), s)?;
        if !seen.insert(s.address.as_str()) {
            return Err(ModelError::invalid(
                format!("servers[{i}].address"),
                format!("duplicate server {:?}", s.address),
            ));
        }
    }
    if up.retries > MAX_RETRIES {
        return Err(ModelError::invalid(
            "retries",
            format!("{} is out of range 0-{MAX_RETRIES}", up.retries),
        ));
    }
    let ms = Duration::from_millis;
    validate_timeout("connect_timeout", up.connect_timeout, ms(1), ms(600_000))?;
    validate_timeout("read_timeout", up.read_timeout, ms(1), ms(86_400_000))?;
    validate_timeout("fail_timeout", up.fail_timeout, ms(1), ms(86_400_000))?;
    if up.keepalive > MAX_KEEPALIVE {
        return Err(ModelError::invalid(
            "keepalive",
            format!("{} is out of range 0-{MAX_KEEPALIVE}", up.keepalive),
        ));
    }
    Ok(())
}

/// `example.com` or `*.example.com`; compared in lower case.
pub fn validate_host_pattern(field: &str, host: &str) -> Result<(), ModelError> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    if name != name.to_ascii_lowercase() {
        return Err(ModelError::invalid(
            field,
            format!("{host:?} must be lower case"),
        ));
    }
    if !(is_dns_name(name) || name.parse::<IpAddr>().is_ok()) {
        return Err(ModelError::invalid(
            field,
            format!("{host:?} is not a host name or a *.suffix wildcard"),
        ));
    }
    Ok(())
}

pub fn validate_route(route: &Route) -> Result<(), ModelError> {
    validate_name("id", &route.id)?;
    let mut seen = HashSet::new();
    for (i, h) in route.hosts.iter().enumerate() {
        validate_host_pattern(&format!("hosts[{i}]"), h)?;
        if !seen.insert(h.as_str()) {
            return Err(ModelError::invalid(
                format!("hosts[{i}]"),
                format!("duplicate host {h:?}"),
            ));
        }
    }
    if !route.path_prefix.starts_with('/') {
        return Err(ModelError::invalid("path_prefix", "must start with /"));
    }
    if route.path_prefix.len() > 1024
        || route
            .path_prefix
            .bytes()
            .any(|b| b <= b' ' || b == 0x7f || b == b'?' || b == b'#')
    {
        return Err(ModelError::invalid(
            "path_prefix",
            "must be at most 1024 visible characters without ? or #",
        ));
    }
    for (i, m) in route.methods.iter().enumerate() {
        if m.is_empty() || m.len() > 20 || !m.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ModelError::invalid(
                format!("methods[{i}]"),
                format!("{m:?} is not an upper-case HTTP method"),
            ));
        }
    }
    validate_name("upstream", &route.upstream)?;
    if let Some(h) = &route.upstream_host {
        if h.is_empty() || h.len() > 255 || h.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(ModelError::invalid(
                "upstream_host",
                "must be a non-empty host[:port]",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        for ok in [
            "127.0.0.1:80",
            "[::1]:8080",
            "backend.local:9000",
            "a-b.c_d:1",
        ] {
            validate_address("a", ok).unwrap();
        }
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            "::1:80",
            "bad host:80",
            ":80",
            "x:-1",
            "-a:1",
        ] {
            assert!(validate_address("a", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts() {
        validate_host_pattern("h", "shop.example.com").unwrap();
        validate_host_pattern("h", "*.example.com").unwrap();
        assert!(validate_host_pattern("h", "Shop.example.com").is_err());
        assert!(validate_host_pattern("h", "*example.com").is_err());
        assert!(validate_host_pattern("h", "a..b").is_err());
    }
}
