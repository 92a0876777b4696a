//! A residual MoE block's experts as one training op, x + mask * experts(rms_norm(x)): the norm,
//! the router's probabilities of each token's top-k experts renormalised to gates, each expert's
//! SwiGLU on the tokens routed to it, the gated sum, the branch's locked dropout and the residual
//! add, forward and backward over slices. (The router itself is `linear::normed_linear`, before
//! the op: its softmax feeds the load-balancing loss too.)
//!
//! Built from candle ops the same arithmetic was about ten graph nodes per expert and layer (a
//! gather, three projections, the gate, a product, a scatter-add, and the gates' normalisation),
//! each with a zero-filled gradient and an add in the backward. As one op the layer takes one
//! gradient in and gives out those of its input, the routing probabilities and the weights. The
//! norm and the residual add joined it in the thirty-sixth session (the normed input, the
//! branch's output and the block's input had each paid a fill and adds). The composite stays as
//! the test's reference and as the path for dropout inside the experts, which the op does not
//! draw.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use itera_core::math::{dot, top_k_into};

use super::gemm::{matmul, product, View};
use super::residual::Residual;
use super::scan::{cpu_f32, f32_slice};
use super::swiglu::{backward_par, forward_par, swiglu_mlp};
use crate::error::Result;

/// Which experts each token goes to: the top k of its routing probabilities.
#[derive(Clone, Debug)]
pub struct Routing {
    experts: usize,
    k: usize,
    /// [N, k]: each token's chosen experts, most probable first.
    chosen: Vec<usize>,
    /// Per expert, the tokens routed to it, in ascending order.
    tokens: Vec<Vec<u32>>,
}

impl Routing {
    /// From probabilities [N, E] (row-major); ties go to the lower expert index, as at inference.
    pub fn new(probs: &[f32], experts: usize, k: usize) -> Self {
        let mut chosen = Vec::with_capacity(probs.len() / experts.max(1) * k);
        let mut tokens = vec![Vec::new(); experts];
        let mut idx = Vec::new();
        for (i, row) in probs.chunks_exact(experts).enumerate() {
            top_k_into(row, k, &mut idx);
            for &e in &idx {
                chosen.push(e);
                tokens[e].push(i as u32);
            }
        }
        Self {
            experts,
            k,
            chosen,
            tokens,
        }
    }

    /// The tokens routed to each expert.
    pub fn tokens(&self) -> &[Vec<u32>] {
        &self.tokens
    }

    /// Each expert's share of the routed slots (the load-balancing loss's f).
    pub fn load(&self) -> Vec<f32> {
        let slots = self.chosen.len().max(1) as f32;
        self.tokens.iter().map(|t| t.len() as f32 / slots).collect()
    }

    /// Dense gates [N, E] (zero where an expert is not chosen) and each token's sum of its chosen
    /// probabilities [N], summed in expert order as candle's masked sum does.
    fn gates(&self, probs: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let e = self.experts;
        let mut gates = vec![0.0f32; probs.len()];
        let mut sums = Vec::with_capacity(probs.len() / e.max(1));
        for ((row, g), chosen) in probs
            .chunks_exact(e)
            .zip(gates.chunks_exact_mut(e))
            .zip(self.chosen.chunks_exact(self.k))
        {
            let s: f32 = (0..e).filter(|x| chosen.contains(x)).map(|x| row[x]).sum();
            for &x in chosen {
                g[x] = row[x] / s;
            }
            sums.push(s);
        }
        (gates, sums)
    }
}

/// One expert's activations on its tokens, kept for the backward: its input rows, the gate and up projections
/// and silu(g) * u [n_e, H] each, and the expert's output [n_e, d].
struct ExpertSaved {
    /// The expert's input rows [n_e, d].
    x: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    a: Vec<f32>,
    y: Vec<f32>,
}

/// Inputs: x [N, d] (the residual stream), probs [N, E] (the router's softmax) and the weights
/// packed expert by expert as gate [H, d], up [H, d], down [d, H], then the norm's [d]. Output
/// [N, d], x plus the branch.
struct MoeBlock {
    routing: Arc<Routing>,
    hidden: usize,
    /// The norm before the experts and the residual add after them.
    residual: Residual,
    /// The forward's activations, kept when autograd will ask for the backward.
    saved: Option<Mutex<Option<Vec<ExpertSaved>>>>,
}

/// Rows `idx` of the row-major [_, width] matrix `src`, in that order.
fn gather(src: &[f32], idx: &[u32], width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(idx.len() * width);
    for &i in idx {
        let i = i as usize;
        out.extend_from_slice(&src[i * width..(i + 1) * width]);
    }
    out
}

