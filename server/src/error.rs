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
