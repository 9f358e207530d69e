//! r3map-nbd-probe: attaches a volume as /dev/nbdN through the kernel's
//! netlink interface and serves it in-process with the r3map engine, the
//! way the node plugin will; re-attaches a device whose server died; and
//! detaches. It runs inside the e2e guest (e2e/guest/netlink.sh), where the
//! kernel has nbd.ko.
//!
//! Exit codes: 0 ok, 1 error, 3 identifier mismatch (refused to re-attach),
//! 4 the kernel dropped the new socket at RECONFIGURE (old one still live),
//! 5 the device is not configured (nothing to re-attach).

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use r3map::nbd::{Export, Server};
use r3map_csi_node::device::sysfs::NbdSysfs;
use r3map_csi_node::device::{ClientFlags, ConnectConfig, NbdNetlink, ReconfigureConfig};

#[derive(Parser)]
#[command(about = "Attach/re-attach/detach an NBD device over netlink, served by r3map")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Volume {
    /// Backend URI, e.g. file:/tmp/disk.img.
    #[arg(long)]
    backend: String,
    /// Volume size (e.g. 64MiB).
    #[arg(long, value_parser = r3map::size::parse)]
    size: u64,
    /// Volume id: the export name and the kernel's backend identifier.
    #[arg(long)]
    id: String,
    /// Connections (socketpairs) to hand the kernel.
    #[arg(long, default_value_t = 1)]
    conns: usize,
}

#[derive(Args)]
struct Timeouts {
    /// NBD_ATTR_TIMEOUT in seconds (omit: none).
    #[arg(long)]
    io_timeout: Option<u64>,
    /// NBD_ATTR_DEAD_CONN_TIMEOUT in seconds (omit: none).
    #[arg(long)]
    dead_conn_timeout: Option<u64>,
}

#[derive(Subcommand)]
enum Cmd {
    /// CONNECT (the kernel picks the device), then serve until SIGTERM or
    /// until the kernel disconnects.
    Attach {
        #[command(flatten)]
        vol: Volume,
        #[command(flatten)]
        timeouts: Timeouts,
        #[arg(long, default_value_t = 4096)]
        block_size: u64,
        /// Write the device index here once connected.
        #[arg(long)]
        index_file: Option<PathBuf>,
    },
    /// Check the device's backend identifier, RECONFIGURE it with new
    /// sockets, check the kernel kept them, then serve.
    Reattach {
        #[arg(long)]
        index: u32,
        /// Skip our sysfs identifier check, to see what the kernel does
        /// with a mismatching identifier (test only).
        #[arg(long)]
        no_sysfs_check: bool,
        #[command(flatten)]
        vol: Volume,
        #[command(flatten)]
        timeouts: Timeouts,
    },
    /// DISCONNECT.
    Detach {
        #[arg(long)]
        index: u32,
    },
    /// STATUS of one device: prints connected=0|1.
    Status {
        #[arg(long)]
        index: u32,
    },
    /// sysfs view of one device: backend, size, pid.
    Info {
        #[arg(long)]
        index: u32,
    },
}

fn say(msg: String) {
    // The guest script greps these lines; flush so they appear in order
    // with the script's own output.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "probe: {msg}");
    let _ = out.flush();
}

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse().cmd) {
        Ok(code) => code,
        Err(e) => {
            say(format!("error: {e}"));
            ExitCode::from(1)
        }
    }
}

