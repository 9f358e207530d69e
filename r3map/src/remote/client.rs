//! The client side: [`Client`] manages regions, and [`RemoteBackend`] is a
//! [`Backend`] over one region, reached by a URI
//! `r3map://HOST:PORT/REGION?token-file=PATH&ca=PATH&cert=PATH&key=PATH`.
//!
//! All calls of one client share one HTTP/2 connection, which multiplexes
//! them: concurrent NBD requests become concurrent streams.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use tonic::{Code, Status};

use super::pb::region_store_client::RegionStoreClient;
use super::pb::*;
use crate::read_stream::ReadStream;

/// The region service's streamed read, called by hand (see `read_stream`).
const READ_PATH: &str = "/r3map.remote.v1.RegionStore/Read";
use crate::auth::{AuthError, ClientTls, Token};
use crate::backend::{check_range, Backend, Error, Result};
use crate::net::{self, Keepalive, NetError};

/// The generated region client over an authenticated channel.
pub type Grpc = RegionStoreClient<net::AuthedChannel>;

/// Largest message a client decodes (a read piece is 1 MiB).
const MAX_MESSAGE: usize = 64 << 20;

/// Why a client could not be set up, or a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A bad address, URI or setting.
    #[error("{0}")]
    Config(String),
    /// The token or TLS files could not be used.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The server could not be reached (or the handshake failed).
    #[error("cannot connect to {to}: {source}")]
    Connect {
        /// The address dialled.
        to: String,
        /// Why: the socket, TLS or HTTP/2 error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Boxed: a Status is large, and this error is returned often.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(Box<Status>),
}

impl From<NetError> for ClientError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Config(m) => ClientError::Config(m),
            NetError::Io(e) => ClientError::Config(e.to_string()),
            NetError::Connect { to, source } => ClientError::Connect { to, source },
        }
    }
}

impl From<Status> for ClientError {
    fn from(s: Status) -> Self {
        ClientError::Status(Box::new(s))
    }
}

impl ClientError {
    /// The gRPC status code when the server answered with an error.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

impl From<ClientError> for Error {
    fn from(e: ClientError) -> Error {
        match e {
            ClientError::Config(m) => Error::InvalidArgument(m),
            ClientError::Auth(a) => Error::InvalidArgument(a.to_string()),
            c @ ClientError::Connect { .. } => Error::Unavailable(c.to_string()),
            ClientError::Status(s) => Error::from(*s),
        }
    }
}

/// How to reach a region server.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// HOST:PORT (an IPv6 host in brackets).
    pub addr: String,
    /// File holding the bearer token, if the server wants one.
    pub token_file: Option<PathBuf>,
    /// TLS, needed for a host that is not loopback.
    pub tls: Option<ClientTls>,
}

impl ConnectOptions {
    /// No token, no TLS: for a loopback server.
    pub fn plain(addr: impl Into<String>) -> Self {
        ConnectOptions {
            addr: addr.into(),
            ..Default::default()
        }
    }

