//! Shared by the training benches: deterministic inputs, and a `main` under the trainer's
//! process settings.

use candle_core::{Device, Tensor, Var};
use criterion::Criterion;

/// A trainable tensor of `shape` with small deterministic values in [-0.1, 0.1).
pub fn var(shape: &[usize], seed: u32) -> Var {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n as u32)
        .map(|i| {
            ((i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 - 0.5)
                * 0.2
        })
        .collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
}

/// Runs `benches` under the allocator and thread settings of `itera train`: without them every
/// iteration re-faults its large buffers, which hid the mixer's difference (2026-12-01).
pub fn main_with(benches: fn()) {
    itera_train::process::prepare();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
