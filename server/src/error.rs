//! Service errors. Their one mapping to gRPC statuses is in `api/convert`.
use crate::models::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A request field is missing or out of range; `field` is the proto field path.
    #[error("invalid `{field}`: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("session `{0}` not found")]
    SessionNotFound(String),
    #[error("model `{0}` not found")]
    ModelNotFound(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("generation cancelled")]
    Cancelled,
    #[error("the inference engine has stopped")]
    EngineStopped,
    /// The server is draining: retry on another replica.
    #[error("the server is shutting down; retry on another replica")]
    ShuttingDown,
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("model error: {0}")]
    Model(#[from] ModelError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;

/// Longest client value an error message repeats.
pub const MAX_ECHO_CHARS: usize = 64;

/// A client-supplied value as error messages repeat it: at most [`MAX_ECHO_CHARS`] characters,
/// so that a huge id or name cannot make the status itself too large to send.
pub fn echo(value: &str) -> String {
    match value.char_indices().nth(MAX_ECHO_CHARS) {
        None => value.to_owned(),
        Some((cut, _)) => format!("{}… ({} bytes)", &value[..cut], value.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_values_are_truncated_on_a_char_boundary() {
        assert_eq!(echo("abc"), "abc");
        let long = "é".repeat(100_000);
        let e = echo(&long);
        assert!(e.starts_with(&"é".repeat(MAX_ECHO_CHARS)));
        assert!(e.ends_with("… (200000 bytes)"), "{e}");
    }
}
