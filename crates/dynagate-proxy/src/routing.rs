//! The route table: host (exact > wildcard > any) then longest path prefix, then methods.
//! Built once per route change; lookups allocate nothing.
//!
//! Laid out for a request's few cache lines rather than for generality: hosts sit in
//! one open-addressing array of 64-byte slots with the host bytes inline (one line read
//! per lookup, no pointer to a key string), and the entries a request reads (path prefix
//! inline, upstream slot, route number) in one contiguous array. A route's upstream is
//! a slot number, resolved to the upstream's runtime once per published snapshot
//! (`Snapshot::upstream_for`) instead of a lookup by name per request.

use crate::stats::{route_number, RouteNo};
use dynagate_model::Route;
use std::collections::HashMap;
use std::sync::Arc;

/// Path prefixes up to this length are compared without leaving the entry.
const INLINE_PREFIX: usize = 20;

/// A route as the data plane holds it: what matching and proxying read first, then the
/// shared strings for metrics and logs.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct RouteEntry {
    /// Index of the upstream in `RouteTable::upstream_names` (and in the snapshot's
    /// resolved upstreams).
    pub upstream_slot: u32,
    /// The number of `id`, for per-route counters.
    pub no: RouteNo,
    prefix_len: u32,
    prefix_inline: [u8; INLINE_PREFIX],
    methods: Box<[Box<str>]>,
    /// `upstream_host` ready to send.
    pub upstream_host_value: Option<Box<http::HeaderValue>>,
    /// The route's `forward_original_path`: send the client's path bytes upstream, not
    /// the normalised path routing used.
    pub forward_original_path: bool,
    // The first 64 bytes end here.
    /// Only when the prefix is longer than `INLINE_PREFIX`.
    prefix_long: Option<Box<str>>,
    pub id: Arc<str>,
    pub upstream: Arc<str>,
    pub route: Arc<Route>,
}

// What proxying reads of a matched entry stays in its first cache line.
const _: () = assert!(std::mem::offset_of!(RouteEntry, forward_original_path) < 64);

impl RouteEntry {
    fn new(route: &Arc<Route>, upstream_slot: u32) -> Self {
        let prefix = route.path_prefix.as_bytes();
        let mut prefix_inline = [0; INLINE_PREFIX];
        let prefix_long = if prefix.len() <= INLINE_PREFIX {
            prefix_inline[..prefix.len()].copy_from_slice(prefix);
            None
        } else {
            Some(Box::from(route.path_prefix.as_str()))
        };
        RouteEntry {
            upstream_slot,
            no: route_number(&route.id),
            prefix_len: prefix.len() as u32,
            prefix_inline,
            prefix_long,
            methods: route
                .methods
                .iter()
                .map(|m| Box::from(m.as_str()))
                .collect(),
            upstream_host_value: route
                .upstream_host
                .as_deref()
                .and_then(|h| http::HeaderValue::from_str(h).ok())
                .map(Box::new),
            forward_original_path: route.forward_original_path,
            id: Arc::from(route.id.as_str()),
            upstream: Arc::from(route.upstream.as_str()),
            route: route.clone(),
        }
    }

    pub fn path_prefix(&self) -> &[u8] {
        // The length decides, so a short prefix never reads the second line.
        match self.prefix_inline.get(..self.prefix_len as usize) {
            Some(short) => short,
            None => self
                .prefix_long
                .as_deref()
                .map(str::as_bytes)
                .unwrap_or(b""),
        }
    }

    fn matches(&self, path: &str, method: &str) -> bool {
        path.as_bytes().starts_with(self.path_prefix())
            && (self.methods.is_empty() || self.methods.iter().any(|m| &**m == method))
    }

