//! THE table of a model's tensors: every name, shape, initialisation and role is written here
//! once, as a `ModelSpec` built from a config. The checkpoint writer and loader, the runtime's
//! packing, the GGUF writer, the training reference model and the FLOP / byte counts all walk it,
//! so adding a tensor is one edit here plus the arithmetic that uses it.
//!
//! `Weights` is the host form of a model: f32 values by name, checked against the table.

use std::collections::BTreeMap;

use crate::config::{Mixer, ModelConfig};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// How a tensor starts before training.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal(f64),
    Uniform(f64),
    Zeros,
    Ones,
    /// log(1..=N) along each row (A = -exp(A_log) = -(1..=N)).
    ALog,
    /// Inverse softplus of dt ~ log-uniform [1e-3, 0.1].
    DtBias,
}

/// What a tensor does, which decides how it is stored, decayed and counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The token embedding, also the tied LM head.
    Embedding,
    /// Learned positions (attention baseline only).
    Positions,
    /// A weight matrix every token multiplies by.
    Projection,
    /// dt_proj: the small [states, dt_rank] up-projection, kept f32 like llama.cpp keeps Mamba's dt.
    LowRank,
    /// The MoE router (kept f32: routing decisions are sensitive to it).
    Router,
    /// One expert's matrix: a token multiplies by top_k of a layer's experts.
    Expert,
    /// The depthwise conv kernel.
    Conv,
    /// RMSNorm gains.
    Norm,
    /// Biases, A_log, D: small f32 parameters outside weight decay.
    Param,
}

/// One tensor of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    pub role: Role,
}

impl Spec {
    fn new(name: String, shape: &[usize], init: Init, role: Role) -> Self {
        Self {
            name,
            shape: shape.to_vec(),
            init,
            role,
        }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// [rows, cols] of a matrix; a 1-D tensor is one row.
    pub fn rows_cols(&self) -> (usize, usize) {
        match self.shape[..] {
            [r, c] => (r, c),
            _ => (1, self.len()),
        }
    }

    /// AdamW decays matrices, except A_log (DESIGN.md: A_log, D, norms and biases stay out).
    pub fn decays(&self) -> bool {
        !matches!(self.role, Role::Norm | Role::Param)
    }

    /// Whether the tensor may leave f32: weight matrices with whole blocks of `block` per row.
    /// Norms, biases, A_log, D, the conv kernel, dt_proj and the router stay f32.
    pub fn quantizable(&self, block: usize) -> bool {
        matches!(self.role, Role::Embedding | Role::Projection | Role::Expert)
            && self.shape.len() == 2
            && self.shape[1].is_multiple_of(block)
    }
}

/// A SwiGLU MLP: down(silu(gate x) * up x).
#[derive(Clone, Debug)]
pub struct SwigluSpec {
    pub gate: Spec,
    pub up: Spec,
    pub down: Spec,
}

/// The selective SSM mixer (Mamba-1), or the original's shared-state variant (`shared` set).
#[derive(Clone, Debug)]
pub struct SsmSpec {
    pub in_proj: Spec,
    pub conv: Spec,
    pub conv_bias: Spec,
    pub x_proj: Spec,
    pub dt_proj: Spec,
    pub dt_bias: Spec,
    /// Shared-state mixer: `ssm_in` [N, d_inner] and `ssm_out` [d_inner, N].
    pub shared: Option<(Spec, Spec)>,
    pub a_log: Spec,
    pub d: Spec,
    pub out_proj: Spec,
}

/// Causal attention (the Transformer baseline).
#[derive(Clone, Debug)]
pub struct AttentionSpec {
    pub qkv: Spec,
    pub out_proj: Spec,
}

#[derive(Clone, Debug)]
pub enum MixerSpec {
    Ssm(Box<SsmSpec>),
    Attention(AttentionSpec),
}

#[derive(Clone, Debug)]
pub struct MoeSpec {
    pub norm: Spec,
    pub router: Spec,
    pub experts: Vec<SwigluSpec>,
}

/// A dense feed-forward on a layer without MoE.
#[derive(Clone, Debug)]
pub struct FfnSpec {
    pub norm: Spec,
    pub mlp: SwigluSpec,
}

#[derive(Clone, Debug)]
pub struct LayerSpec {
    pub norm: Spec,
    pub mixer: MixerSpec,
    pub moe: Option<MoeSpec>,
    pub ffn: Option<FfnSpec>,
}

impl LayerSpec {
    /// The SSM mixer (None for attention).
    pub fn ssm(&self) -> Option<&SsmSpec> {
        match &self.mixer {
            MixerSpec::Ssm(s) => Some(s),
            MixerSpec::Attention(_) => None,
        }
    }
}

/// Every tensor of a model, by role.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub embed: Spec,
    pub pos_embed: Option<Spec>,
    pub layers: Vec<LayerSpec>,
    pub norm_f: Spec,
    top_k: usize,
}

