//! Interoperability with real clients over loopback: libiscsi's `iscsi-ls`, `iscsi-inq`,
//! `iscsi-readcapacity16`, and qemu's iSCSI block driver (`qemu-img`, `qemu-io`).
//!
//! Each scenario runs against raftsan and, where tgt behaves the same, against tgtd: the tgtd run
//! checks the test itself (the expected outputs are what a real, widely used target produces).
//! Where raftsan deliberately differs from tgt (ACLs: every stated restriction applies), the tgtd
//! test pins tgt's behaviour instead, so the documented difference stays true.
//!
//! These tests need the `raftsan` binary (see `raftsan_tests::raftsan_bin`); without it they fail.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use raftsan_tests::{Daemon, Kind, Loopback, Scratch, run, run_ok, start_single_target};
use rand::{RngCore, SeedableRng, rngs::StdRng};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
const BLOCK_BYTES: u64 = 512;

/// The initiator name every test logs in with, unless it tests the name ACL.
const INITIATOR: &str = "iqn.2026-11.org.raftsan.test:initiator";
/// The client's source address: Linux picks 127.0.0.1 for any 127/8 destination on `lo`.
const CLIENT_ADDRESS: &str = "127.0.0.1";

fn iscsi_ls(args: &[&str], url: &str, initiator: &str) -> Result<raftsan_tests::Output> {
    run(
        Command::new("iscsi-ls").args(["-i", initiator]).args(args).arg(url),
        raftsan_tests::CLIENT_TIMEOUT,
    )
}

fn target_line(iqn: &str, daemon: &Daemon) -> String {
    // iscsi-ls prints SendTargets results as "Target:<name> Portal:<addr:port>,<tpgt>"; tgt's
    // first (only) portal group tag is 1 (RFC 7143 §13.9 TargetAddress).
    format!("Target:{iqn} Portal:{},1", daemon.portal())
}

// --- discovery -------------------------------------------------------------------------------

/// RFC 7143 §12.3 SendTargets=All from a discovery session lists the target with its portal;
/// `iscsi-ls -s` then logs in and reports LUN 0 (controller) and LUN 1 (the backing store).
fn discovery(kind: Kind) -> Result<()> {
    let iqn = "iqn.2026-11.org.raftsan.test:discovery";
    let (daemon, _) = start_single_target(kind, iqn, 64 * MIB, &[])?;
    let out = iscsi_ls(&[], &daemon.portal_url(), INITIATOR)?;
    ensure!(out.success(), "iscsi-ls failed:\n{}", out.combined());
    ensure!(
        out.stdout.lines().any(|l| l == target_line(iqn, &daemon)),
        "target/portal missing:\n{}",
        out.combined()
    );
    let out = iscsi_ls(&["-s"], &daemon.portal_url(), INITIATOR)?;
    ensure!(out.success(), "iscsi-ls -s failed:\n{}", out.combined());
    ensure!(
        out.stdout.contains("Lun:1    Type:DIRECT_ACCESS (Size:63M)"),
        "LUN 1 missing:\n{}",
        out.combined()
    );
    daemon.stop()?;
    Ok(())
}

#[test]
fn discovery_lists_target_and_portal_raftsan() -> Result<()> {
    discovery(Kind::Raftsan)
}

#[test]
fn discovery_lists_target_and_portal_tgtd() -> Result<()> {
    discovery(Kind::Tgtd)
}

