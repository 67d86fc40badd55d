//! Actors: the [`ModelActor`](model_actor::ModelActor) that owns the engine and batches every
//! user's generation into each step. Session actors and their registry come next.

pub mod model_actor;
pub mod scheduler;

pub use model_actor::{
    GenerationJob, JobDone, JobError, JobEvent, JobId, ModelActor, ModelMsg, ModelStatus,
    SchedulerConfig,
};
