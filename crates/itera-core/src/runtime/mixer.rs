//! The sequence mixer of one layer (Mamba-1 selective SSM, or the shared-state variant): its
//! projections, the causal depthwise conv + SiLU and the selective scan, walking the rows in
//! order and updating each stream's state in place. Conv and scan work per channel range, so a
//! call can split them by channels; the scan has an AVX-512 version beside the portable one.

use super::phases::{mark, Phase};
use super::state::{grow, note_inputs, Scratch, State};
use super::Layer;
use crate::config::ModelConfig;
use crate::exec::{Disjoint, Par};
use crate::math::{exp_with, silu, silu_with, softplus, softplus_with};

/// What the conv and scan passes of one layer read and write, as shared pointers: rows of the
/// activations and one state pointer per stream.
#[derive(Clone, Copy)]
pub(super) struct MixerIo<'a> {
    layer: &'a Layer,
    streams: &'a [usize],
    conv: &'a [Disjoint<f32>],
    ssm: &'a [Disjoint<f32>],
    xz: &'a [f32],
    dbc: &'a [f32],
    xc: Disjoint<f32>,
    dt: Disjoint<f32>,
    y: Disjoint<f32>,
    di: usize,
    n: usize,
    r: usize,
    k: usize,
}

crate::multiversion! {
    /// Causal depthwise conv + SiLU for channels c0..c1 of every row, in row order.
    fn conv_range(io: MixerIo, c0: usize, c1: usize) {
        let (di, k, w) = (io.di, io.k, c1 - c0);
        let layer = io.layer;
        for (i, &st) in io.streams.iter().enumerate() {
            let xs = &io.xz[i * 2 * di + c0..i * 2 * di + c1];
            // SAFETY: this call owns channels c0..c1 of every row and state (disjoint ranges).
            let out = unsafe { io.xc.part(i * di + c0, w) };
            out.copy_from_slice(&layer.conv_b[c0..c1]);
            for j in 0..k - 1 {
                // SAFETY: channels c0..c1 of every row and state are this call's own (`mixer_split`).
                let past = unsafe { io.conv[st].part(j * di + c0, w) };
                let wj = &layer.conv_t[j * di + c0..j * di + c1];
                for ch in 0..w {
                    out[ch] += wj[ch] * past[ch];
                }
            }
            let wl = &layer.conv_t[(k - 1) * di + c0..(k - 1) * di + c1];
            for ch in 0..w {
                out[ch] += wl[ch] * xs[ch];
            }
            crate::math::silu_in_place(out);
            for j in 0..k.saturating_sub(2) {
                // SAFETY: channels c0..c1 of every row and state are this call's own (`mixer_split`).
                let next = unsafe { io.conv[st].part((j + 1) * di + c0, w) };
                // SAFETY: channels c0..c1 of every row and state are this call's own (`mixer_split`).
                unsafe { io.conv[st].part(j * di + c0, w) }.copy_from_slice(next);
            }
            if k > 1 {
                // SAFETY: channels c0..c1 of every row and state are this call's own (`mixer_split`).
                unsafe { io.conv[st].part((k - 2) * di + c0, w) }.copy_from_slice(xs);
            }
        }
    }
}

