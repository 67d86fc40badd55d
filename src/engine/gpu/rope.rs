//! Rotary position embedding of a step's query rows in one op, [`RopeRows`]: read straight from
//! the fused projection's columns (strided rows) into contiguous f32 rows, where candle's
//! `rope_i` wants a contiguous copy first. GPU side `rope.cu`; the CPU side, for candle's CPU
//! device, does the same arithmetic. [`turned`] is the rotation both this op and the K rows
//! written by [`super::kv_write::KvWrite`] use.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Storage};

#[cfg(any(test, feature = "cuda"))]
use super::launch::{Launch, Scalar};

/// Value `c` of one head's row after turning pair `c / 2` by the angle whose cosine and sine
/// are `cos[c / 2]`, `sin[c / 2]` (interleaved pairs, as candle's `rope_i`).
pub(super) fn turned(row: &[f32], c: usize, cos: &[f32], sin: &[f32]) -> f32 {
    let (x0, x1) = (row[c & !1], row[c | 1]);
    let (cs, sn) = (cos[c / 2], sin[c / 2]);
    if c & 1 == 1 {
        x0 * sn + x1 * cs
    } else {
        x0 * cs - x1 * sn
    }
}

/// A step's RoPE tables as f32 slices on the CPU, checked against `t` tokens of `head_dim`.
pub(super) fn cpu_tables<'a>(
    tables: (&'a Storage, &'a Layout),
    t: usize,
    head_dim: usize,
) -> Result<&'a [f32]> {
    let (Storage::Cpu(CpuStorage::F32(v)), layout) = tables else {
        bail!("rope: the tables must be f32 on the CPU");
    };
    if !layout.is_contiguous() || layout.shape().elem_count() != t * head_dim / 2 {
        bail!("rope: tables of {:?} for {t} tokens", layout.shape());
    }
    Ok(&v[layout.start_offset()..][..t * head_dim / 2])
}

/// Turns `heads` heads of `head_dim` at the start of each row of a `t × ·` f32 source by the
/// step's tables (`cos`, `sin`: `t × head_dim / 2` values); the output is `t × heads·head_dim`.
pub(super) struct RopeRows {
    pub heads: usize,
    pub head_dim: usize,
}

impl RopeRows {
    /// The kernel's launch for `t` tokens whose rows are `src_stride` apart: a thread per value.
    #[cfg(any(test, feature = "cuda"))]
    pub fn launch(&self, t: usize, src_stride: usize) -> Result<Launch> {
        Launch::per_value(
            "rope_rows_f32",
            t * self.heads * self.head_dim,
            vec![
                Scalar::size(t)?,
                Scalar::size(self.heads)?,
                Scalar::size(self.head_dim)?,
                Scalar::size(src_stride)?,
            ],
        )
    }

    /// (tokens, the source's row stride).
    fn check(&self, src: &Layout, cos: &Layout, sin: &Layout) -> Result<(usize, usize)> {
        let (t, cols) = src.shape().dims2()?;
        let half = self.head_dim / 2;
        if cols < self.heads * self.head_dim || src.stride()[1] != 1 || self.head_dim % 2 == 1 {
            bail!("rope: {t} × {cols} source (strides {:?})", src.stride());
        }
        for l in [cos, sin] {
            if !l.is_contiguous() || l.shape().elem_count() != t * half {
                bail!("rope: tables of {:?} for {t} tokens", l.shape());
            }
        }
        Ok((t, src.stride()[0]))
    }
}

