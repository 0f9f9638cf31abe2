//! The host calls the filters make per stream, without the SDK's path
//! building (`proxy_wasm::hostcalls` takes paths as `Vec<&str>` and
//! serializes them into another vector on every call), and [`Batch`]:
//! several properties in one call where the host offers it. Only on
//! wasm32: the functions are the host's imports.

use std::borrow::Cow;

use crate::batch;

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
    le_i64(&property(path)?)
}

/// An integer value as Envoy serializes them (the first 8 bytes, LE).
fn le_i64(v: &[u8]) -> Option<i64> {
    Some(i64::from_le_bytes(v.get(..8)?.try_into().ok()?))
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

/// Properties read together: in one `nasp_get_properties` call
/// ([`batch`]) on nasp, one `proxy_get_property` each on a host without
/// it (Envoy answers `NOT_FOUND` for a foreign function it does not
/// know). Read once, at the start of a callback; the values are what the
/// host had then. Values are asked for by their path's index in the list,
/// so that finding one costs nothing.
pub struct Batch<'p> {
    paths: &'p [&'p [u8]],
    buf: Vec<u8>,
    /// Each path's value in `buf`; empty for a [`Self::lazy`] batch.
    at: Vec<Option<(u32, u32)>>,
}

impl<'p> Batch<'p> {
    /// Reads `paths`; `args` is their [`batch::encode_paths`], built once
    /// by the caller.
    pub fn fetch(paths: &'p [&'p [u8]], args: &[u8]) -> Self {
        if let Some(buf) = call_foreign(batch::FUNCTION, args) {
            if let Some(at) = batch::decode_values(&buf, paths.len()) {
                return Self { paths, buf, at };
            }
            // A result of another shape (a host's function of the same
            // name that is not this one): read one by one.
        }
        let mut buf = Vec::new();
        for p in paths {
            batch::push_value(&mut buf, property(p).as_deref());
        }
        let at = batch::decode_values(&buf, paths.len()).unwrap_or_default();
        Self { paths, buf, at }
    }

    /// Nothing read ahead: [`Self::at`] asks the host for the one path
    /// (for callbacks that need a few of the list's values, not all).
    pub fn lazy(paths: &'p [&'p [u8]]) -> Self {
        Self {
            paths,
            buf: Vec::new(),
            at: Vec::new(),
        }
    }

    /// The value of the `i`-th path (`None` past the list's end).
    pub fn at(&self, i: usize) -> Option<Cow<'_, [u8]>> {
        if self.at.is_empty() {
            return property(self.paths.get(i)?).map(Cow::Owned);
        }
        let (a, b) = (*self.at.get(i)?)?;
        self.buf.get(a as usize..b as usize).map(Cow::Borrowed)
    }

    /// The `i`-th path's value as an integer (as [`property_int`]).
    pub fn int_at(&self, i: usize) -> Option<i64> {
        le_i64(&self.at(i)?)
    }
}

/// `proxy_call_foreign_function`; `None` on any status but OK.
fn call_foreign(name: &str, args: &[u8]) -> Option<Vec<u8>> {
    extern "C" {
        fn proxy_call_foreign_function(
            name: *const u8,
            name_len: usize,
            args: *const u8,
            args_len: usize,
            out: *mut *mut u8,
            out_len: *mut usize,
        ) -> u32;
    }
    let mut ptr: *mut u8 = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: as in `property`: live slices and locals; a non-null `ptr`
    // is a `len`-byte buffer the host allocated through this module's
    // allocator, taken back as the `Vec` it is.
    unsafe {
        let status = proxy_call_foreign_function(
            name.as_ptr(),
            name.len(),
            args.as_ptr(),
            args.len(),
            &mut ptr,
            &mut len,
        );
        if status != 0 {
            return None;
        }
        if ptr.is_null() {
            return Some(Vec::new());
        }
        Some(Vec::from_raw_parts(ptr, len, len))
    }
}