/// RFC 7143 §12.1 CHAP: the right secret logs in; a wrong one and none at all are refused with
/// an authentication failure (login status 0201), which iscsi-ls reports as exit 10.
fn chap(kind: Kind) -> Result<()> {
    let iqn = "iqn.2026-11.org.raftsan.test:chap";
    let (mut daemon, _) = start_single_target(kind, iqn, 64 * MIB, &["incominguser diskuser Eupen2marron"])?;
    daemon.expect_error("diskuser");
    let good = iscsi_ls(&["-s"], &daemon.portal_url_chap("diskuser", "Eupen2marron"), INITIATOR)?;
    ensure!(good.success(), "right secret refused:\n{}", good.combined());
    ensure!(good.stdout.contains(&target_line(iqn, &daemon)), "{}", good.combined());
    ensure!(good.stdout.contains("Lun:1 "), "{}", good.combined());

    let bad = iscsi_ls(&["-s"], &daemon.portal_url_chap("diskuser", "wrong-secret"), INITIATOR)?;
    ensure!(!bad.success(), "wrong secret accepted:\n{}", bad.combined());
    ensure!(
        bad.combined().contains("Authentication failure"),
        "expected an authentication failure:\n{}",
        bad.combined()
    );
    let none = iscsi_ls(&["-s"], &daemon.portal_url(), INITIATOR)?;
    ensure!(!none.success(), "login without CHAP accepted:\n{}", none.combined());
    let log = daemon.stop()?;
    ensure!(!log.contains("wrong-secret"), "a secret reached the log");
    ensure!(!log.contains("Eupen2marron"), "a secret reached the log");
    Ok(())
}

#[test]
fn chap_right_secret_logs_in_wrong_secret_refused_raftsan() -> Result<()> {
    chap(Kind::Raftsan)
}

#[test]
fn chap_right_secret_logs_in_wrong_secret_refused_tgtd() -> Result<()> {
    chap(Kind::Tgtd)
}

/// An `initiator-name` ACL: the listed name discovers and logs in; any other name neither sees
/// the target in discovery nor logs in (authorization failure 0202).
#[test]
fn initiator_name_acl_enforced_raftsan() -> Result<()> {
    let iqn = "iqn.2026-11.org.raftsan.test:name-acl";
    let allowed = "iqn.2026-11.org.raftsan.test:allowed";
    let other = "iqn.2026-11.org.raftsan.test:someone-else";
    let (mut daemon, _) = start_single_target(Kind::Raftsan, iqn, 64 * MIB, &[&format!("initiator-name {allowed}")])?;
    daemon.expect_error(other);
    let out = iscsi_ls(&["-s"], &daemon.portal_url(), allowed)?;
    ensure!(out.success(), "listed name refused:\n{}", out.combined());
    ensure!(out.stdout.contains(&target_line(iqn, &daemon)), "{}", out.combined());

    let out = iscsi_ls(&[], &daemon.portal_url(), other)?;
    ensure!(
        !out.stdout.contains(iqn),
        "target shown to a name outside the ACL:\n{}",
        out.combined()
    );
    let inq = run(
        Command::new("iscsi-inq")
            .args(["-i", other])
            .arg(daemon.lun_url(iqn, 1)),
        raftsan_tests::CLIENT_TIMEOUT,
    )?;
    ensure!(!inq.success(), "name outside the ACL logged in:\n{}", inq.combined());
    daemon.stop()?;
    Ok(())
}

/// The difference raftsan documents: tgt-admin adds `initiator-address ALL` to a target without
/// an address line, and tgt admits an initiator if its name OR its address matches, so an
/// `initiator-name` line alone restricts nothing in tgt.
#[test]
fn initiator_name_acl_alone_restricts_nothing_in_tgtd() -> Result<()> {
    let iqn = "iqn.2026-11.org.raftsan.test:name-acl";
    let allowed = "iqn.2026-11.org.raftsan.test:allowed";
    let other = "iqn.2026-11.org.raftsan.test:someone-else";
    let (daemon, _) = start_single_target(Kind::Tgtd, iqn, 64 * MIB, &[&format!("initiator-name {allowed}")])?;
    let out = iscsi_ls(&["-s"], &daemon.portal_url(), other)?;
    ensure!(out.success(), "tgt behaviour changed:\n{}", out.combined());
    ensure!(out.stdout.contains("Lun:1 "), "{}", out.combined());
    daemon.stop()?;
    Ok(())
}

// --- SCSI through libiscsi -------------------------------------------------------------------

