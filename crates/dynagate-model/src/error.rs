use thiserror::Error;

/// Why a command was refused. Every refusal names what is wrong and changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ModelError {
    /// The input is malformed or out of range (HTTP 400). `field` names the culprit.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The thing addressed does not exist (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The change is well-formed but would break something (HTTP 409).
    #[error("{0}")]
    Conflict(String),
}

impl ModelError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ModelError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The HTTP status an API should answer with.
    pub fn status(&self) -> u16 {
        match self {
            ModelError::Invalid { .. } => 400,
            ModelError::NotFound(_) => 404,
            ModelError::Conflict(_) => 409,
        }
    }
}
