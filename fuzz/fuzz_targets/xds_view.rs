//! xDS resources as they arrive from a control plane (protobuf `Any`s in a
//! discovery response), decoded and validated (`nasp_xds::types::decode`),
//! applied to a resource set and resolved into the mesh view
//! (`MeshView::build`), then looked up. Nothing a control plane sends may
//! panic the client.
//!
//! Input: a sequence of records, each a tag byte and its payload:
//! - `tag % 8` in 0..=3: a CDS/EDS/LDS/RDS resource, `u16` LE length, bytes;
//! - 4: the same under a type URL that does not match the response's;
//! - 5: an NDS name, `u8` length, host, `u8` count (at most 4), IPv4s;
//! - 6: an outbound lookup and, for an HTTP destination, the route of one
//!   request: `u16` LE port, then host, `:path` and one header's name and
//!   value, each a `u8` length and bytes;
//! - 7: an inbound lookup, `u16` LE port.
//! `fuzz/examples/seeds.rs` writes seeds in this format from real dumps.
#![no_main]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use nasp_xds::envoy_types::pb::google::protobuf::Any;
use nasp_xds::types::{RESOURCE_TYPES, decode, insert};
use nasp_xds::{MeshView, Outbound, ResourceSet, ViewSettings};

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn text(&mut self) -> Option<String> {
        let n = self.u8()?;
        Some(String::from_utf8_lossy(self.bytes(usize::from(n))).into_owned())
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b
    }
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader(data);
    let mut set = ResourceSet::default();
    let mut names: HashMap<String, Vec<IpAddr>> = HashMap::new();
    let mut outbound = Vec::new();
    let mut inbound = Vec::new();
    while let Some(tag) = r.u8() {
        match tag % 8 {
            t @ 0..=4 => {
                let Some(len) = r.u16() else { break };
                let value = r.bytes(usize::from(len)).to_vec();
                let type_url = RESOURCE_TYPES[usize::from(t % 4)];
                let sent_as = if t == 4 {
                    RESOURCE_TYPES[usize::from(tag / 8 % 4)]
                } else {
                    type_url
                };
                let any = Any {
                    type_url: sent_as.to_string(),
                    value,
                };
                match decode(type_url, &any) {
                    Ok(d) => {
                        assert_eq!(sent_as, type_url, "a mismatched type URL was accepted");
                        assert!(
                            !d.name().is_empty(),
                            "a resource without a name was accepted"
                        );
                        insert(&mut set, d);
                    }
                    Err(e) => {
                        let _ = e.to_string();
                    }
                }
            }
            5 => {
                let Some(len) = r.u8() else { break };
                let host = String::from_utf8_lossy(r.bytes(usize::from(len))).into_owned();
                let Some(count) = r.u8() else { break };
                let ips = (0..count % 5)
                    .filter_map(|_| {
                        let b = r.bytes(4);
                        (b.len() == 4).then(|| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
                    })
                    .collect();
                names.insert(host, ips);
            }
            6 => {
                let Some(port) = r.u16() else { break };
                let Some(host) = r.text() else { break };
                let path = r.text().unwrap_or_else(|| "/".into());
                let header = (r.text().unwrap_or_default(), r.text().unwrap_or_default());
                outbound.push((host, port, path, header));
            }
            _ => {
                let Some(port) = r.u16() else { break };
                inbound.push(port);
            }
        }
    }
    let view = MeshView::build(&set, names, ViewSettings::default());
    for (host, port, path, (name, value)) in &outbound {
        let Some(o) = view.outbound(host, *port) else {
            continue;
        };
        let _ = view.plain_cluster(&o);
        if let Outbound::Http(dest) = &o {
            let headers = [(name.as_str(), value.as_str())];
            let _ = view.route(dest, path, &headers[..], u64::from(*port));
        }
    }
    for port in &inbound {
        let _ = view.inbound(*port);
    }
    for name in set.clusters.keys() {
        let _ = view.cluster(name);
    }
    let _ = view.counts();
});
