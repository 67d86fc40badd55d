//! The `smolchat` binary: one command line for the chat, the model tools and the benchmarks.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};

use smolchat::cli::{self, generate::EndTokens, generate::GenerateArgs};
use smolchat::engine::quant::GgmlType;
use smolchat::engine::{
    Architecture, DeviceChoice, KvFormat, LoadOptions, Model, ModelConfig, Placement,
    SamplingParams, SyntheticQuant,
};

#[derive(Parser)]
#[command(
    name = "smolchat",
    version,
    about = "Chat with small local language models"
)]
struct Args {
    /// GGUF model file.
    #[arg(long, global = true, env = "SMOLCHAT_MODEL", default_value = smolchat::DEFAULT_MODEL)]
    model: PathBuf,
    /// Worker threads for the engine (default: all cores).
    #[arg(long, global = true, env = "SMOLCHAT_THREADS")]
    threads: Option<usize>,
    /// Where the model runs: auto (the GPU when this binary has the `cuda` feature and one
    /// answers, else the CPU), cpu, cuda, cuda:N, or candle-cpu (the GPU code on the CPU).
    #[arg(long, global = true, env = "SMOLCHAT_DEVICE", default_value = "auto")]
    device: DeviceChoice,
    /// How the CPU keeps each conversation's keys and values: f16; q8 (8-bit with a scale per 32
    /// values: about half the memory and faster attention on long chats, slightly less exact);
    /// or k8v4 (keys in 8 bits, values in 4: about 40 % of f16, less exact again).
    #[arg(long, global = true, env = "SMOLCHAT_KV_CACHE", default_value = "f16")]
    kv_cache: KvCache,
    #[command(subcommand)]
    command: Option<Command>,
}

/// A count that clap checks against `range`.
fn within(range: impl std::ops::RangeBounds<u64>) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(range)
}

#[derive(Clone, Copy, ValueEnum)]
enum KvCache {
    F16,
    Q8,
    K8v4,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum SyntheticModel {
    #[value(name = "smollm2-135m")]
    Smollm2_135m,
    #[value(name = "smollm3-3b")]
    Smollm3_3b,
}

#[derive(Parser)]
struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 3000)]
    port: u16,
    /// Where the database lives.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Origins allowed to open the WebSocket besides the server's own (repeatable).
    #[arg(long = "allow-origin")]
    allow_origins: Vec<String>,
    /// Sequences decoding together at most (default: 16 on the CPU, 128 on a GPU).
    #[arg(long, value_parser = within(1..))]
    max_running: Option<usize>,
    /// Requests waiting for a slot at most; beyond, `busy` (default: 64 CPU, 512 GPU). At least
    /// 1: every request passes through the queue on its way to a slot.
    #[arg(long, value_parser = within(1..))]
    max_queue: Option<usize>,
    /// Memory for all KV caches, MB (default: 1024 on the CPU, 16384 on a GPU).
    #[arg(long)]
    kv_budget_mb: Option<usize>,
    /// Chat messages per user per minute.
    #[arg(long, default_value_t = 20)]
    messages_per_minute: usize,
    /// Answers generating at once per user.
    #[arg(long, default_value_t = 2)]
    concurrent_generations: usize,
    /// Conversations one user may keep.
    #[arg(long, default_value_t = 5_000)]
    conversations_per_user: usize,
    /// New users stored per client address (IPv6: per /64) an hour; a visitor is stored with
    /// their first conversation.
    #[arg(long, default_value_t = 100)]
    new_users_per_address_per_hour: usize,
    /// Take the client's address from the last X-Forwarded-For entry: only behind a reverse
    /// proxy that appends it (else every user behind the proxy shares its address).
    #[arg(long)]
    trust_forwarded_for: bool,
    /// Serve /metrics only to `Authorization: Bearer TOKEN` (Prometheus: `authorization:
    /// credentials`). Without it /metrics is open to whoever reaches the server.
    #[arg(long, env = "SMOLCHAT_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
}

