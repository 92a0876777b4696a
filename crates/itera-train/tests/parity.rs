//! The contract between the crates: itera-core's inference runtime (decode one token at a time,
//! and prefill of a whole sequence) gives the logits of itera-train's reference model to 1e-4,
//! for every preset, the shared-state mixer and dense feed-forwards. Training happens on the
//! reference; generation, evaluation and serving on the runtime; this is what keeps them one model.

use candle_core::{Device, Tensor};
use itera_core::config::{Mixer, ModelConfig};
use itera_core::rng::Rng;
use itera_core::{Runtime, Weights};
use itera_train::reference::{Model, Params};

fn random_tokens(cfg: &ModelConfig, len: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.below(cfg.vocab_size) as u32).collect()
}

fn reference_logits(cfg: &ModelConfig, w: &Weights, tokens: &[u32]) -> Vec<Vec<f32>> {
    let t = Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .reshape((1, tokens.len()))
        .unwrap();
    let params = Params::from_weights(w).unwrap();
    Model::new(cfg, &params)
        .logits(&t)
        .unwrap()
        .0
        .to_vec2::<f32>()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Decode (one row per call) and prefill (all rows in one call) both match the reference.
#[test]
fn step_and_prefill_agree_with_forward_for_every_preset() {
    let mut configs: Vec<(String, ModelConfig)> = ["micro", "tiny", "small", "medium"]
        .iter()
        .map(|p| (p.to_string(), ModelConfig::preset(p).unwrap()))
        .collect();
    // The shared-state mixer, and dense feed-forwards on the layers without MoE.
    for base in ["micro", "tiny"] {
        let mut cfg = ModelConfig::preset(base).unwrap();
        cfg.mixer = Mixer::SharedState;
        configs.push((format!("{base} shared-state"), cfg.clone()));
        cfg.ffn_hidden = 48;
        configs.push((format!("{base} shared-state + ffn"), cfg));
    }
    for (preset, cfg) in configs {
        let w = Weights::init(&cfg, 3).unwrap();
        let tokens = random_tokens(&cfg, 128, 11);
        let want = reference_logits(&cfg, &w, &tokens);
        let rt = Runtime::new(&cfg, &w).unwrap();
        let (mut st, mut sc) = (rt.new_state(), rt.new_scratch());
        let mut worst = 0f32;
        for (i, &tok) in tokens.iter().enumerate() {
            rt.step(tok, &mut st, &mut sc).unwrap();
            worst = worst.max(max_diff(&sc.logits, &want[i]));
        }
        assert!(worst < 1e-4, "{preset} step: max |logit diff| {worst}");
        let mut st = rt.new_state();
        rt.prefill_all(&tokens, &mut st, &mut sc).unwrap();
        let v = cfg.vocab_size;
        let worst = (0..tokens.len())
            .map(|i| max_diff(&sc.logits[i * v..(i + 1) * v], &want[i]))
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{preset} prefill: max |logit diff| {worst}");
    }
}
