//! A record on a Sluice topic: request, result, feedback and prediction envelopes (Avro
//! single-object encoding) decode or are refused, never a panic; what decodes re-encodes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|record: &[u8]| {
    if let Ok(r) = sluice_schemas::decode_request(record) {
        let _ = sluice_schemas::encode_request(&r);
    }
    if let Ok(r) = sluice_schemas::decode_result(record) {
        let _ = sluice_schemas::encode_result(&r);
    }
    let _ = sluice_schemas::learning::decode_feedback(record);
    let _ = sluice_schemas::learning::decode_prediction(record);
});
