//! One weight-matrix type for every storage format, and the one matmul per format that the runtime
//! (decode, batched decode, prefill) calls. Dispatch happens here, once per call: AVX-512 VNNI
//! integer kernels where the CPU has them, else portable code compiled for AVX2 + FMA or baseline.
//!
//! Block formats compute in integers: the activations are quantized to int8 per block of 32
//! (`QuantizedRows`), and every block format is `w = scale * code + bias` with unsigned codes
//! (`quant::block_codes`), so one kernel shape serves Q8_0, Q5_0, Q4_0, Q4_1 and NF4:
//! `sum_i w_i x_i = scale * dx * sum_i code_i q_i + bias * dx * sum_i q_i`.

use half::f16;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::math::dot;
use crate::quant::{self, DType, BLOCK};

/// A [rows, cols] weight matrix, row-major, in its storage format, packed for the kernels.
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    data: Data,
}

enum Data {
    /// f32 in panels of `PANEL` rows, k-major: panel p holds rows 32p..32p+32 as [cols][32]
    /// (zero-padded), so a kernel broadcasts one activation and multiplies 32 rows at once.
    F32(Vec<f32>),
    /// f16 or bf16 bits.
    Half(Vec<u16>),
    Blocks(Blocks),
}

/// Block formats repacked for SIMD: per row, codes of 8 bits (Q8_0) or 4 bits in "pair order"
/// (for each 64 elements, byte j holds element j in its low nibble and element j + 32 in its high
/// one, so one shift and mask give 64 codes in order); a trailing odd block keeps ggml's order.
struct Blocks {
    codes: Vec<u8>,
    /// Q5_0's fifth bit, one u32 per block (bit j = element j).
    high: Vec<u32>,
    scale: Vec<f32>,
    bias: Vec<f32>,
    table: Option<[u8; 16]>,
    nibbles: bool,
}

impl Blocks {
    /// Codes of block `blk` of `row` (with Q5_0's high bit and NF4's table applied).
    #[inline(always)]
    fn block(&self, row: usize, nb: usize, blk: usize) -> [u8; BLOCK] {
        let mut q = [0u8; BLOCK];
        if !self.nibbles {
            let o = (row * nb + blk) * BLOCK;
            q.copy_from_slice(&self.codes[o..o + BLOCK]);
        } else {
            let base = row * nb * BLOCK / 2;
            if blk / 2 * 2 + 1 < nb {
                let bytes = &self.codes[base + blk / 2 * 32..][..32];
                let shift = if blk.is_multiple_of(2) { 0 } else { 4 };
                for (c, b) in q.iter_mut().zip(bytes) {
                    *c = (b >> shift) & 0x0F;
                }
            } else {
                let bytes = &self.codes[base + blk / 2 * 32..][..16];
                for j in 0..16 {
                    q[j] = bytes[j] & 0x0F;
                    q[j + 16] = bytes[j] >> 4;
                }
            }
        }
        if !self.high.is_empty() {
            let h = self.high[row * nb + blk];
            for (j, c) in q.iter_mut().enumerate() {
                *c |= (((h >> j) & 1) as u8) << 4;
            }
        }
        if let Some(t) = &self.table {
            q = q.map(|c| t[c as usize]);
        }
        q
    }
}

/// Activation rows quantized to int8 per block of 32: values, scale and scale * sum of values.
#[derive(Default)]
pub struct QuantizedRows {
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

crate::multiversion! {
    fn quantize_rows(x: &[f32], cols: usize, out: &mut QuantizedRows) {
        let blocks = x.len() / BLOCK;
        out.q.resize(x.len(), 0);
        out.d.resize(blocks, 0.0);
        out.s.resize(blocks, 0.0);
        debug_assert_eq!(cols % BLOCK, 0);
        for (b, (xb, qb)) in x.chunks_exact(BLOCK).zip(out.q.chunks_exact_mut(BLOCK)).enumerate() {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in qb.iter_mut().zip(xb) {
                let r = (v * id).round() as i32;
                *q = r as i8;
                sum += r;
            }
            out.d[b] = d;
            out.s[b] = d * sum as f32;
        }
    }
}

crate::multiversion! {
    /// Portable block dot product (also the AVX-512 kernel's odd trailing block).
    fn dot_blocks_portable(m: &Blocks, row: usize, nb: usize, first: usize, xq: &[i8], xd: &[f32], xs: &[f32]) -> f32 {
        let mut acc = 0.0f32;
        for blk in first..nb {
            let codes = m.block(row, nb, blk);
            let xb = &xq[blk * BLOCK..(blk + 1) * BLOCK];
            let mut isum = 0i32;
            for i in 0..BLOCK {
                isum += codes[i] as i32 * xb[i] as i32;
            }
            acc += m.scale[row * nb + blk] * xd[blk] * isum as f32;
        }
        for (b, s) in m.bias[row * nb..(row + 1) * nb].iter().zip(xs) {
            acc += b * s;
        }
        acc
    }
}

/// The AVX-512 VNNI kernel: one weight row against X activation rows; each pair of blocks is
/// unpacked once and feeds X `vpdpbusd`s (64 codes each). Writes the X dot products to `out`.
/// Not itself a `target_feature` function: it is always inlined into the AVX-512 entry points
/// below (`block_rows_avx512`, `block_matmul_avx512`), so the loops over weight rows carry no
/// call per row. Only call it from such a function.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_blocks_avx512<const X: usize>(
    m: &Blocks,
    row: usize,
    nb: usize,
    x: &QuantizedRows,
    x_first: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let pairs = nb / 2;
    let sb = row * nb;
    let (scale, bias) = (&m.scale[sb..sb + nb], &m.bias[sb..sb + nb]);
    let mut acc = [_mm512_setzero_ps(); X];
    let unpack = Unpack::new(m);
    let xrow = |j: usize| x_first + j;
    for p in 0..pairs {
        let u = unpack.pair(m, row, nb, p);
        let (s0, s1) = (scale[2 * p], scale[2 * p + 1]);
        for (j, a) in acc.iter_mut().enumerate() {
            let (qo, bo) = (xrow(j) * nb * BLOCK + p * 64, xrow(j) * nb + 2 * p);
            let xv = _mm512_loadu_si512(x.q.as_ptr().add(qo) as *const _);
            let isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, xv);
            let sv = _mm512_mask_blend_ps(
                0xFF00,
                _mm512_set1_ps(s0 * *x.d.get_unchecked(bo)),
                _mm512_set1_ps(s1 * *x.d.get_unchecked(bo + 1)),
            );
            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sv, *a);
        }
    }
    for (j, a) in acc.iter().enumerate() {
        let xs = &x.s[xrow(j) * nb..(xrow(j) + 1) * nb];
        let mut total = _mm512_reduce_add_ps(*a);
        for b in 0..nb {
            total += bias[b] * xs[b];
        }
        if nb % 2 == 1 {
            // The odd trailing block, in portable code (its bias is already counted above).
            let blk = nb - 1;
            let codes = m.block(row, nb, blk);
            let xb = &x.q[(xrow(j) * nb + blk) * BLOCK..][..BLOCK];
            let isum: i32 = codes
                .iter()
                .zip(xb)
                .map(|(&c, &q)| c as i32 * q as i32)
                .sum();
            total += scale[blk] * x.d[xrow(j) * nb + blk] * isum as f32;
        }
        out[j] = total;
    }
}

