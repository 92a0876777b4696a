//! The AVX-512 VNNI kernels of the block formats (`blocks.rs`), all in `vpdpbusd` integer dot
//! products: for Q8_0, Q4_0 and Q5_0 in the lines layout, groups of 16 weight rows, one lane per
//! row (`tile`, every batch size); for the packed formats (Q4_1, NF4), 16 weight rows at a time
//! for decode and four activation rows per unpacked weight row for batches.

use super::avx512::{pair_of, sum16};
use super::blocks::{Blocks, QuantizedRows, GROUP};
use crate::format::dtype::BLOCK;

/// The AVX-512 VNNI kernel: one weight row against X activation rows; each pair of blocks is
/// unpacked once and feeds X `vpdpbusd`s (64 codes each). Writes the X dot products to `out`.
/// Not itself a `target_feature` function: it is always inlined into the AVX-512 entry points
/// below (`block_rows_avx512`, `matmul_avx512`), so the loops over weight rows carry no
/// call per row. Only call it from such a function.
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
struct Unpack {
    low: std::arch::x86_64::__m256i,
    sixteen: std::arch::x86_64::__m512i,
    table: Option<std::arch::x86_64::__m512i>,
}

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
/// the 16 dot products, instead of a horizontal reduction per row. Like `tile`, not itself a
/// `target_feature` function, so that it is inlined into the entry points below (as such
/// functions they were called per 16 rows, and the one-row LM head ran 1.1-1.4x slower in
/// alternated runs); only call it from them.
#[inline(always)]
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

/// G groups of 16 weight rows in the lines layout (`Blocks::interleave`) from group `g0`, against
/// activation rows xr..xr + X: [group][activation row] vectors of the 16 rows' dot products.
/// Per block and 4 columns, the group's 16 x 4 codes (one line, or half a line's nibbles for
/// Q4_0: `NIB`) feed X `vpdpbusd`s, each against one activation row's 4 codes broadcast, into the
/// rows' own lanes (codes unsigned, activations signed); per block the integer sums are
/// converted once and scaled for the 16 rows together: (sum x d - centre x d x the activations'
/// sum) x the rows' scales. G x X independent sums keep `vpdpbusd`'s latency hidden (one
/// activation row: eight groups at a time). Only call it from the `target_feature` entry points
/// below, into which it is inlined.
#[inline(always)]
unsafe fn tile<const G: usize, const X: usize, const NIB: bool>(
    m: &Blocks,
    g0: usize,
    nb: usize,
    x: &QuantizedRows,
    xr: usize,
) -> [[std::arch::x86_64::__m512; X]; G] {
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for
    // and keeps groups g0..g0 + G inside the layout and activation rows xr..xr + X inside `x`.
    unsafe {
        use std::arch::x86_64::*;
        let padded = m.scale_by_block.len() / nb;
        let centre = m.centre as f32;
        let per = m.lines_per_block();
        let low = _mm512_set1_epi8(0x0F);
        let mut acc = [[_mm512_setzero_ps(); X]; G];
        for b in 0..nb {
            let mut sums = [[_mm512_setzero_si512(); X]; G];
            for l in 0..per {
                for (g, row) in sums.iter_mut().enumerate() {
                    let line = m.lines.as_ptr().add(((g0 + g) * nb + b) * per + l);
                    let v = _mm512_load_si512(line as *const _);
                    if NIB {
                        quad(row, _mm512_and_si512(v, low), x, nb, b, xr, l);
                        let high = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                        quad(row, high, x, nb, b, xr, l + per);
                    } else {
                        quad(row, v, x, nb, b, xr, l);
                    }
                }
            }
            for (g, (row, sum)) in acc.iter_mut().zip(&sums).enumerate() {
                let at = b * padded + (g0 + g) * GROUP;
                let scale = _mm512_loadu_ps(m.scale_by_block.as_ptr().add(at));
                for (j, (a, &isum)) in row.iter_mut().zip(sum).enumerate() {
                    let xb = (xr + j) * nb + b;
                    let (d, s) = (*x.d.get_unchecked(xb), *x.s.get_unchecked(xb));
                    let t = _mm512_fmsub_ps(
                        _mm512_cvtepi32_ps(isum),
                        _mm512_set1_ps(d),
                        _mm512_set1_ps(centre * s),
                    );
                    *a = _mm512_fmadd_ps(t, scale, *a);
                }
            }
        }
        acc
    }
}

