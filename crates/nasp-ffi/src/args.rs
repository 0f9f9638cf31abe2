//! Reading the caller's pointers. Every pointer an export takes goes
//! through one of these, which check NULL, lengths and UTF-8 and name the
//! argument in the error; none keeps a pointer past the call.

use std::ffi::{CStr, c_char};

use crate::status::{FfiError, NaspStatus, Result};

fn invalid(msg: String) -> FfiError {
    FfiError::new(NaspStatus::InvalidArgument, msg)
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid and
/// unchanged for the call.
pub(crate) unsafe fn cstr<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: not NULL, and the caller guarantees a NUL-terminated string.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|e| invalid(format!("{what} is not UTF-8: {e}")))
}

/// `len` bytes at `p`; `p` may be NULL only when `len` is 0.
///
/// # Safety
/// `p` is NULL or points to `len` readable bytes, valid for the call.
pub(crate) unsafe fn bytes<'a>(p: *const u8, len: usize, what: &str) -> Result<&'a [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL with length {len}")));
    }
    if len > isize::MAX as usize {
        return Err(invalid(format!("{what}: length {len} is too large")));
    }
    // SAFETY: not NULL, the length fits an allocation, and the caller
    // guarantees `len` readable bytes.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// `len` bytes of UTF-8 text at `p` (no NUL needed).
///
/// # Safety
/// As [`bytes`].
pub(crate) unsafe fn text<'a>(p: *const c_char, len: usize, what: &str) -> Result<&'a str> {
    // SAFETY: forwarded from the caller's guarantee.
    let b = unsafe { bytes(p.cast::<u8>(), len, what) }?;
    std::str::from_utf8(b).map_err(|e| invalid(format!("{what} is not UTF-8: {e}")))
}

/// An out-pointer, checked before any work so that nothing is created
/// that could not be handed back.
pub(crate) fn out<T>(p: *mut T, what: &str) -> Result<Out<T>> {
    if p.is_null() {
        Err(invalid(format!("{what} is NULL")))
    } else {
        Ok(Out(p))
    }
}

/// A checked, non-NULL out-pointer.
pub(crate) struct Out<T>(*mut T);

impl<T> Out<T> {
    /// Writes `v` (only on success, by the convention of every export).
    ///
    /// # Safety
    /// The pointer the caller passed is valid for a write of `T`.
    pub(crate) unsafe fn write(self, v: T) {
        // SAFETY: checked non-NULL; validity is the caller's guarantee.
        // `write` does not drop whatever (maybe uninitialised) was there.
        unsafe { self.0.write(v) }
    }
}

/// A timeout argument: 0 means `default`.
pub(crate) fn timeout(ms: u32, default: std::time::Duration) -> std::time::Duration {
    if ms == 0 {
        default
    } else {
        std::time::Duration::from_millis(u64::from(ms))
    }
}
