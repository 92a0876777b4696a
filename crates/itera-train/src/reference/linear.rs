//! y = x · Wᵀ, every projection of the model, as one op with a hand-written backward.
//!
//! Candle builds it from a transpose view and a matmul, and its backward pays for the view: the
//! weight's gradient is added into a zero-filled [in, out] tensor for the view, then transposed
//! and added again, with a strided add, into a zero-filled [out, in] one for the weight. Here
//! `gemm` writes dL/dW in W's own layout and dL/dx in x's, each once.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

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
}
