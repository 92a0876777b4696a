//! Throughput and latency measurements of the runtime, and the machine's peak f32 FLOP/s measured
//! in the same run, so every speed can be stated as a fraction of what the CPU can do right now.

use std::time::Instant;

use serde::Serialize;

use crate::error::Result;
use crate::rng::Rng;
use crate::runtime::{Phases, Runtime, State};

/// Median of a non-empty sample.
pub fn median(v: &[f64]) -> f64 {
    percentile(v, 0.5)
}

/// Nearest-rank percentile (q in [0, 1]).
pub fn percentile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() as f64 * q).ceil() as usize).clamp(1, s.len()) - 1]
}

fn random_tokens(rt: &Runtime, n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| rng.below(rt.cfg.vocab_size) as u32)
        .collect()
}

fn argmax(v: &[f32]) -> u32 {
    crate::math::argmax(v) as u32
}

/// Prefill throughput: `seqs` sequences of `len` tokens in one forward (one stream each) with
/// the logits of every position, as in scoring or training; median over `repeats` after a warm-up.
pub fn prefill_tokens_per_s(rt: &Runtime, seqs: usize, len: usize, repeats: usize) -> Result<f64> {
    let tokens = random_tokens(rt, seqs * len, 1);
    let owners: Vec<usize> = (0..seqs)
        .flat_map(|s| std::iter::repeat_n(s, len))
        .collect();
    let all: Vec<usize> = (0..seqs * len).collect();
    let mut scratch = rt.new_scratch();
    let mut rates = Vec::new();
    for i in 0..=repeats {
        let mut states: Vec<State> = (0..seqs).map(|_| rt.new_state()).collect();
        let t0 = Instant::now();
        rt.forward_rows(&tokens, &owners, &mut states, &all, &mut scratch)?;
        if i > 0 {
            rates.push((seqs * len) as f64 / t0.elapsed().as_secs_f64());
        }
    }
    Ok(median(&rates))
}

/// Evaluation throughput: one long stream scored in chunks, logits for every token.
pub fn eval_tokens_per_s(rt: &Runtime, tokens: usize, repeats: usize) -> Result<f64> {
    let ids = random_tokens(rt, tokens, 2);
    let mut scratch = rt.new_scratch();
    let mut rates = Vec::new();
    for i in 0..=repeats {
        let mut st = rt.new_state();
        let t0 = Instant::now();
        for chunk in ids.chunks(256) {
            rt.prefill_all(chunk, &mut st, &mut scratch)?;
        }
        if i > 0 {
            rates.push(tokens as f64 / t0.elapsed().as_secs_f64());
        }
    }
    Ok(median(&rates))
}

#[derive(Clone, Debug, Serialize)]
pub struct DecodeReport {
    pub tokens_per_s: f64,
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
}

/// Single-stream greedy decode: per-token latency of `tokens` steps after a 16-token prompt,
/// `repeats` runs after a warm-up; tokens/s is the median run's rate.
pub fn decode(rt: &Runtime, tokens: usize, repeats: usize) -> Result<DecodeReport> {
    let prompt = random_tokens(rt, 16, 3);
    let mut scratch = rt.new_scratch();
    let mut latencies = Vec::new();
    let mut rates = Vec::new();
    for i in 0..=repeats {
        let mut st = rt.new_state();
        rt.prefill(&prompt, &mut st, &mut scratch)?;
        let start = Instant::now();
        for _ in 0..tokens {
            let t0 = Instant::now();
            let next = argmax(&scratch.logits);
            rt.step(next, &mut st, &mut scratch)?;
            if i > 0 {
                latencies.push(t0.elapsed().as_secs_f64() * 1e6);
            }
        }
        if i > 0 {
            rates.push(tokens as f64 / start.elapsed().as_secs_f64());
        }
    }
    Ok(DecodeReport {
        tokens_per_s: median(&rates),
        latency_p50_us: percentile(&latencies, 0.5),
        latency_p99_us: percentile(&latencies, 0.99),
    })
}

/// Greedy decode of `tokens` tokens after a 16-token prompt and as many untimed ones, timed
/// phase by phase (`runtime::Phases`): mean nanoseconds per token of each phase, in the model's
/// order. The clock reads add ~20 ns a phase, so the sum runs above `decode`'s latency. (Without
/// the warm-up, a fresh process's LM head ran 2x slower: the pair helper had just started.)
pub fn decode_phases(rt: &Runtime, tokens: usize) -> Result<Vec<(&'static str, f64)>> {
    let prompt = random_tokens(rt, 16, 3);
    let (mut st, mut scratch) = (rt.new_state(), rt.new_scratch());
    rt.prefill(&prompt, &mut st, &mut scratch)?;
    for i in 0..2 * tokens {
        if i == tokens {
            scratch.phases = Some(Phases::default());
        }
        let next = argmax(&scratch.logits);
        rt.step(next, &mut st, &mut scratch)?;
    }
    Ok(scratch
        .phases
        .take()
        .map(|p| p.per_call())
        .unwrap_or_default())
}

/// Batched greedy decode: `streams` streams advanced together for `steps` steps; total tokens/s.
pub fn batched_decode_tokens_per_s(
    rt: &Runtime,
    streams: usize,
    steps: usize,
    repeats: usize,
) -> Result<f64> {
    let vocab = rt.cfg.vocab_size;
    let mut scratch = rt.new_scratch();
    let mut rates = Vec::new();
    for i in 0..=repeats {
        let mut states: Vec<State> = (0..streams).map(|_| rt.new_state()).collect();
        let mut tokens = random_tokens(rt, streams, 4 + i as u64);
        let t0 = Instant::now();
        for _ in 0..steps {
            rt.step_batch(&tokens, &mut states, &mut scratch)?;
            for (t, row) in tokens.iter_mut().zip(scratch.logits.chunks_exact(vocab)) {
                *t = argmax(row);
            }
        }
        if i > 0 {
            rates.push((streams * steps) as f64 / t0.elapsed().as_secs_f64());
        }
    }
    Ok(median(&rates))
}

