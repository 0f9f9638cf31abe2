//! The proxy-wasm map serialization: `u32 count`, `count × (u32 key_len,
//! u32 value_len)`, then each `key \0 value \0`, all little-endian.
//!
//! Decoding never trusts its input: sizes are checked against the buffer and
//! against the limits the reference host uses (1 MiB, 1024 pairs).

/// Largest serialized map the host accepts from a guest.
pub const MAX_PAIRS_BYTES: usize = 1 << 20;
/// Most pairs the host accepts from a guest.
pub const MAX_PAIRS: usize = 1024;

/// Serializes pairs. An empty map is zero bytes.
pub fn encode<'a>(pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])> + Clone) -> Vec<u8> {
    let items: Vec<(&[u8], &[u8])> = pairs.into_iter().collect();
    if items.is_empty() {
        return Vec::new();
    }
    let data: usize = items.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut out = Vec::with_capacity(4 + items.len() * 8 + data);
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    for (k, v) in &items {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in &items {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Deserializes pairs; `None` on any malformed input.
pub fn decode(buf: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    if buf.is_empty() || buf == [0] {
        return Some(Vec::new());
    }
    if buf.len() > MAX_PAIRS_BYTES || buf.len() < 4 {
        return None;
    }
    let count = u32::from_le_bytes(buf[0..4].try_into().ok()?) as usize;
    if count > MAX_PAIRS {
        return None;
    }
    let mut sizes_at = 4usize;
    let mut data_at = 4usize.checked_add(count.checked_mul(8)?)?;
    if data_at > buf.len() {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let klen = u32::from_le_bytes(buf.get(sizes_at..sizes_at + 4)?.try_into().ok()?) as usize;
        let vlen =
            u32::from_le_bytes(buf.get(sizes_at + 4..sizes_at + 8)?.try_into().ok()?) as usize;
        sizes_at += 8;
        let key = buf.get(data_at..data_at.checked_add(klen)?)?.to_vec();
        data_at = data_at.checked_add(klen)?;
        if *buf.get(data_at)? != 0 {
            return None;
        }
        data_at += 1;
        let value = buf.get(data_at..data_at.checked_add(vlen)?)?.to_vec();
        data_at = data_at.checked_add(vlen)?;
        if *buf.get(data_at)? != 0 {
            return None;
        }
        data_at += 1;
        out.push((key, value));
    }
    // Bytes after the last pair mean the sizes and the data disagree.
    if data_at != buf.len() {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b"1", b"2"), (b":path", b"/a"), (b"", b"")];
        let enc = encode(pairs.clone());
        // The spec's example with its typos fixed: '1' is 0x31 and '2' 0x32.
        assert_eq!(&enc[..4], &3u32.to_le_bytes());
        assert_eq!(enc[28], 0x31);
        let dec = decode(&enc).unwrap();
        assert_eq!(
            dec.iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .collect::<Vec<_>>(),
            pairs
        );
        assert_eq!(encode(Vec::<(&[u8], &[u8])>::new()), Vec::<u8>::new());
        assert_eq!(decode(&[]).unwrap(), vec![]);
        assert_eq!(decode(&[0]).unwrap(), vec![]);
    }

    #[test]
    fn rejects_malformed() {
        assert!(decode(&[1, 0, 0]).is_none());
        assert!(decode(&[1, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0]).is_none());
        assert!(decode(&[0xff, 0xff, 0xff, 0xff]).is_none());
        let mut enc = encode(vec![(&b"a"[..], &b"b"[..])]);
        let last = enc.len() - 1;
        enc[last] = 1; // missing NUL terminator
        assert!(decode(&enc).is_none());
        let mut trailing = encode(vec![(&b"a"[..], &b"b"[..])]);
        trailing.push(0);
        assert!(decode(&trailing).is_none(), "trailing bytes are rejected");
    }
}
