//! The feed-forward half of a block: the MoE layer (router softmax, top-k with renormalised
//! weights, one matmul per expert over the rows routed to it) and the dense SwiGLU used on
//! layers without MoE. Both add their output to the residual stream `s.x`. Optionally skips a
//! token's weaker experts (`moe_skip_beta`) and records routing statistics (`RoutingStats`) and,
//! when asked, each matrix's inputs (`Scratch::inputs`).

use super::phases::{mark, Phase, Phases};
use super::state::{grow, note_inputs, InputHook, Scratch};
use super::{Ffn, Moe, Swiglu};
use crate::config::ModelConfig;
use crate::exec::Par;
use crate::kernels::{Matrix, Product, QuantizedRows};
use crate::math::{rms_norm_rows, swiglu_gate, top_k_into};

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

/// down(silu(gate x) * up x) for each job (an MLP and its input rows [m, d]): every job's gate
/// and up products as one group, then every down product as another (`Matrix::matmul_group`:
/// one hand-off each in decode, whatever the number of experts; jobs that read the same input
/// slice share its quantized copy). Returns the jobs' results one after another, [sum of m, d]
/// (in `eo`).
#[allow(clippy::too_many_arguments)]
fn swiglu_jobs<'a>(
    jobs: &[(&Swiglu, &[f32])],
    d: usize,
    eg: &mut Vec<f32>,
    eu: &mut Vec<f32>,
    eo: &'a mut Vec<f32>,
    qs: &mut Vec<QuantizedRows>,
    inputs: &mut Option<InputHook>,
    phases: &mut Option<Phases>,
    par: Par,
) -> &'a [f32] {
    let rows_of = |x: &[f32]| x.len() / d;
    let hidden: usize = jobs.iter().map(|(mlp, x)| rows_of(x) * mlp.gate.rows).sum();
    let rows: usize = jobs.iter().map(|(_, x)| rows_of(x)).sum();
    let (eg, eu, eo) = (grow(eg, hidden), grow(eu, hidden), grow(eo, rows * d));
    {
        let (mut gs, mut us) = (&mut eg[..], &mut eu[..]);
        let mut products = Vec::with_capacity(2 * jobs.len());
        for &(mlp, x) in jobs {
            let m = rows_of(x);
            note_inputs(inputs, &mlp.gate, x);
            note_inputs(inputs, &mlp.up, x);
            let ((g, gr), (u, ur)) = (
                gs.split_at_mut(m * mlp.gate.rows),
                us.split_at_mut(m * mlp.up.rows),
            );
            products.push(Product::new(&mlp.gate, x, g));
            products.push(Product::new(&mlp.up, x, u));
            (gs, us) = (gr, ur);
        }
        Matrix::matmul_group(&products, qs, par);
    }
    mark(phases, Phase::GateUp);
    swiglu_gate(eg, eu);
    mark(phases, Phase::Swiglu);
    let (mut hs, mut os) = (&eg[..], &mut eo[..]);
    let mut products = Vec::with_capacity(jobs.len());
    for &(mlp, x) in jobs {
        let m = rows_of(x);
        let (h, hr) = hs.split_at(m * mlp.down.cols);
        note_inputs(inputs, &mlp.down, h);
        let (o, or) = os.split_at_mut(m * d);
        products.push(Product::new(&mlp.down, h, o));
        (hs, os) = (hr, or);
    }
    Matrix::matmul_group(&products, qs, par);
    drop(products);
    mark(phases, Phase::Down);
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
    mark(&mut s.phases, Phase::MoeNorm);
    let router = grow(&mut s.router, rows * e);
    note_inputs(&mut s.inputs, &moe.router, h);
    moe.router.matmul(h, router, &mut s.q, par);
    mark(&mut s.phases, Phase::Router);
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
    // Each expert reads `h` itself when it takes every row in order (always in decode: then
    // the experts share one quantized input), else its rows gathered into `eh`.
    let takes_all = |assigned: &[(usize, f32)]| {
        assigned.len() == rows && assigned.iter().enumerate().all(|(k, &(i, _))| i == k)
    };
    let gathered: usize = s
        .expert_rows
        .iter()
        .filter(|a| !takes_all(a))
        .map(Vec::len)
        .sum();
    let eh = grow(&mut s.eh, gathered * d);
    let mut dst = eh.chunks_exact_mut(d);
    for &(i, _) in s.expert_rows.iter().filter(|a| !takes_all(a)).flatten() {
        dst.next()
            .expect("one row per gathered token")
            .copy_from_slice(&h[i * d..(i + 1) * d]);
    }
    let h = &*h;
    let mut rest = &*eh;
    let mut jobs = Vec::with_capacity(e);
    for (ex, assigned) in moe.experts.iter().zip(&s.expert_rows) {
        if takes_all(assigned) {
            jobs.push((ex, h));
        } else if !assigned.is_empty() {
            let (mine, tail) = rest.split_at(assigned.len() * d);
            jobs.push((ex, mine));
            rest = tail;
        }
    }
    mark(&mut s.phases, Phase::Routing);
    let (eg, eu, eo, qs) = (&mut s.eg, &mut s.eu, &mut s.eo, &mut s.qs);
    let eo = swiglu_jobs(&jobs, d, eg, eu, eo, qs, &mut s.inputs, &mut s.phases, par);
    let mut outs = eo.chunks_exact(d);
    for (j, assigned) in s.expert_rows.iter().enumerate() {
        for &(i, gate) in assigned {
            let o = outs.next().expect("one output per routed token");
            for (a, b) in s.x[i * d..(i + 1) * d].iter_mut().zip(o) {
                *a += gate * b;
            }
            if let Some(st) = stats.as_deref_mut() {
                let norm = o.iter().map(|v| v * v).sum::<f32>().sqrt();
                st.gate_sum[j] += gate as f64;
                st.reap_sum[j] += (gate * norm) as f64;
            }
        }
        if let Some(st) = stats.as_deref_mut() {
            st.count[j] += assigned.len() as u64;
        }
    }
    mark(&mut s.phases, Phase::Combine);
}

/// x += swiglu(rmsnorm(x)), for all rows (a dense feed-forward on a layer without MoE).
pub(super) fn ffn_rows(ffn: &Ffn, cfg: &ModelConfig, rows: usize, s: &mut Scratch, par: Par) {
    let h = grow(&mut s.h, rows * cfg.d_model);
    rms_norm_rows(&s.x, &ffn.norm, cfg.norm_eps, h);
    mark(&mut s.phases, Phase::MoeNorm);
    let (eg, eu, eo) = (&mut s.eg, &mut s.eu, &mut s.eo);
    let (qs, inputs, phases) = (&mut s.qs, &mut s.inputs, &mut s.phases);
    let out = swiglu_jobs(
        &[(&ffn.mlp, &*h)],
        cfg.d_model,
        eg,
        eu,
        eo,
        qs,
        inputs,
        phases,
        par,
    );
    for (a, b) in s.x.iter_mut().zip(out.iter()) {
        *a += b;
    }
    mark(&mut s.phases, Phase::Combine);
}
