//! A whole residual mixer block as one training op, x + mixer(rms_norm(x)): the norm, in_proj,
//! causal conv + SiLU, x_proj, dt_proj, the gated selective scan, out_proj and the residual add
//! (with the branch's locked dropout), forward and backward over slices.
//!
//! Built from candle ops (`conv_norm`, two matmuls, `scan`) the same arithmetic was about twelve
//! graph nodes per layer over [B*T, d_inner] tensors, and candle's backward gives every node's
//! gradient a zero-filled tensor plus an add (`GradStore::or_insert`): a 2026-12-01 profile of the
//! training steps had those fills, adds and copies at 26% of the step time. As one op the mixer
//! takes one gradient in and gives one out. The projections, the norm and the residual add joined
//! it in the thirty-sixth session: as nodes of their own, in_proj's [B*T, 2 Di] output, out_proj's
//! [B*T, Di] input and three [B*T, D] tensors around the norm and the add each still paid a fill
//! and an add. The composite stays as the test's reference.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::conv_norm::{causal_conv_silu, conv_backward_sequence, conv_forward_sequence, rms_norm};
use super::gemm::{matmul, product, View};
use super::linear::{linear, with_data};
use super::residual::Residual;
use super::scan::{
    core_backward_fast, core_sequence_fast, cpu_f32, f32_slice, params, ssm_core, sum_parts, Dims,
    InputGrads, Inputs, Trace,
};

/// Sizes of the mixer: the model's width, d_inner, the SSM state, dt's rank and the conv's taps.
#[derive(Clone, Copy, Debug)]
pub struct MixerDims {
    pub d: usize,
    pub di: usize,
    pub n: usize,
    pub r: usize,
    pub k: usize,
}

impl MixerDims {
    /// Lengths of the packed parameter vector's parts, in order: the conv's taps and bias
    /// tap-major [K + 1, Di], x_proj [R + 2N, Di], dt_proj [Di, R], and the scan's (A_log, D,
    /// dt_bias) channel-major [Di, N + 2], in_proj [2 Di, D] (the x rows, then z's), out_proj
    /// [D, Di] and the norm's weight [D].
    fn parts(&self) -> [usize; 7] {
        let (d, di, n, r, k) = (self.d, self.di, self.n, self.r, self.k);
        [
            (k + 1) * di,
            (r + 2 * n) * di,
            di * r,
            di * (n + 2),
            2 * di * d,
            d * di,
            d,
        ]
    }
}

/// What the forward computes for the whole batch and the backward needs again.
struct Saved {
    /// The normed input, in_proj's input [B*T, D].
    hn: Vec<f32>,
    /// The conv's input x and the gate z [B*T, Di] each: in_proj's two halves.
    xs: Vec<f32>,
    z: Vec<f32>,
    /// The conv's output, the scan's x [B*T, Di].
    xc: Vec<f32>,
    /// x_proj's output (dt low-rank, B, C) [B*T, R + 2N].
    dbc: Vec<f32>,
    /// dt before its bias and softplus [B*T, Di].
    raw: Vec<f32>,
    /// (B, C) [B*T, 2N].
    bc: Vec<f32>,
    /// Each sequence's scan trace, recorded by a forward that autograd will differentiate (so
    /// the backward does not run the scan forward again); empty otherwise.
    traces: Vec<Trace>,
    /// The gated scan's output, out_proj's input [B*T, Di] (empty until the scan has run).
    y: Vec<f32>,
}

impl Saved {
    /// Sequence `bi`'s scan inputs (each [T, Di] row-major).
    fn inputs(&self, bi: usize, t: usize, di: usize) -> Inputs<'_> {
        let seq = bi * t * di..(bi + 1) * t * di;
        Inputs {
            x: &self.xc[seq.clone()],
            raw: &self.raw[seq.clone()],
            z: &self.z[seq],
            stride: di,
        }
    }
}

