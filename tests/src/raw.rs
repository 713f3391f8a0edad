//! A raw iSCSI client for tests that must send exactly the bytes they choose (hostile input,
//! protocol corner cases), built on `raftsan_proto`'s PDU types. Real clients (libiscsi tools,
//! qemu-img) are used everywhere else.

use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::BytesMut;
use raftsan_proto::pdu::{
    self, Bhs, Digests, Framing, LoginRequest, LoginResponse, NopIn, NopOut, Opcode, Pdu, RESERVED_TAG, ScsiCommand,
    ScsiResponse,
};

/// The target's answer to the initiator's CHAP_N/CHAP_R/CHAP_I/CHAP_C (mutual CHAP).
#[derive(Debug)]
pub struct MutualChapAnswer {
    pub response: LoginResponse,
    pub keys: Vec<(String, String)>,
    /// The challenge the initiator sent (for computing the expected CHAP_R).
    pub challenge_sent: Vec<u8>,
}

/// A raw iSCSI connection that speaks only what the test scripts.
pub struct Raw {
    pub s: TcpStream,
    buf: BytesMut,
    pub cmdsn: u32,
    pub statsn: u32,
    itt: u32,
    /// Digests in force on this connection (both off until a login negotiates them).
    pub digests: Digests,
}

impl Raw {
    pub fn connect(portal: SocketAddrV4) -> Result<Raw> {
        let s = TcpStream::connect_timeout(&portal.into(), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Raw {
            s,
            buf: BytesMut::new(),
            cmdsn: 1,
            statsn: 0,
            itt: 1,
            digests: Digests::default(),
        })
    }

    pub fn send(&mut self, bhs: Bhs, data: &[u8]) -> Result<()> {
        let mut out = BytesMut::new();
        pdu::encode_parts(bhs, &[], data, self.digests, &mut out);
        self.s.write_all(&out)?;
        Ok(())
    }

    /// The next PDU, or `None` when the target closed the connection.
    pub fn recv(&mut self) -> Result<Option<Pdu>> {
        loop {
            if let Framing::Complete { len } = pdu::check(&self.buf, self.digests, 1 << 24)? {
                let p = pdu::decode(self.buf.split_to(len).freeze(), self.digests)?;
                return Ok(Some(p));
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(e).context("reading from the target"),
            }
        }
    }

    /// Whether the target closes the connection within the read timeout (PDUs before the close
    /// are skipped).
    pub fn closed(&mut self) -> bool {
        for _ in 0..64 {
            match self.recv() {
                Ok(None) => return true,
                Ok(Some(_)) => continue,
                Err(_) => return false,
            }
        }
        false
    }

    /// A Login Request header (RFC 7143 §11.12) for stage `csg` → `nsg` of a new session.
    fn login_header(&self, csg: u8, nsg: u8, transit: bool, isid: [u8; 6], exp_statsn: u32) -> LoginRequest {
        LoginRequest {
            transit,
            cont: false,
            csg,
            nsg,
            version_max: 0,
            version_min: 0,
            isid,
            tsih: 0,
            itt: 0,
            cid: 0,
            cmdsn: self.cmdsn,
            exp_statsn,
        }
    }

    pub fn login_request(&self, data: &[u8]) -> (Bhs, Vec<u8>) {
        let req = self.login_header(1, 3, true, [0x40, 0, 0, 0x12, 0x34, 0x56], 0);
        (req.to_bhs(), data.to_vec())
    }

    /// A normal-session login in one PDU (no CHAP).
    pub fn login(&mut self, initiator: &str, target: &str) -> Result<()> {
        let mut text = Vec::new();
        raftsan_proto::text::encode(
            &[
                ("InitiatorName", initiator),
                ("TargetName", target),
                ("SessionType", "Normal"),
                ("HeaderDigest", "None"),
                ("DataDigest", "None"),
                ("MaxRecvDataSegmentLength", "262144"),
                ("ImmediateData", "Yes"),
                ("InitialR2T", "No"),
            ],
            &mut text,
        );
        let (bhs, data) = self.login_request(&text);
        self.send(bhs, &data)?;
        let p = self.recv()?.context("target closed the connection during login")?;
        let r = LoginResponse::parse(&p.bhs);
        ensure!(r.status_class == 0 && r.transit && r.nsg == 3, "login refused: {r:?}");
        self.statsn = r.seq.statsn.wrapping_add(1);
        Ok(())
    }

