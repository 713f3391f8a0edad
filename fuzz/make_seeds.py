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

# --- protobuf encoding for the cluster targets (proto3: varint and length-delimited fields)
def varint(v):
    out = bytearray()
    while True:
        b = v & 0x7f
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)

def pv(field, v):
    return varint(field << 3) + varint(v) if v else b""

def pb(field, b):
    b = b.encode() if isinstance(b, str) else b
    return varint(field << 3 | 2) + varint(len(b)) + b

def log_id(term, node, index):
    return pv(1, term) + pv(2, node) + pv(3, index)

def vote(term, node, committed):
    return pv(1, term) + pv(2, node) + pv(3, int(committed))

def membership(configs, nodes):
    return b"".join(pb(1, b"".join(pv(1, i) for i in c)) for c in configs) + \
        b"".join(pb(2, pv(1, i) + pb(2, a)) for i, a in nodes)

NODES3 = [(1, "10.0.0.1:7000"), (2, "10.0.0.2:7000"), (3, "10.0.0.3:7000")]
MEM3 = membership([[1, 2, 3]], NODES3)

def entry(term, node, index, kind, app=b"", mem=b""):
    e = pb(1, log_id(term, node, index)) + pv(2, kind)
    if app:
        e += pb(3, app)
    if mem:
        e += pb(4, mem)
    return e

def app(op, offset=0, length=0, data=b""):
    return pv(1, op) + pv(2, offset) + pv(3, length) + (pb(4, data) if data else b"") or pv(1, 0) + pb(4, b"\0")

def u16(b):
    return struct.pack("<H", len(b)) + b

# --- rpc: selector (mod 5) + message
append_req = pv(1, 1) + pv(2, 2) + pb(3, vote(3, 1, True)) + pb(4, log_id(2, 1, 5)) + \
    pb(5, entry(3, 1, 6, 0)) + pb(5, entry(3, 1, 7, 1, app(0, 4096, 0, bytes(range(32))))) + \
    pb(5, entry(3, 1, 8, 2, mem=MEM3)) + pb(5, entry(3, 1, 9, 1, app(5, data=b"\x10\x02"))) + \
    pb(5, entry(3, 1, 10, 1, app(4, 0, 1 << 21))) + pb(6, log_id(3, 1, 8))
write("rpc", "append", bytes([0]) + append_req)
write("rpc", "append_heartbeat", bytes([0]) + pv(2, 3) + pb(3, vote(4, 2, True)) + pb(4, log_id(4, 2, 100)) +
      pb(6, log_id(4, 2, 100)))
write("rpc", "append_first", bytes([0]) + pb(3, vote(1, 1, True)) + pb(5, entry(1, 1, 0, 2, mem=MEM3)))
write("rpc", "vote", bytes([1]) + pv(2, 2) + pb(3, vote(5, 3, False)) + pb(4, log_id(4, 2, 100)) + pv(6, 1))
write("rpc", "transfer", bytes([2]) + pv(1, 7) + pv(2, 2) + pb(3, vote(5, 1, True)) + pv(4, 2) +
      pb(5, log_id(5, 1, 42)))
begin = pv(1, 7) + pv(2, 2) + pb(3, vote(5, 1, True)) + pb(4, log_id(5, 1, 4096)) + pb(5, log_id(1, 1, 3)) + \
    pb(6, MEM3) + pv(7, 1) + pv(8, 3 << 20) + pv(9, 1 << 20) + pb(10, pb(1, pv(1, 1) + pb(2, b"PR")))
write("rpc", "snapshot_begin", bytes([3]) + pb(1, begin))
write("rpc", "snapshot_joint", bytes([3]) + pb(1, pb(3, vote(2, 1, True)) +
      pb(6, membership([[1, 2], [2, 3]], NODES3 + [(4, "10.0.0.4:7000")]))))
write("rpc", "snapshot_chunk", bytes([3]) + pb(2, pv(1, 2) + pb(2, b"data")))
write("rpc", "snapshot_end", bytes([3]) + pb(3, pv(1, 3)))
nexus = pv(1, (2 << 48) | 5) + pb(2, INIT) + pb(3, INIT + ",i,0x800000000001") + pb(4, bytes([0x80, 0, 0, 0, 0, 1])) + \
    pb(5, "iqn.2026-11.org.raftsan:v") + pv(6, 1) + pv(7, 2) + pv(8, 2)
write("rpc", "execute", bytes([4]) + pv(1, 1) + pv(2, 3) + pb(3, nexus) + pv(4, 1) + pb(5, bytes(INQ)) + pv(7, 255))

# --- meta: flags (bit 0: a u16-framed starting Catalogue) + u16-framed MetaCommands
def node_info(i, addr=None):
    return pv(1, i) + pb(2, addr or f"10.0.0.{i}:7000") + pb(3, f"10.0.0.{i}:3260")
