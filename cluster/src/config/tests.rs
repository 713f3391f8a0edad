//! Tests of both syntaxes through the public entry points: exact catalogs for accepted files,
//! exact `file:line: message` texts for refused ones.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use raftsan_target::catalog::{Backing, ChapAccount, Cidr, LunDef, TargetDef, derive_naa};

use super::*;

/// A directory with backing files `a.img`, `b.img`, … and room for config files.
struct Dir {
    tmp: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        for name in ["a.img", "b.img", "c.img", "d.img", "e.img"] {
            std::fs::write(tmp.path().join(name), [0u8; 512]).unwrap();
        }
        Dir { tmp }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Parses `text` as if it were the file `main.conf` in this directory.
    fn parse(&self, text: &str) -> Result<NodeConfig, ConfigError> {
        parse_str(text, &self.path("main.conf"))
    }

    /// The error message with the directory prefix replaced by `DIR`.
    fn err(&self, text: &str) -> String {
        let e = self.parse(text).expect_err("the configuration should be refused");
        e.to_string().replace(&self.tmp.path().display().to_string(), "DIR")
    }

    fn warnings(&self, c: &NodeConfig) -> Vec<String> {
        c.warnings
            .iter()
            .map(|w| w.to_string().replace(&self.tmp.path().display().to_string(), "DIR"))
            .collect()
    }
}

fn lun(target: &str, tid: u32, n: u64, path: PathBuf) -> LunDef {
    LunDef {
        lun: n,
        backing: Backing::Path(path),
        serial: format!("beaf{tid}{n}"),
        naa: derive_naa(target, n),
        vendor: "RAFTSAN".into(),
        product: "VIRTUAL-DISK".into(),
        revision: "0001".into(),
        block_size: 512,
        read_only: false,
        thin: true,
        write_cache: true,
    }
}

const SV1: &str = "default-driver iscsi
<target iqn.2023-02.dom.home.sv:sv1.disk>
    backing-store a.img
    initiator-name iqn.2023-02.dom.home.sv:sv.initiator01
    incominguser diskuser Eupen2marron
    initiator-address 192.168.1.73
</target>
";

#[test]
fn sv1_block_parses_to_the_expected_target() {
    let d = Dir::new();
    let c = d.parse(SV1).unwrap();
    assert_eq!(c.format, ConfigFormat::TargetsConf);
    let name = "iqn.2023-02.dom.home.sv:sv1.disk";
    let expected = TargetDef {
        name: name.into(),
        tid: 1,
        alias: None,
        luns: vec![lun(name, 1, 1, d.path("a.img"))],
        incoming_users: vec![ChapAccount {
            user: "diskuser".into(),
            secret: "Eupen2marron".into(),
        }],
        outgoing_user: None,
        initiator_names: vec!["iqn.2023-02.dom.home.sv:sv.initiator01".into()],
        initiator_addresses: vec![Cidr {
            addr: "192.168.1.73".parse().unwrap(),
            prefix_len: 32,
        }],
    };
    assert_eq!(c.catalog.targets, vec![expected]);
    assert_eq!(c.catalog.targets[0].luns[0].serial, "beaf11");
    assert!(c.catalog.discovery_users.is_empty());
    assert_eq!(c.portals, vec!["0.0.0.0:3260".parse::<SocketAddr>().unwrap()]);
    assert_eq!(c.limits, Limits::default());
    assert_eq!(c.iscsi, IscsiSettings::default());
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(c.admin_socket_path(), PathBuf::from(DEFAULT_ADMIN_SOCKET));
}

#[test]
fn several_targets_take_tids_in_name_order_like_tgt_admin() {
    let d = Dir::new();
    let c = d
        .parse(
            "<target iqn.2023-02.com.example:zeta>
  backing-store a.img
</target>
<target iqn.2023-02.com.example:alpha>
  backing-store b.img
</target>
<target iqn.2023-02.com.example:mid>
  controller_tid 7
  backing-store c.img
</target>
<target iqn.2023-02.com.example:omega>
</target>
",
        )
        .unwrap();
    let tids: Vec<(&str, u32)> = c
        .catalog
        .targets
        .iter()
        .map(|t| (t.name.rsplit(':').next().unwrap(), t.tid))
        .collect();
    // File order is kept; tids follow tgt-admin: alpha 1, mid 7 (controller_tid), omega 8, zeta 9.
    assert_eq!(tids, vec![("zeta", 9), ("alpha", 1), ("mid", 7), ("omega", 8)]);
    assert_eq!(c.catalog.targets[0].luns[0].serial, "beaf91");
    assert!(c.catalog.targets[3].luns.is_empty());
}

#[test]
fn backing_stores_are_numbered_as_tgt_admin_does() {
    let d = Dir::new();
    // Backing stores first, then direct stores, each group in path order.
    let c = d
        .parse(
            "<target iqn.2008-09.com.example:server.target4>
    direct-store b.img
    backing-store c.img
    direct-store d.img
    backing-store a.img
</target>
",
        )
        .unwrap();
    let luns: Vec<(u64, PathBuf)> = c.catalog.targets[0]
        .luns
        .iter()
        .map(|l| {
            (
                l.lun,
                match &l.backing {
                    Backing::Path(p) => p.clone(),
                    _ => unreachable!(),
                },
            )
        })
        .collect();
    assert_eq!(
        luns,
        vec![
            (1, d.path("a.img")),
            (2, d.path("c.img")),
            (3, d.path("b.img")),
            (4, d.path("d.img"))
        ]
    );
    let w = d.warnings(&c);
    assert_eq!(w.len(), 2);
    assert!(
        w[0].starts_with("DIR/main.conf:2: direct-store `b.img` is served like backing-store"),
        "{w:?}"
    );
}

