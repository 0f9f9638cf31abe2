//! Istio's peer metadata exchange, byte-compatible with Istio sidecars.
//!
//! HTTP (any root id without `tcp`): the request and response headers
//! `x-envoy-peer-metadata-id` (the node id) and `x-envoy-peer-metadata`
//! (base64 of a deterministic `google.protobuf.Struct` of the node
//! metadata). Outbound (`listener_direction` 2) adds ours to the request and
//! takes the peer's from the response; inbound (1) takes the peer's from the
//! request and answers with ours on the response, only when the request
//! carried the peer's (as Istio's filter does). The peer's headers are
//! removed before the application sees them.
//!
//! TCP (a root id containing `tcp`, e.g. `tcp-metadata-exchange`), only on
//! connections whose ALPN is `istio-peer-exchange`: our preamble (magic
//! `0x3D230467`, length, `Any(Struct)`) goes before the first bytes we send;
//! the peer's is read from the start of what it sends, buffered until
//! complete, and stripped.
//!
//! The peer is stored with `proxy_set_property`: `upstream_peer` /
//! `downstream_peer` hold the serialized `Struct` of its node metadata (the
//! header's payload after base64, or the preamble's `x-envoy-peer-metadata`
//! re-serialized deterministically), `upstream_peer_id` /
//! `downstream_peer_id` its node id. On TCP, `nasp_mx_preamble_bytes` (i64
//! LE) says how many bytes our preamble added to the data of the callback
//! that carried it, so a stats filter after this one can leave them out.
//!
//! Invariants: never panics on any input; a header or preamble that does
//! not decode is logged and ignored (the headers are still removed); a
//! missing property means "not known", never an error.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use peer_metadata::host::{property_int, set_property};
use peer_metadata::preamble::{self, Read};
use peer_metadata::{base64, node_struct, path, Struct, WordHash, HEADER_ID, HEADER_METADATA};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

/// ALPN that tells both sides to exchange a preamble.
const PEER_EXCHANGE_ALPN: &[u8] = b"istio-peer-exchange";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// `listener_direction`: Envoy's `TrafficDirection`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Direction {
    /// Neither given: Istio's filter then does both sides' work.
    #[default]
    Unspecified,
    Inbound,
    Outbound,
}

fn direction() -> Direction {
    match property_int(path!("listener_direction")) {
        Some(1) => Direction::Inbound,
        Some(2) => Direction::Outbound,
        _ => Direction::Unspecified,
    }
}

/// What every stream of a plugin shares: computed once in `on_configure`.
#[derive(Debug, Default)]
struct Local {
    direction: Direction,
    id: String,
    metadata: Struct,
    /// `x-envoy-peer-metadata`: base64 of `metadata`.
    header: String,
    /// Peers' headers already checked, with their decoded bytes (`None`:
    /// not base64 of a `Struct`): the same few peers send the same header
    /// on every request, and decoding it was most of this filter's time.
    seen: RefCell<HashMap<Vec<u8>, Option<Rc<[u8]>>, WordHash>>,
    /// Well-formed peers by their `x-envoy-peer-metadata-id`, as Istio's
    /// exchange caches them: a peer seen before is found by its id (tens
    /// of bytes) without hashing and comparing its metadata header
    /// (hundreds), which in an interpreter was most of a stream's cost.
    /// One proxy instance's metadata is fixed for its life; a peer that
    /// sent other metadata under the same id keeps its first until the
    /// cache starts over (Istio's does the same).
    by_id: RefCell<HashMap<Vec<u8>, Rc<[u8]>, WordHash>>,
}

/// How many distinct peer headers [`Local::seen`] keeps before it starts
/// over (Istio's `max_peer_cache_size` is for a cache of the same kind).
const SEEN_MAX: usize = 1024;

impl Local {
    /// The serialized `Struct` a peer's `x-envoy-peer-metadata` carries,
    /// `None` when it is not base64 of one.
    fn decode_header(&self, md: &[u8]) -> Option<Rc<[u8]>> {
        if let Some(hit) = self.seen.borrow().get(md) {
            return hit.clone();
        }
        let raw: Option<Rc<[u8]>> = base64::decode(md)
            .filter(|raw| Struct::decode(raw).is_some())
            .map(Rc::from);
        let mut seen = self.seen.borrow_mut();
        if seen.len() >= SEEN_MAX {
            seen.clear();
        }
        seen.insert(md.to_vec(), raw.clone());
        raw
    }

