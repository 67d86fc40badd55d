//! Quantized matrix products: `out[m × n] = x[m × k] · Wᵀ`, with `W` an `n × k` matrix kept in
//! its GGUF block format.
//!
//! `x` is quantized once to [`BlockQ8`] rows. The work is cut into chunks of weight rows that run
//! on the engine's [`pool`](super::pool); inside a chunk, each weight block is unpacked once and multiplied with up
//! to four activation rows while it sits in registers, and activation rows are walked in tiles
//! that stay in cache. So a batch of rows reads every weight byte once per step, not once per row.
//! AVX2/FMA kernels are chosen at run time; the portable kernels compute the same sums.

use std::sync::Arc;

use super::interleaved;
use super::quant::{
    dequantize_row, f16_at, quantize_row_q8, unpack_32, unpack_k_sub, unpack_q6k_16, BlockQ8,
    GgmlType,
};

/// Bytes that a [`QMatrix`] borrows: a memory-mapped file or an owned buffer.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A weight matrix of `rows × cols` in a ggml format; row `r` holds output feature `r`.
#[derive(Clone)]
pub struct QMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    bytes: SharedBytes,
    start: usize,
    /// The same weights in groups of 8 rows for the AVX2 kernel (see [`interleaved`]).
    interleaved: Option<Arc<Vec<u8>>>,
    /// Whether `bytes` still holds the weights as loaded (see [`Self::drop_plain_copy`]).
    plain: bool,
}

impl QMatrix {
    pub fn new(ty: GgmlType, rows: usize, cols: usize, bytes: SharedBytes, start: usize) -> Self {
        debug_assert!(start + ty.row_bytes(cols) * rows <= (*bytes).as_ref().len());
        Self {
            ty,
            rows,
            cols,
            bytes,
            start,
            interleaved: None,
            plain: true,
        }
    }

    /// Frees the weights as loaded once the interleaved copy serves every read, when this
    /// matrix alone owns them (random weights; a mapped file is released by the loader).
    /// Returns whether it did.
    pub fn drop_plain_copy(&mut self) -> bool {
        if self.interleaved.is_some() && Arc::strong_count(&self.bytes) == 1 {
            self.bytes = Arc::new(Vec::<u8>::new());
            self.start = 0;
            self.plain = false;
        }
        !self.plain
    }

    /// Adds the 8-row interleaved copy that the AVX2 kernels prefer, where it applies (the
    /// types [`interleaved::interleaves`] takes, rows a multiple of 8, a CPU with AVX2).
    /// Returns whether it did.
    pub fn interleave(&mut self) -> bool {
        if interleaved::interleaves(self.ty)
            && self.rows.is_multiple_of(8)
            && super::simd::has_avx2()
        {
            let packed = interleaved::interleave(self.ty, self.data(), self.rows, self.cols);
            self.interleaved = Some(Arc::new(packed));
        }
        self.interleaved.is_some()
    }

    /// The weights as loaded (not after [`Self::drop_plain_copy`]).
    pub fn data(&self) -> &[u8] {
        assert!(
            self.plain,
            "the weights as loaded were dropped for the interleaved copy"
        );
        let len = self.ty.row_bytes(self.cols) * self.rows;
        &(*self.bytes).as_ref()[self.start..self.start + len]
    }

    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols)
    }

    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data()[r * rb..(r + 1) * rb]
    }

    /// Dequantizes row `r` (an embedding look-up), from the interleaved copy where there is
    /// one: reading the mapped file would bring its pages back (and the kernel's fault-around
    /// maps 64 KB of neighbours with each), so a server's memory would grow with every new
    /// token its users write, up to the whole table.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        match &self.interleaved {
            Some(packed) => {
                for (b, out) in out.chunks_exact_mut(32).enumerate() {
                    interleaved::dequantize_block(self.ty, packed, (self.cols, r, b), out);
                }
            }
            None => dequantize_row(self.ty, self.row(r), out),
        }
    }

    /// Whether the weights are read from where they were loaded (no interleaved copy).
    pub fn borrows_its_bytes(&self) -> bool {
        self.interleaved.is_none()
    }
}

