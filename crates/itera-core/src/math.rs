//! Scalar math written so that loops over it vectorise (libm's expf is an opaque call).

/// How a kernel computes `a * b + c` (see `multiversion!`): `Fused` in the AVX2 and AVX-512
/// versions (one FMA, one rounding), `Separate` in the baseline one and everywhere else.
pub trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// One fused multiply-add: an instruction where the function is compiled with FMA.
pub enum Fused {}

/// A multiply, then an add: what plain `a * b + c` computes.
pub enum Separate {}

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// e^x to ~2 ulp: 2^k * P(r) with r = x - k ln2 in [-ln2/2, ln2/2] and a degree-6 polynomial.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp_with::<Separate>(x)
}

/// `exp` with its multiply-adds computed as `M` says.
#[inline(always)]
pub fn exp_with<M: MulAdd>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by adding and removing 1.5 * 2^23 (plain SSE2; floor() would be a libm call).
    // The sum's low mantissa bits then hold k as an integer, so 2^k is built with integer ops only
    // (a float-to-int `as` cast saturates, which LLVM cannot vectorise).
    const SHIFT: f32 = 12_582_912.0;
    let shifted = M::mul_add(x, LOG2E, SHIFT);
    let k = shifted - SHIFT;
    let r = M::mul_add(k, -LN2_LO, M::mul_add(k, -LN2_HI, x));
    let mut p = M::mul_add(r, 1.0 / 720.0, 1.0 / 120.0);
    for c in [1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = M::mul_add(r, p, c);
    }
    let two_k = shifted.to_bits().wrapping_sub(SHIFT.to_bits() - 127) << 23;
    p * f32::from_bits(two_k)
}

/// Natural log for positive normal x, to ~1 ulp, branch-free so loops over it vectorise:
/// x = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s), s = (m - 1) / (m + 1).
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xFF) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007F_FFFF) | 0x3F80_0000);
    let big = m > std::f32::consts::SQRT_2;
    m = if big { m * 0.5 } else { m };
    e += big as i32;
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let p = 1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0))));
    2.0 * s * p + e as f32 * std::f32::consts::LN_2
}

/// ln(1 + v) for v >= 0, accurate also for tiny v (the rounding of 1 + v is corrected).
#[inline(always)]
pub fn ln_1p(v: f32) -> f32 {
    let u = 1.0 + v;
    ln(u) - ((u - 1.0) - v) / u
}

/// softplus(v) = ln(1 + e^v), computed without overflow.
#[inline(always)]
pub fn softplus(v: f32) -> f32 {
    softplus_with::<Separate>(v)
}

/// `softplus` with `exp_with::<M>`.
#[inline(always)]
pub fn softplus_with<M: MulAdd>(v: f32) -> f32 {
    v.max(0.0) + ln_1p(exp_with::<M>(-v.abs()))
}

#[inline(always)]
pub fn sigmoid(v: f32) -> f32 {
    sigmoid_with::<Separate>(v)
}

/// `sigmoid` with `exp_with::<M>`.
#[inline(always)]
pub fn sigmoid_with<M: MulAdd>(v: f32) -> f32 {
    1.0 / (1.0 + exp_with::<M>(-v))
}

/// SiLU (swish): v * sigmoid(v).
#[inline(always)]
pub fn silu(v: f32) -> f32 {
    silu_with::<Separate>(v)
}

/// `silu` with `exp_with::<M>`.
#[inline(always)]
pub fn silu_with<M: MulAdd>(v: f32) -> f32 {
    v * sigmoid_with::<M>(v)
}

crate::multiversion! {
    /// The SwiGLU gate in place: g = silu(g) * u, element by element. Vectorised: as a plain
    /// loop it compiled to SSE2 and took 1.55 us of Q4_0 `tiny`'s ~31 us decode step (four
    /// layers of 256 values), 0.55 us now (`itera bench --only phases`; performance.md).
    /// (`lanes16`'s division-free SiLU did not make it faster: twenty-eighth session.)
    pub fn swiglu_gate<M>(g: &mut [f32], u: &[f32]) {
        for (g, u) in g.iter_mut().zip(u) {
            *g = silu_with::<M>(*g) * u;
        }
    }
}

