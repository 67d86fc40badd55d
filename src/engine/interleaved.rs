//! Q4_0/Q4_1/Q8_0 weights re-laid at load time as groups of 8 rows, with their kernels for
//! AVX2, AVX-VNNI and AVX512-VNNI (one body; [`kernel`] picks for the CPU).
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

/// Where row `r`'s quants of one block sit in an interleaved group block of `ty`: in
/// `vectors` runs of 4 bytes at `first + 32·v + 4·r` (its scale is at `2·r`, a Q4 offset at
/// `16 + 2·r`).
fn quant_runs(ty: GgmlType) -> (usize, usize) {
    if ty == GgmlType::Q8_0 {
        (16, 8)
    } else {
        (32, 4)
    }
}

fn interleave_q8_0(data: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let (first, vectors) = quant_runs(GgmlType::Q8_0);
    let nb = cols / 32;
    let rb = nb * 34;
    let mut out = vec![0u8; rows / 8 * nb * GROUP_BLOCK_Q8];
    for g in 0..rows / 8 {
        for b in 0..nb {
            let dst = &mut out[(g * nb + b) * GROUP_BLOCK_Q8..][..GROUP_BLOCK_Q8];
            for r in 0..8 {
                let src = &data[(g * 8 + r) * rb + b * 34..][..34];
                dst[2 * r..2 * r + 2].copy_from_slice(&src[0..2]);
                for v in 0..vectors {
                    let at = first + 32 * v + 4 * r;
                    dst[at..at + 4].copy_from_slice(&src[2 + 4 * v..2 + 4 * v + 4]);
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
    let (first, vectors) = quant_runs(ty);
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
                for v in 0..vectors {
                    let at = first + 32 * v + 4 * r;
                    dst[at..at + 4].copy_from_slice(&src[qoff + 4 * v..qoff + 4 * v + 4]);
                }
            }
        }
    }
    out
}

/// Block `b` of row `r` (of `cols` values) back in its GGUF bytes, from `packed` (what
/// [`interleave`] gave for `ty`), into the start of `out`; returns how many bytes that is. An
/// embedding look-up reads the copy this way, so the mapped file stays given back.
pub fn block_of(
    ty: GgmlType,
    packed: &[u8],
    (cols, r, b): (usize, usize, usize),
    out: &mut [u8; 34],
) -> usize {
    let nb = cols / 32;
    let span = group_block(ty);
    let lane = r % 8;
    let blk = &packed[((r / 8) * nb + b) * span..][..span];
    out[..2].copy_from_slice(&blk[2 * lane..2 * lane + 2]);
    let mut n = 2;
    if ty == GgmlType::Q4_1 {
        out[2..4].copy_from_slice(&blk[16 + 2 * lane..16 + 2 * lane + 2]);
        n = 4;
    }
    let (first, vectors) = quant_runs(ty);
    for v in 0..vectors {
        let at = first + 32 * v + 4 * lane;
        out[n..n + 4].copy_from_slice(&blk[at..at + 4]);
        n += 4;
    }
    n
}

/// A kernel over one group: `out[a][0..8] = Σ` over the 8 rows of group data `w` (all blocks)
/// against activation rows `rows[a]`. Each activation row's arithmetic is independent of how
/// many are passed.
///
/// # Safety
/// The CPU must support the features the kernel was chosen for (see [`kernel`]); all rows must
/// be as long, `w` must hold that many interleaved blocks of the kernel's type, and `out` must
/// be as long as `rows`.
pub type GroupKernel = unsafe fn(w: &[u8], rows: &[&[BlockQ8]], out: &mut [[f32; 8]]);

/// The fastest kernel this CPU runs for interleaved `ty` weights (`None` without AVX2).
/// With VNNI (AVX-VNNI or AVX512-VNNI) one `vpdpbusd` does the work of a `vpmaddubsw`, a
/// `vpmaddwd` and an add; the sums are the same integers either way.
#[cfg(target_arch = "x86_64")]
pub fn kernel(ty: GgmlType) -> Option<GroupKernel> {
    use std::arch::is_x86_feature_detected as has;
    // Q4 and Q8_0 kernels of the best instruction set, chosen once.
    static PICKED: std::sync::OnceLock<Option<[GroupKernel; 2]>> = std::sync::OnceLock::new();
    let picked = PICKED.get_or_init(|| {
        if !super::simd::has_avx2() {
            None
        } else if has!("avxvnni") {
            Some([vnni::dot_group, vnni::dot_group_q8_0])
        } else if has!("avx512vnni") && has!("avx512vl") {
            Some([vnni512::dot_group, vnni512::dot_group_q8_0])
        } else {
            Some([avx2::dot_group, avx2::dot_group_q8_0])
        }
    });
    picked.map(|k| k[usize::from(ty == GgmlType::Q8_0)])
}

/// The kernels of each instruction set, from one body. `$acc` adds the dot products of 4
/// unsigned by 4 signed bytes to 32-bit lanes; `$acc16`/`$wide` do the same for Q4 nibbles,
/// whose sums may gather in 16 bits first and widen once per block.
macro_rules! group_kernels {
    // VNNI: `$dpbusd` accumulates straight into 32 bits, for Q4 and Q8_0 alike.
    ($module:ident, $features:literal, vnni = $dpbusd:ident) => {
        group_kernels!(
            $module,
            $features,
            acc(a, u, s) = $dpbusd(a, u, s),
            acc16(a, u, s) = $dpbusd(a, u, s),
            wide(w) = w
        );
    };
    (
        $module:ident, $features:literal,
        acc($a:ident, $u:ident, $s:ident) = $acc:expr,
        acc16($a16:ident, $u16:ident, $s16:ident) = $acc16:expr,
        wide($w:ident) = $wide:expr
    ) => {
        #[cfg(target_arch = "x86_64")]
        pub mod $module {
            use std::arch::x86_64::*;

            use super::{BlockQ8, GROUP_BLOCK, GROUP_BLOCK_Q8};

            /// Q4_0/Q4_1: see [`super::GroupKernel`]. Up to four activation rows share each
            /// unpacking of the nibbles; every row gets the same arithmetic however many share.
            ///
            /// # Safety
            /// As for [`super::GroupKernel`].
            #[target_feature(enable = $features)]
            pub unsafe fn dot_group(w: &[u8], rows: &[&[BlockQ8]], out: &mut [[f32; 8]]) {
                let nb = rows[0].len();
                debug_assert!(w.len() >= nb * GROUP_BLOCK && out.len() >= rows.len());
                debug_assert!(rows.iter().all(|r| r.len() == nb));
                for (rows, out) in rows.chunks(4).zip(out.chunks_mut(4)) {
                    match rows.len() {
                        4 => q4_rows::<4>(w, rows, out),
                        3 => q4_rows::<3>(w, rows, out),
                        2 => q4_rows::<2>(w, rows, out),
                        _ => q4_rows::<1>(w, rows, out),
                    }
                }
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q4_rows<const R: usize>(w: &[u8], rows: &[&[BlockQ8]], out: &mut [[f32; 8]]) {
                let nb = rows[0].len();
                let mask = _mm256_set1_epi8(0xF);
                let mut acc = [_mm256_setzero_ps(); R];
                let mut macc = [_mm256_setzero_ps(); R];
                let mut p = w.as_ptr();
                for b in 0..nb {
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                    let m = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i));
                    let mut sum = [_mm256_setzero_si256(); R];
                    for v in 0..4 {
                        let raw = _mm256_loadu_si256(p.add(32 + 32 * v) as *const __m256i);
                        let lo = _mm256_and_si256(raw, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                        for r in 0..R {
                            let xq = rows[r].get_unchecked(b).qs.as_ptr() as *const i32;
                            let xl = _mm256_set1_epi32(xq.add(v).read_unaligned());
                            let xh = _mm256_set1_epi32(xq.add(4 + v).read_unaligned());
                            // In 16 bits each lane is at most 2·15·127; eight stay below 2^15.
                            sum[r] = {
                                let ($a16, $u16, $s16) = (sum[r], lo, xl);
                                $acc16
                            };
                            sum[r] = {
                                let ($a16, $u16, $s16) = (sum[r], hi, xh);
                                $acc16
                            };
                        }
                    }
                    for r in 0..R {
                        let x = rows[r].get_unchecked(b);
                        let s = _mm256_cvtepi32_ps({
                            let $w = sum[r];
                            $wide
                        });
                        acc[r] = _mm256_fmadd_ps(s, _mm256_mul_ps(d, _mm256_set1_ps(x.d)), acc[r]);
                        macc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(x.s), macc[r]);
                    }
                    p = p.add(GROUP_BLOCK);
                }
                for r in 0..R {
                    _mm256_storeu_ps(out[r].as_mut_ptr(), _mm256_add_ps(acc[r], macc[r]));
                }
            }

            /// Q8_0: signed weights, so products go through `sign` (|w| by ±x).
            ///
            /// # Safety
            /// As for [`super::GroupKernel`].
            #[target_feature(enable = $features)]
            pub unsafe fn dot_group_q8_0(w: &[u8], rows: &[&[BlockQ8]], out: &mut [[f32; 8]]) {
                let nb = rows[0].len();
                debug_assert!(w.len() >= nb * GROUP_BLOCK_Q8 && out.len() >= rows.len());
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
                            sum = {
                                let ($a, $u, $s) =
                                    (sum, _mm256_sign_epi8(q, q), _mm256_sign_epi8(xb, q));
                                $acc
                            };
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
        }
    };
}

// Two products of unsigned by signed bytes fit 16 bits (`vpmaddubsw`); one `vpmaddwd` by 1
// widens. Q8_0's products could overflow 16 bits in sums, so it widens every step.
group_kernels!(
    avx2,
    "avx2,fma,f16c",
    acc(a, u, s) = _mm256_add_epi32(
        a,
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    ),
    acc16(a, u, s) = _mm256_add_epi16(a, _mm256_maddubs_epi16(u, s)),
    wide(w) = _mm256_madd_epi16(w, _mm256_set1_epi16(1))
);
group_kernels!(
    vnni,
    "avx2,fma,f16c,avxvnni",
    vnni = _mm256_dpbusd_avx_epi32
);
group_kernels!(
    vnni512,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    vnni = _mm256_dpbusd_epi32
);

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use std::arch::is_x86_feature_detected as has;

    use super::*;
    use crate::engine::quant::quantize_row_q8;

    /// Raw GGUF blocks of `ty` for `rows × cols`: scales near 0.01, every byte pattern in the
    /// quants (Q8_0's -128 included).
    fn raw(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
        let (_, bb) = ty.block();
        let mut out = Vec::new();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for blk in 0..rows * cols / 32 {
            let mut b = vec![0u8; bb];
            for v in b.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *v = (state >> 24) as u8;
            }
            let d = half::f16::from_f32(0.01 + (blk % 7) as f32 * 0.001).to_le_bytes();
            b[..2].copy_from_slice(&d);
            if ty == GgmlType::Q4_1 {
                b[2..4].copy_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
            }
            out.extend(b);
        }
        out
    }

    /// Every output's bits for activation rows `acts`, all in one call or one row per call.
    fn run(
        k: GroupKernel,
        il: &[u8],
        span: usize,
        acts: &[&[BlockQ8]],
        together: bool,
    ) -> Vec<u32> {
        let (m, groups) = (acts.len(), il.len() / span);
        let mut all = vec![0u32; m * groups * 8];
        for g in 0..groups {
            let mut out = vec![[0f32; 8]; m];
            let w = &il[g * span..(g + 1) * span];
            // SAFETY: the callers run each kernel only where its features were detected.
            unsafe {
                if together {
                    k(w, acts, &mut out);
                } else {
                    for a in 0..m {
                        k(w, &acts[a..a + 1], &mut out[a..a + 1]);
                    }
                }
            }
            for (a, o) in out.iter().enumerate() {
                for (r, v) in o.iter().enumerate() {
                    all[(a * groups + g) * 8 + r] = v.to_bits();
                }
            }
        }
        all
    }

    #[test]
    fn each_row_comes_back_from_the_interleaved_copy() {
        let (rows, cols) = (24, 96);
        let mut blk = [0u8; 34];
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let data = raw(ty, rows, cols);
            let il = interleave(ty, &data, rows, cols);
            let rb = data.len() / rows;
            for r in 0..rows {
                let mut row = Vec::new();
                for b in 0..cols / 32 {
                    let n = block_of(ty, &il, (cols, r, b), &mut blk);
                    row.extend_from_slice(&blk[..n]);
                }
                assert_eq!(row, &data[r * rb..(r + 1) * rb], "{ty:?} row {r}");
            }
        }
    }

    #[test]
    fn vnni_kernels_give_the_avx2_kernels_bits() {
        if !crate::engine::simd::has_avx2() {
            return;
        }
        let (rows, cols) = (16, 256);
        let x: Vec<f32> = (0..8 * cols)
            .map(|i| ((i as f32) * 0.37).sin() * 3.0)
            .collect();
        let mut q = vec![BlockQ8::default(); 8 * cols / 32];
        quantize_row_q8(&x, &mut q);
        let acts: Vec<&[BlockQ8]> = q.chunks(cols / 32).collect();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let il = interleave(ty, &raw(ty, rows, cols), rows, cols);
            let span = cols / 32 * group_block(ty);
            let q8 = ty == GgmlType::Q8_0;
            let pick = |a: GroupKernel, b: GroupKernel| if q8 { b } else { a };
            // Every count of rows a call may get (1 to 8: each way of sharing the unpacking).
            for m in 1..=8 {
                let acts = &acts[..m];
                let plain = pick(avx2::dot_group, avx2::dot_group_q8_0);
                let base = run(plain, &il, span, acts, true);
                assert!(base.iter().all(|&b| f32::from_bits(b) != 0.0));
                let alone = run(plain, &il, span, acts, false);
                assert_eq!(base, alone, "{m} rows against each alone, {ty:?}");
                if has!("avxvnni") {
                    let k = pick(vnni::dot_group, vnni::dot_group_q8_0);
                    assert_eq!(run(k, &il, span, acts, true), base, "AVX-VNNI, {m}, {ty:?}");
                }
                if has!("avx512vnni") && has!("avx512vl") {
                    let k = pick(vnni512::dot_group, vnni512::dot_group_q8_0);
                    assert_eq!(
                        run(k, &il, span, acts, true),
                        base,
                        "AVX512-VNNI, {m}, {ty:?}"
                    );
                }
            }
        }
    }
}
