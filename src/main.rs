//! The `sluice` binary: Sluice's command line (see the library's [`sluice::main`]).

fn main() -> std::process::ExitCode {
    sluice::main()
}
