//! One weight-matrix type for every storage format, and the one matmul the runtime (decode,
//! batched decode, prefill) calls. This file is the dispatch: which kernel family serves a call
//! (by storage format and number of activation rows) and how a call's work is split between the
//! threads its `Par` allows (by measured thresholds). The families live beside it, each with its
//! SIMD versions: `panels` (f32 micro-tiles), `half` (f16 / bf16), `blocks` (Q8_0, Q5_0, Q4_0,
//! Q4_1, NF4 in integers); `avx512` holds the reductions they share.
//!
//! Block formats compute in integers: the activations are quantized to int8 per block of 32
//! (`QuantizedRows`), and every block format is `w = scale * code + bias` with unsigned codes
//! (`format::dtype::block_codes`), so one kernel shape serves all five:
//! `sum_i w_i x_i = scale * dx * sum_i code_i q_i + bias * dx * sum_i q_i`.

/// `$kernel::<.., 4>` over groups of four activation rows of `$out`, then `$kernel::<.., 1>` on
/// the rest (after any leading const arguments given, e.g. the format): the loop of the block
/// kernels' batch entry points (the kernel must be inlined into the caller, a `target_feature`
/// function, so it is named here rather than passed).
macro_rules! by_fours {
    ($kernel:ident $(::<$($g:ident),*>)? ($m:expr, $row:expr, $nb:expr, $x:expr, $x_first:expr, $out:expr)) => {{
        let mut j = 0;
        while j + 4 <= $out.len() {
            $kernel::<$($($g,)*)? 4>($m, $row, $nb, $x, $x_first + j, &mut $out[j..j + 4]);
            j += 4;
        }
        while j < $out.len() {
            $kernel::<$($($g,)*)? 1>($m, $row, $nb, $x, $x_first + j, &mut $out[j..j + 1]);
            j += 1;
        }
    }};
}

mod avx512;
mod blocks;
#[cfg(target_arch = "x86_64")]
mod blocks_avx2;
#[cfg(target_arch = "x86_64")]
mod blocks_avx512;
mod half;
mod panels;

use ::half::f16;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::exec::{Disjoint, Par};
use crate::format::dtype::{self, DType, BLOCK};
use crate::math::dot;
use crate::simd::has_avx512;
use avx512::has_avx512_vnni;
use blocks::vnni_blocks;
pub use blocks::QuantizedRows;
use blocks::{quantize_rows, repack, Blocks};
use panels::{pack_panels, PANEL};

/// A [rows, cols] weight matrix, row-major, in its storage format, packed for the kernels.
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    data: Data,
}

/// One product of `Matrix::matmul_group`: y [n, w.rows] = x [n, w.cols] · wᵀ. It holds its
/// output's borrow, so nothing else touches the output while the group runs.
pub struct Product<'a> {
    w: &'a Matrix,
    x: &'a [f32],
    y: Disjoint<f32>,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> Product<'a> {
    pub fn new(w: &'a Matrix, x: &'a [f32], y: &'a mut [f32]) -> Self {
        let n = x.len() / w.cols;
        assert!(
            x.len() == n * w.cols && y.len() == n * w.rows,
            "product: x [{}] and y [{}] for a [{}, {}] matrix",
            x.len(),
            y.len(),
            w.rows,
            w.cols
        );
        Self {
            w,
            x,
            y: Disjoint::new(y),
            _out: std::marker::PhantomData,
        }
    }
}

enum Data {
    /// f32 in panels of `PANEL` rows, k-major: panel p holds rows 32p..32p+32 as [cols][32]
    /// (zero-padded), so a kernel broadcasts one activation and multiplies 32 rows at once.
    F32(Vec<f32>),
    /// f16 or bf16 bits.
    Half(Vec<u16>),
    Blocks(Blocks),
}

/// Below this many multiply-adds a call runs on the calling thread even when the pool may help:
/// waking a sleeping worker costs tens of microseconds, more than small matmuls take (measured
/// with `itera bench`: 8 batched streams ran 1.3x faster once only ~2M-MAC calls went parallel;
/// a single decode row is memory-bound and `tiny`'s 1M-weight LM head ran 10% slower on two
/// threads than on one).
const POOL_FROM: usize = 1 << 21;

/// Multiply-adds from which a call splits its work with the pair helper (`exec::pair`): below,
/// the hand-off (~0.4 us on the Intel machine; 0.86 us on a Zen 3 virtual machine, where decode
/// groups products to make fewer: `matmul_group`) costs about what the second core saves.
const PAIR_FROM: usize = 1 << 14;