    /// The peer's serialized `Struct`: by its id when seen before, else
    /// decoded from its header (and remembered by id when well formed).
    fn peer(&self, id: Option<&[u8]>, md: &[u8]) -> Option<Rc<[u8]>> {
        if let Some(hit) = id.and_then(|id| self.by_id.borrow().get(id).cloned()) {
            return Some(hit);
        }
        let raw = self.decode_header(md);
        if let (Some(id), Some(raw)) = (id, &raw) {
            let mut by_id = self.by_id.borrow_mut();
            if by_id.len() >= SEEN_MAX {
                by_id.clear();
            }
            by_id.insert(id.to_vec(), raw.clone());
        }
        raw
    }
}

#[derive(Default)]
struct Root {
    local: Rc<Local>,
    tcp: bool,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let node = |path: Vec<&str>| hostcalls::get_property(path).ok().flatten();
        let metadata = node_struct(|key| node(vec!["node", "metadata", key]));
        let id = node(vec!["node", "id"])
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        let root_id = node(vec!["plugin_root_id"]).unwrap_or_default();
        self.tcp = String::from_utf8_lossy(&root_id).contains("tcp");
        let direction = direction();
        if id.is_empty() {
            log::warn!("metadata-exchange: node.id is not set; peers will not learn our id");
        }
        if direction == Direction::Unspecified {
            log::warn!("metadata-exchange: listener_direction is not 1 or 2; acting on both sides");
        }
        let header = base64::encode(&metadata.encode());
        self.local = Rc::new(Local {
            direction,
            id,
            metadata,
            header,
            seen: RefCell::default(),
            by_id: RefCell::default(),
        });
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(if self.tcp {
            ContextType::StreamContext
        } else {
            ContextType::HttpContext
        })
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            local: self.local.clone(),
            answer: (false, false),
        }))
    }

    fn create_stream_context(&self, _id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Tcp {
            local: self.local.clone(),
            own: Side::Pending,
            peer: Side::Pending,
            exchange: None,
        }))
    }
}

/// Which peer a header names.
#[derive(Clone, Copy)]
enum PeerSide {
    Downstream,
    Upstream,
}

/// Stores the peer under `<side>_peer_id` / `<side>_peer` when its header
/// decodes; returns whether the metadata was well formed.
fn store_peer(local: &Local, side: PeerSide, id: Option<&[u8]>, metadata: Option<&[u8]>) -> bool {
    let (id_key, peer_key, side) = match side {
        PeerSide::Downstream => ("downstream_peer_id", "downstream_peer", "downstream"),
        PeerSide::Upstream => ("upstream_peer_id", "upstream_peer", "upstream"),
    };
    if let Some(id) = id {
        set_property(id_key.as_bytes(), id);
    }
    let Some(md) = metadata else { return false };
    match local.peer(id, md) {
        Some(raw) => {
            set_property(peer_key.as_bytes(), &raw);
            true
        }
        None => {
            log::warn!(
                "metadata-exchange: {side} {HEADER_METADATA} is not base64 of a protobuf Struct; ignored"
            );
            false
        }
    }
}

struct Http {
    local: Rc<Local>,
    /// Inbound: whether to answer with our metadata and our id, decided
    /// on the request (a peer that sent its own gets ours).
    answer: (bool, bool),
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let id = self
            .get_http_request_header_bytes(HEADER_ID)
            .filter(|v| !v.is_empty());
        let md = self
            .get_http_request_header_bytes(HEADER_METADATA)
            .filter(|v| !v.is_empty());
        if id.is_some() {
            self.remove_http_request_header(HEADER_ID);
        }
        if md.is_some() {
            self.remove_http_request_header(HEADER_METADATA);
        }
        let received = store_peer(
            &self.local,
            PeerSide::Downstream,
            id.as_deref(),
            md.as_deref(),
        );
        let l = &self.local;
        if l.direction != Direction::Inbound {
            self.set_http_request_header(HEADER_METADATA, Some(&l.header));
            if !l.id.is_empty() {
                self.set_http_request_header(HEADER_ID, Some(&l.id));
            }
        } else if received || id.is_some() {
            // Remember for the response: Istio answers only a peer that sent
            // its metadata (and its id only to a peer that sent one).
            self.answer = (received, id.is_some());
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let id = self
            .get_http_response_header_bytes(HEADER_ID)
            .filter(|v| !v.is_empty());
        let md = self
            .get_http_response_header_bytes(HEADER_METADATA)
            .filter(|v| !v.is_empty());
        if id.is_some() {
            self.remove_http_response_header(HEADER_ID);
        }
        if md.is_some() {
            self.remove_http_response_header(HEADER_METADATA);
        }
        store_peer(
            &self.local,
            PeerSide::Upstream,
            id.as_deref(),
            md.as_deref(),
        );
        let l = &self.local;
        if l.direction != Direction::Outbound {
            let (metadata, id) = self.answer;
            if metadata {
                self.set_http_response_header(HEADER_METADATA, Some(&l.header));
            }
            if id && !l.id.is_empty() {
                self.set_http_response_header(HEADER_ID, Some(&l.id));
            }
        }
        Action::Continue
    }
}

