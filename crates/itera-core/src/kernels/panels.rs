//! f32 weights in 32-row panels (k-major: panel p holds rows 32p..32p+32 as [cols][32]), multiplied
//! by AVX-512 micro-tiles of up to 12 activation rows x 32 weight rows that read the activations
//! in place, or by the portable loop (`multiversion!`). Also the path for half and block matrices
//! with many activation rows: one decoded panel at a time.

use rayon::prelude::*;

use super::{Data, Matrix, PAIR_FROM, POOL_FROM};
use crate::exec::{Disjoint, Par};
use crate::simd::has_avx512;

/// Weight rows per f32 panel: two AVX-512 registers.
pub(super) const PANEL: usize = 32;
/// Activation rows per f32 micro-tile: 12 x 2 accumulators + 2 weight registers + 1 broadcast
/// fit AVX-512's 32 registers, and 24 FMAs per 14 loads keep both FMA ports busy.
pub(super) const MR: usize = 12;

/// Outputs from this size on are written with non-temporal stores (4x one core's L2).
const STREAM_FROM_BYTES: usize = 8 << 20;

pub(super) fn pack_panels(rows: usize, cols: usize, w: &[f32]) -> Vec<f32> {
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

/// The panels that hold weight rows [r0, r1) (r0 a multiple of PANEL): each one's index, its
/// [cols][PANEL] values and how many real rows it holds (the last may be partial).
#[inline(always)]
fn panels_of(
    w: &[f32],
    rows: usize,
    cols: usize,
    r0: usize,
    r1: usize,
) -> impl Iterator<Item = (usize, &[f32], usize)> {
    (r0 / PANEL..r1.div_ceil(PANEL)).map(move |p| {
        let panel = &w[p * PANEL * cols..(p + 1) * PANEL * cols];
        (p, panel, (rows - p * PANEL).min(PANEL))
    })
}

/// y = W x for one activation row over the panel layout, on the threads `par` allows when the
/// matrix is big enough.
pub(super) fn matvec(w: &[f32], rows: usize, cols: usize, x: &[f32], y: &mut [f32], par: Par) {
    match par {
        Par::Pair if rows * cols >= PAIR_FROM && rows >= 2 * PANEL => {
            pair_panel_rows(w, rows, cols, x, 1, y, false)
        }
        Par::Pool(threads) if rows * cols >= POOL_FROM => {
            let chunk = rows.div_ceil(threads * 2).next_multiple_of(PANEL);
            y.par_chunks_mut(chunk).enumerate().for_each(|(i, ys)| {
                let r0 = i * chunk;
                panel_rows(w, rows, cols, x, 1, ys, 0, r0, r0 + ys.len(), false)
            });
        }
        _ => panel_rows(w, rows, cols, x, 1, y, 0, 0, rows, false),
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
    let out = Disjoint::new(y);
    crate::exec::pair::both(|half| {
        let (r0, r1) = if half == 0 { (0, at) } else { (at, rows) };
        // SAFETY: `Disjoint`'s contract: y is borrowed until `both` returns, and this half writes
        // only the columns [r0, r1) of each row, the other half the rest.
        unsafe { panel_rows_raw(w, rows, cols, x, n, out, r0, rows, r0, r1, stream) }
    });
}

/// Weight rows [r0, r1) (r0 a multiple of PANEL) for `n` activation rows x [n, cols], in tiles
/// of MR rows read in place (a tile's rows are MR sequential streams, well inside L1). Output
/// (i, r) goes to `y[i * ystride + r - r0]` (ystride 0 for a single row). `stream`: full-width
/// tiles use non-temporal stores (y 64-byte aligned, ystride a multiple of 16).
#[allow(clippy::too_many_arguments)]
pub(super) fn panel_rows(
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
    let out = Disjoint::new(y);
    // SAFETY: `Disjoint`'s contract: `y` is borrowed for this call and its one part is all of it.
    unsafe { panel_rows_raw(w, rows, cols, x, n, out, 0, ystride, r0, r1, stream) }
}

/// `panel_rows` into a shared output, so that two threads can fill disjoint columns of it:
/// output (i, r) goes to `y[base + i * ystride + r - r0]`.
///
/// # Safety
/// `Disjoint`'s contract for the outputs this call writes (`base + i * ystride + r - r0` for
/// i < n, r in [r0, r1)): nobody else touches them while it runs. Bounds are checked.
#[allow(clippy::too_many_arguments)]
unsafe fn panel_rows_raw(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    y: Disjoint<f32>,
    base: usize,
    ystride: usize,
    r0: usize,
    r1: usize,
    stream: bool,
) {
    assert!(x.len() >= n * cols);
    #[cfg(target_arch = "x86_64")]
    if has_avx512() && n == 1 && !stream {
        let (y, ylen) = y.raw();
        assert!(cols <= x.len());
        one_row_groups(
            w,
            rows,
            cols,
            base,
            r0,
            r1,
            ylen,
            &[8, 4, 2, 1],
            |g, at, ypos, width| {
                // SAFETY: AVX-512F is present; `one_row_groups` checked that the group's panels lie
                // inside `w` and its outputs inside `y`; the activation row is inside `x` (above).
                unsafe {
                    let (wp, xp, yp) = (w.as_ptr().add(at), x.as_ptr(), y.add(ypos));
                    match g {
                        8 => row_avx512::<8>(wp, cols, xp, yp, width),
                        4 => row_avx512::<4>(wp, cols, xp, yp, width),
                        2 => row_avx512::<2>(wp, cols, xp, yp, width),
                        _ => row_avx512::<1>(wp, cols, xp, yp, width),
                    }
                }
            },
        );
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        let (y, ylen) = y.raw();
        for (p, panel, width) in panels_of(w, rows, cols, r0, r1) {
            for t in 0..n.div_ceil(MR) {
                let mr = (n - t * MR).min(MR);
                let ypos = base + t * MR * ystride + p * PANEL - r0;
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
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2() {
        // SAFETY: AVX2 + FMA present; the outputs are this call's own (its contract).
        return unsafe { panel_rows_avx2(w, rows, cols, x, n, y, base, ystride, r0, r1) };
    }
    panel_rows_portable(w, rows, cols, x, n, y, base, ystride, r0, r1);
}

/// Walks the panels that hold weight rows [r0, r1) of a one-row product in groups of `sizes`
/// panels (largest first, ending with 1), calling `run(panels, offset of the first in w, output
/// offset in y, outputs of the group's last panel)` once it has checked that the group's panels lie
/// inside `w` and its outputs inside the `ylen` outputs of y.
#[allow(clippy::too_many_arguments)]
fn one_row_groups(
    w: &[f32],
    rows: usize,
    cols: usize,
    base: usize,
    r0: usize,
    r1: usize,
    ylen: usize,
    sizes: &[usize],
    mut run: impl FnMut(usize, usize, usize, usize),
) {
    let (mut p, end) = (r0 / PANEL, r1.div_ceil(PANEL));
    assert!(end * PANEL * cols <= w.len());
    for &g in sizes {
        while end - p >= g {
            let width = (rows - (p + g - 1) * PANEL).min(PANEL);
            let ypos = base + p * PANEL - r0;
            assert!(ypos + (g - 1) * PANEL + width <= ylen);
            run(g, p * PANEL * cols, ypos, width);
            p += g;
        }
    }
}

/// `panel_rows_raw` on AVX2 + FMA: per panel (in L1), tiles of up to `MR_AVX2` activation rows
/// x 16 weight rows; one row through `row_avx2`, three panels at a time.
///
/// # Safety
/// AVX2 and FMA are present, and `panel_rows_raw`'s contract for the outputs.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn panel_rows_avx2(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    y: Disjoint<f32>,
    base: usize,
    ystride: usize,
    r0: usize,
    r1: usize,
) {
    assert!(x.len() >= n * cols);
    let (y, ylen) = y.raw();
    if n == 1 {
        one_row_groups(
            w,
            rows,
            cols,
            base,
            r0,
            r1,
            ylen,
            &[3, 2, 1],
            |g, at, ypos, width| {
                // SAFETY: AVX2 + FMA (this function's contract); `one_row_groups` checked that the
                // group's panels lie inside `w` and its outputs inside `y`; the row is inside `x`.
                unsafe {
                    let (wp, xp, yp) = (w.as_ptr().add(at), x.as_ptr(), y.add(ypos));
                    match g {
                        3 => row_avx2::<3>(wp, cols, xp, yp, width),
                        2 => row_avx2::<2>(wp, cols, xp, yp, width),
                        _ => row_avx2::<1>(wp, cols, xp, yp, width),
                    }
                }
            },
        );
        return;
    }
    for (p, panel, width) in panels_of(w, rows, cols, r0, r1) {
        // Both halves of the panel per tile of rows: the tile's activations come from memory
        // once per panel, as in the AVX-512 tiles (half panels outermost read them twice: the
        // LM head over 2,048 rows took 84.6 against 75.8 ms, one criterion run each, Zen 3).
        for t in 0..n.div_ceil(MR_AVX2) {
            let mr = (n - t * MR_AVX2).min(MR_AVX2);
            // A single row takes the whole panel at once (four independent sums per k).
            let (part, parts) = if mr == 1 {
                (PANEL, 1)
            } else {
                (16, width.div_ceil(16))
            };
            for h in 0..parts {
                let hw = (width - part * h).min(part);
                let ypos = base + t * MR_AVX2 * ystride + p * PANEL - r0 + part * h;
                assert!(ypos + (mr - 1) * ystride + hw <= ylen);
                // SAFETY: AVX2 + FMA (this function's contract); the tile reads `mr` rows of x
                // and `part` weight rows of the panel inside their slices, and writes `mr` rows
                // of `hw` outputs inside `y` (asserted above) that are this call's own.
                unsafe {
                    let (wp, xt, yp) = (
                        panel.as_ptr().add(part * h),
                        x.as_ptr().add(t * MR_AVX2 * cols),
                        y.add(ypos),
                    );
                    macro_rules! tile {
                        ($($r:literal)*) => {
                            match mr {
                                1 => tile_avx2::<1, 4>(wp, cols, xt, yp, ystride, hw),
                                $($r => tile_avx2::<$r, 2>(wp, cols, xt, yp, ystride, hw),)*
                                _ => unreachable!(),
                            }
                        };
                    }
                    tile!(2 3 4 5 6);
                }
            }
        }
    }
}

/// One activation row against G consecutive panels from `wp` on AVX2: 4G independent sums per k
/// (AVX2's 16 registers hold three panels' 12 and a broadcast), each output the same chain of
/// FMAs over k in order as in `tile_avx2`. The last panel writes `width` outputs, the others 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2<const G: usize>(
    wp: *const f32,
    cols: usize,
    x: *const f32,
    y: *mut f32,
    width: usize,
) {
    // SAFETY: this function's contract: the caller checked AVX2 + FMA and that the G panels,
    // the activation row and the outputs lie inside their buffers.
    unsafe {
        use std::arch::x86_64::*;
        let mut acc = [[_mm256_setzero_ps(); 4]; G];
        for k in 0..cols {
            let v = _mm256_broadcast_ss(&*x.add(k));
            for (g, a) in acc.iter_mut().enumerate() {
                let b = wp.add(g * PANEL * cols + k * PANEL);
                for (j, a) in a.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(v, _mm256_loadu_ps(b.add(8 * j)), *a);
                }
            }
        }
        for (g, a) in acc.iter().enumerate() {
            let w = if g + 1 == G { width } else { PANEL };
            // Whole panels straight to y; a partial last one through a copy.
            let mut tmp = [0.0f32; PANEL];
            let dst = if w == PANEL {
                y.add(g * PANEL)
            } else {
                tmp.as_mut_ptr()
            };
            for (j, a) in a.iter().enumerate() {
                _mm256_storeu_ps(dst.add(8 * j), *a);
            }
            if w < PANEL {
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), y.add(g * PANEL), w);
            }
        }
    }
}

