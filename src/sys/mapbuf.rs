//! A byte buffer in pages of its own (mmap/mremap/munmap): for large partial
//! frames, so that their memory goes back to the system the moment they are
//! freed, whatever the process's allocator keeps in its heaps.

use std::io;
use std::ptr::NonNull;

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// Bytes in an anonymous private mapping; grows with mremap (no copy).
pub struct MapBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: the mapping is owned by this value alone; moving it to another
// thread moves that ownership.
unsafe impl Send for MapBuf {}

impl std::fmt::Debug for MapBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapBuf").field("len", &self.len).field("cap", &self.cap).finish()
    }
}

impl MapBuf {
    /// Room for at least `total` bytes, or an error (nothing changed then).
    pub fn with_capacity(total: usize) -> io::Result<MapBuf> {
        let mut b = MapBuf { ptr: NonNull::dangling(), len: 0, cap: 0 };
        b.reserve_total(total)?;
        Ok(b)
    }

    /// Grows the mapping to hold at least `total` bytes (rounded up to pages).
    pub fn reserve_total(&mut self, total: usize) -> io::Result<()> {
        if total <= self.cap {
            return Ok(());
        }
        let pg = page();
        let want =
            total.checked_add(pg - 1).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))? / pg * pg;
        let p = if self.cap == 0 {
            // SAFETY: a fresh anonymous private mapping; checked below.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    want,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            }
        } else {
            // SAFETY: `ptr`/`cap` describe our own live mapping; MAYMOVE lets
            // the kernel relocate it, keeping its contents.
            unsafe {
                libc::mremap(self.ptr.as_ptr() as *mut libc::c_void, self.cap, want, libc::MREMAP_MAYMOVE)
            }
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.ptr = NonNull::new(p as *mut u8).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        self.cap = want;
        Ok(())
    }

    /// Appends `bytes`; the caller reserved room for them.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        assert!(self.len + bytes.len() <= self.cap, "room was reserved");
        // SAFETY: the destination lies within our mapping (checked above)
        // and cannot overlap `bytes`, which the caller borrows elsewhere.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.as_ptr().add(self.len), bytes.len())
        };
        self.len += bytes.len();
    }

    pub fn as_slice(&self) -> &[u8] {
        if self.cap == 0 {
            return &[];
        }
        // SAFETY: the first `len` bytes of our mapping were written.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }
}

impl Drop for MapBuf {
    fn drop(&mut self) {
        if self.cap > 0 {
            // SAFETY: unmaps our own mapping, used by nothing after this.
            unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.cap) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_in_place_or_moves_and_keeps_its_bytes() {
        let mut b = MapBuf::with_capacity(10).unwrap();
        b.extend_from_slice(b"hello");
        for i in 0..1000u32 {
            b.reserve_total(b.len() + 4).unwrap();
            b.extend_from_slice(&i.to_le_bytes());
        }
        assert_eq!(&b.as_slice()[..5], b"hello");
        assert_eq!(b.len(), 4005);
        assert_eq!(b.capacity() % page(), 0);
    }
}