#[test]
fn nested_store_blocks_with_lun_numbers_and_target_wide_defaults() {
    let d = Dir::new();
    let c = d
        .parse(
            "<target iqn.2008-09.com.example:server.target5>
    <backing-store c.img>
        vendor_id back1
        scsi_sn SERIAL
        write-cache on
    </backing-store>
    <direct-store a.img>
        lun 1
        product_id FASTDISK
    </direct-store>
    <backing-store b.img>
        lun 15
        block-size 4096
        readonly 1
        params thin_provisioning=0,scsi_sn=fifteen
    </backing-store>
    write-cache off
    vendor_id MyCompany Inc.
    bs-type aio
</target>
",
        )
        .unwrap();
    let t = &c.catalog.targets[0];
    /// lun, serial, vendor, product, block size, read-only, thin, write cache.
    type Summary<'a> = (u64, &'a str, &'a str, &'a str, u32, bool, bool, bool);
    let summary: Vec<Summary> = t
        .luns
        .iter()
        .map(|l| {
            (
                l.lun,
                l.serial.as_str(),
                l.vendor.as_str(),
                l.product.as_str(),
                l.block_size,
                l.read_only,
                l.thin,
                l.write_cache,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, "beaf11", "MyCompan", "FASTDISK", 512, false, true, false),
            (2, "SERIAL", "back1", "VIRTUAL-DISK", 512, false, true, true),
            (15, "fifteen", "MyCompan", "VIRTUAL-DISK", 4096, true, false, false),
        ]
    );
    let w = d.warnings(&c);
    assert!(
        w.contains(&"DIR/main.conf:18: vendor_id `MyCompany Inc.` is longer than 8 characters; INQUIRY reports `MyCompan` (as tgt does)".to_string()),
        "{w:?}"
    );
}

#[test]
fn target_level_lun_applies_to_the_single_store() {
    let d = Dir::new();
    let c = d
        .parse("<target iqn.2008-09.com.example:server.target6>\n  backing-store a.img\n  lun 10\n</target>\n")
        .unwrap();
    assert_eq!(c.catalog.targets[0].luns[0].lun, 10);
    assert_eq!(c.catalog.targets[0].luns[0].serial, "beaf110");
    assert_eq!(
        d.err(
            "<target iqn.2008-09.com.example:t>\n  backing-store a.img\n  backing-store b.img\n  lun 10\n</target>\n"
        ),
        "DIR/main.conf:4: a target-level `lun` applies to a single store, but target `iqn.2008-09.com.example:t` has 2; \
         put `lun N` inside `<backing-store PATH>` blocks"
    );
}

#[test]
fn includes_are_relative_to_the_including_file_and_may_glob() {
    let d = Dir::new();
    d.write(
        "conf.d/10-one.conf",
        "<target iqn.2023-02.com.example:one>\n  backing-store ../a.img\n</target>\n",
    );
    d.write(
        "conf.d/20-two.conf",
        "<target iqn.2023-02.com.example:two>\n  include ../two-body.inc\n</target>\n",
    );
    d.write("conf.d/notes.txt", "this is not included\n");
    d.write("two-body.inc", "backing-store b.img\nincominguser two Eupen2marron\n");
    d.write("dir/x.conf", "incomingdiscoveryuser disco Eupen2marron\n");
    let c = d
        .parse("include conf.d/*.conf\ninclude dir\ninclude nothing/*.conf\n")
        .unwrap();
    let names: Vec<&str> = c.catalog.targets.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["iqn.2023-02.com.example:one", "iqn.2023-02.com.example:two"]
    );
    assert_eq!(
        c.catalog.targets[0].luns[0].backing,
        Backing::Path(d.path("conf.d/../a.img"))
    );
    assert_eq!(
        c.catalog.targets[1].luns[0].backing,
        Backing::Path(d.path("conf.d/../b.img"))
    );
    assert_eq!(c.catalog.targets[1].incoming_users[0].user, "two");
    assert_eq!(c.catalog.discovery_users[0].user, "disco");
    assert_eq!(
        d.warnings(&c),
        vec!["DIR/main.conf:3: include `nothing/*.conf` matches no file"]
    );

    // An error inside an included file names that file and line.
    d.write(
        "bad.conf",
        "<target iqn.2023-02.com.example:bad>\n  frobnicate 1\n</target>\n",
    );
    assert_eq!(
        d.err("include bad.conf\n"),
        "DIR/bad.conf:2: unknown directive `frobnicate` in target `iqn.2023-02.com.example:bad`; \
         see docs/configuration.md for what a targets.conf may contain"
    );
    d.write("loop.conf", "include loop.conf\n");
    assert_eq!(
        d.err("include loop.conf\n"),
        "DIR/loop.conf:1: includes nest deeper than 8 levels; does a file include itself?"
    );
    assert!(
        d.err("include missing.conf\n")
            .starts_with("DIR/main.conf:1: cannot read `DIR/missing.conf`: ")
    );
}

#[test]
fn comments_continuations_equals_and_quotes() {
    let d = Dir::new();
    let c = d
        .parse(
            "# a comment\n\
             <target \"iqn.2023-02.com.example:q\">   # trailing comment\n\
             \tbacking-store = a.img\t# Becomes LUN 1\n\
             \tincominguser \\\n\
             \t    hash Pass\\#word1234\n\
             \tinitiator-address ALL\n\
             </target>\n",
        )
        .unwrap();
    let t = &c.catalog.targets[0];
    assert_eq!(t.name, "iqn.2023-02.com.example:q");
    assert_eq!(t.incoming_users[0].secret, "Pass#word1234");
    assert!(t.initiator_addresses.is_empty());
}

