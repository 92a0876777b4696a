//! Weight formats: ggml's block layouts (what a GGUF file stores) and their reference quantize /
//! dequantize. The runtime repacks these blocks for its kernels (`kernels.rs`); this module is the
//! byte-exact definition both the GGUF writer and the tests rely on.

use half::{bf16, f16};

use crate::error::{Error, Result};

/// Elements per quantization block (all our block formats use 32, so rows of 128 fit).
pub const BLOCK: usize = 32;

/// A tensor's storage type. Ids are ggml's (`GGMLQuantizationType`), except NF4 (not a ggml type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q5_0,
    Q4_0,
    Q4_1,
    /// QLoRA's 4-bit NormalFloat codebook, in blocks of 32 with an f16 absmax scale.
    NF4,
}

/// NF4 code values (quantiles of a standard normal, scaled to [-1, 1]), from the QLoRA paper.
pub const NF4_VALUES: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The NF4 codebook on the int8 grid the integer kernels use (value * 127, rounded).
pub fn nf4_i8() -> [i8; 16] {
    NF4_VALUES.map(|v| (v * 127.0).round() as i8)
}

impl DType {
    pub const ALL: [DType; 8] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q5_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::NF4,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q5_0 => "q5_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::NF4 => "nf4",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|d| d.name() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                Error::Argument(format!(
                    "unknown tensor type `{s}` (expected one of: {})",
                    Self::ALL.map(|d| d.name()).join(", ")
                ))
            })
    }

    /// The GGUF / ggml type id. NF4 has none in ggml; we use an id far above ggml's range.
    pub fn ggml_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q5_0 => 6,
            DType::Q8_0 => 8,
            DType::BF16 => 30,
            DType::NF4 => 1_000,
        }
    }

    pub fn from_ggml_id(id: u32) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|d| d.ggml_id() == id)
            .ok_or_else(|| Error::Format(format!("unsupported ggml tensor type id {id}")))
    }

    /// Elements per block (1 for the float types).
    pub fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            _ => BLOCK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 2 + 32,
            DType::Q5_0 => 2 + 4 + 16,
            DType::Q4_0 | DType::NF4 => 2 + 16,
            DType::Q4_1 => 2 + 2 + 16,
        }
    }

    pub fn bits_per_weight(self) -> f64 {
        (self.block_bytes() * 8) as f64 / self.block_len() as f64
    }

    /// Bytes of a tensor with `n` elements; errors when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Result<usize> {
        if !n.is_multiple_of(self.block_len()) {
            return Err(Error::Argument(format!(
                "{n} elements are not a multiple of {}'s block of {}",
                self.name(),
                self.block_len()
            )));
        }
        Ok(n / self.block_len() * self.block_bytes())
    }
}

fn put_f16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
}

fn get_f16(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// The element of largest magnitude, with its sign (ggml's choice of scale for Q4_0 / Q5_0).
fn signed_absmax(x: &[f32]) -> f32 {
    x.iter()
        .copied()
        .fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m })
}

/// Packs 32 4-bit codes ggml's way: byte j = code[j] | code[j + 16] << 4.
fn pack_nibbles(q: &[u8; BLOCK], out: &mut Vec<u8>) {
    for j in 0..16 {
        out.push(q[j] | (q[j + 16] << 4));
    }
}

/// Q4_0's or Q5_0's codes after the scale: Q5_0 first stores each code's fifth bit (bit j of
/// a u32 for code j), then both pack the low four bits as nibbles.
fn pack_low_bits(dtype: DType, mut q: [u8; BLOCK], out: &mut Vec<u8>) {
    if dtype == DType::Q5_0 {
        let qh = q
            .iter()
            .enumerate()
            .fold(0u32, |h, (j, &c)| h | (((c >> 4) as u32) << j));
        out.extend_from_slice(&qh.to_le_bytes());
        q.iter_mut().for_each(|c| *c &= 0x0F);
    }
    pack_nibbles(&q, out);
}

fn unpack_nibbles(b: &[u8]) -> [u8; BLOCK] {
    let mut q = [0u8; BLOCK];
    for j in 0..16 {
        q[j] = b[j] & 0x0F;
        q[j + 16] = b[j] >> 4;
    }
    q
}

