//! Q4_0/Q4_1 weights re-laid at load time as groups of 8 rows, for AVX2.
//!
//! In GGUF order, each (weight row, activation row) pair needs its own scaled float update per
//! block; batched decode is bound by that float work. Here the blocks of 8 consecutive rows are
//! interleaved: for block `b` of group `g`, 8 f16 scales, 8 f16 offsets, then 4 vectors of 32
//! bytes whose 32-bit lane `r` holds bytes `4v..4v+4` of row `r`'s nibbles (low nibbles are
//! elements `4v..4v+4`, high ones `16+4v..`). A broadcast of 4 activation bytes against such a
//! vector gives 8 rows' partial sums at once, so the scale work is shared by 8 outputs and the
//! result lands as 8 adjacent output columns. Still 4-bit: nothing is dequantized.

use super::quant::{BlockQ8, GgmlType};

/// Bytes of one interleaved Q4 block: 8 d + 8 m (f16) + 128 bytes of nibbles.
pub const GROUP_BLOCK: usize = 16 + 16 + 128;
/// Bytes of one interleaved Q8_0 block: 8 d (f16) + 256 bytes (vector `v`, lane `r`: bytes
/// `4v..4v+4` of row `r`).
pub const GROUP_BLOCK_Q8: usize = 16 + 256;

/// Bytes per interleaved group block of `ty`.
pub fn group_block(ty: GgmlType) -> usize {
    if ty == GgmlType::Q8_0 {
        GROUP_BLOCK_Q8
    } else {
        GROUP_BLOCK
    }
}

fn interleave_q8_0(data: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let nb = cols / 32;
    let rb = nb * 34;
    let mut out = vec![0u8; rows / 8 * nb * GROUP_BLOCK_Q8];
    for g in 0..rows / 8 {
        for b in 0..nb {
            let dst = &mut out[(g * nb + b) * GROUP_BLOCK_Q8..][..GROUP_BLOCK_Q8];
            for r in 0..8 {
                let src = &data[(g * 8 + r) * rb + b * 34..][..34];
                dst[2 * r..2 * r + 2].copy_from_slice(&src[0..2]);
                for v in 0..8 {
                    dst[16 + 32 * v + 4 * r..16 + 32 * v + 4 * r + 4]
                        .copy_from_slice(&src[2 + 4 * v..2 + 4 * v + 4]);
                }
            }
        }
    }
    out
}

/// Interleaves `rows × cols` Q4_0, Q4_1 or Q8_0 weights (`rows` a multiple of 8).
pub fn interleave(ty: GgmlType, data: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let (bb, qoff) = match ty {
        GgmlType::Q4_0 => (18, 2),
        GgmlType::Q4_1 => (20, 4),
        GgmlType::Q8_0 => return interleave_q8_0(data, rows, cols),
        _ => unreachable!("only Q4_0, Q4_1 and Q8_0 are interleaved"),
    };
    let nb = cols / 32;
    let rb = nb * bb;
    let mut out = vec![0u8; rows / 8 * nb * GROUP_BLOCK];
    for g in 0..rows / 8 {
        for b in 0..nb {
            let dst = &mut out[(g * nb + b) * GROUP_BLOCK..][..GROUP_BLOCK];
            for r in 0..8 {
                let src = &data[(g * 8 + r) * rb + b * bb..][..bb];
                dst[2 * r..2 * r + 2].copy_from_slice(&src[0..2]);
                let m = if ty == GgmlType::Q4_0 {
                    let d = half::f16::from_le_bytes([src[0], src[1]]).to_f32();
                    half::f16::from_f32(-8.0 * d).to_le_bytes()
                } else {
                    [src[2], src[3]]
                };
                dst[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&m);
                for v in 0..4 {
                    let q = &src[qoff + 4 * v..qoff + 4 * v + 4];
                    dst[32 + 32 * v + 4 * r..32 + 32 * v + 4 * r + 4].copy_from_slice(q);
                }
            }
        }
    }
    out
}

/// `out[a][0..8] = Σ` over the 8 rows of group data `w` (all blocks) against activation rows
/// `rows[a]`. Each activation row's arithmetic is independent of how many are passed.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` must hold `rows[a].len()` interleaved blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_group(w: &[u8], rows: &[&[BlockQ8]], out: &mut [[f32; 8]]) {
    use std::arch::x86_64::*;
    let nb = rows[0].len();
    debug_assert!(w.len() >= nb * GROUP_BLOCK);
    let mask = _mm256_set1_epi8(0xF);
    let ones = _mm256_set1_epi16(1);
    for (a, row) in rows.iter().enumerate() {
        let mut acc = _mm256_setzero_ps();
        let mut macc = _mm256_setzero_ps();
        let mut p = w.as_ptr();
        for x in row.iter() {
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            let m = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i));
            let xq = x.qs.as_ptr() as *const i32;
            let mut sum = _mm256_setzero_si256();
            for v in 0..4 {
                let raw = _mm256_loadu_si256(p.add(32 + 32 * v) as *const __m256i);
                let lo = _mm256_and_si256(raw, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                let xl = _mm256_set1_epi32(xq.add(v).read_unaligned());
                let xh = _mm256_set1_epi32(xq.add(4 + v).read_unaligned());
                // Each i16 lane is at most 2·15·127; eight of them stay below 2^15.
                sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(lo, xl));
                sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(hi, xh));
            }
            let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum, ones));
            acc = _mm256_fmadd_ps(s, _mm256_mul_ps(d, _mm256_set1_ps(x.d)), acc);
            macc = _mm256_fmadd_ps(m, _mm256_set1_ps(x.s), macc);
            p = p.add(GROUP_BLOCK);
        }
        _mm256_storeu_ps(out[a].as_mut_ptr(), _mm256_add_ps(acc, macc));
    }
}

/// The Q8_0 twin of [`dot_group`]: signed weights, so products go through `sign` and are widened
/// to 32 bits at every step (two of them would overflow 16 bits).
///
/// # Safety
/// As for [`dot_group`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_group_q8_0(w: &[u8], rows: &[&[BlockQ8]], out: &mut [[f32; 8]]) {
    use std::arch::x86_64::*;
    let nb = rows[0].len();
    debug_assert!(w.len() >= nb * GROUP_BLOCK_Q8);
    let ones = _mm256_set1_epi16(1);
    for (a, row) in rows.iter().enumerate() {
        let mut acc = _mm256_setzero_ps();
        let mut p = w.as_ptr();
        for x in row.iter() {
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            let xq = x.qs.as_ptr() as *const i32;
            let mut sum = _mm256_setzero_si256();
            for v in 0..8 {
                let q = _mm256_loadu_si256(p.add(16 + 32 * v) as *const __m256i);
                let xb = _mm256_set1_epi32(xq.add(v).read_unaligned());
                let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xb, q));
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p16, ones));
            }
            acc = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(sum),
                _mm256_mul_ps(d, _mm256_set1_ps(x.d)),
                acc,
            );
            p = p.add(GROUP_BLOCK_Q8);
        }
        _mm256_storeu_ps(out[a].as_mut_ptr(), acc);
    }
}
