//! The mixer between its projections, forward + backward at `tiny`'s sizes (d_inner 256, state
//! 8, dt rank 8, 4 taps) for one training shard of 8 x 128 tokens: the fused op (`mixer_core`)
//! against the composite of candle matmuls and the smaller fused ops it replaced.
//! Run with `cargo bench -p itera-train`.

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, Criterion};
use itera_train::reference::conv_norm::causal_conv_silu;
use itera_train::reference::mixer_core::{mixer_core, MixerWeights};
use itera_train::reference::scan::ssm_core;

const B: usize = 8;
const T: usize = 128;
const DI: usize = 256;
const N: usize = 8;
const R: usize = 8;
const K: usize = 4;

fn var(shape: &[usize], seed: u32) -> Var {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n as u32)
        .map(|i| {
            ((i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 - 0.5)
                * 0.2
        })
        .collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
}

fn weights<'a>(v: &[&'a Tensor]) -> MixerWeights<'a> {
    MixerWeights {
        conv: v[1],
        conv_bias: v[2],
        x_proj: v[3],
        dt_proj: v[4],
        a_log: v[5],
        d: v[6],
        dt_bias: v[7],
    }
}

fn composite(v: &[&Tensor]) -> Tensor {
    let m = weights(v);
    let xs = v[0].narrow(2, 0, DI).unwrap();
    let z = v[0].narrow(2, DI, DI).unwrap();
    let xc = causal_conv_silu(&xs, m.conv, m.conv_bias).unwrap();
    let dbc = xc
        .reshape((B * T, DI))
        .unwrap()
        .matmul(&m.x_proj.t().unwrap())
        .unwrap();
    let raw = dbc
        .narrow(1, 0, R)
        .unwrap()
        .matmul(&m.dt_proj.t().unwrap())
        .unwrap();
    let bc = dbc
        .narrow(1, R, 2 * N)
        .unwrap()
        .reshape((B, T, 2 * N))
        .unwrap();
    let raw = raw.reshape((B, T, DI)).unwrap();
    ssm_core(&xc, &raw, &z, &bc, m.a_log, m.d, m.dt_bias).unwrap()
}

fn mixer(c: &mut Criterion) {
    let vars = [
        var(&[B, T, 2 * DI], 1),
        var(&[DI, K], 2),
        var(&[DI], 3),
        var(&[R + 2 * N, DI], 4),
        var(&[DI, R], 5),
        var(&[DI, N], 6),
        var(&[DI], 7),
        var(&[DI], 8),
    ];
    let v: Vec<&Tensor> = vars.iter().map(|x| x.as_tensor()).collect();
    let mut group = c.benchmark_group("mixer_forward_backward");
    group.sample_size(20);
    group.bench_function("fused", |bench| {
        bench.iter(|| {
            mixer_core(v[0], &weights(&v))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    group.bench_function("composite", |bench| {
        bench.iter(|| composite(&v).sum_all().unwrap().backward().unwrap())
    });
    group.finish();
}

criterion_group!(benches, mixer);

fn main() {
    // The allocator and thread settings of `itera train`: without them every iteration
    // re-faults its large buffers, which hid the difference (2026-12-01).
    itera_train::process::prepare();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
