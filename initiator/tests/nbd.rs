//! The NBD export driven by real clients (nbdinfo, nbdcopy, qemu-io, fio) and by a raw socket
//! client, over an in-memory block device that checks what the server promises it (aligned,
//! in-range requests) and records flushes, FUA writes, trims and zeroing.
//!
//! Tools come from Debian packages libnbd-bin (nbdinfo, nbdcopy), qemu-utils (qemu-io) and fio
//! (its nbd engine); scripts/install-deps.sh installs them. A missing tool fails its test with the
//! package name.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use raftsan_initiator::nbd::wire::{self, Command, Request};
use raftsan_initiator::nbd::{BlockDevice, DeviceError, NbdConfig, NbdListen, NbdServer, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// In-memory device

#[derive(Debug, Default, Clone)]
struct Stats {
    writes: u64,
    fua_writes: u64,
    flushes: u64,
    trims: Vec<(u64, u32)>,
    write_zeroes: Vec<(u64, u32, bool)>,
    /// Requests that broke the server's promise (unaligned or out of range).
    violations: Vec<String>,
}

struct MemDevice {
    data: Mutex<Vec<u8>>,
    block_size: u32,
    stats: Mutex<Stats>,
    /// When set, reads and writes fail as a multipath device with no usable path would.
    unavailable: AtomicBool,
}

impl MemDevice {
    fn new(size: usize, block_size: u32) -> Arc<Self> {
        Arc::new(MemDevice {
            data: Mutex::new(vec![0; size]),
            block_size,
            stats: Mutex::default(),
            unavailable: AtomicBool::new(false),
        })
    }

    fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    fn stats(&self) -> Stats {
        self.stats.lock().unwrap().clone()
    }

    fn check(&self, what: &str, offset: u64, len: u64) -> Result<(), DeviceError> {
        let bs = u64::from(self.block_size);
        let size = self.data.lock().unwrap().len() as u64;
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) || offset + len > size {
            self.stats
                .lock()
                .unwrap()
                .violations
                .push(format!("{what} offset {offset} len {len}"));
            return Err(DeviceError::Invalid("unaligned or out of range".into()));
        }
        Ok(())
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DeviceError> {
        self.check("read", offset, len.into())?;
        if self.unavailable.load(Ordering::Relaxed) {
            return Err(DeviceError::Unavailable("no usable path".into()));
        }
        // Yield so concurrent requests really interleave.
        tokio::task::yield_now().await;
        let d = self.data.lock().unwrap();
        Ok(Bytes::copy_from_slice(
            &d[offset as usize..offset as usize + len as usize],
        ))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        self.check("write", offset, data.len() as u64)?;
        if self.unavailable.load(Ordering::Relaxed) {
            return Err(DeviceError::Unavailable("no usable path".into()));
        }
        tokio::task::yield_now().await;
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        let mut s = self.stats.lock().unwrap();
        s.writes += 1;
        if fua {
            s.fua_writes += 1;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.stats.lock().unwrap().flushes += 1;
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        self.check("trim", offset, len.into())?;
        self.data.lock().unwrap()[offset as usize..offset as usize + len as usize].fill(0);
        self.stats.lock().unwrap().trims.push((offset, len));
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), DeviceError> {
        self.check("write_zeroes", offset, len.into())?;
        self.data.lock().unwrap()[offset as usize..offset as usize + len as usize].fill(0);
        self.stats.lock().unwrap().write_zeroes.push((offset, len, fua));
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Harness

struct Running {
    listen: NbdListen,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Running {
    fn uri(&self, export: &str) -> String {
        match &self.listen {
            NbdListen::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
            NbdListen::Tcp(a) => format!("nbd://{a}/{export}"),
        }
    }

    fn tcp_addr(&self) -> std::net::SocketAddr {
        match &self.listen {
            NbdListen::Tcp(a) => *a,
            NbdListen::Unix(_) => panic!("not a TCP export"),
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let r = tokio::time::timeout(Duration::from_secs(40), &mut self.task).await;
        r.expect("server stops after shutdown")
            .expect("server task")
            .expect("server result");
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn cfg() -> NbdConfig {
    NbdConfig {
        export_name: "vol".into(),
        description: "raftsan test volume".into(),
        read_only: false,
        multi_conn: true,
        max_request_bytes: 32 << 20,
    }
}

async fn start(dev: Arc<MemDevice>, cfg: NbdConfig, tcp: bool) -> Running {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let listen = if tcp {
        NbdListen::Tcp("127.0.0.1:0".parse().unwrap())
    } else {
        NbdListen::Unix(dir.path().join("nbd.sock"))
    };
    let server = NbdServer::bind(&listen).await.unwrap();
    let listen = server.local_addr().clone();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(server.run(dev, cfg, async {
        let _ = rx.await;
    }));
    Running {
        listen,
        stop: Some(tx),
        task,
        _dir: dir,
    }
}

/// Runs a client tool to completion; a missing tool fails the test naming its package.
async fn run_tool(prog: &str, package: &str, args: &[&str]) -> std::process::Output {
    let out = tokio::process::Command::new(prog).args(args).output().await;
    match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{prog} not found: install the Debian package {package} (scripts/install-deps.sh does)")
        }
        Err(e) => panic!("running {prog}: {e}"),
    }
}

async fn run_ok(prog: &str, package: &str, args: &[&str]) -> String {
    let o = run_tool(prog, package, args).await;
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{prog} {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn crc(data: &[u8]) -> u64 {
    // FNV-1a: enough to name a content in an assertion message.
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn assert_clean(dev: &MemDevice) {
    let v = dev.stats().violations;
    assert!(
        v.is_empty(),
        "server passed unaligned or out-of-range requests to the device: {v:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Raw client (old-style EXPORT_NAME: asks for no block size, so unaligned requests are legal)

struct RawClient {
    s: TcpStream,
    size: u64,
    flags: u16,
}

async fn greet(s: &mut TcpStream) {
    let mut g = [0u8; wire::GREETING_LEN];
    s.read_exact(&mut g).await.unwrap();
    assert_eq!(&g[0..16], b"NBDMAGICIHAVEOPT");
}

async fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
}

/// Reads one option reply: (option, reply type, data).
async fn read_option_reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), wire::REPLY_MAGIC);
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).await.unwrap();
    (opt, ty, data)
}

impl RawClient {
    async fn connect(addr: std::net::SocketAddr) -> RawClient {
        let mut s = TcpStream::connect(addr).await.unwrap();
        greet(&mut s).await;
        s.write_all(&3u32.to_be_bytes()).await.unwrap();
        send_option(&mut s, wire::NBD_OPT_EXPORT_NAME, b"vol").await;
        let mut r = [0u8; 10];
        s.read_exact(&mut r).await.unwrap();
        RawClient {
            s,
            size: u64::from_be_bytes(r[0..8].try_into().unwrap()),
            flags: u16::from_be_bytes(r[8..10].try_into().unwrap()),
        }
    }

    async fn send(&mut self, command: Command, flags: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let req = Request {
            flags,
            command,
            cookie,
            offset,
            len,
        };
        let mut b = req.encode().to_vec();
        b.extend_from_slice(payload);
        self.s.write_all(&b).await.unwrap();
    }

    /// Reads one reply; `read_lens` says how much data follows a successful reply per cookie.
    async fn reply(&mut self, read_lens: &HashMap<u64, u32>) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; wire::SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h).await.unwrap();
        let r = wire::parse_simple_reply(&h).expect("simple reply magic");
        let mut data = Vec::new();
        if r.error == 0
            && let Some(&len) = read_lens.get(&r.cookie)
        {
            data = vec![0u8; len as usize];
            self.s.read_exact(&mut data).await.unwrap();
        }
        (r.cookie, r.error, data)
    }

    async fn call(&mut self, command: Command, flags: u16, offset: u64, len: u32, payload: &[u8]) -> (u32, Vec<u8>) {
        self.send(command, flags, 7, offset, len, payload).await;
        let lens = if command == Command::Read {
            HashMap::from([(7, len)])
        } else {
            HashMap::new()
        };
        let (cookie, err, data) = self.reply(&lens).await;
        assert_eq!(cookie, 7);
        (err, data)
    }

    async fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let (err, data) = self.call(Command::Read, 0, offset, len, &[]).await;
        assert_eq!(err, 0, "read {offset}+{len}");
        data
    }

    async fn disconnect(mut self) {
        self.send(Command::Disc, 0, 0, 0, 0, &[]).await;
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut b)).await;
        assert!(matches!(n, Ok(Ok(0))), "server closes after NBD_CMD_DISC: {n:?}");
    }
}

/// The connection was closed by the server (EOF or reset) within a few seconds.
async fn assert_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 256];
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(r.is_ok(), "server did not close the connection");
}

