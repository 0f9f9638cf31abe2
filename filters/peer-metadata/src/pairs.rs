//! The proxy-wasm pairs encoding of a map property (`node.metadata.LABELS`):
//! a u32 LE count, then a u32 LE key and value length per pair, then each
//! key and value followed by a NUL.

/// Decodes a map property; `None` when the bytes are not the encoding.
pub fn decode(buf: &[u8]) -> Option<Vec<(String, String)>> {
    if buf.is_empty() {
        return Some(Vec::new());
    }
    let u32_at = |at: usize| -> Option<usize> {
        let b: [u8; 4] = buf.get(at..at.checked_add(4)?)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(b)).ok()
    };
    let n = u32_at(0)?;
    // Each pair needs 8 length bytes and 2 NULs: a count the buffer cannot
    // hold is malformed (and must not size an allocation).
    if n > buf.len() / 10 {
        return None;
    }
    let mut at = 4 + 8 * n;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (k, v) = (u32_at(4 + 8 * i)?, u32_at(8 + 8 * i)?);
        let key = buf.get(at..at.checked_add(k)?)?;
        at = at + k + 1;
        let value = buf.get(at..at.checked_add(v)?)?;
        at = at + v + 1;
        if at > buf.len() {
            return None;
        }
        out.push((
            String::from_utf8_lossy(key).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    Some(out)
}

/// Encodes pairs (for tests and for filters that set map properties).
pub fn encode(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_malformed() {
        let e = encode(&[("app", "web"), ("version", "")]);
        assert_eq!(
            decode(&e),
            Some(vec![
                ("app".into(), "web".into()),
                ("version".into(), "".into())
            ])
        );
        assert_eq!(decode(&[]), Some(vec![]));
        for cut in 1..e.len() {
            assert_eq!(decode(&e[..cut]), None, "cut at {cut}");
        }
        assert_eq!(decode(&[0xff, 0xff, 0xff, 0xff]), None);
    }
}
