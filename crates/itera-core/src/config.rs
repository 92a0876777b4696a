//! Model architecture: the presets and the JSON form saved beside every checkpoint.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What mixes information along the sequence in every layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mixer {
    /// Mamba-1: every channel of d_inner carries its own N-dimensional state.
    #[default]
    Selective,
    /// The original Itera-Lite's simplification: one N-dimensional state per layer, shared by all
    /// channels (written through `ssm_in` [N, d_inner], read through `ssm_out` [d_inner, N]).
    SharedState,
    /// Causal multi-head softmax attention with learned positions (the Transformer baseline);
    /// limited to `context` tokens, trained and evaluated only (no recurrent runtime).
    Attention,
}

impl Mixer {
    pub fn is_recurrent(self) -> bool {
        self != Mixer::Attention
    }
}

/// Architecture of a selective-SSM + MoE language model (DESIGN.md section 2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Preset this config started from (informational).
    pub preset: String,
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    /// SSM state size N per channel.
    pub d_state: usize,
    /// Causal depthwise convolution width.
    pub d_conv: usize,
    /// d_inner = expand * d_model.
    pub expand: usize,
    /// Rank of the dt projection.
    pub dt_rank: usize,
    pub n_experts: usize,
    pub top_k: usize,
    /// Hidden width of each SwiGLU expert.
    pub expert_hidden: usize,
    /// Indices of the layers that carry an MoE feed-forward after the mixer.
    pub moe_layers: Vec<usize>,
    /// Training context length (the recurrent step has no limit).
    pub context: usize,
    pub norm_eps: f64,
    /// Sequence mixer (older configs without the field are `selective`).
    #[serde(default)]
    pub mixer: Mixer,
    /// Attention heads (`attention` mixer only).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub n_heads: usize,
    /// Width of a dense SwiGLU feed-forward on every layer without MoE (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ffn_hidden: usize,
    /// Training-time dropout (never applied at inference; all 0 = off, the default, so configs
    /// written before the field existed load unchanged).
    #[serde(default, skip_serializing_if = "Dropout::is_off")]
    pub dropout: Dropout,
    /// A Jinja chat template (Hugging Face's convention: `messages`, `add_generation_prompt`)
    /// for the server's chat endpoint; None uses the documented plain default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// Experts of each MoE layer, in `moe_layers` order, when pruning left them different
    /// (empty: `n_experts` everywhere).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expert_counts: Vec<usize>,
    /// Dynamic expert skipping at inference (NAEE, Lu et al. 2024): a token skips its second
    /// expert when that expert's routing weight is below this times the first's (0: off).
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub moe_skip_beta: f64,
}

fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

/// Dropout probabilities where they are known to help recurrent language models (AWD-LSTM,
/// Merity et al. 2018; variational dropout, Gal & Ghahramani 2016). "Locked" masks are drawn once
/// per sequence and channel and reused at every position, so the recurrence sees a consistent
/// sub-network along the sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Dropout {
    /// Drops whole token types from the input embedding (the same token is dropped everywhere
    /// in a batch), scaling the others up.
    pub embed: f64,
    /// Locked dropout on the embedded input of the first block.
    pub input: f64,
    /// Locked dropout on the output of every mixer and feed-forward branch before it is added
    /// to the residual stream.
    pub residual: f64,
    /// Locked dropout on the final hidden state before the LM head.
    pub output: f64,
    /// Dropout on the hidden units of every expert / feed-forward SwiGLU.
    pub expert: f64,
    /// Per step, shard and MoE layer: the probability that one expert, drawn at random, is left
    /// out of routing (its tokens go to their next-best experts, the gates renormalised over
    /// the chosen ones), so the model learns to do without any one expert, as after
    /// `itera prune` removes it.
    pub routing: f64,
    /// Per step, shard and MoE layer: the probability that the layer's last expert, its
    /// designated spare, is left out of routing the same way, so that the model learns to do
    /// without that one expert in particular and `itera prune --drop 1` finds it cheapest to
    /// remove (the others are never left out for it).
    pub spare: f64,
}

impl Dropout {
    pub fn is_off(&self) -> bool {
        *self == Dropout::default()
    }

    fn validate(&self) -> Result<()> {
        for (name, p) in [
            ("embed", self.embed),
            ("input", self.input),
            ("residual", self.residual),
            ("output", self.output),
            ("expert", self.expert),
            ("routing", self.routing),
            ("spare", self.spare),
        ] {
            if !(0.0..0.95).contains(&p) {
                return Err(Error::Config(format!(
                    "`dropout.{name}` must be in [0, 0.95), got {p}"
                )));
            }
        }
        Ok(())
    }
}

