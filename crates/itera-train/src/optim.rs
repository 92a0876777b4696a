//! AdamW with decoupled weight decay over named `Var`s, global-norm gradient clipping, and a
//! warmup + cosine learning-rate schedule. State is plain vectors so it saves and resumes exactly.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use itera_core::tensors::HostTensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::reference::scan::cpu_f32;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Gradients are scaled so their global L2 norm is at most this (0 = off).
    pub grad_clip: f64,
}

/// Elements per parallel task of the update: large enough that a task outweighs its hand-off.
const UPDATE_CHUNK: usize = 1 << 14;

struct Slot {
    var: Var,
    decay: bool,
    m: Vec<f32>,
    v: Vec<f32>,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    slots: BTreeMap<String, Slot>,
    pub t: u64,
}

impl AdamW {
    pub fn new(
        cfg: AdamWConfig,
        vars: &BTreeMap<String, Var>,
        decays: impl Fn(&str, &[usize]) -> bool,
    ) -> Self {
        let slots = vars
            .iter()
            .map(|(name, var)| {
                let n = var.elem_count();
                (
                    name.clone(),
                    Slot {
                        var: var.clone(),
                        decay: decays(name, var.dims()),
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    },
                )
            })
            .collect();
        Self { cfg, slots, t: 0 }
    }

    /// One update at learning rate `lr` with the weighted sum of the gradients `grads` (one
    /// store per shard of the batch, weighted by its share); returns the gradient norm before
    /// clipping.
    pub fn step(&mut self, grads: &[(f32, &GradStore)], lr: f64) -> Result<f64> {
        // Slot by slot on both cores (this ran on one while the other waited: 3% of a `tiny`
        // step on the AVX-512 Xeon, 2026-12-02).
        let slots: Vec<_> = self.slots.iter().collect();
        let gathered: Vec<Result<(Vec<f32>, f64)>> = slots
            .par_iter()
            .map(|(name, slot)| self.gather(name, slot, grads))
            .collect();
        let mut g_all = Vec::with_capacity(self.slots.len());
        let mut sq = 0.0f64;
        for g in gathered {
            let (g, slot_sq) = g?;
            sq += slot_sq;
            g_all.push(g);
        }
        let norm = sq.sqrt();
        let scale = if self.cfg.grad_clip > 0.0 && norm > self.cfg.grad_clip {
            self.cfg.grad_clip / norm
        } else {
            1.0
        };
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for ((name, slot), mut g) in self.slots.iter_mut().zip(g_all) {
            let decay = if slot.decay {
                1.0 - lr * self.cfg.weight_decay
            } else {
                1.0
            };
            let k = StepConsts {
                scale,
                b1,
                b2,
                inv_bc1: 1.0 / bc1,
                inv_bc2: 1.0 / bc2,
                eps: self.cfg.eps,
                lr,
                decay,
            };
            {
                // The current values read in place (the guard must go before `set` below).
                let (storage, layout) = slot.var.storage_and_layout();
                let old = cpu_f32(&storage, layout, name)?;
                // Element-wise, so split across the cores in chunks (it ran on one core: 2% of a step).
                g.par_chunks_mut(UPDATE_CHUNK)
                    .zip(old.par_chunks(UPDATE_CHUNK))
                    .zip(slot.m.par_chunks_mut(UPDATE_CHUNK))
                    .zip(slot.v.par_chunks_mut(UPDATE_CHUNK))
                    .for_each(|(((g, old), ms), vs)| update(g, old, ms, vs, &k));
            }
            // `g` now holds the new values.
            slot.var
                .set(&Tensor::from_vec(g, slot.var.shape(), &Device::Cpu)?)?;
        }
        Ok(norm)
    }

    /// One slot's weighted gradient over the shards' stores, and its sum of squares; an error
    /// names the first non-finite gradient.
    fn gather(
        &self,
        name: &str,
        slot: &Slot,
        grads: &[(f32, &GradStore)],
    ) -> Result<(Vec<f32>, f64)> {
        let mut sum: Option<Vec<f32>> = None;
        for (share, store) in grads {
            if let Some(t) = store.get(slot.var.as_tensor()) {
                let t = t.contiguous()?;
                let (storage, layout) = t.storage_and_layout();
                let t = cpu_f32(&storage, layout, name)?;
                match &mut sum {
                    Some(g) => add_scaled(g, *share, t),
                    None => sum = Some(scaled(*share, t)),
                }
            }
        }
        let g = sum.unwrap_or_else(|| vec![0.0; slot.m.len()]);
        let Some(sq) = finite_sum_squares(&g) else {
            return Err(Error::Train(format!(
                "non-finite gradient in `{name}` at step {}",
                self.t + 1
            )));
        };
        Ok((g, sq))
    }

