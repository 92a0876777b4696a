//! f16 and bf16 weight rows: the AVX-512 kernel (16 weight rows at a time, f16 through
//! `vcvtph2ps`, bf16 by a shift, one `sum16` reduction per group) and the portable dot product.

use half::f16;

#[cfg(target_arch = "x86_64")]
use super::avx512::sum16;

/// Half-precision weight rows [first, first + count) (row length `c`, a multiple of 16) against
/// `n` activation rows x [n, c]: output (i, r) goes to `y[i * ystride + r - first]`. Groups of 16
/// weight rows stay in L1 while every activation row passes, each row in its own vector (f16
/// through `vcvtph2ps`, bf16 by a shift) and one `sum16` tree per group; the last rows one at a
/// time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul_avx512(
    w: &[u16],
    c: usize,
    bf16: bool,
    first: usize,
    count: usize,
    x: &[f32],
    y: &mut [f32],
    ystride: usize,
) {
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for; the asserts below keep every load inside `w` and `x` and every store inside `y`.
    unsafe {
        use std::arch::x86_64::*;
        let n = x.len() / c;
        assert!(c.is_multiple_of(16) && (first + count) * c <= w.len());
        assert!(n == 0 || (n - 1) * ystride + count <= y.len());
        let load = |at: usize| {
            let h = _mm256_loadu_si256(w.as_ptr().add(at) as *const __m256i);
            if bf16 {
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            } else {
                _mm512_cvtph_ps(h)
            }
        };
        let mut j = 0;
        while j + 16 <= count {
            for i in 0..n {
                let mut acc = [_mm512_setzero_ps(); 16];
                for k in (0..c).step_by(16) {
                    let xv = _mm512_loadu_ps(x.as_ptr().add(i * c + k));
                    for (r, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(load((first + j + r) * c + k), xv, *a);
                    }
                }
                _mm512_storeu_ps(y.as_mut_ptr().add(i * ystride + j), sum16(&acc));
            }
            j += 16;
        }
        for r in j..count {
            for i in 0..n {
                let mut acc = _mm512_setzero_ps();
                for k in (0..c).step_by(16) {
                    let xv = _mm512_loadu_ps(x.as_ptr().add(i * c + k));
                    acc = _mm512_fmadd_ps(load((first + r) * c + k), xv, acc);
                }
                *y.get_unchecked_mut(i * ystride + r) = _mm512_reduce_add_ps(acc);
            }
        }
    }
}

crate::multiversion! {
    /// One half-precision row against x (portable; AVX2 / baseline twins).
    pub(super) fn dot(bits: &[u16], x: &[f32], bf16: bool) -> f32 {
        let mut acc = [0.0f32; 8];
        for (w, v) in bits.chunks_exact(8).zip(x.chunks_exact(8)) {
            for i in 0..8 {
                let f = if bf16 { f32::from_bits((w[i] as u32) << 16) } else { f16::from_bits(w[i]).to_f32() };
                acc[i] += f * v[i];
            }
        }
        acc.iter().sum()
    }
}
