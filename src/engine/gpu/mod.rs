//! The packed-batch forward on candle tensors: NVIDIA GPUs through candle's CUDA backend
//! (feature `cuda`), or candle's CPU device (feature `candle`), which runs the very same code
//! where there is no GPU, so the tests check it against the references.
//!
//! Weights stay in their GGUF blocks as candle `QMatMul`s (candle's MMVQ kernels for up to 8
//! rows, its tiled MMQ kernels above). The KV cache lives in one pair of slabs per layer, rows of
//! `head_dim` f16 values, cut into the same 32-position blocks as on the CPU; a sequence's cache
//! is a list of block ids from a [`BlockPool`]. Each step uploads its few index tables once (token
//! ids, RoPE rows, where each new K/V row goes, which rows each attention reads) and then runs
//! every layer on the device: new K/V rows go into the slabs ([`KvWrite`]), all decode rows share
//! one attention that reads each cache through its block table ([`PagedDecode`]), and each
//! prompt chunk gathers its cache for a causal one. Only the sampled rows' logits come back to
//! the host, and a greedy row's only as its token (picked on the device). `DeviceKernels` can
//! put candle's own paths in place of our kernels (`*.cu` beside this file: RoPE, the KV write,
//! the paged decode attention).

use std::borrow::Cow;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};

mod attention;
mod decode_attention;
#[cfg(test)]
mod emulator;
mod kv_write;
#[cfg(any(test, feature = "cuda"))]
mod launch;
mod rope;

use attention::{slab_row, DecodeAttention};
use decode_attention::PagedDecode;
use kv_write::KvWrite;
use rope::RopeRows;

use super::config::ModelConfig;
use super::kv::{BlockPool, KvShape, BLOCK_LEN};
use super::model::{
    inv_freq, rope_tables, DeviceKernels, LoadOptions, Logits, RawMatrix, SeqInput, StepOutput,
    WeightSource, Weights,
};
use super::quant::GgmlType;
use super::EngineError;

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        // Without the backtrace candle appends when RUST_BACKTRACE is set.
        EngineError::Device(e.to_string().lines().next().unwrap_or_default().to_owned())
    }
}

/// Matrices that read the same input (Q, K, V; gate, up). When their blocks are of one type they
/// are one matrix on the device, so one kernel reads them all; the outputs are column ranges.
struct Fused {
    mats: Vec<QMatMul>,
    widths: Vec<usize>,
}

impl Fused {
    fn new(raws: &[&RawMatrix], device: &Device) -> Result<Self, EngineError> {
        let widths = raws.iter().map(|r| r.rows).collect();
        let one_type = raws
            .iter()
            .all(|r| r.ty == raws[0].ty && r.cols == raws[0].cols);
        let mats = if one_type && raws.len() > 1 {
            let mut bytes = Vec::with_capacity(raws.iter().map(|r| r.data().len()).sum());
            for r in raws {
                bytes.extend_from_slice(r.data());
            }
            let rows = raws.iter().map(|r| r.rows).sum();
            vec![upload(&bytes, raws[0].ty, rows, raws[0].cols, device)?]
        } else {
            raws.iter()
                .map(|r| upload(r.data(), r.ty, r.rows, r.cols, device))
                .collect::<Result<_, _>>()?
        };
        Ok(Self { mats, widths })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        if self.mats.len() == self.widths.len() {
            return self.mats.iter().map(|m| m.forward(x)).collect();
        }
        let y = self.mats[0].forward(x)?;
        let mut at = 0;
        self.widths
            .iter()
            .map(|&w| {
                at += w;
                y.narrow(1, at - w, w)
            })
            .collect()
    }
}

struct Layer {
    attn_norm: Tensor,
    qkv: Fused,
    wo: QMatMul,
    ffn_norm: Tensor,
    gate_up: Fused,
    w_down: QMatMul,
}

pub struct CandleModel {
    device: Device,
    embed: QMatMul,
    layers: Vec<Layer>,
    out_norm: Tensor,
    output: QMatMul,
    /// Per layer, the K and V slabs: `blocks × n_kv_heads × BLOCK_LEN` rows of `head_dim`.
    kv: Vec<(Tensor, Tensor)>,
    pool: Arc<BlockPool>,
    inv_freq: Vec<f32>,
    decode_attention: DecodeAttention,
    kv_writer: KvWriter,
}

/// How RoPE turns the new Q and K rows, and how new K/V rows get into the slabs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KvWriter {
    /// Our own kernels: [`RopeRows`] for the queries, [`KvWrite`] (turning K on the way) for
    /// the slabs; one launch each, straight from the fused projection's columns.
    Kernel,
    /// candle's `rope_i` after a contiguous copy, then `to_dtype` + `scatter_set`
    /// (`SMOLCHAT_KV_WRITE=scatter`): `head_dim` threads that walk the step's rows; kept to
    /// compare against on a GPU.
    Scatter,
}

