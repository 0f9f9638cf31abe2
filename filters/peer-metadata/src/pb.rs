//! `google.protobuf.Struct`, `Value`, `ListValue` and `Any` in the protobuf
//! binary encoding, written as Istio's sidecars write them
//! (`serializeToStringDeterministic`: map entries sorted by key, every map
//! entry with both its key and its value, a set `oneof` member written even
//! when it is the default) and read leniently (unknown fields skipped, map
//! entries in any order, a repeated key keeps the last value, as protobuf's
//! parsers do).
//!
//! Field numbers: `Struct.fields = 1` (map entry: `key = 1`, `value = 2`);
//! `Value`: `null_value = 1` (varint), `number_value = 2` (fixed64),
//! `string_value = 3`, `bool_value = 4` (varint), `struct_value = 5`,
//! `list_value = 6`; `ListValue.values = 1`; `Any`: `type_url = 1`,
//! `value = 2`.

use crate::MAX_DEPTH;

/// The type URL of a `Struct` packed in an `Any`.
pub const STRUCT_TYPE_URL: &str = "type.googleapis.com/google.protobuf.Struct";

/// A `google.protobuf.Value`.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `null_value`.
    Null,
    /// `number_value`.
    Number(f64),
    /// `string_value`.
    String(String),
    /// `bool_value`.
    Bool(bool),
    /// `struct_value`.
    Struct(Struct),
    /// `list_value`.
    List(Vec<Value>),
}

/// A `google.protobuf.Struct`: fields kept sorted by key (the deterministic
/// order) and unique.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Struct {
    /// `(key, value)`, sorted by key bytes.
    pub fields: Vec<(String, Value)>,
}

impl Struct {
    /// Sets `key` (replacing an earlier value).
    pub fn insert(&mut self, key: &str, value: Value) {
        match self
            .fields
            .binary_search_by(|(k, _)| k.as_bytes().cmp(key.as_bytes()))
        {
            Ok(i) => self.fields[i].1 = value,
            Err(i) => self.fields.insert(i, (key.to_string(), value)),
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields
            .binary_search_by(|(k, _)| k.as_bytes().cmp(key.as_bytes()))
            .ok()
            .map(|i| &self.fields[i].1)
    }

    /// The serialized `Struct`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        for (k, v) in &self.fields {
            let mut entry = Vec::with_capacity(k.len() + 16);
            bytes_field(&mut entry, 1, k.as_bytes());
            let mut value = Vec::new();
            v.encode_into(&mut value);
            bytes_field(&mut entry, 2, &value);
            bytes_field(out, 1, &entry);
        }
    }

    /// Parses a serialized `Struct`.
    pub fn decode(buf: &[u8]) -> Option<Self> {
        Self::decode_at(buf, 0)
    }

    fn decode_at(buf: &[u8], depth: usize) -> Option<Self> {
        if depth > MAX_DEPTH {
            return None;
        }
        let mut s = Struct::default();
        let mut r = Reader(buf);
        while let Some((field, wire)) = r.tag()? {
            match (field, wire) {
                (1, LEN) => {
                    let mut e = Reader(r.bytes()?);
                    let mut key = String::new();
                    let mut value = Value::Null;
                    while let Some((f, w)) = e.tag()? {
                        match (f, w) {
                            (1, LEN) => key = String::from_utf8(e.bytes()?.to_vec()).ok()?,
                            (2, LEN) => value = Value::decode_at(e.bytes()?, depth + 1)?,
                            (_, w) => e.skip(w)?,
                        }
                    }
                    s.insert(&key, value);
                }
                (_, w) => r.skip(w)?,
            }
        }
        Some(s)
    }
}

