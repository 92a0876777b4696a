//! Block formats (Q8_0, Q5_0, Q4_0, Q4_1, NF4) repacked for SIMD and multiplied in integers:
//! the activations quantized to int8 per block (`QuantizedRows`), the AVX-512 VNNI kernels (16
//! weight rows at a time for decode, four activation rows per unpacked weight row for batches)
//! and the portable dot product (AVX2 / baseline twins through `multiversion!`).

use crate::format::dtype::{self, DType, BLOCK};

#[cfg(target_arch = "x86_64")]
use super::avx512::{has_avx512_vnni, pair_of, sum16};

/// Block formats repacked for SIMD: per row, codes of 8 bits (Q8_0) or 4 bits in "pair order"
/// (for each 64 elements, byte j holds element j in its low nibble and element j + 32 in its high
/// one, so one shift and mask give 64 codes in order); a trailing odd block keeps ggml's order.
pub(super) struct Blocks {
    pub(super) codes: Vec<u8>,
    /// Q5_0's fifth bit, one u32 per block (bit j = element j).
    pub(super) high: Vec<u32>,
    pub(super) scale: Vec<f32>,
    pub(super) bias: Vec<f32>,
    table: Option<[u8; 16]>,
    nibbles: bool,
    /// The code every bias stands for (bias = -centre x scale: 128 for Q8_0 and NF4's table, 8
    /// for Q4_0, 16 for Q5_0), or 0 when the bias is free (Q4_1).
    centre: u8,
}