/// SPC-4 §6.6.1 standard INQUIRY (direct-access device, connected) and §7.8.6 VPD 0x83 device
/// identification (at least one NAA designator for the LU).
fn inquiry(kind: Kind) -> Result<()> {
    let iqn = "iqn.2026-11.org.raftsan.test:inquiry";
    let (daemon, _) = start_single_target(kind, iqn, 64 * MIB, &[])?;
    let url = daemon.lun_url(iqn, 1);
    let std = run_ok(Command::new("iscsi-inq").args(["-i", INITIATOR]).arg(&url))?;
    ensure!(
        std.stdout.contains("Peripheral Qualifier:CONNECTED"),
        "{}",
        std.combined()
    );
    ensure!(
        std.stdout.contains("Peripheral Device Type:DIRECT_ACCESS"),
        "{}",
        std.combined()
    );
    ensure!(std.stdout.contains("Version Descriptor:"), "{}", std.combined());
    // iscsi-inq parses -c with atoi: the page code must be decimal (0x83 = 131).
    let vpd = run_ok(
        Command::new("iscsi-inq")
            .args(["-i", INITIATOR, "-e", "1", "-c", "131"])
            .arg(&url),
    )?;
    ensure!(
        vpd.stdout.contains("Page Code:(0x83) DEVICE_IDENTIFICATION"),
        "{}",
        vpd.combined()
    );
    ensure!(
        vpd.stdout.contains("Association:(0) LOGICAL_UNIT") && vpd.stdout.contains("Designator Type:(3) NAA"),
        "no NAA designator for the LU:\n{}",
        vpd.combined()
    );
    let pages = run_ok(
        Command::new("iscsi-inq")
            .args(["-i", INITIATOR, "-e", "1", "-c", "0"])
            .arg(&url),
    )?;
    for page in ["0x00", "0x80", "0x83", "0xb0", "0xb2"] {
        ensure!(
            pages.stdout.contains(&format!("Page:{page} ")),
            "VPD {page} missing:\n{}",
            pages.combined()
        );
    }
    daemon.stop()?;
    Ok(())
}

#[test]
fn inquiry_standard_and_vpd_83_raftsan() -> Result<()> {
    inquiry(Kind::Raftsan)
}

#[test]
fn inquiry_standard_and_vpd_83_tgtd() -> Result<()> {
    inquiry(Kind::Tgtd)
}

/// SBC-3 §5.16 READ CAPACITY (16): last LBA = size / 512 - 1, 512-byte blocks.
fn readcapacity16(kind: Kind) -> Result<()> {
    let iqn = "iqn.2026-11.org.raftsan.test:readcap";
    let size = 96 * MIB;
    let (daemon, _) = start_single_target(kind, iqn, size, &[])?;
    let out = run_ok(
        Command::new("iscsi-readcapacity16")
            .args(["-i", INITIATOR])
            .arg(daemon.lun_url(iqn, 1)),
    )?;
    let last_lba = size / BLOCK_BYTES - 1;
    ensure!(
        out.stdout
            .contains(&format!("RETURNED LOGICAL BLOCK ADDRESS:{last_lba}\n")),
        "{}",
        out.combined()
    );
    ensure!(
        out.stdout.contains("LOGICAL BLOCK LENGTH IN BYTES:512\n"),
        "{}",
        out.combined()
    );
    ensure!(
        out.stdout.contains(&format!("Total size:{size}\n")),
        "{}",
        out.combined()
    );
    daemon.stop()?;
    Ok(())
}

#[test]
fn readcapacity16_raftsan() -> Result<()> {
    readcapacity16(Kind::Raftsan)
}

#[test]
fn readcapacity16_tgtd() -> Result<()> {
    readcapacity16(Kind::Tgtd)
}

