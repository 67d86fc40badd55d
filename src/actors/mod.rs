//! Actors: the [`ModelActor`](model_actor::ModelActor) that owns the engine and batches every
//! user's generation into each step; a [`SessionActor`](session::SessionActor) per open
//! conversation; the [`SessionRegistry`](registry::SessionRegistry) that finds and supervises them.

pub mod model_actor;
pub mod registry;
pub mod scheduler;
pub mod session;

pub use model_actor::{
    GenerationJob, JobDone, JobError, JobEvent, JobId, ModelActor, ModelMsg, ModelStatus,
    SchedulerConfig,
};
