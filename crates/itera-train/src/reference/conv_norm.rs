//! Fused training ops with hand-written backward passes, each replacing a chain of small candle
//! ops: causal depthwise conv + SiLU, and RMSNorm.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::scan::{cpu_f32, f32_slice, sum_parts};
use itera_core::math::{dot, rms_norm_rows, sigmoid};

/// out[b, t, d] = silu(bias[d] + sum_j w[d, j] * x[b, t - (K-1) + j, d]), zero before t = 0.
/// Inputs: x [B, T, Di]; tw [K + 1, Di] = (taps, bias) tap-major, so that every inner loop runs
/// across channels and vectorises (the channel-major [Di, K + 1] layout made each tap a stride-5
/// gather: the conv forward + backward took 9.6% of a training step in a 2026-11-30 profile).
struct CausalConvSilu;

/// Pre-activations of step `t`: pre[d] = bias[d] + sum_j tw[j][d] * x[t - (K-1) + j][d].
/// Inlined into the `multiversion!` callers so that it is compiled for their instruction set.
#[inline(always)]
fn conv_pre_row(xb: &[f32], tw: &[f32], di: usize, k: usize, t: usize, pre: &mut [f32]) {
    pre.copy_from_slice(&tw[k * di..(k + 1) * di]);
    for j in (k - 1).saturating_sub(t)..k {
        let src = &xb[(t + j + 1 - k) * di..][..di];
        for ((p, w), x) in pre.iter_mut().zip(&tw[j * di..(j + 1) * di]).zip(src) {
            *p += w * x;
        }
    }
}

itera_core::multiversion! {
    /// One sequence of the conv forward: out = silu(conv(x)).
    pub(super) fn conv_forward_sequence(xb: &[f32], tw: &[f32], t_len: usize, di: usize, k: usize, ob: &mut [f32]) {
        for t in 0..t_len {
            let row = &mut ob[t * di..(t + 1) * di];
            conv_pre_row(xb, tw, di, k, t, row);
            for v in row.iter_mut() {
                *v *= sigmoid(*v);
            }
        }
    }
}

itera_core::multiversion! {
    /// One sequence of the conv backward: fills dL/dx, returns this sequence's share of dL/d(taps,
    /// bias) in the tap-major layout.
    pub(super) fn conv_backward_sequence(xb: &[f32], gb: &[f32], tw: &[f32], t_len: usize, di: usize, k: usize, gxb: &mut [f32]) -> Vec<f32> {
        let mut gw = vec![0.0f32; (k + 1) * di];
        let mut gpre = vec![0.0f32; di];
        for t in 0..t_len {
            conv_pre_row(xb, tw, di, k, t, &mut gpre);
            for (p, g) in gpre.iter_mut().zip(&gb[t * di..(t + 1) * di]) {
                let s = sigmoid(*p);
                *p = g * s * (1.0 + *p * (1.0 - s));
            }
            for (a, p) in gw[k * di..].iter_mut().zip(&gpre) {
                *a += p;
            }
            for j in (k - 1).saturating_sub(t)..k {
                let src = (t + j + 1 - k) * di;
                let (gwj, wj) = (&mut gw[j * di..(j + 1) * di], &tw[j * di..(j + 1) * di]);
                let (x, gx) = (&xb[src..src + di], &mut gxb[src..src + di]);
                for d in 0..di {
                    gwj[d] += gpre[d] * x[d];
                    gx[d] += gpre[d] * wj[d];
                }
            }
        }
        gw
    }
}

impl CustomOp2 for CausalConvSilu {
    fn name(&self) -> &'static str {
        "causal_conv_silu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t_len, di) = l1.shape().dims3()?;
        let (k1, di2) = l2.shape().dims2()?;
        if di2 != di || k1 < 2 {
            candle_core::bail!(
                "causal_conv_silu: x {:?} and weights {:?} disagree",
                l1.shape(),
                l2.shape()
            );
        }
        let (x, tw) = (f32_slice(s1, l1, "x")?, f32_slice(s2, l2, "conv weights")?);
        let mut out = vec![0.0f32; b * t_len * di];
        out.par_chunks_mut(t_len * di)
            .enumerate()
            .for_each(|(bi, ob)| {
                let xb = &x[bi * t_len * di..(bi + 1) * t_len * di];
                conv_forward_sequence(xb, tw, t_len, di, k1 - 1, ob);
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        tw: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, t_len, di) = x.dims3()?;
        let k = tw.dim(0)? - 1;
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let wv = tw.flatten_all()?.to_vec1::<f32>()?;
        let gv = grad.flatten_all()?.to_vec1::<f32>()?;
        let mut gx = vec![0.0f32; xv.len()];
        let parts: Vec<Vec<f32>> = gx
            .par_chunks_mut(t_len * di)
            .enumerate()
            .map(|(bi, gxb)| {
                let xb = &xv[bi * t_len * di..(bi + 1) * t_len * di];
                let gb = &gv[bi * t_len * di..(bi + 1) * t_len * di];
                conv_backward_sequence(xb, gb, &wv, t_len, di, k, gxb)
            })
            .collect();
        let gw = sum_parts(parts, (k + 1) * di);
        Ok((
            Some(Tensor::from_vec(gx, x.shape(), x.device())?),
            Some(Tensor::from_vec(gw, tw.shape(), tw.device())?),
        ))
    }
}

