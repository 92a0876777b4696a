//! Expert pruning: which experts of each MoE layer to keep (from routing statistics gathered on
//! calibration text, at random, or by scoring every removable set), the smaller model without
//! the others (their tensors and router rows gone, the survivors renumbered), and the dynamic
//! skipping threshold chosen from the same statistics. The kept experts' least-squares refit
//! lives in `refit`.

use itera_core::error::{Error, Result};
use itera_core::eval::score_tokens;
use itera_core::rng::Rng;
use itera_core::runtime::{RoutingStats, Runtime, Scratch, PREFILL_CHUNK};
use itera_core::tensors::{HostTensor, ModelSpec, SwigluSpec};
use itera_core::{ModelConfig, Weights};

mod refit;
pub use refit::{refit, Refit, RefitUnits, REFIT_RIDGE};

/// How the experts to remove are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Uniformly at random (the baseline every other method must beat), seeded.
    Random(u64),
    /// The least often routed.
    Frequency,
    /// The smallest summed routing weight.
    Gate,
    /// The smallest mean of gate x norm of output over the tokens routed to them (REAP).
    Reap,
    /// Per layer, the set whose removal raises calibration loss least, every set scored (NAEE).
    Search,
}

impl Method {
    pub fn parse(name: &str, seed: u64) -> Result<Self> {
        Ok(match name {
            "random" => Self::Random(seed),
            "frequency" => Self::Frequency,
            "gate" => Self::Gate,
            "reap" => Self::Reap,
            "search" => Self::Search,
            _ => {
                return Err(Error::Argument(format!(
                    "unknown pruning method `{name}` (random, frequency, gate, reap, search)"
                )))
            }
        })
    }
}

/// Sets scored per layer by `Method::Search` at most (4 experts choose 2 is 6).
const MAX_SEARCH_SETS: usize = 1024;

/// The MoE layers of `cfg` (an error for a model without them).
pub(super) fn moe_layers(cfg: &ModelConfig) -> Result<Vec<usize>> {
    let layers: Vec<usize> = (0..cfg.n_layers).filter(|&l| cfg.is_moe_layer(l)).collect();
    if layers.is_empty() {
        return Err(Error::Argument(
            "this model has no MoE layers, so it has no experts to prune".into(),
        ));
    }
    Ok(layers)
}

/// Experts to keep in each MoE layer: `drop` fewer than now everywhere, or `keep_per_layer`.
pub fn keep_counts(
    cfg: &ModelConfig,
    drop: Option<usize>,
    keep_per_layer: Option<&[usize]>,
) -> Result<Vec<usize>> {
    let layers = moe_layers(cfg)?;
    let now: Vec<usize> = layers.iter().map(|&l| cfg.experts_in_layer(l)).collect();
    let keep = match (drop, keep_per_layer) {
        (Some(k), None) => {
            let fewest = *now.iter().min().expect("at least one MoE layer");
            if k >= fewest {
                return Err(Error::Argument(format!(
                    "cannot drop {k} experts from a layer of {fewest}: at least one must remain"
                )));
            }
            now.iter().map(|&n| n - k).collect()
        }
        (None, Some(keep)) => {
            if keep.len() != layers.len() {
                return Err(Error::Argument(format!(
                    "--keep-per-layer has {} counts for {} MoE layers (layers {:?})",
                    keep.len(),
                    layers.len(),
                    layers
                )));
            }
            if let Some((i, (&k, &n))) = keep
                .iter()
                .zip(&now)
                .enumerate()
                .find(|(_, (&k, &n))| k == 0 || k > n)
            {
                return Err(Error::Argument(format!(
                    "MoE layer {} has {n} experts; keeping {k} is impossible (1..={n})",
                    layers[i]
                )));
            }
            keep.to_vec()
        }
        _ => {
            return Err(Error::Argument(
                "give exactly one of --drop K and --keep-per-layer N,N,...".into(),
            ))
        }
    };
    Ok(keep)
}

