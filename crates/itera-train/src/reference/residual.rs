//! What the fused residual blocks (`mixer_block`, `moe_block`) share around their branch: the
//! norm of the block's input, the branch's locked dropout and the residual add,
//! out = x + mask * branch(rms_norm(x)), and the backward of those parts.

use std::borrow::Cow;

use super::conv_norm::{norm_backward, norm_forward};

/// The parts of x + mask * branch(rms_norm(x)) outside the branch, for rows of B sequences of
/// `t` tokens.
pub(super) struct Residual {
    /// Tokens per sequence: the mask holds one [D] row per sequence.
    pub t: usize,
    /// The norm's epsilon.
    pub eps: f32,
    /// The branch's locked dropout, [B, D] (one value per sequence and channel), if any.
    pub mask: Option<Vec<f32>>,
}

impl Residual {
    /// Checks that x [rows, d] has whole sequences and, with a mask, one mask row for each.
    pub fn check(&self, rows: usize, d: usize, op: &str) -> candle_core::Result<()> {
        if self.t == 0 || !rows.is_multiple_of(self.t) {
            candle_core::bail!("{op}: {rows} rows are not whole sequences of {}", self.t);
        }
        let masked = self.mask.as_ref().map_or(rows / self.t * d, Vec::len);
        if masked != rows / self.t * d {
            candle_core::bail!("{op}: a dropout mask of {masked} for {rows} rows of {d}");
        }
        Ok(())
    }

    /// The branch's input: rms_norm(x) with weight `nw` [D].
    pub fn norm(&self, x: &[f32], nw: &[f32]) -> Vec<f32> {
        norm_forward(x, nw, self.eps)
    }

    /// Multiplies each row of a [B*T, D] branch by its sequence's mask, if any.
    pub fn mask_rows(&self, branch: &mut [f32], d: usize) {
        let Some(mask) = &self.mask else {
            return;
        };
        for (seq, m) in branch.chunks_mut(self.t * d).zip(mask.chunks_exact(d)) {
            for row in seq.chunks_exact_mut(d) {
                row.iter_mut().zip(m).for_each(|(v, m)| *v *= m);
            }
        }
    }

    /// branch = x + mask * branch, in place: the block's output.
    pub fn add(&self, branch: &mut [f32], x: &[f32], d: usize) {
        self.mask_rows(branch, d);
        branch.iter_mut().zip(x).for_each(|(v, x)| *v += x);
    }

    /// The gradient reaching the branch's output from the block's, `grad` [B*T, D]: `grad`
    /// itself without a mask.
    pub fn branch_grad<'g>(&self, grad: &'g [f32], d: usize) -> Cow<'g, [f32]> {
        if self.mask.is_none() {
            return Cow::Borrowed(grad);
        }
        let mut g = grad.to_vec();
        self.mask_rows(&mut g, d);
        Cow::Owned(g)
    }

    /// (dL/dx, dL/d norm weight) from the block's gradient `grad` and the branch's input
    /// gradient `g_hn`: through the norm, plus the residual's identity.
    pub fn backward(
        &self,
        x: &[f32],
        nw: &[f32],
        grad: &[f32],
        g_hn: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let (mut g_x, g_nw) = norm_backward(x, g_hn, nw, self.eps);
        g_x.iter_mut().zip(grad).for_each(|(a, g)| *a += g);
        (g_x, g_nw)
    }
}
