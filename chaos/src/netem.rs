//! Delay and loss on one path: the client's traffic to and from one node's portal
//! (`IP:3260` on `lo`), and nothing else.
//!
//! Two backends, chosen once per process by [`backend`]:
//!
//! * **tc** (when the kernel has `sch_prio` and `sch_netem`): a `prio` root qdisc on `lo` with
//!   handle `5253:`, 16 bands and every priority mapped to band 1, so unmatched traffic passes as
//!   before. Each fault takes a free band `b` (2..=16), grafts a `netem` qdisc on class `5253:b`
//!   and adds two u32 filters at filter priority `100 + b`: `dst IP dport 3260` (requests) and
//!   `src IP sport 3260` (replies). Heal deletes exactly those filters and that qdisc, then the
//!   root only if this process created it and nothing else hangs below it. A root `5253:` prio
//!   found on `lo` (another chaos run on the machine) is shared: its bands are claimed with
//!   `tc qdisc add`, which fails on a band already taken. Any other root qdisc on `lo` belongs to
//!   someone else: the fault fails with a message saying so and touches nothing.
//! * **iptables** (kernels without netem, like the CI VM whose kernel has neither `sch_netem`
//!   nor `sch_prio` and no module loading): loss is `-m statistic --mode random` DROP on the same
//!   two matches; delay sends the same two matches to an NFQUEUE that this process serves,
//!   accepting every packet after its delay (FIFO: a packet never overtakes an earlier one, so
//!   jitter varies the delay without reordering). `--queue-bypass` lets packets through if the
//!   process dies before its rules are removed.
//!
//! Both are removed by [`Degraded`]'s `Drop` (heal, error or panic), like [`faults::Rules`].

use std::collections::VecDeque;
use std::io;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::faults::Rules;

/// Root qdisc handle major ("RS").
pub const ROOT_MAJOR: u16 = 0x5253;
/// Bands of the root prio qdisc (the kernel's maximum); band 1 carries all unmatched traffic.
pub const BANDS: u16 = 16;
const PORTAL_PORT: u16 = 3260;

/// What a fault does to the path, per direction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NetFault {
    Delay { delay_ms: u32, jitter_ms: u32 },
    Loss { percent: f64 },
}

impl NetFault {
    /// Seeded parameters: 100-200 ms each way (a round trip of 200-400 ms) with 50 ms jitter,
    /// or 5-20 % loss each way.
    pub fn delay(r: f64) -> NetFault {
        NetFault::Delay {
            delay_ms: 100 + (100.0 * r) as u32,
            jitter_ms: 50,
        }
    }
    pub fn loss(r: f64) -> NetFault {
        NetFault::Loss {
            percent: (5.0 + 15.0 * r).round(),
        }
    }
    /// `tc ... netem` arguments.
    pub fn netem_args(self) -> Vec<String> {
        match self {
            NetFault::Delay { delay_ms, jitter_ms } => {
                vec!["delay".into(), format!("{delay_ms}ms"), format!("{jitter_ms}ms")]
            }
            NetFault::Loss { percent } => vec!["loss".into(), format!("{percent}%")],
        }
    }
}

/// Which mechanism degrades paths on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    Tc,
    Iptables,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Tc => "tc prio+u32+netem on lo",
            Backend::Iptables => "iptables statistic (loss) / NFQUEUE delayer (delay)",
        }
    }
}

/// Loads `sch_netem`/`sch_prio` if the kernel has modules (`modprobe` may be missing), then probes
/// them in a throw-away network namespace so the probe never touches the shared `lo`.
pub fn backend() -> Backend {
    static B: OnceLock<Backend> = OnceLock::new();
    *B.get_or_init(|| {
        for m in ["sch_netem", "sch_prio"] {
            let _ = Command::new("modprobe").arg(m).output();
        }
        let probe = Command::new("unshare")
            .args([
                "--net",
                "sh",
                "-c",
                "tc qdisc add dev lo root handle 1: prio && tc qdisc add dev lo parent 1:1 netem delay 1ms",
            ])
            .output();
        match probe {
            Ok(o) if o.status.success() => Backend::Tc,
            _ => Backend::Iptables,
        }
    })
}

static RNG: Mutex<Option<StdRng>> = Mutex::new(None);

