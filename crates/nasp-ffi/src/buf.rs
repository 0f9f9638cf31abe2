//! `NaspBuf`: an owned snapshot of bytes (metrics text, a whole body) that
//! C reads through a borrowed view and frees once. The bytes are followed
//! by a NUL (not counted) so text can be used as a C string.

use std::sync::Arc;

use crate::args;
use crate::registry::{self, Kind, Object};
use crate::status::{NaspStatus, ffi_call};

/// A handle to an owned byte buffer; `id == 0` is "no handle".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NaspBuf {
    /// The registry id.
    pub id: u64,
}

/// The bytes behind a `NaspBuf`, with a NUL after them.
pub(crate) struct BufState {
    bytes: Vec<u8>,
}

impl BufState {
    pub(crate) fn new(mut bytes: Vec<u8>) -> Self {
        bytes.push(0);
        Self { bytes }
    }
}

/// Registers `bytes` as a new buffer handle.
pub(crate) fn new_buf(bytes: Vec<u8>) -> NaspBuf {
    NaspBuf {
        id: registry::insert(Kind::Buf, Object::Buf(Arc::new(BufState::new(bytes))), 0),
    }
}

/// A view of the buffer's bytes: `*ptr` gets the first byte (followed by a
/// NUL, not counted), `*len` the count.
///
/// # Ownership
/// The view is borrowed from `b`: valid until `nasp_buf_free(b)`; never
/// freed by the caller. A buffer belongs to no mesh and outlives it.
///
/// # Errors
/// `INVALID_ARGUMENT` (NULL `ptr` or `len`), `INVALID_HANDLE`.
///
/// # Safety
/// `ptr` and `len` are NULL or valid for one write each.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_buf_data(
    b: NaspBuf,
    ptr: *mut *const u8,
    len: *mut usize,
) -> NaspStatus {
    ffi_call(|| {
        let (ptr, len) = (args::out(ptr, "ptr")?, args::out(len, "len")?);
        let state = registry::buf(b.id)?;
        // The view points into the registry's copy (the `Arc` we cloned
        // is dropped here, the registry's keeps the bytes alive).
        let (p, n) = (state.bytes.as_ptr(), state.bytes.len() - 1);
        // SAFETY: checked non-NULL out-pointers, the caller's guarantee.
        unsafe {
            ptr.write(p);
            len.write(n);
        }
        Ok(())
    })
}

/// Frees a buffer.
///
/// # Ownership
/// `b` and every view of it are invalid afterwards.
///
/// # Errors
/// `INVALID_HANDLE` (zero, unknown, already freed: a double free is
/// reported, not undefined).
#[unsafe(no_mangle)]
pub extern "C" fn nasp_buf_free(b: NaspBuf) -> NaspStatus {
    ffi_call(|| registry::remove(b.id, Kind::Buf).map(drop))
}
