//! The model's named tensors: their shapes, initialisation, and validation on load.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use crate::config::{Mixer, ModelConfig};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// How a tensor starts before training.
#[derive(Clone, Copy, Debug)]
enum Init {
    Normal(f64),
    Uniform(f64),
    Zeros,
    Ones,
    /// log(1..=N) along each row (A = -exp(A_log) = -(1..=N)).
    ALog,
    /// Inverse softplus of dt ~ log-uniform [1e-3, 0.1].
    DtBias,
}

/// Name, shape and initialisation of every tensor of a config, in a stable order.
fn specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, Init)> {
    let (d, di, n, r, k) = (
        cfg.d_model,
        cfg.d_inner(),
        cfg.d_state,
        cfg.dt_rank,
        cfg.d_conv,
    );
    let proj_std = 0.02 / (2.0 * cfg.n_layers as f64).sqrt();
    let mut s = vec![(
        "embed.weight".to_string(),
        vec![cfg.vocab_size, d],
        Init::Normal(0.02),
    )];
    if cfg.mixer == Mixer::Attention {
        s.push((
            "pos_embed.weight".to_string(),
            vec![cfg.context, d],
            Init::Normal(0.02),
        ));
    }
    for l in 0..cfg.n_layers {
        let p = format!("layers.{l}");
        s.push((format!("{p}.norm.weight"), vec![d], Init::Ones));
        let m = |t: &str| format!("{p}.mixer.{t}");
        if cfg.mixer == Mixer::Attention {
            s.push((m("qkv.weight"), vec![3 * d, d], Init::Normal(0.02)));
            s.push((m("out_proj.weight"), vec![d, d], Init::Normal(proj_std)));
        } else {
            // Selective: each channel owns a state of N; shared: N state values for all channels.
            let states = if cfg.mixer == Mixer::SharedState {
                n
            } else {
                di
            };
            s.push((m("in_proj.weight"), vec![2 * di, d], Init::Normal(0.02)));
            s.push((
                m("conv.weight"),
                vec![di, k],
                Init::Uniform(1.0 / (k as f64).sqrt()),
            ));
            s.push((m("conv.bias"), vec![di], Init::Zeros));
            s.push((m("x_proj.weight"), vec![r + 2 * n, di], Init::Normal(0.02)));
            s.push((
                m("dt_proj.weight"),
                vec![states, r],
                Init::Uniform(1.0 / (r as f64).sqrt()),
            ));
            s.push((m("dt_proj.bias"), vec![states], Init::DtBias));
            if cfg.mixer == Mixer::SharedState {
                s.push((m("ssm_in.weight"), vec![n, di], Init::Normal(0.02)));
                s.push((
                    m("ssm_out.weight"),
                    vec![di, n],
                    Init::Uniform(1.0 / (n as f64).sqrt()),
                ));
                s.push((m("A_log"), vec![n], Init::ALog));
            } else {
                s.push((m("A_log"), vec![di, n], Init::ALog));
            }
            s.push((m("D"), vec![di], Init::Ones));
            s.push((m("out_proj.weight"), vec![d, di], Init::Normal(proj_std)));
        }
        if cfg.is_moe_layer(l) {
            let h = cfg.expert_hidden;
            s.push((format!("{p}.moe_norm.weight"), vec![d], Init::Ones));
            s.push((
                format!("{p}.moe.router.weight"),
                vec![cfg.n_experts, d],
                Init::Normal(0.02),
            ));
            for e in 0..cfg.n_experts {
                s.push((
                    format!("{p}.moe.experts.{e}.gate.weight"),
                    vec![h, d],
                    Init::Normal(0.02),
                ));
                s.push((
                    format!("{p}.moe.experts.{e}.up.weight"),
                    vec![h, d],
                    Init::Normal(0.02),
                ));
                s.push((
                    format!("{p}.moe.experts.{e}.down.weight"),
                    vec![d, h],
                    Init::Normal(proj_std),
                ));
            }
        } else if cfg.ffn_hidden > 0 {
            let h = cfg.ffn_hidden;
            s.push((format!("{p}.ffn_norm.weight"), vec![d], Init::Ones));
            s.push((
                format!("{p}.ffn.gate.weight"),
                vec![h, d],
                Init::Normal(0.02),
            ));
            s.push((format!("{p}.ffn.up.weight"), vec![h, d], Init::Normal(0.02)));
            s.push((
                format!("{p}.ffn.down.weight"),
                vec![d, h],
                Init::Normal(proj_std),
            ));
        }
    }
    s.push(("norm_f.weight".to_string(), vec![d], Init::Ones));
    s
}

/// Name and shape of every tensor of a config, in file order.
pub fn tensor_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    specs(cfg).into_iter().map(|(n, s, _)| (n, s)).collect()
}

/// True for the tensors AdamW decays: matrices, except A_log (DESIGN.md: A_log, D, norms, biases stay out).
pub fn decays(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && !name.ends_with("A_log")
}

/// All tensors of a model by name. Stored f32 on the CPU.
#[derive(Clone, Debug)]
pub struct Weights {
    pub tensors: BTreeMap<String, Tensor>,
}

impl Weights {
    /// Fresh weights for `cfg`, fully determined by `seed`.
    pub fn init(cfg: &ModelConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let mut rng = Rng::new(seed);
        let mut tensors = BTreeMap::new();
        for (name, shape, init) in specs(cfg) {
            let len: usize = shape.iter().product();
            let cols = *shape.last().unwrap();
            let data: Vec<f32> = (0..len)
                .map(|i| match init {
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
            tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        Ok(Self { tensors })
    }

    /// Checks that exactly the tensors `cfg` needs are present, f32, with the right shapes.
    pub fn from_tensors(
        cfg: &ModelConfig,
        tensors: BTreeMap<String, Tensor>,
        origin: &str,
    ) -> Result<Self> {
        let expected = specs(cfg);
        for (name, shape, _) in &expected {
            let t = tensors.get(name).ok_or_else(|| Error::Tensor {
                name: name.clone(),
                message: format!("missing from {origin}"),
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::Tensor {
                    name: name.clone(),
                    message: format!(
                        "{origin} has shape {:?}, the config expects {:?}",
                        t.dims(),
                        shape
                    ),
                });
            }
        }
        if let Some(extra) = tensors
            .keys()
            .find(|k| !expected.iter().any(|(n, _, _)| n == *k))
        {
            return Err(Error::Tensor {
                name: extra.clone(),
                message: format!("in {origin} but not part of this config"),
            });
        }
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| {
                Ok((
                    k,
                    t.to_dtype(candle_core::DType::F32)?
                        .to_device(&Device::Cpu)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self { tensors })
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::Tensor {
            name: name.into(),
            message: "missing".into(),
        })
    }

    /// The tensor's values, row-major.
    pub fn values(&self, name: &str) -> Result<Vec<f32>> {
        Ok(self.get(name)?.flatten_all()?.to_vec1::<f32>()?)
    }

    pub fn parameter_count(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count()).sum()
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
            Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
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
}
