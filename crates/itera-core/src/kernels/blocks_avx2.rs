//! The AVX2 kernels of the block formats (`blocks.rs`), for CPUs without AVX-512 VNNI, in
//! `maddubs` integer products: for Q8_0, Q4_0 and Q5_0 in the lines layout, 8 weight rows per
//! half line, one pair of 16-bit lanes per row (`lines_tile`, batches up to
//! `LINES_AVX2_PANELS_FROM`); for the packed formats (Q4_1, NF4) one block of 32 codes per step,
//! eight weight rows per activation load in decode, four activation rows per unpacked weight
//! row for batches.

use super::blocks::{Blocks, QuantizedRows, GROUP};
use crate::format::dtype::BLOCK;

/// The AVX2 block kernels' unpacking (CPUs without AVX-512 VNNI): one block of 32 codes per
/// step as 32 bytes, multiplied by the signed activations with `maddubs` (unsigned x signed).
/// Codes of a centred format are made signed (c - centre), multiplied through the sign trick
/// (|c| x sign-adjusted x, which cannot saturate the 16-bit pair sums even for 8-bit codes), and
/// the bias term, which is exactly -centre x scale x sum(x), drops out (measured on AMD EPYC
/// Zen 3, AVX2: Q8_0 decode of `tiny` went from 0.50x to 0.64-0.71x f32 without the scalar
/// bias loop; with nb = 4 blocks per row it cost as much as the products). Q4_1 keeps it.
/// `K` is the format (`Kind`), a constant so that each format's kernel carries none of the
/// others' branches and constants (see `with_kind`).
struct Unpack2<const K: u8> {
    centre: std::arch::x86_64::__m256i,
    low: std::arch::x86_64::__m256i,
    table: std::arch::x86_64::__m256i,
    spread: std::arch::x86_64::__m256i,
    bit: std::arch::x86_64::__m256i,
    ones: std::arch::x86_64::__m256i,
}

/// The block formats as the AVX2 kernels tell them apart (`Blocks` has no dtype).
mod kind {
    pub(super) const Q8_0: u8 = 0;
    pub(super) const Q4_0: u8 = 1;
    pub(super) const Q5_0: u8 = 2;
    pub(super) const Q4_1: u8 = 3;
    pub(super) const NF4: u8 = 4;
}

/// Runs `$body` with `$k` bound to `m`'s format as a constant (`kind`).
macro_rules! with_kind {
    ($m:expr, $k:ident => $body:expr) => {{
        let m: &Blocks = $m;
        if !m.nibbles {
            const $k: u8 = kind::Q8_0;
            $body
        } else if !m.high.is_empty() {
            const $k: u8 = kind::Q5_0;
            $body
        } else if m.table.is_some() {
            const $k: u8 = kind::NF4;
            $body
        } else if m.centre == 0 {
            const $k: u8 = kind::Q4_1;
            $body
        } else {
            const $k: u8 = kind::Q4_0;
            $body
        }
    }};
}

impl<const K: u8> Unpack2<K> {
    const CENTRED: bool = K != kind::Q4_1;
    /// Codes under 32: `products_offset` applies.
    const SMALL: bool = K == kind::Q4_0 || K == kind::Q5_0;
    /// One byte per code: a block is one 32-byte load.
    const BYTES: bool = K == kind::Q8_0;