/// Where one direction of the TCP exchange stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    /// Nothing sent / read yet.
    Pending,
    /// Sent / read, or given up: data passes untouched from now on.
    Done,
}

struct Tcp {
    local: Rc<Local>,
    /// Our preamble (before the first bytes we send).
    own: Side,
    /// The peer's preamble (at the start of what it sends).
    peer: Side,
    /// Whether the connection negotiated `istio-peer-exchange` (read once).
    exchange: Option<bool>,
}

impl Tcp {
    /// Outbound the peer is upstream; inbound (and unspecified) downstream.
    fn peer_is_upstream(&self) -> bool {
        self.local.direction == Direction::Outbound
    }

    fn exchange(&mut self) -> bool {
        *self.exchange.get_or_insert_with(|| {
            let path = if self.local.direction == Direction::Outbound {
                vec!["upstream", "negotiated_protocol"]
            } else {
                vec!["connection", "negotiated_protocol"]
            };
            let alpn = hostcalls::get_property(path).ok().flatten();
            let yes = alpn.as_deref() == Some(PEER_EXCHANGE_ALPN);
            if !yes {
                log::debug!("metadata-exchange: ALPN is not istio-peer-exchange; no exchange");
            }
            yes
        })
    }

    /// Our side's data: our preamble goes first.
    fn own_data(&mut self, upstream: bool) -> Action {
        if self.own == Side::Done {
            return Action::Continue;
        }
        self.own = Side::Done;
        if !self.exchange() {
            return Action::Continue;
        }
        let p = preamble::encode(&self.local.id, &self.local.metadata);
        if upstream {
            self.set_upstream_data(0, 0, &p);
        } else {
            self.set_downstream_data(0, 0, &p);
        }
        let _ = hostcalls::set_property(
            vec!["nasp_mx_preamble_bytes"],
            Some(&(p.len() as i64).to_le_bytes()),
        );
        Action::Continue
    }

    /// The peer's data: read and strip its preamble.
    fn peer_data(&mut self, upstream: bool, size: usize, eos: bool) -> Action {
        if self.peer == Side::Done {
            return Action::Continue;
        }
        if !self.exchange() {
            self.peer = Side::Done;
            return Action::Continue;
        }
        let data = if upstream {
            self.get_upstream_data(0, size)
        } else {
            self.get_downstream_data(0, size)
        }
        .unwrap_or_default();
        match preamble::read(&data) {
            Read::NeedMore if !eos => Action::Pause,
            Read::NeedMore => {
                log::debug!("metadata-exchange: the peer closed before its preamble ended");
                self.peer = Side::Done;
                Action::Continue
            }
            Read::Invalid(why) => {
                log::warn!("metadata-exchange: {why}; the peer's bytes pass unchanged");
                self.peer = Side::Done;
                Action::Continue
            }
            Read::Peer { len, id, metadata } => {
                self.peer = Side::Done;
                let side = if upstream { "upstream" } else { "downstream" };
                if !id.is_empty() {
                    let _ = hostcalls::set_property(
                        vec![&format!("{side}_peer_id")],
                        Some(id.as_bytes()),
                    );
                }
                if let Some(md) = metadata {
                    let _ =
                        hostcalls::set_property(vec![&format!("{side}_peer")], Some(&md.encode()));
                }
                if upstream {
                    self.set_upstream_data(0, len, &[]);
                } else {
                    self.set_downstream_data(0, len, &[]);
                }
                Action::Continue
            }
        }
    }
}

impl Context for Tcp {}

impl StreamContext for Tcp {
    fn on_downstream_data(&mut self, size: usize, eos: bool) -> Action {
        if self.peer_is_upstream() {
            self.own_data(false)
        } else {
            self.peer_data(false, size, eos)
        }
    }

    fn on_upstream_data(&mut self, size: usize, eos: bool) -> Action {
        if self.peer_is_upstream() {
            self.peer_data(true, size, eos)
        } else {
            self.own_data(true)
        }
    }
}