fn run(cmd: Cmd) -> Result<ExitCode, BoxErr> {
    match cmd {
        Cmd::Attach {
            vol,
            timeouts,
            block_size,
            index_file,
        } => attach(vol, timeouts, block_size, index_file),
        Cmd::Reattach {
            index,
            no_sysfs_check,
            vol,
            timeouts,
        } => reattach(index, vol, timeouts, !no_sysfs_check),
        Cmd::Detach { index } => {
            NbdNetlink::open()?.disconnect(index)?;
            say(format!("detached index={index}"));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { index } => {
            let c = NbdNetlink::open()?.status(index)?;
            say(format!("status index={index} connected={}", u8::from(c)));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Info { index } => {
            let s = NbdSysfs::new(index);
            say(format!(
                "info index={index} backend={:?} size={} pid={:?}",
                s.backend()?,
                s.size_bytes()?,
                s.pid()?
            ));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, BoxErr> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// (kernel ends, our ends) of `n` stream socketpairs. Blocking and
/// close-on-exec: the kernel does its own waiting; our ends go to tokio.
fn pairs(n: usize) -> Result<(Vec<OwnedFd>, Vec<OwnedFd>), BoxErr> {
    let mut k = Vec::new();
    let mut ours = Vec::new();
    for _ in 0..n.max(1) {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        k.push(a);
        ours.push(b);
    }
    Ok((k, ours))
}

fn secs(s: Option<u64>) -> Option<Duration> {
    s.map(Duration::from_secs)
}

async fn open_server(vol: &Volume) -> Result<(Server, u16), BoxErr> {
    let backend =
        r3map::uri::open(&vol.backend, vol.size, r3map::backend::DEFAULT_CHUNK_SIZE).await?;
    let export = Export::new(vol.id.clone(), backend);
    let flags = export.transmission_flags(false);
    Ok((Server::single(export), flags))
}

/// Serves our ends until every connection ends (the kernel disconnected) or
/// SIGTERM; flushes the backend either way.
async fn serve(server: Server, id: &str, ours: Vec<OwnedFd>) -> Result<(), BoxErr> {
    let mut tasks = tokio::task::JoinSet::new();
    for fd in ours {
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(std)?;
        let (server, id) = (server.clone(), id.to_string());
        tasks.spawn(async move { server.serve_transmission(stream, &id).await });
    }
    let term = async {
        let _ = r3map::nbd::server::termination_signal().await;
    };
    tokio::pin!(term);
    loop {
        tokio::select! {
            r = tasks.join_next() => match r {
                None => {
                    say("all connections ended".into());
                    break;
                }
                Some(Ok(Err(e))) => say(format!("connection ended: {e}")),
                Some(_) => {}
            },
            _ = &mut term => {
                say("SIGTERM: flushing and leaving the device attached".into());
                break;
            }
        }
    }
    server.flush_all().await?;
    Ok(())
}

fn attach(
    vol: Volume,
    t: Timeouts,
    block_size: u64,
    index_file: Option<PathBuf>,
) -> Result<ExitCode, BoxErr> {
    let rt = runtime()?;
    let (server, flags) = rt.block_on(open_server(&vol))?;
    let (kernel, ours) = pairs(vol.conns)?;
    let cfg = ConnectConfig {
        size_bytes: vol.size,
        block_size,
        identifier: vol.id.clone(),
        io_timeout: secs(t.io_timeout),
        dead_conn_timeout: secs(t.dead_conn_timeout),
        server_flags: u64::from(flags),
        client_flags: ClientFlags::NODE_PLUGIN,
    };
    let fds: Vec<_> = kernel.iter().map(|f| f.as_fd()).collect();
    let index = NbdNetlink::open()?.connect(&fds, &cfg)?;
    // The kernel holds its own references now; ours would keep a socket
    // alive after the kernel let go of it.
    drop(fds);
    drop(kernel);
    if let Some(p) = index_file {
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, format!("{index}\n"))?;
        std::fs::rename(&tmp, &p)?;
    }
    say(format!(
        "attached index={index} dev=/dev/nbd{index} flags={flags:#x} pid={}",
        std::process::id()
    ));
    rt.block_on(serve(server, &vol.id, ours))?;
    Ok(ExitCode::SUCCESS)
}

/// Which of our ends saw their peer (the kernel's end) go away within
/// `wait`: the kernel drops a socket it had no dead slot for.
fn hung_up(ours: &[OwnedFd], wait: Duration) -> Result<Vec<usize>, BoxErr> {
    let mut pfds: Vec<_> = ours
        .iter()
        .map(|f| PollFd::new(f.as_fd(), PollFlags::empty()))
        .collect();
    let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
    poll(&mut pfds, PollTimeout::from(ms))?;
    Ok(pfds
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            p.revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
        })
        .map(|(i, _)| i)
        .collect())
}

fn reattach(index: u32, vol: Volume, t: Timeouts, check: bool) -> Result<ExitCode, BoxErr> {
    // Never hand a device another volume's data: compare the identifier
    // the device was connected with (ceph-csi#2529). The kernel compares
    // it too at RECONFIGURE, but only if the device has one; and a refusal
    // here says why in words.
    let sys = NbdSysfs::new(index);
    let have = sys.backend()?;
    if check && have.as_deref() != Some(vol.id.as_str()) {
        say(format!(
            "refused: /sys/block/nbd{index}/backend is {have:?}, want {:?}",
            vol.id
        ));
        return Ok(ExitCode::from(3));
    }
    let mut nl = NbdNetlink::open()?;
    if !nl.status(index)? {
        say(format!("refused: nbd{index} is not configured"));
        return Ok(ExitCode::from(5));
    }
    let rt = runtime()?;
    let (server, _) = rt.block_on(open_server(&vol))?;
    let (kernel, ours) = pairs(vol.conns)?;
    let fds: Vec<_> = kernel.iter().map(|f| f.as_fd()).collect();
    let cfg = ReconfigureConfig {
        identifier: Some(vol.id.clone()),
        io_timeout: secs(t.io_timeout),
        dead_conn_timeout: secs(t.dead_conn_timeout),
        client_flags: None,
    };
    nl.reconfigure(index, &fds, &cfg)?;
    drop(fds);
    drop(kernel);
    // RECONFIGURE reports success even when the kernel dropped the socket
    // (no dead slot for it). With our copy of the kernel end closed, a
    // dropped socket shows as POLLHUP on our end (a unix socket whose peer
    // is released is shut down both ways). Not POLLIN: the kernel may
    // already be resending requeued requests on a socket it kept.
    let dropped = hung_up(&ours, Duration::from_millis(200))?;
    let connected = nl.status(index)?;
    if !dropped.is_empty() {
        say(format!(
            "RECONFIGURE-DROPPED {} of {} sockets (the kernel reported success); connected={}",
            dropped.len(),
            ours.len(),
            u8::from(connected)
        ));
        return Ok(ExitCode::from(4));
    }
    say(format!(
        "reattached index={index} connected={} pid={}",
        u8::from(connected),
        std::process::id()
    ));
    rt.block_on(serve(server, &vol.id, ours))?;
    Ok(ExitCode::SUCCESS)
}
