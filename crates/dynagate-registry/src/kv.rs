//! The KV store: reads over the in-memory map, and writes (put with flags / CAS, delete
//! with recurse / CAS) planned as durable ops.

use crate::model::KvEntry;
use crate::state::{prefix_range, State};
use crate::store::Op;
use crate::{ApiError, Planned, Registry};
use std::sync::Arc;

/// Consul's `kv_max_value_size` default.
pub(crate) const MAX_VALUE_SIZE: usize = 512 * 1024;

/// Entries for `key` (exact) or every key under the prefix `key` (recurse).
pub(crate) fn get<'a>(st: &'a State, key: &str, recurse: bool) -> Vec<&'a KvEntry> {
    if recurse {
        prefix_range(&st.kv, key).map(|(_, e)| e).collect()
    } else {
        st.kv.get(key).into_iter().collect()
    }
}

/// Key names under `prefix`; with a separator, keys are cut after the first separator
/// following the prefix and deduplicated (folders).
pub(crate) fn keys(st: &State, prefix: &str, separator: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (k, _) in prefix_range(&st.kv, prefix) {
        let key = if separator.is_empty() {
            k.as_str()
        } else {
            let after = &k[prefix.len()..];
            match after.find(separator) {
                Some(i) => &k[..prefix.len() + i + separator.len()],
                None => k.as_str(),
            }
        };
        if out.last().map(|l| l.as_str()) != Some(key) {
            out.push(key.to_string());
        }
    }
    out
}

/// Index a KV read reports.
pub(crate) fn index(st: &State, key: &str, prefix: bool) -> u64 {
    if prefix {
        st.kv_prefix_index(key)
    } else {
        st.kv_key_index(key)
    }
}

impl Registry {
    /// `PUT /kv/<key>[?flags][?cas]`: true when written.
    pub(crate) async fn kv_put(
        self: &Arc<Self>,
        key: String,
        value: Vec<u8>,
        flags: u64,
        cas: Option<u64>,
    ) -> Result<bool, ApiError> {
        self.write(move |st, next| {
            let old = st.kv.get(&key);
            if let Some(cas) = cas {
                let ok = match (cas, old) {
                    (0, None) => true,
                    (0, Some(_)) => false,
                    (c, Some(e)) => e.modify_index == c,
                    (_, None) => false,
                };
                if !ok {
                    return Ok(Planned {
                        ops: vec![],
                        result: false,
                    });
                }
            }
            let entry = KvEntry {
                create_index: old.map_or(next, |e| e.create_index),
                lock_index: old.map_or(0, |e| e.lock_index),
                modify_index: next,
                flags,
                value,
                key,
            };
            Ok(Planned {
                ops: vec![Op::PutKv(entry)],
                result: true,
            })
        })
        .await
    }

    /// `DELETE /kv/<key>[?recurse][?cas]`: false only when a CAS did not match.
    pub(crate) async fn kv_delete(
        self: &Arc<Self>,
        key: String,
        recurse: bool,
        cas: Option<u64>,
    ) -> Result<bool, ApiError> {
        self.write(move |st, _| {
            let ops: Vec<Op> = if recurse {
                prefix_range(&st.kv, &key)
                    .map(|(k, _)| Op::DeleteKv(k.clone()))
                    .collect()
            } else {
                match (st.kv.get(&key), cas) {
                    (None, _) => vec![],
                    (Some(e), Some(c)) if e.modify_index != c => {
                        return Ok(Planned {
                            ops: vec![],
                            result: false,
                        })
                    }
                    (Some(_), _) => vec![Op::DeleteKv(key)],
                }
            };
            Ok(Planned { ops, result: true })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn st(keys: &[&str]) -> State {
        let kv = keys
            .iter()
            .map(|k| KvEntry {
                key: k.to_string(),
                value: vec![],
                flags: 0,
                create_index: 1,
                modify_index: 1,
                lock_index: 0,
            })
            .collect();
        State::new(1, vec![], vec![], kv, Instant::now())
    }

    #[test]
    fn keys_with_separator() {
        let s = st(&["a/b/c", "a/b/d", "a/e", "a/f/", "b"]);
        assert_eq!(keys(&s, "a/", "/"), ["a/b/", "a/e", "a/f/"]);
        assert_eq!(keys(&s, "a/", ""), ["a/b/c", "a/b/d", "a/e", "a/f/"]);
        assert_eq!(keys(&s, "", "/"), ["a/", "b"]);
        assert!(keys(&s, "zz", "/").is_empty());
        assert_eq!(get(&s, "a/", true).len(), 4);
        assert_eq!(get(&s, "a/e", false).len(), 1);
        assert_eq!(get(&s, "a/", false).len(), 0);
    }
}
