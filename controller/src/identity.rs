//! The Identity service of the controller plugin.

use std::sync::Arc;

use csi::pb::identity_server::Identity;
use csi::pb::*;
use tonic::{Request, Response, Status};

use crate::region::Regions;

/// GetPluginInfo, GetPluginCapabilities and Probe.
pub struct IdentityService {
    /// Name from --drivername.
    pub name: String,
    /// To probe the region service.
    pub regions: Arc<Regions>,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: csi::capabilities::plugin(),
        }))
    }

    /// Ready when the region service answers; a down region service is
    /// "not ready", never an error (an error would get the plugin
    /// restarted, which cannot help).
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let ready = self.regions.reachable().await;
        if !ready {
            tracing::warn!("probe: region service unreachable");
        }
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}
