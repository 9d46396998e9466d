//! The route table: host (exact > wildcard > any) then longest path prefix, then methods.
//! Built once per route change; lookups allocate nothing.

use dynagate_model::Route;
use std::collections::HashMap;
use std::sync::Arc;

/// A route as the data plane holds it, with shared strings for metrics and logs.
#[derive(Debug)]
pub struct RouteEntry {
    pub route: Arc<Route>,
    pub id: Arc<str>,
    pub upstream: Arc<str>,
    /// `upstream_host` ready to send.
    pub upstream_host_value: Option<http::HeaderValue>,
}

impl std::ops::Deref for RouteEntry {
    type Target = Route;
    fn deref(&self) -> &Route {
        &self.route
    }
}

#[derive(Debug, Default)]
pub struct RouteTable {
    exact: HashMap<String, Vec<Arc<RouteEntry>>>,
    /// Keyed by the suffix after `*.` (`example.com` for `*.example.com`).
    wildcard: HashMap<String, Vec<Arc<RouteEntry>>>,
    any: Vec<Arc<RouteEntry>>,
}

impl RouteTable {
    pub fn build<'a>(routes: impl IntoIterator<Item = &'a Arc<Route>>) -> Self {
        let mut table = RouteTable::default();
        for route in routes {
            let entry = Arc::new(RouteEntry {
                route: route.clone(),
                id: Arc::from(route.id.as_str()),
                upstream: Arc::from(route.upstream.as_str()),
                upstream_host_value: route
                    .upstream_host
                    .as_deref()
                    .and_then(|h| http::HeaderValue::from_str(h).ok()),
            });
            if route.hosts.is_empty() {
                table.any.push(entry.clone());
            }
            for host in &route.hosts {
                let list = match host.strip_prefix("*.") {
                    Some(suffix) => table.wildcard.entry(suffix.to_string()).or_default(),
                    None => table.exact.entry(host.clone()).or_default(),
                };
                list.push(entry.clone());
            }
        }
        // Longest prefix first; among equals, routes with a method list before catch-alls,
        // then by id so the order never depends on insertion.
        let order = |list: &mut Vec<Arc<RouteEntry>>| {
            list.sort_by(|a, b| {
                b.path_prefix
                    .len()
                    .cmp(&a.path_prefix.len())
                    .then(b.methods.is_empty().cmp(&a.methods.is_empty()).reverse())
                    .then(a.id.cmp(&b.id))
            })
        };
        table.exact.values_mut().for_each(order);
        table.wildcard.values_mut().for_each(order);
        order(&mut table.any);
        table
    }

    /// `host` must be lower case without port.
    pub fn find(&self, host: &str, path: &str, method: &str) -> Option<&Arc<RouteEntry>> {
        if let Some(r) = self.exact.get(host).and_then(|l| pick(l, path, method)) {
            return Some(r);
        }
        if !self.wildcard.is_empty() {
            // Most specific wildcard first: a.b.example.com tries b.example.com, example.com, com.
            let mut rest = host;
            while let Some((_, suffix)) = rest.split_once('.') {
                if let Some(r) = self
                    .wildcard
                    .get(suffix)
                    .and_then(|l| pick(l, path, method))
                {
                    return Some(r);
                }
                rest = suffix;
            }
        }
        pick(&self.any, path, method)
    }

    pub fn len(&self) -> usize {
        self.exact.values().map(Vec::len).sum::<usize>()
            + self.wildcard.values().map(Vec::len).sum::<usize>()
            + self.any.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn pick<'a>(list: &'a [Arc<RouteEntry>], path: &str, method: &str) -> Option<&'a Arc<RouteEntry>> {
    list.iter().find(|r| {
        path.starts_with(r.path_prefix.as_str())
            && (r.methods.is_empty() || r.methods.iter().any(|m| m == method))
    })
}

/// Lower-cases a Host header value and removes the port, without allocating when it is
/// already in that form.
pub fn normalize_host(raw: &str) -> std::borrow::Cow<'_, str> {
    let host = if raw.starts_with('[') {
        raw.find(']').map(|i| &raw[..=i]).unwrap_or(raw)
    } else {
        raw.rsplit_once(':').map(|(h, _)| h).unwrap_or(raw)
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: &str, hosts: &[&str], prefix: &str, methods: &[&str]) -> Arc<Route> {
        let mut route = Route::new(id, hosts, prefix, "u");
        route.methods = methods.iter().map(|m| m.to_string()).collect();
        Arc::new(route)
    }

    #[test]
    fn precedence() {
        let routes = [
            r("any", &[], "/", &[]),
            r("any-api", &[], "/api", &[]),
            r("wild", &["*.example.com"], "/", &[]),
            r("wild-deep", &["*.shop.example.com"], "/", &[]),
            r("exact", &["shop.example.com"], "/", &[]),
            r("exact-post", &["shop.example.com"], "/cart", &["POST"]),
        ];
        let t = RouteTable::build(routes.iter());
        let id = |h: &str, p: &str, m: &str| {
            t.find(h, p, m)
                .map(|r| r.id.to_string())
                .unwrap_or_default()
        };
        assert_eq!(id("shop.example.com", "/x", "GET"), "exact");
        assert_eq!(id("shop.example.com", "/cart", "POST"), "exact-post");
        assert_eq!(id("shop.example.com", "/cart", "GET"), "exact");
        assert_eq!(id("a.example.com", "/", "GET"), "wild");
        assert_eq!(id("x.shop.example.com", "/", "GET"), "wild-deep");
        assert_eq!(id("example.com", "/api/v1", "GET"), "any-api");
        assert_eq!(id("other.org", "/", "GET"), "any");
    }

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host("Shop.Example.com:8080"), "shop.example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("a.b."), "a.b");
    }
}