/// Activations quantized for the kernels: `m` rows of `k / 32` blocks, plus the f32 rows for
/// float weights.
pub struct QuantizedRows<'a> {
    /// Precise mode: weights are dequantized block by block and multiplied with the f32 rows
    /// (no 8-bit activations). Slower; it checks the rest of the model tightly against float
    /// references.
    pub precise: bool,
    pub m: usize,
    pub k: usize,
    blocks: Vec<BlockQ8>,
    f32_rows: &'a [f32],
}

impl<'a> QuantizedRows<'a> {
    pub fn new(x: &'a [f32], k: usize, precise: bool) -> Self {
        assert!(
            k.is_multiple_of(32) && x.len().is_multiple_of(k),
            "row length {k} must be a multiple of 32"
        );
        let m = x.len() / k;
        let mut blocks = vec![BlockQ8::default(); if precise { 0 } else { m * k / 32 }];
        if precise {
        } else if m >= 8 {
            let nb = k / 32;
            let ptr = BlocksPtr(blocks.as_mut_ptr());
            super::pool::global().run(m, &|i| {
                let ptr = &ptr;
                // SAFETY: task `i` writes only row `i`'s blocks.
                let row = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(i * nb), nb) };
                quantize_row_q8(&x[i * k..(i + 1) * k], row);
            });
        } else {
            quantize_row_q8(x, &mut blocks);
        }
        Self {
            precise,
            m,
            k,
            blocks,
            f32_rows: x,
        }
    }

    fn row(&self, i: usize) -> &[BlockQ8] {
        let nb = self.k / 32;
        self.blocks.get(i * nb..(i + 1) * nb).unwrap_or(&[])
    }
}

struct BlocksPtr(*mut BlockQ8);
// SAFETY: tasks write disjoint rows.
unsafe impl Sync for BlocksPtr {}

/// A raw pointer to an output buffer that chunks write disjoint parts of.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every chunk writes only the columns of its own weight rows.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// The fewest weight rows a parallel task takes.
const MIN_CHUNK_ROWS: usize = 32;
/// Activation rows walked per tile: 32 rows of 576 quantized values is ~18 KB, in L1.
const TILE_ROWS: usize = 32;
/// Activation rows a kernel call multiplies with one unpacked weight block.
pub const ROWS: usize = 8;

/// Computes several products over the same activations in one parallel pass (Q, K and V; or
/// gate and up): `outs[j][m × wj.rows] = x · wjᵀ`.
pub fn matmul_many(x: &QuantizedRows, ws: &[&QMatrix], outs: &mut [&mut [f32]]) {
    assert_eq!(ws.len(), outs.len());
    let mut tasks = Vec::new();
    // About four tasks per thread, so both cores stay busy without paying for tiny tasks.
    let total_rows: usize = ws.iter().map(|w| w.rows).sum();
    let chunk = (total_rows / (super::pool::global().threads() * 4))
        .max(MIN_CHUNK_ROWS)
        .next_multiple_of(8);
    for (j, (w, out)) in ws.iter().zip(outs.iter_mut()).enumerate() {
        assert_eq!(
            w.cols, x.k,
            "matmul: weight has {} columns, x has {}",
            w.cols, x.k
        );
        assert_eq!(out.len(), x.m * w.rows);
        let ptr = OutPtr(out.as_mut_ptr());
        for r0 in (0..w.rows).step_by(chunk) {
            tasks.push((j, r0, (r0 + chunk).min(w.rows), ptr));
        }
    }
    let run = |&(j, r0, r1, ptr): &(usize, usize, usize, OutPtr)| {
        let w = ws[j];
        // SAFETY: tasks cover disjoint row ranges of `w`, so they write disjoint columns.
        let out = unsafe { std::slice::from_raw_parts_mut(ptr.0, x.m * w.rows) };
        matmul_rows(x, w, r0, r1, out);
    };
    if tasks.len() == 1 || x.m * x.k * tasks.len() < 4096 {
        tasks.iter().for_each(run);
    } else {
        super::pool::global().run(tasks.len(), &|i| run(&tasks[i]));
    }
}

