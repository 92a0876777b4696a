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
#[inline]
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
        let mut acc = 0.0f32;
        for i in 0..n {
            let v = (dtd * ad[i]).exp() * hd[i] + dx * b[i];
            hd[i] = v;
            acc += c[i] * v;
        }
        y[d] = acc;
    }
}

/// Fused scan over `[batch, time]`.
/// Inputs: `xd` [B, T, 2*Di] = (x, dt) concatenated; `bc` [B, T, 2*N] = (B, C); `a` [Di, N].
/// Output: y [B, T, Di].
pub struct SelectiveScan;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("selective_scan: `{what}` must be f32"),
    };
    if !l.is_contiguous() {
        candle_core::bail!("selective_scan: `{what}` must be contiguous");
    }
    Ok(&data[l.start_offset()..l.start_offset() + l.shape().elem_count()])
}

struct Dims {
    b: usize,
    t: usize,
    di: usize,
    n: usize,
}

fn dims(xd: &Shape, bc: &Shape, a: &Shape) -> candle_core::Result<Dims> {
    let (b, t, di2) = xd.dims3()?;
    let (b2, t2, n2) = bc.dims3()?;
    let (di, n) = a.dims2()?;
    if b2 != b || t2 != t || di2 != 2 * di || n2 != 2 * n {
        candle_core::bail!("selective_scan: shapes disagree: xd {xd:?}, bc {bc:?}, A {a:?}");
    }
    Ok(Dims { b, t, di, n })
}

/// Runs the scan for one sequence; when `states` is given it receives h after every step.
fn scan_sequence(
    xd: &[f32],
    bc: &[f32],
    a: &[f32],
    d: &Dims,
    y: &mut [f32],
    mut states: Option<&mut [f32]>,
) {
    let (di, n) = (d.di, d.n);
    let mut h = vec![0.0f32; di * n];
    for t in 0..d.t {
        let xt = &xd[t * 2 * di..(t + 1) * 2 * di];
        let bct = &bc[t * 2 * n..(t + 1) * 2 * n];
        scan_step(
            &xt[..di],
            &xt[di..],
            a,
            &bct[..n],
            &bct[n..],
            &mut h,
            &mut y[t * di..(t + 1) * di],
        );
        if let Some(s) = states.as_deref_mut() {
            s[t * di * n..(t + 1) * di * n].copy_from_slice(&h);
        }
    }
}

