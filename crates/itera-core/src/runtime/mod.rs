//! The inference runtime: packed weights in any storage format (`kernels::Matrix`), a recurrent
//! state per stream, and one forward over "rows" that serves every inference path:
//! - decode: one row (one token of one stream);
//! - batched decode: one row per stream;
//! - prefill / evaluation: the tokens of one or more sequences, in time order per stream.
//!
//! Projections run as one matmul over all rows (weights read once per call, or once per thread
//! when a call's streams are split between threads); only the causal conv and the selective scan
//! walk the rows in order, updating each stream's state in place. No graph and no allocation per
//! token once the scratch buffers have grown. Must agree with the training reference model
//! (`itera-train`'s `tests/parity.rs`: 1e-4 on logits for every preset).
//!
//! This file packs the weights (walking the tensor table) and holds the public calls; the work is
//! in `forward` (the model over rows, and the thread decisions), `mixer` (conv + scan), `moe`
//! (router and experts) and `state` (what a stream carries, and the scratch buffers).

mod forward;
mod mixer;
mod moe;
mod phases;
mod state;

pub use moe::{route, LayerRouting, RoutingStats};
pub use phases::{Phase, Phases};
pub use state::{AlignedBuf, InputHook, LayerState, Scratch, State};

use crate::config::{Mixer, ModelConfig};
use crate::error::{Error, Result};
use crate::format::dtype::DType;
use crate::kernels::Matrix;
use crate::tensors::{ModelSpec, Spec, SwigluSpec, Weights};

/// Where the runtime's tensors come from (f32 weights in memory, safetensors bytes, a GGUF
/// file, a quantization plan, ...).
pub trait TensorSource {
    /// A weight matrix (a 1-D tensor as one row) in whatever format it is stored in.
    fn matrix(&self, spec: &Spec) -> Result<Matrix>;

    /// A small tensor (norm, bias, A_log, conv kernel) as f32 values.
    fn vector(&self, spec: &Spec) -> Result<Vec<f32>> {
        Ok(self.matrix(spec)?.to_f32())
    }
}

impl TensorSource for Weights {
    fn matrix(&self, spec: &Spec) -> Result<Matrix> {
        let t = self.get(&spec.name)?;
        if t.shape != spec.shape {
            return Err(Error::Tensor {
                name: spec.name.clone(),
                message: format!("shape {:?}, expected {:?}", t.shape, spec.shape),
            });
        }
        let (rows, cols) = spec.rows_cols();
        Matrix::from_f32(rows, cols, t.data.clone())
    }

    fn vector(&self, spec: &Spec) -> Result<Vec<f32>> {
        Ok(self.values(&spec.name)?.to_vec())
    }
}

/// A SwiGLU MLP (an expert, or a dense feed-forward).
struct Swiglu {
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

struct Moe {
    norm: Vec<f32>,
    router: Matrix,
    experts: Vec<Swiglu>,
}

/// A dense SwiGLU feed-forward and its norm (layers without MoE, when `ffn_hidden` > 0).
struct Ffn {
    norm: Vec<f32>,
    mlp: Swiglu,
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
    /// The tensor table the weights were packed from.
    spec: ModelSpec,
    /// Token embedding, also the (tied) LM head.
    embed: Matrix,
    layers: Vec<Layer>,
    norm_f: Vec<f32>,
}

/// Rows per call when a long sequence is prefilled: large enough that matmuls run at full speed
/// (prefill throughput is flat from ~256 rows on), small enough that the activations of a call
/// stay a few MB.
pub const PREFILL_CHUNK: usize = 1024;

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

impl Runtime {
    /// Packs f32 weights.
    pub fn new(cfg: &ModelConfig, w: &Weights) -> Result<Self> {
        Self::from_source(cfg, w)
    }

