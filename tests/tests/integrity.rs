//! Data integrity under concurrent load, with real tools end to end:
//! fio (CRC32C verification) → NBD → qemu-nbd (qemu's iSCSI driver) → raftsan.
//! Four fio jobs write their own 16 MiB regions at queue depth 16, then read everything back and
//! verify every block's checksum and header (offset, generation). A lost, torn, misplaced or stale
//! write fails fio's verification, and the test fails with it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use raftsan_tests::{Kind, run, start_single_target};

const IQN: &str = "iqn.2026-11.org.raftsan.test:integrity";

/// qemu-nbd serving the LU on a Unix socket, stopped on drop.
struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fio(uri: &str, extra: &[&str]) -> Result<String> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--size=16M",
        "--numjobs=4",
        "--offset_increment=16M",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--group_reporting",
        // No verify-state files in the working directory.
        "--verify_state_save=0",
    ])
    .args(extra);
    let out = run(&mut cmd, Duration::from_secs(120))?;
    let text = out.combined();
    ensure!(out.success(), "fio failed (verification or I/O error):\n{text}");
    ensure!(text.contains("err= 0"), "fio reported an error:\n{text}");
    Ok(text)
}

#[test]
fn concurrent_verified_writes_through_qemu_nbd() -> Result<()> {
    let (d, _) = start_single_target(Kind::Raftsan, IQN, 64 << 20, &[])?;
    let sock = d.dir().join("nbd.sock");
    let nbd = QemuNbd(
        Command::new("qemu-nbd")
            .arg("-k")
            .arg(&sock)
            .args(["-f", "raw", "-t", "-e", "4", "--cache=none"])
            .arg(d.lun_url(IQN, 1))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning qemu-nbd (qemu-utils with qemu-block-extra)")?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        ensure!(Instant::now() < deadline, "qemu-nbd did not create {}", sock.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    // 4 KiB blocks, then mixed sizes from 512 B to 1 MiB (R2T and multi-PDU Data-In paths).
    fio(&uri, &["--bs=4k"])?;
    fio(&uri, &["--bsrange=512-1M", "--verify_interval=512"])?;
    drop(nbd);
    d.stop()?;
    Ok(())
}
