//! `raftsan demo`: a node on an embedded default configuration, checked with real clients.
//!
//! The configuration is a tgt `targets.conf` (printed, so a tgt user sees their own syntax), with
//! one 256 MiB sparse file as LUN 1. The check runs `iscsi-ls` (discovery and login) and a
//! `qemu-img` round trip of 16 MiB of pseudo-random data through the LU, comparing checksums.
//! Until the cluster lands this is one node; the three-node version replaces it then.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use raftsan_cluster::config;
use raftsan_target::portal::PortalServer;

const TARGET: &str = "iqn.2026-11.org.raftsan:demo";
const DISK_BYTES: u64 = 256 << 20;
const CHECK_BYTES: usize = 16 << 20;

pub async fn run(portal: SocketAddr, dir: Option<PathBuf>, check_only: bool) -> Result<()> {
    let (_tmp, dir) = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            (None, d)
        }
        None => {
            let t = tempfile::tempdir().context("creating a temporary directory")?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let disk = dir.join("disk.img");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&disk)
        .with_context(|| format!("creating {}", disk.display()))?;
    f.set_len(DISK_BYTES)?;
    drop(f);
    let conf_path = dir.join("targets.conf");
    let conf = format!(
        "# raftsan demo: the tgt syntax, served by raftsan\n<target {TARGET}>\n    backing-store {}\n</target>\n",
        disk.display()
    );
    std::fs::write(&conf_path, &conf)?;
    let mut cfg = config::parse_str(&conf, &conf_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    cfg.portals = vec![portal];
    cfg.data_dir = Some(dir.join("data"));
    std::fs::create_dir_all(dir.join("data"))?;

    let server = PortalServer::new(
        cfg.catalog.clone(),
        super::portal_settings(&cfg),
        cfg.data_dir.as_deref(),
    )?;
    let listener = server
        .bind(portal)
        .await
        .with_context(|| format!("listening on {portal}"))?;
    let serving = tokio::spawn(server.clone().serve(listener));
    let url = format!("iscsi://{portal}/{TARGET}/1");
    println!("raftsan demo: one node (the three-node cluster comes with replication)");
    println!("  data directory : {}", dir.display());
    println!("  configuration  : {}\n{}", conf_path.display(), indent(&conf));
    println!("  portal         : {portal} (TPGT 1)");
    println!("  target         : {TARGET}");
    println!(
        "  LUN 1          : {} ({} MiB, sparse file)",
        disk.display(),
        DISK_BYTES >> 20
    );
    println!("  try            : iscsi-ls -s iscsi://{portal}   |   qemu-img info {url}");

    let checked = check(portal, &url, &dir).await;
    match &checked {
        Ok(()) => println!("client check: OK"),
        Err(e) => println!("client check: FAILED: {e:#}"),
    }
    if !check_only {
        println!("serving until Ctrl-C");
        let _ = tokio::signal::ctrl_c().await;
    }
    server.shutdown();
    let _ = serving.await;
    checked
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("      {l}\n")).collect()
}

/// Discovery and login with `iscsi-ls`, then a write/read round trip with `qemu-img`.
async fn check(portal: SocketAddr, url: &str, dir: &Path) -> Result<()> {
    let ls = tokio::process::Command::new("iscsi-ls")
        .arg("-s")
        .arg(format!("iscsi://{portal}"))
        .output()
        .await;
    match ls {
        Err(_) => bail!("iscsi-ls not found: install libiscsi-bin (scripts/install-deps.sh does)"),
        Ok(o) if !o.status.success() => bail!("iscsi-ls failed: {}", String::from_utf8_lossy(&o.stderr)),
        Ok(o) => print!(
            "$ iscsi-ls -s iscsi://{portal}\n{}",
            indent(&String::from_utf8_lossy(&o.stdout))
        ),
    }
    let src = dir.join("check-in.raw");
    let back = dir.join("check-out.raw");
    let data = pseudo_random(CHECK_BYTES, 0x5eed);
    std::fs::write(&src, &data)?;
    let t = Instant::now();
    qemu_img(&["convert", "-n", "-f", "raw", "-O", "raw", path(&src), url]).await?;
    let wrote = t.elapsed();
    let t = Instant::now();
    qemu_img(&["convert", "-f", "raw", "-O", "raw", url, path(&back)]).await?;
    let read = t.elapsed();
    let got = std::fs::read(&back)?;
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&back);
    if got.len() < data.len() || got[..data.len()] != data[..] {
        bail!("qemu-img read back different data than it wrote");
    }
    let mib = (CHECK_BYTES >> 20) as f64;
    println!(
        "$ qemu-img convert: wrote {mib} MiB in {:.0} ms, read {} MiB back in {:.0} ms, identical",
        wrote.as_secs_f64() * 1e3,
        got.len() >> 20,
        read.as_secs_f64() * 1e3
    );
    Ok(())
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

async fn qemu_img(args: &[&str]) -> Result<()> {
    let o = tokio::process::Command::new("qemu-img")
        .args(args)
        .output()
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "qemu-img not found: install qemu-utils and qemu-block-extra (scripts/install-deps.sh does)"
            )
        })?;
    if !o.status.success() {
        bail!(
            "qemu-img {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}

/// xorshift64* bytes: reproducible, incompressible enough to catch misplaced blocks.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}