/// Activation rows per AVX2 micro-tile: 6 x 2 accumulators (16 weight rows) + 2 weight
/// registers + 1 broadcast fit AVX2's 16 registers, as in gemm's AVX2 kernel (16 x 6).
#[cfg(target_arch = "x86_64")]
const MR_AVX2: usize = 6;

/// An R x 8V tile of y: weight rows `wp` (8V of a panel, k-major with stride PANEL); for each
/// k, V loads and R broadcasts feed R x V FMAs. Every output is the same chain of FMAs over k in
/// order whatever R and V, so a row's result does not depend on the rows computed beside it.
/// Writes `width` (1..=8V) outputs per row.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_avx2<const R: usize, const V: usize>(
    wp: *const f32,
    cols: usize,
    x: *const f32,
    y: *mut f32,
    ystride: usize,
    width: usize,
) {
    // SAFETY: this function's contract: the caller (`panel_rows_avx2`) checked AVX2 + FMA and
    // that the tile's rows of x, its weight rows and its outputs are inside their buffers.
    unsafe {
        use std::arch::x86_64::*;
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        for k in 0..cols {
            let b: [__m256; V] =
                std::array::from_fn(|v| _mm256_loadu_ps(wp.add(k * PANEL + 8 * v)));
            let xk = x.add(k);
            for (r, a) in acc.iter_mut().enumerate() {
                let s = _mm256_broadcast_ss(&*xk.add(r * cols));
                for (a, b) in a.iter_mut().zip(&b) {
                    *a = _mm256_fmadd_ps(s, *b, *a);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let out = y.add(r * ystride);
            if width == 8 * V {
                for (v, a) in a.iter().enumerate() {
                    _mm256_storeu_ps(out.add(8 * v), *a);
                }
            } else {
                let mut tmp = [0.0f32; PANEL];
                for (v, a) in a.iter().enumerate() {
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8 * v), *a);
                }
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), out, width);
            }
        }
    }
}

