//! Q4_0/Q4_1/Q4_K/Q5_0/Q5_1/Q5_K/Q6_K/Q8_0 weights re-laid at load time as groups of 8 rows,
//! with their kernels for AVX2, AVX-VNNI and AVX512-VNNI (one body; [`kernel`] picks for the
//! CPU).
//!
//! In GGUF order, each (weight row, activation row) pair needs its own scaled float update per
//! block; batched decode is bound by that float work. Here the blocks of 8 consecutive rows are
//! interleaved: for block `b` of group `g`, 8 f16 scales, 8 f16 offsets, then 4 vectors of 32
//! bytes whose 32-bit lane `r` holds bytes `4v..4v+4` of row `r`'s nibbles (low nibbles are
//! elements `4v..4v+4`, high ones `16+4v..`). A broadcast of 4 activation bytes against such a
//! vector gives 8 rows' partial sums at once, so the scale work is shared by 8 outputs and the
//! result lands as 8 adjacent output columns. Still 4-bit: nothing is dequantized.
//!
//! Every group block spans 32 columns, one activation block. Q4_K's sub-blocks of 32 are Q4_1
//! blocks once their 6-bit scale and min are multiplied out (`d·sc`, `-dmin·m`): they take the
//! Q4 layout and kernel, the products rounded to f16 (within 2^-11 of each, far below what
//! 8-bit activations cost). Q6_K's values (`q - 32`, 6 bits) are kept as bytes, like Q8_0's,
//! with one f16 scale (`d·sc`, rounded alike) for each half of 16. The 5-bit types take Q4's
//! layout for their low 4 bits (with a scale and an offset: Q5_0's is `-16·d`, Q5_K's
//! sub-blocks multiplied out as Q4_K's) and one more vector of their fifth bits, placed so
//! that two shifts and a mask put each over its nibble (6 bits a value against the file's
//! 5.5).

use super::quant::{f16_at, unpack_32, unpack_k_sub, unpack_q6k_16, BlockQ8, GgmlType};
use half::f16;

/// Bytes of one interleaved Q4 block: 8 d + 8 m (f16) + 128 bytes of nibbles.
pub const GROUP_BLOCK: usize = 16 + 16 + 128;
/// Bytes of one interleaved Q8_0 block: 8 d (f16) + 256 bytes (vector `v`, lane `r`: bytes
/// `4v..4v+4` of row `r`).
pub const GROUP_BLOCK_Q8: usize = 16 + 256;
/// Bytes of one interleaved Q6_K block: 8 scales of the first 16 values, 8 of the last (f16),
/// then 256 bytes of `q - 32` laid out as Q8_0's.
pub const GROUP_BLOCK_Q6: usize = 32 + 256;
/// Bytes of one interleaved Q5 block: the Q4 block of the low 4 bits, then one vector of the
/// fifth bits: byte `4·r + k` holds, at bit `2·v + h`, that of row `r`'s element
/// `16·h + 4·v + k`, the nibble at byte `k` of lane `r` in vector `v` (low `h = 0` or high).
pub const GROUP_BLOCK_Q5: usize = GROUP_BLOCK + 32;

/// Whether `ty` is one of the 5-bit types (unsigned bytes with a scale and an offset).
fn five_bit(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5K)
}

/// Bytes per interleaved group block of `ty`.
pub fn group_block(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q8_0 => GROUP_BLOCK_Q8,
        GgmlType::Q6K => GROUP_BLOCK_Q6,
        ty if five_bit(ty) => GROUP_BLOCK_Q5,
        _ => GROUP_BLOCK,
    }
}

/// Whether [`interleave`] takes `ty`.
pub fn interleaves(ty: GgmlType) -> bool {
    five_bit(ty)
        || matches!(
            ty,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K | GgmlType::Q6K | GgmlType::Q8_0
        )
}

/// Where row `r`'s quants of one block sit in an interleaved group block of `ty`: in
/// `vectors` runs of 4 bytes at `first + 32·v + 4·r` (its scale is at `2·r`, a Q4 offset at
/// `16 + 2·r`, a Q6 second scale at `16 + 2·r`, a Q5 offset at `16 + 2·r`).
fn quant_runs(ty: GgmlType) -> (usize, usize) {
    match ty {
        GgmlType::Q8_0 => (16, 8),
        GgmlType::Q6K => (32, 8),
        ty if five_bit(ty) => (32, 5),
        _ => (32, 4),
    }
}

