//! Error-compensating quantization (GPTQ: Frantar et al., ICLR 2023) of a matrix to a symmetric
//! block format. Round-to-nearest gives every weight the code closest to it; GPTQ rounds one
//! column (input feature) at a time and moves each rounding's error onto the columns not yet
//! rounded, weighted by the inverse of the Gram matrix of the inputs the matrix sees on
//! calibration text, so that its products with real inputs change least. Each block's scale is
//! chosen (by the same rule as without GPTQ) when the first of its 32 columns is reached, from
//! the weights as updated so far. The output is the ordinary layout: every reader decodes it.
//! Also the Gram matrices themselves, summed while the runtime reads calibration text.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use itera_core::error::{Error, Result};
use itera_core::format::dtype::{self, DType, Rounding, SymmetricBlock, BLOCK};
use itera_core::format::gguf::GgufFile;
use itera_core::kernels::Matrix;
use itera_core::runtime::{Runtime, PREFILL_CHUNK};
use itera_core::tensors::{ModelSpec, Weights};
use itera_core::ModelConfig;

use crate::linalg::{add_products, cholesky};

/// What GPTQ adds to the Gram matrix's diagonal, relative to its mean: the paper's 1%, which keeps
/// the inverse well posed for inputs the calibration text barely varies.
pub const DAMP: f64 = 0.01;

/// The sum over calibration tokens of x x^T ([n, n], f64) for a matrix's inputs x.
#[derive(Clone, Debug)]
pub struct Gram {
    pub n: usize,
    pub sum: Vec<f64>,
    pub tokens: usize,
}

impl Gram {
    pub fn new(n: usize) -> Self {
        Self {
            n,
            sum: vec![0.0; n * n],
            tokens: 0,
        }
    }

    /// Adds the rows of `x` ([rows, n]).
    pub fn add(&mut self, x: &[f32]) {
        let rows = x.len() / self.n;
        if rows == 0 {
            return;
        }
        let x: Vec<f64> = x[..rows * self.n].iter().map(|&v| v as f64).collect();
        add_products(&x, &x, rows, &mut self.sum);
        self.tokens += rows;
    }
}

/// The Gram matrix of every weight matrix's inputs as `runtime` reads `tokens` as one stream
/// from a fresh state, by tensor name; the tied embedding's are the LM head's inputs, the final
/// hidden states. An expert's are the rows routed to it.
pub fn input_grams(runtime: &Runtime, tokens: &[u32]) -> Result<BTreeMap<String, Gram>> {
    let sums: Arc<Mutex<HashMap<usize, Gram>>> = Default::default();
    let key = |m: &Matrix| std::ptr::from_ref(m) as usize;
    let mut scratch = runtime.new_scratch();
    let hook_sums = Arc::clone(&sums);
    scratch.inputs = Some(Box::new(move |m: &Matrix, x: &[f32]| {
        let mut sums = hook_sums.lock().expect("not poisoned");
        sums.entry(key(m))
            .or_insert_with(|| Gram::new(m.cols))
            .add(x);
    }));
    let matrices = runtime.matrices();
    let (embed, head) = (key(matrices[0].1), runtime.cfg.d_model);
    let mut state = runtime.new_state();
    let streams = vec![0; PREFILL_CHUNK];
    for chunk in tokens.chunks(PREFILL_CHUNK) {
        let h = runtime.final_hidden(
            chunk,
            &streams[..chunk.len()],
            std::slice::from_mut(&mut state),
            &mut scratch,
        )?;
        let mut sums = sums.lock().expect("not poisoned");
        sums.entry(embed).or_insert_with(|| Gram::new(head)).add(h);
    }
    drop(scratch);
    let mut sums = std::mem::take(&mut *sums.lock().expect("not poisoned"));
    Ok(matrices
        .iter()
        .filter_map(|(spec, m)| Some((spec.name.clone(), sums.remove(&key(m))?)))
        .collect())
}

