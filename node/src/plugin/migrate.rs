//! Migration of volumes between node plugins (docs/migration.md, "Driven
//! by attach and detach"): the node's migration address serves the
//! engine's `Seed` service for every volume this process holds (routed by
//! the `r3map-volume` metadata) and the `NodeMigration` control service
//! the controller and the other nodes call. Kept apart from the CSI
//! socket, which only kubelet talks to.
//!
//! Roles: a node that holds a volume (staged, or unstaged and retained)
//! is a source; a node staged with a `migrateFrom` publish context pulls
//! the volume from that source through a [`Leech`] and is a target until
//! every chunk is here, then tells the source to release its copy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use csi::migration::PeerAuth;
use csi::nodepb::migration_status::Role;
use csi::nodepb::node_migration_server::{NodeMigration, NodeMigrationServer};
use csi::nodepb::{
    AbortReply, FinalizeReply, FinalizeRequest, MigrationStatus, ReleaseReply, ReleaseRequest,
    VolumeRequest,
};
use csi::CsiError;
use r3map::auth::{ServerAuth, VOLUME_HEADER};
use r3map::migration::pb::seed_server::{Seed, SeedServer};
use r3map::migration::pb::{self as seedpb};
use r3map::migration::seed::SeedService;
use r3map::migration::Leech;
use r3map::net::{self, Endpoint, Keepalive, Listener};
use r3map::Volume;
use tonic::{Request, Response, Status};

use super::node::NodeService;

/// The node's migration settings (from `--migration-listen` and the
/// `--migration-*` credentials).
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    /// Address of the migration service.
    pub listen: String,
    /// Credentials, both as server and as a client of other nodes.
    pub auth: PeerAuth,
    /// How long an unstaged volume's region is kept for the next node.
    pub retain_for: Duration,
    /// How long reads from a source are retried before it counts as lost.
    pub patience: Duration,
}

/// The volumes this process serves and the leeches pulling them here, by
/// volume id: what the migration server routes to. Separate from the
/// staged map so that a volume being unstaged stays reachable by its
/// target until it is closed.
#[derive(Default)]
pub struct Registry {
    vols: Mutex<HashMap<String, Arc<Volume>>>,
    leeches: Mutex<HashMap<String, Arc<Leech>>>,
}

impl Registry {
    /// Makes `vol` reachable as a migration source.
    pub fn insert_volume(&self, id: &str, vol: Arc<Volume>) {
        self.vols.lock().unwrap().insert(id.to_string(), vol);
    }

    /// Stops routing to the volume of `id`.
    pub fn remove_volume(&self, id: &str) -> Option<Arc<Volume>> {
        self.vols.lock().unwrap().remove(id)
    }

    /// The volume of `id`.
    pub fn volume(&self, id: &str) -> Option<Arc<Volume>> {
        self.vols.lock().unwrap().get(id).cloned()
    }

    /// Records the leech pulling `id` here.
    pub fn insert_leech(&self, id: &str, l: Arc<Leech>) {
        self.leeches.lock().unwrap().insert(id.to_string(), l);
    }

    /// Forgets the leech of `id`.
    pub fn remove_leech(&self, id: &str) -> Option<Arc<Leech>> {
        self.leeches.lock().unwrap().remove(id)
    }

    /// The leech pulling `id` here.
    pub fn leech(&self, id: &str) -> Option<Arc<Leech>> {
        self.leeches.lock().unwrap().get(id).cloned()
    }
}

/// Waits until `vol` is the only reference (a Seed read in flight holds a
/// clone for a moment), at most `wait`.
pub async fn take_unique(mut vol: Arc<Volume>, wait: Duration) -> Result<Volume, CsiError> {
    let t0 = Instant::now();
    loop {
        match Arc::try_unwrap(vol) {
            Ok(v) => return Ok(v),
            Err(v) if t0.elapsed() < wait => {
                vol = v;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(v) => {
                return Err(CsiError::Internal(format!(
                    "volume {} is still in use",
                    v.name()
                )))
            }
        }
    }
}

/// `Seed` for every volume of the registry, chosen by the `r3map-volume`
/// metadata of each call.
pub struct SeedRouter {
    reg: Arc<Registry>,
}

impl SeedRouter {
    // The Status goes straight back to tonic, which wants it unboxed.
    #[allow(clippy::result_large_err)]
    fn route<T>(&self, req: &Request<T>) -> Result<SeedService, Status> {
        let id = req
            .metadata()
            .get(VOLUME_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Status::invalid_argument(format!("{VOLUME_HEADER} metadata is required"))
            })?;
        let vol = self
            .reg
            .volume(id)
            .ok_or_else(|| Status::not_found(format!("volume {id:?} is not held on this node")))?;
        Ok(SeedService::new(vol.source().clone()))
    }
}

type SeedReadStream = <SeedService as Seed>::ReadStream;
type SeedHashesStream = <SeedService as Seed>::HashesStream;

#[tonic::async_trait]
impl Seed for SeedRouter {
    async fn info(
        &self,
        req: Request<seedpb::InfoRequest>,
    ) -> Result<Response<seedpb::InfoReply>, Status> {
        self.route(&req)?.info(req).await
    }

