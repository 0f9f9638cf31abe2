//! Status codes, the per-thread last error, and `ffi_call`, the guard
//! every export runs in: it clears the last error, catches a panic and
//! turns it into [`NaspStatus::Panic`], and records a failure's message.
//! It must never let a panic or a Rust error type cross into C.

use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::panic::AssertUnwindSafe;
use std::sync::LazyLock;

/// The ABI's version; bumped when a signature or a struct changes.
pub const NASP_ABI_VERSION: u32 = 1;

/// What a call did. Codes are stable: new ones are appended, and a caller
/// must treat a code it does not know as an error.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NaspStatus {
    /// Success; the out-pointers were written.
    Ok = 0,
    /// A NULL required pointer, a NULL buffer with a non-zero length,
    /// invalid UTF-8, a malformed method, URL or header, an index out of
    /// range.
    InvalidArgument = 1,
    /// A zero, unknown, freed or other-kind handle.
    InvalidHandle = 2,
    /// The configuration was rejected (the message names the field).
    Config = 3,
    /// The mesh did not get a certificate and a first xDS snapshot in time.
    NotReady = 4,
    /// The mesh was shut down.
    Closed = 5,
    /// The call's timeout passed.
    Timeout = 6,
    /// No connection to the destination.
    Connect = 7,
    /// The request failed without a response.
    Http = 8,
    /// Reading a body failed, or a body was larger than allowed.
    Io = 9,
    /// Called from a thread that is inside a tokio runtime, where blocking
    /// on the mesh's runtime would panic.
    WrongThread = 10,
    /// A bug inside the library, caught at the boundary; the process goes on.
    Panic = 11,
    /// Any other failure inside the library.
    Internal = 12,
}

/// A borrowed view of bytes owned by the library: `len` bytes at `ptr`,
/// followed by a NUL that is not counted. Never freed by the caller; each
/// function returning one says how long it stays valid.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NaspStr {
    /// The first byte (never NULL in a view the library wrote).
    pub ptr: *const c_char,
    /// The number of bytes, without the trailing NUL.
    pub len: usize,
}

impl NaspStr {
    /// A view of `s` (its bytes without the NUL).
    pub(crate) fn of(s: &std::ffi::CStr) -> Self {
        Self {
            ptr: s.as_ptr(),
            len: s.to_bytes().len(),
        }
    }
}

/// A failed call: the status and the message [`nasp_last_error`] returns.
#[derive(Debug)]
pub struct FfiError {
    /// The code returned to C.
    pub status: NaspStatus,
    /// What failed, with which input.
    pub message: String,
}

impl FfiError {
    /// A failure with this status.
    pub fn new(status: NaspStatus, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// The result of a call's body.
pub type Result<T> = std::result::Result<T, FfiError>;

thread_local! {
    static LAST: RefCell<(NaspStatus, String)> = const { RefCell::new((NaspStatus::Ok, String::new())) };
}

fn set_last(status: NaspStatus, message: String) {
    LAST.with(|l| *l.borrow_mut() = (status, message));
}

/// Runs an export's body: clears this thread's last error, catches a panic
/// (→ [`NaspStatus::Panic`], "internal panic: ..."), and records a
/// failure's status and message.
pub(crate) fn ffi_call(f: impl FnOnce() -> Result<()>) -> NaspStatus {
    set_last(NaspStatus::Ok, String::new());
    let (status, message) = match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return NaspStatus::Ok,
        Ok(Err(e)) => (e.status, e.message),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string payload".into());
            (NaspStatus::Panic, format!("internal panic: {what}"))
        }
    };
    set_last(status, message);
    status
}

/// `NASP_ABI_VERSION` of the library actually loaded; a binding compares
/// it with the version it was written for.
///
/// # Ownership
/// Nothing to free.
#[unsafe(no_mangle)]
pub extern "C" fn nasp_abi_version() -> u32 {
    NASP_ABI_VERSION
}