    /// The host part of `addr`, without IPv6 brackets.
    fn host(&self) -> Result<&str, ClientError> {
        net::host_port(&self.addr)
            .map(|(host, _)| host)
            .ok_or_else(|| ClientError::Config(format!("{:?} is not HOST:PORT", self.addr)))
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A parsed `r3map://HOST:PORT/REGION?...` URI.
#[derive(Debug, Clone)]
pub struct RemoteUri {
    /// How to reach the server.
    pub opts: ConnectOptions,
    /// The region's id.
    pub region: String,
    /// `epoch=N`: write with fencing epoch N (a writer that holds it).
    pub epoch: Option<u64>,
    /// `fence=OWNER`: take the region over at open, at one past its
    /// current epoch, for OWNER.
    pub fence: Option<String>,
}

impl RemoteUri {
    /// Parameters: `token-file`, `ca` (turns TLS on), `cert` and `key` (a
    /// client certificate for mutual TLS), `tls-name` (the name the server
    /// certificate carries, when not the host), `epoch` (the fencing epoch
    /// this writer holds) or `fence` (an owner name: take the region over
    /// at open). Paths are taken literally.
    pub fn parse(uri: &str) -> Result<RemoteUri, ClientError> {
        let bad = |why: &str| ClientError::Config(format!("invalid backend {uri:?}: {why}"));
        let rest = uri
            .strip_prefix("r3map://")
            .ok_or_else(|| bad("expected r3map://HOST:PORT/REGION"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (addr, region) = path
            .split_once('/')
            .ok_or_else(|| bad("no region: expected r3map://HOST:PORT/REGION"))?;
        super::check_id(region).map_err(|e| bad(&e.to_string()))?;
        let (mut token_file, mut ca, mut cert, mut key, mut name) = (None, None, None, None, None);
        let (mut epoch, mut fence) = (None, None);
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad("parameters are KEY=VALUE"))?;
            if v.is_empty() {
                return Err(bad(&format!("{k} is empty")));
            }
            let slot = match k {
                "token-file" => &mut token_file,
                "ca" => &mut ca,
                "cert" => &mut cert,
                "key" => &mut key,
                "tls-name" => &mut name,
                "epoch" => &mut epoch,
                "fence" => &mut fence,
                _ => return Err(bad(&format!("unknown parameter {k:?}"))),
            };
            *slot = Some(v.to_string());
        }
        let tls = match ca {
            Some(ca) => Some(ClientTls {
                ca: ca.into(),
                cert: cert.map(Into::into),
                key: key.map(Into::into),
                server_name: name,
            }),
            None if cert.is_some() || key.is_some() || name.is_some() => {
                return Err(bad("cert, key and tls-name need ca (TLS)"))
            }
            None => None,
        };
        let opts = ConnectOptions {
            addr: addr.to_string(),
            token_file: token_file.map(Into::into),
            tls,
        };
        let host = opts.host().map_err(|e| bad(&e.to_string()))?;
        if opts.tls.is_none() && !is_loopback(host) {
            return Err(bad(
                "plain HTTP/2 is only for loopback: give ca=PATH for TLS to another host",
            ));
        }
        let epoch = match epoch {
            Some(e) => Some(e.parse::<u64>().map_err(|_| bad("epoch is a number"))?),
            None => None,
        };
        if epoch.is_some() && fence.is_some() {
            return Err(bad("give epoch (held) or fence (take over), not both"));
        }
        Ok(RemoteUri {
            opts,
            region: region.to_string(),
            epoch,
            fence,
        })
    }
}

/// A connection to a region server.
#[derive(Clone)]
pub struct Client {
    grpc: Grpc,
    /// The channel under `grpc`, for the read stream ([`super::stream`]).
    chan: net::AuthedChannel,
    limits: Limits,
}

impl Client {
    /// Connects (TLS handshake included) and asks for the server's limits,
    /// so a wrong token or certificate fails here.
    pub async fn connect(opts: &ConnectOptions) -> Result<Client, ClientError> {
        let host = opts.host()?;
        if opts.tls.is_none() && !is_loopback(host) {
            return Err(ClientError::Config(format!(
                "refusing plain HTTP/2 to {}: not loopback; use TLS",
                opts.addr
            )));
        }
        let token = opts
            .token_file
            .as_deref()
            .map(Token::from_file)
            .transpose()?;
        let ch = net::connect(
            &net::Endpoint::Tcp(opts.addr.clone()),
            token.as_ref(),
            opts.tls.as_ref(),
            Keepalive::REGION,
        )
        .await?;
        let mut grpc = RegionStoreClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE);
        let limits = grpc.get_limits(GetLimitsRequest {}).await?.into_inner();
        if limits.max_request == 0 {
            return Err(ClientError::Config("server reports max_request 0".into()));
        }
        Ok(Client {
            grpc,
            chan: ch,
            limits,
        })
    }

    /// The server's limits, asked for at connect.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The generated client, for calls this wrapper does not offer.
    pub fn grpc(&self) -> Grpc {
        self.grpc.clone()
    }

    /// Creates a region of `size` bytes, with `id` or one the server picks.
    pub async fn create_region(&self, id: Option<&str>, size: u64) -> Result<Region, Status> {
        let req = CreateRegionRequest {
            size,
            id: id.map(str::to_string),
        };
        Ok(self.grpc().create_region(req).await?.into_inner())
    }

    /// The region `id` (size, epoch, owner).
    pub async fn get_region(&self, id: &str) -> Result<Region, Status> {
        let req = GetRegionRequest { id: id.into() };
        Ok(self.grpc().get_region(req).await?.into_inner())
    }

    /// Every region of the server.
    pub async fn list_regions(&self) -> Result<Vec<Region>, Status> {
        let r = self.grpc().list_regions(ListRegionsRequest {}).await?;
        Ok(r.into_inner().regions)
    }

    /// Sets the size of region `id`.
    pub async fn resize_region(&self, id: &str, size: u64) -> Result<Region, Status> {
        let req = ResizeRegionRequest {
            id: id.into(),
            size,
        };
        Ok(self.grpc().resize_region(req).await?.into_inner())
    }

    /// Hands region `id` to `owner` at `epoch` (see `Fence` in remote.proto).
    pub async fn fence(&self, id: &str, epoch: u64, owner: &str) -> Result<Region, Status> {
        let req = FenceRequest {
            id: id.into(),
            epoch,
            owner: owner.into(),
        };
        Ok(self.grpc().fence(req).await?.into_inner())
    }

    /// Deletes region `id` and its data.
    pub async fn delete_region(&self, id: &str) -> Result<(), Status> {
        let req = DeleteRegionRequest { id: id.into() };
        self.grpc().delete_region(req).await?;
        Ok(())
    }

    /// A backend over an existing region, at its current size, writing
    /// unfenced (epoch 0) until [`RemoteBackend::set_epoch`] or
    /// [`Backend::fence`].
    pub async fn backend(&self, id: &str) -> Result<RemoteBackend, Status> {
        let r = self.get_region(id).await?;
        Ok(RemoteBackend {
            grpc: self.grpc(),
            chan: self.chan.clone(),
            region: r.id,
            size: r.size,
            max_request: self.limits.max_request,
            epoch: AtomicU64::new(0),
        })
    }
}

/// A [`Backend`] over one region of a region server. Its size is the
/// region's when opened; a later resize needs a new `RemoteBackend`.
/// Every mutating call carries the writer's fencing epoch.
pub struct RemoteBackend {
    grpc: Grpc,
    chan: net::AuthedChannel,
    region: String,
    size: u64,
    max_request: u64,
    epoch: AtomicU64,
}

impl RemoteBackend {
    /// A checked range of this region, for the calls that take one.
    fn range(&self, offset: u64, len: u64) -> Result<RangeRequest> {
        check_range(offset, len, self.size)?;
        Ok(RangeRequest {
            region: self.region.clone(),
            offset,
            length: len,
            epoch: self.epoch.load(Ordering::SeqCst),
        })
    }

