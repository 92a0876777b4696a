//! Python tools for tests that check our files and servers with independent implementations
//! (gguf-py, onnxruntime, the openai client): a virtual environment per package set under the
//! test target's temporary folder, created by the test itself from PyPI on first use. Shared by
//! several crates' tests through `#[path]`, so every test installs what it needs the same way.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `python` of a venv holding `packages` (pip requirement strings), created if needed.
/// Concurrent callers race safely: each builds in its own folder and the first rename wins.
pub fn venv(name: &str, packages: &[&str]) -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python");
    let dir = root.join(name);
    let python = dir.join("bin/python");
    if python.is_file() {
        return python;
    }
    std::fs::create_dir_all(&root).unwrap();
    let tmp = root.join(format!("{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let st = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&tmp)
        .status()
        .expect("python3 runs (these tests need Python 3 with venv and pip)");
    assert!(st.success(), "python3 -m venv failed");
    let out = Command::new(tmp.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(packages)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pip install {packages:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another test finished first; use theirs.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    python
}

/// Runs `script` with the venv's python and `args`; panics with its stderr on failure, returns
/// its stdout.
pub fn run(python: &Path, script: &str, args: &[&str]) -> String {
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