/// The step's RoPE tables (`t × 1 × head_dim / 2` cosines and sines).
type RopeTables<'a> = Option<(&'a Tensor, &'a Tensor)>;

/// candle's interleaved RoPE over `heads` heads of `hd` at the start of each row.
fn candle_rope(
    x: &Tensor,
    heads: usize,
    hd: usize,
    (cos, sin): (&Tensor, &Tensor),
) -> candle_core::Result<Tensor> {
    let t = x.dim(0)?;
    let x = x
        .narrow(1, 0, heads * hd)?
        .contiguous()?
        .reshape((t, heads, 1, hd))?;
    candle_nn::rotary_emb::rope_i(&x, cos, sin)?.reshape((t, heads * hd))
}

impl KvWriter {
    /// The step's slab rows as a device table: one per new row, or for `scatter_set` one per
    /// value.
    fn table(self, rows: &[u32], hd: usize, dev: &Device) -> candle_core::Result<Tensor> {
        match self {
            KvWriter::Kernel => Tensor::from_slice(rows, rows.len(), dev),
            KvWriter::Scatter => {
                let per_value: Vec<u32> = rows
                    .iter()
                    .flat_map(|&r| std::iter::repeat_n(r, hd))
                    .collect();
                Tensor::from_vec(per_value, (rows.len(), hd), dev)
            }
        }
    }

    /// The queries turned by `rope` (f32, `t × n_heads·hd`), or as they are without it.
    fn queries(
        self,
        q: Tensor,
        (n_heads, hd): (usize, usize),
        rope: RopeTables,
    ) -> candle_core::Result<Tensor> {
        match (self, rope) {
            (_, None) => Ok(q),
            (KvWriter::Kernel, Some((cos, sin))) => q.apply_op3_no_bwd(
                cos,
                sin,
                &RopeRows {
                    heads: n_heads,
                    head_dim: hd,
                },
            ),
            (KvWriter::Scatter, Some(tables)) => candle_rope(&q, n_heads, hd, tables),
        }
    }

    /// Writes `new` (f32, `t × n_kv·hd`, possibly a column range), turned by `rope` if given,
    /// into `slab`.
    fn write(
        self,
        slab: &Tensor,
        new: &Tensor,
        table: &Tensor,
        (n_kv, hd): (usize, usize),
        rope: RopeTables,
    ) -> candle_core::Result<()> {
        match self {
            KvWriter::Kernel => slab.inplace_op3(
                new,
                table,
                &KvWrite {
                    n_kv,
                    head_dim: hd,
                    rope,
                },
            ),
            KvWriter::Scatter => {
                let new = match rope {
                    Some(tables) => candle_rope(new, n_kv, hd, tables)?,
                    None => new.clone(),
                };
                let rows = new.to_dtype(DType::F16)?.reshape((table.dim(0)?, hd))?;
                slab.scatter_set(table, &rows, 0)
            }
        }
    }
}

fn candle_dtype(ty: GgmlType) -> Result<GgmlDType, EngineError> {
    Ok(match ty {
        GgmlType::F32 => GgmlDType::F32,
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::BF16 => GgmlDType::BF16,
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q4K => GgmlDType::Q4K,
        GgmlType::Q5K => GgmlDType::Q5K,
        GgmlType::Q6K => GgmlDType::Q6K,
        #[allow(unreachable_patterns)]
        other => {
            return Err(EngineError::Device(format!(
                "weights of type {other:?} have no candle kernel"
            )))
        }
    })
}

/// Copies a matrix's blocks onto the device as they are in the file.
fn upload(
    bytes: &[u8],
    ty: GgmlType,
    rows: usize,
    cols: usize,
    device: &Device,
) -> Result<QMatMul, EngineError> {
    let storage = QStorage::from_data(Cow::Borrowed(bytes), device, candle_dtype(ty)?)?;
    Ok(QMatMul::from_qtensor(QTensor::new(storage, (rows, cols))?)?)
}

fn upload_raw(raw: &RawMatrix, device: &Device) -> Result<QMatMul, EngineError> {
    upload(raw.data(), raw.ty, raw.rows, raw.cols, device)
}

/// Lets a file's mapped pages go once the device holds the matrix.
fn release(raw: Rc<RawMatrix>) {
    if let Ok(raw) = Rc::try_unwrap(raw) {
        if let Some(release) = raw.release {
            release();
        }
    }
}