    /// Opens the region named by an `r3map://` URI, creating it with `size`
    /// bytes if it does not exist. A region of another size is refused;
    /// `size` 0 takes the region as it is.
    pub async fn open_uri(uri: &str, size: u64) -> Result<RemoteBackend> {
        let u = RemoteUri::parse(uri).map_err(|e| Error::InvalidUri {
            uri: uri.to_string(),
            reason: e.to_string(),
        })?;
        let c = Client::connect(&u.opts)
            .await
            .map_err(|e| Error::from(e).context(&u.opts.addr))?;
        if size > 0 {
            c.create_region(Some(&u.region), size)
                .await
                .map_err(|s| Error::from(s).context(&u.region))?;
        }
        let b = c.backend(&u.region).await.map_err(status_error)?;
        if let Some(e) = u.epoch {
            b.set_epoch(e);
        }
        if let Some(owner) = &u.fence {
            let r = c.get_region(&u.region).await.map_err(status_error)?;
            b.fence(r.epoch + 1, owner).await?;
        }
        Ok(b)
    }

    /// The region's id.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Writes with `epoch` from now on, without fencing: for a writer that
    /// already holds it (a process restarted with its epoch recorded). The
    /// server refuses the writes if the region has moved on.
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    /// One streamed read of `offset..offset+len` (at most the server's
    /// maximum request), each piece handed to `take` as it arrives: the
    /// pieces are slices of what was received, not copies.
    async fn read_call(
        &self,
        offset: u64,
        len: u64,
        mut take: impl FnMut(prost::bytes::Bytes),
    ) -> Result<()> {
        let req = ReadRequest {
            region: self.region.clone(),
            offset,
            length: len,
        };
        let mut stream: ReadStream<super::pb::ReadChunk> =
            ReadStream::start(&self.chan, READ_PATH, req, MAX_MESSAGE).await?;
        let mut pos = 0u64;
        while let Some(piece) = stream.next().await? {
            // Pieces come in order and tile the range exactly; anything
            // else is a broken server, not data to trust.
            let n = piece.data.len() as u64;
            if piece.offset != offset + pos || n > len - pos {
                return Err(protocol_error(format!(
                    "read piece {}+{n} does not follow {} in {offset}+{len}",
                    piece.offset,
                    offset + pos,
                )));
            }
            pos += n;
            take(piece.data);
        }
        if pos != len {
            return Err(protocol_error(format!(
                "short read: {pos} of {len} bytes at {offset}"
            )));
        }
        Ok(())
    }
}

/// A failed call as an engine error, its kind kept ([`crate::grpc`]).
fn status_error(s: Status) -> Error {
    Error::from(s)
}

fn protocol_error(msg: String) -> Error {
    Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, msg))
}

