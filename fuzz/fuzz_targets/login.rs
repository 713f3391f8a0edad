//! The target login machine (RFC 7143 §6.3, §11.12, §12.1.3): a sequence of Login Requests
//! (header fields + text) fed to `TargetLogin::on_request`.
//!
//! Input: byte 0 selects whether discovery sessions need CHAP; then requests, each
//! `flags(T C csg nsg) version_max version_min len_hi len_lo data[len]`.
//!
//! A request value `CHAP_R=@` (or `@2`) is replaced by the correct response for account `user`
//! (`user2`) to the challenge the machine issued, with the algorithm it chose: the fuzzer cannot
//! compute MD5, so this is how it gets past CHAP to the operational stage. Invariants:
//! * never panics; every response's text parses; no secret ever appears in a response;
//! * after FullFeature or Failed, every further request fails;
//! * FullFeature only after the initiator sent a non-empty InitiatorName;
//! * where CHAP is required, FullFeature only after a correct CHAP_R for the account the machine
//!   then reports as authenticated — so fuzzer-made CHAP_R values never authenticate.
#![no_main]

use std::cell::Cell;

use libfuzzer_sys::fuzz_target;
use raftsan_proto::chap::{self, ChapAlgorithm};
use raftsan_proto::login::{LoginAuthority, LoginRequest, LoginStep, Lookup, TargetAuth, TargetLogin};
use raftsan_proto::text::{self, SessionType, TargetLimits};

const CHAP_TARGET: &str = "iqn.2026-01.test:chap";
const OPEN_TARGET: &str = "iqn.2026-01.test:open";
const DENIED_TARGET: &str = "iqn.2026-01.test:denied";
const ACCOUNTS: [(&str, &str); 2] = [("user", "in-secret-0123456"), ("user2", "in-secret-6543210")];
const MUTUAL: (&str, &str) = ("target-user", "out-secret-abcdefg");
const CHAP_ID: u8 = 7;
const CHALLENGE: [u8; 16] = *b"fuzz-challenge-1";
const REQ_HEADER: usize = 5;

struct Authority {
    discovery_chap: bool,
    /// Set by `lookup`: whether the target it allowed requires CHAP.
    allowed_chap: Cell<Option<bool>>,
}

fn chap_auth() -> TargetAuth {
    TargetAuth {
        accounts: ACCOUNTS
            .iter()
            .map(|(n, s)| ((*n).to_owned(), s.as_bytes().to_vec()))
            .collect(),
        mutual: Some((MUTUAL.0.to_owned(), MUTUAL.1.as_bytes().to_vec())),
        target_alias: Some("chap-alias".into()),
        tpgt: 1,
    }
}

fn open_auth() -> TargetAuth {
    TargetAuth {
        accounts: Vec::new(),
        mutual: None,
        target_alias: None,
        tpgt: 2,
    }
}

impl LoginAuthority for Authority {
    fn lookup(&self, session_type: SessionType, target_name: Option<&str>, initiator_name: &str) -> Lookup {
        assert!(!initiator_name.is_empty(), "lookup without an initiator name");
        assert!(self.allowed_chap.get().is_none(), "a second lookup in one login");
        let lookup = match (session_type, target_name) {
            (SessionType::Discovery, None) if self.discovery_chap => Lookup::Allowed(chap_auth()),
            (SessionType::Discovery, None) => Lookup::Allowed(open_auth()),
            (SessionType::Discovery, Some(_)) => panic!("discovery lookup with a target name"),
            (SessionType::Normal, None) => panic!("normal lookup without a target name"),
            (SessionType::Normal, Some(CHAP_TARGET)) => Lookup::Allowed(chap_auth()),
            (SessionType::Normal, Some(OPEN_TARGET)) => Lookup::Allowed(open_auth()),
            (SessionType::Normal, Some(DENIED_TARGET)) => Lookup::Denied,
            (SessionType::Normal, Some(_)) => Lookup::NotFound,
        };
        if let Lookup::Allowed(auth) = &lookup {
            self.allowed_chap.set(Some(!auth.accounts.is_empty()));
        }
        lookup
    }
}

