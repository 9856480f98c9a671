//! The agent's global allocator: the system's, plus one thing. In the
//! isolated validation child (see `deploy::isolate`), an allocation the
//! system refuses (its memory limit, `RLIMIT_DATA`, is reached) ends the
//! child at once with [`EXIT_ALLOC_REFUSED`] after writing the refused size
//! to stdout, so the agent reports `resource_limit` with the figure by the
//! exit code, whichever code path asked (tract panics on some refused
//! allocations, Rust's standard library aborts on others). In the agent
//! itself nothing changes: a refused allocation returns null as usual.
//!
//! This is the only module with `unsafe` code: a `GlobalAlloc` is unsafe
//! by definition, and so are `write(2)` and `_exit(2)` (the only calls that
//! may be made from inside an allocator that cannot allocate).
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

/// The validation child's exit code when an allocation was refused.
pub const EXIT_ALLOC_REFUSED: i32 = 86;

static CHILD: AtomicBool = AtomicBool::new(false);

/// The system allocator, ending the validation child on a refusal.
#[derive(Debug)]
pub struct Allocator;

/// Called once by the validation child, before it loads anything.
pub fn exit_on_refusal() {
    CHILD.store(true, Ordering::SeqCst);
}

/// `{"alloc_refused":{"bytes":N}}` and a newline (one line of the child's
/// report), formatted without allocating; returns its length.
pub(crate) fn refusal_line(size: usize, line: &mut [u8; 64]) -> usize {
    let head = b"{\"alloc_refused\":{\"bytes\":";
    line[..head.len()].copy_from_slice(head);
    let mut digits = [0u8; 20];
    let (mut n, mut i) = (size, digits.len());
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut len = head.len();
    for d in &digits[i..] {
        line[len] = *d;
        len += 1;
    }
    line[len..len + 3].copy_from_slice(b"}}\n");
    len + 3
}

#[cold]
fn refused(size: usize) -> ! {
    let mut line = [0u8; 64];
    let len = refusal_line(size, &mut line);
    // SAFETY: writes `len` initialised bytes of a stack buffer to fd 1, then
    // ends the process without running anything else (no handler could
    // allocate any more than this call could).
    unsafe {
        libc::write(1, line.as_ptr().cast(), len);
        libc::_exit(EXIT_ALLOC_REFUSED)
    }
}

// SAFETY: every call is forwarded to `System` unchanged; on a null result
// the validation child exits instead of returning it.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees are passed on to `System`.
        let p = unsafe { System.alloc(layout) };
        if p.is_null() && CHILD.load(Ordering::Relaxed) {
            refused(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() && CHILD.load(Ordering::Relaxed) {
            refused(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() && CHILD.load(Ordering::Relaxed) {
            refused(new_size);
        }
        p
    }
}

/// Keeps request-sized buffers in the heap. glibc serves an allocation of
/// 128 KiB and more with a fresh `mmap` and gives it back on free (its
/// dynamic threshold drifts up, but the heap top is trimmed at 128 KiB):
/// every large request (a 480x640 image is 3.7 MB, held three times on its
/// way to the model) then pays ~900 page faults per buffer, 2-3 ms of a
/// 8-10 ms detector request. Up to 32 MiB they now come from the heap, and
/// up to 32 MiB of free heap is kept for the next request: a device
/// serving big inputs holds that much more RSS once it has served one.
/// Small-model devices are unchanged (their buffers are far below it).
pub fn keep_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called once at start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

/// Gives free heap memory back to the system (after a model load: its
/// temporaries would otherwise stay under the raised trim threshold).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory; the allocator stays consistent.
    unsafe {
        libc::malloc_trim(0);
    }
}
