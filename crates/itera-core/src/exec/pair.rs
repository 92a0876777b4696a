//! A second core without a wake-up. One decode step is ~30 small matrix-vector products that
//! are bound by how fast one core reads the weights; splitting each between two cores needs a
//! hand-off far cheaper than waking a sleeping pool thread (tens of microseconds, more than most
//! of those products take). So one helper thread spins between calls while work is under way and
//! parks after `SPIN` of idleness; the caller runs half 0, the helper half 1. The runtime uses it
//! when a call's `Par` is `Par::Pair` (small calls, and every call on two-thread machines; see
//! `runtime/forward.rs`).

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use std::sync::OnceLock;
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long the helper spins after its last job before it parks: longer than the gap between
/// two decode steps (sampling, detokenising, printing), short enough not to hold a core for long.
const SPIN: Duration = Duration::from_micros(500);
/// After this much of `SPIN` the helper yields its core between checks, so that other threads
/// that want it (a server's network threads, a client on the same machine) get it at once.
const SPIN_HARD: Duration = Duration::from_micros(20);

/// A hand-off is late when the caller, done with its own half, waits longer than this (and four
/// times its own half) for the helper's: the helper is not getting a core (another process is
/// busy on it). Wake-ups from park are not counted.
const LATE: Duration = Duration::from_micros(200);
/// Late hand-offs in a row after which calls stop using the helper for `BACKOFF`.
const LATE_STREAK: u32 = 3;
/// How long calls then run both halves on the caller before trying the helper again: one-thread
/// decode is slower on a quiet machine, but beside a busy core waiting for a descheduled helper
/// costs milliseconds per token (p99 4.1 ms against a p50 of 55 us, measured before this).
const BACKOFF: Duration = Duration::from_millis(100);

/// A posted job: the caller's closure with its lifetime erased. A raw pointer, so that the cell
/// may keep it after the call returns (it is read only for a posted, unfinished call): clearing
/// it would write the line the helper polls once more per hand-off.
type Job = *const (dyn Fn(usize) + Sync);

struct Helper {
    /// Taken by the one caller that is using the helper; others run both halves themselves.
    busy: AtomicBool,
    /// Jobs posted and jobs finished: the helper has work when they differ.
    posted: AtomicU64,
    done: AtomicU64,
    sleeping: AtomicBool,
    /// Set by `rest`: park now instead of spinning out `SPIN`.
    rest: AtomicBool,
    panicked: AtomicBool,
    /// Late hand-offs in a row, and the time (ns since `EPOCH`) until which calls skip the helper.
    late: AtomicU32,
    backoff_until: AtomicU64,
    /// Times the helper was given up (for reports and tests).
    backoffs: AtomicU64,
    job: UnsafeCell<Option<Job>>,
    thread: OnceLock<Thread>,
}

// SAFETY: `job` is written only by the caller holding `busy` while the helper is idle
// (posted == done), and read by the helper only between seeing `posted` advance and storing `done`.
unsafe impl Sync for Helper {}

static HELPER: OnceLock<Option<&'static Helper>> = OnceLock::new();

/// The clock the back-off deadline is kept in.
static EPOCH: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Times the helper has been given up because it was not getting a core.
pub fn backoffs() -> u64 {
    helper().map_or(0, |h| h.backoffs.load(Relaxed))
}

fn helper() -> Option<&'static Helper> {
    *HELPER.get_or_init(|| {
        let h: &'static Helper = Box::leak(Box::new(Helper {
            busy: AtomicBool::new(false),
            posted: AtomicU64::new(0),
            done: AtomicU64::new(0),
            sleeping: AtomicBool::new(false),
            rest: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            late: AtomicU32::new(0),
            backoff_until: AtomicU64::new(0),
            backoffs: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            thread: OnceLock::new(),
        }));
        let handle = std::thread::Builder::new()
            .name("itera-pair".into())
            .spawn(move || h.serve())
            .ok()?;
        h.thread.set(handle.thread().clone()).ok()?;
        Some(h)
    })
}