/// How decode rows are attended: the paged kernel where asked for and it serves these heads.
fn decode_attention(cfg: &ModelConfig, k: &DeviceKernels) -> DecodeAttention {
    let group = cfg.n_heads / cfg.n_kv_heads;
    if k.paged_decode && PagedDecode::supports(cfg.head_dim, group) {
        return DecodeAttention::Paged;
    }
    if k.paged_decode {
        tracing::info!(
            head_dim = cfg.head_dim,
            group,
            "no paged decode kernel for these heads: decode rows take the gathered attention"
        );
    }
    DecodeAttention::Gathered {
        group_cost: k.decode_group_cost,
    }
}

/// (free, total) bytes of a CUDA device's memory; `None` elsewhere.
fn cuda_memory(device: &Device) -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if let Ok(d) = device.as_cuda_device() {
        return d.cuda_stream().context().mem_get_info().ok();
    }
    let _ = device;
    None
}

impl CandleModel {
    pub(super) fn build(
        cfg: &ModelConfig,
        src: &mut WeightSource,
        device: &Device,
        opts: &LoadOptions,
    ) -> Result<Self, EngineError> {
        // The blocks first (mapped pages, or random bytes), then onto the device layer by layer,
        // fusing what reads the same input.
        let w = Weights::build(cfg, src, &mut |raw| Ok(Rc::new(raw)), &mut |v| Ok(v))?;
        let vector = |v: Vec<f32>| -> candle_core::Result<Tensor> {
            let n = v.len();
            Tensor::from_vec(v, n, device)
        };
        let embed = upload_raw(&w.embed, device)?;
        let output = if Rc::ptr_eq(&w.output, &w.embed) {
            embed.clone()
        } else {
            upload_raw(&w.output, device)?
        };
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in w.layers {
            layers.push(Layer {
                attn_norm: vector(l.attn_norm)?,
                qkv: Fused::new(&[&l.wq, &l.wk, &l.wv], device)?,
                wo: upload_raw(&l.wo, device)?,
                ffn_norm: vector(l.ffn_norm)?,
                gate_up: Fused::new(&[&l.w_gate, &l.w_up], device)?,
                w_down: upload_raw(&l.w_down, device)?,
            });
            for m in [l.wq, l.wk, l.wv, l.wo, l.w_gate, l.w_up, l.w_down] {
                release(m);
            }
        }
        let out_norm = vector(w.out_norm)?;
        let decode_attention = decode_attention(cfg, &opts.device_kernels);
        let kv_writer = match opts.device_kernels.kv_write_kernel {
            true => KvWriter::Kernel,
            false => KvWriter::Scatter,
        };
        drop(w.output);
        release(w.embed);
        let shape = KvShape::of(cfg);
        let mut kv_bytes = opts.kv_bytes;
        if let Some((free, _)) = cuda_memory(device) {
            // Leave a tenth of what is free (and 1 GiB at least) for activations and candle's
            // buffers: a budget the card cannot hold is cut down, with a word in the log.
            let room = free.saturating_sub((free / 10).max(1 << 30));
            if kv_bytes > room {
                tracing::warn!(
                    asked_mib = kv_bytes >> 20,
                    room_mib = room >> 20,
                    "the KV budget does not fit on the GPU; using what fits"
                );
                kv_bytes = room;
            }
        }
        let blocks = (kv_bytes / shape.block_bytes()).max(1);
        let rows = blocks * cfg.n_kv_heads * BLOCK_LEN;
        let kv = (0..cfg.n_layers)
            .map(|_| {
                let zeros = || Tensor::zeros((rows, cfg.head_dim), DType::F16, device);
                Ok((zeros()?, zeros()?))
            })
            .collect::<Result<Vec<_>, candle_core::Error>>()?;
        let fused = layers
            .iter()
            .map(|l| (l.qkv.mats.len() == 1) as usize + (l.gate_up.mats.len() == 1) as usize)
            .sum::<usize>();
        tracing::info!(
            fused_projections = fused,
            ?decode_attention,
            ?kv_writer,
            blocks,
            positions = blocks * BLOCK_LEN,
            mib = (blocks * shape.block_bytes()) >> 20,
            "KV cache allocated on the device"
        );
        Ok(Self {
            device: device.clone(),
            embed,
            layers,
            out_norm,
            output,
            kv,
            pool: BlockPool::new(blocks),
            inv_freq: inv_freq(cfg),
            decode_attention,
            kv_writer,
        })
    }

    pub fn pool(&self) -> &Arc<BlockPool> {
        &self.pool
    }

