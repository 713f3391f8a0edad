//! Text key=value data segments (RFC 7143 §6.1): `text::parse`, and `encode` of what parsed
//! parses back to the same pairs. Parsed pairs also go through operational negotiation
//! (`Negotiator::respond`, §13) for both session types, whose answers must encode and parse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use raftsan_proto::text::{self, MAX_KEY_LEN, MAX_PAIRS, MAX_VALUE_LEN, Negotiator, SessionType, TargetLimits};

fuzz_target!(|data: &[u8]| {
    let Ok(pairs) = text::parse(data) else { return };
    assert!(pairs.len() <= MAX_PAIRS);
    for (k, v) in &pairs {
        assert!(!k.is_empty() && k.len() <= MAX_KEY_LEN && !k.contains('\0') && !k.contains('='));
        assert!(v.len() <= MAX_VALUE_LEN && !v.contains('\0'));
    }
    roundtrip(&pairs);

    for session_type in [SessionType::Normal, SessionType::Discovery] {
        let target = (session_type == SessionType::Normal).then(|| "iqn.2026-01.test:disk".to_owned());
        let mut n = Negotiator::new(
            TargetLimits::default(),
            session_type,
            "iqn.2026-01.test:init".into(),
            None,
            target,
        );
        if let Ok(answers) = n.respond(&pairs) {
            roundtrip(&answers);
            roundtrip(&n.declarations());
            let _ = n.into_params();
        }
    }
    for (_, v) in &pairs {
        let _ = text::parse_number(v);
    }
});

fn roundtrip(pairs: &[(String, String)]) {
    let refs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut out = Vec::new();
    text::encode(&refs, &mut out);
    if pairs.len() <= MAX_PAIRS {
        assert_eq!(text::parse(&out).as_deref(), Ok(pairs), "encode/parse roundtrip");
    }
}
