//! Per-command cost of the I/O-path metric updates, in ns per command.
//!
//! ```sh
//! cargo run -p raftsan-target --example metrics_cost -- [ITERATIONS] [ROUNDS] [THREADS] [CPU_NS_PER_IO]
//! ```
//!
//! Each thread repeats what `Connection::execute` does for metrics around one 4 KiB READ: look up
//! the LU's handles, classify the CDB, in-flight gauge up, read the clock, read the clock again
//! and record the latency histogram, count the command, in-flight gauge down, count the bytes.
//! Three variants, interleaved over ROUNDS, median reported:
//! * `empty`: the loop without any of it (black-boxed CDB and LUN only);
//! * `off`: handles registered without a recorder (a node without `--metrics`: no-op handles,
//!   the clock is still read);
//! * `on`: handles registered in a Prometheus recorder built as `raftsan serve --metrics` builds
//!   it (latency buckets 50 µs-10 s), rendered once a second by another thread as a scrape does.
//!
//! Figures are CPU time per command (CLOCK_THREAD_CPUTIME_ID of the threads), not wall time, so
//! other load on the host does not count; that is what `bench/metrics.sh` compares them to. The
//! scrape thread's CPU, divided by the histogram samples it drained, is printed apart (an upper
//! bound of the per-command cost paid off the I/O path). THREADS > 1 runs that many threads on the
//! same LU's handles at once (the target's runtime has one worker per core, all updating the same
//! atomics: cache-line contention included). With CPU_NS_PER_IO (the CPU time the target process
//! spends per I/O, from `bench/metrics.sh`) it prints the share of it the metric updates take.
//! Compare figures of the same build profile (release for the 2 % criterion).

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use raftsan_target::metrics::{LuMetrics, Op};

/// The node's latency buckets (`cluster/src/main.rs`).
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const READ16: [u8; 16] = [0x88, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 8, 0, 0];

/// The metric work of one command, as in `Connection::execute`.
#[inline(never)]
fn one_command(m: &LuMetrics, lun: u64, cdb: &[u8], status: u8) {
    let handles = m.lun(lun);
    let op = Op::of(cdb);
    handles.in_flight.increment(1.0);
    let start = Instant::now();
    // (the command runs here)
    handles.duration[op as usize].record(start.elapsed().as_secs_f64());
    handles.commands[op as usize].increment(1);
    handles.in_flight.decrement(1.0);
    if status == 0x02 {
        handles.check_condition(None);
    }
    handles.read_bytes.increment(4096);
}

#[inline(never)]
fn empty_command(_m: &LuMetrics, lun: u64, cdb: &[u8], status: u8) {
    black_box((lun, cdb, status));
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU ns per command over `iterations` on each of `threads` threads: the threads' CPU time
/// (not wall time, so other load on the host does not count), divided by every command run.
fn measure(m: &Arc<LuMetrics>, f: fn(&LuMetrics, u64, &[u8], u8), iterations: u64, threads: usize) -> f64 {
    let cpu: Duration = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let m = m.clone();
                s.spawn(move || {
                    let start = thread_cpu();
                    for _ in 0..iterations {
                        f(black_box(&m), black_box(1), black_box(&READ16), black_box(0));
                    }
                    thread_cpu() - start
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_default()).sum()
    });
    cpu.as_nanos() as f64 / (iterations * threads as u64) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: u64| -> anyhow::Result<u64> {
        Ok(match args.get(i) {
            Some(a) => a.parse()?,
            None => default,
        })
    };
    let iterations = arg(0, 2_000_000)?;
    let rounds = arg(1, 7)?.max(1);
    let threads = arg(2, 1)?.max(1) as usize;
    let cpu_ns_per_io: Option<f64> = args.get(3).map(|a| a.parse()).transpose()?;

    let target = "iqn.2026-11.org.raftsan.bench:metrics-cost";
    let off = Arc::new(LuMetrics::new(target, [1].into_iter()));
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), LATENCY_BUCKETS)?
        .build_recorder();
    let handle = recorder.handle();
    let on = Arc::new(metrics::with_local_recorder(&recorder, || {
        LuMetrics::new(target, [1].into_iter())
    }));
    // Scrapes once a second, as Prometheus does; rendering also drains the histogram buffers.
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut cpu, mut renders) = (Duration::ZERO, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let start = thread_cpu();
                black_box(handle.render());
                cpu += thread_cpu() - start;
                renders += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            let start = thread_cpu();
            let text = handle.render();
            (text, cpu + (thread_cpu() - start), renders + 1)
        })
    };

    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    println!("{profile} build, {iterations} commands x {threads} thread(s) per run, {rounds} interleaved rounds");
    let (mut e, mut f, mut n) = (Vec::new(), Vec::new(), Vec::new());
    // Warm-up.
    measure(&on, one_command, iterations / 10, threads);
    for _ in 0..rounds {
        e.push(measure(&off, empty_command, iterations, threads));
        f.push(measure(&off, one_command, iterations, threads));
        n.push(measure(&on, one_command, iterations, threads));
    }
    stop.store(true, Ordering::Relaxed);
    let (text, render_cpu, renders) = scraper.join().map_err(|_| anyhow::anyhow!("scraper thread panicked"))?;
    let count_line = "raftsan_scsi_command_duration_seconds_count";
    let recorded = text
        .lines()
        .find(|l| l.starts_with(count_line) && l.contains("lun=\"1\",op=\"read\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    let (e, f, n) = (median(e), median(f), median(n));
    println!("empty loop       {e:8.1} ns CPU/command");
    println!("metrics off      {f:8.1} ns CPU/command  (no recorder: no-op handles, clock reads)");
    println!("metrics on       {n:8.1} ns CPU/command  (Prometheus recorder, scraped once a second)");
    println!(
        "on - off         {:8.1} ns CPU/command  (what enabling metrics adds)",
        n - f
    );
    println!(
        "on - empty       {:8.1} ns CPU/command  (all metric work, clock reads included)",
        n - e
    );
    println!("histogram samples recorded: {recorded} (the last scrape)");
    // Histogram samples are buffered and summed into buckets by the scrape: a cost per command
    // too, paid on the scraping thread (an upper bound: it includes rendering every series).
    let drain = render_cpu.as_nanos() as f64 / recorded.max(1.0);
    println!(
        "scrapes: {renders}, {:.1} ms CPU each; {drain:.1} ns CPU per histogram sample drained",
        render_cpu.as_secs_f64() * 1e3 / f64::from(renders)
    );
    if let Some(cpu) = cpu_ns_per_io {
        println!(
            "target CPU per I/O {cpu:.0} ns: enabling metrics = {:.2} % (+ scrape drain {:.2} %), all metric work = {:.2} %",
            (n - f) * 100.0 / cpu,
            drain * 100.0 / cpu,
            (n - e + drain) * 100.0 / cpu
        );
    }
    Ok(())
}