fn swiglu(prefix: &str, hidden: usize, d: usize, proj_std: f64) -> SwigluSpec {
    let s = |part: &str, shape: &[usize], std: f64| {
        Spec::new(
            format!("{prefix}.{part}.weight"),
            shape,
            Init::Normal(std),
            if prefix.contains(".experts.") {
                Role::Expert
            } else {
                Role::Projection
            },
        )
    };
    SwigluSpec {
        gate: s("gate", &[hidden, d], 0.02),
        up: s("up", &[hidden, d], 0.02),
        down: s("down", &[d, hidden], proj_std),
    }
}

impl ModelSpec {
    /// The table for a config.
    pub fn new(cfg: &ModelConfig) -> Self {
        let (d, di, n, r, k) = (
            cfg.d_model,
            cfg.d_inner(),
            cfg.d_state,
            cfg.dt_rank,
            cfg.d_conv,
        );
        let proj_std = 0.02 / (2.0 * cfg.n_layers as f64).sqrt();
        let norm = |name: String| Spec::new(name, &[d], Init::Ones, Role::Norm);
        let layers = (0..cfg.n_layers)
            .map(|l| {
                let p = format!("layers.{l}");
                let m = |t: &str| format!("{p}.mixer.{t}");
                let mixer = if cfg.mixer == Mixer::Attention {
                    MixerSpec::Attention(AttentionSpec {
                        qkv: Spec::new(
                            m("qkv.weight"),
                            &[3 * d, d],
                            Init::Normal(0.02),
                            Role::Projection,
                        ),
                        out_proj: Spec::new(
                            m("out_proj.weight"),
                            &[d, d],
                            Init::Normal(proj_std),
                            Role::Projection,
                        ),
                    })
                } else {
                    // Selective: each channel owns a state of N; shared: N state values for all.
                    let shared = cfg.mixer == Mixer::SharedState;
                    let states = if shared { n } else { di };
                    let a_shape: &[usize] = if shared { &[n] } else { &[di, n] };
                    MixerSpec::Ssm(Box::new(SsmSpec {
                        in_proj: Spec::new(
                            m("in_proj.weight"),
                            &[2 * di, d],
                            Init::Normal(0.02),
                            Role::Projection,
                        ),
                        conv: Spec::new(
                            m("conv.weight"),
                            &[di, k],
                            Init::Uniform(1.0 / (k as f64).sqrt()),
                            Role::Conv,
                        ),
                        conv_bias: Spec::new(m("conv.bias"), &[di], Init::Zeros, Role::Param),
                        x_proj: Spec::new(
                            m("x_proj.weight"),
                            &[r + 2 * n, di],
                            Init::Normal(0.02),
                            Role::Projection,
                        ),
                        dt_proj: Spec::new(
                            m("dt_proj.weight"),
                            &[states, r],
                            Init::Uniform(1.0 / (r as f64).sqrt()),
                            Role::LowRank,
                        ),
                        dt_bias: Spec::new(m("dt_proj.bias"), &[states], Init::DtBias, Role::Param),
                        shared: shared.then(|| {
                            (
                                Spec::new(
                                    m("ssm_in.weight"),
                                    &[n, di],
                                    Init::Normal(0.02),
                                    Role::Projection,
                                ),
                                Spec::new(
                                    m("ssm_out.weight"),
                                    &[di, n],
                                    Init::Uniform(1.0 / (n as f64).sqrt()),
                                    Role::Projection,
                                ),
                            )
                        }),
                        a_log: Spec::new(m("A_log"), a_shape, Init::ALog, Role::Param),
                        d: Spec::new(m("D"), &[di], Init::Ones, Role::Param),
                        out_proj: Spec::new(
                            m("out_proj.weight"),
                            &[d, di],
                            Init::Normal(proj_std),
                            Role::Projection,
                        ),
                    }))
                };
                let moe = cfg.is_moe_layer(l).then(|| {
                    let experts = cfg.experts_in_layer(l);
                    MoeSpec {
                        norm: norm(format!("{p}.moe_norm.weight")),
                        router: Spec::new(
                            format!("{p}.moe.router.weight"),
                            &[experts, d],
                            Init::Normal(0.02),
                            Role::Router,
                        ),
                        experts: (0..experts)
                            .map(|e| {
                                swiglu(
                                    &format!("{p}.moe.experts.{e}"),
                                    cfg.expert_hidden,
                                    d,
                                    proj_std,
                                )
                            })
                            .collect(),
                    }
                });
                let ffn = (!cfg.is_moe_layer(l) && cfg.ffn_hidden > 0).then(|| FfnSpec {
                    norm: norm(format!("{p}.ffn_norm.weight")),
                    mlp: swiglu(&format!("{p}.ffn"), cfg.ffn_hidden, d, proj_std),
                });
                LayerSpec {
                    norm: norm(format!("{p}.norm.weight")),
                    mixer,
                    moe,
                    ffn,
                }
            })
            .collect();
        Self {
            embed: Spec::new(
                "embed.weight".into(),
                &[cfg.vocab_size, d],
                Init::Normal(0.02),
                Role::Embedding,
            ),
            pos_embed: (cfg.mixer == Mixer::Attention).then(|| {
                Spec::new(
                    "pos_embed.weight".into(),
                    &[cfg.context, d],
                    Init::Normal(0.02),
                    Role::Positions,
                )
            }),
            layers,
            norm_f: norm("norm_f.weight".into()),
            top_k: cfg.top_k,
        }
    }

