//! `r3map-csi-call`: calls the node plugin's CSI Node service over its unix
//! socket, as kubelet would, for the e2e guest (e2e/guest/csi.sh) and for
//! people poking at a node. Prints one line `call: OK <method> ...` or
//! `call: ERROR <method> code=<Code> <message>` and exits 0 or 1.

use std::collections::HashMap;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use csi::capabilities::block;
use csi::pb::node_client::NodeClient;
use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::*;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(about = "Call the r3map-csi node plugin's Node service")]
struct Cli {
    /// The plugin's endpoint, unix:///PATH
    #[arg(long)]
    endpoint: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Vol {
    /// Volume id
    #[arg(long)]
    volume_id: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// NodeStageVolume (block, SINGLE_NODE_WRITER)
    Stage {
        #[command(flatten)]
        vol: Vol,
        #[arg(long)]
        staging_path: String,
        /// volume_context entries, KEY=VALUE (repeatable)
        #[arg(long = "context", value_parser = kv)]
        context: Vec<(String, String)>,
    },
    /// NodePublishVolume (block)
    Publish {
        #[command(flatten)]
        vol: Vol,
        #[arg(long)]
        staging_path: String,
        #[arg(long)]
        target_path: String,
        #[arg(long)]
        readonly: bool,
    },
    /// NodeUnpublishVolume
    Unpublish {
        #[command(flatten)]
        vol: Vol,
        #[arg(long)]
        target_path: String,
    },
    /// NodeUnstageVolume
    Unstage {
        #[command(flatten)]
        vol: Vol,
        #[arg(long)]
        staging_path: String,
    },
    /// NodeGetVolumeStats: prints total bytes and the condition
    Stats {
        #[command(flatten)]
        vol: Vol,
        #[arg(long)]
        path: String,
    },
    /// NodeExpandVolume
    Expand {
        #[command(flatten)]
        vol: Vol,
        #[arg(long)]
        path: String,
    },
    /// NodeGetInfo
    Info,
}

fn kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

async fn channel(endpoint: &str) -> Result<Channel, Box<dyn std::error::Error>> {
    Ok(csi::endpoint::connect(endpoint).await?)
}

fn report<T>(
    method: &str,
    r: Result<tonic::Response<T>, tonic::Status>,
    ok: impl FnOnce(T) -> String,
) -> ExitCode {
    match r {
        Ok(resp) => {
            println!("call: OK {method} {}", ok(resp.into_inner()));
            ExitCode::SUCCESS
        }
        Err(s) => {
            println!("call: ERROR {method} code={:?} {}", s.code(), s.message());
            ExitCode::from(1)
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let ch = match channel(&cli.endpoint).await {
        Ok(c) => c,
        Err(e) => {
            println!("call: ERROR connect {}: {e}", cli.endpoint);
            return ExitCode::from(1);
        }
    };
    let mut c = NodeClient::new(ch);
    let cap = Some(block(Mode::SingleNodeWriter));
    match cli.cmd {
        Cmd::Stage {
            vol,
            staging_path,
            context,
        } => {
            let r = c
                .node_stage_volume(NodeStageVolumeRequest {
                    volume_id: vol.volume_id,
                    staging_target_path: staging_path,
                    volume_capability: cap,
                    volume_context: context.into_iter().collect::<HashMap<_, _>>(),
                    ..Default::default()
                })
                .await;
            report("stage", r, |_| String::new())
        }
        Cmd::Publish {
            vol,
            staging_path,
            target_path,
            readonly,
        } => {
            let r = c
                .node_publish_volume(NodePublishVolumeRequest {
                    volume_id: vol.volume_id,
                    staging_target_path: staging_path,
                    target_path,
                    volume_capability: cap,
                    readonly,
                    ..Default::default()
                })
                .await;
            report("publish", r, |_| String::new())
        }
        Cmd::Unpublish { vol, target_path } => {
            let r = c
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: vol.volume_id,
                    target_path,
                })
                .await;
            report("unpublish", r, |_| String::new())
        }
        Cmd::Unstage { vol, staging_path } => {
            let r = c
                .node_unstage_volume(NodeUnstageVolumeRequest {
                    volume_id: vol.volume_id,
                    staging_target_path: staging_path,
                })
                .await;
            report("unstage", r, |_| String::new())
        }
        Cmd::Stats { vol, path } => {
            let r = c
                .node_get_volume_stats(NodeGetVolumeStatsRequest {
                    volume_id: vol.volume_id,
                    volume_path: path,
                    staging_target_path: String::new(),
                })
                .await;
            report("stats", r, |s| {
                let total = s.usage.first().map_or(0, |u| u.total);
                let (abnormal, msg) = s
                    .volume_condition
                    .map_or((true, "no condition".to_string()), |c| {
                        (c.abnormal, c.message)
                    });
                format!("total={total} abnormal={abnormal} message={msg:?}")
            })
        }
        Cmd::Expand { vol, path } => {
            let r = c
                .node_expand_volume(NodeExpandVolumeRequest {
                    volume_id: vol.volume_id,
                    volume_path: path,
                    volume_capability: cap,
                    ..Default::default()
                })
                .await;
            report("expand", r, |s| format!("capacity={}", s.capacity_bytes))
        }
        Cmd::Info => {
            let r = c.node_get_info(NodeGetInfoRequest {}).await;
            report("info", r, |s| format!("node_id={}", s.node_id))
        }
    }
}