/// Inputs: x [B*T, D] (the residual stream), and the packed parameters (`MixerDims::parts`).
/// Output [B*T, D], x plus the branch. Rows rather than [B, T, ...] tensors, so that the model
/// needs no reshape around the op: candle's backward gives each reshape a zero-filled gradient
/// and an add.
struct MixerBlock {
    dims: MixerDims,
    /// The norm before the mixer and the residual add after it; its T is the sequence length.
    residual: Residual,
    /// The forward's intermediates, kept for the backward when autograd will ask for it.
    saved: Option<Mutex<Option<Saved>>>,
}

impl MixerBlock {
    fn scan_dims(&self, b: usize, t: usize) -> Dims {
        Dims {
            b,
            t,
            di: self.dims.di,
            n: self.dims.n,
            gated: true,
        }
    }

    fn check(&self, x: &Shape, w: &Shape) -> candle_core::Result<(usize, usize)> {
        let (rows, d) = x.dims2()?;
        let len = w.dims1()?;
        let want: usize = self.dims.parts().iter().sum();
        if d != self.dims.d || len != want {
            candle_core::bail!(
                "mixer_block: x {x:?} and {len} packed parameters disagree with {:?}",
                self.dims
            );
        }
        self.residual.check(rows, d, "mixer_block")?;
        let t = self.residual.t;
        Ok((rows / t, t))
    }

    /// Everything up to the scan: the norm, in_proj's x and z halves, the conv, x_proj and dt_proj.
    fn prepare(&self, x: &[f32], w: &[f32], b: usize, t: usize) -> Saved {
        let MixerDims { d, di, n, r, k } = self.dims;
        let rows = b * t;
        let [tw, wx, wdt, _, win, _, nw] = split(w, self.dims);
        let hn = self.residual.norm(x, nw);
        let h = View::rows(&hn, rows, d);
        let (win_x, win_z) = win.split_at(di * d);
        let xs = product(h, View::rows(win_x, di, d).t());
        let z = product(h, View::rows(win_z, di, d).t());
        let mut xc = vec![0.0f32; rows * di];
        xc.par_chunks_mut(t * di)
            .zip(xs.par_chunks(t * di))
            .for_each(|(ob, xb)| conv_forward_sequence(xb, tw, t, di, k, ob));
        let wdbc = r + 2 * n;
        let dbc = product(View::rows(&xc, rows, di), View::rows(wx, wdbc, di).t());
        let low = View {
            cols: r,
            ..View::rows(&dbc, rows, wdbc)
        };
        let raw = product(low, View::rows(wdt, di, r).t());
        let mut bc = Vec::with_capacity(rows * 2 * n);
        for row in dbc.chunks_exact(wdbc) {
            bc.extend_from_slice(&row[r..]);
        }
        Saved {
            hn,
            xs,
            z,
            xc,
            dbc,
            raw,
            bc,
            traces: Vec::new(),
            y: Vec::new(),
        }
    }
}

/// The packed parameters' seven parts (`MixerDims::parts`).
fn split(w: &[f32], dims: MixerDims) -> [&[f32]; 7] {
    let mut rest = w;
    dims.parts().map(|len| {
        let (part, tail) = rest.split_at(len);
        rest = tail;
        part
    })
}

