//! Reading an Envoy config dump (`nasp_xds::read_config_dump`), the JSON that
//! `nasp controlplane --dump` and `nasp xds` load from a file. Besides not
//! panicking, what reads must write back and read again to the same
//! resources (the round trip `nasp xds dump` relies on): writing the
//! resources read back gives the same JSON. And it must resolve into a mesh
//! view.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use nasp_xds::dump::write_config_dump;
use nasp_xds::{MeshView, ViewSettings, read_config_dump};

fuzz_target!(|data: &[u8]| {
    let Ok(json) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(set) = read_config_dump(json) else {
        return;
    };
    let written = match write_config_dump(&set, &HashMap::new()) {
        Ok(w) => w,
        Err(e) => panic!("a dump that reads must write: {e}"),
    };
    let again = match read_config_dump(&written.to_string()) {
        Ok(a) => a,
        Err(e) => panic!("a written dump must read back: {e}\n{written}"),
    };
    // The same resources, by name...
    assert_eq!(keys(&again.clusters), keys(&set.clusters));
    assert_eq!(keys(&again.endpoints), keys(&set.endpoints));
    assert_eq!(keys(&again.routes), keys(&set.routes));
    assert_eq!(keys(&again.listeners), keys(&set.listeners));
    // ...and the same content. Compared as JSON, not as messages: the bytes
    // inside an `Any` are not canonical (map fields, such as the `Struct` an
    // unknown typed config becomes, encode in hash order, so two reads of
    // one dump can differ byte-wise; see docs/fuzzing.md).
    let rewritten = match write_config_dump(&again, &HashMap::new()) {
        Ok(w) => w,
        Err(e) => panic!("a dump read back must write: {e}"),
    };
    assert_eq!(
        rewritten, written,
        "writing and reading again changed the dump"
    );
    let view = MeshView::build(&set, HashMap::new(), ViewSettings::default());
    for name in set.clusters.keys() {
        let _ = view.cluster(name);
    }
    for port in [80, 443, 8080, 15006] {
        let _ = view.inbound(port);
    }
});

fn keys<V>(m: &std::collections::BTreeMap<String, V>) -> Vec<&String> {
    m.keys().collect()
}