/// `PAIR_FROM` for the block formats in the lines layout (`blocks::Blocks::interleave`), whose
/// kernels are about twice as fast: a 512 x 128 Q4_0 decode product then takes ~1 us on one
/// thread and ~1.3 us split (`matmul_pair/in_proj/q4_0`), and Q4_0 `tiny` decodes fastest with
/// only the LM head split (Intel Xeon with VNNI, 2026-12-03: alternated `itera bench` runs with
/// the threshold at 2^14, 2^17 and above the LM head; docs/performance.md). On its AVX2 kernel
/// too (the same Xeon with `ITERA_SIMD=avx2`: 2^14 decoded at 0.93x of 2^17 by median, ten
/// alternated rounds); not yet measured on an AVX2-only CPU.
const PAIR_FROM_LINES: usize = 1 << 17;

/// Activation rows from which a block or half matrix runs through the f32 micro-tiles, one
/// decoded 32-row panel at a time (in L1; never the whole matrix), instead of integer dots.
/// Not for the block formats in the lines layout on VNNI, whose kernel (`blocks_avx512::tile`)
/// beat the panels at every batch on the Intel Xeon of 2026-12-03: Q4_0 `tiny` prefill 1.24-1.60x f32
/// instead of 0.93-1.05x, 64-stream decode 2.3x (alternated `itera bench` runs; performance.md).
const DECODE_PANELS_FROM: usize = 32;

/// `DECODE_PANELS_FROM` for the lines layout on the AVX2 kernel (`blocks_avx2::lines_tile`):
/// 64 batched streams of Q4_0 `tiny` decoded 1.8-2.1x faster on it than through the panels,
/// while prefill (128-row calls) ran 0.74-0.84x f32 on it against 0.88-0.99x through the panels
/// (Intel Xeon with the AVX2 kernels forced by `ITERA_SIMD=avx2`, alternated `itera bench`
/// runs, 2026-12-03; not yet measured on an AVX2-only CPU).
const LINES_AVX2_PANELS_FROM: usize = 128;

