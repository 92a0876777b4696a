//! A residual mixer block (norm, projections, mixer, residual add), forward + backward at
//! `tiny`'s sizes (width 128, d_inner 256, state 8, dt rank 8, 4 taps) for one training shard of
//! 8 x 128 tokens: the fused op (`mixer_block`) against the composite of candle matmuls and the
//! smaller fused ops it replaced.
//! Run with `cargo bench -p itera-train`.

mod common;

use candle_core::Tensor;
use common::var;
use criterion::{criterion_group, Criterion};
use itera_train::reference::mixer_block::{mixer_block, mixer_composite, MixerWeights};

const B: usize = 8;
const D: usize = 128;
const T: usize = 128;
const DI: usize = 256;
const N: usize = 8;
const R: usize = 8;
const K: usize = 4;

fn mixer(c: &mut Criterion) {
    let vars = [
        var(&[B * T, D], 1),
        var(&[D], 11),
        var(&[2 * DI, D], 9),
        var(&[DI, K], 2),
        var(&[DI], 3),
        var(&[R + 2 * N, DI], 4),
        var(&[DI, R], 5),
        var(&[DI, N], 6),
        var(&[DI], 7),
        var(&[DI], 8),
        var(&[D, DI], 10),
    ];
    let v: Vec<&Tensor> = vars.iter().map(|x| x.as_tensor()).collect();
    let mut group = c.benchmark_group("mixer_forward_backward");
    group.sample_size(20);
    type Mixer = fn(&Tensor, &MixerWeights) -> candle_core::Result<Tensor>;
    let fused: Mixer = |x, w| mixer_block(x, T, w, 1e-5, None);
    let composite: Mixer = |x, w| mixer_composite(&x.reshape((B, T, D))?, w, 1e-5, None);
    for (name, mixer) in [("fused", fused), ("composite", composite)] {
        group.bench_function(name, |bench| {
            bench.iter(|| {
                let y = mixer(v[0], &MixerWeights::from_slice(&v[1..])).unwrap();
                y.sum_all().unwrap().backward().unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, mixer);

fn main() {
    common::main_with(benches);
}
