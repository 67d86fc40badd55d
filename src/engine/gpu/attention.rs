//! Attention on the device: which cache rows each attention reads, and the attention shapes:
//! all decode rows through their block tables ([`PagedDecode`]), or gathered in groups of
//! similar lengths; one prompt chunk, causal.

use candle_core::{DType, Device, Tensor};

use super::decode_attention::PagedDecode;
use crate::engine::kv::BLOCK_LEN;
use crate::engine::model::SeqInput;

/// Splits decode rows, sorted by cache length, into attention groups (another group costs its
/// dozen kernel launches per layer, `group_cost` in padded key rows): each group is padded to
/// its longest row, and a group costs `group_cost` padded rows of its own. The split minimises
/// the total (a small dynamic program over the sorted lengths).
fn decode_groups(lens: &[usize], group_cost: usize) -> Vec<std::ops::Range<usize>> {
    let n = lens.len();
    // best[j]: the least cost of rows 0..j, and where its last group starts.
    let mut best = vec![(0usize, 0usize); n + 1];
    for j in 1..=n {
        best[j] = (0..j)
            .map(|i| (best[i].0 + group_cost + (j - i) * lens[j - 1], i))
            .min()
            .expect("at least one split");
    }
    let mut groups = Vec::new();
    let mut j = n;
    while j > 0 {
        let i = best[j].1;
        groups.push(i..j);
        j = i;
    }
    groups.reverse();
    groups
}

/// A masked-out attention score: far below any real one, and finite (so `0 × MASKED` is 0).
const MASKED: f64 = -1e30;

/// The slab row of `head`'s K (or V) at `pos` in a cache made of blocks `ids`.
pub(super) fn slab_row(ids: &[u32], n_kv: usize, head: usize, pos: usize) -> u32 {
    ((ids[pos / BLOCK_LEN] as usize * n_kv + head) * BLOCK_LEN + pos % BLOCK_LEN) as u32
}

/// One attention over rows of the packed batch, starting at row `row0`.
pub(super) struct Attention {
    row0: usize,
    kind: Kind,
}

enum Kind {
    /// `b` decode rows, each over its own cache through its block table ([`PagedDecode`]).
    Paged { b: usize, table: Tensor },
    /// Rows gathered into copies of their caches; candle's matmuls.
    Gathered(Gathered),
}

/// `b` decode rows gathered into copies padded to the longest (`len`) and masked, or one prompt
/// chunk of `q_rows` rows (`b` = 1), causal over its cache.
struct Gathered {
    b: usize,
    q_rows: usize,
    len: usize,
    /// Slab rows, `b × n_kv × len`.
    gather: Tensor,
    /// 0 or [`MASKED`], `b × 1 × 1 × len` for decode rows, `q_rows × len` for a prompt chunk.
    mask: Tensor,
}

impl Attention {
    /// This attention's output rows (f32), from the step's queries (f32) and a layer's slabs.
    /// Scores, softmax and sums are f32 on every path, so a decode row and the same position
    /// in a prompt chunk agree.
    pub(super) fn run(
        &self,
        q: &Tensor,
        slab_k: &Tensor,
        slab_v: &Tensor,
        (nkv, group, hd): (usize, usize, usize),
    ) -> candle_core::Result<Tensor> {
        let scale = 1.0 / (hd as f64).sqrt();
        match &self.kind {
            Kind::Paged { b, table } => q.narrow(0, self.row0, *b)?.apply_op3_no_bwd(
                slab_k,
                slab_v,
                &PagedDecode {
                    table,
                    n_kv: nkv,
                    group,
                    head_dim: hd,
                    scale: scale as f32,
                },
            ),
            Kind::Gathered(g) => {
                let keys = slab_k.index_select(&g.gather, 0)?.to_dtype(DType::F32)?;
                let values = slab_v.index_select(&g.gather, 0)?.to_dtype(DType::F32)?;
                let q = (q.narrow(0, self.row0, g.b * g.q_rows)? * scale)?;
                if g.q_rows == 1 {
                    decode_attention(g, &q, &keys, &values, (nkv, group, hd))
                } else {
                    chunk_attention(g, &q, &keys, &values, (nkv, group, hd))
                }
            }
        }
    }
}

/// How a step's decode rows are attended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DecodeAttention {
    /// All of them in one [`PagedDecode`] (the default where the kernel serves the heads).
    Paged,
    /// Gathered in groups ([`decode_groups`], `group_cost`); `SMOLCHAT_DECODE_ATTENTION=gathered`.
    Gathered { group_cost: usize },
}

