#!/usr/bin/env python3
"""Writes the hand-made seed corpus under fuzz/seeds/<target>/ (run from anywhere; idempotent).
Formats are those documented at the top of each fuzz_targets/<target>.rs."""
import os, struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF

def write(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

def text(*pairs):
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)

def pad(b):
    return b + b"\0" * ((4 - len(b) % 4) % 4)

def pdu(bhs, ahs=b"", data=b"", hdig=False, ddig=False):
    bhs = bytearray(bhs)
    bhs[4] = len(ahs) // 4
    bhs[5:8] = len(data).to_bytes(3, "big")
    out = bytes(bhs) + ahs
    if hdig:
        out += struct.pack("<I", crc32c(out))
    if data:
        out += pad(data)
        if ddig:
            out += struct.pack("<I", crc32c(pad(data)))
    return out

def login_bhs(flags):
    b = bytearray(48)
    b[0] = 0x43  # immediate Login Request
    b[1] = flags
    b[8:14] = bytes([0x80, 0, 0, 0, 0, 1])
    b[16:20] = (1).to_bytes(4, "big")
    return b

def scsi_bhs(cdb, edtl=0, read=True, write=False):
    b = bytearray(48)
    b[0] = 0x01
    b[1] = 0x80 | (0x40 if read else 0) | (0x20 if write else 0) | 1
    b[9] = 1  # LUN 1
    b[16:20] = (2).to_bytes(4, "big")
    b[20:24] = edtl.to_bytes(4, "big")
    b[32:32 + len(cdb)] = cdb
    return b

INIT = "iqn.2026-01.test:init"
LOGIN_TEXT = text(("InitiatorName", INIT), ("TargetName", "iqn.2026-01.test:open"), ("SessionType", "Normal"),
                  ("AuthMethod", "None"))
READ10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0])

# --- pdu: selector (limit index) + stream
login = pdu(login_bhs(0x81), data=LOGIN_TEXT)
read = pdu(scsi_bhs(READ10, 4096))
nop = pdu(bytes([0x40 | 0x00, 0x80]) + bytes(46))
ext = bytes([0, 9, 1, 0]) + bytes(range(8)) + bytes(4)  # AHSLength 9: reserved + 8 CDB bytes, padded
cdb32 = pdu(scsi_bhs(bytes([0x7f, 0, 0, 0, 0, 0, 0, 0x18, 0, 0x09])), ahs=ext[:12])
write("pdu", "login", bytes([2]) + login)
write("pdu", "read10_nop", bytes([2]) + read + nop)
write("pdu", "ext_cdb", bytes([2]) + cdb32)
write("pdu", "digests", bytes([3]) + pdu(login_bhs(0x81), data=LOGIN_TEXT, hdig=True, ddig=True))
write("pdu", "hdigest_read", bytes([3]) + pdu(scsi_bhs(READ10, 4096), hdig=True))

# --- text
write("text", "login", LOGIN_TEXT)
write("text", "operational", text(("HeaderDigest", "CRC32C,None"), ("DataDigest", "None"),
                                  ("MaxRecvDataSegmentLength", "262144"), ("MaxBurstLength", "16776192"),
                                  ("FirstBurstLength", "262144"), ("InitialR2T", "No"), ("ImmediateData", "Yes"),
                                  ("MaxOutstandingR2T", "1"), ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"),
                                  ("ErrorRecoveryLevel", "0"), ("MaxConnections", "1"), ("DataPDUInOrder", "Yes"),
                                  ("DataSequenceInOrder", "Yes"), ("X-com.example.vendor", "1"),
                                  ("SendTargets", "All")))

# --- login: discovery_chap selector, then records flags vmax vmin len16 data
def req(flags, data):
    return bytes([flags, 0, 0]) + struct.pack(">H", len(data)) + data
OPS = text(("HeaderDigest", "None"), ("DataDigest", "None"), ("MaxRecvDataSegmentLength", "65536"),
           ("InitialR2T", "Yes"), ("ImmediateData", "Yes"), ("ErrorRecoveryLevel", "0"))