/// silu(causal depthwise conv(x) + bias); x [B, T, Di], weight [Di, K], bias [Di].
pub fn causal_conv_silu(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let tw = Tensor::cat(&[weight, &bias.unsqueeze(1)?], 1)?
        .t()?
        .contiguous()?;
    x.contiguous()?.apply_op2(&tw, CausalConvSilu)
}

/// y = x / sqrt(mean(x^2) + eps) * w over the last dim of x [R, d].
struct RmsNorm {
    eps: f32,
}

/// Rows per parallel task.
const NORM_ROWS: usize = 64;

itera_core::multiversion! {
    /// The backward of rows of x [R, d] with incoming gradient g: fills gx and adds to gw.
    /// gx = r (g w - xhat mean(g w xhat)), gw += g xhat, with r = 1 / rms(x) and xhat = x r.
    /// The row sums go through `math::dot`'s independent lanes: written as one running sum they
    /// ran scalar, and the norms took 4.4% of a training step (2026-12-01 profile).
    fn norm_backward_rows(x: &[f32], g: &[f32], w: &[f32], eps: f32, gx: &mut [f32], gw: &mut [f32]) {
        let d = w.len();
        let mut gwx = vec![0.0f32; d];
        for ((row, g), gxr) in x.chunks_exact(d).zip(g.chunks_exact(d)).zip(gx.chunks_exact_mut(d)) {
            let r = 1.0 / (dot(row, row) / d as f32 + eps).sqrt();
            for i in 0..d {
                gwx[i] = g[i] * w[i];
                gw[i] += g[i] * row[i] * r;
            }
            let mean = dot(&gwx, row) * r / d as f32;
            for i in 0..d {
                gxr[i] = r * (gwx[i] - row[i] * r * mean);
            }
        }
    }
}

/// RMSNorm of the rows of x [R, d] by w [d], rows in parallel.
pub(super) fn norm_forward(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(NORM_ROWS * d)
        .zip(x.par_chunks(NORM_ROWS * d))
        .for_each(|(o, rows)| rms_norm_rows(rows, w, eps as f64, o));
    out
}

/// The backward of `norm_forward` with incoming gradient g [R, d]: (dL/dx, dL/dw).
pub(super) fn norm_backward(x: &[f32], g: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let mut gx = vec![0.0f32; x.len()];
    let parts: Vec<Vec<f32>> = gx
        .par_chunks_mut(NORM_ROWS * d)
        .zip(x.par_chunks(NORM_ROWS * d).zip(g.par_chunks(NORM_ROWS * d)))
        .map(|(gxc, (xc, gc))| {
            let mut gw = vec![0.0f32; d];
            norm_backward_rows(xc, gc, w, eps, gxc, &mut gw);
            gw
        })
        .collect();
    (gx, sum_parts(parts, d))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms_norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, d) = l1.shape().dims2()?;
        if l2.shape().dims1()? != d {
            candle_core::bail!(
                "rms_norm: x {:?} and weight {:?} disagree",
                l1.shape(),
                l2.shape()
            );
        }
        let (x, w) = (f32_slice(s1, l1, "x")?, f32_slice(s2, l2, "norm weight")?);
        Ok((
            CpuStorage::F32(norm_forward(x, w, self.eps)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.dim(0)?;
        let grad = grad.contiguous()?;
        let ((sx, lx), (sw, lw), (sg, lg)) = (
            x.storage_and_layout(),
            w.storage_and_layout(),
            grad.storage_and_layout(),
        );
        let xv = cpu_f32(&sx, lx, "x")?;
        let wv = cpu_f32(&sw, lw, "weight")?;
        let gv = cpu_f32(&sg, lg, "gradient")?;
        let (gx, gw) = norm_backward(xv, gv, wv, self.eps);
        Ok((
            Some(Tensor::from_vec(gx, x.shape(), x.device())?),
            Some(Tensor::from_vec(gw, d, w.device())?),
        ))
    }
}

/// RMSNorm over the last dim of a [rows, d] tensor.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
}

#[cfg(test)]
mod tests {
    use super::super::testing::{compare, var};
    use super::*;

    #[test]
    fn conv_matches_composite() {
        let (b, t, di, k) = (2, 7, 5, 4);
        compare(
            &[var(&[b, t, di], 1), var(&[di, k], 2), var(&[di], 3)],
            |v| causal_conv_silu(v[0], v[1], v[2]).unwrap(),
            |v| {
                let padded = v[0].pad_with_zeros(1, k - 1, 0).unwrap();
                let mut acc = v[2].broadcast_as((b, t, di)).unwrap().contiguous().unwrap();
                for j in 0..k {
                    let tap = v[1].narrow(1, j, 1).unwrap().squeeze(1).unwrap();
                    acc = (acc + padded.narrow(1, j, t).unwrap().broadcast_mul(&tap).unwrap())
                        .unwrap();
                }
                acc.silu().unwrap()
            },
        );
    }

    /// 70 rows: two parallel tasks whose weight gradients are summed; d 20: two 8-lane chunks
    /// of the row sums and a tail.
    #[test]
    fn rms_norm_matches_composite() {
        compare(
            &[var(&[70, 20], 4), var(&[20], 5)],
            |v| rms_norm(v[0], v[1], 1e-5).unwrap(),
            |v| candle_nn::ops::rms_norm_slow(v[0], v[1], 1e-5).unwrap(),
        );
    }
}