/// The step's attentions and their index tables, built once and used by every layer.
pub(super) fn plan(
    dev: &Device,
    decode_attention: DecodeAttention,
    batch: &[SeqInput],
    order: &[usize],
    spans: &[(usize, usize, usize)],
    (nkv, slab_blocks): (usize, usize),
) -> candle_core::Result<Vec<Attention>> {
    let positions_f32 =
        |range: std::ops::Range<usize>| -> Vec<f32> { range.map(|p| p as f32).collect() };
    // mask[q, p] = MASKED where key position p is after query position q.
    let mask = |q_pos: Vec<f32>, len: usize| -> candle_core::Result<Tensor> {
        let n = q_pos.len();
        let q_pos = Tensor::from_vec(q_pos, (n, 1), dev)?;
        let k_pos = Tensor::from_vec(positions_f32(0..len), (1, len), dev)?;
        k_pos
            .broadcast_gt(&q_pos)?
            .to_dtype(DType::F32)?
            .affine(MASKED, 0.0)
    };
    let mut out = Vec::new();
    let decode = order
        .iter()
        .take_while(|&&i| batch[i].tokens.len() == 1)
        .count();
    // Decode rows are sorted by length: groups of similar lengths pad less.
    let lens: Vec<usize> = spans[..decode].iter().map(|&(_, _, st)| st + 1).collect();
    match decode_attention {
        DecodeAttention::Paged if decode > 0 => {
            let rows: Vec<(usize, &[u32])> = order[..decode]
                .iter()
                .zip(&lens)
                .map(|(&i, &len)| (len, batch[i].cache.block_ids()))
                .collect();
            out.push(Attention {
                row0: 0,
                kind: Kind::Paged {
                    b: decode,
                    table: PagedDecode::table(&rows, slab_blocks, dev)?,
                },
            });
        }
        DecodeAttention::Paged => {}
        DecodeAttention::Gathered { group_cost } => {
            for g in decode_groups(&lens, group_cost) {
                let (b, len) = (g.len(), lens[g.end - 1]);
                let mut gather = Vec::with_capacity(b * nkv * len);
                for (&i, &(_, _, start)) in order[g.clone()].iter().zip(&spans[g.clone()]) {
                    let ids = batch[i].cache.block_ids();
                    for kh in 0..nkv {
                        // Past the sequence's end: any valid row, masked out below.
                        gather.extend((0..len).map(|p| slab_row(ids, nkv, kh, p.min(start))));
                    }
                }
                let q_pos = lens[g.clone()].iter().map(|&l| (l - 1) as f32).collect();
                out.push(Attention {
                    row0: g.start,
                    kind: Kind::Gathered(Gathered {
                        b,
                        q_rows: 1,
                        len,
                        gather: Tensor::from_vec(gather, b * nkv * len, dev)?,
                        mask: mask(q_pos, len)?.reshape((b, 1, 1, len))?,
                    }),
                });
            }
        }
    }
    for (&i, &(row0, n, start)) in order.iter().zip(spans).skip(decode) {
        let ids = batch[i].cache.block_ids();
        let len = start + n;
        let gather: Vec<u32> = (0..nkv)
            .flat_map(|kh| (0..len).map(move |p| slab_row(ids, nkv, kh, p)))
            .collect();
        out.push(Attention {
            row0,
            kind: Kind::Gathered(Gathered {
                b: 1,
                q_rows: n,
                len,
                gather: Tensor::from_vec(gather, nkv * len, dev)?,
                mask: mask(positions_f32(start..start + n), len)?,
            }),
        });
    }
    Ok(out)
}

/// Softmax of `scores` plus `mask`.
fn masked_softmax(scores: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::softmax_last_dim(&scores.broadcast_add(mask)?)
}

/// All decode rows at once: `b` sequences, one query row each, keys padded to the longest.
fn decode_attention(
    a: &Gathered,
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    (nkv, group, hd): (usize, usize, usize),
) -> candle_core::Result<Tensor> {
    let q = q.reshape((a.b, nkv, group, hd))?;
    let keys = keys.reshape((a.b, nkv, a.len, hd))?;
    let values = values.reshape((a.b, nkv, a.len, hd))?;
    let p = masked_softmax(&q.matmul(&keys.t()?)?, &a.mask)?; // b × nkv × group × len
    p.matmul(&values)?.reshape((a.b, nkv * group * hd))
}

/// One prompt chunk of `q_rows` rows, causal over its cache.
fn chunk_attention(
    a: &Gathered,
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    (nkv, group, hd): (usize, usize, usize),
) -> candle_core::Result<Tensor> {
    let n = a.q_rows;
    // Query rows grouped by KV head, then by query head in the group, then by position.
    let q = q
        .reshape((n, nkv, group, hd))?
        .permute((1, 2, 0, 3))?
        .contiguous()?
        .reshape((nkv, group * n, hd))?;
    let keys = keys.reshape((nkv, a.len, hd))?;
    let values = values.reshape((nkv, a.len, hd))?;
    let scores = q.matmul(&keys.t()?)?.reshape((nkv, group, n, a.len))?;
    let p = masked_softmax(&scores, &a.mask)?.reshape((nkv, group * n, a.len))?;
    p.matmul(&values)?
        .reshape((nkv, group, n, hd))?
        .permute((2, 0, 1, 3))?
        .contiguous()?
        .reshape((n, nkv * group * hd))
}

#[cfg(test)]
mod tests {
    use super::decode_groups;

    #[test]
    fn decode_rows_are_grouped_only_where_padding_costs_more_than_a_group() {
        // Similar lengths: one group.
        assert_eq!(decode_groups(&[100, 120, 130, 150], 1000), vec![0..4]);
        // 63 short rows and one long one: padding all to 4,000 wastes ~240,000 rows.
        let mut lens = vec![200; 63];
        lens.push(4000);
        assert_eq!(decode_groups(&lens, 16384), vec![0..63, 63..64]);
        // Free groups: one per distinct length.
        assert_eq!(
            decode_groups(&[5, 7, 9, 30], 0),
            vec![0..1, 1..2, 2..3, 3..4]
        );
        assert!(decode_groups(&[], 10).is_empty());
    }
}