/// Seeds the parameters of later faults (called once per run with the run's seed).
pub fn set_seed(seed: u64) {
    *RNG.lock().unwrap_or_else(|e| e.into_inner()) = Some(StdRng::seed_from_u64(seed ^ 0x6e65_7465_6d00));
}

/// A uniform draw in [0, 1) from the seeded stream.
pub fn draw() -> f64 {
    RNG.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(|| StdRng::seed_from_u64(0))
        .random::<f64>()
}

// --- tc command construction (pure, unit-tested) --------------------------------------------

fn s(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

fn root_handle() -> String {
    format!("{ROOT_MAJOR:x}:")
}

fn class(band: u16) -> String {
    format!("{ROOT_MAJOR:x}:{band:x}")
}

fn child_handle(band: u16) -> String {
    format!("{:x}:", 0x5300 + band)
}

fn filter_prio(band: u16) -> String {
    (100 + band).to_string()
}

/// `tc` arguments creating the shared root: every priority to band 1 (class `5253:1`).
pub fn tc_root_add() -> Vec<String> {
    let mut a = s(&["qdisc", "add", "dev", "lo", "root", "handle", &root_handle(), "prio"]);
    a.extend(s(&["bands", &BANDS.to_string(), "priomap"]));
    a.extend(std::iter::repeat_n("0".to_string(), 16));
    a
}

pub fn tc_root_del() -> Vec<String> {
    s(&["qdisc", "del", "dev", "lo", "root", "handle", &root_handle()])
}

/// The netem qdisc of `band`.
pub fn tc_child_add(band: u16, f: NetFault) -> Vec<String> {
    let mut a = s(&[
        "qdisc",
        "add",
        "dev",
        "lo",
        "parent",
        &class(band),
        "handle",
        &child_handle(band),
        "netem",
    ]);
    a.extend(f.netem_args());
    a
}

pub fn tc_child_del(band: u16) -> Vec<String> {
    s(&[
        "qdisc",
        "del",
        "dev",
        "lo",
        "parent",
        &class(band),
        "handle",
        &child_handle(band),
    ])
}

/// The two u32 filters steering `ip`'s portal traffic (requests and replies) into `band`.
pub fn tc_filters_add(band: u16, ip: Ipv4Addr) -> [Vec<String>; 2] {
    let port = PORTAL_PORT.to_string();
    let host = format!("{ip}/32");
    let f = |dir: &str, pdir: &str| {
        s(&[
            "filter",
            "add",
            "dev",
            "lo",
            "parent",
            &root_handle(),
            "protocol",
            "ip",
            "prio",
            &filter_prio(band),
            "u32",
            "match",
            "ip",
            dir,
            &host,
            "match",
            "ip",
            pdir,
            &port,
            "0xffff",
            "flowid",
            &class(band),
        ])
    };
    [f("dst", "dport"), f("src", "sport")]
}

/// Deletes every filter at `band`'s filter priority (only ours use it).
pub fn tc_filters_del(band: u16) -> Vec<String> {
    s(&[
        "filter",
        "del",
        "dev",
        "lo",
        "parent",
        &root_handle(),
        "protocol",
        "ip",
        "prio",
        &filter_prio(band),
    ])
}

/// The root qdisc of `lo` as `tc qdisc show dev lo` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Root {
    /// `noqueue` (lo's default) or nothing: ours to create.
    Absent,
    /// Our `prio 5253:` (this or another chaos process created it): shared.
    Ours,
    /// Someone else's: not touched.
    Foreign(String),
}

pub fn parse_root(show: &str) -> Root {
    for line in show.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.first() != Some(&"qdisc") || !w.contains(&"root") {
            continue;
        }
        return match (w.get(1).copied(), w.get(2).copied()) {
            (Some("noqueue"), _) => Root::Absent,
            (Some("prio"), Some(h)) if h == root_handle() => Root::Ours,
            _ => Root::Foreign(line.trim().to_string()),
        };
    }
    Root::Absent
}

/// Bands of our root that have a qdisc grafted (taken by some chaos process).
pub fn parse_used_bands(show: &str) -> Vec<u16> {
    let prefix = format!("{ROOT_MAJOR:x}:");
    let mut used = Vec::new();
    for line in show.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = w.iter().position(|x| *x == "parent")
            && let Some(p) = w.get(i + 1)
            && let Some(minor) = p.strip_prefix(&prefix)
            && let Ok(b) = u16::from_str_radix(minor, 16)
        {
            used.push(b);
        }
    }
    used
}