impl Value {
    fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Value::Null => {
                out.push(1 << 3);
                out.push(0);
            }
            Value::Number(n) => {
                out.push((2 << 3) | 1);
                out.extend_from_slice(&n.to_le_bytes());
            }
            Value::String(s) => bytes_field(out, 3, s.as_bytes()),
            Value::Bool(b) => {
                out.push(4 << 3);
                out.push(u8::from(*b));
            }
            Value::Struct(s) => {
                let mut inner = Vec::new();
                s.encode_into(&mut inner);
                bytes_field(out, 5, &inner);
            }
            Value::List(items) => {
                let mut inner = Vec::new();
                for v in items {
                    let mut one = Vec::new();
                    v.encode_into(&mut one);
                    bytes_field(&mut inner, 1, &one);
                }
                bytes_field(out, 6, &inner);
            }
        }
    }

    fn decode_at(buf: &[u8], depth: usize) -> Option<Self> {
        if depth > MAX_DEPTH {
            return None;
        }
        let mut r = Reader(buf);
        // A Value with no member set is, for our purposes, null.
        let mut v = Value::Null;
        while let Some((field, wire)) = r.tag()? {
            v = match (field, wire) {
                (1, VARINT) => {
                    r.varint()?;
                    Value::Null
                }
                (2, I64) => Value::Number(f64::from_le_bytes(r.fixed64()?)),
                (3, LEN) => Value::String(String::from_utf8(r.bytes()?.to_vec()).ok()?),
                (4, VARINT) => Value::Bool(r.varint()? != 0),
                (5, LEN) => Value::Struct(Struct::decode_at(r.bytes()?, depth + 1)?),
                (6, LEN) => {
                    let mut l = Reader(r.bytes()?);
                    let mut items = Vec::new();
                    while let Some((f, w)) = l.tag()? {
                        match (f, w) {
                            (1, LEN) => items.push(Value::decode_at(l.bytes()?, depth + 1)?),
                            (_, w) => l.skip(w)?,
                        }
                    }
                    Value::List(items)
                }
                (_, w) => {
                    r.skip(w)?;
                    continue;
                }
            };
        }
        Some(v)
    }
}

/// A serialized `google.protobuf.Any`.
pub fn encode_any(type_url: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(type_url.len() + value.len() + 8);
    bytes_field(&mut out, 1, type_url.as_bytes());
    bytes_field(&mut out, 2, value);
    out
}