/// Encodes f32 values into `dtype`'s ggml byte layout.
pub fn quantize(dtype: DType, x: &[f32]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(dtype.bytes_for(x.len())?);
    match dtype {
        DType::F32 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => x.iter().for_each(|&v| put_f16(&mut out, v)),
        DType::BF16 => x
            .iter()
            .for_each(|&v| out.extend_from_slice(&bf16::from_f32(v).to_le_bytes())),
        _ => {
            for b in x.chunks_exact(BLOCK) {
                quantize_block(dtype, b, &mut out);
            }
        }
    }
    Ok(out)
}

fn quantize_block(dtype: DType, x: &[f32], out: &mut Vec<u8>) {
    let mut q = [0u8; BLOCK];
    match dtype {
        DType::Q8_0 => {
            let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            put_f16(out, d);
            out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
        }
        DType::Q4_0 | DType::Q5_0 => {
            let levels = if dtype == DType::Q4_0 { 8.0 } else { 16.0 };
            let d = signed_absmax(x) / -levels;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let top = (2.0 * levels - 1.0) as u8;
            // ggml's reference rounds x * id + levels + 0.5 in one step (an FMA); gguf-py does
            // it in f64 and truncates as f32, which is what we match code for code.
            let offset = levels as f64 + 0.5;
            for (c, &v) in q.iter_mut().zip(x) {
                *c = ((v as f64 * id as f64 + offset) as f32)
                    .trunc()
                    .max(0.0)
                    .min(top as f32) as u8;
            }
            put_f16(out, d);
            pack_low_bits(dtype, q, out);
        }
        DType::Q4_1 => {
            let min = x.iter().copied().fold(f32::INFINITY, f32::min);
            let max = crate::math::max(x);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            for (c, v) in q.iter_mut().zip(x) {
                *c = (((v - min) * id + 0.5) as u8).min(15);
            }
            put_f16(out, d);
            put_f16(out, min);
            pack_nibbles(&q, out);
        }
        DType::NF4 => {
            let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let id = if amax > 0.0 { 1.0 / amax } else { 0.0 };
            for (c, v) in q.iter_mut().zip(x) {
                let t = v * id;
                *c = (0..16)
                    .min_by(|&a, &b| {
                        (NF4_VALUES[a] - t)
                            .abs()
                            .total_cmp(&(NF4_VALUES[b] - t).abs())
                    })
                    .unwrap() as u8;
            }
            put_f16(out, amax);
            pack_nibbles(&q, out);
        }
        DType::F32 | DType::F16 | DType::BF16 => unreachable!("float types are not blocked"),
    }
}

/// How a block format picks each block's scale and codes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Rounding {
    /// ggml's reference quantizer, byte for byte (the block's extreme on the end code).
    #[default]
    Reference,
    /// For the symmetric formats (Q8_0, Q5_0, Q4_0): the scale that minimises the block's squared
    /// error (see `fit_block`). Same layout, so every GGUF reader decodes it; other types as
    /// `Reference`. Measured (docs/compression.md): Q4_0 loses 4-20% less quality than with the
    /// reference on the shipped and pruned models.
    Fitted,
}

/// `quantize` with a choice of rounding.
pub fn quantize_with(dtype: DType, x: &[f32], rounding: Rounding) -> Result<Vec<u8>> {
    let Some(levels) = symmetric_levels(dtype).filter(|_| rounding == Rounding::Fitted) else {
        return quantize(dtype, x);
    };
    dtype.bytes_for(x.len())?;
    let blocks: Vec<SymmetricBlock> = x
        .chunks_exact(BLOCK)
        .map(|b| fit_block(b, levels))
        .collect();
    Ok(encode_symmetric(dtype, &blocks))
}

/// One block of a symmetric format (Q8_0, Q5_0, Q4_0) as its encoder takes it: the scale
/// (f16-representable) and the codes, value = scale * code.
pub type SymmetricBlock = (f32, [i32; BLOCK]);

