//! Itera-Lite training side: corpora from package registries, token data, the trainer.

pub mod corpora;
pub mod data;
pub mod error;
pub mod optim;
pub mod plot;
pub mod rdata;
pub mod trainer;

pub use error::{Error, Result};
pub use trainer::{Run, TrainEvent, TrainOptions};
