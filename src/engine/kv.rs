//! The KV cache of one sequence, grown in fixed blocks of positions.
//!
//! On the CPU a [`KvBlock`] holds K and V of [`HOST_BLOCK_LEN`] positions for every layer and KV
//! head, laid out so that one head's positions are contiguous: in f16, or (`KvFormat::Q8`) in signed
//! bytes with one f16 scale per 32 values — about half the memory, and half the bytes attention
//! reads each step — or (`KvFormat::K8V4`) keys in 8 bits and values in 4, about 40 % of f16.
//! On a device the blocks live in
//! the backend's per-layer slabs and the cache holds only their ids, handed out by a
//! [`BlockPool`]. Growing the cache appends a block; nothing is ever re-concatenated. The caller
//! owns caches: it keeps one per sequence, frees it, or keeps it warm and truncates it to a
//! shared prefix.

use std::sync::{Arc, Mutex};

use half::{f16, slice::HalfFloatSliceExt};

use super::config::ModelConfig;

/// Positions per block of a device's paged cache (its kernels read blocks of 32).
pub const BLOCK_LEN: usize = 32;

/// Positions per block of a host cache. Attention walks one head's rows block by block, so
/// this is how far a run of keys or values goes contiguously before a jump to the next block:
/// 128 positions is 16 KB of an f16 head of 64. With runs of 4 KB (blocks of 32) attention
/// waited on memory at every block: 16 sequences at 1,000 tokens decoded ~35 % slower, at
/// 64–619 tokens ~26 % (alternating runs; software prefetch of the next block won back less,
/// and nothing more on top of 128; 256 looked a few % faster still, within the noise). A
/// longer block costs at most 127 unused positions per sequence.
pub const HOST_BLOCK_LEN: usize = 128;

/// How a host cache stores K and V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvFormat {
    #[default]
    F16,
    /// 8-bit: `x ≈ d·q` per 32 values (needs a head size that is a multiple of 32).
    Q8,
    /// Keys as [`KvFormat::Q8`], values in 4 bits: `x ≈ d·(q − 8)` per 32 values. Values are
    /// only ever summed with softmax weights, so their error averages out where keys' would
    /// move the weights themselves.
    K8V4,
}

impl KvFormat {
    /// Whether values are stored in 8 bits or fewer (which needs a head size that is a
    /// multiple of [`Q8_GROUP`], and the CPU backend).
    pub fn is_quantized(self) -> bool {
        self != KvFormat::F16
    }
}

/// Values that share one scale in a [`KvFormat::Q8`] cache.
pub const Q8_GROUP: usize = 32;

/// Sizes a cache needs, copied out of the model config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub format: KvFormat,
}

impl KvShape {
    pub fn of(cfg: &ModelConfig) -> Self {
        Self {
            n_layers: cfg.n_layers,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            format: KvFormat::F16,
        }
    }

    /// One head's values in a host block.
    fn head_span(&self) -> usize {
        HOST_BLOCK_LEN * self.head_dim
    }

    /// Values in a block of `positions`.
    fn block_elems(&self, positions: usize) -> usize {
        self.n_layers * 2 * self.n_kv_heads * positions * self.head_dim
    }

    fn bytes_of(&self, positions: usize) -> usize {
        let elems = self.block_elems(positions);
        let scales = elems / Q8_GROUP * 2;
        match self.format {
            KvFormat::F16 => elems * 2,
            KvFormat::Q8 => elems + scales,
            // Half the values are keys (a byte each), half values (a nibble each).
            KvFormat::K8V4 => elems / 2 + elems / 4 + scales,
        }
    }

    /// Bytes of one device block ([`BLOCK_LEN`] positions).
    pub fn block_bytes(&self) -> usize {
        self.bytes_of(BLOCK_LEN)
    }

    /// Bytes of one host block ([`HOST_BLOCK_LEN`] positions).
    pub fn host_block_bytes(&self) -> usize {
        self.bytes_of(HOST_BLOCK_LEN)
    }
}

