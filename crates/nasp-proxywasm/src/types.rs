//! Stream data the host and the embedder share: header maps, bodies,
//! properties and per-stream filter state.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// An ordered multi-map of header names to values, as bytes. Names are
/// compared case-insensitively (HTTP/2 names are lower case on the wire).
///
/// Every name and value lives in one buffer, each entry a pair of ranges
/// into it: a map of n headers is two allocations, not 2n + 1, and a
/// clone copies two vectors. The transport builds, clones and hands over
/// a few maps per stream and direction, so this is most of what a stream
/// through a filter chain allocates. A replaced or removed entry leaves
/// its bytes behind until the map is rebuilt ([`Self::set_all`]) or
/// dropped; a stream's maps live as long as the stream.
#[derive(Clone, Default)]
pub struct HeaderMap {
    buf: Vec<u8>,
    entries: Vec<Entry>,
    /// True from [`Self::mark_untouched`] until the next change.
    untouched: bool,
}

/// Where one entry's name and value are in [`HeaderMap::buf`].
#[derive(Clone, Copy, Debug)]
struct Entry {
    name: (usize, usize),
    value: (usize, usize),
}

impl fmt::Debug for HeaderMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.iter()
                    .map(|(k, v)| (String::from_utf8_lossy(k), String::from_utf8_lossy(v))),
            )
            .finish()
    }
}

impl PartialEq for HeaderMap {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for HeaderMap {}

impl HeaderMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }
    /// An empty map with room for `entries` entries of `bytes` bytes of
    /// names and values in all.
    pub fn with_capacity(entries: usize, bytes: usize) -> Self {
        Self {
            buf: Vec::with_capacity(bytes),
            entries: Vec::with_capacity(entries),
            untouched: false,
        }
    }
    /// Marks the map as it is now: [`Self::is_untouched`] holds until a
    /// value is added, replaced or removed, or the map is replaced. An
    /// embedder that built the map from its own headers can skip comparing
    /// them afterwards when no filter changed it.
    pub fn mark_untouched(&mut self) {
        self.untouched = true;
    }
    /// No change since [`Self::mark_untouched`] (false for a map never
    /// marked).
    pub fn is_untouched(&self) -> bool {
        self.untouched
    }
    /// Builds a map from string pairs.
    pub fn from_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let mut m = Self::default();
        for (k, v) in pairs {
            let e = m.push(k.as_ref(), v.as_ref(), false);
            m.entries.push(e);
        }
        m
    }
    /// Copies a name (lower-cased or as given) and a value into the buffer.
    fn push(&mut self, name: &[u8], value: &[u8], lower: bool) -> Entry {
        let n = self.buf.len();
        self.buf.extend_from_slice(name);
        if lower {
            self.buf[n..].make_ascii_lowercase();
        }
        let v = self.buf.len();
        self.buf.extend_from_slice(value);
        Entry {
            name: (n, name.len()),
            value: (v, value.len()),
        }
    }
    fn name_of(&self, e: &Entry) -> &[u8] {
        &self.buf[e.name.0..e.name.0 + e.name.1]
    }
    fn value_of(&self, e: &Entry) -> &[u8] {
        &self.buf[e.value.0..e.value.0 + e.value.1]
    }
    /// Entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + Clone {
        self.entries
            .iter()
            .map(|e| (self.name_of(e), self.value_of(e)))
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Whether it holds nothing, not even the bytes of removed entries
    /// (`remove` leaves them in the buffer until the map is replaced).
    pub(crate) fn is_unused(&self) -> bool {
        self.entries.is_empty() && self.buf.is_empty()
    }
    /// The first value of `name`.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|e| self.name_of(e).eq_ignore_ascii_case(name))
            .map(|e| self.value_of(e))
    }
    /// The first value of `name` as text (lossy).
    pub fn get_str(&self, name: &str) -> Option<String> {
        self.get(name.as_bytes())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
    /// Appends a value. A pseudo-header (`:name`) goes after the existing
    /// pseudo-headers, before every regular header, as HTTP/2 requires and
    /// Envoy's header map keeps them.
    pub fn add(&mut self, name: &[u8], value: &[u8]) {
        self.untouched = false;
        let entry = self.push(name, value, true);
        if name.first() == Some(&b':') {
            let at = self
                .entries
                .iter()
                .position(|e| self.buf.get(e.name.0) != Some(&b':') || e.name.1 == 0)
                .unwrap_or(self.entries.len());
            self.entries.insert(at, entry);
        } else {
            self.entries.push(entry);
        }
    }
    /// Replaces all values of `name` by one, in the place of the first (or
    /// adds it).
    pub fn replace(&mut self, name: &[u8], value: &[u8]) {
        self.untouched = false;
        match self
            .entries
            .iter()
            .position(|e| self.name_of(e).eq_ignore_ascii_case(name))
        {
            Some(first) => {
                let v = self.buf.len();
                self.buf.extend_from_slice(value);
                self.entries[first].value = (v, value.len());
                let (buf, mut i) = (&self.buf, 0);
                self.entries.retain(|e| {
                    i += 1;
                    i - 1 <= first || !buf[e.name.0..e.name.0 + e.name.1].eq_ignore_ascii_case(name)
                });
            }
            None => self.add(name, value),
        }
    }
    /// Envoy's `byteSize()`: the bytes of every name and value.
    pub fn byte_size(&self) -> usize {
        self.entries.iter().map(|e| e.name.1 + e.value.1).sum()
    }
    /// Removes all values of `name`.
    pub fn remove(&mut self, name: &[u8]) {
        let (buf, before) = (&self.buf, self.entries.len());
        self.entries
            .retain(|e| !buf[e.name.0..e.name.0 + e.name.1].eq_ignore_ascii_case(name));
        // Removing a name that is not there changes nothing (the metadata
        // exchange strips its headers from every request and response).
        if self.entries.len() != before {
            self.untouched = false;
        }
    }
    /// Serialized with the proxy-wasm pairs encoding.
    pub fn serialize(&self) -> Vec<u8> {
        crate::pairs::encode(self.iter())
    }
    /// Replaces the whole map (pseudo-headers moved first, in order).
    pub fn set_all(&mut self, pairs: Vec<(Vec<u8>, Vec<u8>)>) {
        self.untouched = false;
        self.buf.clear();
        self.entries.clear();
        let (pseudo, regular): (Vec<_>, Vec<_>) =
            pairs.iter().partition(|(k, _)| k.first() == Some(&b':'));
        for (k, v) in pseudo.into_iter().chain(regular) {
            let e = self.push(k, v, true);
            self.entries.push(e);
        }
    }
    /// Entries as lossy strings, for display.
    pub fn to_string_pairs(&self) -> Vec<(String, String)> {
        self.iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    }
}