    #[inline(always)]
    unsafe fn new(m: &Blocks) -> Self {
        // SAFETY: this function's contract: the caller checked AVX2.
        unsafe {
            use std::arch::x86_64::*;
            Self {
                centre: _mm256_set1_epi8(m.centre as i8),
                low: _mm256_set1_epi8(0x0F),
                table: match m.table {
                    Some(t) => {
                        _mm256_broadcastsi128_si256(_mm_loadu_si128(t.as_ptr() as *const __m128i))
                    }
                    None => _mm256_setzero_si256(),
                },
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

    /// Block `blk` of `row` as 32 unsigned codes: nibbles split, Q5_0's fifth bit and NF4's
    /// table applied. Unchecked: the caller keeps `row` and `blk` inside.
    #[inline(always)]
    unsafe fn codes(
        &self,
        m: &Blocks,
        row: usize,
        nb: usize,
        blk: usize,
    ) -> std::arch::x86_64::__m256i {
        // SAFETY: this function's contract: AVX2 checked, `row` and `blk` inside the matrix.
        unsafe {
            use std::arch::x86_64::*;
            let sb = row * nb;
            let c = if Self::BYTES {
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
            self.finish(c, m, sb + blk)
        }
    }

    /// Low codes of block `b` (row-major block index) finished: Q5_0's fifth bit added, NF4's
    /// table applied. Unchecked: the caller keeps `b` inside.
    #[inline(always)]
    unsafe fn finish(
        &self,
        mut c: std::arch::x86_64::__m256i,
        m: &Blocks,
        b: usize,
    ) -> std::arch::x86_64::__m256i {
        // SAFETY: this function's contract: AVX2 checked, `b` inside the matrix.
        unsafe {
            use std::arch::x86_64::*;
            if K == kind::Q5_0 {
                let h = _mm256_set1_epi32(*m.high.get_unchecked(b) as i32);
                let h = _mm256_shuffle_epi8(h, self.spread);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(h, self.bit), self.bit);
                c = _mm256_or_si256(c, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
            }
            if K == kind::NF4 {
                c = _mm256_shuffle_epi8(self.table, c);
            }
            c
        }
    }

    /// The 32 products of unsigned codes `c` with the activations `xv`, summed to 8 lanes, by
    /// the cheapest route the format allows (`products_offset` with the block's `off`, or the
    /// sign trick of `signed` and `products`).
    #[inline(always)]
    unsafe fn product(
        &self,
        c: std::arch::x86_64::__m256i,
        xv: std::arch::x86_64::__m256i,
        off: std::arch::x86_64::__m256i,
    ) -> std::arch::x86_64::__m256 {
        // SAFETY: this function's contract: AVX2 checked.
        unsafe {
            if Self::SMALL {
                self.products_offset(c, xv, off)
            } else {
                self.products(self.signed(c), xv)
            }
        }
    }

    /// Codes as (the unsigned multiplier, the sign source): a centred format's made signed.
    #[inline(always)]
    unsafe fn signed(
        &self,
        c: std::arch::x86_64::__m256i,
    ) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
        // SAFETY: this function's contract: AVX2 checked.
        unsafe {
            use std::arch::x86_64::*;
            if Self::CENTRED {
                let cs = _mm256_sub_epi8(c, self.centre);
                (_mm256_abs_epi8(cs), cs)
            } else {
                (c, c)
            }
        }
    }

    /// Block `blk` of `row` as `signed` gives it. Unchecked: the caller keeps `row` and `blk` inside.
    #[inline(always)]
    unsafe fn block(
        &self,
        m: &Blocks,
        row: usize,
        nb: usize,
        blk: usize,
    ) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
        // SAFETY: this function's contract, passed on to `codes`.
        unsafe { self.signed(self.codes(m, row, nb, blk)) }
    }

    /// centre x the pair sums of 32 activations, as `products_offset` subtracts them (once per
    /// activation block, shared by every weight row).
    #[inline(always)]
    unsafe fn offset(&self, xv: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256i {
        // SAFETY: this function's contract: AVX2 checked.
        unsafe {
            use std::arch::x86_64::*;
            _mm256_madd_epi16(_mm256_maddubs_epi16(self.centre, xv), self.ones)
        }
    }

    /// `products` for the small-code formats (Q4_0, Q5_0: codes under 32, so the unsigned codes
    /// times int8 activations cannot saturate the 16-bit pair sums): the unsigned codes
    /// multiplied directly and the centre's share (`offset`) subtracted, one operation per row
    /// where the sign trick takes three.
    #[inline(always)]
    unsafe fn products_offset(
        &self,
        c: std::arch::x86_64::__m256i,
        xv: std::arch::x86_64::__m256i,
        off: std::arch::x86_64::__m256i,
    ) -> std::arch::x86_64::__m256 {
        // SAFETY: this function's contract: AVX2 checked.
        unsafe {
            use std::arch::x86_64::*;
            let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(c, xv), self.ones);
            _mm256_cvtepi32_ps(_mm256_sub_epi32(sums, off))
        }
    }

    /// The 32 products of a block's codes with 32 activations, summed to 8 int32 lanes.
    #[inline(always)]
    unsafe fn products(
        &self,
        (cu, cs): (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i),
        xv: std::arch::x86_64::__m256i,
    ) -> std::arch::x86_64::__m256 {
        // SAFETY: this function's contract: AVX2 checked.
        unsafe {
            use std::arch::x86_64::*;
            let xv = if Self::CENTRED {
                _mm256_sign_epi8(xv, cs)
            } else {
                xv
            };
            _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(cu, xv), self.ones))
        }
    }
}

