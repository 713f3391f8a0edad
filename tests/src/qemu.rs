//! Data in and out of a cluster LU with qemu-img's iSCSI driver, and reproducible test data.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use sha2::{Digest, Sha256};

use crate::cluster::Cluster;
use crate::run;

/// How long one qemu-img copy may take.
pub const CLIENT: Duration = Duration::from_secs(180);

/// The `iscsi://` URL of `target` LUN `lun` through node `node`'s portal.
pub fn url(c: &Cluster, node: u64, target: &str, lun: u64) -> Result<String> {
    Ok(format!("iscsi://{}/{target}/{lun}", c.node(node)?.portal()))
}

/// Reproducible pseudo-random bytes (xorshift64*).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
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

/// SHA-256 of `data`, hex.
pub fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Writes the file `src` to the start of the LU at `url`.
pub fn write(src: &Path, url: &str) -> Result<()> {
    let out = run(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(src)
            .arg(url),
        CLIENT,
    )?;
    ensure!(out.success(), "qemu-img write to {url} failed:\n{}", out.combined());
    Ok(())
}

/// Reads `len` bytes from the start of the LU at `url` (through a file in `dir`).
pub fn read(url: &str, dir: &Path, len: usize) -> Result<Vec<u8>> {
    let back = dir.join(format!("read-{}.raw", std::process::id()));
    let out = run(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", url])
            .arg(&back),
        CLIENT,
    )?;
    ensure!(out.success(), "qemu-img read from {url} failed:\n{}", out.combined());
    let mut data = fs::read(&back)?;
    let _ = fs::remove_file(&back);
    ensure!(data.len() >= len, "read {} bytes, wanted {len}", data.len());
    data.truncate(len);
    Ok(data)
}
