//! Quantized block formats of GGML, as they lie in a GGUF file, and the activation format the
//! matmul kernels pair them with.
//!
//! Weights are never dequantized wholesale: a matmul walks a weight row block by block. Every
//! weight block is read as one or more *sub-blocks of 32*: 32 small integers `q`, a scale `d` and
//! an offset `m`, so that `w = d·q + m` (Q6_K carries one scale per 16 and is handled apart).
//! Activations are quantized to [`BlockQ8`] (32 signed bytes with their scale and sum), and a dot
//! product of a weight sub-block with an activation block is
//! `d·d_a·Σ q·q_a + m·d_a·Σ q_a`, integer work in the inner loop.

use half::f16;

/// The ggml tensor types this engine reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

impl GgmlType {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
        }
    }

    pub fn row_bytes(self, n: usize) -> usize {
        let (b, s) = self.block();
        n / b * s
    }
}

/// 32 activations quantized to signed bytes: `x ≈ d·qs`, with `s = d·Σqs` for offset weights.
/// Aligned to 32 so that the kernels' 32-byte loads of `qs` never straddle a cache line.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub struct BlockQ8 {
    pub qs: [i8; 32],
    pub d: f32,
    pub s: f32,
}

impl Default for BlockQ8 {
    fn default() -> Self {
        Self {
            d: 0.0,
            s: 0.0,
            qs: [0; 32],
        }
    }
}

/// Quantizes `x` (a multiple of 32 long) into `out`, rounding half to even (as the AVX2 path's
/// `vroundps` does, so both paths give the same bytes).
pub fn quantize_row_q8(x: &[f32], out: &mut [BlockQ8]) {
    assert_eq!(x.len(), out.len() * 32);
    #[cfg(target_arch = "x86_64")]
    if crate::engine::simd::has_avx2() {
        // SAFETY: features checked above; lengths checked by the assert.
        return unsafe { quantize_row_q8_avx2(x, out) };
    }
    quantize_row_q8_portable(x, out)
}

fn quantize_row_q8_portable(x: &[f32], out: &mut [BlockQ8]) {
    for (chunk, blk) in x.chunks_exact(32).zip(out.iter_mut()) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = q8_inverse(d);
        let mut sum = 0i32;
        for (q, &v) in blk.qs.iter_mut().zip(chunk) {
            // (`as` takes NaN to 0, as the AVX2 path does.)
            *q = ((v * id).round_ties_even() as i32).clamp(-127, 127) as i8;
            sum += *q as i32;
        }
        blk.d = d;
        blk.s = d * sum as f32;
    }
}

