//! The command line's errors: arguments the CLI cannot run with, and the library's errors
//! (devices, the allocator, files) passed through with their own words.

use accelrt::{AllocError, DeviceError, FormatError};

/// Why a command failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CliError {
    /// An option's value or a combination of options the command cannot run with.
    #[error("invalid argument: {0}")]
    Argument(String),

    /// A `--config` value (or a recorded configuration) the command cannot use.
    #[error("invalid allocator configuration: {0}")]
    Config(String),

    /// What the library reported: a device, the allocator, a file.
    #[error(transparent)]
    Accelrt(#[from] accelrt::Error),
}

impl CliError {
    /// True when the allocator ran out of memory.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, CliError::Accelrt(e) if e.is_out_of_memory())
    }
}

impl From<AllocError> for CliError {
    fn from(e: AllocError) -> Self {
        CliError::Accelrt(e.into())
    }
}

impl From<DeviceError> for CliError {
    fn from(e: DeviceError) -> Self {
        CliError::Accelrt(e.into())
    }
}

impl From<FormatError> for CliError {
    fn from(e: FormatError) -> Self {
        CliError::Accelrt(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argument_errors_keep_their_words_and_library_errors_theirs() {
        assert_eq!(
            CliError::Argument("--threads must be at least 1".into()).to_string(),
            "invalid argument: --threads must be at least 1"
        );
        let parse = FormatError::Parse {
            file: "t.trace".into(),
            line: 4,
            message: "bad".into(),
        };
        let e = CliError::from(parse.clone());
        assert_eq!(e.to_string(), parse.to_string());
        assert_eq!(e, CliError::Accelrt(accelrt::Error::Format(parse)));
    }
}