/// The scale `rounding` gives one block `x` of a symmetric format, f16-representable: ggml's
/// reference choice (the extreme on the end code) or `Rounding::Fitted`'s. None for other types.
pub fn symmetric_scale(dtype: DType, x: &[f32], rounding: Rounding) -> Option<f32> {
    let (lo, hi) = symmetric_levels(dtype)?;
    Some(match rounding {
        Rounding::Reference => f16::from_f32(signed_absmax(x) / -(lo as f32)).to_f32(),
        Rounding::Fitted => fit_block(x, (lo, hi)).0,
    })
}

/// The code of value `v` at scale `d` in a symmetric format: round(v / d), clamped to its
/// range (0 when d is 0).
pub fn symmetric_code(dtype: DType, v: f32, d: f32) -> i32 {
    let (lo, hi) = symmetric_levels(dtype).expect("a symmetric block format");
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    ((v * id).round() as i32).clamp(-lo, hi)
}

/// Symmetric blocks in `dtype`'s ggml byte layout (codes must lie in its range).
pub fn encode_symmetric(dtype: DType, blocks: &[SymmetricBlock]) -> Vec<u8> {
    let (lo, _) = symmetric_levels(dtype).expect("a symmetric block format");
    let mut out = Vec::with_capacity(blocks.len() * dtype.block_bytes());
    for (d, k) in blocks {
        put_f16(&mut out, *d);
        if dtype == DType::Q8_0 {
            out.extend(k.iter().map(|&v| v as i8 as u8));
        } else {
            pack_low_bits(dtype, k.map(|v| (v + lo) as u8), &mut out);
        }
    }
    out
}

/// Whether `Rounding::Fitted` changes how `dtype` is encoded.
pub fn has_fitted_scales(dtype: DType) -> bool {
    symmetric_levels(dtype).is_some()
}

/// The code range (-lo ..= hi) of a symmetric block format, value = scale * code.
fn symmetric_levels(dtype: DType) -> Option<(i32, i32)> {
    match dtype {
        DType::Q8_0 => Some((127, 127)),
        DType::Q5_0 => Some((16, 15)),
        DType::Q4_0 => Some((8, 7)),
        _ => None,
    }
}

/// One block's (f16-representable scale, codes) with the least squared error found: 41 inverse
/// scales from 20% below to 20% above the reference's in 1% steps (as llama.cpp's `make_qx_quants` searches),
/// each with the least-squares scale for the codes it rounds to; the best scale is rounded to f16
/// and the codes rounded again with it, kept only if that lowers the error further. The reference
/// choice is the starting point, so no block ends worse than with it.
fn fit_block(x: &[f32], (lo, hi): (i32, i32)) -> (f32, [i32; BLOCK]) {
    let m = signed_absmax(x);
    let codes = |d: f32| -> [i32; BLOCK] {
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        std::array::from_fn(|i| ((x[i] * id).round() as i32).clamp(-lo, hi))
    };
    let err = |d: f32, k: &[i32; BLOCK]| -> f64 {
        k.iter()
            .zip(x)
            .map(|(&c, &v)| ((v - d * c as f32) as f64).powi(2))
            .sum()
    };
    if m == 0.0 {
        return (0.0, [0; BLOCK]);
    }
    // The reference: the extreme m on code -lo, the scale stored as f16.
    let reference = codes(m / -(lo as f32));
    let d0 = f16::from_f32(m / -(lo as f32)).to_f32();
    let mut best = (d0, reference, err(d0, &reference));
    for step in -20..=20 {
        // m on code -lo * (1 + step / 100).
        let k = codes(m / -(lo as f32 * (1.0 + step as f32 * 0.01)));
        let (xk, kk) = k.iter().zip(x).fold((0f64, 0f64), |(xk, kk), (&c, &v)| {
            (xk + v as f64 * c as f64, kk + (c * c) as f64)
        });
        if kk > 0.0 {
            let d = f16::from_f32((xk / kk) as f32).to_f32();
            let e = err(d, &k);
            if e < best.2 {
                best = (d, k, e);
            }
        }
    }
    let (d, k, e) = best;
    let again = codes(d);
    if err(d, &again) < e {
        (d, again)
    } else {
        (d, k)
    }
}

