//! The wire format of nasp's batch property read, the host's
//! `nasp_get_properties` foreign function: several properties in one host
//! call (and one guest allocation) instead of one `proxy_get_property`
//! each. A stats stream reads about ten at its end; each read on its own
//! is a host call, a call back into the guest's allocator and a buffer
//! freed again.
//!
//! Arguments: for each path, its length (u32 little-endian) then its
//! bytes, a path as `proxy_get_property` takes it (segments separated by
//! NUL). Result: for each path in order, the value's length (u32
//! little-endian) then its bytes, or [`ABSENT`] alone for a property the
//! host does not have. A host without the function (Envoy) answers
//! `NOT_FOUND`; the filters then read the properties one by one.

/// The foreign function's name.
pub const FUNCTION: &str = "nasp_get_properties";

/// The length word of a property the host does not have.
pub const ABSENT: u32 = u32::MAX;

/// Most paths one call may carry (the host refuses more).
pub const MAX_PATHS: usize = 64;

/// The arguments naming `paths`.
pub fn encode_paths(paths: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(paths.iter().map(|p| p.len() + 4).sum());
    for p in paths {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// Appends one value of a result (`None`: the property is absent).
pub fn push_value(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        Some(v) => {
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
        None => out.extend_from_slice(&ABSENT.to_le_bytes()),
    }
}

/// Where each of `n` values lies in `result` (`(start, end)`, `None` when
/// absent). `None` when the result does not hold exactly `n` values.
pub fn decode_values(result: &[u8], n: usize) -> Option<Vec<Option<(u32, u32)>>> {
    let mut at = Vec::with_capacity(n);
    let mut pos = 0usize;
    for _ in 0..n {
        let len = u32::from_le_bytes(result.get(pos..pos + 4)?.try_into().ok()?);
        pos += 4;
        if len == ABSENT {
            at.push(None);
            continue;
        }
        let end = pos.checked_add(len as usize)?;
        if end > result.len() {
            return None;
        }
        at.push(Some((pos as u32, end as u32)));
        pos = end;
    }
    (pos == result.len()).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_in_order_with_absent_and_empty() {
        let mut r = Vec::new();
        push_value(&mut r, Some(b"200"));
        push_value(&mut r, None);
        push_value(&mut r, Some(b""));
        push_value(&mut r, Some(b"outbound|80||echo"));
        let at = decode_values(&r, 4).unwrap();
        let got: Vec<Option<&[u8]>> = at
            .iter()
            .map(|s| s.map(|(a, b)| &r[a as usize..b as usize]))
            .collect();
        assert_eq!(
            got,
            [
                Some(&b"200"[..]),
                None,
                Some(&b""[..]),
                Some(&b"outbound|80||echo"[..])
            ]
        );
    }

    #[test]
    fn a_result_of_another_shape_is_refused() {
        let mut r = Vec::new();
        push_value(&mut r, Some(b"abc"));
        push_value(&mut r, None);
        // Fewer, more, truncated, trailing bytes.
        assert!(decode_values(&r, 3).is_none());
        assert!(decode_values(&r, 1).is_none());
        assert!(decode_values(&r[..r.len() - 1], 2).is_none());
        let mut long = r.clone();
        long.push(0);
        assert!(decode_values(&long, 2).is_none());
        // A length past the end.
        assert!(decode_values(&[9, 0, 0, 0, b'x'], 1).is_none());
        assert_eq!(decode_values(&[], 0), Some(vec![]));
    }

    #[test]
    fn paths_are_length_prefixed() {
        assert_eq!(
            encode_paths(&[b"a\0b", b""]),
            [3, 0, 0, 0, b'a', 0, b'b', 0, 0, 0, 0]
        );
    }
}