    /// Packs weights from any source, walking the tensor table; each matrix keeps its format.
    pub fn from_source(cfg: &ModelConfig, src: &dyn TensorSource) -> Result<Self> {
        cfg.validate()?;
        if !cfg.mixer.is_recurrent() {
            return Err(Error::Config(format!(
                "`{}` uses attention, which has no recurrent runtime: it is a training baseline \
                 that `itera eval` scores with the reference forward; generate, serve, bench and \
                 quantize need an SSM model",
                cfg.preset
            )));
        }
        let spec = ModelSpec::new(cfg);
        let (di, k) = (cfg.d_inner(), cfg.d_conv);
        let swiglu = |s: &SwigluSpec| -> Result<Swiglu> {
            Ok(Swiglu {
                gate: src.matrix(&s.gate)?,
                up: src.matrix(&s.up)?,
                down: src.matrix(&s.down)?,
            })
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for ls in &spec.layers {
            let m = ls.ssm().expect("recurrent mixers are SSMs");
            let a_log = src.vector(&m.a_log)?;
            // Per-channel states: d_inner of them with N values each; shared: N of one value.
            let (states, per_state) = match m.a_log.shape[..] {
                [s, n] => (s, n),
                _ => (a_log.len(), 1),
            };
            let a: Vec<f32> = a_log.iter().map(|v| -v.exp()).collect();
            layers.push(Layer {
                norm: src.vector(&ls.norm)?,
                in_proj: src.matrix(&m.in_proj)?,
                conv_t: transpose(&src.vector(&m.conv)?, di, k),
                conv_b: src.vector(&m.conv_bias)?,
                x_proj: src.matrix(&m.x_proj)?,
                dt_proj: src.matrix(&m.dt_proj)?,
                dt_b: src.vector(&m.dt_bias)?,
                a_t: transpose(&a, states, per_state),
                d_skip: src.vector(&m.d)?,
                out_proj: src.matrix(&m.out_proj)?,
                shared: match &m.shared {
                    Some((i, o)) => Some(SharedIo {
                        ssm_in: src.matrix(i)?,
                        ssm_out: src.matrix(o)?,
                    }),
                    None => None,
                },
                moe: match &ls.moe {
                    Some(moe) => Some(Moe {
                        norm: src.vector(&moe.norm)?,
                        router: src.matrix(&moe.router)?,
                        experts: moe.experts.iter().map(swiglu).collect::<Result<_>>()?,
                    }),
                    None => None,
                },
                ffn: match &ls.ffn {
                    Some(f) => Some(Ffn {
                        norm: src.vector(&f.norm)?,
                        mlp: swiglu(&f.mlp)?,
                    }),
                    None => None,
                },
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            embed: src.matrix(&spec.embed)?,
            norm_f: src.vector(&spec.norm_f)?,
            layers,
            spec,
        })
    }

    /// The tensor table the runtime was packed from.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Every weight matrix with its table entry, in file order (for reports and byte counts; a
    /// matrix's address identifies it to a `Scratch::inputs` hook).
    pub fn matrices(&self) -> Vec<(&Spec, &Matrix)> {
        fn swiglu<'a>(out: &mut Vec<(&'a Spec, &'a Matrix)>, s: &'a SwigluSpec, m: &'a Swiglu) {
            out.extend([(&s.gate, &m.gate), (&s.up, &m.up), (&s.down, &m.down)]);
        }
        let mut out = vec![(&self.spec.embed, &self.embed)];
        for (ls, layer) in self.spec.layers.iter().zip(&self.layers) {
            let m = ls.ssm().expect("packed layers are SSMs");
            out.push((&m.in_proj, &layer.in_proj));
            out.push((&m.x_proj, &layer.x_proj));
            out.push((&m.dt_proj, &layer.dt_proj));
            out.push((&m.out_proj, &layer.out_proj));
            if let (Some((i, o)), Some(io)) = (&m.shared, &layer.shared) {
                out.push((i, &io.ssm_in));
                out.push((o, &io.ssm_out));
            }
            if let (Some(fs), Some(f)) = (&ls.ffn, &layer.ffn) {
                swiglu(&mut out, &fs.mlp, &f.mlp);
            }
            if let (Some(ms), Some(moe)) = (&ls.moe, &layer.moe) {
                out.push((&ms.router, &moe.router));
                for (es, e) in ms.experts.iter().zip(&moe.experts) {
                    swiglu(&mut out, es, e);
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
        self.spec.per_token(Spec::len)
    }

    /// Weight bytes one decode token reads (the LM head, every layer, top-k experts only): what
    /// bounds single-stream decode by memory bandwidth.
    pub fn weight_bytes_per_token(&self) -> usize {
        let bytes: std::collections::HashMap<&str, usize> = self
            .matrices()
            .into_iter()
            .map(|(s, m)| (s.name.as_str(), m.bytes()))
            .collect();
        self.spec.per_token(|s| bytes[s.name.as_str()])
    }

    /// Lengths of one layer's conv buffer and SSM state.
    fn state_lens(&self) -> (usize, usize) {
        let c = &self.cfg;
        let ssm = if c.mixer == Mixer::SharedState {
            c.d_state
        } else {
            c.d_inner() * c.d_state
        };
        ((c.d_conv - 1) * c.d_inner(), ssm)
    }

    pub fn new_state(&self) -> State {
        let (conv, ssm) = self.state_lens();
        State {
            layers: (0..self.cfg.n_layers)
                .map(|_| LayerState {
                    conv: vec![0.0; conv],
                    ssm: vec![0.0; ssm],
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
        let (conv, ssm) = self.state_lens();
        let ok = s.layers.len() == self.cfg.n_layers
            && s.layers
                .iter()
                .all(|l| l.conv.len() == conv && l.ssm.len() == ssm);
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
    /// Long sequences run in chunks of `PREFILL_CHUNK` rows, so the work buffers stay bounded
    /// whatever the length (a 100k-token prompt would otherwise need ~1 GB of activations).
    pub fn prefill(&self, tokens: &[u32], state: &mut State, s: &mut Scratch) -> Result<()> {
        let streams = vec![0; tokens.len().min(PREFILL_CHUNK)];
        let chunks = tokens.chunks(PREFILL_CHUNK);
        let last = chunks.len().saturating_sub(1);
        for (i, chunk) in chunks.enumerate() {
            // Logits only where they are used: after the very last token.
            let want: &[usize] = if i == last { &[chunk.len() - 1] } else { &[] };
            self.forward_rows(
                chunk,
                &streams[..chunk.len()],
                std::slice::from_mut(state),
                want,
                s,
            )?;
        }
        Ok(())
    }

    /// Like `prefill`, but `scratch.logits` holds the logits after every token ([len, vocab]).
    pub fn prefill_all(&self, tokens: &[u32], state: &mut State, s: &mut Scratch) -> Result<()> {
        let streams = vec![0; tokens.len()];
        let all: Vec<usize> = (0..tokens.len()).collect();
        self.forward_rows(tokens, &streams, std::slice::from_mut(state), &all, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::tensors::Spec;

    fn random_tokens(cfg: &ModelConfig, len: usize, seed: u64) -> Vec<u32> {
        let mut rng = Rng::new(seed);
        (0..len).map(|_| rng.below(cfg.vocab_size) as u32).collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
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
            fn matrix(&self, spec: &Spec) -> Result<Matrix> {
                let v = self.0.values(&spec.name)?;
                let (rows, cols) = spec.rows_cols();
                let dt = if cols.is_multiple_of(32) && rows > 1 {
                    self.1
                } else {
                    DType::F32
                };
                Matrix::quantize(dt, rows, cols, v)
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
