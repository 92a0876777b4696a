//! The reference model: the parallel forward over a batch of sequences, built from candle ops
//! and our fused ops so that it trains. Tensor names come from itera-core's table (`ModelSpec`).
//! The inference runtime must agree with it to 1e-4 on logits (`tests/parity.rs`).

use std::cell::RefCell;

use candle_core::{DType, Tensor, D};
use itera_core::config::ModelConfig;
use itera_core::rng::Rng;
use itera_core::tensors::{AttentionSpec, MixerSpec, ModelSpec, MoeSpec, SsmSpec, SwigluSpec};

use super::conv_norm::{causal_conv_silu, rms_norm};
use super::distill_loss::{distill_loss, DistillLossSpec, Parts, TeacherLogits};
use super::linear::{linear, normed_linear};
use super::lm_head_loss::lm_head_loss;
use super::mixer_block::{mixer_block, MixerWeights};
use super::moe::{moe_block, moe_composite, Routing};
use super::scan::ssm_core_ungated;
use super::swiglu::swiglu_mlp;
use super::Params;
use crate::error::{Error, Result};

/// A model view over named tensors (plain tensors for evaluation, `Var`-backed ones for training).
pub struct Model<'a> {
    pub cfg: &'a ModelConfig,
    pub params: &'a Params,
    spec: ModelSpec,
    /// Draws the dropout masks of a training step; None evaluates (no dropout).
    noise: Option<RefCell<Rng>>,
}

/// What a forward pass returns: the final hidden states and the MoE load-balancing loss (mean over
/// MoE layers). Logits are `hidden · embed^T` (see `logits`; training fuses this with the loss).
pub struct ForwardOutput {
    /// [B * T, d_model], after the final norm.
    pub hidden: Tensor,
    /// Scalar; zero when the model has no MoE layer.
    pub aux_loss: Tensor,
}

impl<'a> Model<'a> {
    /// The model for evaluation: no dropout.
    pub fn new(cfg: &'a ModelConfig, params: &'a Params) -> Self {
        Self {
            cfg,
            params,
            spec: ModelSpec::new(cfg),
            noise: None,
        }
    }

    /// The model for one training step: the config's dropout, with masks drawn from `seed`
    /// (a function of the run's seed and the step, so a resumed run draws the same masks).
    pub fn training(cfg: &'a ModelConfig, params: &'a Params, seed: u64) -> Self {
        let noise = (!cfg.dropout.is_off()).then(|| RefCell::new(Rng::new(seed)));
        Self {
            noise,
            ..Self::new(cfg, params)
        }
    }

    /// `x` [B*T, d] times a mask drawn once per sequence and channel (`p` dropped, the rest
    /// scaled by 1 / (1 - p)).
    fn locked(&self, x: &Tensor, b: usize, t: usize, p: f64) -> Result<Tensor> {
        let d = x.dim(1)?;
        let Some(mask) = self.locked_mask(b, d, p) else {
            return Ok(x.clone());
        };
        let mask = Tensor::from_vec(mask, (b, 1, d), x.device())?;
        Ok(x.reshape((b, t, d))?
            .broadcast_mul(&mask)?
            .reshape((b * t, d))?)
    }

    /// A locked dropout mask [B, D] (one value per sequence and channel) when training with
    /// dropout `p`.
    fn locked_mask(&self, b: usize, d: usize, p: f64) -> Option<Vec<f32>> {
        let rng = self.noise.as_ref().filter(|_| p > 0.0)?;
        Some(bernoulli(&mut rng.borrow_mut(), b * d, p))
    }

    /// `x` times an independent mask per element.
    fn elementwise(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        let Some(rng) = self.noise.as_ref().filter(|_| p > 0.0) else {
            return Ok(x.clone());
        };
        let mask = bernoulli(&mut rng.borrow_mut(), x.elem_count(), p);
        Ok((x * Tensor::from_vec(mask, x.shape(), x.device())?)?)
    }