crate::multiversion! {
    /// softplus(dt), the selective scan (state [N][d_inner], vectorised over channels), the D skip
    /// and the SiLU(z) gate, for channels c0..c1 of every row, in row order.
    fn scan_range<M>(io: MixerIo, c0: usize, c1: usize) {
        let (di, n, r, w) = (io.di, io.n, io.r, c1 - c0);
        let layer = io.layer;
        let width = r + 2 * n;
        for (i, &st) in io.streams.iter().enumerate() {
            // SAFETY: this call owns channels c0..c1 of every row and state (disjoint ranges).
            let dt = unsafe { io.dt.part(i * di + c0, w) };
            // SAFETY: channels c0..c1 of every row and state are this call's own (`mixer_split`).
            let y = unsafe { io.y.part(i * di + c0, w) };
            // SAFETY: channels c0..c1 of every row and state are this call's own (`mixer_split`).
            let x = unsafe { io.xc.part(i * di + c0, w) };
            for (v, b) in dt.iter_mut().zip(&layer.dt_b[c0..c1]) {
                *v = softplus_with::<M>(*v + b);
            }
            let bc = &io.dbc[i * width + r..(i + 1) * width];
            y.fill(0.0);
            for j in 0..n {
                // SAFETY: channels c0..c1 of every row and state are this call's own (`mixer_split`).
                let h = unsafe { io.ssm[st].part(j * di + c0, w) };
                let a = &layer.a_t[j * di + c0..j * di + c1];
                let (b, c) = (bc[j], bc[n + j]);
                for ch in 0..w {
                    h[ch] = M::mul_add(exp_with::<M>(dt[ch] * a[ch]), h[ch], dt[ch] * x[ch] * b);
                    y[ch] = M::mul_add(c, h[ch], y[ch]);
                }
            }
            let z = &io.xz[i * 2 * di + di + c0..i * 2 * di + di + c1];
            let dskip = &layer.d_skip[c0..c1];
            for ch in 0..w {
                y[ch] = M::mul_add(dskip[ch], x[ch], y[ch]) * silu_with::<M>(z[ch]);
            }
        }
    }
}

/// The shared-state scan over rows in order: for each of the N state values,
/// h = exp(dt A) h + dt B u, and `u` is overwritten with the readings C h.
#[allow(clippy::too_many_arguments)]
fn shared_scan(
    layer: &Layer,
    streams: &[usize],
    states: &mut [State],
    li: usize,
    dbc: &[f32],
    dt: &mut [f32],
    u: &mut [f32],
    r: usize,
) {
    let n = layer.a_t.len();
    let width = r + 2 * n;
    for (i, &st) in streams.iter().enumerate() {
        let h = &mut states[st].layers[li].ssm;
        let (b, c) = dbc[i * width + r..(i + 1) * width].split_at(n);
        let (dt, u) = (&mut dt[i * n..(i + 1) * n], &mut u[i * n..(i + 1) * n]);
        for j in 0..n {
            let step = softplus(dt[j] + layer.dt_b[j]);
            h[j] = crate::math::exp(step * layer.a_t[j]) * h[j] + step * b[j] * u[j];
            u[j] = c[j] * h[j];
        }
    }
}

/// The scan pass with AVX-512 intrinsics where the channel range is whole vectors, else the
/// portable loop. Same arithmetic as `scan_range` (to rounding: FMAs, and 2^k by `vscalefps`).
fn scan_pass(io: MixerIo, c0: usize, c1: usize) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx512() && (c1 - c0).is_multiple_of(16) && c0.is_multiple_of(16) {
        // SAFETY: AVX-512F is present; the range is whole 16-channel vectors inside d_inner.
        return unsafe { scan_range_avx512(io, c0, c1) };
    }
    scan_range(io, c0, c1)
}

