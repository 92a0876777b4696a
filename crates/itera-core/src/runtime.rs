//! The inference runtime: packed weights in any storage format (`kernels::Matrix`), a recurrent
//! state per stream, and one forward over "rows" that serves every inference path:
//! - decode: one row (one token of one stream);
//! - batched decode: one row per stream;
//! - prefill / evaluation: the tokens of one or more sequences, in time order per stream.
//!
//! Projections run as one matmul over all rows (weights read once per call, or once per thread
//! when a call's streams are split between threads); only the causal conv and the selective scan
//! walk the rows in order, updating each stream's state in place. No graph and no allocation per
//! token once the scratch buffers have grown. Must agree with `Model::forward` (tested to 1e-4 on
//! logits for every preset, and for the shared-state mixer).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::{Mixer, ModelConfig};
use crate::error::{Error, Result};
use crate::kernels::{Matrix, QuantizedRows};
use crate::model::top_k_into;
use crate::quant::DType;
use crate::scan::{silu, softplus};
use crate::weights::Weights;

/// How a requested shape reads in errors: [rows, cols], or a plain length for 1-D requests.
pub fn expected_shape(rows: usize, cols: usize) -> String {
    if rows == 1 {
        format!("{cols} values")
    } else {
        format!("[{rows}, {cols}]")
    }
}

/// Where the runtime's tensors come from (safetensors weights, a GGUF file, ...).
pub trait TensorSource {
    /// A 2-D weight [rows, cols] in whatever format it is stored in.
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix>;

    /// A small tensor (norm, bias, A_log, conv kernel) as f32 values.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        Ok(self.matrix(name, 1, len)?.to_f32())
    }
}

impl TensorSource for Weights {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let v = self.values(name)?;
        Matrix::from_f32(rows, cols, v).map_err(|e| Error::Tensor {
            name: name.into(),
            message: e.to_string(),
        })
    }
}

struct Expert {
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

struct Moe {
    norm: Vec<f32>,
    router: Matrix,
    experts: Vec<Expert>,
}

/// A dense SwiGLU feed-forward and its norm (layers without MoE, when `ffn_hidden` > 0).
struct Ffn {
    norm: Vec<f32>,
    mlp: Expert,
}

/// The shared-state SSM's projections into and out of its N state values.
struct SharedIo {
    ssm_in: Matrix,
    ssm_out: Matrix,
}

struct Layer {
    norm: Vec<f32>,
    in_proj: Matrix,
    /// Conv kernel transposed to [d_conv][d_inner] (tap-major, so channel loops vectorise).
    conv_t: Vec<f32>,
    conv_b: Vec<f32>,
    x_proj: Matrix,
    dt_proj: Matrix,
    dt_b: Vec<f32>,
    /// A = -exp(A_log), transposed to [N][d_inner] like the state ([N] for a shared state).
    a_t: Vec<f32>,
    d_skip: Vec<f32>,
    out_proj: Matrix,
    shared: Option<SharedIo>,
    moe: Option<Moe>,
    ffn: Option<Ffn>,
}

/// Packed weights for inference.
pub struct Runtime {
    pub cfg: ModelConfig,
    /// Token embedding, also the (tied) LM head.
    embed: Matrix,
    layers: Vec<Layer>,
    norm_f: Vec<f32>,
}

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
    x: Vec<f32>,
    h: Vec<f32>,
    xz: Vec<f32>,
    xc: Vec<f32>,
    dbc: Vec<f32>,
    dt_low: Vec<f32>,
    dt: Vec<f32>,
    u: Vec<f32>,
    y: Vec<f32>,
    out: Vec<f32>,
    router: Vec<f32>,
    chosen: Vec<usize>,
    expert_rows: Vec<Vec<(usize, f32)>>,
    eh: Vec<f32>,
    eg: Vec<f32>,
    eu: Vec<f32>,
    eo: Vec<f32>,
    q: QuantizedRows,
    conv_ptrs: Vec<Shared>,
    ssm_ptrs: Vec<Shared>,
    /// One per thread when streams are split between threads (`forward_split`).
    groups: Vec<Scratch>,
    pub logits: AlignedBuf,
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

/// [rows, cols] -> [cols, rows].
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = v[i * cols + j];
        }
    }
    out
}

fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    &mut v[..n]
}

#[inline(always)]
fn rms_norm(x: &[f32], w: &[f32], eps: f64, out: &mut [f32]) {
    let ms = crate::math::dot(x, x) / x.len() as f32;
    let inv = 1.0 / (ms + eps as f32).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

crate::multiversion! {
    fn rms_norm_rows(x: &[f32], w: &[f32], eps: f64, out: &mut [f32]) {
        let d = w.len();
        for (xr, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            rms_norm(xr, w, eps, o);
        }
    }
}

/// A raw pointer handed to the threads that each own a disjoint channel range of it.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: threads only touch disjoint channel ranges through it (see `mixer_split`).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// # Safety
    /// The range must lie inside the allocation and no other live slice may overlap it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice<'a>(self, start: usize, len: usize) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// What the conv and scan passes of one layer read and write, as shared pointers: rows of the
/// activations and one state pointer per stream.
#[derive(Clone, Copy)]
struct MixerIo<'a> {
    layer: &'a Layer,
    streams: &'a [usize],
    conv: &'a [Shared],
    ssm: &'a [Shared],
    xz: &'a [f32],
    dbc: &'a [f32],
    xc: Shared,
    dt: Shared,
    y: Shared,
    di: usize,
    n: usize,
    r: usize,
    k: usize,
}

crate::multiversion! {
    /// Causal depthwise conv + SiLU for channels c0..c1 of every row, in row order.
    fn conv_range(io: MixerIo, c0: usize, c1: usize) {
        let (di, k, w) = (io.di, io.k, c1 - c0);
        let layer = io.layer;
        for (i, &st) in io.streams.iter().enumerate() {
            let xs = &io.xz[i * 2 * di + c0..i * 2 * di + c1];
            // SAFETY: this call owns channels c0..c1 of every row and state (disjoint ranges).
            let out = unsafe { io.xc.slice(i * di + c0, w) };
            out.copy_from_slice(&layer.conv_b[c0..c1]);
            for j in 0..k - 1 {
                let past = unsafe { io.conv[st].slice(j * di + c0, w) };
                let wj = &layer.conv_t[j * di + c0..j * di + c1];
                for ch in 0..w {
                    out[ch] += wj[ch] * past[ch];
                }
            }
            let wl = &layer.conv_t[(k - 1) * di + c0..(k - 1) * di + c1];
            for ch in 0..w {
                out[ch] = silu(out[ch] + wl[ch] * xs[ch]);
            }
            for j in 0..k.saturating_sub(2) {
                let next = unsafe { io.conv[st].slice((j + 1) * di + c0, w) };
                unsafe { io.conv[st].slice(j * di + c0, w) }.copy_from_slice(next);
            }
            if k > 1 {
                unsafe { io.conv[st].slice((k - 2) * di + c0, w) }.copy_from_slice(xs);
            }
        }
    }
}

