//! raftsan-chaos: fault injection against real processes. Skeleton until its issue.
fn main() {
    eprintln!("raftsan-chaos: not built yet (see the chaos issue)");
    std::process::exit(2);
}