/// Constants for turning a pair of blocks of codes into 64 unsigned bytes.
#[cfg(target_arch = "x86_64")]
struct Unpack {
    low: std::arch::x86_64::__m256i,
    sixteen: std::arch::x86_64::__m512i,
    table: Option<std::arch::x86_64::__m512i>,
}

#[cfg(target_arch = "x86_64")]
impl Unpack {
    #[inline(always)]
    unsafe fn new(m: &Blocks) -> Self {
        use std::arch::x86_64::*;
        Self {
            low: _mm256_set1_epi8(0x0F),
            sixteen: _mm512_set1_epi8(0x10),
            table: m
                .table
                .map(|t| _mm512_broadcast_i32x4(_mm_loadu_si128(t.as_ptr() as *const __m128i))),
        }
    }

    /// The 64 codes of blocks 2p and 2p + 1 of `row` (nibbles split, Q5_0's fifth bit and
    /// NF4's table applied). Unchecked: the caller keeps `row` and `p` inside the matrix.
    #[inline(always)]
    unsafe fn pair(
        &self,
        m: &Blocks,
        row: usize,
        nb: usize,
        p: usize,
    ) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let mut u = if m.nibbles {
            let ptr = m.codes.as_ptr().add(row * nb * BLOCK / 2 + p * 32);
            let v = _mm256_loadu_si256(ptr as *const __m256i);
            let lo = _mm256_and_si256(v, self.low);
            let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), self.low);
            _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
        } else {
            _mm512_loadu_si512(m.codes.as_ptr().add((row * nb + 2 * p) * BLOCK) as *const _)
        };
        if !m.high.is_empty() {
            let h = m.high.as_ptr().add(row * nb + 2 * p);
            let mask = *h as u64 | (*h.add(1) as u64) << 32;
            u = _mm512_or_si512(u, _mm512_maskz_mov_epi8(mask, self.sixteen));
        }
        if let Some(t) = self.table {
            u = _mm512_shuffle_epi8(t, u);
        }
        u
    }
}

/// Rows row0..row0 + 16 against activation row `xr` (nb even, at most 16): each row's products
/// stay in its own vector (scales applied per pair of blocks as one [s0 x 8, s1 x 8] vector, the
/// bias term added in lanes 0..nb), and one transposing tree of adds turns the 16 vectors into
/// the 16 dot products, instead of a horizontal reduction per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn rows16_avx512(
    m: &Blocks,
    row0: usize,
    nb: usize,
    x: &QuantizedRows,
    xr: usize,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let unpack = Unpack::new(m);
    let mut acc = [_mm512_setzero_ps(); 16];
    for p in 0..nb / 2 {
        let xv = _mm512_loadu_si512(x.q.as_ptr().add((xr * nb + 2 * p) * BLOCK) as *const _);
        let xd = pair_of(x.d.as_ptr().add(xr * nb + 2 * p));
        for (r, a) in acc.iter_mut().enumerate() {
            let row = row0 + r;
            let isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), unpack.pair(m, row, nb, p), xv);
            let sc = _mm512_mul_ps(pair_of(m.scale.as_ptr().add(row * nb + 2 * p)), xd);
            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sc, *a);
        }
    }
    let lanes = ((1u32 << nb) - 1) as u16;
    let xs = _mm512_maskz_loadu_ps(lanes, x.s.as_ptr().add(xr * nb));
    for (r, a) in acc.iter_mut().enumerate() {
        let bias = _mm512_maskz_loadu_ps(lanes, m.bias.as_ptr().add((row0 + r) * nb));
        *a = _mm512_fmadd_ps(bias, xs, *a);
    }
    sum16(&acc)
}

/// The lane sums of 16 vectors as one vector (lane r = sum of acc[r]): a transposing tree of
/// 15 adds, instead of 16 horizontal reductions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn sum16(acc: &[std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
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

/// [s0 x 8, s1 x 8] from the two floats at `p`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pair_of(p: *const f32) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let both = _mm512_castpd_ps(_mm512_set1_pd((p as *const f64).read_unaligned()));
    _mm512_permutexvar_ps(halves, both)
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

fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| has_avx512() && std::arch::is_x86_feature_detected!("avx512vnni"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The instruction set the block kernels use on this machine, for reports.
pub fn level() -> &'static str {
    if has_avx512_vnni() {
        "avx512-vnni"
    } else {
        crate::simd::level()
    }
}

/// One activation row against weight rows first..first + out.len(): the decode matvec, in one
/// call so the set-up is paid once per matrix, not per row (the row kernel is inlined here).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn matvec_blocks_avx512(
    m: &Blocks,
    first: usize,
    nb: usize,
    x: &QuantizedRows,
    out: &mut [f32],
) {
    use std::arch::x86_64::_mm512_storeu_ps;
    let mut j = 0;
    if nb.is_multiple_of(2) && nb <= 16 {
        assert!((first + out.len()) * nb <= m.scale.len() && x.q.len() >= nb * BLOCK);
        while j + 16 <= out.len() {
            _mm512_storeu_ps(
                out.as_mut_ptr().add(j),
                rows16_avx512(m, first + j, nb, x, 0),
            );
            j += 16;
        }
    }
    for (k, o) in out[j..].iter_mut().enumerate() {
        dot_blocks_avx512::<1>(m, first + j + k, nb, x, 0, std::slice::from_mut(o));
    }
}

/// One weight row against activation rows x_first..x_first + out.len(), four at a time (the
/// unpacked codes are reused for four activation rows).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block_rows_avx512(
    m: &Blocks,
    row: usize,
    nb: usize,
    x: &QuantizedRows,
    x_first: usize,
    out: &mut [f32],
) {
    assert!((x_first + out.len()) * nb <= x.d.len() && (row + 1) * nb <= m.scale.len());
    let mut j = 0;
    while j + 4 <= out.len() {
        dot_blocks_avx512::<4>(m, row, nb, x, x_first + j, &mut out[j..j + 4]);
        j += 4;
    }
    while j < out.len() {
        dot_blocks_avx512::<1>(m, row, nb, x, x_first + j, &mut out[j..j + 1]);
        j += 1;
    }
}

/// All weight rows against `n` activation rows (x_first..): y [n, rows], in one call: groups of
/// 16 rows through `rows16_avx512`, the rest one row at a time for four activation rows at once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block_matmul_avx512(
    m: &Blocks,
    rows: usize,
    nb: usize,
    x: &QuantizedRows,
    x_first: usize,
    n: usize,
    y: &mut [f32],
) {
    use std::arch::x86_64::_mm512_storeu_ps;
    assert!((x_first + n) * nb <= x.d.len() && rows * nb <= m.scale.len() && y.len() >= n * rows);
    let mut r = 0;
    if nb.is_multiple_of(2) && nb <= 16 {
        // Groups of 16 weight rows (in L1 while every activation row passes).
        while r + 16 <= rows {
            for i in 0..n {
                let v = rows16_avx512(m, r, nb, x, x_first + i);
                _mm512_storeu_ps(y.as_mut_ptr().add(i * rows + r), v);
            }
            r += 16;
        }
    }
    let mut out = [0.0f32; 4];
    for r in r..rows {
        let mut j = 0;
        while j + 4 <= n {
            dot_blocks_avx512::<4>(m, r, nb, x, x_first + j, &mut out);
            for (k, &v) in out.iter().enumerate() {
                *y.get_unchecked_mut((j + k) * rows + r) = v;
            }
            j += 4;
        }
        while j < n {
            dot_blocks_avx512::<1>(m, r, nb, x, x_first + j, &mut out[..1]);
            *y.get_unchecked_mut(j * rows + r) = out[0];
            j += 1;
        }
    }
}

/// Dot products of weight row `row` with activation rows x_first.. (as many as `out` holds).
#[inline(always)]
fn dot_blocks(
    m: &Blocks,
    row: usize,
    nb: usize,
    x: &QuantizedRows,
    x_first: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512_vnni() {
        // SAFETY: the CPU has AVX-512 F/BW/VNNI (checked); `block_rows_avx512` asserts the bounds
        // that keep every load inside the row's codes and the activation rows' slices.
        unsafe { block_rows_avx512(m, row, nb, x, x_first, out) };
        return;
    }
    for (j, o) in out.iter_mut().enumerate() {
        let xr = x_first + j;
        *o = dot_blocks_portable(
            m,
            row,
            nb,
            0,
            &x.q[xr * nb * BLOCK..(xr + 1) * nb * BLOCK],
            &x.d[xr * nb..(xr + 1) * nb],
            &x.s[xr * nb..(xr + 1) * nb],
        );
    }
}

