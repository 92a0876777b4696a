//! The selective scan of training: a fused candle op with a hand-written backward. (Inference has
//! its own loop over the same arithmetic in itera-core's `runtime/mixer.rs`: this one records
//! what the backward needs, that one updates states in place.)
//!
//! Per channel d with state h[0..N, d]:
//!   h = exp(dt[d] * A[d, n]) * h + dt[d] * B[n] * x[d]
//!   y[d] = sum_n C[n] * h[n, d]
//! States and A are kept state-major ([N][d_inner]) so every loop runs across channels and
//! vectorises; the parameter tensor `p` stays channel-major ([d_inner, N + 2]).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use itera_core::math::{exp_with, sigmoid_with, silu_with, softplus_with, MulAdd};
use rayon::prelude::*;

pub(crate) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("`{what}` must be f32"),
    };
    if !l.is_contiguous() {
        candle_core::bail!("`{what}` must be contiguous");
    }
    Ok(&data[l.start_offset()..l.start_offset() + l.shape().elem_count()])
}

/// The f32 data of a contiguous CPU tensor's storage, without a copy.
pub(crate) fn cpu_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(s) => f32_slice(s, layout, what),
        _ => candle_core::bail!("`{what}` is not on the CPU"),
    }
}

/// Sums the per-sequence partial gradients of a fused op's parameters.
pub(crate) fn sum_parts(parts: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut acc = vec![0.0f32; len];
    for p in parts {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
    acc
}

/// The whole SSM core of a Mamba mixer between the projections, fused:
///   dt = softplus(dt_raw + dt_bias); y = scan(x, dt, A = -exp(A_log), B, C) + D * x; out = y * silu(z)
/// Inputs: `u` [B, T, 3*Di] = (x, dt_raw, z); `bc` [B, T, 2N] = (B, C);
/// `p` [Di, N + 2] = (A_log, D, dt_bias). Output [B, T, Di]. Ungated, out = y (z is ignored).
pub struct SsmCore {
    gated: bool,
}

pub(super) struct Dims {
    pub b: usize,
    pub t: usize,
    pub di: usize,
    pub n: usize,
    pub gated: bool,
}

fn dims(u: &Shape, bc: &Shape, p: &Shape, gated: bool) -> candle_core::Result<Dims> {
    let (b, t, di3) = u.dims3()?;
    let (b2, t2, n2) = bc.dims3()?;
    let (di, n_plus) = p.dims2()?;
    if b2 != b || t2 != t || di3 != 3 * di || n_plus < 2 || n2 != 2 * (n_plus - 2) {
        candle_core::bail!("ssm_core: shapes disagree: u {u:?}, bc {bc:?}, p {p:?}");
    }
    Ok(Dims {
        b,
        t,
        di,
        n: n_plus - 2,
        gated,
    })
}

/// Unpacks `p` into (A state-major [N][d_inner], D, dt_bias).
pub(super) fn params(p: &[f32], d: &Dims) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let w = d.n + 2;
    let a = (0..d.di * d.n)
        .map(|k| -p[(k % d.di) * w + k / d.di].exp())
        .collect();
    let dd = (0..d.di).map(|i| p[i * w + d.n]).collect();
    let bias = (0..d.di).map(|i| p[i * w + d.n + 1]).collect();
    (a, dd, bias)
}

/// One sequence's scan inputs: x, dt_raw and z, each a [T, Di] matrix whose row t starts at
/// t * stride (the same in all three: interleaved in `SsmCore`'s u, separate in `mixer_block`).
#[derive(Clone, Copy)]
pub(super) struct Inputs<'a> {
    pub x: &'a [f32],
    pub raw: &'a [f32],
    pub z: &'a [f32],
    pub stride: usize,
}

impl<'a> Inputs<'a> {
    /// Row t of x, dt_raw and z, each exactly `di` long.
    #[inline(always)]
    fn row(&self, t: usize, di: usize) -> (&[f32], &[f32], &[f32]) {
        let at = t * self.stride;
        (
            &self.x[at..at + di],
            &self.raw[at..at + di],
            &self.z[at..at + di],
        )
    }

