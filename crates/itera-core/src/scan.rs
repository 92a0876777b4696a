//! The selective scan: one per-timestep update shared by training (a fused candle op with a
//! hand-written backward) and decoding (`Runtime::step`).
//!
//! Per channel d with state h[d, 0..N]:
//!   h = exp(dt[d] * A[d, n]) * h + dt[d] * B[n] * x[d]
//!   y[d] = sum_n C[n] * h[d, n]
//! The skip term D * x is added by the caller.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// One timestep of the scan for all channels: updates `h` [D*N] in place and writes `y` [D].
#[inline(always)]
pub fn scan_step(
    x: &[f32],
    dt: &[f32],
    a: &[f32],
    b: &[f32],
    c: &[f32],
    h: &mut [f32],
    y: &mut [f32],
) {
    let n = b.len();
    for d in 0..x.len() {
        let (dtd, dx) = (dt[d], dt[d] * x[d]);
        let hd = &mut h[d * n..(d + 1) * n];
        let ad = &a[d * n..(d + 1) * n];
        // Element-wise update (vectorises over N), then a lane-wise dot for y.
        for ((hv, &av), &bv) in hd.iter_mut().zip(ad).zip(b) {
            *hv = crate::math::exp(dtd * av) * *hv + dx * bv;
        }
        y[d] = crate::math::dot(c, hd);
    }
}

pub(crate) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("`{what}` must be f32"),
    };
    if !l.is_contiguous() {
        candle_core::bail!("`{what}` must be contiguous");
    }
    Ok(&data[l.start_offset()..l.start_offset() + l.shape().elem_count()])
}

#[inline(always)]
pub fn softplus(v: f32) -> f32 {
    v.max(0.0) + crate::math::ln_1p(crate::math::exp(-v.abs()))
}

#[inline(always)]
pub fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + crate::math::exp(-v))
}

#[inline(always)]
pub fn silu(v: f32) -> f32 {
    v * sigmoid(v)
}

/// The whole SSM core of a Mamba mixer between the projections, fused:
///   dt = softplus(dt_raw + dt_bias); y = scan(x, dt, A = -exp(A_log), B, C) + D * x; out = y * silu(z)
/// Inputs: `u` [B, T, 3*Di] = (x, dt_raw, z); `bc` [B, T, 2N] = (B, C);
/// `p` [Di, N + 2] = (A_log, D, dt_bias). Output [B, T, Di]. Ungated, out = y (z is ignored).
pub struct SsmCore {
    gated: bool,
}

struct Dims {
    b: usize,
    t: usize,
    di: usize,
    n: usize,
    gated: bool,
}

fn dims(u: &Shape, bc: &Shape, p: &Shape, gated: bool) -> candle_core::Result<Dims> {
    let (b, t, di3) = u.dims3()?;
    let (b2, t2, n2) = bc.dims3()?;
    let (di, n_plus) = p.dims2()?;
    if b2 != b || t2 != t || di3 != 3 * di || n_plus < 2 || n2 != 2 * (n_plus - 2) {
        candle_core::bail!("ssm_core: shapes disagree: u {u:?}, bc {bc:?}, p {p:?}");
    }
    Ok(Dims {
        b,
        t,
        di,
        n: n_plus - 2,
        gated,
    })
}

/// Unpacks `p` into (A, D, dt_bias).
fn params(p: &[f32], d: &Dims) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let w = d.n + 2;
    let a = (0..d.di * d.n)
        .map(|k| -p[(k / d.n) * w + k % d.n].exp())
        .collect();
    let dd = (0..d.di).map(|i| p[i * w + d.n]).collect();
    let bias = (0..d.di).map(|i| p[i * w + d.n + 1]).collect();
    (a, dd, bias)
}

