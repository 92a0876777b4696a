//! The feed-forward half of a block: the MoE layer (router softmax, top-k with renormalised
//! weights, one matmul per expert over the rows routed to it) and the dense SwiGLU used on
//! layers without MoE. Both add their output to the residual stream `s.x`. Optionally skips a
//! token's weaker experts (`moe_skip_beta`) and records routing statistics (`RoutingStats`) and,
//! when asked, one layer's inputs (`Scratch::moe_inputs`).

use super::state::{grow, Scratch};
use super::{Ffn, Moe, Swiglu};
use crate::config::ModelConfig;
use crate::exec::Par;
use crate::kernels::QuantizedRows;
use crate::math::{rms_norm_rows, silu, top_k_into};

/// What the routers did over the calls made with a scratch that collects them: per MoE layer
/// and expert, how often it was chosen, its summed (renormalised) gate, and its summed
/// gate x norm of its output (REAP, Lasby et al. 2025), plus each token's second-to-first
/// routing weight ratio (what `moe_skip_beta` is chosen from).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RoutingStats {
    /// One entry per layer of the model (empty for layers without MoE).
    pub layers: Vec<LayerRouting>,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LayerRouting {
    /// Tokens routed through the layer.
    pub tokens: u64,
    /// Per expert: tokens routed to it.
    pub count: Vec<u64>,
    /// Per expert: summed gate weights of those tokens.
    pub gate_sum: Vec<f64>,
    /// Per expert: summed gate x L2 norm of the expert's output.
    pub reap_sum: Vec<f64>,
    /// Per token: second-highest over highest routing probability (top_k >= 2 only).
    #[serde(skip)]
    pub ratios: Vec<f32>,
    /// Tokens whose weaker experts were skipped (`moe_skip_beta`).
    pub skipped: u64,
}

impl RoutingStats {
    /// Empty statistics for `cfg`'s MoE layers.
    pub fn new(cfg: &ModelConfig) -> Self {
        let layers = (0..cfg.n_layers)
            .map(|l| {
                let e = if cfg.is_moe_layer(l) {
                    cfg.experts_in_layer(l)
                } else {
                    0
                };
                LayerRouting {
                    count: vec![0; e],
                    gate_sum: vec![0.0; e],
                    reap_sum: vec![0.0; e],
                    ..Default::default()
                }
            })
            .collect();
        Self { layers }
    }
}

/// One token's routing: its router logits `p` become the softmax over the experts and `chosen`
/// its `top_k` experts, best first. (Pruning's refit routes with it too, to match the runtime.)
#[inline]
pub fn route(p: &mut [f32], top_k: usize, chosen: &mut Vec<usize>) {
    let max = crate::math::max(p);
    let mut sum = 0.0;
    for v in p.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    p.iter_mut().for_each(|v| *v /= sum);
    top_k_into(p, top_k, chosen);
}

/// down(silu(gate x) * up x) for m rows of `input` [m, d]; returns the [m, d] result (in `eo`).
#[allow(clippy::too_many_arguments)]
fn swiglu_rows<'a>(
    mlp: &Swiglu,
    input: &[f32],
    m: usize,
    eg: &mut Vec<f32>,
    eu: &mut Vec<f32>,
    eo: &'a mut Vec<f32>,
    q: &mut QuantizedRows,
    par: Par,
) -> &'a [f32] {
    let (hid, d) = (mlp.gate.rows, mlp.down.rows);
    let (eg, eu) = (grow(eg, m * hid), grow(eu, m * hid));
    mlp.gate.matmul(input, eg, q, par);
    mlp.up.matmul(input, eu, q, par);
    for (g, u) in eg.iter_mut().zip(eu.iter()) {
        *g = silu(*g) * u;
    }
    let eo = grow(eo, m * d);
    mlp.down.matmul(eg, eo, q, par);
    eo
}

