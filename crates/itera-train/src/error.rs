//! Errors of corpus preparation and training; messages name the file or setting at fault.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("data: {0}")]
    Data(String),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("training: {0}")]
    Train(String),
    #[error(transparent)]
    Core(#[from] itera_core::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn file(path: impl AsRef<std::path::Path>, message: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.as_ref().display().to_string(),
            message: message.to_string(),
        }
    }
}