// --- qemu ----------------------------------------------------------------------------------

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// `qemu-img convert` a random 64 MiB raw image into the LU and back out: the bytes survive both
/// ways and land unchanged in the backing file.
fn qemu_img_convert(kind: Kind) -> Result<()> {
    let iqn = "iqn.2026-11.org.raftsan.test:qemu-convert";
    let size = 64 * MIB;
    let (daemon, backing) = start_single_target(kind, iqn, size, &[])?;
    let work = Scratch::new()?;
    let source = work.path().join("source.raw");
    let mut data = vec![0u8; usize::try_from(size)?];
    StdRng::seed_from_u64(0x5eed_f2a1).fill_bytes(&mut data);
    fs::write(&source, &data)?;
    drop(data);
    let url = daemon.lun_url(iqn, 1);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw", "-t", "none"])
            .arg(&source)
            .arg(&url),
    )?;
    let back = work.path().join("back.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&url)
            .arg(&back),
    )?;
    let want = sha256_file(&source)?;
    ensure!(
        sha256_file(&back)? == want,
        "image read back differs from the one written"
    );
    ensure!(
        sha256_file(&backing)? == want,
        "backing file differs from the image written"
    );
    daemon.stop()?;
    Ok(())
}

#[test]
fn qemu_img_convert_round_trip_raftsan() -> Result<()> {
    qemu_img_convert(Kind::Raftsan)
}

#[test]
fn qemu_img_convert_round_trip_tgtd() -> Result<()> {
    qemu_img_convert(Kind::Tgtd)
}

fn allocated_bytes(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)?.blocks() * 512)
}

/// Thin provisioning (SBC-3 §4.7, §5.28 UNMAP): write 4 MiB through qemu-io, discard it (qemu's
/// iSCSI driver sends UNMAP when the LU reports LBPME and LBPU), then the backing file's
/// allocation shrinks and the range reads back as zeroes (LBPRZ).
fn unmap_round_trip(kind: Kind) -> Result<()> {
    let iqn = "iqn.2026-11.org.raftsan.test:unmap";
    let (daemon, backing) = start_single_target(kind, iqn, 64 * MIB, &[])?;
    if kind == Kind::Tgtd {
        // tgt reports full provisioning unless told otherwise.
        daemon.tgtadm(&[
            "--lld",
            "iscsi",
            "--op",
            "update",
            "--mode",
            "logicalunit",
            "--tid",
            "1",
            "--lun",
            "1",
            "--params",
            "thin_provisioning=1",
        ])?;
    }
    let url = daemon.lun_url(iqn, 1);
    let qemu_io = |cmd: &str| {
        run_ok(
            Command::new("qemu-io")
                .args(["-f", "raw", "-c", cmd, "-c", "flush"])
                .arg(&url),
        )
    };
    qemu_io("write -P 0xab 0 4M")?;
    let written = allocated_bytes(&backing)?;
    ensure!(
        written >= 4 * MIB,
        "backing file holds {written} bytes after a 4 MiB write"
    );
    let check = qemu_io("read -P 0xab 0 4M")?;
    ensure!(
        !check.stdout.contains("Pattern verification failed"),
        "{}",
        check.combined()
    );

    let caps = run_ok(Command::new("iscsi-readcapacity16").args(["-i", INITIATOR]).arg(&url))?;
    ensure!(
        caps.stdout.contains("LBPME:1"),
        "LU not thin provisioned:\n{}",
        caps.combined()
    );

    qemu_io("discard 0 4M")?;
    let after = allocated_bytes(&backing)?;
    ensure!(
        after + 4 * MIB <= written,
        "UNMAP freed nothing: {written} bytes allocated before, {after} after"
    );
    let zeroes = qemu_io("read -P 0 0 4M")?;
    ensure!(
        !zeroes.stdout.contains("Pattern verification failed"),
        "{}",
        zeroes.combined()
    );
    let raw = fs::read(&backing)?;
    ensure!(
        raw[..4 * 1024 * 1024].iter().all(|&b| b == 0),
        "backing file not zero after UNMAP"
    );
    daemon.stop()?;
    Ok(())
}