    /// What a host slot may say for this entry when it is its host's first candidate:
    /// `PLAIN_ANY` / `PLAIN_ROOT` when it matches any method and any path (any path
    /// starting with `/`), sets no upstream Host and forwards the normalised path, so a
    /// request needs nothing else of it.
    fn plain_flags(&self) -> u16 {
        if !self.methods.is_empty()
            || self.upstream_host_value.is_some()
            || self.forward_original_path
        {
            return 0;
        }
        match self.path_prefix() {
            b"" => PLAIN_ANY,
            b"/" => PLAIN_ROOT,
            _ => 0,
        }
    }
}

/// A matched route: its number and upstream slot, and the entry (read for more only
/// when `upstream_host` needs it, or for logs and errors).
#[derive(Debug, Clone, Copy)]
pub struct Hit<'a> {
    pub no: RouteNo,
    pub upstream_slot: u32,
    pub entry: &'a RouteEntry,
    /// The entry sets no upstream Host and forwards the normalised path (known from the
    /// host slot).
    plain: bool,
}

impl<'a> Hit<'a> {
    fn of(entry: &'a RouteEntry) -> Hit<'a> {
        Hit {
            no: entry.no,
            upstream_slot: entry.upstream_slot,
            entry,
            plain: false,
        }
    }

    /// `upstream_host` ready to send, if the route sets one.
    pub fn upstream_host(&self) -> Option<&'a http::HeaderValue> {
        if self.plain {
            return None;
        }
        self.entry.upstream_host_value.as_deref()
    }

    /// Whether the route forwards the client's original path (`forward_original_path`).
    pub fn forward_original_path(&self) -> bool {
        !self.plain && self.entry.forward_original_path
    }
}

/// Host slot flags: the first candidate matches every method and path (`PLAIN_ANY`) or
/// every path starting with `/` (`PLAIN_ROOT`), sets no upstream Host and does not
/// forward the original path.
const PLAIN_ANY: u16 = 1;
const PLAIN_ROOT: u16 = 2;

/// Host bytes kept inline in a slot; longer hosts keep their tail in the key arena.
const INLINE_HOST: usize = 32;

/// One host of a `HostMap`: its hash, candidates, (the start of) its name and what a
/// request needs of its first candidate when that one is plain, in one cache line: a
/// host with one catch-all route is routed without reading its entry.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct HostSlot {
    /// The high half of the host's hash (the low bits chose the slot).
    hash: u32,
    /// Candidates are `lists[start..start + count]`; count 0 marks a free slot.
    start: u32,
    count: u32,
    /// The first candidate (most lists have one): no trip to `lists` for it.
    first: u32,
    /// The first candidate's route number and upstream slot, and its `PLAIN_*` flags.
    first_no: RouteNo,
    first_upstream: u32,
    flags: u16,
    key_len: u16,
    /// Where bytes past `INLINE_HOST` are in the arena.
    key_tail: u32,
    key_inline: [u8; INLINE_HOST],
}

const _: () = assert!(std::mem::size_of::<HostSlot>() == 64);

const FREE: HostSlot = HostSlot {
    hash: 0,
    start: 0,
    count: 0,
    first: 0,
    first_no: 0,
    first_upstream: 0,
    flags: 0,
    key_len: 0,
    key_tail: 0,
    key_inline: [0; INLINE_HOST],
};

/// A host of a `HostMap` while it is built.
struct HostSpec<'a> {
    name: &'a str,
    start: u32,
    count: u32,
    /// The first candidate's entry.
    first: Option<(u32, &'a RouteEntry)>,
}

/// Host name → candidate list, open addressing with linear probing, at most half full.
#[derive(Debug, Default)]
struct HostMap {
    slots: Box<[HostSlot]>,
    seed: u64,
    arena: Box<[u8]>,
}