impl MoeBlock {
    /// (N, d) after checking the three inputs against each other and the routing.
    fn check(&self, x: &Shape, probs: &Shape, w: &Shape) -> candle_core::Result<(usize, usize)> {
        let ((n, d), (n_p, e)) = (x.dims2()?, probs.dims2()?);
        let len = w.dims1()?;
        let r = &self.routing;
        let want = e * 3 * self.hidden * d + d;
        if n != n_p || e != r.experts || r.chosen.len() != n * r.k || len != want {
            candle_core::bail!(
                "moe_block: x {x:?}, probs {probs:?}, {len} packed weights (hidden {}) and a \
                 routing of {} experts disagree",
                self.hidden,
                r.experts
            );
        }
        self.residual.check(n, d, "moe_block")?;
        Ok((n, d))
    }

    /// The norm's weight: the last d of the packed weights.
    fn norm<'w>(&self, w: &'w [f32], d: usize) -> &'w [f32] {
        &w[w.len() - d..]
    }

    /// Expert `e`'s (gate, up, down) out of the packed weights.
    fn expert<'w>(&self, w: &'w [f32], e: usize, d: usize) -> [&'w [f32]; 3] {
        let size = self.hidden * d;
        let x = &w[e * 3 * size..(e + 1) * 3 * size];
        [&x[..size], &x[size..2 * size], &x[2 * size..]]
    }

    fn forward(
        &self,
        h: &[f32],
        probs: &[f32],
        w: &[f32],
        d: usize,
    ) -> (Vec<f32>, Vec<ExpertSaved>) {
        let (e, hd) = (self.routing.experts, self.hidden);
        let (gates, _) = self.routing.gates(probs);
        let mut out = vec![0.0f32; h.len()];
        let mut saved = Vec::with_capacity(e);
        for (ex, idx) in self.routing.tokens.iter().enumerate() {
            let ne = idx.len();
            let [wg, wu, wd] = self.expert(w, ex, d);
            let x = gather(h, idx, d);
            let xe = View::rows(&x, ne, d);
            let g = product(xe, View::rows(wg, hd, d).t());
            let u = product(xe, View::rows(wu, hd, d).t());
            let mut a = vec![0.0; ne * hd];
            forward_par(&g, &u, &mut a);
            let y = product(View::rows(&a, ne, hd), View::rows(wd, d, hd).t());
            for (yj, &i) in y.chunks_exact(d).zip(idx) {
                let i = i as usize;
                let gate = gates[i * e + ex];
                for (o, v) in out[i * d..(i + 1) * d].iter_mut().zip(yj) {
                    *o += v * gate;
                }
            }
            saved.push(ExpertSaved { x, g, u, a, y });
        }
        (out, saved)
    }

    /// dL/d(h, probs, packed weights) from dL/d(output) `go` [N, d].
    fn backward(
        &self,
        (probs, w, go): (&[f32], &[f32], &[f32]),
        saved: &[ExpertSaved],
        d: usize,
    ) -> [Vec<f32>; 3] {
        let (e, k, hd) = (self.routing.experts, self.routing.k, self.hidden);
        let (gates, sums) = self.routing.gates(probs);
        let (mut dh, mut dw) = (vec![0.0f32; go.len()], vec![0.0f32; w.len()]);
        let mut dgate = vec![0.0f32; probs.len()];
        for ((ex, idx), s) in self.routing.tokens.iter().enumerate().zip(saved) {
            let ne = idx.len();
            let [wg, wu, wd] = self.expert(w, ex, d);
            let size = hd * d;
            let (dwg, rest) = dw[ex * 3 * size..(ex + 1) * 3 * size].split_at_mut(size);
            let (dwu, dwd) = rest.split_at_mut(size);
            // out[i] += gate * y: dL/dgate = go[i] · y, dL/dy = gate * go[i].
            let mut dy = gather(go, idx, d);
            for ((row, yj), &i) in dy.chunks_exact_mut(d).zip(s.y.chunks_exact(d)).zip(idx) {
                let at = i as usize * e + ex;
                dgate[at] = dot(row, yj);
                row.iter_mut().for_each(|v| *v *= gates[at]);
            }
            let dy = View::rows(&dy, ne, d);
            // y = a · downᵀ.
            matmul(dwd, dy.t(), View::rows(&s.a, ne, hd), false);
            let da = product(dy, View::rows(wd, d, hd));
            let (mut dg, mut du) = (vec![0.0f32; ne * hd], vec![0.0f32; ne * hd]);
            backward_par(&s.g, &s.u, &da, &mut dg, &mut du);
            // g = x · gateᵀ, u = x · upᵀ.
            let xe = View::rows(&s.x, ne, d);
            let (dg, du) = (View::rows(&dg, ne, hd), View::rows(&du, ne, hd));
            matmul(dwg, dg.t(), xe, false);
            matmul(dwu, du.t(), xe, false);
            let mut dx = product(dg, View::rows(wg, hd, d));
            matmul(&mut dx, du, View::rows(wu, hd, d), true);
            for (dxj, &i) in dx.chunks_exact(d).zip(idx) {
                let i = i as usize;
                for (o, v) in dh[i * d..(i + 1) * d].iter_mut().zip(dxj) {
                    *o += v;
                }
            }
        }
        // gate_x = p_x / S over the chosen x: dL/dp_x = (dL/dgate_x - sum_c dL/dgate_c gate_c) / S.
        let mut dp = vec![0.0f32; probs.len()];
        for (i, chosen) in self.routing.chosen.chunks_exact(k).enumerate() {
            let row = i * e;
            let c: f32 = chosen
                .iter()
                .map(|&x| dgate[row + x] * gates[row + x])
                .sum();
            for &x in chosen {
                dp[row + x] = (dgate[row + x] - c) / sums[i];
            }
        }
        [dh, dp, dw]
    }
}