/// `1/d`, or 0 where that is not a finite number (an all-zero block, a subnormal scale or an
/// infinite one): both paths then give the same bytes on any input.
#[inline]
fn q8_inverse(d: f32) -> f32 {
    let id = 1.0 / d;
    if d > 0.0 && id.is_finite() {
        id
    } else {
        0.0
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_q8_avx2(x: &[f32], out: &mut [BlockQ8]) {
    for (chunk, blk) in x.chunks_exact(32).zip(out.iter_mut()) {
        let (d, sum) = q8_block_avx2(chunk.as_ptr(), blk.qs.as_mut_ptr());
        blk.d = d;
        blk.s = d * sum as f32;
    }
}

/// Quantizes `x` to bytes `q` with one scale `d` per 32 values (no sums: the KV cache's
/// layout), the same bytes as [`quantize_row_q8`] gives; the scales are kept in f16 (their
/// rounding, 2⁻¹¹ of the scale, is far below the 8-bit step).
pub fn quantize_q8_groups(x: &[f32], q: &mut [i8], d: &mut [f16]) {
    assert!(x.len() == q.len() && x.len() == d.len() * 32);
    #[cfg(target_arch = "x86_64")]
    if crate::engine::simd::has_avx2() {
        // SAFETY: features checked above; lengths checked by the assert.
        return unsafe { quantize_q8_groups_avx2(x, q, d) };
    }
    let mut blk = [BlockQ8::default()];
    for ((x, q), d) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).zip(d) {
        quantize_row_q8_portable(x, &mut blk);
        q.copy_from_slice(&blk[0].qs);
        *d = f16::from_f32(blk[0].d);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_q8_groups_avx2(x: &[f32], q: &mut [i8], d: &mut [f16]) {
    for ((x, q), d) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).zip(d) {
        *d = f16::from_f32(q8_block_avx2(x.as_ptr(), q.as_mut_ptr()).0);
    }
}

/// Quantizes `x` to 4 bits, two to a byte (element `2i` in the low nibble of byte `i`), with
/// one f16 scale per 32 values: `x ≈ d·(q − 8)`, as GGML's Q4_0 rounds (the value farthest
/// from 0 is exactly −8 steps, so the other side reaches +7). NaN becomes 0.
pub fn quantize_q4_groups(x: &[f32], q: &mut [u8], d: &mut [f16]) {
    assert!(x.len() == 2 * q.len() && x.len() == d.len() * 32);
    for ((x, q), d) in x.chunks_exact(32).zip(q.chunks_exact_mut(16)).zip(d) {
        let far = x
            .iter()
            .copied()
            .filter(|v| !v.is_nan())
            .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        *d = f16::from_f32(far / -8.0);
        let step = d.to_f32();
        let id = if step == 0.0 { 0.0 } else { 1.0 / step };
        // 8 is the zero point; `as` saturates.
        let level = |v: f32| {
            if v.is_nan() {
                8
            } else {
                ((v * id + 8.5) as i32).clamp(0, 15) as u8
            }
        };
        for (q, pair) in q.iter_mut().zip(x.chunks_exact(2)) {
            *q = level(pair[0]) | level(pair[1]) << 4;
        }
    }
}

/// One block of 32 values at `p` into 32 bytes at `out`; returns the scale and the bytes' sum.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q8_block_avx2(p: *const f32, out: *mut i8) -> (f32, i32) {
    use std::arch::x86_64::*;
    // No closures here: they would not inherit the caller's target features, and the
    // intrinsics in them would become calls.
    let abs_mask = _mm256_set1_ps(-0.0);
    let mut v = [_mm256_setzero_ps(); 4];
    let mut m = _mm256_setzero_ps();
    for (i, v) in v.iter_mut().enumerate() {
        *v = _mm256_loadu_ps(p.add(8 * i));
        // (`maxps` returns its second operand where either is NaN: NaNs are skipped, as
        // `f32::max` skips them.)
        m = _mm256_max_ps(_mm256_andnot_ps(abs_mask, *v), m);
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(q8_inverse(d));
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let mut q = [_mm256_setzero_si256(); 4];
    for (q, v) in q.iter_mut().zip(v) {
        let r = _mm256_round_ps(
            _mm256_mul_ps(v, id),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        // NaN to 0 and the rest within ±127, as the portable path's `as` and `clamp` do.
        let r = _mm256_and_ps(r, _mm256_cmp_ps(r, r, _CMP_ORD_Q));
        *q = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    }
    let packed = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    // After two packs the dwords of each lane are interleaved; this puts them back in order.
    let packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(out as *mut __m256i, packed);
    let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    let s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
    let s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b10_11_00_01));
    (d, _mm_cvtsi128_si32(s4))
}

/// The f16 at byte `i` of `b`, through a table: the software conversion is too slow for the
/// inner loops of the portable kernels.
#[inline]
pub fn f16_at(b: &[u8], i: usize) -> f32 {
    static TABLE: std::sync::OnceLock<Box<[f32]>> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| (0..=u16::MAX).map(|h| f16::from_bits(h).to_f32()).collect());
    t[u16::from_le_bytes([b[i], b[i + 1]]) as usize]
}

/// Q4_K and Q5_K pack eight 6-bit scales and mins into 12 bytes.
#[inline]
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Dequantizes one row of `ty` into `out` (used for embedding look-ups and references).
pub fn dequantize_row(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    let (bs, bb) = ty.block();
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => {
            for (blk, o) in src.chunks_exact(bb).zip(out.chunks_exact_mut(bs)) {
                dequantize_block(ty, blk, o);
            }
        }
    }
}

fn dequantize_block(ty: GgmlType, b: &[u8], y: &mut [f32]) {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
            let mut q = [0i8; 32];
            let (d, m) = unpack_32(ty, b, &mut q);
            for (o, &v) in y.iter_mut().zip(&q) {
                *o = d * v as f32 + m;
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            for sub in 0..8 {
                let mut q = [0i8; 32];
                let (d, m) = unpack_k_sub(ty, b, sub, &mut q);
                for (o, &v) in y[sub * 32..].iter_mut().zip(&q) {
                    *o = d * v as f32 + m;
                }
            }
        }
        GgmlType::Q6K => {
            let d = f16_at(b, 208);
            for half in 0..16 {
                let mut q = [0i8; 16];
                let sc = unpack_q6k_16(b, half, &mut q);
                for (o, &v) in y[half * 16..].iter_mut().zip(&q) {
                    *o = d * sc as f32 * v as f32;
                }
            }
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!("not a block type"),
    }
}

