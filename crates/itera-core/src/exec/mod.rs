//! Who runs which part of a call. The runtime decides once per call which threads may help
//! (`Par`, in `runtime/forward.rs`) and passes that value down to every matmul, conv and scan;
//! each kernel then splits its work only when its own measured threshold says the split pays.
//! No thread-local switches: what a call may use is visible in its arguments.
//!
//! Splitting means several threads writing one output, each its own part. That argument is made
//! once, here (`Disjoint`), and every split in the crate goes through it.

pub mod pair;

/// The threads one runtime call may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Par {
    /// Everything on the calling thread (also the per-thread calls of a call already split).
    Serial,
    /// Two halves: the calling thread and the spinning pair helper (`pair`).
    Pair,
    /// The rayon pool's threads (wider machines, big calls).
    Pool(usize),
}

impl Par {
    pub fn threads(self) -> usize {
        match self {
            Par::Serial => 1,
            Par::Pair => 2,
            Par::Pool(n) => n,
        }
    }
}

/// A mutable slice shared by threads that each write their own, disjoint, part of it.
///
/// Construction is safe; every access is `unsafe` with one contract, stated here once: the
/// slice it came from is alive and not otherwise used while parts exist, and no two parts in use
/// at the same time (on any thread) overlap. Bounds are checked. Each splitting caller shows its
/// parts are disjoint where it takes them (channel ranges, weight-row columns, output halves).
pub struct Disjoint<T> {
    ptr: *mut T,
    len: usize,
}

impl<T> Clone for Disjoint<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Disjoint<T> {}

// SAFETY: a `Disjoint` hands out only the disjoint parts its contract allows, so threads sharing
// it never touch the same element; `T: Send` lets each part be used from another thread.
unsafe impl<T: Send> Send for Disjoint<T> {}
// SAFETY: as above: shared references to a `Disjoint` only give access to disjoint parts.
unsafe impl<T: Send> Sync for Disjoint<T> {}

impl<T> Disjoint<T> {
    pub fn new(slice: &mut [T]) -> Self {
        Self {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements `start..start + len`.
    ///
    /// # Safety
    /// The type's contract: the source slice is alive and this part overlaps no other part in use.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn part<'a>(self, start: usize, len: usize) -> &'a mut [T] {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "part {start}+{len} outside {}",
            self.len
        );
        // SAFETY: inside the slice (asserted); exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }

    /// The start and length of the slice, for kernels that write a strided part (e.g. some
    /// columns of every row) through raw pointers under the same contract.
    pub fn raw(self) -> (*mut T, usize) {
        (self.ptr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "outside")]
    fn parts_are_bounds_checked() {
        let mut v = vec![0u8; 4];
        let d = Disjoint::new(&mut v);
        // SAFETY: the only part taken.
        let _ = unsafe { d.part(2, 3) };
    }
}
