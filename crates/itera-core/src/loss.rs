//! Fused mean cross-entropy over logits [N, V] and u32 targets [N], with its backward
//! (softmax - one-hot). One pass per row instead of the five of a composite log-softmax.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

struct CrossEntropy;

fn rows(logits: &Tensor) -> candle_core::Result<(usize, usize)> {
    logits.dims2()
}

/// log(sum(exp(row))) computed stably.
pub fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    max + crate::math::sum_exp(row, max).ln()
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let (logits, targets) = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::U32(t))
                if l1.is_contiguous() && l2.is_contiguous() =>
            {
                (
                    &a[l1.start_offset()..l1.start_offset() + n * v],
                    &t[l2.start_offset()..l2.start_offset() + n],
                )
            }
            _ => candle_core::bail!("cross_entropy: expects contiguous f32 logits and u32 targets"),
        };
        if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("cross_entropy: target {bad} out of range for vocab {v}");
        }
        let total: f64 = logits
            .par_chunks(v)
            .zip(targets.par_iter())
            .map(|(row, &t)| (log_sum_exp(row) - row[t as usize]) as f64)
            .sum();
        Ok((
            CpuStorage::F32(vec![(total / n as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, v) = rows(logits)?;
        let scale = grad.to_scalar::<f32>()? / n as f32;
        let l = logits.flatten_all()?.to_vec1::<f32>()?;
        let t = targets.to_vec1::<u32>()?;
        let mut g = vec![0.0f32; n * v];
        g.par_chunks_mut(v)
            .zip(l.par_chunks(v))
            .zip(t.par_iter())
            .for_each(|((gr, row), &tt)| {
                let lse = log_sum_exp(row);
                for (o, &x) in gr.iter_mut().zip(row) {
                    *o = crate::math::exp(x - lse) * scale;
                }
                gr[tt as usize] -= scale;
            });
        Ok((Some(Tensor::from_vec(g, (n, v), logits.device())?), None))
    }
}

/// Mean negative log-likelihood of `targets` under `logits` (natural log).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, CrossEntropy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_composite_and_its_gradient() {
        let dev = Device::Cpu;
        let data: Vec<f32> = (0..3 * 5)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let logits = Var::from_tensor(&Tensor::from_vec(data, (3, 5), &dev).unwrap()).unwrap();
        let targets = Tensor::new(&[1u32, 4, 0], &dev).unwrap();
        let fused = cross_entropy(logits.as_tensor(), &targets).unwrap();
        let reference = candle_nn::loss::cross_entropy(logits.as_tensor(), &targets).unwrap();
        let (a, b) = (
            fused.to_scalar::<f32>().unwrap(),
            reference.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        let g1 = fused
            .backward()
            .unwrap()
            .get(logits.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let g2 = reference
            .backward()
            .unwrap()
            .get(logits.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (x, y) in g1.iter().zip(&g2) {
            assert!((x - y).abs() < 1e-6);
        }
    }
}