impl Helper {
    /// Whether calls skip the helper now. The clock is read only while a back-off is set.
    fn backing_off(&self) -> bool {
        let until = self.backoff_until.load(Relaxed);
        if until == 0 {
            return false;
        }
        if now_ns() < until {
            return true;
        }
        // Over: cleared (unless a new one was set meanwhile), so later calls skip the clock.
        let _ = self
            .backoff_until
            .compare_exchange(until, 0, Relaxed, Relaxed);
        false
    }

    fn serve(&self) {
        let mut seen = 0u64;
        loop {
            let mut idle_since = Instant::now();
            let mut spins = 0u32;
            while self.posted.load(Acquire) == seen {
                std::hint::spin_loop();
                spins += 1;
                if !spins.is_multiple_of(256) {
                    continue;
                }
                let idle = idle_since.elapsed();
                if idle > SPIN || self.rest.swap(false, Relaxed) {
                    self.sleeping.store(true, SeqCst);
                    if self.posted.load(SeqCst) == seen {
                        std::thread::park();
                    }
                    self.sleeping.store(false, SeqCst);
                    idle_since = Instant::now();
                } else if idle > SPIN_HARD {
                    std::thread::yield_now();
                }
            }
            seen += 1;
            // SAFETY: see `unsafe impl Sync`: the caller wrote `job` before advancing `posted`,
            // and its closure lives until the caller sees `done` catch up.
            let job = unsafe { &*(*self.job.get()).expect("a posted job") };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(1))).is_err() {
                self.panicked.store(true, Release);
            }
            self.done.store(seen, Release);
        }
    }
}

/// Tells a spinning helper to park now: called before work that wants every core from the
/// thread pool, where the spinning helper would hold one of them.
pub fn rest() {
    if let Some(Some(h)) = HELPER.get() {
        if !h.sleeping.load(Relaxed) {
            h.rest.store(true, Relaxed);
        }
    }
}

/// Runs `f(0)` on this thread and `f(1)` on the helper at the same time, or both here when the
/// helper could not start or is in use by another thread. Returns when both halves are done.
/// Callers reach it only under `Par::Pair`, which is never chosen on a pool thread (a pool
/// thread has its own share of the work).
pub fn both<F: Fn(usize) + Sync>(f: F) {
    let h = match helper() {
        Some(h)
            if !h.backing_off()
                && h.busy
                    .compare_exchange(false, true, Acquire, Relaxed)
                    .is_ok() =>
        {
            h
        }
        _ => {
            f(0);
            f(1);
            return;
        }
    };
    let job: &(dyn Fn(usize) + Sync) = &f;
    // SAFETY: only the lifetime is erased: the helper uses `job` only before storing `done`, and
    // this function does not return before it sees `done` catch up.
    let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(job) };
    // SAFETY: this caller holds `busy` and the helper is idle (posted == done), so nobody reads
    // the cell while it is written (see `unsafe impl Sync for Helper`).
    unsafe { *h.job.get() = Some(job) };
    let ticket = h.posted.fetch_add(1, SeqCst) + 1;
    let was_sleeping = h.sleeping.load(SeqCst);
    if was_sleeping {
        if let Some(t) = h.thread.get() {
            t.unpark();
        }
    }
    let started = Instant::now();
    let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0)));
    // The clock is read again only when the helper is still at work (half of a decode step's
    // ~20 hand-offs): clock reads were 2% of a Q8_0 decode profile's samples
    // (docs/performance.md).
    let mut late = false;
    if h.done.load(Acquire) != ticket {
        let waiting = Instant::now();
        let own = waiting - started;
        let mut spins = 0u32;
        while h.done.load(Acquire) != ticket {
            std::hint::spin_loop();
            spins += 1;
            // Long waits mean the helper is not running (woken from park, or sharing this
            // core): yield so that it can.
            if spins.is_multiple_of(256) && waiting.elapsed() > SPIN_HARD {
                std::thread::yield_now();
            }
        }
        late = !was_sleeping && waiting.elapsed() > LATE.max(own * 4);
    }
    if late {
        if h.late.fetch_add(1, Relaxed) + 1 >= LATE_STREAK {
            h.late.store(0, Relaxed);
            h.backoff_until
                .store(now_ns() + BACKOFF.as_nanos() as u64, Relaxed);
            h.backoffs.fetch_add(1, Relaxed);
            h.rest.store(true, Relaxed);
        }
    } else if h.late.load(Relaxed) != 0 {
        // Written only when set: the helper polls a counter on the same cache line.
        h.late.store(0, Relaxed);
    }
    // Read before it is swapped: a swap on every call would write the line the helper polls
    // (this and the job cell no longer cleared after each call: an empty `pair/hand_off` a
    // median 245 -> 160 ns on the Intel Xeon of 2026-12-03, alternated runs; performance.md).
    let theirs = h.panicked.load(Acquire) && h.panicked.swap(false, AcqRel);
    h.busy.store(false, Release);
    if let Err(e) = mine {
        std::panic::resume_unwind(e);
    }
    assert!(!theirs, "the pair helper's half panicked");
}