write("login", "open_no_auth", bytes([0]) + req(0x81, LOGIN_TEXT) + req(0x87, OPS))
write("login", "open_op_direct", bytes([0]) + req(0x87, text(("InitiatorName", INIT),
                                                            ("TargetName", "iqn.2026-01.test:open")) + OPS))
chap_first = text(("InitiatorName", INIT), ("TargetName", "iqn.2026-01.test:chap"), ("AuthMethod", "CHAP,None"))
write("login", "chap_md5", bytes([0]) + req(0x00, chap_first) + req(0x00, text(("CHAP_A", "5"))) +
      req(0x81, text(("CHAP_N", "user"), ("CHAP_R", "@"))) + req(0x87, OPS))
write("login", "chap_sha256_mutual", bytes([0]) + req(0x00, chap_first + text(("CHAP_A", "7,6,5"))) +
      req(0x81, text(("CHAP_N", "user2"), ("CHAP_R", "@2"), ("CHAP_I", "3"), ("CHAP_C", "0x0102030405060708"))) +
      req(0x87, OPS))
write("login", "chap_wrong", bytes([0]) + req(0x00, chap_first) + req(0x00, text(("CHAP_A", "5"))) +
      req(0x81, text(("CHAP_N", "user"), ("CHAP_R", "0x" + "00" * 16))) + req(0x87, OPS))
write("login", "discovery_chap", bytes([1]) + req(0x00, text(("InitiatorName", INIT), ("SessionType", "Discovery"),
                                                             ("AuthMethod", "CHAP"), ("CHAP_A", "5"))) +
      req(0x81, text(("CHAP_N", "user"), ("CHAP_R", "@"))) + req(0x87, OPS))
write("login", "continued", bytes([0]) + req(0x40, LOGIN_TEXT[:20]) + req(0x81, LOGIN_TEXT[20:]) + req(0x87, OPS))

# --- chap
for i, v in enumerate([b"0x0123456789abcdef", b"0XABC", b"0bAQIDBA==", b"0BAQID", b"0b////", b"0x"]):
    write("chap", f"v{i}", v)

# --- scsi: records sel cdb_len data16 cdb data ; sel bits: 0 nexus, 1-2 LUN
def cmd(cdb, data=b"", nexus=0, lun=1):
    return bytes([(lun << 1) | nexus, len(cdb)]) + struct.pack(">H", len(data)) + bytes(cdb) + data
