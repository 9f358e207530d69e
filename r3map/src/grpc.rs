//! The gRPC boundary: [`Error`] to [`tonic::Status`] and back, in one
//! place, keeping the [`ErrorKind`] (and the errno of an I/O error) across
//! the wire. The kind travels in the `r3map-error-kind` metadata entry, so
//! it survives even where two kinds share a gRPC code (fenced and failed
//! precondition); a status from someone else is classified by its code.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::error::{Error, ErrorKind};

/// Metadata key carrying the [`ErrorKind`] name.
pub const KIND_KEY: &str = "r3map-error-kind";
/// Metadata key carrying the errno of an I/O error.
pub const ERRNO_KEY: &str = "r3map-errno";

/// The gRPC code of a kind.
pub fn code_of(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::FailedPrecondition | ErrorKind::Fenced => Code::FailedPrecondition,
        ErrorKind::OutOfRange => Code::OutOfRange,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Busy => Code::Aborted,
        ErrorKind::Io => Code::Internal,
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let kind = e.kind();
        let errno = e.errno();
        let code = match errno {
            Some(n) if n == nix::errno::Errno::ENOSPC as i32 => Code::ResourceExhausted,
            _ => code_of(kind),
        };
        let mut s = Status::new(code, e.to_string());
        let md = s.metadata_mut();
        md.insert(KIND_KEY, MetadataValue::from_static(kind.as_str()));
        if let Some(n) = errno {
            md.insert(ERRNO_KEY, MetadataValue::from(n));
        }
        s
    }
}

impl From<Status> for Error {
    fn from(s: Status) -> Error {
        let md = s.metadata();
        let kind = md
            .get(KIND_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(ErrorKind::parse);
        let errno = md
            .get(ERRNO_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok());
        if let Some(n) = errno {
            return Error::Io(std::io::Error::from_raw_os_error(n));
        }
        let msg = format!("remote: {}", s.message());
        let kind = kind.unwrap_or(match s.code() {
            Code::NotFound => ErrorKind::NotFound,
            Code::AlreadyExists => ErrorKind::AlreadyExists,
            Code::InvalidArgument => ErrorKind::InvalidArgument,
            Code::FailedPrecondition => ErrorKind::FailedPrecondition,
            Code::OutOfRange => ErrorKind::OutOfRange,
            Code::Aborted => ErrorKind::Busy,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => ErrorKind::Unavailable,
            Code::ResourceExhausted => {
                return Error::Io(std::io::Error::from_raw_os_error(
                    nix::errno::Errno::ENOSPC as i32,
                ))
            }
            // Unknown: how hyper reports a stream cut by a dying peer.
            Code::Unknown => ErrorKind::Unavailable,
            Code::Unauthenticated | Code::PermissionDenied => ErrorKind::InvalidArgument,
            _ => ErrorKind::Io,
        });
        match kind {
            ErrorKind::NotFound => Error::NotFound(msg),
            ErrorKind::AlreadyExists => Error::AlreadyExists(msg),
            ErrorKind::InvalidArgument => Error::InvalidArgument(msg),
            ErrorKind::FailedPrecondition => Error::FailedPrecondition(msg),
            // The range itself is not on the wire; the message says it.
            ErrorKind::OutOfRange => Error::Range(msg),
            ErrorKind::Unavailable => Error::Unavailable(msg),
            ErrorKind::Fenced => Error::Fenced(msg),
            ErrorKind::Busy => Error::Busy(msg),
            ErrorKind::Io => Error::io(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn across(e: Error) -> Error {
        Error::from(Status::from(e))
    }

    #[test]
    fn kinds_survive_the_wire() {
        let cases = [
            Error::NotFound("r1".into()),
            Error::AlreadyExists("r1".into()),
            Error::InvalidArgument("x".into()),
            Error::FailedPrecondition("x".into()),
            Error::OutOfRange {
                offset: 1,
                len: 2,
                size: 2,
            },
            Error::Unavailable("x".into()),
            Error::Fenced("epoch 3 < 4".into()),
            Error::Busy("x".into()),
            Error::io("x"),
        ];
        for e in cases {
            let k = e.kind();
            let back = across(e);
            assert_eq!(back.kind(), k, "{back}");
        }
        // Fenced and failed precondition share a code but not a kind.
        assert_eq!(
            Status::from(Error::Fenced("x".into())).code(),
            Code::FailedPrecondition
        );
    }

    #[test]
    fn errno_survives_the_wire() {
        let enospc = nix::errno::Errno::ENOSPC as i32;
        let s = Status::from(Error::Io(std::io::Error::from_raw_os_error(enospc)));
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(Error::from(s).errno(), Some(enospc));
        let eio = nix::errno::Errno::EIO as i32;
        let back = across(Error::Io(std::io::Error::from_raw_os_error(eio)));
        assert_eq!(back.errno(), Some(eio));
    }

    #[test]
    fn foreign_statuses_by_code() {
        let k = |c: Code| Error::from(Status::new(c, "m")).kind();
        assert_eq!(k(Code::NotFound), ErrorKind::NotFound);
        assert_eq!(k(Code::Unavailable), ErrorKind::Unavailable);
        assert_eq!(k(Code::AlreadyExists), ErrorKind::AlreadyExists);
        assert_eq!(k(Code::Internal), ErrorKind::Io);
        assert_eq!(k(Code::FailedPrecondition), ErrorKind::FailedPrecondition);
        let enospc = nix::errno::Errno::ENOSPC as i32;
        assert_eq!(
            Error::from(Status::resource_exhausted("full")).errno(),
            Some(enospc)
        );
    }
}