#[test]
fn tuning_lines_apply_node_wide() {
    let d = Dir::new();
    let c = d
        .parse(
            "<target iqn.2023-02.com.example:a>
  MaxRecvDataSegmentLength 65536
  MaxBurstLength 262144
  FirstBurstLength 262144
  ImmediateData No
  InitialR2T Yes
  HeaderDigest CRC32C,None
  DataDigest None
  MaxOutstandingR2T 4
  ErrorRecoveryLevel 0
</target>
<target iqn.2023-02.com.example:b>
  MaxRecvDataSegmentLength 65536
</target>
",
        )
        .unwrap();
    let s = &c.iscsi;
    assert_eq!(
        (
            s.max_recv_data_segment_length,
            s.max_burst_length,
            s.first_burst_length,
            s.immediate_data,
            s.initial_r2t,
            s.max_outstanding_r2t
        ),
        (65536, 262144, 262144, false, true, 4)
    );
    assert_eq!(s.header_digests, vec![Digest::Crc32c, Digest::None]);
    assert_eq!(s.data_digests, vec![Digest::None]);
    assert_eq!(
        d.err("<target iqn.2023-02.com.example:a>\n  MaxBurstLength 262144\n</target>\n<target iqn.2023-02.com.example:b>\n  MaxBurstLength 65536\n</target>\n"),
        "DIR/main.conf:5: MaxBurstLength 65536 differs from DIR/main.conf:2; raftsan applies iSCSI parameters to the whole node, \
         so give every target the same value (or set it once in the TOML [iscsi] section)"
    );
    assert_eq!(
        d.err("<target iqn.2023-02.com.example:a>\n  MaxRecvDataSegmentLength 100\n</target>\n"),
        "DIR/main.conf:2: MaxRecvDataSegmentLength 100 is out of range; RFC 7143 §13.12 allows 512 to 16777215"
    );
    assert_eq!(
        d.err("<target iqn.2023-02.com.example:a>\n  MaxBurstLength 16384\n  FirstBurstLength 65536\n</target>\n"),
        "DIR/main.conf:3: FirstBurstLength (65536) exceeds MaxBurstLength (16384); RFC 7143 §13.14 forbids it"
    );
}

#[test]
fn acl_semantics_and_warnings() {
    let d = Dir::new();
    let c = d
        .parse(
            "<target iqn.2023-02.com.example:a>
  initiator-name IQN.1994-05.com.RedHat:Client1
  initiator-name iqn.1994-05.com.redhat:client1
  incominguser alice Eupen2marron
  incominguser bob short
  outgoinguser target Eupen2marron
</target>
",
        )
        .unwrap();
    let t = &c.catalog.targets[0];
    assert_eq!(t.initiator_names, vec!["iqn.1994-05.com.redhat:client1"]);
    assert_eq!(t.incoming_users.len(), 2);
    assert_eq!(t.outgoing_user.as_ref().unwrap().user, "target");
    assert_eq!(
        d.warnings(&c),
        vec![
            "DIR/main.conf:5: incominguser `bob`: the secret has 5 characters; RFC 7143 §12.1.3 asks for at least 12 \
             (open-iscsi and Windows initiators refuse shorter ones)",
            "DIR/main.conf:2: target `iqn.2023-02.com.example:a` lists initiator-name but no initiator-address: raftsan admits \
             only the listed names (tgt-admin would add `initiator-address ALL`, which admits everyone)",
            "DIR/main.conf:1: target `iqn.2023-02.com.example:a`: the outgoing user's secret equals an incoming user's; \
             RFC 7143 §12.1.3 requires different secrets per direction and open-iscsi refuses such a login",
        ]
    );
}

#[test]
fn missing_backing_store_is_an_error_unless_ignore_errors() {
    let d = Dir::new();
    assert_eq!(
        d.err("<target iqn.2023-02.com.example:a>\n  backing-store /nonexistent/sdb1\n</target>\n"),
        "DIR/main.conf:2: backing store `/nonexistent/sdb1` does not exist; create it (for example `truncate -s 10G FILE`) or fix the path"
    );
    let c = d
        .parse("ignore-errors yes\n<target iqn.2023-02.com.example:a>\n  backing-store missing.img\n  backing-store a.img\n</target>\n")
        .unwrap();
    assert_eq!(c.catalog.targets[0].luns.len(), 1);
    assert_eq!(c.catalog.targets[0].luns[0].lun, 1);
    assert_eq!(
        d.warnings(&c),
        vec![
            "DIR/main.conf:3: backing store `DIR/missing.img` does not exist; create it (for example \
             `truncate -s 10G FILE`) or fix the path; LUN 2 skipped because of `ignore-errors yes`"
        ]
    );
}

#[test]
fn a_directory_is_not_a_backing_store() {
    let d = Dir::new();
    std::fs::create_dir(d.path("sub")).unwrap();
    assert_eq!(
        d.err("<target iqn.2023-02.com.example:a>\n  backing-store sub\n</target>\n"),
        "DIR/main.conf:2: backing store `DIR/sub` is a directory; give a regular file or a block device"
    );
}

