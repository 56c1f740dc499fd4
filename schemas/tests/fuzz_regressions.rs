//! Inputs the fuzzers found, kept so the fix stays.
#![allow(clippy::unwrap_used)]

/// `avro_envelope`: a 20-odd-byte prediction record whose array block declares 2^28 items made
/// apache-avro reserve 15 GB (an out-of-memory abort); it is refused by the allocation limit.
#[test]
fn a_huge_array_count_is_refused_without_allocating_it() {
    let bytes = include_bytes!("data/prediction-huge-array-count.bin");
    let Err(err) = sluice_schemas::learning::decode_prediction(bytes) else {
        panic!("a record declaring 2^28 items decoded");
    };
    let text = err.to_string();
    assert!(
        text.contains("allocate") || text.contains("llocation"),
        "refused for its size: {text}"
    );
}