    /// Embedded tokens `x` [B*T, d] with whole token types dropped (one draw per token id).
    fn drop_token_types(&self, x: &Tensor, tokens: &Tensor, p: f64) -> Result<Tensor> {
        let Some(rng) = self.noise.as_ref().filter(|_| p > 0.0) else {
            return Ok(x.clone());
        };
        let ids = tokens.flatten_all()?.to_vec1::<u32>()?;
        let mut kept = std::collections::HashMap::new();
        let mut rng = rng.borrow_mut();
        let scale = (1.0 / (1.0 - p)) as f32;
        let mask: Vec<f32> = ids
            .iter()
            .map(|id| {
                *kept
                    .entry(*id)
                    .or_insert_with(|| if rng.uniform() < p { 0.0 } else { scale })
            })
            .collect();
        let n = mask.len();
        Ok(x.broadcast_mul(&Tensor::from_vec(mask, (n, 1), x.device())?)?)
    }

    /// The expert one MoE layer goes without in this training step, if any: one drawn at random
    /// (`dropout.routing`), else its spare, the last one (`dropout.spare`); never the only one.
    fn dropped_expert(&self, experts: usize) -> Option<usize> {
        let d = self.cfg.dropout;
        let rng = self.noise.as_ref().filter(|_| experts > 1)?;
        let mut rng = rng.borrow_mut();
        if d.routing > 0.0 && rng.uniform() < d.routing {
            return Some(rng.below(experts));
        }
        (d.spare > 0.0 && rng.uniform() < d.spare).then_some(experts - 1)
    }

    fn w(&self, spec: &itera_core::tensors::Spec) -> Result<&Tensor> {
        self.params.get(&spec.name)
    }

    /// tokens: u32 [B, T] -> final hidden states [B*T, d].
    pub fn forward(&self, tokens: &Tensor) -> Result<ForwardOutput> {
        let (b, t) = tokens.dims2()?;
        let cfg = self.cfg;
        let embed = self.w(&self.spec.embed)?;
        let mut x = embed.index_select(&tokens.flatten_all()?, 0)?; // [B*T, d]
        let drop = cfg.dropout;
        x = self.drop_token_types(&x, tokens, drop.embed)?;
        x = self.locked(&x, b, t, drop.input)?;
        if let Some(pos) = &self.spec.pos_embed {
            if t > cfg.context {
                return Err(Error::Train(format!(
                    "{t} tokens exceed the attention model's context of {}",
                    cfg.context
                )));
            }
            let pos = self.w(pos)?.narrow(0, 0, t)?;
            x = x
                .reshape((b, t, cfg.d_model))?
                .broadcast_add(&pos)?
                .reshape((b * t, cfg.d_model))?;
        }
        let mut aux_total = Tensor::zeros((), DType::F32, embed.device())?;
        for layer in &self.spec.layers {
            x = match &layer.mixer {
                MixerSpec::Ssm(m) if m.shared.is_none() => {
                    self.mixer_block(&x, b, t, &layer.norm, m, drop.residual)?
                }
                mixer => {
                    let h = rms_norm(&x, self.w(&layer.norm)?, cfg.norm_eps)?;
                    let mixed = match mixer {
                        MixerSpec::Ssm(m) => self.shared_mixer(&h, b, t, m)?,
                        MixerSpec::Attention(a) => self.attention(&h, b, t, a)?,
                    };
                    (x + self.locked(&mixed, b, t, drop.residual)?)?
                }
            };
            if let Some(moe) = &layer.moe {
                let aux;
                (x, aux) = self.moe(&x, b, t, moe)?;
                aux_total = (aux_total + aux)?;
            } else if let Some(ffn) = &layer.ffn {
                let h = rms_norm(&x, self.w(&ffn.norm)?, cfg.norm_eps)?;
                x = (x + self.locked(&self.swiglu(&h, &ffn.mlp)?, b, t, drop.residual)?)?;
            }
        }
        let hidden = rms_norm(&x, self.w(&self.spec.norm_f)?, cfg.norm_eps)?;
        let hidden = self.locked(&hidden, b, t, drop.output)?;
        let aux_loss = (aux_total / cfg.moe_layers.len().max(1) as f64)?;
        Ok(ForwardOutput { hidden, aux_loss })
    }

