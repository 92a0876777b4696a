//! The distillation loss: the student's tied LM head fused with
//! `alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, next token)` (or the
//! reverse KL, MiniLLM), with its hand-written backward. Like `lm_head_loss` it works in row
//! chunks: the teacher's and the student's [rows, vocab] logits exist one chunk at a time, the
//! teacher's computed by whoever supplies them (`TeacherLogits`: the inference runtime in
//! training, a plain matrix in the tests).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use itera_core::math::{exp, log_sum_exp};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::lm_head_loss::{EagerGrads, HeadGrads};
use super::scan::f32_slice;

/// Which way the KL divergence runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kl {
    /// KL(teacher || student): the student covers all of the teacher's mass (Hinton et al.).
    Forward,
    /// KL(student || teacher): the student seeks the teacher's modes (MiniLLM, Gu et al. 2024).
    Reverse,
}

/// The loss's knobs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillLossSpec {
    /// Softmax temperature of both distributions in the KL term (> 0).
    pub temperature: f64,
    /// Weight of the KL term; 1 - alpha weighs the cross-entropy (in [0, 1]).
    pub alpha: f64,
    pub kl: Kl,
}

/// The teacher's logits for rows r0..r0 + rows of the batch, written into `out` [rows, vocab].
pub trait TeacherLogits: Send + Sync {
    fn logits(&self, r0: usize, rows: usize, out: &mut [f32]);
}

/// Mean cross-entropy and mean KL of the last forward (for the metrics).
pub type Parts = Arc<Mutex<(f64, f64)>>;

/// Rows of logits handled at once (as `lm_head_loss`).
const CHUNK: usize = 256;

struct DistillHeadLoss {
    targets: Arc<Vec<u32>>,
    teacher: Arc<dyn TeacherLogits>,
    spec: DistillLossSpec,
    parts: Parts,
    grads: Option<EagerGrads>,
}

itera_core::multiversion! {
    /// One row's (cross-entropy, KL). With `scale` set, also replaces `zs` by
    /// d loss / d zs * scale; `zt` is used up either way.
    fn distill_row(
        zs: &mut [f32],
        zt: &mut [f32],
        target: usize,
        spec: &DistillLossSpec,
        scale: Option<f32>,
    ) -> (f64, f64) {
        let inv_t = (1.0 / spec.temperature) as f32;
        let lse1 = log_sum_exp(zs);
        let ce = (lse1 - zs[target]) as f64;
        // Log-probabilities at temperature T: the teacher's into zt; the student's computed twice
        // (here and below) rather than stored.
        let max_s = itera_core::math::max(zs) * inv_t;
        let sum_s: f32 = zs.iter().map(|&v| exp(v * inv_t - max_s)).sum();
        let lse_s = max_s + sum_s.ln();
        let max_t = itera_core::math::max(zt) * inv_t;
        let sum_t: f32 = zt.iter().map(|&v| exp(v * inv_t - max_t)).sum();
        let lse_t = max_t + sum_t.ln();
        zt.iter_mut().for_each(|v| *v = *v * inv_t - lse_t);
        let mut kl = 0.0f32;
        for (&s, &lt) in zs.iter().zip(zt.iter()) {
            let ls = s * inv_t - lse_s;
            kl += match spec.kl {
                Kl::Forward => exp(lt) * (lt - ls),
                Kl::Reverse => exp(ls) * (ls - lt),
            };
        }
        if let Some(scale) = scale {
            let (a, t) = (spec.alpha as f32, spec.temperature as f32);
            for (s, &lt) in zs.iter_mut().zip(zt.iter()) {
                let ls = *s * inv_t - lse_s;
                let (ps, p1) = (exp(ls), exp(*s - lse1));
                // d(T^2 KL)/dz = T * (d KL / d(z / T)).
                let dkl = match spec.kl {
                    Kl::Forward => ps - exp(lt),
                    Kl::Reverse => ps * (ls - lt - kl),
                };
                *s = ((1.0 - a) * p1 + a * t * dkl) * scale;
            }
            zs[target] -= (1.0 - a) * scale;
        }
        (ce, kl as f64)
    }
}

fn dims(h: &Shape, w: &Shape) -> candle_core::Result<(usize, usize, usize)> {
    let (n, d) = h.dims2()?;
    let (v, d2) = w.dims2()?;
    if d2 != d {
        candle_core::bail!("distill_loss: shapes disagree: h {h:?}, W {w:?}");
    }
    Ok((n, d, v))
}