    /// Every tensor, in file order.
    pub fn all(&self) -> Vec<&Spec> {
        let mut out = vec![&self.embed];
        out.extend(&self.pos_embed);
        for l in &self.layers {
            out.push(&l.norm);
            match &l.mixer {
                MixerSpec::Attention(a) => out.extend([&a.qkv, &a.out_proj]),
                MixerSpec::Ssm(s) => {
                    out.extend([&s.in_proj, &s.conv, &s.conv_bias, &s.x_proj]);
                    out.extend([&s.dt_proj, &s.dt_bias]);
                    if let Some((i, o)) = &s.shared {
                        out.extend([i, o]);
                    }
                    out.extend([&s.a_log, &s.d, &s.out_proj]);
                }
            }
            if let Some(m) = &l.moe {
                out.extend([&m.norm, &m.router]);
                for e in &m.experts {
                    out.extend([&e.gate, &e.up, &e.down]);
                }
            }
            if let Some(f) = &l.ffn {
                out.extend([&f.norm, &f.mlp.gate, &f.mlp.up, &f.mlp.down]);
            }
        }
        out.push(&self.norm_f);
        out
    }

    pub fn get(&self, name: &str) -> Option<&Spec> {
        self.all().into_iter().find(|s| s.name == name)
    }

    /// Sum of `f` over the weight matrices one token multiplies by: the LM head, every
    /// projection and router, and top_k of each MoE layer's experts (they are all the same
    /// size, so this is exact). `f = Spec::len` gives multiply-adds per token; the runtime
    /// passes each matrix's stored bytes to get the bytes a decode step reads.
    pub fn per_token(&self, f: impl Fn(&Spec) -> usize) -> usize {
        let swiglu = |m: &SwigluSpec| f(&m.gate) + f(&m.up) + f(&m.down);
        let mut total = f(&self.embed);
        for l in &self.layers {
            total += match &l.mixer {
                MixerSpec::Attention(a) => f(&a.qkv) + f(&a.out_proj),
                MixerSpec::Ssm(s) => {
                    let shared = s.shared.as_ref().map_or(0, |(i, o)| f(i) + f(o));
                    f(&s.in_proj) + f(&s.x_proj) + f(&s.dt_proj) + f(&s.out_proj) + shared
                }
            };
            if let Some(m) = &l.moe {
                let all: usize = m.experts.iter().map(swiglu).sum();
                total += f(&m.router) + all * self.top_k.min(m.experts.len()) / m.experts.len();
            }
            if let Some(ffn) = &l.ffn {
                total += swiglu(&ffn.mlp);
            }
        }
        total
    }