#[async_trait]
impl Backend for RemoteBackend {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let step = self.max_request as usize;
        let mut pos = 0;
        // A range over the server's limit becomes several calls.
        for part in buf.chunks_mut(step) {
            let mut at = 0;
            self.read_call(offset + pos as u64, part.len() as u64, |p| {
                part[at..at + p.len()].copy_from_slice(&p);
                at += p.len();
            })
            .await?;
            pos += part.len();
        }
        Ok(())
    }

    async fn read_pieces(&self, offset: u64, len: u64) -> Result<Vec<prost::bytes::Bytes>> {
        check_range(offset, len, self.size)?;
        let mut pieces = Vec::with_capacity(len.div_ceil(super::READ_PIECE) as usize);
        let mut pos = 0;
        while pos < len {
            let n = self.max_request.min(len - pos);
            self.read_call(offset + pos, n, |p| pieces.push(p)).await?;
            pos += n;
        }
        Ok(pieces)
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(offset, data.len() as u64, self.size)?;
        let mut pos = 0;
        for part in data.chunks(self.max_request as usize) {
            let req = WriteRequest {
                region: self.region.clone(),
                offset: offset + pos as u64,
                data: prost::bytes::Bytes::copy_from_slice(part),
                epoch: self.epoch.load(Ordering::SeqCst),
            };
            self.grpc.clone().write(req).await.map_err(status_error)?;
            pos += part.len();
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        let req = FlushRequest {
            region: self.region.clone(),
            epoch: self.epoch.load(Ordering::SeqCst),
        };
        self.grpc.clone().flush(req).await.map_err(status_error)?;
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let req = self.range(offset, len)?;
        self.grpc.clone().trim(req).await.map_err(status_error)?;
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let req = self.range(offset, len)?;
        self.grpc
            .clone()
            .write_zeroes(req)
            .await
            .map_err(status_error)?;
        Ok(())
    }

    /// The server flushes the whole region, whoever wrote it.
    fn flush_is_global(&self) -> bool {
        true
    }

    fn epoch(&self) -> Option<u64> {
        Some(self.epoch.load(Ordering::SeqCst))
    }

    async fn fence(&self, epoch: u64, owner: &str) -> Result<()> {
        let req = FenceRequest {
            id: self.region.clone(),
            epoch,
            owner: owner.into(),
        };
        self.grpc.clone().fence(req).await.map_err(status_error)?;
        self.epoch.store(epoch, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let u = RemoteUri::parse("r3map://127.0.0.1:7000/vol1?token-file=/t").unwrap();
        assert_eq!(u.region, "vol1");
        assert_eq!(u.opts.addr, "127.0.0.1:7000");
        assert_eq!(u.opts.token_file.as_deref(), Some("/t".as_ref()));
        assert!(u.opts.tls.is_none());
        let u = RemoteUri::parse("r3map://[::1]:7000/v").unwrap();
        assert_eq!(u.opts.host().unwrap(), "::1");
        let u = RemoteUri::parse("r3map://store.example:7000/v?ca=/ca&cert=/c&key=/k&tls-name=s")
            .unwrap();
        let tls = u.opts.tls.unwrap();
        assert_eq!(tls.server_name.as_deref(), Some("s"));
        assert_eq!(tls.cert.as_deref(), Some("/c".as_ref()));
        for bad in [
            "r3map://store.example:7000/v",     // plain to another host
            "r3map://127.0.0.1:7000",           // no region
            "r3map://127.0.0.1:7000/a/b",       // bad region id
            "r3map://127.0.0.1/v",              // no port
            "r3map://127.0.0.1:7000/v?x=1",     // unknown parameter
            "r3map://127.0.0.1:7000/v?cert=/c", // cert without ca
            "r3map://127.0.0.1:7000/v?ca=",     // empty value
        ] {
            assert!(RemoteUri::parse(bad).is_err(), "{bad}");
        }
    }
}
