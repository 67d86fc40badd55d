//! Small vector routines for attention and norms, with AVX2/FMA/F16C paths chosen at run time.

use half::f16;

#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether `g` rows of `n` values, `stride` apart, fit in `len` (without overflowing).
fn rows_fit(g: usize, n: usize, stride: usize, len: usize) -> bool {
    g == 0
        || (g - 1)
            .checked_mul(stride)
            .and_then(|x| x.checked_add(n))
            .is_some_and(|end| end <= len)
}

/// Whether `a·b ≤ len` (without overflowing).
fn fits(a: usize, b: usize, len: usize) -> bool {
    a.checked_mul(b).is_some_and(|x| x <= len)
}

/// Σ a·b
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked above.
        return unsafe { x86::dot(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Σ k·q with `k` in f16.
pub fn dot_f16(k: &[f16], q: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked above.
        return unsafe { x86::dot_f16(k, q) };
    }
    k.iter().zip(q).map(|(x, y)| x.to_f32() * y).sum()
}

/// out += w·v with `v` in f16.
pub fn axpy_f16(out: &mut [f32], v: &[f16], w: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked above.
        return unsafe { x86::axpy_f16(out, v, w) };
    }
    for (o, x) in out.iter_mut().zip(v) {
        *o += w * x.to_f32();
    }
}

/// `x ← exp(x - max x) / Σ exp(x - max x)` in place.
pub fn softmax(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked above.
        return unsafe { x86::softmax(x) };
    }
    softmax_portable(x)
}

fn softmax_portable(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `g ← silu(g)·u = g·σ(g)·u`, the SwiGLU gate.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked above.
        return unsafe { x86::silu_mul(g, u) };
    }
    silu_mul_portable(g, u)
}