/// Unpacks a 32-element block of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 into `q`, returning `(d, m)` with
/// `w = d·q + m`.
#[inline]
pub fn unpack_32(ty: GgmlType, b: &[u8], q: &mut [i8; 32]) -> (f32, f32) {
    let d = f16_at(b, 0);
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let qs = if ty == GgmlType::Q4_0 {
                &b[2..18]
            } else {
                &b[4..20]
            };
            for j in 0..16 {
                q[j] = (qs[j] & 0xF) as i8;
                q[j + 16] = (qs[j] >> 4) as i8;
            }
            if ty == GgmlType::Q4_0 {
                (d, -8.0 * d)
            } else {
                (d, f16_at(b, 2))
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let off = if ty == GgmlType::Q5_0 { 2 } else { 4 };
            let qh = u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]);
            let qs = &b[off + 4..off + 20];
            for j in 0..16 {
                let h0 = ((qh >> j) & 1) as u8;
                let h1 = ((qh >> (j + 16)) & 1) as u8;
                q[j] = ((qs[j] & 0xF) | (h0 << 4)) as i8;
                q[j + 16] = ((qs[j] >> 4) | (h1 << 4)) as i8;
            }
            if ty == GgmlType::Q5_0 {
                (d, -16.0 * d)
            } else {
                (d, f16_at(b, 2))
            }
        }
        GgmlType::Q8_0 => {
            for (o, &v) in q.iter_mut().zip(&b[2..34]) {
                *o = v as i8;
            }
            (d, 0.0)
        }
        _ => unreachable!("not a 32-element block type"),
    }
}

/// Unpacks sub-block `sub` (0..8, 32 elements) of a Q4_K or Q5_K super-block.
#[inline]
pub fn unpack_k_sub(ty: GgmlType, b: &[u8], sub: usize, q: &mut [i8; 32]) -> (f32, f32) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let (sc, mn) = scale_min_k4(sub, scales);
    let group = sub / 2;
    let shift = if sub.is_multiple_of(2) { 0 } else { 4 };
    match ty {
        GgmlType::Q4K => {
            let qs = &b[16 + group * 32..16 + group * 32 + 32];
            for (o, &v) in q.iter_mut().zip(qs) {
                *o = ((v >> shift) & 0xF) as i8;
            }
        }
        GgmlType::Q5K => {
            let qh = &b[16..48];
            let qs = &b[48 + group * 32..48 + group * 32 + 32];
            for l in 0..32 {
                let hi = (qh[l] >> sub) & 1;
                q[l] = (((qs[l] >> shift) & 0xF) | (hi << 4)) as i8;
            }
        }
        _ => unreachable!("not a K-quant with mins"),
    }
    (d * sc as f32, -dmin * mn as f32)
}

/// Unpacks the 16-element group `g` (0..16) of a Q6_K super-block as `q - 32`; returns its scale.
#[inline]
pub fn unpack_q6k_16(b: &[u8], g: usize, q: &mut [i8; 16]) -> i8 {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    // Elements n = 128·h + 32·k + l (l < 32) come from ql[64h + l + 32·(k&1)] (low or high
    // nibble for k < 2 or k ≥ 2) and bits 2k..2k+2 of qh[32h + l].
    let n0 = g * 16;
    let (h, k, l0) = (n0 / 128, (n0 % 128) / 32, n0 % 32);
    for (i, o) in q.iter_mut().enumerate() {
        let l = l0 + i;
        let lo = ql[64 * h + l + 32 * (k & 1)];
        let lo = if k < 2 { lo & 0xF } else { lo >> 4 };
        let hi = (qh[32 * h + l] >> (2 * k)) & 3;
        *o = ((lo | (hi << 4)) as i32 - 32) as i8;
    }
    let is = 8 * h + l0 / 16 + 2 * k;
    sc[is] as i8
}

