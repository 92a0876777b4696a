//! The training loss: the tied LM head fused with mean cross-entropy, with its backward
//! (softmax - one-hot), computed in row chunks so the [B*T, vocab] logits never exist at once.
//! Also `EagerGrads`, the head-loss gradients computed in the forward, shared with `distill_loss`.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::scan::f32_slice;
use itera_core::math::log_sum_exp;
use rayon::prelude::*;

itera_core::multiversion! {
    /// -log softmax(row)[target].
    fn row_nll(row: &[f32], target: usize) -> f64 {
        (log_sum_exp(row) - row[target]) as f64
    }
}

itera_core::multiversion! {
    /// -log softmax(row)[target], and replaces the logits by d loss / d logits =
    /// (softmax - one_hot(target)) * scale. One exp per logit: the exps of the sum are kept
    /// and rescaled (computing them again after the log-sum-exp took a third of this function).
    fn nll_grad_row<M>(row: &mut [f32], target: usize, scale: f32) -> f64 {
        let (max, logit) = (itera_core::math::max(row), row[target]);
        let sum = itera_core::math::exp_in_place_with::<M>(row, max);
        let nll = (max + sum.ln() - logit) as f64;
        let k = scale / sum;
        for x in row.iter_mut() {
            *x *= k;
        }
        row[target] -= scale;
        nll
    }
}

/// Gradients of a fused head loss, computed in its forward. The loss is the graph's last op, so
/// d loss / d logits is known while each chunk's logits are at hand; the backward only scales the
/// stored gradients by the incoming one. That saves recomputing every chunk's logits (one of the
/// four [N, d] x [d, V] matmuls of a step), a second softmax pass, and when distilling a second
/// teacher pass.
pub(super) struct EagerGrads(Mutex<Option<HeadGrads>>);

/// d loss / dh [N, d] and d loss / dW [V, d], filled chunk by chunk.
pub(super) struct HeadGrads {
    gh: Vec<f32>,
    gw: Vec<f32>,
    d: usize,
    v: usize,
}

impl HeadGrads {
    pub(super) fn new((n, d, v): (usize, usize, usize)) -> Self {
        Self {
            gh: vec![0.0; n * d],
            gw: vec![0.0; v * d],
            d,
            v,
        }
    }

    /// One chunk's share: gh[r0..r0 + rows] = g · W and gw += g^T · h[r0..r0 + rows], where g
    /// [rows, V] is d loss / d logits.
    pub(super) fn add_chunk(&mut self, g: &[f32], h: &[f32], w: &[f32], r0: usize, rows: usize) {
        use super::gemm::{matmul, View};
        let (d, v) = (self.d, self.v);
        let g = View::rows(&g[..rows * v], rows, v);
        let gh = &mut self.gh[r0 * d..(r0 + rows) * d];
        matmul(gh, g, View::rows(w, v, d), false);
        let hc = View::rows(&h[r0 * d..(r0 + rows) * d], rows, d);
        matmul(&mut self.gw, g.t(), hc, true);
    }
}

impl EagerGrads {
    /// Some when autograd will ask for the gradients (h or W is tracked); None when evaluating.
    pub(super) fn wanted(h: &Tensor, w: &Tensor) -> Option<Self> {
        (h.track_op() || w.track_op()).then(|| Self(Mutex::new(None)))
    }

    /// Keeps the forward's gradients for the backward.
    pub(super) fn store(&self, grads: HeadGrads) {
        *self.0.lock().expect("not poisoned") = Some(grads);
    }

    /// The backward of the op `name` whose forward stored into `this`: the stored gradients
    /// times the incoming scalar gradient, shaped like h and W.
    pub(super) fn backward(
        this: Option<&Self>,
        name: &str,
        h: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(HeadGrads { mut gh, mut gw, .. }) =
            this.and_then(|e| e.0.lock().expect("not poisoned").take())
        else {
            candle_core::bail!("{name}: backward without gradients from its forward");
        };
        let g = grad.to_scalar::<f32>()?;
        if g != 1.0 {
            gh.iter_mut().chain(gw.iter_mut()).for_each(|x| *x *= g);
        }
        Ok((
            Some(Tensor::from_vec(gh, h.shape(), h.device())?),
            Some(Tensor::from_vec(gw, w.shape(), w.device())?),
        ))
    }
}

/// Rows of the LM head processed at once: [rows, vocab] logits stay a few MB instead of the
/// whole batch's [B*T, vocab].
const HEAD_CHUNK: usize = 256;

/// Mean cross-entropy of the tied LM head, fused: loss = CE(h · W^T, targets) without ever
/// materialising the full logits; the gradients come from the forward (`EagerGrads`).
/// Inputs: h [N, d], W [V, d], targets u32 [N].
struct LmHeadLoss {
    grads: Option<EagerGrads>,
}

fn head_dims(h: &Shape, w: &Shape, t: &Shape) -> candle_core::Result<(usize, usize, usize)> {
    let (n, d) = h.dims2()?;
    let (v, d2) = w.dims2()?;
    if d2 != d || t.dims1()? != n {
        candle_core::bail!("lm_head_loss: shapes disagree: h {h:?}, W {w:?}, targets {t:?}");
    }
    Ok((n, d, v))
}