fn value<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|input: &[u8]| {
    let Some((&sel, mut rest)) = input.split_first() else {
        return;
    };
    let authority = Authority {
        discovery_chap: sel & 1 == 1,
        allowed_chap: Cell::new(None),
    };
    let mut login = TargetLogin::new(TargetLimits::default(), CHAP_ID, CHALLENGE.to_vec());

    let mut sent = Vec::<u8>::new();
    let mut alg: Option<ChapAlgorithm> = None;
    // Accounts whose correct CHAP_R the harness substituted.
    let mut correct_for: Vec<&str> = Vec::new();
    let mut ended = false;

    while rest.len() >= REQ_HEADER {
        let flags = rest[0];
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]])).min(rest.len() - REQ_HEADER);
        let mut data = rest[REQ_HEADER..REQ_HEADER + len].to_vec();
        let (version_max, version_min) = (rest[1], rest[2]);
        rest = &rest[REQ_HEADER + len..];

        // Substitute a correct CHAP_R when asked and a challenge was issued.
        if let Some(alg) = alg {
            for (placeholder, (account, secret)) in [(&b"CHAP_R=@2\0"[..], ACCOUNTS[1]), (b"CHAP_R=@\0", ACCOUNTS[0])] {
                if let Some(at) = data.windows(placeholder.len()).position(|w| w == placeholder) {
                    let r = chap::encode_hex(&chap::chap_response(alg, CHAP_ID, secret.as_bytes(), &CHALLENGE));
                    let with = format!("CHAP_R={r}\0");
                    data.splice(at..at + placeholder.len(), with.into_bytes());
                    correct_for.push(account);
                    break;
                }
            }
        }
        sent.extend_from_slice(&data);
        sent.push(0);

        let req = LoginRequest {
            header: raftsan_proto::pdu::LoginRequest {
                transit: flags & 0x80 != 0,
                cont: flags & 0x40 != 0,
                csg: (flags >> 2) & 3,
                nsg: flags & 3,
                version_max,
                version_min,
                isid: [0x80, 0, 0, 0, 0, 1],
                tsih: 0,
                itt: 1,
                cid: 0,
                cmdsn: 1,
                exp_statsn: 0,
            },
            data: &data,
        };
        let step = login.on_request(&req, &authority);
        let response = match &step {
            LoginStep::Continue(r) | LoginStep::FullFeature(r, _) | LoginStep::Failed(r, _) => r,
        };
        // (Unknown keys are echoed as NotUnderstood: a secret the initiator sent itself may come back.)
        for (_, secret) in ACCOUNTS.iter().chain([&MUTUAL]) {
            let leaked = contains(&response.data, secret.as_bytes()) && !contains(&sent, secret.as_bytes());
            assert!(!leaked, "a secret in a login response");
        }
        let answers = text::parse(&response.data).expect("login response text parses");
        if let Some(code) = value(&answers, "CHAP_A") {
            let code = code.parse().expect("CHAP_A answer is a number");
            alg = Some(ChapAlgorithm::from_code(code).expect("CHAP_A answer is a known algorithm"));
        }
        if ended {
            assert!(
                matches!(step, LoginStep::Failed(..)),
                "a request after the login ended: {step:?}"
            );
        }
        match &step {
            LoginStep::Continue(r) => {
                assert_eq!((r.status_class, r.status_detail), (0, 0));
                assert_eq!(r.csg, req.header.csg);
                assert!(
                    !r.transit || (req.header.transit && r.nsg > r.csg),
                    "T=1 that the initiator did not ask for"
                );
            }
            LoginStep::Failed(r, _) => {
                assert_ne!(r.status_class, 0, "Failed with status class 0");
                ended = true;
            }
            LoginStep::FullFeature(r, _) => {
                assert!(
                    r.transit && req.header.transit && r.nsg == 3,
                    "FullFeature without T=1 NSG=3"
                );
                assert_eq!((r.status_class, r.status_detail), (0, 0));
                assert!(
                    contains(&sent, b"\0InitiatorName=") || sent.starts_with(b"InitiatorName="),
                    "FullFeature without an InitiatorName"
                );
                let chap_required = authority
                    .allowed_chap
                    .get()
                    .expect("FullFeature without an allowed lookup");
                if chap_required {
                    let user = login.authenticated_user().expect("CHAP target entered without a user");
                    assert!(
                        correct_for.contains(&user),
                        "FullFeature as {user:?} without its correct CHAP_R (sent {correct_for:?})"
                    );
                }
                ended = true;
            }
        }
    }
});