impl HostMap {
    /// `hosts`: names distinct, at most 65,535 bytes each (DNS names are far shorter).
    fn build(hosts: &[HostSpec], seed: u64) -> HostMap {
        if hosts.is_empty() {
            return HostMap::default();
        }
        let size = (hosts.len() * 2).next_power_of_two();
        let mut slots = vec![FREE; size];
        let mut arena = Vec::new();
        for host in hosts {
            let key = host.name.as_bytes();
            let hash = host_hash(seed, key);
            let (first, first_no, first_upstream, flags) = match host.first {
                Some((i, e)) => (i, e.no, e.upstream_slot, e.plain_flags()),
                None => (u32::MAX, 0, 0, 0),
            };
            let mut slot = HostSlot {
                hash: (hash >> 32) as u32,
                start: host.start,
                count: host.count,
                first,
                first_no,
                first_upstream,
                flags,
                key_len: key.len().min(u16::MAX as usize) as u16,
                key_tail: arena.len() as u32,
                key_inline: [0; INLINE_HOST],
            };
            let inline = key.len().min(INLINE_HOST);
            slot.key_inline[..inline].copy_from_slice(&key[..inline]);
            arena.extend_from_slice(&key[inline..]);
            let mut i = hash as usize & (size - 1);
            while slots[i].count != 0 {
                i = (i + 1) & (size - 1);
            }
            slots[i] = slot;
        }
        HostMap {
            slots: slots.into_boxed_slice(),
            seed,
            arena: arena.into_boxed_slice(),
        }
    }

    fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn get(&self, host: &str) -> Option<&HostSlot> {
        if self.slots.is_empty() {
            return None;
        }
        let key = host.as_bytes();
        let hash = host_hash(self.seed, key);
        let mask = self.slots.len() - 1;
        let mut i = hash as usize & mask;
        loop {
            let slot = &self.slots[i];
            if slot.count == 0 {
                return None;
            }
            if slot.hash == (hash >> 32) as u32 && self.key_eq(slot, key) {
                return Some(slot);
            }
            i = (i + 1) & mask;
        }
    }

    fn key_eq(&self, slot: &HostSlot, key: &[u8]) -> bool {
        if slot.key_len as usize != key.len() || key.len() >= u16::MAX as usize {
            return false;
        }
        let inline = key.len().min(INLINE_HOST);
        if slot.key_inline[..inline] != key[..inline] {
            return false;
        }
        let tail = &key[inline..];
        let at = slot.key_tail as usize;
        self.arena.get(at..at + tail.len()) == Some(tail)
    }
}

/// A seeded multiply-fold hash over 8-byte words: a few cycles for a host name, and
/// a seed drawn per table so which requests probe longer is not predictable.
fn host_hash(seed: u64, key: &[u8]) -> u64 {
    const K: u64 = 0x9e3779b97f4a7c15;
    let fold = |a: u64, b: u64| {
        let r = (a as u128).wrapping_mul(b as u128);
        (r as u64) ^ ((r >> 64) as u64)
    };
    let mut h = seed ^ (key.len() as u64).wrapping_mul(K);
    let mut words = key.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h = fold(h ^ u64::from_le_bytes(b), K);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut b = [0u8; 8];
        b[..rest.len()].copy_from_slice(rest);
        h = fold(h ^ u64::from_le_bytes(b), 0xc2b2ae3d27d4eb4f);
    }
    fold(h, 0x165667b19e3779f9)
}

#[derive(Debug, Default)]
pub struct RouteTable {
    entries: Vec<RouteEntry>,
    /// Candidate lists of every host (and of `any`), as indexes into `entries`, each
    /// ordered by precedence.
    lists: Vec<u32>,
    exact: HostMap,
    /// Keyed by the suffix after `*.` (`example.com` for `*.example.com`).
    wildcard: HostMap,
    /// `lists[any.0..any.0 + any.1]`: routes without hosts.
    any: (u32, u32),
    /// The upstream of each upstream slot, and the slot of each upstream.
    upstream_names: Vec<Arc<str>>,
    upstream_slots: HashMap<Arc<str>, u32>,
    /// Entries over all host lists (a route with two hosts counts twice).
    len: usize,
}