// ---------------------------------------------------------------------------------------------
// Tests with real clients

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_block_sizes_and_flags() {
    let dev = MemDevice::new(16 << 20, 512);
    let srv = start(dev.clone(), cfg(), false).await;
    let out = run_ok("nbdinfo", "libnbd-bin", &["--json", &srv.uri("vol")]).await;
    let j: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo json {e}: {out}"));
    let e = &j["exports"][0];
    assert_eq!(e["export-name"], "vol", "{out}");
    assert_eq!(e["description"], "raftsan test volume", "{out}");
    assert_eq!(e["export-size"], 16 << 20, "{out}");
    assert_eq!(e["block_size_minimum"], 512, "{out}");
    assert_eq!(e["block_size_preferred"], 4096, "{out}");
    assert_eq!(e["block_size_maximum"], 32 << 20, "{out}");
    for (k, v) in [
        ("is_read_only", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_multi_conn", true),
        ("can_df", false),
    ] {
        assert_eq!(e[k], v, "{k} in {out}");
    }

    // The default (empty) name selects the export too; NBD_OPT_LIST names it.
    let out = run_ok("nbdinfo", "libnbd-bin", &["--size", &srv.uri("")]).await;
    assert_eq!(out.trim(), (16u64 << 20).to_string());
    let out = run_ok("nbdinfo", "libnbd-bin", &["--list", "--json", &srv.uri("")]).await;
    let j: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo json {e}: {out}"));
    assert_eq!(j["exports"][0]["export-name"], "vol", "{out}");
    // An unknown name is refused (NBD_REP_ERR_UNKNOWN).
    let o = run_tool("nbdinfo", "libnbd-bin", &[&srv.uri("nope")]).await;
    assert!(!o.status.success(), "nbdinfo accepted an unknown export");
    srv.stop().await;

    // Read-only, no multi-conn, 4 KiB blocks.
    let dev4k = MemDevice::new(8 << 20, 4096);
    let ro = NbdConfig {
        read_only: true,
        multi_conn: false,
        max_request_bytes: 1 << 20,
        ..cfg()
    };
    let srv = start(dev4k, ro, true).await;
    let out = run_ok("nbdinfo", "libnbd-bin", &["--json", &srv.uri("vol")]).await;
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &j["exports"][0];
    assert_eq!(e["is_read_only"], true, "{out}");
    assert_eq!(e["can_multi_conn"], false, "{out}");
    assert_eq!(e["block_size_minimum"], 4096, "{out}");
    assert_eq!(e["block_size_maximum"], 1 << 20, "{out}");
    srv.stop().await;
    assert_clean(&dev);
}

async fn nbdcopy_round_trip(tcp: bool) {
    const SIZE: usize = 64 << 20;
    let dev = MemDevice::new(SIZE, 512);
    let srv = start(dev.clone(), cfg(), tcp).await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    let data = pattern(SIZE, 0x5eed);
    std::fs::write(&src, &data).unwrap();
    let uri = srv.uri("vol");
    run_ok("nbdcopy", "libnbd-bin", &[src.to_str().unwrap(), &uri]).await;
    assert!(
        dev.snapshot() == data,
        "device content differs from the source after nbdcopy"
    );
    std::fs::write(&dst, b"").unwrap();
    run_ok("nbdcopy", "libnbd-bin", &[&uri, dst.to_str().unwrap()]).await;
    let back = std::fs::read(&dst).unwrap();
    assert_eq!(back.len(), SIZE);
    assert_eq!(
        crc(&back),
        crc(&data),
        "64 MiB round trip through nbdcopy changed the data"
    );
    srv.stop().await;
    assert_clean(&dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_64mib_round_trip_unix() {
    nbdcopy_round_trip(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_64mib_round_trip_tcp() {
    nbdcopy_round_trip(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_unaligned_pattern_and_commands_reach_the_device() {
    let dev = MemDevice::new(4 << 20, 4096);
    let srv = start(dev.clone(), cfg(), false).await;
    let uri = srv.uri("vol");
    let out = run_ok(
        "qemu-io",
        "qemu-utils",
        &[
            "-f",
            "raw",
            "-d",
            "unmap",
            "-c",
            "write -P 0xab 1000 3000",
            "-c",
            "write -P 0xcd 8191 2",
            "-c",
            "read -P 0xab 1000 3000",
            "-c",
            "read -P 0xcd 8191 2",
            "-c",
            "read -P 0 0 1000",
            "-c",
            "write -f -P 0x11 65536 65536",
            "-c",
            "write -z 131072 65536",
            "-c",
            "discard 262144 65536",
            "-c",
            "flush",
            &uri,
        ],
    )
    .await;
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let d = dev.snapshot();
    assert!(d[1000..4000].iter().all(|&b| b == 0xab));
    assert!(d[..1000].iter().all(|&b| b == 0) && d[4000..8191].iter().all(|&b| b == 0));
    assert_eq!(&d[8191..8193], &[0xcd, 0xcd]);
    assert!(d[65536..131072].iter().all(|&b| b == 0x11));
    let s = dev.stats();
    assert!(s.fua_writes >= 1, "FUA write did not reach the device: {s:?}");
    assert!(s.flushes >= 1, "flush did not reach the device: {s:?}");
    assert!(
        s.write_zeroes.iter().any(|&(o, l, _)| o == 131072 && l == 65536),
        "{s:?}"
    );
    assert!(s.trims.iter().any(|&(o, l)| o == 262144 && l == 65536), "{s:?}");
    srv.stop().await;
    assert_clean(&dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_nbd_engine_verifies_crc32c() {
    let dev = MemDevice::new(32 << 20, 512);
    let srv = start(dev.clone(), cfg(), false).await;
    let uri = srv.uri("vol");
    let o = run_tool("fio", "fio", &["--enghelp"]).await;
    assert!(
        String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == "nbd"),
        "this fio has no nbd engine (Debian's fio package builds it with libnbd)"
    );
    let out = run_ok(
        "fio",
        "fio",
        &[
            "--name=nbdverify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16m",
            "--iodepth=32",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--output-format=json",
        ],
    )
    .await;
    // fio's nbd engine prints "fio: connected to NBD server" before the JSON.
    let json = out.find('{').map_or("", |at| &out[at..]);
    let j: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("fio json {e}: {out}"));
    assert_eq!(j["jobs"][0]["error"], 0, "{out}");
    assert!(
        j["jobs"][0]["read"]["io_bytes"].as_u64().unwrap_or(0) >= 16 << 20,
        "verify pass read: {out}"
    );
    assert!(
        j["jobs"][0]["write"]["io_bytes"].as_u64().unwrap_or(0) >= 16 << 20,
        "{out}"
    );
    srv.stop().await;
    assert_clean(&dev);
}

// ---------------------------------------------------------------------------------------------
// Raw client: read-modify-write, concurrency, flags, hostile input

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unaligned_writes_are_read_modify_write_and_never_torn() {
    let dev = MemDevice::new(1 << 20, 512);
    let srv = start(dev.clone(), cfg(), true).await;
    let mut c = RawClient::connect(srv.tcp_addr()).await;
    assert_eq!(c.size, 1 << 20);
    assert_ne!(c.flags & wire::NBD_FLAG_SEND_WRITE_ZEROES, 0);
    let base = pattern(8192, 9);
    let (err, _) = c.call(Command::Write, 0, 0, 8192, &base).await;
    assert_eq!(err, 0);

    // 64 pipelined writes of disjoint 63-byte pieces sharing blocks: every one must survive
    // (a read-modify-write without serialization would lose some).
    for i in 0..64u64 {
        let piece = vec![i as u8 + 1; 63];
        c.send(Command::Write, 0, 100 + i, i * 64 + 1, 63, &piece).await;
    }
    // 64 pipelined writes of the same unaligned 1500-byte range: the result is one of them, whole.
    for i in 0..64u64 {
        let piece = vec![0x80 + i as u8; 1500];
        c.send(Command::Write, 0, 200 + i, 5000, 1500, &piece).await;
    }
    let mut seen = Vec::new();
    for _ in 0..128 {
        let (cookie, err, _) = c.reply(&HashMap::new()).await;
        assert_eq!(err, 0, "cookie {cookie}");
        seen.push(cookie);
    }
    seen.sort_unstable();
    assert_eq!(seen, (100..164).chain(200..264).collect::<Vec<_>>());
    let got = c.read(0, 8192).await;
    for i in 0..64usize {
        let at = i * 64;
        assert_eq!(got[at], base[at], "byte between pieces {i}");
        assert!(got[at + 1..at + 64].iter().all(|&b| b == i as u8 + 1), "piece {i} lost");
    }
    let range = &got[5000..6500];
    assert!(
        range.iter().all(|&b| b == range[0]) && range[0] >= 0x80,
        "torn write in 5000..6500"
    );
    assert_eq!(&got[4096..5000], &base[4096..5000], "head of the block kept");
    assert_eq!(&got[6500..], &base[6500..], "tail of the block kept");

    // Unaligned reads, write zeroes and trims.
    assert_eq!(c.read(4097, 3).await, got[4097..4100].to_vec());
    let (err, _) = c
        .call(Command::WriteZeroes, wire::NBD_CMD_FLAG_FUA, 300, 1000, &[])
        .await;
    assert_eq!(err, 0);
    let z = c.read(0, 2048).await;
    assert!(z[300..1300].iter().all(|&b| b == 0));
    assert_eq!(&z[..300], &got[..300]);
    assert_eq!(&z[1300..], &got[1300..2048]);
    let (err, _) = c.call(Command::WriteZeroes, 0, 100, 3000, &[]).await;
    assert_eq!(err, 0);
    let z = c.read(0, 4096).await;
    assert!(z[100..3100].iter().all(|&b| b == 0));
    assert_eq!(&z[3100..], &got[3100..4096]);
    let (err, _) = c.call(Command::Trim, 0, 100, 1000, &[]).await;
    assert_eq!(err, 0);
    let flushes = dev.stats().flushes;
    let (err, _) = c.call(Command::Trim, wire::NBD_CMD_FLAG_FUA, 1024, 512, &[]).await;
    assert_eq!(err, 0);
    assert_eq!(dev.stats().flushes, flushes + 1, "a FUA trim is followed by a flush");
    let (err, _) = c.call(Command::Flush, 0, 0, 0, &[]).await;
    assert_eq!(err, 0);
    let (err, _) = c
        .call(Command::Write, wire::NBD_CMD_FLAG_FUA, 512, 512, &[1; 512])
        .await;
    assert_eq!(err, 0);
    let s = dev.stats();
    assert_eq!(
        s.trims,
        vec![(512, 512), (1024, 512)],
        "only whole blocks inside a trim reach the device"
    );
    assert!(s.flushes >= 1 && s.fua_writes >= 2, "{s:?}");
    assert!(s.write_zeroes.contains(&(512, 2560, false)), "{s:?}");
    c.disconnect().await;
    srv.stop().await;
    assert_clean(&dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_error_replies_and_the_connection_goes_on() {
    let dev = MemDevice::new(1 << 20, 512);
    let small = NbdConfig {
        max_request_bytes: 64 << 10,
        ..cfg()
    };
    let srv = start(dev.clone(), small, true).await;
    let mut c = RawClient::connect(srv.tcp_addr()).await;
    let size = c.size;
    // Out-of-range read: EINVAL and no data (the next reply parses cleanly).
    assert_eq!(
        c.call(Command::Read, 0, size - 512, 1024, &[]).await,
        (wire::NBD_EINVAL, vec![])
    );
    assert_eq!(
        c.call(Command::Read, 0, u64::MAX - 10, 512, &[]).await.0,
        wire::NBD_EINVAL
    );
    // Write past the end: ENOSPC, its payload consumed.
    assert_eq!(
        c.call(Command::Write, 0, size, 512, &[9; 512]).await.0,
        wire::NBD_ENOSPC
    );
    assert_eq!(
        c.call(Command::WriteZeroes, 0, size - 512, 1024, &[]).await.0,
        wire::NBD_ENOSPC
    );
    // Oversize read and write: EINVAL, the write's payload discarded.
    assert_eq!(c.call(Command::Read, 0, 0, 128 << 10, &[]).await.0, wire::NBD_EINVAL);
    assert_eq!(
        c.call(Command::Write, 0, 0, 128 << 10, &vec![9; 128 << 10]).await.0,
        wire::NBD_EINVAL
    );
    // Unknown command and flags.
    assert_eq!(c.call(Command::Unknown(7), 0, 0, 512, &[]).await.0, wire::NBD_EINVAL);
    assert_eq!(c.call(Command::Read, 1 << 9, 0, 512, &[]).await.0, wire::NBD_EINVAL);
    // Still serving: nothing was written.
    assert!(c.read(0, 1024).await.iter().all(|&b| b == 0));
    assert!(dev.snapshot().iter().all(|&b| b == 0));
    c.disconnect().await;

    // Read-only: writes get EPERM.
    srv.stop().await;
    let srv = start(
        dev.clone(),
        NbdConfig {
            read_only: true,
            ..cfg()
        },
        true,
    )
    .await;
    let mut c = RawClient::connect(srv.tcp_addr()).await;
    assert_ne!(c.flags & wire::NBD_FLAG_READ_ONLY, 0);
    assert_eq!(c.call(Command::Write, 0, 0, 512, &[1; 512]).await.0, wire::NBD_EPERM);
    assert_eq!(c.call(Command::Trim, 0, 0, 512, &[]).await.0, wire::NBD_EPERM);
    assert_eq!(c.read(0, 512).await, vec![0; 512]);
    c.disconnect().await;
    srv.stop().await;
    assert_clean(&dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bytes_close_only_their_connection() {
    let dev = MemDevice::new(1 << 20, 512);
    let srv = start(dev.clone(), cfg(), true).await;
    let addr = srv.tcp_addr();
    // A healthy client stays connected through all of it.
    let mut healthy = RawClient::connect(addr).await;

    // Bad option magic.
    let mut s = TcpStream::connect(addr).await.unwrap();
    greet(&mut s).await;
    s.write_all(&1u32.to_be_bytes()).await.unwrap();
    s.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0").await.unwrap();
    assert_closed(&mut s).await;

    // Unknown client flags.
    let mut s = TcpStream::connect(addr).await.unwrap();
    greet(&mut s).await;
    s.write_all(&0xffu32.to_be_bytes()).await.unwrap();
    assert_closed(&mut s).await;

    // Unknown options, STRUCTURED_REPLY, a malformed GO, an unknown export: error replies, then
    // the handshake goes on; an oversize option closes.
    let mut s = TcpStream::connect(addr).await.unwrap();
    greet(&mut s).await;
    s.write_all(&1u32.to_be_bytes()).await.unwrap();
    send_option(&mut s, 0x1234, b"junk").await;
    assert_eq!(
        read_option_reply(&mut s).await,
        (0x1234, wire::NBD_REP_ERR_UNSUP, vec![])
    );
    send_option(&mut s, wire::NBD_OPT_STRUCTURED_REPLY, b"").await;
    assert_eq!(read_option_reply(&mut s).await.1, wire::NBD_REP_ERR_UNSUP);
    send_option(&mut s, wire::NBD_OPT_GO, &[0, 0, 0, 50, b'x']).await;
    assert_eq!(read_option_reply(&mut s).await.1, wire::NBD_REP_ERR_INVALID);
    send_option(&mut s, wire::NBD_OPT_INFO, &[0, 0, 0, 2, b'n', b'o', 0, 0]).await;
    assert_eq!(read_option_reply(&mut s).await.1, wire::NBD_REP_ERR_UNKNOWN);
    send_option(&mut s, wire::NBD_OPT_LIST, b"").await;
    let (_, ty, data) = read_option_reply(&mut s).await;
    assert_eq!(
        (ty, &data[..7]),
        (wire::NBD_REP_SERVER, &[0, 0, 0, 3, b'v', b'o', b'l'][..])
    );
    assert_eq!(read_option_reply(&mut s).await.1, wire::NBD_REP_ACK);
    let mut big = Vec::new();
    big.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    big.extend_from_slice(&wire::NBD_OPT_GO.to_be_bytes());
    big.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&big).await.unwrap();
    assert_closed(&mut s).await;

    // GO, then a bad request magic.
    let mut s = TcpStream::connect(addr).await.unwrap();
    greet(&mut s).await;
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    send_option(&mut s, wire::NBD_OPT_GO, &[0, 0, 0, 0, 0, 1, 0, 3]).await;
    let (_, ty, data) = read_option_reply(&mut s).await;
    assert_eq!(
        (ty, u16::from_be_bytes([data[0], data[1]])),
        (wire::NBD_REP_INFO, wire::NBD_INFO_EXPORT)
    );
    let (_, ty, data) = read_option_reply(&mut s).await;
    assert_eq!(
        (ty, data),
        (
            wire::NBD_REP_INFO,
            wire::info_block_size_data(512, 4096, 32 << 20).to_vec()
        )
    );
    assert_eq!(read_option_reply(&mut s).await.1, wire::NBD_REP_ACK);
    s.write_all(&[0xde; 28]).await.unwrap();
    assert_closed(&mut s).await;

    // Truncated request header, then hang up.
    let mut c = RawClient::connect(addr).await;
    c.s.write_all(
        &Request {
            flags: 0,
            command: Command::Read,
            cookie: 1,
            offset: 0,
            len: 512,
        }
        .encode()[..13],
    )
    .await
    .unwrap();
    drop(c);
    // Truncated write payload.
    let mut c = RawClient::connect(addr).await;
    let mut b = Request {
        flags: 0,
        command: Command::Write,
        cookie: 1,
        offset: 0,
        len: 4096,
    }
    .encode()
    .to_vec();
    b.extend_from_slice(&[1; 100]);
    c.s.write_all(&b).await.unwrap();
    drop(c);
    // Garbage instead of a greeting reply, then hang-up mid-handshake.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert_closed(&mut s).await;
    // NBD_OPT_ABORT gets an ACK and a close.
    let mut s = TcpStream::connect(addr).await.unwrap();
    greet(&mut s).await;
    s.write_all(&1u32.to_be_bytes()).await.unwrap();
    send_option(&mut s, wire::NBD_OPT_ABORT, b"").await;
    assert_eq!(read_option_reply(&mut s).await.1, wire::NBD_REP_ACK);
    assert_closed(&mut s).await;

    // The server still serves: the old connection and a new one.
    assert_eq!(healthy.read(0, 512).await, vec![0; 512]);
    let mut fresh = RawClient::connect(addr).await;
    assert_eq!(fresh.call(Command::Write, 0, 0, 512, &[5; 512]).await.0, 0);
    assert_eq!(healthy.read(0, 512).await, vec![5; 512]);
    fresh.disconnect().await;
    healthy.disconnect().await;
    let out = run_ok("nbdinfo", "libnbd-bin", &["--size", &srv.uri("vol")]).await;
    assert_eq!(out.trim(), "1048576");
    srv.stop().await;
    assert_clean(&dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests() {
    let dev = MemDevice::new(1 << 20, 512);
    let srv = start(dev.clone(), cfg(), true).await;
    let mut c = RawClient::connect(srv.tcp_addr()).await;
    for i in 0..32u64 {
        c.send(Command::Write, 0, i, i * 512, 512, &[i as u8; 512]).await;
    }
    let addr = srv.tcp_addr();
    // Wait until all 32 writes reached the device, then shut down: every reply is still sent.
    for _ in 0..500 {
        if dev.stats().writes == 32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    srv.stop().await;
    let mut n = 0;
    for _ in 0..32 {
        let (_, err, _) = c.reply(&HashMap::new()).await;
        assert_eq!(err, 0);
        n += 1;
    }
    assert_eq!(n, 32);
    assert_closed(&mut c.s).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
    assert_clean(&dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_stale_file_replaced_live_one_refused() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("x.sock");
    let listen = NbdListen::Unix(path.clone());
    // A stale socket file (nothing listens) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let first = NbdServer::bind(&listen).await.expect("stale socket replaced");
    // A live one is refused.
    let err = NbdServer::bind(&listen)
        .await
        .err()
        .expect("second bind refused")
        .to_string();
    assert!(err.contains("another process listens"), "{err}");
    drop(first);
    // A regular file is never removed.
    let file = dir.path().join("regular");
    std::fs::write(&file, b"keep").unwrap();
    let err = NbdServer::bind(&NbdListen::Unix(file.clone()))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");

    // serve(): runs until the shutdown future completes, removes its socket file.
    let dev = MemDevice::new(1 << 20, 512);
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listen.clone(), dev, cfg(), async {
        let _ = rx.await;
    }));
    for _ in 0..100 {
        if tokio::net::UnixStream::connect(&path).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = run_ok(
        "nbdinfo",
        "libnbd-bin",
        &["--size", &format!("nbd+unix:///?socket={}", path.display())],
    )
    .await;
    assert_eq!(out.trim(), "1048576");
    tx.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert!(!path.exists(), "socket file removed at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_errors_become_eio_without_data() {
    let dev = MemDevice::new(1 << 20, 512);
    let srv = start(dev.clone(), cfg(), true).await;
    let mut c = RawClient::connect(srv.tcp_addr()).await;
    assert_eq!(c.call(Command::Write, 0, 0, 1024, &[3; 1024]).await.0, 0);
    dev.unavailable.store(true, Ordering::Relaxed);
    // The failed read's reply carries no data: the next reply header parses (read_lens is
    // only consulted for error 0).
    assert_eq!(c.call(Command::Read, 0, 0, 1024, &[]).await, (wire::NBD_EIO, vec![]));
    assert_eq!(c.call(Command::Write, 0, 0, 512, &[4; 512]).await.0, wire::NBD_EIO);
    // An unaligned write fails in its read phase, before anything is written.
    assert_eq!(c.call(Command::Write, 0, 10, 20, &[4; 20]).await.0, wire::NBD_EIO);
    dev.unavailable.store(false, Ordering::Relaxed);
    assert_eq!(c.read(0, 1024).await, vec![3; 1024]);
    c.disconnect().await;
    srv.stop().await;
    assert_clean(&dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_over_tcp() {
    let dev = MemDevice::new(8 << 20, 512);
    let srv = start(dev.clone(), cfg(), true).await;
    let uri = srv.uri("vol");
    let out = run_ok("qemu-img", "qemu-utils", &["info", "--output=json", &uri]).await;
    let j: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img json {e}: {out}"));
    assert_eq!(j["virtual-size"], 8 << 20, "{out}");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let data = pattern(8 << 20, 77);
    std::fs::write(&src, &data).unwrap();
    run_ok(
        "qemu-img",
        "qemu-utils",
        &["convert", "-n", "-f", "raw", "-O", "raw", src.to_str().unwrap(), &uri],
    )
    .await;
    assert!(
        dev.snapshot() == data,
        "qemu-img convert to nbd:// wrote different data"
    );
    let out = run_ok(
        "qemu-img",
        "qemu-utils",
        &["compare", "-f", "raw", "-F", "raw", src.to_str().unwrap(), &uri],
    )
    .await;
    assert!(out.contains("identical"), "{out}");
    srv.stop().await;
    assert_clean(&dev);
}