    /// Moments as tensors named `m.<var>` / `v.<var>`, for the checkpoint.
    pub fn state_tensors(&self) -> BTreeMap<String, HostTensor> {
        let mut out = BTreeMap::new();
        for (name, s) in &self.slots {
            let shape = s.var.dims().to_vec();
            out.insert(
                format!("m.{name}"),
                HostTensor::new(shape.clone(), s.m.clone()),
            );
            out.insert(format!("v.{name}"), HostTensor::new(shape, s.v.clone()));
        }
        out
    }

    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, HostTensor>,
        t: u64,
        origin: &str,
    ) -> Result<()> {
        for (name, s) in self.slots.iter_mut() {
            for (prefix, dst) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("{prefix}.{name}");
                let t = tensors.get(&key).ok_or_else(|| {
                    Error::file(origin, format!("missing optimizer tensor `{key}`"))
                })?;
                if t.data.len() != dst.len() {
                    return Err(Error::file(
                        origin,
                        format!(
                            "optimizer tensor `{key}` has {} values, expected {}",
                            t.data.len(),
                            dst.len()
                        ),
                    ));
                }
                itera_core::tensors::check_finite(&key, &t.data, origin)?;
                dst.clone_from(&t.data);
            }
        }
        self.t = t;
        Ok(())
    }
}

itera_core::multiversion! {
    /// share * v, element-wise (with one store of share 1, exactly its gradient).
    fn scaled(share: f32, v: &[f32]) -> Vec<f32> {
        v.iter().map(|&v| share * v).collect()
    }
}

itera_core::multiversion! {
    /// acc += share * v, element-wise.
    fn add_scaled(acc: &mut [f32], share: f32, v: &[f32]) {
        acc.iter_mut().zip(v).for_each(|(a, &v)| *a += share * v);
    }
}

itera_core::multiversion! {
    /// The sum of squares in f64, None if any value is not finite. Eight partial sums, so it
    /// runs in vector lanes instead of one chain of dependent adds (the gradient norm then
    /// differs from a sequential sum in its last bits).
    fn finite_sum_squares(g: &[f32]) -> Option<f64> {
        const L: usize = 8;
        let (mut acc, mut finite) = ([0.0f64; L], true);
        let chunks = g.chunks_exact(L);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..L {
                finite &= c[i].is_finite();
                acc[i] += c[i] as f64 * c[i] as f64;
            }
        }
        for &x in tail {
            finite &= x.is_finite();
            acc[0] += x as f64 * x as f64;
        }
        finite.then(|| acc.iter().sum())
    }
}

/// The constants of one AdamW update.
struct StepConsts {
    /// The clipping factor applied to every gradient.
    scale: f64,
    b1: f64,
    b2: f64,
    /// 1 / the bias corrections 1 - beta^t.
    inv_bc1: f64,
    inv_bc2: f64,
    eps: f64,
    lr: f64,
    /// 1 - lr * weight decay, or 1 where the tensor is not decayed.
    decay: f64,
}

itera_core::multiversion! {
    /// One chunk of the update, in f64 with f32 storage: reads the gradient from `g_then_p` and
    /// writes the new values over it (no separate zero-filled output). Compiled for the CPU's
    /// vectors (as plain code it ran two doubles per SSE2 instruction); the same operations in
    /// the same order on every path, so the same bits.
    fn update(g_then_p: &mut [f32], old: &[f32], ms: &mut [f32], vs: &mut [f32], k: &StepConsts) {
        let lanes = g_then_p.iter_mut().zip(old).zip(ms.iter_mut()).zip(vs.iter_mut());
        for (((p, &old), ms), vs) in lanes {
            let gi = *p as f64 * k.scale;
            let m = k.b1 * *ms as f64 + (1.0 - k.b1) * gi;
            let v = k.b2 * *vs as f64 + (1.0 - k.b2) * gi * gi;
            *ms = m as f32;
            *vs = v as f32;
            // The corrections' inverses multiply: three divisions a value kept this loop on the
            // divider (about 9 cycles a value, 2% of a `tiny` step on the AVX-512 Xeon).
            let step = (m * k.inv_bc1) / ((v * k.inv_bc2).sqrt() + k.eps);
            *p = (old as f64 * k.decay - k.lr * step) as f32;
        }
    }
}

