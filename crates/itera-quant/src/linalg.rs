//! The f64 linear algebra the least-squares fits share (`prune::refit`, `gptq`): sums of
//! products over calibration tokens, and Cholesky factoring and solving.

use itera_core::error::{Error, Result};

/// Rows of `add_products`' output block: four rows by two AVX-512 registers of columns, eight
/// registers of sums.
const BLOCK_ROWS: usize = 4;
const BLOCK_COLS: usize = 16;

/// Tokens `add_products` takes at a time: 64 rows of `tiny`'s 768 features are 384 KB, inside
/// L2 while every block of the output passes over them.
const SPAN: usize = 64;

itera_core::multiversion! {
    /// out [ra, rb] += a^T b for a [n, ra] and b [n, rb] (row-major, one row per token), in
    /// f64: the Gram matrix of a ridge as small as 1e-6 must stay positive definite (f32 sums
    /// of a few thousand products are not). Each output block of BLOCK_ROWS x BLOCK_COLS stays in
    /// registers while SPAN tokens pass: per token, one broadcast of a's value for each row and
    /// one load of b's BLOCK_COLS values. Blocks cut off at the edges go element by element.
    pub fn add_products(a: &[f64], b: &[f64], n: usize, out: &mut [f64]) {
        let (ra, rb) = (a.len() / n, b.len() / n);
        let (ra_full, rb_full) = (ra / BLOCK_ROWS * BLOCK_ROWS, rb / BLOCK_COLS * BLOCK_COLS);
        for t0 in (0..n).step_by(SPAN) {
            let tokens = t0..(t0 + SPAN).min(n);
            for i0 in (0..ra_full).step_by(BLOCK_ROWS) {
                for j0 in (0..rb_full).step_by(BLOCK_COLS) {
                    let mut acc = [[0f64; BLOCK_COLS]; BLOCK_ROWS];
                    for t in tokens.clone() {
                        let bt: &[f64; BLOCK_COLS] =
                            b[t * rb + j0..][..BLOCK_COLS].try_into().expect("a block");
                        for (i, acc_i) in acc.iter_mut().enumerate() {
                            let av = a[t * ra + i0 + i];
                            for (s, &bv) in acc_i.iter_mut().zip(bt) {
                                *s += av * bv;
                            }
                        }
                    }
                    for (i, acc_i) in acc.iter().enumerate() {
                        let o = &mut out[(i0 + i) * rb + j0..][..BLOCK_COLS];
                        o.iter_mut().zip(acc_i).for_each(|(o, s)| *o += s);
                    }
                }
            }
            // The rows past the last whole block (all columns), then the columns past it.
            let edge = (ra_full..ra).flat_map(|i| (0..rb).map(move |j| (i, j)));
            let edge = edge.chain((0..ra_full).flat_map(|i| (rb_full..rb).map(move |j| (i, j))));
            for (i, j) in edge {
                out[i * rb + j] += tokens.clone().map(|t| a[t * ra + i] * b[t * rb + j]).sum::<f64>();
            }
        }
    }
}

/// Factors m (symmetric positive definite [n, n]) in place as L L^T: L in the lower triangle
/// (the upper is left as it was). `what` names the system in the error.
pub fn cholesky(m: &mut [f64], n: usize, what: &str) -> Result<()> {
    for j in 0..n {
        let s = m[j * n + j] - (0..j).map(|k| m[j * n + k] * m[j * n + k]).sum::<f64>();
        if s.is_nan() || s <= 0.0 {
            return Err(Error::Argument(format!(
                "{what}: the least-squares system is not positive definite"
            )));
        }
        let diag = s.sqrt();
        m[j * n + j] = diag;
        for i in j + 1..n {
            let s = m[i * n + j] - (0..j).map(|k| m[i * n + k] * m[j * n + k]).sum::<f64>();
            m[i * n + j] = s / diag;
        }
    }
    Ok(())
}

/// Solves m x = b for each row b of `rhs` (in place), m symmetric positive definite [n, n]
/// (overwritten by its Cholesky factor).
pub fn cholesky_solve(m: &mut [f64], n: usize, rhs: &mut [f64]) -> Result<()> {
    cholesky(m, n, "refit")?;
    for b in rhs.chunks_exact_mut(n) {
        for i in 0..n {
            b[i] = (b[i] - (0..i).map(|k| m[i * n + k] * b[k]).sum::<f64>()) / m[i * n + i];
        }
        for i in (0..n).rev() {
            b[i] = (b[i] - (i + 1..n).map(|k| m[k * n + i] * b[k]).sum::<f64>()) / m[i * n + i];
        }
    }
    Ok(())
}