/// `scan_range` for 16-channel vectors: per vector of channels, the N state rows are updated with
/// y kept in a register (one load and store of y, dt and x per row instead of N).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn scan_range_avx512(io: MixerIo, c0: usize, c1: usize) {
    // SAFETY: this function's contract: the caller checked the CPU features it is compiled for, and the range c0..c1 is whole 16-channel vectors of this call's own channels, so every load and store stays inside the rows and states it owns (see `mixer_split`).
    unsafe {
        use crate::lanes16::{exp16, silu16, softplus16};
        use std::arch::x86_64::*;
        let (di, n, r, w) = (io.di, io.n, io.r, c1 - c0);
        let layer = io.layer;
        let width = r + 2 * n;
        for (i, &st) in io.streams.iter().enumerate() {
            // SAFETY (all slices): this call owns channels c0..c1 of every row and state.
            let dt = io.dt.part(i * di + c0, w);
            let y = io.y.part(i * di + c0, w);
            let x = io.xc.part(i * di + c0, w);
            for v in (0..w).step_by(16) {
                let raw = _mm512_add_ps(
                    _mm512_loadu_ps(dt.as_ptr().add(v)),
                    _mm512_loadu_ps(layer.dt_b.as_ptr().add(c0 + v)),
                );
                _mm512_storeu_ps(dt.as_mut_ptr().add(v), softplus16(raw));
            }
            let bc = &io.dbc[i * width + r..(i + 1) * width];
            // Raw: the other threads own the other channels of the same state rows.
            let (h, len) = io.ssm[st].raw();
            assert!((n - 1) * di + c1 <= len);
            for v in (0..w).step_by(16) {
                let dtv = _mm512_loadu_ps(dt.as_ptr().add(v));
                let dx = _mm512_mul_ps(dtv, _mm512_loadu_ps(x.as_ptr().add(v)));
                let mut acc = _mm512_setzero_ps();
                for j in 0..n {
                    let at = j * di + c0 + v;
                    let a = _mm512_loadu_ps(layer.a_t.as_ptr().add(at));
                    let hp = h.add(at);
                    let decay = exp16(_mm512_mul_ps(dtv, a));
                    let hv = _mm512_fmadd_ps(
                        decay,
                        _mm512_loadu_ps(hp),
                        _mm512_mul_ps(dx, _mm512_set1_ps(bc[j])),
                    );
                    _mm512_storeu_ps(hp, hv);
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(bc[n + j]), hv, acc);
                }
                _mm512_storeu_ps(y.as_mut_ptr().add(v), acc);
            }
            let z = io.xz.as_ptr().add(i * 2 * di + di + c0);
            let dskip = layer.d_skip.as_ptr().add(c0);
            for v in (0..w).step_by(16) {
                let yv = _mm512_fmadd_ps(
                    _mm512_loadu_ps(dskip.add(v)),
                    _mm512_loadu_ps(x.as_ptr().add(v)),
                    _mm512_loadu_ps(y.as_ptr().add(v)),
                );
                let gate = silu16(_mm512_loadu_ps(z.add(v)));
                _mm512_storeu_ps(y.as_mut_ptr().add(v), _mm512_mul_ps(yv, gate));
            }
        }
    }
}

/// Runs a channel-range pass over all channels: split between threads when there is enough work.
/// Rows from which a call's conv and scan split their channels between threads (fewer rows
/// are too little work for a hand-off).
const SPLIT_CHANNELS_FROM_ROWS: usize = 64;

/// Runs a channel-range pass over all channels, split by channel range between the threads
/// `par` allows when there is enough work. The ranges are disjoint and whole 16-channel vectors,
/// which is what makes the passes' `Disjoint` parts safe.
fn mixer_split(io: MixerIo, pass: fn(MixerIo, usize, usize), par: Par) {
    if io.streams.len() < SPLIT_CHANNELS_FROM_ROWS {
        return pass(io, 0, io.di);
    }
    match par {
        Par::Serial => pass(io, 0, io.di),
        Par::Pair => {
            let mid = (io.di / 2).next_multiple_of(16).min(io.di);
            crate::exec::pair::both(|half| {
                let (c0, c1) = if half == 0 { (0, mid) } else { (mid, io.di) };
                pass(io, c0, c1)
            })
        }
        Par::Pool(threads) => {
            let chunk = io.di.div_ceil(threads).next_multiple_of(16);
            rayon::scope(|s| {
                for c0 in (0..io.di).step_by(chunk) {
                    s.spawn(move |_| pass(io, c0, (c0 + chunk).min(io.di)));
                }
            });
        }
    }
}