impl Blocks {
    /// Codes of block `blk` of `row` (with Q5_0's high bit and NF4's table applied).
    #[inline(always)]
    pub(super) fn block(&self, row: usize, nb: usize, blk: usize) -> [u8; BLOCK] {
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
    pub(super) q: Vec<i8>,
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<f32>,
}

crate::multiversion! {
    pub(super) fn quantize_rows(x: &[f32], cols: usize, out: &mut QuantizedRows) {
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
/// below (`block_rows_avx512`, `matmul_avx512`), so the loops over weight rows carry no
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
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for; the caller asserted that `row` and the activation rows are inside the matrix and `x`.
    unsafe {
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
        // SAFETY: this function's contract: the caller checked the CPU features it is compiled for.
        unsafe {
            use std::arch::x86_64::*;
            Self {
                low: _mm256_set1_epi8(0x0F),
                sixteen: _mm512_set1_epi8(0x10),
                table: m
                    .table
                    .map(|t| _mm512_broadcast_i32x4(_mm_loadu_si128(t.as_ptr() as *const __m128i))),
            }
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
        // SAFETY: this function's contract: the caller checked the CPU features it is compiled for; the caller keeps `row` and `p` inside the matrix.
        unsafe {
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
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for; the caller keeps rows row0..row0 + 16 and activation row `xr` inside the matrix and `x`.
    unsafe {
        use std::arch::x86_64::*;
        let unpack = Unpack::new(m);
        let mut acc = [_mm512_setzero_ps(); 16];
        for p in 0..nb / 2 {
            let xv = _mm512_loadu_si512(x.q.as_ptr().add((xr * nb + 2 * p) * BLOCK) as *const _);
            let xd = pair_of(x.d.as_ptr().add(xr * nb + 2 * p));
            for (r, a) in acc.iter_mut().enumerate() {
                let row = row0 + r;
                let isum =
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), unpack.pair(m, row, nb, p), xv);
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
}

/// One activation row against weight rows first..first + out.len(): the decode matvec, in one
/// call so the set-up is paid once per matrix, not per row (the row kernel is inlined here).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn matvec_avx512(
    m: &Blocks,
    first: usize,
    nb: usize,
    x: &QuantizedRows,
    out: &mut [f32],
) {
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for; the assert below keeps the weight rows and the activation row inside their buffers.
    unsafe {
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
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for; the assert below keeps the weight row and the activation rows inside their buffers.
    unsafe {
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
}

/// All weight rows against `n` activation rows (x_first..): y [n, rows], in one call: groups of
/// 16 rows through `rows16_avx512`, the rest one row at a time for four activation rows at once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn matmul_avx512(
    m: &Blocks,
    rows: usize,
    nb: usize,
    x: &QuantizedRows,
    x_first: usize,
    n: usize,
    y: &mut [f32],
) {
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for; the assert below keeps every row read and every output written inside its buffer.
    unsafe {
        use std::arch::x86_64::_mm512_storeu_ps;
        assert!(
            (x_first + n) * nb <= x.d.len() && rows * nb <= m.scale.len() && y.len() >= n * rows
        );
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
}

/// The AVX2 block kernels' unpacking (CPUs without AVX-512 VNNI): one block of 32 codes per
/// step as 32 bytes, multiplied by the signed activations with `maddubs` (unsigned x signed).
/// Codes of a centred format are made signed (c - centre), multiplied through the sign trick
/// (|c| x sign-adjusted x, which cannot saturate the 16-bit pair sums even for 8-bit codes), and
/// the bias term, which is exactly -centre x scale x sum(x), drops out (measured on AMD EPYC
/// Zen 3, AVX2: Q8_0 decode of `tiny` went from 0.50x to 0.64-0.71x f32 without the scalar
/// bias loop; with nb = 4 blocks per row it cost as much as the products). Q4_1 keeps it.
#[cfg(target_arch = "x86_64")]
struct Unpack2 {
    centred: bool,
    centre: std::arch::x86_64::__m256i,
    low: std::arch::x86_64::__m256i,
    table: Option<std::arch::x86_64::__m256i>,
    spread: std::arch::x86_64::__m256i,
    bit: std::arch::x86_64::__m256i,
    ones: std::arch::x86_64::__m256i,
}

#[cfg(target_arch = "x86_64")]
impl Unpack2 {
    #[inline(always)]
    unsafe fn new(m: &Blocks) -> Self {
        // SAFETY: this function's contract: the caller checked AVX2.
        unsafe {
            use std::arch::x86_64::*;
            Self {
                centred: m.centre > 0,
                centre: _mm256_set1_epi8(m.centre as i8),
                low: _mm256_set1_epi8(0x0F),
                table: m.table.map(|t| {
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(t.as_ptr() as *const __m128i))
                }),
                // Q5_0's fifth bits: byte j of a block takes bit j of the block's u32.
                spread: _mm256_setr_epi8(
                    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                    3, 3, 3, 3, 3, 3,
                ),
                bit: _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64),
                ones: _mm256_set1_epi16(1),
            }
        }
    }

    /// Block `blk` of `row` as (the unsigned multiplier, the sign source): nibbles split, Q5_0's
    /// fifth bit and NF4's table applied. Unchecked: the caller keeps `row` and `blk` inside.
    #[inline(always)]
    unsafe fn block(
        &self,
        m: &Blocks,
        row: usize,
        nb: usize,
        blk: usize,
    ) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
        // SAFETY: this function's contract: AVX2 checked, `row` and `blk` inside the matrix.
        unsafe {
            use std::arch::x86_64::*;
            let sb = row * nb;
            let mut c = if !m.nibbles {
                _mm256_loadu_si256(m.codes.as_ptr().add((sb + blk) * BLOCK) as *const __m256i)
            } else if blk / 2 * 2 + 1 < nb {
                let v = _mm256_loadu_si256(
                    m.codes.as_ptr().add(sb * BLOCK / 2 + blk / 2 * 32) as *const __m256i
                );
                let v = if blk.is_multiple_of(2) {
                    v
                } else {
                    _mm256_srli_epi16(v, 4)
                };
                _mm256_and_si256(v, self.low)
            } else {
                // A trailing odd block keeps ggml's nibble order.
                let bytes = &m.codes[sb * BLOCK / 2 + blk / 2 * 32..][..16];
                let mut tail = [0u8; BLOCK];
                for j in 0..16 {
                    tail[j] = bytes[j] & 0x0F;
                    tail[j + 16] = bytes[j] >> 4;
                }
                _mm256_loadu_si256(tail.as_ptr() as *const __m256i)
            };
            if !m.high.is_empty() {
                let h = _mm256_set1_epi32(*m.high.get_unchecked(sb + blk) as i32);
                let h = _mm256_shuffle_epi8(h, self.spread);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(h, self.bit), self.bit);
                c = _mm256_or_si256(c, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
            }
            if let Some(t) = self.table {
                c = _mm256_shuffle_epi8(t, c);
            }
            if self.centred {
                let cs = _mm256_sub_epi8(c, self.centre);
                (_mm256_abs_epi8(cs), cs)
            } else {
                (c, c)
            }
        }
    }

    /// The 32 products of a block's codes with 32 activations, summed to 8 int32 lanes.
    #[inline(always)]
    unsafe fn products(
        &self,
        (cu, cs): (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i),
        xq: *const i8,
    ) -> std::arch::x86_64::__m256 {
        // SAFETY: this function's contract: AVX2 checked, 32 activations at `xq`.
        unsafe {
            use std::arch::x86_64::*;
            let xv = _mm256_loadu_si256(xq as *const __m256i);
            let xv = if self.centred {
                _mm256_sign_epi8(xv, cs)
            } else {
                xv
            };
            _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(cu, xv), self.ones))
        }
    }
}

/// The sum of a vector's 8 lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum8(a: std::arch::x86_64::__m256) -> f32 {
    // SAFETY: this function's contract: the caller checked AVX.
    unsafe {
        use std::arch::x86_64::*;
        let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)))
    }
}