impl CustomOp2 for MixerBlock {
    fn name(&self) -> &'static str {
        "mixer_block"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t) = self.check(l1.shape(), l2.shape())?;
        let (x, w) = (
            f32_slice(s1, l1, "x")?,
            f32_slice(s2, l2, "mixer parameters")?,
        );
        let mut saved = self.prepare(x, w, b, t);
        let d = self.scan_dims(b, t);
        let [.., p, _, wout, _] = split(w, self.dims);
        let (a, d_skip, bias) = params(p, &d);
        let (dm, di) = (self.dims.d, self.dims.di);
        let record = self.saved.is_some();
        let mut out = vec![0.0f32; b * t * di];
        let traces: Vec<Option<Trace>> = out
            .par_chunks_mut(t * di)
            .zip(saved.bc.par_chunks(t * 2 * d.n))
            .enumerate()
            .map(|(bi, (ob, bcb))| {
                let u = saved.inputs(bi, t, di);
                let mut trace = record.then(Trace::default);
                core_sequence_fast(&u, bcb, &a, &d_skip, &bias, &d, ob, trace.as_mut());
                trace
            })
            .collect();
        saved.traces = traces.into_iter().flatten().collect();
        let mut y = product(View::rows(&out, b * t, di), View::rows(wout, dm, di).t());
        self.residual.add(&mut y, x, dm);
        if let Some(slot) = &self.saved {
            saved.y = out;
            *slot.lock().expect("not poisoned") = Some(saved);
        }
        Ok((CpuStorage::F32(y), Shape::from((b * t, dm))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, t) = self.check(x.shape(), w.shape())?;
        let MixerDims { d: dm, di, n, r, k } = self.dims;
        let w_v = w.to_vec1::<f32>()?;
        let saved = self
            .saved
            .as_ref()
            .and_then(|s| s.lock().expect("not poisoned").take());
        let Some(saved) = saved else {
            candle_core::bail!("mixer_block: backward without its forward's intermediates");
        };
        let d = self.scan_dims(b, t);
        let [tw, wx, wdt, p, win, wout, nw] = split(&w_v, self.dims);
        let (a, d_skip, bias) = params(p, &d);
        let (rows, wdbc, seq) = (b * t, r + 2 * n, t * di);

        // out = x + mask * (y · out_proj^T).
        let grad = grad.contiguous()?;
        let (sg, lg) = grad.storage_and_layout();
        let grad = cpu_f32(&sg, lg, "gradient")?;
        let g_branch = self.residual.branch_grad(grad, dm);
        let g_branch = View::rows(&g_branch, rows, dm);
        let g_out = product(g_branch, View::rows(wout, dm, di));
        let g_wout = product(g_branch.t(), View::rows(&saved.y, rows, di));

        // The scan: dL/d(xc, dt_raw, z) and dL/d(B, C).
        let mut g_xc = vec![0.0f32; rows * di];
        let mut g_raw = vec![0.0f32; rows * di];
        let mut g_z = vec![0.0f32; rows * di];
        let mut g_bc = vec![0.0f32; rows * 2 * n];
        let gp_parts: Vec<Vec<f32>> = g_xc
            .par_chunks_mut(seq)
            .zip(g_raw.par_chunks_mut(seq))
            .zip(g_z.par_chunks_mut(seq))
            .zip(g_bc.par_chunks_mut(t * 2 * n))
            .enumerate()
            .map(|(bi, (((x, raw), z), gbc))| {
                let u = saved.inputs(bi, t, di);
                let bcb = &saved.bc[bi * t * 2 * n..(bi + 1) * t * 2 * n];
                let gob = &g_out[bi * seq..(bi + 1) * seq];
                let grads = InputGrads { x, raw, z };
                core_backward_fast(
                    &u,
                    bcb,
                    gob,
                    &a,
                    &d_skip,
                    &bias,
                    &d,
                    grads,
                    gbc,
                    saved.traces.get(bi),
                )
            })
            .collect();
        let g_p = sum_parts(gp_parts, p.len());

        // dt_raw = low · dt_proj^T, low = dbc[:, ..R].
        let g_raw = View::rows(&g_raw, rows, di);
        let low = View {
            cols: r,
            ..View::rows(&saved.dbc, rows, wdbc)
        };
        let g_wdt = product(g_raw.t(), low);
        let g_low = product(g_raw, View::rows(wdt, di, r));
        let mut g_dbc = Vec::with_capacity(rows * wdbc);
        for (l, bcr) in g_low.chunks_exact(r).zip(g_bc.chunks_exact(2 * n)) {
            g_dbc.extend_from_slice(l);
            g_dbc.extend_from_slice(bcr);
        }

        // dbc = xc · x_proj^T; xc also feeds the scan directly (g_xc holds that part).
        let g_dbc = View::rows(&g_dbc, rows, wdbc);
        let g_wx = product(g_dbc.t(), View::rows(&saved.xc, rows, di));
        matmul(&mut g_xc, g_dbc, View::rows(wx, wdbc, di), true);

        // The conv, then dL/dxz = (dL/dxs, dL/dz).
        let mut g_xs = vec![0.0f32; rows * di];
        let tw_parts: Vec<Vec<f32>> = g_xs
            .par_chunks_mut(seq)
            .zip(saved.xs.par_chunks(seq))
            .zip(g_xc.par_chunks(seq))
            .map(|((gxb, xb), gb)| conv_backward_sequence(xb, gb, tw, t, di, k, gxb))
            .collect();
        let g_tw = sum_parts(tw_parts, tw.len());

        // (xs, z) = hn · in_proj^T, by halves.
        let (g_xs, g_z) = (View::rows(&g_xs, rows, di), View::rows(&g_z, rows, di));
        let (win_x, win_z) = win.split_at(di * dm);
        let hn = View::rows(&saved.hn, rows, dm);
        let mut g_hn = product(g_xs, View::rows(win_x, di, dm));
        matmul(&mut g_hn, g_z, View::rows(win_z, di, dm), true);
        let g_win = [product(g_xs.t(), hn), product(g_z.t(), hn)].concat();

        // hn = rms_norm(x); the residual passes the gradient through.
        let (g_x, g_nw) = with_data(x, "x", |xv| self.residual.backward(xv, nw, grad, &g_hn))?;
        let g_w: Vec<f32> = [g_tw, g_wx, g_wdt, g_p, g_win, g_wout, g_nw].concat();
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(g_x, x.shape(), dev)?),
            Some(Tensor::from_vec(g_w, w.shape(), dev)?),
        ))
    }
}