    pub fn parameter_count(&self) -> usize {
        self.all().iter().map(|s| s.len()).sum()
    }

    /// Parameter count by group, in a stable order (the embedding is tied with the LM head).
    pub fn parameter_groups(&self) -> Vec<(&'static str, usize)> {
        let mut groups: Vec<(&'static str, usize)> = Vec::new();
        let mut add = |group: &'static str, specs: &[&Spec]| {
            let n: usize = specs.iter().map(|s| s.len()).sum();
            match groups.iter_mut().find(|(g, _)| *g == group) {
                Some((_, c)) => *c += n,
                None => groups.push((group, n)),
            }
        };
        add("embedding (tied LM head)", &[&self.embed]);
        if let Some(p) = &self.pos_embed {
            add("positions", &[p]);
        }
        for l in &self.layers {
            add("norms", &[&l.norm]);
            match &l.mixer {
                MixerSpec::Attention(a) => {
                    add("mixer (attention) x layers", &[&a.qkv, &a.out_proj])
                }
                MixerSpec::Ssm(s) => {
                    let mut all = vec![&s.in_proj, &s.conv, &s.conv_bias, &s.x_proj, &s.dt_proj];
                    all.extend([&s.dt_bias, &s.a_log, &s.d, &s.out_proj]);
                    if let Some((i, o)) = &s.shared {
                        all.extend([i, o]);
                    }
                    add("mixer (SSM) x layers", &all);
                }
            }
            if let Some(m) = &l.moe {
                add("norms", &[&m.norm]);
                add("routers", &[&m.router]);
                for e in &m.experts {
                    add("experts", &[&e.gate, &e.up, &e.down]);
                }
            }
            if let Some(f) = &l.ffn {
                add("norms", &[&f.norm]);
                add("dense feed-forward", &[&f.mlp.gate, &f.mlp.up, &f.mlp.down]);
            }
        }
        add("norms", &[&self.norm_f]);
        groups
    }
}

/// One tensor's values in f32, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }
}

/// All tensors of a model by name, f32, checked against the table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Weights {
    pub tensors: BTreeMap<String, HostTensor>,
}

impl Weights {
    /// Fresh weights for `cfg`, fully determined by `seed`.
    pub fn init(cfg: &ModelConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let mut rng = Rng::new(seed);
        let mut tensors = BTreeMap::new();
        for spec in ModelSpec::new(cfg).all() {
            let cols = *spec.shape.last().expect("tensors have a shape");
            let data: Vec<f32> = (0..spec.len())
                .map(|i| match spec.init {
                    Init::Normal(std) => (rng.normal() * std) as f32,
                    Init::Uniform(b) => ((rng.uniform() * 2.0 - 1.0) * b) as f32,
                    Init::Zeros => 0.0,
                    Init::Ones => 1.0,
                    Init::ALog => ((i % cols + 1) as f32).ln(),
                    Init::DtBias => {
                        let (lo, hi) = (1e-3f64.ln(), 0.1f64.ln());
                        let dt = (lo + rng.uniform() * (hi - lo)).exp().max(1e-4);
                        (dt + (-(-dt).exp_m1()).ln()) as f32
                    }
                })
                .collect();
            tensors.insert(spec.name.clone(), HostTensor::new(spec.shape.clone(), data));
        }
        Ok(Self { tensors })
    }