impl Default for ServeArgs {
    /// `serve` with every flag at its default: what `smolchat` alone runs.
    fn default() -> Self {
        Self::parse_from(["serve"])
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve the chat on the web (the default).
    Serve(ServeArgs),
    /// Print a bearer token for a new user (for scripts).
    Token {
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Copy the database into a new file, also while the server runs.
    Backup {
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        /// The copy to write (a new file).
        out: PathBuf,
    },
    /// Chat in the terminal.
    Chat {
        #[arg(long, default_value_t = 512)]
        max_tokens: usize,
        #[arg(long, default_value_t = 0.7)]
        temperature: f32,
        #[arg(long)]
        system: Option<String>,
    },
    /// Download the default model (SmolLM2-135M-Instruct Q4_1) into models/.
    FetchModel,
    /// Token ids of a text.
    Tokenize {
        /// Special-token strings in TEXT are plain text.
        #[arg(long)]
        no_special: bool,
        #[arg(last = true, required = true)]
        text: Vec<String>,
    },
    /// Render a chat with the model's template.
    Render {
        /// A JSON list of {"role","content"}.
        #[arg(long)]
        messages: PathBuf,
        #[arg(long)]
        no_generation_prompt: bool,
        #[arg(long, value_enum)]
        thinking: Option<OnOff>,
    },
    /// Logits at every position of a token sequence.
    Logits {
        #[arg(long)]
        ids: String,
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Generate text from a prompt.
    Generate {
        #[arg(long)]
        prompt: Option<String>,
        /// Wrap the prompt in the chat template as a user message.
        #[arg(long)]
        chat: bool,
        /// Token ids of a prompt; give it several times to generate for all of them at once,
        /// packed into each step as the server batches its users.
        #[arg(long)]
        ids: Vec<String>,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// Do not stop at the model's end-of-turn tokens: always generate --max-tokens.
        #[arg(long)]
        ignore_eos: bool,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0.0)]
        min_p: f32,
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// Perplexity of a text file, the way llama-perplexity computes it.
    Perplexity {
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value_t = 512)]
        ctx: usize,
    },
    /// One chat turn through the actors and the store, events as JSON lines (for tests).
    #[command(hide = true)]
    SessionTurn {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        message: String,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
    },
    /// Simulated users chatting at once over the WebSocket: throughput and latency as people
    /// see them.
    Load {
        /// A running server (http://HOST:PORT); without it one is started here on loopback,
        /// with the serve defaults, this model and a temporary data directory.
        #[arg(long)]
        url: Option<String>,
        /// Users at once, one run per value.
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32],
              value_parser = within(1..=10_000))]
        users: Vec<usize>,
        /// Messages each user sends, one after the other in one conversation.
        #[arg(long, default_value_t = 2,
              value_parser = within(1..=1_000))]
        turns: usize,
        /// Longest answer, in tokens.
        #[arg(long, default_value_t = 64,
              value_parser = within(1..=8192))]
        max_tokens: usize,
        /// The rows as one JSON list on the last line of stdout.
        #[arg(long)]
        json: bool,
    },
    /// Engine speed: prefill, decode, packed batches, peak memory.
    Bench {
        #[arg(long)]
        json: bool,
        /// Bench a model of this shape with random weights instead of --model.
        #[arg(long, value_enum)]
        synthetic: Option<SyntheticModel>,
        /// Weight format of the synthetic model (`q4_k_m`, `q5_k_m`: llama.cpp's mixes of Q4_K or
        /// Q5_K with Q6_K).
        #[arg(long, default_value = "q4_k")]
        quant: String,
        /// Packed decode batch sizes to measure.
        #[arg(long, value_delimiter = ',', default_values_t = [2usize, 4, 8, 16])]
        batches: Vec<usize>,
        /// Memory for the KV caches on a device, MB.
        #[arg(long, default_value_t = 16384)]
        kv_budget_mb: usize,
        /// Chat jobs through the model actor at 1, 4, 8, 16 and 32 concurrent (or --concurrency).
        #[arg(long)]
        serve_sim: bool,
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 8, 16, 32])]
        concurrency: Vec<usize>,
    },
}

