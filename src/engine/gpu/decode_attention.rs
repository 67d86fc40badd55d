//! Attention for a step's decode rows straight from the KV slabs: one custom op,
//! [`PagedDecode`], that reads each sequence's cache through its block table. Its GPU side is
//! `decode_attention.cu` (one thread block per sequence, KV head and split of the cache, an
//! online softmax per warp; the splits' partial sums merged by a second kernel when there are
//! several); the CPU side, for candle's CPU device, does the same sums in plain loops. Each sequence's
//! result depends on its own cache only, so a packed step gives every row what it gets alone.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

#[cfg(any(test, feature = "cuda"))]
use super::launch::{size, Launch, Scalar};
use crate::engine::kv::BLOCK_LEN;

/// Head sizes the GPU kernel is built for (`decode_attention_<hd>`).
const KERNEL_HEAD_DIMS: &[usize] = &[16, 32, 64, 80, 96, 128];
/// At most this many query heads share a KV head in the kernel.
const KERNEL_MAX_GROUP: usize = 8;
/// Thread blocks that keep a big GPU busy (about two per SM of an H100's or H200's 132): a step
/// with fewer rows × KV heads than this splits its caches' positions among more blocks.
#[cfg(any(test, feature = "cuda"))]
const BUSY_BLOCKS: usize = 256;
/// The fewest positions a split takes (16 per warp), so that it is worth its partial sums.
#[cfg(any(test, feature = "cuda"))]
const MIN_CHUNK: usize = 128;

/// A paged decode's launches: the attention (grid `b × n_kv × splits`), then with several
/// splits the merge of their partial sums (`partials` f32 values in between).
#[cfg(any(test, feature = "cuda"))]
#[derive(Debug)]
pub(super) struct DecodeLaunch {
    pub attention: Launch,
    pub merge: Option<Launch>,
    pub partials: usize,
}

/// Decode attention of `b` rows (one query row each) over their own caches. Operands: the
/// step's queries for those rows (f32, `b × n_kv·group·head_dim`, rows may be strided), then a
/// layer's K and V slabs; `table` (u32, `b × (1 + blocks)`) holds each row's cache length and
/// its block ids. The output is `b × n_kv·group·head_dim` f32.
pub(super) struct PagedDecode<'a> {
    pub table: &'a Tensor,
    pub n_kv: usize,
    pub group: usize,
    pub head_dim: usize,
    pub scale: f32,
}