    /// Checks that exactly the tensors `cfg` needs are present with the right shapes and
    /// finite values; errors name the tensor and `origin`.
    pub fn from_tensors(
        cfg: &ModelConfig,
        tensors: BTreeMap<String, HostTensor>,
        origin: &str,
    ) -> Result<Self> {
        let spec = ModelSpec::new(cfg);
        let expected = spec.all();
        for s in &expected {
            let t = tensors.get(&s.name).ok_or_else(|| Error::Tensor {
                name: s.name.clone(),
                message: format!("missing from {origin}"),
            })?;
            if t.shape != s.shape {
                return Err(Error::Tensor {
                    name: s.name.clone(),
                    message: format!(
                        "{origin} has shape {:?}, the config expects {:?}",
                        t.shape, s.shape
                    ),
                });
            }
            check_finite(&s.name, &t.data, origin)?;
        }
        if let Some(extra) = tensors
            .keys()
            .find(|k| !expected.iter().any(|s| &s.name == *k))
        {
            return Err(Error::Tensor {
                name: extra.clone(),
                message: format!("in {origin} but not part of this config"),
            });
        }
        Ok(Self { tensors })
    }

    pub fn get(&self, name: &str) -> Result<&HostTensor> {
        self.tensors.get(name).ok_or_else(|| Error::Tensor {
            name: name.into(),
            message: "missing".into(),
        })
    }

    /// The tensor's values, row-major.
    pub fn values(&self, name: &str) -> Result<&[f32]> {
        Ok(&self.get(name)?.data)
    }

    pub fn parameter_count(&self) -> usize {
        self.tensors.values().map(|t| t.data.len()).sum()
    }
}

/// An error naming the first non-finite value of a tensor (NaN or inf weights load silently
/// otherwise and turn every result into NaN).
pub fn check_finite(name: &str, values: &[f32], origin: &str) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::Tensor {
            name: name.into(),
            message: format!("{origin} holds {} at index {i}", values[i]),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_seeded_and_counts_match_the_config() {
        let cfg = ModelConfig::preset("micro").unwrap();
        let a = Weights::init(&cfg, 1).unwrap();
        let b = Weights::init(&cfg, 1).unwrap();
        let c = Weights::init(&cfg, 2).unwrap();
        assert_eq!(a.parameter_count(), cfg.parameter_count());
        let e = "embed.weight";
        assert_eq!(a.values(e).unwrap(), b.values(e).unwrap());
        assert_ne!(a.values(e).unwrap(), c.values(e).unwrap());
        let alog = a.values("layers.0.mixer.A_log").unwrap();
        assert!((alog[1] - 2f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn wrong_shape_and_missing_tensor_are_named() {
        let cfg = ModelConfig::preset("micro").unwrap();
        let mut t = Weights::init(&cfg, 1).unwrap().tensors;
        t.insert(
            "norm_f.weight".into(),
            HostTensor::new(vec![3], vec![0.0; 3]),
        );
        let err = Weights::from_tensors(&cfg, t.clone(), "m.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("norm_f.weight") && err.contains("[3]"),
            "{err}"
        );
        t.remove("norm_f.weight");
        let err = Weights::from_tensors(&cfg, t, "m.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("norm_f.weight") && err.contains("missing"),
            "{err}"
        );
    }

    /// The table's roles give the decay and quantization rules the trainer and the GGUF writer
    /// used before the table existed (matrices decay except A_log; small tensors stay f32).
    #[test]
    fn roles_decide_decay_quantization_and_counts() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let spec = ModelSpec::new(&cfg);
        for s in spec.all() {
            let old_decay = s.shape.len() == 2 && !s.name.ends_with("A_log");
            assert_eq!(s.decays(), old_decay, "{}", s.name);
            let small = ["norm", "conv", "A_log", ".D", "bias", "dt_proj", "router"];
            let old_quant = s.shape.len() == 2
                && s.shape[1] % 32 == 0
                && !small.iter().any(|x| s.name.contains(x));
            assert_eq!(s.quantizable(32), old_quant, "{}", s.name);
        }
        // 2 x multiply-adds: the documented 3,295,232 FLOPs per token of `tiny`.
        assert_eq!(2 * spec.per_token(Spec::len), 3_295_232);
        assert_eq!(spec.parameter_count(), 1_860_480);
        assert!(spec.get("layers.3.moe.experts.2.down.weight").is_some());
    }
}