    pub fn device_name(&self) -> String {
        match self.device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => {
                #[cfg(feature = "cuda")]
                if let Ok(d) = self.device.as_cuda_device() {
                    if let Ok(name) = d.cuda_stream().context().name() {
                        return format!("cuda:{gpu_id} ({name})");
                    }
                }
                format!("cuda:{gpu_id}")
            }
            _ => "candle-cpu".into(),
        }
    }

    /// (used, total) bytes of GPU memory.
    pub fn device_memory(&self) -> Option<(usize, usize)> {
        cuda_memory(&self.device).map(|(free, total)| (total - free, total))
    }

    /// Runs one packed step over a checked batch (see [`super::model::Model::step`]).
    pub fn forward(
        &self,
        cfg: &ModelConfig,
        batch: &mut [SeqInput],
    ) -> Result<Vec<StepOutput>, EngineError> {
        Ok(self.step(cfg, batch)?)
    }

    fn step(
        &self,
        cfg: &ModelConfig,
        batch: &mut [SeqInput],
    ) -> candle_core::Result<Vec<StepOutput>> {
        let dev = &self.device;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.n_heads, cfg.n_kv_heads);
        let group = nh / nkv;

        // Rows are packed decode sequences first, shortest cache first (so that attention groups
        // of similar lengths are runs of rows), then prompt chunks. If a device step fails half
        // way, the caller drops the batch's caches: their lengths were already grown.
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by_key(|&i| match batch[i].tokens.len() {
            1 => (false, batch[i].cache.len()),
            _ => (true, 0),
        });
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut write_rows = Vec::new();
        let mut spans = Vec::with_capacity(order.len()); // (first row, rows, start position)
        for &i in &order {
            let s = &mut batch[i];
            let n = s.tokens.len();
            let start = s.cache.grow(n);
            let ids = s.cache.block_ids();
            for p in start..start + n {
                write_rows.extend((0..nkv).map(|kh| slab_row(ids, nkv, kh, p)));
            }
            spans.push((tokens.len(), n, start));
            tokens.extend_from_slice(s.tokens);
            positions.extend(start..start + n);
        }
        let t = tokens.len();
        // The kernels write and read where the tables point: the rows are checked here, once.
        let slab_blocks = self.pool.total();
        let slab_rows = slab_blocks * nkv * BLOCK_LEN;
        if let Some(r) = write_rows.iter().find(|&&r| r as usize >= slab_rows) {
            candle_core::bail!("KV row {r} is outside the {slab_rows} rows of the slabs");
        }
        let write_table = self.kv_writer.table(&write_rows, hd, dev)?;
        let (mut cos, mut sin) = rope_tables(&self.inv_freq, &positions);
        let rotated = self.inv_freq.len();
        if rotated < hd / 2 {
            // Partial rotary: the pairs past `rope_dims` turn by angle zero.
            let pad = |v: Vec<f32>, fill: f32| -> Vec<f32> {
                v.chunks(rotated.max(1))
                    .flat_map(|r| {
                        r.iter()
                            .copied()
                            .chain(std::iter::repeat_n(fill, hd / 2 - rotated))
                    })
                    .collect()
            };
            cos = pad(cos, 1.0);
            sin = pad(sin, 0.0);
        }
        let cos = Tensor::from_vec(cos, (t, 1, hd / 2), dev)?;
        let sin = Tensor::from_vec(sin, (t, 1, hd / 2), dev)?;
        let attentions = attention::plan(
            dev,
            self.decode_attention,
            batch,
            &order,
            &spans,
            (nkv, slab_blocks),
        )?;

        let mut x = self.embed.embedding(&Tensor::from_vec(tokens, t, dev)?)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let xn = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.rms_eps)?;
            let [q, k, v]: [Tensor; 3] = layer
                .qkv
                .forward(&xn)?
                .try_into()
                .expect("three projections");
            let rope = cfg.use_rope[li].then_some((&cos, &sin));
            let q = self.kv_writer.queries(q, (nh, hd), rope)?;
            let (slab_k, slab_v) = &self.kv[li];
            self.kv_writer
                .write(slab_k, &k, &write_table, (nkv, hd), rope)?;
            self.kv_writer
                .write(slab_v, &v, &write_table, (nkv, hd), None)?;

            let mut parts = attentions
                .iter()
                .map(|a| a.run(&q, slab_k, slab_v, (nkv, group, hd)))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let attn = match parts.len() {
                1 => parts.pop().expect("one part"),
                _ => Tensor::cat(&parts, 0)?,
            };
            x = (x + layer.wo.forward(&attn)?)?;

            let xn = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, cfg.rms_eps)?;
            let [gate, up]: [Tensor; 2] = layer
                .gate_up
                .forward(&xn)?
                .try_into()
                .expect("two projections");
            x = (x + layer.w_down.forward(&(gate.silu()? * up)?)?)?;
        }

        // Logits only for the rows that are sampled, and only those that are not a greedy pick
        // come back: a greedy sequence's token is chosen on the device. Rows of the logits:
        // `picks` (sequence, its greedy row), `whole` (sequence, its first row, rows).
        let mut wanted: Vec<u32> = Vec::new();
        let (mut picks, mut whole) = (Vec::new(), Vec::new());
        for (&i, &(r0, n, _)) in order.iter().zip(&spans) {
            let (at, last) = (wanted.len(), (r0 + n - 1) as u32);
            match batch[i].logits {
                Logits::None => {}
                Logits::Greedy => {
                    picks.push((i, at));
                    wanted.push(last);
                }
                Logits::Last => {
                    whole.push((i, at, 1));
                    wanted.push(last);
                }
                Logits::All => {
                    whole.push((i, at, n));
                    wanted.extend(r0 as u32..=last);
                }
            }
        }
        let mut outputs: Vec<StepOutput> = vec![StepOutput::Logits(Vec::new()); batch.len()];
        if wanted.is_empty() {
            return Ok(outputs);
        }
        let w = wanted.len();
        let sel = x.index_select(&Tensor::from_vec(wanted, w, dev)?, 0)?;
        let sel = candle_nn::ops::rms_norm(&sel, &self.out_norm, cfg.rms_eps)?;
        let logits = self.output.forward(&sel)?;
        let rows = |r: Vec<u32>| {
            let n = r.len();
            Tensor::from_vec(r, n, dev)
        };
        if !picks.is_empty() {
            let r = rows(picks.iter().map(|&(_, r)| r as u32).collect())?;
            let ids = logits
                .index_select(&r, 0)?
                .argmax_keepdim(1)?
                .flatten_all()?
                .to_vec1::<u32>()?;
            for (&(i, _), id) in picks.iter().zip(ids) {
                outputs[i] = StepOutput::Token(id);
            }
        }
        if !whole.is_empty() {
            let kept = if picks.is_empty() {
                logits
            } else {
                let r = whole.iter().flat_map(|&(_, r, n)| r as u32..(r + n) as u32);
                logits.index_select(&rows(r.collect())?, 0)?
            };
            let host = kept.flatten_all()?.to_vec1::<f32>()?;
            let vocab = cfg.vocab_size;
            let mut at = 0;
            for &(i, _, n) in &whole {
                outputs[i] = StepOutput::Logits(host[at * vocab..(at + n) * vocab].to_vec());
                at += n;
            }
        }
        Ok(outputs)
    }
}

