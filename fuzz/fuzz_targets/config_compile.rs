//! A config file: loaded over the defaults and validated as `sluice` does; what passes
//! compiles into a deployment (graphs, units, servables) or is refused with its problems,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &[u8]| {
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    if let Ok(config) = sluice_common::Config::from_toml(text) {
        let _ = sluice_common::Deployment::compile(config);
    }
});
