//! Request-target checks shared by both HTTP paths: path normalisation and Host
//! validation. Pure functions over bytes, no I/O.
//!
//! Routing decides on the normalised path, so a request cannot reach a route's backend
//! through a path that only *looks* outside the route's prefix (`/public/../admin`),
//! nor dodge a prefix with an encoded dot (`/public/%2e%2e/admin`) or a doubled slash.

use std::borrow::Cow;

/// Normalises the path of a request-target (without its query), RFC 3986 §6.2.2 plus
/// slash merging:
///
/// - percent-encoded unreserved characters (ALPHA DIGIT `-` `.` `_` `~`) are decoded,
///   every other `%XX` is kept with its hex in upper case (`%2f` → `%2F`; an encoded
///   `/` is not a separator);
/// - repeated `/` are merged;
/// - `.` and `..` segments are resolved (§5.2.4), after decoding (`%2e%2e` is `..`);
///   a `..` above the root is an error, not silently dropped;
/// - a trailing slash is kept (`/a/.` → `/a/`, `/a/..` → `/`);
/// - `%00`, a raw NUL, or a `%` not followed by two hex digits is an error;
/// - so are a raw `\` (not a pchar, RFC 3986 §3.3; IIS-style servers read it as `/`) and
///   a `.` or `..` segment with parameters (`..;x`: Tomcat-style servers drop the
///   parameters and climb).
///
/// An already-normal path is returned borrowed, found by one scan without allocating.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, &'static str> {
    if !path.starts_with('/') {
        return Err("path does not start with /");
    }
    if is_normal(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    normalize_slow(path.as_bytes()).map(Cow::Owned)
}

/// True when `path` (starting with `/`) has nothing to normalise: no NUL, no empty
/// segment (`//`), no `.` or `..` segment, and every `%XX` already in normal form
/// (upper-case hex of a reserved or non-ASCII byte other than NUL, as in `/caf%C3%A9`).
fn is_normal(path: &[u8]) -> bool {
    let at = |i: usize| path.get(i).copied();
    for (i, &b) in path.iter().enumerate() {
        match b {
            0 | b'\\' => return false,
            b'%' => match (at(i + 1).and_then(upper_hex), at(i + 2).and_then(upper_hex)) {
                (Some(hi), Some(lo)) if !is_unreserved((hi << 4) | lo) && (hi | lo) != 0 => {}
                _ => return false,
            },
            b'/' => match at(i + 1) {
                Some(b'/') => return false,
                Some(b'.') => match at(i + 2) {
                    None | Some(b'/' | b';') => return false,
                    Some(b'.') if matches!(at(i + 3), None | Some(b'/' | b';')) => return false,
                    _ => {}
                },
                _ => {}
            },
            _ => {}
        }
    }
    true
}

fn normalize_slow(path: &[u8]) -> Result<String, &'static str> {
    // `out` holds "/seg" for every kept segment; the root is added at the end.
    let mut out: Vec<u8> = Vec::with_capacity(path.len());
    let mut segments = path[1..].split(|&b| b == b'/').peekable();
    let mut trailing_slash = false;
    while let Some(raw) = segments.next() {
        let last = segments.peek().is_none();
        let start = out.len();
        out.push(b'/');
        decode_segment(raw, &mut out)?;
        let segment = &out[start + 1..];
        if segment.starts_with(b".;") || segment.starts_with(b"..;") {
            return Err("dot segment with parameters (..;) in path");
        }
        match segment {
            // An empty segment is a doubled (or the final) slash.
            b"" | b"." => out.truncate(start),
            b".." => {
                out.truncate(start);
                // Drop the previous segment; there is none at the root.
                let parent = out
                    .iter()
                    .rposition(|&b| b == b'/')
                    .ok_or("path climbs above the root")?;
                out.truncate(parent);
            }
            _ => {
                trailing_slash = false;
                continue;
            }
        }
        // A removed segment at the end leaves its directory: `/a/.` is `/a/`.
        trailing_slash = last;
    }
    if out.is_empty() || trailing_slash {
        out.push(b'/');
    }
    // Only ASCII was inserted, and the input was cut at ASCII bytes only.
    String::from_utf8(out).map_err(|_| "path is not UTF-8")
}

