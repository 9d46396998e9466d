//! Registered services and the nginx-upsync KV layout, turned into upstream server lists.
//! Pure: the gateway calls [`crate::Registry::upstreams`], which feeds this.
//!
//! Rules, following nginx-upsync-module where it has one:
//! - A service named N is upstream N; each instance is a server `address:port` where the
//!   address is the ServiceAddress, or the node address when that is empty. Instances
//!   without a port (0) are skipped, as nginx-upsync skips them.
//! - Tags `weight=N` (N > 0), `max_fails=N`, `fail_timeout=T` (seconds, or nginx time such
//!   as `10s`, `1m`), `backup`, `down` apply as in nginx-upsync's catalog mode; invalid
//!   values keep the default.
//! - Without a `weight=` tag the weight comes from Consul's `Weights`: `Passing` when the
//!   instance is passing, `Warning` when it is warning (a warning weight of 0 marks the
//!   server down).
//! - `down` is also set when the instance's aggregated health is critical or maintenance.
//! - KV: keys `upstreams/<name>/<host>:<port>` define upstream `<name>`; the value is JSON
//!   `{"weight","max_fails","fail_timeout","down","backup"}` (numbers or numeric strings;
//!   an empty value means the defaults 1, 2, 10, 0, 0). A value that is not valid JSON is
//!   skipped, as nginx-upsync skips it. Keys whose last segment is not `host:port` are
//!   ignored (e.g. the `upstreams/<name>/` folder key).
//! - When a service and a KV upstream share a name, both contribute servers; a KV server
//!   whose address an instance already has is dropped.

use crate::model::{Health, Weights};
use serde::Serialize;
use std::collections::BTreeMap;

/// The KV prefix nginx-upsync reads.
pub const KV_UPSTREAMS_PREFIX: &str = "upstreams/";

/// Where a derived server comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Service,
    Kv,
}

/// One server of a derived upstream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UpstreamServer {
    /// `host:port` (`[v6]:port` for bracketed IPv6 given that way).
    pub address: String,
    pub weight: u32,
    pub max_fails: u32,
    /// Seconds.
    pub fail_timeout: u32,
    pub backup: bool,
    pub down: bool,
    /// Aggregated health: passing, warning, critical or maintenance. KV servers are passing.
    pub status: Health,
    pub source: Source,
    /// The service instance ID, or the KV key.
    pub id: String,
}

/// A service instance as the derivation needs it.
#[derive(Clone, Debug)]
pub struct Instance<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub address: &'a str,
    pub port: u16,
    pub tags: &'a [String],
    pub weights: Weights,
    pub health: Health,
}