#[test]
fn unmap_round_trip_raftsan() -> Result<()> {
    unmap_round_trip(Kind::Raftsan)
}

#[test]
fn unmap_round_trip_tgtd() -> Result<()> {
    unmap_round_trip(Kind::Tgtd)
}

// --- the sv1 configuration -------------------------------------------------------------------

const SV1_INITIATOR: &str = "iqn.2023-02.dom.home.sv:sv.initiator01";
const SV1_IQN: &str = "iqn.2023-02.dom.home.sv:storage.sv1";
/// The same block written for another host's address (the client connects from 127.0.0.1).
const SV1_ELSEWHERE_IQN: &str = "iqn.2023-02.dom.home.sv:storage.sv1-elsewhere";

/// The sv1 `targets.conf` block as tgt users write it (only the backing path and the address
/// differ), plus a copy of it whose `initiator-address` is not the client's.
fn sv1_conf(scratch: &Scratch) -> Result<String> {
    let a = scratch.sparse_file("sv1.img", 64 * MIB)?;
    let b = scratch.sparse_file("sv1-elsewhere.img", 64 * MIB)?;
    Ok(format!(
        "# sv1, as deployed with tgt\n\
         default-driver iscsi\n\
         \n\
         <target {SV1_IQN}>\n\
         \tbacking-store {a}\n\
         \tinitiator-name {SV1_INITIATOR}\n\
         \tincominguser diskuser Eupen2marron\n\
         \tinitiator-address {CLIENT_ADDRESS}\n\
         </target>\n\
         \n\
         <target {SV1_ELSEWHERE_IQN}>\n\
         \tbacking-store {b}\n\
         \tinitiator-name {SV1_INITIATOR}\n\
         \tincominguser diskuser Eupen2marron\n\
         \tinitiator-address 127.0.0.2\n\
         </target>\n",
        a = a.display(),
        b = b.display()
    ))
}

fn sv1_start(kind: Kind) -> Result<Daemon> {
    let scratch = Scratch::new()?;
    let conf = sv1_conf(&scratch)?;
    let listen = vec![Loopback::reserve()?];
    match kind {
        Kind::Raftsan => Daemon::raftsan_in(scratch, &conf, listen),
        Kind::Tgtd => Daemon::tgtd_in(scratch, &conf, listen),
    }
}

fn sv1_inq(daemon: &Daemon, initiator: &str, secret: &str, iqn: &str) -> Result<raftsan_tests::Output> {
    run(
        Command::new("iscsi-inq")
            .args(["-i", initiator])
            .arg(daemon.lun_url_chap("diskuser", secret, iqn, 1)),
        raftsan_tests::CLIENT_TIMEOUT,
    )
}

/// The sv1 block starts raftsan unchanged and every line of it is enforced: the right name from
/// the right address with the right secret logs in; a wrong secret, a wrong name, or a wrong
/// address (the second target) is each refused, and discovery only shows what may be logged into.
#[test]
fn sv1_config_starts_and_acl_and_chap_enforced_raftsan() -> Result<()> {
    let mut daemon = sv1_start(Kind::Raftsan)?;
    daemon.expect_error("diskuser");
    daemon.expect_error(SV1_INITIATOR);
    daemon.expect_error("iqn.2023-02.dom.home.sv:intruder");

    let ok = sv1_inq(&daemon, SV1_INITIATOR, "Eupen2marron", SV1_IQN)?;
    ensure!(ok.success(), "sv1 initiator refused:\n{}", ok.combined());
    let ls = iscsi_ls(
        &["-s"],
        &daemon.portal_url_chap("diskuser", "Eupen2marron"),
        SV1_INITIATOR,
    )?;
    ensure!(ls.stdout.contains(&target_line(SV1_IQN, &daemon)), "{}", ls.combined());
    ensure!(
        !ls.stdout.contains(SV1_ELSEWHERE_IQN),
        "target for another address shown:\n{}",
        ls.combined()
    );

    let wrong_secret = sv1_inq(&daemon, SV1_INITIATOR, "Eupen2marrons", SV1_IQN)?;
    ensure!(
        !wrong_secret.success(),
        "wrong secret accepted:\n{}",
        wrong_secret.combined()
    );
    let wrong_name = sv1_inq(&daemon, "iqn.2023-02.dom.home.sv:intruder", "Eupen2marron", SV1_IQN)?;
    ensure!(!wrong_name.success(), "wrong name accepted:\n{}", wrong_name.combined());
    let wrong_address = sv1_inq(&daemon, SV1_INITIATOR, "Eupen2marron", SV1_ELSEWHERE_IQN)?;
    ensure!(
        !wrong_address.success(),
        "wrong address accepted:\n{}",
        wrong_address.combined()
    );
    let log = daemon.stop()?;
    ensure!(!log.contains("Eupen2marron"), "the CHAP secret reached the log");
    Ok(())
}

