//! Recurrent decoding: O(1) work per token over packed f32 weights, no graph and no allocation
//! per token. `step` must agree with `Model::forward` (tested to 1e-4 on logits).

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::top_k_into;
use crate::scan::{scan_step, silu, softplus};
use crate::weights::Weights;

/// y[r] = sum_c w[r, c] * x[c] for a row-major matrix w [rows, x.len()].
#[inline(always)]
pub fn matvec(w: &[f32], x: &[f32], y: &mut [f32]) {
    let cols = x.len();
    for (row, out) in w.chunks_exact(cols).zip(y.iter_mut()) {
        *out = dot(row, x);
    }
}

pub use crate::math::dot;

#[inline(always)]
fn rms_norm(x: &[f32], w: &[f32], eps: f64, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps as f32).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

struct Expert {
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

struct Moe {
    norm: Vec<f32>,
    router: Vec<f32>,
    experts: Vec<Expert>,
}

struct Layer {
    norm: Vec<f32>,
    in_proj: Vec<f32>,
    conv_w: Vec<f32>,
    conv_b: Vec<f32>,
    x_proj: Vec<f32>,
    dt_w: Vec<f32>,
    dt_b: Vec<f32>,
    /// A = -exp(A_log), precomputed.
    a: Vec<f32>,
    d_skip: Vec<f32>,
    out_proj: Vec<f32>,
    moe: Option<Moe>,
}

/// Packed weights for the recurrent step.
pub struct Runtime {
    pub cfg: ModelConfig,
    embed: Vec<f32>,
    layers: Vec<Layer>,
    norm_f: Vec<f32>,
}

/// Per-layer recurrent state: the last d_conv-1 conv inputs (a ring) and the SSM state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerState {
    /// [(d_conv - 1) * d_inner], slot `ring_pos` is the oldest input.
    pub conv: Vec<f32>,
    /// [d_inner * d_state]
    pub ssm: Vec<f32>,
}

/// Everything the model remembers about the tokens seen so far.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub layers: Vec<LayerState>,
    pub ring_pos: usize,
    /// Tokens consumed so far.
    pub position: usize,
}

/// Work buffers reused across steps.
pub struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    xz: Vec<f32>,
    xc: Vec<f32>,
    dbc: Vec<f32>,
    dt: Vec<f32>,
    y: Vec<f32>,
    out: Vec<f32>,
    probs: Vec<f32>,
    chosen: Vec<usize>,
    hid_g: Vec<f32>,
    hid_u: Vec<f32>,
    pub logits: Vec<f32>,
}

impl Runtime {
    pub fn new(cfg: &ModelConfig, w: &Weights) -> Result<Self> {
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let p = format!("layers.{l}");
            let m = |s: &str| w.values(&format!("{p}.mixer.{s}"));
            let moe = if cfg.is_moe_layer(l) {
                let experts = (0..cfg.n_experts)
                    .map(|e| {
                        let ep = format!("{p}.moe.experts.{e}");
                        Ok(Expert {
                            gate: w.values(&format!("{ep}.gate.weight"))?,
                            up: w.values(&format!("{ep}.up.weight"))?,
                            down: w.values(&format!("{ep}.down.weight"))?,
                        })
                    })
                    .collect::<Result<_>>()?;
                Some(Moe {
                    norm: w.values(&format!("{p}.moe_norm.weight"))?,
                    router: w.values(&format!("{p}.moe.router.weight"))?,
                    experts,
                })
            } else {
                None
            };
            layers.push(Layer {
                norm: w.values(&format!("{p}.norm.weight"))?,
                in_proj: m("in_proj.weight")?,
                conv_w: m("conv.weight")?,
                conv_b: m("conv.bias")?,
                x_proj: m("x_proj.weight")?,
                dt_w: m("dt_proj.weight")?,
                dt_b: m("dt_proj.bias")?,
                a: m("A_log")?.iter().map(|v| -v.exp()).collect(),
                d_skip: m("D")?,
                out_proj: m("out_proj.weight")?,
                moe,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            embed: w.values("embed.weight")?,
            layers,
            norm_f: w.values("norm_f.weight")?,
        })
    }