pub fn matmul(x: &QuantizedRows, w: &QMatrix, out: &mut [f32]) {
    matmul_many(x, &[w], &mut [out]);
}

fn matmul_rows(x: &QuantizedRows, w: &QMatrix, r0: usize, r1: usize, out: &mut [f32]) {
    let n = w.rows;
    let rb = w.row_bytes();
    // The weights as loaded, for the plain kernels (a matrix without them has a group kernel).
    let plain: &[u8] = if w.plain { w.data() } else { &[] };
    let float = x.precise || matches!(w.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
    let avx2 = super::simd::has_avx2();
    #[cfg(target_arch = "x86_64")]
    if let (Some(il), false, Some(kernel)) = (&w.interleaved, float, interleaved::kernel(w.ty)) {
        let nb = x.k / 32;
        let span = nb * interleaved::group_block(w.ty);
        let mut acc = [[0f32; 8]; ROWS];
        for t0 in (0..x.m).step_by(TILE_ROWS) {
            let t1 = (t0 + TILE_ROWS).min(x.m);
            let mut i = t0;
            while i < t1 {
                let g = (t1 - i).min(ROWS);
                let rows: [&[BlockQ8]; ROWS] = std::array::from_fn(|a| x.row(i + a.min(g - 1)));
                for grp in r0 / 8..r1.div_ceil(8) {
                    // SAFETY: `kernel` is for this CPU; `il` holds `nb` blocks per group.
                    unsafe { kernel(&il[grp * span..(grp + 1) * span], &rows[..g], &mut acc[..g]) };
                    for (a, vals) in acc.iter().enumerate().take(g) {
                        out[(i + a) * n + grp * 8..][..8].copy_from_slice(vals);
                    }
                }
                i += g;
            }
        }
        return;
    }
    for t0 in (0..x.m).step_by(TILE_ROWS) {
        let t1 = (t0 + TILE_ROWS).min(x.m);
        let mut i = t0;
        while i < t1 {
            let g = (t1 - i).min(ROWS);
            let rows: [&[BlockQ8]; ROWS] = std::array::from_fn(|a| x.row(i + a.min(g - 1)));
            for r in r0..r1 {
                let mut acc = [0f32; ROWS];
                if float {
                    dot_float_rows(w, r, x, i, g, &mut acc);
                } else {
                    let wrow = &plain[r * rb..(r + 1) * rb];
                    dot_rows_with(avx2, w.ty, wrow, &rows[..g], &mut acc);
                }
                for (a, v) in acc.iter().enumerate().take(g) {
                    out[(i + a) * n + r] = *v;
                }
            }
            i += g;
        }
    }
}

/// Row `r` of `wm` (as loaded where it still is) against up to [`ROWS`] f32 rows.
fn dot_float_rows(
    wm: &QMatrix,
    r: usize,
    x: &QuantizedRows,
    i: usize,
    g: usize,
    acc: &mut [f32; ROWS],
) {
    let mut w = vec![0f32; x.k];
    if wm.plain {
        dequantize_row(wm.ty, wm.row(r), &mut w);
    } else {
        wm.dequantize_row(r, &mut w);
    }
    for (a, out) in acc.iter_mut().enumerate().take(g) {
        let xr = &x.f32_rows[(i + a) * x.k..(i + a + 1) * x.k];
        *out = super::simd::dot(&w, xr);
    }
}

/// Dot products of one quantized weight row with up to [`ROWS`] activation rows.
pub fn dot_rows(ty: GgmlType, wrow: &[u8], rows: &[&[BlockQ8]], acc: &mut [f32; ROWS]) {
    dot_rows_with(super::simd::has_avx2(), ty, wrow, rows, acc)
}

fn dot_rows_with(
    avx2: bool,
    ty: GgmlType,
    wrow: &[u8],
    rows: &[&[BlockQ8]],
    acc: &mut [f32; ROWS],
) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        match ty {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            GgmlType::Q4_0 | GgmlType::Q4_1 => unsafe {
                return avx2::dot_q4_rows(ty, wrow, rows, acc);
            },
            GgmlType::Q8_0 => unsafe {
                return avx2::dot_q8_0_rows(wrow, rows, acc);
            },
            _ => {}
        }
    }
    dot_rows_portable(ty, wrow, rows, acc)
}