/// v = silu(v) in place (the conv's activation): `lanes16` on AVX-512, else `silu`.
pub fn silu_in_place(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx512() {
        // SAFETY: AVX-512 checked.
        return unsafe { crate::lanes16::silu_in_place(v) };
    }
    silu_in_place_portable(v)
}

crate::multiversion! {
    fn silu_in_place_portable(v: &mut [f32]) {
        for x in v.iter_mut() {
            *x = silu(*x);
        }
    }
}

/// log(sum(exp(row))) computed stably.
#[inline(always)]
pub fn log_sum_exp(row: &[f32]) -> f32 {
    let max = max(row);
    max + sum_exp(row, max).ln()
}

/// The largest value (-inf for an empty row).
#[inline(always)]
pub fn max(row: &[f32]) -> f32 {
    row.iter().cloned().fold(f32::NEG_INFINITY, f32::max)
}

/// RMSNorm of one row: out = x / sqrt(mean(x^2) + eps) * w.
#[inline(always)]
pub fn rms_norm(x: &[f32], w: &[f32], eps: f64, out: &mut [f32]) {
    let ms = dot(x, x) / x.len() as f32;
    let inv = 1.0 / (ms + eps as f32).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

crate::multiversion! {
    /// `rms_norm` of every row of x ([rows, w.len()]).
    pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f64, out: &mut [f32]) {
        let d = w.len();
        for (xr, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            rms_norm(xr, w, eps, o);
        }
    }
}

/// Indices of the k largest values, largest first; ties go to the lower index.
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx = Vec::with_capacity(values.len());
    top_k_into(values, k, &mut idx);
    idx
}