impl PagedDecode<'_> {
    /// Whether the GPU kernel serves this model's heads (otherwise decode rows take candle's
    /// gathered attention).
    pub fn supports(head_dim: usize, group: usize) -> bool {
        KERNEL_HEAD_DIMS.contains(&head_dim) && (1..=KERNEL_MAX_GROUP).contains(&group)
    }

    /// A step's table: per decode row its cache length, then its block ids (zero-padded). Every
    /// id must be below `slab_blocks`: checked here, on the host, since the GPU kernel reads
    /// where the table points.
    pub fn table(
        rows: &[(usize, &[u32])],
        slab_blocks: usize,
        dev: &candle_core::Device,
    ) -> Result<Tensor> {
        let width = 1 + rows
            .iter()
            .map(|(len, _)| len.div_ceil(BLOCK_LEN))
            .max()
            .unwrap_or(0);
        let mut t = vec![0u32; rows.len() * width];
        for ((len, ids), row) in rows.iter().zip(t.chunks_exact_mut(width)) {
            let used = len.div_ceil(BLOCK_LEN);
            if ids.len() < used {
                bail!("paged decode: {len} positions but {} blocks", ids.len());
            }
            if let Some(b) = ids[..used].iter().find(|&&b| b as usize >= slab_blocks) {
                bail!("paged decode: block {b} is outside the {slab_blocks} of the slabs");
            }
            row[0] = *len as u32;
            row[1..1 + used].copy_from_slice(&ids[..used]);
        }
        Tensor::from_vec(t, (rows.len(), width), dev)
    }

    /// The longest cache the table can describe (its blocks' positions).
    #[cfg(any(test, feature = "cuda"))]
    fn longest(&self) -> Result<usize> {
        Ok((self.table.dim(1)? - 1) * BLOCK_LEN)
    }

    /// Positions per split for `b` rows: `None` (one split) when the rows and KV heads give
    /// enough blocks already, or the caches are too short to cut.
    #[cfg(any(test, feature = "cuda"))]
    pub fn chunk(&self, b: usize) -> Result<Option<usize>> {
        let longest = self.longest()?;
        let splits = BUSY_BLOCKS
            .div_ceil((b * self.n_kv).max(1))
            .min(longest.div_ceil(MIN_CHUNK));
        Ok((splits > 1).then(|| longest.div_ceil(splits).next_multiple_of(BLOCK_LEN)))
    }

    /// The launches for `b` rows whose queries are `q_stride` apart, their caches cut into
    /// `chunk`s of positions (or not): a block of 8 warps (`WARPS` in the kernel) per row, KV
    /// head and split.
    #[cfg(any(test, feature = "cuda"))]
    pub fn launch(&self, b: usize, q_stride: usize, chunk: Option<usize>) -> Result<DecodeLaunch> {
        let splits = match chunk {
            Some(c) if c > 0 => self.longest()?.div_ceil(c).max(1),
            _ => 1,
        };
        let chunk = match chunk {
            Some(c) if splits > 1 => size(c)?,
            _ => u32::MAX,
        };
        let attention = Launch {
            kernel: format!("decode_attention_{}", self.head_dim),
            grid: [size(b)?, size(self.n_kv)?, size(splits)?],
            block: [256, 1, 1],
            scalars: vec![
                Scalar::size(self.n_kv)?,
                Scalar::size(self.group)?,
                Scalar::size(q_stride)?,
                Scalar::size(self.table.dim(1)?)?,
                Scalar::U32(chunk),
                Scalar::F32(self.scale),
            ],
        };
        let merge = (splits > 1)
            .then(|| -> Result<Launch> {
                Ok(Launch {
                    kernel: "decode_attention_merge".into(),
                    grid: [size(b)?, size(self.n_kv)?, 1],
                    block: [256, 1, 1],
                    scalars: vec![
                        Scalar::size(self.n_kv)?,
                        Scalar::size(self.group)?,
                        Scalar::size(self.head_dim)?,
                        Scalar::size(splits)?,
                    ],
                })
            })
            .transpose()?;
        let partials = if splits > 1 {
            b * self.n_kv * splits * self.group * (self.head_dim + 2)
        } else {
            0
        };
        Ok(DecodeLaunch {
            attention,
            merge,
            partials,
        })
    }

    fn width(&self) -> usize {
        self.n_kv * self.group * self.head_dim
    }

    /// (rows, the queries' row stride) after checking every operand's shape.
    fn check(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<(usize, usize)> {
        let (b, cols) = q.shape().dims2()?;
        let (t_rows, t_width) = self.table.dims2()?;
        if cols < self.width() || q.stride()[1] != 1 || t_rows != b || t_width == 0 {
            bail!(
                "paged decode: {b} × {cols} queries (strides {:?}) for {} heads, table {t_rows} × {t_width}",
                q.stride(),
                self.n_kv * self.group
            );
        }
        for slab in [k, v] {
            if slab.shape().dims2()?.1 != self.head_dim || !slab.is_contiguous() {
                bail!(
                    "paged decode: slabs must be contiguous rows of {}",
                    self.head_dim
                );
            }
        }
        if !self.table.is_contiguous() {
            bail!("paged decode: the table must be contiguous");
        }
        Ok((b, q.stride()[0]))
    }
}