/// The portable kernel: unpack each weight block once, then integer dot products per row.
pub fn dot_rows_portable(ty: GgmlType, wrow: &[u8], rows: &[&[BlockQ8]], acc: &mut [f32; ROWS]) {
    let (bs, bb) = ty.block();
    let mut q = [0i8; 32];
    for (b, blk) in wrow.chunks_exact(bb).enumerate() {
        match ty {
            GgmlType::Q4K | GgmlType::Q5K => {
                for sub in 0..8 {
                    let (d, m) = unpack_k_sub(ty, blk, sub, &mut q);
                    accumulate(&q, d, m, rows, b * 8 + sub, acc);
                }
            }
            GgmlType::Q6K => {
                let d = f16_at(blk, 208);
                let mut q16 = [0i8; 16];
                for g in 0..16 {
                    let sc = unpack_q6k_16(blk, g, &mut q16);
                    let ab = b * 8 + g / 2;
                    let off = (g % 2) * 16;
                    for (r, row) in rows.iter().enumerate() {
                        let a = &row[ab];
                        let s: i32 = q16
                            .iter()
                            .zip(&a.qs[off..off + 16])
                            .map(|(&w, &x)| w as i32 * x as i32)
                            .sum();
                        acc[r] += d * sc as f32 * a.d * s as f32;
                    }
                }
            }
            _ => {
                debug_assert_eq!(bs, 32);
                let (d, m) = unpack_32(ty, blk, &mut q);
                accumulate(&q, d, m, rows, b, acc);
            }
        }
    }
}

