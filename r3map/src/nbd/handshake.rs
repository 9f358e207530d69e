//! Fixed newstyle negotiation: EXPORT_NAME, GO, INFO, LIST, ABORT,
//! STRUCTURED_REPLY; everything else is refused with the proper error.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::export::{Export, Limits};
use super::proto::*;

/// Largest option payload we read; longer ones are discarded and refused.
const MAX_OPTION_LEN: u32 = 8192;

/// The outcome of a successful negotiation.
pub struct Negotiated {
    /// The export the client chose.
    pub export: Export,
    /// Whether the client asked for structured replies.
    pub structured: bool,
}

/// Runs the server side of the handshake. `Ok(None)` when the client ended
/// it cleanly (ABORT, or hung up after LIST).
pub async fn negotiate<S, F>(
    io: &mut S,
    lookup: F,
    limits: &Limits,
) -> io::Result<Option<Negotiated>>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(&str) -> Option<Export>,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    io.write_all(&hello).await?;
    io.flush().await?;

    let client_flags = io.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(invalid(format!("unknown client flags {client_flags:#x}")));
    }
    if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(invalid("client does not speak fixed newstyle".into()));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;

    loop {
        let magic = match io.read_u64().await {
            Ok(m) => m,
            // A client that lists exports may just hang up.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        };
        if magic != IHAVEOPT {
            return Err(invalid(format!("bad option magic {magic:#x}")));
        }
        let opt = io.read_u32().await?;
        let len = io.read_u32().await?;
        if len > MAX_OPTION_LEN {
            discard(io, len as u64).await?;
            if opt == OPT_EXPORT_NAME {
                return Err(invalid("export name too long".into())); // no way to reply
            }
            reply(io, opt, REP_ERR_TOO_BIG, b"option too long").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        io.read_exact(&mut data).await?;

        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                // This option has no error reply: an unknown name ends the connection.
                let Some(export) = lookup(&name) else {
                    return Err(invalid(format!("unknown export {name:?}")));
                };
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&export.backend.size().to_be_bytes());
                out.extend_from_slice(&export.transmission_flags(false).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                io.write_all(&out).await?;
                io.flush().await?;
                // Structured replies are only valid with GO.
                return Ok(Some(Negotiated {
                    export,
                    structured: false,
                }));
            }
            OPT_ABORT => {
                // The client may already be gone; a failed ACK is no error.
                let _ = reply(io, opt, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(io, opt, REP_ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                if let Some(e) = lookup("") {
                    let mut entry = Vec::new();
                    entry.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    entry.extend_from_slice(e.name.as_bytes());
                    entry.extend_from_slice(e.description.as_bytes());
                    reply(io, opt, REP_SERVER, &entry).await?;
                }
                reply(io, opt, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS => {
                reply(
                    io,
                    opt,
                    REP_ERR_POLICY,
                    b"TLS is not offered; use a unix socket or loopback",
                )
                .await?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(io, opt, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data").await?;
                } else {
                    structured = true;
                    reply(io, opt, REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !structured {
                    reply(
                        io,
                        opt,
                        REP_ERR_INVALID,
                        b"negotiate STRUCTURED_REPLY first",
                    )
                    .await?;
                } else {
                    // No metadata contexts are offered: an empty list is a valid answer.
                    reply(io, opt, REP_ACK, &[]).await?;
                }
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requests)) = parse_info(&data) else {
                    reply(io, opt, REP_ERR_INVALID, b"malformed INFO/GO request").await?;
                    continue;
                };
                let Some(export) = lookup(&name) else {
                    reply(
                        io,
                        opt,
                        REP_ERR_UNKNOWN,
                        format!("no export named {name:?}").as_bytes(),
                    )
                    .await?;
                    continue;
                };
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&export.backend.size().to_be_bytes());
                info.extend_from_slice(&export.transmission_flags(structured).to_be_bytes());
                reply(io, opt, REP_INFO, &info).await?;

                // Block sizes are always sent: clients that asked must honour them,
                // the others may.
                let mut bs = Vec::with_capacity(14);
                bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                bs.extend_from_slice(&1u32.to_be_bytes());
                bs.extend_from_slice(&4096u32.to_be_bytes());
                bs.extend_from_slice(&limits.max_request.to_be_bytes());
                reply(io, opt, REP_INFO, &bs).await?;
                if requests.contains(&INFO_NAME) {
                    let mut v = INFO_NAME.to_be_bytes().to_vec();
                    v.extend_from_slice(export.name.as_bytes());
                    reply(io, opt, REP_INFO, &v).await?;
                }
                if requests.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
                    let mut v = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    v.extend_from_slice(export.description.as_bytes());
                    reply(io, opt, REP_INFO, &v).await?;
                }
                reply(io, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok(Some(Negotiated { export, structured }));
                }
            }
            _ => {
                reply(io, opt, REP_ERR_UNSUP, b"option not supported").await?;
            }
        }
    }
}

/// Parses the payload of INFO/GO: name length, name, count, info types.
fn parse_info(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    if rest.len() != 2 + 2 * count {
        return None;
    }
    let reqs = rest[2..]
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((String::from_utf8(name.to_vec()).ok()?, reqs))
}

async fn reply<S: AsyncWrite + Unpin>(
    io: &mut S,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&REPLY_MAGIC_OPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    io.write_all(&v).await?;
    io.flush().await
}

async fn discard<S: AsyncRead + Unpin>(io: &mut S, len: u64) -> io::Result<()> {
    let n = tokio::io::copy(&mut (&mut *io).take(len), &mut tokio::io::sink()).await?;
    if n < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

#[cfg(test)]
mod tests {
    use super::parse_info;

    #[test]
    fn info_payload_is_checked() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_info(&d), Some(("abc".into(), vec![3])));
        assert_eq!(parse_info(&d[..d.len() - 1]), None);
        let huge = u32::MAX.to_be_bytes();
        assert_eq!(parse_info(&huge), None);
    }
}