/// Half-precision weight rows [first, first + count) (row length `c`, a multiple of 16) against
/// `n` activation rows x [n, c]: output (i, r) goes to `y[i * ystride + r - first]`. Groups of 16
/// weight rows stay in L1 while every activation row passes, each row in its own vector (f16
/// through `vcvtph2ps`, bf16 by a shift) and one `sum16` tree per group; the last rows one at a
/// time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_half_avx512(
    w: &[u16],
    c: usize,
    bf16: bool,
    first: usize,
    count: usize,
    x: &[f32],
    y: &mut [f32],
    ystride: usize,
) {
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

crate::multiversion! {
    fn dot_half(bits: &[u16], x: &[f32], bf16: bool) -> f32 {
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

thread_local! {
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Threads a kernel call may use: the pool's, or 1 inside `serial`.
pub fn threads() -> usize {
    if SERIAL.with(|c| c.get()) {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// Runs `f` with every kernel on the calling thread (for callers that already split the work
/// between threads at a coarser grain).
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    let before = SERIAL.with(|c| c.replace(true));
    let out = f();
    SERIAL.with(|c| c.set(before));
    out
}

/// Below this many multiply-adds a call runs on the calling thread: waking a sleeping worker costs
/// tens of microseconds, more than small matmuls take (measured with `itera bench`: 8 batched
/// streams ran 1.3x faster once only ~2M-MAC calls went parallel; a single decode row is
/// memory-bound and `tiny`'s 1M-weight LM head ran 10% slower on two threads than on one).
fn parallel_work(_n: usize) -> usize {
    1 << 21
}

impl Matrix {
    pub fn from_f32(rows: usize, cols: usize, values: Vec<f32>) -> Result<Self> {
        if values.len() != rows * cols {
            return Err(Error::Argument(format!(
                "matrix [{rows}, {cols}] needs {} values, got {}",
                rows * cols,
                values.len()
            )));
        }
        Ok(Self {
            rows,
            cols,
            dtype: DType::F32,
            data: Data::F32(pack_panels(rows, cols, &values)),
        })
    }

    /// Packs a tensor stored in `dtype`'s ggml byte layout (as read from GGUF).
    pub fn from_ggml(dtype: DType, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        let n = rows * cols;
        if !cols.is_multiple_of(dtype.block_len()) || bytes.len() != dtype.bytes_for(n)? {
            return Err(Error::Format(format!(
                "{} matrix [{rows}, {cols}] needs rows that are whole blocks and {} bytes, got {}",
                dtype.name(),
                dtype.bytes_for(n).unwrap_or(0),
                bytes.len()
            )));
        }
        let data = match dtype {
            DType::F32 => Data::F32(pack_panels(
                rows,
                cols,
                &quant::dequantize(dtype, bytes, n)?,
            )),
            DType::F16 | DType::BF16 => Data::Half(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            _ => Data::Blocks(repack(dtype, rows, cols, bytes)),
        };
        Ok(Self {
            rows,
            cols,
            dtype,
            data,
        })
    }

    /// Quantizes f32 values (row-major [rows, cols]) into `dtype`.
    pub fn quantize(dtype: DType, rows: usize, cols: usize, values: &[f32]) -> Result<Self> {
        if dtype == DType::F32 {
            return Self::from_f32(rows, cols, values.to_vec());
        }
        Self::from_ggml(dtype, rows, cols, &quant::quantize(dtype, values)?)
    }

    /// Bytes the packed weights occupy in memory.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::F32(v) => v.len() * 4,
            Data::Half(v) => v.len() * 2,
            Data::Blocks(b) => b.codes.len() + 4 * (b.high.len() + b.scale.len() + b.bias.len()),
        }
    }

    /// Row `r` decoded to f32 (embedding lookup).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        match &self.data {
            Data::F32(v) => {
                let panel = &v[r / PANEL * PANEL * c..];
                for (k, o) in out.iter_mut().enumerate() {
                    *o = panel[k * PANEL + r % PANEL];
                }
            }
            Data::Half(v) => {
                let bits = &v[r * c..(r + 1) * c];
                if self.dtype == DType::BF16 {
                    for (o, &b) in out.iter_mut().zip(bits) {
                        *o = f32::from_bits((b as u32) << 16);
                    }
                } else {
                    // `half` converts with F16C where the CPU has it, many values per instruction.
                    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
                    let halves: &[f16] = bits.reinterpret_cast();
                    halves.convert_to_f32_slice(&mut out[..c]);
                }
            }
            Data::Blocks(b) => {
                let nb = c / BLOCK;
                for blk in 0..nb {
                    let (s, bias) = (b.scale[r * nb + blk], b.bias[r * nb + blk]);
                    for (o, &q) in out[blk * BLOCK..].iter_mut().zip(&b.block(r, nb, blk)) {
                        *o = s * q as f32 + bias;
                    }
                }
            }
        }
    }

    /// The whole matrix decoded to f32 (for analysis and tests, not for inference).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols).enumerate() {
            self.row_into(r, o);
        }
        out
    }

    /// y [n, rows] = x [n, cols] · selfᵀ, for n activation rows. `q` is a reusable buffer.
    pub fn matmul(&self, x: &[f32], y: &mut [f32], q: &mut QuantizedRows) {
        let (rows, cols) = (self.rows, self.cols);
        let n = x.len() / cols;
        assert_eq!(x.len(), n * cols, "matmul: x is not whole rows of {cols}");
        assert_eq!(y.len(), n * rows, "matmul: y must be [{n}, {rows}]");
        if n == 0 {
            return;
        }
        match &self.data {
            Data::F32(w) if n == 1 => return panel_matvec(w, rows, cols, x, y),
            Data::F32(_) => return self.panel_matmul(x, y),
            _ if n >= DECODE_PANELS_FROM => return self.panel_matmul(x, y),
            _ => {}
        }
        if let Data::Blocks(_) = &self.data {
            quantize_rows(x, cols, q);
        }
        let q = &*q;
        let parallel = n * rows * cols >= parallel_work(n) && threads() > 1;
        let pair = n * rows * cols >= PAIR_FROM && crate::pair::available();
        if pair && n == 1 && rows >= 32 {
            // The weight rows split between this thread and the pair helper.
            let at = rows.div_ceil(32) * 16;
            crate::pair::both_parts(y, at, |half, ys| self.rows_range(x, half * at, ys, q));
        } else if pair && n > 1 {
            let at = n.div_ceil(2);
            let (x0, x1) = x.split_at(at * cols);
            crate::pair::both_parts(y, at * rows, |half, ys| {
                self.rows_tiled(if half == 0 { x0 } else { x1 }, half * at, ys, q)
            });
        } else if !parallel {
            self.rows_range(x, 0, y, q);
        } else if n == 1 {
            // One activation row: split the weight rows between threads.
            let chunk = rows.div_ceil(threads() * 2).max(32);
            y.par_chunks_mut(chunk).enumerate().for_each(|(i, ys)| {
                self.rows_range(x, i * chunk, ys, q);
            });
        } else {
            // Several activation rows: split them, each thread sweeping all weight rows.
            let per = n.div_ceil(threads());
            y.par_chunks_mut(per * rows)
                .zip(x.par_chunks(per * cols))
                .enumerate()
                .for_each(|(i, (ys, xs))| self.rows_tiled(xs, i * per, ys, q));
        }
    }

    /// Several activation rows through the f32 micro-tiles: threads split the activation rows
    /// and walk the weight panels outermost (f32 panels are read in place; other formats decode
    /// one panel into an L1-sized buffer), so a panel stays in L1 while every tile of rows passes.
    fn panel_matmul(&self, x: &[f32], y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        let n = x.len() / cols;
        let threads = threads();
        let parallel = n * rows * cols >= parallel_work(n) && threads > 1;
        let tiles = n.div_ceil(MR);
        let per = if parallel {
            tiles.div_ceil(threads)
        } else {
            tiles
        };
        // An output far bigger than L2 is written with non-temporal stores: no read-for-ownership
        // of lines that are only overwritten (the LM head over 2,048 rows: 1.28x, measured).
        let stream = y.len() * 4 >= STREAM_FROM_BYTES
            && (y.as_ptr() as usize).is_multiple_of(64)
            && rows.is_multiple_of(16);
        let work = |(ys, xs): (&mut [f32], &[f32])| {
            let m = xs.len() / cols;
            if let Data::F32(w) = &self.data {
                return panel_rows(w, rows, cols, xs, m, ys, rows, 0, rows, stream);
            }
            let mut panel = vec![0.0f32; PANEL * cols];
            let mut row = vec![0.0f32; cols];
            for p in 0..rows.div_ceil(PANEL) {
                let width = (rows - p * PANEL).min(PANEL);
                for j in 0..width {
                    self.row_into(p * PANEL + j, &mut row);
                    for (k, &v) in row.iter().enumerate() {
                        panel[k * PANEL + j] = v;
                    }
                }
                let yp = &mut ys[p * PANEL..];
                let len = (m - 1) * rows + width;
                panel_rows(
                    &panel,
                    width,
                    cols,
                    xs,
                    m,
                    &mut yp[..len],
                    rows,
                    0,
                    width,
                    stream,
                );
            }
        };
        if n * rows * cols >= PAIR_FROM && crate::pair::available() {
            if n >= 2 * MR {
                // Enough rows to be bound by arithmetic: split them, each half reads all weights.
                let at = n.div_ceil(2 * MR) * MR;
                let (x0, x1) = x.split_at(at * cols);
                return crate::pair::both_parts(y, at * rows, |half, ys| {
                    work((ys, if half == 0 { x0 } else { x1 }))
                });
            }
            if let (Data::F32(w), true) = (&self.data, rows >= 2 * PANEL) {
                return pair_panel_rows(w, rows, cols, x, n, y, stream);
            }
        }
        if parallel {
            y.par_chunks_mut(per * MR * rows)
                .zip(x.par_chunks(per * MR * cols))
                .for_each(work);
        } else {
            work((y, x));
        }
    }

    /// y[j] = row (first + j) · x for one activation row.
    fn rows_range(&self, x: &[f32], first: usize, y: &mut [f32], q: &QuantizedRows) {
        let n = x.len() / self.cols;
        if n > 1 {
            return self.rows_tiled(x, 0, y, q);
        }
        let c = self.cols;
        match &self.data {
            Data::F32(_) => unreachable!("f32 runs in panel_matmul"),
            Data::Half(w) => {
                let bf = self.dtype == DType::BF16;
                #[cfg(target_arch = "x86_64")]
                if has_avx512() && c.is_multiple_of(16) {
                    // SAFETY: AVX-512F present; the kernel asserts its bounds.
                    return unsafe { matmul_half_avx512(w, c, bf, first, y.len(), x, y, 0) };
                }
                for (j, out) in y.iter_mut().enumerate() {
                    let r = first + j;
                    *out = dot_half(&w[r * c..(r + 1) * c], x, bf);
                }
            }
            Data::Blocks(b) => {
                let nb = c / BLOCK;
                assert!(nb <= q.d.len() && (first + y.len()) * nb <= b.scale.len());
                #[cfg(target_arch = "x86_64")]
                if has_avx512_vnni() {
                    // SAFETY: AVX-512 F/BW/VNNI present; bounds asserted above.
                    return unsafe { matvec_blocks_avx512(b, first, nb, q, y) };
                }
                for (j, out) in y.iter_mut().enumerate() {
                    dot_blocks(b, first + j, nb, q, 0, std::slice::from_mut(out));
                }
            }
        }
    }

    /// All weight rows against activation rows `x` (rows `x_first..` of `q`): each weight row is
    /// decoded (half) or unpacked (blocks) once per group of activation rows.
    fn rows_tiled(&self, x: &[f32], x_first: usize, y: &mut [f32], q: &QuantizedRows) {
        const GROUP: usize = 64;
        let (rows, c) = (self.rows, self.cols);
        let n = x.len() / c;
        #[cfg(target_arch = "x86_64")]
        if let (Data::Blocks(b), true) = (&self.data, has_avx512_vnni()) {
            // SAFETY: AVX-512 F/BW/VNNI present; bounds are asserted inside.
            return unsafe { block_matmul_avx512(b, rows, c / BLOCK, q, x_first, n, y) };
        }
        #[cfg(target_arch = "x86_64")]
        if let (Data::Half(w), true) = (&self.data, has_avx512() && c.is_multiple_of(16)) {
            let bf = self.dtype == DType::BF16;
            // SAFETY: AVX-512F present; bounds are asserted inside.
            return unsafe { matmul_half_avx512(w, c, bf, 0, rows, x, y, rows) };
        }
        let mut wrow = vec![0.0; c];
        let mut out = [0.0f32; GROUP];
        for r in 0..rows {
            if let Data::Half(_) = &self.data {
                self.row_into(r, &mut wrow);
            }
            for i0 in (0..n).step_by(GROUP) {
                let len = (n - i0).min(GROUP);
                match &self.data {
                    Data::F32(_) => unreachable!("f32 runs in panel_matmul"),
                    Data::Half(_) => {
                        for (j, o) in out[..len].iter_mut().enumerate() {
                            *o = dot_f32(&wrow, &x[(i0 + j) * c..(i0 + j + 1) * c]);
                        }
                    }
                    Data::Blocks(b) => {
                        dot_blocks(b, r, c / BLOCK, q, x_first + i0, &mut out[..len])
                    }
                }
                for (j, &v) in out[..len].iter().enumerate() {
                    y[(i0 + j) * rows + r] = v;
                }
            }
        }
    }
}

