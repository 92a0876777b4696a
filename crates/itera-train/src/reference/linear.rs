//! y = x · Wᵀ, the model's projections outside the fused blocks, as one op with a hand-written
//! backward; and `normed_linear`, the same of rms_norm(x), for the MoE router.
//!
//! Candle builds it from a transpose view and a matmul, and its backward pays for the view: the
//! weight's gradient is added into a zero-filled [in, out] tensor for the view, then transposed
//! and added again, with a strided add, into a zero-filled [out, in] one for the weight. Here
//! `gemm` writes dL/dW in W's own layout and dL/dx in x's, each once.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::conv_norm::{norm_backward, norm_forward};
use super::gemm::{product, View};
use super::scan::{cpu_f32, f32_slice};

struct Linear;

/// The f32 data of a contiguous CPU tensor, lent to `f` without a copy.
pub(super) fn with_data<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> R,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    Ok(f(cpu_f32(&storage, layout, what)?))
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((rows, k), (n, k_w)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        if k != k_w {
            candle_core::bail!(
                "linear: x {:?} and weight {:?} disagree",
                l1.shape(),
                l2.shape()
            );
        }
        let (x, w) = (f32_slice(s1, l1, "x")?, f32_slice(s2, l2, "weight")?);
        let y = product(View::rows(x, rows, k), View::rows(w, n, k).t());
        Ok((CpuStorage::F32(y), Shape::from((rows, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let ((rows, k), n) = (x.dims2()?, w.dim(0)?);
        let grad = grad.contiguous()?;
        let (gx, gw) = with_data(&grad, "gradient", |g| {
            let g = View::rows(g, rows, n);
            let gx = with_data(w, "weight", |w| product(g, View::rows(w, n, k)))?;
            let gw = with_data(x, "x", |x| product(g.t(), View::rows(x, rows, k)))?;
            candle_core::Result::Ok((gx, gw))
        })??;
        Ok((
            Some(Tensor::from_vec(gx, (rows, k), x.device())?),
            Some(Tensor::from_vec(gw, (n, k), w.device())?),
        ))
    }
}

/// x [rows, in] · w [out, in]ᵀ -> [rows, out].
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}

/// rms_norm(x) · Wᵀ as one op. The MoE router and the experts (`moe_block`) each norm the layer's
/// input themselves, so the normed [rows, d] tensor is no graph node: its gradient would cost a
/// zero-filled tensor and two adds.
struct NormedLinear {
    eps: f32,
}

impl CustomOp3 for NormedLinear {
    fn name(&self) -> &'static str {
        "normed_linear"
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
        let ((rows, k), (n, k_w)) = (l1.shape().dims2()?, l3.shape().dims2()?);
        if k != k_w || l2.shape().dims1()? != k {
            candle_core::bail!(
                "normed_linear: x {:?}, norm {:?} and weight {:?} disagree",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let x = f32_slice(s1, l1, "x")?;
        let (nw, w) = (f32_slice(s2, l2, "norm")?, f32_slice(s3, l3, "weight")?);
        let hn = norm_forward(x, nw, self.eps);
        let y = product(View::rows(&hn, rows, k), View::rows(w, n, k).t());
        Ok((CpuStorage::F32(y), Shape::from((rows, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        nw: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let ((rows, k), n) = (x.dims2()?, w.dim(0)?);
        let grad = grad.contiguous()?;
        let ((sx, lx), (sn, ln), (sw, lw), (sg, lg)) = (
            x.storage_and_layout(),
            nw.storage_and_layout(),
            w.storage_and_layout(),
            grad.storage_and_layout(),
        );
        let (xv, nwv) = (cpu_f32(&sx, lx, "x")?, cpu_f32(&sn, ln, "norm")?);
        let (wv, g) = (cpu_f32(&sw, lw, "weight")?, cpu_f32(&sg, lg, "gradient")?);
        let g = View::rows(g, rows, n);
        // The normed rows again (a cheap [rows, d] pass) rather than kept.
        let hn = norm_forward(xv, nwv, self.eps);
        let gw = product(g.t(), View::rows(&hn, rows, k));
        let ghn = product(g, View::rows(wv, n, k));
        let (gx, gnw) = norm_backward(xv, &ghn, nwv, self.eps);
        Ok((
            Some(Tensor::from_vec(gx, (rows, k), x.device())?),
            Some(Tensor::from_vec(gnw, k, nw.device())?),
            Some(Tensor::from_vec(gw, (n, k), w.device())?),
        ))
    }
}

/// rms_norm(x) [rows, in] (weight `norm` [in], epsilon `eps`) · w [out, in]ᵀ -> [rows, out].
pub fn normed_linear(
    x: &Tensor,
    norm: &Tensor,
    w: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let op = NormedLinear { eps: eps as f32 };
    x.contiguous()?
        .apply_op3(&norm.contiguous()?, &w.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{compare, var};
    use super::*;

    /// Values and both gradients against candle's matmul of the transposed weight; 70 rows x
    /// 33 inputs x 17 outputs, odd sizes so gemm's edge tiles take part.
    #[test]
    fn matches_candles_matmul() {
        compare(
            &[var(&[70, 33], 1), var(&[17, 33], 2)],
            |v| linear(v[0], v[1]).unwrap(),
            |v| v[0].matmul(&v[1].t().unwrap()).unwrap(),
        );
    }

    /// The normed projection against candle's RMSNorm and matmul: values and the gradients of
    /// x, the norm's weight and the projection.
    #[test]
    fn normed_linear_matches_norm_then_matmul() {
        compare(
            &[var(&[70, 20], 1), var(&[20], 3), var(&[5, 20], 2)],
            |v| normed_linear(v[0], v[1], v[2], 1e-5).unwrap(),
            |v| {
                let h = candle_nn::ops::rms_norm_slow(v[0], v[1], 1e-5).unwrap();
                h.matmul(&v[2].t().unwrap()).unwrap()
            },
        );
    }
}