impl CustomOp3 for RopeRows {
    fn name(&self) -> &'static str {
        "rope-rows"
    }

    fn cpu_fwd(
        &self,
        src: &CpuStorage,
        src_l: &Layout,
        cos: &CpuStorage,
        cos_l: &Layout,
        sin: &CpuStorage,
        sin_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (t, stride) = self.check(src_l, cos_l, sin_l)?;
        let (CpuStorage::F32(src), CpuStorage::F32(cos), CpuStorage::F32(sin)) = (src, cos, sin)
        else {
            bail!("rope: needs f32 rows and tables");
        };
        let (hd, half, width) = (self.head_dim, self.head_dim / 2, self.heads * self.head_dim);
        let (cos, sin) = (&cos[cos_l.start_offset()..], &sin[sin_l.start_offset()..]);
        let mut out = Vec::with_capacity(t * width);
        for token in 0..t {
            let row = &src[src_l.start_offset() + token * stride..];
            let (c, s) = (&cos[token * half..][..half], &sin[token * half..][..half]);
            for h in 0..self.heads {
                let head = &row[h * hd..][..hd];
                out.extend((0..hd).map(|d| turned(head, d, c, s)));
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((t, width))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        src: &candle_core::CudaStorage,
        src_l: &Layout,
        cos: &candle_core::CudaStorage,
        cos_l: &Layout,
        sin: &candle_core::CudaStorage,
        sin_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;

        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rope.ptx"));
        let (t, stride) = self.check(src_l, cos_l, sin_l)?;
        let width = self.heads * self.head_dim;
        let launch = self.launch(t, stride)?;
        let dev = src.device().clone();
        let func = dev.get_or_load_custom_func(&launch.kernel, "smolchat_rope", PTX)?;
        let src = src.as_cuda_slice::<f32>()?.slice(src_l.start_offset()..);
        let cos = cos.as_cuda_slice::<f32>()?.slice(cos_l.start_offset()..);
        let sin = sin.as_cuda_slice::<f32>()?.slice(sin_l.start_offset()..);
        // SAFETY: the kernel writes every value.
        let out = unsafe { dev.alloc::<f32>(t * width)? };
        let mut builder = func.builder();
        builder.arg(&src);
        builder.arg(&cos);
        builder.arg(&sin);
        builder.arg(&out);
        launch.push_scalars(&mut builder);
        // SAFETY: the operands were checked above.
        unsafe { builder.launch(launch.config()) }.w()?;
        let out = candle_core::CudaStorage::wrap_cuda_slice(out, dev);
        Ok((out, Shape::from((t, width))))
    }
}

/// RoPE tables of `t` tokens for the tests: `f` (cos or sin) of made-up angles, `t × 1 × hd/2`.
#[cfg(test)]
pub(super) fn test_tables(t: usize, hd: usize, f: fn(f32) -> f32) -> candle_core::Tensor {
    let v: Vec<f32> = (0..t * hd / 2).map(|i| f(i as f32 * 0.3 + 0.1)).collect();
    candle_core::Tensor::from_vec(v, (t, 1, hd / 2), &candle_core::Device::Cpu).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn turns_strided_rows_as_candles_rope_i_turns_contiguous_ones() {
        let dev = Device::Cpu;
        let (t, heads, hd) = (3, 2, 8);
        let wide = Tensor::from_vec(
            (0..t * 20)
                .map(|i| (i as f32 * 0.61).sin())
                .collect::<Vec<_>>(),
            (t, 20),
            &dev,
        )
        .unwrap();
        let x = wide.narrow(1, 4, heads * hd).unwrap();
        let (cos, sin) = (test_tables(t, hd, f32::cos), test_tables(t, hd, f32::sin));
        let ours = x
            .apply_op3_no_bwd(
                &cos,
                &sin,
                &RopeRows {
                    heads,
                    head_dim: hd,
                },
            )
            .unwrap();
        let theirs = candle_nn::rotary_emb::rope_i(
            &x.contiguous().unwrap().reshape((t, heads, 1, hd)).unwrap(),
            &cos,
            &sin,
        )
        .unwrap()
        .reshape((t, heads * hd))
        .unwrap();
        assert_eq!(
            ours.to_vec2::<f32>().unwrap(),
            theirs.to_vec2::<f32>().unwrap()
        );
        assert!(x
            .apply_op3_no_bwd(
                &cos.narrow(0, 0, 2).unwrap(),
                &sin,
                &RopeRows {
                    heads,
                    head_dim: hd
                }
            )
            .is_err());
    }
}