impl CustomOp3 for PagedDecode<'_> {
    fn name(&self) -> &'static str {
        "paged-decode-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        k: &CpuStorage,
        k_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, q_stride) = self.check(q_l, k_l, v_l)?;
        let (CpuStorage::F32(q), CpuStorage::F16(k), CpuStorage::F16(v)) = (q, k, v) else {
            bail!("paged decode: needs f32 queries and f16 slabs");
        };
        let (q, k, v) = (
            &q[q_l.start_offset()..],
            &k[k_l.start_offset()..],
            &v[v_l.start_offset()..],
        );
        let (table, table_l) = self.table.storage_and_layout();
        let Storage::Cpu(CpuStorage::U32(table)) = &*table else {
            bail!("paged decode: the table must be u32 on the CPU");
        };
        let table = &table[table_l.start_offset()..];
        let width = self.table.dim(1)?;
        let (hd, nkv, group) = (self.head_dim, self.n_kv, self.group);
        let slab_rows = k.len().min(v.len()) / hd;
        let mut out = vec![0f32; b * self.width()];
        let mut scores = Vec::new();
        for (s, out_row) in out.chunks_exact_mut(self.width()).enumerate() {
            let row = &table[s * width..(s + 1) * width];
            let len = row[0] as usize;
            if len.div_ceil(BLOCK_LEN) > width - 1 {
                bail!("paged decode: a cache of {len} positions in a table of {width}");
            }
            let slab_row = |kh: usize, p: usize| {
                (row[1 + p / BLOCK_LEN] as usize * nkv + kh) * BLOCK_LEN + p % BLOCK_LEN
            };
            if let Some(r) = (0..nkv)
                .flat_map(|kh| (0..len).map(move |p| (kh, p)))
                .map(|(kh, p)| slab_row(kh, p))
                .find(|&r| r >= slab_rows)
            {
                bail!("paged decode: slab row {r} is outside the slab");
            }
            for kh in 0..nkv {
                for g in 0..group {
                    let h = kh * group + g;
                    let qh = &q[s * q_stride + h * hd..][..hd];
                    scores.clear();
                    scores.extend((0..len).map(|p| {
                        let kr = &k[slab_row(kh, p) * hd..][..hd];
                        self.scale * qh.iter().zip(kr).map(|(a, b)| a * b.to_f32()).sum::<f32>()
                    }));
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for x in scores.iter_mut() {
                        *x = (*x - max).exp();
                        sum += *x;
                    }
                    let o = &mut out_row[h * hd..][..hd];
                    for (p, &w) in scores.iter().enumerate() {
                        let vr = &v[slab_row(kh, p) * hd..][..hd];
                        for (d, x) in o.iter_mut().zip(vr) {
                            *d += w * x.to_f32();
                        }
                    }
                    if sum > 0.0 {
                        o.iter_mut().for_each(|d| *d /= sum);
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, self.width()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_l: &Layout,
        k: &candle_core::CudaStorage,
        k_l: &Layout,
        v: &candle_core::CudaStorage,
        v_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;

        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode_attention.ptx"));
        const _: () = assert!(BLOCK_LEN == 32, "decode_attention.cu reads blocks of 32");
        let (b, q_stride) = self.check(q_l, k_l, v_l)?;
        if !Self::supports(self.head_dim, self.group) {
            bail!(
                "paged decode: no kernel for heads of {} in groups of {}",
                self.head_dim,
                self.group
            );
        }
        let launch = self.launch(b, q_stride, self.chunk(b)?)?;
        let dev = q.device().clone();
        let load = |name: &str| dev.get_or_load_custom_func(name, "smolchat_decode_attention", PTX);
        let (table, table_l) = self.table.storage_and_layout();
        let Storage::Cuda(table) = &*table else {
            bail!("paged decode: the table must be on the GPU");
        };
        let table = table
            .as_cuda_slice::<u32>()?
            .slice(table_l.start_offset()..);
        let q = q.as_cuda_slice::<f32>()?.slice(q_l.start_offset()..);
        let k = k.as_cuda_slice::<half::f16>()?.slice(k_l.start_offset()..);
        let v = v.as_cuda_slice::<half::f16>()?.slice(v_l.start_offset()..);
        // SAFETY: every value is written by the kernels before it is read (with one split the
        // partial sums are neither written nor read).
        let out = unsafe { dev.alloc::<f32>(b * self.width())? };
        let part = unsafe { dev.alloc::<f32>(launch.partials.max(1))? };
        let func = load(&launch.attention.kernel)?;
        let mut builder = func.builder();
        builder.arg(&q);
        builder.arg(&k);
        builder.arg(&v);
        builder.arg(&table);
        builder.arg(&out);
        builder.arg(&part);
        launch.attention.push_scalars(&mut builder);
        // SAFETY: the operands were checked above; the block ids come from the block pool.
        unsafe { builder.launch(launch.attention.config()) }.w()?;
        if let Some(merge) = &launch.merge {
            let func = load(&merge.kernel)?;
            let mut builder = func.builder();
            builder.arg(&part);
            builder.arg(&out);
            merge.push_scalars(&mut builder);
            // SAFETY: the partial sums of every split were written above, on the same stream.
            unsafe { builder.launch(merge.config()) }.w()?;
        }
        let out = candle_core::CudaStorage::wrap_cuda_slice(out, dev);
        Ok((out, Shape::from((b, self.width()))))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_values as values;
    use super::*;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn paged_decode_matches_softmax_attention_over_each_cache() {
        let dev = Device::Cpu;
        let (nkv, group, hd) = (2, 3, 16);
        let blocks = 6;
        let slab_rows = blocks * nkv * BLOCK_LEN;
        let slab = |seed| {
            Tensor::from_vec(values(slab_rows * hd, seed), (slab_rows, hd), &dev)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap()
        };
        let (k, v) = (slab(1), slab(2));
        // Two sequences: 40 positions in blocks 4 and 1; 7 positions in block 2.
        let caches: [(usize, &[u32]); 2] = [(40, &[4, 1]), (7, &[2])];
        let table = PagedDecode::table(&caches, blocks, &dev).unwrap();
        assert_eq!(table.dims(), &[2, 3]);
        // Queries as a column range of a wider projection, as the fused QKV output gives them.
        let width = nkv * group * hd;
        let wide = Tensor::from_vec(values(2 * (width + 8), 3), (2, width + 8), &dev).unwrap();
        let q = wide.narrow(1, 8, width).unwrap();
        let scale = 0.25;
        let op = PagedDecode {
            table: &table,
            n_kv: nkv,
            group,
            head_dim: hd,
            scale,
        };
        let got = q
            .apply_op3_no_bwd(&k, &v, &op)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();

        // The same with plain tensors: each head's scores over its own cache rows.
        let (k, v) = (
            k.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
            v.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
        );
        let q = q.to_vec2::<f32>().unwrap();
        for (s, &(len, ids)) in caches.iter().enumerate() {
            for h in 0..nkv * group {
                let kh = h / group;
                let rows: Vec<usize> = (0..len)
                    .map(|p| super::super::slab_row(ids, nkv, kh, p) as usize)
                    .collect();
                let qh = &q[s][h * hd..(h + 1) * hd];
                let scores: Vec<f32> = rows
                    .iter()
                    .map(|&r| scale * qh.iter().zip(&k[r]).map(|(a, b)| a * b).sum::<f32>())
                    .collect();
                let max = scores.iter().copied().fold(f32::MIN, f32::max);
                let e: Vec<f32> = scores.iter().map(|x| (x - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                for d in 0..hd {
                    let want: f32 =
                        rows.iter().zip(&e).map(|(&r, w)| w * v[r][d]).sum::<f32>() / sum;
                    let have = got[s][h * hd + d];
                    assert!(
                        (have - want).abs() < 1e-5,
                        "seq {s} head {h} dim {d}: {have} vs {want}"
                    );
                }
            }
        }

        // A table that points outside the slabs is refused when it is made (the GPU kernel
        // would read where it points); the CPU side checks again.
        let past = [blocks as u32];
        assert!(PagedDecode::table(&[(3, &past)], blocks, &dev).is_err());
        let bad = PagedDecode::table(&[(3, &past)], blocks + 1, &dev).unwrap();
        let one = wide.narrow(0, 0, 1).unwrap().narrow(1, 8, width).unwrap();
        let k16 = slab(1);
        assert!(one
            .apply_op3_no_bwd(&k16, &k16, &PagedDecode { table: &bad, ..op })
            .is_err());
        // So is a cache longer than its blocks.
        assert!(PagedDecode::table(&[(33, &[0])], blocks, &dev).is_err());
    }
}
