//! The parallel forward pass over a batch of sequences, built from candle ops so that it trains.
//! Decoding uses `runtime::Runtime::step`, which must agree with this to ~1e-5.

use candle_core::{DType, Tensor, D};

use crate::config::{Mixer, ModelConfig};
use crate::error::{Error, Result};
use crate::fused::{causal_conv_silu, rms_norm};
use crate::loss::lm_head_loss;
use crate::scan::{ssm_core, ssm_core_ungated};
use crate::weights::Weights;

/// A model view over named tensors (plain tensors for inference, `Var`-backed ones for training).
pub struct Model<'a> {
    pub cfg: &'a ModelConfig,
    pub weights: &'a Weights,
}

/// What a forward pass returns: the final hidden states and the MoE load-balancing loss (mean over
/// MoE layers). Logits are `hidden · embed^T` (see `logits`; training fuses this with the loss).
pub struct ForwardOutput {
    /// [B * T, d_model], after the final norm.
    pub hidden: Tensor,
    /// Scalar; zero when the model has no MoE layer.
    pub aux_loss: Tensor,
}

fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.matmul(&w.t()?)
}

impl<'a> Model<'a> {
    pub fn new(cfg: &'a ModelConfig, weights: &'a Weights) -> Self {
        Self { cfg, weights }
    }

    fn w(&self, name: &str) -> Result<&Tensor> {
        self.weights.get(name)
    }

    /// tokens: u32 [B, T] -> final hidden states [B*T, d].
    pub fn forward(&self, tokens: &Tensor) -> Result<ForwardOutput> {
        let (b, t) = tokens.dims2()?;
        let cfg = self.cfg;
        let embed = self.w("embed.weight")?;
        let mut x = embed.index_select(&tokens.flatten_all()?, 0)?; // [B*T, d]
        if cfg.mixer == Mixer::Attention {
            if t > cfg.context {
                return Err(Error::Argument(format!(
                    "{t} tokens exceed the attention model's context of {}",
                    cfg.context
                )));
            }
            let pos = self.w("pos_embed.weight")?.narrow(0, 0, t)?;
            x = x
                .reshape((b, t, cfg.d_model))?
                .broadcast_add(&pos)?
                .reshape((b * t, cfg.d_model))?;
        }
        let mut aux_total = Tensor::zeros((), DType::F32, embed.device())?;
        for l in 0..cfg.n_layers {
            let p = format!("layers.{l}");
            let h = rms_norm(&x, self.w(&format!("{p}.norm.weight"))?, cfg.norm_eps)?;
            let mixed = match cfg.mixer {
                Mixer::Selective => self.mixer(&h, b, t, &p)?,
                Mixer::SharedState => self.shared_mixer(&h, b, t, &p)?,
                Mixer::Attention => self.attention(&h, b, t, &p)?,
            };
            x = (x + mixed)?;
            if cfg.is_moe_layer(l) {
                let h = rms_norm(&x, self.w(&format!("{p}.moe_norm.weight"))?, cfg.norm_eps)?;
                let (out, aux) = self.moe(&h, &p)?;
                x = (x + out)?;
                aux_total = (aux_total + aux)?;
            } else if cfg.ffn_hidden > 0 {
                let h = rms_norm(&x, self.w(&format!("{p}.ffn_norm.weight"))?, cfg.norm_eps)?;
                x = (x + self.swiglu(&h, &format!("{p}.ffn"))?)?;
            }
        }
        let hidden = rms_norm(&x, self.w("norm_f.weight")?, cfg.norm_eps)?;
        let aux_loss = (aux_total / cfg.moe_layers.len().max(1) as f64)?;
        Ok(ForwardOutput { hidden, aux_loss })
    }

    /// tokens: u32 [B, T] -> logits [B*T, V] (and the aux loss).
    pub fn logits(&self, tokens: &Tensor) -> Result<(Tensor, Tensor)> {
        let out = self.forward(tokens)?;
        Ok((linear(&out.hidden, self.w("embed.weight")?)?, out.aux_loss))
    }