/// The block's weights by role, as the model names them.
pub struct MixerWeights<'a> {
    /// [D]: the norm before the mixer.
    pub norm: &'a Tensor,
    /// [2 Di, D]: the x rows, then the gate's.
    pub in_proj: &'a Tensor,
    /// [Di, K] and [Di].
    pub conv: &'a Tensor,
    pub conv_bias: &'a Tensor,
    /// [R + 2N, Di].
    pub x_proj: &'a Tensor,
    /// [Di, R].
    pub dt_proj: &'a Tensor,
    /// [Di, N], [Di], [Di].
    pub a_log: &'a Tensor,
    pub d: &'a Tensor,
    pub dt_bias: &'a Tensor,
    /// [D, Di].
    pub out_proj: &'a Tensor,
}

impl<'a> MixerWeights<'a> {
    /// From the ten tensors in the field order (norm, in_proj, conv, conv_bias, x_proj, dt_proj,
    /// a_log, d, dt_bias, out_proj).
    pub fn from_slice(w: &[&'a Tensor]) -> Self {
        Self {
            norm: w[0],
            in_proj: w[1],
            conv: w[2],
            conv_bias: w[3],
            x_proj: w[4],
            dt_proj: w[5],
            a_log: w[6],
            d: w[7],
            dt_bias: w[8],
            out_proj: w[9],
        }
    }
}

/// A residual Mamba-1 block on x [B*T, D] (B sequences of `seq_len` rows) -> [B*T, D]:
/// x + mask * mixer(rms_norm(x)), where the mixer is in_proj to x and the gate z, the gated
/// selective scan of the conv'd x with dt, B and C projected from it, and out_proj. `mask` [B, D]
/// is the branch's locked dropout (one value per sequence and channel).
pub fn mixer_block(
    x: &Tensor,
    seq_len: usize,
    m: &MixerWeights,
    eps: f64,
    mask: Option<Vec<f32>>,
) -> candle_core::Result<Tensor> {
    let (di, k) = m.conv.dims2()?;
    let d = m.in_proj.dim(1)?;
    let n = m.a_log.dim(1)?;
    let r = m.dt_proj.dim(1)?;
    let dims = MixerDims { d, di, n, r, k };
    let tw = Tensor::cat(&[m.conv, &m.conv_bias.unsqueeze(1)?], 1)?.t()?;
    let p = Tensor::cat(&[m.a_log, &m.d.unsqueeze(1)?, &m.dt_bias.unsqueeze(1)?], 1)?;
    let w = Tensor::cat(
        &[
            tw.flatten_all()?,
            m.x_proj.flatten_all()?,
            m.dt_proj.flatten_all()?,
            p.flatten_all()?,
            m.in_proj.flatten_all()?,
            m.out_proj.flatten_all()?,
            m.norm.flatten_all()?,
        ],
        0,
    )?;
    let tracked = x.track_op() || w.track_op();
    let op = MixerBlock {
        dims,
        residual: Residual {
            t: seq_len,
            eps: eps as f32,
            mask,
        },
        saved: tracked.then(|| Mutex::new(None)),
    };
    x.contiguous()?.apply_op2(&w, op)
}

/// The same computation as `mixer_block` from the smaller fused ops and candle matmuls, as the
/// trainer ran it before: the reference the fused op is tested and benchmarked against.
/// x is [B, T, D], `mask` [B, 1, D].
pub fn mixer_composite(
    x: &Tensor,
    m: &MixerWeights,
    eps: f64,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let (di, n, r) = (m.conv.dim(0)?, m.a_log.dim(1)?, m.dt_proj.dim(1)?);
    let h = rms_norm(&x.reshape((b * t, d))?, m.norm, eps)?;
    let xz = linear(&h, m.in_proj)?.reshape((b, t, 2 * di))?;
    let xs = xz.narrow(2, 0, di)?;
    let z = xz.narrow(2, di, di)?;
    let xc = causal_conv_silu(&xs, m.conv, m.conv_bias)?;
    let dbc = xc.reshape((b * t, di))?.matmul(&m.x_proj.t()?)?;
    let raw = dbc.narrow(1, 0, r)?.matmul(&m.dt_proj.t()?)?;
    let bc = dbc.narrow(1, r, 2 * n)?.reshape((b, t, 2 * n))?;
    let raw = raw.reshape((b, t, di))?;
    let y = ssm_core(&xc, &raw, &z, &bc, m.a_log, m.d, m.dt_bias)?;
    let branch = linear(&y.reshape((b * t, di))?, m.out_proj)?.reshape((b, t, d))?;
    let branch = match mask {
        Some(mask) => branch.broadcast_mul(mask)?,
        None => branch,
    };
    x + branch
}

#[cfg(test)]
mod tests {
    use super::super::testing::{compare, var};
    use super::*;

