//! The feed-forward half of a block: the MoE layer (router softmax, top-k with renormalised
//! weights, one matmul per expert over the rows routed to it) and the dense SwiGLU used on
//! layers without MoE. Both add their output to the residual stream `s.x`.

use super::state::{grow, Scratch};
use super::{Ffn, Moe, Swiglu};
use crate::config::ModelConfig;
use crate::exec::Par;
use crate::kernels::QuantizedRows;
use crate::math::{rms_norm_rows, silu, top_k_into};

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

/// x += sum over the top-k experts of gate * expert(rmsnorm(x)), for all rows.
pub(super) fn moe_rows(moe: &Moe, cfg: &ModelConfig, rows: usize, s: &mut Scratch, par: Par) {
    let (d, e) = (cfg.d_model, moe.experts.len());
    let top_k = cfg.top_k.min(e);
    let h = grow(&mut s.h, rows * d);
    rms_norm_rows(&s.x, &moe.norm, cfg.norm_eps, h);
    let router = grow(&mut s.router, rows * e);
    moe.router.matmul(h, router, &mut s.q, par);
    s.expert_rows.resize_with(e, Vec::new);
    s.expert_rows.iter_mut().for_each(|v| v.clear());
    for (i, p) in router.chunks_exact_mut(e).enumerate() {
        let max = p.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in p.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        p.iter_mut().for_each(|v| *v /= sum);
        top_k_into(p, top_k, &mut s.chosen);
        let norm: f32 = s.chosen.iter().map(|&j| p[j]).sum();
        for &j in &s.chosen {
            s.expert_rows[j].push((i, p[j] / norm));
        }
    }
    for (ex, assigned) in moe.experts.iter().zip(&s.expert_rows) {
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