    async fn track(
        &self,
        req: Request<seedpb::TrackRequest>,
    ) -> Result<Response<seedpb::TrackReply>, Status> {
        let id = req.metadata().get(VOLUME_HEADER).cloned();
        let r = self.route(&req)?.track(req).await;
        tracing::info!(volume = ?id, ok = r.is_ok(), "migration: a target started tracking");
        r
    }

    async fn abort(
        &self,
        req: Request<seedpb::AbortRequest>,
    ) -> Result<Response<seedpb::AbortReply>, Status> {
        self.route(&req)?.abort(req).await
    }

    type ReadStream = SeedReadStream;

    async fn read(
        &self,
        req: Request<seedpb::ReadRequest>,
    ) -> Result<Response<SeedReadStream>, Status> {
        self.route(&req)?.read(req).await
    }

    async fn finalize(
        &self,
        req: Request<seedpb::FinalizeRequest>,
    ) -> Result<Response<seedpb::FinalizeReply>, Status> {
        self.route(&req)?.finalize(req).await
    }

    async fn dirty(
        &self,
        req: Request<seedpb::DirtyRequest>,
    ) -> Result<Response<seedpb::DirtyReply>, Status> {
        self.route(&req)?.dirty(req).await
    }

    type HashesStream = SeedHashesStream;

    async fn hashes(
        &self,
        req: Request<seedpb::HashesRequest>,
    ) -> Result<Response<SeedHashesStream>, Status> {
        self.route(&req)?.hashes(req).await
    }
}

/// The NodeMigration service over the node plugin.
pub struct MigrationService(pub Arc<NodeService>);

fn status(e: CsiError) -> Status {
    Status::from(e)
}

#[tonic::async_trait]
impl NodeMigration for MigrationService {
    async fn status(
        &self,
        req: Request<VolumeRequest>,
    ) -> Result<Response<MigrationStatus>, Status> {
        let id = req.into_inner().volume_id;
        csi::validate::volume_id(&id).map_err(status)?;
        Ok(Response::new(self.0.migration_status(&id).await))
    }

    async fn finalize(
        &self,
        req: Request<FinalizeRequest>,
    ) -> Result<Response<FinalizeReply>, Status> {
        let r = req.into_inner();
        csi::validate::volume_id(&r.volume_id).map_err(status)?;
        use tracing::Instrument;
        let span = tracing::info_span!("NodeMigration.Finalize", volume = %r.volume_id);
        self.0
            .finalize_target(&r.volume_id, r.seed_lost)
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn abort(&self, req: Request<VolumeRequest>) -> Result<Response<AbortReply>, Status> {
        let id = req.into_inner().volume_id;
        csi::validate::volume_id(&id).map_err(status)?;
        self.0.abort_migration(&id).await.map_err(status)?;
        Ok(Response::new(AbortReply {}))
    }

    async fn release(
        &self,
        req: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseReply>, Status> {
        let id = req.into_inner().volume_id;
        csi::validate::volume_id(&id).map_err(status)?;
        self.0.release_retained(&id).await.map_err(status)?;
        Ok(Response::new(ReleaseReply {}))
    }
}

/// The bound migration address.
pub struct MigrationListener {
    listener: Listener,
    token: Option<r3map::auth::Token>,
    tls: Option<r3map::auth::ServerTls>,
}

impl MigrationListener {
    /// Binds `cfg.listen`: mutual TLS, or a token on loopback only.
    pub async fn bind(cfg: &MigrationConfig) -> Result<MigrationListener, CsiError> {
        let (token, tls) = cfg.auth.server(&cfg.listen)?;
        let ep = Endpoint::Tcp(cfg.listen.clone());
        let listener = Listener::bind(&ep, token.as_ref(), tls.as_ref())
            .await
            .map_err(|e| CsiError::InvalidArgument(format!("migration listen {ep}: {e}")))?;
        Ok(MigrationListener {
            listener,
            token,
            tls,
        })
    }

    /// HOST:PORT actually bound (port 0 resolved).
    pub fn local_addr(&self) -> String {
        self.listener.describe()
    }

    /// Serves both services until `stop` resolves.
    pub async fn serve(
        self,
        node: Arc<NodeService>,
        stop: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let auth = ServerAuth::new(self.token.as_ref());
        let seed = SeedRouter {
            reg: node.registry(),
        };
        let router = net::server(self.tls.as_ref(), Keepalive::MIGRATION)?
            .add_service(SeedServer::with_interceptor(seed, auth.clone()))
            .add_service(NodeMigrationServer::with_interceptor(
                MigrationService(node),
                auth,
            ));
        self.listener.serve(router, stop).await?;
        Ok(())
    }
}

/// The status of a volume that is neither pulled nor tracked here.
pub fn idle_status(id: &str, phase: &str, attached: bool) -> MigrationStatus {
    MigrationStatus {
        volume_id: id.to_string(),
        role: Role::None as i32,
        phase: phase.to_string(),
        attached,
        ..MigrationStatus::default()
    }
}