pub enum KvBlock {
    F16(Box<[f16]>),
    /// Values, and one scale per [`Q8_GROUP`] values in the same order.
    Q8(Box<[i8]>, Box<[f16]>),
    /// Keys as in `Q8`, then values two to a byte (element `2i` in the low nibble of byte `i`),
    /// each with one scale per [`Q8_GROUP`]; both in the order of an f16 block without its
    /// other half.
    K8V4 {
        k: Box<[i8]>,
        kd: Box<[f16]>,
        v: Box<[u8]>,
        vd: Box<[f16]>,
    },
}

impl KvBlock {
    fn new(shape: &KvShape) -> Self {
        let elems = shape.block_elems(HOST_BLOCK_LEN);
        let zeros = |n: usize| vec![f16::ZERO; n].into_boxed_slice();
        match shape.format {
            KvFormat::F16 => KvBlock::F16(zeros(elems)),
            KvFormat::Q8 => KvBlock::Q8(vec![0; elems].into_boxed_slice(), zeros(elems / Q8_GROUP)),
            KvFormat::K8V4 => KvBlock::K8V4 {
                k: vec![0; elems / 2].into_boxed_slice(),
                kd: zeros(elems / 2 / Q8_GROUP),
                v: vec![0; elems / 4].into_boxed_slice(),
                vd: zeros(elems / 2 / Q8_GROUP),
            },
        }
    }
}

/// The ids of a device's KV blocks that no cache holds.
pub struct BlockPool {
    free: Mutex<Vec<u32>>,
    total: usize,
}