/// Forward over one sequence. Fills `out`; optionally records h_t, dt_t and the pre-gate y_t.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn core_sequence(
    u: &[f32],
    bc: &[f32],
    a: &[f32],
    d_skip: &[f32],
    bias: &[f32],
    d: &Dims,
    out: &mut [f32],
    mut record: Option<(&mut [f32], &mut [f32], &mut [f32])>,
) {
    let (di, n) = (d.di, d.n);
    let mut h = vec![0.0f32; di * n];
    let mut dt = vec![0.0f32; di];
    let mut y = vec![0.0f32; di];
    for t in 0..d.t {
        let ut = &u[t * 3 * di..(t + 1) * 3 * di];
        let (x, rest) = ut.split_at(di);
        let (raw, z) = rest.split_at(di);
        for i in 0..di {
            dt[i] = softplus(raw[i] + bias[i]);
        }
        let bct = &bc[t * 2 * n..(t + 1) * 2 * n];
        scan_step(x, &dt, a, &bct[..n], &bct[n..], &mut h, &mut y);
        for i in 0..di {
            y[i] += d_skip[i] * x[i];
            out[t * di + i] = if d.gated { y[i] * silu(z[i]) } else { y[i] };
        }
        if let Some((hs, dts, ys)) = record.as_mut() {
            hs[t * di * n..(t + 1) * di * n].copy_from_slice(&h);
            dts[t * di..(t + 1) * di].copy_from_slice(&dt);
            ys[t * di..(t + 1) * di].copy_from_slice(&y);
        }
    }
}

/// Gradients of one sequence: fills dL/du and dL/dbc, returns this sequence's share of dL/dp.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn core_backward(
    ub: &[f32],
    bcb: &[f32],
    gout: &[f32],
    a: &[f32],
    d_skip: &[f32],
    bias: &[f32],
    d: &Dims,
    gu: &mut [f32],
    gbc: &mut [f32],
) -> Vec<f32> {
    let (t_len, di, n) = (d.t, d.di, d.n);
    let mut hs = vec![0.0f32; t_len * di * n];
    let mut dts = vec![0.0f32; t_len * di];
    let mut ys = vec![0.0f32; t_len * di];
    let mut out = vec![0.0f32; t_len * di];
    core_sequence(
        ub,
        bcb,
        a,
        d_skip,
        bias,
        d,
        &mut out,
        Some((&mut hs, &mut dts, &mut ys)),
    );
    let mut g_a = vec![0.0f32; di * n];
    let mut g_d = vec![0.0f32; di];
    let mut g_bias = vec![0.0f32; di];
    // gh carries dL/dh_t backwards through h_{t+1} = decay_{t+1} * h_t + ...
    let mut gh = vec![0.0f32; di * n];
    // Per-state terms of the dt and x gradients, summed after each element-wise pass.
    let (mut dt_terms, mut x_terms) = (vec![0.0f32; n], vec![0.0f32; n]);
    let zeros = vec![0.0f32; n];
    for t in (0..t_len).rev() {
        let ut = &ub[t * 3 * di..(t + 1) * 3 * di];
        let bt = &bcb[t * 2 * n..t * 2 * n + n];
        let ct = &bcb[t * 2 * n + n..(t + 1) * 2 * n];
        let h_t = &hs[t * di * n..(t + 1) * di * n];
        let gut = &mut gu[t * 3 * di..(t + 1) * 3 * di];
        let (gb_t, gc_t) = gbc[t * 2 * n..(t + 1) * 2 * n].split_at_mut(n);
        for dd in 0..di {
            let (x, raw, z) = (ut[dd], ut[di + dd], ut[2 * di + dd]);
            let dt = dts[t * di + dd];
            let g_out = gout[t * di + dd];
            let gy = if d.gated {
                // out = y * silu(z), silu'(z) = s (1 + z (1 - s))
                let sz = sigmoid(z);
                gut[2 * di + dd] = g_out * ys[t * di + dd] * sz * (1.0 + z * (1.0 - sz));
                g_out * z * sz
            } else {
                g_out
            };
            g_d[dd] += gy * x;
            let row = dd * n..(dd + 1) * n;
            let h_prev = if t > 0 {
                &hs[(t - 1) * di * n..t * di * n][row.clone()]
            } else {
                &zeros[..]
            };
            let (h_now, a_d) = (&h_t[row.clone()], &a[row.clone()]);
            let (gh_d, ga_d) = (&mut gh[row.clone()], &mut g_a[row]);
            for i in 0..n {
                gc_t[i] += gy * h_now[i];
                let g = gh_d[i] + gy * ct[i];
                let decay = crate::math::exp(dt * a_d[i]);
                let g_decay = g * h_prev[i] * decay; // dL/d(dt*A)
                dt_terms[i] = g_decay * a_d[i] + g * bt[i] * x;
                ga_d[i] += g_decay * dt;
                gb_t[i] += g * dt * x;
                x_terms[i] = g * bt[i];
                gh_d[i] = g * decay;
            }
            let gdt_acc = crate::math::sum(&dt_terms);
            gut[dd] = gy * d_skip[dd] + dt * crate::math::sum(&x_terms);
            let g_raw = gdt_acc * sigmoid(raw + bias[dd]);
            gut[di + dd] = g_raw;
            g_bias[dd] += g_raw;
        }
    }
    // Pack as p's layout: d/dA_log = d/dA * A.
    let mut gp = vec![0.0f32; di * (n + 2)];
    for dd in 0..di {
        for i in 0..n {
            gp[dd * (n + 2) + i] = g_a[dd * n + i] * a[dd * n + i];
        }
        gp[dd * (n + 2) + n] = g_d[dd];
        gp[dd * (n + 2) + n + 1] = g_bias[dd];
    }
    gp
}

