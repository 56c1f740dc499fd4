//! A binary-extension request: the first two bytes choose the JSON header's length
//! (`Inference-Header-Content-Length`), the rest is the body (JSON header, then raw tensors).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let json_len = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let _ = sluice_schemas::oip::parse_request(&data[2..], Some(json_len));
});