/// One block of a row as the group layout holds it: two f16 words (Q4 and Q5: scale and
/// offset; Q8_0: scale, unused; Q6: the two halves' scales) and its quant bytes (Q4: 16 bytes
/// of nibbles, element `j` low and `j + 16` high; Q8_0 and Q6: 32 signed bytes; Q5: Q4's 16
/// bytes, then its 4 bytes of fifth bits, see [`GROUP_BLOCK_Q5`]).
type Block = ([u8; 2], [u8; 2], [u8; 32]);

/// Block `b` (of 32 values) of GGUF row `row` of `ty`, as [`Block`].
fn block(ty: GgmlType, row: &[u8], b: usize) -> Block {
    let h = |v: f32| f16::from_f32(v).to_le_bytes();
    let mut qs = [0u8; 32];
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let bb = ty.block().1;
            let src = &row[b * bb..(b + 1) * bb];
            let mut q = [0i8; 32];
            // The `-8·d` and `-16·d` offsets are exact in f16 (a power of two times an f16).
            let (_, m) = unpack_32(ty, src, &mut q);
            ([src[0], src[1]], h(m), pack_nibbles(&q, five_bit(ty)))
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let bb = ty.block().1;
            let mut q = [0i8; 32];
            let (d, m) = unpack_k_sub(ty, &row[(b / 8) * bb..][..bb], b % 8, &mut q);
            (h(d), h(m), pack_nibbles(&q, five_bit(ty)))
        }
        GgmlType::Q6K => {
            let sup = &row[(b / 8) * 210..][..210];
            let d = f16_at(sup, 208);
            let mut scales = [[0u8; 2]; 2];
            for (half, scale) in scales.iter_mut().enumerate() {
                let mut q = [0i8; 16];
                let sc = unpack_q6k_16(sup, 2 * (b % 8) + half, &mut q);
                *scale = h(d * sc as f32);
                for (o, v) in qs[16 * half..16 * half + 16].iter_mut().zip(q) {
                    *o = v as u8;
                }
            }
            (scales[0], scales[1], qs)
        }
        GgmlType::Q8_0 => {
            let src = &row[b * 34..(b + 1) * 34];
            qs.copy_from_slice(&src[2..34]);
            ([src[0], src[1]], [0, 0], qs)
        }
        _ => unreachable!("{ty:?} is not interleaved"),
    }
}

/// 32 values of 4 bits (or, `five`, 5 bits) as a Q4 (Q5) [`Block`]'s bytes: the nibbles,
/// element `j` low and `j + 16` high, then for Q5 the fifth bits.
fn pack_nibbles(q: &[i8; 32], five: bool) -> [u8; 32] {
    let mut qs = [0u8; 32];
    for j in 0..16 {
        qs[j] = (q[j] as u8 & 0xF) | (q[j + 16] as u8 & 0xF) << 4;
    }
    for k in (0..4).filter(|_| five) {
        for v in 0..4 {
            for h in 0..2 {
                qs[16 + k] |= ((q[16 * h + 4 * v + k] as u8 >> 4) & 1) << (2 * v + h);
            }
        }
    }
    qs
}

/// Element `j` of a Q5 [`Block`]'s bytes (the inverse of [`pack_nibbles`] for Q5).
fn unpack_5_bits(qs: &[u8; 32], j: usize) -> u8 {
    let (h, v, k) = (j / 16, (j % 16) / 4, j % 4);
    let low = (qs[j % 16] >> (4 * h)) & 0xF;
    low | ((qs[16 + k] >> (2 * v + h)) & 1) << 4
}

