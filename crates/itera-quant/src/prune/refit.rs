//! The kept experts' least-squares refit to the unpruned layers' outputs, with no gradient step:
//! each kept expert's `down` matrix, and with `RefitUnits::WithRemoved` which hidden units it
//! holds (its own or the removed experts', chosen by Optimal Brain Surgeon's rule).

use std::sync::{Arc, Mutex};

use itera_core::error::{Error, Result};
use itera_core::exec::Par;
use itera_core::kernels::{Matrix, QuantizedRows};
use itera_core::math::silu;
use itera_core::runtime::{route, Runtime};
use itera_core::tensors::{ModelSpec, Spec, SwigluSpec};
use itera_core::{ModelConfig, Weights};

use super::{check_kept, prune, read_through};
use crate::linalg::{add_products, cholesky_solve};

/// How far `refit` pulls each refitted `down` matrix toward its old values: the ridge of the
/// least-squares system, relative to the mean diagonal of its Gram matrix. Measured on PTB E10,
/// drop 1 `search`, 16,384 calibration tokens: 1e-2, 1e-3 and 1e-4 give the same test perplexity
/// within 0.04 (docs/compression.md, "Refitting the kept experts"); it keeps the solve well posed
/// for experts few tokens reach.
pub const REFIT_RIDGE: f64 = 1e-3;

/// Rows of calibration tokens `refit` computes the experts on at a time.
const REFIT_ROWS: usize = 1024;

/// Which hidden units each kept expert may hold after `refit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefitUnits {
    /// Its own: only its `down` matrix changes.
    Own,
    /// Its own and the removed experts' of the same layer, `expert_hidden` of them chosen by the
    /// fit: a removed expert's unit (its gate and up rows and `down` column) moves into a kept
    /// expert where it best serves the tokens that expert now gets, in place of a unit of the
    /// kept expert's own that contributes least.
    WithRemoved,
}

/// How `refit` fits: its ridge (see `REFIT_RIDGE`) and the units the kept experts may hold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Refit {
    pub ridge: f64,
    pub units: RefitUnits,
}

/// The kept experts refitted to stand in for the removed ones, with no gradient step: layer by
/// layer, on the calibration tokens as the model pruned so far sees them, each kept expert's
/// `down` matrix is set to minimise, over the tokens, |y - y'|^2 + ridge x |down - old down|^2,
/// where y is the unpruned layer's output and y' the pruned layer's (its own top-k of the kept
/// experts and renormalised gates; `moe_skip_beta` is not applied). That is linear least squares
/// in the kept `down` matrices (the router stays as it is). With `RefitUnits::WithRemoved` each
/// kept expert first chooses its hidden units among its own and the removed experts' (the
/// least-squares problem over all of them, then the units whose removal raises the residual
/// least taken out one at a time, as Optimal Brain Surgeon does for weights).
/// A layer that keeps all its experts is left as it is. Returns `weights` in the old expert
/// numbering with the kept experts' tensors replaced: `prune` with the same `kept` then removes
/// the others. `progress(done, total)` counts MoE layers.
pub fn refit(
    cfg: &ModelConfig,
    weights: &Weights,
    kept: &[Vec<usize>],
    calib: &[u32],
    how: Refit,
    mut progress: impl FnMut(usize, usize),
) -> Result<Weights> {
    let Refit { ridge, units } = how;
    let layers = check_kept(cfg, kept)?;
    if !(ridge > 0.0 && ridge.is_finite()) {
        return Err(Error::Argument(format!(
            "the refit ridge must be a positive number, got {ridge}"
        )));
    }
    let spec = ModelSpec::new(cfg);
    // The pruned model's top-k (`prune` lowers it to the fewest experts kept), used for every
    // model read on the way so that each layer sees the inputs the final model gives it.
    let mut pruned_cfg = cfg.clone();
    pruned_cfg.top_k = cfg.top_k.min(kept.iter().map(Vec::len).min().unwrap_or(0));
    let mut out = weights.clone();
    for (i, &l) in layers.iter().enumerate() {
        if kept[i].len() == cfg.experts_in_layer(l) {
            progress(i + 1, layers.len());
            continue;
        }
        // Layers before this one pruned and refitted, this one and later ones whole.
        let plan: Vec<Vec<usize>> = layers
            .iter()
            .enumerate()
            .map(|(j, &lj)| {
                if j < i {
                    kept[j].clone()
                } else {
                    (0..cfg.experts_in_layer(lj)).collect()
                }
            })
            .collect();
        let (c, w) = prune(&pruned_cfg, &out, &plan)?;
        let moe = spec.layers[l].moe.as_ref().expect("an MoE layer");
        let inputs = moe_inputs(&Runtime::new(&c, &w)?, &moe.router.name, calib)?;
        let fit = LayerFit::new(cfg, weights, moe, &kept[i], pruned_cfg.top_k, units)?;
        for (&e, (chosen, down)) in kept[i].iter().zip(fit.fit(&inputs)?.solve(ridge)?) {
            let (d, hid) = (cfg.d_model, cfg.expert_hidden);
            let rows = |pick: fn(&SwigluSpec) -> &Spec| -> Result<Vec<f32>> {
                let mut v = Vec::with_capacity(hid * d);
                for &(src, u) in &chosen {
                    v.extend_from_slice(
                        &weights.values(&pick(&moe.experts[src]).name)?[u * d..][..d],
                    );
                }
                Ok(v)
            };
            for (spec, data) in [
                (&moe.experts[e].gate, rows(|s| &s.gate)?),
                (&moe.experts[e].up, rows(|s| &s.up)?),
                (&moe.experts[e].down, down),
            ] {
                out.tensors
                    .get_mut(&spec.name)
                    .expect("checked by prune")
                    .data = data;
            }
        }
        progress(i + 1, layers.len());
    }
    Ok(out)
}

