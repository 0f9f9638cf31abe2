//! The TCP `istio-peer-exchange` preamble each side writes first: the magic
//! `0x3D230467` and the length of what follows (both big-endian u32), then
//! a `google.protobuf.Any` holding a `Struct` with
//! `x-envoy-peer-metadata` (a `struct_value`: the node metadata) and
//! `x-envoy-peer-metadata-id` (a `string_value`: the node id), as Istio's
//! `envoy.filters.network.metadata_exchange` writes it.

use crate::pb::{self, Struct, Value};
use crate::{HEADER_ID, HEADER_METADATA};

/// The preamble's magic number.
pub const MAGIC: u32 = 0x3D23_0467;
/// Magic and length.
pub const HEADER_LEN: usize = 8;
/// The largest payload we accept from a peer (Istio's are a few hundred
/// bytes); a larger length is treated as a peer that does not speak the
/// exchange, so a hostile length cannot make us buffer without bound.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// The preamble announcing `id` with `metadata`.
pub fn encode(id: &str, metadata: &Struct) -> Vec<u8> {
    let mut s = Struct::default();
    s.insert(HEADER_METADATA, Value::Struct(metadata.clone()));
    if !id.is_empty() {
        s.insert(HEADER_ID, Value::String(id.to_string()));
    }
    let any = pb::encode_any(pb::STRUCT_TYPE_URL, &s.encode());
    let mut out = Vec::with_capacity(HEADER_LEN + any.len());
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&(any.len() as u32).to_be_bytes());
    out.extend_from_slice(&any);
    out
}

/// What reading the start of a peer's stream found.
#[derive(Debug, PartialEq)]
pub enum Read {
    /// Not enough bytes yet (wait for more).
    NeedMore,
    /// Not a preamble (wrong magic, oversized or undecodable): pass the bytes on as they are.
    Invalid(&'static str),
    /// A preamble of `len` bytes (to strip) with the peer's id and metadata.
    Peer {
        /// Bytes the preamble takes at the start of the stream.
        len: usize,
        /// `x-envoy-peer-metadata-id`, empty when missing.
        id: String,
        /// `x-envoy-peer-metadata`, when present.
        metadata: Option<Struct>,
    },
}

/// Reads the preamble at the start of `buf`.
pub fn read(buf: &[u8]) -> Read {
    let Some(head) = buf.get(..HEADER_LEN) else {
        return Read::NeedMore;
    };
    let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    if magic != MAGIC {
        return Read::Invalid("no istio-peer-exchange magic");
    }
    let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
    if len > MAX_PAYLOAD {
        return Read::Invalid("istio-peer-exchange payload too large");
    }
    let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Read::NeedMore;
    };
    let Some((_url, value)) = pb::decode_any(payload) else {
        return Read::Invalid("istio-peer-exchange payload is not a protobuf Any");
    };
    let Some(s) = Struct::decode(value) else {
        return Read::Invalid("istio-peer-exchange payload is not a protobuf Struct");
    };
    let id = match s.get(HEADER_ID) {
        Some(Value::String(id)) => id.clone(),
        _ => String::new(),
    };
    let metadata = match s.get(HEADER_METADATA) {
        Some(Value::Struct(m)) => Some(m.clone()),
        _ => None,
    };
    Read::Peer {
        len: HEADER_LEN + len,
        id,
        metadata,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn layout_matches_istio() {
        let mut md = Struct::default();
        md.insert("NAMESPACE", Value::String("demo".into()));
        let p = encode("sidecar~1", &md);
        assert_eq!(&p[..4], &[0x3d, 0x23, 0x04, 0x67]);
        let len = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
        assert_eq!(len, p.len() - 8);
        // The payload is an Any(Struct) any protobuf library reads.
        let any = prost_types::Any::decode(&p[8..]).unwrap();
        assert_eq!(any.type_url, "type.googleapis.com/google.protobuf.Struct");
        let s = prost_types::Struct::decode(&any.value[..]).unwrap();
        let keys: Vec<&String> = s.fields.keys().collect();
        assert_eq!(keys, ["x-envoy-peer-metadata", "x-envoy-peer-metadata-id"]);
        assert_eq!(
            read(&p),
            Read::Peer {
                len: p.len(),
                id: "sidecar~1".into(),
                metadata: Some(md)
            }
        );
    }

    #[test]
    fn partial_wrong_and_hostile() {
        let p = encode("id", &Struct::default());
        for cut in 0..p.len() {
            assert_eq!(read(&p[..cut]), Read::NeedMore, "cut {cut}");
        }
        assert!(matches!(read(b"GET / HTTP/1.1\r\n"), Read::Invalid(_)));
        let mut huge = MAGIC.to_be_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(read(&huge), Read::Invalid(_)));
        let mut junk = MAGIC.to_be_bytes().to_vec();
        junk.extend_from_slice(&2u32.to_be_bytes());
        junk.extend_from_slice(&[0x0a, 0xff]);
        assert!(matches!(read(&junk), Read::Invalid(_)));
    }
}
