//! Itera-Lite training, on candle: corpora from package registries (`corpora`), token data
//! (`data`), the reference model and its fused ops (`reference`), AdamW (`optim`), the rules of a
//! new run (`new_run`), the training loop with checkpoints and logs (`trainer`), and PNG charts
//! (`plot`).

pub mod corpora;
pub mod data;
pub mod error;
pub mod new_run;
pub mod optim;
pub mod plot;
pub mod reference;
pub mod trainer;

pub use error::{Error, Result};
pub use new_run::NewRun;
pub use trainer::{Run, TrainEvent, TrainOptions};

#[cfg(test)]
pub(crate) mod test_support {
    use itera_core::Tokenizer;

    /// A small tokenizer trained on a fixed English snippet.
    pub fn fixture_tokenizer(vocab: usize) -> Tokenizer {
        let dir = std::env::temp_dir().join(format!("itera-ttok-{}-{vocab}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("text.txt");
        let text =
            "the cat sat on the mat. <unk> said the dog, héllo wörld — naïve café.\n".repeat(50);
        std::fs::write(&f, text).unwrap();
        Tokenizer::train(&[f.display().to_string()], vocab).unwrap()
    }
}
