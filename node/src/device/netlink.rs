//! The kernel NBD client's generic-netlink interface (family `nbd`,
//! include/uapi/linux/nbd-netlink.h), on the `neli` crate.
//!
//! Message construction and reply parsing are plain functions over neli's
//! types so that they can be unit-tested on a host without nbd.ko; only
//! [`NbdNetlink`] talks to the kernel.

use std::fmt;
use std::io::Cursor;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use neli::{
    consts::{
        genl::{Cmd, NlAttrType},
        nl::{NlmF, NlmFFlags},
        socket::NlFamily,
    },
    err::{NlError, WrappedError},
    genl::{Genlmsghdr, Nlattr},
    neli_enum,
    nl::{NlPayload, Nlmsghdr},
    socket::NlSocketHandle,
    types::{Buffer, GenlBuffer},
    ToBytes,
};

/// Name of the generic netlink family nbd.ko registers.
pub const FAMILY: &str = "nbd";
/// `NBD_GENL_VERSION`.
pub const VERSION: u8 = 1;

/// Server (transmission) flags, as in the NBD protocol and linux/nbd.h.
pub mod server_flags {
    /// `NBD_FLAG_HAS_FLAGS`
    pub const HAS_FLAGS: u64 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`
    pub const READ_ONLY: u64 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`
    pub const SEND_FLUSH: u64 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`
    pub const SEND_FUA: u64 = 1 << 3;
    /// `NBD_FLAG_SEND_TRIM`
    pub const SEND_TRIM: u64 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`
    pub const SEND_WRITE_ZEROES: u64 = 1 << 6;
    /// `NBD_FLAG_CAN_MULTI_CONN`
    pub const CAN_MULTI_CONN: u64 = 1 << 8;
}

/// The node plugin's `NBD_ATTR_TIMEOUT`: a request in flight when the
/// server dies is resent on the new socket after this long (the block
/// layer's default without one is the same 30 s, measured in the guest),
/// and a wedged server is cut off instead of hanging I/O for ever.
/// docs/nbd-netlink.md has the measurements.
pub const NODE_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The node plugin's `NBD_ATTR_DEAD_CONN_TIMEOUT`: how long I/O waits for a
/// restarted plugin to RECONFIGURE before it fails with EIO. Longer than a
/// pod restart, short enough not to leave writers in D-state for long.
pub const NODE_DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(120);

/// Client flags (`NBD_ATTR_CLIENT_FLAGS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientFlags {
    /// `NBD_CFLAG_DESTROY_ON_DISCONNECT`: an explicit DISCONNECT removes
    /// the device. We set it: indexes the kernel picked for us do not pile
    /// up, and a detached device cannot later be mistaken for a volume. A
    /// dying server is *not* a disconnect, so a restart keeps the device.
    pub destroy_on_disconnect: bool,
    /// `NBD_CFLAG_DISCONNECT_ON_CLOSE`: disconnect when the last opener
    /// closes the block device. We leave it off: the plugin never holds the
    /// device open itself, so an unmount (or mkfs, or blkid closing it)
    /// would tear the volume down under the next opener.
    pub disconnect_on_close: bool,
}

impl ClientFlags {
    /// The flags a restart-safe node plugin attaches with (see the fields).
    pub const NODE_PLUGIN: ClientFlags = ClientFlags {
        destroy_on_disconnect: true,
        disconnect_on_close: false,
    };

    /// The `NBD_ATTR_CLIENT_FLAGS` value.
    pub fn bits(self) -> u64 {
        u64::from(self.destroy_on_disconnect) | (u64::from(self.disconnect_on_close) << 1)
    }
}

/// `NBD_CMD_*`.
#[neli_enum(serialized_type = "u8")]
pub enum NbdCmd {
    Unspec = 0,
    Connect = 1,
    Disconnect = 2,
    Reconfigure = 3,
    LinkDead = 4,
    Status = 5,
}
impl Cmd for NbdCmd {}