/// Every refusal names the file and line and says what to change.
#[test]
fn targets_conf_error_messages() {
    let d = Dir::new();
    let t = |body: &str| format!("<target iqn.2023-02.com.example:a>\n{body}\n</target>\n");
    let cases: Vec<(String, &str)> = vec![
        (
            t("  Backing-Store a.img"),
            "DIR/main.conf:2: unknown directive `Backing-Store` in target `iqn.2023-02.com.example:a` (did you mean `backing-store`?); see docs/configuration.md for what a targets.conf may contain",
        ),
        (
            "frob 1\n".into(),
            "DIR/main.conf:1: unknown directive `frob` at the top level; see docs/configuration.md for what a targets.conf may contain",
        ),
        (
            t("  <backing-store a.img>\n    lun 0\n  </backing-store>"),
            "DIR/main.conf:3: LUN 0 is reserved for the storage-array controller (as in tgt); number backing stores from 1",
        ),
        (
            t(
                "  <backing-store a.img>\n    lun 3\n  </backing-store>\n  <backing-store b.img>\n    lun 3\n  </backing-store>",
            ),
            "DIR/main.conf:5: LUN 3 of target `iqn.2023-02.com.example:a` is already defined at DIR/main.conf:2; give each backing store its own `lun`",
        ),
        (
            format!("{}{}", t(""), t("")),
            "DIR/main.conf:4: target `iqn.2023-02.com.example:a` is already defined at DIR/main.conf:1; give each target its own name or merge the two blocks",
        ),
        (
            "<target disk1>\n</target>\n".into(),
            "DIR/main.conf:1: target name: `disk1` is not a valid iSCSI name (RFC 7143 §4.2.7): it must start with `iqn.`, `eui.` or `naa.`; for example `iqn.2023-02.com.example:storage.disk1`",
        ),
        (
            t("  initiator-name iqn.2023-02.com.example:a_b"),
            "DIR/main.conf:2: initiator-name: `iqn.2023-02.com.example:a_b` is not a valid iSCSI name (RFC 7143 §4.2.7): `_` is not allowed (only letters, digits, `-`, `.` and `:`); for example `iqn.2023-02.com.example:storage.disk1`",
        ),
        (
            t("  backing-store a.img\n  scsi_sn 0123456789012345678901234567890123456"),
            "DIR/main.conf:3: scsi_sn: serial number `0123456789012345678901234567890123456` must be 1 to 36 printable ASCII characters",
        ),
        (
            t("  block-size 520"),
            "DIR/main.conf:2: block size 520 is not supported; use 512, 1024, 2048 or 4096",
        ),
        (
            t("  bs-type rbd"),
            "DIR/main.conf:2: bs-type `rbd` is not available; raftsan's file and block-device store replaces rdwr, aio and sync, other types (rbd, glfs, sg, ssc, null, …) have no equivalent",
        ),
        (
            t(&format!("  incominguser u {}", "s".repeat(256))),
            "DIR/main.conf:2: incominguser `u`: the secret is 256 characters long; initiators accept at most 255",
        ),
        (
            t("  incominguser onlyuser"),
            "DIR/main.conf:2: `incominguser` takes a user name and a secret separated by a space, for example `incominguser diskuser Eupen2marron`",
        ),
        (
            t("  outgoinguser a Eupen2marron1\n  outgoinguser b Eupen2marron2"),
            "DIR/main.conf:3: `outgoinguser` is already defined at DIR/main.conf:2; a target answers mutual CHAP with one account; keep one line",
        ),
        (
            t("  initiator-address 192.168.1.300"),
            "DIR/main.conf:2: initiator address `192.168.1.300` is not an IP address or CIDR network; write an address (192.168.1.73), a network (192.168.1.0/24) or ALL",
        ),
        (
            t("  write-cache maybe"),
            "DIR/main.conf:2: write-cache `maybe`: write on or off",
        ),
        (
            t("  driver iser"),
            "DIR/main.conf:2: driver `iser`: raftsan only serves iscsi",
        ),
        (
            t("  <backing-store a.img>\n    initiator-name iqn.2023-02.com.example:x\n  </backing-store>"),
            "DIR/main.conf:3: unknown directive `initiator-name` in `<backing-store a.img>`; see docs/configuration.md for what a targets.conf may contain",
        ),
        (
            t("  backing-store a.img\n  backing-store a.img"),
            "DIR/main.conf:3: store `a.img` in target `iqn.2023-02.com.example:a` is already defined at DIR/main.conf:2; list each store once",
        ),
        (
            t("  scsi_sn one\n  scsi_sn two"),
            "DIR/main.conf:3: `scsi_sn` is already defined at DIR/main.conf:2; keep one of the two lines",
        ),
        (
            t("  params frobnicate=1"),
            "DIR/main.conf:2: params: unknown parameter `frobnicate`",
        ),
        (
            "<target iqn.2023-02.com.example:a>\n  backing-store a.img\n".into(),
            "DIR/main.conf:1: `<target iqn.2023-02.com.example:a>` is never closed; add `</target>`",
        ),
        (
            "</target>\n".into(),
            "DIR/main.conf:1: `</target>` closes a block that was never opened",
        ),
        (
            t("  <backing-store a.img>\n  </direct-store>"),
            "DIR/main.conf:3: `</direct-store>` found where `</backing-store>` was expected",
        ),
        (
            "default-driver iser\n<target iqn.2023-02.com.example:a>\n</target>\n".into(),
            "DIR/main.conf:1: default-driver `iser`: raftsan only serves iscsi",
        ),
        (
            "iSNSServerIP 10.0.0.1\n<target iqn.2023-02.com.example:a>\n</target>\n".into(),
            "DIR/main.conf:1: `iSNSServerIP`: raftsan does not register with an iSNS server; remove the iSNS lines and use SendTargets discovery",
        ),
        (
            t("  controller_tid 2\n</target>\n<target iqn.2023-02.com.example:b>\n  tid 2"),
            "DIR/main.conf:5: tid 2 is already defined at DIR/main.conf:2; give each target its own tid",
        ),
        (
            t("  <target iqn.2023-02.com.example:b>"),
            "DIR/main.conf:2: `<target>` cannot appear in a target; use `<backing-store PATH>` or `<direct-store PATH>`",
        ),
        (
            "<target iqn.2023-02.com.example:a>\n  incominguser \\\n".into(),
            "DIR/main.conf:2: the last line ends with `\\` but nothing follows; remove the backslash",
        ),
        (
            t("  <backing-store a.img"),
            "DIR/main.conf:2: `<backing-store a.img`: a block tag must end with `>`, for example `<target iqn.2023-02.com.example:disk1>`",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(d.err(&text), want, "for:\n{text}");
    }
}

#[test]
fn harmless_tgt_directives_are_accepted_with_warnings() {
    let d = Dir::new();
    let c = d
        .parse(
            "control-port 0
<target iqn.2023-02.com.example:a>
  backing-store a.img
  allow-in-use yes
  mode_page 8:0:18:0x10:0:0xff:0xff:0:0:0xff:0xff:0xff:0xff:0x80:0x14:0:0:0:0:0:0
  scsi_id 12345
  removable 0
  MaxXmitDataSegmentLength 65536
  DataPDUInOrder Yes
  state ready
  device-type disk
</target>
",
        )
        .unwrap();
    let w = d.warnings(&c);
    let lines: Vec<&str> = w.iter().map(|w| w.split(' ').next().unwrap()).collect();
    assert_eq!(
        lines,
        vec![
            "DIR/main.conf:1:",
            "DIR/main.conf:5:",
            "DIR/main.conf:6:",
            "DIR/main.conf:8:"
        ]
    );
}

#[test]
fn format_is_detected_by_content() {
    assert_eq!(detect_format(SV1), ConfigFormat::TargetsConf);
    assert_eq!(
        detect_format("# x\ninclude /etc/tgt/conf.d/*.conf\n"),
        ConfigFormat::TargetsConf
    );
    assert_eq!(detect_format("[node]\nportals = []\n"), ConfigFormat::Toml);
    assert_eq!(detect_format(""), ConfigFormat::Toml);
}

#[test]
fn empty_files_give_defaults() {
    let d = Dir::new();
    let c = d.parse("").unwrap();
    assert_eq!(c, NodeConfig::empty(ConfigFormat::Toml));
}

// ---------------------------------------------------------------- TOML

const TOML_SV1: &str = r#"[node]
portals = ["127.0.0.1:3260", "[::1]:3260", "10.0.0.5"]
data_dir = "state"
metrics = "127.0.0.1:9860"
worker_threads = 3

[limits]
max_cmds_per_session = 64
nop_in_interval_ms = 0

[iscsi]
header_digest = ["CRC32C"]

[[target]]
name = "IQN.2023-02.dom.home.sv:sv1.disk"
initiator_names = ["iqn.2023-02.dom.home.sv:sv.initiator01"]
initiator_addresses = ["192.168.1.73"]
incoming_users = [{ user = "diskuser", secret = "Eupen2marron" }]

[[target.lun]]
path = "a.img"

[[target.lun]]
lun = 3
memory_size = "64M"
serial = "mem3"
naa = "6001405a1b2c3d4e5f60718293a4b5c6"
read_only = true

[[target]]
name = "iqn.2023-02.dom.home.sv:sv1.other"
"#;

#[test]
fn toml_parses_to_the_expected_config() {
    let d = Dir::new();
    let c = d.parse(TOML_SV1).unwrap();
    assert_eq!(c.format, ConfigFormat::Toml);
    assert_eq!(
        c.portals,
        vec![
            "127.0.0.1:3260".parse::<SocketAddr>().unwrap(),
            "[::1]:3260".parse().unwrap(),
            "10.0.0.5:3260".parse().unwrap()
        ]
    );
    assert_eq!(c.data_dir, Some(d.path("state")));
    assert_eq!(c.admin_socket_path(), d.path("state/admin.sock"));
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9860".parse().unwrap()));
    assert_eq!(c.worker_threads, Some(3));
    assert_eq!(
        c.limits,
        Limits {
            max_cmds_per_session: 64,
            nop_in_interval_ms: 0,
            ..Limits::default()
        }
    );
    assert_eq!(c.iscsi.header_digests, vec![Digest::Crc32c]);
    let name = "iqn.2023-02.dom.home.sv:sv1.disk";
    let mut mem = lun(name, 1, 3, PathBuf::new());
    mem.backing = Backing::Memory { size_bytes: 64 << 20 };
    mem.serial = "mem3".into();
    mem.naa = [
        0x60, 0x01, 0x40, 0x5a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f, 0x60, 0x71, 0x82, 0x93, 0xa4, 0xb5, 0xc6,
    ];
    mem.read_only = true;
    assert_eq!(
        c.catalog.targets[0],
        TargetDef {
            name: name.into(),
            tid: 1,
            alias: None,
            luns: vec![lun(name, 1, 1, d.path("a.img")), mem],
            incoming_users: vec![ChapAccount {
                user: "diskuser".into(),
                secret: "Eupen2marron".into()
            }],
            outgoing_user: None,
            initiator_names: vec!["iqn.2023-02.dom.home.sv:sv.initiator01".into()],
            initiator_addresses: vec!["192.168.1.73".parse().unwrap()],
        }
    );
    assert_eq!(c.catalog.targets[1].tid, 2);
    assert!(c.warnings.is_empty());
}

#[test]
fn toml_error_messages() {
    let d = Dir::new();
    let cases: Vec<(&str, &str)> = vec![
        (
            "[node]\nportal = []\n",
            "DIR/main.conf:2: unknown field `portal`, expected one of `portals`, `data_dir`, `metrics`, `admin_socket`, `worker_threads`, `id`, `rpc_listen`, `rpc_advertise`; see docs/configuration.md",
        ),
        (
            "[node]\nportals = [\"nonsense\"]\n",
            "DIR/main.conf:2: portal `nonsense` is not an address; write `192.168.1.10:3260` or `[fd00::10]:3260`",
        ),
        (
            "[node]\nportals = []\n",
            "DIR/main.conf:2: portals is empty; list at least one address or leave the key out for 0.0.0.0:3260",
        ),
        (
            "[node]\nworker_threads = 0\n",
            "DIR/main.conf:2: worker_threads = 0 is out of range 1..=1024; leave it out for one per CPU",
        ),
        (
            "[node]\nmetrics = \"127.0.0.1\"\n",
            "DIR/main.conf:2: metrics `127.0.0.1` must be an address with a port, such as `127.0.0.1:9860`",
        ),
        (
            "[limits]\nmax_sessions = 0\n",
            "DIR/main.conf:2: max_sessions must be at least 1",
        ),
        (
            "[iscsi]\nfirst_burst_length = 2000000\n",
            "DIR/main.conf:2: FirstBurstLength (2000000) exceeds MaxBurstLength (1048576); RFC 7143 §13.14 forbids it",
        ),
        (
            "[iscsi]\nmax_outstanding_r2t = 0\n",
            "DIR/main.conf:2: MaxOutstandingR2T 0 is out of range; RFC 7143 §13.17 allows 1 to 65535",
        ),
        (
            "[iscsi]\ndata_digest = [\"MD5\"]\n",
            "DIR/main.conf:2: digest `MD5`: write \"None\" or \"CRC32C\"",
        ),
        (
            "[[target]]\nname = \"disk1\"\n",
            "DIR/main.conf:2: target name: `disk1` is not a valid iSCSI name (RFC 7143 §4.2.7): it must start with `iqn.`, `eui.` or `naa.`; for example `iqn.2023-02.com.example:storage.disk1`",
        ),
        (
            "[[target]]\nname = \"iqn.2023-02.com.example:a\"\n\n[[target]]\nname = \"iqn.2023-02.com.example:A\"\n",
            "DIR/main.conf:5: target `iqn.2023-02.com.example:a` is already defined at DIR/main.conf:2; give each target its own name or merge the two blocks",
        ),
        (
            "[[target]]\nname = \"iqn.2023-02.com.example:a\"\n[[target.lun]]\nlun = 0\nmemory_size = \"1M\"\n",
            "DIR/main.conf:4: LUN 0 is reserved for the storage-array controller (as in tgt); number backing stores from 1",
        ),
        (
            "[[target]]\nname = \"iqn.2023-02.com.example:a\"\n[[target.lun]]\nlun = 2\nmemory_size = \"1M\"\n[[target.lun]]\nlun = 2\nmemory_size = \"1M\"\n",
            "DIR/main.conf:7: LUN 2 of target `iqn.2023-02.com.example:a` is already defined at DIR/main.conf:4; give each backing store its own `lun`",
        ),
        (
            "[[target]]\nname = \"iqn.2023-02.com.example:a\"\n[[target.lun]]\nlun = 1\n",
            "DIR/main.conf:3: LUN 1 of target `iqn.2023-02.com.example:a` needs `path = \"/dev/sdb1\"` or `memory_size = \"64M\"`",
        ),
        (
            "[[target]]\nname = \"iqn.2023-02.com.example:a\"\n[[target.lun]]\nmemory_size = \"1000\"\n",
            "DIR/main.conf:4: memory_size (1000 bytes) is not a multiple of the block size 512",
        ),
        (
            "[[target]]\nname = \"iqn.2023-02.com.example:a\"\n[[target.lun]]\nmemory_size = \"1Q\"\n",
            "DIR/main.conf:4: size `1Q` has an unknown unit; use K, M, G or T (powers of 1024)",
        ),
        (
            "[[target]]\nname = \"iqn.2023-02.com.example:a\"\n[[target.lun]]\npath = \"missing.img\"\n",
            "DIR/main.conf:4: backing store `DIR/missing.img` does not exist; create it (for example `truncate -s 10G FILE`) or fix the path",
        ),
        (
            "[[target]]\nname = \"iqn.2023-02.com.example:a\"\n[[target.lun]]\nmemory_size = \"1M\"\nnaa = \"1234\"\n",
            "DIR/main.conf:5: naa `1234` must be 32 hexadecimal digits starting with 6 (NAA IEEE Registered Extended)",
        ),
        (
            "[[target]]\nname = \"iqn.2023-02.com.example:a\"\n[[target.lun]]\nmemory_size = \"1M\"\nvendor = \"TOO-LONG-VENDOR\"\n",
            "DIR/main.conf:5: vendor `TOO-LONG-VENDOR` must be 1 to 8 printable ASCII characters",
        ),
        (
            "[[target]]\nname = \"iqn.2023-02.com.example:a\"\n[[target.lun]]\nmemory_size = \"1M\"\nblock_size = 520\n",
            "DIR/main.conf:5: block size 520 is not supported; use 512, 1024, 2048 or 4096",
        ),
        (
            "[[target]]\nname = \"iqn.2023-02.com.example:a\"\n[[target.lun]]\nmemory_size = \"1M\"\nsize = 3\n",
            "DIR/main.conf:5: unknown field `size`, expected one of `lun`, `path`, `memory_size`, `serial`, `naa`, `vendor`, `product`, `revision`, `block_size`, `read_only`, `thin`, `write_cache`; see docs/configuration.md",
        ),
        (
            "[[target]]\nname = \"iqn.2023-02.com.example:a\"\nincoming_users = [{ user = \"bad user\", secret = \"Eupen2marron\" }]\n",
            "DIR/main.conf:3: incoming user user name `bad user` must be 1 to 255 printable ASCII characters without spaces",
        ),
        (
            "[[target]]\nname = \"iqn.2023-02.com.example:a\"\ninitiator_addresses = [\"10.0.0.0/33\"]\n",
            "DIR/main.conf:3: initiator address `10.0.0.0/33`: prefix length must be 0..=32; write an address (192.168.1.73), a network (192.168.1.0/24) or ALL",
        ),
        (
            "[[target]]\nname = \"iqn.2023-02.com.example:a\"\ntid = 2\n[[target]]\nname = \"iqn.2023-02.com.example:b\"\ntid = 2\n",
            "DIR/main.conf:6: tid 2 is already defined at DIR/main.conf:3; give each target its own tid",
        ),
        (
            "[node\n",
            "DIR/main.conf:1: unclosed table, expected `]`; see docs/configuration.md",
        ),
        // Cluster mode.
        (
            "[node]\nid = 1\n",
            "DIR/main.conf:2: a cluster node needs `rpc_listen = \"ADDR:PORT\"` in [node] (the cluster RPC listener)",
        ),
        (
            "[node]\nid = 0\nrpc_listen = \"127.0.0.1:7000\"\n",
            "DIR/main.conf:2: node id must be at least 1",
        ),
        (
            "[node]\nid = 1\nrpc_listen = \"127.0.0.1\"\n",
            "DIR/main.conf:3: rpc_listen `127.0.0.1` must be an address with a port, such as `10.0.0.11:7000`",
        ),
        (
            "[node]\nid = 1\nrpc_listen = \"0.0.0.0:7000\"\n",
            "DIR/main.conf:3: rpc_listen is a wildcard address; set rpc_advertise to the address peers should use",
        ),
        (
            "[node]\nid = 1\nrpc_listen = \"127.0.0.1:7000\"\n",
            "DIR/main.conf:2: a cluster node needs a [tls] section (ca, cert, key); `raftsan cluster init` and `raftsan cluster issue-cert` create the files",
        ),
        (
            "[node]\nrpc_listen = \"127.0.0.1:7000\"\n",
            "DIR/main.conf:2: [node] rpc_listen is only meaningful for a cluster node: set [node] id too",
        ),
        (
            "[node]\nid = 1\nrpc_listen = \"127.0.0.1:7000\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[raft]\nfsync = \"sometimes\"\n",
            "DIR/main.conf:9: fsync = \"sometimes\" is not known; use \"always\" or \"on-flush\"",
        ),
        (
            "[node]\nid = 1\nrpc_listen = \"127.0.0.1:7000\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[raft]\nelection_timeout_ms = [600, 300]\n",
            "DIR/main.conf:9: election_timeout_ms must be [min, max] with min < max, min at least twice heartbeat_ms (50) and max at most 60000",
        ),
        (
            "[node]\nid = 1\nrpc_listen = \"127.0.0.1:7000\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[[target]]\nname = \"iqn.2023-02.com.example:a\"\n",
            "DIR/main.conf:8: a cluster node ([node] id is set) takes its targets from the cluster: create volumes with `raftsan volume create` instead of [[target]] sections",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(d.err(text), want, "for:\n{text}");
    }
}

#[test]
fn toml_tids_skip_explicit_ones_and_luns_fill_gaps() {
    let d = Dir::new();
    let c = d
        .parse(
            "[[target]]\nname = \"iqn.2023-02.com.example:a\"\n\
             [[target]]\nname = \"iqn.2023-02.com.example:b\"\ntid = 1\n\
             [[target]]\nname = \"iqn.2023-02.com.example:c\"\n\
             [[target.lun]]\nmemory_size = 4096\n[[target.lun]]\nlun = 1\nmemory_size = 4096\n[[target.lun]]\nmemory_size = 4096\n",
        )
        .unwrap();
    let tids: Vec<u32> = c.catalog.targets.iter().map(|t| t.tid).collect();
    assert_eq!(tids, vec![2, 1, 3]);
    let luns: Vec<u64> = c.catalog.targets[2].luns.iter().map(|l| l.lun).collect();
    assert_eq!(luns, vec![2, 1, 3]);
}

// ---------------------------------------------------------------- shipped examples

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// The shipped examples parse, with their device paths pointed at temporary files.
#[test]
fn shipped_examples_parse() {
    let d = Dir::new();
    let img = d.path("a.img");
    let img = img.to_str().unwrap();

    let conf = std::fs::read_to_string(examples_dir().join("sv1-targets.conf")).unwrap();
    assert!(conf.contains("/dev/sdb1"));
    let c = parse_str(
        &conf.replace("/dev/sdb1", img),
        &examples_dir().join("sv1-targets.conf"),
    )
    .unwrap();
    assert_eq!(c.format, ConfigFormat::TargetsConf);
    let t = &c.catalog.targets[0];
    assert_eq!(t.name, "iqn.2023-02.dom.home.sv:sv1.disk");
    assert_eq!(t.luns[0].backing, Backing::Path(PathBuf::from(img)));
    assert_eq!(t.initiator_names, vec!["iqn.2023-02.dom.home.sv:sv.initiator01"]);
    assert_eq!(t.initiator_addresses, vec!["192.168.1.73".parse::<Cidr>().unwrap()]);
    assert_eq!(
        t.incoming_users,
        vec![ChapAccount {
            user: "diskuser".into(),
            secret: "Eupen2marron".into()
        }]
    );
    assert!(c.warnings.is_empty());

    let toml = std::fs::read_to_string(examples_dir().join("node.toml")).unwrap();
    assert!(toml.contains("/srv/raftsan/sv1.img"));
    let c = parse_str(
        &toml.replace("/srv/raftsan/sv1.img", img),
        &examples_dir().join("node.toml"),
    )
    .unwrap();
    assert_eq!(c.format, ConfigFormat::Toml);
    assert_eq!(c.portals.len(), 2);
    assert_eq!(c.limits, Limits::default());
    assert_eq!(c.iscsi, IscsiSettings::default());
    assert_eq!(c.admin_socket_path(), PathBuf::from("/run/raftsan/admin.sock"));
    assert_eq!(c.catalog.discovery_users.len(), 1);
    assert!(c.catalog.discovery_outgoing_user.is_some());
    let t = &c.catalog.targets[0];
    assert_eq!((t.tid, t.alias.as_deref()), (1, Some("sv1 disk")));
    assert_eq!(t.initiator_addresses.len(), 3);
    assert_eq!(t.luns.len(), 2);
    assert_eq!(t.luns[1].lun, 2);
    assert_eq!(t.luns[1].backing, Backing::Memory { size_bytes: 64 << 20 });
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);

    let extra = std::fs::read_to_string(examples_dir().join("targets.conf")).unwrap();
    let mut text = extra.clone();
    for (dev, img) in [
        ("/dev/vg0/lv1", "a.img"),
        ("/dev/vg0/lv2", "b.img"),
        ("/dev/sdc", "c.img"),
        ("/srv/iso/disk.img", "d.img"),
    ] {
        assert!(extra.contains(dev), "{dev}");
        text = text.replace(dev, d.path(img).to_str().unwrap());
    }
    let c = parse_str(&text, &examples_dir().join("targets.conf")).unwrap();
    let db = &c.catalog.targets[0];
    assert_eq!((db.tid, db.luns.len(), db.initiator_addresses.len()), (1, 2, 2));
    assert!(db.outgoing_user.is_some());
    let media = &c.catalog.targets[1];
    let luns: Vec<(u64, bool, bool, u32)> = media
        .luns
        .iter()
        .map(|l| (l.lun, l.read_only, l.write_cache, l.block_size))
        .collect();
    assert_eq!(luns, vec![(1, true, false, 512), (3, false, true, 4096)]);
    assert!(media.initiator_addresses.is_empty());
    assert_eq!(c.iscsi.max_recv_data_segment_length, 262144);
    assert_eq!(c.catalog.discovery_users.len(), 1);
}

#[test]
fn load_reads_a_file() {
    let d = Dir::new();
    let p = d.write("node.conf", &SV1.replace("a.img", "b.img"));
    let c = load(&p).unwrap();
    assert_eq!(c.catalog.targets[0].luns[0].backing, Backing::Path(d.path("b.img")));
    let e = load(&d.path("none.toml")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{}: cannot read", d.path("none.toml").display())),
        "{e}"
    );
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const WORDS: &[&str] = &[
        "<target iqn.2023-02.com.example:a>",
        "</target>",
        "<backing-store a.img>",
        "</backing-store>",
        "<direct-store b.img>",
        "</direct-store>",
        "backing-store a.img",
        "lun 0",
        "lun 1",
        "lun 99999999999999999999",
        "scsi_sn x",
        "vendor_id ",
        "include *.conf",
        "include .",
        "incominguser u p",
        "outgoinguser",
        "initiator-address ALL",
        "initiator-name iqn.",
        "MaxBurstLength 1",
        "params =,=",
        "\\",
        "#",
        "=",
        "\"",
        "<",
        ">",
        "[[target]]",
        "name = \"iqn.2023-02.a.b:c\"",
        "[[target.lun]]",
        "memory_size = \"1G\"",
        "lun = 0",
        "\n",
        " ",
        "\t",
        "ignore-errors yes",
        "controller_tid 0",
    ];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// DESIGN.md invariant 5 for the loader: no text makes `parse_str` panic.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC*") {
            let d = Dir::new();
            let _ = d.parse(&text);
        }

        #[test]
        fn token_soup_never_panics(tokens in proptest::collection::vec(proptest::sample::select(WORDS), 0..40)) {
            let d = Dir::new();
            let _ = d.parse(&tokens.join("\n"));
            let _ = d.parse(&tokens.join(" "));
        }
    }
}

