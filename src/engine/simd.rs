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

/// Attention scores of `g` query heads against `n` f16 key rows: `out[h·n + p] = scale·k_p·q_h`
/// (`q`: `g × hd`, contiguous). Each key row is loaded once for all heads of its group.
pub fn scores_f16(k: &[f16], q: &[f32], g: usize, hd: usize, scale: f32, out: &mut [f32]) {
    let n = k.len() / hd;
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && hd % 8 == 0 && g <= 4 {
        // SAFETY: features checked above; shapes checked by the kernel's asserts.
        return unsafe { x86::scores_f16(k, q, g, hd, scale, out) };
    }
    for h in 0..g {
        for p in 0..n {
            out[h * n + p] = scale * dot_f16(&k[p * hd..(p + 1) * hd], &q[h * hd..(h + 1) * hd]);
        }
    }
}

/// `out[h] += Σ_p w[h·n + p]·v_p` for `g` heads over `n` f16 value rows (`out`: `g × hd`).
pub fn weighted_sum_f16(v: &[f16], w: &[f32], g: usize, hd: usize, out: &mut [f32]) {
    let n = v.len() / hd;
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && hd % 8 == 0 && g <= 4 {
        // SAFETY: features checked above.
        return unsafe { x86::weighted_sum_f16(v, w, g, hd, out) };
    }
    for h in 0..g {
        for p in 0..n {
            axpy_f16(
                &mut out[h * hd..(h + 1) * hd],
                &v[p * hd..(p + 1) * hd],
                w[h * n + p],
            );
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

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores_f16(
        k: &[f16],
        q: &[f32],
        g: usize,
        hd: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let n = k.len() / hd;
        assert!(q.len() >= g * hd && out.len() >= g * n);
        let kp = k.as_ptr() as *const __m128i;
        for p in 0..n {
            let mut acc = [_mm256_setzero_ps(); 4];
            for c in 0..hd / 8 {
                let kv = _mm256_cvtph_ps(_mm_loadu_si128(kp.add(p * hd / 8 + c)));
                for (h, a) in acc.iter_mut().enumerate().take(g) {
                    *a = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q.as_ptr().add(h * hd + c * 8)), *a);
                }
            }
            for (h, a) in acc.iter().enumerate().take(g) {
                *out.get_unchecked_mut(h * n + p) = scale * hsum(*a);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_sum_f16(v: &[f16], w: &[f32], g: usize, hd: usize, out: &mut [f32]) {
        let n = v.len() / hd;
        assert!(w.len() >= g * n && out.len() >= g * hd && hd <= 256);
        let vp = v.as_ptr() as *const __m128i;
        // Accumulate 8 columns at a time for every head, in registers, over all positions.
        for c in 0..hd / 8 {
            let mut acc = [_mm256_setzero_ps(); 4];
            for p in 0..n {
                let vv = _mm256_cvtph_ps(_mm_loadu_si128(vp.add(p * hd / 8 + c)));
                for (h, a) in acc.iter_mut().enumerate().take(g) {
                    *a = _mm256_fmadd_ps(vv, _mm256_set1_ps(*w.get_unchecked(h * n + p)), *a);
                }
            }
            for (h, a) in acc.iter().enumerate().take(g) {
                let o = out.as_mut_ptr().add(h * hd + c * 8);
                _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), *a));
            }
        }
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
}