    /// Mean next-token cross-entropy of `targets` [B, T] plus the aux loss, from one forward.
    /// The LM head and the loss are fused, so the [B*T, vocab] logits are never materialised.
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
        let out = self.forward(inputs)?;
        let ce = lm_head_loss(
            &out.hidden,
            self.w("embed.weight")?,
            &targets.flatten_all()?,
        )?;
        Ok((ce, out.aux_loss))
    }

    /// Mamba-1 mixer on h [B*T, d] -> [B*T, d].
    fn mixer(&self, h: &Tensor, b: usize, t: usize, p: &str) -> Result<Tensor> {
        let cfg = self.cfg;
        let (di, n, r) = (cfg.d_inner(), cfg.d_state, cfg.dt_rank);
        let w = |s: &str| self.w(&format!("{p}.mixer.{s}"));
        let xz = linear(h, w("in_proj.weight")?)?; // [BT, 2Di]
        let xs = xz.narrow(1, 0, di)?.reshape((b, t, di))?;
        let z = xz.narrow(1, di, di)?.reshape((b, t, di))?;
        let xc = causal_conv_silu(&xs, w("conv.weight")?, w("conv.bias")?)?; // [B, T, Di]
        let dbc = linear(&xc.reshape((b * t, di))?, w("x_proj.weight")?)?; // [BT, R + 2N]
        let dt_raw = linear(&dbc.narrow(1, 0, r)?, w("dt_proj.weight")?)?.reshape((b, t, di))?;
        let bc = dbc.narrow(1, r, 2 * n)?.reshape((b, t, 2 * n))?;
        let y = ssm_core(
            &xc,
            &dt_raw,
            &z,
            &bc,
            w("A_log")?,
            w("D")?,
            w("dt_proj.bias")?,
        )?;
        let y = y.reshape((b * t, di))?;
        Ok(linear(&y, w("out_proj.weight")?)?)
    }

    /// The shared-state SSM on h [B*T, d] -> [B*T, d]: as `mixer`, except that one N-dimensional
    /// state serves all channels. Each state value n gets its own step dt[n], is written with
    /// B[n] * (ssm_in · x)[n] and read as C[n] * h[n]; `ssm_out` maps the N readings back to d_inner.
    fn shared_mixer(&self, h: &Tensor, b: usize, t: usize, p: &str) -> Result<Tensor> {
        let cfg = self.cfg;
        let (di, n, r) = (cfg.d_inner(), cfg.d_state, cfg.dt_rank);
        let w = |s: &str| self.w(&format!("{p}.mixer.{s}"));
        let xz = linear(h, w("in_proj.weight")?)?;
        let xs = xz.narrow(1, 0, di)?.reshape((b, t, di))?;
        let z = xz.narrow(1, di, di)?;
        let xc = causal_conv_silu(&xs, w("conv.weight")?, w("conv.bias")?)?.reshape((b * t, di))?;
        let dbc = linear(&xc, w("x_proj.weight")?)?; // [BT, R + 2N]
        let dt_raw = linear(&dbc.narrow(1, 0, r)?, w("dt_proj.weight")?)?.reshape((b, t, n))?;
        let written = (linear(&xc, w("ssm_in.weight")?)? * dbc.narrow(1, r, n)?)?;
        // The fused scan with N channels of one state each; its B and C are 1 (applied here).
        let dev = h.device();
        let state = ssm_core_ungated(
            &written.reshape((b, t, n))?,
            &dt_raw,
            &Tensor::ones((b, t, 2), DType::F32, dev)?,
            &w("A_log")?.reshape((n, 1))?,
            &Tensor::zeros(n, DType::F32, dev)?,
            w("dt_proj.bias")?,
        )?
        .reshape((b * t, n))?;
        let read = (state * dbc.narrow(1, r + n, n)?)?;
        let y = (linear(&read, w("ssm_out.weight")?)? + xc.broadcast_mul(w("D")?)?)?;
        let y = (y * z.silu()?)?;
        Ok(linear(&y, w("out_proj.weight")?)?)
    }

    /// Causal multi-head self-attention on h [B*T, d] -> [B*T, d].
    fn attention(&self, h: &Tensor, b: usize, t: usize, p: &str) -> Result<Tensor> {
        let cfg = self.cfg;
        let (d, heads) = (cfg.d_model, cfg.n_heads);
        let hd = d / heads;
        let w = |s: &str| self.w(&format!("{p}.mixer.{s}"));
        let qkv = linear(h, w("qkv.weight")?)?
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
        Ok(linear(&out, w("out_proj.weight")?)?)
    }

    /// SwiGLU feed-forward `prefix.{gate,up,down}` on h [N, d].
    fn swiglu(&self, h: &Tensor, prefix: &str) -> Result<Tensor> {
        let w = |s: &str| self.w(&format!("{prefix}.{s}.weight"));
        let g = linear(h, w("gate")?)?.silu()?;
        let u = linear(h, w("up")?)?;
        Ok(linear(&(g * u)?, w("down")?)?)
    }

    /// Top-k MoE of SwiGLU experts on h [N, d]; returns (output [N, d], load-balancing loss).
    fn moe(&self, h: &Tensor, p: &str) -> Result<(Tensor, Tensor)> {
        let cfg = self.cfg;
        let (n_tok, e_count, k) = (h.dim(0)?, cfg.n_experts, cfg.top_k);
        let router = self.w(&format!("{p}.moe.router.weight"))?;
        let probs = candle_nn::ops::softmax(&linear(h, router)?, D::Minus1)?; // [N, E]
        let probs_v = probs.to_vec2::<f32>()?;
        let mut mask = vec![0f32; n_tok * e_count];
        let mut routed: Vec<Vec<u32>> = vec![Vec::new(); e_count];
        for (i, row) in probs_v.iter().enumerate() {
            for e in top_k(row, k) {
                mask[i * e_count + e] = 1.0;
                routed[e].push(i as u32);
            }
        }
        let mask = Tensor::from_vec(mask, (n_tok, e_count), h.device())?;
        let gated = (&probs * &mask)?;
        let gates = gated.broadcast_div(&gated.sum_keepdim(1)?)?;
        let mut out = h.zeros_like()?;
        for (e, idx) in routed.iter().enumerate() {
            if idx.is_empty() {
                continue;
            }
            let idx_t = Tensor::new(idx.as_slice(), h.device())?;
            let xe = h.index_select(&idx_t, 0)?;
            let ye = self.swiglu(&xe, &format!("{p}.moe.experts.{e}"))?;
            let ge = gates.index_select(&idx_t, 0)?.narrow(1, e, 1)?;
            out = out.index_add(&idx_t, &ye.broadcast_mul(&ge)?, 0)?;
        }
        // Switch load balancing: E * sum_e f_e * P_e, f_e = share of routed slots, P_e = mean prob.
        let f: Vec<f32> = routed
            .iter()
            .map(|r| r.len() as f32 / (n_tok * k) as f32)
            .collect();
        let f = Tensor::from_vec(f, e_count, h.device())?;
        let p_mean = probs.mean(0)?;
        let aux = ((p_mean * f)?.sum_all()? * e_count as f64)?;
        Ok((out, aux))
    }
}

/// Indices of the k largest values, largest first; ties go to the lower index.
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx = Vec::with_capacity(values.len());
    top_k_into(values, k, &mut idx);
    idx
}

/// `top_k` into a reused buffer (no allocation once it has grown to `values.len()`).
pub fn top_k_into(values: &[f32], k: usize, idx: &mut Vec<usize>) {
    idx.clear();
    idx.extend(0..values.len());
    idx.sort_by(|&a, &b| {
        values[b]
            .partial_cmp(&values[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    idx.truncate(k);
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
        let w = Weights::init(&cfg, 2).unwrap();
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
}