fn tc(args: &[String]) -> Result<String> {
    let out = Command::new("tc")
        .args(args)
        .output()
        .context("running tc (install iproute2)")?;
    ensure!(
        out.status.success(),
        "tc {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A netem band of the shared root, removed when dropped.
struct TcGuard {
    band: u16,
    created_root: bool,
    child: bool,
    filters: bool,
}

impl TcGuard {
    fn install(ip: Ipv4Addr, f: NetFault) -> Result<TcGuard> {
        let show = tc(&s(&["qdisc", "show", "dev", "lo"]))?;
        let created_root = match parse_root(&show) {
            Root::Ours => false,
            Root::Absent => {
                tc(&tc_root_add())?;
                true
            }
            Root::Foreign(line) => bail!(
                "lo has a root qdisc raftsan-chaos did not create ({line}); refusing to replace it \
                 (remove it or run the netem faults on another machine)"
            ),
        };
        let mut g = TcGuard {
            band: 0,
            created_root,
            child: false,
            filters: false,
        };
        let used = parse_used_bands(&tc(&s(&["qdisc", "show", "dev", "lo"]))?);
        for band in 2..=BANDS {
            if used.contains(&band) {
                continue;
            }
            // A concurrent chaos process may take the band first: `add` then fails, try the next.
            if tc(&tc_child_add(band, f)).is_ok() {
                g.band = band;
                g.child = true;
                break;
            }
        }
        ensure!(g.child, "no free band of the root qdisc {} on lo", root_handle());
        g.filters = true;
        for a in tc_filters_add(g.band, ip) {
            tc(&a)?;
        }
        Ok(g)
    }
}

impl Drop for TcGuard {
    fn drop(&mut self) {
        if self.filters {
            let _ = tc(&tc_filters_del(self.band));
        }
        if self.child {
            let _ = tc(&tc_child_del(self.band));
        }
        if self.created_root {
            // Only when no other process hangs a band or a filter below it.
            let idle = tc(&s(&["qdisc", "show", "dev", "lo"])).is_ok_and(|q| parse_used_bands(&q).is_empty())
                && tc(&s(&["filter", "show", "dev", "lo", "parent", &root_handle()]))
                    .is_ok_and(|f| f.trim().is_empty());
            if idle {
                let _ = tc(&tc_root_del());
            }
        }
    }
}

// --- iptables backend -------------------------------------------------------------------------

/// The two iptables matches of `ip`'s portal path (requests, replies).
pub fn path_matches(ip: Ipv4Addr) -> [Vec<String>; 2] {
    let ip = ip.to_string();
    let port = PORTAL_PORT.to_string();
    [
        s(&["INPUT", "-d", &ip, "-p", "tcp", "--dport", &port]),
        s(&["INPUT", "-s", &ip, "-p", "tcp", "--sport", &port]),
    ]
}

/// iptables rules dropping `percent` % of each direction's packets.
pub fn loss_rules(ip: Ipv4Addr, percent: f64) -> Vec<Vec<String>> {
    let p = format!("{:.4}", percent / 100.0);
    path_matches(ip)
        .into_iter()
        .map(|mut r| {
            r.extend(s(&[
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &p,
                "-j",
                "DROP",
            ]));
            r
        })
        .collect()
}

/// iptables rules sending the path to NFQUEUE `queue`.
pub fn queue_rules(ip: Ipv4Addr, queue: u16) -> Vec<Vec<String>> {
    path_matches(ip)
        .into_iter()
        .map(|mut r| {
            r.extend(s(&[
                "-j",
                "NFQUEUE",
                "--queue-num",
                &queue.to_string(),
                "--queue-bypass",
            ]));
            r
        })
        .collect()
}

/// A degraded path; healed (everything this process added removed) when dropped.
pub struct Degraded {
    // Field order is drop order: the rules go first, then the delayer releases what it holds.
    _rules: Option<Rules>,
    _delayer: Option<Delayer>,
    _tc: Option<TcGuard>,
    pub backend: Backend,
    pub fault: NetFault,
}

/// Applies `f` to the client's path to `ip`'s portal.
pub fn degrade_portal(ip: Ipv4Addr, f: NetFault) -> Result<Degraded> {
    let backend = backend();
    let mut d = Degraded {
        _rules: None,
        _delayer: None,
        _tc: None,
        backend,
        fault: f,
    };
    match (backend, f) {
        (Backend::Tc, _) => d._tc = Some(TcGuard::install(ip, f)?),
        (Backend::Iptables, NetFault::Loss { percent }) => d._rules = Some(Rules::insert(loss_rules(ip, percent))?),
        (Backend::Iptables, NetFault::Delay { delay_ms, jitter_ms }) => {
            let delayer = Delayer::start(delay_ms, jitter_ms)?;
            let q = delayer.queue;
            d._delayer = Some(delayer);
            d._rules = Some(Rules::insert(queue_rules(ip, q))?);
        }
    }
    Ok(d)
}

// --- NFQUEUE delayer (raw nfnetlink_queue, no library) ----------------------------------------

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_CFG_CMD_UNBIND: u8 = 2;
const NFQNL_COPY_META: u8 = 1;
const NF_ACCEPT: u32 = 1;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;

/// A netlink message of the queue subsystem: nlmsghdr + nfgenmsg + attributes.
pub fn nfq_message(msg: u16, flags: u16, seq: u32, queue: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    b[4..6].copy_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | msg).to_ne_bytes());
    b[6..8].copy_from_slice(&flags.to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    b.extend([libc::AF_UNSPEC as u8, 0]);
    b.extend(queue.to_be_bytes());
    for (ty, payload) in attrs {
        let len = 4 + payload.len();
        b.extend((len as u16).to_ne_bytes());
        b.extend(ty.to_ne_bytes());
        b.extend_from_slice(payload);
        b.resize(b.len().next_multiple_of(4), 0);
    }
    let total = b.len() as u32;
    b[0..4].copy_from_slice(&total.to_ne_bytes());
    b
}

/// What one received netlink datagram holds.
#[derive(Debug, PartialEq, Eq)]
pub enum NfqEvent {
    Packet(u32),
    /// An ack (0) or an error (negative errno).
    Ack(i32),
}

/// Parses the messages of one datagram; malformed tails are ignored.
pub fn parse_nfq(buf: &[u8]) -> Vec<NfqEvent> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        let ty = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        if len < 16 || at + len > buf.len() {
            break;
        }
        let m = &buf[at..at + len];
        if ty == NLMSG_ERROR && m.len() >= 20 {
            out.push(NfqEvent::Ack(i32::from_ne_bytes([m[16], m[17], m[18], m[19]])));
        } else if ty == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
            let mut a = 20;
            while a + 4 <= m.len() {
                let alen = u16::from_ne_bytes([m[a], m[a + 1]]) as usize;
                let aty = u16::from_ne_bytes([m[a + 2], m[a + 3]]) & 0x7fff;
                if alen < 4 || a + alen > m.len() {
                    break;
                }
                if aty == NFQA_PACKET_HDR && alen >= 8 {
                    out.push(NfqEvent::Packet(u32::from_be_bytes([
                        m[a + 4],
                        m[a + 5],
                        m[a + 6],
                        m[a + 7],
                    ])));
                }
                a += alen.next_multiple_of(4);
            }
        }
        at += len.next_multiple_of(4);
    }
    out
}