#[inline]
fn accumulate(q: &[i8; 32], d: f32, m: f32, rows: &[&[BlockQ8]], ab: usize, acc: &mut [f32; ROWS]) {
    for (r, row) in rows.iter().enumerate() {
        let a = &row[ab];
        let s: i32 = q
            .iter()
            .zip(&a.qs)
            .map(|(&w, &x)| w as i32 * x as i32)
            .sum();
        acc[r] += d * a.d * s as f32 + m * a.s;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ8, GgmlType, ROWS};

    /// The f16 at `p`, converted by the F16C instruction.
    #[inline(always)]
    unsafe fn f16_ptr(p: *const u8) -> f32 {
        let h = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Σ u·s over 32 unsigned (u < 128) by signed bytes, as 8 f32 lanes.
    #[inline(always)]
    unsafe fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(u, s);
        let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
        _mm256_cvtepi32_ps(p32)
    }

    /// Q4_0 and Q4_1: nibbles are unsigned; Q4_0's `-8` is its offset `m = -8·d`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_rows(ty: GgmlType, w: &[u8], rows: &[&[BlockQ8]], acc: &mut [f32; ROWS]) {
        let q4_0 = ty == GgmlType::Q4_0;
        match rows.len() {
            1 => dot_q4::<1>(q4_0, w, rows, acc),
            2 => dot_q4::<2>(q4_0, w, rows, acc),
            3 => dot_q4::<3>(q4_0, w, rows, acc),
            4 => dot_q4::<4>(q4_0, w, rows, acc),
            5 => dot_q4::<5>(q4_0, w, rows, acc),
            6 => dot_q4::<6>(q4_0, w, rows, acc),
            7 => dot_q4::<7>(q4_0, w, rows, acc),
            _ => dot_q4::<8>(q4_0, w, rows, acc),
        }
    }

    /// `d·q + m` of a Q4_0/Q4_1 block as (d, m, 32 nibbles).
    #[inline(always)]
    unsafe fn unpack_q4(p: *const u8, q4_0: bool) -> (f32, f32, __m256i) {
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
        let d = _mm_cvtss_f32(dm);
        let m = if q4_0 {
            -8.0 * d
        } else {
            _mm_cvtss_f32(_mm_movehdup_ps(dm))
        };
        let raw = _mm_loadu_si128(p.add(if q4_0 { 2 } else { 4 }) as *const __m128i);
        let q = _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw),
            _mm256_set1_epi8(0xF),
        );
        (d, m, q)
    }

    /// Blocks are taken in pairs: `acc += (t_b + t_b+1)`, so one row's accumulator is touched
    /// once per two blocks (a single row is latency-bound otherwise). Every row gets exactly
    /// the same arithmetic whatever `R` is, so a packed batch equals rows run alone, bit for bit.
    #[inline(always)]
    unsafe fn dot_q4<const R: usize>(
        q4_0: bool,
        w: &[u8],
        rows: &[&[BlockQ8]],
        acc: &mut [f32; ROWS],
    ) {
        let bb = if q4_0 { 18 } else { 20 };
        let nb = w.len() / bb;
        let mut vacc = [_mm256_setzero_ps(); R];
        let mut macc = [0f32; R];
        let a: [*const BlockQ8; R] = std::array::from_fn(|r| rows[r].as_ptr());
        let wp = w.as_ptr();
        let mut b = 0;
        while b + 1 < nb {
            let (d0, m0, q0) = unpack_q4(wp.add(b * bb), q4_0);
            let (d1, m1, q1) = unpack_q4(wp.add((b + 1) * bb), q4_0);
            for r in 0..R {
                let (x0, x1) = (&*a[r].add(b), &*a[r].add(b + 1));
                let p0 = dot_u8_i8(q0, _mm256_loadu_si256(x0.qs.as_ptr() as *const __m256i));
                let p1 = dot_u8_i8(q1, _mm256_loadu_si256(x1.qs.as_ptr() as *const __m256i));
                let t = _mm256_fmadd_ps(
                    p1,
                    _mm256_set1_ps(d1 * x1.d),
                    _mm256_mul_ps(p0, _mm256_set1_ps(d0 * x0.d)),
                );
                vacc[r] = _mm256_add_ps(vacc[r], t);
                macc[r] += m0 * x0.s + m1 * x1.s;
            }
            b += 2;
        }
        if b < nb {
            let (d0, m0, q0) = unpack_q4(wp.add(b * bb), q4_0);
            for r in 0..R {
                let x0 = &*a[r].add(b);
                let p0 = dot_u8_i8(q0, _mm256_loadu_si256(x0.qs.as_ptr() as *const __m256i));
                vacc[r] = _mm256_add_ps(vacc[r], _mm256_mul_ps(p0, _mm256_set1_ps(d0 * x0.d)));
                macc[r] += m0 * x0.s;
            }
        }
        for r in 0..R {
            acc[r] = hsum(vacc[r]) + macc[r];
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_0_rows(w: &[u8], rows: &[&[BlockQ8]], acc: &mut [f32; ROWS]) {
        match rows.len() {
            1 => dot_q8_0::<1>(w, rows, acc),
            2 => dot_q8_0::<2>(w, rows, acc),
            3 => dot_q8_0::<3>(w, rows, acc),
            4 => dot_q8_0::<4>(w, rows, acc),
            5 => dot_q8_0::<5>(w, rows, acc),
            6 => dot_q8_0::<6>(w, rows, acc),
            7 => dot_q8_0::<7>(w, rows, acc),
            _ => dot_q8_0::<8>(w, rows, acc),
        }
    }

    /// Pairs of blocks, as in `dot_q4`.
    #[inline(always)]
    unsafe fn dot_q8_0<const R: usize>(w: &[u8], rows: &[&[BlockQ8]], acc: &mut [f32; ROWS]) {
        let nb = w.len() / 34;
        let mut vacc = [_mm256_setzero_ps(); R];
        let a: [*const BlockQ8; R] = std::array::from_fn(|r| rows[r].as_ptr());
        let wp = w.as_ptr();
        let unpack = |b: usize| {
            let blk = wp.add(b * 34);
            let q = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            (f16_ptr(blk), _mm256_sign_epi8(q, q), q)
        };
        let mut b = 0;
        while b + 1 < nb {
            let (d0, qa0, q0) = unpack(b);
            let (d1, qa1, q1) = unpack(b + 1);
            for r in 0..R {
                let (x0, x1) = (&*a[r].add(b), &*a[r].add(b + 1));
                let v0 = _mm256_loadu_si256(x0.qs.as_ptr() as *const __m256i);
                let v1 = _mm256_loadu_si256(x1.qs.as_ptr() as *const __m256i);
                let p0 = dot_u8_i8(qa0, _mm256_sign_epi8(v0, q0));
                let p1 = dot_u8_i8(qa1, _mm256_sign_epi8(v1, q1));
                let t = _mm256_fmadd_ps(
                    p1,
                    _mm256_set1_ps(d1 * x1.d),
                    _mm256_mul_ps(p0, _mm256_set1_ps(d0 * x0.d)),
                );
                vacc[r] = _mm256_add_ps(vacc[r], t);
            }
            b += 2;
        }
        if b < nb {
            let (d0, qa0, q0) = unpack(b);
            for r in 0..R {
                let x0 = &*a[r].add(b);
                let v0 = _mm256_loadu_si256(x0.qs.as_ptr() as *const __m256i);
                let p0 = dot_u8_i8(qa0, _mm256_sign_epi8(v0, q0));
                vacc[r] = _mm256_add_ps(vacc[r], _mm256_mul_ps(p0, _mm256_set1_ps(d0 * x0.d)));
            }
        }
        for r in 0..R {
            acc[r] = hsum(vacc[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::simd::has_avx2;

    fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 33) as u8
            })
            .collect()
    }

    /// A random weight row whose f16 scales are small normal numbers.
    fn random_row(ty: GgmlType, k: usize, seed: u64) -> Vec<u8> {
        let mut b = random_bytes(ty.row_bytes(k), seed);
        crate::engine::quant::sanitize_random_scales(ty, &mut b);
        b
    }

    #[test]
    fn kernels_match_dequantized_reference() {
        let k = 512;
        let x: Vec<f32> = (0..3 * k).map(|i| ((i as f32) * 0.731).sin()).collect();
        let q = QuantizedRows::new(&x, k, false);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
        ] {
            let row = random_row(ty, k, 7);
            let mut w = vec![0f32; k];
            dequantize_row(ty, &row, &mut w);
            let rows: Vec<&[BlockQ8]> = (0..3).map(|i| q.row(i)).collect();
            let mut fast = [0f32; ROWS];
            dot_rows(ty, &row, &rows, &mut fast);
            let mut portable = [0f32; ROWS];
            dot_rows_portable(ty, &row, &rows, &mut portable);
            for i in 0..3 {
                let exact: f32 = w
                    .iter()
                    .zip(&x[i * k..(i + 1) * k])
                    .map(|(a, b)| a * b)
                    .sum();
                let norm: f32 = w.iter().map(|v| v.abs()).sum::<f32>() * 0.01 + 1e-3;
                assert!(
                    (fast[i] - exact).abs() < norm,
                    "{ty:?} row {i}: {} vs {exact}",
                    fast[i]
                );
                assert!(
                    (fast[i] - portable[i]).abs() < 1e-3 * (1.0 + exact.abs()),
                    "{ty:?}: avx2 {} vs portable {}",
                    fast[i],
                    portable[i]
                );
            }
        }
    }

    #[test]
    fn interleaved_kernels_match_the_plain_kernels() {
        let (k, n, m) = (512, 24, 5);
        let all = [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q4K,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q5K,
            GgmlType::Q6K,
            GgmlType::Q8_0,
        ];
        for ty in all {
            let raw = random_row(ty, k * n, 11);
            let bytes: SharedBytes = Arc::new(raw.clone());
            let plain = QMatrix::new(ty, n, k, bytes.clone(), 0);
            let mut il = QMatrix::new(ty, n, k, bytes, 0);
            assert!(!has_avx2() || il.interleave(), "{ty:?} is interleaved");
            let x: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.91).sin()).collect();
            let q = QuantizedRows::new(&x, k, false);
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            matmul(&q, &plain, &mut a);
            matmul(&q, &il, &mut b);
            // The copy keeps a K-quant's multiplied-out scales in f16: within 2^-11 of each
            // part of a value (at most twice the largest |w| of its row here).
            let mut w = vec![0f32; k];
            for (j, (u, v)) in a.iter().zip(&b).enumerate() {
                let (i, r) = (j / n, j % n);
                dequantize_row(ty, &raw[r * ty.row_bytes(k)..][..ty.row_bytes(k)], &mut w);
                let top = w.iter().fold(0f32, |t, v| t.max(v.abs()));
                let xs: f32 = x[i * k..(i + 1) * k].iter().map(|v| v.abs()).sum();
                let tol = match ty {
                    GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 4.0 * top * xs / 2048.0,
                    _ => 1e-3 * (1.0 + u.abs()),
                };
                assert!((u - v).abs() <= tol, "{ty:?}: {u} vs {v}");
            }
            // One row at a time gives the same bits as the batch.
            for i in 0..m {
                let mut one = vec![0f32; n];
                matmul(
                    &QuantizedRows::new(&x[i * k..(i + 1) * k], k, false),
                    &il,
                    &mut one,
                );
                assert_eq!(&b[i * n..(i + 1) * n], &one[..]);
            }
        }
    }

    #[test]
    fn a_matrix_without_its_plain_copy_reads_the_interleaved_one() {
        if !has_avx2() {
            return;
        }
        let (k, n, m) = (64, 16, 3);
        let ty = GgmlType::Q4_1;
        let x: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.53).sin()).collect();
        let fresh = || {
            let mut w = QMatrix::new(ty, n, k, Arc::new(random_row(ty, k * n, 5)), 0);
            assert!(w.interleave());
            w
        };
        let (kept, mut dropped) = (fresh(), fresh());
        let shared = kept.clone();
        assert!(dropped.drop_plain_copy());
        assert!(!shared.clone().drop_plain_copy(), "a shared copy stays");
        for precise in [false, true] {
            let q = QuantizedRows::new(&x, k, precise);
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            matmul(&q, &kept, &mut a);
            matmul(&q, &dropped, &mut b);
            assert_eq!(a, b, "precise {precise}");
        }
        let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
        kept.dequantize_row(7, &mut a);
        dropped.dequantize_row(7, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn matmul_batches_equal_single_rows() {
        let (k, n, m) = (64, 70, 9);
        let bytes: SharedBytes = Arc::new(random_row(GgmlType::Q4_1, k * n, 3));
        let w = QMatrix::new(GgmlType::Q4_1, n, k, bytes, 0);
        let x: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.37).cos()).collect();
        let mut all = vec![0f32; m * n];
        matmul(&QuantizedRows::new(&x, k, false), &w, &mut all);
        for i in 0..m {
            let mut one = vec![0f32; n];
            matmul(
                &QuantizedRows::new(&x[i * k..(i + 1) * k], k, false),
                &w,
                &mut one,
            );
            assert_eq!(&all[i * n..(i + 1) * n], &one[..]);
        }
    }
}