/// Random bytes make NaN or huge f16 scales; replace them with small ones.
pub fn sanitize_random_scales(ty: GgmlType, b: &mut [u8]) {
    let (_, bb) = ty.block();
    let at: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::Q5_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q6K => &[208],
        GgmlType::F16 => {
            for c in b.chunks_exact_mut(2) {
                c.copy_from_slice(&f16::from_f32((c[0] as f32 - 128.0) / 4096.0).to_le_bytes());
            }
            return;
        }
        _ => &[],
    };
    for blk in b.chunks_exact_mut(bb) {
        for &o in at {
            let v = 0.001 + blk[o] as f32 / 40_000.0;
            blk[o..o + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_simd_and_portable_give_the_same_bytes() {
        // Ties (x·127/amax exactly k + 0.5), zeros, negatives, a NaN, a block of all zeros,
        // one of subnormals (whose scale has no finite inverse) and one with an infinity.
        let mut x: Vec<f32> = (0..160).map(|i| ((i as f32) * 0.61).sin() * 5.0).collect();
        x[0] = 127.0;
        for (i, v) in x[1..32].iter_mut().enumerate() {
            *v = (i as f32 - 15.0) + 0.5;
        }
        x[64..96].fill(0.0);
        x[96..128].fill(1e-40);
        x[100] = -3e-40;
        x[130] = f32::INFINITY;
        x[31] = f32::NAN;
        let mut a = vec![BlockQ8::default(); 5];
        let mut b = vec![BlockQ8::default(); 5];
        quantize_row_q8(&x, &mut a);
        quantize_row_q8_portable(&x, &mut b);
        let bits = |k: &BlockQ8| (k.qs, k.d.to_bits(), k.s.to_bits());
        for (a, b) in a.iter().zip(&b) {
            assert_eq!(bits(a), bits(b));
        }
        assert_eq!(a[0].qs[1], -14, "-14.5 rounds to even");
        assert_eq!(a[0].qs[2], -14, "-13.5 rounds to even");
        assert_eq!(a[2].qs, [0; 32]);
        assert!(a[3].qs.iter().all(|&q| q == 0), "no finite inverse: zeros");

        // The KV cache's layout gives the same bytes and scales, whichever path runs.
        let (mut q, mut d) = (vec![0i8; 160], vec![f16::ZERO; 5]);
        quantize_q8_groups(&x, &mut q, &mut d);
        for (k, blk) in b.iter().enumerate() {
            assert_eq!(q[k * 32..(k + 1) * 32], blk.qs);
            assert_eq!(d[k].to_bits(), f16::from_f32(blk.d).to_bits());
        }
    }

    #[test]
    fn q4_groups_round_to_the_nearest_of_sixteen_steps() {
        let mut x: Vec<f32> = (0..96)
            .map(|i| ((i as f32) * 0.61).sin() * (1 + i % 3) as f32)
            .collect();
        x[32..64].fill(0.0);
        x[5] = f32::NAN;
        let (mut q, mut d) = (vec![0u8; 48], vec![f16::ZERO; 3]);
        quantize_q4_groups(&x, &mut q, &mut d);
        let level = |i: usize| (q[i / 2] >> (4 * (i % 2)) & 15) as f32 - 8.0;
        assert_eq!(d[1].to_f32(), 0.0, "a group of zeros: no step");
        assert_eq!(level(5), 0.0, "NaN is stored as 0");

        for (i, &v) in x.iter().enumerate() {
            let step = d[i / 32].to_f32();
            let v = if v.is_nan() { 0.0 } else { v };
            let got = step * level(i);
            // Within half a step, but past +7.5 steps (the far value's other side: its own
            // is -8) the level stops at 7.
            let err = if step == 0.0 {
                0.0
            } else {
                (v / step - 7.0).max(0.5)
            };
            assert!(
                (got - v).abs() <= step.abs() * err + 1e-6,
                "{i}: {v} as {got} (step {step})"
            );
        }
        // The value farthest from 0 is exact: -8 steps.
        let far = (0..32)
            .filter(|&i| !x[i].is_nan())
            .max_by(|&a, &b| x[a].abs().total_cmp(&x[b].abs()))
            .unwrap();
        assert_eq!(level(far), -8.0);
        assert!((d[0].to_f32() * -8.0 - x[far]).abs() < 1e-2 * x[far].abs());
    }

    #[test]
    fn q8_roundtrip_is_close() {
        let x: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let mut q = vec![BlockQ8::default(); 2];
        quantize_row_q8(&x, &mut q);
        for (i, v) in x.iter().enumerate() {
            let b = &q[i / 32];
            assert!((b.d * b.qs[i % 32] as f32 - v).abs() <= b.d * 0.5 + 1e-6);
        }
        let s: f32 = x[..32].iter().sum();
        assert!((q[0].s - s).abs() < 0.1);
    }

    #[test]
    fn q4_1_dequantizes_with_offset() {
        let mut b = vec![0u8; 20];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        b[4] = 0x3A; // element 0 = 0xA, element 16 = 0x3
        let mut y = vec![0f32; 32];
        dequantize_row(GgmlType::Q4_1, &b, &mut y);
        assert_eq!(y[0], 0.5 * 10.0 - 1.0);
        assert_eq!(y[16], 0.5 * 3.0 - 1.0);
        assert_eq!(y[1], -1.0);
    }
}