crate::multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn core_sequence_fast(u: &[f32], bc: &[f32], a: &[f32], d_skip: &[f32], bias: &[f32], d: &Dims, out: &mut [f32]) {
        core_sequence(u, bc, a, d_skip, bias, d, out, None)
    }
}

crate::multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn core_backward_fast(
        ub: &[f32],
        bcb: &[f32],
        gout: &[f32],
        a: &[f32],
        d_skip: &[f32],
        bias: &[f32],
        d: &Dims,
        gu: &mut [f32],
        gbc: &mut [f32],
    ) -> Vec<f32> {
        core_backward(ub, bcb, gout, a, d_skip, bias, d, gu, gbc)
    }
}

impl CustomOp3 for SsmCore {
    fn name(&self) -> &'static str {
        "ssm_core"
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
        let d = dims(l1.shape(), l2.shape(), l3.shape(), self.gated)?;
        let (u, bc, p) = (
            f32_slice(s1, l1, "u")?,
            f32_slice(s2, l2, "bc")?,
            f32_slice(s3, l3, "p")?,
        );
        let (a, d_skip, bias) = params(p, &d);
        let mut out = vec![0.0f32; d.b * d.t * d.di];
        out.par_chunks_mut(d.t * d.di)
            .enumerate()
            .for_each(|(bi, ob)| {
                let ub = &u[bi * d.t * 3 * d.di..(bi + 1) * d.t * 3 * d.di];
                let bcb = &bc[bi * d.t * 2 * d.n..(bi + 1) * d.t * 2 * d.n];
                core_sequence_fast(ub, bcb, &a, &d_skip, &bias, &d, ob);
            });
        Ok((CpuStorage::F32(out), Shape::from((d.b, d.t, d.di))))
    }

    fn bwd(
        &self,
        u: &Tensor,
        bc: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = dims(u.shape(), bc.shape(), p.shape(), self.gated)?;
        let u_v = u.flatten_all()?.to_vec1::<f32>()?;
        let bc_v = bc.flatten_all()?.to_vec1::<f32>()?;
        let p_v = p.flatten_all()?.to_vec1::<f32>()?;
        let g_v = grad.flatten_all()?.to_vec1::<f32>()?;
        let (a, d_skip, bias) = params(&p_v, &d);
        let (t_len, di, n) = (d.t, d.di, d.n);
        let mut g_u = vec![0.0f32; u_v.len()];
        let mut g_bc = vec![0.0f32; bc_v.len()];
        // Per-sequence partial gradients of (A, D, dt_bias), summed afterwards.
        let parts: Vec<Vec<f32>> = g_u
            .par_chunks_mut(t_len * 3 * di)
            .zip(g_bc.par_chunks_mut(t_len * 2 * n))
            .enumerate()
            .map(|(bi, (gu, gbc))| {
                let ub = &u_v[bi * t_len * 3 * di..(bi + 1) * t_len * 3 * di];
                let bcb = &bc_v[bi * t_len * 2 * n..(bi + 1) * t_len * 2 * n];
                let gout = &g_v[bi * t_len * di..(bi + 1) * t_len * di];
                core_backward_fast(ub, bcb, gout, &a, &d_skip, &bias, &d, gu, gbc)
            })
            .collect();
        let mut g_p = vec![0.0f32; di * (n + 2)];
        for part in parts {
            for (acc, v) in g_p.iter_mut().zip(part) {
                *acc += v;
            }
        }
        let dev = u.device();
        Ok((
            Some(Tensor::from_vec(g_u, u.shape(), dev)?),
            Some(Tensor::from_vec(g_bc, bc.shape(), dev)?),
            Some(Tensor::from_vec(g_p, p.shape(), dev)?),
        ))
    }
}