/// A value the embedder exposes as a property, serialized as Envoy does.
#[derive(Clone, Debug, PartialEq)]
pub enum PropertyValue {
    /// Raw bytes (strings, FlatBuffers, serialized messages).
    Bytes(Vec<u8>),
    /// 8-byte little-endian signed integer.
    Int(i64),
    /// 8-byte little-endian unsigned integer.
    Uint(u64),
    /// 8-byte little-endian double.
    Double(f64),
    /// One byte, 0 or 1.
    Bool(bool),
    /// A string map, in the pairs encoding.
    Map(Vec<(String, String)>),
}

impl PropertyValue {
    /// The bytes the guest receives, without copying raw bytes again.
    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            PropertyValue::Bytes(b) => b,
            other => other.serialize(),
        }
    }

    /// Runs `f` over the bytes the guest receives: a number or a flag from
    /// the stack, raw bytes where they are; only a map is encoded first.
    pub fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        match self {
            PropertyValue::Bytes(b) => f(b),
            PropertyValue::Int(i) => f(&i.to_le_bytes()),
            PropertyValue::Uint(u) => f(&u.to_le_bytes()),
            PropertyValue::Double(d) => f(&d.to_le_bytes()),
            PropertyValue::Bool(b) => f(&[u8::from(*b)]),
            PropertyValue::Map(_) => f(&self.serialize()),
        }
    }

    /// Hands the bytes of `value`, if there is one, to `f`
    /// ([`PropertyProvider::with_property_bytes`]'s contract); whether
    /// there was.
    pub fn lend(value: Option<Self>, f: &mut dyn FnMut(&[u8])) -> bool {
        value.map(|v| v.with_bytes(f)).is_some()
    }

    /// The bytes the guest receives, as a new vector (the encodings are
    /// [`Self::with_bytes`]'s).
    pub fn serialize(&self) -> Vec<u8> {
        match self {
            PropertyValue::Map(m) => {
                crate::pairs::encode(m.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
            }
            other => other.with_bytes(<[u8]>::to_vec),
        }
    }
}

impl From<&str> for PropertyValue {
    fn from(s: &str) -> Self {
        PropertyValue::Bytes(s.as_bytes().to_vec())
    }
}

/// Answers `proxy_get_property` for what the embedder knows about a stream
/// (node metadata, addresses, request attributes, peers...). Paths arrive as
/// segments, e.g. `["node", "metadata", "NAMESPACE"]`.
pub trait PropertyProvider: Send + Sync {
    /// The value at `path`, if any.
    fn property(&self, path: &[&str]) -> Option<PropertyValue>;

