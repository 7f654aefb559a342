//! Errors raised while loading or running a model. Every variant names the file and the key or
//! tensor involved, so a broken model folder is diagnosed from the message alone.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: config key `{key}`: {message}", path.display())]
    Config {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{}: unknown `_class_name` `{class}` (expected {expected})", path.display())]
    UnknownClass {
        path: PathBuf,
        class: String,
        expected: String,
    },
    #[error("{}: missing tensor `{name}`", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: tensor `{name}` has shape {actual:?}, expected {expected:?}", path.display())]
    TensorShape {
        path: PathBuf,
        name: String,
        actual: Vec<i64>,
        expected: Vec<i64>,
    },
    #[error("{}: tensor `{name}`: {message}", path.display())]
    TensorData {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error("{}: tokenizer: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    #[error("invalid input `{field}`: {message}")]
    InvalidInput { field: String, message: String },
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl ModelError {
    pub fn config(path: impl Into<PathBuf>, key: &str, message: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    pub fn invalid_input(field: &str, message: impl Into<String>) -> Self {
        Self::InvalidInput {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