/// How far each value of block `b` of GGUF row `row` may move in the copy: nothing, except
/// where a K-quant's multiplied-out scales are rounded to f16 (2^-11 of each part of a value,
/// or 2^-25 where the product is subnormal), plus the f32 roundings of computing it.
pub fn copy_error_bound(ty: GgmlType, row: &[u8], b: usize) -> [f32; 32] {
    let f16_err = |v: f32| v.abs() * (1.0 / 2048.0) + 1.0 / (1 << 25) as f32;
    let mut bound = [0f32; 32];
    match ty {
        GgmlType::Q4K | GgmlType::Q5K => {
            let bb = ty.block().1;
            let mut q = [0i8; 32];
            let (d, m) = unpack_k_sub(ty, &row[(b / 8) * bb..][..bb], b % 8, &mut q);
            for (o, q) in bound.iter_mut().zip(q) {
                let parts = d.abs() * q as f32 + m.abs();
                *o = f16_err(d) * q as f32 + f16_err(m) + 2.0 * parts * f32::EPSILON;
            }
        }
        GgmlType::Q6K => {
            let sup = &row[(b / 8) * 210..][..210];
            for (half, out) in bound.chunks_mut(16).enumerate() {
                let mut q = [0i8; 16];
                let d = f16_at(sup, 208) * unpack_q6k_16(sup, 2 * (b % 8) + half, &mut q) as f32;
                for (o, q) in out.iter_mut().zip(q) {
                    *o = (f16_err(d) + d.abs() * f32::EPSILON) * (q as f32).abs();
                }
            }
        }
        _ => {}
    }
    bound
}

/// Interleaves `rows × cols` weights of a type that [`interleaves`] takes (`rows` a multiple
/// of 8).
pub fn interleave(ty: GgmlType, data: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let (first, vectors) = quant_runs(ty);
    let span = group_block(ty);
    let rb = ty.row_bytes(cols);
    let nb = cols / 32;
    let mut out = vec![0u8; rows / 8 * nb * span];
    for g in 0..rows / 8 {
        for r in 0..8 {
            let row = &data[(g * 8 + r) * rb..][..rb];
            for b in 0..nb {
                let dst = &mut out[(g * nb + b) * span..][..span];
                let (s0, s1, qs) = block(ty, row, b);
                dst[2 * r..2 * r + 2].copy_from_slice(&s0);
                if ty != GgmlType::Q8_0 {
                    dst[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&s1);
                }
                for v in 0..vectors {
                    let at = first + 32 * v + 4 * r;
                    dst[at..at + 4].copy_from_slice(&qs[4 * v..4 * v + 4]);
                }
            }
        }
    }
    out
}

/// The values of block `b` (32 columns) of row `r` (of `cols`), read from `packed` (what
/// [`interleave`] gave for `ty`) into `out`. An embedding look-up reads the copy this way, so
/// the mapped file stays given back; they are the values the kernels multiply.
pub fn dequantize_block(
    ty: GgmlType,
    packed: &[u8],
    (cols, r, b): (usize, usize, usize),
    out: &mut [f32],
) {
    let span = group_block(ty);
    let lane = r % 8;
    let blk = &packed[((r / 8) * (cols / 32) + b) * span..][..span];
    let (first, vectors) = quant_runs(ty);
    let mut qs = [0u8; 32];
    for v in 0..vectors {
        let at = first + 32 * v + 4 * lane;
        qs[4 * v..4 * v + 4].copy_from_slice(&blk[at..at + 4]);
    }
    let (s0, s1) = (f16_at(blk, 2 * lane), f16_at(blk, 16 + 2 * lane));
    for (j, o) in out[..32].iter_mut().enumerate() {
        *o = match ty {
            GgmlType::Q8_0 => s0 * qs[j] as i8 as f32,
            GgmlType::Q6K => (if j < 16 { s0 } else { s1 }) * qs[j] as i8 as f32,
            ty if five_bit(ty) => s0 * unpack_5_bits(&qs, j) as f32 + s1,
            _ => s0 * ((qs[j % 16] >> (4 * (j / 16))) & 0xF) as f32 + s1,
        };
    }
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
    // Q4, Q8_0, Q6 and Q5 kernels of the best instruction set, chosen once.
    static PICKED: std::sync::OnceLock<Option<[GroupKernel; 4]>> = std::sync::OnceLock::new();
    let picked = PICKED.get_or_init(|| {
        if !super::simd::has_avx2() {
            None
        } else if has!("avxvnni") {
            Some(vnni::KERNELS)
        } else if has!("avx512vnni") && has!("avx512vl") {
            Some(vnni512::KERNELS)
        } else {
            Some(avx2::KERNELS)
        }
    });
    picked.map(|k| k[kernel_index(ty)])
}

