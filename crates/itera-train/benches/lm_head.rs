//! The fused LM-head loss, forward + backward, at `tiny`'s sizes (d 128, vocab 8,000) for one
//! training shard of 16 x 128 tokens: three [N, d] x [d, V]-sized matmuls and a softmax over
//! every row, 12.6 GFLOP; `fused` as one shard with `gemm`'s own threads, `two_shards` as two
//! halves on two cores at once, the way a training step runs it.
//! Run with `cargo bench -p itera-train --bench lm_head`.

use candle_core::{Device, Tensor};
mod common;

use common::var;
use criterion::{criterion_group, Criterion};
use itera_train::reference::lm_head_loss::lm_head_loss;

const N: usize = 2048;
const D: usize = 128;
const V: usize = 8000;

fn head(c: &mut Criterion) {
    let (h, w) = (var(&[N, D], 1), var(&[V, D], 2));
    let targets: Vec<u32> = (0..N as u32).map(|i| i * 7919 % V as u32).collect();
    let t = Tensor::from_vec(targets, N, &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("lm_head_loss_forward_backward");
    group.sample_size(20);
    group.bench_function("fused", |bench| {
        bench.iter(|| {
            let loss = lm_head_loss(h.as_tensor(), w.as_tensor(), &t).unwrap();
            loss.backward().unwrap()
        })
    });
    // As a training step runs it: one shard of half the rows per core, at the same time.
    let halves = [var(&[N / 2, D], 3), var(&[N / 2, D], 4)];
    let t_half = t.narrow(0, 0, N / 2).unwrap();
    group.bench_function("two_shards", |bench| {
        bench.iter(|| {
            let shard = |h: &candle_core::Var| {
                let loss = lm_head_loss(h.as_tensor(), w.as_tensor(), &t_half).unwrap();
                loss.backward().unwrap()
            };
            rayon::join(|| shard(&halves[0]), || shard(&halves[1]))
        })
    });
    group.finish();
}

criterion_group!(benches, head);

fn main() {
    common::main_with(benches);
}
