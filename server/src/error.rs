//! Service errors and their one mapping to gRPC statuses.
use tonic::{Code, Status};

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

    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::SessionNotFound(_) | Self::ModelNotFound(_) => Code::NotFound,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Cancelled => Code::Cancelled,
            Self::EngineStopped => Code::Unavailable,
            // Input the model rejects (e.g. a prompt the tokenizer cannot take) is the caller's.
            Self::Model(ModelError::InvalidInput { .. }) => Code::InvalidArgument,
            Self::Model(_) | Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let message = match &e {
            // Name the field the way the request spells it.
            ServiceError::Model(ModelError::InvalidInput { field, message }) => {
                format!("invalid `{field}`: {message}")
            }
            other => other.to_string(),
        };
        Status::new(e.code(), message)
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_to_codes_and_names_the_field() {
        let s: Status = ServiceError::invalid("width", "must be at least 16").into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("`width`"));
        let s: Status = ServiceError::SessionNotFound("abc".into()).into();
        assert_eq!(s.code(), Code::NotFound);
        let s: Status = ServiceError::Model(ModelError::invalid_input("prompt", "too long")).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("`prompt`"));
    }
}