/// Appends `raw` to `out` with its percent-encodings normalised.
fn decode_segment(raw: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == 0 {
            return Err("NUL in path");
        }
        if b == b'\\' {
            return Err("backslash in path");
        }
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            raw.get(i + 1).and_then(|&h| hex_value(h)),
            raw.get(i + 2).and_then(|&l| hex_value(l)),
        ) else {
            return Err("invalid percent-encoding in path");
        };
        let decoded = (hi << 4) | lo;
        if decoded == 0 {
            return Err("NUL in path");
        }
        if is_unreserved(decoded) {
            out.push(decoded);
        } else {
            out.extend_from_slice(&[b'%', HEX_UPPER[hi as usize], HEX_UPPER[lo as usize]]);
        }
        i += 3;
    }
    Ok(())
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// The value of a hex digit in normal form (upper case).
fn upper_hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Longest Host value accepted (a DNS name is at most 253 bytes, plus `:port` room).
const MAX_HOST: usize = 255;

/// Checks a Host header or `:authority` value: RFC 3986 `host [":" port]` without
/// userinfo, where host is
///
/// - a reg-name of ALPHA DIGIT `-` `.` `_` `~` (an IPv4 address is one too): not
///   starting with `.`, without `..`; one trailing `.` (a fully qualified name) is
///   allowed;
/// - or `[IPv6]`: an IPv6 address (RFC 4291 text form, as `std` parses it) in brackets;
///
/// and port is 1 to 5 digits at most 65535. At most 255 bytes.
pub fn validate_host(host: &[u8]) -> Result<(), &'static str> {
    if host.is_empty() {
        return Err("empty host");
    }
    if host.len() > MAX_HOST {
        return Err("host longer than 255 bytes");
    }
    let port = if host[0] == b'[' {
        let close = host
            .iter()
            .position(|&b| b == b']')
            .ok_or("unbalanced [ in host")?;
        let inside = &host[1..close];
        if inside.is_empty()
            || !inside
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err("invalid IPv6 address in host");
        }
        // Only hex, ':' and '.' inside, so it is ASCII.
        let text = std::str::from_utf8(inside).map_err(|_| "invalid IPv6 address in host")?;
        if text.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("invalid IPv6 address in host");
        }
        match &host[close + 1..] {
            [] => None,
            [b':', port @ ..] => Some(port),
            _ => return Err("invalid character after ] in host"),
        }
    } else {
        let (name, port) = match host.iter().position(|&b| b == b':') {
            Some(colon) => (&host[..colon], Some(&host[colon + 1..])),
            None => (host, None),
        };
        validate_reg_name(name)?;
        port
    };
    match port {
        None => Ok(()),
        Some(port) => validate_port(port),
    }
}

fn validate_reg_name(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty host name");
    }
    if name[0] == b'.' {
        return Err("host starts with .");
    }
    if !name.iter().all(|&b| is_unreserved(b)) {
        return Err("invalid character in host");
    }
    if name.windows(2).any(|w| w == b"..") {
        return Err(".. in host");
    }
    Ok(())
}

