//! `raftsan-initiator` as users run it, against standalone raftsan and against tgtd (single
//! path): discovery from the CLI, `attach` with an NBD export, a 64 MiB nbdcopy round trip with
//! matching checksums, fio through its nbd engine with crc32c verification, `session` output, and
//! logout/login of a path while attached.

use std::fs;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use raftsan_tests::initiator::{self, Attach, FioRun, fio_ios};
use raftsan_tests::{Kind, Scratch, run, start_single_target};
use rand::{RngCore, SeedableRng, rngs::StdRng};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
const INITIATOR: &str = "iqn.2026-11.org.raftsan.test:nbd-client";

fn sha256_file(path: &std::path::Path) -> Result<String> {
    Ok(hex::encode(Sha256::digest(fs::read(path)?)))
}

fn attach_and_use(kind: Kind) -> Result<()> {
    let iqn = format!(
        "iqn.2026-11.org.raftsan.test:nbd-{}",
        if kind == Kind::Tgtd { "tgt" } else { "raftsan" }
    );
    let (daemon, _) = start_single_target(kind, &iqn, 96 * MIB, &[])?;
    let portal = daemon.portal().to_string();
    let scratch = Scratch::new()?;
    let dir = scratch.path();
    let cfg = initiator::write_config(dir, INITIATOR, "")?;

    // discover prints iscsiadm's "portal,tpgt target" lines.
    let out = initiator::run(&cfg, &["discover", "--portal", &portal])?;
    ensure!(out.success(), "discover failed:\n{}", out.combined());
    ensure!(
        out.stdout.lines().any(|l| l == format!("{portal},1 {iqn}")),
        "discover output:\n{}",
        out.combined()
    );

    // A test login (nothing attached yet) prints the negotiated parameters.
    let out = initiator::run(&cfg, &["login", "--portal", &portal, "--target", &iqn])?;
    ensure!(
        out.success() && out.stdout.contains("successful"),
        "login failed:\n{}",
        out.combined()
    );

    let mut attach = Attach::start(
        dir,
        &cfg,
        &iqn,
        std::slice::from_ref(&portal),
        &["--lun", "1"],
        Duration::from_secs(30),
    )?;
    let uri = attach.uri();

    let info = run(Command::new("nbdinfo").args(["--json", &uri]), Duration::from_secs(30))?;
    ensure!(info.success(), "nbdinfo failed:\n{}", info.combined());
    let v: serde_json::Value = serde_json::from_str(&info.stdout)?;
    ensure!(
        v["exports"][0]["export-size"].as_u64() == Some(96 * MIB),
        "nbdinfo: {v}"
    );

    // 64 MiB of random bytes in and out through the NBD export.
    let src = dir.join("src.img");
    let mut data = vec![0u8; (64 * MIB) as usize];
    StdRng::seed_from_u64(4).fill_bytes(&mut data);
    fs::write(&src, &data)?;
    drop(data);
    let copy_in = run(
        Command::new("nbdcopy").args([src.to_str().unwrap_or_default(), &uri]),
        Duration::from_secs(120),
    )?;
    ensure!(copy_in.success(), "nbdcopy in failed:\n{}", copy_in.combined());
    let back = dir.join("back.img");
    // nbdcopy 1.14 has no --length: copy the whole export and compare its first 64 MiB.
    let copy_out = run(
        Command::new("nbdcopy").args([&uri, back.to_str().unwrap_or_default()]),
        Duration::from_secs(120),
    )?;
    ensure!(copy_out.success(), "nbdcopy out failed:\n{}", copy_out.combined());
    let mut back_bytes = fs::read(&back)?;
    ensure!(
        back_bytes.len() as u64 == 96 * MIB,
        "copied {} bytes out",
        back_bytes.len()
    );
    back_bytes.truncate((64 * MIB) as usize);
    ensure!(
        sha256_file(&src)? == hex::encode(Sha256::digest(&back_bytes)),
        "64 MiB round trip differs"
    );

    // fio with verification through the nbd engine.
    let fio = FioRun::start(&uri, dir, "32M", 5, 16)?;
    let v = fio.finish(Duration::from_secs(60))?;
    let (writes, reads) = fio_ios(&v);
    ensure!(
        writes > 100 && reads > 0,
        "fio did too little: {writes} writes, {reads} verify reads"
    );

    // session shows the path, up.
    let s = attach.session()?;
    let paths = s["device"]["paths"].as_array().cloned().unwrap_or_default();
    ensure!(paths.len() == 1 && paths[0]["status"] == "up", "session: {s}");
    let text = initiator::run(&cfg, &["session", "-P", "3"])?;
    ensure!(
        text.stdout.contains(&format!("Target: {iqn}")) && text.stdout.contains("Negotiated iSCSI params"),
        "session -P 3:\n{}",
        text.combined()
    );

    // Logging out of the only path, then in again, while attached.
    let out = initiator::run(&cfg, &["logout", "--portal", &portal])?;
    ensure!(out.success(), "logout failed:\n{}", out.combined());
    let s = attach.session()?;
    ensure!(s["device"]["paths"][0]["status"] == "disabled", "after logout: {s}");
    let out = initiator::run(&cfg, &["login", "--portal", &portal])?;
    ensure!(out.success(), "login failed:\n{}", out.combined());
    let mut up = false;
    for _ in 0..100 {
        if attach.session()?["device"]["paths"][0]["status"] == "up" {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(up, "the path did not come back: {}", attach.session()?);
    let again = run(Command::new("nbdcopy").args([&uri, "null:"]), Duration::from_secs(30))?;
    ensure!(
        again.success(),
        "read after re-login failed:\n{}\n{}",
        again.combined(),
        attach.log_text()
    );

    if kind == Kind::Raftsan {
        // Logging out of the target ends the attachment (flush, logout of every path).
        let out = initiator::run(&cfg, &["logout", "--target", &iqn])?;
        ensure!(
            out.success() && out.stdout.contains("successful"),
            "logout --target:\n{}",
            out.combined()
        );
        attach.wait_exit()?;
        let out = initiator::run(&cfg, &["session"])?;
        ensure!(
            out.stdout.contains("No active sessions"),
            "after logout --target:\n{}",
            out.combined()
        );
    } else {
        attach.stop()?;
    }
    daemon.stop()?;
    Ok(())
}

#[test]
fn attach_round_trip_and_fio_verify_raftsan() -> Result<()> {
    attach_and_use(Kind::Raftsan)
}

#[test]
fn attach_round_trip_and_fio_verify_tgtd() -> Result<()> {
    attach_and_use(Kind::Tgtd)
}

/// A wrong CHAP secret: attach fails with a clear authentication error instead of exporting.
#[test]
fn attach_with_a_wrong_chap_secret_fails_clearly() -> Result<()> {
    let iqn = "iqn.2026-11.org.raftsan.test:nbd-chap";
    let (mut daemon, _) = start_single_target(Kind::Raftsan, iqn, 16 * MIB, &["incominguser alice secret-12chars"])?;
    daemon.expect_error("alice");
    let scratch = Scratch::new()?;
    let cfg = initiator::write_config(
        scratch.path(),
        INITIATOR,
        "[auth]\nusername = \"alice\"\npassword = \"wrong-secret-1\"\n[timeouts]\nno_path_retry = \"2s\"\nlogin = \"2s\"",
    )?;
    let portal = daemon.portal().to_string();
    let err = match Attach::start(
        scratch.path(),
        &cfg,
        iqn,
        &[portal],
        &["--lun", "1"],
        Duration::from_secs(20),
    ) {
        Ok(_) => anyhow::bail!("attach succeeded with a wrong secret"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.to_lowercase().contains("auth"),
        "no authentication error in:\n{err}"
    );
    let log = daemon.stop()?;
    ensure!(
        !err.contains("wrong-secret-1") && !log.contains("wrong-secret-1"),
        "a secret was printed"
    );
    Ok(())
}