/// The normalised input rows of the MoE layer whose router is `router` ([d_model] per token: what
/// its router and experts read), as `runtime` reads `calib` as one stream from a fresh state.
fn moe_inputs(runtime: &Runtime, router: &str, calib: &[u32]) -> Result<Vec<f32>> {
    let key = |m: &Matrix| std::ptr::from_ref(m) as usize;
    let (_, m) = runtime
        .matrices()
        .into_iter()
        .find(|(s, _)| s.name == router)
        .ok_or_else(|| Error::Argument(format!("no matrix named {router}")))?;
    let (wanted, rows) = (key(m), Arc::new(Mutex::new(Vec::new())));
    let mut scratch = runtime.new_scratch();
    let sink = Arc::clone(&rows);
    scratch.inputs = Some(Box::new(move |m: &Matrix, x: &[f32]| {
        if key(m) == wanted {
            sink.lock().expect("not poisoned").extend_from_slice(x);
        }
    }));
    read_through(runtime, calib, &mut scratch)?;
    drop(scratch);
    let rows = std::mem::take(&mut *rows.lock().expect("not poisoned"));
    Ok(rows)
}

/// A hidden unit of an MoE layer: (expert of the whole layer, unit within it).
type Unit = (usize, usize);

/// One MoE layer's least-squares problem: the whole layer's experts and router, which of them
/// are kept, the hidden units each kept expert may hold, and the sums the normal equations need.
struct LayerFit<'a> {
    cfg: &'a ModelConfig,
    /// [experts, d_model]
    router: Matrix,
    /// Per expert of the whole layer: gate, up, down.
    experts: Vec<[Matrix; 3]>,
    old_down: Vec<&'a [f32]>,
    kept: &'a [usize],
    /// Experts per token after pruning (the unpruned layer routes to `cfg.top_k`).
    kept_top_k: usize,
    /// Per kept expert: its candidate units as (expert of the whole layer, unit), and where they
    /// start among the features.
    candidates: Vec<Vec<Unit>>,
    offsets: Vec<usize>,
    /// Sum over tokens of f f^T, f = every kept expert's candidate units' gated activations side
    /// by side (zero for an expert the token is not routed to).
    gram: Vec<f64>,
    /// Sum over tokens of y f^T ([d_model, features]).
    cross: Vec<f64>,
}