    /// The fused op against the composite it replaces, values and every input's gradient,
    /// without and with a dropout mask. d_inner 18: one full 16-lane chunk of the scan's
    /// lane-wise loops and a tail.
    #[test]
    fn matches_the_composite_mixer() {
        let (b, t, dm, di, n, r, k) = (2, 9, 5, 18, 3, 2, 4);
        let inputs = [
            var(&[b * t, dm], 1),
            var(&[dm], 11),
            var(&[2 * di, dm], 9),
            var(&[di, k], 2),
            var(&[di], 3),
            var(&[r + 2 * n, di], 4),
            var(&[di, r], 5),
            var(&[di, n], 6),
            var(&[di], 7),
            var(&[di], 8),
            var(&[dm, di], 10),
        ];
        let mask: Vec<f32> = (0..b * dm).map(|i| [0.0, 1.25][i * 7 % 3 % 2]).collect();
        assert!(mask.contains(&0.0) && mask.contains(&1.25));
        for mask in [None, Some(mask)] {
            compare(
                &inputs,
                |v| {
                    let w = MixerWeights::from_slice(&v[1..]);
                    mixer_block(v[0], t, &w, 1e-5, mask.clone()).unwrap()
                },
                |v| {
                    let x = v[0].reshape((b, t, dm)).unwrap();
                    let m = mask.as_ref().map(|m| {
                        Tensor::from_vec(m.clone(), (b, 1, dm), &candle_core::Device::Cpu).unwrap()
                    });
                    let w = MixerWeights::from_slice(&v[1..]);
                    let y = mixer_composite(&x, &w, 1e-5, m.as_ref()).unwrap();
                    y.reshape((b * t, dm)).unwrap()
                },
            );
        }
    }
}