/// The AVX2 kernel: one weight row against X activation rows (each block unpacked once for the
/// X rows). Inlined into the AVX2 entry points below; only call it from such a function.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_blocks_avx2<const X: usize>(
    m: &Blocks,
    row: usize,
    nb: usize,
    x: &QuantizedRows,
    x_first: usize,
    out: &mut [f32],
) {
    // SAFETY: this function's contract: the caller checked AVX2 + FMA and that `row` and the
    // activation rows x_first..x_first + X are inside the matrix and `x`.
    unsafe {
        use std::arch::x86_64::*;
        let u = Unpack2::new(m);
        let sb = row * nb;
        let mut acc = [_mm256_setzero_ps(); X];
        for blk in 0..nb {
            let c = u.block(m, row, nb, blk);
            for (j, a) in acc.iter_mut().enumerate() {
                let xb = (x_first + j) * nb + blk;
                let p = u.products(c, x.q.as_ptr().add(xb * BLOCK));
                let s = _mm256_set1_ps(m.scale[sb + blk] * *x.d.get_unchecked(xb));
                *a = _mm256_fmadd_ps(p, s, *a);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            let xs = &x.s[(x_first + j) * nb..(x_first + j + 1) * nb];
            let mut total = hsum8(*a);
            if !u.centred {
                total += m.bias[sb..sb + nb]
                    .iter()
                    .zip(xs)
                    .map(|(b, s)| b * s)
                    .sum::<f32>();
            }
            out[j] = total;
        }
    }
}

/// Weight rows row0..row0 + 8 against activation row 0 (the decode matvec): the activation
/// block is loaded once for the 8 rows, and one tree of horizontal adds gives the 8 sums.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows8_avx2(m: &Blocks, row0: usize, nb: usize, x: &QuantizedRows, out: &mut [f32]) {
    // SAFETY: this function's contract: the caller checked AVX2 + FMA and that rows
    // row0..row0 + 8 and activation row 0 are inside the matrix and `x`, and `out` holds 8.
    unsafe {
        use std::arch::x86_64::*;
        let u = Unpack2::new(m);
        let mut acc = [_mm256_setzero_ps(); 8];
        for blk in 0..nb {
            let xq = x.q.as_ptr().add(blk * BLOCK);
            let xd = *x.d.get_unchecked(blk);
            for (r, a) in acc.iter_mut().enumerate() {
                let p = u.products(u.block(m, row0 + r, nb, blk), xq);
                let s = _mm256_set1_ps(*m.scale.get_unchecked((row0 + r) * nb + blk) * xd);
                *a = _mm256_fmadd_ps(p, s, *a);
            }
        }
        let h = |a, b| _mm256_hadd_ps(a, b);
        let (t0, t1) = (h(acc[0], acc[1]), h(acc[2], acc[3]));
        let (t2, t3) = (h(acc[4], acc[5]), h(acc[6], acc[7]));
        let (u0, u1) = (h(t0, t1), h(t2, t3));
        let sums = _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(u0, u1),
            _mm256_permute2f128_ps::<0x31>(u0, u1),
        );
        _mm256_storeu_ps(out.as_mut_ptr(), sums);
        if !u.centred {
            for (r, o) in out[..8].iter_mut().enumerate() {
                let sb = (row0 + r) * nb;
                for b in 0..nb {
                    *o += m.bias[sb + b] * x.s[b];
                }
            }
        }
    }
}

/// One weight row against activation rows x_first..x_first + out.len(), four at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_rows_avx2(
    m: &Blocks,
    row: usize,
    nb: usize,
    x: &QuantizedRows,
    x_first: usize,
    out: &mut [f32],
) {
    // SAFETY: this function's contract: the caller checked AVX2 + FMA; the assert below keeps the
    // weight row and the activation rows inside their buffers.
    unsafe {
        assert!((x_first + out.len()) * nb <= x.d.len() && (row + 1) * nb <= m.scale.len());
        let mut j = 0;
        while j + 4 <= out.len() {
            dot_blocks_avx2::<4>(m, row, nb, x, x_first + j, &mut out[j..j + 4]);
            j += 4;
        }
        while j < out.len() {
            dot_blocks_avx2::<1>(m, row, nb, x, x_first + j, &mut out[j..j + 1]);
            j += 1;
        }
    }
}

