//! Typed errors of the core. Every variant carries the context a user needs to act:
//! the file, the unit, the byte range and the numbers involved.

use std::path::PathBuf;

/// Result alias used throughout the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error, with the file and range it happened on.
    #[error("I/O error on {path} ({op} at offset {offset}, {len} bytes{unit}): {source}", unit = unit_suffix(.unit))]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done ("open", "pread", "write", ...).
        op: &'static str,
        /// Byte offset in the file.
        offset: u64,
        /// Length of the operation in bytes.
        len: u64,
        /// The unit being read, when known.
        unit: Option<String>,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Data whose checksum does not match the one recorded in the manifest.
    #[error("checksum mismatch in unit '{unit}'{tensor} of {path} (bytes {offset}..{end}): expected {expected:016x}, got {actual:016x}; the store is corrupted, delete it to rebuild", end = .offset + .len, tensor = tensor_suffix(.tensor))]
    Checksum {
        /// The store file.
        path: PathBuf,
        /// The unit whose data is corrupted.
        unit: String,
        /// The tensor whose bytes do not match its own digest, when the unit's checksum
        /// matched but a tensor's did not (names or dtypes changed in the manifest).
        tensor: Option<String>,
        /// Offset of the unit in the file; for a tensor, the unit's offset plus the
        /// tensor's offset in the unit's raw bytes.
        offset: u64,
        /// Length of the unit in bytes; for a tensor, the tensor's.
        len: u64,
        /// Checksum recorded in the manifest.
        expected: u64,
        /// Checksum of the bytes read.
        actual: u64,
    },
    /// A file that is not a valid store or checkpoint (bad magic, version, ranges, manifest).
    #[error("invalid {kind} {path}: {reason}")]
    Format {
        /// "store" or "safetensors checkpoint".
        kind: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong, with the numbers involved.
        reason: String,
    },
    /// A store that was written for another model.
    #[error("store {path} was written for another model: its fingerprint is {found}, this model's is {expected}")]
    FingerprintMismatch {
        /// The store file.
        path: PathBuf,
        /// Fingerprint of the model being offloaded.
        expected: String,
        /// Fingerprint recorded in the store.
        found: String,
    },
    /// A budget that cannot hold what it must.
    #[error("budget of {budget} bytes cannot work: {reason}")]
    Budget {
        /// The budget in bytes.
        budget: u64,
        /// Why, with the numbers.
        reason: String,
    },
    /// A request that was cancelled before it completed.
    #[error("request for unit '{unit}' was cancelled")]
    Cancelled {
        /// The unit of the cancelled request.
        unit: String,
    },
    /// A caller error: a bad argument (unknown unit, buffer too small, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

fn tensor_suffix(tensor: &Option<String>) -> String {
    match tensor {
        Some(t) => format!(", tensor '{t}'"),
        None => String::new(),
    }
}

fn unit_suffix(unit: &Option<String>) -> String {
    match unit {
        Some(u) => format!(", unit '{u}'"),
        None => String::new(),
    }
}

impl Error {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        op: &'static str,
        offset: u64,
        len: u64,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            path: path.into(),
            op,
            offset,
            len,
            unit: None,
            source,
        }
    }

    pub(crate) fn format(
        kind: &'static str,
        path: impl Into<PathBuf>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Format {
            kind,
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// A copy of this error, for reporting one failure to several waiters.
    pub fn duplicate(&self) -> Self {
        match self {
            Error::Io {
                path,
                op,
                offset,
                len,
                unit,
                source,
            } => Error::Io {
                path: path.clone(),
                op,
                offset: *offset,
                len: *len,
                unit: unit.clone(),
                source: match source.raw_os_error() {
                    Some(code) => std::io::Error::from_raw_os_error(code),
                    None => std::io::Error::new(source.kind(), source.to_string()),
                },
            },
            Error::Checksum {
                path,
                unit,
                tensor,
                offset,
                len,
                expected,
                actual,
            } => Error::Checksum {
                path: path.clone(),
                unit: unit.clone(),
                tensor: tensor.clone(),
                offset: *offset,
                len: *len,
                expected: *expected,
                actual: *actual,
            },
            Error::Format { kind, path, reason } => Error::Format {
                kind,
                path: path.clone(),
                reason: reason.clone(),
            },
            Error::FingerprintMismatch {
                path,
                expected,
                found,
            } => Error::FingerprintMismatch {
                path: path.clone(),
                expected: expected.clone(),
                found: found.clone(),
            },
            Error::Budget { budget, reason } => Error::Budget {
                budget: *budget,
                reason: reason.clone(),
            },
            Error::Cancelled { unit } => Error::Cancelled { unit: unit.clone() },
            Error::InvalidArgument(s) => Error::InvalidArgument(s.clone()),
        }
    }

    /// Attach the unit name to an I/O error that does not carry one yet.
    pub(crate) fn with_unit(mut self, name: &str) -> Self {
        if let Error::Io { unit, .. } = &mut self {
            if unit.is_none() {
                *unit = Some(name.to_string());
            }
        }
        self
    }
}