crate::multiversion! {
    fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }
}

/// Weight rows per f32 panel: two AVX-512 registers.
const PANEL: usize = 32;
/// Activation rows per f32 micro-tile: 12 x 2 accumulators + 2 weight registers + 1 broadcast
/// fit AVX-512's 32 registers, and 24 FMAs per 14 loads keep both FMA ports busy.
const MR: usize = 12;

/// Outputs from this size on are written with non-temporal stores (4x one core's L2).
const STREAM_FROM_BYTES: usize = 8 << 20;

fn pack_panels(rows: usize, cols: usize, w: &[f32]) -> Vec<f32> {
    let panels = rows.div_ceil(PANEL);
    let mut out = vec![0.0; panels * cols * PANEL];
    for r in 0..rows {
        let panel = &mut out[r / PANEL * PANEL * cols..];
        for k in 0..cols {
            panel[k * PANEL + r % PANEL] = w[r * cols + k];
        }
    }
    out
}

/// y = W x for one activation row over the panel layout; threads split the panels when the
/// matrix is big enough.
fn panel_matvec(w: &[f32], rows: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    let threads = threads();
    if rows * cols >= PAIR_FROM && rows >= 2 * PANEL && crate::pair::available() {
        return pair_panel_rows(w, rows, cols, x, 1, y, false);
    }
    if rows * cols < parallel_work(1) || threads == 1 {
        return panel_rows(w, rows, cols, x, 1, y, 0, 0, rows, false);
    }
    let chunk = rows.div_ceil(threads * 2).next_multiple_of(PANEL);
    y.par_chunks_mut(chunk).enumerate().for_each(|(i, ys)| {
        panel_rows(
            w,
            rows,
            cols,
            x,
            1,
            ys,
            0,
            i * chunk,
            i * chunk + ys.len(),
            false,
        )
    });
}