/// The server `serve` runs: the model loaded onto its device, the scheduler and the limits.
fn server_config(args: &Args, serve: ServeArgs) -> Result<smolchat::server::ServerConfig> {
    let ServeArgs {
        host,
        port,
        data_dir,
        allow_origins,
        max_running,
        max_queue,
        kv_budget_mb,
        messages_per_minute,
        concurrent_generations,
        conversations_per_user,
        new_users_per_address_per_hour,
        trust_forwarded_for,
        metrics_token,
    } = serve;
    fetch_if_default(&args.model)?;
    let placement = args.device.resolve()?;
    let base = if placement.is_gpu() {
        smolchat::actors::SchedulerConfig::gpu()
    } else {
        smolchat::actors::SchedulerConfig::cpu()
    };
    let scheduler = smolchat::actors::SchedulerConfig {
        max_running: max_running.unwrap_or(base.max_running),
        max_queue: max_queue.unwrap_or(base.max_queue),
        kv_budget_bytes: kv_budget_mb.map_or(base.kv_budget_bytes, |mb| mb << 20),
        ..base
    };
    let opts = LoadOptions {
        placement,
        kv_bytes: scheduler.kv_budget_bytes,
        kv_format: args.kv_cache.into(),
        ..LoadOptions::default()
    };
    let engine = std::sync::Arc::new(cli::load(&args.model, &opts)?);
    let addr: std::net::SocketAddr = format!("{host}:{port}").parse().or_else(|_| {
        std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))
    })?;
    let limits = smolchat::server::Limits {
        messages_per_minute,
        concurrent_generations,
        conversations_per_user,
        new_users_per_address_per_hour,
        ..Default::default()
    };
    let config = smolchat::server::ServerConfig {
        addr,
        data_dir,
        engine,
        scheduler,
        limits,
        allowed_origins: allow_origins,
        session_idle: std::time::Duration::from_secs(300),
        trust_forwarded_for,
        // Trimmed like the header's (a token read from a file may end in a newline).
        metrics_token: metrics_token
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty()),
    };
    Ok(config)
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(mut args: Args) -> Result<()> {
    if let Some(n) = args.threads {
        smolchat::engine::pool::set_threads(n);
    }
    let command = args
        .command
        .take()
        .unwrap_or_else(|| Command::Serve(ServeArgs::default()));
    match command {
        Command::Serve(serve) => {
            let config = server_config(&args, serve)?;
            runtime()?.block_on(smolchat::server::run(config))
        }
        Command::Load {
            url,
            users,
            turns,
            max_tokens,
            json,
        } => runtime()?.block_on(async {
            // Without a URL: a server of our own on a free loopback port, dropped at the end.
            let (url, own) = match url {
                Some(u) => (u, None),
                None => {
                    let dir =
                        std::env::temp_dir().join(format!("smolchat-load-{}", std::process::id()));
                    let _ = std::fs::remove_dir_all(&dir);
                    let config = server_config(
                        &args,
                        ServeArgs {
                            port: 0,
                            data_dir: dir.clone(),
                            // Every simulated user is a new one, all from loopback.
                            new_users_per_address_per_hour: usize::MAX,
                            ..ServeArgs::default()
                        },
                    )?;
                    let server = smolchat::server::start(config).await?;
                    (format!("http://{}", server.addr), Some((server, dir)))
                }
            };
            let rows = async {
                let mut rows = Vec::new();
                for &n in &users {
                    let row = smolchat::load::run_level(&url, n, turns, max_tokens).await?;
                    let rate = row.aggregate_tokens_per_second;
                    tracing::info!(users = n, tokens_per_second = rate, "load");
                    rows.push(row);
                }
                anyhow::Ok(rows)
            }
            .await;
            // Our own server goes, and its data with it, whatever happened.
            if let Some((server, dir)) = own {
                server.shutdown().await;
                let _ = std::fs::remove_dir_all(dir);
            }
            let rows = rows?;
            if json {
                println!("{}", serde_json::to_string(&rows)?);
            } else {
                print!("{}", smolchat::load::table(&rows));
            }
            Ok(())
        }),
        Command::Token { data_dir } => runtime()?.block_on(async {
            std::fs::create_dir_all(&data_dir)?;
            let store = smolchat::store::Store::open(&data_dir.join("smolchat.db")).await?;
            let user = store.create_user().await?;
            println!("{}", store.create_login(user).await?);
            Ok(())
        }),
        Command::Backup { data_dir, out } => runtime()?.block_on(async {
            smolchat::store::Store::backup(&data_dir.join("smolchat.db"), &out).await?;
            tracing::info!(copy = %out.display(), "database backed up");
            Ok(())
        }),
        Command::FetchModel => smolchat::fetch::fetch_default_model(&args.model),
        Command::Chat {
            max_tokens,
            temperature,
            system,
        } => {
            fetch_if_default(&args.model)?;
            let engine = cli::load(&args.model, &default_opts(&args)?)?;
            let params = SamplingParams {
                temperature,
                top_p: 0.95,
                min_p: 0.05,
                seed: rand_seed(),
                ..Default::default()
            };
            cli::generate::chat(&engine, params, max_tokens, system)
        }
        Command::Tokenize { no_special, text } => cli::inspect::tokenize(
            &cli::load(&args.model, &default_opts(&args)?)?,
            &text.join(" "),
            no_special,
        ),
        Command::Render {
            messages,
            no_generation_prompt,
            thinking,
        } => cli::inspect::render(
            &cli::load(&args.model, &default_opts(&args)?)?,
            &messages,
            !no_generation_prompt,
            thinking.map(|t| matches!(t, OnOff::On)),
        ),
        Command::Logits { ids, top } => cli::inspect::logits(
            &cli::load(&args.model, &default_opts(&args)?)?,
            &cli::parse_ids(&ids)?,
            top,
        ),
        Command::Generate {
            prompt,
            chat,
            ids,
            max_tokens,
            ignore_eos,
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            seed,
            json,
        } => {
            let ids = ids
                .iter()
                .map(|s| cli::parse_ids(s))
                .collect::<Result<Vec<_>>>()?;
            let engine = cli::load(&args.model, &default_opts(&args)?)?;
            let params = SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                repetition_penalty,
                seed,
                ..Default::default()
            };
            cli::generate::generate(
                &engine,
                GenerateArgs {
                    prompt,
                    chat,
                    ids,
                    max_tokens,
                    params,
                    end: if ignore_eos {
                        EndTokens::Ignore
                    } else {
                        EndTokens::Stop
                    },
                    json,
                },
            )
        }
        Command::Perplexity { file, ctx } => {
            cli::inspect::perplexity(&cli::load(&args.model, &default_opts(&args)?)?, &file, ctx)
        }
        Command::SessionTurn {
            data_dir,
            message,
            max_tokens,
        } => {
            let engine = std::sync::Arc::new(cli::load(&args.model, &default_opts(&args)?)?);
            let rt = runtime()?;
            rt.block_on(cli::session_turn::run(
                engine, &data_dir, &message, max_tokens,
            ))
        }
        Command::Bench {
            json,
            serve_sim: true,
            concurrency,
            kv_budget_mb,
            ..
        } => {
            let opts = LoadOptions {
                kv_bytes: kv_budget_mb << 20,
                ..default_opts(&args)?
            };
            let engine = std::sync::Arc::new(cli::load(&args.model, &opts)?);
            let rt = runtime()?;
            let report = rt.block_on(smolchat::serve_sim::run(engine, &concurrency))?;
            if json {
                cli::print_json(&serde_json::to_value(&report)?);
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
        Command::Bench {
            json,
            synthetic,
            quant,
            batches,
            kv_budget_mb,
            ..
        } => {
            let opts = LoadOptions {
                kv_bytes: kv_budget_mb << 20,
                ..default_opts(&args)?
            };
            let model = match synthetic {
                Some(kind) => {
                    let started = std::time::Instant::now();
                    let m = Model::synthetic_on(
                        synthetic_config(kind),
                        parse_quant(&quant)?,
                        7,
                        &opts,
                    )?;
                    tracing::info!(
                        seconds = started.elapsed().as_secs_f64(),
                        device = %m.device_name(),
                        "random weights ready"
                    );
                    m
                }
                None => cli::load(&args.model, &opts)?.model,
            };
            let report = smolchat::bench::run(&model, &batches);
            if json {
                cli::print_json(&serde_json::to_value(&report)?);
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
    }
}

/// Load options for the commands that run one sequence at a time: the device asked for, the
/// default KV budget.
fn default_opts(args: &Args) -> Result<LoadOptions> {
    let placement: Placement = args.device.resolve()?;
    Ok(LoadOptions {
        placement,
        kv_format: args.kv_cache.into(),
        ..LoadOptions::default()
    })
}

impl From<KvCache> for KvFormat {
    fn from(k: KvCache) -> Self {
        match k {
            KvCache::F16 => KvFormat::F16,
            KvCache::Q8 => KvFormat::Q8,
            KvCache::K8v4 => KvFormat::K8V4,
        }
    }
}

/// The default model is fetched on first use; any other path must exist.
fn fetch_if_default(model: &std::path::Path) -> Result<()> {
    if model == std::path::Path::new(smolchat::DEFAULT_MODEL) && !model.exists() {
        smolchat::fetch::fetch_default_model(model)?;
    }
    Ok(())
}

/// The async runtime for the actor commands: the engine has its own threads, so one worker is
/// enough for the actors.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn parse_quant(q: &str) -> Result<SyntheticQuant> {
    let all = SyntheticQuant::All;
    Ok(match q.to_ascii_lowercase().as_str() {
        "q4_0" => all(GgmlType::Q4_0),
        "q4_1" => all(GgmlType::Q4_1),
        "q8_0" => all(GgmlType::Q8_0),
        "q5_0" => all(GgmlType::Q5_0),
        "q5_1" => all(GgmlType::Q5_1),
        "q4_k" => all(GgmlType::Q4K),
        "q5_k" => all(GgmlType::Q5K),
        "q6_k" => all(GgmlType::Q6K),
        "f16" => all(GgmlType::F16),
        "q4_k_m" => SyntheticQuant::Q4KM,
        "q5_k_m" => SyntheticQuant::Q5KM,
        other => bail!(
            "unknown --quant {other} (q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q4_k_m, q5_k, q5_k_m, q6_k, f16)"
        ),
    })
}

/// Real shapes of the models we serve, for benchmarks with random weights.
fn synthetic_config(kind: SyntheticModel) -> ModelConfig {
    let (arch, n_layers, hidden, intermediate, n_heads, n_kv_heads, vocab, base) = match kind {
        SyntheticModel::Smollm2_135m => {
            (Architecture::Llama, 30, 576, 1536, 9, 3, 49152, 100_000.0)
        }
        SyntheticModel::Smollm3_3b => (
            Architecture::Smollm3,
            36,
            2048,
            11008,
            16,
            4,
            128_256,
            5_000_000.0,
        ),
    };
    let head_dim = hidden / n_heads;
    ModelConfig {
        arch,
        n_layers,
        hidden,
        intermediate,
        n_heads,
        n_kv_heads,
        head_dim,
        rope_dims: head_dim,
        rope_base: base,
        rms_eps: 1e-5,
        context_length: 8192,
        vocab_size: vocab,
        tied_embeddings: true,
        use_rope: arch.rope_layers(n_layers),
    }
}