impl CustomOp3 for MoeBlock {
    fn name(&self) -> &'static str {
        "moe_block"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = self.check(l1.shape(), l2.shape(), l3.shape())?;
        let (x, w) = (f32_slice(s1, l1, "x")?, f32_slice(s3, l3, "weights")?);
        let hn = self.residual.norm(x, self.norm(w, d));
        let (mut out, saved) = self.forward(&hn, f32_slice(s2, l2, "probs")?, w, d);
        self.residual.add(&mut out, x, d);
        if let Some(slot) = &self.saved {
            *slot.lock().expect("not poisoned") = Some(saved);
        }
        Ok((CpuStorage::F32(out), Shape::from((n, d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        probs: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, d) = self.check(x.shape(), probs.shape(), w.shape())?;
        let saved = self
            .saved
            .as_ref()
            .and_then(|s| s.lock().expect("not poisoned").take());
        let Some(saved) = saved else {
            candle_core::bail!("moe_block: backward without its forward's activations");
        };
        let grad = grad.contiguous()?;
        let (sx, lx) = x.storage_and_layout();
        let (sp, lp) = probs.storage_and_layout();
        let (sw, lw) = w.storage_and_layout();
        let (sg, lg) = grad.storage_and_layout();
        let (xv, grad) = (cpu_f32(&sx, lx, "x")?, cpu_f32(&sg, lg, "gradient")?);
        let (pv, wv) = (cpu_f32(&sp, lp, "probs")?, cpu_f32(&sw, lw, "weights")?);
        let g_branch = self.residual.branch_grad(grad, d);
        let [dh, dp, mut dw] = self.backward((pv, wv, &g_branch), &saved, d);
        let nw = self.norm(wv, d);
        let (dx, dnw) = self.residual.backward(xv, nw, grad, &dh);
        let tail = dw.len() - d;
        dw[tail..].copy_from_slice(&dnw);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dp, probs.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
        ))
    }
}