struct Socket(libc::c_int);

impl Socket {
    fn open() -> io::Result<Socket> {
        // SAFETY: plain socket(2); the fd is owned by the returned value.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = Socket(fd);
        // SAFETY: a zeroed sockaddr_nl with its family set is valid for bind(2).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        let size = std::mem::size_of::<libc::sockaddr_nl>() as u32;
        // SAFETY: `sa` lives across the call and `size` is its size.
        if unsafe { libc::bind(fd, &sa as *const _ as *const libc::sockaddr, size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 5_000,
        };
        let buf: libc::c_int = 4 << 20;
        // SAFETY: option values live across the calls, with their sizes.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &buf as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
        Ok(sock)
    }

    fn send(&self, b: &[u8]) -> io::Result<()> {
        // SAFETY: a zeroed sockaddr_nl (pid 0: the kernel) is a valid destination.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `b` and `sa` live across the call.
        let n = unsafe {
            libc::sendto(
                self.0,
                b.as_ptr() as *const libc::c_void,
                b.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// One datagram; Ok(0) on timeout.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ENOBUFS) => Ok(0),
                _ => Err(e),
            };
        }
        Ok(n as usize)
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe {
            libc::close(self.0);
        }
    }
}

fn config_cmd(cmd: u8, seq: u32, queue: u16) -> Vec<u8> {
    nfq_message(
        NFQNL_MSG_CONFIG,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        queue,
        &[(NFQA_CFG_CMD, &[cmd, 0, 0, 0])],
    )
}

fn verdict(id: u32, queue: u16) -> Vec<u8> {
    let mut v = NF_ACCEPT.to_be_bytes().to_vec();
    v.extend(id.to_be_bytes());
    nfq_message(NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, queue, &[(NFQA_VERDICT_HDR, &v)])
}

/// Waits for the kernel's answer to a config request.
fn await_ack(sock: &Socket) -> io::Result<()> {
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let n = sock.recv(&mut buf)?;
        for e in parse_nfq(&buf[..n]) {
            if let NfqEvent::Ack(code) = e {
                return if code == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                };
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "no answer from nfnetlink_queue",
    ))
}