    /// tokens: u32 [B, T] -> logits [B*T, V] (and the aux loss).
    pub fn logits(&self, tokens: &Tensor) -> Result<(Tensor, Tensor)> {
        let out = self.forward(tokens)?;
        Ok((
            linear(&out.hidden, self.w(&self.spec.embed)?)?,
            out.aux_loss,
        ))
    }

    /// Mean next-token cross-entropy of `targets` [B, T] plus the aux loss, from one forward.
    /// The LM head and the loss are fused, so the [B*T, vocab] logits are never materialised.
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
        self.loss_after(inputs, targets, 0)
    }

    /// `loss` over the positions from `skip` on: the first `skip` of each sequence only warm
    /// the recurrent state (a burn-in; the LM head never sees them). The aux loss still covers
    /// every position the experts ran on.
    pub fn loss_after(
        &self,
        inputs: &Tensor,
        targets: &Tensor,
        skip: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (b, t) = targets.dims2()?;
        if skip >= t {
            return Err(Error::Train(format!(
                "a burn-in of {skip} tokens leaves nothing to score in windows of {t}"
            )));
        }
        let out = self.forward(inputs)?;
        let (hidden, targets) = if skip == 0 {
            (out.hidden, targets.clone())
        } else {
            let d = out.hidden.dim(1)?;
            let hidden = out.hidden.reshape((b, t, d))?.narrow(1, skip, t - skip)?;
            (
                hidden.contiguous()?.reshape((b * (t - skip), d))?,
                targets.narrow(1, skip, t - skip)?.contiguous()?,
            )
        };
        let ce = lm_head_loss(&hidden, self.w(&self.spec.embed)?, &targets.flatten_all()?)?;
        Ok((ce, out.aux_loss))
    }

    /// The distillation loss of `targets` [B, T] against the teacher's logits for the same rows
    /// (see `distill_loss`), plus the aux loss, from one forward.
    pub fn distill_loss(
        &self,
        inputs: &Tensor,
        targets: &Tensor,
        teacher: std::sync::Arc<dyn TeacherLogits>,
        spec: DistillLossSpec,
        parts: Parts,
    ) -> Result<(Tensor, Tensor)> {
        let out = self.forward(inputs)?;
        let targets = std::sync::Arc::new(targets.flatten_all()?.to_vec1::<u32>()?);
        let loss = distill_loss(
            &out.hidden,
            self.w(&self.spec.embed)?,
            targets,
            teacher,
            spec,
            parts,
        )?;
        Ok((loss, out.aux_loss))
    }

    /// A residual Mamba-1 block on x [B*T, d]: x + dropout(mixer(norm(x))), one fused op.
    fn mixer_block(
        &self,
        x: &Tensor,
        b: usize,
        t: usize,
        norm: &itera_core::tensors::Spec,
        m: &SsmSpec,
        dropout: f64,
    ) -> Result<Tensor> {
        let weights = MixerWeights {
            norm: self.w(norm)?,
            in_proj: self.w(&m.in_proj)?,
            conv: self.w(&m.conv)?,
            conv_bias: self.w(&m.conv_bias)?,
            x_proj: self.w(&m.x_proj)?,
            dt_proj: self.w(&m.dt_proj)?,
            a_log: self.w(&m.a_log)?,
            d: self.w(&m.d)?,
            dt_bias: self.w(&m.dt_bias)?,
            out_proj: self.w(&m.out_proj)?,
        };
        let mask = self.locked_mask(b, self.cfg.d_model, dropout);
        Ok(mixer_block(x, t, &weights, self.cfg.norm_eps, mask)?)
    }

    /// The shared-state SSM on h [B*T, d] -> [B*T, d]: as `mixer`, except that one N-dimensional
    /// state serves all channels. Each state value n gets its own step dt[n], is written with
    /// B[n] * (ssm_in · x)[n] and read as C[n] * h[n]; `ssm_out` maps the N readings back to d_inner.
    fn shared_mixer(&self, h: &Tensor, b: usize, t: usize, m: &SsmSpec) -> Result<Tensor> {
        let cfg = self.cfg;
        let (di, n, r) = (cfg.d_inner(), cfg.d_state, cfg.dt_rank);
        let (ssm_in, ssm_out) = m.shared.as_ref().expect("a shared-state mixer");
        let xz = linear(h, self.w(&m.in_proj)?)?;
        let xs = xz.narrow(1, 0, di)?.reshape((b, t, di))?;
        let z = xz.narrow(1, di, di)?;
        let xc =
            causal_conv_silu(&xs, self.w(&m.conv)?, self.w(&m.conv_bias)?)?.reshape((b * t, di))?;
        let dbc = linear(&xc, self.w(&m.x_proj)?)?; // [BT, R + 2N]
        let dt_raw = linear(&dbc.narrow(1, 0, r)?, self.w(&m.dt_proj)?)?.reshape((b, t, n))?;
        let written = (linear(&xc, self.w(ssm_in)?)? * dbc.narrow(1, r, n)?)?;
        // The fused scan with N channels of one state each; its B and C are 1 (applied here).
        let dev = h.device();
        let state = ssm_core_ungated(
            &written.reshape((b, t, n))?,
            &dt_raw,
            &Tensor::ones((b, t, 2), DType::F32, dev)?,
            &self.w(&m.a_log)?.reshape((n, 1))?,
            &Tensor::zeros(n, DType::F32, dev)?,
            self.w(&m.dt_bias)?,
        )?
        .reshape((b * t, n))?;
        let read = (state * dbc.narrow(1, r + n, n)?)?;
        let y = (linear(&read, self.w(ssm_out)?)? + xc.broadcast_mul(self.w(&m.d)?)?)?;
        let y = (y * z.silu()?)?;
        Ok(linear(&y, self.w(&m.out_proj)?)?)
    }

    /// Causal multi-head self-attention on h [B*T, d] -> [B*T, d].
    fn attention(&self, h: &Tensor, b: usize, t: usize, a: &AttentionSpec) -> Result<Tensor> {
        let cfg = self.cfg;
        let (d, heads) = (cfg.d_model, cfg.n_heads);
        let hd = d / heads;
        let qkv = linear(h, self.w(&a.qkv)?)?
            .reshape((b, t, 3, heads, hd))?
            .permute((2, 0, 3, 1, 4))?; // [3, B, H, T, hd]
        let (q, k, v) = (
            qkv.get(0)?.contiguous()?,
            qkv.get(1)?.contiguous()?,
            qkv.get(2)?.contiguous()?,
        );
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (hd as f64).sqrt())?;
        // Large negative instead of -inf: exp underflows to exactly 0 and gradients stay finite.
        let mask: Vec<f32> = (0..t * t)
            .map(|i| if i % t > i / t { -1e9 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), h.device())?;
        let probs = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, D::Minus1)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * t, d))?;
        Ok(linear(&out, self.w(&a.out_proj)?)?)
    }

    /// SwiGLU feed-forward on h [N, d].
    fn swiglu(&self, h: &Tensor, m: &SwigluSpec) -> Result<Tensor> {
        let w = [self.w(&m.gate)?, self.w(&m.up)?, self.w(&m.down)?];
        swiglu_mlp(h, w, &|a| self.elementwise(&a, self.cfg.dropout.expert))
    }

    /// A residual block of top-k MoE of SwiGLU experts on x [N, d]: returns
    /// (x + dropout(moe(norm(x))) [N, d], load-balancing loss). The block runs as one fused op
    /// unless dropout inside the experts is on for this step.
    fn moe(&self, x: &Tensor, b: usize, t: usize, moe: &MoeSpec) -> Result<(Tensor, Tensor)> {
        let (cfg, e_count) = (self.cfg, moe.experts.len());
        let k = cfg.top_k.min(e_count);
        let (norm, router) = (self.w(&moe.norm)?, self.w(&moe.router)?);
        let logits = normed_linear(x, norm, router, cfg.norm_eps)?;
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?; // [N, E]
        let mut values = probs.flatten_all()?.to_vec1()?;
        let k = match self.dropped_expert(e_count) {
            Some(out) => {
                // Below every probability: top-k never picks it, and the gates renormalise
                // over the experts chosen, as the router of a pruned model does.
                values
                    .iter_mut()
                    .skip(out)
                    .step_by(e_count)
                    .for_each(|p| *p = -1.0);
                k.min(e_count - 1)
            }
            None => k,
        };
        let routing = Routing::new(&values, e_count, k);
        let experts = moe
            .experts
            .iter()
            .map(|x| Ok([self.w(&x.gate)?, self.w(&x.up)?, self.w(&x.down)?]))
            .collect::<Result<Vec<_>>>()?;
        let (p, residual) = (cfg.dropout.expert, cfg.dropout.residual);
        let load = Tensor::from_vec(routing.load(), e_count, x.device())?;
        let out = if self.noise.is_some() && p > 0.0 {
            let h = rms_norm(x, norm, cfg.norm_eps)?;
            let out = moe_composite(&h, &probs, &experts, &routing, &|a| self.elementwise(&a, p))?;
            (x + self.locked(&out, b, t, residual)?)?
        } else {
            let mask = self.locked_mask(b, cfg.d_model, residual);
            let routing = std::sync::Arc::new(routing);
            moe_block(x, &probs, &experts, routing, (norm, cfg.norm_eps), t, mask)?
        };
        // Switch load balancing: E * sum_e f_e * P_e, f_e = share of routed slots, P_e = mean prob.
        let aux = ((probs.mean(0)? * load)?.sum_all()? * e_count as f64)?;
        Ok((out, aux))
    }
}