/// Read bandwidth (bytes/s) of the cores a decode step runs on (this thread plus the pair helper
/// when it is available, each summing half), over a buffer of `bytes`, as decode reads its
/// weights: sum in vector lanes, best of several passes after one that pulls it into cache.
/// Returns (bytes/s, cores).
pub fn read_bandwidth(bytes: usize) -> (f64, usize) {
    let buf: Vec<f32> = (0..bytes.div_ceil(4)).map(|i| (i % 7) as f32).collect();
    let halves = buf.split_at(buf.len() / 2 / 16 * 16);
    let halves = [halves.0, halves.1];
    let cores = if rayon::current_num_threads() > 1 {
        2
    } else {
        1
    };
    let mut best = 0f64;
    // At least 50 ms of passes: a fresh helper thread can start on this thread's core, and the
    // scheduler takes a few milliseconds to move it.
    let start = Instant::now();
    for pass in 0.. {
        if pass >= 21 && start.elapsed().as_secs_f64() > 0.05 {
            break;
        }
        let t0 = Instant::now();
        let sum_half = |half: usize| {
            std::hint::black_box(sum_lanes(std::hint::black_box(halves[half])));
        };
        if cores == 2 {
            crate::exec::pair::both(sum_half);
        } else {
            sum_half(0);
            sum_half(1);
        }
        best = best.max(buf.len() as f64 * 4.0 / t0.elapsed().as_secs_f64());
    }
    (best, cores)
}

crate::multiversion! {
    /// 64 independent lanes: enough accumulators that the adds never wait on each other.
    fn sum_lanes(v: &[f32]) -> f32 {
        let mut acc = [0.0f32; 64];
        for c in v.chunks_exact(64) {
            for i in 0..64 {
                acc[i] += c[i];
            }
        }
        acc.iter().sum()
    }
}

/// Peak f32 FLOP/s of this machine now: independent FMA chains in the widest registers, on every
/// core at once, best of three ~0.2 s runs. Returns (FLOP/s, threads, instruction set).
pub fn peak_flops() -> (f64, usize, &'static str) {
    peak_flops_at(crate::simd::level())
}

/// `peak_flops` in the registers of `level` (at most what the CPU has).
pub fn peak_flops_at(level: crate::simd::Level) -> (f64, usize, &'static str) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (kernel, isa) = fma_kernel(level.min(crate::simd::detected()));
    // Calibrate the iteration count to ~0.2 s on one thread.
    let mut iters = 1u64 << 16;
    loop {
        let t0 = Instant::now();
        std::hint::black_box(kernel(iters));
        if t0.elapsed().as_secs_f64() > 0.05 {
            iters = (iters as f64 * 0.2 / t0.elapsed().as_secs_f64()) as u64;
            break;
        }
        iters *= 4;
    }
    let mut best = 0f64;
    for _ in 0..3 {
        let t0 = Instant::now();
        let flops: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|_| s.spawn(move || std::hint::black_box(kernel(iters)).1))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        best = best.max(flops as f64 / t0.elapsed().as_secs_f64());
    }
    (best, threads, isa)
}

/// A timed FMA loop: iterations -> (a result to keep, FLOPs done).
type FmaKernel = fn(u64) -> (f32, u64);

/// The FMA loop for `level`, which the caller has checked the CPU supports.
fn fma_kernel(level: crate::simd::Level) -> (FmaKernel, &'static str) {
    use crate::simd::Level;
    #[cfg(target_arch = "x86_64")]
    {
        if level == Level::Avx512 {
            // SAFETY: AVX-512F is present (the caller's contract: `detected()` or below).
            return (|n| unsafe { fma_avx512(n) }, "avx512");
        }
        if level == Level::Avx2 {
            // SAFETY: AVX2 and FMA are present (likewise).
            return (|n| unsafe { fma_avx2(n) }, "avx2+fma");
        }
    }
    let _ = level;
    (fma_scalar, "scalar")
}

/// 12 independent chains hide the FMA latency on two FMA ports.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_avx512(iters: u64) -> (f32, u64) {
    use std::arch::x86_64::*;
    let (b, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut a = [_mm512_set1_ps(1.0); 12];
    for _ in 0..iters {
        for v in a.iter_mut() {
            *v = _mm512_fmadd_ps(*v, b, c);
        }
    }
    let s = a
        .iter()
        .fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v));
    (_mm512_reduce_add_ps(s), iters * 12 * 16 * 2)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_avx2(iters: u64) -> (f32, u64) {
    use std::arch::x86_64::*;
    let (b, c) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut a = [_mm256_set1_ps(1.0); 12];
    for _ in 0..iters {
        for v in a.iter_mut() {
            *v = _mm256_fmadd_ps(*v, b, c);
        }
    }
    let mut out = [0f32; 8];
    let s = a
        .iter()
        .fold(_mm256_setzero_ps(), |s, v| _mm256_add_ps(s, *v));
    // SAFETY: `out` holds the 8 floats one 256-bit store writes.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
    (out.iter().sum(), iters * 12 * 8 * 2)
}

fn fma_scalar(iters: u64) -> (f32, u64) {
    let mut a = [1.0f32; 8];
    for _ in 0..iters {
        for v in a.iter_mut() {
            *v = v.mul_add(0.999_999, 1e-7);
        }
    }
    (a.iter().sum(), iters * 8 * 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(|i| i as f64).collect();
        assert_eq!(median(&v), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
    }
}