fn silu_mul_portable(g: &mut [f32], u: &[f32]) {
    for (g, u) in g.iter_mut().zip(u) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Attention scores of `g` query heads against `n` f16 key rows:
/// `out[h·stride + p] = scale·k_p·q_h` (`q`: `g × hd`, contiguous). Each key row is loaded once
/// for all heads of its group.
pub fn scores_f16(
    k: &[f16],
    q: &[f32],
    (g, hd): (usize, usize),
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    let n = k.len() / hd;
    assert!(fits(g, hd, q.len()) && rows_fit(g, n, stride, out.len()));
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && hd % 8 == 0 {
        // SAFETY: features checked above; shapes checked by the assert above.
        // Positions per pass: enough independent sums to keep both FMA units busy.
        unsafe {
            return match g {
                1 => x86::scores_f16::<1, 4>(k, q, hd, scale, out, stride),
                2 => x86::scores_f16::<2, 4>(k, q, hd, scale, out, stride),
                3 => x86::scores_f16::<3, 4>(k, q, hd, scale, out, stride),
                4 => x86::scores_f16::<4, 2>(k, q, hd, scale, out, stride),
                _ => scores_f16_portable(k, q, (g, hd), scale, out, stride),
            };
        }
    }
    scores_f16_portable(k, q, (g, hd), scale, out, stride)
}

fn scores_f16_portable(
    k: &[f16],
    q: &[f32],
    (g, hd): (usize, usize),
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    for h in 0..g {
        for p in 0..k.len() / hd {
            out[h * stride + p] =
                scale * dot_f16(&k[p * hd..(p + 1) * hd], &q[h * hd..(h + 1) * hd]);
        }
    }
}

/// `out[h] += Σ_p w[h·stride + p]·v_p` for `g` heads over `n` f16 value rows (`out`: `g × hd`).
pub fn weighted_sum_f16(
    v: &[f16],
    w: &[f32],
    (g, hd): (usize, usize),
    stride: usize,
    out: &mut [f32],
) {
    let n = v.len() / hd;
    assert!(fits(g, hd, out.len()) && rows_fit(g, n, stride, w.len()));
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && hd % 8 == 0 {
        // Columns per pass (in eights, dividing the row): enough independent sums for both
        // FMA units.
        let c = [4, 2, 1]
            .into_iter()
            .find(|c| hd % (8 * c) == 0)
            .unwrap_or(1);
        // SAFETY: features checked above; shapes checked by the assert above; `C` divides
        // the row's eights.
        unsafe {
            return match (g, c) {
                (1, 4) => x86::weighted_sum_f16::<1, 4>(v, w, hd, stride, out),
                (1, 2) => x86::weighted_sum_f16::<1, 2>(v, w, hd, stride, out),
                (1, _) => x86::weighted_sum_f16::<1, 1>(v, w, hd, stride, out),
                (2, 4) => x86::weighted_sum_f16::<2, 4>(v, w, hd, stride, out),
                (2, 2) => x86::weighted_sum_f16::<2, 2>(v, w, hd, stride, out),
                (2, _) => x86::weighted_sum_f16::<2, 1>(v, w, hd, stride, out),
                (3, 2 | 4) => x86::weighted_sum_f16::<3, 2>(v, w, hd, stride, out),
                (3, _) => x86::weighted_sum_f16::<3, 1>(v, w, hd, stride, out),
                (4, 2 | 4) => x86::weighted_sum_f16::<4, 2>(v, w, hd, stride, out),
                (4, _) => x86::weighted_sum_f16::<4, 1>(v, w, hd, stride, out),
                _ => weighted_sum_f16_portable(v, w, (g, hd), stride, out),
            };
        }
    }
    weighted_sum_f16_portable(v, w, (g, hd), stride, out)
}

fn weighted_sum_f16_portable(
    v: &[f16],
    w: &[f32],
    (g, hd): (usize, usize),
    stride: usize,
    out: &mut [f32],
) {
    for h in 0..g {
        for p in 0..v.len() / hd {
            axpy_f16(
                &mut out[h * hd..(h + 1) * hd],
                &v[p * hd..(p + 1) * hd],
                w[h * stride + p],
            );
        }
    }
}

/// [`scores_f16`] over 8-bit keys: `k_p ≈ d·q` with one scale `kd` per 32 values.
pub fn scores_q8(
    (kq, kd): (&[i8], &[f16]),
    q: &[f32],
    (g, hd): (usize, usize),
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    let n = kq.len() / hd;
    assert!(hd % 32 == 0 && kd.len() >= kq.len() / 32);
    assert!(fits(g, hd, q.len()) && rows_fit(g, n, stride, out.len()));
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked above; shapes checked by the asserts above.
        unsafe {
            return match g {
                1 => x86::scores_q8::<1, 4>(kq, kd, q, hd, scale, out, stride),
                2 => x86::scores_q8::<2, 4>(kq, kd, q, hd, scale, out, stride),
                3 => x86::scores_q8::<3, 2>(kq, kd, q, hd, scale, out, stride),
                4 => x86::scores_q8::<4, 2>(kq, kd, q, hd, scale, out, stride),
                _ => scores_q8_portable((kq, kd), q, (g, hd), scale, out, stride),
            };
        }
    }
    scores_q8_portable((kq, kd), q, (g, hd), scale, out, stride)
}

fn scores_q8_portable(
    (kq, kd): (&[i8], &[f16]),
    q: &[f32],
    (g, hd): (usize, usize),
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    for h in 0..g {
        let qh = &q[h * hd..(h + 1) * hd];
        for p in 0..kq.len() / hd {
            let k = &kq[p * hd..(p + 1) * hd];
            let s: f32 = (k.chunks_exact(32).zip(qh.chunks_exact(32)))
                .zip(&kd[p * hd / 32..])
                .map(|((k, q), d)| {
                    d.to_f32() * k.iter().zip(q).map(|(&k, q)| k as f32 * q).sum::<f32>()
                })
                .sum();
            out[h * stride + p] = scale * s;
        }
    }
}

