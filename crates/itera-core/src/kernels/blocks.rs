//! Block formats (Q8_0, Q5_0, Q4_0, Q4_1, NF4) repacked for SIMD and multiplied in integers:
//! the layout (`Blocks`, `repack`), the activations quantized to int8 per block
//! (`QuantizedRows`), the portable dot product, and `dot`, which picks the AVX-512 VNNI kernels
//! (`blocks_avx512.rs`), the AVX2 ones (`blocks_avx2.rs`) or the portable one.

use crate::format::dtype::{self, DType, BLOCK};

use super::avx512::has_avx512_vnni;
#[cfg(target_arch = "x86_64")]
use super::{blocks_avx2::block_rows_avx2, blocks_avx512::block_rows_avx512};

/// Whether the block formats run on the AVX-512 VNNI kernels. A CPU that has them can run the
/// AVX2 kernels too, and which is faster is measured once (`vnni_is_faster`), not read from the
/// vendor string: Zen 4 executes 512-bit operations as two 256-bit halves. Measured there
/// (thirty-seventh session, whole decode forced each way, five alternated rounds): VNNI still
/// wins, Q4_0 1.73x and Q8_0 1.07x by median, since its byte multiply-add is one instruction.
/// `ITERA_BLOCK_KERNEL=avx512|avx2` fixes the choice (`ITERA_SIMD=avx2` rules out AVX-512).
pub(super) fn vnni_blocks() -> bool {
    use std::sync::OnceLock;
    static USE: OnceLock<bool> = OnceLock::new();
    *USE.get_or_init(|| has_avx512_vnni() && forced_kernel().unwrap_or_else(vnni_is_faster))
}

/// What `ITERA_BLOCK_KERNEL` fixes, if anything: `Some(true)` for the VNNI kernels (`avx512`),
/// `Some(false)` for the AVX2 ones (`avx2`).
pub(super) fn forced_kernel() -> Option<bool> {
    match std::env::var("ITERA_BLOCK_KERNEL").as_deref() {
        Ok("avx2") => Some(false),
        Ok("avx512") => Some(true),
        _ => None,
    }
}

/// Times the two decode matvecs (one activation row against a 512 x 256 Q8_0 and Q4_0 matrix,
/// 20 of each per trial, trials alternated, best of 5: 400 matvecs, once per process), each on
/// the layout it would get (`Blocks::interleave`: Q4_0 in nibbles for VNNI, bytes for AVX2).
#[cfg(target_arch = "x86_64")]
fn vnni_is_faster() -> bool {
    use super::blocks_avx2::matvec_avx2;
    use super::blocks_avx512::matvec_avx512;
    let (rows, cols) = (512, 256);
    let nb = cols / BLOCK;
    let wave = |n: usize, f: f32| (0..n).map(|i| (i as f32 * f).sin()).collect::<Vec<f32>>();
    let w = wave(rows * cols, 0.37);
    let (x, mut q, mut narrow) = (
        wave(cols, 0.11),
        QuantizedRows::default(),
        QuantizedRows::default(),
    );
    quantize_rows(&x, cols, &mut q, FULL);
    quantize_rows(&x, cols, &mut narrow, NARROW);
    // Repacked here, not through `Matrix`: that asks `vnni_blocks`, which is running this.
    let layouts: Vec<[Blocks; 2]> = [DType::Q8_0, DType::Q4_0]
        .iter()
        .filter_map(|&d| {
            let bytes = dtype::quantize(d, &w).ok()?;
            let packed = || repack_packed(d, rows, cols, &bytes);
            Some([
                packed().interleave(rows, nb, false),
                packed().interleave(rows, nb, true),
            ])
        })
        .collect();
    let mut y = vec![0.0; rows];
    let mut best = [f64::INFINITY; 2];
    for _ in 0..5 {
        for (vnni, best) in best.iter_mut().enumerate() {
            let t = std::time::Instant::now();
            for _ in 0..20 {
                for both in &layouts {
                    let b = &both[vnni];
                    // SAFETY: AVX-512 F/BW/VNNI (checked by the caller) imply AVX2 + FMA
                    // (`simd::detected`); all `rows` rows and the one activation row exist.
                    unsafe {
                        if vnni == 1 {
                            matvec_avx512(b, 0, nb, &q, &mut y)
                        } else {
                            let x = if b.narrow_on_avx2() { &narrow } else { &q };
                            matvec_avx2(b, 0, nb, x, &mut y)
                        }
                    }
                }
            }
            *best = best.min(t.elapsed().as_secs_f64());
        }
    }
    best[1] <= best[0]
}