/// How much of the identity (relative to the Gram matrix's mean diagonal) the tied embedding's
/// GPTQ adds to its LM-head Gram matrix: the same tensor is also the input embedding, whose
/// rows' plain squared error matters as well. Measured on `ptb-tiny` Q4_0 with fitted scales
/// (PTB valid, docs/compression.md): 0, 0.3, 1, 3 and 10 gave 101.47, 101.09, 101.06, 101.20
/// and 101.38.
pub const EMBED_IDENTITY: f64 = 1.0;

/// Replaces the bytes of every tensor of `file` stored in a symmetric block format (Q8_0, Q5_0,
/// Q4_0) that has a Gram matrix in `grams` by its GPTQ quantization from `weights`' f32 values.
/// Returns the names of the tensors replaced; `progress(done, total)` counts the file's tensors.
pub fn apply(
    file: &mut GgufFile,
    cfg: &ModelConfig,
    weights: &Weights,
    grams: &BTreeMap<String, Gram>,
    rounding: Rounding,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<String>> {
    let embed = ModelSpec::new(cfg).embed.name;
    let mut done = Vec::new();
    let total = file.tensors.len();
    for (i, t) in file.tensors.iter_mut().enumerate() {
        progress(i, total);
        let Some(gram) = grams.get(&t.name) else {
            continue;
        };
        if !dtype::has_fitted_scales(t.dtype) || t.shape.len() != 2 {
            continue;
        }
        let mut gram = Cow::Borrowed(gram);
        if t.name == embed {
            let g = gram.to_mut();
            let n = g.n;
            let mean = (0..n).map(|i| g.sum[i * n + i]).sum::<f64>() / n as f64;
            (0..n).for_each(|i| g.sum[i * n + i] += EMBED_IDENTITY * mean);
        }
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let values = weights.values(&t.name)?;
        t.bytes =
            quantize(t.dtype, rounding, values, rows, cols, &gram).map_err(|e| Error::Tensor {
                name: t.name.clone(),
                message: e.to_string(),
            })?;
        done.push(t.name.clone());
    }
    Ok(done)
}

/// `w` ([rows, cols] row-major, the product is y = w x) in `dtype` (Q8_0, Q5_0 or Q4_0) by GPTQ
/// with the inputs' Gram matrix `gram` ([cols, cols]) and the block scales chosen by `rounding`.
/// Returns the encoded bytes.
pub fn quantize(
    dtype: DType,
    rounding: Rounding,
    w: &[f32],
    rows: usize,
    cols: usize,
    gram: &Gram,
) -> Result<Vec<u8>> {
    if !dtype::has_fitted_scales(dtype) {
        return Err(Error::Argument(format!(
            "GPTQ applies to q8_0, q5_0 and q4_0, not {}",
            dtype.name()
        )));
    }
    if gram.n != cols || w.len() != rows * cols || !cols.is_multiple_of(BLOCK) {
        return Err(Error::Argument(format!(
            "GPTQ: a [{rows}, {cols}] matrix of {} values with a Gram matrix of {} inputs \
             (columns must be a multiple of {BLOCK})",
            w.len(),
            gram.n
        )));
    }
    let u = inverse_factor(gram)?;
    let mut w: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    let mut blocks: Vec<SymmetricBlock> = vec![(0.0, [0; BLOCK]); rows * cols / BLOCK];
    let mut block_f32 = [0f32; BLOCK];
    for i in 0..cols {
        let (b, at) = (i / BLOCK, i % BLOCK);
        for r in 0..rows {
            let row = &mut w[r * cols..(r + 1) * cols];
            let block = &mut blocks[r * cols / BLOCK + b];
            if at == 0 {
                for (d, s) in block_f32.iter_mut().zip(&row[i..i + BLOCK]) {
                    *d = *s as f32;
                }
                block.0 = dtype::symmetric_scale(dtype, &block_f32, rounding).expect("checked");
            }
            let code = dtype::symmetric_code(dtype, row[i] as f32, block.0);
            block.1[at] = code;
            // The rounding error, moved onto the columns after i.
            let err = (row[i] - block.0 as f64 * code as f64) / u[i * cols + i];
            for (x, uij) in row[i + 1..]
                .iter_mut()
                .zip(&u[i * cols + i + 1..(i + 1) * cols])
            {
                *x -= err * uij;
            }
        }
    }
    Ok(dtype::encode_symmetric(dtype, &blocks))
}

/// The upper Cholesky factor U of the damped Gram matrix's inverse (H^-1 = U^T U), row-major:
/// row i of U holds how column i's error spreads over the later columns.
fn inverse_factor(gram: &Gram) -> Result<Vec<f64>> {
    let n = gram.n;
    let mut h = gram.sum.clone();
    let mean = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
    // An input that never varies gets a unit diagonal (nothing to weigh its error by).
    let damp = if mean > 0.0 { DAMP * mean } else { 1.0 };
    for i in 0..n {
        if h[i * n + i] <= 0.0 {
            h[i * n + i] = 1.0;
        }
        h[i * n + i] += damp;
    }
    // H = L L^T; H^-1 = L^-T L^-1, column by column from L^-1.
    cholesky(&mut h, n, "GPTQ")?;
    let mut linv = vec![0f64; n * n];
    for c in 0..n {
        for i in c..n {
            let known: f64 = (c..i).map(|k| h[i * n + k] * linv[k * n + c]).sum();
            let unit = if i == c { 1.0 } else { 0.0 };
            linv[i * n + c] = (unit - known) / h[i * n + i];
        }
    }
    let mut inv = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (i..n).map(|k| linv[k * n + i] * linv[k * n + j]).sum();
            inv[i * n + j] = s;
            inv[j * n + i] = s;
        }
    }
    // H^-1 = L' L'^T with L' lower; U = L'^T.
    cholesky(&mut inv, n, "GPTQ")?;
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = inv[j * n + i];
        }
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use itera_core::format::dtype::dequantize;
    use itera_core::rng::Rng;

    /// Random inputs with correlated features (x = z A + 0.1 z, A the same for every seed) and
    /// their Gram matrix.
    fn inputs(tokens: usize, cols: usize, seed: u64) -> (Vec<f32>, Gram) {
        let mut mixing = Rng::new(1);
        let mix: Vec<f32> = (0..cols * cols).map(|_| mixing.normal() as f32).collect();
        let mut rng = Rng::new(seed);
        let mut x = vec![0f32; tokens * cols];
        for t in 0..tokens {
            let z: Vec<f32> = (0..cols).map(|_| rng.normal() as f32).collect();
            for j in 0..cols {
                x[t * cols + j] = (0..cols).map(|k| z[k] * mix[k * cols + j]).sum::<f32>()
                    / (cols as f32).sqrt()
                    + 0.1 * z[j];
            }
        }
        let mut g = Gram::new(cols);
        g.add(&x);
        (x, g)
    }

    /// Sum over tokens and rows of (w x - w' x)^2.
    fn output_error(w: &[f32], wq: &[f32], x: &[f32], rows: usize, cols: usize) -> f64 {
        let mut e = 0.0;
        for xt in x.chunks_exact(cols) {
            for r in 0..rows {
                let (a, b) = (&w[r * cols..(r + 1) * cols], &wq[r * cols..(r + 1) * cols]);
                let d: f64 = a
                    .iter()
                    .zip(b)
                    .zip(xt)
                    .map(|((a, b), x)| ((a - b) * x) as f64)
                    .sum();
                e += d * d;
            }
        }
        e
    }

    /// On correlated inputs GPTQ's outputs are closer to the f32 matrix's than round-to-nearest's,
    /// for every symmetric format and both scale rules, on inputs it was not fitted to as well.
    #[test]
    fn gptq_lowers_the_output_error_of_round_to_nearest() {
        let (rows, cols) = (24, 64);
        let mut rng = Rng::new(5);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.normal() as f32 * 0.1)
            .collect();
        let (_, gram) = inputs(512, cols, 7);
        let (held_out, _) = inputs(256, cols, 7 + 1);
        for dtype in [DType::Q4_0, DType::Q5_0, DType::Q8_0] {
            for rounding in [Rounding::Reference, Rounding::Fitted] {
                let rtn_bytes = dtype::quantize_with(dtype, &w, rounding).unwrap();
                let rtn = dequantize(dtype, &rtn_bytes, w.len()).unwrap();
                let bytes = quantize(dtype, rounding, &w, rows, cols, &gram).unwrap();
                assert_eq!(bytes.len(), dtype.bytes_for(w.len()).unwrap());
                let ours = dequantize(dtype, &bytes, w.len()).unwrap();
                let (e_rtn, e_ours) = (
                    output_error(&w, &rtn, &held_out, rows, cols),
                    output_error(&w, &ours, &held_out, rows, cols),
                );
                assert!(
                    e_ours < 0.8 * e_rtn,
                    "{dtype:?} {rounding:?}: GPTQ {e_ours} against round-to-nearest {e_rtn}"
                );
            }
        }
    }

    /// With uncorrelated inputs of equal scale there is nothing to compensate: the Gram matrix is
    /// a multiple of the identity, so every weight gets the code nearest to it at its block's
    /// scale (round-to-nearest).
    #[test]
    fn identity_gram_is_round_to_nearest() {
        let (rows, cols) = (5, 64);
        let mut rng = Rng::new(9);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal() as f32).collect();
        let mut gram = Gram::new(cols);
        (0..cols).for_each(|i| gram.sum[i * cols + i] = 3.0);
        for rounding in [Rounding::Reference, Rounding::Fitted] {
            let nearest: Vec<SymmetricBlock> = w
                .chunks_exact(BLOCK)
                .map(|b| {
                    let d = dtype::symmetric_scale(DType::Q4_0, b, rounding).unwrap();
                    (
                        d,
                        std::array::from_fn(|i| dtype::symmetric_code(DType::Q4_0, b[i], d)),
                    )
                })
                .collect();
            assert_eq!(
                quantize(DType::Q4_0, rounding, &w, rows, cols, &gram).unwrap(),
                dtype::encode_symmetric(DType::Q4_0, &nearest)
            );
        }
    }

    fn small() -> (ModelConfig, Weights, Vec<u32>) {
        let (cfg, w) = crate::testing::tiny();
        (cfg, w, crate::testing::tokens(300))
    }

    /// Every matrix gets the Gram matrix of exactly the rows it multiplies: the first mixer's
    /// in_proj that of the normalised embeddings (computed here independently), every dense
    /// matrix one row per token, each MoE layer's experts top_k rows per token between them, the
    /// tied embedding the final hidden states.
    #[test]
    fn input_grams_sum_what_each_matrix_multiplies() {
        let (cfg, w, toks) = small();
        let runtime = Runtime::new(&cfg, &w).unwrap();
        let grams = input_grams(&runtime, &toks).unwrap();
        assert_eq!(grams.len(), runtime.matrices().len());
        for (spec, m) in runtime.matrices() {
            let g = &grams[&spec.name];
            assert_eq!(g.n, m.cols, "{}", spec.name);
            let n = g.n;
            assert!((0..n).all(|i| (0..n).all(|j| g.sum[i * n + j] == g.sum[j * n + i])));
        }
        let spec = ModelSpec::new(&cfg);
        for ls in &spec.layers {
            let m = ls.ssm().unwrap();
            for t in [&m.in_proj, &m.x_proj, &m.dt_proj, &m.out_proj] {
                assert_eq!(grams[&t.name].tokens, toks.len(), "{}", t.name);
            }
            let moe = ls.moe.as_ref().unwrap();
            assert_eq!(grams[&moe.router.name].tokens, toks.len());
            let routed: usize = moe.experts.iter().map(|e| grams[&e.gate.name].tokens).sum();
            assert_eq!(routed, toks.len() * cfg.top_k);
            for e in &moe.experts {
                assert_eq!(grams[&e.up.name].tokens, grams[&e.down.name].tokens);
            }
        }
        assert_eq!(grams[&spec.embed.name].tokens, toks.len());
        // Layer 0's in_proj reads rmsnorm(embedding) of each token.
        let (d, embed) = (cfg.d_model, w.values(&spec.embed.name).unwrap());
        let norm = w.values(&spec.layers[0].norm.name).unwrap();
        let mut want = vec![0f64; d * d];
        let mut h = vec![0f32; d];
        for &t in &toks {
            let x = &embed[t as usize * d..(t as usize + 1) * d];
            itera_core::math::rms_norm_rows(x, norm, cfg.norm_eps, &mut h);
            for i in 0..d {
                for j in 0..d {
                    want[i * d + j] += h[i] as f64 * h[j] as f64;
                }
            }
        }
        let got = &grams[&spec.layers[0].ssm().unwrap().in_proj.name].sum;
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-5 * scale, "{diff} against {scale}");
    }

    /// A whole Q4_0 file: GPTQ replaces every matrix stored as Q4_0 (same sizes, the file still
    /// loads), and the model's logits on the calibration text end closer to the f32 model's than
    /// round-to-nearest's.
    #[test]
    fn gptq_files_load_and_stay_closer_to_f32() {
        let (cfg, w, toks) = small();
        let plan = crate::Plan::uniform(&cfg, DType::Q4_0);
        let file = |gptq: bool| {
            let mut f = itera_core::format::gguf::model_file(
                &cfg,
                "{}",
                "t",
                |n| Ok(w.values(n)?.to_vec()),
                |s| plan.dtype(&s.name),
                Rounding::Fitted,
            )
            .unwrap();
            if gptq {
                let grams = input_grams(&Runtime::new(&cfg, &w).unwrap(), &toks).unwrap();
                let sizes: Vec<usize> = f.tensors.iter().map(|t| t.bytes.len()).collect();
                let done = apply(&mut f, &cfg, &w, &grams, Rounding::Fitted, |_, _| {}).unwrap();
                let q4 = f.tensors.iter().filter(|t| t.dtype == DType::Q4_0).count();
                assert_eq!(done.len(), q4);
                assert!(f.tensors.iter().zip(sizes).all(|(t, n)| t.bytes.len() == n));
            }
            f
        };
        let logits = |src: &dyn itera_core::runtime::TensorSource| {
            let rt = Runtime::from_source(&cfg, src).unwrap();
            let (mut state, mut scratch) = (rt.new_state(), rt.new_scratch());
            rt.prefill_all(&toks, &mut state, &mut scratch).unwrap();
            scratch.logits.to_vec()
        };
        let exact = logits(&w);
        let dist = |l: Vec<f32>| -> f64 {
            l.iter()
                .zip(&exact)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum()
        };
        let (rtn, ours) = (dist(logits(&file(false))), dist(logits(&file(true))));
        assert!(ours < rtn, "GPTQ {ours} against round-to-nearest {rtn}");
    }

    #[test]
    fn bad_shapes_and_types_are_refused() {
        let gram = Gram::new(32);
        let w = vec![0.5f32; 64];
        assert!(quantize(DType::Q4_0, Rounding::Reference, &w, 2, 32, &gram).is_ok());
        let msg = |r: Result<Vec<u8>>| r.unwrap_err().to_string();
        assert!(msg(quantize(DType::Q4_1, Rounding::Reference, &w, 2, 32, &gram)).contains("q4_0"));
        assert!(msg(quantize(DType::Q4_0, Rounding::Reference, &w, 1, 64, &gram)).contains("Gram"));
        assert!(msg(quantize(
            DType::Q4_0,
            Rounding::Reference,
            &w[..48],
            2,
            24,
            &Gram::new(24)
        ))
        .contains("multiple"));
    }
}