/// Small random-looking values in [-1, 1), the same every run (the kernels' tests).
#[cfg(test)]
fn test_values(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::RawMatrix;

    fn raw(ty: GgmlType, rows: usize, cols: usize, seed: u8) -> RawMatrix<'static> {
        let mut b: Vec<u8> = (0..ty.row_bytes(cols) * rows)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        crate::engine::quant::sanitize_random_scales(ty, &mut b);
        RawMatrix {
            ty,
            rows,
            cols,
            bytes: Arc::new(b),
            start: 0,
            release: None,
        }
    }

    #[test]
    fn projections_fuse_when_their_blocks_share_a_type_and_give_the_same_outputs() {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(
            (0..3 * 64).map(|i| (i % 7) as f32 - 3.0).collect(),
            (3, 64),
            &dev,
        )
        .unwrap();
        let (a, b, c) = (
            raw(GgmlType::Q8_0, 16, 64, 1),
            raw(GgmlType::Q8_0, 8, 64, 2),
            raw(GgmlType::Q4_0, 8, 64, 3),
        );
        let alone = |r: &RawMatrix| upload_raw(r, &dev).unwrap().forward(&x).unwrap();
        let same = Fused::new(&[&a, &b], &dev).unwrap();
        assert_eq!(same.mats.len(), 1);
        let mixed = Fused::new(&[&a, &c], &dev).unwrap();
        assert_eq!(mixed.mats.len(), 2);
        for (fused, parts) in [(same, [&a, &b]), (mixed, [&a, &c])] {
            let outs = fused.forward(&x).unwrap();
            for (out, r) in outs.iter().zip(parts) {
                assert_eq!(out.dims(), &[3, r.rows]);
                let (got, want) = (
                    out.to_vec2::<f32>().unwrap(),
                    alone(r).to_vec2::<f32>().unwrap(),
                );
                assert_eq!(got, want);
            }
        }
    }
}