/// `top_k` into a reused buffer (no allocation once it has grown to `values.len()`).
pub fn top_k_into(values: &[f32], k: usize, idx: &mut Vec<usize>) {
    idx.clear();
    idx.extend(0..values.len());
    idx.sort_by(|&a, &b| {
        values[b]
            .partial_cmp(&values[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    idx.truncate(k);
}

crate::multiversion! {
    /// out_i = e^(v_i * scale - shift); returns their sum (8 independent lanes, so it vectorises).
    pub fn exp_into(values: &[f32], scale: f32, shift: f32, out: &mut [f32]) -> f32 {
        assert_eq!(values.len(), out.len());
        let mut acc = [0.0f32; 8];
        let mut oc = out.chunks_exact_mut(8);
        let mut vc = values.chunks_exact(8);
        for (o, v) in (&mut oc).zip(&mut vc) {
            for i in 0..8 {
                o[i] = exp(v[i] * scale - shift);
                acc[i] += o[i];
            }
        }
        let mut tail = 0.0;
        for (o, &v) in oc.into_remainder().iter_mut().zip(vc.remainder()) {
            *o = exp(v * scale - shift);
            tail += *o;
        }
        acc.iter().sum::<f32>() + tail
    }
}

/// Independent lanes of the exp sums: one AVX-512 register (two on AVX2). With 8, the
/// AVX-512 builds ran them at half width (ymm) (2026-12-01, the LM-head loss's profile).
const EXP_LANES: usize = 16;

/// sum_i e^(v_i - shift), in independent lanes so it vectorises.
#[inline(always)]
pub fn sum_exp(values: &[f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; EXP_LANES];
    let chunks = values.chunks_exact(EXP_LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| exp(v - shift)).sum();
    for c in chunks {
        for i in 0..EXP_LANES {
            acc[i] += exp(c[i] - shift);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// v_i = e^(v_i - shift) in place; returns their sum (independent lanes, so it vectorises).
#[inline(always)]
pub fn exp_in_place(values: &mut [f32], shift: f32) -> f32 {
    exp_in_place_with::<Separate>(values, shift)
}

/// `exp_in_place` with `exp_with::<M>`.
#[inline(always)]
pub fn exp_in_place_with<M: MulAdd>(values: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; EXP_LANES];
    let mut chunks = values.chunks_exact_mut(EXP_LANES);
    for c in &mut chunks {
        for i in 0..EXP_LANES {
            c[i] = exp_with::<M>(c[i] - shift);
            acc[i] += c[i];
        }
    }
    let mut tail = 0.0;
    for v in chunks.into_remainder() {
        *v = exp_with::<M>(*v - shift);
        tail += *v;
    }
    acc.iter().sum::<f32>() + tail
}

/// Dot product in 8 independent lanes so the compiler vectorises it.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

crate::multiversion! {
    /// Index of the largest value (the first one on ties): one pass in 16 lanes, each keeping its
    /// best value and where it was, so it vectorises (no second pass to find the position).
    pub fn argmax(v: &[f32]) -> usize {
        let mut best = [f32::NEG_INFINITY; 16];
        let mut at = [0u32; 16];
        let chunks = v.chunks_exact(16);
        let tail_start = v.len() - chunks.remainder().len();
        for (ci, c) in chunks.enumerate() {
            let base = (ci * 16) as u32;
            for i in 0..16 {
                let better = c[i] > best[i];
                best[i] = if better { c[i] } else { best[i] };
                at[i] = if better { base + i as u32 } else { at[i] };
            }
        }
        let (mut m, mut pos) = (f32::NEG_INFINITY, 0usize);
        for i in 0..16 {
            let p = at[i] as usize;
            if best[i] > m || (best[i] == m && p < pos) {
                (m, pos) = (best[i], p);
            }
        }
        for (j, &x) in v[tail_start..].iter().enumerate() {
            if x > m {
                (m, pos) = (x, tail_start + j);
            }
        }
        pos
    }
}

/// Sum in 8 independent lanes.
#[inline(always)]
pub fn sum(a: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_accurate_over_the_useful_range() {
        let mut worst = 0.0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let (a, b) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.013;
        }
        assert!(worst < 5e-7, "max relative error {worst}");
        assert_eq!(super::exp(-1000.0), super::exp(-87.0));
    }

    #[test]
    fn argmax_finds_the_first_largest() {
        let v: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32).collect();
        assert_eq!(
            super::argmax(&v),
            v.iter().position(|&x| x == 100.0).unwrap()
        );
        assert_eq!(super::argmax(&[1.0, 3.0, 3.0]), 1);
        // Ties in different lanes, chunks and the tail: the first index wins.
        let mut v = vec![0.0f32; 70];
        for i in [40, 17, 33, 69] {
            v[i] = 5.0;
        }
        assert_eq!(super::argmax(&v), 17);
        v[3] = 5.0;
        assert_eq!(super::argmax(&v), 3);
        v[66] = 6.0;
        assert_eq!(super::argmax(&v), 66);
        assert_eq!(super::argmax(&[-1.0]), 0);
    }

    #[test]
    fn ln_and_ln_1p_are_accurate() {
        let mut worst = 0.0f64;
        let mut x = 1e-30f32;
        while x < 1e30 {
            let (a, b) = (super::ln(x) as f64, (x as f64).ln());
            worst = worst.max((a - b).abs() / b.abs().max(1.0));
            x *= 1.0123;
        }
        assert!(worst < 3e-7, "ln: max error {worst}");
        let mut worst = 0.0f64;
        let mut v = 1e-12f32;
        while v <= 1.0 {
            let (a, b) = (super::ln_1p(v) as f64, (v as f64).ln_1p());
            worst = worst.max(((a - b) / b).abs());
            v *= 1.01;
        }
        assert!(worst < 1e-6, "ln_1p: max relative error {worst}");
    }
}