/// The instruction set the block kernels use on this machine, for reports.
pub fn level() -> &'static str {
    if vnni_blocks() {
        "avx512-vnni"
    } else if has_avx512_vnni() {
        match blocks::forced_kernel() {
            Some(false) => "avx2+fma (ITERA_BLOCK_KERNEL=avx2)",
            _ => "avx2+fma (faster than avx512-vnni here, measured)",
        }
    } else {
        crate::simd::level_name()
    }
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
        let m = Self {
            rows,
            cols,
            dtype: DType::F32,
            data: Data::F32(pack_panels(rows, cols, &values)),
        };
        m.check_finite()?;
        Ok(m)
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
                &dtype::dequantize(dtype, bytes, n)?,
            )),
            DType::F16 | DType::BF16 => Data::Half(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            _ => Data::Blocks(repack(dtype, rows, cols, bytes)),
        };
        let m = Self {
            rows,
            cols,
            dtype,
            data,
        };
        m.check_finite()?;
        Ok(m)
    }

    /// An error at the first weight (or block scale) that is NaN or infinite: such weights load
    /// silently otherwise and turn every result into NaN.
    fn check_finite(&self) -> Result<()> {
        let bad = match &self.data {
            Data::F32(v) => v.iter().position(|x| !x.is_finite()),
            // f16 and bf16: all exponent bits set is inf or NaN.
            Data::Half(v) => {
                let exp = if self.dtype == DType::BF16 {
                    0x7F80
                } else {
                    0x7C00
                };
                v.iter().position(|&b| b & exp == exp)
            }
            Data::Blocks(b) => b.scale.iter().chain(&b.bias).position(|x| !x.is_finite()),
        };
        match bad {
            None => Ok(()),
            Some(i) => Err(Error::Format(format!(
                "holds a non-finite value (NaN or infinity) at {} {i}",
                if matches!(self.data, Data::Blocks(_)) {
                    "block parameter"
                } else {
                    "element"
                }
            ))),
        }
    }

    /// Quantizes f32 values (row-major [rows, cols]) into `dtype`.
    pub fn quantize(dtype: DType, rows: usize, cols: usize, values: &[f32]) -> Result<Self> {
        if dtype == DType::F32 {
            return Self::from_f32(rows, cols, values.to_vec());
        }
        Self::from_ggml(dtype, rows, cols, &dtype::quantize(dtype, values)?)
    }

    /// Bytes the packed weights occupy in memory.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::F32(v) => v.len() * 4,
            Data::Half(v) => v.len() * 2,
            Data::Blocks(b) => {
                let by_block = b.scale_by_block.len();
                let codes = b.codes.len() + 64 * b.lines.len();
                codes + 4 * (b.high.len() + b.scale.len() + b.bias.len() + by_block)
            }
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
                    use ::half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
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

    /// y [n, rows] = x [n, cols] · selfᵀ, for n activation rows, on the threads `par` allows.
    /// `q` is a reusable buffer.
    pub fn matmul(&self, x: &[f32], y: &mut [f32], q: &mut QuantizedRows, par: Par) {
        let (rows, cols) = (self.rows, self.cols);
        let n = x.len() / cols;
        assert_eq!(x.len(), n * cols, "matmul: x is not whole rows of {cols}");
        assert_eq!(y.len(), n * rows, "matmul: y must be [{n}, {rows}]");
        if n == 0 {
            return;
        }
        match &self.data {
            Data::F32(w) if n == 1 => return panels::matvec(w, rows, cols, x, y, par),
            Data::F32(_) => return self.panel_matmul(x, y, par),
            _ if n >= self.panels_from() => return self.panel_matmul(x, y, par),
            _ => {}
        }
        if let Data::Blocks(b) = &self.data {
            quantize_rows(x, cols, q, b.activation_limit());
        }
        let q = &*q;
        let work = n * rows * cols;
        match par {
            Par::Pair if work >= self.pair_from() && n == 1 && rows >= 32 => {
                // The weight rows split between this thread and the pair helper.
                let at = rows.div_ceil(32) * 16;
                crate::exec::pair::both_parts(y, at, |half, ys| {
                    self.rows_range(x, half * at, ys, q)
                });
            }
            Par::Pair if work >= PAIR_FROM && n > 1 => {
                // The activation rows split; each half sweeps all weight rows.
                let at = n.div_ceil(2);
                let (x0, x1) = x.split_at(at * cols);
                crate::exec::pair::both_parts(y, at * rows, |half, ys| {
                    self.rows_tiled(if half == 0 { x0 } else { x1 }, half * at, ys, q)
                });
            }
            Par::Pool(threads) if work >= POOL_FROM && n == 1 => {
                // One activation row: split the weight rows between threads (whole groups of
                // the lines layout's 16 rows).
                let chunk = rows.div_ceil(threads * 2).max(32).next_multiple_of(16);
                y.par_chunks_mut(chunk).enumerate().for_each(|(i, ys)| {
                    self.rows_range(x, i * chunk, ys, q);
                });
            }
            Par::Pool(threads) if work >= POOL_FROM => {
                // Several activation rows: split them, each thread sweeping all weight rows.
                let per = n.div_ceil(threads);
                y.par_chunks_mut(per * rows)
                    .zip(x.par_chunks(per * cols))
                    .enumerate()
                    .for_each(|(i, (ys, xs))| self.rows_tiled(xs, i * per, ys, q));
            }
            _ => self.rows_range(x, 0, y, q),
        }
    }

    /// Independent products on the threads `par` allows. When each has one activation row and
    /// `par` is the pair, one hand-off serves them all, each thread taking its half of every
    /// product's weight rows: decode's MoE layer then costs two hand-offs (the chosen experts'
    /// gate and up products, then their down products) instead of one per matmul, six. Otherwise
    /// they run one after another on this thread, one-row products still sharing quantized
    /// inputs (`tiny`'s experts in the lines layout, below the split threshold: gate and up
    /// quantize their input once, not four times); a pool or several rows run each product as
    /// `matmul` does. `qs` are reusable buffers.
    pub fn matmul_group(products: &[Product], qs: &mut Vec<QuantizedRows>, par: Par) {
        let single = products.iter().all(|p| p.x.len() == p.w.cols);
        let work: usize = products.iter().map(|p| p.w.rows * p.w.cols).sum();
        let from = products
            .iter()
            .map(|p| p.w.pair_from())
            .max()
            .unwrap_or(PAIR_FROM);
        if qs.len() < products.len().max(1) {
            qs.resize_with(products.len().max(1), Default::default);
        }
        let split = single && par == Par::Pair && work >= from;
        if !single || matches!(par, Par::Pool(_)) {
            for p in products {
                // SAFETY: `Product`'s one part, its whole output, used by this thread alone.
                let y = unsafe { p.y.part(0, p.y.len()) };
                p.w.matmul(p.x, y, &mut qs[0], par);
            }
            return;
        }
        // Products that read the same input as the one before, quantized to the same range,
        // share its quantized copy.
        let limit = |p: &Product| match &p.w.data {
            Data::Blocks(b) => Some(b.activation_limit()),
            _ => None,
        };
        let shares = |i: usize| {
            i > 0 && {
                let (a, b) = (&products[i - 1], &products[i]);
                std::ptr::eq(a.x, b.x) && limit(a) == limit(b)
            }
        };
        let (mut slot, mut quantized) = (0, false);
        for (i, p) in products.iter().enumerate() {
            if !shares(i) {
                (slot, quantized) = (i, false);
            }
            if let (Data::Blocks(b), false) = (&p.w.data, quantized) {
                quantize_rows(p.x, p.w.cols, &mut qs[slot], b.activation_limit());
                quantized = true;
            }
        }
        let qs = &*qs;
        // The same rows of each product as `both` below would give one half, for `f(0)` and
        // `f(1)` alike: all rows when the group is not split.
        let rows_of = |p: &Product, i: usize, half: usize| {
            let rows = p.w.rows;
            if !split {
                Some((0, rows))
            } else if rows >= 2 * PANEL {
                let at = rows.div_ceil(2 * PANEL) * PANEL;
                Some([(0, at), (at, rows)][half])
            } else {
                (i % 2 == half).then_some((0, rows))
            }
        };
        let run = |half: usize| {
            let mut slot = 0;
            for (i, p) in products.iter().enumerate() {
                if !shares(i) {
                    slot = i;
                }
                let Some((r0, r1)) = rows_of(p, i, half) else {
                    continue;
                };
                // SAFETY: `Product`'s contract: its output is used by this group only, and the
                // halves write the disjoint rows [0, at) and [at, rows) (or one half all of it).
                let y = unsafe { p.y.part(r0, r1 - r0) };
                match &p.w.data {
                    Data::F32(w) => {
                        panels::panel_rows(w, p.w.rows, p.w.cols, p.x, 1, y, 0, r0, r1, false)
                    }
                    _ => p.w.rows_range(p.x, r0, y, &qs[slot]),
                }
            }
        };
        if !split {
            return run(0);
        }
        crate::exec::pair::both(run);
    }

    /// Activation rows from which a product of this matrix runs through the f32 panels: never
    /// for the lines layout on the VNNI kernel, which is faster at every batch
    /// (`DECODE_PANELS_FROM`); from `LINES_AVX2_PANELS_FROM` on its AVX2 kernel.
    fn panels_from(&self) -> usize {
        match &self.data {
            Data::Blocks(b) if !b.lines.is_empty() && vnni_blocks() => usize::MAX,
            Data::Blocks(b) if !b.lines.is_empty() => LINES_AVX2_PANELS_FROM,
            _ => DECODE_PANELS_FROM,
        }
    }

    /// Multiply-adds from which a product of this matrix splits with the pair helper.
    fn pair_from(&self) -> usize {
        match &self.data {
            Data::Blocks(b) if !b.lines.is_empty() => PAIR_FROM_LINES,
            _ => PAIR_FROM,
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
                    return unsafe { half::matmul_avx512(w, c, bf, first, y.len(), x, y, 0) };
                }
                for (j, out) in y.iter_mut().enumerate() {
                    let r = first + j;
                    *out = half::dot(&w[r * c..(r + 1) * c], x, bf);
                }
            }
            Data::Blocks(b) => {
                let nb = c / BLOCK;
                assert!(nb <= q.d.len() && (first + y.len()) * nb <= b.scale.len());
                #[cfg(target_arch = "x86_64")]
                if vnni_blocks() {
                    // SAFETY: AVX-512 F/BW/VNNI present; bounds asserted above.
                    return unsafe { blocks_avx512::matvec_avx512(b, first, nb, q, y) };
                }
                #[cfg(target_arch = "x86_64")]
                if crate::simd::has_avx2() {
                    // SAFETY: AVX2 + FMA present; bounds asserted above.
                    return unsafe { blocks_avx2::matvec_avx2(b, first, nb, q, y) };
                }
                for (j, out) in y.iter_mut().enumerate() {
                    blocks::dot(b, first + j, nb, q, 0, std::slice::from_mut(out));
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
        if let (Data::Blocks(b), true) = (&self.data, vnni_blocks()) {
            // SAFETY: AVX-512 F/BW/VNNI present; bounds are asserted inside.
            return unsafe { blocks_avx512::matmul_avx512(b, rows, c / BLOCK, q, x_first, n, y) };
        }
        #[cfg(target_arch = "x86_64")]
        if let Data::Blocks(b) = &self.data {
            if crate::simd::has_avx2() && !b.lines.is_empty() {
                // SAFETY: AVX2 + FMA present; bounds are asserted inside.
                return unsafe {
                    blocks_avx2::matmul_lines_avx2(b, rows, c / BLOCK, q, x_first, n, y)
                };
            }
        }
        #[cfg(target_arch = "x86_64")]
        if let (Data::Half(w), true) = (&self.data, has_avx512() && c.is_multiple_of(16)) {
            let bf = self.dtype == DType::BF16;
            // SAFETY: AVX-512F present; bounds are asserted inside.
            return unsafe { half::matmul_avx512(w, c, bf, 0, rows, x, y, rows) };
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
                        blocks::dot(b, r, c / BLOCK, q, x_first + i0, &mut out[..len])
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::format::dtype;
    use crate::rng::Rng;

    /// Normal random values (the kernel tests' weights and activations).
    pub(super) fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// Every format's matmul, on every path (one activation row: the decode matvec; 2-31 rows:
    /// the integer / half kernels; 32+ rows: decoded panels, or integers in the lines layout up
    /// to `Matrix::panels_from`),
    /// on one thread and split with the pair helper, equals an f32 product over the weights as
    /// `format::dtype::dequantize` decodes them (ggml's formulas, independent of the kernels'
    /// `block_codes`), within a bound derived from what the kernel rounds:
    /// - block formats below the panels quantize each block of 32 activations to int8 with
    ///   step dx = amax / limit (127, or `NARROW`'s 63), so each product is off by at most
    ///   dx / 2 * |w|: the bound is sum over blocks of dx / 2 * sum |w|, plus f32 rounding of
    ///   the per-block terms (each at most ~2 amax_w * dx * 32 * limit, relative 2^-20);
    /// - float formats and the panel path multiply exactly in f32 and sum `cols` products in
    ///   order: cols * 2^-24 * sum |w x| (plus 2^-20 for NF4, whose panels decode with one more
    ///   rounding).
    #[test]
    fn matmul_matches_decoded_weights_for_every_format() {
        // 96 columns = 3 blocks: exercises a full pair and the odd trailing block; 1,024 = 32
        // blocks, more than the packed 16-row kernel takes (the lines layout takes any count).
        for &(rows, cols) in &[(40usize, 96usize), (300, 128), (48, 512), (32, 1024)] {
            let w = random(rows * cols, 1);
            for &n in &[1usize, 2, 3, 9, 16, 31, 32, 40] {
                let x = random(n * cols, 2);
                for dtype in DType::ALL {
                    let dec =
                        dtype::dequantize(dtype, &dtype::quantize(dtype, &w).unwrap(), w.len())
                            .unwrap();
                    let m = Matrix::quantize(dtype, rows, cols, &w).unwrap();
                    for par in [Par::Serial, Par::Pair] {
                        let mut y = vec![f32::NAN; n * rows];
                        m.matmul(&x, &mut y, &mut QuantizedRows::default(), par);
                        // The activations' int8 range, where they are quantized.
                        let int8 = match &m.data {
                            Data::Blocks(b) if n < m.panels_from() => Some(b.activation_limit()),
                            _ => None,
                        };
                        check_against_decoded(dtype, &dec, &x, &y, rows, cols, n, par, int8);
                    }
                }
            }
        }
    }

    /// A group of products (formats mixed, inputs shared and not, one row or several; a matrix
    /// too small to split) gives each product's own `matmul`, bit for bit, on one thread and
    /// with the pair helper.
    #[test]
    fn a_group_of_products_equals_each_matmul() {
        let shapes = [
            (128, 128, DType::Q8_0),
            (128, 128, DType::F32),
            (40, 128, DType::Q4_0),
        ];
        let mats: Vec<Matrix> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(r, c, d))| {
                Matrix::quantize(d, r, c, &random(r * c, 10 + i as u64)).unwrap()
            })
            .collect();
        for n in [1, 3] {
            let (shared, own) = (random(n * 128, 20), random(n * 128, 21));
            // Q8_0 and f32 read `shared`, Q4_0 `own`, then Q8_0 `shared` again.
            let plan = [(0, &shared), (1, &shared), (2, &own), (0, &shared)];
            let want: Vec<Vec<f32>> = plan
                .iter()
                .map(|&(m, x)| {
                    let mut y = vec![0.0; n * mats[m].rows];
                    mats[m].matmul(x, &mut y, &mut QuantizedRows::default(), Par::Serial);
                    y
                })
                .collect();
            for par in [Par::Serial, Par::Pair] {
                let mut ys: Vec<Vec<f32>> = want.iter().map(|w| vec![f32::NAN; w.len()]).collect();
                let products: Vec<Product> = plan
                    .iter()
                    .zip(ys.iter_mut())
                    .map(|(&(m, x), y)| Product::new(&mats[m], x, y))
                    .collect();
                Matrix::matmul_group(&products, &mut Vec::new(), par);
                drop(products);
                assert_eq!(ys, want, "{n} rows, {par:?}");
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_against_decoded(
        dtype: DType,
        dec: &[f32],
        x: &[f32],
        y: &[f32],
        rows: usize,
        cols: usize,
        n: usize,
        par: Par,
        int8: Option<u8>,
    ) {
        for i in 0..n {
            let xi = &x[i * cols..(i + 1) * cols];
            for r in 0..rows {
                let wr = &dec[r * cols..(r + 1) * cols];
                let want: f64 = wr.iter().zip(xi).map(|(a, b)| *a as f64 * *b as f64).sum();
                let abs: f64 = wr
                    .iter()
                    .zip(xi)
                    .map(|(a, b)| (*a as f64 * *b as f64).abs())
                    .sum();
                let bound = if let Some(limit) = int8 {
                    let limit = limit as f64;
                    let mut b = 0.0f64;
                    for (wb, xb) in wr.chunks(BLOCK).zip(xi.chunks(BLOCK)) {
                        let amax_x = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                        let amax_w = wb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                        let dx = amax_x / limit;
                        let sum_w: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                        b += dx / 2.0 * sum_w * 1.0001;
                        b += 2.0 * amax_w * dx * 32.0 * limit * 2f64.powi(-20);
                    }
                    b
                } else {
                    let extra = if dtype == DType::NF4 {
                        2f64.powi(-20)
                    } else {
                        0.0
                    };
                    (cols as f64 * 2f64.powi(-24) + extra) * abs + 1e-30
                };
                let got = y[i * rows + r] as f64;
                assert!(
                    (got - want).abs() <= bound,
                    "{dtype:?} [{rows}x{cols}] n={n} {par:?} ({}): row {r} of x {i}: {got} vs \
                     {want}, error {} > bound {bound}",
                    crate::simd::level_name(),
                    (got - want).abs()
                );
            }
        }
    }

    /// The test above, and the SIMD-versus-portable ones, once per instruction set this CPU
    /// has: baseline, AVX2 and AVX-512, the last with either block kernel (each run as a child
    /// process with `ITERA_SIMD` / `ITERA_BLOCK_KERNEL`, since both are fixed for a process).
    #[test]
    fn every_simd_level_passes_the_kernel_tests() {
        if std::env::var_os("ITERA_SIMD").is_some() {
            return;
        }
        for (level, blocks) in [
            ("baseline", "avx2"),
            ("avx2", "avx2"),
            ("avx512", "avx2"),
            ("avx512", "avx512"),
        ] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .env("ITERA_SIMD", level)
                .env("ITERA_BLOCK_KERNEL", blocks)
                .args(["kernels::", "--test-threads", "1"])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "kernel tests at ITERA_SIMD={level} ITERA_BLOCK_KERNEL={blocks}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(stdout.contains("matmul_matches_decoded_weights_for_every_format ... ok"));
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
                m.matmul(&x, &mut one, &mut q, Par::Serial);
                m.matmul(&x, &mut two, &mut q, Par::Pair);
                for (a, b) in one.iter().zip(&two) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{dtype:?} n={n}");
                }
            }
        }
    }

    #[test]
    fn rejects_wrong_sizes() {
        assert!(Matrix::from_f32(2, 3, vec![0.0; 5]).is_err());
        assert!(Matrix::from_ggml(DType::Q8_0, 2, 32, &[0u8; 67]).is_err());
        assert!(Matrix::from_ggml(DType::Q4_0, 1, 48, &[0u8; 27]).is_err());
    }
}
