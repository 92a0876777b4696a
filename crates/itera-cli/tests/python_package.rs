//! The Python package end to end: builds the wheel from `crates/itera-py` (`pip install`, with
//! maturin from PyPI, into a test venv) and runs its pytest suite against the shipped model and
//! this build's `itera` binary.

#[path = "../../../tests/support/python.rs"]
mod python;

use std::path::Path;
use std::process::Command;

#[test]
fn the_python_package_builds_and_passes_its_tests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let py = python::venv("itera-py", &["maturin>=1.16,<2", "pytest>=8", "numpy<3"]);
    // Built against this checkout every time (the wheel reuses the workspace's target folder);
    // the build backend finds `maturin` on PATH.
    let bin = py.parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(&py)
        .env("PATH", &path)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-build-isolation",
            "--force-reinstall",
            "--no-deps",
        ])
        .arg(root.join("crates/itera-py"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pip install ./crates/itera-py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&py)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(root.join("crates/itera-py/tests"))
        .env("ITERA_MODEL", root.join("models/itera-lite-tiny"))
        .env("ITERA_BIN", env!("CARGO_BIN_EXE_itera"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pytest failed:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains(" passed"), "{report}");
}