/// One activation row against weight rows first..first + out.len(): the AVX2 decode matvec,
/// in one call so the loop over rows carries no call per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn matvec_avx2(
    m: &Blocks,
    first: usize,
    nb: usize,
    x: &QuantizedRows,
    out: &mut [f32],
) {
    // SAFETY: this function's contract: the caller checked AVX2 + FMA; the assert below keeps the
    // weight rows and the activation row inside their buffers.
    unsafe {
        assert!((first + out.len()) * nb <= m.scale.len() && x.d.len() >= nb);
        let mut k = 0;
        while k + 8 <= out.len() {
            rows8_avx2(m, first + k, nb, x, &mut out[k..k + 8]);
            k += 8;
        }
        for (k, o) in out.iter_mut().enumerate().skip(k) {
            dot_blocks_avx2::<1>(m, first + k, nb, x, 0, std::slice::from_mut(o));
        }
    }
}

/// Dot products of weight row `row` with activation rows x_first.. (as many as `out` holds).
#[inline(always)]
pub(super) fn dot(
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
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2() {
        // SAFETY: the CPU has AVX2 + FMA (checked); `block_rows_avx2` asserts the bounds.
        unsafe { block_rows_avx2(m, row, nb, x, x_first, out) };
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

/// ggml blocks -> the kernels' layout (see `Blocks`).
pub(super) fn repack(dtype: DType, rows: usize, cols: usize, bytes: &[u8]) -> Blocks {
    let nb = cols / BLOCK;
    let nibbles = dtype != DType::Q8_0;
    let mut b = Blocks {
        codes: Vec::with_capacity(rows * cols / if nibbles { 2 } else { 1 }),
        high: Vec::new(),
        scale: Vec::with_capacity(rows * nb),
        bias: Vec::with_capacity(rows * nb),
        table: dtype::code_table(dtype),
        nibbles,
        centre: match dtype {
            DType::Q8_0 | DType::NF4 => 128,
            DType::Q4_0 => 8,
            DType::Q5_0 => 16,
            _ => 0,
        },
    };
    let mut row_codes = vec![0u8; cols];
    for row in bytes.chunks_exact(nb * dtype.block_bytes()) {
        for (blk, raw) in row.chunks_exact(dtype.block_bytes()).enumerate() {
            let (q, s, bias) = dtype::block_codes(dtype, raw);
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
    use crate::kernels::{Data, Matrix};

    use crate::kernels::tests::random;

    /// Every SIMD kernel this CPU has (the dispatched one, and the AVX2 one explicitly, which
    /// AVX-512 machines would not otherwise run) gives the portable kernel's sums: even and odd
    /// block counts, one to five activation rows.
    #[test]
    fn simd_and_portable_block_kernels_agree() {
        let rows = 16;
        for cols in [160, 256] {
            let nb = cols / BLOCK;
            let w = random(rows * cols, 3);
            let x = random(5 * cols, 4);
            let mut q = QuantizedRows::default();
            quantize_rows(&x, cols, &mut q);
            let slow = |b: &Blocks, r: usize, i: usize| {
                let (qs, ds) = (i * cols..(i + 1) * cols, i * nb..(i + 1) * nb);
                dot_blocks_portable(b, r, nb, 0, &q.q[qs], &q.d[ds.clone()], &q.s[ds])
            };
            let close = |fast: f32, slow: f32| (fast - slow).abs() <= 1e-4 * (1.0 + slow.abs());
            for dtype in DType::ALL.into_iter().filter(|d| d.block_len() > 1) {
                let m = Matrix::quantize(dtype, rows, cols, &w).unwrap();
                let Data::Blocks(b) = &m.data else { panic!() };
                for r in 0..rows {
                    let mut fast = [0.0; 5];
                    dot(b, r, nb, &q, 0, &mut fast);
                    for (i, &f) in fast.iter().enumerate() {
                        assert!(close(f, slow(b, r, i)), "{dtype:?} {cols} dispatched");
                    }
                    #[cfg(target_arch = "x86_64")]
                    if crate::simd::has_avx2() {
                        // SAFETY: AVX2 + FMA checked; rows and activation rows are in range.
                        unsafe { block_rows_avx2(b, r, nb, &q, 0, &mut fast) };
                        for (i, &f) in fast.iter().enumerate() {
                            assert!(close(f, slow(b, r, i)), "{dtype:?} {cols} avx2 rows");
                        }
                    }
                }
                #[cfg(target_arch = "x86_64")]
                if crate::simd::has_avx2() {
                    let mut y = [0.0; 16];
                    // SAFETY: AVX2 + FMA checked; 13 of the 16 rows (one group of 8 and a rest) and the
                    // first activation row exist.
                    unsafe { matvec_avx2(b, 0, nb, &q, &mut y[..13]) };
                    for (r, &f) in y[..13].iter().enumerate() {
                        assert!(close(f, slow(b, r, 0)), "{dtype:?} {cols} avx2 matvec");
                    }
                }
            }
        }
    }
}
