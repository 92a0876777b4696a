//! Sensitivity analysis: quantize one tensor at a time to each candidate type, and measure on
//! held-out text how far the next-token distributions move from f32 (mean KL divergence) and how
//! much the loss changes. A mixed-precision plan is then chosen from those measurements.

use itera_core::format::dtype::DType;
use itera_core::math::log_sum_exp;
use itera_core::runtime::{Runtime, TensorSource};
use itera_core::tensors::ModelSpec;
use itera_core::{Error, ModelConfig, ModelDir, Result};
use serde::{Deserialize, Serialize};

use crate::plan::{Plan, PlannedWeights};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TensorSensitivity {
    pub tensor: String,
    pub dtype: DType,
    pub parameters: usize,
    /// Mean KL(f32 || quantized) of the next-token distribution, nats per token.
    pub kl: f64,
    /// Change of the mean NLL per token, nats (positive = worse).
    pub nll_delta: f64,
    /// Relative change of the token perplexity on the validation text: exp(nll_delta) - 1.
    #[serde(default)]
    pub perplexity_change: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SensitivityReport {
    pub tokens: usize,
    /// Mean NLL per token of the f32 model on the same text.
    pub base_nll: f64,
    pub entries: Vec<TensorSensitivity>,
}

/// Log-probabilities of every position's next token distribution ([tokens, vocab]) and the mean
/// NLL of the actual next tokens. The first token is conditioned on a newline, as in `evaluate`.
fn log_probs(rt: &Runtime, start: &[u32], ids: &[u32]) -> Result<(Vec<f32>, f64)> {
    let v = rt.cfg.vocab_size;
    let (mut st, mut sc) = (rt.new_state(), rt.new_scratch());
    rt.prefill(start, &mut st, &mut sc)?;
    let mut out = Vec::with_capacity(ids.len() * v);
    out.extend_from_slice(&sc.logits[..v]);
    rt.prefill_all(&ids[..ids.len() - 1], &mut st, &mut sc)?;
    out.extend_from_slice(&sc.logits[..(ids.len() - 1) * v]);
    let mut nll = 0.0;
    for (row, &id) in out.chunks_exact_mut(v).zip(ids) {
        let lse = log_sum_exp(row);
        row.iter_mut().for_each(|x| *x -= lse);
        nll -= row[id as usize] as f64;
    }
    Ok((out, nll / ids.len() as f64))
}

fn kl(base: &[f32], other: &[f32], vocab: usize) -> f64 {
    let mut total = 0.0f64;
    for (p, q) in base.chunks_exact(vocab).zip(other.chunks_exact(vocab)) {
        total += p
            .iter()
            .zip(q)
            .map(|(&lp, &lq)| (lp.exp() * (lp - lq)) as f64)
            .sum::<f64>();
    }
    total / (base.len() / vocab) as f64
}

/// Measures every quantizable tensor under every candidate type on up to `max_tokens` tokens of
/// `text`. `progress(done, total)` is called after each measurement.
pub fn measure(
    model: &ModelDir,
    text: &str,
    max_tokens: usize,
    candidates: &[DType],
    mut progress: impl FnMut(usize, usize),
) -> Result<SensitivityReport> {
    let mut ids = model.tokenizer.encode(text)?;
    ids.truncate(max_tokens);
    if ids.len() < 2 {
        return Err(Error::Argument(
            "the validation text must have at least 2 tokens".into(),
        ));
    }
    let start = model.tokenizer.encode("\n")?;
    let vocab = model.config.vocab_size;
    let base_rt = Runtime::new(&model.config, &model.weights)?;
    let (base, base_nll) = log_probs(&base_rt, &start, &ids)?;
    drop(base_rt);
    let tensors: Vec<(String, usize)> = ModelSpec::new(&model.config)
        .all()
        .into_iter()
        .filter(|s| crate::plan::quantizable(s))
        .map(|s| (s.name.clone(), s.len()))
        .collect();
    let total = tensors.len() * candidates.len();
    let mut entries = Vec::with_capacity(total);
    for (name, parameters) in &tensors {
        for &dtype in candidates {
            let mut plan = Plan::default();
            plan.types.insert(name.clone(), dtype);
            let src: &dyn TensorSource = &PlannedWeights {
                weights: &model.weights,
                plan: &plan,
            };
            let rt = Runtime::from_source(&model.config, src)?;
            let (lp, nll) = log_probs(&rt, &start, &ids)?;
            entries.push(TensorSensitivity {
                tensor: name.clone(),
                dtype,
                parameters: *parameters,
                kl: kl(&base, &lp, vocab),
                nll_delta: nll - base_nll,
                perplexity_change: (nll - base_nll).exp() - 1.0,
            });
            progress(entries.len(), total);
        }
    }
    Ok(SensitivityReport {
        tokens: ids.len(),
        base_nll,
        entries,
    })
}

impl SensitivityReport {
    /// A plan at most `bits` bits per weight on average (over the whole model, f32 tensors
    /// included) that keeps the summed measured KL small: every tensor starts at its most precise
    /// candidate, then the step with the least KL added per bit saved is taken until the budget is
    /// met. Errors if the budget is below what the cheapest candidates reach.
    pub fn choose_mixed(&self, cfg: &ModelConfig, bits: f64) -> Result<Plan> {
        use std::collections::BTreeMap;
        // Per tensor: candidates sorted by bits, descending, keeping only Pareto-better steps.
        let mut options: BTreeMap<&str, Vec<(f64, f64, DType)>> = BTreeMap::new();
        for e in &self.entries {
            options.entry(&e.tensor).or_default().push((
                e.dtype.bits_per_weight(),
                e.kl.max(0.0),
                e.dtype,
            ));
        }
        for opts in options.values_mut() {
            // Keep only undominated options (no other has fewer-or-equal bits and less KL), most
            // bits first: each step down then saves bits at some KL cost.
            let all = opts.clone();
            opts.retain(|o| {
                !all.iter()
                    .any(|p| p.0 <= o.0 && p.1 < o.1 || (p.0 < o.0 && p.1 <= o.1))
            });
            opts.sort_by(|a, b| b.0.total_cmp(&a.0));
            opts.dedup_by(|a, b| a.0 == b.0);
        }
        let mut choice: BTreeMap<&str, usize> = options.keys().map(|k| (*k, 0)).collect();
        let spec = ModelSpec::new(cfg);
        let total = spec.parameter_count();
        let params = |name: &str| spec.get(name).map_or(0, |s| s.len());
        let plan_of = |choice: &BTreeMap<&str, usize>| Plan {
            types: choice
                .iter()
                .map(|(n, &i)| (n.to_string(), options[n][i].2))
                .collect(),
        };
        loop {
            let plan = plan_of(&choice);
            let avg = plan.bits_per_weight(cfg);
            if avg <= bits + 1e-9 {
                // The last step may have overshot: spend what is left of the budget on the
                // upgrades that remove the most KL, while they fit.
                loop {
                    let spare = (bits - plan_of(&choice).bits_per_weight(cfg)) * total as f64;
                    let best = choice
                        .iter()
                        .filter(|(_, &i)| i > 0)
                        .filter(|(n, &i)| {
                            (options[**n][i - 1].0 - options[**n][i].0) * params(n) as f64
                                <= spare + 1e-6
                        })
                        .map(|(n, &i)| (*n, options[*n][i].1 - options[*n][i - 1].1))
                        .max_by(|a, b| a.1.total_cmp(&b.1));
                    match best {
                        Some((n, gain)) if gain > 0.0 => *choice.get_mut(n).unwrap() -= 1,
                        _ => return Ok(plan_of(&choice)),
                    }
                }
            }
            let best = choice
                .iter()
                .filter(|(n, &i)| i + 1 < options[**n].len())
                .map(|(n, &i)| {
                    let (a, b) = (options[*n][i], options[*n][i + 1]);
                    let saved = (a.0 - b.0) * params(n) as f64 / total as f64;
                    (*n, (b.1 - a.1) / saved)
                })
                .min_by(|a, b| a.1.total_cmp(&b.1));
            match best {
                Some((n, _)) => *choice.get_mut(n).unwrap() += 1,
                None => {
                    return Err(Error::Argument(format!(
                        "{bits} bits per weight is below what the cheapest types reach ({avg:.2})"
                    )))
                }
            }
        }
    }
}