/// An output that two threads fill in disjoint weight-row columns (see `panel_rows_raw`).
struct ColumnsOut(*mut f32);
// SAFETY: each user writes only its own columns.
unsafe impl Sync for ColumnsOut {}
impl ColumnsOut {
    fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// All weight rows for `n` activation rows (y [n, rows]), the weight panels split between this
/// thread and the pair helper: each reads half the weights, which is what bounds a few rows.
fn pair_panel_rows(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    stream: bool,
) {
    assert_eq!(y.len(), n * rows);
    let at = rows.div_ceil(2 * PANEL) * PANEL;
    let ylen = y.len();
    let out = ColumnsOut(y.as_mut_ptr());
    crate::pair::both(|half| {
        let (r0, r1) = if half == 0 { (0, at) } else { (at, rows) };
        // SAFETY: y has `ylen` values from `out`; this half writes only columns [r0, r1).
        unsafe {
            panel_rows_raw(
                w,
                rows,
                cols,
                x,
                n,
                out.at(r0),
                ylen - r0,
                rows,
                r0,
                r1,
                stream,
            )
        }
    });
}

/// Multiply-adds from which one activation row splits its weight rows with the pair helper
/// (`crate::pair`): below, the hand-off costs about what the second core saves.
const PAIR_FROM: usize = 1 << 14;

/// Activation rows from which a block or half matrix runs through the f32 micro-tiles, one
/// decoded 32-row panel at a time (in L1; never the whole matrix), instead of integer dots.
const DECODE_PANELS_FROM: usize = 32;

/// Weight rows [r0, r1) (r0 a multiple of PANEL) for `n` activation rows x [n, cols], in tiles
/// of MR rows read in place (a tile's rows are MR sequential streams, well inside L1). Output
/// (i, r) goes to `y[i * ystride + r - r0]` (ystride 0 for a single row). `stream`: full-width
/// tiles use non-temporal stores (y 64-byte aligned, ystride a multiple of 16).
#[allow(clippy::too_many_arguments)]
fn panel_rows(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    ystride: usize,
    r0: usize,
    r1: usize,
    stream: bool,
) {
    // SAFETY: `y` is an exclusive slice of `y.len()` values.
    unsafe {
        panel_rows_raw(
            w,
            rows,
            cols,
            x,
            n,
            y.as_mut_ptr(),
            y.len(),
            ystride,
            r0,
            r1,
            stream,
        )
    }
}

/// `panel_rows` writing through a pointer, so that two threads can fill disjoint columns of
/// one output.
///
/// # Safety
/// `y` is valid for `ylen` values, and no other thread touches the outputs this call writes
/// (`y[i * ystride + r - r0]` for i < n, r in [r0, r1)) while it runs.
#[allow(clippy::too_many_arguments)]
unsafe fn panel_rows_raw(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    y: *mut f32,
    ylen: usize,
    ystride: usize,
    r0: usize,
    r1: usize,
    stream: bool,
) {
    assert!(x.len() >= n * cols);
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        for p in r0 / PANEL..r1.div_ceil(PANEL) {
            let panel = &w[p * PANEL * cols..(p + 1) * PANEL * cols];
            let width = (rows - p * PANEL).min(PANEL);
            for t in 0..n.div_ceil(MR) {
                let mr = (n - t * MR).min(MR);
                let ypos = t * MR * ystride + p * PANEL - r0;
                assert!(ypos + (mr - 1) * ystride + width <= ylen);
                // SAFETY: AVX-512F is present; the tile reads `mr` rows of x and one panel inside
                // their slices (asserted above) and writes `mr` rows of `width` outputs inside `y`.
                unsafe {
                    let (xt, yp) = (x.as_ptr().add(t * MR * cols), y.add(ypos));
                    macro_rules! tile {
                        ($($r:literal)*) => {
                            match mr {
                                $($r => tile_avx512::<$r>(panel, cols, xt, yp, ystride, width, stream),)*
                                _ => unreachable!(),
                            }
                        };
                    }
                    tile!(1 2 3 4 5 6 7 8 9 10 11 12);
                }
            }
        }
        if stream {
            // SAFETY: SSE is always present on x86-64. Orders the non-temporal stores before the
            // caller hands y on (to another thread, or to a reader of the results).
            unsafe { std::arch::x86_64::_mm_sfence() };
        }
        return;
    }
    let _ = stream;
    panel_rows_portable(w, rows, cols, x, n, y, ylen, ystride, r0, r1);
}

