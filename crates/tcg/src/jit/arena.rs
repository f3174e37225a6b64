//! The memory compiled code lives in: one anonymous mapping per vCPU, written while mapped
//! read+write and run while mapped read+execute — never both (W^X).

/// Bytes reserved per vCPU (address space only until written).
pub const ARENA_SIZE: usize = 32 << 20;

const PAGE: usize = 4096;

/// A bump allocator over an anonymous mapping.
#[derive(Debug)]
pub struct Arena {
    base: *mut u8,
    size: usize,
    used: usize,
}

// SAFETY: the arena is owned by one vCPU's block cache and only touched through `&mut self`;
// the raw pointer is an mmap'd region that any thread may use.
unsafe impl Send for Arena {}

impl Arena {
    /// Maps `size` bytes read+write (`None` when the mapping fails).
    pub fn new(size: usize) -> Option<Self> {
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(Self {
            base: p.cast(),
            size,
            used: 0,
        })
    }

    /// The address the next [`Self::commit`] places its code at (code is assembled for it).
    pub fn next_addr(&self) -> usize {
        self.base as usize + self.used.next_multiple_of(16)
    }

    /// Copies `code` to [`Self::next_addr`] and makes its pages read+execute; `None` when
    /// the arena is full or a protection change fails.
    pub fn commit(&mut self, code: &[u8]) -> Option<usize> {
        let start = self.used.next_multiple_of(16);
        let end = start.checked_add(code.len())?;
        if end > self.size {
            return None;
        }
        let p0 = start - start % PAGE;
        let p1 = end.next_multiple_of(PAGE).min(self.size);
        // SAFETY: [p0, p1) lies in the mapping. While writable it is not executable; no code
        // of this arena runs meanwhile (the vCPU thread that owns it is here).
        unsafe {
            if libc::mprotect(
                self.base.add(p0).cast(),
                p1 - p0,
                libc::PROT_READ | libc::PROT_WRITE,
            ) != 0
            {
                return None;
            }
            std::ptr::copy_nonoverlapping(code.as_ptr(), self.base.add(start), code.len());
            if libc::mprotect(
                self.base.add(p0).cast(),
                p1 - p0,
                libc::PROT_READ | libc::PROT_EXEC,
            ) != 0
            {
                return None;
            }
        }
        self.used = end;
        Some(self.base as usize + start)
    }

    /// Forgets all code: the used pages become read+write (not executable) for reuse.
    pub fn reset(&mut self) {
        if self.used == 0 {
            return;
        }
        let len = self.used.next_multiple_of(PAGE).min(self.size);
        // SAFETY: the range lies in the mapping; nothing refers to the code any more (the
        // caller flushed every block holding an address in it).
        unsafe {
            libc::mprotect(self.base.cast(), len, libc::PROT_READ | libc::PROT_WRITE);
        }
        self.used = 0;
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; no block refers to it any more.
        unsafe {
            libc::munmap(self.base.cast(), self.size);
        }
    }
}