/// Adds 16 rows' codes `w` for columns 4k..4k + 4 of block `b` times each activation row's
/// (xr..xr + X) four codes there, broadcast, into `sums`.
#[inline(always)]
unsafe fn quad<const X: usize>(
    sums: &mut [std::arch::x86_64::__m512i; X],
    w: std::arch::x86_64::__m512i,
    x: &QuantizedRows,
    nb: usize,
    b: usize,
    xr: usize,
    k: usize,
) {
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for
    // and keeps the activation rows and block inside `x`.
    unsafe {
        use std::arch::x86_64::*;
        for (j, sum) in sums.iter_mut().enumerate() {
            let at = ((xr + j) * nb + b) * BLOCK + 4 * k;
            let xv = _mm512_set1_epi32((x.q.as_ptr().add(at) as *const i32).read_unaligned());
            *sum = _mm512_dpbusd_epi32(*sum, w, xv);
        }
    }
}

/// Stores the 16 dot products of one group at `out[at..]`, as many as fit.
#[inline(always)]
unsafe fn store_group(out: &mut [f32], at: usize, v: std::arch::x86_64::__m512) {
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for;
    // the mask keeps the store inside `out`.
    unsafe {
        use std::arch::x86_64::*;
        let left = out.len().saturating_sub(at).min(GROUP);
        let mask = ((1u32 << left) - 1) as u16;
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(at.min(out.len())), mask, v);
    }
}

/// One activation row (`xr`) against weight rows first..first + out.len() in the lines layout
/// (`first` a whole group): eight groups at a time, then four, two, one.
#[inline(always)]
unsafe fn matvec_lines<const NIB: bool>(
    m: &Blocks,
    first: usize,
    nb: usize,
    x: &QuantizedRows,
    xr: usize,
    out: &mut [f32],
) {
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for;
    // the asserts keep the groups read inside the layout and the activation row inside `x`.
    unsafe {
        assert!(first.is_multiple_of(GROUP) && (xr + 1) * nb <= x.d.len());
        let (g0, groups) = (first / GROUP, out.len().div_ceil(GROUP));
        let padded = m.scale_by_block.len() / nb;
        assert!(
            (g0 + groups) * GROUP <= padded
                && m.lines.len() >= padded / GROUP * nb * m.lines_per_block()
        );
        let mut g = 0;
        macro_rules! by {
            ($n:literal) => {
                while groups - g >= $n {
                    let t = tile::<$n, 1, NIB>(m, g0 + g, nb, x, xr);
                    for (i, [v]) in t.into_iter().enumerate() {
                        store_group(out, (g + i) * GROUP, v);
                    }
                    g += $n;
                }
            };
        }
        by!(8);
        by!(4);
        by!(2);
        by!(1);
    }
}

/// All weight rows in the lines layout against `n` activation rows (x_first..), as
/// `matmul_avx512`: two groups of weight rows against four activation rows at a time (eight
/// independent sums), then the rest of the activation rows one by one.
#[inline(always)]
unsafe fn matmul_lines<const NIB: bool>(
    m: &Blocks,
    rows: usize,
    nb: usize,
    x: &QuantizedRows,
    x_first: usize,
    n: usize,
    y: &mut [f32],
) {
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for
    // and that the activation rows and outputs exist; the assert keeps the groups inside the layout.
    unsafe {
        let padded = m.scale_by_block.len() / nb;
        assert!(rows <= padded && m.lines.len() >= padded / GROUP * nb * m.lines_per_block());
        let (full, groups) = (n / 4 * 4, rows.div_ceil(GROUP));
        // Groups outer: a pair of groups' codes stay in L1 while the activations pass.
        let mut g = 0;
        macro_rules! by {
            ($n:literal) => {
                while groups - g >= $n {
                    for i in (0..full).step_by(4) {
                        let t = tile::<$n, 4, NIB>(m, g, nb, x, x_first + i);
                        for (dg, vs) in t.into_iter().enumerate() {
                            for (j, v) in vs.into_iter().enumerate() {
                                let row = &mut y[(i + j) * rows..(i + j + 1) * rows];
                                store_group(row, (g + dg) * GROUP, v);
                            }
                        }
                    }
                    g += $n;
                }
            };
        }
        by!(2);
        by!(1);
        for i in full..n {
            matvec_lines::<NIB>(m, 0, nb, x, x_first + i, &mut y[i * rows..(i + 1) * rows]);
        }
    }
}

