//! A bounds-checked front for the `gemm` crate (the same kernels candle uses), for fused ops that
//! multiply slices directly.

/// A read-only matrix view: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// A row-major [rows, cols] matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, without copying.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    fn check(&self, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(
                last < self.data.len(),
                "matmul: `{what}` view exceeds its slice"
            );
        }
    }
}

/// c [a.rows, b.cols] (row-major) = a · b, or c += a · b when `accumulate`.
pub fn matmul(c: &mut [f32], a: View, b: View, accumulate: bool) {
    assert_eq!(
        c.len(),
        a.rows * b.cols,
        "matmul: output has the wrong size"
    );
    // SAFETY: `c` is a row-major [a.rows, b.cols] buffer of initialised values (asserted above).
    unsafe { into(c.as_mut_ptr(), a, b, accumulate) }
}

/// a · b as a new row-major [a.rows, b.cols] matrix. `gemm` writes every output without reading
/// it, so the buffer gets no zero fill first: the backward's outputs filled with zeros only to be
/// overwritten were most of a training step's `memset`.
pub fn product(a: View, b: View) -> Vec<f32> {
    let len = a.rows * b.cols;
    if a.cols == 0 {
        return vec![0.0; len];
    }
    let mut c = Vec::with_capacity(len);
    // SAFETY: the capacity holds a row-major [a.rows, b.cols] buffer; with an inner dimension of
    // at least 1, `into` without accumulating (gemm with read_dst false) writes each of its `len`
    // values and reads none, so all `len` are initialised before `set_len`.
    unsafe {
        into(c.as_mut_ptr(), a, b, false);
        c.set_len(len);
    }
    c
}

/// c = a · b, or c += a · b when `accumulate`, through `gemm`.
///
/// # Safety
/// `c` points to a row-major [a.rows, b.cols] buffer this call may write; when `accumulate`, its
/// values are initialised (they are read).
unsafe fn into(c: *mut f32, a: View, b: View, accumulate: bool) {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    a.check("a");
    b.check("b");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = if m * n * k > 1 << 18 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index gemm touches lies inside the slices: checked above for a and b, and c is
    // a contiguous row-major [m, n] buffer of exactly m * n elements (this function's contract).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `product` equals `matmul` into zeros, also for an empty inner dimension (all zeros).
    #[test]
    fn product_equals_matmul_into_zeros() {
        for (m, k, n) in [(9, 13, 7), (4, 0, 3)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.3).cos()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.7).sin()).collect();
            let (av, bv) = (View::rows(&a, m, k), View::rows(&b, k, n));
            let mut want = vec![0.0f32; m * n];
            matmul(&mut want, av, bv, false);
            assert_eq!(product(av, bv), want);
        }
    }

    #[test]
    fn matches_naive_with_transposes_and_accumulation() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect(); // b stored as [n, k]
        let mut c = vec![1.0f32; m * n];
        matmul(
            &mut c,
            View::rows(&a, m, k),
            View::rows(&bt, n, k).t(),
            true,
        );
        for i in 0..m {
            for j in 0..n {
                let want = 1.0 + (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum::<f32>();
                assert!((c[i * n + j] - want).abs() < 1e-5);
            }
        }
    }
}