crate::multiversion! {
    fn panel_rows_portable(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize, y: *mut f32, ylen: usize, ystride: usize, r0: usize, r1: usize) {
        for p in r0 / PANEL..r1.div_ceil(PANEL) {
            let panel = &w[p * PANEL * cols..(p + 1) * PANEL * cols];
            let width = (rows - p * PANEL).min(PANEL);
            for i in 0..n {
                let xi = &x[i * cols..(i + 1) * cols];
                let mut acc = [0.0f32; PANEL];
                for (wk, &a) in panel.chunks_exact(PANEL).zip(xi) {
                    for j in 0..PANEL {
                        acc[j] += a * wk[j];
                    }
                }
                let at = i * ystride + p * PANEL - r0;
                assert!(at + width <= ylen);
                // SAFETY: inside `y`'s `ylen` values (asserted), an output this call owns.
                unsafe { std::slice::from_raw_parts_mut(y.add(at), width) }.copy_from_slice(&acc[..width]);
            }
        }
    }
}

/// An R x 32 tile of y: for each k, two panel loads and R broadcasts (x row r at `x + r * cols`)
/// feed 2R FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const R: usize>(
    panel: &[f32],
    cols: usize,
    x: *const f32,
    y: *mut f32,
    ystride: usize,
    width: usize,
    stream: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let wp = panel.as_ptr();
    for k in 0..cols {
        let b0 = _mm512_loadu_ps(wp.add(k * PANEL));
        let b1 = _mm512_loadu_ps(wp.add(k * PANEL + 16));
        let xk = x.add(k);
        for (r, a) in acc.iter_mut().enumerate() {
            let v = _mm512_set1_ps(*xk.add(r * cols));
            a[0] = _mm512_fmadd_ps(v, b0, a[0]);
            a[1] = _mm512_fmadd_ps(v, b1, a[1]);
        }
    }
    let m0 = if width >= 16 {
        0xFFFF
    } else {
        (1u32 << width) as u16 - 1
    };
    let m1 = if width >= 32 {
        0xFFFF
    } else if width > 16 {
        (1u32 << (width - 16)) as u16 - 1
    } else {
        0
    };
    if stream && width == PANEL {
        for (r, a) in acc.iter().enumerate() {
            let out = y.add(r * ystride);
            _mm512_stream_ps(out, a[0]);
            _mm512_stream_ps(out.add(16), a[1]);
        }
        return;
    }
    for (r, a) in acc.iter().enumerate() {
        let out = y.add(r * ystride);
        _mm512_mask_storeu_ps(out, m0, a[0]);
        _mm512_mask_storeu_ps(out.add(16), m1, a[1]);
    }
}

use crate::simd::has_avx512;

