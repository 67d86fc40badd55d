//! smolchat: a self-hosted, multi-user chat server for small local language models.
//!
//! The crate is laid out as in `DESIGN.md`:
//! - [`engine`]: GGUF reading, the quantized transformer and its packed-batch forward, KV caches,
//!   tokenizer, chat template, sampler, reasoning splitter. Synchronous; knows nothing of actors.
//! - [`actors`]: the model actor and its continuous-batching scheduler.
//! - [`store`]: users, conversations and messages in SQLite.
//! - [`fetch`]: getting the default model onto the machine.
//! - [`bench`]: the engine benchmark behind `smolchat bench`.
//! - [`load`]: simulated users over the real WebSocket, behind `smolchat load`.
//! - [`cli`]: the command-line subcommands.

pub mod actors;
pub mod bench;
pub mod cli;
pub mod engine;
pub mod fetch;
pub mod load;
pub mod protocol;
pub mod serve_sim;
pub mod server;
pub mod store;

/// Where the default model lives, relative to the working directory (the repository root).
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
