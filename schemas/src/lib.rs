//! Sluice's wire format: the Avro request and result envelopes carried on Kafka and through Redis.
//!
//! Records use Avro [single-object encoding]: the two marker bytes `C3 01`, the 8-byte little-endian
//! CRC-64-AVRO (Rabin) fingerprint of the writer schema, then the Avro binary datum. Any Avro client
//! holding `schemas/avro/*.avsc` can decode them; readers resolve older or newer writer schemas that
//! they know by fingerprint (see [`codec::SchemaSet`]).
//!
//! [single-object encoding]: https://avro.apache.org/docs/1.11.1/specification/#single-object-encoding

pub mod binary;
pub mod codec;
pub mod deadline;
pub mod envelope;
pub mod error;
pub mod learning;
pub mod number;
pub mod oip;
pub mod tensor;

pub use codec::{CodecError, decode_request, decode_result, encode_request, encode_result};
pub use deadline::Deadline;
pub use envelope::{
    ErrorCode, GraphHop, InferenceError, InferenceRequest, InferenceResult, ReplyFormat, ReplyRoute,
};
pub use number::{Number, Unfit, tensor_from_numbers};
pub use tensor::{DataType, Tensor, TensorError};

/// The request envelope's Avro schema (JSON), as shipped in `schemas/avro/request.avsc`.
pub const REQUEST_SCHEMA: &str = include_str!("../avro/request.avsc");
/// The result envelope's Avro schema (JSON), as shipped in `schemas/avro/result.avsc`.
pub const RESULT_SCHEMA: &str = include_str!("../avro/result.avsc");
/// Earlier request schemas, still read (a producer built against them keeps working).
pub const REQUEST_SCHEMA_HISTORY: &[&str] = &[include_str!("../avro/history/request-v1.avsc")];