fn validate_port(port: &[u8]) -> Result<(), &'static str> {
    if port.is_empty() {
        return Err("empty port in host");
    }
    if port.len() > 5 || !port.iter().all(u8::is_ascii_digit) {
        return Err("invalid port in host");
    }
    let value = port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    if value > u32::from(u16::MAX) {
        return Err("port above 65535 in host");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, &'static str> {
        normalize_path(p).map(Cow::into_owned)
    }

    fn borrowed(p: &str) -> bool {
        matches!(normalize_path(p), Ok(Cow::Borrowed(_)))
    }

    #[test]
    fn already_normal_paths_are_borrowed_unchanged() {
        for p in [
            "/",
            "/a",
            "/a/b/",
            "/index.html",
            "/.well-known/acme",
            "/a/..b/c.",
            "/a/...",
            "/a./b",
            "/~user/x_y-z",
            "/caf%C3%A9/a%2Fb",
            "/%25",
        ] {
            assert!(borrowed(p), "{p}");
            assert_eq!(norm(p).unwrap(), p);
        }
    }

    #[test]
    fn dot_dot_segment_removes_the_previous_segment() {
        assert_eq!(norm("/public/../admin").unwrap(), "/admin");
        assert_eq!(norm("/a/b/../../c").unwrap(), "/c");
        assert_eq!(norm("/a/b/../c/./d").unwrap(), "/a/c/d");
    }

    #[test]
    fn encoded_dots_are_dot_segments() {
        assert_eq!(norm("/public/%2e%2e/admin").unwrap(), "/admin");
        assert_eq!(norm("/public/%2E%2E/admin").unwrap(), "/admin");
        assert_eq!(norm("/a/%2E./x").unwrap(), "/x");
        assert_eq!(norm("/a/.%2e/x").unwrap(), "/x");
        assert_eq!(norm("/a/%2e/x").unwrap(), "/a/x");
    }

    #[test]
    fn encoded_dot_dot_at_the_root_climbs_above_it() {
        assert_eq!(norm("/%2E./x"), Err("path climbs above the root"));
    }

    #[test]
    fn repeated_slashes_are_merged() {
        assert_eq!(norm("/a//b").unwrap(), "/a/b");
        assert_eq!(norm("//a///b//").unwrap(), "/a/b/");
        assert_eq!(norm("//").unwrap(), "/");
        assert_eq!(norm("///").unwrap(), "/");
    }

    #[test]
    fn single_dot_segments_are_removed() {
        assert_eq!(norm("/a/./b").unwrap(), "/a/b");
        assert_eq!(norm("/./a").unwrap(), "/a");
        assert_eq!(norm("/.").unwrap(), "/");
    }

    #[test]
    fn dot_dot_above_the_root_is_an_error() {
        for p in [
            "/..",
            "/../",
            "/../a",
            "/a/../..",
            "/a/../../b",
            "/%2e%2e",
            "/a/%2E%2E/..",
        ] {
            assert_eq!(norm(p), Err("path climbs above the root"), "{p}");
        }
    }

    #[test]
    fn encoded_slash_is_not_a_separator() {
        assert_eq!(norm("/a/%2F..").unwrap(), "/a/%2F..");
        assert_eq!(norm("/a/..%2F/b").unwrap(), "/a/..%2F/b");
        assert_eq!(norm("/a/%2f/../b").unwrap(), "/a/b");
    }

    #[test]
    fn reserved_encodings_are_upper_cased() {
        assert_eq!(norm("/a%2fb").unwrap(), "/a%2Fb");
        assert_eq!(norm("/%3a%3F%c3%a9").unwrap(), "/%3A%3F%C3%A9");
        assert_eq!(norm("/%25").unwrap(), "/%25");
        assert_eq!(norm("/%2541").unwrap(), "/%2541");
    }

    #[test]
    fn unreserved_encodings_are_decoded() {
        assert_eq!(norm("/%7E").unwrap(), "/~");
        assert_eq!(norm("/%7euser").unwrap(), "/~user");
        assert_eq!(norm("/%41").unwrap(), "/A");
        assert_eq!(norm("/%61%30%2D%5F%2E%7e").unwrap(), "/a0-_.~");
    }

    #[test]
    fn invalid_percent_encodings_are_errors() {
        for p in ["/%zz", "/%4", "/%", "/a%", "/%4/", "/%g0", "/%0g", "/%%41"] {
            assert_eq!(norm(p), Err("invalid percent-encoding in path"), "{p}");
        }
    }

    #[test]
    fn nul_is_an_error_encoded_or_raw() {
        assert_eq!(norm("/%00"), Err("NUL in path"));
        assert_eq!(norm("/a/%00/b"), Err("NUL in path"));
        assert_eq!(norm("/a\0b"), Err("NUL in path"));
    }

    #[test]
    fn backslashes_and_dot_segments_with_parameters_are_errors() {
        for bad in [
            "/public\\..\\admin",
            "/a\\b",
            "/public/..;/admin",
            "/public/.;x/y",
            "/public/%2e%2e;/admin",
            "/..;",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
        for ok in ["/a;jsessionid=1/b", "/a/..x;/b", "/a/x..;/b"] {
            assert!(normalize_path(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn trailing_slashes_are_kept() {
        assert_eq!(norm("/a/b/").unwrap(), "/a/b/");
        assert!(borrowed("/a/b/"));
        assert_eq!(norm("/a/.").unwrap(), "/a/");
        assert_eq!(norm("/a/./").unwrap(), "/a/");
        assert_eq!(norm("/a/..").unwrap(), "/");
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
        assert_eq!(norm("/a/b/../").unwrap(), "/a/");
        assert_eq!(norm("/a//").unwrap(), "/a/");
    }

    #[test]
    fn dots_inside_a_segment_are_kept() {
        assert_eq!(norm("/a/..b/./c").unwrap(), "/a/..b/c");
        assert_eq!(norm("/a/b../../c").unwrap(), "/a/c");
        assert_eq!(norm("/a/.../x/").unwrap(), "/a/.../x/");
    }

    #[test]
    fn non_ascii_bytes_pass_through() {
        assert_eq!(norm("/é/./ü").unwrap(), "/é/ü");
    }

    #[test]
    fn path_without_leading_slash_is_an_error() {
        for p in ["", "*", "a/b", "%2F"] {
            assert_eq!(norm(p), Err("path does not start with /"), "{p:?}");
        }
    }

    #[test]
    fn valid_hosts() {
        for h in [
            "example.com",
            "example.com.",
            "example.com.:8080",
            "Shop.Example.COM",
            "a",
            "a-b_c~d.e",
            "xn--bcher-kva.example",
            "127.0.0.1",
            "127.0.0.1:80",
            "localhost:0",
            "localhost:65535",
            "localhost:00080",
            "[::1]",
            "[::1]:8080",
            "[2001:db8::1]",
            "[::ffff:192.0.2.1]:443",
        ] {
            assert_eq!(validate_host(h.as_bytes()), Ok(()), "{h}");
        }
        assert_eq!(validate_host("a".repeat(255).as_bytes()), Ok(()));
    }

    #[test]
    fn empty_host_is_refused() {
        assert_eq!(validate_host(b""), Err("empty host"));
        assert_eq!(validate_host(b":80"), Err("empty host name"));
    }

    #[test]
    fn host_longer_than_255_bytes_is_refused() {
        assert_eq!(
            validate_host("a".repeat(256).as_bytes()),
            Err("host longer than 255 bytes")
        );
    }

    #[test]
    fn host_with_dot_dot_or_leading_dot_is_refused() {
        assert_eq!(validate_host(b"a..b"), Err(".. in host"));
        assert_eq!(validate_host(b"example.com.."), Err(".. in host"));
        assert_eq!(validate_host(b".example.com"), Err("host starts with ."));
        assert_eq!(validate_host(b"."), Err("host starts with ."));
        assert_eq!(validate_host(b".."), Err("host starts with ."));
    }

    #[test]
    fn host_with_a_byte_outside_the_reg_name_set_is_refused() {
        for h in [
            "a b",
            "a/b",
            "a\\b",
            "a,b",
            "user@host",
            "a?b",
            "a#b",
            "a\tb",
            "a\0b",
            "a\rb",
            "a%41",
            "a!b",
            "a]",
            "é.example",
            "a\x7f",
        ] {
            assert_eq!(
                validate_host(h.as_bytes()),
                Err("invalid character in host"),
                "{h:?}"
            );
        }
    }

    #[test]
    fn host_with_a_bad_port_is_refused() {
        assert_eq!(validate_host(b"a:"), Err("empty port in host"));
        assert_eq!(validate_host(b"a:65536"), Err("port above 65535 in host"));
        assert_eq!(validate_host(b"a:99999"), Err("port above 65535 in host"));
        for h in [
            "a:123456", "a:8o", "a:-1", "a:+80", "a:80:80", "a: 80", "[::1]:x",
        ] {
            assert_eq!(
                validate_host(h.as_bytes()),
                Err("invalid port in host"),
                "{h}"
            );
        }
    }

    #[test]
    fn host_with_unbalanced_or_bad_brackets_is_refused() {
        assert_eq!(validate_host(b"[::1"), Err("unbalanced [ in host"));
        assert_eq!(validate_host(b"::1]"), Err("empty host name"));
        assert_eq!(validate_host(b"a]:80"), Err("invalid character in host"));
        assert_eq!(
            validate_host(b"[::1]x"),
            Err("invalid character after ] in host")
        );
        assert_eq!(
            validate_host(b"[::1]]"),
            Err("invalid character after ] in host")
        );
        for h in [
            "[]",
            "[::g]",
            "[1:2]",
            "[v1.x]",
            "[::1%25eth0]",
            "[127.0.0.1]",
            "[a.b]",
        ] {
            assert_eq!(
                validate_host(h.as_bytes()),
                Err("invalid IPv6 address in host"),
                "{h}"
            );
        }
    }

    /// Properties over generated paths: segments from the ones that matter (dots, encoded
    /// dots and slashes, empty segments, bad encodings) mixed with arbitrary text.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn segment() -> impl Strategy<Value = String> {
            prop_oneof![
                Just(String::new()),
                Just(".".to_string()),
                Just("..".to_string()),
                Just("%2e".to_string()),
                Just("%2E%2e".to_string()),
                Just(".%2E".to_string()),
                Just("%2f".to_string()),
                Just("%2F..".to_string()),
                Just("%7e".to_string()),
                Just("%41".to_string()),
                Just("%c3%A9".to_string()),
                Just("%25".to_string()),
                Just("..;x".to_string()),
                Just("%2e;".to_string()),
                Just("a;b".to_string()),
                Just("a\\b".to_string()),
                "[a-zA-Z0-9._~%-]{1,6}",
                "[a-z]{1,4}",
            ]
        }

        fn path() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::collection::vec(segment(), 0..8).prop_map(|s| format!("/{}", s.join("/"))),
                "/[a-zA-Z0-9./%_~-]{0,24}",
            ]
        }

        /// The same rules written the obvious way: split, decode, keep a stack.
        fn model(p: &str) -> Result<String, ()> {
            let mut stack: Vec<String> = Vec::new();
            let parts: Vec<&str> = p[1..].split('/').collect();
            let mut trailing = false;
            for (i, raw) in parts.iter().enumerate() {
                if raw.contains('\\') {
                    return Err(());
                }
                let mut seg = String::new();
                let bytes = raw.as_bytes();
                let mut j = 0;
                while j < bytes.len() {
                    if bytes[j] == b'%' {
                        let hex = raw.get(j + 1..j + 3).ok_or(())?;
                        let v = u8::from_str_radix(hex, 16).map_err(|_| ())?;
                        if v == 0 || hex.starts_with('+') {
                            return Err(());
                        }
                        if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
                            seg.push(v as char);
                        } else {
                            seg.push_str(&format!("%{v:02X}"));
                        }
                        j += 3;
                    } else {
                        seg.push(bytes[j] as char);
                        j += 1;
                    }
                }
                let is_last = i + 1 == parts.len();
                if seg.starts_with(".;") || seg.starts_with("..;") {
                    return Err(());
                }
                match seg.as_str() {
                    "" | "." => trailing = is_last,
                    ".." => {
                        stack.pop().ok_or(())?;
                        trailing = is_last;
                    }
                    _ => {
                        stack.push(seg);
                        trailing = false;
                    }
                }
            }
            let mut out = format!("/{}", stack.join("/"));
            if trailing && !stack.is_empty() {
                out.push('/');
            }
            Ok(out)
        }

        fn has_lowercase_hex_escape(p: &str) -> bool {
            let b = p.as_bytes();
            (0..b.len())
                .any(|i| b[i] == b'%' && b[i + 1..].iter().take(2).any(|c| c.is_ascii_lowercase()))
        }

        fn has_encoded_unreserved(p: &str) -> bool {
            let b = p.as_bytes();
            (0..b.len()).any(|i| {
                b[i] == b'%'
                    && p.get(i + 1..i + 3)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .is_some_and(is_unreserved)
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn normalizing_is_idempotent(p in path()) {
                if let Ok(once) = normalize_path(&p) {
                    let twice = normalize_path(&once).expect("a normalised path normalises");
                    prop_assert_eq!(&*twice, &*once);
                    // And the second pass finds nothing to do.
                    prop_assert!(matches!(twice, Cow::Borrowed(_)));
                }
            }

            #[test]
            fn output_is_in_normal_form(p in path()) {
                if let Ok(n) = normalize_path(&p) {
                    prop_assert!(n.starts_with('/'));
                    prop_assert!(!n.contains("//"), "{}", n);
                    let segments: Vec<&str> = n[1..].split('/').collect();
                    prop_assert!(!segments.contains(&".") && !segments.contains(&".."), "{}", n);
                    prop_assert!(!has_lowercase_hex_escape(&n), "{}", n);
                    prop_assert!(!has_encoded_unreserved(&n), "{}", n);
                    prop_assert!(!n.contains('\0'));
                }
            }

            #[test]
            fn agrees_with_the_stack_model(p in path()) {
                prop_assert_eq!(normalize_path(&p).map(Cow::into_owned).map_err(|_| ()), model(&p), "{}", p);
            }

            /// A path accepted never went above the root at any step (counting decoded
            /// dot segments as a backend would); one refused for climbing did.
            #[test]
            fn never_climbs_above_the_root(p in path()) {
                let depth_ok = {
                    // Depth of each step over the decoded segments, as a client would count.
                    let mut depth: i64 = 0;
                    let mut ok = true;
                    for raw in p[1..].split('/') {
                        let seg = raw.replace("%2e", ".").replace("%2E", ".");
                        match seg.as_str() {
                            "" | "." => {}
                            ".." => { depth -= 1; if depth < 0 { ok = false; } }
                            _ => depth += 1,
                        }
                    }
                    ok
                };
                match normalize_path(&p) {
                    Ok(_) => prop_assert!(depth_ok, "{} climbs above / yet was accepted", p),
                    Err("path climbs above the root") => prop_assert!(!depth_ok, "{}", p),
                    Err(_) => {}
                }
            }

            #[test]
            fn borrowed_exactly_when_unchanged(p in path()) {
                if let Ok(n) = normalize_path(&p) {
                    prop_assert_eq!(matches!(n, Cow::Borrowed(_)), *n == *p, "{}", p);
                }
            }
        }
    }
}
