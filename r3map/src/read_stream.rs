//! A server-streaming gRPC call whose messages carry bulk bytes (the
//! region service's `Read`, the migration seed's `Read`), decoded without
//! copying.
//!
//! tonic's response stream appends every received HTTP/2 DATA frame to
//! one buffer and decodes messages out of it: each byte read is copied once
//! more in the client (measured with callgrind on a cold read through
//! `r3map mount`: 1.0 x the data in `StreamingInner::poll_frame`, plus a
//! quarter more when that buffer grows). Our channel accepts frames large
//! enough for a whole read piece ([`crate::channel::MAX_FRAME`]), so a
//! message almost always lies inside one frame, and is decoded here from a
//! slice of it: the piece's bytes reach the caller as received. A message
//! split across frames (a peer with small frames) is gathered first, as
//! tonic would.
//!
//! The call itself is the one the generated client makes: the same path,
//! headers and bearer token (through the channel's interceptor), and the
//! status in the trailers mapped as tonic maps it.

use std::future::poll_fn;
use std::pin::Pin;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::Body;
use prost::Message;
use tonic::codegen::http;
use tonic::{Code, Status};

use crate::{Error, Result};
use tower::Service;

use crate::net::AuthedChannel;

/// The gRPC message prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// Where the decoder is in the message sequence.
enum State {
    /// Reading a message's prefix: `n` of its bytes are in `have`.
    Prefix { have: [u8; PREFIX], n: usize },
    /// Reading a message body of `len` bytes; `gathered` holds the part
    /// received so far when it spans frames.
    Body {
        len: usize,
        gathered: Option<BytesMut>,
    },
}

/// gRPC messages out of a sequence of DATA frames.
struct Decoder<M> {
    /// The unread rest of the last frame.
    buf: Bytes,
    state: State,
    max_message: usize,
    _m: std::marker::PhantomData<fn() -> M>,
}

/// A streamed read in progress: [`ReadStream::next`] yields its pieces.
pub(crate) struct ReadStream<M> {
    body: tonic::body::BoxBody,
    dec: Decoder<M>,
    done: bool,
}

impl<M: Message + Default> ReadStream<M> {
    /// Starts the call of `path` (`/PACKAGE.SERVICE/METHOD`) with `req`;
    /// fails with the call's status if the server refused it before
    /// sending any message.
    pub async fn start(
        ch: &AuthedChannel,
        path: &'static str,
        req: impl Message,
        max_message: usize,
    ) -> Result<ReadStream<M>> {
        let msg = req.encode_to_vec();
        let mut framed = BytesMut::with_capacity(PREFIX + msg.len());
        framed.put_u8(0);
        framed.put_u32(msg.len() as u32);
        framed.put_slice(&msg);
        let body = tonic::body::boxed(http_body_util::Full::new(framed.freeze()));
        let req = http::Request::builder()
            .method(http::Method::POST)
            .uri(path)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(body)
            .map_err(|e| invalid(format!("building the read request: {e}")))?;
        let mut ch = ch.clone();
        poll_fn(|cx| ch.poll_ready(cx))
            .await
            .map_err(|e| Error::from(Status::from_error(e)))?;
        let resp = ch
            .call(req)
            .await
            .map_err(|e| Error::from(Status::from_error(e)))?;
        if resp.status() != http::StatusCode::OK {
            return Err(Error::from(Status::new(
                http_code(resp.status()),
                format!("HTTP status {} from the region server", resp.status()),
            )));
        }
        // A refusal comes as headers only ("trailers-only").
        if let Some(s) = Status::from_header_map(resp.headers()) {
            if s.code() != Code::Ok {
                return Err(s.into());
            }
        }
        Ok(ReadStream {
            body: resp.into_body(),
            dec: Decoder::new(max_message),
            done: false,
        })
    }

    /// The next piece, `None` once the server ended the call successfully.
    pub async fn next(&mut self) -> Result<Option<M>> {
        loop {
            if let Some(m) = self.dec.decode()? {
                return Ok(Some(m));
            }
            if self.done {
                if !self.dec.between_messages() {
                    return Err(Error::Unavailable(
                        "read stream ended inside a message".into(),
                    ));
                }
                return Ok(None);
            }
            let frame = poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await;
            match frame {
                None => {
                    return Err(Error::Unavailable(
                        "read stream ended without a status (the server went away?)".into(),
                    ))
                }
                Some(Err(s)) => return Err(s.into()),
                Some(Ok(f)) => match f.into_data() {
                    Ok(data) => self.dec.buf = data, // decode took all of the last one
                    Err(f) => {
                        let Some(t) = f.trailers_ref() else { continue };
                        let Some(s) = Status::from_header_map(t) else {
                            return Err(invalid("read stream trailers without grpc-status".into()));
                        };
                        if s.code() != Code::Ok {
                            return Err(s.into());
                        }
                        self.done = true;
                    }
                },
            }
        }
    }
}

impl<M: Message + Default> Decoder<M> {
    fn new(max_message: usize) -> Decoder<M> {
        Decoder {
            buf: Bytes::new(),
            state: State::Prefix {
                have: [0; PREFIX],
                n: 0,
            },
            max_message,
            _m: std::marker::PhantomData,
        }
    }