/// `tokens` read by `runtime` as one stream from a fresh state, through `scratch` (whose
/// collectors, `routing` or `inputs`, the caller has set).
pub(super) fn read_through(runtime: &Runtime, tokens: &[u32], scratch: &mut Scratch) -> Result<()> {
    let mut state = runtime.new_state();
    for chunk in tokens.chunks(PREFILL_CHUNK) {
        runtime.prefill(chunk, &mut state, scratch)?;
    }
    Ok(())
}

/// Routing statistics of `runtime` over `tokens`, read as one stream from a fresh state.
pub fn routing_stats(runtime: &Runtime, tokens: &[u32]) -> Result<RoutingStats> {
    let mut scratch = runtime.new_scratch();
    scratch.routing = Some(RoutingStats::new(&runtime.cfg));
    read_through(runtime, tokens, &mut scratch)?;
    Ok(scratch.routing.take().expect("set above"))
}

/// Mean next-token NLL of `tokens` (the first is context only).
pub fn calibration_loss(runtime: &Runtime, tokens: &[u32]) -> Result<f64> {
    let mut state = runtime.new_state();
    let (scores, _) = score_tokens(runtime, &mut state, None, tokens, 0)?;
    let nll: Vec<f64> = scores.iter().flatten().map(|s| -s.logprob as f64).collect();
    if nll.is_empty() {
        return Err(Error::Argument(
            "calibration text needs at least 2 tokens".into(),
        ));
    }
    Ok(nll.iter().sum::<f64>() / nll.len() as f64)
}

/// The experts each MoE layer keeps (ascending old indices), `keep[i]` of them in the i-th.
/// `stats` come from `routing_stats` on the calibration text; `Search` also scores `calib`,
/// each set after `then` when given (the refit that will follow: which experts are cheapest to
/// lose can depend on what the refit recovers).
#[allow(clippy::too_many_arguments)]
pub fn choose(
    cfg: &ModelConfig,
    weights: &Weights,
    method: Method,
    keep: &[usize],
    stats: &RoutingStats,
    calib: &[u32],
    then: Option<Refit>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<usize>>> {
    let layers = moe_layers(cfg)?;
    let all = |l: usize| (0..cfg.experts_in_layer(l)).collect::<Vec<_>>();
    // Lowest score is removed first.
    let by_score = |l: usize, k: usize, score: &dyn Fn(usize) -> f64| {
        let mut order = all(l);
        order.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
        let mut kept = order[..k].to_vec();
        kept.sort_unstable();
        kept
    };
    let mut out = Vec::with_capacity(layers.len());
    match method {
        Method::Random(seed) => {
            let mut rng = Rng::new(seed);
            for (&l, &k) in layers.iter().zip(keep) {
                let mut order = all(l);
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.below(i + 1));
                }
                let mut kept = order[..k].to_vec();
                kept.sort_unstable();
                out.push(kept);
            }
        }
        Method::Frequency | Method::Gate | Method::Reap => {
            for (&l, &k) in layers.iter().zip(keep) {
                let st = &stats.layers[l];
                let score = |e: usize| match method {
                    Method::Frequency => st.count[e] as f64,
                    Method::Gate => st.gate_sum[e],
                    _ => st.reap_sum[e] / st.count[e].max(1) as f64,
                };
                out.push(by_score(l, k, &score));
            }
        }
        Method::Search => {
            let sets: Vec<Vec<Vec<usize>>> = layers
                .iter()
                .zip(keep)
                .map(|(&l, &k)| subsets(cfg.experts_in_layer(l), k))
                .collect::<Result<_>>()?;
            let total: usize = sets.iter().map(Vec::len).sum();
            let mut done = 0;
            for (i, candidates) in sets.into_iter().enumerate() {
                let mut best: Option<(f64, Vec<usize>)> = None;
                for kept in candidates {
                    // This layer pruned, every other layer intact.
                    let plan: Vec<Vec<usize>> = layers
                        .iter()
                        .enumerate()
                        .map(|(j, &l)| if j == i { kept.clone() } else { all(l) })
                        .collect();
                    let (c, w) = match then {
                        Some(how) => prune(
                            cfg,
                            &refit(cfg, weights, &plan, calib, how, |_, _| {})?,
                            &plan,
                        )?,
                        None => prune(cfg, weights, &plan)?,
                    };
                    let loss = calibration_loss(&Runtime::new(&c, &w)?, calib)?;
                    if best.as_ref().is_none_or(|b| loss < b.0) {
                        best = Some((loss, kept));
                    }
                    done += 1;
                    progress(done, total);
                }
                out.push(best.expect("at least one set").1);
            }
        }
    }
    Ok(out)
}

