//! Evaluation of models with a bounded context (the attention baseline, or any model with
//! `--windowed`): sliding windows over the reference forward, each token scored once with at least
//! half a context before it. Same report as itera-core's recurrent `evaluate`.

use candle_core::{Device, Tensor};
use itera_core::config::ModelConfig;
use itera_core::eval::{report, text_tokens, EvalReport};
use itera_core::math::log_sum_exp;
use itera_core::{Tokenizer, Weights};

use super::{Model, Params};
use crate::error::Result;

/// Windows scored per forward batch by `evaluate_windowed`.
const WINDOW_BATCH: usize = 8;

/// Evaluation for models with a bounded context (attention): windows of `context` tokens
/// advancing by half a context; each window scores only the tokens not scored before, so every
/// token after the first window sees at least half a context (the standard sliding-window
/// protocol). Same conventions as `evaluate` otherwise.
pub fn evaluate_windowed(
    cfg: &ModelConfig,
    weights: &Weights,
    tokenizer: &Tokenizer,
    text: &str,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    let ids = text_tokens(tokenizer, text)?;
    let start = tokenizer.encode("\n")?;
    let all: Vec<u32> = start.iter().chain(&ids).copied().collect();
    let windows = windows(all.len(), start.len(), cfg.context);
    let params = Params::from_weights(weights)?;
    let model = Model::new(cfg, &params);
    let vocab = cfg.vocab_size;
    let mut total = 0.0f64;
    let mut i = 0;
    while i < windows.len() {
        // A batch of windows of equal length (all full but possibly the last).
        let len = windows[i].1;
        let mut j = i;
        while j < windows.len() && j - i < WINDOW_BATCH && windows[j].1 == len {
            j += 1;
        }
        let batch = &windows[i..j];
        let tokens: Vec<u32> = batch
            .iter()
            .flat_map(|&(s, len, _)| all[s..s + len].iter().copied())
            .collect();
        let input = Tensor::from_vec(tokens, (batch.len(), len), &Device::Cpu)?;
        let logits = model.logits(&input)?.0.flatten_all()?.to_vec1::<f32>()?;
        for (w, &(s, len, first)) in batch.iter().enumerate() {
            for target in first..=s + len {
                let row = w * len + (target - s - 1);
                let l = &logits[row * vocab..(row + 1) * vocab];
                total += (log_sum_exp(l) - l[all[target] as usize]) as f64;
            }
        }
        progress(batch.last().map_or(0, |b| b.0 + b.1), all.len());
        i = j;
    }
    progress(all.len(), all.len());
    Ok(report(text, ids.len(), total))
}

/// The windows over `n` tokens whose targets from index `first` on are scored: (start, length,
/// first target scored); a window's inputs are [s, s + len) and its targets s + 1..=s + len.
fn windows(n: usize, first: usize, ctx: usize) -> Vec<(usize, usize, usize)> {
    let stride = (ctx / 2).max(1);
    let mut out = Vec::new();
    let (mut s, mut next) = (0, first.max(1));
    while next < n {
        let len = ctx.min(n - 1 - s);
        out.push((s, len, next));
        next = s + len + 1;
        s += stride;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use itera_core::eval::evaluate;
    use itera_core::Runtime;

    #[test]
    fn windows_score_every_target_once_with_at_least_half_a_context() {
        for (n, first, ctx) in [(2, 1, 8), (9, 1, 8), (10, 2, 8), (100, 1, 8), (101, 3, 16)] {
            let mut seen = vec![0; n];
            for (s, len, from) in windows(n, first, ctx) {
                assert!(len <= ctx && s + len < n);
                for (t, count) in seen.iter_mut().enumerate().take(s + len + 1).skip(from) {
                    *count += 1;
                    assert!(
                        t - s >= 1 && (s == 0 || t - s > ctx / 2),
                        "{t} in {s}+{len}"
                    );
                }
            }
            assert!(seen[..first].iter().all(|&c| c == 0));
            assert!(
                seen[first..].iter().all(|&c| c == 1),
                "{n} {first} {ctx}: {seen:?}"
            );
        }
    }

    /// When the text fits in one window, windowed evaluation over the reference forward gives the
    /// recurrent runtime's numbers.
    #[test]
    fn windowed_evaluation_matches_the_runtime_within_one_window() {
        let tok = crate::test_support::fixture_tokenizer(300);
        let mut cfg = ModelConfig::preset("micro").unwrap();
        cfg.vocab_size = tok.vocab_size();
        let w = Weights::init(&cfg, 4).unwrap();
        let text = "the cat sat on the mat.\nthe dog said hello.\n";
        let rt = Runtime::new(&cfg, &w).unwrap();
        let a = evaluate(&rt, &tok, text, |_, _| {}).unwrap();
        let b = evaluate_windowed(&cfg, &w, &tok, text, |_, _| {}).unwrap();
        assert_eq!(a.tokens, b.tokens);
        assert!((a.mean_nll - b.mean_nll).abs() < 1e-5, "{a:?} vs {b:?}");
        // A longer text through a short context still scores every token once.
        cfg.context = 8;
        let long = text.repeat(4);
        let c = evaluate_windowed(&cfg, &w, &tok, &long, |_, _| {}).unwrap();
        assert_eq!(c.tokens, tok.encode(&long).unwrap().len());
        assert!(c.mean_nll.is_finite() && c.mean_nll > 0.0);
    }
}