/// Where `ty`'s kernel sits in each instruction set's `KERNELS`.
fn kernel_index(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q8_0 => 1,
        GgmlType::Q6K => 2,
        ty if five_bit(ty) => 3,
        _ => 0,
    }
}

/// Runs `$kernel::<R>` (or `$kernel::<R, $flag>`) on each run of up to four activation rows
/// (and their outputs), over weights in group blocks of `$block` bytes.
macro_rules! by_fours {
    ($kernel:ident $([$flag:literal])?, $block:expr, $w:expr, $rows:expr, $out:expr) => {
        let nb = $rows[0].len();
        debug_assert!($w.len() >= nb * $block && $out.len() >= $rows.len());
        debug_assert!($rows.iter().all(|r| r.len() == nb));
        for (rows, out) in $rows.chunks(4).zip($out.chunks_mut(4)) {
            match rows.len() {
                4 => $kernel::<4 $(, $flag)?>($w, rows, out),
                3 => $kernel::<3 $(, $flag)?>($w, rows, out),
                2 => $kernel::<2 $(, $flag)?>($w, rows, out),
                _ => $kernel::<1 $(, $flag)?>($w, rows, out),
            }
        }
    };
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

            use super::{BlockQ8, GROUP_BLOCK, GROUP_BLOCK_Q5, GROUP_BLOCK_Q6, GROUP_BLOCK_Q8};

            /// Q4, Q8_0, Q6 and Q5 kernels, in the order of [`super::kernel_index`].
            pub const KERNELS: [super::GroupKernel; 4] =
                [dot_group, dot_group_q8_0, dot_group_q6, dot_group_q5];

            /// Q4_0/Q4_1: see [`super::GroupKernel`]. Up to four activation rows share each
            /// unpacking of the nibbles; every row gets the same arithmetic however many share.
            ///
            /// # Safety
            /// As for [`super::GroupKernel`].
            #[target_feature(enable = $features)]
            pub unsafe fn dot_group(w: &[u8], rows: &[&[BlockQ8]], out: &mut [[f32; 8]]) {
                by_fours!(nibble_rows[false], GROUP_BLOCK, w, rows, out);
            }

            /// Q5_0/Q5_1/Q5_K: see [`super::GroupKernel`]. Q4's nibbles with their fifth bits
            /// put over them, up to four activation rows sharing each unpacking.
            ///
            /// # Safety
            /// As for [`super::GroupKernel`].
            #[target_feature(enable = $features)]
            pub unsafe fn dot_group_q5(w: &[u8], rows: &[&[BlockQ8]], out: &mut [[f32; 8]]) {
                by_fours!(nibble_rows[true], GROUP_BLOCK_Q5, w, rows, out);
            }

            /// The Q4 kernel, and with `FIVE` the Q5 one (a vector of fifth bits after the
            /// nibbles of each block).
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn nibble_rows<const R: usize, const FIVE: bool>(
                w: &[u8],
                rows: &[&[BlockQ8]],
                out: &mut [[f32; 8]],
            ) {
                let nb = rows[0].len();
                let block = if FIVE { GROUP_BLOCK_Q5 } else { GROUP_BLOCK };
                let mask = _mm256_set1_epi8(0xF);
                let bit4 = _mm256_set1_epi8(0x10);
                let mut acc = [_mm256_setzero_ps(); R];
                let mut macc = [_mm256_setzero_ps(); R];
                let mut p = w.as_ptr();
                for b in 0..nb {
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                    let m = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i));
                    // Vector `v`'s fifth bits sit at bits 2v and 2v+1 of each byte: shifted
                    // down by 2v, then up to bit 4 (in 16-bit words, but the bits kept never
                    // cross a byte).
                    let mut fifth = if FIVE {
                        _mm256_loadu_si256(p.add(GROUP_BLOCK) as *const __m256i)
                    } else {
                        _mm256_setzero_si256()
                    };
                    // 16-bit sums (each lane gains at most 2·15·127 a product for Q4, so eight
                    // stay below 2^15; 2·31·127 for Q5, so they widen after four), and the
                    // widened ones.
                    let mut part = [_mm256_setzero_si256(); R];
                    let mut sum = [_mm256_setzero_si256(); R];
                    for v in 0..4 {
                        let raw = _mm256_loadu_si256(p.add(32 + 32 * v) as *const __m256i);
                        let mut lo = _mm256_and_si256(raw, mask);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                        if FIVE {
                            let up = _mm256_and_si256(_mm256_slli_epi16(fifth, 4), bit4);
                            lo = _mm256_or_si256(lo, up);
                            let up = _mm256_and_si256(_mm256_slli_epi16(fifth, 3), bit4);
                            hi = _mm256_or_si256(hi, up);
                            fifth = _mm256_srli_epi16(fifth, 2);
                        }
                        for r in 0..R {
                            let xq = rows[r].get_unchecked(b).qs.as_ptr() as *const i32;
                            let xl = _mm256_set1_epi32(xq.add(v).read_unaligned());
                            let xh = _mm256_set1_epi32(xq.add(4 + v).read_unaligned());
                            part[r] = {
                                let ($a16, $u16, $s16) = (part[r], lo, xl);
                                $acc16
                            };
                            part[r] = {
                                let ($a16, $u16, $s16) = (part[r], hi, xh);
                                $acc16
                            };
                        }
                        if v % 2 == 1 && (FIVE || v == 3) {
                            for r in 0..R {
                                sum[r] = _mm256_add_epi32(sum[r], {
                                    let $w = part[r];
                                    $wide
                                });
                                part[r] = _mm256_setzero_si256();
                            }
                        }
                    }
                    for r in 0..R {
                        let x = rows[r].get_unchecked(b);
                        let s = _mm256_cvtepi32_ps(sum[r]);
                        acc[r] = _mm256_fmadd_ps(s, _mm256_mul_ps(d, _mm256_set1_ps(x.d)), acc[r]);
                        macc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(x.s), macc[r]);
                    }
                    p = p.add(block);
                }
                for r in 0..R {
                    _mm256_storeu_ps(out[r].as_mut_ptr(), _mm256_add_ps(acc[r], macc[r]));
                }
            }

            /// Q6_K: see [`super::GroupKernel`]. Signed weights, so products go through
            /// `sign` (|w| by ±x), with up to four activation rows sharing each `|w|`.
            ///
            /// # Safety
            /// As for [`super::GroupKernel`].
            #[target_feature(enable = $features)]
            pub unsafe fn dot_group_q6(w: &[u8], rows: &[&[BlockQ8]], out: &mut [[f32; 8]]) {
                by_fours!(q6_rows, GROUP_BLOCK_Q6, w, rows, out);
            }

            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn q6_rows<const R: usize>(w: &[u8], rows: &[&[BlockQ8]], out: &mut [[f32; 8]]) {
                let nb = rows[0].len();
                let mut acc = [_mm256_setzero_ps(); R];
                let mut p = w.as_ptr();
                for b in 0..nb {
                    let mut both = [_mm256_setzero_ps(); R];
                    for half in 0..2 {
                        let d =
                            _mm256_cvtph_ps(_mm_loadu_si128(p.add(16 * half) as *const __m128i));
                        let mut sum = [_mm256_setzero_si256(); R];
                        for v in 4 * half..4 * half + 4 {
                            let q = _mm256_loadu_si256(p.add(32 + 32 * v) as *const __m256i);
                            let aq = _mm256_sign_epi8(q, q);
                            for r in 0..R {
                                let xq = rows[r].get_unchecked(b).qs.as_ptr() as *const i32;
                                let xb = _mm256_set1_epi32(xq.add(v).read_unaligned());
                                // |q| ≤ 32 and |x| ≤ 127: each lane gains at most 2·32·127
                                // per vector, so four stay below 2^15.
                                sum[r] = {
                                    let ($a16, $u16, $s16) = (sum[r], aq, _mm256_sign_epi8(xb, q));
                                    $acc16
                                };
                            }
                        }
                        for r in 0..R {
                            let s = _mm256_cvtepi32_ps({
                                let $w = sum[r];
                                $wide
                            });
                            both[r] = _mm256_fmadd_ps(s, d, both[r]);
                        }
                    }
                    for r in 0..R {
                        let xd = _mm256_set1_ps(rows[r].get_unchecked(b).d);
                        acc[r] = _mm256_fmadd_ps(both[r], xd, acc[r]);
                    }
                    p = p.add(GROUP_BLOCK_Q6);
                }
                for r in 0..R {
                    _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
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
        let (bs, bb) = ty.block();
        let mut out = Vec::new();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for blk in 0..rows * cols / bs {
            let mut b = vec![0u8; bb];
            for v in b.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *v = (state >> 24) as u8;
            }
            if bs == 256 {
                crate::engine::quant::sanitize_random_scales(ty, &mut b);
            } else {
                let d = f16::from_f32(0.01 + (blk % 7) as f32 * 0.001).to_le_bytes();
                b[..2].copy_from_slice(&d);
                if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                    b[2..4].copy_from_slice(&f16::from_f32(-0.05).to_le_bytes());
                }
            }
            out.extend(b);
        }
        out
    }

    const ALL: [GgmlType; 8] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q4K,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Q8_0,
    ];

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

    /// Rows read back from the copy: the GGUF values exactly, or within the f16 rounding of
    /// the multiplied-out K-quant scales ([`copy_error_bound`]).
    #[test]
    fn each_row_comes_back_from_the_interleaved_copy() {
        let (rows, cols) = (24, 512);
        for ty in ALL {
            let data = raw(ty, rows, cols);
            let il = interleave(ty, &data, rows, cols);
            let rb = ty.row_bytes(cols);
            let rounds = matches!(ty, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K);
            let mut rounded = 0;
            for r in 0..rows {
                let mut want = vec![0f32; cols];
                crate::engine::quant::dequantize_row(ty, &data[r * rb..(r + 1) * rb], &mut want);
                let mut got = [0f32; 32];
                for b in 0..cols / 32 {
                    dequantize_block(ty, &il, (cols, r, b), &mut got);
                    let want = &want[32 * b..32 * b + 32];
                    let bound = copy_error_bound(ty, &data[r * rb..(r + 1) * rb], b);
                    for ((g, w), tol) in got.iter().zip(want).zip(bound) {
                        assert!(
                            (g - w).abs() <= tol,
                            "{ty:?} row {r} block {b}: {g} against {w}"
                        );
                    }
                    rounded += got.iter().zip(want).filter(|(g, w)| g != w).count();
                }
            }
            assert_eq!(rounded > 0, rounds, "{ty:?}: {rounded} values rounded");
        }
    }

    #[test]
    fn vnni_kernels_give_the_avx2_kernels_bits() {
        if !crate::engine::simd::has_avx2() {
            return;
        }
        let (rows, cols) = (16, 512);
        let x: Vec<f32> = (0..8 * cols)
            .map(|i| ((i as f32) * 0.37).sin() * 3.0)
            .collect();
        let mut q = vec![BlockQ8::default(); 8 * cols / 32];
        quantize_row_q8(&x, &mut q);
        let acts: Vec<&[BlockQ8]> = q.chunks(cols / 32).collect();
        for ty in ALL {
            let il = interleave(ty, &raw(ty, rows, cols), rows, cols);
            let span = cols / 32 * group_block(ty);
            let pick = |set: [GroupKernel; 4]| set[kernel_index(ty)];
            // Every count of rows a call may get (1 to 8: each way of sharing the unpacking).
            for m in 1..=8 {
                let acts = &acts[..m];
                let plain = pick(avx2::KERNELS);
                let base = run(plain, &il, span, acts, true);
                assert!(base.iter().all(|&b| f32::from_bits(b) != 0.0));
                let alone = run(plain, &il, span, acts, false);
                assert_eq!(base, alone, "{m} rows against each alone, {ty:?}");
                if has!("avxvnni") {
                    let k = pick(vnni::KERNELS);
                    assert_eq!(run(k, &il, span, acts, true), base, "AVX-VNNI, {m}, {ty:?}");
                }
                if has!("avx512vnni") && has!("avx512vl") {
                    let k = pick(vnni512::KERNELS);
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
