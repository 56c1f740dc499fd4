//! Inference threads: each owns one ONNX Runtime session and runs the batches handed to it, so
//! model calls never block the async runtime. The batcher hands out at most one batch per thread.

use std::sync::{Arc, Mutex};

use sluice_common::ModelConfig;
use sluice_schemas::Tensor;
use tokio::sync::{mpsc, oneshot};

use crate::backend::Backend;
use crate::step::StepInput;
use crate::step::runner::run_batch;

/// Each job's outputs, or its error message.
pub type BatchOutcome = Vec<Result<Vec<Tensor>, String>>;

struct Task {
    batch: Vec<StepInput>,
    done: oneshot::Sender<BatchOutcome>,
}

/// A pool of inference threads for one model.
pub struct InferencePool {
    tasks: mpsc::Sender<Task>,
}

impl InferencePool {
    /// Starts one thread per backend, named after `model_name`.
    pub fn start<B: Backend + 'static>(
        model_name: &str,
        model: &ModelConfig,
        backends: Vec<B>,
    ) -> std::io::Result<InferencePool> {
        let (tx, rx) = mpsc::channel::<Task>(backends.len().max(1));
        let rx = Arc::new(Mutex::new(rx));
        for (i, mut backend) in backends.into_iter().enumerate() {
            let (rx, model) = (Arc::clone(&rx), model.clone());
            std::thread::Builder::new()
                .name(format!("infer-{model_name}-{i}"))
                .spawn(move || {
                    loop {
                        // A poisoned lock only means another thread panicked while waiting.
                        let next = rx.lock().unwrap_or_else(|e| e.into_inner()).blocking_recv();
                        let Some(task) = next else { return };
                        let outcome = run_batch(&mut backend, &model, &task.batch);
                        let _ = task.done.send(outcome);
                    }
                })?;
        }
        Ok(InferencePool { tasks: tx })
    }

    /// Runs `batch` on the next free thread.
    pub async fn run(&self, batch: Vec<StepInput>) -> BatchOutcome {
        let n = batch.len();
        let (done, outcome) = oneshot::channel();
        let gone = || vec![Err("the inference threads have stopped".to_string()); n];
        if self.tasks.send(Task { batch, done }).await.is_err() {
            return gone();
        }
        outcome.await.unwrap_or_else(|_| gone())
    }
}