    /// Sequence `bi` of `SsmCore`'s u [B, T, 3 Di].
    fn interleaved(u: &'a [f32], bi: usize, d: &Dims) -> Inputs<'a> {
        let u = &u[bi * d.t * 3 * d.di..(bi + 1) * d.t * 3 * d.di];
        Inputs {
            x: u,
            raw: &u[d.di..],
            z: &u[2 * d.di..],
            stride: 3 * d.di,
        }
    }
}

/// One sequence's gradients of x, dt_raw and z, each [T, Di] row-major (`g_z` untouched when
/// ungated).
pub(super) struct InputGrads<'a> {
    pub x: &'a mut [f32],
    pub raw: &'a mut [f32],
    pub z: &'a mut [f32],
}

/// Steps per chunk of the backward: it recomputes a chunk's states from the state entering it,
/// so the states it reads ([CHUNK][N][d_inner] of h and of the decays, 256 KB at `tiny`'s sizes)
/// stay in L2 instead of coming from a [T][N][d_inner] trace in memory.
pub(super) const CHUNK: usize = 16;

/// What the backward needs of one sequence's forward: the state entering every CHUNK-th step
/// ([N][d_inner] each), dt_t and the pre-gate y_t, each appended step by step (so they need no
/// zero-filling first).
#[derive(Default)]
pub(super) struct Trace {
    starts: Vec<f32>,
    dts: Vec<f32>,
    ys: Vec<f32>,
}

/// One state update, h' = exp(dt A) h + dt B x, as (h', the decay exp(dt A)): the forward and
/// the backward's recomputation share it, so the recomputed states are the forward's bit for bit.
#[inline(always)]
fn state_step<M: MulAdd>(dt_a: f32, h: f32, dx_b: f32) -> (f32, f32) {
    let decay = exp_with::<M>(dt_a);
    (M::mul_add(decay, h, dx_b), decay)
}

/// Steps t0..t1 of one sequence as the backward recomputes them: the state entering them and
/// every step's dt ([T][d_inner], the trace's).
struct Chunk<'a> {
    t0: usize,
    t1: usize,
    start: &'a [f32],
    dts: &'a [f32],
}

/// A chunk's states and decays again ([CHUNK][N][d_inner] each, step t at t - t0), from the state
/// entering it, exactly as the forward made them. `dx` is a [d_inner] scratch.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn recompute_chunk<M: MulAdd>(
    ub: &Inputs,
    bcb: &[f32],
    a: &[f32],
    d: &Dims,
    c: &Chunk,
    hs: &mut [f32],
    decays: &mut [f32],
    dx: &mut [f32],
) {
    let (di, n) = (d.di, d.n);
    let dx = &mut dx[..di];
    for t in c.t0..c.t1 {
        let (x, _, _) = ub.row(t, di);
        let dt = &c.dts[t * di..(t + 1) * di];
        let bt = &bcb[t * 2 * n..t * 2 * n + n];
        for i in 0..di {
            dx[i] = dt[i] * x[i];
        }
        let (done, rest) = hs.split_at_mut((t - c.t0) * di * n);
        let h_old = if t == c.t0 {
            c.start
        } else {
            &done[(t - c.t0 - 1) * di * n..]
        };
        let decay_t = &mut decays[(t - c.t0) * di * n..(t - c.t0 + 1) * di * n];
        for (j, &bj) in bt.iter().enumerate() {
            let rows = j * di..(j + 1) * di;
            let (h_new, h_old) = (&mut rest[rows.clone()], &h_old[rows.clone()]);
            let (decay_j, a_j) = (&mut decay_t[rows.clone()], &a[rows]);
            for i in 0..di {
                (h_new[i], decay_j[i]) = state_step::<M>(dt[i] * a_j[i], h_old[i], dx[i] * bj);
            }
        }
    }
}

