//! What a training process sets before its first thread starts: the allocator's reuse of large
//! buffers and the thread counts of candle and rayon. The CLI's training commands and the
//! training benchmarks call `prepare`, so that both measure the same process.

/// Sets up the calling process for training; call it before any thread starts.
pub fn prepare() {
    tune_allocator();
    one_candle_thread();
}

/// Keeps large training buffers in the heap for reuse: by default glibc returns every block over
/// 128 KiB to the kernel, and re-faulting those pages cost ~12% of a training step.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only adjusts allocator tuning parameters; called before any threads start.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 256 << 20);
            mallopt(M_TRIM_THRESHOLD, 512 << 20);
        }
    }
}

/// Runs candle's own element-wise ops on the calling thread. Its barrier pool would add a second
/// set of worker threads beside rayon's (ours and gemm's); on 2 cores those spun for ~11% of the
/// CPU samples of a training step while rayon's workers waited (perf, 2026-11-30, AMD EPYC Zen 3).
/// `CANDLE_NUM_THREADS` set by the user still wins.
///
/// Also states rayon's thread count (its own default, the logical CPUs) in `RAYON_NUM_THREADS`:
/// without it candle asks `num_cpus` for the physical core count on every matmul, which parses
/// `/proc/cpuinfo` each time on machines without cpufreq data (2.3% of a training step's samples,
/// perf, 2026-11-30, AMD EPYC Zen 3 VM). rayon's pool is the same either way; candle's matmuls
/// then use the logical count, as rayon does.
fn one_candle_thread() {
    // Edition 2021: set_var is safe; this runs before any thread starts.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