/// x += sum over the top-k experts of gate * expert(rmsnorm(x)), for all rows. With
/// `moe_skip_beta` > 0 a token drops each chosen expert whose routing weight is below beta
/// times its first's, and the remaining gates are renormalised.
pub(super) fn moe_rows(
    moe: &Moe,
    layer: usize,
    cfg: &ModelConfig,
    rows: usize,
    s: &mut Scratch,
    par: Par,
) {
    let (d, e) = (cfg.d_model, moe.experts.len());
    let top_k = cfg.top_k.min(e);
    let beta = cfg.moe_skip_beta as f32;
    let h = grow(&mut s.h, rows * d);
    rms_norm_rows(&s.x, &moe.norm, cfg.norm_eps, h);
    if let Some((_, inputs)) = s.moe_inputs.as_mut().filter(|(l, _)| *l == layer) {
        inputs.extend_from_slice(h);
    }
    let router = grow(&mut s.router, rows * e);
    moe.router.matmul(h, router, &mut s.q, par);
    s.expert_rows.resize_with(e, Vec::new);
    s.expert_rows.iter_mut().for_each(|v| v.clear());
    let mut stats = s.routing.as_mut().map(|r| &mut r.layers[layer]);
    for (i, p) in router.chunks_exact_mut(e).enumerate() {
        route(p, top_k, &mut s.chosen);
        let first = p[s.chosen[0]];
        if let Some(st) = stats.as_deref_mut() {
            st.tokens += 1;
            if top_k >= 2 {
                st.ratios.push(p[s.chosen[1]] / first);
            }
        }
        if beta > 0.0 {
            let before = s.chosen.len();
            s.chosen.retain(|&j| p[j] >= beta * first);
            if let (Some(st), true) = (stats.as_deref_mut(), s.chosen.len() < before) {
                st.skipped += 1;
            }
        }
        let norm: f32 = s.chosen.iter().map(|&j| p[j]).sum();
        for &j in &s.chosen {
            s.expert_rows[j].push((i, p[j] / norm));
        }
    }
    for (j, (ex, assigned)) in moe.experts.iter().zip(&s.expert_rows).enumerate() {
        let m = assigned.len();
        if m == 0 {
            continue;
        }
        let eh = grow(&mut s.eh, m * d);
        for (dst, &(i, _)) in eh.chunks_exact_mut(d).zip(assigned) {
            dst.copy_from_slice(&h[i * d..(i + 1) * d]);
        }
        let eo = swiglu_rows(ex, eh, m, &mut s.eg, &mut s.eu, &mut s.eo, &mut s.q, par);
        for (o, &(i, gate)) in eo.chunks_exact(d).zip(assigned) {
            for (a, b) in s.x[i * d..(i + 1) * d].iter_mut().zip(o) {
                *a += gate * b;
            }
        }
        if let Some(st) = stats.as_deref_mut() {
            st.count[j] += m as u64;
            for (o, &(_, gate)) in eo.chunks_exact(d).zip(assigned) {
                let norm = o.iter().map(|v| v * v).sum::<f32>().sqrt();
                st.gate_sum[j] += gate as f64;
                st.reap_sum[j] += (gate * norm) as f64;
            }
        }
    }
}

/// x += swiglu(rmsnorm(x)), for all rows (a dense feed-forward on a layer without MoE).
pub(super) fn ffn_rows(ffn: &Ffn, cfg: &ModelConfig, rows: usize, s: &mut Scratch, par: Par) {
    let h = grow(&mut s.h, rows * cfg.d_model);
    rms_norm_rows(&s.x, &ffn.norm, cfg.norm_eps, h);
    let (eg, eu, eo) = (&mut s.eg, &mut s.eu, &mut s.eo);
    let out = swiglu_rows(&ffn.mlp, h, rows, eg, eu, eo, &mut s.q, par);
    for (a, b) in s.x.iter_mut().zip(out.iter()) {
        *a += b;
    }
}