crate::multiversion! {
    /// softplus(dt), the selective scan (state [N][d_inner], vectorised over channels), the D skip
    /// and the SiLU(z) gate, for channels c0..c1 of every row, in row order.
    fn scan_range(io: MixerIo, c0: usize, c1: usize) {
        let (di, n, r, w) = (io.di, io.n, io.r, c1 - c0);
        let layer = io.layer;
        let width = r + 2 * n;
        for (i, &st) in io.streams.iter().enumerate() {
            // SAFETY: this call owns channels c0..c1 of every row and state (disjoint ranges).
            let dt = unsafe { io.dt.slice(i * di + c0, w) };
            let y = unsafe { io.y.slice(i * di + c0, w) };
            let x = unsafe { io.xc.slice(i * di + c0, w) };
            for (v, b) in dt.iter_mut().zip(&layer.dt_b[c0..c1]) {
                *v = softplus(*v + b);
            }
            let bc = &io.dbc[i * width + r..(i + 1) * width];
            y.fill(0.0);
            for j in 0..n {
                let h = unsafe { io.ssm[st].slice(j * di + c0, w) };
                let a = &layer.a_t[j * di + c0..j * di + c1];
                let (b, c) = (bc[j], bc[n + j]);
                for ch in 0..w {
                    h[ch] = crate::math::exp(dt[ch] * a[ch]) * h[ch] + dt[ch] * x[ch] * b;
                    y[ch] += c * h[ch];
                }
            }
            let z = &io.xz[i * 2 * di + di + c0..i * 2 * di + di + c1];
            let dskip = &layer.d_skip[c0..c1];
            for ch in 0..w {
                y[ch] = (y[ch] + dskip[ch] * x[ch]) * silu(z[ch]);
            }
        }
    }
}

/// down(silu(gate x) * up x) for m rows of `input` [m, d]; returns the [m, d] result (in `eo`).
#[allow(clippy::too_many_arguments)]
fn swiglu_rows<'a>(
    ex: &Expert,
    input: &[f32],
    m: usize,
    hid: usize,
    d: usize,
    eg: &mut Vec<f32>,
    eu: &mut Vec<f32>,
    eo: &'a mut Vec<f32>,
    q: &mut QuantizedRows,
) -> &'a [f32] {
    let (eg, eu) = (grow(eg, m * hid), grow(eu, m * hid));
    ex.gate.matmul(input, eg, q);
    ex.up.matmul(input, eu, q);
    for (g, u) in eg.iter_mut().zip(eu.iter()) {
        *g = silu(*g) * u;
    }
    let eo = grow(eo, m * d);
    ex.down.matmul(eg, eo, q);
    eo
}

/// Rows from which `forward_rows` moves onto a pool thread (with more than two threads).
const POOL_ROWS: usize = 64;

/// Calls of this many rows over at least two streams per thread run whole streams per thread
/// (`forward_split`): 64-stream decode 1.4x, prefill of 16 x 128 tokens 1.4x; 8 streams were
/// slower that way (alternated `itera bench` runs).
const SPLIT_FROM_ROWS: usize = 32;

/// The shared-state scan over rows in order: for each of the N state values,
/// h = exp(dt A) h + dt B u, and `u` is overwritten with the readings C h.
#[allow(clippy::too_many_arguments)]
fn shared_scan(
    layer: &Layer,
    streams: &[usize],
    states: &mut [State],
    li: usize,
    dbc: &[f32],
    dt: &mut [f32],
    u: &mut [f32],
    r: usize,
) {
    let n = layer.a_t.len();
    let width = r + 2 * n;
    for (i, &st) in streams.iter().enumerate() {
        let h = &mut states[st].layers[li].ssm;
        let (b, c) = dbc[i * width + r..(i + 1) * width].split_at(n);
        let (dt, u) = (&mut dt[i * n..(i + 1) * n], &mut u[i * n..(i + 1) * n]);
        for j in 0..n {
            let step = softplus(dt[j] + layer.dt_b[j]);
            h[j] = crate::math::exp(step * layer.a_t[j]) * h[j] + step * b[j] * u[j];
            u[j] = c[j] * h[j];
        }
    }
}

/// The scan pass with AVX-512 intrinsics where the channel range is whole vectors, else the
/// portable loop. Same arithmetic as `scan_range` (to rounding: FMAs, and 2^k by `vscalefps`).
fn scan_pass(io: MixerIo, c0: usize, c1: usize) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx512() && (c1 - c0).is_multiple_of(16) && c0.is_multiple_of(16) {
        // SAFETY: AVX-512F is present; the range is whole 16-channel vectors inside d_inner.
        return unsafe { scan_range_avx512(io, c0, c1) };
    }
    scan_range(io, c0, c1)
}

/// e^x for 16 lanes: 2^k * P(r), the polynomial of `math::exp`, 2^k applied by `vscalefps`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
        _mm512_set1_ps(88.0),
    );
    let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, k)
}

