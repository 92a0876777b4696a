//! Regression test of the shipped default model: its bits per byte on a held-out English fixture
//! (text from the held-out 2% of each training source, never trained on) must not get worse.

use std::path::Path;

use itera_core::eval::evaluate;
use itera_core::{ModelDir, Runtime};

/// Measured with `itera eval --data tests/fixtures/heldout-english.txt` when the model shipped
/// (MEASURED_BPB), plus a small margin for floating-point differences across machines.
const MEASURED_BPB: f64 = 1.5638;
const MARGIN: f64 = 0.01;

#[test]
fn shipped_model_bits_per_byte_on_heldout_fixture() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model =
        ModelDir::load(&root.join("models/itera-lite-tiny")).expect("the shipped model loads");
    assert!(model.weights.parameter_count() <= 2_000_000);
    let text = std::fs::read_to_string(root.join("tests/fixtures/heldout-english.txt")).unwrap();
    assert!(text.len() <= 50_000);
    let runtime = Runtime::new(&model.config, &model.weights).unwrap();
    let report = evaluate(&runtime, &model.tokenizer, &text, |_, _| {}).unwrap();
    assert!(
        report.bits_per_byte <= MEASURED_BPB + MARGIN,
        "bits per byte {} is worse than the shipped {MEASURED_BPB}",
        report.bits_per_byte
    );
    // And it is a real language model, far better than the 8 bits of a uniform byte.
    assert!(report.bits_per_byte < 2.5);
}
