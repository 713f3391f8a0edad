fn main() {
    eprintln!("raftsan-chaos: the runner is not built yet");
    std::process::exit(2);
}