/// out = (scan(x, softplus(dt_raw + dt_bias), -exp(A_log), B, C) + D x) * silu(z).
/// x, dt_raw, z: [B, T, Di]; bc: [B, T, 2N]; a_log: [Di, N]; d_skip, dt_bias: [Di].
pub fn ssm_core(
    x: &Tensor,
    dt_raw: &Tensor,
    z: &Tensor,
    bc: &Tensor,
    a_log: &Tensor,
    d_skip: &Tensor,
    dt_bias: &Tensor,
) -> candle_core::Result<Tensor> {
    ssm_core_op(x, dt_raw, Some(z), bc, a_log, d_skip, dt_bias)
}

/// `ssm_core` without the gate: out = scan(...) + D x.
pub fn ssm_core_ungated(
    x: &Tensor,
    dt_raw: &Tensor,
    bc: &Tensor,
    a_log: &Tensor,
    d_skip: &Tensor,
    dt_bias: &Tensor,
) -> candle_core::Result<Tensor> {
    ssm_core_op(x, dt_raw, None, bc, a_log, d_skip, dt_bias)
}

fn ssm_core_op(
    x: &Tensor,
    dt_raw: &Tensor,
    z: Option<&Tensor>,
    bc: &Tensor,
    a_log: &Tensor,
    d_skip: &Tensor,
    dt_bias: &Tensor,
) -> candle_core::Result<Tensor> {
    let gated = z.is_some();
    // Ungated, the z slot carries zeros (constant, so no gradient flows to it).
    let zeros;
    let z = match z {
        Some(z) => z,
        None => {
            zeros = x.zeros_like()?;
            &zeros
        }
    };
    let u = Tensor::cat(&[x, dt_raw, z], 2)?.contiguous()?;
    let p =
        Tensor::cat(&[a_log, &d_skip.unsqueeze(1)?, &dt_bias.unsqueeze(1)?], 1)?.contiguous()?;
    u.apply_op3(&bc.contiguous()?, &p, SsmCore { gated })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    struct Case {
        b: usize,
        t: usize,
        di: usize,
        n: usize,
    }

    /// Independent f64 reference of the fused computation, for finite differences.
    /// inputs: [x, raw, z, bc, a_log, d, bias, r]
    fn reference_loss(v: &[Vec<f64>], c: &Case, gated: bool) -> f64 {
        let (x, raw, z, bc, a_log, dsk, bias, r) =
            (&v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]);
        let (n, di) = (c.n, c.di);
        let sp = |v: f64| (1.0 + v.exp()).ln();
        let mut loss = 0.0;
        for bi in 0..c.b {
            let mut h = vec![0.0f64; di * n];
            for ti in 0..c.t {
                let row = bi * c.t + ti;
                for d in 0..di {
                    let idx = row * di + d;
                    let dt = sp(raw[idx] + bias[d]);
                    let mut y = 0.0;
                    for i in 0..n {
                        let a = -a_log[d * n + i].exp();
                        h[d * n + i] =
                            (dt * a).exp() * h[d * n + i] + dt * bc[row * 2 * n + i] * x[idx];
                        y += bc[row * 2 * n + n + i] * h[d * n + i];
                    }
                    let zz = z[idx];
                    let gate = if gated { zz / (1.0 + (-zz).exp()) } else { 1.0 };
                    loss += (y + dsk[d] * x[idx]) * gate * r[idx];
                }
            }
        }
        loss
    }

    #[test]
    fn backward_matches_finite_differences() {
        check_gradients(true);
        check_gradients(false);
    }

    fn check_gradients(gated: bool) {
        let c = Case {
            b: 2,
            t: 6,
            di: 3,
            n: 4,
        };
        let mut rng = Rng::new(7);
        let mut gen = |len: usize, lo: f64, hi: f64| -> Vec<f64> {
            (0..len).map(|_| lo + (hi - lo) * rng.uniform()).collect()
        };
        let btd = c.b * c.t * c.di;
        let inputs = vec![
            gen(btd, -1.0, 1.0),
            gen(btd, -2.0, 0.5),
            gen(btd, -2.0, 2.0),
            gen(c.b * c.t * 2 * c.n, -1.0, 1.0),
            gen(c.di * c.n, -1.0, 1.0),
            gen(c.di, -1.0, 1.0),
            gen(c.di, -1.0, 1.0),
            gen(btd, -1.0, 1.0),
        ];
        let shapes: Vec<Vec<usize>> = vec![
            vec![c.b, c.t, c.di],
            vec![c.b, c.t, c.di],
            vec![c.b, c.t, c.di],
            vec![c.b, c.t, 2 * c.n],
            vec![c.di, c.n],
            vec![c.di],
            vec![c.di],
            vec![c.b, c.t, c.di],
        ];
        let dev = Device::Cpu;
        let vars: Vec<Var> = inputs
            .iter()
            .zip(&shapes)
            .map(|(v, s)| {
                Var::from_tensor(
                    &Tensor::from_vec(
                        v.iter().map(|&f| f as f32).collect::<Vec<_>>(),
                        s.as_slice(),
                        &dev,
                    )
                    .unwrap(),
                )
                .unwrap()
            })
            .collect();
        let tv: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let out = if gated {
            ssm_core(tv[0], tv[1], tv[2], tv[3], tv[4], tv[5], tv[6]).unwrap()
        } else {
            ssm_core_ungated(tv[0], tv[1], tv[3], tv[4], tv[5], tv[6]).unwrap()
        };
        let loss = (out * tv[7]).unwrap().sum_all().unwrap();
        let value = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (value - reference_loss(&inputs, &c, gated)).abs() < 1e-4,
            "forward {value}"
        );
        let grads = loss.backward().unwrap();
        let eps = 1e-6;
        for which in 0..7 {
            if which == 2 && !gated {
                assert!(grads.get(tv[2]).is_none(), "ungated: z takes no part");
                continue;
            }
            let g = grads
                .get(tv[which])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for i in 0..inputs[which].len() {
                let (mut plus, mut minus) = (inputs.clone(), inputs.clone());
                plus[which][i] += eps;
                minus[which][i] -= eps;
                let numeric = (reference_loss(&plus, &c, gated)
                    - reference_loss(&minus, &c, gated))
                    / (2.0 * eps);
                let err = (numeric - g[i] as f64).abs();
                assert!(
                    err < 1e-3 * (1.0 + numeric.abs()),
                    "input {which} elem {i}: numeric {numeric} analytic {}",
                    g[i]
                );
            }
        }
    }
}