crate::multiversion! {
    fn panel_rows_portable(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize, y: Disjoint<f32>, base: usize, ystride: usize, r0: usize, r1: usize) {
        for (p, panel, width) in panels_of(w, rows, cols, r0, r1) {
            for i in 0..n {
                let xi = &x[i * cols..(i + 1) * cols];
                let mut acc = [0.0f32; PANEL];
                for (wk, &a) in panel.chunks_exact(PANEL).zip(xi) {
                    for j in 0..PANEL {
                        acc[j] += a * wk[j];
                    }
                }
                let at = base + i * ystride + p * PANEL - r0;
                // SAFETY: outputs this call owns (the caller's contract); bounds are checked.
                unsafe { y.part(at, width) }.copy_from_slice(&acc[..width]);
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
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for; the caller (`panel_rows_raw`) asserted that the tile's `R` rows of x and of y are inside their buffers and that y's outputs are its own.
    unsafe {
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
}

/// One activation row against G consecutive panels from `wp`: 2G independent sums per k where
/// a panel alone has two chains of `cols` dependent FMAs (`dt_proj`'s eight panels of 8 columns
/// ran one after another). Each output is the same chain of FMAs over k in order as in
/// `tile_avx512`, so a row's result does not change. The last panel writes `width` outputs, the
/// others all 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_avx512<const G: usize>(
    wp: *const f32,
    cols: usize,
    x: *const f32,
    y: *mut f32,
    width: usize,
) {
    // SAFETY: this function's contract: the caller checked AVX-512F and that the G panels, the
    // activation row and the outputs lie inside their buffers.
    unsafe {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); 2]; G];
        for k in 0..cols {
            let v = _mm512_set1_ps(*x.add(k));
            for (g, a) in acc.iter_mut().enumerate() {
                let b = wp.add(g * PANEL * cols + k * PANEL);
                a[0] = _mm512_fmadd_ps(v, _mm512_loadu_ps(b), a[0]);
                a[1] = _mm512_fmadd_ps(v, _mm512_loadu_ps(b.add(16)), a[1]);
            }
        }
        for (g, a) in acc.iter().enumerate() {
            let w = if g + 1 == G { width } else { PANEL };
            let m0 = ((1u32 << w.min(16)) - 1) as u16;
            let m1 = ((1u32 << w.saturating_sub(16)) - 1) as u16;
            _mm512_mask_storeu_ps(y.add(g * PANEL), m0, a[0]);
            _mm512_mask_storeu_ps(y.add(g * PANEL + 16), m1, a[1]);
        }
    }
}