/// `both` over the two parts of `y` split at `at`: `f(0, &mut y[..at])` and `f(1, &mut y[at..])`.
pub fn both_parts<T: Send, F: Fn(usize, &mut [T]) + Sync>(y: &mut [T], at: usize, f: F) {
    let len = y.len();
    let parts = super::Disjoint::new(y);
    both(|half| {
        let (start, n) = if half == 0 { (0, at) } else { (at, len - at) };
        // SAFETY: the halves [0, at) and [at, len) are disjoint, each used by one half only,
        // and `y` stays borrowed until `both` returns.
        f(half, unsafe { parts.part(start, n) })
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn both_halves_run_once_each_call() {
        let hits = [AtomicUsize::new(0), AtomicUsize::new(0)];
        for _ in 0..1000 {
            both(|half| {
                hits[half].fetch_add(1, Relaxed);
            });
        }
        assert_eq!(hits[0].load(Relaxed), 1000);
        assert_eq!(hits[1].load(Relaxed), 1000);
    }

    #[test]
    fn halves_write_disjoint_outputs_from_many_callers() {
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    for i in 0..200 {
                        let mut out = vec![0usize; 64];
                        both_parts(&mut out, 32, |half, part| {
                            for (j, v) in part.iter_mut().enumerate() {
                                *v = t * 1000 + i + half * 32 + j;
                            }
                        });
                        assert!(out.iter().enumerate().all(|(j, &v)| v == t * 1000 + i + j));
                    }
                });
            }
        });
    }

    /// A helper that keeps answering late (here its half sleeps, as when another process holds
    /// its core) is given up for a while: the calls then run both halves on the caller. Other
    /// tests share the one helper (their on-time hand-offs reset the streak, and while one of
    /// them holds it our calls run on the caller), so this retries until a streak of its own
    /// has been seen, and checks the give-up only while the back-off still holds.
    #[test]
    fn a_late_helper_is_given_up_for_a_while() {
        let caller = std::thread::current().id();
        let late = |half: usize| {
            if half == 1 && std::thread::current().id() != caller {
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        for _ in 0..200 {
            let before = backoffs();
            for _ in 0..LATE_STREAK + 1 {
                both(late);
            }
            if backoffs() == before {
                continue;
            }
            let ran_here = std::sync::Mutex::new(Vec::new());
            both(|half| {
                ran_here
                    .lock()
                    .unwrap()
                    .push((half, std::thread::current().id()))
            });
            let held = helper().is_some_and(|h| now_ns() < h.backoff_until.load(Relaxed));
            if held {
                assert!(ran_here
                    .into_inner()
                    .unwrap()
                    .iter()
                    .all(|&(_, t)| t == caller));
                return;
            }
        }
        panic!("late hand-offs were not noticed in 200 tries");
    }
}
