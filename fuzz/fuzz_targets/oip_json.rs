//! An Open Inference Protocol JSON request body: parsed (or refused with an error), never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let _ = sluice_schemas::oip::parse_request(body, None);
});