/// ggml blocks -> the kernels' layout (see `Blocks`).
fn repack(dtype: DType, rows: usize, cols: usize, bytes: &[u8]) -> Blocks {
    let nb = cols / BLOCK;
    let nibbles = dtype != DType::Q8_0;
    let mut b = Blocks {
        codes: Vec::with_capacity(rows * cols / if nibbles { 2 } else { 1 }),
        high: Vec::new(),
        scale: Vec::with_capacity(rows * nb),
        bias: Vec::with_capacity(rows * nb),
        table: quant::code_table(dtype),
        nibbles,
    };
    let mut row_codes = vec![0u8; cols];
    for row in bytes.chunks_exact(nb * dtype.block_bytes()) {
        for (blk, raw) in row.chunks_exact(dtype.block_bytes()).enumerate() {
            let (q, s, bias) = quant::block_codes(dtype, raw);
            b.scale.push(s);
            b.bias.push(bias);
            if dtype == DType::Q5_0 {
                b.high.push(
                    q.iter()
                        .enumerate()
                        .fold(0u32, |h, (j, &c)| h | (((c >> 4) as u32) << j)),
                );
            }
            row_codes[blk * BLOCK..(blk + 1) * BLOCK].copy_from_slice(&q);
        }
        if !nibbles {
            b.codes.extend_from_slice(&row_codes);
            continue;
        }
        for pair in 0..nb / 2 {
            let e = &row_codes[pair * 64..pair * 64 + 64];
            b.codes
                .extend((0..32).map(|j| (e[j] & 0x0F) | ((e[j + 32] & 0x0F) << 4)));
        }
        if nb % 2 == 1 {
            let e = &row_codes[(nb - 1) * BLOCK..];
            b.codes
                .extend((0..16).map(|j| (e[j] & 0x0F) | ((e[j + 16] & 0x0F) << 4)));
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// Every format's matmul equals the f32 product of its own decoded weights, up to the int8
    /// rounding of the activations (block formats) or summation order (float formats).
    #[test]
    fn matmul_matches_decoded_weights_for_every_format() {
        // 96 columns = 3 blocks: exercises a full pair and the odd trailing block.
        for &(rows, cols) in &[(40usize, 96usize), (300, 128)] {
            let w = random(rows * cols, 1);
            for &n in &[1usize, 3, 9, 30, 40] {
                let x = random(n * cols, 2);
                for dtype in DType::ALL {
                    let m = Matrix::quantize(dtype, rows, cols, &w).unwrap();
                    let dec = m.to_f32();
                    let mut y = vec![0.0; n * rows];
                    m.matmul(&x, &mut y, &mut QuantizedRows::default());
                    for i in 0..n {
                        let xi = &x[i * cols..(i + 1) * cols];
                        let norm = xi.iter().map(|v| v * v).sum::<f32>().sqrt();
                        for r in 0..rows {
                            let want: f32 = dec[r * cols..(r + 1) * cols]
                                .iter()
                                .zip(xi)
                                .map(|(a, b)| a * b)
                                .sum();
                            let wn = dec[r * cols..(r + 1) * cols]
                                .iter()
                                .map(|v| v * v)
                                .sum::<f32>()
                                .sqrt();
                            let tol =
                                if m.dtype.block_len() == 1 { 1e-4 } else { 1e-2 } * norm * wn;
                            let got = y[i * rows + r];
                            assert!(
                                (got - want).abs() <= tol,
                                "{dtype:?} [{rows}x{cols}] n={n}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The AVX-512 kernel and the portable one give the same sums.
    #[test]
    fn simd_and_portable_block_kernels_agree() {
        let (rows, cols) = (16, 160);
        let w = random(rows * cols, 3);
        let x = random(cols, 4);
        let mut q = QuantizedRows::default();
        quantize_rows(&x, cols, &mut q);
        for dtype in DType::ALL.into_iter().filter(|d| d.block_len() > 1) {
            let m = Matrix::quantize(dtype, rows, cols, &w).unwrap();
            let Data::Blocks(b) = &m.data else { panic!() };
            for r in 0..rows {
                let mut fast = 0.0;
                dot_blocks(b, r, cols / BLOCK, &q, 0, std::slice::from_mut(&mut fast));
                let slow = dot_blocks_portable(b, r, cols / BLOCK, 0, &q.q, &q.d, &q.s);
                assert!(
                    (fast - slow).abs() <= 1e-4 * (1.0 + slow.abs()),
                    "{dtype:?}"
                );
            }
        }
    }

    /// Matmuls split with the pair helper (by weight rows for few activation rows, by activation
    /// rows for many) give the products of the same matmul on one thread.
    #[test]
    fn pair_split_matmuls_equal_one_thread_ones() {
        let (rows, cols) = (300, 64);
        let values = random(rows * cols, 11);
        for dtype in [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::Q8_0,
            DType::Q4_0,
        ] {
            let m = Matrix::quantize(dtype, rows, cols, &values).unwrap();
            for n in [1, 3, 13, 30] {
                let x = random(n * cols, 12 + n as u64);
                let mut q = QuantizedRows::default();
                let (mut one, mut two) = (vec![0.0; n * rows], vec![1.0; n * rows]);
                serial(|| m.matmul(&x, &mut one, &mut q));
                crate::pair::enabled(|| m.matmul(&x, &mut two, &mut q));
                for (a, b) in one.iter().zip(&two) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{dtype:?} n={n}");
                }
            }
        }
    }

    /// The AVX-512 f32 micro-tiles and the portable panel loop give the same products.
    #[test]
    fn simd_and_portable_panel_kernels_agree() {
        let (rows, cols, n) = (70, 40, 29);
        let w = pack_panels(rows, cols, &random(rows * cols, 5));
        let x = random(n * cols, 6);
        let (mut a, mut b) = (vec![0.0; n * rows], vec![0.0; n * rows]);
        panel_rows(&w, rows, cols, &x, n, &mut a, rows, 0, rows, false);
        panel_rows_portable(
            &w,
            rows,
            cols,
            &x,
            n,
            b.as_mut_ptr(),
            b.len(),
            rows,
            0,
            rows,
        );
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()));
        }
    }

    /// An output past STREAM_FROM_BYTES, aligned (non-temporal stores) and misaligned (plain
    /// stores), gives the same numbers.
    #[test]
    fn streamed_outputs_equal_plain_ones() {
        let (rows, cols, n) = (2048, 32, 1100);
        assert!(rows * n * 4 >= STREAM_FROM_BYTES);
        let m = Matrix::from_f32(rows, cols, random(rows * cols, 9)).unwrap();
        let x = random(n * cols, 10);
        let mut buf = vec![0.0f32; rows * n + 32];
        let aligned = (64 - buf.as_ptr() as usize % 64) % 64 / 4;
        let mut q = QuantizedRows::default();
        m.matmul(&x, &mut buf[aligned..aligned + rows * n], &mut q);
        let streamed = buf[aligned..aligned + rows * n].to_vec();
        let off = aligned + 1;
        m.matmul(&x, &mut buf[off..off + rows * n], &mut q);
        assert_eq!(streamed, buf[off..off + rows * n]);
        assert!(streamed.iter().any(|&v| v != 0.0));
    }

    #[test]
    fn rejects_wrong_sizes() {
        assert!(Matrix::from_f32(2, 3, vec![0.0; 5]).is_err());
        assert!(Matrix::from_ggml(DType::Q8_0, 2, 32, &[0u8; 67]).is_err());
        assert!(Matrix::from_ggml(DType::Q4_0, 1, 48, &[0u8; 27]).is_err());
    }
}