#[cfg(not(target_arch = "x86_64"))]
fn vnni_is_faster() -> bool {
    false
}

/// Block formats repacked for SIMD: per row, codes of 8 bits (Q8_0) or 4 bits in "pair order"
/// (for each 64 elements, byte j holds element j in its low nibble and element j + 32 in its high
/// one, so one shift and mask give 64 codes in order); a trailing odd block keeps ggml's order.
/// Where AVX2 exists, Q8_0, Q4_0 and Q5_0 take the lines layout (`interleave`, in `lines`): with
/// one byte per code for the AVX2 kernels (`wide_codes`), Q4_0 in nibbles for the VNNI ones.
pub(super) struct Blocks {
    pub(super) codes: Vec<u8>,
    /// Q5_0's fifth bit, one u32 per block (bit j = element j).
    pub(super) high: Vec<u32>,
    pub(super) scale: Vec<f32>,
    pub(super) bias: Vec<f32>,
    pub(super) table: Option<[u8; 16]>,
    /// Two codes per byte; otherwise one per byte, in order (Q5_0's fifth bit included). In the
    /// lines layout (Q4_0's), each line holds two quads of columns: 4k.. in the low nibbles and
    /// 4(k + 4).. in the high ones.
    pub(super) nibbles: bool,
    /// The code every bias stands for (bias = -centre x scale: 128 for Q8_0 and NF4's table, 8
    /// for Q4_0, 16 for Q5_0), or 0 when the bias is free (Q4_1).
    pub(super) centre: u8,
    /// The lines layout's scales (`by_block`, `interleave`): per block, every row's scale
    /// ([blocks][rows], so that 8 (AVX2) or 16 (VNNI) consecutive rows are one load). Empty
    /// otherwise.
    pub(super) scale_by_block: Vec<f32>,
    /// The lines layout (`interleave`), which then holds the codes (`codes` is empty): per group
    /// of `GROUP` rows, per block, per 4 columns (8 for Q4_0's nibbles), one line of the
    /// group's rows' 4 codes each.
    pub(super) lines: Vec<Line>,
}

/// Rows per group of the lines layout: one `vpdpbusd` lane (4 codes) per row.
pub(super) const GROUP: usize = 16;

/// 64 bytes on a cache line of their own (a load of one never straddles two lines): the VNNI
/// layout's unit, `GROUP` rows x 4 codes.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Line(pub(super) [u8; 64]);

impl Blocks {
    /// Lines per block and group of rows in the lines layout: one per 4 columns, or per 8 where
    /// they hold nibbles.
    pub(super) fn lines_per_block(&self) -> usize {
        if self.nibbles {
            BLOCK / 8
        } else {
            BLOCK / 4
        }
    }

    /// Q8_0: one byte per code, centred on 128, no table.
    pub(super) fn q8_0(&self) -> bool {
        !self.nibbles && self.centre == 128 && self.table.is_none()
    }

    /// The activation range a product against these weights quantizes to: `NARROW` where the
    /// AVX2 kernel multiplies Q8_0's codes as they are (`blocks_avx2::lines_tile`), which needs
    /// it, else `FULL` (VNNI's products cannot saturate).
    pub(super) fn activation_limit(&self) -> u8 {
        if self.narrow_on_avx2() && !vnni_blocks() {
            NARROW
        } else {
            FULL
        }
    }

    /// Whether the AVX2 kernel needs `NARROW` activations for these weights (Q8_0 in lines).
    fn narrow_on_avx2(&self) -> bool {
        self.q8_0() && !self.lines.is_empty()
    }