/// [`weighted_sum_f16`] over 8-bit values: `v_p ≈ d·q` with one scale `vd` per 32 values.
pub fn weighted_sum_q8(
    (vq, vd): (&[i8], &[f16]),
    w: &[f32],
    (g, hd): (usize, usize),
    stride: usize,
    out: &mut [f32],
) {
    let n = vq.len() / hd;
    assert!(hd % 32 == 0 && vd.len() >= vq.len() / 32);
    assert!(fits(g, hd, out.len()) && rows_fit(g, n, stride, w.len()));
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked above; shapes checked by the asserts above.
        unsafe {
            return match g {
                1 => x86::weighted_sum_q8::<1, 4>(vq, vd, w, hd, stride, out),
                2 => x86::weighted_sum_q8::<2, 4>(vq, vd, w, hd, stride, out),
                3 => x86::weighted_sum_q8::<3, 2>(vq, vd, w, hd, stride, out),
                4 => x86::weighted_sum_q8::<4, 2>(vq, vd, w, hd, stride, out),
                _ => weighted_sum_q8_portable((vq, vd), w, (g, hd), stride, out),
            };
        }
    }
    weighted_sum_q8_portable((vq, vd), w, (g, hd), stride, out)
}

fn weighted_sum_q8_portable(
    (vq, vd): (&[i8], &[f16]),
    w: &[f32],
    (g, hd): (usize, usize),
    stride: usize,
    out: &mut [f32],
) {
    for h in 0..g {
        for p in 0..vq.len() / hd {
            let wp = w[h * stride + p];
            for (i, o) in out[h * hd..(h + 1) * hd].iter_mut().enumerate() {
                *o += wp * vd[(p * hd + i) / 32].to_f32() * vq[p * hd + i] as f32;
            }
        }
    }
}

/// [`weighted_sum_f16`] over 4-bit values, two to a byte (element `2i` in the low nibble of
/// byte `i`): `v_p ≈ d·(q − 8)` with one scale `vd` per 32 values.
pub fn weighted_sum_q4(
    (vq, vd): (&[u8], &[f16]),
    w: &[f32],
    (g, hd): (usize, usize),
    stride: usize,
    out: &mut [f32],
) {
    let n = vq.len() * 2 / hd;
    assert!(hd % 32 == 0 && vd.len() >= vq.len() / 16);
    assert!(fits(g, hd, out.len()) && rows_fit(g, n, stride, w.len()));
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked above; shapes checked by the asserts above.
        unsafe {
            return match g {
                1 => x86::weighted_sum_q4::<1, 4>(vq, vd, w, hd, stride, out),
                2 => x86::weighted_sum_q4::<2, 4>(vq, vd, w, hd, stride, out),
                3 => x86::weighted_sum_q4::<3, 2>(vq, vd, w, hd, stride, out),
                4 => x86::weighted_sum_q4::<4, 2>(vq, vd, w, hd, stride, out),
                _ => weighted_sum_q4_portable((vq, vd), w, (g, hd), stride, out),
            };
        }
    }
    weighted_sum_q4_portable((vq, vd), w, (g, hd), stride, out)
}