/// Fills `logits` [rows, V] with the logits of rows r0.. of h; the first chunk allocates it
/// (`product`: no zero fill of its 8 MB, which the products overwrite).
fn head_chunk(
    h: &[f32],
    w: &[f32],
    d: usize,
    v: usize,
    r0: usize,
    rows: usize,
    logits: &mut Vec<f32>,
) {
    use super::gemm::{matmul, product, View};
    let hc = View::rows(&h[r0 * d..(r0 + rows) * d], rows, d);
    let wt = View::rows(w, v, d).t();
    if logits.is_empty() {
        *logits = product(hc, wt);
    } else {
        matmul(&mut logits[..rows * v], hc, wt, false);
    }
}

impl CustomOp3 for LmHeadLoss {
    fn name(&self) -> &'static str {
        "lm_head_loss"
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
        let (n, d, v) = head_dims(l1.shape(), l2.shape(), l3.shape())?;
        let (h, w) = (f32_slice(s1, l1, "h")?, f32_slice(s2, l2, "W")?);
        let targets = match s3 {
            CpuStorage::U32(t) if l3.is_contiguous() => {
                &t[l3.start_offset()..l3.start_offset() + n]
            }
            _ => candle_core::bail!("lm_head_loss: targets must be contiguous u32"),
        };
        if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("lm_head_loss: target {bad} out of range for vocab {v}");
        }
        let mut grads = self.grads.as_ref().map(|_| HeadGrads::new((n, d, v)));
        let scale = 1.0 / n as f32;
        let mut logits = Vec::new();
        let mut total = 0.0f64;
        for r0 in (0..n).step_by(HEAD_CHUNK) {
            let rows = HEAD_CHUNK.min(n - r0);
            head_chunk(h, w, d, v, r0, rows, &mut logits);
            total += logits[..rows * v]
                .par_chunks_mut(v)
                .zip(targets[r0..r0 + rows].par_iter())
                .map(|(row, &t)| match grads {
                    Some(_) => nll_grad_row(row, t as usize, scale),
                    None => row_nll(row, t as usize),
                })
                .sum::<f64>();
            if let Some(g) = &mut grads {
                g.add_chunk(&logits, h, w, r0, rows);
            }
        }
        if let (Some(e), Some(g)) = (&self.grads, grads) {
            e.store(g);
        }
        Ok((
            CpuStorage::F32(vec![(total / n as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gh, gw) = EagerGrads::backward(self.grads.as_ref(), "lm_head_loss", h, w, grad)?;
        Ok((gh, gw, None))
    }
}

/// Mean cross-entropy of `targets` [N] under logits h [N, d] · W^T, W [V, d] (the tied head).
pub fn lm_head_loss(h: &Tensor, w: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let op = LmHeadLoss {
        grads: EagerGrads::wanted(h, w),
    };
    h.contiguous()?
        .apply_op3(&w.contiguous()?, &targets.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_head_matches_linear_plus_cross_entropy() {
        let dev = Device::Cpu;
        let (n, d, v) = (300, 8, 37); // more rows than one chunk
        let hv: Vec<f32> = (0..n * d)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.1)
            .collect();
        let wv: Vec<f32> = (0..v * d)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.05)
            .collect();
        let h = Var::from_tensor(&Tensor::from_vec(hv, (n, d), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::from_vec(wv, (v, d), &dev).unwrap()).unwrap();
        let t = Tensor::from_vec(
            (0..n as u32).map(|i| i * 5 % v as u32).collect::<Vec<_>>(),
            n,
            &dev,
        )
        .unwrap();
        let fused = lm_head_loss(h.as_tensor(), w.as_tensor(), &t).unwrap();
        let logits = h.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let reference = candle_nn::loss::cross_entropy(&logits, &t).unwrap();
        let (a, b) = (
            fused.to_scalar::<f32>().unwrap(),
            reference.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let (ga, gb) = (fused.backward().unwrap(), reference.backward().unwrap());
        for var in [&h, &w] {
            let x = ga
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let y = gb
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (p, q) in x.iter().zip(&y) {
                assert!((p - q).abs() < 1e-6, "{p} vs {q}");
            }
        }
    }

    /// The gradients computed in the forward follow the incoming gradient (here 3), and a loss
    /// of untracked tensors (evaluation) computes none.
    #[test]
    fn eager_gradients_scale_with_the_incoming_gradient() {
        let dev = Device::Cpu;
        let (n, d, v) = (5, 4, 11);
        let h = Var::from_tensor(
            &Tensor::from_vec(
                (0..n * d).map(|i| (i as f32 * 0.3).sin()).collect(),
                (n, d),
                &dev,
            )
            .unwrap(),
        )
        .unwrap();
        let w = Tensor::from_vec(
            (0..v * d).map(|i| (i as f32 * 0.7).cos()).collect(),
            (v, d),
            &dev,
        )
        .unwrap();
        let t =
            Tensor::from_vec((0..n as u32).map(|i| i * 3 % v as u32).collect(), n, &dev).unwrap();
        let grad_of = |k: f64| {
            let loss = (lm_head_loss(h.as_tensor(), &w, &t).unwrap() * k).unwrap();
            let g = loss.backward().unwrap();
            g.get(h.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (one, three) = (grad_of(1.0), grad_of(3.0));
        assert!(one.iter().any(|x| x.abs() > 1e-3));
        for (a, b) in one.iter().zip(&three) {
            assert!((3.0 * a - b).abs() < 1e-6, "{a} x 3 vs {b}");
        }
        assert!(EagerGrads::wanted(&h.as_tensor().detach(), &w).is_none());
        assert!(EagerGrads::wanted(h.as_tensor(), &w).is_some());
    }
}
