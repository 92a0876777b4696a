//! Shared by the CLI's end-to-end tests: running the binary, and a micro model trained once per
//! test binary from the committed fixture.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub fn itera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_itera"))
        .args(args)
        .output()
        .expect("binary runs")
}

pub fn ok(args: &[&str]) -> String {
    let out = itera(args);
    assert!(
        out.status.success(),
        "itera {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns its error message.
pub fn fails(args: &[&str]) -> String {
    let out = itera(args);
    assert!(!out.status.success(), "itera {args:?} should have failed");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "itera {args:?} panicked: {err}");
    err
}

pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/english.txt")
}

pub fn tmp() -> PathBuf {
    let d = std::env::temp_dir().join(format!("itera-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A micro model trained for a few steps, shared by the tests of this file.
pub fn model() -> &'static PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = tmp();
        let tok = dir.join("tok.json");
        let run = dir.join("run");
        let _ = std::fs::remove_dir_all(&run);
        let f = fixture();
        ok(&[
            "tokenizer",
            "train",
            "--data",
            f.to_str().unwrap(),
            "--vocab",
            "400",
            "--out",
            tok.to_str().unwrap(),
        ]);
        let out = ok(&[
            "train",
            "--preset",
            "micro",
            "--data",
            f.to_str().unwrap(),
            "--tokenizer",
            tok.to_str().unwrap(),
            "--steps",
            "12",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--warmup",
            "2",
            "--eval-every",
            "6",
            "--eval-windows",
            "8",
            "--holdout",
            "0.1",
            "--run",
            run.to_str().unwrap(),
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["step"], 12);
        assert!(run.join("metrics.jsonl").is_file() && run.join("loss.png").is_file());
        run.join("checkpoint")
    })
}
