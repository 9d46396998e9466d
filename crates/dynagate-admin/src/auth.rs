//! Bearer-token check. The comparison takes the same time whatever the position of the
//! first differing byte, so the token cannot be guessed byte by byte from timings.

use http::header::AUTHORIZATION;
use http::HeaderMap;

/// The configured admin token. An empty token accepts nobody.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl Token {
    pub fn new(token: impl Into<String>) -> Self {
        Token(token.into().into_bytes())
    }

    /// True if `headers` carry `Authorization: Bearer <this token>`.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return false; // absent, or sent twice
        };
        let value = value.as_bytes();
        if value.len() < 7 || !value[..7].eq_ignore_ascii_case(b"bearer ") {
            return false;
        }
        let presented = trim_spaces(&value[7..]);
        !self.0.is_empty() && constant_time_eq(presented, &self.0)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

fn trim_spaces(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Compares every byte of the longer input, folding in the length difference, with no
/// data-dependent branch. Only the lengths are observable through timing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let len = a.len().max(b.len());
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..len {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn compares_whole_tokens() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn admits_only_the_bearer_token() {
        let t = Token::new("s3cret-token");
        assert!(t.admits(&headers("Bearer s3cret-token")));
        assert!(t.admits(&headers("bearer  s3cret-token ")));
        assert!(!t.admits(&headers("Bearer s3cret-toke")));
        assert!(!t.admits(&headers("Bearer s3cret-token2")));
        assert!(!t.admits(&headers("Basic s3cret-token")));
        assert!(!t.admits(&headers("s3cret-token")));
        assert!(!t.admits(&HeaderMap::new()));
        let mut twice = headers("Bearer s3cret-token");
        twice.append(
            AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret-token"),
        );
        assert!(!t.admits(&twice));
        let empty = Token::new("");
        assert!(!empty.admits(&headers("Bearer ")));
        assert!(!empty.admits(&headers("Bearer")));
    }
}