    fn between_messages(&self) -> bool {
        self.buf.is_empty() && matches!(self.state, State::Prefix { n: 0, .. })
    }

    /// Decodes one message out of `buf` if it completes one; otherwise
    /// keeps what `buf` held and returns `None` with `buf` empty.
    fn decode(&mut self) -> Result<Option<M>> {
        loop {
            match &mut self.state {
                State::Prefix { have, n } => {
                    let take = (PREFIX - *n).min(self.buf.len());
                    have[*n..*n + take].copy_from_slice(&self.buf[..take]);
                    self.buf.advance(take);
                    *n += take;
                    if *n < PREFIX {
                        return Ok(None);
                    }
                    if have[0] != 0 {
                        return Err(invalid(
                            "compressed read piece, but no compression was asked for".into(),
                        ));
                    }
                    let len = u32::from_be_bytes([have[1], have[2], have[3], have[4]]) as usize;
                    if len > self.max_message {
                        return Err(invalid(format!(
                            "read piece of {len} bytes, over the limit of {}",
                            self.max_message
                        )));
                    }
                    self.state = State::Body {
                        len,
                        gathered: None,
                    };
                }
                State::Body { len, gathered } => {
                    let msg = match gathered {
                        // The usual case: the whole body is in this frame.
                        None if self.buf.len() >= *len => self.buf.split_to(*len),
                        _ => {
                            let g = gathered.get_or_insert_with(|| BytesMut::with_capacity(*len));
                            let take = (*len - g.len()).min(self.buf.len());
                            g.put_slice(&self.buf[..take]);
                            self.buf.advance(take);
                            if g.len() < *len {
                                return Ok(None);
                            }
                            gathered.take().expect("set above").freeze()
                        }
                    };
                    self.state = State::Prefix {
                        have: [0; PREFIX],
                        n: 0,
                    };
                    return decode_message(msg).map(Some);
                }
            }
        }
    }
}

/// Decodes a message; its `bytes` fields are slices of `msg`, not copies
/// (the generated types use `Bytes` for them).
fn decode_message<M: Message + Default>(msg: Bytes) -> Result<M> {
    M::decode(msg).map_err(|e| invalid(format!("bad read piece: {e}")))
}

/// A server that breaks the protocol: nothing to retry, nothing to trust.
fn invalid(msg: String) -> Error {
    Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, msg))
}

/// The gRPC code for an HTTP status that is not 200 (the gRPC spec's table).
fn http_code(s: http::StatusCode) -> Code {
    match s.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::pb::ReadChunk;

    fn framed(pieces: &[ReadChunk]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in pieces {
            let m = p.encode_to_vec();
            out.push(0);
            out.extend_from_slice(&(m.len() as u32).to_be_bytes());
            out.extend_from_slice(&m);
        }
        out
    }

    fn drain(d: &mut Decoder<ReadChunk>, got: &mut Vec<ReadChunk>) {
        while let Some(m) = d.decode().unwrap() {
            got.push(m);
        }
        assert!(d.buf.is_empty(), "decode leaves nothing unread");
    }

    #[test]
    fn messages_at_any_frame_boundary() {
        let pieces: Vec<ReadChunk> = (0..5u64)
            .map(|i| ReadChunk {
                offset: i * 1000,
                data: Bytes::from(vec![i as u8 + 1; (i as usize * 37) % 100]),
            })
            .collect();
        let all = framed(&pieces);
        // Every frame size from 1 byte to the whole stream.
        for size in 1..=all.len() {
            let mut d = Decoder::<ReadChunk>::new(1 << 20);
            let mut got = Vec::new();
            for f in all.chunks(size) {
                d.buf = Bytes::copy_from_slice(f);
                drain(&mut d, &mut got);
            }
            assert!(d.between_messages());
            assert_eq!(got, pieces, "frames of {size} bytes");
        }
    }

    #[test]
    fn a_piece_inside_one_frame_is_not_copied() {
        let p = ReadChunk {
            offset: 7,
            data: Bytes::from(vec![9u8; 4096]),
        };
        let frame = Bytes::from(framed(&[p.clone(), p.clone()]));
        let mut d = Decoder::<ReadChunk>::new(1 << 20);
        d.buf = frame.clone();
        let mut got = Vec::new();
        drain(&mut d, &mut got);
        assert_eq!(got, vec![p.clone(), p]);
        let range = frame.as_ptr_range();
        for g in &got {
            assert!(
                range.contains(&g.data.as_ptr()),
                "data is a slice of the frame"
            );
        }
    }

    #[test]
    fn refuses_compressed_and_oversized_messages() {
        let mut d = Decoder::<ReadChunk>::new(10);
        d.buf = Bytes::from_static(&[1, 0, 0, 0, 1, 0]);
        let e = d.decode().unwrap_err().to_string();
        assert!(e.contains("compressed"), "{e}");
        let mut d = Decoder::<ReadChunk>::new(10);
        d.buf = Bytes::from_static(&[0, 0, 0, 0, 11]);
        let e = d.decode().unwrap_err().to_string();
        assert!(e.contains("over the limit"), "{e}");
    }
}