#[test]
fn cluster_node_settings() {
    let text = "[node]\nid = 3\ndata_dir = \"d\"\nportals = [\"127.0.0.13:3260\"]\nrpc_listen = \"127.0.0.13:7000\"\n\
                [tls]\nca = \"pki/ca.crt\"\ncert = \"pki/node-3.crt\"\nkey = \"pki/node-3.key\"\n\
                [raft]\nfsync = \"on-flush\"\nheartbeat_ms = 100\nelection_timeout_ms = [400, 800]\n";
    let cfg = parse_str(text, Path::new("/etc/raftsan/node.toml")).unwrap();
    let c = cfg.cluster.unwrap();
    assert_eq!(c.node_id, 3);
    assert_eq!(c.rpc_advertise, "127.0.0.13:7000");
    assert_eq!(c.tls.ca, Path::new("/etc/raftsan/pki/ca.crt"));
    assert_eq!(c.raft.fsync, FsyncMode::OnFlush);
    assert_eq!(
        (c.raft.election_timeout_min_ms, c.raft.election_timeout_max_ms),
        (400, 800)
    );
    // Without [node] id a file is a standalone target.
    assert!(parse_str("[node]\n", Path::new("x.toml")).unwrap().cluster.is_none());
}

/// `[testing] fault_injection`: off by default, on only when asked (with a warning), and only for
/// a cluster node.
#[test]
fn testing_fault_injection_knob() {
    let node = "[node]\nid = 2\nrpc_listen = \"127.0.0.12:7000\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n";
    let off = parse_str(node, Path::new("/n.toml")).unwrap();
    assert!(!off.cluster.unwrap().fault_injection);
    let on = parse_str(
        &format!("{node}[testing]\nfault_injection = true\n"),
        Path::new("/n.toml"),
    )
    .unwrap();
    assert!(on.cluster.unwrap().fault_injection);
    assert!(on.warnings.iter().any(|w| w.message.contains("for testing only")));
    let no = parse_str(
        &format!("{node}[testing]\nfault_injection = false\n"),
        Path::new("/n.toml"),
    )
    .unwrap();
    assert!(!no.cluster.unwrap().fault_injection);
    assert!(no.warnings.is_empty());
    let typo = parse_str(
        &format!("{node}[testing]\nfault_injections = true\n"),
        Path::new("/n.toml"),
    );
    assert!(typo.is_err());
    let standalone = parse_str("[testing]\nfault_injection = true\n", Path::new("/n.toml")).unwrap_err();
    assert!(
        standalone.to_string().contains("only meaningful for a cluster node"),
        "{standalone}"
    );
}