/// Every k-subset of 0..n in lexicographic order.
fn subsets(n: usize, k: usize) -> Result<Vec<Vec<usize>>> {
    let mut out = Vec::new();
    let mut cur: Vec<usize> = (0..k).collect();
    loop {
        out.push(cur.clone());
        if out.len() > MAX_SEARCH_SETS {
            return Err(Error::Argument(format!(
                "--method search would score more than {MAX_SEARCH_SETS} expert sets per layer \
                 ({n} experts, keeping {k}); use reap, gate or frequency"
            )));
        }
        // The rightmost index that can still move right.
        let Some(i) = (0..k).rev().find(|&i| cur[i] < n - k + i) else {
            return Ok(out);
        };
        cur[i] += 1;
        for j in i + 1..k {
            cur[j] = cur[j - 1] + 1;
        }
    }
}

/// The MoE layers of `cfg`, once `kept` is checked to list, for each of them, distinct existing
/// experts in ascending order.
pub(super) fn check_kept(cfg: &ModelConfig, kept: &[Vec<usize>]) -> Result<Vec<usize>> {
    let layers = moe_layers(cfg)?;
    if kept.len() != layers.len() {
        return Err(Error::Argument(format!(
            "{} expert lists for {} MoE layers",
            kept.len(),
            layers.len()
        )));
    }
    for (&l, k) in layers.iter().zip(kept) {
        let n = cfg.experts_in_layer(l);
        let sorted = k.windows(2).all(|w| w[0] < w[1]);
        if k.is_empty() || !sorted || k.iter().any(|&e| e >= n) {
            return Err(Error::Argument(format!(
                "MoE layer {l}: experts to keep must be distinct, ascending and below {n}, got {k:?}"
            )));
        }
    }
    Ok(layers)
}

/// The model with only the `kept` experts of each MoE layer (old indices, in layer order):
/// their tensors renumbered from 0, the router's rows of the others removed (the softmax over
/// the remaining rows renormalises the kept experts' weights), `top_k` lowered to the fewest
/// experts left if needed (compare the returned config's `top_k` with the old one to report it).
/// When experts go, `dropout.spare` goes to 0: the spare is the expert pruning is meant to take,
/// and left on, a heal or fine-tune would leave out a kept expert (the new last one) instead.
pub fn prune(
    cfg: &ModelConfig,
    weights: &Weights,
    kept: &[Vec<usize>],
) -> Result<(ModelConfig, Weights)> {
    let layers = check_kept(cfg, kept)?;
    let mut new = cfg.clone();
    let counts: Vec<usize> = kept.iter().map(Vec::len).collect();
    let (fewest, most) = (
        *counts.iter().min().expect("non-empty"),
        *counts.iter().max().expect("non-empty"),
    );
    if layers
        .iter()
        .zip(&counts)
        .any(|(&l, &c)| c < cfg.experts_in_layer(l))
    {
        new.dropout.spare = 0.0;
    }
    new.n_experts = most;
    new.expert_counts = if fewest == most { Vec::new() } else { counts };
    new.top_k = cfg.top_k.min(fewest);
    new.validate()?;
    let (old_spec, new_spec) = (ModelSpec::new(cfg), ModelSpec::new(&new));
    // Every tensor keeps its name except the experts (renumbered) and routers (fewer rows).
    let mut renamed: Vec<(&str, &str)> = Vec::new();
    let mut routers = Vec::new();
    for (k, (o, n)) in kept.iter().zip(
        layers
            .iter()
            .map(|&l| (&old_spec.layers[l], &new_spec.layers[l])),
    ) {
        let (om, nm) = (
            o.moe.as_ref().expect("MoE layer"),
            n.moe.as_ref().expect("MoE layer"),
        );
        for (new_e, &old_e) in k.iter().enumerate() {
            let (a, b): (&SwigluSpec, &SwigluSpec) = (&om.experts[old_e], &nm.experts[new_e]);
            renamed.extend([
                (a.gate.name.as_str(), b.gate.name.as_str()),
                (a.up.name.as_str(), b.up.name.as_str()),
                (a.down.name.as_str(), b.down.name.as_str()),
            ]);
        }
        routers.push((om.router.name.as_str(), nm.router.shape.clone(), k));
    }
    let mut tensors = std::collections::BTreeMap::new();
    for spec in new_spec.all() {
        let name = spec.name.as_str();
        if let Some((old, shape, k)) = routers.iter().find(|r| r.0 == name) {
            let w = weights.values(old)?;
            let d = cfg.d_model;
            let rows: Vec<f32> = k
                .iter()
                .flat_map(|&e| w[e * d..(e + 1) * d].iter().copied())
                .collect();
            tensors.insert(name.to_string(), HostTensor::new(shape.clone(), rows));
            continue;
        }
        let old = renamed.iter().find(|r| r.1 == name).map_or(name, |r| r.0);
        let t = weights.get(old)?;
        tensors.insert(name.to_string(), t.clone());
    }
    let w = Weights::from_tensors(&new, tensors, "the pruned model")?;
    Ok((new, w))
}

