use kube_lock_manager::cli::Cli;

fn main() {
    std::process::exit(Cli::parse_and_run());
}