/// Forward over one sequence. Fills `out`; with a trace, also records it there.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn core_sequence<M: MulAdd>(
    u: &Inputs,
    bc: &[f32],
    a: &[f32],
    d_skip: &[f32],
    bias: &[f32],
    d: &Dims,
    out: &mut [f32],
    mut trace: Option<&mut Trace>,
) {
    let (di, n) = (d.di, d.n);
    if let Some(tr) = trace.as_mut() {
        tr.starts.reserve(d.t.div_ceil(CHUNK) * di * n);
        tr.dts.reserve(d.t * di);
        tr.ys.reserve(d.t * di);
    }
    // Re-sliced to exactly `di` so the per-channel loops carry no bounds checks (a check, or a
    // branch on `gated`, inside them kept LLVM from vectorising: they ran scalar `exp`s).
    let (d_skip, bias) = (&d_skip[..di], &bias[..di]);
    let mut h = vec![0.0f32; di * n];
    let mut dt = vec![0.0f32; di];
    let mut dx = vec![0.0f32; di];
    let mut y = vec![0.0f32; di];
    for t in 0..d.t {
        if let (Some(tr), true) = (trace.as_mut(), t % CHUNK == 0) {
            tr.starts.extend_from_slice(&h);
        }
        let (x, raw, z) = u.row(t, di);
        for i in 0..di {
            dt[i] = softplus_with::<M>(raw[i] + bias[i]);
            dx[i] = dt[i] * x[i];
            y[i] = d_skip[i] * x[i];
        }
        let bct = &bc[t * 2 * n..(t + 1) * 2 * n];
        for j in 0..n {
            let (bj, cj) = (bct[j], bct[n + j]);
            let (hj, aj) = (&mut h[j * di..(j + 1) * di], &a[j * di..(j + 1) * di]);
            for i in 0..di {
                hj[i] = state_step::<M>(dt[i] * aj[i], hj[i], dx[i] * bj).0;
                y[i] = M::mul_add(cj, hj[i], y[i]);
            }
        }
        let out_t = &mut out[t * di..(t + 1) * di];
        if d.gated {
            for i in 0..di {
                out_t[i] = y[i] * silu_with::<M>(z[i]);
            }
        } else {
            out_t.copy_from_slice(&y);
        }
        if let Some(tr) = trace.as_mut() {
            tr.dts.extend_from_slice(&dt);
            tr.ys.extend_from_slice(&y);
        }
    }
}

