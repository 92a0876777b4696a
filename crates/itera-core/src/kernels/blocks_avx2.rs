//! The AVX2 kernels of the block formats (`blocks.rs`), for CPUs without AVX-512 VNNI: one
//! block of 32 codes per step in `maddubs` integer products, eight weight rows per activation
//! load in decode, four activation rows per unpacked weight row for batches.

use super::blocks::{Blocks, QuantizedRows, NARROW};
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
    /// Q4_0 or Q5_0 with one byte per code (`blocks::wide_codes`).
    pub(super) const WIDE: u8 = 5;
}

/// Runs `$body` with `$k` bound to `m`'s format as a constant (`kind`).
macro_rules! with_kind {
    ($m:expr, $k:ident => $body:expr) => {{
        let m: &Blocks = $m;
        if !m.nibbles && m.centre < 32 {
            const $k: u8 = kind::WIDE;
            $body
        } else if !m.nibbles {
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
    const SMALL: bool = K == kind::Q4_0 || K == kind::Q5_0 || K == kind::WIDE;
    /// One byte per code: a block is one 32-byte load.
    const BYTES: bool = K == kind::Q8_0 || K == kind::WIDE;

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
        if !m.scale_by_block.is_empty() && (K == kind::WIDE || K == kind::Q8_0 && x.limit <= NARROW)
        {
            return rows8_by_block::<K>(m, row0, nb, x, out);
        }
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

/// `rows8_avx2` from the by-block scales (`Blocks::scale_by_block`), for wide codes and for
/// Q8_0 with `NARROW` activations. A row's block then costs a load, `maddubs`, `madd`, a
/// conversion, a lane permute and an FMA: what the codes' centre (and for wide codes the lift)
/// adds is summed for 8 rows at once and taken off at the end, and each row's scale product
/// comes out of one 8-row product by the permute.
/// - Wide codes (Q4_0, Q5_0; measured on AMD EPYC Zen 3, AVX2: Q4_0 decode / f32 medians 1.35x
///   -> 1.42x and 1.23x -> 1.29x in two alternated series, Q5_0 1.29x -> 1.39x,
///   docs/performance.md): the activations lifted by 128 to unsigned bytes multiply the codes
///   (under 32) as they are; the lift adds scale x 128 x the codes' sum x the activations' step
///   (`lift_by_block`), the centre scale x centre x the activations' sum.
/// - Q8_0 (codes 0..=255, centre 128; 2026-12-02, docs/performance.md): the codes multiply the
///   signed activations as they are, which `NARROW` keeps from saturating; the centre adds
///   scale x 128 x the activations' sum. Before, each row's block took the sign trick's three
///   extra operations and a scalar scale product.
#[inline(always)]
unsafe fn rows8_by_block<const K: u8>(
    m: &Blocks,
    row0: usize,
    nb: usize,
    x: &QuantizedRows,
    out: &mut [f32],
) {
    // SAFETY: this function's contract (`rows8_avx2`'s): AVX2 + FMA checked, rows
    // row0..row0 + 8 and activation row 0 inside the matrix and `x`, `out` holds 8; the
    // by-block arrays hold every row of every block.
    unsafe {
        use std::arch::x86_64::*;
        let signed_x = K == kind::Q8_0;
        let rows = m.scale_by_block.len() / nb;
        let (flip, ones) = (_mm256_set1_epi8(-128), _mm256_set1_epi16(1));
        let lane = |r: i32| _mm256_set1_epi32(r);
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut lift = _mm256_setzero_ps();
        for blk in 0..nb {
            let xv = _mm256_loadu_si256(x.q.as_ptr().add(blk * BLOCK) as *const __m256i);
            let xv = if signed_x {
                xv
            } else {
                _mm256_xor_si256(xv, flip)
            };
            let xd = _mm256_set1_ps(*x.d.get_unchecked(blk));
            let at = blk * rows + row0;
            let scales = _mm256_loadu_ps(m.scale_by_block.as_ptr().add(at));
            let sd = _mm256_mul_ps(scales, xd);
            if !signed_x {
                let lifted = _mm256_loadu_ps(m.lift_by_block.as_ptr().add(at));
                lift = _mm256_fmadd_ps(lifted, xd, lift);
            }
            let centred = m.centre as f32 * *x.s.get_unchecked(blk);
            lift = _mm256_fmadd_ps(scales, _mm256_set1_ps(centred), lift);
            for (r, a) in acc.iter_mut().enumerate() {
                let c = _mm256_loadu_si256(
                    m.codes.as_ptr().add(((row0 + r) * nb + blk) * BLOCK) as *const __m256i
                );
                // `maddubs` multiplies unsigned bytes (its first operand) by signed ones.
                let pairs = if signed_x {
                    _mm256_maddubs_epi16(c, xv)
                } else {
                    _mm256_maddubs_epi16(xv, c)
                };
                let p = _mm256_madd_epi16(pairs, ones);
                let s = _mm256_permutevar8x32_ps(sd, lane(r as i32));
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, *a);
            }
        }
        _mm256_storeu_ps(out.as_mut_ptr(), _mm256_sub_ps(sum8(&acc), lift));
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
/// in one call so the loop over rows carries no call per row.
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
