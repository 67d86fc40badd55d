//! Writing a step's new K and V rows into a layer's slabs: one custom op, [`KvWrite`], whose GPU
//! side is `kv_write.cu` (one thread per value; candle's `scatter_set` walks the rows one after
//! another in `head_dim` threads) and whose CPU side, for candle's CPU device, does the same in
//! a loop. The f32 → f16 rounding (round to nearest even) is the one `to_dtype` does, so both
//! write the very bytes that `to_dtype` + `scatter_set` wrote.

use candle_core::{bail, CpuStorage, InplaceOp3, Layout, Result, Tensor};
use half::f16;

#[cfg(any(test, feature = "cuda"))]
use super::launch::{Launch, Scalar};
use super::rope::{cpu_tables, turned};

/// Writes `src` (f32, `t × ·` with `n_kv` heads of `head_dim` values at the start of each row;
/// rows may be strided, as the column ranges of a fused projection are) into an f16 slab of
/// `head_dim`-wide rows: step row `r` (token `r / n_kv`, head `r % n_kv`) goes to slab row
/// `rows[r]`. The caller guarantees the rows are inside the slab. With `rope` (the step's cos
/// and sin tables, `t × head_dim / 2`), each head is turned by its token's angles on the way, as
/// [`super::rope::RopeRows`] turns the queries.
pub(super) struct KvWrite<'a> {
    pub n_kv: usize,
    pub head_dim: usize,
    pub rope: Option<(&'a Tensor, &'a Tensor)>,
}

/// Where [`KvWrite`]'s operands start, in elements, and the source's row stride.
struct Operands {
    slab: usize,
    src: usize,
    src_stride: usize,
    rows: usize,
    n_rows: usize,
}

impl KvWrite<'_> {
    /// The kernel's launch for `n_rows` rows from a source whose rows are `src_stride` apart:
    /// a thread per value.
    #[cfg(any(test, feature = "cuda"))]
    pub fn launch(&self, n_rows: usize, src_stride: usize) -> Result<Launch> {
        Launch::per_value(
            "kv_write_f32",
            n_rows * self.head_dim,
            vec![
                Scalar::size(n_rows)?,
                Scalar::size(self.head_dim)?,
                Scalar::size(self.n_kv)?,
                Scalar::size(src_stride)?,
                Scalar::U32(self.rope.is_some() as u32),
            ],
        )
    }

    fn operands(&self, slab: &Layout, src: &Layout, rows: &Layout) -> Result<Operands> {
        let hd = self.head_dim;
        let (slab_rows, width) = slab.shape().dims2()?;
        let (t, cols) = src.shape().dims2()?;
        let n_rows = rows.shape().dims1()?;
        if width != hd || !slab.is_contiguous() {
            bail!("kv-write: the slab must be contiguous rows of {hd}");
        }
        if cols < self.n_kv * hd || src.stride()[1] != 1 || n_rows != t * self.n_kv {
            bail!(
                "kv-write: {t} × {cols} source (strides {:?}) for {n_rows} rows of {} heads",
                src.stride(),
                self.n_kv
            );
        }
        if self.rope.is_some() && hd % 2 == 1 {
            bail!("kv-write: RoPE turns pairs: head size {hd} is odd");
        }
        if !rows.is_contiguous() || slab_rows > u32::MAX as usize {
            bail!("kv-write: rows must be contiguous u32 slab rows");
        }
        Ok(Operands {
            slab: slab.start_offset(),
            src: src.start_offset(),
            src_stride: src.stride()[0],
            rows: rows.start_offset(),
            n_rows,
        })
    }
}