/// The sum of a vector's 8 lanes.
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

/// The 8 lanes of each of 8 accumulators summed, in one vector (one tree of horizontal adds).
#[inline(always)]
unsafe fn sum8(acc: &[std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    // SAFETY: this function's contract: the caller checked AVX.
    unsafe {
        use std::arch::x86_64::*;
        let h = |a, b| _mm256_hadd_ps(a, b);
        let (t0, t1) = (h(acc[0], acc[1]), h(acc[2], acc[3]));
        let (t2, t3) = (h(acc[4], acc[5]), h(acc[6], acc[7]));
        let (u0, u1) = (h(t0, t1), h(t2, t3));
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(u0, u1),
            _mm256_permute2f128_ps::<0x31>(u0, u1),
        )
    }
}

/// The AVX2 kernel: one weight row against X activation rows (each block unpacked once for the
/// X rows). Inlined into the AVX2 entry points below; only call it from such a function.
#[inline(always)]
unsafe fn dot_blocks_avx2<const K: u8, const X: usize>(
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
        let u = Unpack2::<K>::new(m);
        let sb = row * nb;
        let mut acc = [_mm256_setzero_ps(); X];
        for blk in 0..nb {
            let c = u.block(m, row, nb, blk);
            for (j, a) in acc.iter_mut().enumerate() {
                let xb = (x_first + j) * nb + blk;
                let xv = _mm256_loadu_si256(x.q.as_ptr().add(xb * BLOCK) as *const __m256i);
                let p = u.products(c, xv);
                let s = _mm256_set1_ps(m.scale[sb + blk] * *x.d.get_unchecked(xb));
                *a = _mm256_fmadd_ps(p, s, *a);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            let xs = &x.s[(x_first + j) * nb..(x_first + j + 1) * nb];
            let mut total = hsum8(*a);
            if !Unpack2::<K>::CENTRED {
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
#[inline(always)]
unsafe fn rows8_avx2<const K: u8>(
    m: &Blocks,
    row0: usize,
    nb: usize,
    x: &QuantizedRows,
    out: &mut [f32],
) {
    // SAFETY: this function's contract: the caller checked AVX2 + FMA and that rows
    // row0..row0 + 8 and activation row 0 are inside the matrix and `x`, and `out` holds 8.
    unsafe {
        use std::arch::x86_64::*;
        let u = Unpack2::<K>::new(m);
        let mut acc = [_mm256_setzero_ps(); 8];
        // Block `blk` of the activations: its codes, `offset` (small-code formats) and scale.
        let act = |blk: usize| {
            let xv = _mm256_loadu_si256(x.q.as_ptr().add(blk * BLOCK) as *const __m256i);
            let off = if Unpack2::<K>::SMALL {
                u.offset(xv)
            } else {
                _mm256_setzero_si256()
            };
            (xv, off, *x.d.get_unchecked(blk))
        };
        let mut blk = 0;
        while blk < nb {
            if !Unpack2::<K>::BYTES && blk + 1 < nb {
                // A pair of nibble blocks: one 32-byte load per row serves both.
                let (xv0, off0, xd0) = act(blk);
                let (xv1, off1, xd1) = act(blk + 1);
                for (r, a) in acc.iter_mut().enumerate() {
                    let sb = (row0 + r) * nb;
                    let v = _mm256_loadu_si256(
                        m.codes.as_ptr().add(sb * BLOCK / 2 + blk * 16) as *const __m256i
                    );
                    let c0 = u.finish(_mm256_and_si256(v, u.low), m, sb + blk);
                    let c1 = u.finish(
                        _mm256_and_si256(_mm256_srli_epi16(v, 4), u.low),
                        m,
                        sb + blk + 1,
                    );
                    let s0 = _mm256_set1_ps(*m.scale.get_unchecked(sb + blk) * xd0);
                    let s1 = _mm256_set1_ps(*m.scale.get_unchecked(sb + blk + 1) * xd1);
                    *a = _mm256_fmadd_ps(u.product(c0, xv0, off0), s0, *a);
                    *a = _mm256_fmadd_ps(u.product(c1, xv1, off1), s1, *a);
                }
                blk += 2;
                continue;
            }
            let (xv, off, xd) = act(blk);
            for (r, a) in acc.iter_mut().enumerate() {
                let p = u.product(u.codes(m, row0 + r, nb, blk), xv, off);
                let s = _mm256_set1_ps(*m.scale.get_unchecked((row0 + r) * nb + blk) * xd);
                *a = _mm256_fmadd_ps(p, s, *a);
            }
            blk += 1;
        }
        _mm256_storeu_ps(out.as_mut_ptr(), sum8(&acc));
        if !Unpack2::<K>::CENTRED {
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
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn block_rows_avx2(
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
        with_kind!(m, K => by_fours!(dot_blocks_avx2::<K>(m, row, nb, x, x_first, out)));
    }
}

/// One activation row against weight rows first..first + out.len(): the AVX2 decode matvec,
/// in one call so the loop over rows carries no call per row (the lines layout through
/// `matvec_lines`).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn matvec_avx2(
    m: &Blocks,
    first: usize,
    nb: usize,
    x: &QuantizedRows,
    out: &mut [f32],
) {
    // SAFETY: this function's contract: the caller checked AVX2 + FMA; the assert below (or
    // `matvec_lines`') keeps the weight rows and the activation row inside their buffers.
    unsafe {
        if !m.lines.is_empty() {
            return matvec_lines(m, first, nb, x, out);
        }
        assert!((first + out.len()) * nb <= m.scale.len() && x.d.len() >= nb);
        with_kind!(m, K => {
            let mut k = 0;
            while k + 8 <= out.len() {
                rows8_avx2::<K>(m, first + k, nb, x, &mut out[k..k + 8]);
                k += 8;
            }
            for (k, o) in out.iter_mut().enumerate().skip(k) {
                dot_blocks_avx2::<K, 1>(m, first + k, nb, x, 0, std::slice::from_mut(o));
            }
        })
    }
}

/// `blocks::quantize_rows` with AVX2 (the same bytes): per block of 32, the largest magnitude,
/// then each value times `limit` / amax rounded half away from zero (truncation, plus one step
/// outwards where the exact remainder is at least a half) and packed to int8.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_avx2(x: &[f32], out: &mut QuantizedRows, limit: f32) {
    // SAFETY: this function's contract: the caller checked AVX2 + FMA; every load and store is
    // inside a whole block of `x` or `out.q` (chunks of 32), and `out.d` / `out.s` hold one
    // value per block (asserted).
    unsafe {
        use std::arch::x86_64::*;
        assert!(
            out.q.len() >= x.len() && out.d.len() * BLOCK >= x.len() && out.s.len() == out.d.len()
        );
        let sign = _mm256_set1_ps(-0.0);
        let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (b, (xb, qb)) in x
            .chunks_exact(BLOCK)
            .zip(out.q.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xb.as_ptr().add(8 * i)));
            let a = v.map(|v| _mm256_andnot_ps(sign, v));
            let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
            let d = amax / limit;
            let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let r = v.map(|v| {
                let t = _mm256_mul_ps(v, id);
                let whole = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(t);
                let rest = _mm256_andnot_ps(sign, _mm256_sub_ps(t, whole));
                let outwards = _mm256_and_ps(
                    _mm256_cmp_ps::<_CMP_GE_OQ>(rest, half),
                    _mm256_or_ps(one, _mm256_and_ps(sign, t)),
                );
                _mm256_cvttps_epi32(_mm256_add_ps(whole, outwards))
            });
            let sum = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
            let sum = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256::<1>(sum),
            );
            let sum = _mm_add_epi32(sum, _mm_unpackhi_epi64(sum, sum));
            let sum = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32::<1>(sum)));
            // packs interleave the 128-bit lanes: 4-byte groups come out as r0 r1 r2 r3 (low
            // halves), then the high halves; `order` puts each row's two groups together.
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(r[0], r[1]),
                _mm256_packs_epi32(r[2], r[3]),
            );
            let bytes = _mm256_permutevar8x32_epi32(bytes, order);
            _mm256_storeu_si256(qb.as_mut_ptr() as *mut __m256i, bytes);
            out.d[b] = d;
            out.s[b] = d * sum as f32;
        }
    }
}