    pub fn new_state(&self) -> State {
        let (di, n, k) = (self.cfg.d_inner(), self.cfg.d_state, self.cfg.d_conv);
        State {
            layers: (0..self.cfg.n_layers)
                .map(|_| LayerState {
                    conv: vec![0.0; (k - 1) * di],
                    ssm: vec![0.0; di * n],
                })
                .collect(),
            ring_pos: 0,
            position: 0,
        }
    }

    pub fn new_scratch(&self) -> Scratch {
        let c = &self.cfg;
        let (d, di) = (c.d_model, c.d_inner());
        Scratch {
            x: vec![0.0; d],
            h: vec![0.0; d],
            xz: vec![0.0; 2 * di],
            xc: vec![0.0; di],
            dbc: vec![0.0; c.dt_rank + 2 * c.d_state],
            dt: vec![0.0; di],
            y: vec![0.0; di],
            out: vec![0.0; d],
            probs: vec![0.0; c.n_experts],
            chosen: Vec::with_capacity(c.n_experts),
            hid_g: vec![0.0; c.expert_hidden],
            hid_u: vec![0.0; c.expert_hidden],
            logits: vec![0.0; c.vocab_size],
        }
    }

    /// Checks that a state (e.g. one deserialised from disk) fits this model.
    pub fn check_state(&self, s: &State) -> Result<()> {
        let fresh = self.new_state();
        let ok = s.layers.len() == fresh.layers.len()
            && s.ring_pos < self.cfg.d_conv.max(2) - 1
            && s.layers
                .iter()
                .zip(&fresh.layers)
                .all(|(a, b)| a.conv.len() == b.conv.len() && a.ssm.len() == b.ssm.len());
        if ok {
            Ok(())
        } else {
            Err(Error::Argument(
                "state does not match this model's shape".into(),
            ))
        }
    }

    /// Consumes one token; on return `scratch.logits` holds the next-token logits.
    pub fn step(&self, token: u32, state: &mut State, s: &mut Scratch) -> Result<()> {
        step_fast(self, token, state, s)
    }

    // Channel loops index several per-channel arrays at once; iterator zips would hide that.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    fn step_kernel(&self, token: u32, state: &mut State, s: &mut Scratch) -> Result<()> {
        let c = &self.cfg;
        let (d, di, n, r, k) = (c.d_model, c.d_inner(), c.d_state, c.dt_rank, c.d_conv);
        let tok = token as usize;
        if tok >= c.vocab_size {
            return Err(Error::Argument(format!(
                "token id {tok} out of range for vocab {}",
                c.vocab_size
            )));
        }
        s.x.copy_from_slice(&self.embed[tok * d..(tok + 1) * d]);
        let ring = state.ring_pos;
        for (layer, ls) in self.layers.iter().zip(state.layers.iter_mut()) {
            rms_norm(&s.x, &layer.norm, c.norm_eps, &mut s.h);
            matvec(&layer.in_proj, &s.h, &mut s.xz);
            let (xs, z) = s.xz.split_at(di);
            // Conv over [oldest .. newest stored inputs, current input].
            for ch in 0..di {
                let wrow = &layer.conv_w[ch * k..(ch + 1) * k];
                let mut acc = layer.conv_b[ch];
                for j in 0..k - 1 {
                    let slot = (ring + j) % (k - 1);
                    acc += wrow[j] * ls.conv[slot * di + ch];
                }
                acc += wrow[k - 1] * xs[ch];
                s.xc[ch] = silu(acc);
            }
            if k > 1 {
                ls.conv[ring * di..(ring + 1) * di].copy_from_slice(xs);
            }
            matvec(&layer.x_proj, &s.xc, &mut s.dbc);
            let (dt_low, bc) = s.dbc.split_at(r);
            matvec(&layer.dt_w, dt_low, &mut s.dt);
            for (v, b) in s.dt.iter_mut().zip(&layer.dt_b) {
                *v = softplus(*v + b);
            }
            scan_step(
                &s.xc,
                &s.dt,
                &layer.a,
                &bc[..n],
                &bc[n..],
                &mut ls.ssm,
                &mut s.y,
            );
            for ch in 0..di {
                s.y[ch] = (s.y[ch] + layer.d_skip[ch] * s.xc[ch]) * silu(z[ch]);
            }
            matvec(&layer.out_proj, &s.y, &mut s.out);
            for (a, b) in s.x.iter_mut().zip(&s.out) {
                *a += b;
            }
            if let Some(moe) = &layer.moe {
                self.moe_step(moe, s);
            }
        }
        rms_norm(&s.x, &self.norm_f, c.norm_eps, &mut s.h);
        matvec(&self.embed, &s.h, &mut s.logits);
        if k > 1 {
            state.ring_pos = (ring + 1) % (k - 1);
        }
        state.position += 1;
        Ok(())
    }

    #[inline(always)]
    fn moe_step(&self, moe: &Moe, s: &mut Scratch) {
        let c = &self.cfg;
        rms_norm(&s.x, &moe.norm, c.norm_eps, &mut s.h);
        matvec(&moe.router, &s.h, &mut s.probs);
        let max = s.probs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for p in s.probs.iter_mut() {
            *p = (*p - max).exp();
            sum += *p;
        }
        for p in s.probs.iter_mut() {
            *p /= sum;
        }
        top_k_into(&s.probs, c.top_k, &mut s.chosen);
        let norm: f32 = s.chosen.iter().map(|&e| s.probs[e]).sum();
        for &e in &s.chosen {
            let ex = &moe.experts[e];
            matvec(&ex.gate, &s.h, &mut s.hid_g);
            matvec(&ex.up, &s.h, &mut s.hid_u);
            for (g, u) in s.hid_g.iter_mut().zip(&s.hid_u) {
                *g = silu(*g) * u;
            }
            matvec(&ex.down, &s.hid_g, &mut s.out);
            let gate = s.probs[e] / norm;
            for (a, b) in s.x.iter_mut().zip(&s.out) {
                *a += gate * b;
            }
        }
    }

    /// Runs a whole token sequence through the state; returns the logits after the last one.
    pub fn prefill(&self, tokens: &[u32], state: &mut State, s: &mut Scratch) -> Result<()> {
        for &t in tokens {
            self.step(t, state, s)?;
        }
        Ok(())
    }
}

