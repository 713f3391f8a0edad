//! Header and data digests (RFC 7143 §12.1, §13.1) with exact PDUs: libiscsi and qemu only
//! negotiate header digests, so the raw client covers CRC32C data digests both ways. A corrupted
//! data digest must never reach the medium: at ErrorRecoveryLevel 0 the connection is dropped
//! (§7.8) and the block keeps its old contents.

use anyhow::{Context, Result, ensure};
use raftsan_proto::pdu::{DataIn, Opcode, ScsiCommand, ScsiResponse};
use raftsan_tests::raw::Raw;
use raftsan_tests::{Daemon, Kind, start_single_target};

const IQN: &str = "iqn.2026-11.org.raftsan.test:digests";
const INITIATOR: &str = "iqn.2026-11.org.raftsan.test:digests-initiator";
const ISID: [u8; 6] = [0x40, 0, 0, 0, 0xd1, 0x61];

fn login_crc(d: &Daemon) -> Result<Raw> {
    let mut r = Raw::connect(d.portal())?;
    let (resp, _) = r.login_response(
        INITIATOR,
        IQN,
        ISID,
        &[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")],
    )?;
    ensure!(resp.status_class == 0, "login with digests refused: {resp:?}");
    ensure!(
        r.digests.header && r.digests.data,
        "target did not accept CRC32C for both digests"
    );
    r.clear_unit_attention()?;
    Ok(r)
}

/// WRITE(10) of one 512-byte block at `lba` with immediate data (ImmediateData=Yes).
fn write_block(r: &mut Raw, lba: u32, data: &[u8; 512], corrupt_digest: bool) -> Result<()> {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x2a;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[8] = 1;
    let c = ScsiCommand {
        immediate: false,
        final_: true,
        read: false,
        write: true,
        attr: 1,
        lun: 1,
        itt: r.next_itt(),
        expected_data_len: 512,
        cmdsn: r.cmdsn,
        exp_statsn: r.statsn,
        cdb,
    };
    r.cmdsn += 1;
    if !corrupt_digest {
        return r.send(c.to_bhs(), data);
    }
    let mut wire = bytes::BytesMut::new();
    raftsan_proto::pdu::encode_parts(c.to_bhs(), &[], data, r.digests, &mut wire);
    let last = wire.len() - 1;
    wire[last] ^= 0xff; // the data digest's last byte
    std::io::Write::write_all(&mut r.s, &wire)?;
    Ok(())
}

fn read_block(r: &mut Raw, lba: u32) -> Result<Vec<u8>> {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x28;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[8] = 1;
    r.scsi(cdb, 512)?;
    let mut data = Vec::new();
    loop {
        let p = r.recv()?.context("connection closed during READ(10)")?;
        match p.bhs.opcode() {
            Opcode::DataIn => {
                data.extend_from_slice(&p.data);
                if let Some(status) = DataIn::parse(&p.bhs).status {
                    ensure!(status == 0, "READ(10) status {status:#x}");
                    return Ok(data);
                }
            }
            Opcode::ScsiResponse => {
                let s = ScsiResponse::parse(&p.bhs);
                ensure!(s.status == 0, "READ(10) status {:#x}", s.status);
                return Ok(data);
            }
            _ => {}
        }
    }
}

#[test]
fn crc32c_header_and_data_digests_round_trip_and_corruption_is_refused() -> Result<()> {
    let (d, _) = start_single_target(Kind::Raftsan, IQN, 8 << 20, &[])?;
    let mut r = login_crc(&d)?;
    let block = [0x3cu8; 512];
    write_block(&mut r, 7, &block, false)?;
    let resp = r.response()?;
    ensure!(
        ScsiResponse::parse(&resp.bhs).status == 0,
        "WRITE(10) with data digest failed"
    );
    ensure!(read_block(&mut r, 7)? == block, "data read back with digests differs");

    // A corrupted data digest on new data for the same block.
    write_block(&mut r, 7, &[0xee; 512], true)?;
    ensure!(r.closed(), "the target kept a connection that sent a bad data digest");

    let mut again = login_crc(&d)?;
    ensure!(
        read_block(&mut again, 7)? == block,
        "data with a bad digest reached the medium"
    );
    again.ping()?;
    d.stop()?;
    Ok(())
}