/// Gradients of one sequence: fills dL/d(x, dt_raw, z) and dL/dbc, returns this sequence's share of dL/dp.
/// Takes the forward's trace when it kept one, else runs the forward again to record it.
/// Every loop runs across channels (state-major layout); the sums over channels that B and C
/// need are lane-wise dot products.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn core_backward<M: MulAdd>(
    ub: &Inputs,
    bcb: &[f32],
    gout: &[f32],
    a: &[f32],
    d_skip: &[f32],
    bias: &[f32],
    d: &Dims,
    gu: InputGrads,
    gbc: &mut [f32],
    trace: Option<&Trace>,
) -> Vec<f32> {
    let (t_len, di, n) = (d.t, d.di, d.n);
    let (d_skip, bias) = (&d_skip[..di], &bias[..di]);
    let recorded;
    let trace = match trace {
        Some(tr) => tr,
        None => {
            let mut tr = Trace::default();
            let mut out = vec![0.0f32; t_len * di];
            core_sequence::<M>(ub, bcb, a, d_skip, bias, d, &mut out, Some(&mut tr));
            recorded = tr;
            &recorded
        }
    };
    let (dts, ys) = (&trace.dts, &trace.ys);
    let mut g_a = vec![0.0f32; di * n];
    let mut g_d = vec![0.0f32; di];
    let mut g_bias = vec![0.0f32; di];
    // gh carries dL/dh_t backwards through h_{t+1} = decay_{t+1} * h_t + ...
    let mut gh = vec![0.0f32; di * n];
    // One chunk's recomputed states and decays, [CHUNK][N][d_inner] each.
    let (mut hs, mut decays) = (vec![0.0f32; CHUNK * di * n], vec![0.0f32; CHUNK * di * n]);
    // Per-channel work vectors of one step.
    let (mut gy, mut dx) = (vec![0.0f32; di], vec![0.0f32; di]);
    let (mut g_dt, mut g_x, mut g) = (vec![0.0f32; di], vec![0.0f32; di], vec![0.0f32; di]);
    for c in (0..t_len.div_ceil(CHUNK)).rev() {
        let (t0, t1) = (c * CHUNK, ((c + 1) * CHUNK).min(t_len));
        let start = &trace.starts[c * di * n..(c + 1) * di * n];
        let chunk = Chunk { t0, t1, start, dts };
        recompute_chunk::<M>(ub, bcb, a, d, &chunk, &mut hs, &mut decays, &mut dx);
        for t in (t0..t1).rev() {
            let (x, raw, z) = ub.row(t, di);
            let dt = &dts[t * di..(t + 1) * di];
            let bt = &bcb[t * 2 * n..t * 2 * n + n];
            let ct = &bcb[t * 2 * n + n..(t + 1) * 2 * n];
            let h_t = &hs[(t - t0) * di * n..(t - t0 + 1) * di * n];
            let h_prev = if t > t0 {
                &hs[(t - t0 - 1) * di * n..(t - t0) * di * n]
            } else {
                start
            };
            let decay_t = &decays[(t - t0) * di * n..(t - t0 + 1) * di * n];
            let rows = t * di..(t + 1) * di;
            let (g_xt, g_rawt) = (&mut gu.x[rows.clone()], &mut gu.raw[rows.clone()]);
            let g_zt = &mut gu.z[rows];
            let (gb_t, gc_t) = gbc[t * 2 * n..(t + 1) * 2 * n].split_at_mut(n);
            let go = &gout[t * di..(t + 1) * di];
            let yt = &ys[t * di..(t + 1) * di];
            if d.gated {
                // out = y * silu(z), silu'(z) = s (1 + z (1 - s))
                lanewise([go, yt, z], [g_zt, &mut gy], |&[go, y, z], [g_z, g_y]| {
                    let s = sigmoid_with::<M>(z);
                    *g_z = go * y * s * (1.0 + z * (1.0 - s));
                    *g_y = go * z * s;
                });
            } else {
                gy.copy_from_slice(go);
            }
            lanewise(
                [&gy, x, dt],
                [&mut g_d, &mut dx],
                |&[gy, x, dt], [g_d, dx]| {
                    *g_d += gy * x;
                    *dx = dt * x;
                },
            );
            g_dt.fill(0.0);
            g_x.fill(0.0);
            for j in 0..n {
                let rows = j * di..(j + 1) * di;
                let (h_now, h_old) = (&h_t[rows.clone()], &h_prev[rows.clone()]);
                let (decay_j, a_j) = (&decay_t[rows.clone()], &a[rows.clone()]);
                let (gh_j, ga_j) = (&mut gh[rows.clone()], &mut g_a[rows]);
                let (bj, cj) = (bt[j], ct[j]);
                gc_t[j] += itera_core::math::dot(&gy, h_now);
                for i in 0..di {
                    g[i] = M::mul_add(gy[i], cj, gh_j[i]);
                    let decay = decay_j[i];
                    let g_decay = g[i] * h_old[i] * decay; // dL/d(dt*A)
                    g_dt[i] = M::mul_add(g_decay, a_j[i], M::mul_add(g[i] * bj, x[i], g_dt[i]));
                    ga_j[i] = M::mul_add(g_decay, dt[i], ga_j[i]);
                    g_x[i] = M::mul_add(g[i], bj, g_x[i]);
                    gh_j[i] = g[i] * decay;
                }
                gb_t[j] += itera_core::math::dot(&g, &dx);
            }
            for i in 0..di {
                g_xt[i] = gy[i] * d_skip[i] + dt[i] * g_x[i];
            }
            dt_backward::<M>(&g_dt, raw, bias, g_rawt, &mut g_bias);
        }
    }
    // Pack as p's layout: d/dA_log = d/dA * A.
    let mut gp = vec![0.0f32; di * (n + 2)];
    for dd in 0..di {
        for i in 0..n {
            gp[dd * (n + 2) + i] = g_a[i * di + dd] * a[i * di + dd];
        }
        gp[dd * (n + 2) + n] = g_d[dd];
        gp[dd * (n + 2) + n + 1] = g_bias[dd];
    }
    gp
}

itera_core::multiversion! {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn core_sequence_fast<M>(u: &Inputs, bc: &[f32], a: &[f32], d_skip: &[f32], bias: &[f32], d: &Dims, out: &mut [f32], trace: Option<&mut Trace>) {
        core_sequence::<M>(u, bc, a, d_skip, bias, d, out, trace)
    }
}

/// Through dt = softplus(raw + bias): g_raw = g_dt * sigmoid(raw + bias), also summed into
/// g_bias.
#[inline(always)]
fn dt_backward<M: MulAdd>(
    g_dt: &[f32],
    raw: &[f32],
    bias: &[f32],
    g_raw: &mut [f32],
    g_bias: &mut [f32],
) {
    lanewise(
        [g_dt, raw, bias],
        [g_raw, g_bias],
        |&[g_dt, raw, bias], [g_raw, g_bias]| {
            *g_raw = g_dt * sigmoid_with::<M>(raw + bias);
            *g_bias += *g_raw;
        },
    );
}

