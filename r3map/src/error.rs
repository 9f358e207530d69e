//! The engine's one error type, and the kinds a caller must tell apart.
//!
//! Every layer (backends, the region service and its client, managed
//! mounts, migration) returns [`Error`]; [`Error::kind`] says what the
//! caller can do about it (retry, give up, report "not found" ...). The
//! kind survives the gRPC boundary in both directions ([`crate::grpc`]), so
//! a CSI plugin maps kinds to CSI codes in one place.

use std::io;

/// What a caller must tell apart; see [`Error::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The named region, volume, cache or migration does not exist.
    NotFound,
    /// It exists already, in a way that conflicts with the request.
    AlreadyExists,
    /// The request or configuration is wrong; retrying will not help.
    InvalidArgument,
    /// The request is well formed but the state does not allow it (a cache
    /// that holds data but no state file, a finalize before track ...).
    FailedPrecondition,
    /// A byte range outside the region.
    OutOfRange,
    /// A peer is unreachable or went away; retrying later may succeed.
    Unavailable,
    /// The region now belongs to a newer writer (a higher epoch): this
    /// writer must stop writing. See `docs/fencing.md`.
    Fenced,
    /// Held by someone else right now (a cache locked by another process).
    Busy,
    /// Any other I/O failure; [`Error::errno`] has the errno when known.
    Io,
}

impl ErrorKind {
    /// Stable lower-case name, also the value carried across gRPC.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::FailedPrecondition => "failed_precondition",
            ErrorKind::OutOfRange => "out_of_range",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Fenced => "fenced",
            ErrorKind::Busy => "busy",
            ErrorKind::Io => "io",
        }
    }

    /// Inverse of [`ErrorKind::as_str`].
    pub fn parse(s: &str) -> Option<ErrorKind> {
        use ErrorKind::*;
        [
            NotFound,
            AlreadyExists,
            InvalidArgument,
            FailedPrecondition,
            OutOfRange,
            Unavailable,
            Fenced,
            Busy,
            Io,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// The engine's error; see the module docs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A byte range outside the region.
    #[error("range {offset}+{len} is outside the region of {size} bytes")]
    OutOfRange {
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// Size of the region.
        size: u64,
    },
    /// A byte range outside the region, as reported by a peer.
    #[error("out of range: {0}")]
    Range(String),
    /// A backend URI that cannot be used.
    #[error("invalid backend {uri:?}: {reason}")]
    InvalidUri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A wrong request or configuration.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The state does not allow the request.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// Something named does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// Something named exists already, differently.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// A peer is unreachable; worth retrying.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// This writer's epoch is older than the region's: it must stop.
    #[error("fenced: {0}")]
    Fenced(String),
    /// Held by someone else.
    #[error("busy: {0}")]
    Busy(String),
    /// An I/O error, with its errno when the OS gave one.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// An error of the redis client.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::OutOfRange { .. } | Error::Range(_) => ErrorKind::OutOfRange,
            Error::InvalidUri { .. } | Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::Unavailable(_) => ErrorKind::Unavailable,
            Error::Fenced(_) => ErrorKind::Fenced,
            Error::Busy(_) => ErrorKind::Busy,
            Error::Io(e) => match e.kind() {
                io::ErrorKind::ConnectionRefused
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::NotConnected
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::TimedOut => ErrorKind::Unavailable,
                _ => ErrorKind::Io,
            },
            Error::Redis(e) => {
                if e.is_connection_refusal() || e.is_connection_dropped() || e.is_timeout() {
                    ErrorKind::Unavailable
                } else {
                    ErrorKind::Io
                }
            }
        }
    }

    /// The OS errno behind an I/O error, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io(e) => e.raw_os_error(),
            _ => None,
        }
    }

    /// An [`ErrorKind::Io`] error with a message and no errno.
    pub fn io(msg: impl Into<String>) -> Error {
        Error::Io(io::Error::other(msg.into()))
    }

    /// The same kind with `context: ` in front of the message (an I/O
    /// error with an errno is returned as it is, errno kept).
    pub fn context(self, context: impl std::fmt::Display) -> Error {
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("{context}: {m}")),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(format!("{context}: {m}")),
            Error::NotFound(m) => Error::NotFound(format!("{context}: {m}")),
            Error::AlreadyExists(m) => Error::AlreadyExists(format!("{context}: {m}")),
            Error::Unavailable(m) => Error::Unavailable(format!("{context}: {m}")),
            Error::Fenced(m) => Error::Fenced(format!("{context}: {m}")),
            Error::Busy(m) => Error::Busy(format!("{context}: {m}")),
            // An errno says more to the NBD client than the context would.
            Error::Io(e) if e.raw_os_error().is_some() => Error::Io(e),
            Error::Io(e) => Error::Io(io::Error::new(e.kind(), format!("{context}: {e}"))),
            other => other,
        }
    }
}

/// `Result` with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_by_name() {
        for k in [
            ErrorKind::NotFound,
            ErrorKind::AlreadyExists,
            ErrorKind::InvalidArgument,
            ErrorKind::FailedPrecondition,
            ErrorKind::OutOfRange,
            ErrorKind::Unavailable,
            ErrorKind::Fenced,
            ErrorKind::Busy,
            ErrorKind::Io,
        ] {
            assert_eq!(ErrorKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(ErrorKind::parse("nope"), None);
    }

    #[test]
    fn io_kinds() {
        let refused = Error::Io(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(refused.kind(), ErrorKind::Unavailable);
        let enospc = Error::Io(io::Error::from_raw_os_error(libc_enospc()));
        assert_eq!(enospc.kind(), ErrorKind::Io);
        assert_eq!(enospc.errno(), Some(libc_enospc()));
        let c = enospc.context("pushing chunk 3");
        assert_eq!(c.errno(), Some(libc_enospc()), "context keeps the errno");
        let c = Error::io("short read").context("chunk 3");
        assert_eq!(c.kind(), ErrorKind::Io);
        assert!(c.to_string().contains("chunk 3: short read"), "{c}");
        let c = Error::NotFound("vol1".into()).context("region");
        assert_eq!(c.kind(), ErrorKind::NotFound);
    }

    fn libc_enospc() -> i32 {
        nix::errno::Errno::ENOSPC as i32
    }
}