impl<'a> LayerFit<'a> {
    fn new(
        cfg: &'a ModelConfig,
        weights: &'a Weights,
        moe: &itera_core::tensors::MoeSpec,
        kept: &'a [usize],
        kept_top_k: usize,
        units: RefitUnits,
    ) -> Result<Self> {
        let (d, hid) = (cfg.d_model, cfg.expert_hidden);
        let matrix = |spec: &Spec, rows, cols| {
            Matrix::from_f32(rows, cols, weights.values(&spec.name)?.to_vec())
        };
        let experts = moe
            .experts
            .iter()
            .map(|e| {
                Ok([
                    matrix(&e.gate, hid, d)?,
                    matrix(&e.up, hid, d)?,
                    matrix(&e.down, d, hid)?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        let old_down = moe
            .experts
            .iter()
            .map(|e| weights.values(&e.down.name))
            .collect::<Result<Vec<_>>>()?;
        let removed: Vec<usize> = (0..experts.len()).filter(|e| !kept.contains(e)).collect();
        let candidates: Vec<Vec<Unit>> = kept
            .iter()
            .map(|&e| {
                let mut sources = vec![e];
                if units == RefitUnits::WithRemoved {
                    sources.extend(&removed);
                }
                sources
                    .iter()
                    .flat_map(|&s| (0..hid).map(move |u| (s, u)))
                    .collect()
            })
            .collect();
        let offsets = candidates
            .iter()
            .scan(0, |at, c| {
                let start = *at;
                *at += c.len();
                Some(start)
            })
            .collect();
        let dim: usize = candidates.iter().map(Vec::len).sum();
        Ok(Self {
            cfg,
            router: matrix(&moe.router, moe.experts.len(), d)?,
            experts,
            old_down,
            kept,
            kept_top_k,
            candidates,
            offsets,
            gram: vec![0.0; dim * dim],
            cross: vec![0.0; d * dim],
        })
    }

    fn dim(&self) -> usize {
        self.candidates.iter().map(Vec::len).sum()
    }

    /// Adds the tokens whose normalised inputs are `inputs` ([n, d_model]).
    fn fit(mut self, inputs: &[f32]) -> Result<Self> {
        let (d, hid) = (self.cfg.d_model, self.cfg.expert_hidden);
        let e_all = self.experts.len();
        let dim = self.dim();
        let mut q = QuantizedRows::default();
        for x in inputs.chunks(REFIT_ROWS * d) {
            let n = x.len() / d;
            // Every expert on every row: its activations and its output.
            let mut acts = Vec::with_capacity(e_all);
            let mut outs = Vec::with_capacity(e_all);
            for [gate, up, down] in &self.experts {
                let (mut g, mut u) = (vec![0.0; n * hid], vec![0.0; n * hid]);
                gate.matmul(x, &mut g, &mut q, Par::Serial);
                up.matmul(x, &mut u, &mut q, Par::Serial);
                g.iter_mut().zip(&u).for_each(|(g, u)| *g = silu(*g) * u);
                let mut o = vec![0.0; n * d];
                down.matmul(&g, &mut o, &mut q, Par::Serial);
                acts.push(g);
                outs.push(o);
            }
            let mut router = vec![0.0; n * e_all];
            self.router.matmul(x, &mut router, &mut q, Par::Serial);
            // Per token (a row each): the unpruned layer's output y [n, d] and the pruned
            // layer's gated activations f [n, dim] (zero for the experts it is not routed to).
            let (mut ys, mut fs) = (vec![0f64; n * d], vec![0f64; n * dim]);
            for (t, logits) in router.chunks_exact(e_all).enumerate() {
                let y = &mut ys[t * d..(t + 1) * d];
                for (e, g) in gates(logits, self.cfg.top_k) {
                    for (y, o) in y.iter_mut().zip(&outs[e][t * d..(t + 1) * d]) {
                        *y += g * *o as f64;
                    }
                }
                let f = &mut fs[t * dim..(t + 1) * dim];
                let kept_logits: Vec<f32> = self.kept.iter().map(|&e| logits[e]).collect();
                for (a, g) in gates(&kept_logits, self.kept_top_k) {
                    let at = self.offsets[a];
                    for (f, &(s, u)) in f[at..].iter_mut().zip(&self.candidates[a]) {
                        *f = g * acts[s][t * hid + u] as f64;
                    }
                }
            }
            // The chunk's sums f^T f and y^T f as blocked products (as per-token outer products
            // the whole merged drop 1 of EN11 ran 1.16-1.46x slower: compression.md).
            add_products(&fs, &fs, n, &mut self.gram);
            add_products(&ys, &fs, n, &mut self.cross);
        }
        Ok(self)
    }

    /// Per kept expert (in `kept` order): the units it holds, as (expert, unit) of the whole
    /// layer, and its new `down` matrix ([d_model, hidden]).
    fn solve(self, ridge: f64) -> Result<Vec<(Vec<Unit>, Vec<f32>)>> {
        let (d, hid) = (self.cfg.d_model, self.cfg.expert_hidden);
        let dim = self.dim();
        let ridge_of = |m: &[f64], n: usize| {
            let trace: f64 = (0..n).map(|i| m[i * n + i]).sum();
            if trace > 0.0 {
                ridge * trace / n as f64
            } else {
                1.0
            }
        };
        // Which features stay: all when each expert has exactly `hid` candidates.
        let keep = if self.candidates.iter().all(|c| c.len() == hid) {
            (0..dim).collect()
        } else {
            let owner: Vec<usize> = (0..self.candidates.len())
                .flat_map(|a| std::iter::repeat_n(a, self.candidates[a].len()))
                .collect();
            let mut m = self.gram.clone();
            let mu = ridge_of(&m, dim);
            (0..dim).for_each(|i| m[i * dim + i] += mu);
            select_features(m, &self.cross, d, &owner, hid)?
        };
        let n = keep.len();
        let mut m: Vec<f64> = keep
            .iter()
            .flat_map(|&i| keep.iter().map(move |&j| (i, j)))
            .map(|(i, j)| self.gram[i * dim + j])
            .collect();
        let mu = ridge_of(&m, n);
        (0..n).for_each(|i| m[i * n + i] += mu);
        // The kept features in order, as (kept expert, (expert, unit)).
        let features: Vec<(usize, Unit)> = keep
            .iter()
            .map(|&i| {
                let a = self.offsets.partition_point(|&o| o <= i) - 1;
                (a, self.candidates[a][i - self.offsets[a]])
            })
            .collect();
        // Right-hand sides, one per output row r: cross[r] + mu x the unit's old down column.
        let mut rhs = vec![0f64; d * n];
        for r in 0..d {
            for (k, (&i, &(_, (s, u)))) in keep.iter().zip(&features).enumerate() {
                rhs[r * n + k] =
                    self.cross[r * dim + i] + mu * self.old_down[s][r * hid + u] as f64;
            }
        }
        cholesky_solve(&mut m, n, &mut rhs)?;
        Ok((0..self.kept.len())
            .map(|a| {
                let cols: Vec<usize> = (0..n).filter(|&k| features[k].0 == a).collect();
                let units = cols.iter().map(|&k| features[k].1).collect();
                let down = (0..d)
                    .flat_map(|r| cols.iter().map(move |&k| (r, k)))
                    .map(|(r, k)| rhs[r * n + k] as f32)
                    .collect();
                (units, down)
            })
            .collect())
    }
}

/// The features of the least-squares problem with Gram matrix `m` ([n, n], ridge added) and
/// cross sums `cross` ([outputs, n]) that remain when, one at a time, the feature whose removal
/// raises the residual least is taken out (Optimal Brain Surgeon: that rise is
/// |w_j|^2 / (m^-1)_jj, and the inverse and the solution are updated in place), until each
/// owner (`owner[j]`) has `per_owner` left. Indices in increasing order.
fn select_features(
    mut m: Vec<f64>,
    cross: &[f64],
    outputs: usize,
    owner: &[usize],
    per_owner: usize,
) -> Result<Vec<usize>> {
    let n = owner.len();
    // The inverse, column by column, from the Cholesky factor.
    let mut inv = vec![0f64; n * n];
    (0..n).for_each(|i| inv[i * n + i] = 1.0);
    cholesky_solve(&mut m, n, &mut inv)?;
    // The solution w = cross m^-1 ([outputs, n]); m^-1 is symmetric.
    let mut w = vec![0f64; outputs * n];
    for r in 0..outputs {
        for (i, row) in inv.chunks_exact(n).enumerate() {
            w[r * n + i] = row
                .iter()
                .zip(&cross[r * n..(r + 1) * n])
                .map(|(a, b)| a * b)
                .sum();
        }
    }
    let owners = owner.iter().max().map_or(0, |&o| o + 1);
    let mut left = vec![0usize; owners];
    owner.iter().for_each(|&o| left[o] += 1);
    let mut active = vec![true; n];
    while left.iter().any(|&c| c > per_owner) {
        let cost =
            |j: usize| (0..outputs).map(|r| w[r * n + j].powi(2)).sum::<f64>() / inv[j * n + j];
        let j = (0..n)
            .filter(|&j| active[j] && left[owner[j]] > per_owner)
            .min_by(|&a, &b| cost(a).total_cmp(&cost(b)))
            .expect("an owner has more than it keeps");
        let pivot = inv[j * n + j];
        let col: Vec<f64> = (0..n).map(|i| inv[i * n + j]).collect();
        for i in (0..n).filter(|&i| active[i]) {
            let ci = col[i] / pivot;
            for k in (0..n).filter(|&k| active[k]) {
                inv[i * n + k] -= ci * col[k];
            }
        }
        for r in 0..outputs {
            let wj = w[r * n + j] / pivot;
            for k in (0..n).filter(|&k| active[k]) {
                w[r * n + k] -= wj * col[k];
            }
        }
        active[j] = false;
        left[owner[j]] -= 1;
    }
    Ok((0..n).filter(|&j| active[j]).collect())
}

/// The top-k of `logits` with their renormalised routing weights, routed as the runtime does.
fn gates(logits: &[f32], top: usize) -> Vec<(usize, f64)> {
    let (mut p, mut chosen) = (logits.to_vec(), Vec::new());
    route(&mut p, top.min(logits.len()), &mut chosen);
    let norm: f64 = chosen.iter().map(|&e| p[e] as f64).sum();
    chosen
        .into_iter()
        .map(|e| (e, p[e] as f64 / norm))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::tests::{how, tiny, tokens};
    use super::super::{calibration_loss, moe_layers};
    use super::*;
    use itera_core::rng::Rng;

    /// `refit` of `w` on `toks` with no progress report.
    fn fit(
        (cfg, w): (&ModelConfig, &Weights),
        kept: &[Vec<usize>],
        toks: &[u32],
        ridge: f64,
        units: RefitUnits,
    ) -> Result<Weights> {
        refit(cfg, w, kept, toks, how(ridge, units), |_, _| {})
    }

    /// Keeping every expert, the least-squares optimum is the old `down` (the pruned layer is the
    /// whole layer, which `refit` leaves as it is); after dropping one expert per layer, the refitted model's calibration loss
    /// is below the plainly pruned model's, and a ridge pulls the refit toward the old values.
    #[test]
    fn refit_keeps_a_whole_layer_and_recovers_part_of_a_removed_expert() {
        let (cfg, w) = tiny();
        let layers = moe_layers(&cfg).unwrap();
        let toks = tokens(600);
        let all: Vec<Vec<usize>> = layers.iter().map(|_| vec![0, 1, 2, 3]).collect();
        // `refit` leaves whole layers alone; the fit itself finds their old `down` again.
        for units in [RefitUnits::Own, RefitUnits::WithRemoved] {
            let same = fit((&cfg, &w), &all, &toks, 1e-6, units).unwrap();
            assert!(same
                .tensors
                .iter()
                .all(|(n, t)| t.data == w.tensors[n].data));
        }
        let l = layers[0];
        let moe = ModelSpec::new(&cfg).layers[l].moe.clone().unwrap();
        let inputs = moe_inputs(&Runtime::new(&cfg, &w).unwrap(), &moe.router.name, &toks).unwrap();
        let whole = LayerFit::new(&cfg, &w, &moe, &all[0], cfg.top_k, RefitUnits::Own).unwrap();
        let solved = whole.fit(&inputs).unwrap().solve(1e-6).unwrap();
        for (e, (units, down)) in solved.iter().enumerate() {
            assert!(units.iter().enumerate().all(|(u, &unit)| unit == (e, u)));
            let old = w.values(&moe.experts[e].down.name).unwrap();
            let diff = down
                .iter()
                .zip(old)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let scale = old.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(diff <= 1e-3 * scale, "expert {e}: {diff} (scale {scale})");
        }
        let kept: Vec<Vec<usize>> = layers.iter().map(|_| vec![0, 1, 3]).collect();
        let loss = |w: &Weights| {
            let (c, p) = prune(&cfg, w, &kept).unwrap();
            calibration_loss(&Runtime::new(&c, &p).unwrap(), &toks).unwrap()
        };
        let full = calibration_loss(&Runtime::new(&cfg, &w).unwrap(), &toks).unwrap();
        let plain = loss(&w);
        let refitted = fit((&cfg, &w), &kept, &toks, REFIT_RIDGE, RefitUnits::Own).unwrap();
        let better = loss(&refitted);
        assert!(
            (full - better).abs() < 0.5 * (full - plain).abs(),
            "unpruned {full}, pruned {plain}, refitted {better}"
        );
        // Only the kept experts' down matrices change; a huge ridge leaves them nearly alone.
        let down = |e: usize| format!("layers.{}.moe.experts.{e}.down.weight", layers[0]);
        assert_ne!(
            refitted.values(&down(0)).unwrap(),
            w.values(&down(0)).unwrap()
        );
        assert_eq!(
            refitted.values(&down(2)).unwrap(),
            w.values(&down(2)).unwrap()
        );
        let up = format!("layers.{}.moe.experts.0.up.weight", layers[0]);
        assert_eq!(refitted.values(&up).unwrap(), w.values(&up).unwrap());
        let stiff = fit((&cfg, &w), &kept, &toks, 1e6, RefitUnits::Own).unwrap();
        let moved = |r: &Weights| {
            r.values(&down(0))
                .unwrap()
                .iter()
                .zip(w.values(&down(0)).unwrap())
                .map(|(a, b)| (a - b).abs())
                .sum::<f32>()
        };
        assert!(moved(&stiff) < 1e-3 * moved(&refitted));
        assert!(fit((&cfg, &w), &kept, &toks, 0.0, RefitUnits::Own).is_err());
        let e = fit(
            (&cfg, &w),
            &[vec![0, 9], vec![1]],
            &toks,
            1e-3,
            RefitUnits::Own,
        );
        assert!(e.unwrap_err().to_string().contains("below 4"));
        // Uneven counts: top_k shrinks to 1 and the refit fits that routing.
        let uneven = vec![vec![1], vec![0, 1, 3]];
        let loss = |w: &Weights| {
            let (c, p) = prune(&cfg, w, &uneven).unwrap();
            assert_eq!(c.top_k, 1);
            calibration_loss(&Runtime::new(&c, &p).unwrap(), &toks).unwrap()
        };
        let plain = loss(&w);
        let better = loss(&fit((&cfg, &w), &uneven, &toks, REFIT_RIDGE, RefitUnits::Own).unwrap());
        assert!(
            (full - better).abs() < (full - plain).abs(),
            "unpruned {full}, pruned {plain}, refitted {better}"
        );
    }

    /// Optimal Brain Surgeon's selection keeps what the targets are made of: two outputs built
    /// from features 1 and 4 of six random ones (plus a little noise), two kept, whether the six
    /// have one owner or two of three each.
    #[test]
    fn selection_keeps_the_features_the_targets_need() {
        let mut rng = Rng::new(5);
        let (tokens, n) = (500, 6);
        let mut gram = vec![0f64; n * n];
        let mut cross = vec![0f64; 2 * n];
        for _ in 0..tokens {
            let f: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
            let y = [
                3.0 * f[1] - 2.0 * f[4] + 0.01 * rng.normal(),
                f[1] + f[4] + 0.01 * rng.normal(),
            ];
            for i in 0..n {
                (0..n).for_each(|j| gram[i * n + j] += f[i] * f[j]);
                (0..2).for_each(|r| cross[r * n + i] += y[r] * f[i]);
            }
        }
        (0..n).for_each(|i| gram[i * n + i] += 1e-6);
        let one = select_features(gram.clone(), &cross, 2, &[0; 6], 2).unwrap();
        assert_eq!(one, vec![1, 4]);
        let two = select_features(gram.clone(), &cross, 2, &[0, 0, 0, 1, 1, 1], 1).unwrap();
        assert_eq!(two, vec![1, 4]);
        // Keeping everything keeps everything; a singular system is an error, not a panic.
        assert_eq!(
            select_features(gram, &cross, 2, &[0; 6], 6).unwrap().len(),
            6
        );
        assert!(select_features(vec![0.0; n * n], &cross, 2, &[0; 6], 2).is_err());
    }

    /// With units of the removed experts on offer, each kept expert still holds exactly
    /// `expert_hidden` units, every one of them a whole unit of the old layer (its gate and up
    /// rows copied together, from its own expert or a removed one, each unit at most once), some
    /// taken from the removed experts, and the calibration loss ends at or below the plain
    /// refit's.
    #[test]
    fn merged_units_are_whole_old_units_and_fit_at_least_as_well() {
        let (cfg, w) = tiny();
        let layers = moe_layers(&cfg).unwrap();
        let toks = tokens(600);
        let kept: Vec<Vec<usize>> = layers.iter().map(|_| vec![0, 2, 3]).collect();
        let loss = |w: &Weights| {
            let (c, p) = prune(&cfg, w, &kept).unwrap();
            calibration_loss(&Runtime::new(&c, &p).unwrap(), &toks).unwrap()
        };
        let own = fit((&cfg, &w), &kept, &toks, REFIT_RIDGE, RefitUnits::Own).unwrap();
        let merged = fit(
            (&cfg, &w),
            &kept,
            &toks,
            REFIT_RIDGE,
            RefitUnits::WithRemoved,
        )
        .unwrap();
        let (l_own, l_merged) = (loss(&own), loss(&merged));
        assert!(
            l_merged <= l_own + 1e-4,
            "own units {l_own}, merged {l_merged}"
        );
        let (d, hid) = (cfg.d_model, cfg.expert_hidden);
        let rows = |w: &Weights, l: usize, e: usize, m: &str| -> Vec<Vec<f32>> {
            let name = format!("layers.{l}.moe.experts.{e}.{m}.weight");
            w.values(&name)
                .unwrap()
                .chunks(d)
                .map(<[f32]>::to_vec)
                .collect()
        };
        let mut from_removed = 0;
        for &l in &layers {
            for &e in &kept[0] {
                let (gate, up) = (rows(&merged, l, e, "gate"), rows(&merged, l, e, "up"));
                assert_eq!(gate.len(), hid);
                let mut seen = Vec::new();
                for (g, u) in gate.iter().zip(&up) {
                    let src = (0..4)
                        .flat_map(|s| (0..hid).map(move |k| (s, k)))
                        .find(|&(s, k)| rows(&w, l, s, "gate")[k] == *g)
                        .expect("a unit of the old layer");
                    assert_eq!(rows(&w, l, src.0, "up")[src.1], *u, "{src:?}");
                    assert!(
                        src.0 == e || src.0 == 1,
                        "layer {l} expert {e} took {src:?}"
                    );
                    assert!(!seen.contains(&src), "{src:?} twice");
                    from_removed += usize::from(src.0 == 1);
                    seen.push(src);
                }
            }
        }
        assert!(from_removed > 0, "no unit of the removed expert was taken");
    }
}
