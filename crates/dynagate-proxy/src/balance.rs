//! Balancing building blocks: a stable 64-bit hash, a per-thread random source, and
//! the consistent-hash tables (ketama ring and maglev lookup table).

use std::cell::Cell;

/// FNV-1a with a murmur3 finalizer: stable across processes and versions, so every
/// gateway node maps a key to the same server.
pub fn hash64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    mix(h)
}

pub fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51afd7ed558ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ceb9fe1a85ec53);
    h ^= h >> 33;
    h
}

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        mix(seed ^ (&seed as *const u64 as u64)) | 1
    });
}

/// xorshift64*: fast and good enough to pick servers.
pub fn random_u64() -> u64 {
    RNG.with(|cell| {
        let mut x = cell.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        cell.set(x);
        x.wrapping_mul(0x2545F4914F6CDD1D)
    })
}

/// Most ring points of a ketama ring; large upstreams get fewer points per server.
const MAX_RING_POINTS: usize = 1 << 18;
const POINTS_PER_WEIGHT: usize = 160;

/// Ketama: each server owns points on a ring of 2^64; a key goes to the first point at
/// or after its hash.
#[derive(Debug, Default)]
pub struct Ketama {
    points: Vec<(u64, u32)>,
}

impl Ketama {
    pub fn build(servers: &[(&str, u32)]) -> Ketama {
        let total_weight: usize = servers
            .iter()
            .map(|(_, w)| *w as usize)
            .sum::<usize>()
            .max(1);
        let per_weight = (MAX_RING_POINTS / total_weight).clamp(1, POINTS_PER_WEIGHT);
        let mut points = Vec::with_capacity(total_weight * per_weight);
        for (index, (address, weight)) in servers.iter().enumerate() {
            for i in 0..(*weight as usize * per_weight) {
                let h = hash64(format!("{address}-{i}").as_bytes());
                points.push((h, index as u32));
            }
        }
        points.sort_unstable();
        Ketama { points }
    }

    /// Server indexes in ring order from the key's position; the caller takes the first
    /// usable one.
    pub fn walk(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.points.partition_point(|(h, _)| *h < hash);
        let n = self.points.len();
        (0..n).map(move |i| self.points[(start + i) % n].1 as usize)
    }
}

/// Maglev: a lookup table filled from each server's permutation; O(1) lookups and
/// minimal disruption.
#[derive(Debug, Default)]
pub struct Maglev {
    table: Vec<u32>,
}

const MAGLEV_SIZES: [usize; 4] = [5_003, 65_537, 262_147, 655_373];

impl Maglev {
    pub fn build(servers: &[(&str, u32)]) -> Maglev {
        let n = servers.len();
        if n == 0 {
            return Maglev::default();
        }
        let m = MAGLEV_SIZES
            .iter()
            .copied()
            .find(|m| *m >= n * 100)
            .unwrap_or(MAGLEV_SIZES[3]);
        let params: Vec<(usize, usize)> = servers
            .iter()
            .map(|(address, _)| {
                let offset = (hash64(address.as_bytes()) % m as u64) as usize;
                let skip = (mix(hash64(address.as_bytes()) ^ 0x9e3779b97f4a7c15) % (m as u64 - 1)
                    + 1) as usize;
                (offset, skip)
            })
            .collect();
        let max_weight = servers.iter().map(|(_, w)| *w).max().unwrap_or(1).max(1) as u64;
        let mut next = vec![0usize; n];
        let mut credit = vec![0u64; n];
        let mut table = vec![u32::MAX; m];
        let mut filled = 0;
        'fill: loop {
            for i in 0..n {
                // Weighted: a server fills slots in proportion to its weight.
                credit[i] += servers[i].1 as u64;
                while credit[i] >= max_weight {
                    credit[i] -= max_weight;
                    let (offset, skip) = params[i];
                    loop {
                        let slot = (offset + next[i] * skip) % m;
                        next[i] += 1;
                        if table[slot] == u32::MAX {
                            table[slot] = i as u32;
                            filled += 1;
                            break;
                        }
                    }
                    if filled == m {
                        break 'fill;
                    }
                }
            }
        }
        Maglev { table }
    }

    pub fn lookup(&self, hash: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[(hash % self.table.len() as u64) as usize] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moved_share(build: impl Fn(&[(&str, u32)]) -> Box<dyn Fn(u64) -> usize>) -> (f64, bool) {
        let names: Vec<String> = (0..11).map(|i| format!("10.0.0.{i}:80")).collect();
        let ten: Vec<(&str, u32)> = names[..10].iter().map(|n| (n.as_str(), 1)).collect();
        let eleven: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
        let before = build(&ten);
        let after = build(&eleven);
        let keys = 20_000;
        let mut moved = 0;
        let mut only_to_new = true;
        for k in 0..keys {
            let h = hash64(format!("user-{k}").as_bytes());
            let (a, b) = (before(h), after(h));
            if a != b {
                moved += 1;
                only_to_new &= b == 10;
            }
        }
        (moved as f64 / keys as f64, only_to_new)
    }

    #[test]
    fn ketama_moves_about_one_in_n() {
        let (share, only_new) = moved_share(|s| {
            let k = Ketama::build(s);
            Box::new(move |h| k.walk(h).next().unwrap())
        });
        assert!((0.05..0.14).contains(&share), "moved {share}");
        assert!(only_new, "keys moved between old servers");
    }

    #[test]
    fn maglev_moves_about_one_in_n() {
        let (share, _) = moved_share(|s| {
            let m = Maglev::build(s);
            Box::new(move |h| m.lookup(h).unwrap())
        });
        assert!((0.05..0.16).contains(&share), "moved {share}");
    }

    #[test]
    fn maglev_respects_weights() {
        let m = Maglev::build(&[("a:1", 3), ("b:1", 1)]);
        let a = m.table.iter().filter(|i| **i == 0).count() as f64 / m.table.len() as f64;
        assert!((0.70..0.80).contains(&a), "{a}");
    }
}