impl Matrix {
    /// Several activation rows through the f32 micro-tiles: threads split the activation rows
    /// and walk the weight panels outermost (f32 panels are read in place; other formats decode
    /// one panel into an L1-sized buffer), so a panel stays in L1 while every tile of rows passes.
    pub(super) fn panel_matmul(&self, x: &[f32], y: &mut [f32], par: Par) {
        let (rows, cols) = (self.rows, self.cols);
        let n = x.len() / cols;
        let parallel = matches!(par, Par::Pool(_)) && n * rows * cols >= POOL_FROM;
        let tiles = n.div_ceil(MR);
        let per = if parallel {
            tiles.div_ceil(par.threads())
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
        if par == Par::Pair && n * rows * cols >= PAIR_FROM {
            if n >= 2 * MR {
                // Enough rows to be bound by arithmetic: split them, each half reads all weights.
                let at = n.div_ceil(2 * MR) * MR;
                let (x0, x1) = x.split_at(at * cols);
                return crate::exec::pair::both_parts(y, at * rows, |half, ys| {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::QuantizedRows;

    use crate::kernels::tests::random;

    /// The AVX-512 and AVX2 f32 micro-tiles and the portable panel loop give the same products.
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
            Disjoint::new(&mut b),
            0,
            rows,
            0,
            rows,
        );
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()));
        }
        // The AVX2 tiles, which an AVX-512 CPU would not otherwise run: all row counts of a
        // tile, a partial panel (70 = 2 x 32 + 6) and a row range starting at the second panel.
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx2() {
            for (n, r0) in [(1, 0), (2, 0), (7, 0), (29, 32)] {
                let mut c = vec![f32::NAN; n * (rows - r0)];
                // SAFETY: AVX2 + FMA checked; `c` is this call's alone, [n, rows - r0].
                unsafe {
                    panel_rows_avx2(
                        &w,
                        rows,
                        cols,
                        &x,
                        n,
                        Disjoint::new(&mut c),
                        0,
                        rows - r0,
                        r0,
                        rows,
                    )
                };
                for i in 0..n {
                    for (p, q) in c[i * (rows - r0)..(i + 1) * (rows - r0)]
                        .iter()
                        .zip(&b[i * rows + r0..(i + 1) * rows])
                    {
                        assert!(
                            (p - q).abs() <= 1e-5 * (1.0 + q.abs()),
                            "avx2, {n} rows from {r0}"
                        );
                    }
                }
            }
        }
    }

    /// One activation row gives bit for bit the outputs it gets inside a batch (what makes a
    /// model's f32 decode equal its prefill), through the one-row kernels' groups of 8, 4, 3, 2
    /// and 1 panels (15 panels, the last partial) and from the second panel on, as a split does;
    /// the dispatched kernels, and the AVX2 ones, which an AVX-512 CPU would not otherwise run.
    #[test]
    fn one_row_equals_its_row_in_a_batch() {
        type Kernel = fn(&[f32], usize, usize, &[f32], usize, &mut [f32], usize, usize);
        let (rows, cols, n) = (15 * PANEL - 5, 24, 3);
        let w = pack_panels(rows, cols, &random(rows * cols, 7));
        let x = random(n * cols, 8);
        let dispatched: Kernel = |w, rows, cols, x, n, y, ystride, r0| {
            panel_rows(w, rows, cols, x, n, y, ystride, r0, rows, false)
        };
        let mut kernels = vec![("dispatched", dispatched)];
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx2() {
            let avx2: Kernel = |w, rows, cols, x, n, y, ystride, r0| {
                // SAFETY: AVX2 + FMA checked; `y` is this call's alone, [n, rows - r0].
                unsafe {
                    panel_rows_avx2(w, rows, cols, x, n, Disjoint::new(y), 0, ystride, r0, rows)
                }
            };
            kernels.push(("avx2", avx2));
        }
        for (name, kernel) in kernels {
            for r0 in [0, PANEL] {
                let width = rows - r0;
                let mut batch = vec![0.0; n * width];
                kernel(&w, rows, cols, &x, n, &mut batch, width, r0);
                for i in 0..n {
                    let mut one = vec![f32::NAN; width];
                    kernel(
                        &w,
                        rows,
                        cols,
                        &x[i * cols..(i + 1) * cols],
                        1,
                        &mut one,
                        0,
                        r0,
                    );
                    assert_eq!(
                        one,
                        batch[i * width..(i + 1) * width],
                        "{name}: row {i} from {r0}"
                    );
                }
            }
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
        m.matmul(
            &x,
            &mut buf[aligned..aligned + rows * n],
            &mut q,
            Par::Serial,
        );
        let streamed = buf[aligned..aligned + rows * n].to_vec();
        let off = aligned + 1;
        m.matmul(&x, &mut buf[off..off + rows * n], &mut q, Par::Serial);
        assert_eq!(streamed, buf[off..off + rows * n]);
        assert!(streamed.iter().any(|&v| v != 0.0));
    }
}