/// G groups of 16 weight rows in the lines layout with one byte per code (`Blocks::interleave`
/// without nibbles) against activation rows xr..xr + X: [group][half][activation row] vectors of
/// 8 rows' dot products (half 0: the group's rows 0..8, half 1: 8..16). AVX2's `tile`: each
/// 32-byte half line holds 8 rows' 4 codes, and one `maddubs` against 4 broadcast activations
/// adds them into each row's own pair of 16-bit lanes (codes unsigned, activations signed), with
/// no reduction across rows. The 16-bit sums run over `RUN` quads before one `madd` widens them:
/// what the codes allow without saturating (`run_of`). Per block, one conversion and scaling per
/// 8 rows, as in the VNNI `tile`. Only call it from the `target_feature` entry points below.
#[inline(always)]
unsafe fn lines_tile<const G: usize, const X: usize, const RUN: usize>(
    m: &Blocks,
    g0: usize,
    nb: usize,
    x: &QuantizedRows,
    xr: usize,
) -> [[[std::arch::x86_64::__m256; X]; 2]; G] {
    // SAFETY: this function's contract: the caller checked AVX2 + FMA and keeps groups
    // g0..g0 + G inside the layout and activation rows xr..xr + X inside `x`.
    unsafe {
        use std::arch::x86_64::*;
        let padded = m.scale_by_block.len() / nb;
        let centre = m.centre as f32;
        let per = BLOCK / 4;
        let ones = _mm256_set1_epi16(1);
        let zero = _mm256_setzero_si256();
        let mut acc = [[[_mm256_setzero_ps(); X]; 2]; G];
        for b in 0..nb {
            let mut sums = [[[zero; X]; 2]; G];
            for l0 in (0..per).step_by(RUN) {
                let mut pairs = [[[zero; X]; 2]; G];
                for l in l0..l0 + RUN {
                    let xq: [__m256i; X] = std::array::from_fn(|j| {
                        let at = ((xr + j) * nb + b) * BLOCK + 4 * l;
                        _mm256_set1_epi32((x.q.as_ptr().add(at) as *const i32).read_unaligned())
                    });
                    for (g, halves) in pairs.iter_mut().enumerate() {
                        let line = m.lines.as_ptr().add(((g0 + g) * nb + b) * per + l) as *const u8;
                        for (h, row) in halves.iter_mut().enumerate() {
                            let w = _mm256_load_si256(line.add(32 * h) as *const __m256i);
                            for (p, &xv) in row.iter_mut().zip(&xq) {
                                *p = _mm256_add_epi16(*p, _mm256_maddubs_epi16(w, xv));
                            }
                        }
                    }
                }
                for (g, halves) in sums.iter_mut().enumerate() {
                    for (h, row) in halves.iter_mut().enumerate() {
                        for (s, &p) in row.iter_mut().zip(&pairs[g][h]) {
                            *s = _mm256_add_epi32(*s, _mm256_madd_epi16(p, ones));
                        }
                    }
                }
            }
            for (g, halves) in acc.iter_mut().enumerate() {
                for (h, row) in halves.iter_mut().enumerate() {
                    let at = b * padded + (g0 + g) * GROUP + 8 * h;
                    let scale = _mm256_loadu_ps(m.scale_by_block.as_ptr().add(at));
                    for (j, (a, &isum)) in row.iter_mut().zip(&sums[g][h]).enumerate() {
                        let xb = (xr + j) * nb + b;
                        let (d, s) = (*x.d.get_unchecked(xb), *x.s.get_unchecked(xb));
                        let t = _mm256_fmsub_ps(
                            _mm256_cvtepi32_ps(isum),
                            _mm256_set1_ps(d),
                            _mm256_set1_ps(centre * s),
                        );
                        *a = _mm256_fmadd_ps(t, scale, *a);
                    }
                }
            }
        }
        acc
    }
}

