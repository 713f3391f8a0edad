//! What a target sends an initiator: `raftsan_initiator::scsi` (READ CAPACITY, INQUIRY and its
//! VPD pages, REPORT TARGET PORT GROUPS, sense), the initiator login machine
//! (`raftsan_proto::initiator`) and SendTargets responses.
//! Input: a selector byte, then
//! * 0: bytes given to every SCSI data parser;
//! * 1: login responses for a CHAP + mutual CHAP login, each as a length byte and that many bytes
//!   of text data after a 48-byte BHS, until the input ends or the machine stops;
//! * 2: a SendTargets response text.
//!
//! Asserts: no panic; parsed capacities are non-empty with a power-of-two block size; port group
//! states round-trip through their names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use raftsan_initiator::scsi::{self, BlockLimits, Capacity, DeviceId, Provisioning, Sense, StandardInquiry};
use raftsan_proto::initiator::{self, ChapAccount, InitiatorLogin, InitiatorSettings, LoginEvent};
use raftsan_proto::pdu::Bhs;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    match sel % 3 {
        0 => scsi_data(rest),
        1 => login(rest),
        _ => {
            let _ = initiator::parse_send_targets(rest);
        }
    }
});

fn scsi_data(d: &[u8]) {
    if let Ok(c) = Capacity::parse(d) {
        assert!(c.blocks > 0 && c.block_size.is_power_of_two());
        let _ = c.bytes();
    }
    let _ = StandardInquiry::parse(d);
    if let Ok(id) = DeviceId::parse(d) {
        let _ = id.lu.map(|l| l.to_string());
    }
    let _ = BlockLimits::parse(d);
    let _ = Provisioning::parse(d);
    if let Ok(groups) = scsi::parse_port_groups(d) {
        for g in groups {
            let _ = g.state.name();
        }
    }
    if let Some(s) = Sense::parse(d) {
        let _ = s.to_string();
    }
}

fn login(mut d: &[u8]) {
    let mut s = InitiatorSettings::new("iqn.2026-11.org.raftsan.fuzz:i", Some("iqn.2026-11.org.raftsan.fuzz:t"), [0x80, 0, 0, 0, 0, 1]);
    s.chap = Some(ChapAccount { user: "u".into(), secret: b"twelve-bytes".to_vec() });
    s.mutual_chap = Some(ChapAccount { user: "t".into(), secret: b"other-secret".to_vec() });
    s.mutual_chap_id = 7;
    s.mutual_chap_challenge = vec![0x5a; 16];
    let Ok(mut m) = InitiatorLogin::new(s) else { return };
    let _ = m.start();
    while d.len() >= 49 {
        let mut bhs = [0u8; 48];
        bhs.copy_from_slice(&d[..48]);
        let n = usize::from(d[48]).min(d.len() - 49);
        let text = &d[49..49 + n];
        d = &d[49 + n..];
        match m.on_response(&Bhs(bhs), text) {
            Ok(LoginEvent::Send(_)) => {}
            Ok(_) | Err(_) => return,
        }
    }
}
