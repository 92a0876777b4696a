//! Kernel benchmarks: the one matmul per weight format at the shapes of `tiny`'s LM head and
//! in_proj, for one row (decode), 64 rows (batched decode) and 2,048 rows (prefill).
//! Also the pair helper's hand-off (`pair/hand_off`: one `both` call with empty halves) and one
//! row through every decode product's shape split with it and on one thread side by side
//! (`matmul_pair/SHAPE/FORMAT/{pair,serial}`), which says from what size a split pays.
//! Run with `cargo bench -p itera-core`; throughput is reported in multiply-adds per second.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use itera_core::exec::Par;
use itera_core::format::dtype::DType;
use itera_core::kernels::{Matrix, QuantizedRows};

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0
                - 0.5
        })
        .collect()
}

fn matmul(c: &mut Criterion) {
    for &(name, rows, cols) in &[("lm_head", 8000usize, 128usize), ("in_proj", 512, 128)] {
        let w = values(rows * cols, 1);
        let mut group = c.benchmark_group(format!("matmul/{name}"));
        group.sample_size(10);
        for dtype in [
            DType::F32,
            DType::F16,
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
            DType::Q5_0,
            DType::NF4,
        ] {
            let m = Matrix::quantize(dtype, rows, cols, &w).unwrap();
            for &n in &[1usize, 64, 2048] {
                let x = values(n * cols, 2);
                let mut y = vec![0.0; n * rows];
                let mut q = QuantizedRows::default();
                group.throughput(Throughput::Elements((n * rows * cols) as u64));
                group.bench_with_input(BenchmarkId::new(dtype.name(), n), &n, |b, _| {
                    b.iter(|| m.matmul(&x, &mut y, &mut q, Par::Serial))
                });
            }
        }
        group.finish();
    }
}

/// The pair helper: the cost of one hand-off, and one decode row through each decode product's
/// shape, split between two cores and on one.
fn pair(c: &mut Criterion) {
    let mut group = c.benchmark_group("pair");
    group.bench_function("hand_off", |b| {
        b.iter(|| itera_core::exec::pair::both(|_| {}))
    });
    group.finish();
    for &(name, rows, cols) in &[
        ("lm_head", 8000usize, 128usize),
        ("in_proj", 512, 128),
        ("out_proj", 128, 256),
        ("expert", 128, 128),
    ] {
        let w = values(rows * cols, 1);
        let mut group = c.benchmark_group(format!("matmul_pair/{name}"));
        for dtype in [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0] {
            let m = Matrix::quantize(dtype, rows, cols, &w).unwrap();
            let x = values(cols, 2);
            let mut y = vec![0.0; rows];
            let mut q = QuantizedRows::default();
            group.throughput(Throughput::Elements((rows * cols) as u64));
            for (how, par) in [("pair", Par::Pair), ("serial", Par::Serial)] {
                group.bench_function(format!("{}/{how}", dtype.name()), |b| {
                    b.iter(|| m.matmul(&x, &mut y, &mut q, par))
                });
            }
        }
        group.finish();
    }
}

/// One decode row through the small products of `tiny`'s step, on one thread: the router and
/// dt_proj (f32 in every format's file) and x_proj, whose time is latency (short or few FMA
/// chains), not arithmetic.
fn small(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul_small");
    for &(name, rows, cols, dtype) in &[
        ("router", 4usize, 128usize, DType::F32),
        ("dt_proj", 256, 8, DType::F32),
        ("x_proj", 24, 256, DType::F32),
        ("x_proj", 24, 256, DType::Q4_0),
    ] {
        let m = Matrix::quantize(dtype, rows, cols, &values(rows * cols, 1)).unwrap();
        let x = values(cols, 2);
        let mut y = vec![0.0; rows];
        let mut q = QuantizedRows::default();
        group.throughput(Throughput::Elements((rows * cols) as u64));
        group.bench_function(format!("{name}/{}", dtype.name()), |b| {
            b.iter(|| m.matmul(&x, &mut y, &mut q, Par::Serial))
        });
    }
    group.finish();
}

criterion_group!(benches, matmul, pair, small);
criterion_main!(benches);