fn weighted_sum_q4_portable(
    (vq, vd): (&[u8], &[f16]),
    w: &[f32],
    (g, hd): (usize, usize),
    stride: usize,
    out: &mut [f32],
) {
    for h in 0..g {
        for p in 0..vq.len() * 2 / hd {
            let wp = w[h * stride + p];
            for (i, o) in out[h * hd..(h + 1) * hd].iter_mut().enumerate() {
                let j = p * hd + i;
                let level = (vq[j / 2] >> (4 * (j % 2)) & 15) as f32 - 8.0;
                *o += wp * vd[j / 32].to_f32() * level;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// `e^x` to within 2 ulp (Cephes' `expf`: `2^n · e^r`, `|r| ≤ ln 2 / 2`, a degree-6
    /// polynomial); below -87 (where `e^x` leaves the normal floats) it is 0, above 88 it is
    /// `e^88`, and NaN stays NaN.
    #[inline(always)]
    unsafe fn exp(x0: __m256) -> __m256 {
        // All ones where x ≥ -87 or x is NaN (a NaN goes through the arithmetic as NaN).
        let keep = _mm256_cmp_ps(x0, _mm256_set1_ps(-87.0), _CMP_NLT_UQ);
        // `maxps`/`minps` give their second operand where either is NaN: x0 goes second.
        let x = _mm256_min_ps(
            _mm256_set1_ps(88.0),
            _mm256_max_ps(_mm256_set1_ps(-87.0), x0),
        );
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r),
            _mm256_set1_ps(1.0),
        );
        let pow2n = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(pow2n)), keep)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax(x: &mut [f32]) {
        let n = x.len();
        let whole = n - n % 8;
        let p = x.as_mut_ptr();
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for i in (0..whole).step_by(8) {
            m = _mm256_max_ps(_mm256_loadu_ps(p.add(i)), m); // NaNs skipped, as by f32::max
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let mut max = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        for i in whole..n {
            max = max.max(*p.add(i));
        }
        let vmax = _mm256_set1_ps(max);
        let mut sum = _mm256_setzero_ps();
        for i in (0..whole).step_by(8) {
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vmax));
            _mm256_storeu_ps(p.add(i), e);
            sum = _mm256_add_ps(sum, e);
        }
        let mut total = hsum(sum);
        for i in whole..n {
            *p.add(i) = (*p.add(i) - max).exp();
            total += *p.add(i);
        }
        let inv = 1.0 / total;
        let vinv = _mm256_set1_ps(inv);
        for i in (0..whole).step_by(8) {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), vinv));
        }
        for i in whole..n {
            *p.add(i) *= inv;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(g: &mut [f32], u: &[f32]) {
        let n = g.len().min(u.len());
        let whole = n - n % 8;
        let (gp, up) = (g.as_mut_ptr(), u.as_ptr());
        let one = _mm256_set1_ps(1.0);
        for i in (0..whole).step_by(8) {
            let x = _mm256_loadu_ps(gp.add(i));
            let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), x));
            let y = _mm256_div_ps(x, _mm256_add_ps(one, e));
            _mm256_storeu_ps(gp.add(i), _mm256_mul_ps(y, _mm256_loadu_ps(up.add(i))));
        }
        for i in whole..n {
            let x = *gp.add(i);
            *gp.add(i) = x / (1.0 + (-x).exp()) * *up.add(i);
        }
    }

    /// `dst[j] = scale · Σ acc[j]` for `j < m`: the `P` (2 or 4) horizontal sums together,
    /// through `hadd`, rather than one by one.
    #[inline(always)]
    unsafe fn store_sums<const P: usize>(acc: &[__m256; P], m: usize, scale: f32, dst: *mut f32) {
        const { assert!(P == 2 || P == 4) };
        let t = if P == 4 {
            _mm256_hadd_ps(
                _mm256_hadd_ps(acc[0], acc[1]),
                _mm256_hadd_ps(acc[P - 2], acc[P - 1]), // (2 and 3: written so for any P)
            )
        } else {
            let t = _mm256_hadd_ps(acc[0], acc[1]);
            _mm256_hadd_ps(t, t)
        };
        let s = _mm_mul_ps(
            _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)),
            _mm_set1_ps(scale),
        );
        if m == 4 {
            _mm_storeu_ps(dst, s);
        } else {
            let mut sums = [0f32; 4];
            _mm_storeu_ps(sums.as_mut_ptr(), s);
            std::ptr::copy_nonoverlapping(sums.as_ptr(), dst, m);
        }
    }

    /// K or V rows of one head as the attention kernels read them, eight values at a time.
    trait Rows {
        /// The `c`-th eight values of row `p`, as floats, before the row's scale.
        unsafe fn eights(&self, p: usize, c: usize) -> __m256;
        /// The scale of those eight values (shared by the 4 eights of a 32-value group).
        unsafe fn scale(&self, p: usize, c: usize) -> f32;
    }

    /// f16 rows of `chunks` eights.
    struct F16Rows {
        at: *const __m128i,
        chunks: usize,
    }

    impl Rows for F16Rows {
        #[inline(always)]
        unsafe fn eights(&self, p: usize, c: usize) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(self.at.add(p * self.chunks + c)))
        }
        #[inline(always)]
        unsafe fn scale(&self, _: usize, _: usize) -> f32 {
            1.0
        }
    }

    /// One f16 scale as a float (F16C, inlined where the caller enables it).
    #[inline(always)]
    unsafe fn f16_scale(d: *const f16, i: usize) -> f32 {
        let bits = (*d.add(i)).to_bits();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// Signed-byte rows of `hd` values with one scale per 32.
    struct Q8Rows {
        q: *const i8,
        d: *const f16,
        hd: usize,
    }

    impl Rows for Q8Rows {
        #[inline(always)]
        unsafe fn eights(&self, p: usize, c: usize) -> __m256 {
            let at = self.q.add(p * self.hd + c * 8) as *const __m128i;
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(at)))
        }
        #[inline(always)]
        unsafe fn scale(&self, p: usize, c: usize) -> f32 {
            f16_scale(self.d, p * (self.hd / 32) + c / 4)
        }
    }

    /// Rows of `hd` 4-bit values, two to a byte (low nibble first), one scale per 32; a value
    /// is its level less 8.
    struct Q4Rows {
        q: *const u8,
        d: *const f16,
        hd: usize,
    }

    impl Rows for Q4Rows {
        #[inline(always)]
        unsafe fn eights(&self, p: usize, c: usize) -> __m256 {
            let four = (self.q.add((p * self.hd + c * 8) / 2) as *const i32).read_unaligned();
            let x = _mm_cvtsi32_si128(four);
            let nibble = _mm_set1_epi8(15);
            // Low and high nibbles of the 4 bytes, interleaved: elements 0..8 in order.
            let lo = _mm_and_si128(x, nibble);
            let hi = _mm_and_si128(_mm_srli_epi16(x, 4), nibble);
            let levels = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
            _mm256_sub_ps(levels, _mm256_set1_ps(8.0))
        }
        #[inline(always)]
        unsafe fn scale(&self, p: usize, c: usize) -> f32 {
            f16_scale(self.d, p * (self.hd / 32) + c / 4)
        }
    }

    /// `G` heads against `n` key rows, `P` (2 or 4) positions at a time (`G·P` sums in flight);
    /// each key's eights are scaled as they load. The caller checks shapes.
    #[inline(always)]
    unsafe fn scores<const G: usize, const P: usize>(
        keys: impl Rows,
        n: usize,
        q: &[f32],
        hd: usize,
        scale: f32,
        out: &mut [f32],
        stride: usize,
    ) {
        let (qp, op) = (q.as_ptr(), out.as_mut_ptr());
        let mut p = 0;
        while p < n {
            let m = P.min(n - p);
            let mut acc = [[_mm256_setzero_ps(); P]; G];
            for c in 0..hd / 8 {
                let mut kv = [_mm256_setzero_ps(); P];
                for (j, kv) in kv.iter_mut().enumerate().take(m) {
                    let d = _mm256_set1_ps(keys.scale(p + j, c));
                    *kv = _mm256_mul_ps(keys.eights(p + j, c), d);
                }
                for (h, acc) in acc.iter_mut().enumerate() {
                    let qv = _mm256_loadu_ps(qp.add(h * hd + c * 8));
                    for (a, kv) in acc.iter_mut().zip(&kv) {
                        *a = _mm256_fmadd_ps(*kv, qv, *a);
                    }
                }
            }
            for (h, acc) in acc.iter().enumerate() {
                store_sums(acc, m, scale, op.add(h * stride + p));
            }
            p += m;
        }
    }

    /// `G` heads over `n` value rows, `C` eights of columns at a time (`G·C` sums in flight),
    /// positions in order. A pass of `C` ≤ 4 eights stays in one scale group, so each
    /// position's weight is scaled once per head. The caller checks shapes.
    #[inline(always)]
    unsafe fn weighted_sum<const G: usize, const C: usize>(
        values: impl Rows,
        n: usize,
        w: &[f32],
        hd: usize,
        stride: usize,
        out: &mut [f32],
    ) {
        let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
        for c0 in (0..hd / 8).step_by(C) {
            let mut acc = [[_mm256_setzero_ps(); C]; G];
            for p in 0..n {
                let mut vv = [_mm256_setzero_ps(); C];
                for (c, vv) in vv.iter_mut().enumerate() {
                    *vv = values.eights(p, c0 + c);
                }
                let d = values.scale(p, c0);
                for (h, acc) in acc.iter_mut().enumerate() {
                    let wv = _mm256_set1_ps(*wp.add(h * stride + p) * d);
                    for (a, vv) in acc.iter_mut().zip(&vv) {
                        *a = _mm256_fmadd_ps(*vv, wv, *a);
                    }
                }
            }
            for (h, acc) in acc.iter().enumerate() {
                for (c, a) in acc.iter().enumerate() {
                    let o = op.add(h * hd + (c0 + c) * 8);
                    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), *a));
                }
            }
        }
    }

    /// [`scores`] over f16 keys.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores_f16<const G: usize, const P: usize>(
        k: &[f16],
        q: &[f32],
        hd: usize,
        scale: f32,
        out: &mut [f32],
        stride: usize,
    ) {
        let keys = F16Rows {
            at: k.as_ptr() as *const __m128i,
            chunks: hd / 8,
        };
        scores::<G, P>(keys, k.len() / hd, q, hd, scale, out, stride)
    }

    /// [`weighted_sum`] over f16 values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_sum_f16<const G: usize, const C: usize>(
        v: &[f16],
        w: &[f32],
        hd: usize,
        stride: usize,
        out: &mut [f32],
    ) {
        let values = F16Rows {
            at: v.as_ptr() as *const __m128i,
            chunks: hd / 8,
        };
        weighted_sum::<G, C>(values, v.len() / hd, w, hd, stride, out)
    }

    /// [`scores`] over 8-bit keys.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores_q8<const G: usize, const P: usize>(
        kq: &[i8],
        kd: &[f16],
        q: &[f32],
        hd: usize,
        scale: f32,
        out: &mut [f32],
        stride: usize,
    ) {
        let keys = Q8Rows {
            q: kq.as_ptr(),
            d: kd.as_ptr(),
            hd,
        };
        scores::<G, P>(keys, kq.len() / hd, q, hd, scale, out, stride)
    }

    /// [`weighted_sum`] over 8-bit values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_sum_q8<const G: usize, const C: usize>(
        vq: &[i8],
        vd: &[f16],
        w: &[f32],
        hd: usize,
        stride: usize,
        out: &mut [f32],
    ) {
        let values = Q8Rows {
            q: vq.as_ptr(),
            d: vd.as_ptr(),
            hd,
        };
        weighted_sum::<G, C>(values, vq.len() / hd, w, hd, stride, out)
    }

    /// [`weighted_sum`] over 4-bit values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_sum_q4<const G: usize, const C: usize>(
        vq: &[u8],
        vd: &[f16],
        w: &[f32],
        hd: usize,
        stride: usize,
        out: &mut [f32],
    ) {
        let values = Q4Rows {
            q: vq.as_ptr(),
            d: vd.as_ptr(),
            hd,
        };
        weighted_sum::<G, C>(values, vq.len() * 2 / hd, w, hd, stride, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                acc,
            );
            i += 8;
        }
        let mut s = hsum(acc);
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(k: &[f16], q: &[f32]) -> f32 {
        let n = k.len().min(q.len());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let kv = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(i) as *const __m128i));
            acc = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q.as_ptr().add(i)), acc);
            i += 8;
        }
        let mut s = hsum(acc);
        while i < n {
            s += k[i].to_f32() * q[i];
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_f16(out: &mut [f32], v: &[f16], w: f32) {
        let n = out.len().min(v.len());
        let wv = _mm256_set1_ps(w);
        let mut i = 0;
        while i + 8 <= n {
            let vv = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i) as *const __m128i));
            let o = _mm256_loadu_ps(out.as_ptr().add(i));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_fmadd_ps(vv, wv, o));
            i += 8;
        }
        while i < n {
            out[i] += w * v[i].to_f32();
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_matches_scalar() {
        let a: Vec<f32> = (0..77).map(|i| (i as f32 * 0.3).sin()).collect();
        let b: Vec<f32> = (0..77).map(|i| (i as f32 * 0.7).cos()).collect();
        let h: Vec<f16> = a.iter().map(|&x| f16::from_f32(x)).collect();
        let exact: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - exact).abs() < 1e-4);
        assert!((dot_f16(&h, &b) - exact).abs() < 1e-2);
        let mut out = b.clone();
        axpy_f16(&mut out, &h, 2.0);
        for i in 0..77 {
            assert!((out[i] - (b[i] + 2.0 * a[i])).abs() < 1e-2);
        }
    }

    #[test]
    fn softmax_matches_the_portable_one() {
        for n in [1, 7, 8, 37, 1000] {
            // Spread over ±60 around the max, one score far below (its weight is 0 or ~0).
            let mut x: Vec<f32> = (0..n).map(|i| ((i as f32) * 1.7).sin() * 60.0).collect();
            if n > 8 {
                x[3] = -1e30;
                x[5] = f32::NEG_INFINITY;
                x[6] = x[7] - 87.0; // just at the edge of the normal floats
            }
            let mut fast = x.clone();
            softmax(&mut fast);
            softmax_portable(&mut x);
            for (a, b) in fast.iter().zip(&x) {
                assert!((a - b).abs() <= 1e-6 * b.abs() + 1e-38, "n={n}: {a} vs {b}");
            }
            let sum: f32 = fast.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "n={n}: sums to {sum}");
        }
        // A NaN score makes every weight NaN, on both paths (as softmax in f32 arithmetic does).
        for at in [2, 12] {
            let mut x: Vec<f32> = (0..16).map(|i| i as f32).collect();
            x[at] = f32::NAN;
            let mut fast = x.clone();
            softmax(&mut fast);
            softmax_portable(&mut x);
            assert!(
                fast.iter().chain(&x).all(|v| v.is_nan()),
                "NaN at {at}: {fast:?}"
            );
        }
    }

    #[test]
    fn silu_matches_the_portable_one() {
        let mut g: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.9).collect();
        g[5] = f32::INFINITY;
        let u: Vec<f32> = (0..203).map(|i| ((i as f32) * 0.3).cos()).collect();
        let (mut fast, mut slow) = (g.clone(), g.clone());
        silu_mul(&mut fast, &u);
        silu_mul_portable(&mut slow, &u);
        for (a, b) in fast.iter().zip(&slow) {
            assert!(
                a == b || (a - b).abs() <= 1e-6 * b.abs() + 1e-30,
                "{a} vs {b}"
            );
        }
    }

    #[test]
    fn attention_kernels_match_the_portable_ones() {
        // Every kernel shape (rows of 8, 16 and 32+ values for each group size) and the
        // portable fallback (g = 5).
        for (g, hd, n) in [
            (1, 64, 7),
            (1, 40, 5),
            (2, 64, 32),
            (2, 48, 3),
            (1, 48, 4),
            (2, 40, 6),
            (3, 64, 33),
            (3, 24, 4),
            (4, 128, 5),
            (4, 32, 2),
            (5, 64, 9),
        ] {
            let stride = n + 3;
            let k: Vec<f16> = (0..n * hd)
                .map(|i| f16::from_f32(((i * 7 % 13) as f32 - 6.0) * 0.1))
                .collect();
            let q: Vec<f32> = (0..g * hd).map(|i| (i as f32 * 0.37).sin()).collect();
            let (mut fast, mut slow) = (vec![0f32; g * stride], vec![0f32; g * stride]);
            scores_f16(&k, &q, (g, hd), 0.125, &mut fast, stride);
            scores_f16_portable(&k, &q, (g, hd), 0.125, &mut slow, stride);
            for (a, b) in fast.iter().zip(&slow) {
                assert!(
                    (a - b).abs() < 1e-4,
                    "scores g={g} hd={hd} n={n}: {a} vs {b}"
                );
            }
            assert!(fast.iter().any(|&x| x != 0.0));
            let (mut fast_out, mut slow_out) = (vec![1f32; g * hd], vec![1f32; g * hd]);
            weighted_sum_f16(&k, &fast, (g, hd), stride, &mut fast_out);
            weighted_sum_f16_portable(&k, &slow, (g, hd), stride, &mut slow_out);
            for (a, b) in fast_out.iter().zip(&slow_out) {
                assert!((a - b).abs() < 1e-3, "sums g={g} hd={hd} n={n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn q8_attention_kernels_match_the_portable_ones() {
        for (g, hd, n) in [
            (1, 64, 7),
            (1, 32, 3),
            (2, 64, 32),
            (2, 32, 1),
            (3, 64, 33),
            (3, 32, 6),
            (4, 128, 5),
            (4, 32, 9),
            (5, 32, 9),
        ] {
            let stride = n + 3;
            let kq: Vec<i8> = (0..n * hd)
                .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
                .collect();
            let kd: Vec<f16> = (0..n * hd / 32)
                .map(|i| f16::from_f32(0.01 + i as f32 * 0.003))
                .collect();
            let q: Vec<f32> = (0..g * hd).map(|i| (i as f32 * 0.37).sin()).collect();
            let (mut fast, mut slow) = (vec![0f32; g * stride], vec![0f32; g * stride]);
            scores_q8((&kq, &kd), &q, (g, hd), 0.125, &mut fast, stride);
            scores_q8_portable((&kq, &kd), &q, (g, hd), 0.125, &mut slow, stride);
            for (a, b) in fast.iter().zip(&slow) {
                assert!(
                    (a - b).abs() < 1e-3 * (1.0 + b.abs()),
                    "scores g={g} hd={hd} n={n}: {a} vs {b}"
                );
            }
            assert!(fast.iter().any(|&x| x != 0.0));
            let (mut fast_out, mut slow_out) = (vec![1f32; g * hd], vec![1f32; g * hd]);
            weighted_sum_q8((&kq, &kd), &fast, (g, hd), stride, &mut fast_out);
            weighted_sum_q8_portable((&kq, &kd), &slow, (g, hd), stride, &mut slow_out);
            for (a, b) in fast_out.iter().zip(&slow_out) {
                assert!(
                    (a - b).abs() < 1e-3 * (1.0 + b.abs()),
                    "sums g={g} hd={hd} n={n}: {a} vs {b}"
                );
            }
            // 4-bit values: every level, scales of both signs.
            let vq: Vec<u8> = (0..n * hd / 2).map(|i| (i * 29 % 256) as u8).collect();
            let vd: Vec<f16> = (0..n * hd / 32)
                .map(|i| {
                    f16::from_f32((0.02 + i as f32 * 0.001) * if i % 3 == 0 { -1.0 } else { 1.0 })
                })
                .collect();
            let (mut fast_out, mut slow_out) = (vec![1f32; g * hd], vec![1f32; g * hd]);
            weighted_sum_q4((&vq, &vd), &fast, (g, hd), stride, &mut fast_out);
            weighted_sum_q4_portable((&vq, &vd), &fast, (g, hd), stride, &mut slow_out);
            for (a, b) in fast_out.iter().zip(&slow_out) {
                assert!(
                    (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "4-bit sums g={g} hd={hd} n={n}: {a} vs {b}"
                );
            }
            assert!(fast_out.iter().any(|&x| x != 1.0));
        }
    }
}
