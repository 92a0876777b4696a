//! AVX-512 pieces the half and block kernels share: the transposing reduction of 16 row vectors
//! (`sum16`) and the broadcasts of per-block scales.

/// The lane sums of 16 vectors as one vector (lane r = sum of acc[r]): a transposing tree of
/// 15 adds, instead of 16 horizontal reductions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn sum16(acc: &[std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for.
    unsafe {
        use std::arch::x86_64::*;
        // 16 vectors -> 8 -> 4: within each 128-bit chunk, pairs then quads of rows.
        let mut t = [_mm512_setzero_ps(); 8];
        for (i, v) in t.iter_mut().enumerate() {
            let (a, b) = (acc[2 * i], acc[2 * i + 1]);
            *v = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        }
        let mut u = [_mm512_setzero_ps(); 4];
        for (i, v) in u.iter_mut().enumerate() {
            let (a, b) = (_mm512_castps_pd(t[2 * i]), _mm512_castps_pd(t[2 * i + 1]));
            // Moved as pairs of floats (64-bit lanes), added as floats.
            *v = _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
            );
        }
        // u[i]: chunk k holds rows 4i..4i+4, partial over chunk k. Then across chunks: 4 -> 2 -> 1.
        fold_chunks(fold_chunks(u[0], u[1]), fold_chunks(u[2], u[3]))
    }
}

/// [s0 x 8, s1 x 8] from the two floats at `p`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn pair_of(p: *const f32) -> std::arch::x86_64::__m512 {
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for, and `p` points at two readable floats.
    unsafe {
        use std::arch::x86_64::*;
        let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let both = _mm512_castpd_ps(_mm512_set1_pd((p as *const f64).read_unaligned()));
        _mm512_permutexvar_ps(halves, both)
    }
}

/// Chunks (a0 + a1, a2 + a3, b0 + b1, b2 + b3) of two vectors of four 128-bit chunks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fold_chunks(
    a: std::arch::x86_64::__m512,
    b: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
    )
}

/// Whether the VNNI integer dot products of the block kernels are usable (AVX-512 allowed and
/// the CPU has VNNI), checked once.
pub(super) fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            crate::simd::has_avx512() && std::arch::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}