/// The same block under tgtd: it enforces CHAP, but a name OR an address match admits an
/// initiator, so the wrong name from the right address and the right name from the "wrong"
/// address both get in. raftsan requires both (see the README's difference list).
#[test]
fn sv1_config_under_tgtd_name_or_address_admits() -> Result<()> {
    let daemon = sv1_start(Kind::Tgtd)?;
    let ok = sv1_inq(&daemon, SV1_INITIATOR, "Eupen2marron", SV1_IQN)?;
    ensure!(ok.success(), "sv1 initiator refused:\n{}", ok.combined());
    let wrong_secret = sv1_inq(&daemon, SV1_INITIATOR, "Eupen2marrons", SV1_IQN)?;
    ensure!(
        !wrong_secret.success(),
        "wrong secret accepted:\n{}",
        wrong_secret.combined()
    );
    let wrong_name = sv1_inq(&daemon, "iqn.2023-02.dom.home.sv:intruder", "Eupen2marron", SV1_IQN)?;
    ensure!(
        wrong_name.success(),
        "tgt behaviour changed (name):\n{}",
        wrong_name.combined()
    );
    let wrong_address = sv1_inq(&daemon, SV1_INITIATOR, "Eupen2marron", SV1_ELSEWHERE_IQN)?;
    ensure!(
        wrong_address.success(),
        "tgt behaviour changed (address):\n{}",
        wrong_address.combined()
    );
    daemon.stop()?;
    Ok(())
}

// --- configuration errors ----------------------------------------------------------------------

/// An invalid config is refused at start, before any socket is bound, with the file, the line and
/// the reason (issue: "An invalid config is refused at start with the file, line and reason").
#[test]
fn invalid_targets_conf_refused_with_file_and_line_raftsan() -> Result<()> {
    let scratch = Scratch::new()?;
    let backing = scratch.sparse_file("lun1.img", 64 * MIB)?;
    let config = scratch.path().join("targets.conf");
    fs::write(
        &config,
        format!(
            "<target iqn.2026-11.org.raftsan.test:bad>\n    backing-store {}\n    \
             no-such-directive 1\n</target>\n",
            backing.display()
        ),
    )?;
    let addr = Loopback::reserve()?;
    let out = run(
        Command::new(raftsan_tests::raftsan_bin()?)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(addr.portal().to_string())
            .arg("--data-dir")
            .arg(scratch.path().join("data"))
            .env("NO_COLOR", "1"),
        // Validation happens before any socket is bound: no reason to wait long.
        Duration::from_secs(15),
    )?;
    ensure!(!out.success(), "invalid config accepted:\n{}", out.combined());
    let text = out.combined();
    ensure!(text.contains("targets.conf"), "message does not name the file:\n{text}");
    ensure!(
        text.contains("line 3") || text.contains("targets.conf:3"),
        "message does not name line 3:\n{text}"
    );
    ensure!(
        text.contains("no-such-directive"),
        "message does not name the directive:\n{text}"
    );
    ensure!(!text.contains("panicked"), "{text}");
    Ok(())
}