crate::multiversion! {
    fn step_fast(rt: &Runtime, token: u32, state: &mut State, s: &mut Scratch) -> Result<()> {
        rt.step_kernel(token, state, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::rng::Rng;
    use candle_core::{Device, Tensor};

    fn max_diff_forward_vs_step(preset: &str, len: usize) -> f32 {
        let cfg = ModelConfig::preset(preset).unwrap();
        let w = Weights::init(&cfg, 3).unwrap();
        let mut rng = Rng::new(11);
        let tokens: Vec<u32> = (0..len).map(|_| rng.below(cfg.vocab_size) as u32).collect();
        let t = Tensor::new(tokens.as_slice(), &Device::Cpu)
            .unwrap()
            .reshape((1, len))
            .unwrap();
        let logits = Model::new(&cfg, &w)
            .logits(&t)
            .unwrap()
            .0
            .to_vec2::<f32>()
            .unwrap();
        let rt = Runtime::new(&cfg, &w).unwrap();
        let (mut st, mut sc) = (rt.new_state(), rt.new_scratch());
        let mut worst = 0f32;
        for (i, &tok) in tokens.iter().enumerate() {
            rt.step(tok, &mut st, &mut sc).unwrap();
            for (a, b) in sc.logits.iter().zip(&logits[i]) {
                worst = worst.max((a - b).abs());
            }
        }
        worst
    }

    #[test]
    fn step_agrees_with_forward_for_every_preset() {
        for preset in ["micro", "tiny", "small", "medium"] {
            let diff = max_diff_forward_vs_step(preset, 128);
            assert!(diff < 1e-4, "{preset}: max |logit diff| {diff}");
        }
    }

    #[test]
    fn state_roundtrips_and_resumes_identically() {
        let cfg = ModelConfig::preset("micro").unwrap();
        let rt = Runtime::new(&cfg, &Weights::init(&cfg, 5).unwrap()).unwrap();
        let (mut st, mut sc) = (rt.new_state(), rt.new_scratch());
        rt.prefill(&[1, 2, 3, 4, 5], &mut st, &mut sc).unwrap();
        let saved: State = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        rt.check_state(&saved).unwrap();
        let mut restored = saved.clone();
        rt.step(9, &mut st, &mut sc).unwrap();
        let a = sc.logits.clone();
        rt.step(9, &mut restored, &mut sc).unwrap();
        assert_eq!(a, sc.logits);
        assert!(rt.step(8000, &mut st, &mut sc).is_err());
    }
}