impl DistillHeadLoss {
    /// Runs every chunk: student logits (h · W^T) and teacher logits, then `f(chunk start,
    /// rows, student logits replaced by their scaled gradient when `scale` is set)`.
    /// Returns the summed (cross-entropy, KL).
    fn chunks(
        &self,
        h: &[f32],
        w: &[f32],
        (n, d, v): (usize, usize, usize),
        scale: Option<f32>,
        mut f: impl FnMut(usize, usize, &[f32]),
    ) -> (f64, f64) {
        use super::gemm::{matmul, View};
        let (mut zs, mut zt) = (
            vec![0.0f32; CHUNK.min(n) * v],
            vec![0.0f32; CHUNK.min(n) * v],
        );
        let (mut ce, mut kl) = (0.0, 0.0);
        for r0 in (0..n).step_by(CHUNK) {
            let rows = CHUNK.min(n - r0);
            let (zs, zt) = (&mut zs[..rows * v], &mut zt[..rows * v]);
            let hc = View::rows(&h[r0 * d..(r0 + rows) * d], rows, d);
            matmul(zs, hc, View::rows(w, v, d).t(), false);
            self.teacher.logits(r0, rows, zt);
            let (c, k) = zs
                .par_chunks_mut(v)
                .zip(zt.par_chunks_mut(v))
                .zip(self.targets[r0..r0 + rows].par_iter())
                .map(|((s, t), &y)| distill_row(s, t, y as usize, &self.spec, scale))
                .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
            ce += c;
            kl += k;
            f(r0, rows, zs);
        }
        (ce, kl)
    }
}

impl CustomOp2 for DistillHeadLoss {
    fn name(&self) -> &'static str {
        "distill_loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = dims(l1.shape(), l2.shape())?;
        let (h, w) = (f32_slice(s1, l1, "h")?, f32_slice(s2, l2, "W")?);
        let mut grads = self.grads.as_ref().map(|_| HeadGrads::new(shape));
        let scale = grads.as_ref().map(|_| 1.0 / shape.0 as f32);
        let (ce, kl) = self.chunks(h, w, shape, scale, |r0, rows, g| {
            if let Some(grads) = &mut grads {
                grads.add_chunk(g, h, w, r0, rows);
            }
        });
        if let (Some(e), Some(g)) = (&self.grads, grads) {
            e.store(g);
        }
        let n = shape.0 as f64;
        *self.parts.lock().expect("not poisoned") = (ce / n, kl / n);
        let (a, t) = (self.spec.alpha, self.spec.temperature);
        let loss = (a * t * t * kl + (1.0 - a) * ce) / n;
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        EagerGrads::backward(self.grads.as_ref(), "distill_loss", h, w, grad)
    }
}

