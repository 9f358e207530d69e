//! The one error type of both plugins, and the one place it becomes a
//! gRPC status.

use tonic::{Code, Status};

/// Result of a plugin operation.
pub type CsiResult<T> = Result<T, CsiError>;

/// Every failure a CSI call can answer with; each variant is one gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsiError {
    /// A missing or malformed argument (INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume, node or other object does not exist (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// The object exists with incompatible properties (ALREADY_EXISTS).
    #[error("{0}")]
    AlreadyExists(String),
    /// The system is not in a state the call needs (FAILED_PRECONDITION).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another call on the same volume is in flight (ABORTED).
    #[error("{0}")]
    Aborted(String),
    /// A size or range the plugin cannot honour (OUT_OF_RANGE).
    #[error("{0}")]
    OutOfRange(String),
    /// Out of space or another resource (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A service the plugin depends on is unreachable (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// Anything else: a bug or an unexpected failure (INTERNAL).
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    /// The gRPC code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            CsiError::InvalidArgument(_) => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::Aborted(_) => Code::Aborted,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::ResourceExhausted(_) => Code::ResourceExhausted,
            CsiError::Unavailable(_) => Code::Unavailable,
            CsiError::Internal(_) => Code::Internal,
        }
    }

    /// Prefixes the message with context, keeping the variant.
    pub fn context(self, what: &str) -> CsiError {
        let wrap = |m: String| format!("{what}: {m}");
        match self {
            CsiError::InvalidArgument(m) => CsiError::InvalidArgument(wrap(m)),
            CsiError::NotFound(m) => CsiError::NotFound(wrap(m)),
            CsiError::AlreadyExists(m) => CsiError::AlreadyExists(wrap(m)),
            CsiError::FailedPrecondition(m) => CsiError::FailedPrecondition(wrap(m)),
            CsiError::Aborted(m) => CsiError::Aborted(wrap(m)),
            CsiError::OutOfRange(m) => CsiError::OutOfRange(wrap(m)),
            CsiError::ResourceExhausted(m) => CsiError::ResourceExhausted(wrap(m)),
            CsiError::Unavailable(m) => CsiError::Unavailable(wrap(m)),
            CsiError::Internal(m) => CsiError::Internal(wrap(m)),
        }
    }
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

/// A status from a service the plugin called (the region service): the
/// code is kept, so NOT_FOUND stays NOT_FOUND. Codes CSI gives no meaning
/// to here (unauthenticated, permission denied, unknown, ...) become
/// UNAVAILABLE or INTERNAL.
impl From<Status> for CsiError {
    fn from(s: Status) -> CsiError {
        let m = format!("region service: {}", s.message());
        match s.code() {
            Code::InvalidArgument => CsiError::InvalidArgument(m),
            Code::NotFound => CsiError::NotFound(m),
            Code::AlreadyExists => CsiError::AlreadyExists(m),
            Code::FailedPrecondition => CsiError::FailedPrecondition(m),
            Code::Aborted => CsiError::Aborted(m),
            Code::OutOfRange => CsiError::OutOfRange(m),
            Code::ResourceExhausted => CsiError::ResourceExhausted(m),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                CsiError::Unavailable(m)
            }
            Code::Unauthenticated | Code::PermissionDenied => {
                CsiError::Unavailable(format!("{m} (credentials refused)"))
            }
            _ => CsiError::Internal(format!("{m} ({})", s.code())),
        }
    }
}

/// An engine error, by kind: a fenced writer cannot go on
/// (FAILED_PRECONDITION: the region belongs to a newer writer), a busy
/// cache is another call's (ABORTED: retry later), an unreachable peer is
/// UNAVAILABLE, I/O failures are INTERNAL.
impl From<r3map::Error> for CsiError {
    fn from(e: r3map::Error) -> CsiError {
        use r3map::ErrorKind as K;
        let m = e.to_string();
        match e.kind() {
            K::NotFound => CsiError::NotFound(m),
            K::AlreadyExists => CsiError::AlreadyExists(m),
            K::InvalidArgument => CsiError::InvalidArgument(m),
            K::FailedPrecondition | K::Fenced => CsiError::FailedPrecondition(m),
            K::OutOfRange => CsiError::OutOfRange(m),
            K::Unavailable => CsiError::Unavailable(m),
            K::Busy => CsiError::Aborted(m),
            K::Io => CsiError::Internal(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_both_ways() {
        let all = [
            (CsiError::InvalidArgument("a".into()), Code::InvalidArgument),
            (CsiError::NotFound("a".into()), Code::NotFound),
            (CsiError::AlreadyExists("a".into()), Code::AlreadyExists),
            (
                CsiError::FailedPrecondition("a".into()),
                Code::FailedPrecondition,
            ),
            (CsiError::Aborted("a".into()), Code::Aborted),
            (CsiError::OutOfRange("a".into()), Code::OutOfRange),
            (
                CsiError::ResourceExhausted("a".into()),
                Code::ResourceExhausted,
            ),
            (CsiError::Unavailable("a".into()), Code::Unavailable),
            (CsiError::Internal("a".into()), Code::Internal),
        ];
        for (e, code) in all {
            let s: Status = e.clone().into();
            assert_eq!(s.code(), code);
            assert_eq!(s.message(), "a");
            // And back: a status from the region service keeps its code.
            assert_eq!(CsiError::from(s).code(), code);
        }
        assert_eq!(
            CsiError::from(Status::unauthenticated("x")).code(),
            Code::Unavailable
        );
        assert_eq!(CsiError::from(Status::unknown("x")).code(), Code::Internal);
    }

    #[test]
    fn engine_kinds() {
        let fenced = r3map::Error::Fenced("epoch 3 < 4".into());
        assert_eq!(CsiError::from(fenced).code(), Code::FailedPrecondition);
        let busy = r3map::Error::Busy("cache locked".into());
        assert_eq!(CsiError::from(busy).code(), Code::Aborted);
        let un = r3map::Error::Unavailable("down".into());
        assert_eq!(CsiError::from(un).code(), Code::Unavailable);
        let nf = r3map::Error::NotFound("region".into());
        assert_eq!(CsiError::from(nf).code(), Code::NotFound);
    }

    #[test]
    fn context_keeps_variant() {
        let e = CsiError::NotFound("no region".into()).context("vol1");
        assert_eq!(e, CsiError::NotFound("vol1: no region".into()));
    }
}
