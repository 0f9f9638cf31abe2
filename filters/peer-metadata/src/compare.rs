//! `memcmp` for the filters, eight bytes at a time.
//!
//! The C library of `wasm32-wasip1` compares one byte per loop turn, and
//! Rust's `==` on strings and slices calls it: the stats filter's label-set,
//! cluster and peer-id lookups compare a few hundred bytes per stream, and
//! that loop was the hottest guest function of the default chain (2 % of a
//! request on wasmtime). Defined here, in the crate both filters link, it
//! replaces the C library's: the linker takes an archive's member only for
//! a symbol nothing else defines.

/// The sign of the first differing byte of `a` and `b` (as unsigned bytes),
/// 0 when the first `n` bytes are equal: `memcmp`'s contract. Word loads
/// are unaligned reads; wasm has no alignment faults and any target that
/// runs the tests reads them correctly too.
///
/// # Safety
/// `a` and `b` must be valid for reads of `n` bytes.
pub unsafe fn compare(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n`, and the caller vouches for `n` bytes.
        let (x, y) = unsafe {
            (
                a.add(i).cast::<u64>().read_unaligned(),
                b.add(i).cast::<u64>().read_unaligned(),
            )
        };
        if x != y {
            // Little-endian: the lowest differing byte comes first in memory.
            let shift = (x ^ y).trailing_zeros() & !7;
            return i32::from((x >> shift) as u8) - i32::from((y >> shift) as u8);
        }
        i += 8;
    }
    while i < n {
        // SAFETY: `i < n`.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

#[cfg(target_arch = "wasm32")]
mod exported {
    /// The C library's `memcmp`, replaced (see the module's note).
    ///
    /// # Safety
    /// As `memcmp`: both pointers valid for `n` bytes.
    #[no_mangle]
    pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        // SAFETY: forwarded from the caller.
        unsafe { super::compare(a, b, n) }
    }

    /// `bcmp` (equality only), which LLVM calls for `==` on slices.
    ///
    /// # Safety
    /// As `bcmp`: both pointers valid for `n` bytes.
    #[no_mangle]
    pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        // SAFETY: forwarded from the caller.
        unsafe { super::compare(a, b, n) }
    }
}

#[cfg(test)]
mod tests {
    use super::compare;
    use std::cmp::Ordering;

    fn sign(a: &[u8], b: &[u8]) -> Ordering {
        assert_eq!(a.len(), b.len());
        // SAFETY: both slices have `a.len()` bytes.
        unsafe { compare(a.as_ptr(), b.as_ptr(), a.len()) }.cmp(&0)
    }

    #[test]
    fn agrees_with_slice_ordering_at_every_length_and_position() {
        let base: Vec<u8> = (0..40u8).map(|i| i.wrapping_mul(37)).collect();
        for n in 0..base.len() {
            let a = &base[..n];
            assert_eq!(sign(a, a), Ordering::Equal, "n={n}");
            for at in 0..n {
                for delta in [1u8, 0x80, 0xff] {
                    let mut b = a.to_vec();
                    b[at] = b[at].wrapping_add(delta);
                    // Bytes compare unsigned, as memcmp's do.
                    assert_eq!(sign(a, &b), a.cmp(&b[..]), "n={n} at={at} delta={delta}");
                    assert_eq!(sign(&b, a), b[..].cmp(a), "n={n} at={at} delta={delta}");
                }
            }
        }
    }

    #[test]
    fn the_first_difference_decides_not_a_later_larger_one() {
        let a = *b"spiffe://cluster.local/ns/demo/sa/web";
        let mut b = a;
        b[3] = b'e'; // "spief..." > "spiff..." is false: 'e' < 'f'
        b[30] = 0xff;
        assert_eq!(sign(&a, &b), Ordering::Greater);
        assert_eq!(sign(&b, &a), Ordering::Less);
    }
}