impl InplaceOp3 for KvWrite<'_> {
    fn name(&self) -> &'static str {
        "kv-write"
    }

    fn cpu_fwd(
        &self,
        slab: &mut CpuStorage,
        slab_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
        rows: &CpuStorage,
        rows_l: &Layout,
    ) -> Result<()> {
        let o = self.operands(slab_l, src_l, rows_l)?;
        let (CpuStorage::F16(slab), CpuStorage::F32(src), CpuStorage::U32(rows)) =
            (slab, src, rows)
        else {
            bail!("kv-write: needs an f16 slab, f32 rows and u32 slab rows");
        };
        let hd = self.head_dim;
        let slab = &mut slab[o.slab..];
        let rows = &rows[o.rows..o.rows + o.n_rows];
        // Checked before anything is written: a refused write changes nothing.
        if let Some(row) = rows.iter().find(|&&r| (r as usize + 1) * hd > slab.len()) {
            bail!("kv-write: slab row {row} is outside the slab");
        }
        let t = o.n_rows / self.n_kv;
        let guards = self
            .rope
            .map(|(c, s)| (c.storage_and_layout(), s.storage_and_layout()));
        let tables = match &guards {
            Some(((c, cl), (s, sl))) => Some((
                cpu_tables((&**c, *cl), t, hd)?,
                cpu_tables((&**s, *sl), t, hd)?,
            )),
            None => None,
        };
        let half = hd / 2;
        for (r, &row) in rows.iter().enumerate() {
            let (token, head) = (r / self.n_kv, r % self.n_kv);
            let from = &src[o.src + token * o.src_stride + head * hd..][..hd];
            let to = &mut slab[row as usize * hd..][..hd];
            match tables {
                Some((cos, sin)) => {
                    let (c, s) = (&cos[token * half..][..half], &sin[token * half..][..half]);
                    for (d, x) in to.iter_mut().enumerate() {
                        *x = f16::from_f32(turned(from, d, c, s));
                    }
                }
                None => {
                    for (d, &x) in to.iter_mut().zip(from) {
                        *d = f16::from_f32(x);
                    }
                }
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        slab: &mut candle_core::CudaStorage,
        slab_l: &Layout,
        src: &candle_core::CudaStorage,
        src_l: &Layout,
        rows: &candle_core::CudaStorage,
        rows_l: &Layout,
    ) -> Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;

        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kv_write.ptx"));
        let o = self.operands(slab_l, src_l, rows_l)?;
        let values = o.n_rows * self.head_dim;
        if values == 0 {
            return Ok(());
        }
        let launch = self.launch(o.n_rows, o.src_stride)?;
        let dev = slab.device().clone();
        let func = dev.get_or_load_custom_func(&launch.kernel, "smolchat_kv_write", PTX)?;
        let src = src.as_cuda_slice::<f32>()?.slice(o.src..);
        let rows = rows
            .as_cuda_slice::<u32>()?
            .slice(o.rows..o.rows + o.n_rows);
        let mut slab = slab.as_cuda_slice_mut::<f16>()?.slice_mut(o.slab..);
        let t = o.n_rows / self.n_kv;
        let guards = self
            .rope
            .map(|(c, s)| (c.storage_and_layout(), s.storage_and_layout()));
        let tables = match &guards {
            Some(((c, cl), (s, sl))) => {
                fn view<'s>(
                    st: &'s candle_core::Storage,
                    l: &Layout,
                    values: usize,
                ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'s, f32>>
                {
                    let candle_core::Storage::Cuda(st) = st else {
                        bail!("kv-write: the RoPE tables must be on the GPU");
                    };
                    if !l.is_contiguous() || l.shape().elem_count() != values {
                        bail!(
                            "kv-write: RoPE tables of {:?} for {values} values",
                            l.shape()
                        );
                    }
                    Ok(st.as_cuda_slice::<f32>()?.slice(l.start_offset()..))
                }
                let values = t * self.head_dim / 2;
                Some((view(&**c, cl, values)?, view(&**s, sl, values)?))
            }
            None => None,
        };
        // Without RoPE the kernel reads no table: the source stands in for both pointers.
        let (cos, sin) = match &tables {
            Some((c, s)) => (c, s),
            None => (&src, &src),
        };
        let mut builder = func.builder();
        builder.arg(&src);
        builder.arg(&rows);
        builder.arg(&mut slab);
        builder.arg(cos);
        builder.arg(sin);
        launch.push_scalars(&mut builder);
        // SAFETY: the operands were checked above; the slab rows come from the block pool.
        unsafe { builder.launch(launch.config()) }.w()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn writes_the_bytes_that_to_dtype_and_scatter_set_write_also_from_strided_rows_and_with_rope() {
        let dev = Device::Cpu;
        let (n_kv, hd, t) = (2, 4, 3);
        // A fused projection's output: 3 tokens × (8 other columns, then K's 2 heads × 4).
        let fused = Tensor::from_vec(
            (0..t * 16)
                .map(|i| i as f32 * 0.37 - 5.0)
                .collect::<Vec<_>>(),
            (t, 16),
            &dev,
        )
        .unwrap();
        let k = fused.narrow(1, 8, n_kv * hd).unwrap();
        assert!(!k.is_contiguous());
        let rows: Vec<u32> = vec![9, 2, 5, 0, 11, 7];

        let ours = Tensor::zeros((12, hd), DType::F16, &dev).unwrap();
        let rows_t = Tensor::from_vec(rows.clone(), rows.len(), &dev).unwrap();
        ours.inplace_op3(
            &k,
            &rows_t,
            &KvWrite {
                n_kv,
                head_dim: hd,
                rope: None,
            },
        )
        .unwrap();

        let theirs = Tensor::zeros((12, hd), DType::F16, &dev).unwrap();
        let idx: Vec<u32> = rows.iter().flat_map(|&r| [r; 4]).collect();
        theirs
            .scatter_set(
                &Tensor::from_vec(idx, (t * n_kv, hd), &dev).unwrap(),
                &k.to_dtype(DType::F16)
                    .unwrap()
                    .reshape((t * n_kv, hd))
                    .unwrap(),
                0,
            )
            .unwrap();
        let (a, b) = (
            ours.to_vec2::<f16>().unwrap(),
            theirs.to_vec2::<f16>().unwrap(),
        );
        assert_eq!(a, b);
        assert_ne!(a[9], vec![f16::ZERO; 4], "row 9 was written");
        assert_eq!(a[1], vec![f16::ZERO; 4], "row 1 was not");

        // With RoPE: the bytes of candle's rope_i, then to_dtype and scatter_set.
        let tables = super::super::rope::test_tables;
        let (cos, sin) = (tables(t, hd, f32::cos), tables(t, hd, f32::sin));
        let turned = Tensor::zeros((12, hd), DType::F16, &dev).unwrap();
        let op = KvWrite {
            n_kv,
            head_dim: hd,
            rope: Some((&cos, &sin)),
        };
        turned.inplace_op3(&k, &rows_t, &op).unwrap();
        let rotated = candle_nn::rotary_emb::rope_i(
            &k.contiguous().unwrap().reshape((t, n_kv, 1, hd)).unwrap(),
            &cos,
            &sin,
        )
        .unwrap();
        let expected = Tensor::zeros((12, hd), DType::F16, &dev).unwrap();
        let idx: Vec<u32> = rows.iter().flat_map(|&r| [r; 4]).collect();
        expected
            .scatter_set(
                &Tensor::from_vec(idx, (t * n_kv, hd), &dev).unwrap(),
                &rotated
                    .to_dtype(DType::F16)
                    .unwrap()
                    .reshape((t * n_kv, hd))
                    .unwrap(),
                0,
            )
            .unwrap();
        assert_eq!(
            turned.to_vec2::<f16>().unwrap(),
            expected.to_vec2::<f16>().unwrap()
        );
        assert_ne!(turned.to_vec2::<f16>().unwrap(), a, "RoPE changed the rows");

        // A row outside the slab is an error that writes nothing, not a write past its end.
        let fresh = Tensor::zeros((12, hd), DType::F16, &dev).unwrap();
        let bad = Tensor::from_vec(vec![0u32, 1, 2, 3, 4, 12], 6, &dev).unwrap();
        assert!(fresh
            .inplace_op3(
                &k,
                &bad,
                &KvWrite {
                    n_kv,
                    head_dim: hd,
                    rope: None
                }
            )
            .is_err());
        assert_eq!(
            fresh.to_vec2::<f16>().unwrap(),
            vec![vec![f16::ZERO; 4]; 12]
        );
    }
}