impl BlockPool {
    pub fn new(total: usize) -> Arc<Self> {
        Arc::new(Self {
            // Popped from the end: low ids first.
            free: Mutex::new((0..total as u32).rev().collect()),
            total,
        })
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn free_blocks(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        // The list stays valid whatever a panicking holder did: recover it.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

enum Blocks {
    Host(Vec<KvBlock>),
    Device { ids: Vec<u32>, pool: Arc<BlockPool> },
}

/// K and V of one sequence.
pub struct KvCache {
    shape: KvShape,
    blocks: Blocks,
    len: usize,
}

impl KvCache {
    pub fn new(shape: KvShape) -> Self {
        Self {
            shape,
            blocks: Blocks::Host(Vec::new()),
            len: 0,
        }
    }

    /// A cache whose blocks live on a device, taken from `pool` as it grows.
    pub fn on_device(shape: KvShape, pool: Arc<BlockPool>) -> Self {
        Self {
            shape,
            blocks: Blocks::Device {
                ids: Vec::new(),
                pool,
            },
            len: 0,
        }
    }

    /// The pool of a device cache (`None` on the CPU).
    pub fn pool(&self) -> Option<&Arc<BlockPool>> {
        match &self.blocks {
            Blocks::Host(_) => None,
            Blocks::Device { pool, .. } => Some(pool),
        }
    }

    /// The device block ids, in position order (empty on the CPU).
    pub fn block_ids(&self) -> &[u32] {
        match &self.blocks {
            Blocks::Host(_) => &[],
            Blocks::Device { ids, .. } => ids,
        }
    }

    fn n_blocks(&self) -> usize {
        match &self.blocks {
            Blocks::Host(b) => b.len(),
            Blocks::Device { ids, .. } => ids.len(),
        }
    }

    /// Positions per block of this cache.
    fn block_len(&self) -> usize {
        match &self.blocks {
            Blocks::Host(_) => HOST_BLOCK_LEN,
            Blocks::Device { .. } => BLOCK_LEN,
        }
    }

    /// Blocks that growing by `n` positions would add.
    pub fn blocks_needed(&self, n: usize) -> usize {
        (self.len + n).div_ceil(self.block_len()) - self.n_blocks()
    }

    fn host(&self) -> &[KvBlock] {
        match &self.blocks {
            Blocks::Host(b) => b,
            Blocks::Device { .. } => panic!("host access to a device KV cache"),
        }
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the blocks.
    pub fn bytes(&self) -> usize {
        self.n_blocks() * self.shape.bytes_of(self.block_len())
    }

    /// Bytes a cache with `positions` positions holds at most (in host blocks, the larger:
    /// a device cache holds no more).
    pub fn bytes_for(shape: KvShape, positions: usize) -> usize {
        positions.div_ceil(HOST_BLOCK_LEN) * shape.host_block_bytes()
    }

    /// Makes room for `n` more positions and returns the first new one. A device cache takes
    /// its blocks from the pool; the caller checks [`Self::blocks_needed`] against
    /// [`BlockPool::free_blocks`] first (the forward does), so running out is a bug.
    pub fn grow(&mut self, n: usize) -> usize {
        let start = self.len;
        let want = (self.len + n).div_ceil(self.block_len());
        self.len += n;
        match &mut self.blocks {
            Blocks::Host(blocks) => {
                let shape = self.shape;
                blocks.resize_with(want.max(blocks.len()), || KvBlock::new(&shape));
            }
            Blocks::Device { ids, pool } => {
                let mut free = pool.lock();
                while ids.len() < want {
                    ids.push(free.pop().expect("KV block pool exhausted"));
                }
            }
        }
        start
    }

    /// Forgets every position from `len` on and frees the blocks no longer needed.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.len = len;
            let keep = len.div_ceil(self.block_len());
            match &mut self.blocks {
                Blocks::Host(blocks) => blocks.truncate(keep),
                Blocks::Device { ids, pool } => {
                    if keep < ids.len() {
                        pool.lock().extend(ids.drain(keep..).rev());
                    }
                }
            }
        }
    }

    /// Where one head's rows start in a block: among all K and V (f16, q8), or among keys
    /// or values alone (k8v4, which keeps them apart).
    fn offset(&self, layer: usize, is_v: usize, head: usize) -> usize {
        let kv_index = match self.shape.format {
            KvFormat::K8V4 => layer,
            _ => layer * 2 + is_v,
        };
        (kv_index * self.shape.n_kv_heads + head) * self.shape.head_span()
    }

    /// Writes K and V of one position, all heads (`k`, `v`: `n_kv_heads × head_dim`).
    pub fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let hd = self.shape.head_dim;
        let (b, p) = (pos / HOST_BLOCK_LEN, pos % HOST_BLOCK_LEN);
        for h in 0..self.shape.n_kv_heads {
            for (is_v, src) in [(0, k), (1, v)] {
                let o = self.offset(layer, is_v, h) + p * hd;
                let Blocks::Host(blocks) = &mut self.blocks else {
                    panic!("host write to a device KV cache")
                };
                let src = &src[h * hd..(h + 1) * hd];
                let groups = o / Q8_GROUP..(o + hd) / Q8_GROUP;
                use super::quant::{quantize_q4_groups, quantize_q8_groups};
                match (&mut blocks[b], is_v) {
                    // F16C when the CPU has it (half detects it at run time).
                    (KvBlock::F16(data), _) => data[o..o + hd].convert_from_f32_slice(src),
                    (KvBlock::Q8(q, d), _) | (KvBlock::K8V4 { k: q, kd: d, .. }, 0) => {
                        quantize_q8_groups(src, &mut q[o..o + hd], &mut d[groups])
                    }
                    (KvBlock::K8V4 { v, vd, .. }, _) => {
                        quantize_q4_groups(src, &mut v[o / 2..(o + hd) / 2], &mut vd[groups])
                    }
                }
            }
        }
    }

    /// The K (`is_v = false`) or V rows of one head for positions `0..upto`, block by block.
    pub fn rows(
        &self,
        layer: usize,
        head: usize,
        is_v: bool,
        upto: usize,
    ) -> impl Iterator<Item = KvRows<'_>> + '_ {
        let hd = self.shape.head_dim;
        let o = self.offset(layer, is_v as usize, head);
        self.host()
            .iter()
            .take(upto.div_ceil(HOST_BLOCK_LEN))
            .enumerate()
            .map(move |(b, blk)| {
                let end = o + (upto - b * HOST_BLOCK_LEN).min(HOST_BLOCK_LEN) * hd;
                let groups = o / Q8_GROUP..end / Q8_GROUP;
                match blk {
                    KvBlock::F16(data) => KvRows::F16(&data[o..end]),
                    KvBlock::Q8(q, d) => KvRows::Q8(&q[o..end], &d[groups]),
                    KvBlock::K8V4 { k, kd, .. } if !is_v => KvRows::Q8(&k[o..end], &kd[groups]),
                    KvBlock::K8V4 { v, vd, .. } => KvRows::Q4(&v[o / 2..end / 2], &vd[groups]),
                }
            })
    }
}

/// Consecutive K or V rows of one head, as a block stores them.
pub enum KvRows<'a> {
    F16(&'a [f16]),
    /// Values and their scales (one per [`Q8_GROUP`] values).
    Q8(&'a [i8], &'a [f16]),
    /// Values two to a byte (see [`KvBlock::K8V4`]) and their scales.
    Q4(&'a [u8], &'a [f16]),
}

impl KvRows<'_> {
    pub fn values(&self) -> usize {
        match self {
            KvRows::F16(x) => x.len(),
            KvRows::Q8(q, _) => q.len(),
            KvRows::Q4(q, _) => q.len() * 2,
        }
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        if let Blocks::Device { ids, pool } = &mut self.blocks {
            pool.lock().append(ids);
        }
    }
}