/// The `(type_url, value)` of a serialized `google.protobuf.Any`.
pub fn decode_any(buf: &[u8]) -> Option<(String, &[u8])> {
    let mut r = Reader(buf);
    let mut url = String::new();
    let mut value: &[u8] = &[];
    while let Some((field, wire)) = r.tag()? {
        match (field, wire) {
            (1, LEN) => url = String::from_utf8(r.bytes()?.to_vec()).ok()?,
            (2, LEN) => value = r.bytes()?,
            (_, w) => r.skip(w)?,
        }
    }
    Some((url, value))
}

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    varint(out, u64::from(field) << 3 | u64::from(LEN));
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// A cursor over protobuf bytes; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    /// The next `(field, wire type)`, `Some(None)` at the end, `None` on
    /// malformed input.
    fn tag(&mut self) -> Option<Option<(u64, u8)>> {
        if self.0.is_empty() {
            return Some(None);
        }
        let t = self.varint()?;
        let field = t >> 3;
        if field == 0 {
            return None;
        }
        Some(Some((field, (t & 7) as u8)))
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.varint()?).ok()?;
        self.take(n)
    }

    fn fixed64(&mut self) -> Option<[u8; 8]> {
        self.take(8)?.try_into().ok()
    }

    fn skip(&mut self, wire: u8) -> Option<()> {
        match wire {
            VARINT => self.varint().map(drop),
            I64 => self.take(8).map(drop),
            LEN => self.bytes().map(drop),
            I32 => self.take(4).map(drop),
            // Groups (3, 4) are not used by these messages.
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn pv(kind: prost_types::value::Kind) -> prost_types::Value {
        prost_types::Value { kind: Some(kind) }
    }

    /// The node metadata of the Istio 1.13 sidecar in the real config dump
    /// (`data/istio-config-dumps/config_v0.json`), as its metadata exchange
    /// sends it.
    fn dump_node() -> Struct {
        let mut labels = Struct::default();
        for (k, v) in [
            ("service.istio.io/canonical-revision", "v1"),
            ("topology.istio.io/network", "network1"),
            ("istio.io/rev", "cp-v113x.istio-system"),
            ("version", "v1"),
            ("service.istio.io/canonical-name", "catalog"),
            ("security.istio.io/tlsMode", "istio"),
            ("app", "catalog"),
            ("pod-template-hash", "6578575465"),
        ] {
            labels.insert(k, Value::String(v.into()));
        }
        let mut s = Struct::default();
        for (k, v) in [
            ("NAME", "catalog-v1-6578575465-lz5h2"),
            ("NAMESPACE", "demo"),
            (
                "OWNER",
                "kubernetes://apis/apps/v1/namespaces/demo/deployments/catalog-v1",
            ),
            ("WORKLOAD_NAME", "catalog-v1"),
            ("ISTIO_VERSION", "1.13.5"),
            ("MESH_ID", "mesh1"),
            ("CLUSTER_ID", "waynz0r-0626-01"),
            ("APP_CONTAINERS", "catalog"),
            ("INSTANCE_IPS", "10.20.160.34,fe80::84cb:9eff:feb7:941b"),
        ] {
            s.insert(k, Value::String(v.into()));
        }
        s.insert("LABELS", Value::Struct(labels));
        s
    }

    fn to_prost(s: &Struct) -> prost_types::Struct {
        use prost_types::value::Kind;
        fn v(x: &Value) -> prost_types::Value {
            pv(match x {
                Value::Null => Kind::NullValue(0),
                Value::Number(n) => Kind::NumberValue(*n),
                Value::String(s) => Kind::StringValue(s.clone()),
                Value::Bool(b) => Kind::BoolValue(*b),
                Value::Struct(s) => Kind::StructValue(to_prost(s)),
                Value::List(l) => Kind::ListValue(prost_types::ListValue {
                    values: l.iter().map(v).collect(),
                }),
            })
        }
        prost_types::Struct {
            fields: s.fields.iter().map(|(k, x)| (k.clone(), v(x))).collect(),
        }
    }

    #[test]
    fn struct_bytes_match_a_protobuf_library() {
        // prost keeps Struct fields in a BTreeMap, so its encoding is the
        // deterministic (key-sorted) one Istio's sidecars write.
        let ours = dump_node();
        assert_eq!(ours.encode(), to_prost(&ours).encode_to_vec());
        let mut all = Struct::default();
        all.insert("n", Value::Null);
        all.insert("x", Value::Number(1.5));
        all.insert("b", Value::Bool(false));
        all.insert("e", Value::String(String::new()));
        all.insert("s", Value::Struct(Struct::default()));
        all.insert(
            "l",
            Value::List(vec![Value::String("a".into()), Value::Bool(true)]),
        );
        assert_eq!(all.encode(), to_prost(&all).encode_to_vec());
        assert_eq!(Struct::decode(&all.encode()), Some(all));
    }

    #[test]
    fn decodes_what_a_protobuf_library_writes() {
        let ours = dump_node();
        let bytes = to_prost(&ours).encode_to_vec();
        assert_eq!(Struct::decode(&bytes), Some(ours));
    }

    #[test]
    fn small_struct_by_hand() {
        // {"NAME": "a"}: entry (1, LEN 11) { key (1, LEN 4) "NAME",
        // value (2, LEN 3) { string_value (3, LEN 1) "a" } }.
        let mut s = Struct::default();
        s.insert("NAME", Value::String("a".into()));
        let want = [
            0x0a, 0x0b, 0x0a, 0x04, b'N', b'A', b'M', b'E', 0x12, 0x03, 0x1a, 0x01, b'a',
        ];
        assert_eq!(s.encode(), want);
        assert_eq!(crate::base64::encode(&want), "CgsKBE5BTUUSAxoBYQ==");
    }

    #[test]
    fn any_matches_a_protobuf_library() {
        let value = dump_node().encode();
        let any = prost_types::Any {
            type_url: STRUCT_TYPE_URL.into(),
            value: value.clone(),
        };
        assert_eq!(encode_any(STRUCT_TYPE_URL, &value), any.encode_to_vec());
        let bytes = any.encode_to_vec();
        let (url, v) = decode_any(&bytes).unwrap();
        assert_eq!((url.as_str(), v), (STRUCT_TYPE_URL, &value[..]));
    }

    #[test]
    fn garbage_never_panics() {
        let good = dump_node().encode();
        for cut in 0..good.len() {
            let _ = Struct::decode(&good[..cut]);
        }
        for b in 0..=255u8 {
            let mut bad = good.clone();
            bad[good.len() / 2] = b;
            let _ = Struct::decode(&bad);
        }
        assert_eq!(Struct::decode(&[0x0a, 0xff]), None);
        assert_eq!(Struct::decode(&[0x00]), None);
        // Nesting deeper than MAX_DEPTH is refused, not recursed into.
        let mut deep = Struct::default();
        for _ in 0..40 {
            let mut outer = Struct::default();
            outer.insert("a", Value::Struct(deep));
            deep = outer;
        }
        assert_eq!(Struct::decode(&deep.encode()), None);
    }
}
