//! The SwiGLU gate silu(g) * u of the experts as one fused op with a hand-written backward.
//! Candle's composite (silu, then a product) builds about ten element-wise temporaries in its
//! backward alone; this is one pass each way.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use itera_core::math::sigmoid_with;
use rayon::prelude::*;

use super::linear::linear;
use super::scan::f32_slice;

/// Elements per parallel task.
const CHUNK: usize = 1 << 13;

struct SwigluGate;

itera_core::multiversion! {
    /// out = silu(g) * u.
    fn gate_forward<M>(g: &[f32], u: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            *o = g * sigmoid_with::<M>(g) * u;
        }
    }
}

itera_core::multiversion! {
    /// dg = grad * u * silu'(g), du = grad * silu(g); silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
    fn gate_backward<M>(g: &[f32], u: &[f32], grad: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for i in 0..g.len() {
            let s = sigmoid_with::<M>(g[i]);
            du[i] = grad[i] * g[i] * s;
            dg[i] = grad[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        }
    }
}

/// `gate_forward` over `CHUNK`-element tasks: out = silu(g) * u.
pub(super) fn forward_par(g: &[f32], u: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| gate_forward(g, u, o));
}

/// `gate_backward` over `CHUNK`-element tasks: dg and du from the gradient of silu(g) * u.
pub(super) fn backward_par(g: &[f32], u: &[f32], grad: &[f32], dg: &mut [f32], du: &mut [f32]) {
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .zip(grad.par_chunks(CHUNK))
        .for_each(|(((dg, du), (g, u)), gr)| gate_backward(g, u, gr, dg, du));
}

impl CustomOp2 for SwigluGate {
    fn name(&self) -> &'static str {
        "swiglu_gate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "swiglu_gate: g {:?} and u {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let (g, u) = (f32_slice(s1, l1, "g")?, f32_slice(s2, l2, "u")?);
        let mut out = vec![0.0f32; g.len()];
        forward_par(g, u, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gv = g.flatten_all()?.to_vec1::<f32>()?;
        let uv = u.flatten_all()?.to_vec1::<f32>()?;
        let grv = grad.flatten_all()?.to_vec1::<f32>()?;
        let (mut dg, mut du) = (vec![0.0f32; gv.len()], vec![0.0f32; gv.len()]);
        backward_par(&gv, &uv, &grv, &mut dg, &mut du);
        Ok((
            Some(Tensor::from_vec(dg, g.shape(), g.device())?),
            Some(Tensor::from_vec(du, u.shape(), u.device())?),
        ))
    }
}

/// silu(g) * u, element-wise; g and u of the same shape.
pub fn swiglu_gate(g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    g.contiguous()?.apply_op2(&u.contiguous()?, SwigluGate)
}

/// A SwiGLU feed-forward from candle ops on h [N, d] with weights (gate [H, d], up [H, d],
/// down [d, H]): down(hidden(silu(h gateᵀ) * (h upᵀ))), `hidden` being the caller's dropout or
/// nothing. The dense feed-forward layers and the MoE composite's experts.
pub fn swiglu_mlp(
    h: &Tensor,
    [gate, up, down]: [&Tensor; 3],
    hidden: &dyn Fn(Tensor) -> crate::error::Result<Tensor>,
) -> crate::error::Result<Tensor> {
    let a = hidden(swiglu_gate(&linear(h, gate)?, &linear(h, up)?)?)?;
    Ok(linear(&a, down)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and gradients agree with candle's composite silu(g) * u.
    #[test]
    fn matches_composite() {
        let dev = Device::Cpu;
        let n = 3 * CHUNK + 4; // several tasks and a ragged tail; a multiple of 5
        let mk = |f: fn(f32) -> f32| {
            let v: Vec<f32> = (0..n).map(|i| f(i as f32 * 0.001)).collect();
            Var::from_tensor(&Tensor::from_vec(v, (n / 5, 5), &dev).unwrap()).unwrap()
        };
        let (g, u) = (mk(|x| (x * 7.0).sin() * 4.0), mk(|x| (x * 3.0).cos()));
        let r = Tensor::from_vec(
            (0..n)
                .map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0)
                .collect::<Vec<_>>(),
            (n / 5, 5),
            &dev,
        )
        .unwrap();
        let fused = swiglu_gate(g.as_tensor(), u.as_tensor()).unwrap();
        let composite = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in flat(&fused).iter().zip(flat(&composite)) {
            assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
        let ga = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (composite * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&g, &u] {
            let (a, b) = (flat(ga.get(v).unwrap()), flat(gb.get(v).unwrap()));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
    }
}
