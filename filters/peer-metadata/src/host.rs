//! The host calls the filters make per stream, without the SDK's path
//! building (`proxy_wasm::hostcalls` takes paths as `Vec<&str>` and
//! serializes them into another vector on every call). Only on wasm32: the
//! functions are the host's imports.

/// A property by its NUL-separated path. `proxy_get_property` directly,
/// not the SDK's `get_property`: that one builds the path in two vectors
/// per call, and a stats stream reads about fourteen properties.
pub fn property(path: &[u8]) -> Option<Vec<u8>> {
    extern "C" {
        fn proxy_get_property(
            path: *const u8,
            path_len: usize,
            out: *mut *mut u8,
            out_len: *mut usize,
        ) -> u32;
    }
    let mut ptr: *mut u8 = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: `path` is a live slice and both out-pointers point at live
    // locals. On success a non-null `ptr` is a buffer of `len` bytes the
    // host allocated through this module's `proxy_on_memory_allocate`
    // (the SDK's: a `Vec<u8>` of exactly that capacity, forgotten), so
    // taking it back as that `Vec` is what the SDK itself does.
    unsafe {
        if proxy_get_property(path.as_ptr(), path.len(), &mut ptr, &mut len) != 0 || ptr.is_null() {
            return None;
        }
        Some(Vec::from_raw_parts(ptr, len, len))
    }
}

/// An integer property (`i64`, little-endian, as Envoy serializes them).
pub fn property_int(path: &[u8]) -> Option<i64> {
    let v = property(path)?;
    let b: [u8; 8] = v.get(..8)?.try_into().ok()?;
    Some(i64::from_le_bytes(b))
}

/// `proxy_set_property` directly: the SDK's `set_property` builds the path
/// in two vectors per call.
pub fn set_property(path: &[u8], value: &[u8]) {
    extern "C" {
        fn proxy_set_property(
            path: *const u8,
            path_len: usize,
            value: *const u8,
            value_len: usize,
        ) -> u32;
    }
    // SAFETY: both are live slices the host only reads.
    let _ = unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) };
}