/// Runs `f` on every element of equally long slices: lane i of each input, and a mutable
/// reference to lane i of each output (its current value). Through local arrays 16 lanes at a
/// time: as plain loops over the slices, LLVM guarded its vector code with run-time overlap
/// checks that sent every call down the scalar path (the gate's and dt's backward loops were 42%
/// of the scan's backward, all scalar, in the 2026-12-01 profile of `cargo bench -p itera-train`).
#[inline(always)]
pub(super) fn lanewise<const I: usize, const O: usize>(
    ins: [&[f32]; I],
    outs: [&mut [f32]; O],
    f: impl Fn(&[f32; I], [&mut f32; O]),
) {
    const L: usize = 16;
    let n = outs[0].len();
    assert!(ins.iter().all(|x| x.len() >= n) && outs.iter().all(|y| y.len() == n));
    let mut at = 0;
    while at + L <= n {
        let x: [[f32; L]; I] = std::array::from_fn(|k| ins[k][at..at + L].try_into().unwrap());
        let mut y: [[f32; L]; O] = std::array::from_fn(|k| outs[k][at..at + L].try_into().unwrap());
        for lane in 0..L {
            let mut v: [f32; O] = std::array::from_fn(|k| y[k][lane]);
            f(&std::array::from_fn(|k| x[k][lane]), v.each_mut());
            for k in 0..O {
                y[k][lane] = v[k];
            }
        }
        for k in 0..O {
            outs[k][at..at + L].copy_from_slice(&y[k]);
        }
        at += L;
    }
    for i in at..n {
        let mut v: [f32; O] = std::array::from_fn(|k| outs[k][i]);
        f(&std::array::from_fn(|k| ins[k][i]), v.each_mut());
        for k in 0..O {
            outs[k][i] = v[k];
        }
    }
}

itera_core::multiversion! {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn core_backward_fast<M>(
        ub: &Inputs,
        bcb: &[f32],
        gout: &[f32],
        a: &[f32],
        d_skip: &[f32],
        bias: &[f32],
        d: &Dims,
        gu: InputGrads,
        gbc: &mut [f32],
        trace: Option<&Trace>,
    ) -> Vec<f32> {
        core_backward::<M>(ub, bcb, gout, a, d_skip, bias, d, gu, gbc, trace)
    }
}

impl CustomOp3 for SsmCore {
    fn name(&self) -> &'static str {
        "ssm_core"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = dims(l1.shape(), l2.shape(), l3.shape(), self.gated)?;
        let (u, bc, p) = (
            f32_slice(s1, l1, "u")?,
            f32_slice(s2, l2, "bc")?,
            f32_slice(s3, l3, "p")?,
        );
        let (a, d_skip, bias) = params(p, &d);
        let mut out = vec![0.0f32; d.b * d.t * d.di];
        out.par_chunks_mut(d.t * d.di)
            .enumerate()
            .for_each(|(bi, ob)| {
                let bcb = &bc[bi * d.t * 2 * d.n..(bi + 1) * d.t * 2 * d.n];
                core_sequence_fast(
                    &Inputs::interleaved(u, bi, &d),
                    bcb,
                    &a,
                    &d_skip,
                    &bias,
                    &d,
                    ob,
                    None,
                );
            });
        Ok((CpuStorage::F32(out), Shape::from((d.b, d.t, d.di))))
    }

    fn bwd(
        &self,
        u: &Tensor,
        bc: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = dims(u.shape(), bc.shape(), p.shape(), self.gated)?;
        let u_v = u.flatten_all()?.to_vec1::<f32>()?;
        let bc_v = bc.flatten_all()?.to_vec1::<f32>()?;
        let p_v = p.flatten_all()?.to_vec1::<f32>()?;
        let g_v = grad.flatten_all()?.to_vec1::<f32>()?;
        let (a, d_skip, bias) = params(&p_v, &d);
        let (t_len, di, n) = (d.t, d.di, d.n);
        let mut g_u = vec![0.0f32; u_v.len()];
        let mut g_bc = vec![0.0f32; bc_v.len()];
        // Per-sequence partial gradients of (A, D, dt_bias), summed afterwards.
        let parts: Vec<Vec<f32>> = g_u
            .par_chunks_mut(t_len * 3 * di)
            .zip(g_bc.par_chunks_mut(t_len * 2 * n))
            .enumerate()
            .map(|(bi, (gu, gbc))| {
                let ub = Inputs::interleaved(&u_v, bi, &d);
                let bcb = &bc_v[bi * t_len * 2 * n..(bi + 1) * t_len * 2 * n];
                let gout = &g_v[bi * t_len * di..(bi + 1) * t_len * di];
                let mut g = vec![0.0f32; 3 * t_len * di];
                let (gx, rest) = g.split_at_mut(t_len * di);
                let (graw, gz) = rest.split_at_mut(t_len * di);
                let grads = InputGrads {
                    x: gx,
                    raw: graw,
                    z: gz,
                };
                let gp =
                    core_backward_fast(&ub, bcb, gout, &a, &d_skip, &bias, &d, grads, gbc, None);
                // Interleave (x, dt_raw, z) as u's rows.
                for (t, row) in gu.chunks_exact_mut(3 * di).enumerate() {
                    for (j, part) in row.chunks_exact_mut(di).enumerate() {
                        part.copy_from_slice(&g[(j * t_len + t) * di..][..di]);
                    }
                }
                gp
            })
            .collect();
        let g_p = sum_parts(parts, di * (n + 2));
        let dev = u.device();
        Ok((
            Some(Tensor::from_vec(g_u, u.shape(), dev)?),
            Some(Tensor::from_vec(g_bc, bc.shape(), dev)?),
            Some(Tensor::from_vec(g_p, p.shape(), dev)?),
        ))
    }
}