INQ = [0x12, 0, 0, 0, 0xff, 0]
seq = b"".join([
    cmd(INQ), cmd([0x12, 1, 0x83, 0, 0xff, 0]), cmd([0x12, 1, 0xb0, 0, 0xff, 0]), cmd([0, 0, 0, 0, 0, 0]),
    cmd([0x03, 0, 0, 0, 252, 0]), cmd([0x9e, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0]),
    cmd([0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0], bytes(range(256)) * 2),
    cmd(READ10[:8] + bytes([1, 0])), cmd([0x5a, 0, 0x3f, 0, 0, 0, 0, 0x10, 0, 0]),
    cmd([0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), cmd([0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    cmd([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], struct.pack(">HH4xQI4x", 22, 16, 4, 2)),
    cmd([0x93, 0x08, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 4, 0, 0], bytes(512)),
    cmd([0x34, 0, 0, 0, 0, 0, 0, 0, 8, 0]), cmd([0x89, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0], bytes(1024)),
    cmd([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], lun=2), cmd(INQ, lun=3), cmd([0x25] + [0] * 9, lun=2),
])
write("scsi", "basic", seq)
PROUT_REG = [0x5f, 0x00, 0, 0, 0, 0, 0, 0, 24, 0]
reg = lambda key: bytes(8) + struct.pack(">Q", key) + bytes(8)
pr_seq = b"".join([
    cmd(PROUT_REG, reg(0x1111)), cmd(PROUT_REG, reg(0x2222), nexus=1),
    cmd([0x5f, 0x01, 0x03, 0, 0, 0, 0, 0, 24, 0], struct.pack(">Q", 0x1111) + bytes(16)),
    cmd([0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], bytes(512), nexus=1), cmd([0x5e, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]),
    cmd([0x5e, 0x03, 0, 0, 0, 0, 0, 0x10, 0, 0]), cmd([0x16, 0, 0, 0, 0, 0], nexus=1),
    bytes([0xc0 | 2, 0, 0, 0]),  # LU reset
    cmd([0x15, 0x10, 0, 0, 12, 0], bytes([0, 0, 0x10, 0, 0x08, 0x06, 0, 0, 0, 0, 0, 0])),  # MODE SELECT
])
write("scsi", "pr_mode", pr_seq)

# --- pr: records op nexus cdb_len plen16 cdb params
def prrec(op, nexus, cdb, params=b""):
    return bytes([op, nexus, len(cdb)]) + struct.pack(">H", len(params)) + bytes(cdb) + params
tid = lambda name: bytes([0x45, 0]) + struct.pack(">H", (len(name) + 1 + 3) // 4 * 4) + pad(name.encode() + b"\0")
pr = b"".join([
    prrec(2, 0, PROUT_REG, reg(0xa)), prrec(2, 1, PROUT_REG, reg(0xb)),
    prrec(2, 0, [0x5f, 0x01, 0x01, 0, 0, 0, 0, 0, 24, 0], struct.pack(">Q", 0xa) + bytes(16)),
    prrec(0, 0, [0x5e, 0, 0, 0, 0, 0, 0, 0x20, 0, 0]), prrec(0, 1, [0x5e, 1, 0, 0, 0, 0, 0, 0x20, 0, 0]),
    prrec(0, 1, [0x5e, 2, 0, 0, 0, 0, 0, 0x20, 0, 0]), prrec(0, 1, [0x5e, 3, 0, 0, 0, 0, 0, 0x20, 0, 0]),
    prrec(4, 1, [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
    prrec(2, 1, [0x5f, 0x04, 0x01, 0, 0, 0, 0, 0, 24, 0], struct.pack(">QQ", 0xb, 0xa) + bytes(8)),
    # REGISTER with SPEC_I_PT and a TransportID list
    prrec(2, 0, PROUT_REG, bytes(8) + struct.pack(">Q", 0xc) + bytes([0, 0, 0, 0, 0x08, 0, 0, 0]) +
          struct.pack(">I", len(tid("iqn.2026-01.test:c,i,0x800000000003"))) + tid("iqn.2026-01.test:c,i,0x800000000003")),
    prrec(5, 0, []), prrec(7, 1, []), prrec(6, 0, []),
])
write("pr", "basic", pr)

# --- config
for name in ["targets.conf", "sv1-targets.conf", "node.toml"]:
    with open(os.path.join(ROOT, "examples", name), "rb") as f:
        body = f.read()
    write("config", name, bytes([0]) + body)
write("config", "tgt_minimal", b"\0<target iqn.2026-01.test:t>\n  backing-store /nonexistent/x.img\n  incominguser u secret12345678\n</target>\n")

# --- aptpl: selector bit 0 clear = harness wraps the payload (protobuf PersistedState) in a header
def ld(field, b):
    return bytes([field << 3 | 2, len(b)]) + b
A, B = b"iqn.2026-01.test:a,i,0x800000000001", b"iqn.2026-01.test:b,i,0x800000000002"
reg_a = ld(1, A) + bytes([0x10, 1]) + bytes([0x19]) + struct.pack("<Q", 0xa)
reg_b = ld(1, B) + bytes([0x19]) + struct.pack("<Q", 0xb)
resv = bytes([0x08, 5]) + ld(2, A) + bytes([0x18, 1])
state = bytes([0x08, 7]) + ld(2, reg_a) + ld(2, reg_b) + ld(3, resv) + bytes([0x20, 1])
write("aptpl", "two_regs_reserved", bytes([0]) + state)
write("aptpl", "empty_not_aptpl", bytes([0]) + bytes([0x08, 1]))
write("aptpl", "raw_file", bytes([1]) + b"RSPR" + struct.pack(">III", 1, len(state), crc32c(state)) + state)