/// `scan_range` for 16-channel vectors: per vector of channels, the N state rows are updated with
/// y kept in a register (one load and store of y, dt and x per row instead of N).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn scan_range_avx512(io: MixerIo, c0: usize, c1: usize) {
    use std::arch::x86_64::*;
    let (di, n, r, w) = (io.di, io.n, io.r, c1 - c0);
    let layer = io.layer;
    let width = r + 2 * n;
    for (i, &st) in io.streams.iter().enumerate() {
        // SAFETY (all slices): this call owns channels c0..c1 of every row and state.
        let dt = io.dt.slice(i * di + c0, w);
        let y = io.y.slice(i * di + c0, w);
        let x = io.xc.slice(i * di + c0, w);
        for v in (0..w).step_by(16) {
            let raw = _mm512_add_ps(
                _mm512_loadu_ps(dt.as_ptr().add(v)),
                _mm512_loadu_ps(layer.dt_b.as_ptr().add(c0 + v)),
            );
            _mm512_storeu_ps(dt.as_mut_ptr().add(v), softplus16(raw));
        }
        let bc = &io.dbc[i * width + r..(i + 1) * width];
        // Raw: the other threads own the other channels of the same state rows.
        let h = io.ssm[st].0;
        for v in (0..w).step_by(16) {
            let dtv = _mm512_loadu_ps(dt.as_ptr().add(v));
            let dx = _mm512_mul_ps(dtv, _mm512_loadu_ps(x.as_ptr().add(v)));
            let mut acc = _mm512_setzero_ps();
            for j in 0..n {
                let at = j * di + c0 + v;
                let a = _mm512_loadu_ps(layer.a_t.as_ptr().add(at));
                let hp = h.add(at);
                let decay = exp16(_mm512_mul_ps(dtv, a));
                let hv = _mm512_fmadd_ps(
                    decay,
                    _mm512_loadu_ps(hp),
                    _mm512_mul_ps(dx, _mm512_set1_ps(bc[j])),
                );
                _mm512_storeu_ps(hp, hv);
                acc = _mm512_fmadd_ps(_mm512_set1_ps(bc[n + j]), hv, acc);
            }
            _mm512_storeu_ps(y.as_mut_ptr().add(v), acc);
        }
        let z = io.xz.as_ptr().add(i * 2 * di + di + c0);
        let dskip = layer.d_skip.as_ptr().add(c0);
        for v in (0..w).step_by(16) {
            let yv = _mm512_fmadd_ps(
                _mm512_loadu_ps(dskip.add(v)),
                _mm512_loadu_ps(x.as_ptr().add(v)),
                _mm512_loadu_ps(y.as_ptr().add(v)),
            );
            let zv = _mm512_loadu_ps(z.add(v));
            let gate = _mm512_mul_ps(
                zv,
                recip16(_mm512_add_ps(
                    _mm512_set1_ps(1.0),
                    exp16(_mm512_sub_ps(_mm512_setzero_ps(), zv)),
                )),
            );
            _mm512_storeu_ps(y.as_mut_ptr().add(v), _mm512_mul_ps(yv, gate));
        }
    }
}

/// 1 / d for 16 lanes without a division: `vrcp14ps` and one Newton step (~2^-28 relative).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn recip16(d: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let r = _mm512_rcp14_ps(d);
    _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0)))
}

/// softplus for 16 lanes: max(v, 0) + ln(1 + t), t = e^-|v| in (0, 1], as 2 atanh(t / (2 + t))
/// (a series in s^2 with s <= 1/3, to ~1e-7), with no division.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn softplus16(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let t = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(v)));
    let sv = _mm512_mul_ps(t, recip16(_mm512_add_ps(t, _mm512_set1_ps(2.0))));
    let s2 = _mm512_mul_ps(sv, sv);
    let mut p = _mm512_set1_ps(1.0 / 11.0);
    for c in [1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0] {
        p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(c));
    }
    let log1p = _mm512_mul_ps(_mm512_add_ps(sv, sv), p);
    _mm512_add_ps(_mm512_max_ps(v, _mm512_setzero_ps()), log1p)
}

/// Runs a channel-range pass over all channels: split between threads when there is enough work.
fn mixer_split(io: MixerIo, pass: fn(MixerIo, usize, usize)) {
    let threads = crate::kernels::threads();
    if io.streams.len() < 64 || threads == 1 {
        return pass(io, 0, io.di);
    }
    if crate::pair::available() {
        let mid = (io.di / 2).next_multiple_of(16).min(io.di);
        return crate::pair::both(|half| {
            let (c0, c1) = if half == 0 { (0, mid) } else { (mid, io.di) };
            pass(io, c0, c1)
        });
    }
    let chunk = io.di.div_ceil(threads).next_multiple_of(16);
    rayon::scope(|s| {
        for c0 in (0..io.di).step_by(chunk) {
            s.spawn(move |_| pass(io, c0, (c0 + chunk).min(io.di)));
        }
    });
}

/// One thread's share of a split call: its tokens, their streams (local to its range) and the
/// rows whose logits are wanted.
type Job = (Vec<u32>, Vec<usize>, Vec<usize>);

impl Runtime {
    /// Packs f32 weights (a safetensors checkpoint).
    pub fn new(cfg: &ModelConfig, w: &Weights) -> Result<Self> {
        Self::from_source(cfg, w)
    }

    /// Packs weights from any source; each matrix keeps its storage format.
    pub fn from_source(cfg: &ModelConfig, src: &dyn TensorSource) -> Result<Self> {
        if !cfg.mixer.is_recurrent() {
            return Err(Error::Config(format!(
                "`{}` uses attention, which has no recurrent runtime: it is a training baseline \
                 that `itera eval` scores with the reference forward; generate, serve, bench and \
                 quantize need an SSM model",
                cfg.preset
            )));
        }
        let shared = cfg.mixer == Mixer::SharedState;
        let (d, di, n, r, k) = (
            cfg.d_model,
            cfg.d_inner(),
            cfg.d_state,
            cfg.dt_rank,
            cfg.d_conv,
        );
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let p = format!("layers.{l}");
            let mat = |s: &str, rows, cols| src.matrix(&format!("{p}.{s}"), rows, cols);
            let vec = |s: &str, len| src.vector(&format!("{p}.{s}"), len);
            let swiglu = |prefix: &str, h: usize| -> Result<Expert> {
                Ok(Expert {
                    gate: mat(&format!("{prefix}.gate.weight"), h, d)?,
                    up: mat(&format!("{prefix}.up.weight"), h, d)?,
                    down: mat(&format!("{prefix}.down.weight"), d, h)?,
                })
            };
            let ffn = if !cfg.is_moe_layer(l) && cfg.ffn_hidden > 0 {
                Some(Ffn {
                    norm: vec("ffn_norm.weight", d)?,
                    mlp: swiglu("ffn", cfg.ffn_hidden)?,
                })
            } else {
                None
            };
            // Per-channel states: d_inner of them with N values each; shared: N of one value.
            let (states, per_state) = if shared { (n, 1) } else { (di, n) };
            let moe = if cfg.is_moe_layer(l) {
                let experts = (0..cfg.n_experts)
                    .map(|e| swiglu(&format!("moe.experts.{e}"), cfg.expert_hidden))
                    .collect::<Result<_>>()?;
                Some(Moe {
                    norm: vec("moe_norm.weight", d)?,
                    router: mat("moe.router.weight", cfg.n_experts, d)?,
                    experts,
                })
            } else {
                None
            };
            layers.push(Layer {
                norm: vec("norm.weight", d)?,
                in_proj: mat("mixer.in_proj.weight", 2 * di, d)?,
                conv_t: transpose(&vec("mixer.conv.weight", di * k)?, di, k),
                conv_b: vec("mixer.conv.bias", di)?,
                x_proj: mat("mixer.x_proj.weight", r + 2 * n, di)?,
                dt_proj: mat("mixer.dt_proj.weight", states, r)?,
                dt_b: vec("mixer.dt_proj.bias", states)?,
                a_t: transpose(
                    &vec("mixer.A_log", states * per_state)?
                        .iter()
                        .map(|v| -v.exp())
                        .collect::<Vec<_>>(),
                    states,
                    per_state,
                ),
                d_skip: vec("mixer.D", di)?,
                out_proj: mat("mixer.out_proj.weight", d, di)?,
                shared: if shared {
                    Some(SharedIo {
                        ssm_in: mat("mixer.ssm_in.weight", n, di)?,
                        ssm_out: mat("mixer.ssm_out.weight", di, n)?,
                    })
                } else {
                    None
                },
                moe,
                ffn,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            embed: src.matrix("embed.weight", cfg.vocab_size, d)?,
            layers,
            norm_f: src.vector("norm_f.weight", d)?,
        })
    }

