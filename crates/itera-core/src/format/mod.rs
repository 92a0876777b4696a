//! Files: storage formats of weights (`dtype`: f32, f16, bf16 and ggml's block layouts), GGUF
//! (`gguf`, our own reader and writer), safetensors (`safetensors`), and the model directory
//! (`model_dir`: the one loader every command goes through). Every write goes to a temporary
//! name first and is renamed into place, so readers never see half a file.

pub mod dtype;
pub mod gguf;
pub mod model_dir;
pub mod safetensors;
pub mod state_file;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` via a temporary sibling and a rename (creating the parent directory
/// if needed), so readers never see half a file and a failed write leaves the old one intact.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    }
    let tmp = tmp_name(path);
    if let Err(e) = std::fs::write(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::file(path, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::file(path, e)
    })
}

fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Reads a whole file, refusing anything but a regular file (a FIFO or device in place of a
/// model file would block forever or never end).
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::file(path, e))?;
    if !meta.is_file() {
        return Err(Error::file(
            path,
            "is not a regular file (a directory, FIFO or device cannot be read as a model file)",
        ));
    }
    std::fs::read(path).map_err(|e| Error::file(path, e))
}

/// `read_file` as UTF-8 text.
pub fn read_text_file(path: &Path) -> Result<String> {
    String::from_utf8(read_file(path)?)
        .map_err(|e| Error::file(path, format!("not valid UTF-8 ({e})")))
}