    /// One-PDU normal-session login (security stage skipped, csg 1 → nsg 3) with the given ISID and
    /// extra operational keys (which replace the defaults of the same name). Returns the Login
    /// Response's header fields and text whatever its status; on success `statsn` is advanced and
    /// `digests` follows the negotiated HeaderDigest/DataDigest (RFC 7143 §13.1).
    pub fn login_response(
        &mut self,
        initiator: &str,
        target: &str,
        isid: [u8; 6],
        extra: &[(&str, &str)],
    ) -> Result<(LoginResponse, Vec<(String, String)>)> {
        let mut pairs: Vec<(&str, &str)> = vec![
            ("InitiatorName", initiator),
            ("TargetName", target),
            ("SessionType", "Normal"),
        ];
        for (k, v) in [
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "No"),
        ] {
            if !extra.iter().any(|(key, _)| *key == k) {
                pairs.push((k, v));
            }
        }
        pairs.extend_from_slice(extra);
        let mut text = Vec::new();
        raftsan_proto::text::encode(&pairs, &mut text);
        let req = self.login_header(1, 3, true, isid, 0);
        self.send(req.to_bhs(), &text)?;
        let p = self.recv()?.context("target closed the connection during login")?;
        let r = LoginResponse::parse(&p.bhs);
        let keys = raftsan_proto::text::parse(&p.data).map_err(|e| anyhow::anyhow!("bad login text: {e:?}"))?;
        if r.status_class == 0 {
            self.statsn = r.seq.statsn.wrapping_add(1);
            let on = |k: &str| keys.iter().any(|(key, v)| key == k && v == "CRC32C");
            self.digests = Digests {
                header: on("HeaderDigest"),
                data: on("DataDigest"),
            };
        }
        Ok((r, keys))
    }

    /// Like [`Raw::login`] with a chosen ISID (RFC 7143 §10.12.5): the session identity is
    /// (initiator name, ISID, target), which session reinstatement (§6.3.5) keys on.
    pub fn login_isid(&mut self, initiator: &str, target: &str, isid: [u8; 6]) -> Result<()> {
        let (r, _) = self.login_response(initiator, target, isid, &[])?;
        ensure!(
            r.status_class == 0 && r.transit && r.nsg == 3,
            "login refused with status {:02x}{:02x}: {r:?}",
            r.status_class,
            r.status_detail
        );
        Ok(())
    }

    /// Sends one Login Request and returns the response's header fields and text.
    fn login_step(
        &mut self,
        csg: u8,
        nsg: u8,
        transit: bool,
        pairs: &[(&str, &str)],
    ) -> Result<(LoginResponse, Vec<(String, String)>)> {
        let mut text = Vec::new();
        raftsan_proto::text::encode(pairs, &mut text);
        let req = self.login_header(csg, nsg, transit, [0x40, 0, 0, 0x12, 0x34, 0x57], self.statsn);
        self.send(req.to_bhs(), &text)?;
        let p = self.recv()?.context("target closed the connection during login")?;
        let r = LoginResponse::parse(&p.bhs);
        ensure!(
            r.status_class == 0,
            "login step refused with status {:02x}{:02x}",
            r.status_class,
            r.status_detail
        );
        self.statsn = r.seq.statsn.wrapping_add(1);
        let keys = raftsan_proto::text::parse(&p.data).map_err(|e| anyhow::anyhow!("bad login text: {e:?}"))?;
        Ok((r, keys))
    }

    /// The security stage up to the target's challenge: offers CHAP, picks MD5 (CHAP_A=5) and
    /// answers the target's CHAP_I/CHAP_C with `secret`. Returns the challenge and our response.
    fn chap_start(&mut self, initiator: &str, target: &str, secret: &str) -> Result<(Vec<u8>, Vec<u8>)> {
        let base = [
            ("InitiatorName", initiator),
            ("TargetName", target),
            ("SessionType", "Normal"),
            ("AuthMethod", "CHAP"),
        ];
        self.login_step(0, 1, false, &base)?;
        let (_, keys) = self.login_step(0, 1, false, &[("CHAP_A", "5")])?;
        let get = |k: &str| {
            keys.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .with_context(|| format!("no {k} from the target"))
        };
        let id: u8 = get("CHAP_I")?.parse()?;
        let challenge = raftsan_proto::chap::decode_binary(&get("CHAP_C")?).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let response = raftsan_proto::chap::chap_response(
            raftsan_proto::chap::ChapAlgorithm::Md5,
            id,
            secret.as_bytes(),
            &challenge,
        );
        Ok((challenge, response))
    }

    /// A normal-session login with one-way CHAP (MD5), security stage then operational stage
    /// (RFC 7143 §6.3, §12.1.3).
    pub fn login_chap(&mut self, initiator: &str, target: &str, user: &str, secret: &str) -> Result<()> {
        let (_, response) = self.chap_start(initiator, target, secret)?;
        let hex = raftsan_proto::chap::encode_hex(&response);
        let (r, _) = self.login_step(0, 1, true, &[("CHAP_N", user), ("CHAP_R", &hex)])?;
        ensure!(r.transit && r.nsg == 1, "CHAP did not complete: {r:?}");
        let (r, _) = self.login_step(
            1,
            3,
            true,
            &[
                ("HeaderDigest", "None"),
                ("DataDigest", "None"),
                ("MaxRecvDataSegmentLength", "262144"),
            ],
        )?;
        ensure!(r.transit && r.nsg == 3, "no full-feature phase: {r:?}");
        Ok(())
    }

    /// The security stage of a mutual-CHAP login (MD5, RFC 7143 §12.1.3) up to the target's
    /// answer to CHAP_N/CHAP_R/CHAP_I/CHAP_C. The initiator's challenge is `our_challenge`, or the
    /// target's own challenge reflected back when `None` (which §12.1.3 requires the target to
    /// refuse). Returns that last Login Response whatever its status, its keys, and the challenge
    /// sent. After a success, [`Raw::operational_stage`] completes the login.
    pub fn login_chap_mutual(
        &mut self,
        initiator: &str,
        target: &str,
        user: &str,
        secret: &str,
        our_id: u8,
        our_challenge: Option<&[u8]>,
    ) -> Result<MutualChapAnswer> {
        let (challenge, response) = self.chap_start(initiator, target, secret)?;
        let sent = our_challenge.map_or_else(|| challenge.clone(), <[u8]>::to_vec);
        let r_hex = raftsan_proto::chap::encode_hex(&response);
        let c_hex = raftsan_proto::chap::encode_hex(&sent);
        let i_text = our_id.to_string();
        let mut text = Vec::new();
        raftsan_proto::text::encode(
            &[
                ("CHAP_N", user),
                ("CHAP_R", &r_hex),
                ("CHAP_I", &i_text),
                ("CHAP_C", &c_hex),
            ],
            &mut text,
        );
        let req = LoginRequest {
            transit: true,
            cont: false,
            csg: 0,
            nsg: 1,
            version_max: 0,
            version_min: 0,
            isid: [0x40, 0, 0, 0x12, 0x34, 0x57],
            tsih: 0,
            itt: 0,
            cid: 0,
            cmdsn: self.cmdsn,
            exp_statsn: self.statsn,
        };
        self.send(req.to_bhs(), &text)?;
        let p = self.recv()?.context("target closed the connection during login")?;
        let r = LoginResponse::parse(&p.bhs);
        if r.status_class == 0 {
            self.statsn = r.seq.statsn.wrapping_add(1);
        }
        let keys = raftsan_proto::text::parse(&p.data).map_err(|e| anyhow::anyhow!("bad login text: {e:?}"))?;
        Ok(MutualChapAnswer {
            response: r,
            keys,
            challenge_sent: sent,
        })
    }

    /// The operational stage (csg 1 → full feature) after a completed security stage.
    pub fn operational_stage(&mut self) -> Result<()> {
        let (r, _) = self.login_step(
            1,
            3,
            true,
            &[
                ("HeaderDigest", "None"),
                ("DataDigest", "None"),
                ("MaxRecvDataSegmentLength", "262144"),
            ],
        )?;
        ensure!(r.transit && r.nsg == 3, "no full-feature phase: {r:?}");
        Ok(())
    }

    pub fn next_itt(&mut self) -> u32 {
        self.itt += 1;
        self.itt
    }

    pub fn scsi(&mut self, cdb: [u8; 16], read_len: u32) -> Result<()> {
        let itt = self.next_itt();
        let c = ScsiCommand {
            immediate: false,
            final_: true,
            read: read_len > 0,
            write: false,
            attr: 1,
            lun: 1,
            itt,
            expected_data_len: read_len,
            cmdsn: self.cmdsn,
            exp_statsn: self.statsn,
            cdb,
        };
        self.cmdsn += 1;
        self.send(c.to_bhs(), &[])
    }

    /// Reads PDUs until the next SCSI Response.
    pub fn response(&mut self) -> Result<Pdu> {
        loop {
            let p = self
                .recv()?
                .context("connection closed while waiting for a SCSI Response")?;
            if p.bhs.opcode() == Opcode::ScsiResponse {
                return Ok(p);
            }
        }
    }

    /// TEST UNIT READY until GOOD: consumes the unit attention a new I_T nexus starts with
    /// (SAM-5 §5.14: POWER ON, RESET, OR BUS DEVICE RESET OCCURRED).
    pub fn clear_unit_attention(&mut self) -> Result<()> {
        for _ in 0..4 {
            self.scsi([0u8; 16], 0)?;
            if ScsiResponse::parse(&self.response()?.bhs).status == 0 {
                return Ok(());
            }
        }
        bail!("TEST UNIT READY never returned GOOD")
    }

    /// Sends a NOP-Out ping and waits for its NOP-In: the session is alive.
    pub fn ping(&mut self) -> Result<()> {
        let itt = self.next_itt();
        let n = NopOut {
            immediate: true,
            lun: 0,
            itt,
            ttt: RESERVED_TAG,
            cmdsn: self.cmdsn,
            exp_statsn: self.statsn,
        };
        self.send(n.to_bhs(), b"ping")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let p = self.recv()?.context("connection closed while waiting for NOP-In")?;
            if p.bhs.opcode() == Opcode::NopIn && NopIn::parse(&p.bhs).itt == itt {
                ensure!(&p.data[..] == b"ping", "NOP-In did not echo the ping data");
                return Ok(());
            }
        }
        bail!("no NOP-In for the ping")
    }
}