/// Serves one NFQUEUE: every packet is accepted `delay ± jitter` after it was queued.
struct Delayer {
    queue: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Delayer {
    fn start(delay_ms: u32, jitter_ms: u32) -> Result<Delayer> {
        let sock = Socket::open().context("opening a netfilter netlink socket (needs root)")?;
        let base = 20_000 + (std::process::id() % 20_000) as u16;
        let mut queue = None;
        for q in base..base.saturating_add(64) {
            sock.send(&config_cmd(NFQNL_CFG_CMD_BIND, 1, q))?;
            if await_ack(&sock).is_ok() {
                queue = Some(q);
                break;
            }
        }
        let queue = queue.context("no free NFQUEUE number to bind")?;
        let mut params = (0xffffu32).to_be_bytes().to_vec();
        params.push(NFQNL_COPY_META);
        sock.send(&nfq_message(
            NFQNL_MSG_CONFIG,
            NLM_F_REQUEST | NLM_F_ACK,
            2,
            queue,
            &[(NFQA_CFG_PARAMS, &params)],
        ))?;
        await_ack(&sock).context("setting the NFQUEUE copy mode")?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("nfqueue-{queue}"))
            .spawn(move || serve(sock, queue, delay_ms, jitter_ms, &stop2))?;
        Ok(Delayer {
            queue,
            stop,
            thread: Some(thread),
        })
    }
}

fn serve(sock: Socket, queue: u16, delay_ms: u32, jitter_ms: u32, stop: &AtomicBool) {
    let mut rng = StdRng::seed_from_u64(u64::from(queue));
    let mut held: VecDeque<(Instant, u32)> = VecDeque::new();
    let mut buf = vec![0u8; 65536];
    let mut last = Instant::now();
    while !stop.load(Ordering::Acquire) {
        if let Ok(n) = sock.recv(&mut buf) {
            for e in parse_nfq(&buf[..n]) {
                if let NfqEvent::Packet(id) = e {
                    let j = rng.random_range(-(jitter_ms as i64)..=jitter_ms as i64);
                    let d = Duration::from_millis((i64::from(delay_ms) + j).max(0) as u64);
                    last = last.max(Instant::now() + d);
                    held.push_back((last, id));
                }
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, id)) = held.pop_front() {
                let _ = sock.send(&verdict(id, queue));
            }
        }
    }
    // Healed: the rules are gone; let through what is still held, then unbind.
    for (_, id) in held {
        let _ = sock.send(&verdict(id, queue));
    }
    let _ = sock.send(&config_cmd(NFQNL_CFG_CMD_UNBIND, 3, queue));
}

