//! Reused f32 buffers for the fused ops' intermediates. A buffer every value of which a kernel
//! writes before reading any needs neither a zero fill nor a fresh allocation (page faults): a
//! training step's `memset` was 2.2% of its samples in the thirty-sixth session's profile, most
//! of it such buffers filled with zeros only to be overwritten.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Buffers given back and not yet taken again, oldest first.
static POOL: Mutex<VecDeque<Vec<f32>>> = Mutex::new(VecDeque::new());

/// At most this many buffers wait in the pool, the oldest going first (a `tiny` step takes
/// about eight of the same sizes per layer and shard); smaller ones are not worth keeping, except
/// in tests, whose sizes are tiny.
const KEEP: usize = 64;
const SMALLEST: usize = if cfg!(test) { 1 } else { 4096 };

/// A buffer of `len` values that the caller must overwrite entirely before reading any: its
/// contents are whatever an earlier op left (NaN under `cfg(test)`, so that a test catches a
/// kernel that reads before it writes). Only a buffer of exactly `len` is reused: handing out
/// longer ones cut short would wear the pool's large buffers down to the small sizes.
pub(super) fn overwritten(len: usize) -> Vec<f32> {
    let reused = {
        let mut pool = POOL.lock().expect("not poisoned");
        let at = pool.iter().position(|v| v.len() == len);
        at.and_then(|i| pool.remove(i))
    };
    let Some(mut v) = reused else {
        return vec![0.0; len];
    };
    if cfg!(test) {
        v.fill(f32::NAN);
    }
    v
}

/// Gives buffers back for `overwritten` to hand out again.
pub(super) fn recycle(bufs: impl IntoIterator<Item = Vec<f32>>) {
    let mut pool = POOL.lock().expect("not poisoned");
    for b in bufs.into_iter().filter(|b| b.len() >= SMALLEST) {
        if pool.len() == KEEP {
            pool.pop_front();
        }
        pool.push_back(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer comes back at the length asked for, never with the values it was given back
    /// with (under test a reused one is poisoned with NaN; a fresh one is zeros).
    #[test]
    fn hands_out_buffers_without_their_old_values() {
        let len = SMALLEST * 3 + 7;
        recycle([vec![1.0; len]]);
        // Other tests share the pool: this buffer may be gone (fresh zeros) but never stale.
        let v = overwritten(len);
        assert_eq!(v.len(), len);
        assert!(v.iter().all(|&x| x != 1.0));
    }
}
