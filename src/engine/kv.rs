//! The KV cache of one sequence, grown in fixed blocks of positions.
//!
//! A [`KvBlock`] holds K and V (f16) of [`BLOCK_LEN`] positions for every layer and KV head,
//! laid out so that one head's positions are contiguous. Growing the cache appends a block;
//! nothing is ever re-concatenated. The caller owns caches: it keeps one per sequence, frees it,
//! or keeps it warm and truncates it to a shared prefix.

use half::{f16, slice::HalfFloatSliceExt};

use super::config::ModelConfig;

/// Positions per block.
pub const BLOCK_LEN: usize = 32;

/// Sizes a cache needs, copied out of the model config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    pub fn of(cfg: &ModelConfig) -> Self {
        Self {
            n_layers: cfg.n_layers,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
        }
    }

    fn head_span(&self) -> usize {
        BLOCK_LEN * self.head_dim
    }

    fn block_elems(&self) -> usize {
        self.n_layers * 2 * self.n_kv_heads * self.head_span()
    }

    pub fn block_bytes(&self) -> usize {
        self.block_elems() * 2
    }
}

pub struct KvBlock {
    data: Box<[f16]>,
}

/// K and V of one sequence.
pub struct KvCache {
    shape: KvShape,
    blocks: Vec<KvBlock>,
    len: usize,
}

impl KvCache {
    pub fn new(shape: KvShape) -> Self {
        Self {
            shape,
            blocks: Vec::new(),
            len: 0,
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
        self.blocks.len() * self.shape.block_bytes()
    }

    /// Bytes this cache would hold with `positions` positions.
    pub fn bytes_for(shape: KvShape, positions: usize) -> usize {
        positions.div_ceil(BLOCK_LEN) * shape.block_bytes()
    }

    /// Makes room for `n` more positions and returns the first new one.
    pub fn grow(&mut self, n: usize) -> usize {
        let start = self.len;
        self.len += n;
        while self.blocks.len() * BLOCK_LEN < self.len {
            self.blocks.push(KvBlock {
                data: vec![f16::ZERO; self.shape.block_elems()].into_boxed_slice(),
            });
        }
        start
    }

    /// Forgets every position from `len` on and frees the blocks no longer needed.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.len = len;
            self.blocks.truncate(len.div_ceil(BLOCK_LEN));
        }
    }

    fn offset(&self, layer: usize, is_v: usize, head: usize) -> usize {
        ((layer * 2 + is_v) * self.shape.n_kv_heads + head) * self.shape.head_span()
    }

    /// Writes K and V of one position, all heads (`k`, `v`: `n_kv_heads × head_dim`).
    pub fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let hd = self.shape.head_dim;
        let (b, p) = (pos / BLOCK_LEN, pos % BLOCK_LEN);
        for h in 0..self.shape.n_kv_heads {
            for (is_v, src) in [(0, k), (1, v)] {
                let o = self.offset(layer, is_v, h) + p * hd;
                let dst = &mut self.blocks[b].data[o..o + hd];
                // F16C when the CPU has it (half detects it at run time).
                dst.convert_from_f32_slice(&src[h * hd..(h + 1) * hd]);
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
    ) -> impl Iterator<Item = &[f16]> + '_ {
        let hd = self.shape.head_dim;
        let o = self.offset(layer, is_v as usize, head);
        self.blocks
            .iter()
            .take(upto.div_ceil(BLOCK_LEN))
            .enumerate()
            .map(move |(b, blk)| {
                let n = (upto - b * BLOCK_LEN).min(BLOCK_LEN);
                &blk.data[o..o + n * hd]
            })
    }
}

impl KvCache {
    /// Appends `n` positions of made-up K and V (benchmarks: a cache "at position n" without
    /// paying for the prefill). Every byte is written, so the memory is really held.
    pub fn fill_synthetic(&mut self, n: usize) {
        let start = self.grow(n);
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