impl Drop for Delayer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tc_commands_touch_only_our_band_and_ip() {
        let ip = Ipv4Addr::new(127, 0, 42, 7);
        let root = tc_root_add().join(" ");
        assert_eq!(
            root,
            "qdisc add dev lo root handle 5253: prio bands 16 priomap 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0"
        );
        let d = NetFault::Delay {
            delay_ms: 150,
            jitter_ms: 50,
        };
        assert_eq!(
            tc_child_add(11, d).join(" "),
            "qdisc add dev lo parent 5253:b handle 530b: netem delay 150ms 50ms"
        );
        assert_eq!(
            tc_child_add(3, NetFault::Loss { percent: 12.0 }).join(" "),
            "qdisc add dev lo parent 5253:3 handle 5303: netem loss 12%"
        );
        let [req, rep] = tc_filters_add(3, ip);
        assert_eq!(
            req.join(" "),
            "filter add dev lo parent 5253: protocol ip prio 103 u32 match ip dst 127.0.42.7/32 match ip dport 3260 0xffff flowid 5253:3"
        );
        assert_eq!(
            rep.join(" "),
            "filter add dev lo parent 5253: protocol ip prio 103 u32 match ip src 127.0.42.7/32 match ip sport 3260 0xffff flowid 5253:3"
        );
        assert_eq!(
            tc_filters_del(3).join(" "),
            "filter del dev lo parent 5253: protocol ip prio 103"
        );
        assert_eq!(tc_child_del(3).join(" "), "qdisc del dev lo parent 5253:3 handle 5303:");
    }

    #[test]
    fn tc_show_output_is_parsed() {
        assert_eq!(parse_root("qdisc noqueue 0: root refcnt 2 \n"), Root::Absent);
        assert_eq!(parse_root(""), Root::Absent);
        let ours = "qdisc prio 5253: root refcnt 2 bands 16 priomap 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n\
                    qdisc netem 5303: parent 5253:3 limit 1000 delay 150ms  50ms\n\
                    qdisc netem 530b: parent 5253:b limit 1000 loss 12%\n";
        assert_eq!(parse_root(ours), Root::Ours);
        assert_eq!(parse_used_bands(ours), vec![3, 11]);
        let foreign = "qdisc htb 1: root refcnt 2 r2q 10 default 0\nqdisc netem 10: parent 1:1 limit 1000\n";
        assert!(matches!(parse_root(foreign), Root::Foreign(l) if l.starts_with("qdisc htb 1:")));
        assert!(parse_used_bands(foreign).is_empty());
        assert!(matches!(
            parse_root("qdisc prio 1: root refcnt 2 bands 3\n"),
            Root::Foreign(_)
        ));
    }

    #[test]
    fn iptables_rules_match_both_directions_of_one_portal() {
        let ip = Ipv4Addr::new(127, 0, 42, 7);
        let l = loss_rules(ip, 10.0);
        assert_eq!(
            l[0].join(" "),
            "INPUT -d 127.0.42.7 -p tcp --dport 3260 -m statistic --mode random --probability 0.1000 -j DROP"
        );
        assert_eq!(
            l[1].join(" "),
            "INPUT -s 127.0.42.7 -p tcp --sport 3260 -m statistic --mode random --probability 0.1000 -j DROP"
        );
        let q = queue_rules(ip, 20001);
        assert_eq!(
            q[1].join(" "),
            "INPUT -s 127.0.42.7 -p tcp --sport 3260 -j NFQUEUE --queue-num 20001 --queue-bypass"
        );
    }

    #[test]
    fn nfqueue_messages_round_trip() {
        let m = config_cmd(NFQNL_CFG_CMD_BIND, 7, 20001);
        assert_eq!(m.len(), 28);
        assert_eq!(u32::from_ne_bytes([m[0], m[1], m[2], m[3]]), 28);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 0x0302);
        assert_eq!(&m[18..20], &20001u16.to_be_bytes());
        assert_eq!(&m[24..28], &[1, 0, 0, 0]);
        let v = verdict(0x01020304, 5);
        assert_eq!(&v[24..32], &[0, 0, 0, 1, 1, 2, 3, 4]);
        // A packet message with its header attribute, then an ack, in one datagram.
        let mut hdr = 0xdead_beefu32.to_be_bytes().to_vec();
        hdr.extend([0x08, 0x00, 1]);
        let mut pkt = nfq_message(NFQNL_MSG_PACKET, 0, 0, 5, &[(NFQA_PACKET_HDR, &hdr)]);
        let mut ack = vec![0u8; 36];
        ack[0..4].copy_from_slice(&36u32.to_ne_bytes());
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack[16..20].copy_from_slice(&(-16i32).to_ne_bytes());
        pkt.extend(ack);
        assert_eq!(parse_nfq(&pkt), vec![NfqEvent::Packet(0xdead_beef), NfqEvent::Ack(-16)]);
        assert!(parse_nfq(&[1, 2, 3]).is_empty());
    }
}