static VERSION: LazyLock<CString> = LazyLock::new(|| {
    let runtimes: Vec<&str> = [
        ("wasmtime", cfg!(feature = "wasmtime")),
        ("wasmi", cfg!(feature = "wasmi")),
        ("wasm3", cfg!(feature = "wasm3")),
    ]
    .into_iter()
    .filter_map(|(n, on)| on.then_some(n))
    .collect();
    CString::new(format!(
        "{} {}",
        env!("CARGO_PKG_VERSION"),
        runtimes.join(",")
    ))
    .expect("invariant: a version and runtime names have no NUL")
});

/// The library's version and the runtimes compiled in, e.g.
/// `"0.1.0 wasmtime,wasmi,wasm3"`, NUL-terminated.
///
/// # Ownership
/// A static string: valid for the life of the process, never freed.
#[unsafe(no_mangle)]
pub extern "C" fn nasp_version() -> *const c_char {
    VERSION.as_ptr()
}

/// Copies the message of this thread's last call (empty if it succeeded)
/// into `buf`, NUL-terminated and cut to `cap - 1` bytes (at a UTF-8
/// character boundary), and returns the message's full length in bytes
/// without the NUL, as `snprintf` does: a return `>= cap` means it was
/// cut. With `buf == NULL` or `cap == 0` nothing is written (ask the
/// length first, then allocate `len + 1`). Does not change the last error.
///
/// # Ownership
/// `buf` is the caller's, written for the call only; nothing to free.
///
/// # Safety
/// `buf` is NULL or points to at least `cap` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nasp_last_error(buf: *mut c_char, cap: usize) -> usize {
    LAST.with(|l| {
        let l = l.borrow();
        let msg = l.1.as_bytes();
        if !buf.is_null() && cap > 0 {
            let mut n = msg.len().min(cap - 1);
            while n > 0 && !l.1.is_char_boundary(n) {
                n -= 1;
            }
            // SAFETY: the caller guarantees `cap` writable bytes at `buf`,
            // and `n + 1 <= cap`; `msg` is our own string, not overlapping.
            unsafe {
                std::ptr::copy_nonoverlapping(msg.as_ptr(), buf.cast::<u8>(), n);
                *buf.add(n) = 0;
            }
        }
        msg.len()
    })
}

/// The status of this thread's last call (other than `nasp_last_error*`).
///
/// # Ownership
/// Nothing to free.
#[unsafe(no_mangle)]
pub extern "C" fn nasp_last_error_status() -> NaspStatus {
    LAST.with(|l| l.borrow().0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let s = ffi_call(|| panic!("boom {}", 7));
        assert_eq!(s, NaspStatus::Panic);
        assert_eq!(nasp_last_error_status(), NaspStatus::Panic);
        let mut buf = [0 as c_char; 64];
        // SAFETY: 64 writable bytes.
        let n = unsafe { nasp_last_error(buf.as_mut_ptr(), buf.len()) };
        // SAFETY: nasp_last_error NUL-terminated it.
        let got = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
        assert_eq!(got.to_str().unwrap(), "internal panic: boom 7");
        assert_eq!(n, got.to_bytes().len());
        // A success clears it.
        assert_eq!(ffi_call(|| Ok(())), NaspStatus::Ok);
        // SAFETY: NULL with cap 0 writes nothing.
        assert_eq!(unsafe { nasp_last_error(std::ptr::null_mut(), 0) }, 0);
    }

    #[test]
    fn the_message_is_cut_at_a_character_boundary() {
        ffi_call(|| Err(FfiError::new(NaspStatus::Config, "aé")));
        let mut buf = [1 as c_char; 3];
        // SAFETY: 3 writable bytes.
        let n = unsafe { nasp_last_error(buf.as_mut_ptr(), buf.len()) };
        assert_eq!(n, 3);
        // "a" then NUL: the two bytes of "é" do not fit with the NUL.
        assert_eq!(buf[..2], [b'a' as c_char, 0]);
    }
}
