//! What happens to a record between consuming and delivering it: admission (what it is),
//! batching, running a batch through a step (and fused steps), joins, and what follows each
//! result (the graph's next hop, in process when its lane is here, or the answer).

pub(crate) mod admission;
pub(crate) mod batcher;
pub(crate) mod completion;
pub(crate) mod executor;
pub(crate) mod flow;
pub(crate) mod job;
pub(crate) mod joiner;
pub(crate) mod lane;
pub(crate) mod outcome;
pub(crate) mod record;