/// A residual MoE block on x [N, d] (sequences of `seq_len` rows): x + mask * experts(rms_norm(x))
/// with `norm` = (the norm's weight [d], its epsilon). `probs` [N, E] is the router's softmax
/// and `routing` its top k; `experts` holds each expert's (gate [H, d], up [H, d], down [d, H]);
/// `mask` [B, d] is the branch's locked dropout.
pub fn moe_block(
    x: &Tensor,
    probs: &Tensor,
    experts: &[[&Tensor; 3]],
    routing: Arc<Routing>,
    norm: (&Tensor, f64),
    seq_len: usize,
    mask: Option<Vec<f32>>,
) -> candle_core::Result<Tensor> {
    let d = x.dim(1)?;
    let hidden = experts.first().map_or(Ok(0), |x| x[0].dim(0))?;
    for x in experts {
        if x[0].dims() != [hidden, d] || x[1].dims() != [hidden, d] || x[2].dims() != [d, hidden] {
            candle_core::bail!(
                "moe_block: expert weights {:?} {:?} {:?} are not [H, d], [H, d], [d, H] with d {d}",
                x[0].shape(),
                x[1].shape(),
                x[2].shape()
            );
        }
    }
    let flat = experts
        .iter()
        .flatten()
        .copied()
        .chain([norm.0])
        .map(|t| t.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let w = Tensor::cat(&flat, 0)?;
    let tracked = x.track_op() || probs.track_op() || w.track_op();
    let op = MoeBlock {
        routing,
        hidden,
        residual: Residual {
            t: seq_len,
            eps: norm.1 as f32,
            mask,
        },
        saved: tracked.then(|| Mutex::new(None)),
    };
    x.contiguous()?.apply_op3(&probs.contiguous()?, &w, op)
}

/// The same layer from candle ops, `hidden` applied to each expert's silu(g) * u (the model's
/// dropout, or nothing): what `moe_experts` replaced, its test's reference, and the model's path
/// when the experts drop units.
pub fn moe_composite(
    h: &Tensor,
    probs: &Tensor,
    experts: &[[&Tensor; 3]],
    routing: &Routing,
    hidden: &dyn Fn(Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (n_tok, e_count) = probs.dims2()?;
    let mut mask = vec![0f32; n_tok * e_count];
    for (i, chosen) in routing.chosen.chunks_exact(routing.k).enumerate() {
        for &e in chosen {
            mask[i * e_count + e] = 1.0;
        }
    }
    let mask = Tensor::from_vec(mask, (n_tok, e_count), h.device())?;
    let gated = (probs * &mask)?;
    let gates = gated.broadcast_div(&gated.sum_keepdim(1)?)?;
    let mut out = h.zeros_like()?;
    for (e, idx) in routing.tokens.iter().enumerate() {
        if idx.is_empty() {
            continue;
        }
        let idx_t = Tensor::new(idx.as_slice(), h.device())?;
        let ye = swiglu_mlp(&h.index_select(&idx_t, 0)?, experts[e], hidden)?;
        let ge = gates.index_select(&idx_t, 0)?.narrow(1, e, 1)?;
        out = out.index_add(&idx_t, &ye.broadcast_mul(&ge)?, 0)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::conv_norm::rms_norm;
    use super::super::linear::normed_linear;
    use super::super::testing::{compare, var};
    use super::*;
    use candle_core::D;

    /// The fused block against the composite, values and the gradients of x, the norm, the
    /// router and every expert weight, with top 2 of 3 experts and with top 3 of 3 (three chosen
    /// gates to renormalise), without and with a dropout mask. 37 tokens (one sequence), d 10,
    /// hidden 6: gemm's edge tiles and uneven expert loads.
    #[test]
    fn matches_the_composite_layer() {
        let (n, d, hd, e) = (37, 10, 6, 3);
        let mask: Vec<f32> = (0..d).map(|i| [0.0, 2.0][i % 3 % 2]).collect();
        for (k, mask) in [(2, None), (3, None), (2, Some(mask))] {
            let mut inputs = vec![var(&[n, d], 1), var(&[d], 4), var(&[e, d], 2)];
            for x in 0..e as u64 {
                inputs.push(var(&[hd, d], 10 + 3 * x));
                inputs.push(var(&[hd, d], 11 + 3 * x));
                inputs.push(var(&[d, hd], 12 + 3 * x));
            }
            let probs = |v: &[&Tensor]| {
                let logits = normed_linear(v[0], v[1], v[2], 1e-5).unwrap();
                let p = candle_nn::ops::softmax(&logits, D::Minus1).unwrap();
                let r = Routing::new(&p.flatten_all().unwrap().to_vec1().unwrap(), e, k);
                (p, r)
            };
            compare(
                &inputs,
                |v| {
                    let (p, r) = probs(v);
                    let load = r.tokens().iter().map(Vec::len).collect::<Vec<_>>();
                    assert!(load.iter().all(|&l| l > 0 && (k == e || l < n)), "{load:?}");
                    let norm = (v[1], 1e-5);
                    moe_block(v[0], &p, &experts(v), Arc::new(r), norm, n, mask.clone()).unwrap()
                },
                |v| {
                    let (p, r) = probs(v);
                    let h = rms_norm(v[0], v[1], 1e-5).unwrap();
                    let out = moe_composite(&h, &p, &experts(v), &r, &Ok).unwrap();
                    let out = match &mask {
                        Some(m) => {
                            let m = Tensor::from_vec(m.clone(), (1, d), v[0].device()).unwrap();
                            out.broadcast_mul(&m).unwrap()
                        }
                        None => out,
                    };
                    (v[0] + out).unwrap()
                },
            );
        }
    }

    /// Each expert's (gate, up, down) from the inputs after x, the norm and the router.
    fn experts<'a>(v: &[&'a Tensor]) -> Vec<[&'a Tensor; 3]> {
        v[3..].chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect()
    }

    /// Shapes that disagree are an error, not a panic.
    #[test]
    fn refuses_mismatched_expert_weights() {
        let x = var(&[4, 3], 1);
        let norm = var(&[3], 5);
        let p = candle_nn::ops::softmax(&var(&[4, 2], 2).as_tensor().clone(), D::Minus1).unwrap();
        let r = Arc::new(Routing::new(
            &p.flatten_all().unwrap().to_vec1().unwrap(),
            2,
            1,
        ));
        let (a, b) = (var(&[5, 3], 3), var(&[3, 4], 4));
        let bad = [[a.as_tensor(), a.as_tensor(), b.as_tensor()]; 2];
        let norm = (norm.as_tensor(), 1e-5);
        let err = moe_block(x.as_tensor(), &p, &bad, r, norm, 4, None).unwrap_err();
        assert!(err.to_string().contains("not [H, d]"), "{err}");
    }
}