def create_vol(name, size, target="", block=0, replicas=()):
    return pb(1, name) + pv(2, size) + pv(3, block) + (pb(4, target) if target else b"") + \
        b"".join(pv(5, r) for r in replicas)
add = lambda i: pb(1, node_info(i))
cmds = [add(1), add(2), add(3), pb(3, create_vol("a", 1 << 20)), pb(3, create_vol("b", 1 << 21, block=4096)),
        pb(5, pb(1, "a") + pv(2, 1 << 22)), pb(6, pb(1, "iqn.2026-01.test:t") + pb(2, INIT) +
                                              pb(4, pb(1, "user") + pb(2, "secret123456"))),
        pb(3, create_vol("c", 1 << 20, target="iqn.2026-01.test:t", replicas=[1, 2])),
        pb(3, create_vol("d", 1 << 20, target="IQN.2026-01.TEST:T")),
        pv(2, 2), add(2), add(4), pb(8, node_info(4, "10.0.0.44:7000")), pb(4, "a"), pb(7, "iqn.2026-01.test:t"),
        pb(4, "c"), pb(4, "d"), pb(7, "iqn.2026-01.test:t"), pb(3, create_vol("a", 1 << 20))]
write("meta", "lifecycle", bytes([0]) + b"".join(u16(c) for c in cmds))
write("meta", "case_target", bytes([0]) + b"".join(u16(c) for c in [
    add(1), pb(3, create_vol("A", 1 << 20)), pb(3, create_vol("x", 1 << 20, target="iqn.2026-11.org.raftsan:A")),
    pb(4, "A"), pb(4, "x")]))
vol = pv(1, 7) + pb(2, "v") + pv(3, 1 << 20) + pv(4, 512) + pb(5, "iqn.2026-11.org.raftsan:v") + pv(6, 1) + \
    pb(7, bytes(16)) + pb(8, "RAFTSAN00000007") + pv(9, 1) + pv(9, 2)
catalogue = pb(1, node_info(1)) + pb(1, node_info(2)) + pv(2, 1) + pv(2, 2) + pv(2, 5) + \
    pb(3, pb(1, "iqn.2026-11.org.raftsan:v")) + pb(4, vol) + pv(5, 8)
write("meta", "from_catalogue", bytes([1]) + u16(catalogue) + b"".join(u16(c) for c in [
    add(5), add(3), pb(3, create_vol("w", 1 << 20)), pb(5, pb(1, "v") + pv(2, 1 << 19)), pv(2, 1), pb(4, "v")]))

# --- journal: the file's contents
def journal(chunks, size, count=None):
    out = b"RSJN" + struct.pack("<I", 1)
    for off, data in chunks:
        out += struct.pack("<QII", off, len(data), crc32c(data)) + data
    body = struct.pack("<QQ", size, len(chunks) if count is None else count)
    return out + struct.pack("<QII", (1 << 64) - 1, 0, crc32c(body)) + body
J2 = journal([(0, b"hello"), (1 << 20, bytes([7]) * 64)], 2 << 20)
write("journal", "two_chunks", J2)
write("journal", "empty", journal([], 0))
write("journal", "no_trailer", J2[:-24])
write("journal", "bad_count", journal([(4096, b"x" * 100)], 8192, count=2))

# --- sm_state: flags (bit 0 meta, bit 1 raw file, bit 2 u16-framed journal first) + state
def frame(payload):
    return struct.pack("<III", 0x47534C52, len(payload), crc32c(payload)) + payload
stored_mem = pb(1, log_id(1, 1, 3)) + pb(2, MEM3)
snap_rec = pb(1, log_id(5, 1, 4096)) + pb(2, stored_mem) + pv(3, 16384) + pb(4, pb(1, pv(1, 1) + pb(2, b"PR")))
vol_state = pv(1, 1) + pb(2, log_id(5, 1, 5000)) + pb(3, stored_mem) + pv(4, 8192) + \
    pb(5, pv(1, 1) + pb(2, b"PR")) + pb(7, snap_rec)
write("sm_state", "volume", bytes([1 << 3]) + vol_state)
write("sm_state", "volume_raw", bytes([2 | 1 << 3]) + frame(vol_state))
meta_state = pv(1, 2) + pb(2, log_id(2, 1, 17)) + pb(3, stored_mem) + pb(6, catalogue)
write("sm_state", "meta", bytes([1]) + meta_state)
install_j = journal([(0, b"snapshot bytes"), (8192, bytes([9]) * 512)], 16384)
installing = pb(1, b"j.journal") + pb(2, snap_rec)
write("sm_state", "volume_install", bytes([4 | 1 << 3]) + u16(install_j) + vol_state + pb(8, installing))
meta_snap = pb(1, log_id(2, 1, 20)) + pb(2, stored_mem) + pb(4, catalogue)
write("sm_state", "meta_install", bytes([1]) + meta_state + pb(8, pb(2, meta_snap)))
