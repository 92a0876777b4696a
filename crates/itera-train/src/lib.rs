//! Itera-Lite training, on candle: corpora from package registries (`corpora`), token data
//! (`data`), the reference model and its fused ops (`reference`), AdamW (`optim`), the teacher of
//! a distillation run (`distill`), a run's options (`options`), the rules of a
//! new run (`new_run`), the training loop with checkpoints and logs (`trainer`), PNG charts
//! (`plot`), and the process settings training runs under (`process`).

pub mod corpora;
pub mod data;
pub mod distill;
pub mod error;
pub mod new_run;
pub mod optim;
pub mod options;
pub mod plot;
pub mod process;
pub mod reference;
pub mod trainer;

pub use error::{Error, Result};
pub use new_run::NewRun;
pub use trainer::{Run, TrainEvent, TrainOptions};

#[cfg(test)]
pub(crate) mod test_support {
    use itera_core::Tokenizer;

    /// A small tokenizer trained on the committed English fixture.
    pub fn fixture_tokenizer(vocab: usize) -> Tokenizer {
        let f = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/english.txt");
        Tokenizer::train(&[f.display().to_string()], vocab).unwrap()
    }
}
