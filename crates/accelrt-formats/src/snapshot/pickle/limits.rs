//! What reading a pickle may fail with, and the caps on what it may build.

/// Why a pickle could not be read: the byte offset of the opcode and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickleError {
    /// Offset of the opcode (or of the end of the data) in the input.
    pub offset: usize,
    /// What was wrong, and what was expected.
    pub message: String,
    /// Which kind of fault it is (callers word their advice by it).
    pub fault: PickleFault,
}

/// The kinds of [`PickleError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickleFault {
    /// Not a well-formed pickle: truncated, corrupt, or not a pickle at all.
    Malformed,
    /// A well-formed opcode refused on purpose: it would import a Python callable, call one,
    /// or build an object (`GLOBAL`, `REDUCE`, `NEWOBJ`, ...), which a memory snapshot never
    /// needs and which `pickle.load` would run code for.
    Refused,
    /// A well-formed opcode outside the subset snapshots use (bytes, sets, protocol 0/1 text
    /// opcodes).
    Unsupported,
    /// A resource limit of [`PickleLimits`] was reached; the message names it and how to
    /// raise it.
    Limit,
}

/// Caps on what reading one pickle may build, so that memory follows these limits and not
/// the input: a small file of nested empty lists would otherwise cost about 90 bytes of
/// memory per input byte. The defaults hold any real memory snapshot with room to spare; each
/// can be raised with its environment variable (read by [`PickleLimits::from_env`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PickleLimits {
    /// Values created (each push: scalars, strings, containers, memo references) plus memo
    /// entries; each costs up to about 70 bytes. Default 10,000,000 (under 700 MiB).
    pub max_objects: u64,
    /// Containers nested inside each other, and MARKs open at once. Default 512 (real
    /// snapshots nest about 6 deep).
    pub max_depth: u32,
    /// Bytes of one string. Default 1 MiB (real snapshots hold names and paths).
    pub max_string_bytes: u64,
}

/// Environment variable raising [`PickleLimits::max_objects`].
pub const MAX_OBJECTS_ENV: &str = "ACCELRT_PICKLE_MAX_OBJECTS";
/// Environment variable raising [`PickleLimits::max_depth`].
pub const MAX_DEPTH_ENV: &str = "ACCELRT_PICKLE_MAX_DEPTH";
/// Environment variable raising [`PickleLimits::max_string_bytes`].
pub const MAX_STRING_ENV: &str = "ACCELRT_PICKLE_MAX_STRING_BYTES";

impl Default for PickleLimits {
    fn default() -> Self {
        PickleLimits {
            max_objects: 10_000_000,
            max_depth: 512,
            max_string_bytes: 1 << 20,
        }
    }
}

impl PickleLimits {
    /// The defaults, with any of [`MAX_OBJECTS_ENV`], [`MAX_DEPTH_ENV`] and
    /// [`MAX_STRING_ENV`] that is set taking their place. A value that is not a positive
    /// integer is an error naming the variable.
    pub fn from_env() -> Result<PickleLimits, String> {
        fn read(name: &str, default: u64) -> Result<u64, String> {
            match std::env::var(name) {
                Err(std::env::VarError::NotPresent) => Ok(default),
                Err(std::env::VarError::NotUnicode(v)) => {
                    Err(format!("{name}={v:?} is not a positive integer"))
                }
                Ok(v) => match v.trim().replace('_', "").parse::<u64>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(format!(
                        "{name}={v:?} is not a positive integer (the default is {default})"
                    )),
                },
            }
        }
        let d = PickleLimits::default();
        Ok(PickleLimits {
            max_objects: read(MAX_OBJECTS_ENV, d.max_objects)?,
            max_depth: u32::try_from(read(MAX_DEPTH_ENV, d.max_depth.into())?)
                .map_err(|_| format!("{MAX_DEPTH_ENV} is over {}", u32::MAX))?,
            max_string_bytes: read(MAX_STRING_ENV, d.max_string_bytes)?,
        })
    }
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "byte {}: {}", self.offset, self.message)
    }
}

impl std::error::Error for PickleError {}