/// One block's weights as (codes, scale, bias): w[i] = scale * value(code[i]) + bias, where
/// `value` is the identity except for NF4 (see `code_value`). Every block format reduces to this,
/// which is what the integer kernels compute with: codes are unsigned (Q8_0's int8 offset by 128).
pub fn block_codes(dtype: DType, b: &[u8]) -> ([u8; BLOCK], f32, f32) {
    let d = get_f16(b);
    match dtype {
        DType::Q8_0 => {
            let mut q = [0u8; BLOCK];
            for (c, &v) in q.iter_mut().zip(&b[2..34]) {
                *c = (v as i8 as i16 + 128) as u8;
            }
            (q, d, -128.0 * d)
        }
        DType::Q4_0 => (unpack_nibbles(&b[2..18]), d, -8.0 * d),
        DType::Q5_0 => {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let mut q = unpack_nibbles(&b[6..22]);
            for (j, c) in q.iter_mut().enumerate() {
                *c |= (((qh >> j) & 1) as u8) << 4;
            }
            (q, d, -16.0 * d)
        }
        DType::Q4_1 => (unpack_nibbles(&b[4..20]), d, get_f16(&b[2..4])),
        DType::NF4 => (unpack_nibbles(&b[2..18]), d / 127.0, -128.0 * d / 127.0),
        DType::F32 | DType::F16 | DType::BF16 => unreachable!("float types are not blocked"),
    }
}

/// NF4's code -> unsigned value table (int8 codebook + 128); None for the linear formats.
pub fn code_table(dtype: DType) -> Option<[u8; 16]> {
    (dtype == DType::NF4).then(|| nf4_i8().map(|v| (v as i16 + 128) as u8))
}

/// Decodes `dtype`'s ggml bytes back to f32 (`n` values).
pub fn dequantize(dtype: DType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let need = dtype.bytes_for(n)?;
    if bytes.len() != need {
        return Err(Error::Format(format!(
            "{} data of {n} elements must be {need} bytes, found {}",
            dtype.name(),
            bytes.len()
        )));
    }
    Ok(match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes.chunks_exact(2).map(get_f16).collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => {
            let mut out = Vec::with_capacity(n);
            for b in bytes.chunks_exact(dtype.block_bytes()) {
                out.extend(dequantize_block(dtype, b));
            }
            out
        }
    })
}

