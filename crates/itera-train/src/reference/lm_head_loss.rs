//! The training loss: the tied LM head fused with mean cross-entropy, with its backward
//! (softmax - one-hot), computed in row chunks so the [B*T, vocab] logits never exist at once.

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
    /// Replaces logits by d loss / d logits = (softmax - one_hot(target)) * scale.
    fn softmax_grad_row(row: &mut [f32], target: usize, scale: f32) {
        let lse = log_sum_exp(row);
        for x in row.iter_mut() {
            *x = itera_core::math::exp(*x - lse) * scale;
        }
        row[target] -= scale;
    }
}

/// Rows of the LM head processed at once: [rows, vocab] logits stay a few MB instead of the
/// whole batch's [B*T, vocab].
const HEAD_CHUNK: usize = 256;

/// Mean cross-entropy of the tied LM head, fused: loss = CE(h · W^T, targets) without ever
/// materialising the full logits; the backward recomputes each chunk's logits.
/// Inputs: h [N, d], W [V, d], targets u32 [N].
struct LmHeadLoss;

fn head_dims(h: &Shape, w: &Shape, t: &Shape) -> candle_core::Result<(usize, usize, usize)> {
    let (n, d) = h.dims2()?;
    let (v, d2) = w.dims2()?;
    if d2 != d || t.dims1()? != n {
        candle_core::bail!("lm_head_loss: shapes disagree: h {h:?}, W {w:?}, targets {t:?}");
    }
    Ok((n, d, v))
}

/// Fills `logits` [rows, V] for rows r0.. of h.
fn head_chunk(
    h: &[f32],
    w: &[f32],
    d: usize,
    v: usize,
    r0: usize,
    rows: usize,
    logits: &mut [f32],
) {
    use super::gemm::{matmul, View};
    let hc = &h[r0 * d..(r0 + rows) * d];
    matmul(
        &mut logits[..rows * v],
        View::rows(hc, rows, d),
        View::rows(w, v, d).t(),
        false,
    );
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
        let mut logits = vec![0.0f32; HEAD_CHUNK.min(n) * v];
        let mut total = 0.0f64;
        for r0 in (0..n).step_by(HEAD_CHUNK) {
            let rows = HEAD_CHUNK.min(n - r0);
            head_chunk(h, w, d, v, r0, rows, &mut logits);
            total += logits[..rows * v]
                .par_chunks(v)
                .zip(targets[r0..r0 + rows].par_iter())
                .map(|(row, &t)| row_nll(row, t as usize))
                .sum::<f64>();
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
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use super::gemm::{matmul, View};
        let (n, d, v) = head_dims(h.shape(), w.shape(), targets.shape())?;
        let scale = grad.to_scalar::<f32>()? / n as f32;
        let hv = h.flatten_all()?.to_vec1::<f32>()?;
        let wv = w.flatten_all()?.to_vec1::<f32>()?;
        let tv = targets.to_vec1::<u32>()?;
        let mut gh = vec![0.0f32; n * d];
        let mut gw = vec![0.0f32; v * d];
        let mut probs = vec![0.0f32; HEAD_CHUNK.min(n) * v];
        for r0 in (0..n).step_by(HEAD_CHUNK) {
            let rows = HEAD_CHUNK.min(n - r0);
            head_chunk(&hv, &wv, d, v, r0, rows, &mut probs);
            // d loss / d logits = (softmax - one_hot) * scale, in place.
            probs[..rows * v]
                .par_chunks_mut(v)
                .zip(tv[r0..r0 + rows].par_iter())
                .for_each(|(row, &t)| softmax_grad_row(row, t as usize, scale));
            let p = View::rows(&probs[..rows * v], rows, v);
            matmul(
                &mut gh[r0 * d..(r0 + rows) * d],
                p,
                View::rows(&wv, v, d),
                false,
            );
            matmul(
                &mut gw,
                p.t(),
                View::rows(&hv[r0 * d..(r0 + rows) * d], rows, d),
                true,
            );
        }
        Ok((
            Some(Tensor::from_vec(gh, h.shape(), h.device())?),
            Some(Tensor::from_vec(gw, w.shape(), w.device())?),
            None,
        ))
    }
}

/// Mean cross-entropy of `targets` [N] under logits h [N, d] · W^T, W [V, d] (the tied head).
pub fn lm_head_loss(h: &Tensor, w: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    h.contiguous()?
        .apply_op3(&w.contiguous()?, &targets.contiguous()?, LmHeadLoss)
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
}
