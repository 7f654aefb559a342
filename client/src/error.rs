//! The client's error type.

use tonic::Code;

/// Everything that can go wrong when talking to a denoised server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The connection could not be established or broke down.
    #[error("transport error: {0}")]
    Transport(#[from] tonic::transport::Error),

    /// The server answered with a gRPC status other than OK.
    #[error("server returned {code:?}: {message}")]
    Status {
        /// The gRPC status code, e.g. `NotFound` for an unknown session id.
        code: Code,
        /// The server's message.
        message: String,
    },

    /// A request was rejected on the client side before being sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A Generate stream ended cleanly without its `Completed` event.
    #[error("generation stream ended without a Completed event (after {steps_seen} step events)")]
    IncompleteStream {
        /// How many `Step` events had arrived before the end.
        steps_seen: u32,
    },

    /// The server sent a message that violates the API contract (e.g. a missing required field).
    #[error("protocol error: {0}")]
    Protocol(String),

    /// Decoding or encoding an image failed.
    #[error("image error: {0}")]
    Image(#[from] image::ImageError),

    /// Writing a file failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The gRPC status code of this error.
    ///
    /// Server statuses keep their code; local errors map to the code a gRPC library would use
    /// for them: transport failures are `Unavailable`, client-side validation is
    /// `InvalidArgument`, contract violations (including a stream without `Completed`) are
    /// `Internal`, and local image/I/O failures are `Unknown`.
    pub fn code(&self) -> Code {
        match self {
            Error::Status { code, .. } => *code,
            Error::Transport(_) => Code::Unavailable,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::IncompleteStream { .. } | Error::Protocol(_) => Code::Internal,
            Error::Image(_) | Error::Io(_) => Code::Unknown,
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Error::Protocol(message.into())
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        // tonic reports its own client-side deadline as CANCELLED; gRPC says DEADLINE_EXCEEDED.
        let mut source = std::error::Error::source(&status);
        while let Some(err) = source {
            if err.is::<tonic::TimeoutExpired>() {
                return Error::Status {
                    code: Code::DeadlineExceeded,
                    message: format!("deadline exceeded ({})", status.message()),
                };
            }
            source = err.source();
        }
        Error::Status {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_code_is_preserved() {
        let err = Error::from(tonic::Status::not_found("no session abc"));
        assert_eq!(err.code(), Code::NotFound);
        assert_eq!(err.to_string(), "server returned NotFound: no session abc");
    }

    #[test]
    fn local_errors_map_to_codes() {
        assert_eq!(Error::invalid("x").code(), Code::InvalidArgument);
        assert_eq!(
            Error::IncompleteStream { steps_seen: 3 }.code(),
            Code::Internal
        );
        assert_eq!(Error::protocol("x").code(), Code::Internal);
    }
}