impl KvCache {
    /// Appends `n` positions of made-up K and V (benchmarks: a cache "at position n" without
    /// paying for the prefill). Every byte is written, so the memory is really held (a device
    /// cache's slabs are allocated up front: there it only takes the blocks).
    pub fn fill_synthetic(&mut self, n: usize) {
        let start = self.grow(n);
        if self.pool().is_some() {
            return;
        }
        let width = self.shape.n_kv_heads * self.shape.head_dim;
        let row: Vec<f32> = (0..width)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
            .collect();
        for layer in 0..self.shape.n_layers {
            for pos in start..start + n {
                self.write(layer, pos, &row, &row);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f16 rows of one head up to `upto`, blocks joined.
    fn head_rows(c: &KvCache, layer: usize, head: usize, is_v: bool, upto: usize) -> Vec<f32> {
        c.rows(layer, head, is_v, upto)
            .flat_map(|blk| match blk {
                KvRows::F16(x) => x.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
                KvRows::Q8(..) | KvRows::Q4(..) => panic!("an f16 cache"),
            })
            .collect()
    }

    /// Each of `want`'s values within half a step of its 8-bit form, and the f16 scale's
    /// rounding (2⁻¹¹ of the value).
    fn assert_q8_row(q: &[i8], d: &[f16], want: &[f32]) {
        for (i, x) in want.iter().enumerate() {
            let step = d[i / 32].to_f32();
            let err = (q[i] as f32 * step - x).abs();
            assert!(err <= step / 2.0 + x.abs() / 1024.0 + 1e-6, "{i}: {x}");
        }
    }

    #[test]
    fn a_host_cache_truncated_inside_a_block_keeps_its_prefix_and_grows_again() {
        let shape = KvShape {
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 8,
            format: KvFormat::F16,
        };
        // K of position p, head h: p + h/4 (exact in f16 below 2048); V its negative.
        let row = |p: usize, tag: f32| -> Vec<f32> {
            (0..16)
                .map(|i| tag * (p as f32 + (i / 8) as f32 / 4.0))
                .collect()
        };
        let mut c = KvCache::new(shape);
        let first = 2 * HOST_BLOCK_LEN + 44;
        assert_eq!(c.grow(first), 0);
        for p in 0..first {
            let (k, v) = (row(p, 1.0), row(p, -1.0));
            c.write(1, p, &k, &v);
        }
        assert_eq!(c.bytes(), 3 * shape.host_block_bytes());
        assert_eq!(c.bytes(), KvCache::bytes_for(shape, first));
        // Keep a prefix that ends inside the second block; what follows is written anew.
        let keep = HOST_BLOCK_LEN + 20;
        c.truncate(keep);
        assert_eq!((c.len(), c.bytes()), (keep, 2 * shape.host_block_bytes()));
        assert_eq!(c.grow(100), keep);
        for p in keep..keep + 100 {
            let (k, v) = (row(p, 2.0), row(p, -2.0));
            c.write(1, p, &k, &v);
        }
        let upto = keep + 100;
        for (is_v, sign) in [(false, 1.0), (true, -1.0)] {
            for head in 0..2 {
                let got = head_rows(&c, 1, head, is_v, upto);
                assert_eq!(got.len(), upto * 8);
                for p in 0..upto {
                    let tag = if p < keep { sign } else { 2.0 * sign };
                    let want = tag * (p as f32 + head as f32 / 4.0);
                    assert_eq!(got[p * 8], want, "head {head} position {p} (v: {is_v})");
                }
            }
        }
    }

    #[test]
    fn an_8bit_cache_keeps_each_value_within_half_a_step() {
        let shape = KvShape {
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 64,
            format: KvFormat::Q8,
        };
        let mut c = KvCache::new(shape);
        c.grow(HOST_BLOCK_LEN + 40);
        let k: Vec<f32> = (0..128)
            .map(|i| ((i as f32) * 0.7).sin() * (1 + i % 5) as f32)
            .collect();
        let v: Vec<f32> = k.iter().map(|x| -x * 0.5).collect();
        let pos = HOST_BLOCK_LEN + 37;
        c.write(1, pos, &k, &v);
        for (is_v, src) in [(false, &k), (true, &v)] {
            let blk = c
                .rows(1, 1, is_v, pos + 1)
                .nth(1)
                .expect("the second block");
            let KvRows::Q8(q, d) = blk else {
                panic!("an 8-bit block")
            };
            assert_eq!(q.len(), 38 * 64);
            assert_q8_row(&q[37 * 64..], &d[37 * 2..], &src[64..]);
        }
    }

    #[test]
    fn a_k8v4_cache_keeps_keys_in_8_bits_and_values_in_4() {
        let shape = KvShape {
            n_layers: 3,
            n_kv_heads: 2,
            head_dim: 64,
            format: KvFormat::K8V4,
        };
        let mut c = KvCache::new(shape);
        c.grow(HOST_BLOCK_LEN + 40);
        // A byte per key, a nibble per value, 2 bytes of scale per 32 of either.
        assert_eq!(c.bytes(), 2 * shape.block_elems(HOST_BLOCK_LEN) * 13 / 16);
        let row = |layer: usize, sign: f32| -> Vec<f32> {
            (0..128)
                .map(|i| sign * ((i + 3 * layer) as f32 * 0.3).cos() * (1 + i % 4) as f32)
                .collect()
        };
        let pos = HOST_BLOCK_LEN + 37;
        for layer in 0..3 {
            c.write(layer, pos, &row(layer, 1.0), &row(layer, -1.0));
        }
        for layer in 0..3 {
            for head in 0..2 {
                let want = |sign: f32| row(layer, sign)[head * 64..][..64].to_vec();
                let second = |is_v| c.rows(layer, head, is_v, pos + 1).nth(1).unwrap();
                let KvRows::Q8(q, d) = second(false) else {
                    panic!("8-bit keys")
                };
                assert_q8_row(&q[37 * 64..], &d[37 * 2..], &want(1.0));
                let KvRows::Q4(q, d) = second(true) else {
                    panic!("4-bit values")
                };
                assert_eq!(q.len(), 38 * 32);
                let (q, d) = (&q[37 * 32..], &d[37 * 2..]);
                for (i, x) in want(-1.0).iter().enumerate() {
                    let step = d[i / 32].to_f32().abs();
                    let level = (q[i / 2] >> (4 * (i % 2)) & 15) as f32 - 8.0;
                    let got = d[i / 32].to_f32() * level;
                    // Half a step, or one where the far value's other side stops at 7.
                    assert!(
                        (got - x).abs() <= step + 1e-6,
                        "{layer}/{head}/{i}: {got} vs {x}"
                    );
                }
            }
        }
    }
}