/// `n` mask values: 0 with probability `p`, else 1 / (1 - p).
fn bernoulli(rng: &mut Rng, n: usize, p: f64) -> Vec<f32> {
    let scale = (1.0 / (1.0 - p)) as f32;
    (0..n)
        .map(|_| if rng.uniform() < p { 0.0 } else { scale })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The attention baseline is causal: changing a later token leaves earlier logits alone.
    #[test]
    fn attention_is_causal_and_bounded_by_its_context() {
        let mut cfg = ModelConfig::preset("transformer-tiny").unwrap();
        cfg.vocab_size = 50;
        cfg.context = 12;
        let w = Params::from_weights(&itera_core::Weights::init(&cfg, 2).unwrap()).unwrap();
        let model = Model::new(&cfg, &w);
        let run = |toks: &[u32]| {
            let t = Tensor::new(toks, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            model.logits(&t).unwrap().0.to_vec2::<f32>().unwrap()
        };
        let a: Vec<u32> = (0..12).map(|i| (i * 7 % 50) as u32).collect();
        let mut b = a.clone();
        b[8] = 49;
        let (la, lb) = (run(&a), run(&b));
        for i in 0..12 {
            let diff = la[i]
                .iter()
                .zip(&lb[i])
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            if i < 8 {
                assert!(diff < 1e-5, "position {i} saw a later token ({diff})");
            } else {
                assert!(diff > 1e-4, "position {i} ignored token 8");
            }
        }
        let long = Tensor::zeros((1, 13), DType::U32, &Device::Cpu).unwrap();
        let err = model.logits(&long).err().unwrap().to_string();
        assert!(err.contains("context"), "{err}");
    }

    /// Inputs [b, t] of tokens below `vocab` and their targets (each token's successor).
    fn next_token_batch(b: usize, t: usize, vocab: u32) -> (Tensor, Tensor) {
        let toks: Vec<u32> = (0..(b * t) as u32).map(|i| i * 7 % vocab).collect();
        let next = toks.iter().map(|t| (t + 1) % vocab).collect::<Vec<_>>();
        let dev = &Device::Cpu;
        (
            Tensor::from_vec(toks, (b, t), dev).unwrap(),
            Tensor::from_vec(next, (b, t), dev).unwrap(),
        )
    }

    /// Routing dropout: in a step where a MoE layer goes without an expert, that expert gets no
    /// tokens (no gradient reaches its weights, which it does without the dropout), the loss
    /// differs from the plain one, and the same seed repeats it.
    #[test]
    fn routing_dropout_leaves_one_expert_out_of_a_step() {
        use candle_core::Var;
        use std::collections::BTreeMap;
        let mut cfg = ModelConfig::preset("micro").unwrap();
        cfg.vocab_size = 60;
        let spec = ModelSpec::new(&cfg);
        let layer = cfg.moe_layers[0];
        let experts = spec.layers[layer].moe.as_ref().unwrap().experts.clone();
        let weights = itera_core::Weights::init(&cfg, 2).unwrap();
        let vars: BTreeMap<String, Var> = Params::from_weights(&weights)
            .unwrap()
            .tensors
            .into_iter()
            .map(|(k, t)| (k, Var::from_tensor(&t).unwrap()))
            .collect();
        let w = Params {
            tensors: vars
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect(),
        };
        let (x, y) = next_token_batch(2, 24, 60);
        // The gradient's size on each expert's gate weight of the first MoE layer.
        let step = |cfg: &ModelConfig, seed: Option<u64>| {
            let m = match seed {
                Some(s) => Model::training(cfg, &w, s),
                None => Model::new(cfg, &w),
            };
            let loss = m.loss(&x, &y).unwrap().0;
            let grads = loss.backward().unwrap();
            let sizes: Vec<f32> = experts
                .iter()
                .map(|e| match grads.get(vars[&e.gate.name].as_tensor()) {
                    Some(g) => g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap(),
                    None => 0.0,
                })
                .collect();
            (loss.to_scalar::<f32>().unwrap(), sizes)
        };
        let (plain, all) = step(&cfg, None);
        assert!(all.iter().all(|&g| g > 0.0), "every expert trains: {all:?}");
        cfg.dropout.routing = 0.9;
        // The draws `dropped_expert` makes, the first MoE layer's first: a seed that drops one.
        let (seed, out) = (0..100u64)
            .find_map(|s| {
                let mut rng = Rng::new(s);
                (rng.uniform() < 0.9).then(|| (s, rng.below(experts.len())))
            })
            .unwrap();
        let (loss, sizes) = step(&cfg, Some(seed));
        assert_eq!(sizes[out], 0.0, "expert {out} was left out: {sizes:?}");
        assert_eq!(
            sizes.iter().filter(|&&g| g > 0.0).count(),
            experts.len() - 1
        );
        assert_ne!(loss, plain);
        assert_eq!(loss, step(&cfg, Some(seed)).0);
        assert_eq!(plain, step(&cfg, None).0, "evaluation ignores it");
        // The spare: always the last expert, drawn with its own probability.
        cfg.dropout.routing = 0.0;
        cfg.dropout.spare = 0.9;
        let seed = (0..100u64).find(|&s| Rng::new(s).uniform() < 0.9).unwrap();
        let sizes = step(&cfg, Some(seed)).1;
        let last = experts.len() - 1;
        assert_eq!(sizes[last], 0.0, "the spare was left out: {sizes:?}");
        assert!(sizes[..last].iter().all(|&g| g > 0.0), "{sizes:?}");
        let kept = (0..100u64).find(|&s| Rng::new(s).uniform() >= 0.9).unwrap();
        assert!(step(&cfg, Some(kept)).1.iter().all(|&g| g > 0.0));
    }

    /// Dropout: off for `Model::new` (exactly the evaluation forward), on for `training`, where
    /// the same seed gives the same masks, locked masks repeat across time, and the loss is the
    /// evaluation loss in expectation only (it differs per draw).
    #[test]
    fn dropout_is_training_only_seeded_and_locked() {
        use itera_core::config::Dropout;
        let mut cfg = ModelConfig::preset("micro").unwrap();
        cfg.vocab_size = 60;
        let w = Params::from_weights(&itera_core::Weights::init(&cfg, 2).unwrap()).unwrap();
        let (x, y) = next_token_batch(2, 12, 60);
        let loss = |m: &Model| m.loss(&x, &y).unwrap().0.to_scalar::<f32>().unwrap();
        let plain = loss(&Model::new(&cfg, &w));
        assert_eq!(
            plain,
            loss(&Model::training(&cfg, &w, 5)),
            "no dropout configured"
        );
        cfg.dropout = Dropout {
            embed: 0.1,
            input: 0.2,
            residual: 0.2,
            output: 0.3,
            expert: 0.2,
            routing: 0.3,
            spare: 0.2,
        };
        assert_eq!(
            plain,
            loss(&Model::new(&cfg, &w)),
            "evaluation ignores dropout"
        );
        let (a, b, c) = (
            loss(&Model::training(&cfg, &w, 5)),
            loss(&Model::training(&cfg, &w, 5)),
            loss(&Model::training(&cfg, &w, 6)),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, plain);
        // Locked: a mask of shape [B, 1, d] scales every position of a sequence alike.
        let m = Model::training(&cfg, &w, 9);
        let ones = Tensor::ones((24, 32), DType::F32, &Device::Cpu).unwrap();
        let dropped = m
            .locked(&ones, 2, 12, 0.5)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for seq in 0..2 {
            for t in 1..12 {
                assert_eq!(dropped[seq * 12 + t], dropped[seq * 12]);
            }
            assert!(dropped[seq * 12].iter().all(|&v| v == 0.0 || v == 2.0));
        }
    }

    /// A burn-in scores only the positions after it: the same value as the cross-entropy of the
    /// full forward's logits at those positions (the state still runs through the burn-in, so
    /// it differs from scoring the tail alone).
    #[test]
    fn burn_in_scores_only_the_positions_after_it() {
        let mut cfg = ModelConfig::preset("micro").unwrap();
        cfg.vocab_size = 60;
        let w = Params::from_weights(&itera_core::Weights::init(&cfg, 3).unwrap()).unwrap();
        let (b, t, skip) = (2, 12, 5);
        let toks: Vec<u32> = (0..b * t).map(|i| (i * 11 % 60) as u32).collect();
        let next: Vec<u32> = toks.iter().map(|t| (t * 3 + 1) % 60).collect();
        let x = Tensor::from_vec(toks.clone(), (b, t), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(next.clone(), (b, t), &Device::Cpu).unwrap();
        let model = Model::new(&cfg, &w);
        let logits = model.logits(&x).unwrap().0.to_vec2::<f32>().unwrap();
        let mut want = 0.0f64;
        for s in 0..b {
            for p in skip..t {
                let row = &logits[s * t + p];
                let max = row.iter().fold(f32::MIN, |m, &v| m.max(v)) as f64;
                let lse = max
                    + row
                        .iter()
                        .map(|&v| (v as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                want += lse - row[next[s * t + p] as usize] as f64;
            }
        }
        want /= (b * (t - skip)) as f64;
        let got = model.loss_after(&x, &y, skip).unwrap().0;
        assert!((got.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-5);
        // Scoring the tail alone (no burn-in) is a different number: the state matters.
        let tail = |v: &Tensor| v.narrow(1, skip, t - skip).unwrap().contiguous().unwrap();
        let alone = model.loss(&tail(&x), &tail(&y)).unwrap().0;
        assert!((alone.to_scalar::<f32>().unwrap() as f64 - want).abs() > 1e-4);
        assert_eq!(
            model
                .loss_after(&x, &y, 0)
                .unwrap()
                .0
                .to_scalar::<f32>()
                .unwrap(),
            model.loss(&x, &y).unwrap().0.to_scalar::<f32>().unwrap()
        );
        let err = model.loss_after(&x, &y, t).err().unwrap().to_string();
        assert!(err.contains("nothing to score"), "{err}");
    }
}