/// One block decoded with ggml's own formulas (`dequantize_row_*` in ggml-quants.c), written
/// independently of `block_codes` so that the kernels (which use `block_codes`) are checked
/// against it: Q8_0 d * q, Q4_0 d * (q - 8), Q5_0 d * (q - 16), Q4_1 d * q + m; NF4 the int8
/// codebook scaled by absmax / 127.
fn dequantize_block(dtype: DType, b: &[u8]) -> [f32; BLOCK] {
    let d = get_f16(b);
    let mut out = [0f32; BLOCK];
    match dtype {
        DType::Q8_0 => {
            for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                *o = d * (q as i8) as f32;
            }
        }
        DType::Q4_0 => {
            for (o, q) in out.iter_mut().zip(unpack_nibbles(&b[2..18])) {
                *o = d * (q as i32 - 8) as f32;
            }
        }
        DType::Q5_0 => {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for (j, (o, q)) in out.iter_mut().zip(unpack_nibbles(&b[6..22])).enumerate() {
                let q = q as i32 | (((qh >> j) & 1) as i32) << 4;
                *o = d * (q - 16) as f32;
            }
        }
        DType::Q4_1 => {
            let m = get_f16(&b[2..4]);
            for (o, q) in out.iter_mut().zip(unpack_nibbles(&b[4..20])) {
                *o = d * q as f32 + m;
            }
        }
        DType::NF4 => {
            let table = nf4_i8();
            for (o, q) in out.iter_mut().zip(unpack_nibbles(&b[2..18])) {
                *o = d / 127.0 * table[q as usize] as f32;
            }
        }
        DType::F32 | DType::F16 | DType::BF16 => unreachable!("float types are not blocked"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn sample(n: usize) -> Vec<f32> {
        let mut rng = Rng::new(7);
        (0..n).map(|_| rng.normal() as f32 * 0.05).collect()
    }

    /// Blocks that exercise the edges: normal values, a block whose extreme is positive and one
    /// whose extreme is negative (the symmetric formats' clamp), ties, zeros, a constant block.
    fn edge_blocks() -> Vec<f32> {
        let mut x = sample(32 * 64);
        x[32..64]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as f32 * 0.01 - 0.155);
        x[64..96]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = 0.155 - i as f32 * 0.01);
        x[96..128].fill(0.0);
        x[128..160].fill(0.3);
        x
    }

    /// Round-trip error per element within what each format guarantees: half a step, where the
    /// step is the block's stored (f16) scale, plus what rounding the scale to f16 adds for the
    /// element's code; ggml's symmetric formats (Q4_0, Q5_0) put the block's extreme on code 0,
    /// so values of the other sign beyond levels - 0.5 steps clamp to the top code (up to one
    /// step), checked as their own case. A half-step shift of the codes fails this.
    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let x = edge_blocks();
        let f16_rel = 2f32.powi(-11);
        for dtype in DType::ALL {
            let bytes = quantize(dtype, &x).unwrap();
            assert_eq!(bytes.len(), dtype.bytes_for(x.len()).unwrap());
            let y = dequantize(dtype, &bytes, x.len()).unwrap();
            let per_block = dtype.block_bytes();
            for (bi, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let raw = &bytes[bi * 32 / dtype.block_len() * per_block..];
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (&a, &b) in xb.iter().zip(yb) {
                    let (bound, what) = match dtype {
                        DType::F32 => (0.0, "exact"),
                        DType::F16 => (a.abs() * f16_rel, "half an f16 ulp"),
                        DType::BF16 => (a.abs() * 2f32.powi(-8), "half a bf16 ulp"),
                        DType::Q8_0 => {
                            let d = get_f16(raw).abs();
                            (d * (0.5 + 127.0 * f16_rel) * 1.001, "half a step")
                        }
                        DType::Q4_0 | DType::Q5_0 => {
                            let levels = if dtype == DType::Q4_0 { 8.0 } else { 16.0 };
                            let d = get_f16(raw);
                            // x / d in [-levels, levels]; above levels - 0.5 it clamps.
                            if d != 0.0 && a / d > levels - 0.5 {
                                (d.abs() * 1.0 * 1.001, "one step (clamped)")
                            } else {
                                (d.abs() * (0.5 + levels * f16_rel) * 1.001, "half a step")
                            }
                        }
                        DType::Q4_1 => {
                            let (d, m) = (get_f16(raw), get_f16(&raw[2..]));
                            let bound = d * (0.5 + 15.0 * f16_rel) + m.abs() * f16_rel;
                            (bound * 1.001 + 1e-7, "half a step")
                        }
                        DType::NF4 => (0.0, "checked below"),
                    };
                    if dtype == DType::NF4 {
                        continue;
                    }
                    assert!(
                        (a - b).abs() <= bound,
                        "{dtype:?} block {bi}: {a} -> {b}, error {} > {what} ({bound}, amax {amax})",
                        (a - b).abs()
                    );
                }
            }
        }
    }

    /// Fitted scales: the same layout (every block decodes), no block's squared error above the
    /// reference's, and clearly less error overall (on these blocks 13% less for Q4_0, 14% for
    /// Q5_0, 27% for Q8_0); other types are untouched.
    #[test]
    fn fitted_scales_never_lose_to_the_reference() {
        let x = edge_blocks();
        let sq = |a: &[f32], b: &[f32]| -> f64 {
            a.iter().zip(b).map(|(p, q)| ((p - q) as f64).powi(2)).sum()
        };
        for dtype in DType::ALL {
            let reference = quantize(dtype, &x).unwrap();
            let fitted = quantize_with(dtype, &x, Rounding::Fitted).unwrap();
            assert_eq!(fitted.len(), reference.len());
            if symmetric_levels(dtype).is_none() {
                assert_eq!(fitted, reference, "{dtype:?} has no fitted variant");
                continue;
            }
            let (r, f) = (
                dequantize(dtype, &reference, x.len()).unwrap(),
                dequantize(dtype, &fitted, x.len()).unwrap(),
            );
            let (mut total_r, mut total_f) = (0.0, 0.0);
            for ((xb, rb), fb) in x.chunks(32).zip(r.chunks(32)).zip(f.chunks(32)) {
                let (er, ef) = (sq(xb, rb), sq(xb, fb));
                assert!(ef <= er * (1.0 + 1e-9) + 1e-18, "{dtype:?}: {ef} > {er}");
                total_r += er;
                total_f += ef;
            }
            let gain = 1.0 - total_f / total_r;
            let want = if dtype == DType::Q8_0 { 0.2 } else { 0.1 };
            assert!(
                gain > want,
                "{dtype:?}: error only {:.1}% lower",
                gain * 100.0
            );
        }
    }

    /// NF4 against the QLoRA codebook written out here: each value takes the nearest code of
    /// value / absmax, decodes to absmax * round(127 * code value) / 127 (the int8 grid the
    /// kernels use), and the block is ggml-style: f16 absmax, then nibbles j | j + 16 << 4.
    #[test]
    fn nf4_uses_the_qlora_codebook_and_the_ggml_block_layout() {
        // As published (bitsandbytes, QLoRA paper appendix), in f64.
        const QLORA: [f64; 16] = [
            -1.0,
            -0.6961928009986877,
            -0.5250730514526367,
            -0.39491748809814453,
            -0.28444138169288635,
            -0.18477343022823334,
            -0.09105003625154495,
            0.0,
            0.07958029955625534,
            0.16093020141124725,
            0.24611230194568634,
            0.33791524171829224,
            0.44070982933044434,
            0.5626170039176941,
            0.7229568362236023,
            1.0,
        ];
        let qlora = QLORA.map(|v| v as f32);
        assert_eq!(NF4_VALUES, qlora);
        let x = edge_blocks();
        let bytes = quantize(DType::NF4, &x).unwrap();
        let y = dequantize(DType::NF4, &bytes, x.len()).unwrap();
        for (bi, (xb, raw)) in x.chunks(32).zip(bytes.chunks(18)).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(
                get_f16(raw),
                f16::from_f32(amax).to_f32(),
                "block {bi} scale"
            );
            let d = get_f16(raw);
            for (j, &v) in xb.iter().enumerate() {
                let code = if j < 16 {
                    raw[2 + j] & 0x0F
                } else {
                    raw[2 + j - 16] >> 4
                } as usize;
                let t = if amax > 0.0 { v / amax } else { 0.0 };
                let best = (0..16)
                    .map(|c| (qlora[c] - t).abs())
                    .fold(f32::INFINITY, f32::min);
                assert_eq!(
                    (qlora[code] - t).abs(),
                    best,
                    "block {bi} element {j}: code {code}"
                );
                let want = d * (qlora[code] * 127.0).round() / 127.0;
                assert!(
                    (y[bi * 32 + j] - want).abs() <= want.abs() * 1e-6,
                    "block {bi} element {j}"
                );
            }
        }
    }

    #[test]
    fn q8_0_bytes_match_ggml_layout() {
        let mut x = vec![0.0f32; 32];
        x[0] = 1.27;
        x[1] = -0.635;
        let b = quantize(DType::Q8_0, &x).unwrap();
        assert_eq!(b.len(), 34);
        assert_eq!(get_f16(&b[..2]), f16::from_f32(0.01).to_f32());
        assert_eq!(b[2] as i8, 127);
        assert_eq!(b[3] as i8, -64);
    }

    #[test]
    fn bad_sizes_and_names_are_errors() {
        assert!(quantize(DType::Q4_0, &[0.0; 33]).is_err());
        assert!(dequantize(DType::Q4_0, &[0u8; 17], 32).is_err());
        assert!(DType::parse("q3_k").is_err());
        assert_eq!(DType::parse("Q8_0").unwrap(), DType::Q8_0);
        assert!(DType::from_ggml_id(12).is_err());
    }
}
