//! `r3map-csi-demo`: the one-command walkthrough of r3map-csi with no
//! cluster (see `r3map_csi_node::demo`). Runs on this host when its kernel
//! has the NBD client and this is root, otherwise inside the project's
//! qemu guest (e2e/guest), whose console it prints.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::{Parser, Subcommand};
use r3map_csi_node::demo::{self, app, Options};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Walk through r3map-csi with no cluster: provision, attach, mmap, migrate live, verify"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Run on this host (needs nbd.ko and root) instead of choosing
    #[arg(long, conflicts_with = "guest")]
    here: bool,
    /// Run inside the qemu guest even if this host could
    #[arg(long)]
    guest: bool,
    /// Volume size
    #[arg(long, default_value = "64MiB", value_parser = r3map::size::parse)]
    size: u64,
    /// Chunk size of the managed cache
    #[arg(long, default_value = "256KiB")]
    chunk: String,
    /// Also roll a migration back and hand the volume back (what CI runs)
    #[arg(long)]
    all: bool,
    /// Progress as lines instead of a redrawn bar
    #[arg(long)]
    plain: bool,
    /// Scratch directory
    #[arg(long, default_value = "/tmp/r3map-csi-demo")]
    work: PathBuf,
    /// The kubelet directory the plugins accept paths under
    #[arg(long, default_value = "/tmp/r3map-csi-demo-kubelet")]
    kubelet_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The demo's application: mmap a device and write until SIGTERM
    #[command(hide = true)]
    AppWrite {
        #[arg(long)]
        path: PathBuf,
        #[arg(long)]
        seed: u64,
        #[arg(long, default_value_t = 16)]
        batch: usize,
        #[arg(long)]
        ready: PathBuf,
        #[arg(long)]
        gens: PathBuf,
    },
    /// The demo's verifier: check every page of a device
    #[command(hide = true)]
    AppVerify {
        #[arg(long)]
        path: PathBuf,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        gens: PathBuf,
    },
}

fn host_can_run() -> bool {
    nix::unistd::geteuid().is_root()
        && (Path::new("/sys/module/nbd").exists()
            || Command::new("modprobe")
                .arg("nbd")
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()))
}

fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Boots the guest with the demo scenario and prints its console.
fn in_guest(cli: &Cli) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let guest = root.join("e2e/guest");
    let bins: Vec<String> = [
        "r3map",
        "r3map-csi-controller",
        "r3map-csi-node",
        "r3map-csi-demo",
    ]
    .iter()
    .map(|b| bin_dir().join(b).display().to_string())
    .collect();
    println!("this host cannot attach NBD devices (no nbd.ko, or not root): running inside the qemu guest (e2e/guest, software emulation: slow, timings are not meaningful)");
    let st = Command::new("bash")
        .arg(guest.join("prepare.sh"))
        .env("R3MAP_GUEST_EXTRA_BINS", bins.join(" "))
        .env("R3MAP_GUEST_IMAGE", "initramfs-demo.gz")
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        return Err("e2e/guest/prepare.sh failed (it needs apt-get download, busybox-static, nbd-client, qemu-system-x86: bash .ci/install-deps installs them)".into());
    }
    let mut append = format!(
        "r3map_scenario=demo r3map_demo_size={} r3map_demo_chunk={}",
        cli.size, cli.chunk
    );
    if cli.all {
        append.push_str(" r3map_demo_all=1");
    }
    let out = Command::new("bash")
        .arg(guest.join("run.sh"))
        .args(["0", "1"])
        .env("R3MAP_GUEST_INITRAMFS", "initramfs-demo.gz")
        .env("R3MAP_GUEST_APPEND", append)
        .env("R3MAP_GUEST_TIMEOUT", "1500")
        // Its files (store, two caches, binaries) live in RAM.
        .env("R3MAP_GUEST_MEM", "2G")
        .status()?;
    Ok(out.success())
}

fn main() {
    let cli = Cli::parse();
    let r: Result<bool, Box<dyn std::error::Error + Send + Sync>> = match &cli.cmd {
        Some(Cmd::AppWrite {
            path,
            seed,
            batch,
            ready,
            gens,
        }) => app::write(path, *seed, *batch, ready, gens).map(|()| true),
        Some(Cmd::AppVerify { path, seed, gens }) => {
            app::verify(path, *seed, gens).map(|(n, first)| {
                println!("verified {n} first_read_us={}", first.as_micros());
                true
            })
        }
        None if cli.guest || (!cli.here && !host_can_run()) => in_guest(&cli),
        None => {
            let o = Options {
                bin_dir: bin_dir(),
                work: cli.work.clone(),
                kubelet_dir: cli.kubelet_dir.clone(),
                size: cli.size,
                chunk: cli.chunk.clone(),
                seed: std::process::id() as u64,
                all: cli.all,
                plain: cli.plain,
            };
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            rt.block_on(async {
                let s = demo::run(&o).await?;
                s.print(o.size);
                println!("demo: PASS");
                Ok(true)
            })
        }
    };
    match r {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("r3map-csi-demo: {e}");
            std::process::exit(1);
        }
    }
}