/// `NBD_ATTR_*`, the top-level attributes.
#[neli_enum(serialized_type = "u16")]
pub enum NbdAttr {
    Unspec = 0,
    Index = 1,
    SizeBytes = 2,
    BlockSizeBytes = 3,
    Timeout = 4,
    ServerFlags = 5,
    ClientFlags = 6,
    Sockets = 7,
    DeadConnTimeout = 8,
    DeviceList = 9,
    BackendIdentifier = 10,
}
impl NlAttrType for NbdAttr {}

/// Inside `NBD_ATTR_SOCKETS`: `NBD_SOCK_ITEM`.
#[neli_enum(serialized_type = "u16")]
pub enum NbdSockList {
    Unspec = 0,
    Item = 1,
}
impl NlAttrType for NbdSockList {}

/// Inside `NBD_SOCK_ITEM`: `NBD_SOCK_FD`.
#[neli_enum(serialized_type = "u16")]
pub enum NbdSockItem {
    Unspec = 0,
    Fd = 1,
}
impl NlAttrType for NbdSockItem {}

/// Inside `NBD_ATTR_DEVICE_LIST`: `NBD_DEVICE_ITEM`.
#[neli_enum(serialized_type = "u16")]
pub enum NbdDeviceList {
    Unspec = 0,
    Item = 1,
}
impl NlAttrType for NbdDeviceList {}

/// Inside `NBD_DEVICE_ITEM`: `NBD_DEVICE_INDEX`, `NBD_DEVICE_CONNECTED`.
#[neli_enum(serialized_type = "u16")]
pub enum NbdDeviceItem {
    Unspec = 0,
    Index = 1,
    Connected = 2,
}
impl NlAttrType for NbdDeviceItem {}

/// A generic netlink message of the nbd family.
pub type NbdMsg = Genlmsghdr<NbdCmd, NbdAttr>;

/// What went wrong talking to the kernel's NBD client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// nbd.ko is not loaded (the controller resolved no `nbd` family).
    #[error("the kernel has no \"nbd\" generic netlink family: is nbd.ko loaded?")]
    FamilyMissing,
    /// The kernel refused the request with this errno (positive).
    #[error("{op}: the kernel answered {}", fmt_errno(*.errno))]
    Kernel {
        /// The command that failed.
        op: &'static str,
        /// Positive errno.
        errno: i32,
    },
    /// A reply we could not make sense of.
    #[error("{op}: unexpected reply: {msg}")]
    Protocol {
        /// The command that failed.
        op: &'static str,
        /// What was wrong with it.
        msg: String,
    },
    /// The netlink socket itself failed.
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    /// A request we refuse to send.
    #[error("invalid request: {0}")]
    Invalid(String),
}

fn fmt_errno(errno: i32) -> String {
    let name = nix::errno::Errno::from_raw(errno);
    format!("{name} ({})", std::io::Error::from_raw_os_error(errno))
}

impl Error {
    /// The kernel's errno (positive), when the kernel refused the request or
    /// the socket failed with one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { errno, .. } => Some(*errno),
            Error::Io(e) => e.raw_os_error(),
            Error::FamilyMissing => Some(libc_enoent()),
            _ => None,
        }
    }

    fn from_nl<T: fmt::Debug, P: fmt::Debug>(op: &'static str, e: NlError<T, P>) -> Error {
        match e {
            NlError::Nlmsgerr(m) => Error::Kernel {
                op,
                errno: -m.error,
            },
            NlError::Wrapped(WrappedError::IOError(io)) => Error::Io(io),
            other => Error::Protocol {
                op,
                msg: other.to_string(),
            },
        }
    }
}

fn libc_enoent() -> i32 {
    nix::errno::Errno::ENOENT as i32
}