/// The distillation loss of hidden states h [N, d] under the tied head W [V, d] against
/// `targets` [N] and the teacher's logits for the same N rows. `parts` receives the mean
/// cross-entropy and KL of this forward.
pub fn distill_loss(
    h: &Tensor,
    w: &Tensor,
    targets: Arc<Vec<u32>>,
    teacher: Arc<dyn TeacherLogits>,
    spec: DistillLossSpec,
    parts: Parts,
) -> candle_core::Result<Tensor> {
    let (n, _, v) = dims(h.shape(), w.shape())?;
    if targets.len() != n {
        candle_core::bail!("distill_loss: {} targets for {n} rows", targets.len());
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("distill_loss: target {bad} out of range for vocab {v}");
    }
    let op = DistillHeadLoss {
        targets,
        teacher,
        spec,
        parts,
        grads: EagerGrads::wanted(h, w),
    };
    h.contiguous()?.apply_op2(&w.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A teacher whose logits are a fixed [N, V] table.
    struct Table(Vec<f32>, usize);
    impl TeacherLogits for Table {
        fn logits(&self, r0: usize, rows: usize, out: &mut [f32]) {
            out.copy_from_slice(&self.0[r0 * self.1..(r0 + rows) * self.1]);
        }
    }

    fn values(n: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0) * scale)
            .collect()
    }

    /// The loss and its gradients for h and W.
    fn loss_of(hv: &[f32], wv: &[f32], case: &Case) -> (f64, [Vec<f32>; 2]) {
        let dev = Device::Cpu;
        let h = Var::from_tensor(&Tensor::from_slice(hv, (case.n, case.d), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::from_slice(wv, (case.v, case.d), &dev).unwrap()).unwrap();
        let parts = Parts::default();
        let loss = distill_loss(
            h.as_tensor(),
            w.as_tensor(),
            Arc::new(case.targets.clone()),
            Arc::new(Table(case.teacher.clone(), case.v)),
            case.spec,
            parts.clone(),
        )
        .unwrap();
        let value = loss.to_scalar::<f32>().unwrap() as f64;
        let g = loss.backward().unwrap();
        let grad = |x: &Var| {
            g.get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        (value, [grad(&h), grad(&w)])
    }

    struct Case {
        n: usize,
        d: usize,
        v: usize,
        targets: Vec<u32>,
        teacher: Vec<f32>,
        spec: DistillLossSpec,
    }

    /// Hand-written gradients against central finite differences of the loss, for both KL
    /// directions, at T = 1 and 2 and several alphas, over more rows than one chunk.
    #[test]
    fn backward_matches_finite_differences() {
        let (n, d, v) = (260, 6, 11);
        for (kl, temperature, alpha) in [
            (Kl::Forward, 1.0, 0.5),
            (Kl::Forward, 2.0, 1.0),
            (Kl::Reverse, 1.0, 0.7),
            (Kl::Reverse, 2.0, 0.3),
        ] {
            let case = Case {
                n,
                d,
                v,
                targets: (0..n as u32).map(|i| i * 3 % v as u32).collect(),
                teacher: values(n * v, 3, 3.0),
                spec: DistillLossSpec {
                    temperature,
                    alpha,
                    kl,
                },
            };
            let (hv, wv) = (values(n * d, 1, 1.0), values(v * d, 2, 1.0));
            let (_, [gh, gw]) = loss_of(&hv, &wv, &case);
            let eps = 1e-2f32;
            // A sample of coordinates of each input (the loss is a mean: each moves it little).
            for (which, base, grad) in [(0, &hv, &gh), (1, &wv, &gw)] {
                for i in (0..base.len()).step_by(base.len() / 12 + 1) {
                    let mut plus = base.clone();
                    plus[i] += eps;
                    let mut minus = base.clone();
                    minus[i] -= eps;
                    let f = |x: &Vec<f32>| match which {
                        0 => loss_of(x, &wv, &case).0,
                        _ => loss_of(&hv, x, &case).0,
                    };
                    let numeric = (f(&plus) - f(&minus)) / (2.0 * eps as f64);
                    let analytic = grad[i] as f64;
                    let tol = 2e-3 * numeric.abs().max(analytic.abs()) + 2e-5;
                    assert!(
                        (numeric - analytic).abs() < tol,
                        "{kl:?} T={temperature} alpha={alpha} input {which}[{i}]: \
                         numeric {numeric} vs analytic {analytic}"
                    );
                }
            }
        }
    }

    /// alpha 0 is the plain fused cross-entropy; a student equal to its teacher has zero KL.
    #[test]
    fn limits_are_cross_entropy_and_zero_kl() {
        let (n, d, v) = (40, 5, 9);
        let (hv, wv) = (values(n * d, 4, 1.0), values(v * d, 5, 1.0));
        let targets: Vec<u32> = (0..n as u32).map(|i| i % v as u32).collect();
        let dev = Device::Cpu;
        let h = Tensor::from_slice(&hv, (n, d), &dev).unwrap();
        let w = Tensor::from_slice(&wv, (v, d), &dev).unwrap();
        let t = Tensor::from_slice(&targets, n, &dev).unwrap();
        let ce = super::super::lm_head_loss::lm_head_loss(&h, &w, &t)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let own = h.matmul(&w.t().unwrap()).unwrap().flatten_all().unwrap();
        let own = own.to_vec1::<f32>().unwrap();
        for kl in [Kl::Forward, Kl::Reverse] {
            let mut case = Case {
                n,
                d,
                v,
                targets: targets.clone(),
                teacher: own.clone(),
                spec: DistillLossSpec {
                    temperature: 2.0,
                    alpha: 0.0,
                    kl,
                },
            };
            let (loss, _) = loss_of(&hv, &wv, &case);
            assert!((loss - ce).abs() < 1e-5, "{loss} vs {ce}");
            case.spec.alpha = 1.0;
            let (loss, _) = loss_of(&hv, &wv, &case);
            assert!(loss.abs() < 1e-5, "KL to itself: {loss}");
        }
    }
}
