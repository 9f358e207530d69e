//! The Identity service of the node plugin.

use csi::pb::identity_server::Identity;
use csi::pb::*;
use tonic::{Request, Response, Status};

/// GetPluginInfo, GetPluginCapabilities and Probe.
pub struct IdentityService {
    /// Name from --drivername.
    pub name: String,
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

    /// The driver's capabilities (one list for both plugins of a driver).
    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: csi::capabilities::plugin(),
        }))
    }

    /// Ready when the kernel has the `nbd` netlink family: without nbd.ko
    /// this node can attach nothing. "Not ready", never an error (an error
    /// gets the plugin restarted, which cannot load a module).
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let ready = crate::plugin::attach::netlink(|nl| Ok(nl.family()))
            .await
            .is_ok();
        if !ready {
            tracing::warn!("probe: the kernel has no nbd netlink family (nbd.ko not loaded)");
        }
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}