impl ModelConfig {
    pub const PRESETS: [&'static str; 5] = ["tiny", "micro", "small", "medium", "transformer-tiny"];

    /// A named preset: `tiny` is the original Itera-Lite's shape. `transformer-tiny` is `tiny` with
    /// every SSM mixer replaced by causal attention (4 heads of 32) and, to match `tiny`'s parameter
    /// count, a dense SwiGLU feed-forward of width 212 on the layers without MoE.
    pub fn preset(name: &str) -> Result<Self> {
        if name == "transformer-tiny" {
            return Ok(Self {
                preset: name.into(),
                mixer: Mixer::Attention,
                n_heads: 4,
                ffn_hidden: 212,
                ..Self::preset("tiny")?
            });
        }
        let (d_model, n_layers, d_state, expert_hidden) = match name {
            "tiny" => (128, 4, 8, 128),
            "micro" => (32, 2, 8, 64),
            "small" => (256, 8, 16, 320),
            "medium" => (512, 12, 16, 1024),
            other => {
                return Err(Error::Config(format!(
                    "unknown preset `{other}`; expected one of {}",
                    Self::PRESETS.join(", ")
                )))
            }
        };
        Ok(Self {
            preset: name.to_string(),
            vocab_size: 8000,
            d_model,
            n_layers,
            d_state,
            d_conv: 4,
            expand: 2,
            dt_rank: d_model.div_ceil(16),
            n_experts: 4,
            top_k: 2,
            expert_hidden,
            moe_layers: (0..n_layers).filter(|i| i % 2 == 1).collect(),
            context: 128,
            norm_eps: 1e-5,
            mixer: Mixer::Selective,
            n_heads: 0,
            ffn_hidden: 0,
            dropout: Dropout::default(),
            chat_template: None,
            expert_counts: Vec::new(),
            moe_skip_beta: 0.0,
        })
    }

    pub fn d_inner(&self) -> usize {
        self.expand * self.d_model
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe_layers.contains(&layer)
    }

    /// Checks that the numbers describe a buildable model; errors name the field.
    pub fn validate(&self) -> Result<()> {
        // Every size must be positive and below a bound far above any CPU-sized model, so a
        // corrupt or hostile config is an error naming the field, never a huge allocation.
        let sizes = [
            ("vocab_size", self.vocab_size, 1 << 22),
            ("d_model", self.d_model, 1 << 14),
            ("n_layers", self.n_layers, 1 << 10),
            ("d_state", self.d_state, 1 << 10),
            ("d_conv", self.d_conv, 64),
            ("expand", self.expand, 16),
            ("dt_rank", self.dt_rank, 1 << 14),
            ("context", self.context, 1 << 20),
        ];
        for (field, value, max) in sizes {
            if value == 0 || value > max {
                return Err(Error::Config(format!(
                    "`{field}` must be in 1..={max}, got {value}"
                )));
            }
        }
        let limits = [
            ("n_experts", self.n_experts, 1 << 10),
            ("expert_hidden", self.expert_hidden, 1 << 16),
            ("ffn_hidden", self.ffn_hidden, 1 << 16),
            ("n_heads", self.n_heads, 1 << 10),
            ("top_k", self.top_k, 1 << 10),
        ];
        for (field, value, max) in limits {
            if value > max {
                return Err(Error::Config(format!(
                    "`{field}` must be at most {max}, got {value}"
                )));
            }
        }
        if self.moe_layers.len() * self.n_experts > 1 << 16 {
            return Err(Error::Config(format!(
                "{} MoE layers x `n_experts` {} is too many experts",
                self.moe_layers.len(),
                self.n_experts
            )));
        }
        if self.moe_layers.len() > self.n_layers {
            return Err(Error::Config(format!(
                "`moe_layers` lists {} layers but the model has {}",
                self.moe_layers.len(),
                self.n_layers
            )));
        }
        if !self.moe_layers.is_empty() {
            if self.n_experts == 0 || self.expert_hidden == 0 {
                return Err(Error::Config(
                    "`n_experts` and `expert_hidden` must be > 0 when `moe_layers` is not empty"
                        .into(),
                ));
            }
            if !self.expert_counts.is_empty() {
                if self.expert_counts.len() != self.moe_layers.len() {
                    return Err(Error::Config(format!(
                        "`expert_counts` has {} entries for {} MoE layers",
                        self.expert_counts.len(),
                        self.moe_layers.len()
                    )));
                }
                if let Some(&c) = self
                    .expert_counts
                    .iter()
                    .find(|&&c| c == 0 || c > self.n_experts)
                {
                    return Err(Error::Config(format!(
                        "`expert_counts` entries must be in 1..={} (n_experts), got {c}",
                        self.n_experts
                    )));
                }
            }
            let fewest = (0..self.n_layers)
                .filter(|&l| self.is_moe_layer(l))
                .map(|l| self.experts_in_layer(l))
                .min()
                .unwrap_or(self.n_experts);
            if self.top_k == 0 || self.top_k > fewest {
                return Err(Error::Config(format!(
                    "`top_k` must be in 1..={fewest} (the fewest experts of a layer), got {}",
                    self.top_k
                )));
            }
            if !(0.0..=1.0).contains(&self.moe_skip_beta) {
                return Err(Error::Config(format!(
                    "`moe_skip_beta` must be in [0, 1], got {}",
                    self.moe_skip_beta
                )));
            }
        }
        if let Some(&l) = self.moe_layers.iter().find(|&&l| l >= self.n_layers) {
            return Err(Error::Config(format!(
                "`moe_layers` names layer {l} but the model has {} layers",
                self.n_layers
            )));
        }
        if self.mixer == Mixer::Attention
            && (self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads))
        {
            return Err(Error::Config(format!(
                "`n_heads` must divide d_model {} for the attention mixer, got {}",
                self.d_model, self.n_heads
            )));
        }
        self.dropout.validate()?;
        // At most 2^31 parameters (8 GB of f32): far beyond CPU-sized models, within a machine.
        let params = crate::tensors::ModelSpec::new(self).parameter_count();
        if params > 1 << 31 {
            return Err(Error::Config(format!(
                "the config describes {params} parameters; refusing to build it"
            )));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return Err(Error::Config(format!(
                "`norm_eps` must be in (0, 1), got {}",
                self.norm_eps
            )));
        }
        Ok(())
    }

    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("{origin}: not a valid model config: {e}")))?;
        cfg.validate()
            .map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        Ok(cfg)
    }

    /// Parameter count by tensor group, in a stable order (embedding tied with the LM head).
    pub fn parameter_groups(&self) -> Vec<(String, usize)> {
        crate::tensors::ModelSpec::new(self)
            .parameter_groups()
            .into_iter()
            .map(|(g, n)| (g.to_string(), n))
            .collect()
    }

    pub fn parameter_count(&self) -> usize {
        crate::tensors::ModelSpec::new(self).parameter_count()
    }

    /// Experts in MoE layer `layer`.
    pub fn experts_in_layer(&self, layer: usize) -> usize {
        match self.moe_layers.iter().position(|&l| l == layer) {
            Some(i) if !self.expert_counts.is_empty() => self.expert_counts[i],
            _ => self.n_experts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_tiny_matches_the_original_shape() {
        for p in ModelConfig::PRESETS {
            ModelConfig::preset(p).unwrap().validate().unwrap();
        }
        let tiny = ModelConfig::preset("tiny").unwrap();
        assert_eq!(
            (tiny.vocab_size, tiny.d_model, tiny.n_layers, tiny.d_state),
            (8000, 128, 4, 8)
        );
        assert_eq!((tiny.n_experts, tiny.top_k, tiny.context), (4, 2, 128));
        let n = tiny.parameter_count();
        assert!(
            (1_500_000..=2_000_000).contains(&n),
            "tiny has {n} parameters"
        );
        let micro = ModelConfig::preset("micro").unwrap().parameter_count();
        assert!((100_000..=300_000).contains(&micro), "micro has {micro}");
        // The baselines of the PTB comparison stay within 0.1% of tiny's parameter count.
        let mut shared = tiny.clone();
        shared.mixer = Mixer::SharedState;
        for other in [
            shared.parameter_count(),
            ModelConfig::preset("transformer-tiny")
                .unwrap()
                .parameter_count(),
        ] {
            assert!(other.abs_diff(n) * 1000 < n, "{other} vs tiny's {n}");
        }
        // Configs written before the `mixer` field existed still load as selective SSMs.
        let mut json: serde_json::Value = serde_json::to_value(&tiny).unwrap();
        json.as_object_mut().unwrap().remove("mixer");
        let old = ModelConfig::from_json(&json.to_string(), "old.json").unwrap();
        assert_eq!(old, tiny);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let mut c = ModelConfig::preset("tiny").unwrap();
        c.top_k = 9;
        assert!(c.validate().unwrap_err().to_string().contains("top_k"));
        let mut c = ModelConfig::preset("tiny").unwrap();
        c.moe_layers = vec![7];
        assert!(c.validate().unwrap_err().to_string().contains("moe_layers"));
        assert!(ModelConfig::preset("huge").is_err());
        // Absurd sizes are refused before anything is allocated, naming the field.
        for (field, json_value) in [
            ("n_layers", 1u64 << 40),
            ("n_experts", 1 << 40),
            ("d_model", 1 << 40),
        ] {
            let mut v = serde_json::to_value(ModelConfig::preset("tiny").unwrap()).unwrap();
            v[field] = serde_json::json!(json_value);
            let err = ModelConfig::from_json(&v.to_string(), "c.json")
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{err}");
        }
        assert!(ModelConfig::from_json("{", "x.json")
            .unwrap_err()
            .to_string()
            .contains("x.json"));
    }
}