impl CustomOp3 for SelectiveScan {
    fn name(&self) -> &'static str {
        "selective_scan"
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
        let d = dims(l1.shape(), l2.shape(), l3.shape())?;
        let (xd, bc, a) = (
            f32_slice(s1, l1, "xd")?,
            f32_slice(s2, l2, "bc")?,
            f32_slice(s3, l3, "A")?,
        );
        let mut y = vec![0.0f32; d.b * d.t * d.di];
        y.par_chunks_mut(d.t * d.di)
            .enumerate()
            .for_each(|(bi, yb)| {
                let xb = &xd[bi * d.t * 2 * d.di..(bi + 1) * d.t * 2 * d.di];
                let bcb = &bc[bi * d.t * 2 * d.n..(bi + 1) * d.t * 2 * d.n];
                scan_sequence(xb, bcb, a, &d, yb, None);
            });
        Ok((CpuStorage::F32(y), Shape::from((d.b, d.t, d.di))))
    }

    fn bwd(
        &self,
        xd: &Tensor,
        bc: &Tensor,
        a: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = dims(xd.shape(), bc.shape(), a.shape())?;
        let xd_v = xd.flatten_all()?.to_vec1::<f32>()?;
        let bc_v = bc.flatten_all()?.to_vec1::<f32>()?;
        let a_v = a.flatten_all()?.to_vec1::<f32>()?;
        let g_v = grad.flatten_all()?.to_vec1::<f32>()?;
        let (t_len, di, n) = (d.t, d.di, d.n);
        let mut g_xd = vec![0.0f32; xd_v.len()];
        let mut g_bc = vec![0.0f32; bc_v.len()];
        let g_a_parts: Vec<Vec<f32>> = g_xd
            .par_chunks_mut(t_len * 2 * di)
            .zip(g_bc.par_chunks_mut(t_len * 2 * n))
            .enumerate()
            .map(|(bi, (gx, gbc))| {
                let xb = &xd_v[bi * t_len * 2 * di..(bi + 1) * t_len * 2 * di];
                let bcb = &bc_v[bi * t_len * 2 * n..(bi + 1) * t_len * 2 * n];
                let gy = &g_v[bi * t_len * di..(bi + 1) * t_len * di];
                // Recompute the forward states: h_t for every t.
                let mut states = vec![0.0f32; t_len * di * n];
                let mut y = vec![0.0f32; t_len * di];
                scan_sequence(xb, bcb, &a_v, &d, &mut y, Some(&mut states));
                let mut g_a = vec![0.0f32; di * n];
                // gh carries dL/dh_t backwards through h_{t+1} = a_{t+1} * h_t + ...
                let mut gh = vec![0.0f32; di * n];
                for t in (0..t_len).rev() {
                    let xt = &xb[t * 2 * di..t * 2 * di + di];
                    let dtt = &xb[t * 2 * di + di..(t + 1) * 2 * di];
                    let bt = &bcb[t * 2 * n..t * 2 * n + n];
                    let ct = &bcb[t * 2 * n + n..(t + 1) * 2 * n];
                    let h_t = &states[t * di * n..(t + 1) * di * n];
                    let gyt = &gy[t * di..(t + 1) * di];
                    let (gx_t, gdt_t) = gx[t * 2 * di..(t + 1) * 2 * di].split_at_mut(di);
                    let (gb_t, gc_t) = gbc[t * 2 * n..(t + 1) * 2 * n].split_at_mut(n);
                    for dd in 0..di {
                        let (x, dt) = (xt[dd], dtt[dd]);
                        let (mut gx_acc, mut gdt_acc) = (0.0f32, 0.0f32);
                        for i in 0..n {
                            let k = dd * n + i;
                            let h_prev = if t > 0 {
                                states[(t - 1) * di * n + k]
                            } else {
                                0.0
                            };
                            gc_t[i] += gyt[dd] * h_t[k];
                            // gh_t = (carried from t+1) + dy_t/dh_t
                            let g = gh[k] + gyt[dd] * ct[i];
                            let a_da = a_v[k];
                            let decay = (dt * a_da).exp();
                            // h_t = decay * h_prev + dt * B * x
                            let g_decay = g * h_prev * decay; // dL/d(dt*A)
                            gdt_acc += g_decay * a_da + g * bt[i] * x;
                            g_a[k] += g_decay * dt;
                            gb_t[i] += g * dt * x;
                            gx_acc += g * dt * bt[i];
                            gh[k] = g * decay;
                        }
                        gx_t[dd] = gx_acc;
                        gdt_t[dd] = gdt_acc;
                    }
                }
                g_a
            })
            .collect();
        let mut g_a = vec![0.0f32; di * n];
        for part in g_a_parts {
            for (acc, v) in g_a.iter_mut().zip(part) {
                *acc += v;
            }
        }
        let dev = xd.device();
        Ok((
            Some(Tensor::from_vec(g_xd, xd.shape(), dev)?),
            Some(Tensor::from_vec(g_bc, bc.shape(), dev)?),
            Some(Tensor::from_vec(g_a, a.shape(), dev)?),
        ))
    }
}

