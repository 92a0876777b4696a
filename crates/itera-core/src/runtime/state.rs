//! What a stream carries between calls (`State`: conv buffers and SSM states per layer) and the
//! work buffers one caller reuses across calls (`Scratch`).

use serde::{Deserialize, Serialize};

use crate::exec::Disjoint;
use crate::kernels::{Matrix, QuantizedRows};

/// Per-layer recurrent state: the last d_conv-1 conv inputs and the SSM state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerState {
    /// [(d_conv - 1) * d_inner], oldest input first.
    pub conv: Vec<f32>,
    /// [d_state][d_inner] ([d_state] for the shared-state mixer)
    pub ssm: Vec<f32>,
}

/// Everything the model remembers about the tokens seen so far.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub layers: Vec<LayerState>,
    /// Tokens consumed so far.
    pub position: usize,
}

impl State {
    /// Bytes of f32 state (what a prompt cache entry costs).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| 4 * (l.conv.len() + l.ssm.len()))
            .sum()
    }
}

/// Work buffers, grown on demand and reused across calls. After a call, `logits` holds one row
/// of `vocab_size` logits per requested row.
#[derive(Default)]
pub struct Scratch {
    pub(super) x: Vec<f32>,
    pub(super) h: Vec<f32>,
    pub(super) xz: Vec<f32>,
    pub(super) xc: Vec<f32>,
    pub(super) dbc: Vec<f32>,
    pub(super) dt_low: Vec<f32>,
    pub(super) dt: Vec<f32>,
    pub(super) u: Vec<f32>,
    pub(super) y: Vec<f32>,
    pub(super) out: Vec<f32>,
    pub(super) router: Vec<f32>,
    pub(super) chosen: Vec<usize>,
    pub(super) expert_rows: Vec<Vec<(usize, f32)>>,
    pub(super) eh: Vec<f32>,
    pub(super) eg: Vec<f32>,
    pub(super) eu: Vec<f32>,
    pub(super) eo: Vec<f32>,
    pub(super) q: QuantizedRows,
    /// One per product of a grouped matmul (`Matrix::matmul_group`).
    pub(super) qs: Vec<QuantizedRows>,
    pub(super) conv_ptrs: Vec<Disjoint<f32>>,
    pub(super) ssm_ptrs: Vec<Disjoint<f32>>,
    /// One per thread when streams are split between threads (`forward_split`).
    pub(super) groups: Vec<Scratch>,
    pub logits: AlignedBuf,
    /// When set, MoE layers add what their routers did to it (`RoutingStats::new` to start).
    pub routing: Option<super::moe::RoutingStats>,
    /// When set, called with every weight matrix a layer multiplies and the input rows it
    /// multiplies them by (what `itera quantize --gptq` sums its Gram matrices from, and what
    /// `itera prune --refit` fits the kept experts on: the rows its router reads).
    pub inputs: Option<InputHook>,
    /// When set, one-row calls (decode steps) add their time per phase to it (`Phases`).
    pub phases: Option<super::Phases>,
}

/// See `Scratch::inputs`: a matrix of the runtime (`Runtime::matrices` names them) and its input
/// rows ([rows, cols]).
pub type InputHook = Box<dyn FnMut(&Matrix, &[f32]) + Send>;

/// Passes `x` to the hook, if one is set.
pub(super) fn note_inputs(hook: &mut Option<InputHook>, m: &Matrix, x: &[f32]) {
    if let Some(f) = hook {
        f(m, x);
    }
}

/// A growable f32 buffer whose contents start on a 64-byte boundary, so that a big output
/// (all-position logits) can be written with non-temporal stores. Reads as a slice.
#[derive(Clone, Debug, Default)]
pub struct AlignedBuf {
    buf: Vec<f32>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// The first `n` values, aligned (contents unspecified until written).
    pub fn grow(&mut self, n: usize) -> &mut [f32] {
        if self.buf.len() < n + 16 {
            self.buf.resize(n + 16, 0.0);
        }
        self.start = (64 - self.buf.as_ptr() as usize % 64) % 64 / 4;
        self.len = n;
        &mut self.buf[self.start..self.start + n]
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// The first `n` values of a reused buffer (grown when needed).
pub(super) fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    &mut v[..n]
}