/// Upstream name -> servers. Instances in the order given, then KV servers in key order.
pub fn derive_upstreams<'a, I, K>(
    instances: I,
    kv: K,
    node_address: &str,
) -> BTreeMap<String, Vec<UpstreamServer>>
where
    I: IntoIterator<Item = Instance<'a>>,
    K: IntoIterator<Item = (&'a str, &'a [u8])>,
{
    let mut out: BTreeMap<String, Vec<UpstreamServer>> = BTreeMap::new();
    for inst in instances {
        if let Some(s) = instance_server(&inst, node_address) {
            out.entry(inst.name.to_string()).or_default().push(s);
        }
    }
    for (key, value) in kv {
        let Some((name, s)) = kv_server(key, value) else {
            continue;
        };
        let list = out.entry(name).or_default();
        if !list.iter().any(|x| x.address == s.address) {
            list.push(s);
        }
    }
    out
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn instance_server(inst: &Instance<'_>, node_address: &str) -> Option<UpstreamServer> {
    if inst.port == 0 {
        return None;
    }
    let host = if inst.address.is_empty() {
        node_address
    } else {
        inst.address
    };
    let mut tag_weight = None;
    let mut max_fails = 2;
    let mut fail_timeout = 10;
    let mut backup = false;
    let mut down = false;
    for tag in inst.tags {
        if let Some(v) = tag.strip_prefix("weight=") {
            if let Some(w) = parse_uint(v).filter(|w| *w > 0) {
                tag_weight = Some(w);
            }
        } else if let Some(v) = tag.strip_prefix("max_fails=") {
            if let Some(n) = parse_uint(v) {
                max_fails = n;
            }
        } else if let Some(v) = tag.strip_prefix("fail_timeout=") {
            if let Some(n) = parse_nginx_secs(v) {
                fail_timeout = n;
            }
        } else if tag == "down" {
            down = true;
        } else if tag == "backup" {
            backup = true;
        }
    }
    let weight = match tag_weight {
        Some(w) => w,
        None => {
            let w = if inst.health == Health::Warning {
                inst.weights.warning
            } else {
                inst.weights.passing
            };
            u32::try_from(w.max(0)).unwrap_or(u32::MAX)
        }
    };
    if weight == 0 || matches!(inst.health, Health::Critical | Health::Maintenance) {
        down = true;
    }
    Some(UpstreamServer {
        address: join_host_port(host, inst.port),
        weight: weight.max(1),
        max_fails,
        fail_timeout,
        backup,
        down,
        status: inst.health,
        source: Source::Service,
        id: inst.id.to_string(),
    })
}

/// `upstreams/<name>/<host>:<port>` -> (name, server).
fn kv_server(key: &str, value: &[u8]) -> Option<(String, UpstreamServer)> {
    let rest = key.strip_prefix(KV_UPSTREAMS_PREFIX)?;
    let (name, addr) = rest.split_once('/')?;
    if name.is_empty() || addr.is_empty() || addr.contains('/') {
        return None;
    }
    let (host, port) = addr.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    if host.is_empty() {
        return None;
    }
    let mut s = UpstreamServer {
        address: format!("{host}:{port}"),
        weight: 1,
        max_fails: 2,
        fail_timeout: 10,
        backup: false,
        down: false,
        status: Health::Passing,
        source: Source::Kv,
        id: key.to_string(),
    };
    let text = std::str::from_utf8(value).ok()?.trim();
    if !text.is_empty() {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        let obj = v.as_object()?;
        if let Some(w) = obj.get("weight").and_then(json_int) {
            s.weight = if w <= 0 { 1 } else { clamp_u32(w) };
        }
        if let Some(n) = obj.get("max_fails").and_then(json_int).filter(|n| *n >= 0) {
            s.max_fails = clamp_u32(n);
        }
        if let Some(n) = obj
            .get("fail_timeout")
            .and_then(json_int)
            .filter(|n| *n >= 0)
        {
            s.fail_timeout = clamp_u32(n);
        }
        if let Some(d) = obj.get("down").and_then(json_int) {
            s.down = d == 1;
        }
        if let Some(b) = obj.get("backup").and_then(json_int) {
            s.backup = b == 1;
        }
    }
    Some((name.to_string(), s))
}

fn clamp_u32(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// A number, a numeric string, or a bool (true = 1).
fn json_int(v: &serde_json::Value) -> Option<i64> {
    match v {
        serde_json::Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        serde_json::Value::Bool(b) => Some(i64::from(*b)),
        _ => None,
    }
}

fn parse_uint(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// nginx time in seconds: `10`, `10s`, `1m`, `1h`, `1d`, `1m30s`.
fn parse_nginx_secs(s: &str) -> Option<u32> {
    if let Some(n) = parse_uint(s) {
        return Some(n);
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        total += n * match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'w' => 7 * 86400,
            _ => return None,
        };
    }
    if !num.is_empty() {
        return None;
    }
    u32::try_from(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst<'a>(
        id: &'a str,
        name: &'a str,
        addr: &'a str,
        port: u16,
        tags: &'a [String],
        health: Health,
    ) -> Instance<'a> {
        Instance {
            id,
            name,
            address: addr,
            port,
            tags,
            weights: Weights::default(),
            health,
        }
    }

    fn tags(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn services_become_servers() {
        let none = tags(&[]);
        let t2 = tags(&["weight=5", "backup", "max_fails=3", "fail_timeout=1m"]);
        let bad = tags(&["weight=0", "weight=x", "max_fails=-1", "down"]);
        let ups = derive_upstreams(
            vec![
                inst("web1", "web", "", 8080, &none, Health::Passing),
                inst("web2", "web", "10.0.0.2", 8080, &t2, Health::Passing),
                inst("web3", "web", "10.0.0.3", 8080, &bad, Health::Passing),
                inst("web4", "web", "10.0.0.4", 0, &none, Health::Passing),
                inst("db1", "db", "::1", 5432, &none, Health::Critical),
                inst("db2", "db", "10.0.0.9", 5432, &none, Health::Maintenance),
            ],
            Vec::new(),
            "127.0.0.1",
        );
        let web = &ups["web"];
        assert_eq!(web.len(), 3, "port 0 skipped");
        assert_eq!(web[0].address, "127.0.0.1:8080");
        assert_eq!(
            (web[0].weight, web[0].max_fails, web[0].fail_timeout),
            (1, 2, 10)
        );
        assert!(!web[0].down && !web[0].backup);
        assert_eq!(web[1].address, "10.0.0.2:8080");
        assert_eq!(
            (web[1].weight, web[1].max_fails, web[1].fail_timeout),
            (5, 3, 60)
        );
        assert!(web[1].backup);
        assert_eq!((web[2].weight, web[2].max_fails), (1, 2));
        assert!(web[2].down);
        let db = &ups["db"];
        assert_eq!(db[0].address, "[::1]:5432");
        assert!(db[0].down);
        assert_eq!(db[0].status, Health::Critical);
        assert!(db[1].down);
        assert_eq!(db[1].status, Health::Maintenance);
    }

    #[test]
    fn consul_weights_follow_health() {
        let none = tags(&[]);
        let mut a = inst("a", "s", "10.0.0.1", 80, &none, Health::Passing);
        a.weights = Weights {
            passing: 10,
            warning: 3,
        };
        let mut b = a.clone();
        b.id = "b";
        b.address = "10.0.0.2";
        b.health = Health::Warning;
        let mut c = b.clone();
        c.id = "c";
        c.address = "10.0.0.3";
        c.weights.warning = 0;
        let ups = derive_upstreams(vec![a, b, c], Vec::new(), "127.0.0.1");
        let s = &ups["s"];
        assert_eq!((s[0].weight, s[0].down), (10, false));
        assert_eq!((s[1].weight, s[1].down), (3, false));
        assert_eq!(s[1].status, Health::Warning);
        assert!(s[2].down, "warning weight 0 takes the server out");
    }

    #[test]
    fn nginx_upsync_kv_layout() {
        let kv: Vec<(&str, &[u8])> = vec![
            ("upstreams/test/", b""),
            ("upstreams/test/10.0.0.1:80", b""),
            (
                "upstreams/test/10.0.0.2:80",
                br#"{"weight":3,"max_fails":5,"fail_timeout":30,"down":0,"backup":1}"#,
            ),
            (
                "upstreams/test/10.0.0.3:80",
                br#"{"weight":"0","down":"1"}"#,
            ),
            ("upstreams/test/10.0.0.4:80", b"not json"),
            ("upstreams/test/10.0.0.5:80", br#"{"down":7}"#),
            ("upstreams/test/nohost", b""),
            ("upstreams/test/a/b:1", b""),
            ("upstreams/other/192.168.0.1:8080", b""),
            ("config/x", b"1"),
        ];
        let ups = derive_upstreams(Vec::new(), kv, "127.0.0.1");
        assert_eq!(ups.len(), 2);
        let t = &ups["test"];
        let addrs: Vec<_> = t.iter().map(|s| s.address.as_str()).collect();
        assert_eq!(
            addrs,
            ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.5:80"]
        );
        assert_eq!(
            (
                t[0].weight,
                t[0].max_fails,
                t[0].fail_timeout,
                t[0].down,
                t[0].backup
            ),
            (1, 2, 10, false, false)
        );
        assert_eq!(
            (
                t[1].weight,
                t[1].max_fails,
                t[1].fail_timeout,
                t[1].down,
                t[1].backup
            ),
            (3, 5, 30, false, true)
        );
        assert_eq!((t[2].weight, t[2].down), (1, true));
        assert!(!t[3].down, "invalid down value keeps the default");
        assert_eq!(t[0].source, Source::Kv);
        assert_eq!(ups["other"][0].address, "192.168.0.1:8080");
    }

    #[test]
    fn service_and_kv_merge_without_duplicates() {
        let none = tags(&[]);
        let kv: Vec<(&str, &[u8])> = vec![
            ("upstreams/web/10.0.0.1:80", b""),
            ("upstreams/web/10.0.0.9:80", b""),
        ];
        let ups = derive_upstreams(
            vec![inst("w", "web", "10.0.0.1", 80, &none, Health::Passing)],
            kv,
            "127.0.0.1",
        );
        let w = &ups["web"];
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].source, Source::Service);
        assert_eq!(w[1].address, "10.0.0.9:80");
    }

    #[test]
    fn nginx_time() {
        assert_eq!(parse_nginx_secs("10"), Some(10));
        assert_eq!(parse_nginx_secs("10s"), Some(10));
        assert_eq!(parse_nginx_secs("1m30s"), Some(90));
        assert_eq!(parse_nginx_secs("1x"), None);
        assert_eq!(parse_nginx_secs("5m3"), None);
    }
}