/// out = (scan(x, softplus(dt_raw + dt_bias), -exp(A_log), B, C) + D x) * silu(z).
/// x, dt_raw, z: [B, T, Di]; bc: [B, T, 2N]; a_log: [Di, N]; d_skip, dt_bias: [Di].
pub fn ssm_core(
    x: &Tensor,
    dt_raw: &Tensor,
    z: &Tensor,
    bc: &Tensor,
    a_log: &Tensor,
    d_skip: &Tensor,
    dt_bias: &Tensor,
) -> candle_core::Result<Tensor> {
    ssm_core_op(x, dt_raw, Some(z), bc, a_log, d_skip, dt_bias)
}

/// `ssm_core` without the gate: out = scan(...) + D x.
pub fn ssm_core_ungated(
    x: &Tensor,
    dt_raw: &Tensor,
    bc: &Tensor,
    a_log: &Tensor,
    d_skip: &Tensor,
    dt_bias: &Tensor,
) -> candle_core::Result<Tensor> {
    ssm_core_op(x, dt_raw, None, bc, a_log, d_skip, dt_bias)
}

fn ssm_core_op(
    x: &Tensor,
    dt_raw: &Tensor,
    z: Option<&Tensor>,
    bc: &Tensor,
    a_log: &Tensor,
    d_skip: &Tensor,
    dt_bias: &Tensor,
) -> candle_core::Result<Tensor> {
    let gated = z.is_some();
    // Ungated, the z slot carries zeros (constant, so no gradient flows to it).
    let zeros;
    let z = match z {
        Some(z) => z,
        None => {
            zeros = x.zeros_like()?;
            &zeros
        }
    };
    let u = Tensor::cat(&[x, dt_raw, z], 2)?.contiguous()?;
    let p =
        Tensor::cat(&[a_log, &d_skip.unsqueeze(1)?, &dt_bias.unsqueeze(1)?], 1)?.contiguous()?;
    u.apply_op3(&bc.contiguous()?, &p, SsmCore { gated })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use itera_core::rng::Rng;

    /// Every element, in the 16-lane chunks and the tail, with an output that is also read.
    #[test]
    fn lanewise_matches_a_plain_loop() {
        let n = 37;
        let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..n).map(|i| 100.0 - i as f32).collect();
        let (mut x, mut y) = (vec![0.0f32; n], vec![1.0f32; n]);
        lanewise([&a, &b], [&mut x, &mut y], |&[a, b], [x, y]| {
            *x = a * b;
            *y += *x;
        });
        for i in 0..n {
            assert_eq!(x[i], a[i] * b[i]);
            assert_eq!(y[i], 1.0 + a[i] * b[i]);
        }
    }

    struct Case {
        b: usize,
        t: usize,
        di: usize,
        n: usize,
    }

    /// Independent f64 reference of the fused computation, for finite differences.
    /// inputs: [x, raw, z, bc, a_log, d, bias, r]
    fn reference_loss(v: &[Vec<f64>], c: &Case, gated: bool) -> f64 {
        let (x, raw, z, bc, a_log, dsk, bias, r) =
            (&v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]);
        let (n, di) = (c.n, c.di);
        let sp = |v: f64| (1.0 + v.exp()).ln();
        let mut loss = 0.0;
        for bi in 0..c.b {
            let mut h = vec![0.0f64; di * n];
            for ti in 0..c.t {
                let row = bi * c.t + ti;
                for d in 0..di {
                    let idx = row * di + d;
                    let dt = sp(raw[idx] + bias[d]);
                    let mut y = 0.0;
                    for i in 0..n {
                        let a = -a_log[d * n + i].exp();
                        h[d * n + i] =
                            (dt * a).exp() * h[d * n + i] + dt * bc[row * 2 * n + i] * x[idx];
                        y += bc[row * 2 * n + n + i] * h[d * n + i];
                    }
                    let zz = z[idx];
                    let gate = if gated { zz / (1.0 + (-zz).exp()) } else { 1.0 };
                    loss += (y + dsk[d] * x[idx]) * gate * r[idx];
                }
            }
        }
        loss
    }

    #[test]
    fn backward_matches_finite_differences() {
        check_gradients(true);
        check_gradients(false);
    }

    fn check_gradients(gated: bool) {
        // d_inner 18: one full 16-lane chunk of the lane-wise loops and a tail; 21 steps: one
        // whole CHUNK of the backward's recomputation and a partial one.
        const { assert!(CHUNK < 21 && 21 < 2 * CHUNK) };
        let c = Case {
            b: 2,
            t: 21,
            di: 18,
            n: 4,
        };
        let mut rng = Rng::new(7);
        let mut gen = |len: usize, lo: f64, hi: f64| -> Vec<f64> {
            (0..len).map(|_| lo + (hi - lo) * rng.uniform()).collect()
        };
        let btd = c.b * c.t * c.di;
        let inputs = vec![
            gen(btd, -1.0, 1.0),
            gen(btd, -2.0, 0.5),
            gen(btd, -2.0, 2.0),
            gen(c.b * c.t * 2 * c.n, -1.0, 1.0),
            gen(c.di * c.n, -1.0, 1.0),
            gen(c.di, -1.0, 1.0),
            gen(c.di, -1.0, 1.0),
            gen(btd, -1.0, 1.0),
        ];
        let shapes: Vec<Vec<usize>> = vec![
            vec![c.b, c.t, c.di],
            vec![c.b, c.t, c.di],
            vec![c.b, c.t, c.di],
            vec![c.b, c.t, 2 * c.n],
            vec![c.di, c.n],
            vec![c.di],
            vec![c.di],
            vec![c.b, c.t, c.di],
        ];
        let dev = Device::Cpu;
        let vars: Vec<Var> = inputs
            .iter()
            .zip(&shapes)
            .map(|(v, s)| {
                Var::from_tensor(
                    &Tensor::from_vec(
                        v.iter().map(|&f| f as f32).collect::<Vec<_>>(),
                        s.as_slice(),
                        &dev,
                    )
                    .unwrap(),
                )
                .unwrap()
            })
            .collect();
        let tv: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let out = if gated {
            ssm_core(tv[0], tv[1], tv[2], tv[3], tv[4], tv[5], tv[6]).unwrap()
        } else {
            ssm_core_ungated(tv[0], tv[1], tv[3], tv[4], tv[5], tv[6]).unwrap()
        };
        let loss = (out * tv[7]).unwrap().sum_all().unwrap();
        let value = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (value - reference_loss(&inputs, &c, gated)).abs() < 1e-4,
            "forward {value}"
        );
        let grads = loss.backward().unwrap();
        let eps = 1e-6;
        for which in 0..7 {
            if which == 2 && !gated {
                assert!(grads.get(tv[2]).is_none(), "ungated: z takes no part");
                continue;
            }
            let g = grads
                .get(tv[which])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for i in 0..inputs[which].len() {
                let (mut plus, mut minus) = (inputs.clone(), inputs.clone());
                plus[which][i] += eps;
                minus[which][i] -= eps;
                let numeric = (reference_loss(&plus, &c, gated)
                    - reference_loss(&minus, &c, gated))
                    / (2.0 * eps);
                let err = (numeric - g[i] as f64).abs();
                assert!(
                    err < 1e-3 * (1.0 + numeric.abs()),
                    "input {which} elem {i}: numeric {numeric} analytic {}",
                    g[i]
                );
            }
        }
    }
}