    /// Every weight matrix with its name, in file order (for reports).
    pub fn matrices(&self) -> Vec<(String, &Matrix)> {
        let mut out = vec![("embed.weight".to_string(), &self.embed)];
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("layers.{l}.mixer");
            out.push((format!("{p}.in_proj.weight"), &layer.in_proj));
            out.push((format!("{p}.x_proj.weight"), &layer.x_proj));
            out.push((format!("{p}.dt_proj.weight"), &layer.dt_proj));
            out.push((format!("{p}.out_proj.weight"), &layer.out_proj));
            if let Some(io) = &layer.shared {
                out.push((format!("{p}.ssm_in.weight"), &io.ssm_in));
                out.push((format!("{p}.ssm_out.weight"), &io.ssm_out));
            }
            if let Some(ffn) = &layer.ffn {
                let fp = format!("layers.{l}.ffn");
                out.push((format!("{fp}.gate.weight"), &ffn.mlp.gate));
                out.push((format!("{fp}.up.weight"), &ffn.mlp.up));
                out.push((format!("{fp}.down.weight"), &ffn.mlp.down));
            }
            if let Some(moe) = &layer.moe {
                out.push((format!("layers.{l}.moe.router.weight"), &moe.router));
                for (e, ex) in moe.experts.iter().enumerate() {
                    let ep = format!("layers.{l}.moe.experts.{e}");
                    out.push((format!("{ep}.gate.weight"), &ex.gate));
                    out.push((format!("{ep}.up.weight"), &ex.up));
                    out.push((format!("{ep}.down.weight"), &ex.down));
                }
            }
        }
        out
    }

    /// Bytes of packed weights in memory.
    pub fn weight_bytes(&self) -> usize {
        let small: usize = self
            .layers
            .iter()
            .map(|l| {
                4 * (l.norm.len()
                    + l.conv_t.len()
                    + l.conv_b.len()
                    + l.dt_b.len()
                    + l.a_t.len()
                    + l.d_skip.len()
                    + l.moe.as_ref().map_or(0, |m| m.norm.len())
                    + l.ffn.as_ref().map_or(0, |f| f.norm.len()))
            })
            .sum();
        self.matrices()
            .iter()
            .map(|(_, m)| m.bytes())
            .sum::<usize>()
            + small
            + 4 * self.norm_f.len()
    }

    /// The storage format of most weights (for reports): the most common by element count.
    pub fn main_dtype(&self) -> DType {
        let mut counts: Vec<(DType, usize)> = Vec::new();
        for (_, m) in self.matrices() {
            match counts.iter_mut().find(|(d, _)| *d == m.dtype) {
                Some((_, c)) => *c += m.rows * m.cols,
                None => counts.push((m.dtype, m.rows * m.cols)),
            }
        }
        counts
            .into_iter()
            .max_by_key(|c| c.1)
            .map_or(DType::F32, |c| c.0)
    }

    /// Multiply-adds per token in the weight matmuls (LM head included, top-k experts only).
    pub fn macs_per_token(&self) -> usize {
        let c = &self.cfg;
        let size = |m: &Matrix| m.rows * m.cols;
        let swiglu = |e: &Expert| size(&e.gate) + size(&e.up) + size(&e.down);
        let mut macs = c.vocab_size * c.d_model;
        for layer in &self.layers {
            macs += [
                &layer.in_proj,
                &layer.x_proj,
                &layer.dt_proj,
                &layer.out_proj,
            ]
            .iter()
            .map(|m| size(m))
            .sum::<usize>();
            if let Some(io) = &layer.shared {
                macs += size(&io.ssm_in) + size(&io.ssm_out);
            }
            if let Some(ffn) = &layer.ffn {
                macs += swiglu(&ffn.mlp);
            }
            if let Some(moe) = &layer.moe {
                macs += size(&moe.router) + c.top_k * swiglu(&moe.experts[0]);
            }
        }
        macs
    }

    /// Weight bytes one decode token reads (the LM head, every layer, top-k experts only): what
    /// bounds single-stream decode by memory bandwidth.
    pub fn weight_bytes_per_token(&self) -> usize {
        let swiglu = |e: &Expert| e.gate.bytes() + e.up.bytes() + e.down.bytes();
        let mut bytes = self.embed.bytes();
        for l in &self.layers {
            bytes += [&l.in_proj, &l.x_proj, &l.dt_proj, &l.out_proj]
                .iter()
                .map(|m| m.bytes())
                .sum::<usize>();
            if let Some(io) = &l.shared {
                bytes += io.ssm_in.bytes() + io.ssm_out.bytes();
            }
            if let Some(ffn) = &l.ffn {
                bytes += swiglu(&ffn.mlp);
            }
            if let Some(moe) = &l.moe {
                bytes += moe.router.bytes() + self.cfg.top_k * swiglu(&moe.experts[0]);
            }
        }
        bytes
    }

    pub fn new_state(&self) -> State {
        let (di, n, k) = (self.cfg.d_inner(), self.cfg.d_state, self.cfg.d_conv);
        State {
            layers: (0..self.cfg.n_layers)
                .map(|_| LayerState {
                    conv: vec![0.0; (k - 1) * di],
                    ssm: vec![
                        0.0;
                        if self.cfg.mixer == Mixer::SharedState {
                            n
                        } else {
                            di * n
                        }
                    ],
                })
                .collect(),
            position: 0,
        }
    }

    pub fn new_scratch(&self) -> Scratch {
        Scratch::default()
    }

    /// Checks that a state (e.g. one deserialised from disk) fits this model.
    pub fn check_state(&self, s: &State) -> Result<()> {
        let fresh = self.new_state();
        let ok = s.layers.len() == fresh.layers.len()
            && s.layers
                .iter()
                .zip(&fresh.layers)
                .all(|(a, b)| a.conv.len() == b.conv.len() && a.ssm.len() == b.ssm.len());
        if ok {
            Ok(())
        } else {
            Err(Error::Argument(
                "state does not match this model's shape".into(),
            ))
        }
    }

    /// Consumes one token; on return `scratch.logits` holds the next-token logits.
    pub fn step(&self, token: u32, state: &mut State, s: &mut Scratch) -> Result<()> {
        self.forward_rows(&[token], &[0], std::slice::from_mut(state), &[0], s)
    }

    /// One token for each of several streams; `scratch.logits` holds one row per stream.
    pub fn step_batch(&self, tokens: &[u32], states: &mut [State], s: &mut Scratch) -> Result<()> {
        if tokens.len() != states.len() {
            return Err(Error::Argument(format!(
                "{} tokens for {} streams",
                tokens.len(),
                states.len()
            )));
        }
        let rows: Vec<usize> = (0..tokens.len()).collect();
        self.forward_rows(tokens, &rows, states, &rows, s)
    }

    /// Runs a token sequence through the state; `scratch.logits` holds the logits after the last.
    pub fn prefill(&self, tokens: &[u32], state: &mut State, s: &mut Scratch) -> Result<()> {
        if tokens.is_empty() {
            return Ok(());
        }
        let streams = vec![0; tokens.len()];
        self.forward_rows(
            tokens,
            &streams,
            std::slice::from_mut(state),
            &[tokens.len() - 1],
            s,
        )
    }

    /// Like `prefill`, but `scratch.logits` holds the logits after every token ([len, vocab]).
    pub fn prefill_all(&self, tokens: &[u32], state: &mut State, s: &mut Scratch) -> Result<()> {
        let streams = vec![0; tokens.len()];
        let all: Vec<usize> = (0..tokens.len()).collect();
        self.forward_rows(tokens, &streams, std::slice::from_mut(state), &all, s)
    }

    /// The general forward: row i is token `tokens[i]` of stream `streams[i]` (rows of one stream in
    /// time order); `logit_rows` lists the rows whose logits are wanted, in the order returned.
    pub fn forward_rows(
        &self,
        tokens: &[u32],
        streams: &[usize],
        states: &mut [State],
        logit_rows: &[usize],
        s: &mut Scratch,
    ) -> Result<()> {
        self.forward_into(tokens, streams, states, logit_rows, s, None)
    }

    /// `forward_rows` writing the logits into `out` ([logit_rows, vocab]) when given, else into
    /// `s.logits`.
    fn forward_into(
        &self,
        tokens: &[u32],
        streams: &[usize],
        states: &mut [State],
        logit_rows: &[usize],
        s: &mut Scratch,
        out: Option<&mut [f32]>,
    ) -> Result<()> {
        let c = &self.cfg;
        let (d, di, n, r, k) = (c.d_model, c.d_inner(), c.d_state, c.dt_rank, c.d_conv);
        let rows = tokens.len();
        if streams.len() != rows {
            return Err(Error::Argument(
                "one stream index per token is needed".into(),
            ));
        }
        if let Some(&bad) = streams.iter().find(|&&st| st >= states.len()) {
            return Err(Error::Argument(format!(
                "stream {bad} out of range for {} states",
                states.len()
            )));
        }
        if let Some(&bad) = logit_rows.iter().find(|&&i| i >= rows) {
            return Err(Error::Argument(format!("logit row {bad} out of range")));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::Argument(format!(
                "token id {bad} out of range for vocab {}",
                c.vocab_size
            )));
        }
        let threads = crate::kernels::threads();
        if threads > 1 && rows >= SPLIT_FROM_ROWS && states.len() >= 2 * threads {
            let mut per_stream = vec![0usize; states.len()];
            streams.iter().for_each(|&st| per_stream[st] += 1);
            if per_stream.iter().filter(|&&c| c > 0).count() >= 2 * threads {
                return self.forward_split(tokens, streams, states, logit_rows, s, &per_stream);
            }
        }
        // Small calls (a decode step, a few streams, a short prompt), and every call when there
        // are just two threads, split their matmuls, conv and scan with the pair helper's second
        // core: small ones are bound by reading the weights or too short to wake the pool for,
        // and with two threads the helper gives the same parallelism without a wake-up per pass
        // (one-stream evaluation in chunks of 256: 1.25x over the pool).
        let pair = rows < POOL_ROWS || threads == 2;
        if pair && !crate::pair::is_enabled() {
            return crate::pair::enabled(|| {
                self.forward_into(tokens, streams, states, logit_rows, s, out)
            });
        }
        // Other big calls run on a pool thread: the caller then sleeps once per call instead of
        // once per parallel pass, and the pool's idle threads do not spin against its serial work
        // (prefill 1.13x; small calls stay here, where one hop would cost more than it saves).
        if !pair && rayon::current_thread_index().is_none() && threads > 1 {
            crate::pair::rest();
            return rayon::scope(|_| {
                self.forward_into(tokens, streams, states, logit_rows, s, out)
            });
        }
        let x = grow(&mut s.x, rows * d);
        for (xr, &t) in x.chunks_exact_mut(d).zip(tokens) {
            self.embed.row_into(t as usize, xr);
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let h = grow(&mut s.h, rows * d);
            rms_norm_rows(&s.x, &layer.norm, c.norm_eps, h);
            let xz = grow(&mut s.xz, rows * 2 * di);
            layer.in_proj.matmul(h, xz, &mut s.q);
            s.conv_ptrs.clear();
            s.ssm_ptrs.clear();
            for st in states.iter_mut() {
                let ls = &mut st.layers[li];
                s.conv_ptrs.push(Shared(ls.conv.as_mut_ptr()));
                s.ssm_ptrs.push(Shared(ls.ssm.as_mut_ptr()));
            }
            let xc = grow(&mut s.xc, rows * di);
            let dt = grow(&mut s.dt, rows * layer.dt_b.len());
            let y = grow(&mut s.y, rows * di);
            let dbc = grow(&mut s.dbc, rows * (r + 2 * n));
            let mut io = MixerIo {
                layer,
                streams,
                conv: &s.conv_ptrs,
                ssm: &s.ssm_ptrs,
                xz,
                dbc: &[],
                xc: Shared(xc.as_mut_ptr()),
                dt: Shared(dt.as_mut_ptr()),
                y: Shared(y.as_mut_ptr()),
                di,
                n,
                r,
                k,
            };
            mixer_split(io, conv_range);
            layer.x_proj.matmul(xc, dbc, &mut s.q);
            let dt_low = grow(&mut s.dt_low, rows * r);
            for (lo, row) in dt_low.chunks_exact_mut(r).zip(dbc.chunks_exact(r + 2 * n)) {
                lo.copy_from_slice(&row[..r]);
            }
            layer.dt_proj.matmul(dt_low, dt, &mut s.q);
            // Fresh pointers: the matmuls above wrote through the slices themselves.
            io.dbc = dbc;
            io.xc = Shared(xc.as_mut_ptr());
            io.dt = Shared(dt.as_mut_ptr());
            io.y = Shared(y.as_mut_ptr());
            match &layer.shared {
                None => mixer_split(io, scan_pass),
                Some(sio) => {
                    let u = grow(&mut s.u, rows * n);
                    sio.ssm_in.matmul(xc, u, &mut s.q);
                    shared_scan(layer, streams, states, li, dbc, dt, u, r);
                    sio.ssm_out.matmul(u, y, &mut s.q);
                    for (i, yr) in y.chunks_exact_mut(di).enumerate() {
                        let (x, z) = (
                            &xc[i * di..(i + 1) * di],
                            &xz[i * 2 * di + di..(i + 1) * 2 * di],
                        );
                        for ch in 0..di {
                            yr[ch] = (yr[ch] + layer.d_skip[ch] * x[ch]) * silu(z[ch]);
                        }
                    }
                }
            }
            let out = grow(&mut s.out, rows * d);
            layer.out_proj.matmul(y, out, &mut s.q);
            for (a, b) in s.x.iter_mut().zip(out.iter()) {
                *a += b;
            }
            if let Some(moe) = &layer.moe {
                self.moe_rows(moe, rows, s);
            } else if let Some(ffn) = &layer.ffn {
                let h = grow(&mut s.h, rows * d);
                rms_norm_rows(&s.x, &ffn.norm, c.norm_eps, h);
                let (eg, eu, eo) = (&mut s.eg, &mut s.eu, &mut s.eo);
                let out = swiglu_rows(&ffn.mlp, h, rows, c.ffn_hidden, d, eg, eu, eo, &mut s.q);
                for (a, b) in s.x.iter_mut().zip(out.iter()) {
                    *a += b;
                }
            }
        }
        for st in streams {
            states[*st].position += 1;
        }
        let h = grow(&mut s.h, logit_rows.len() * d);
        for (hr, &i) in h.chunks_exact_mut(d).zip(logit_rows) {
            rms_norm(&s.x[i * d..(i + 1) * d], &self.norm_f, c.norm_eps, hr);
        }
        let logits = match out {
            Some(o) => o,
            None => s.logits.grow(logit_rows.len() * c.vocab_size),
        };
        self.embed.matmul(h, logits, &mut s.q);
        Ok(())
    }

    /// Several streams: each thread runs whole streams (a contiguous range of stream indices
    /// with about equal rows) through every layer on its own, so a call has one parallel region
    /// instead of one per matmul, conv and scan, and each thread's logits go straight into its
    /// block of the output. Each thread reads all the weights, which costs less than the
    /// per-pass synchronisation it saves. `per_stream`: rows of each stream.
    fn forward_split(
        &self,
        tokens: &[u32],
        streams: &[usize],
        states: &mut [State],
        logit_rows: &[usize],
        s: &mut Scratch,
        per_stream: &[usize],
    ) -> Result<()> {
        let threads = crate::kernels::threads();
        // Stream ranges [bounds[g], bounds[g + 1]) holding about rows / threads rows each.
        let mut bounds = vec![0];
        let mut acc = 0;
        for (st, &count) in per_stream.iter().enumerate() {
            acc += count;
            if bounds.len() < threads && acc * threads >= tokens.len() * bounds.len() {
                bounds.push(st + 1);
            }
        }
        bounds.push(states.len());
        bounds.dedup();
        let groups = bounds.len() - 1;
        let group_of = |st: usize| bounds.partition_point(|&b| b <= st) - 1;
        // Each group's rows (in order), and where each requested logit row lands.
        let mut jobs: Vec<Job> = vec![Default::default(); groups];
        let mut local = vec![0usize; tokens.len()];
        for (i, (&t, &st)) in tokens.iter().zip(streams).enumerate() {
            let g = group_of(st);
            local[i] = jobs[g].0.len();
            jobs[g].0.push(t);
            jobs[g].1.push(st - bounds[g]);
        }
        let mut placed = Vec::with_capacity(logit_rows.len());
        for &i in logit_rows {
            let g = group_of(streams[i]);
            placed.push((g, jobs[g].2.len()));
            jobs[g].2.push(local[i]);
        }
        s.groups.resize_with(groups, Scratch::default);
        let mut parts = Vec::with_capacity(groups);
        let mut rest = states;
        for g in 0..groups {
            let (mine, tail) = rest.split_at_mut(bounds[g + 1] - bounds[g]);
            parts.push(mine);
            rest = tail;
        }
        let v = self.cfg.vocab_size;
        // Logits requested group after group (as in step_batch and batched prefill): each group
        // writes its block of the output directly; otherwise they are gathered afterwards.
        let mut start = 0;
        let starts: Vec<usize> = jobs
            .iter()
            .map(|job| {
                start += job.2.len();
                start - job.2.len()
            })
            .collect();
        let in_order = placed
            .iter()
            .enumerate()
            .all(|(k, &(g, j))| k == starts[g] + j);
        let mut outs: Vec<Option<&mut [f32]>> = Vec::with_capacity(groups);
        let all = s.logits.grow(logit_rows.len() * v);
        if in_order {
            let mut rest = all;
            for job in &jobs {
                let (mine, tail) = rest.split_at_mut(job.2.len() * v);
                outs.push(Some(mine));
                rest = tail;
            }
        } else {
            outs.resize_with(groups, || None);
        }
        let run = |st: &mut [State], sc: &mut Scratch, job: &Job, out: Option<&mut [f32]>| {
            let (toks, owners, wanted) = job;
            if toks.is_empty() {
                return Ok(());
            }
            crate::kernels::serial(|| self.forward_into(toks, owners, st, wanted, sc, out))
        };
        let results: Vec<Result<()>> =
            if groups == 2 && crate::pair::enabled(crate::pair::available) {
                // Two groups: the caller runs one and the spinning pair helper the other, with no
                // pool wake-up per call.
                type Part<'a, 'b> = (
                    &'a mut [State],
                    &'a mut Scratch,
                    &'a Job,
                    Option<&'b mut [f32]>,
                );
                let cells: Vec<std::sync::Mutex<Option<Part>>> = parts
                    .into_iter()
                    .zip(s.groups.iter_mut())
                    .zip(jobs.iter().zip(outs))
                    .map(|((st, sc), (job, out))| std::sync::Mutex::new(Some((st, sc, job, out))))
                    .collect();
                let res: Vec<std::sync::Mutex<Result<()>>> =
                    (0..2).map(|_| std::sync::Mutex::new(Ok(()))).collect();
                crate::pair::enabled(|| {
                    crate::pair::both(|g| {
                        let (st, sc, job, out) = cells[g].lock().unwrap().take().expect("one use");
                        *res[g].lock().unwrap() = run(st, sc, job, out);
                    })
                });
                res.into_iter().map(|r| r.into_inner().unwrap()).collect()
            } else {
                crate::pair::rest();
                parts
                    .into_par_iter()
                    .zip(s.groups.par_iter_mut())
                    .zip(jobs.par_iter().zip(outs))
                    .map(|((st, sc), (job, out))| run(st, sc, job, out))
                    .collect()
            };
        results.into_iter().collect::<Result<()>>()?;
        if !in_order {
            let out = s.logits.grow(logit_rows.len() * v);
            for (k, &(g, j)) in placed.iter().enumerate() {
                out[k * v..(k + 1) * v].copy_from_slice(&s.groups[g].logits[j * v..(j + 1) * v]);
            }
        }
        Ok(())
    }

    /// MoE over all rows: route, then one matmul per expert over the rows it was given.
    fn moe_rows(&self, moe: &Moe, rows: usize, s: &mut Scratch) {
        let c = &self.cfg;
        let (d, e, hid) = (c.d_model, c.n_experts, c.expert_hidden);
        let h = grow(&mut s.h, rows * d);
        rms_norm_rows(&s.x, &moe.norm, c.norm_eps, h);
        let router = grow(&mut s.router, rows * e);
        moe.router.matmul(h, router, &mut s.q);
        s.expert_rows.resize_with(e, Vec::new);
        s.expert_rows.iter_mut().for_each(|v| v.clear());
        for (i, p) in router.chunks_exact_mut(e).enumerate() {
            let max = p.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for v in p.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            p.iter_mut().for_each(|v| *v /= sum);
            top_k_into(p, c.top_k, &mut s.chosen);
            let norm: f32 = s.chosen.iter().map(|&j| p[j]).sum();
            for &j in &s.chosen {
                s.expert_rows[j].push((i, p[j] / norm));
            }
        }
        for (ex, assigned) in moe.experts.iter().zip(&s.expert_rows) {
            let m = assigned.len();
            if m == 0 {
                continue;
            }
            let eh = grow(&mut s.eh, m * d);
            for (dst, &(i, _)) in eh.chunks_exact_mut(d).zip(assigned) {
                dst.copy_from_slice(&h[i * d..(i + 1) * d]);
            }
            let eo = swiglu_rows(ex, eh, m, hid, d, &mut s.eg, &mut s.eu, &mut s.eo, &mut s.q);
            for (o, &(i, gate)) in eo.chunks_exact(d).zip(assigned) {
                for (a, b) in s.x[i * d..(i + 1) * d].iter_mut().zip(o) {
                    *a += gate * b;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::rng::Rng;
    use candle_core::{Device, Tensor};

    fn random_tokens(cfg: &ModelConfig, len: usize, seed: u64) -> Vec<u32> {
        let mut rng = Rng::new(seed);
        (0..len).map(|_| rng.below(cfg.vocab_size) as u32).collect()
    }

    fn reference_logits(cfg: &ModelConfig, w: &Weights, tokens: &[u32]) -> Vec<Vec<f32>> {
        let t = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .reshape((1, tokens.len()))
            .unwrap();
        Model::new(cfg, w)
            .logits(&t)
            .unwrap()
            .0
            .to_vec2::<f32>()
            .unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    /// Decode (one row per call) and prefill (all rows in one call) both match the reference.
    #[test]
    fn step_and_prefill_agree_with_forward_for_every_preset() {
        let mut configs: Vec<(String, ModelConfig)> = ["micro", "tiny", "small", "medium"]
            .iter()
            .map(|p| (p.to_string(), ModelConfig::preset(p).unwrap()))
            .collect();
        // The shared-state mixer, and dense feed-forwards on the layers without MoE.
        for base in ["micro", "tiny"] {
            let mut cfg = ModelConfig::preset(base).unwrap();
            cfg.mixer = Mixer::SharedState;
            configs.push((format!("{base} shared-state"), cfg.clone()));
            cfg.ffn_hidden = 48;
            configs.push((format!("{base} shared-state + ffn"), cfg));
        }
        for (preset, cfg) in configs {
            let w = Weights::init(&cfg, 3).unwrap();
            let tokens = random_tokens(&cfg, 128, 11);
            let want = reference_logits(&cfg, &w, &tokens);
            let rt = Runtime::new(&cfg, &w).unwrap();
            let (mut st, mut sc) = (rt.new_state(), rt.new_scratch());
            let mut worst = 0f32;
            for (i, &tok) in tokens.iter().enumerate() {
                rt.step(tok, &mut st, &mut sc).unwrap();
                worst = worst.max(max_diff(&sc.logits, &want[i]));
            }
            assert!(worst < 1e-4, "{preset} step: max |logit diff| {worst}");
            let mut st = rt.new_state();
            rt.prefill_all(&tokens, &mut st, &mut sc).unwrap();
            let v = cfg.vocab_size;
            let worst = (0..tokens.len())
                .map(|i| max_diff(&sc.logits[i * v..(i + 1) * v], &want[i]))
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{preset} prefill: max |logit diff| {worst}");
        }
    }

    /// Streams decoded together give the same logits as each decoded alone, and prefill in
    /// chunks continues exactly where the previous chunk stopped.
    #[test]
    fn batched_streams_match_single_streams() {
        // 9 streams share each pass's threads; 40 streams on two threads are split between
        // them (`forward_split`).
        for streams in [9, 40] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap();
            pool.install(|| check_batched(streams));
        }
        // From outside the pool: with two threads, the two groups run on this thread and the
        // pair helper.
        check_batched(40);
    }

    /// The division-free AVX-512 softplus and reciprocal agree with f64 math.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_softplus_and_reciprocal_are_accurate() {
        use std::arch::x86_64::*;
        if !crate::simd::has_avx512() {
            return;
        }
        let xs: Vec<f32> = (0..1600).map(|i| -40.0 + i as f32 * 0.05).collect();
        for chunk in xs.chunks_exact(16) {
            let (mut sp, mut rc) = ([0f32; 16], [0f32; 16]);
            // SAFETY: AVX-512F is present (checked above); arrays of 16 lanes.
            unsafe {
                let v = _mm512_loadu_ps(chunk.as_ptr());
                _mm512_storeu_ps(sp.as_mut_ptr(), softplus16(v));
                let d = _mm512_add_ps(_mm512_abs_ps(v), _mm512_set1_ps(0.5));
                _mm512_storeu_ps(rc.as_mut_ptr(), recip16(d));
            }
            for (i, &x) in chunk.iter().enumerate() {
                let x = x as f64;
                let want = x.max(0.0) + (-x.abs()).exp().ln_1p();
                assert!(
                    (sp[i] as f64 - want).abs() <= 2e-7 * want.max(1.0),
                    "softplus({x})"
                );
                let want = 1.0 / (x.abs() + 0.5);
                assert!(
                    (rc[i] as f64 - want).abs() <= 2e-7 * want,
                    "1/{}",
                    x.abs() + 0.5
                );
            }
        }
    }

    /// Split between threads, logits asked for in any order come back in that order.
    #[test]
    fn split_calls_return_logits_in_the_order_asked() {
        let cfg = ModelConfig::preset("micro").unwrap();
        let rt = Runtime::new(&cfg, &Weights::init(&cfg, 6).unwrap()).unwrap();
        let tokens = random_tokens(&cfg, 64, 21);
        let owners: Vec<usize> = (0..8).flat_map(|i| [i; 8]).collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let run = |wanted: &[usize]| {
            pool.install(|| {
                let mut states: Vec<State> = (0..8).map(|_| rt.new_state()).collect();
                let mut sc = rt.new_scratch();
                rt.forward_rows(&tokens, &owners, &mut states, wanted, &mut sc)
                    .unwrap();
                sc.logits.to_vec()
            })
        };
        let v = cfg.vocab_size;
        let (forward, backward) = (run(&[0, 63]), run(&[63, 0]));
        assert_eq!(forward[..v], backward[v..]);
        assert_eq!(forward[v..], backward[..v]);
        let all = run(&(0..64).collect::<Vec<_>>());
        assert_eq!(all[63 * v..], forward[v..]);
    }

    fn check_batched(streams: usize) {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let rt = Runtime::new(&cfg, &Weights::init(&cfg, 5).unwrap()).unwrap();
        let seqs: Vec<Vec<u32>> = (0..streams)
            .map(|i| random_tokens(&cfg, 12, 100 + i as u64))
            .collect();
        let mut sc = rt.new_scratch();
        let mut single = Vec::new();
        for seq in &seqs {
            let mut st = rt.new_state();
            rt.prefill(&seq[..4], &mut st, &mut sc).unwrap();
            rt.prefill(&seq[4..8], &mut st, &mut sc).unwrap();
            let mut rows = Vec::new();
            for &t in &seq[8..] {
                rt.step(t, &mut st, &mut sc).unwrap();
                rows.push(sc.logits.clone());
            }
            single.push(rows);
        }
        let mut states: Vec<State> = (0..streams).map(|_| rt.new_state()).collect();
        // Prefill all streams' first 8 tokens in one call (rows grouped by stream).
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s[..8].to_vec()).collect();
        let owners: Vec<usize> = (0..streams).flat_map(|i| [i; 8]).collect();
        rt.forward_rows(&tokens, &owners, &mut states, &[7], &mut sc)
            .unwrap();
        let v = cfg.vocab_size;
        for step in 0..4 {
            let toks: Vec<u32> = seqs.iter().map(|s| s[8 + step]).collect();
            rt.step_batch(&toks, &mut states, &mut sc).unwrap();
            for (i, rows) in single.iter().enumerate() {
                let diff = max_diff(&sc.logits[i * v..(i + 1) * v], &rows[step]);
                assert!(diff < 1e-4, "stream {i} step {step}: {diff}");
            }
        }
        assert!(states.iter().all(|s| s.position == 12));
    }

    #[test]
    fn attention_models_are_refused_with_a_reason() {
        let cfg = ModelConfig::preset("transformer-tiny").unwrap();
        let err = Runtime::new(&cfg, &Weights::init(&cfg, 1).unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("attention") && err.contains("itera eval"),
            "{err}"
        );
    }

    #[test]
    fn quantized_runtime_stays_close_to_f32() {
        let cfg = ModelConfig::preset("micro").unwrap();
        let w = Weights::init(&cfg, 8).unwrap();
        let tokens = random_tokens(&cfg, 32, 3);
        let rt = Runtime::new(&cfg, &w).unwrap();
        let (mut st, mut sc) = (rt.new_state(), rt.new_scratch());
        rt.prefill_all(&tokens, &mut st, &mut sc).unwrap();
        let want = sc.logits.clone();
        struct Quantized<'a>(&'a Weights, DType);
        impl TensorSource for Quantized<'_> {
            fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
                let v = self.0.values(name)?;
                let dt = if cols.is_multiple_of(32) && rows > 1 {
                    self.1
                } else {
                    DType::F32
                };
                Matrix::quantize(dt, rows, cols, &v)
            }
        }
        for dtype in [DType::Q8_0, DType::Q4_0, DType::F16] {
            let q = Runtime::from_source(&cfg, &Quantized(&w, dtype)).unwrap();
            assert_eq!(q.main_dtype(), dtype);
            assert!(q.weight_bytes() < rt.weight_bytes());
            let mut st = q.new_state();
            q.prefill_all(&tokens, &mut st, &mut sc).unwrap();
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = max_diff(&sc.logits, &want);
            let bound = if dtype == DType::Q4_0 { 0.2 } else { 0.03 } * scale;
            assert!(diff < bound, "{dtype:?}: {diff} (logit scale {scale})");
        }
    }

    #[test]
    fn state_roundtrips_and_bad_input_is_an_error() {
        let cfg = ModelConfig::preset("micro").unwrap();
        let rt = Runtime::new(&cfg, &Weights::init(&cfg, 5).unwrap()).unwrap();
        let (mut st, mut sc) = (rt.new_state(), rt.new_scratch());
        rt.prefill(&[1, 2, 3, 4, 5], &mut st, &mut sc).unwrap();
        let saved: State = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        rt.check_state(&saved).unwrap();
        let mut restored = saved.clone();
        rt.step(9, &mut st, &mut sc).unwrap();
        let a = sc.logits.clone();
        rt.step(9, &mut restored, &mut sc).unwrap();
        assert_eq!(a[..], sc.logits[..]);
        assert!(rt.step(cfg.vocab_size as u32, &mut st, &mut sc).is_err());
        assert!(rt.step_batch(&[1, 2], &mut [st.clone()], &mut sc).is_err());
        assert!(rt
            .forward_rows(&[1], &[3], &mut [st.clone()], &[0], &mut sc)
            .is_err());
    }
}
