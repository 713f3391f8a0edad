//! Configuration text (tgt targets.conf and TOML): `raftsan_cluster::config::parse_str` with each
//! format. The origin is in a directory that does not exist, so relative `include`s and backing
//! paths resolve to nothing.
//! Input: byte 0 bit 0 forces the tgt parser by prefixing a `<target>`-free tgt comment line
//! (`detect_format` still decides); the rest is the text (UTF-8, else ignored).
//! Invariants: never panics; the detected format is the one parsed; a parsed config parses the
//! same way again (the parser is deterministic).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use raftsan_cluster::config::{self, ConfigFormat};

fuzz_target!(|input: &[u8]| {
    let Some((&sel, text)) = input.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else { return };
    // A leading bare directive line makes detect_format pick targets.conf.
    let text = if sel & 1 == 1 {
        format!("default-driver iscsi\n{text}")
    } else {
        text.to_owned()
    };
    let origin = Path::new("/nonexistent-raftsan-fuzz/targets.conf");
    let format = config::detect_format(&text);
    let first = config::parse_str(&text, origin);
    if let Ok(cfg) = &first {
        assert_eq!(cfg.format, format, "parsed as another format than detected");
    }
    if let Ok(cfg) = &first {
        let again = config::parse_str(&text, origin).expect("a parsed config parses again");
        assert_eq!(&again, cfg, "parse_str is not deterministic");
        assert!(matches!(format, ConfigFormat::Toml | ConfigFormat::TargetsConf));
    }
});
