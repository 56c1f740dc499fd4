//! Why a record could not be encoded or decoded (shared by both codecs).

/// Why a record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Shorter than the header, or not starting with `C3 01`.
    #[error("not an Avro single-object record (missing C3 01 header)")]
    NotSingleObject,
    /// The writer schema's fingerprint is not one this reader knows.
    #[error("unknown writer schema fingerprint {0:016x}")]
    UnknownSchema(u64),
    /// Avro could not decode or encode the datum.
    #[error("avro: {0}")]
    Avro(String),
    /// The datum decoded but a field is missing or of the wrong type.
    #[error("field '{0}' missing or of the wrong type")]
    Field(&'static str),
    /// A tensor's datatype is not supported.
    #[error("{0}")]
    Tensor(#[from] crate::TensorError),
}
