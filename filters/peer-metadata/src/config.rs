//! The few plugin-configuration values the filters read, without a JSON
//! library in the guest: a top-level string setting and the protobuf JSON
//! form of a `Duration`.

use core::time::Duration;

/// The string value of `key` in a JSON object, for settings whose values
/// have no escapes (durations, names). `None` when the key is absent, its
/// value is not a plain string, or the value holds an escape.
pub fn json_string<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let mut from = 0;
    while let Some(i) = json[from..].find(key) {
        let start = from + i;
        from = start + key.len();
        // The key itself, quoted: not a longer key, not inside a value.
        if !json[..start].ends_with('"') || !json[from..].starts_with('"') {
            continue;
        }
        let Some(rest) = json[from + 1..].trim_start().strip_prefix(':') else {
            continue;
        };
        let rest = rest.trim_start().strip_prefix('"')?;
        let end = rest.find('"')?;
        let v = &rest[..end];
        return (!v.contains('\\')).then_some(v);
    }
    None
}

/// A `google.protobuf.Duration` in its JSON form: seconds with up to nine
/// fractional digits and an `s` (`"15s"`, `"0.5s"`, `"1.000340012s"`).
/// `None` for anything else (a sign, units other than `s`, no digits).
pub fn proto_duration(v: &str) -> Option<Duration> {
    let secs = v.strip_suffix('s')?;
    let (whole, frac) = secs.split_once('.').unwrap_or((secs, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) || frac.len() > 9 {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut nanos: u32 = 0;
    for i in 0..9 {
        let d = frac.as_bytes().get(i).map_or(0, |b| u32::from(b - b'0'));
        nanos = nanos * 10 + d;
    }
    Some(Duration::new(whole, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_settings_are_found_by_their_quoted_key() {
        let j = r#"{"a_tcp_reporting_duration": "1s", "x": "tcp_reporting_duration",
                   "tcp_reporting_duration" : "2.5s", "max_peer_cache_size": 10}"#;
        assert_eq!(json_string(j, "tcp_reporting_duration"), Some("2.5s"));
        assert_eq!(json_string(j, "missing"), None);
        // Not a string, or an escape in it.
        assert_eq!(json_string(j, "max_peer_cache_size"), None);
        assert_eq!(json_string(r#"{"k": "a\"b"}"#, "k"), None);
        assert_eq!(json_string("", "k"), None);
        assert_eq!(json_string(r#"{"k": "unterminated"#, "k"), None);
        assert_eq!(json_string(r#"{"k""#, "k"), None);
    }

    #[test]
    fn durations_in_protobuf_json() {
        assert_eq!(proto_duration("15s"), Some(Duration::from_secs(15)));
        assert_eq!(proto_duration("0.5s"), Some(Duration::from_millis(500)));
        assert_eq!(proto_duration(".25s"), Some(Duration::from_millis(250)));
        assert_eq!(
            proto_duration("1.000340012s"),
            Some(Duration::new(1, 340_012))
        );
        assert_eq!(proto_duration("3."), None);
        for bad in [
            "",
            "s",
            ".s",
            "15",
            "15ms",
            "-1s",
            "1.2.3s",
            "1.0000000001s",
            "１s",
        ] {
            assert_eq!(proto_duration(bad), None, "{bad:?}");
        }
        assert_eq!(proto_duration("18446744073709551616s"), None);
    }
}