/// Linear warmup to `peak`, then cosine decay to `peak * min_ratio` at `total` steps.
pub fn learning_rate(step: usize, total: usize, warmup: usize, peak: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cosine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_shape() {
        assert!((learning_rate(0, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((learning_rate(9, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((learning_rate(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!(learning_rate(50, 100, 10, 1.0, 0.1) < 1.0);
    }

    /// One trainable vector `w` and AdamW over it (decayed when `weight_decay` > 0).
    fn one_var(start: &[f32], weight_decay: f64, grad_clip: f64) -> (Var, AdamW) {
        let var = Var::from_tensor(&Tensor::new(start, &Device::Cpu).unwrap()).unwrap();
        let vars: BTreeMap<String, Var> = [("w".to_string(), var.clone())].into();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay,
            grad_clip,
        };
        (var, AdamW::new(cfg, &vars, move |_, _| weight_decay > 0.0))
    }

    /// The vector sum of squares equals the plain one (to rounding) with a tail past the lanes,
    /// and reports a non-finite value anywhere, in a full chunk or in the tail.
    #[test]
    fn sum_of_squares_is_exact_and_catches_non_finite_values() {
        let g: Vec<f32> = (0..19).map(|i| (i as f32 * 0.7).sin() * 3.0).collect();
        let plain: f64 = g.iter().map(|&x| x as f64 * x as f64).sum();
        let fast = finite_sum_squares(&g).unwrap();
        assert!((fast - plain).abs() < 1e-12 * plain, "{fast} vs {plain}");
        for (at, bad) in [(3, f32::NAN), (18, f32::INFINITY), (9, f32::NEG_INFINITY)] {
            let mut b = g.clone();
            b[at] = bad;
            assert_eq!(finite_sum_squares(&b), None, "{bad} at {at}");
        }
    }

    /// A non-finite gradient stops the step with an error naming the tensor, and the weights
    /// stay as they were.
    #[test]
    fn a_non_finite_gradient_is_refused_before_any_update() {
        let (var, mut opt) = one_var(&[1.0, 2.0], 0.0, 0.0);
        let inf = Tensor::new(&[1.0f32, f32::INFINITY], &Device::Cpu).unwrap();
        let grads = (var.as_tensor() * inf)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let err = opt.step(&[(1.0, &grads)], 0.1).unwrap_err().to_string();
        assert!(err.contains("non-finite gradient in `w`"), "{err}");
        assert_eq!(var.to_vec1::<f32>().unwrap(), [1.0, 2.0]);
        assert_eq!(opt.t, 0);
    }

    #[test]
    fn adamw_minimises_a_quadratic_and_clips() {
        let (var, mut opt) = one_var(&[3.0, -2.0], 0.0, 1.0);
        for _ in 0..300 {
            let loss = var.as_tensor().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&[(1.0, &grads)], 0.05).unwrap();
        }
        let w = var.to_vec1::<f32>().unwrap();
        assert!(w.iter().all(|x| x.abs() < 0.05), "{w:?}");
    }

    /// Shards' gradients enter the update as their weighted sum: two stores with shares 0.25 and
    /// 0.75 move the weights exactly as one store holding that sum.
    #[test]
    fn shard_gradients_enter_as_their_weighted_sum() {
        let start = [1.0f32, -2.0, 0.5];
        let run = |grads: &[(f32, &[f32; 3])]| {
            let (var, mut opt) = one_var(&start, 0.1, 0.0);
            // d(sum(w * g)) / dw = g: a store holding exactly `g` for `w`.
            let stores: Vec<GradStore> = grads
                .iter()
                .map(|(_, g)| {
                    let g = Tensor::new(*g, &Device::Cpu).unwrap();
                    (var.as_tensor() * g)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap()
                })
                .collect();
            let weighted: Vec<_> = grads
                .iter()
                .zip(&stores)
                .map(|((w, _), s)| (*w, s))
                .collect();
            let norm = opt.step(&weighted, 0.01).unwrap();
            (norm, var.to_vec1::<f32>().unwrap())
        };
        let (a, b) = ([0.4f32, 1.0, -2.0], [2.0f32, -1.0, 0.0]);
        let sum: [f32; 3] = std::array::from_fn(|i| 0.25 * a[i] + 0.75 * b[i]);
        let (n1, w1) = run(&[(0.25, &a), (0.75, &b)]);
        let (n2, w2) = run(&[(1.0, &sum)]);
        assert!((n1 - n2).abs() < 1e-6, "{n1} vs {n2}");
        for (x, y) in w1.iter().zip(&w2) {
            assert!((x - y).abs() < 1e-6, "{w1:?} vs {w2:?}");
        }
        assert!(
            w1.iter().zip(&start).all(|(x, s)| x != s),
            "the step moved every weight"
        );
    }
}
