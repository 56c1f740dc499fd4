//! `sluice-with-merchant-risk`: the `sluice` command line plus the `merchant_risk` step. Run its
//! workers (or `up`) with a config that uses `custom = { kind = "merchant_risk", ... }`.

fn main() -> std::process::ExitCode {
    sluice_example_custom_step::register();
    sluice::main()
}
