//! The global allocator: mimalloc, called the way its own C API is meant
//! to be called.
//!
//! Hand-written over `libmimalloc-sys` because the `mimalloc` crate's
//! `GlobalAlloc` hands every request to `mi_malloc_aligned`, whatever its
//! alignment. mimalloc 3's aligned path takes its fast path only while
//! the size class's page has a block free at once; otherwise, for a size
//! whose block is not a power of two (a 24-, 40- or 1,704-byte Rust
//! value at an alignment of 8), it over-allocates into the next size
//! class and marks the page as holding interior pointers. On the warm
//! path that was about 9 allocations a request, about 2,000 instructions
//! of the 53,000 a request took (`scripts/instructions`). The `mimalloc`
//! crate has the fix as an open proposal (purpleprotocol/mimalloc_rust
//! pull request 170).
//!
//! The rule: a layout whose alignment is at most `MI_MAX_ALIGN_SIZE` (16
//! on the targets snapgate runs on) and at most its size goes to plain
//! `mi_malloc`, `mi_zalloc` and `mi_realloc`. mimalloc's blocks of 16
//! bytes or more are 16-aligned (its own invariant, asserted as each
//! block is handed out in `src/alloc.c`: with `MI_MAX_ALIGN_SIZE` twice
//! the word size, `mi_bin` in `src/page-queue.c` rounds every size class
//! to an even number of words, and a page's first block is 16-aligned),
//! and smaller ones 8-aligned (8 bytes is the smallest class), so such a
//! block meets the alignment; the rule is the one Rust's own `System`
//! allocator applies to `malloc`.
//! Every other layout keeps the `_aligned` calls. `mi_free` frees both.
//!
//! The one module besides the workers' memory hand-back that holds
//! `unsafe` code: a global allocator cannot be written without it.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// `MI_MAX_ALIGN_SIZE`: the alignment every mimalloc block of at least
/// this many bytes has (mimalloc's `types.h`).
const MAX_ALIGN: usize = 16;

/// mimalloc as Rust's global allocator; see the module's docs for which
/// calls each layout takes. Install with `#[global_allocator]`.
pub struct Mimalloc;

/// Whether `align` (a power of two) is met by a plain mimalloc block of
/// `size` bytes.
#[inline]
fn plain(size: usize, align: usize) -> bool {
    align <= MAX_ALIGN && align <= size
}

// SAFETY: each method forwards to the mimalloc call for its layout; the
// blocks it returns meet the layout's alignment (module docs), and
// `mi_free` takes any block either call returned.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.size(), layout.align()) {
            let p = unsafe { mi::mi_malloc(layout.size()) as *mut u8 };
            debug_assert!(p as usize % layout.align() == 0, "{layout:?}");
            p
        } else {
            unsafe { mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8 }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.size(), layout.align()) {
            unsafe { mi::mi_zalloc(layout.size()) as *mut u8 }
        } else {
            unsafe { mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8 }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { mi::mi_free(ptr as *mut c_void) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(new_size, layout.align()) {
            unsafe { mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8 }
        } else {
            unsafe {
                mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size from 1 to 4 KiB at every alignment from 1 to 256, each
    /// allocated, written whole, grown, shrunk and freed: every block
    /// meets its alignment (the plain calls' promise), keeps its bytes
    /// across a realloc, and zeroed blocks are zero. Many blocks are held
    /// at once so that pages fill and the allocator's slower paths run.
    #[test]
    fn every_block_meets_its_layout() {
        let a = Mimalloc;
        let mut held = Vec::new();
        for align in (0..9).map(|s| 1usize << s) {
            for size in (1..=4096).step_by(7).chain([8, 16, 24, 40, 48, 1704, 4096]) {
                let layout = Layout::from_size_align(size, align).unwrap();
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null(), "size {size} align {align}");
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    std::ptr::write_bytes(p, 0xa5, size);
                    let grown = a.realloc(p, layout, size * 3);
                    assert!(!grown.is_null(), "grown {size} align {align}");
                    assert_eq!(grown as usize % align, 0, "grown {size} align {align}");
                    assert!((0..size).all(|i| *grown.add(i) == 0xa5));
                    let shrunk = a.realloc(
                        grown,
                        Layout::from_size_align(size * 3, align).unwrap(),
                        size,
                    );
                    assert!(!shrunk.is_null(), "shrunk {size} align {align}");
                    assert_eq!(shrunk as usize % align, 0, "shrunk {size} align {align}");
                    assert!((0..size).all(|i| *shrunk.add(i) == 0xa5));
                    let z = a.alloc_zeroed(layout);
                    assert!(!z.is_null(), "zeroed {size} align {align}");
                    assert_eq!(z as usize % align, 0, "zeroed {size} align {align}");
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    held.push((shrunk, layout));
                    held.push((z, layout));
                }
            }
        }
        for (p, layout) in held {
            unsafe { a.dealloc(p, layout) };
        }
    }
}