    /// Hands the bytes of the value at `path` (as the guest receives them,
    /// [`PropertyValue::with_bytes`]) to `f`, once, and says whether there
    /// was one. The host reads properties this way, so a provider that
    /// keeps a value can lend it instead of making a [`PropertyValue`]
    /// (an allocation) per read; it must give the same bytes as
    /// [`Self::property`].
    fn with_property_bytes(&self, path: &[&str], f: &mut dyn FnMut(&[u8])) -> bool {
        PropertyValue::lend(self.property(path), f)
    }
}

/// A provider with no properties.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProperties;

impl PropertyProvider for NoProperties {
    fn property(&self, _path: &[&str]) -> Option<PropertyValue> {
        None
    }
}

/// A provider backed by a map from dotted paths (`node.metadata.NAME`).
#[derive(Debug, Default, Clone)]
pub struct MapProperties(pub HashMap<String, PropertyValue>);

impl PropertyProvider for MapProperties {
    fn property(&self, path: &[&str]) -> Option<PropertyValue> {
        self.0.get(&path.join(".")).cloned()
    }
}

/// A local response a filter sent (`proxy_send_local_response`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status.
    pub status: u32,
    /// Status details.
    pub details: String,
    /// Body.
    pub body: Vec<u8>,
    /// Extra headers.
    pub headers: HeaderMap,
    /// gRPC status, if given (the ABI's -1 means none).
    pub grpc_status: Option<i32>,
}

/// All data of one HTTP exchange or TCP connection. One value is shared by
/// every plugin of a filter chain, so a property one plugin sets is seen by
/// the next.
#[derive(Default)]
pub struct StreamState {
    /// Request headers.
    pub request_headers: HeaderMap,
    /// Buffered request body (the current chunk, or all of it while a filter pauses).
    pub request_body: Vec<u8>,
    /// Request trailers.
    pub request_trailers: HeaderMap,
    /// Response headers.
    pub response_headers: HeaderMap,
    /// Buffered response body.
    pub response_body: Vec<u8>,
    /// Response trailers.
    pub response_trailers: HeaderMap,
    /// TCP data from downstream (current chunk).
    pub downstream_data: Vec<u8>,
    /// TCP data from upstream (current chunk).
    pub upstream_data: Vec<u8>,
    /// Properties set with `proxy_set_property`, by dotted path.
    pub filter_state: HashMap<String, Vec<u8>>,
    /// What the embedder knows.
    pub provider: Option<Arc<dyn PropertyProvider>>,
    /// A local response, once a filter sent one.
    pub local_response: Option<LocalResponse>,
    /// Stream types a filter asked to continue (`proxy_continue_stream`).
    pub continued: Vec<i32>,
    /// Stream types a filter asked to close (`proxy_close_stream`).
    pub closed: Vec<i32>,
}

impl fmt::Debug for StreamState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamState")
            .field("request_headers", &self.request_headers)
            .field("response_headers", &self.response_headers)
            .field("local_response", &self.local_response)
            .finish_non_exhaustive()
    }
}

/// A stream's state, shared by the embedder and every plugin of its chain.
pub type SharedStream = Arc<Mutex<StreamState>>;

#[cfg(test)]
mod tests {
    use super::HeaderMap;

    fn marked() -> HeaderMap {
        let mut m = HeaderMap::from_pairs([("x-a", "1"), ("x-b", "2")]);
        assert!(!m.is_untouched(), "a map never marked counts as changed");
        m.mark_untouched();
        assert!(m.is_untouched());
        m
    }

    #[test]
    fn every_change_clears_the_untouched_mark_and_nothing_else_does() {
        let m = marked();
        let _ = (m.get(b"x-a"), m.len(), m.byte_size(), m.serialize());
        assert!(m.is_untouched(), "reads are not changes");
        assert!(m.clone().is_untouched(), "a copy keeps the mark");
        let mut r = marked();
        r.remove(b"x-absent");
        assert!(r.is_untouched(), "removing a name that is not there");
        for change in [
            (|m: &mut HeaderMap| m.add(b"x-c", b"3")) as fn(&mut HeaderMap),
            |m| m.replace(b"x-a", b"9"),
            |m| m.replace(b"x-new", b"9"),
            |m| m.remove(b"X-B"),
            |m| m.set_all(vec![(b"x-a".to_vec(), b"1".to_vec())]),
        ] {
            let mut m = marked();
            change(&mut m);
            assert!(!m.is_untouched(), "{m:?}");
        }
    }
}