/// Result of this module's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything `NBD_CMD_CONNECT` needs besides the sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectConfig {
    /// Device size; must be a multiple of `block_size`.
    pub size_bytes: u64,
    /// Logical block size (512..=4096, a power of two).
    pub block_size: u64,
    /// `NBD_ATTR_BACKEND_IDENTIFIER`, shown at /sys/block/nbdN/backend:
    /// the volume id, checked before any re-attach.
    pub identifier: String,
    /// `NBD_ATTR_TIMEOUT`: how long a request may wait for its reply before
    /// the kernel requeues it (one connection: onto the same slot, which a
    /// RECONFIGURE may have refilled). None: the kernel's 30 s block-layer
    /// default, and requests in flight on a dead socket are never requeued.
    pub io_timeout: Option<Duration>,
    /// `NBD_ATTR_DEAD_CONN_TIMEOUT`: how long I/O waits for a dead
    /// connection to be replaced before failing with EIO. None or zero: no
    /// waiting at all, the first I/O after the server dies fails.
    pub dead_conn_timeout: Option<Duration>,
    /// `NBD_ATTR_SERVER_FLAGS`: what the export advertises
    /// (`Export::transmission_flags(false)`).
    pub server_flags: u64,
    /// `NBD_ATTR_CLIENT_FLAGS`.
    pub client_flags: ClientFlags,
}

/// What `NBD_CMD_RECONFIGURE` may change besides the sockets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconfigureConfig {
    /// `NBD_ATTR_BACKEND_IDENTIFIER`. Required by the kernel (6.1) when the
    /// device was connected with one, and compared with it: a mismatch is
    /// EINVAL ("backend image doesn't match"), a missing one too ("must
    /// specify backend").
    pub identifier: Option<String>,
    /// New `NBD_ATTR_TIMEOUT`, if any.
    pub io_timeout: Option<Duration>,
    /// New `NBD_ATTR_DEAD_CONN_TIMEOUT`, if any.
    pub dead_conn_timeout: Option<Duration>,
    /// New client flags, if any (the kernel sets *and clears* from them).
    pub client_flags: Option<ClientFlags>,
}

/// One entry of `NBD_ATTR_DEVICE_LIST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    /// The N of /dev/nbdN.
    pub index: u32,
    /// The kernel's `NBD_DEVICE_CONNECTED`: the device holds a
    /// configuration (it was connected and not yet disconnected). It stays
    /// true while the connection is dead and I/O waits for a
    /// RECONFIGURE, so it does not prove that a server is answering.
    pub connected: bool,
}

use neli::Size;

fn attr<P: Size + ToBytes + fmt::Debug, T: NlAttrType>(t: T, p: P) -> Result<Nlattr<T, Buffer>> {
    Nlattr::new(false, false, t, p).map_err(|e| Error::Invalid(e.to_string()))
}

fn nested<T: NlAttrType>(t: T) -> Result<Nlattr<T, Buffer>> {
    Nlattr::new(true, false, t, Vec::<u8>::new()).map_err(|e| Error::Invalid(e.to_string()))
}