/// The mixer of one layer over all rows: `s.h` (the normed input, [rows, d]) -> `s.out`
/// ([rows, d]), updating each stream's conv buffer and SSM state in row order.
///   xz = in_proj h; xc = silu(conv(x)); (dt, B, C) = x_proj xc; dt = dt_proj dt
///   y = scan(xc, softplus(dt), A, B, C) + D xc; y *= silu(z); out = out_proj y
pub(super) fn mixer_rows(
    layer: &Layer,
    li: usize,
    cfg: &ModelConfig,
    streams: &[usize],
    states: &mut [State],
    s: &mut Scratch,
    par: Par,
) {
    let (di, n, r, k) = (cfg.d_inner(), cfg.d_state, cfg.dt_rank, cfg.d_conv);
    let rows = streams.len();
    let xz = grow(&mut s.xz, rows * 2 * di);
    note_inputs(&mut s.inputs, &layer.in_proj, &s.h);
    layer.in_proj.matmul(&s.h, xz, &mut s.q, par);
    mark(&mut s.phases, Phase::InProj);
    s.conv_ptrs.clear();
    s.ssm_ptrs.clear();
    for st in states.iter_mut() {
        let ls = &mut st.layers[li];
        s.conv_ptrs.push(Disjoint::new(&mut ls.conv));
        s.ssm_ptrs.push(Disjoint::new(&mut ls.ssm));
    }
    let xc = grow(&mut s.xc, rows * di);
    let dt = grow(&mut s.dt, rows * layer.dt_b.len());
    let y = grow(&mut s.y, rows * di);
    let dbc = grow(&mut s.dbc, rows * (r + 2 * n));
    let io = MixerIo {
        layer,
        streams,
        conv: &s.conv_ptrs,
        ssm: &s.ssm_ptrs,
        xz,
        dbc: &[],
        xc: Disjoint::new(xc),
        dt: Disjoint::new(dt),
        y: Disjoint::new(y),
        di,
        n,
        r,
        k,
    };
    mixer_split(io, conv_range, par);
    mark(&mut s.phases, Phase::Conv);
    note_inputs(&mut s.inputs, &layer.x_proj, xc);
    layer.x_proj.matmul(xc, dbc, &mut s.q, par);
    mark(&mut s.phases, Phase::XProj);
    let dt_low = grow(&mut s.dt_low, rows * r);
    for (lo, row) in dt_low.chunks_exact_mut(r).zip(dbc.chunks_exact(r + 2 * n)) {
        lo.copy_from_slice(&row[..r]);
    }
    note_inputs(&mut s.inputs, &layer.dt_proj, dt_low);
    layer.dt_proj.matmul(dt_low, dt, &mut s.q, par);
    mark(&mut s.phases, Phase::DtProj);
    match &layer.shared {
        None => {
            // Fresh parts: the matmuls above wrote through the slices themselves.
            let io = MixerIo {
                dbc,
                xc: Disjoint::new(xc),
                dt: Disjoint::new(dt),
                y: Disjoint::new(y),
                ..io
            };
            mixer_split(io, scan_pass, par)
        }
        Some(sio) => {
            let u = grow(&mut s.u, rows * n);
            note_inputs(&mut s.inputs, &sio.ssm_in, xc);
            sio.ssm_in.matmul(xc, u, &mut s.q, par);
            shared_scan(layer, streams, states, li, dbc, dt, u, r);
            note_inputs(&mut s.inputs, &sio.ssm_out, u);
            sio.ssm_out.matmul(u, y, &mut s.q, par);
            for (i, yr) in y.chunks_exact_mut(di).enumerate() {
                let (x, z) = (
                    &xc[i * di..(i + 1) * di],
                    &xz[i * 2 * di + di..(i + 1) * 2 * di],
                );
                for ch in 0..di {
                    yr[ch] = (yr[ch] + layer.d_skip[ch] * x[ch]) * silu(z[ch]);
                }
            }
        }
    }
    mark(&mut s.phases, Phase::Scan);
    let out = grow(&mut s.out, rows * cfg.d_model);
    note_inputs(&mut s.inputs, &layer.out_proj, y);
    layer.out_proj.matmul(y, out, &mut s.q, par);
    mark(&mut s.phases, Phase::OutProj);
}