/// Whether `rows16_avx512` serves these packed blocks: an even count of at most 16 (the bias term
/// fills one vector's lanes).
fn rows16_serves(nb: usize) -> bool {
    nb.is_multiple_of(2) && nb <= 16
}

/// `blocks::quantize_rows` with AVX-512: the same bytes, scales and sums as `quantize_avx2`, each
/// step the same operation on 16 lanes (a block of 32 activations is two vectors, its codes two
/// saturating narrowings straight to bytes), in about two thirds of the instructions.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn quantize_avx512(x: &[f32], out: &mut QuantizedRows, limit: f32) {
    // SAFETY: this function's contract: the caller checked AVX-512F; every load and store is
    // inside a whole block of `x` or `out.q` (chunks of 32), and `out.d` / `out.s` hold one
    // value per block (asserted).
    unsafe {
        use std::arch::x86_64::*;
        assert!(
            out.q.len() >= x.len() && out.d.len() * BLOCK >= x.len() && out.s.len() == out.d.len()
        );
        let sign = _mm512_set1_epi32(i32::MIN);
        let (half, one) = (
            _mm512_set1_ps(0.5),
            _mm512_set1_epi32(1.0f32.to_bits() as i32),
        );
        for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
            let v = [
                _mm512_loadu_ps(xb.as_ptr()),
                _mm512_loadu_ps(xb.as_ptr().add(16)),
            ];
            let amax =
                _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
            let d = amax / limit;
            let id = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            // Rounded half away from zero: truncated, plus one step outwards (the sign of t)
            // where the exact remainder is at least a half.
            let r = v.map(|v| {
                let t = _mm512_mul_ps(v, id);
                let whole = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(t);
                let outwards =
                    _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(t, whole)), half);
                let step = _mm512_or_si512(one, _mm512_and_si512(sign, _mm512_castps_si512(t)));
                _mm512_cvttps_epi32(_mm512_mask_add_ps(
                    whole,
                    outwards,
                    whole,
                    _mm512_castsi512_ps(step),
                ))
            });
            let qb = out.q.as_mut_ptr().add(b * BLOCK);
            _mm_storeu_si128(qb as *mut __m128i, _mm512_cvtsepi32_epi8(r[0]));
            _mm_storeu_si128(qb.add(16) as *mut __m128i, _mm512_cvtsepi32_epi8(r[1]));
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(r[0], r[1]));
            out.d[b] = d;
            out.s[b] = d * sum as f32;
        }
    }
}

/// One activation row against weight rows first..first + out.len(): the decode matvec, in one
/// call so the set-up is paid once per matrix, not per row (the row kernels are inlined here).
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
        if !m.lines.is_empty() {
            return if m.nibbles {
                matvec_lines::<true>(m, first, nb, x, 0, out)
            } else {
                matvec_lines::<false>(m, first, nb, x, 0, out)
            };
        }
        let mut j = 0;
        if rows16_serves(nb) {
            assert!((first + out.len()) * nb <= m.scale.len() && x.q.len() >= nb * BLOCK);
            while j + 16 <= out.len() {
                let v = rows16_avx512(m, first + j, nb, x, 0);
                _mm512_storeu_ps(out.as_mut_ptr().add(j), v);
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
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn block_rows_avx512(
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
        assert!(
            m.lines.is_empty(),
            "the lines layout is read by groups of rows"
        );
        by_fours!(dot_blocks_avx512(m, row, nb, x, x_first, out));
    }
}

/// All weight rows against `n` activation rows (x_first..): y [n, rows], in one call: in the
/// VNNI layout through `tile`; packed, groups of 16 rows through `rows16_avx512`, the rest one
/// row at a time for four activation rows at once.
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
        if !m.lines.is_empty() {
            return if m.nibbles {
                matmul_lines::<true>(m, rows, nb, x, x_first, n, y)
            } else {
                matmul_lines::<false>(m, rows, nb, x, x_first, n, y)
            };
        }
        let mut r = 0;
        if rows16_serves(nb) {
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
