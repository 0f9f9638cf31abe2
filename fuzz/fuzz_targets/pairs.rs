//! The proxy-wasm pairs decoder (`nasp_proxywasm::pairs`), which reads maps a
//! guest hands the host (`proxy_set_header_map_pairs`, `proxy_http_call`,
//! `proxy_send_local_response`...). Besides not panicking, a map that decodes
//! must survive a round trip: encoding the pairs and decoding them again
//! gives the same pairs, within the decoder's limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nasp_proxywasm::HeaderMap;
use nasp_proxywasm::pairs::{self, MAX_PAIRS, MAX_PAIRS_BYTES};

fuzz_target!(|data: &[u8]| {
    let Some(decoded) = pairs::decode(data) else {
        return;
    };
    assert!(decoded.len() <= MAX_PAIRS);
    assert!(data.len() <= MAX_PAIRS_BYTES);
    let encoded = pairs::encode(decoded.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
    assert!(
        encoded.len() <= data.len().max(1),
        "re-encoding grew the map"
    );
    assert_eq!(pairs::decode(&encoded).as_ref(), Some(&decoded));
    // The header map the host builds from it holds the same pairs, names in
    // lower case (its order is the map's own policy: pseudo-headers first).
    let mut lowered: Vec<(Vec<u8>, Vec<u8>)> = decoded
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    let mut map = HeaderMap::new();
    map.set_all(decoded);
    let Some(mut from_map) = pairs::decode(&map.serialize()) else {
        panic!("a header map serialized to pairs that do not decode");
    };
    lowered.sort();
    from_map.sort();
    assert_eq!(from_map, lowered);
});