/// The skipping threshold that makes a fraction `quantile` of tokens skip their second expert
/// on the calibration text: that quantile of the second-to-first routing weight ratios, pooled
/// over layers (0 when no layer routes to two or more experts).
pub fn skip_beta(stats: &RoutingStats, quantile: f64) -> Result<f64> {
    if !(0.0..=1.0).contains(&quantile) {
        return Err(Error::Argument(format!(
            "the skip quantile must be in [0, 1], got {quantile}"
        )));
    }
    let mut ratios: Vec<f32> = stats
        .layers
        .iter()
        .flat_map(|l| l.ratios.iter().copied())
        .collect();
    if ratios.is_empty() {
        return Ok(0.0);
    }
    ratios.sort_by(f32::total_cmp);
    let i = ((ratios.len() - 1) as f64 * quantile).round() as usize;
    Ok(ratios[i] as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    pub(super) use crate::testing::{tiny, tokens};

    pub(super) fn how(ridge: f64, units: RefitUnits) -> Refit {
        Refit { ridge, units }
    }

    #[test]
    fn subsets_are_every_combination() {
        assert_eq!(subsets(4, 2).unwrap().len(), 6);
        assert_eq!(
            subsets(4, 3).unwrap(),
            vec![vec![0, 1, 2], vec![0, 1, 3], vec![0, 2, 3], vec![1, 2, 3]]
        );
        assert_eq!(subsets(3, 3).unwrap(), vec![vec![0, 1, 2]]);
    }

    #[test]
    fn pruning_removes_tensors_and_router_rows_and_keeps_the_rest() {
        let (cfg, w) = tiny();
        let layers = moe_layers(&cfg).unwrap();
        let kept: Vec<Vec<usize>> = layers.iter().map(|_| vec![1, 3]).collect();
        let mut spared = cfg.clone();
        spared.dropout.spare = 0.1;
        let (c, p) = prune(&spared, &w, &kept).unwrap();
        assert_eq!(c.n_experts, 2);
        assert_eq!(c.top_k, 2);
        assert_eq!(
            c.dropout.spare, 0.0,
            "the spare goes with the pruned experts"
        );
        let all: Vec<Vec<usize>> = layers.iter().map(|_| (0..4).collect()).collect();
        let (kept_all, _) = prune(&spared, &w, &all).unwrap();
        assert_eq!(
            kept_all.dropout.spare, 0.1,
            "nothing removed, the spare stays"
        );
        let per_expert = 3 * cfg.expert_hidden * cfg.d_model + cfg.d_model;
        assert_eq!(
            w.parameter_count() - p.parameter_count(),
            2 * layers.len() * per_expert
        );
        let l = layers[0];
        let old = |e: usize| format!("layers.{l}.moe.experts.{e}.up.weight");
        assert_eq!(p.values(&old(0)).unwrap(), w.values(&old(1)).unwrap());
        assert_eq!(p.values(&old(1)).unwrap(), w.values(&old(3)).unwrap());
        let router = format!("layers.{l}.moe.router.weight");
        let d = cfg.d_model;
        assert_eq!(
            &p.values(&router).unwrap()[d..2 * d],
            &w.values(&router).unwrap()[3 * d..4 * d]
        );
        assert_eq!(
            p.values("embed.weight").unwrap(),
            w.values("embed.weight").unwrap()
        );
        // Keeping every expert changes nothing.
        let all: Vec<Vec<usize>> = layers.iter().map(|_| vec![0, 1, 2, 3]).collect();
        let (c2, p2) = prune(&cfg, &w, &all).unwrap();
        assert_eq!((c2, p2), (cfg.clone(), w.clone()));
    }

    #[test]
    fn uneven_layers_and_top_k_shrink_run_and_forward_matches_step() {
        let (cfg, w) = tiny();
        let layers = moe_layers(&cfg).unwrap();
        let mut kept: Vec<Vec<usize>> = layers.iter().map(|_| vec![0, 2, 3]).collect();
        kept[0] = vec![2];
        let (c, p) = prune(&cfg, &w, &kept).unwrap();
        assert_eq!(c.top_k, 1, "top_k shrinks to the fewest experts left");
        assert_eq!(c.experts_in_layer(layers[0]), 1);
        assert_eq!(c.n_experts, 3);
        let rt = Runtime::new(&c, &p).unwrap();
        let toks = tokens(40);
        let (mut s1, mut sc1) = (rt.new_state(), rt.new_scratch());
        rt.prefill_all(&toks, &mut s1, &mut sc1).unwrap();
        let (mut s2, mut sc2) = (rt.new_state(), rt.new_scratch());
        let v = c.vocab_size;
        for (i, &t) in toks.iter().enumerate() {
            rt.step(t, &mut s2, &mut sc2).unwrap();
            let a = &sc1.logits[i * v..(i + 1) * v];
            let diff = a
                .iter()
                .zip(sc2.logits.iter())
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(diff < 1e-4, "token {i}: forward and step differ by {diff}");
        }
    }

    #[test]
    fn statistics_rank_experts_and_methods_keep_the_asked_counts() {
        let (cfg, w) = tiny();
        let rt = Runtime::new(&cfg, &w).unwrap();
        let toks = tokens(300);
        let stats = routing_stats(&rt, &toks).unwrap();
        for &l in &moe_layers(&cfg).unwrap() {
            let st = &stats.layers[l];
            assert_eq!(st.tokens, 300);
            assert_eq!(st.count.iter().sum::<u64>(), 600, "two experts per token");
            let gates: f64 = st.gate_sum.iter().sum();
            assert!(
                (gates - 300.0).abs() < 1e-3,
                "gates sum to one per token: {gates}"
            );
            assert_eq!(st.ratios.len(), 300);
            assert!(st.ratios.iter().all(|&r| (0.0..=1.0).contains(&r)));
        }
        let keep = keep_counts(&cfg, Some(1), None).unwrap();
        for method in ["random", "frequency", "gate", "reap", "search"] {
            let m = Method::parse(method, 7).unwrap();
            let kept = choose(&cfg, &w, m, &keep, &stats, &toks[..100], None, |_, _| {}).unwrap();
            assert!(kept.iter().all(|k| k.len() == 3), "{method}: {kept:?}");
            if m == Method::Frequency {
                for (k, &l) in kept.iter().zip(&moe_layers(&cfg).unwrap()) {
                    let dropped = (0..4).find(|e| !k.contains(e)).unwrap();
                    let min = *stats.layers[l].count.iter().min().unwrap();
                    assert_eq!(stats.layers[l].count[dropped], min);
                }
            }
            if m == Method::Search {
                // Layer 0's choice scores best among all its single-expert removals, as removed
                // or, when the search is told the refit that follows, as refitted.
                let merge = how(REFIT_RIDGE, RefitUnits::WithRemoved);
                for then in [None, Some(merge)] {
                    let kept = choose(&cfg, &w, m, &keep, &stats, &toks[..100], then, |_, _| {});
                    let kept = kept.unwrap();
                    let loss_of = |k0: Vec<usize>| {
                        let plan = [k0, vec![0, 1, 2, 3]];
                        let w = match then {
                            Some(h) => refit(&cfg, &w, &plan, &toks[..100], h, |_, _| {}).unwrap(),
                            None => w.clone(),
                        };
                        let (c, p) = prune(&cfg, &w, &plan).unwrap();
                        calibration_loss(&Runtime::new(&c, &p).unwrap(), &toks[..100]).unwrap()
                    };
                    let chosen = loss_of(kept[0].clone());
                    for k0 in subsets(4, 3).unwrap() {
                        assert!(
                            chosen <= loss_of(k0.clone()),
                            "{k0:?} beats {kept:?} ({then:?})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn skipping_at_beta_one_uses_only_the_first_expert_and_beta_is_a_quantile() {
        let (mut cfg, w) = tiny();
        let toks = tokens(200);
        let rt = Runtime::new(&cfg, &w).unwrap();
        let stats = routing_stats(&rt, &toks).unwrap();
        let beta = skip_beta(&stats, 0.5).unwrap();
        let all: Vec<f32> = stats.layers.iter().flat_map(|l| l.ratios.clone()).collect();
        let below = all.iter().filter(|&&r| (r as f64) < beta).count();
        assert!((below as f64 / all.len() as f64 - 0.5).abs() < 0.05);
        // beta 1 (no second expert is ever as likely as the first in general) equals top-1.
        cfg.moe_skip_beta = 1.0;
        let skipping = Runtime::new(&cfg, &w).unwrap();
        let mut top1 = cfg.clone();
        top1.moe_skip_beta = 0.0;
        top1.top_k = 1;
        let top1 = Runtime::new(&top1, &w).unwrap();
        let (a, b) = (
            calibration_loss(&skipping, &toks).unwrap(),
            calibration_loss(&top1, &toks).unwrap(),
        );
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        let skipped = routing_stats(&skipping, &toks).unwrap();
        let l = moe_layers(&cfg).unwrap()[0];
        assert_eq!(skipped.layers[l].skipped, 200);
        assert_eq!(skipped.layers[l].count.iter().sum::<u64>(), 200);
    }

    #[test]
    fn bad_requests_are_refused_with_reasons() {
        let (cfg, w) = tiny();
        let e = keep_counts(&cfg, Some(4), None).unwrap_err().to_string();
        assert!(e.contains("at least one must remain"), "{e}");
        let e = keep_counts(&cfg, Some(9), None).unwrap_err().to_string();
        assert!(e.contains("cannot drop 9"), "{e}");
        let e = keep_counts(&cfg, None, Some(&[2, 2, 2]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("counts for"), "{e}");
        let e = keep_counts(&cfg, None, Some(&[0, 2]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("impossible"), "{e}");
        assert!(keep_counts(&cfg, None, None).is_err());
        let mut dense = cfg.clone();
        dense.moe_layers.clear();
        dense.ffn_hidden = 32;
        let e = keep_counts(&dense, Some(1), None).unwrap_err().to_string();
        assert!(e.contains("no MoE layers"), "{e}");
        let e = prune(&cfg, &w, &[vec![1, 1], vec![0]])
            .unwrap_err()
            .to_string();
        assert!(e.contains("distinct"), "{e}");
        assert!(Method::parse("magic", 0).is_err());
        assert!(skip_beta(&RoutingStats::default(), 2.0).is_err());
    }
}