impl RouteTable {
    pub fn build<'a>(routes: impl IntoIterator<Item = &'a Arc<Route>>) -> Self {
        let mut table = RouteTable::default();
        let mut exact: HashMap<&str, Vec<u32>> = HashMap::new();
        let mut wildcard: HashMap<&str, Vec<u32>> = HashMap::new();
        let mut any: Vec<u32> = Vec::new();
        let routes: Vec<&Arc<Route>> = routes.into_iter().collect();
        for route in &routes {
            let slot = match table.upstream_slots.get(route.upstream.as_str()) {
                Some(slot) => *slot,
                None => {
                    let name: Arc<str> = Arc::from(route.upstream.as_str());
                    let slot = table.upstream_names.len() as u32;
                    table.upstream_names.push(name.clone());
                    table.upstream_slots.insert(name, slot);
                    slot
                }
            };
            let index = table.entries.len() as u32;
            table.entries.push(RouteEntry::new(route, slot));
            if route.hosts.is_empty() {
                any.push(index);
            }
            for host in &route.hosts {
                match host.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix).or_default().push(index),
                    None => exact.entry(host.as_str()).or_default().push(index),
                }
            }
        }
        // Longest prefix first; among equals, routes with a method list before catch-alls,
        // then by id so the order never depends on insertion.
        let entries = &table.entries;
        let order = |list: &mut Vec<u32>| {
            list.sort_by(|a, b| {
                let (a, b) = (&entries[*a as usize], &entries[*b as usize]);
                b.prefix_len
                    .cmp(&a.prefix_len)
                    .then(b.methods.is_empty().cmp(&a.methods.is_empty()).reverse())
                    .then(a.id.cmp(&b.id))
            })
        };
        let mut lists = Vec::new();
        fn flatten<'e>(
            map: HashMap<&'e str, Vec<u32>>,
            lists: &mut Vec<u32>,
            entries: &'e [RouteEntry],
            order: &impl Fn(&mut Vec<u32>),
        ) -> Vec<HostSpec<'e>> {
            let mut hosts: Vec<HostSpec> = Vec::with_capacity(map.len());
            for (name, mut list) in map {
                order(&mut list);
                hosts.push(HostSpec {
                    name,
                    start: lists.len() as u32,
                    count: list.len() as u32,
                    first: list
                        .first()
                        .and_then(|i| Some((*i, entries.get(*i as usize)?))),
                });
                lists.extend_from_slice(&list);
            }
            hosts
        }
        let exact_hosts = flatten(exact, &mut lists, entries, &order);
        let wildcard_hosts = flatten(wildcard, &mut lists, entries, &order);
        order(&mut any);
        let any_range = (lists.len() as u32, any.len() as u32);
        lists.extend_from_slice(&any);
        let seed = crate::balance::random_u64();
        let exact = HostMap::build(&exact_hosts, seed);
        let wildcard = HostMap::build(&wildcard_hosts, seed.rotate_left(17));
        drop((exact_hosts, wildcard_hosts));
        table.len = lists.len();
        table.exact = exact;
        table.wildcard = wildcard;
        table.any = any_range;
        table.lists = lists;
        table
    }

    /// `host` must be lower case without port.
    pub fn find(&self, host: &str, path: &str, method: &str) -> Option<&RouteEntry> {
        self.find_hit(host, path, method).map(|h| h.entry)
    }

    /// `find`, with what a request needs of the route taken from the host slot when it
    /// has it (`Hit`).
    pub fn find_hit(&self, host: &str, path: &str, method: &str) -> Option<Hit<'_>> {
        if let Some(r) = self
            .exact
            .get(host)
            .and_then(|s| self.pick_slot(s, path, method))
        {
            return Some(r);
        }
        if !self.wildcard.is_empty() {
            // Most specific wildcard first: a.b.example.com tries b.example.com, example.com, com.
            let mut rest = host;
            while let Some((_, suffix)) = rest.split_once('.') {
                if let Some(r) = self
                    .wildcard
                    .get(suffix)
                    .and_then(|s| self.pick_slot(s, path, method))
                {
                    return Some(r);
                }
                rest = suffix;
            }
        }
        self.pick(self.any.0, self.any.1, path, method).map(Hit::of)
    }

    fn pick_slot(&self, slot: &HostSlot, path: &str, method: &str) -> Option<Hit<'_>> {
        let first = self.entries.get(slot.first as usize)?;
        let plain = slot.flags == PLAIN_ANY || (slot.flags == PLAIN_ROOT && path.starts_with('/'));
        if plain {
            // The slot has all a request needs: the entry's address, not its contents.
            return Some(Hit {
                no: slot.first_no,
                upstream_slot: slot.first_upstream,
                entry: first,
                plain: true,
            });
        }
        if first.matches(path, method) {
            return Some(Hit::of(first));
        }
        self.pick(slot.start + 1, slot.count.saturating_sub(1), path, method)
            .map(Hit::of)
    }

    fn pick(&self, start: u32, count: u32, path: &str, method: &str) -> Option<&RouteEntry> {
        let (start, count) = (start as usize, count as usize);
        self.lists
            .get(start..start + count)?
            .iter()
            .filter_map(|i| self.entries.get(*i as usize))
            .find(|r| r.matches(path, method))
    }

    /// The upstream names routes lead to, by upstream slot.
    pub fn upstream_names(&self) -> &[Arc<str>] {
        &self.upstream_names
    }

    /// The slot of upstream `name`, if a route leads to it.
    pub fn upstream_slot(&self, name: &str) -> Option<u32> {
        self.upstream_slots.get(name).copied()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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
    fn long_hosts_and_prefixes_many_routes() {
        let long_host = "a-rather-long-service-name.some-namespace.svc.cluster.local";
        let twin = "a-rather-long-service-name.some-namespace.svc.cluster.locak";
        let long_prefix = "/api/v1/some/deeply/nested/resource";
        let mut routes = vec![
            r("long", &[long_host], "/", &[]),
            r("twin", &[twin], "/", &[]),
            r("long-prefix", &[long_host], long_prefix, &[]),
        ];
        for i in 0..1000 {
            routes.push(r(&format!("r{i}"), &[&format!("h{i}.example")], "/", &[]));
        }
        let t = RouteTable::build(routes.iter());
        assert_eq!(t.len(), 1003);
        let id = |h: &str, p: &str| t.find(h, p, "GET").map(|r| r.id.to_string());
        assert_eq!(id(long_host, "/x").as_deref(), Some("long"));
        assert_eq!(id(twin, "/x").as_deref(), Some("twin"));
        assert_eq!(
            id(long_host, "/api/v1/some/deeply/nested/resource/7").as_deref(),
            Some("long-prefix")
        );
        // A prefix of the long prefix is not enough.
        assert_eq!(
            id(long_host, "/api/v1/some/deeply").as_deref(),
            Some("long")
        );
        for i in 0..1000 {
            assert_eq!(id(&format!("h{i}.example"), "/"), Some(format!("r{i}")));
        }
        assert_eq!(id("h1000.example", "/"), None);
        assert_eq!(id("", "/"), None);
        assert_eq!(id(&long_host[..40], "/"), None);
    }

    #[test]
    fn upstream_slots_and_route_numbers() {
        let mut a = Route::new("a", &["a.example"], "/", "u1");
        a.upstream_host = Some("inner.example".into());
        let routes = [
            Arc::new(a),
            Arc::new(Route::new("b", &["b.example"], "/", "u2")),
            Arc::new(Route::new("c", &["c.example"], "/", "u1")),
        ];
        let t = RouteTable::build(routes.iter());
        let names: Vec<&str> = t.upstream_names().iter().map(|n| &**n).collect();
        assert_eq!(names, ["u1", "u2"]);
        let a = t.find("a.example", "/", "GET").unwrap();
        let c = t.find("c.example", "/", "GET").unwrap();
        assert_eq!(a.upstream_slot, c.upstream_slot);
        assert_eq!(t.upstream_slot("u2"), Some(1));
        assert_eq!(t.upstream_slot("u3"), None);
        assert_eq!(
            a.upstream_host_value.as_deref().map(|v| v.as_bytes()),
            Some(&b"inner.example"[..])
        );
        // The same id keeps its number in a rebuilt table.
        let again = RouteTable::build(routes.iter());
        assert_eq!(again.find("a.example", "/", "GET").unwrap().no, a.no);
        assert_ne!(a.no, c.no);
    }

    #[test]
    fn host_slots_answer_for_plain_first_routes() {
        let mut rewrite = Route::new("rewrite", &["rw.example"], "/", "u2");
        rewrite.upstream_host = Some("inner.example".into());
        let routes = [
            r("root", &["a.example"], "/", &[]),
            r("empty", &["e.example"], "", &[]),
            r("get-only", &["m.example"], "/", &["GET"]),
            r("api", &["p.example"], "/api", &[]),
            r("p-root", &["p.example"], "/", &[]),
            Arc::new(rewrite),
            r(
                "long-host",
                &["a-host-name-longer-than-32-bytes.example"],
                "/",
                &[],
            ),
        ];
        let t = RouteTable::build(routes.iter());
        let hit = |h: &str, p: &str, m: &str| t.find_hit(h, p, m);
        for (host, id, plain) in [
            ("a.example", "root", true),
            ("e.example", "empty", true),
            ("m.example", "get-only", false),
            ("p.example", "api", false),
            ("rw.example", "rewrite", false),
            (
                "a-host-name-longer-than-32-bytes.example",
                "long-host",
                true,
            ),
        ] {
            let path = if host == "p.example" { "/api/x" } else { "/x" };
            let h = hit(host, path, "GET").unwrap();
            assert_eq!(&*h.entry.id, id);
            assert_eq!(h.no, h.entry.no, "{id}");
            assert_eq!(h.upstream_slot, h.entry.upstream_slot, "{id}");
            assert_eq!(h.plain, plain, "{id}");
        }
        assert_eq!(
            hit("rw.example", "/", "GET").unwrap().upstream_host(),
            Some(&http::HeaderValue::from_static("inner.example"))
        );
        assert_eq!(hit("a.example", "/", "GET").unwrap().upstream_host(), None);
        // Plain "/" still needs a path starting with "/"; "" takes anything.
        assert!(hit("a.example", "*", "OPTIONS").is_none());
        assert!(hit("e.example", "*", "OPTIONS").is_some());
        // Method lists are still checked on the entry.
        assert!(hit("m.example", "/", "POST").is_none());
        assert_eq!(&*hit("p.example", "/x", "GET").unwrap().entry.id, "p-root");
        assert_ne!(
            hit("rw.example", "/", "GET").unwrap().upstream_slot,
            hit("a.example", "/", "GET").unwrap().upstream_slot
        );
    }

    #[test]
    fn forward_original_path_is_on_the_entry_and_never_plain() {
        let mut raw = Route::new("raw", &["raw.example"], "/", "u");
        raw.forward_original_path = true;
        let routes = [Arc::new(raw), r("plain", &["plain.example"], "/", &[])];
        let t = RouteTable::build(routes.iter());
        let hit = t.find_hit("raw.example", "/x", "GET").unwrap();
        assert!(hit.entry.forward_original_path);
        assert!(!hit.plain);
        assert!(hit.forward_original_path());
        let hit = t.find_hit("plain.example", "/x", "GET").unwrap();
        assert!(!hit.entry.forward_original_path);
        assert!(hit.plain);
        assert!(!hit.forward_original_path());
    }

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host("Shop.Example.com:8080"), "shop.example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("a.b."), "a.b");
    }
}
