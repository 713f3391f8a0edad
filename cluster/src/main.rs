fn main() {
    eprintln!("raftsan: in progress");
}
