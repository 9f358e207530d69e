//! Wire constants and framing of the NBD protocol (doc/proto.md of the
//! NetworkBlockDevice project).

/// `NBDMAGIC`: the server's first 8 bytes.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: starts every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// `REPLY_MAGIC_OPT`: starts every option reply.
pub const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
/// `REQUEST_MAGIC`: starts every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `SIMPLE_REPLY_MAGIC`: starts a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `STRUCTURED_REPLY_MAGIC`: starts a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
/// `NBD_FLAG_FIXED_NEWSTYLE`: handshake flag.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// `NBD_FLAG_NO_ZEROES`: handshake flag.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// `NBD_FLAG_C_FIXED_NEWSTYLE`: client flag.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// `NBD_FLAG_C_NO_ZEROES`: client flag.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
/// `NBD_OPT_EXPORT_NAME`: option.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`: option.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`: option.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`: option.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`: option.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`: option.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`: option.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`: option.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`: option.
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
/// `NBD_REP_ACK`: option reply type.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`: option reply type.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`: option reply type.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_FLAG_ERROR`: option reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`: option reply type.
pub const REP_ERR_UNSUP: u32 = 1 | REP_FLAG_ERROR;
/// `NBD_REP_ERR_POLICY`: option reply type.
pub const REP_ERR_POLICY: u32 = 2 | REP_FLAG_ERROR;
/// `NBD_REP_ERR_INVALID`: option reply type.
pub const REP_ERR_INVALID: u32 = 3 | REP_FLAG_ERROR;
/// `NBD_REP_ERR_UNKNOWN`: option reply type.
pub const REP_ERR_UNKNOWN: u32 = 6 | REP_FLAG_ERROR;
/// `NBD_REP_ERR_TOO_BIG`: option reply type.
pub const REP_ERR_TOO_BIG: u32 = 9 | REP_FLAG_ERROR;

// NBD_OPT_INFO / NBD_OPT_GO information types.
/// `NBD_INFO_EXPORT`: information type of NBD_OPT_INFO / NBD_OPT_GO.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: information type of NBD_OPT_INFO / NBD_OPT_GO.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`: information type of NBD_OPT_INFO / NBD_OPT_GO.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: information type of NBD_OPT_INFO / NBD_OPT_GO.
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
/// `NBD_FLAG_HAS_FLAGS`: transmission flag.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// `NBD_FLAG_READ_ONLY`: transmission flag.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_FLAG_SEND_FLUSH`: transmission flag.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_FLAG_SEND_FUA`: transmission flag.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_FLAG_SEND_TRIM`: transmission flag.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_FLAG_SEND_WRITE_ZEROES`: transmission flag.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_FLAG_SEND_DF`: transmission flag.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// `NBD_FLAG_CAN_MULTI_CONN`: transmission flag.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_FLAG_SEND_CACHE`: transmission flag.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;

// Commands and their flags.
/// `NBD_CMD_READ`: command.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`: command.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`: command.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`: command.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`: command.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`: command.
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`: command.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_FLAG_FUA`: command flag.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_NO_HOLE`: command flag.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_FLAG_DF`: command flag.
pub const CMD_FLAG_DF: u16 = 1 << 2;

// Structured reply chunk types and flags.
/// `NBD_REPLY_FLAG_DONE`: structured reply chunk flag.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`: structured reply chunk type.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`: structured reply chunk type.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_ERROR`: structured reply chunk type.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

// Errors sent to clients (Linux errno values, as the protocol requires).
/// `NBD_EPERM`: error sent to clients (the Linux errno value).
pub const NBD_EPERM: u32 = 1;
/// `NBD_EIO`: error sent to clients (the Linux errno value).
pub const NBD_EIO: u32 = 5;
/// `NBD_ENOMEM`: error sent to clients (the Linux errno value).
pub const NBD_ENOMEM: u32 = 12;
/// `NBD_EINVAL`: error sent to clients (the Linux errno value).
pub const NBD_EINVAL: u32 = 22;
/// `NBD_ENOSPC`: error sent to clients (the Linux errno value).
pub const NBD_ENOSPC: u32 = 28;
/// `NBD_EOVERFLOW`: error sent to clients (the Linux errno value).
pub const NBD_EOVERFLOW: u32 = 75;
/// `NBD_ENOTSUP`: error sent to clients (the Linux errno value).
pub const NBD_ENOTSUP: u32 = 95;
/// `NBD_ESHUTDOWN`: error sent to clients (the Linux errno value).
pub const NBD_ESHUTDOWN: u32 = 108;

/// A transmission-phase request header (28 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command (`CMD_*`).
    pub kind: u16,
    /// Chosen by the client, echoed in the reply.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Length in bytes (of the data to follow, for a write).
    pub len: u32,
}

/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;

/// Why a request header could not be parsed. The stream cannot be trusted
/// past a bad magic, so the connection ends.
#[derive(Debug, PartialEq, Eq)]
pub struct BadMagic(pub u32);

impl Request {
    /// Decodes a header read off the wire.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Request, BadMagic> {
        let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(Request {
            flags: u16::from_be_bytes(b[4..6].try_into().unwrap()),
            kind: u16::from_be_bytes(b[6..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
            len: u32::from_be_bytes(b[24..28].try_into().unwrap()),
        })
    }

    /// Encodes the header for the wire (the client side; tests).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Header of a simple reply: magic, error, cookie.
pub fn simple_reply(cookie: u64, error: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v
}

/// Header of a structured reply chunk whose payload is `len` bytes.
pub fn structured_header(cookie: u64, flags: u16, kind: u16, len: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(28);
    v.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// A final NBD_REPLY_TYPE_ERROR chunk carrying `error` and a message.
pub fn structured_error(cookie: u64, error: u32, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    let mut v = structured_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    );
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// The errno an NBD client should see for an engine error: EINVAL for a
/// range outside the export, ENOSPC when the store is full, EIO otherwise
/// (a fenced writer included: the application must see its writes fail).
pub fn errno_of(e: &crate::Error) -> u32 {
    use crate::error::ErrorKind;
    match e.kind() {
        ErrorKind::OutOfRange => NBD_EINVAL,
        _ if e.errno() == Some(nix::errno::Errno::ENOSPC as i32) => NBD_ENOSPC,
        _ => NBD_EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_and_bad_magic() {
        let r = Request {
            flags: 1,
            kind: CMD_WRITE,
            cookie: 7,
            offset: 4096,
            len: 512,
        };
        assert_eq!(Request::parse(&r.encode()).unwrap(), r);
        let mut b = r.encode();
        b[0] ^= 0xff;
        assert!(Request::parse(&b).is_err());
    }
}
