//! safetensors files (the `safetensors` crate): named f32 tensors in and out (checkpoints,
//! optimizer state, saved recurrent state), and a `TensorSource` that packs f32 / f16 / bf16
//! tensors straight into the runtime's matrices without an f32 copy of the whole model.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::format::dtype::DType;
use crate::kernels::Matrix;
use crate::runtime::TensorSource;
use crate::tensors::{HostTensor, Spec};

/// Parses safetensors bytes (errors name `origin`).
pub fn parse<'a>(bytes: &'a [u8], origin: &Path) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| {
        Error::file(
            origin,
            format!("not a readable safetensors file (truncated or corrupt?): {e}"),
        )
    })
}

/// Every tensor of a safetensors file as f32 (f16 and bf16 are widened), with its metadata.
pub fn read(path: &Path) -> Result<(BTreeMap<String, HostTensor>, HashMap<String, String>)> {
    let bytes = crate::format::read_file(path)?;
    let st = parse(&bytes, path)?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::file(path, e))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dtype = storage_dtype(view.dtype()).ok_or_else(|| Error::Tensor {
            name: name.clone(),
            message: format!("{}: unsupported dtype {:?}", path.display(), view.dtype()),
        })?;
        let n: usize = view.shape().iter().product();
        let values = crate::format::dtype::dequantize(dtype, view.data(), n)?;
        out.insert(name, HostTensor::new(view.shape().to_vec(), values));
    }
    Ok((out, metadata))
}

/// Writes f32 tensors (and string metadata) as one safetensors file, atomically.
pub fn write(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes: Vec<(&str, Vec<u8>, &[usize])> = tensors
        .iter()
        .map(|(k, t)| {
            let b = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (k.as_str(), b, t.shape.as_slice())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, b, shape)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.to_vec(), b)
                .map(|v| (*k, v))
                .map_err(|e| Error::file(path, e))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = (!metadata.is_empty()).then_some(metadata);
    let out = safetensors::serialize(views, meta).map_err(|e| Error::file(path, e))?;
    crate::format::write_atomic(path, &out)
}

fn storage_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// Tensors straight from safetensors bytes (f32, f16 or bf16) into the runtime's packed form.
pub struct SafetensorsSource<'a>(pub SafeTensors<'a>);

impl TensorSource for SafetensorsSource<'_> {
    fn matrix(&self, spec: &Spec) -> Result<Matrix> {
        let err = |message: String| Error::Tensor {
            name: spec.name.clone(),
            message,
        };
        let t = self
            .0
            .tensor(&spec.name)
            .map_err(|_| err("missing".into()))?;
        if t.shape() != spec.shape.as_slice() {
            return Err(err(format!(
                "shape {:?}, expected {:?}",
                t.shape(),
                spec.shape
            )));
        }
        let dtype = storage_dtype(t.dtype())
            .ok_or_else(|| err(format!("unsupported dtype {:?}", t.dtype())))?;
        let (rows, cols) = spec.rows_cols();
        Matrix::from_ggml(dtype, rows, cols, t.data()).map_err(|e| err(e.to_string()))
    }
}