    /// Codes of block `blk` of `row` (with Q5_0's high bit and NF4's table applied).
    #[inline(always)]
    pub(super) fn block(&self, row: usize, nb: usize, blk: usize) -> [u8; BLOCK] {
        let mut q = [0u8; BLOCK];
        if !self.lines.is_empty() {
            let per = self.lines_per_block();
            let first = (row / GROUP * nb + blk) * per;
            let lane = row % GROUP * 4;
            for (k, quad) in q.chunks_exact_mut(4).enumerate() {
                let bytes = &self.lines[first + k % per].0[lane..lane + 4];
                // Quads past the first `per` are the high nibbles (only when there are nibbles).
                let shift = k / per * 4;
                for (c, &b) in quad.iter_mut().zip(bytes) {
                    *c = if self.nibbles { (b >> shift) & 0x0F } else { b };
                }
            }
        } else if !self.nibbles {
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

/// Activation rows quantized to int8 per block of 32: values, scale and scale * sum of values,
/// and the largest magnitude the values were given (`FULL` or `NARROW`).
#[derive(Default)]
pub struct QuantizedRows {
    pub(super) q: Vec<i8>,
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<f32>,
    pub(super) limit: u8,
}

/// The activations' usual code range, -127..=127.
pub(super) const FULL: u8 = 127;
/// The range the AVX2 Q8_0 kernel needs (`blocks_avx2::lines_tile`): Q8_0's codes
/// (0..=255 with the centre 128) multiply signed activations in `maddubs`, whose 16-bit pair
/// sums cannot saturate when |activation| <= 63 (2 x 255 x 63 = 32,130). The bit it takes from
/// the activations does not show: the shipped model in Q8_0 on the held-out fixture (`itera eval
/// --stepwise`, decode's kernels) 3.952345 -> 3.952235 nats per token (f32 3.951721), for a
/// 1.2x faster Q8_0 matvec on AMD Zen 3 (the by-block kernel before the lines layout;
/// docs/performance.md, 2026-12-02).
pub(super) const NARROW: u8 = 63;

/// Each block of 32 activations to int8 with step amax / `limit`, rounding half away from zero
/// (as `f32::round`). The AVX2 version gives the same bytes; the portable loop does not
/// vectorise (`round` and the saturating cast are scalar) and was 8.4% of a one-thread Q8_0
/// decode's samples on an AVX2 Zen 3, more than the scan.
pub(super) fn quantize_rows(x: &[f32], cols: usize, out: &mut QuantizedRows, limit: u8) {
    out.size_for(x.len());
    out.limit = limit;
    debug_assert_eq!(cols % BLOCK, 0);
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx512() {
        // SAFETY: AVX-512F present; the outputs were sized for `x` above.
        return unsafe { super::blocks_avx512::quantize_avx512(x, out, limit as f32) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2() {
        // SAFETY: AVX2 + FMA present; the outputs were sized for `x` above.
        return unsafe { super::blocks_avx2::quantize_avx2(x, out, limit as f32) };
    }
    quantize_portable(x, out, limit as f32)
}

impl QuantizedRows {
    /// Room for `len` activations: their codes and one scale and sum per block.
    fn size_for(&mut self, len: usize) {
        self.q.resize(len, 0);
        self.d.resize(len / BLOCK, 0.0);
        self.s.resize(len / BLOCK, 0.0);
    }
}

crate::multiversion! {
    fn quantize_portable(x: &[f32], out: &mut QuantizedRows, limit: f32) {
        for (b, (xb, qb)) in x.chunks_exact(BLOCK).zip(out.q.chunks_exact_mut(BLOCK)).enumerate() {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / limit;
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
    // The row kernels read a row's codes in order; the lines layout (whose matrices go through
    // `matvec_avx512` and `matmul_avx512`) reaches here only from tests.
    #[cfg(target_arch = "x86_64")]
    if vnni_blocks() && m.lines.is_empty() {
        // SAFETY: the CPU has AVX-512 F/BW/VNNI (checked); `block_rows_avx512` asserts the bounds
        // that keep every load inside the row's codes and the activation rows' slices.
        unsafe { block_rows_avx512(m, row, nb, x, x_first, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2() && m.lines.is_empty() {
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

/// Whether the AVX2 kernels' lines layout (`Blocks::interleave` without nibbles) is loaded: Q4_0
/// and Q5_0 codes one byte each (no nibbles, Q5_0's fifth bit included), so that a half line goes
/// straight into `maddubs` without the nibble split or Q5_0's bit spreading; the codes take
/// Q8_0's memory (the file does not change). One byte per code measured on AMD EPYC Zen 3 (AVX2,
/// the by-block kernel before the lines layout): Q4_0 decode from a median 1.02x to 1.43x f32 in
/// the same run, Q5_0 from 1.00x to 1.46x (ten alternated runs each; docs/performance.md).
fn wide_codes() -> bool {
    crate::simd::has_avx2()
}

/// ggml blocks -> the kernels' layout (see `Blocks`): lines, with Q4_0 in nibbles where the VNNI
/// kernels run and in bytes where `wide_codes` says; packed otherwise.
pub(super) fn repack(dtype: DType, rows: usize, cols: usize, bytes: &[u8]) -> Blocks {
    let b = repack_packed(dtype, rows, cols, bytes);
    if vnni_blocks() {
        b.interleave(rows, cols / BLOCK, true)
    } else if wide_codes() {
        b.interleave(rows, cols / BLOCK, false)
    } else {
        b
    }
}

impl Blocks {
    /// Where the lines layout starts: Q4_0 and Q5_0 with one byte per code, their scales and
    /// Q8_0's by block (`scale_by_block`); other formats unchanged.
    pub(super) fn by_block(self, rows: usize, nb: usize) -> Blocks {
        if self.q8_0() {
            let mut scale_by_block = vec![0.0; rows * nb];
            for (i, &s) in self.scale.iter().enumerate() {
                scale_by_block[i % nb * rows + i / nb] = s;
            }
            return Blocks {
                scale_by_block,
                ..self
            };
        }
        if !self.nibbles || self.table.is_some() || self.centre == 0 {
            return self;
        }
        let mut codes = Vec::with_capacity(rows * nb * BLOCK);
        let mut scale_by_block = vec![0.0; rows * nb];
        for row in 0..rows {
            for blk in 0..nb {
                scale_by_block[blk * rows + row] = self.scale[row * nb + blk];
                codes.extend_from_slice(&self.block(row, nb, blk));
            }
        }
        Blocks {
            codes,
            high: Vec::new(),
            nibbles: false,
            scale_by_block,
            ..self
        }
    }

    /// The lines layout of Q8_0, Q4_0 and Q5_0 (others as `by_block` leaves them): per group of
    /// 16 rows, per block, per 4 columns, the 16 rows' 4 codes as one line (`lines`), so that
    /// one `vpdpbusd` (VNNI; AVX2: one `maddubs` per half line) against 4 broadcast activations
    /// adds 4 columns into every row's own lane, with no reduction across lanes and one
    /// conversion and scaling per block and 16 (8) rows. With `nibbles`, Q4_0 keeps two codes per
    /// byte (a line holds columns 4k.. in its low nibbles and 4(k + 4).. in its high ones;
    /// `tiny`'s resident Q4_0 weights 2.87 -> 1.88 MB, and VNNI decode faster, though the LM
    /// head alone was not: performance.md, 2026-12-03); AVX2's `maddubs` takes bytes.
    /// Rows are padded to whole groups (codes at the centre, scales 0), the by-block scales
    /// likewise ([blocks][padded rows]).
    pub(super) fn interleave(self, rows: usize, nb: usize, nibbles: bool) -> Blocks {
        let b = self.by_block(rows, nb);
        if b.scale_by_block.is_empty() {
            return b;
        }
        let padded = rows.next_multiple_of(GROUP);
        // Q4_0 (the only format centred on 8: codes 0..15) keeps two codes per byte if asked.
        let nibbles = nibbles && b.centre == 8;
        let per = if nibbles { BLOCK / 8 } else { BLOCK / 4 };
        let pad = if nibbles { 0x88 } else { b.centre };
        let mut lines = vec![Line([pad; 64]); padded / GROUP * nb * per];
        for row in 0..rows {
            for blk in 0..nb {
                let codes = b.block(row, nb, blk);
                let first = (row / GROUP * nb + blk) * per;
                let lane = row % GROUP * 4;
                for (k, quad) in codes.chunks_exact(4).enumerate() {
                    let line = &mut lines[first + k % per].0[lane..lane + 4];
                    if nibbles {
                        let shift = k / per * 4;
                        for (byte, &c) in line.iter_mut().zip(quad) {
                            *byte = *byte & !(0x0F << shift) | c << shift;
                        }
                    } else {
                        line.copy_from_slice(quad);
                    }
                }
            }
        }
        let mut scale_by_block = vec![0.0; nb * padded];
        for (to, from) in scale_by_block
            .chunks_exact_mut(padded)
            .zip(b.scale_by_block.chunks_exact(rows))
        {
            to[..rows].copy_from_slice(from);
        }
        Blocks {
            codes: Vec::new(),
            lines,
            nibbles,
            scale_by_block,
            ..b
        }
    }
}

/// ggml blocks -> the kernels' layout with 4- and 5-bit codes packed (see `Blocks`).
fn repack_packed(dtype: DType, rows: usize, cols: usize, bytes: &[u8]) -> Blocks {
    let nb = cols / BLOCK;
    let nibbles = dtype != DType::Q8_0;
    let mut b = Blocks {
        codes: Vec::with_capacity(rows * cols / if nibbles { 2 } else { 1 }),
        high: Vec::new(),
        scale: Vec::with_capacity(rows * nb),
        bias: Vec::with_capacity(rows * nb),
        table: dtype::code_table(dtype),
        scale_by_block: Vec::new(),
        lines: Vec::new(),
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

    use crate::kernels::tests::random;

    /// The activation quantization is the plain formula (step amax / 127, `f32::round`), ties
    /// included: blocks whose amax is 127 have step 1, so x.5 values are exact ties; the
    /// dispatched quantizer (AVX-512, AVX2 or portable) and the AVX2 one give the same bytes.
    #[test]
    fn activation_quantization_is_the_plain_formula() {
        let mut x = random(8 * BLOCK, 7);
        for (i, v) in x[..2 * BLOCK].iter_mut().enumerate() {
            *v = if i % BLOCK == 5 {
                127.0
            } else {
                (i % 19) as f32 - 9.5
            };
        }
        x[2 * BLOCK..3 * BLOCK].fill(0.0);
        x[3 * BLOCK + 4] = -0.0;
        for limit in [FULL, NARROW] {
            let mut q = QuantizedRows::default();
            quantize_rows(&x, 4 * BLOCK, &mut q, limit);
            let mut portable = QuantizedRows::default();
            portable.size_for(x.len());
            quantize_portable(&x, &mut portable, limit as f32);
            assert_eq!((&q.q, &q.d, &q.s), (&portable.q, &portable.d, &portable.s));
            assert_eq!(q.limit, limit);
            // The AVX2 quantizer too, which an AVX-512 CPU would not otherwise run.
            #[cfg(target_arch = "x86_64")]
            if crate::simd::has_avx2() {
                let mut avx2 = QuantizedRows::default();
                avx2.size_for(x.len());
                // SAFETY: AVX2 + FMA checked; the outputs were sized for `x`.
                unsafe { super::super::blocks_avx2::quantize_avx2(&x, &mut avx2, limit as f32) };
                assert_eq!(
                    (&avx2.q, &avx2.d, &avx2.s),
                    (&portable.q, &portable.d, &portable.s)
                );
            }
            for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
                let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / limit as f32;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                let want: Vec<i8> = xb.iter().map(|v| (v * id).round() as i8).collect();
                assert_eq!(&q.q[b * BLOCK..(b + 1) * BLOCK], &want[..], "block {b}");
                assert!(want.iter().all(|&v| v.unsigned_abs() <= limit));
                let sum: i32 = want.iter().map(|&v| v as i32).sum();
                assert_eq!((q.d[b], q.s[b]), (d, d * sum as f32), "block {b}");
            }
            if limit == FULL {
                assert_eq!(q.q[6..9], [-4, -3, -2]);
            }
        }
    }

    /// Every SIMD kernel this CPU has (the dispatched one, and the AVX2 ones explicitly, which
    /// AVX-512 machines would not otherwise run) gives the portable kernel's sums: even and odd
    /// block counts, one to five activation rows, codes packed and in lines (nibbles and bytes),
    /// both activation ranges.
    #[test]
    fn simd_and_portable_block_kernels_agree() {
        let rows = 24;
        for cols in [160, 256] {
            let nb = cols / BLOCK;
            let w = random(rows * cols, 3);
            let x = random(5 * cols, 4);
            let (mut q, mut narrow) = (QuantizedRows::default(), QuantizedRows::default());
            quantize_rows(&x, cols, &mut q, FULL);
            quantize_rows(&x, cols, &mut narrow, NARROW);
            let slow_of = |q: &QuantizedRows, b: &Blocks, r: usize, i: usize| {
                let (qs, ds) = (i * cols..(i + 1) * cols, i * nb..(i + 1) * nb);
                dot_blocks_portable(b, r, nb, 0, &q.q[qs], &q.d[ds.clone()], &q.s[ds])
            };
            let slow = |b: &Blocks, r: usize, i: usize| slow_of(&q, b, r, i);
            let close = |fast: f32, slow: f32| (fast - slow).abs() <= 1e-4 * (1.0 + slow.abs());
            let layouts = DType::ALL
                .into_iter()
                .filter(|d| d.block_len() > 1)
                .flat_map(|d| {
                    let bytes = dtype::quantize(d, &w).unwrap();
                    let packed = repack_packed(d, rows, cols, &bytes);
                    let wide = repack_packed(d, rows, cols, &bytes).by_block(rows, nb);
                    let lines = repack_packed(d, rows, cols, &bytes).interleave(rows, nb, true);
                    let byte_lines =
                        repack_packed(d, rows, cols, &bytes).interleave(rows, nb, false);
                    if matches!(d, DType::Q4_0 | DType::Q5_0) {
                        assert!(
                            packed.nibbles && !wide.nibbles && wide.high.is_empty(),
                            "{d:?}"
                        );
                        assert_eq!(wide.codes.len(), rows * cols, "{d:?}");
                    }
                    if matches!(d, DType::Q8_0 | DType::Q4_0 | DType::Q5_0) {
                        // Two groups of 16 rows, the second padded; the same codes as `block`.
                        let bits = if d == DType::Q4_0 { 4 } else { 8 };
                        assert_eq!(lines.lines.len() * 64 * 8, 32 * cols * bits, "{d:?}");
                        assert_eq!(byte_lines.lines.len() * 64, 32 * cols, "{d:?}");
                        assert!(lines.codes.is_empty() && byte_lines.codes.is_empty());
                        for r in 0..rows {
                            for blk in 0..nb {
                                assert_eq!(lines.block(r, nb, blk), packed.block(r, nb, blk));
                                assert_eq!(byte_lines.block(r, nb, blk), packed.block(r, nb, blk));
                            }
                        }
                    }
                    [(d, packed), (d, lines), (d, byte_lines)]
                });
            for (dtype, b) in layouts {
                let b = &b;
                for r in 0..rows {
                    let mut fast = [0.0; 5];
                    dot(b, r, nb, &q, 0, &mut fast);
                    for (i, &f) in fast.iter().enumerate() {
                        assert!(close(f, slow(b, r, i)), "{dtype:?} {cols} dispatched");
                    }
                    #[cfg(target_arch = "x86_64")]
                    if crate::simd::has_avx2() && b.lines.is_empty() {
                        // SAFETY: AVX2 + FMA checked; rows and activation rows are in range.
                        unsafe { block_rows_avx2(b, r, nb, &q, 0, &mut fast) };
                        for (i, &f) in fast.iter().enumerate() {
                            assert!(close(f, slow(b, r, i)), "{dtype:?} {cols} avx2 rows");
                        }
                    }
                }
                #[cfg(target_arch = "x86_64")]
                if crate::simd::has_avx2() && b.lines.is_empty() {
                    let mut y = [0.0; 16];
                    // SAFETY: AVX2 + FMA checked; 13 of the 16 rows (one group of 8 and a rest) and the
                    // first activation row exist.
                    unsafe { super::super::blocks_avx2::matvec_avx2(b, 0, nb, &q, &mut y[..13]) };
                    for (r, &f) in y[..13].iter().enumerate() {
                        assert!(close(f, slow(b, r, 0)), "{dtype:?} {cols} avx2 matvec");
                    }
                    // The activations a decode product quantizes for this layout.
                    // SAFETY: as above.
                    unsafe {
                        super::super::blocks_avx2::matvec_avx2(b, 0, nb, &narrow, &mut y[..13])
                    };
                    for (r, &f) in y[..13].iter().enumerate() {
                        let want = slow_of(&narrow, b, r, 0);
                        assert!(close(f, want), "{dtype:?} {cols} avx2 matvec, narrow");
                    }
                }
                #[cfg(target_arch = "x86_64")]
                if crate::simd::has_avx2() && !b.lines.is_empty() && !b.nibbles {
                    use super::super::blocks_avx2::{matmul_lines_avx2, matvec_avx2};
                    // The activation ranges the AVX2 kernel takes for these codes (Q8_0's need
                    // `NARROW`): five activation rows (two at a time, then one) against all
                    // rows; one row against a group of 16 and a rest of 5, and against the
                    // second group alone.
                    let ranges = if b.q8_0() {
                        vec![&narrow]
                    } else {
                        vec![&q, &narrow]
                    };
                    for x in ranges {
                        let mut y = vec![0.0; 5 * rows];
                        // SAFETY: AVX2 + FMA checked; all rows and five activation rows exist.
                        unsafe { matmul_lines_avx2(b, rows, nb, x, 0, 5, &mut y) };
                        for (k, &f) in y.iter().enumerate() {
                            let (i, r) = (k / rows, k % rows);
                            let want = slow_of(x, b, r, i);
                            assert!(close(f, want), "{dtype:?} {cols} avx2 lines x{i} row {r}");
                        }
                        let mut y = [0.0; 24];
                        // SAFETY: as above; 21 of the 24 rows, then rows 16..24.
                        unsafe {
                            matvec_avx2(b, 0, nb, x, &mut y[..21]);
                            matvec_avx2(b, 16, nb, x, &mut y[21..]);
                        }
                        let want = (0..21).chain(16..19).map(|r| slow_of(x, b, r, 0));
                        for (r, (&f, want)) in y.iter().zip(want).enumerate() {
                            assert!(close(f, want), "{dtype:?} {cols} avx2 lines matvec {r}");
                        }
                    }
                }
                #[cfg(target_arch = "x86_64")]
                if has_avx512_vnni() {
                    use super::super::blocks_avx512::{matmul_avx512, matvec_avx512};
                    // Five activation rows (four at a time, then one) against all rows, and
                    // the rows of the second group of 16 alone.
                    let mut y = vec![0.0; 5 * rows];
                    // SAFETY: AVX-512 F/BW/VNNI checked; all rows and five activation rows exist.
                    unsafe { matmul_avx512(b, rows, nb, &q, 0, 5, &mut y) };
                    for (k, &f) in y.iter().enumerate() {
                        let (i, r) = (k / rows, k % rows);
                        assert!(
                            close(f, slow(b, r, i)),
                            "{dtype:?} {cols} avx512 x{i} row {r}"
                        );
                    }
                    let mut y = [0.0; 8];
                    // SAFETY: as above; rows 16..24.
                    unsafe { matvec_avx512(b, 16, nb, &q, &mut y) };
                    for (r, &f) in y.iter().enumerate() {
                        assert!(
                            close(f, slow(b, 16 + r, 0)),
                            "{dtype:?} {cols} row {}",
                            16 + r
                        );
                    }
                    // Both activation ranges, in every layout, on one group of 16 rows and a
                    // rest of 5.
                    for x in [&q, &narrow] {
                        let mut y = [0.0; 24];
                        // SAFETY: AVX-512 F/BW/VNNI checked; 21 of the 24 rows and the first
                        // activation row exist.
                        unsafe { matvec_avx512(b, 0, nb, x, &mut y[..21]) };
                        for (r, &f) in y[..21].iter().enumerate() {
                            let want = slow_of(x, b, r, 0);
                            assert!(close(f, want), "{dtype:?} {cols} avx512 matvec row {r}");
                        }
                    }
                }
            }
        }
    }
}