/// y = selective_scan(x, dt, A, B, C) with x, dt [B, T, Di], bc [B, T, 2N], a [Di, N].
pub fn selective_scan(
    x: &Tensor,
    dt: &Tensor,
    bc: &Tensor,
    a: &Tensor,
) -> candle_core::Result<Tensor> {
    let xd = Tensor::cat(&[x, dt], 2)?.contiguous()?;
    xd.apply_op3(&bc.contiguous()?, &a.contiguous()?, SelectiveScan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    /// Independent f64 reference of the same recurrence, for finite differences.
    fn reference_loss(
        x: &[f64],
        dt: &[f64],
        bc: &[f64],
        a: &[f64],
        r: &[f64],
        b: usize,
        t: usize,
        di: usize,
        n: usize,
    ) -> f64 {
        let mut loss = 0.0;
        for bi in 0..b {
            let mut h = vec![0.0f64; di * n];
            for ti in 0..t {
                for d in 0..di {
                    let idx = (bi * t + ti) * di + d;
                    let mut y = 0.0;
                    for i in 0..n {
                        let bb = bc[(bi * t + ti) * 2 * n + i];
                        let cc = bc[(bi * t + ti) * 2 * n + n + i];
                        h[d * n + i] =
                            (dt[idx] * a[d * n + i]).exp() * h[d * n + i] + dt[idx] * bb * x[idx];
                        y += cc * h[d * n + i];
                    }
                    loss += y * r[idx];
                }
            }
        }
        loss
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (b, t, di, n) = (2, 7, 3, 4);
        let mut rng = Rng::new(7);
        let mut gen = |len: usize, lo: f64, hi: f64| -> Vec<f64> {
            (0..len).map(|_| lo + (hi - lo) * rng.uniform()).collect()
        };
        let x = gen(b * t * di, -1.0, 1.0);
        let dt = gen(b * t * di, 0.05, 0.6);
        let bc = gen(b * t * 2 * n, -1.0, 1.0);
        let a = gen(di * n, -2.0, -0.2);
        let r = gen(b * t * di, -1.0, 1.0);
        let dev = Device::Cpu;
        let to_var = |v: &[f64], s: &[usize]| {
            Var::from_tensor(
                &Tensor::from_vec(v.iter().map(|&f| f as f32).collect::<Vec<_>>(), s, &dev)
                    .unwrap(),
            )
            .unwrap()
        };
        let (xv, dtv) = (to_var(&x, &[b, t, di]), to_var(&dt, &[b, t, di]));
        let (bcv, av) = (to_var(&bc, &[b, t, 2 * n]), to_var(&a, &[di, n]));
        let rt = Tensor::from_vec(
            r.iter().map(|&f| f as f32).collect::<Vec<_>>(),
            (b, t, di),
            &dev,
        )
        .unwrap();
        let y = selective_scan(
            xv.as_tensor(),
            dtv.as_tensor(),
            bcv.as_tensor(),
            av.as_tensor(),
        )
        .unwrap();
        let loss = (y * &rt).unwrap().sum_all().unwrap();
        let analytic = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((analytic - reference_loss(&x, &dt, &bc, &a, &r, b, t, di, n)).abs() < 1e-4);
        let grads = loss.backward().unwrap();
        let eps = 1e-6;
        let mut checked = 0;
        let inputs: [(&Var, &[f64]); 4] = [(&xv, &x), (&dtv, &dt), (&bcv, &bc), (&av, &a)];
        for (which, (var, base)) in inputs.iter().enumerate() {
            let g = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for i in 0..base.len() {
                let mut plus = [x.clone(), dt.clone(), bc.clone(), a.clone()];
                let mut minus = plus.clone();
                plus[which][i] += eps;
                minus[which][i] -= eps;
                let fp = reference_loss(&plus[0], &plus[1], &plus[2], &plus[3], &r, b, t, di, n);
                let fm =
                    reference_loss(&minus[0], &minus[1], &minus[2], &minus[3], &r, b, t, di, n);
                let numeric = (fp - fm) / (2.0 * eps);
                let err = (numeric - g[i] as f64).abs();
                assert!(
                    err < 1e-3 * (1.0 + numeric.abs()),
                    "input {which} elem {i}: numeric {numeric} analytic {}",
                    g[i]
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 2 * (b * t * di) + b * t * 2 * n + di * n);
    }
}
