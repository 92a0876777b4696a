//! The runtime's element-wise math for 16 lanes of AVX-512 (e^x, 1/d, softplus, SiLU), as
//! `math.rs` computes it for one value but without divisions: the hand-written scan uses them
//! inline, and `silu_in_place` is the conv's activation (the vectorised `silu` spent about a
//! fifth of the conv's samples in or waiting on `vdivps`; without it the conv phase of a Q4_0
//! `tiny` decode step fell by 0.4-0.6 us in five alternated `itera bench --only phases` runs on
//! the Intel Xeon of performance.md, twenty-eighth session).
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// e^x for 16 lanes: 2^k * P(r), the polynomial of `math::exp`, 2^k applied by `vscalefps`.
#[inline(always)]
pub(crate) unsafe fn exp16(x: __m512) -> __m512 {
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for.
    unsafe {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
            _mm512_set1_ps(88.0),
        );
        let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, k)
    }
}

/// 1 / d for 16 lanes without a division: `vrcp14ps` and one Newton step (~2^-28 relative).
#[inline(always)]
pub(crate) unsafe fn recip16(d: __m512) -> __m512 {
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for.
    unsafe {
        let r = _mm512_rcp14_ps(d);
        _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0)))
    }
}

/// softplus for 16 lanes: max(v, 0) + ln(1 + t), t = e^-|v| in (0, 1], as 2 atanh(t / (2 + t))
/// (a series in s^2 with s <= 1/3, to ~1e-7), with no division.
#[inline(always)]
pub(crate) unsafe fn softplus16(v: __m512) -> __m512 {
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for.
    unsafe {
        let t = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(v)));
        let sv = _mm512_mul_ps(t, recip16(_mm512_add_ps(t, _mm512_set1_ps(2.0))));
        let s2 = _mm512_mul_ps(sv, sv);
        let mut p = _mm512_set1_ps(1.0 / 11.0);
        for c in [1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0] {
            p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(c));
        }
        let log1p = _mm512_mul_ps(_mm512_add_ps(sv, sv), p);
        _mm512_add_ps(_mm512_max_ps(v, _mm512_setzero_ps()), log1p)
    }
}

/// SiLU for 16 lanes: v / (1 + e^-v), the division by `recip16`.
#[inline(always)]
pub(crate) unsafe fn silu16(v: __m512) -> __m512 {
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for.
    unsafe {
        let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), v));
        _mm512_mul_ps(v, recip16(_mm512_add_ps(_mm512_set1_ps(1.0), e)))
    }
}

/// Calls `f(mask, offset)` for every 16-lane vector of `len` values, the last one masked.
#[inline(always)]
fn by_vectors(len: usize, mut f: impl FnMut(__mmask16, usize)) {
    for at in (0..len).step_by(16) {
        let left = (len - at).min(16);
        f(((1u32 << left) - 1) as __mmask16, at);
    }
}

/// v = silu(v) in place.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub(crate) unsafe fn silu_in_place(v: &mut [f32]) {
    // SAFETY: this function's contract: the caller checked AVX-512; the masks keep every load
    // and store inside `v`.
    unsafe {
        let p = v.as_mut_ptr();
        by_vectors(v.len(), |m, at| {
            let x = _mm512_maskz_loadu_ps(m, p.add(at));
            _mm512_mask_storeu_ps(p.add(at), m, silu16(x));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The division-free AVX-512 softplus and reciprocal agree with f64 math.
    #[test]
    fn vector_softplus_and_reciprocal_are_accurate() {
        if !crate::simd::has_avx512() {
            return;
        }
        let xs: Vec<f32> = (0..1600).map(|i| -40.0 + i as f32 * 0.05).collect();
        for chunk in xs.chunks_exact(16) {
            let (mut sp, mut rc) = ([0f32; 16], [0f32; 16]);
            // SAFETY: AVX-512F is present (checked above); arrays of 16 lanes.
            unsafe {
                let v = _mm512_loadu_ps(chunk.as_ptr());
                _mm512_storeu_ps(sp.as_mut_ptr(), softplus16(v));
                let d = _mm512_add_ps(_mm512_abs_ps(v), _mm512_set1_ps(0.5));
                _mm512_storeu_ps(rc.as_mut_ptr(), recip16(d));
            }
            for (i, &x) in chunk.iter().enumerate() {
                let x = x as f64;
                let want = x.max(0.0) + (-x.abs()).exp().ln_1p();
                assert!(
                    (sp[i] as f64 - want).abs() <= 2e-7 * want.max(1.0),
                    "softplus({x})"
                );
                let want = 1.0 / (x.abs() + 0.5);
                assert!(
                    (rc[i] as f64 - want).abs() <= 2e-7 * want,
                    "1/{}",
                    x.abs() + 0.5
                );
            }
        }
    }

    /// The AVX-512 SiLU agrees with f64 math, over whole vectors and a masked tail.
    #[test]
    fn vector_silu_is_accurate() {
        if !crate::simd::has_avx512() {
            return;
        }
        let xs: Vec<f32> = (0..1603).map(|i| -90.0 + i as f32 * 0.11).collect();
        let mut s = xs.clone();
        // SAFETY: AVX-512 checked above.
        unsafe { silu_in_place(&mut s) };
        for (i, &x) in xs.iter().enumerate() {
            let x64 = x as f64;
            let want = x64 / (1.0 + (-x64).exp());
            // Below about -87 both are ~0 (the exponential clamps, as `math::exp` does).
            let ok = (s[i] as f64 - want).abs() <= 3e-7 * want.abs() + 1e-30;
            assert!(ok, "silu({x}) = {} against {want}", s[i]);
        }
    }
}