fn secs(d: Duration) -> u64 {
    // The kernel takes whole seconds; round up so that a sub-second timeout
    // is not silently turned into "none".
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `NBD_ATTR_SOCKETS { NBD_SOCK_ITEM { NBD_SOCK_FD }... }`.
fn sockets_attr(socks: &[BorrowedFd<'_>]) -> Result<Nlattr<NbdAttr, Buffer>> {
    if socks.is_empty() {
        return Err(Error::Invalid("at least one socket is needed".into()));
    }
    let mut list = nested(NbdAttr::Sockets)?;
    for s in socks {
        let fd = u32::try_from(s.as_raw_fd())
            .map_err(|_| Error::Invalid(format!("bad fd {}", s.as_raw_fd())))?;
        let mut item = nested(NbdSockList::Item)?;
        item.add_nested_attribute(&attr(NbdSockItem::Fd, fd)?)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        list.add_nested_attribute(&item)
            .map_err(|e| Error::Invalid(e.to_string()))?;
    }
    Ok(list)
}

/// The `NBD_CMD_CONNECT` message. No `NBD_ATTR_INDEX`: the kernel picks a
/// free device (or creates one), so concurrent attaches cannot race for an
/// index the way probing /dev/nbdN does.
pub fn connect_msg(socks: &[BorrowedFd<'_>], cfg: &ConnectConfig) -> Result<NbdMsg> {
    if cfg.block_size < 512 || cfg.block_size > 4096 || !cfg.block_size.is_power_of_two() {
        return Err(Error::Invalid(format!(
            "block size {} is not a power of two in 512..=4096",
            cfg.block_size
        )));
    }
    if cfg.size_bytes == 0 || cfg.size_bytes % cfg.block_size != 0 {
        return Err(Error::Invalid(format!(
            "size {} is not a positive multiple of the block size {}",
            cfg.size_bytes, cfg.block_size
        )));
    }
    let mut attrs = GenlBuffer::new();
    attrs.push(attr(NbdAttr::SizeBytes, cfg.size_bytes)?);
    attrs.push(attr(NbdAttr::BlockSizeBytes, cfg.block_size)?);
    attrs.push(attr(NbdAttr::ServerFlags, cfg.server_flags)?);
    attrs.push(attr(NbdAttr::ClientFlags, cfg.client_flags.bits())?);
    if let Some(t) = cfg.io_timeout {
        attrs.push(attr(NbdAttr::Timeout, secs(t))?);
    }
    if let Some(t) = cfg.dead_conn_timeout {
        attrs.push(attr(NbdAttr::DeadConnTimeout, secs(t))?);
    }
    if !cfg.identifier.is_empty() {
        attrs.push(attr(NbdAttr::BackendIdentifier, cfg.identifier.as_str())?);
    }
    attrs.push(sockets_attr(socks)?);
    Ok(Genlmsghdr::new(NbdCmd::Connect, VERSION, attrs))
}

/// The `NBD_CMD_RECONFIGURE` message for device `index`.
pub fn reconfigure_msg(
    index: u32,
    socks: &[BorrowedFd<'_>],
    cfg: &ReconfigureConfig,
) -> Result<NbdMsg> {
    let mut attrs = GenlBuffer::new();
    attrs.push(attr(NbdAttr::Index, index)?);
    if let Some(id) = &cfg.identifier {
        attrs.push(attr(NbdAttr::BackendIdentifier, id.as_str())?);
    }
    if let Some(t) = cfg.io_timeout {
        attrs.push(attr(NbdAttr::Timeout, secs(t))?);
    }
    if let Some(t) = cfg.dead_conn_timeout {
        attrs.push(attr(NbdAttr::DeadConnTimeout, secs(t))?);
    }
    if let Some(f) = cfg.client_flags {
        attrs.push(attr(NbdAttr::ClientFlags, f.bits())?);
    }
    if !socks.is_empty() {
        attrs.push(sockets_attr(socks)?);
    }
    Ok(Genlmsghdr::new(NbdCmd::Reconfigure, VERSION, attrs))
}

/// The `NBD_CMD_DISCONNECT` message for device `index`.
pub fn disconnect_msg(index: u32) -> Result<NbdMsg> {
    let mut attrs = GenlBuffer::new();
    attrs.push(attr(NbdAttr::Index, index)?);
    Ok(Genlmsghdr::new(NbdCmd::Disconnect, VERSION, attrs))
}

/// The `NBD_CMD_STATUS` message: one device, or all of them.
pub fn status_msg(index: Option<u32>) -> Result<NbdMsg> {
    let mut attrs = GenlBuffer::new();
    if let Some(i) = index {
        attrs.push(attr(NbdAttr::Index, i)?);
    }
    Ok(Genlmsghdr::new(NbdCmd::Status, VERSION, attrs))
}

/// The device index in a CONNECT reply (`NBD_ATTR_INDEX`).
pub fn parse_connect_reply(msg: &NbdMsg) -> Result<u32> {
    msg.get_attr_handle()
        .get_attr_payload_as::<u32>(NbdAttr::Index)
        .map_err(|e| Error::Protocol {
            op: "connect",
            msg: format!("no NBD_ATTR_INDEX: {e}"),
        })
}

/// The devices in a STATUS reply (`NBD_ATTR_DEVICE_LIST`).
pub fn parse_status_reply(msg: &NbdMsg) -> Result<Vec<DeviceStatus>> {
    let bad = |m: String| Error::Protocol {
        op: "status",
        msg: m,
    };
    let handle = msg.get_attr_handle();
    let Some(list) = handle.get_attribute(NbdAttr::DeviceList) else {
        // The kernel always sends the (possibly empty) list.
        return Err(bad("no NBD_ATTR_DEVICE_LIST".into()));
    };
    let list = list
        .get_attr_handle::<NbdDeviceList>()
        .map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for item in list.iter() {
        if item.nla_type.nla_type != NbdDeviceList::Item {
            continue;
        }
        let h = item
            .get_attr_handle::<NbdDeviceItem>()
            .map_err(|e| bad(e.to_string()))?;
        let index = h
            .get_attr_payload_as::<u32>(NbdDeviceItem::Index)
            .map_err(|e| bad(format!("device item without index: {e}")))?;
        let connected = h
            .get_attr_payload_as::<u8>(NbdDeviceItem::Connected)
            .map_err(|e| bad(format!("device item without connected: {e}")))?;
        out.push(DeviceStatus {
            index,
            connected: connected != 0,
        });
    }
    Ok(out)
}

/// Serializes a message as it goes on the wire (for tests and debugging).
pub fn encode(family: u16, msg: NbdMsg) -> Result<Vec<u8>> {
    let nl = Nlmsghdr::new(
        None,
        family,
        NlmFFlags::new(&[NlmF::Request, NlmF::Ack]),
        None,
        None,
        NlPayload::Payload(msg),
    );
    let mut buf = Cursor::new(Vec::new());
    nl.to_bytes(&mut buf)
        .map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(buf.into_inner())
}

/// A generic netlink socket bound to the kernel's `nbd` family. Needs
/// CAP_SYS_ADMIN for everything but STATUS.
pub struct NbdNetlink {
    sock: NlSocketHandle,
    family: u16,
}

impl fmt::Debug for NbdNetlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdNetlink")
            .field("family", &self.family)
            .finish()
    }
}

impl NbdNetlink {
    /// Opens a generic netlink socket and resolves the `nbd` family.
    pub fn open() -> Result<Self> {
        let mut sock = NlSocketHandle::connect(NlFamily::Generic, None, &[])?;
        let family = match sock.resolve_genl_family(FAMILY) {
            Ok(f) => f,
            Err(NlError::Nlmsgerr(e)) if -e.error == libc_enoent() => {
                return Err(Error::FamilyMissing)
            }
            Err(e) => return Err(Error::from_nl("resolve family", e)),
        };
        Ok(NbdNetlink { sock, family })
    }

    /// The numeric id of the `nbd` family on this kernel.
    pub fn family(&self) -> u16 {
        self.family
    }

    /// Sends `msg` with NLM_F_ACK and returns the kernel's payload reply, if
    /// any, once the ACK (or the error) for it has arrived.
    fn request(&mut self, op: &'static str, msg: NbdMsg) -> Result<Option<NbdMsg>> {
        let nl = Nlmsghdr::new(
            None,
            self.family,
            NlmFFlags::new(&[NlmF::Request, NlmF::Ack]),
            None,
            None,
            NlPayload::Payload(msg),
        );
        self.sock.send(nl).map_err(|e| Error::Protocol {
            op,
            msg: e.to_string(),
        })?;
        let mut reply = None;
        loop {
            let m: Option<Nlmsghdr<u16, NbdMsg>> =
                self.sock.recv().map_err(|e| Error::from_nl(op, e))?;
            let Some(m) = m else {
                return Err(Error::Protocol {
                    op,
                    msg: "netlink socket closed before the ACK".into(),
                });
            };
            match m.nl_payload {
                NlPayload::Payload(p) => reply = Some(p),
                NlPayload::Ack(_) => return Ok(reply),
                NlPayload::Err(e) => {
                    return Err(Error::Kernel {
                        op,
                        errno: -e.error,
                    })
                }
                NlPayload::Empty => {}
            }
        }
    }

    /// `NBD_CMD_CONNECT`: hands `socks` (connected stream sockets whose
    /// other ends speak NBD transmission) to the kernel and returns the
    /// index of the device it picked. The kernel takes its own reference
    /// to each socket: the caller may (and should) close its copies.
    pub fn connect(&mut self, socks: &[BorrowedFd<'_>], cfg: &ConnectConfig) -> Result<u32> {
        let reply = self.request("connect", connect_msg(socks, cfg)?)?;
        let reply = reply.ok_or_else(|| Error::Protocol {
            op: "connect",
            msg: "no reply carrying the device index".into(),
        })?;
        parse_connect_reply(&reply)
    }

    /// `NBD_CMD_RECONFIGURE`: gives device `index` new sockets (and
    /// optionally new timeouts/flags). The kernel only puts a socket into a
    /// slot whose connection it has marked dead; a socket with no dead slot
    /// to go to is dropped *and success is reported*. The caller must make
    /// sure the old server is gone first and check afterwards that the new
    /// socket was kept (e.g. that its peer end did not hang up).
    pub fn reconfigure(
        &mut self,
        index: u32,
        socks: &[BorrowedFd<'_>],
        cfg: &ReconfigureConfig,
    ) -> Result<()> {
        self.request("reconfigure", reconfigure_msg(index, socks, cfg)?)?;
        Ok(())
    }

    /// `NBD_CMD_DISCONNECT`: shuts the device's sockets down; with
    /// `destroy_on_disconnect` the device disappears once unused.
    pub fn disconnect(&mut self, index: u32) -> Result<()> {
        self.request("disconnect", disconnect_msg(index)?)?;
        Ok(())
    }

    /// `NBD_CMD_STATUS` for all devices (`None`) or one.
    pub fn status_all(&mut self, index: Option<u32>) -> Result<Vec<DeviceStatus>> {
        let reply = self.request("status", status_msg(index)?)?;
        let reply = reply.ok_or_else(|| Error::Protocol {
            op: "status",
            msg: "no reply".into(),
        })?;
        parse_status_reply(&reply)
    }

    /// Whether device `index` holds a configuration (see
    /// [`DeviceStatus::connected`]); an index the kernel does not know is
    /// an error (the kernel's errno).
    pub fn status(&mut self, index: u32) -> Result<bool> {
        let list = self.status_all(Some(index))?;
        list.iter()
            .find(|d| d.index == index)
            .map(|d| d.connected)
            .ok_or_else(|| Error::Protocol {
                op: "status",
                msg: format!("device {index} missing from the reply"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neli::FromBytesWithInput;
    use std::os::fd::AsFd;

    const FAM: u16 = 0x1234;

    fn cfg() -> ConnectConfig {
        ConnectConfig {
            size_bytes: 64 << 20,
            block_size: 4096,
            identifier: "pvc-0123".into(),
            io_timeout: Some(Duration::from_secs(5)),
            dead_conn_timeout: Some(Duration::from_millis(30_500)),
            server_flags: server_flags::HAS_FLAGS | server_flags::SEND_FLUSH,
            client_flags: ClientFlags::NODE_PLUGIN,
        }
    }

    /// Walks netlink attributes (type, payload) in `b`.
    fn attrs(mut b: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        while b.len() >= 4 {
            let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
            let ty = u16::from_ne_bytes([b[2], b[3]]);
            out.push((ty, b[4..len].to_vec()));
            b = &b[((len + 3) & !3).min(b.len())..];
        }
        out
    }

    fn u64_of(p: &[u8]) -> u64 {
        u64::from_ne_bytes(p.try_into().unwrap())
    }

    #[test]
    fn connect_message_layout() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = f.as_fd();
        let bytes = encode(FAM, connect_msg(&[fd, fd], &cfg()).unwrap()).unwrap();
        // nlmsghdr: len, type = family, flags = REQUEST|ACK.
        assert_eq!(
            u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize,
            bytes.len()
        );
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), FAM);
        assert_eq!(u16::from_ne_bytes([bytes[6], bytes[7]]), 0x1 | 0x4);
        // genlmsghdr: cmd, version, reserved.
        assert_eq!(bytes[16], 1, "NBD_CMD_CONNECT");
        assert_eq!(bytes[17], VERSION);
        let a = attrs(&bytes[20..]);
        let types: Vec<u16> = a.iter().map(|(t, _)| *t).collect();
        // No NBD_ATTR_INDEX (1): the kernel picks the device.
        assert!(!types.contains(&1), "{types:?}");
        let get = |t: u16| &a.iter().find(|(ty, _)| *ty == t).unwrap().1;
        assert_eq!(u64_of(get(2)), 64 << 20);
        assert_eq!(u64_of(get(3)), 4096);
        assert_eq!(u64_of(get(4)), 5);
        assert_eq!(u64_of(get(5)), 0b101);
        assert_eq!(u64_of(get(6)), 1, "DESTROY_ON_DISCONNECT only");
        assert_eq!(u64_of(get(8)), 31, "sub-second timeouts round up");
        assert_eq!(get(10).as_slice(), b"pvc-0123\0");
        // NBD_ATTR_SOCKETS (nested flag 0x8000 | 7) holding two items.
        let socks = &a.iter().find(|(ty, _)| *ty == 0x8000 | 7).unwrap().1;
        let items = attrs(socks);
        assert_eq!(items.len(), 2);
        for (ty, p) in items {
            assert_eq!(ty, 0x8000 | 1, "NBD_SOCK_ITEM, nested");
            let inner = attrs(&p);
            assert_eq!(inner.len(), 1);
            assert_eq!(inner[0].0, 1, "NBD_SOCK_FD");
            assert_eq!(
                u32::from_ne_bytes(inner[0].1.clone().try_into().unwrap()),
                fd.as_raw_fd() as u32
            );
        }
    }

    #[test]
    fn connect_rejects_bad_geometry_and_no_sockets() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let mut c = cfg();
        c.block_size = 1000;
        assert!(matches!(
            connect_msg(&[f.as_fd()], &c),
            Err(Error::Invalid(_))
        ));
        let mut c = cfg();
        c.size_bytes = 4096 * 3 + 512;
        assert!(matches!(
            connect_msg(&[f.as_fd()], &c),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(connect_msg(&[], &cfg()), Err(Error::Invalid(_))));
    }

    #[test]
    fn reconfigure_disconnect_status_messages() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let rc = ReconfigureConfig {
            identifier: Some("pvc-0123".into()),
            io_timeout: None,
            dead_conn_timeout: Some(Duration::from_secs(60)),
            client_flags: None,
        };
        let b = encode(FAM, reconfigure_msg(7, &[f.as_fd()], &rc).unwrap()).unwrap();
        assert_eq!(b[16], 3, "NBD_CMD_RECONFIGURE");
        let a = attrs(&b[20..]);
        let types: Vec<u16> = a.iter().map(|(t, _)| *t).collect();
        assert_eq!(types, vec![1, 10, 8, 0x8000 | 7]);
        assert_eq!(a[1].1.as_slice(), b"pvc-0123\0");
        assert_eq!(u32::from_ne_bytes(a[0].1.clone().try_into().unwrap()), 7);

        let b = encode(FAM, disconnect_msg(3).unwrap()).unwrap();
        assert_eq!(b[16], 2, "NBD_CMD_DISCONNECT");
        assert_eq!(attrs(&b[20..]), vec![(1, 3u32.to_ne_bytes().to_vec())]);

        let b = encode(FAM, status_msg(None).unwrap()).unwrap();
        assert_eq!(b[16], 5, "NBD_CMD_STATUS");
        assert!(attrs(&b[20..]).is_empty());
    }

    /// Builds a reply the way nbd_genl_status does and parses it back.
    #[test]
    fn status_reply_parses() {
        let mut list = nested(NbdAttr::DeviceList).unwrap();
        for (i, c) in [(0u32, 1u8), (5, 0)] {
            let mut item = nested(NbdDeviceList::Item).unwrap();
            item.add_nested_attribute(&attr(NbdDeviceItem::Index, i).unwrap())
                .unwrap();
            item.add_nested_attribute(&attr(NbdDeviceItem::Connected, c).unwrap())
                .unwrap();
            list.add_nested_attribute(&item).unwrap();
        }
        let mut attrs = GenlBuffer::new();
        attrs.push(list);
        let msg = Genlmsghdr::new(NbdCmd::Status, VERSION, attrs);
        let mut buf = Cursor::new(Vec::new());
        msg.to_bytes(&mut buf).unwrap();
        let bytes = buf.into_inner();
        let parsed =
            NbdMsg::from_bytes_with_input(&mut Cursor::new(bytes.as_slice()), bytes.len()).unwrap();
        assert_eq!(
            parse_status_reply(&parsed).unwrap(),
            vec![
                DeviceStatus {
                    index: 0,
                    connected: true
                },
                DeviceStatus {
                    index: 5,
                    connected: false
                }
            ]
        );
        // And an empty list (no devices) is an empty Vec, not an error.
        let mut attrs = GenlBuffer::new();
        attrs.push(nested(NbdAttr::DeviceList).unwrap());
        let msg = Genlmsghdr::new(NbdCmd::Status, VERSION, attrs);
        assert_eq!(parse_status_reply(&msg).unwrap(), vec![]);
        // No list at all is a protocol error.
        let msg = Genlmsghdr::new(NbdCmd::Status, VERSION, GenlBuffer::new());
        assert!(matches!(
            parse_status_reply(&msg),
            Err(Error::Protocol { .. })
        ));
    }

    #[test]
    fn connect_reply_parses() {
        let mut attrs = GenlBuffer::new();
        attrs.push(attr(NbdAttr::Index, 42u32).unwrap());
        let msg = Genlmsghdr::new(NbdCmd::Connect, VERSION, attrs);
        assert_eq!(parse_connect_reply(&msg).unwrap(), 42);
        let msg = Genlmsghdr::new(NbdCmd::Connect, VERSION, GenlBuffer::new());
        assert!(parse_connect_reply(&msg).is_err());
    }

    #[test]
    fn errors_carry_the_errno() {
        let e = Error::Kernel {
            op: "reconfigure",
            errno: 22,
        };
        assert_eq!(e.errno(), Some(22));
        let s = e.to_string();
        assert!(s.contains("EINVAL"), "{s}");
        assert_eq!(Error::FamilyMissing.errno(), Some(2));
    }

    /// On a host without nbd.ko the family is missing, and says so; where
    /// nbd.ko is loaded the family resolves.
    #[test]
    fn open_reports_a_missing_family() {
        match NbdNetlink::open() {
            Ok(n) => assert!(n.family() > 0),
            Err(Error::FamilyMissing) => {}
            Err(e) => panic!("unexpected error opening the nbd family: {e}"),
        }
    }
}