/// Quads of a block whose `maddubs` pair sums add up in 16 bits without saturating, for codes
/// under `centre` x 2 against activations up to `limit`: 8 (a whole block) for Q4_0's codes
/// (2 x 15 x 127 x 8 = 30,480), 4 for Q5_0's (2 x 31 x 127 x 4 = 31,496), 1 for Q8_0's, which
/// need `NARROW` activations even for one (2 x 255 x 63 = 32,130).
fn run_of(m: &Blocks, limit: u8) -> usize {
    let top = 2 * (2 * m.centre as u32 - 1) * limit as u32;
    let quads = (32_767 / top) as usize;
    assert!(
        quads >= 1,
        "codes up to {} saturate against activations up to {limit}",
        2 * m.centre - 1
    );
    [8, 4, 2, 1].into_iter().find(|&r| r <= quads).unwrap_or(1)
}

/// Stores what fits of 8 rows' dot products at `out[at..]` (a last, partial group through a
/// copy).
#[inline(always)]
unsafe fn store8(out: &mut [f32], at: usize, v: std::arch::x86_64::__m256) {
    // SAFETY: this function's contract: the caller checked AVX; the whole store is taken only
    // when all 8 lanes lie inside `out`.
    unsafe {
        use std::arch::x86_64::_mm256_storeu_ps;
        if at + 8 <= out.len() {
            return _mm256_storeu_ps(out.as_mut_ptr().add(at), v);
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        if at < out.len() {
            let n = out.len() - at;
            out[at..].copy_from_slice(&lanes[..n]);
        }
    }
}

/// Runs `$body` with `$run` bound to `run_of`'s answer as a constant.
macro_rules! with_run {
    ($m:expr, $x:expr, $run:ident => $body:expr) => {
        match run_of($m, $x.limit) {
            8 => {
                const $run: usize = 8;
                $body
            }
            4 => {
                const $run: usize = 4;
                $body
            }
            2 => {
                const $run: usize = 2;
                $body
            }
            _ => {
                const $run: usize = 1;
                $body
            }
        }
    };
}

/// One activation row (`xr` = 0) against weight rows first..first + out.len() in the lines layout
/// with bytes (`first` a whole group): two groups at a time, then one. `matvec_avx2`'s branch
/// for that layout, inlined into it.
#[inline(always)]
unsafe fn matvec_lines(m: &Blocks, first: usize, nb: usize, x: &QuantizedRows, out: &mut [f32]) {
    // SAFETY: this function's contract: the caller (`matvec_avx2`) checked AVX2 + FMA; the
    // asserts keep the groups read inside the layout and the activation row inside `x`.
    unsafe {
        assert!(!m.nibbles && first.is_multiple_of(GROUP) && nb <= x.d.len());
        let (g0, groups) = (first / GROUP, out.len().div_ceil(GROUP));
        let padded = m.scale_by_block.len() / nb;
        assert!((g0 + groups) * GROUP <= padded && m.lines.len() >= padded / GROUP * nb * 8);
        with_run!(m, x, RUN => {
            let mut g = 0;
            while g < groups {
                let take = (groups - g).min(2);
                let mut put = |t: &[[[std::arch::x86_64::__m256; 1]; 2]]| {
                    for (i, [[lo], [hi]]) in t.iter().enumerate() {
                        store8(out, (g + i) * GROUP, *lo);
                        store8(out, (g + i) * GROUP + 8, *hi);
                    }
                };
                if take == 2 {
                    put(&lines_tile::<2, 1, RUN>(m, g0 + g, nb, x, 0));
                } else {
                    put(&lines_tile::<1, 1, RUN>(m, g0 + g, nb, x, 0));
                }
                g += take;
            }
        })
    }
}

/// All weight rows in the lines layout with bytes against `n` activation rows (x_first..), y as
/// [n][rows]: one group against two activation rows at a time, then the last row alone.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn matmul_lines_avx2(
    m: &Blocks,
    rows: usize,
    nb: usize,
    x: &QuantizedRows,
    x_first: usize,
    n: usize,
    y: &mut [f32],
) {
    // SAFETY: this function's contract: the caller checked AVX2 + FMA; the asserts keep the
    // groups inside the layout and the activation rows and outputs inside their buffers.
    unsafe {
        let padded = m.scale_by_block.len() / nb;
        assert!(!m.nibbles && rows <= padded && m.lines.len() >= padded / GROUP * nb * 8);
        assert!((x_first + n) * nb <= x.d.len() && y.len() >= n * rows);
        with_run!(m, x, RUN => {
            for g in 0..rows.div_ceil(GROUP) {
                let mut i = 0;
                while i < n {
                    let put = |y: &mut [f32], i: usize, j: usize, [lo, hi]: [std::arch::x86_64::__m256; 2]| {
                        let row = &mut y[(i + j) * rows..(i + j + 1) * rows];
                        store8(row, g * GROUP, lo);
                        store8(row, g * GROUP + 8, hi);
                    };
                    if n - i >= 2 {
                        let [[lo, hi]] = lines_tile::<1, 2, RUN>(m, g, nb, x, x_first + i);
                        put(y, i, 0, [lo[0], hi[0]]);
                        put(y, i, 1, [lo[1], hi[1]]);
                        i += 2;
                    } else {
                        let [[[lo], [hi]]] = lines_tile::<1, 1, RUN>(m, g, nb, x, x_first + i);
                        put(y, i, 0, [lo, hi]);
                        i += 1;
                    }
                }
            }
        })
    }
}
