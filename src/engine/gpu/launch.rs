//! How each of our kernels is launched (its name, grid and block sizes, and the scalar
//! arguments that follow its buffers), worked out in one place for the GPU (`cuda_fwd`) and for
//! the kernel emulator in the tests, which runs the `.cu` sources themselves on the CPU.

use candle_core::{bail, Result};

/// A kernel's 32-bit scalar argument.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Scalar {
    U32(u32),
    F32(f32),
}

/// A size or stride as the kernels take it (`unsigned int`), refused when it does not fit.
pub(super) fn size(v: usize) -> Result<u32> {
    match u32::try_from(v) {
        Ok(v) => Ok(v),
        Err(_) => bail!("kernel launch: {v} does not fit the kernels' 32-bit sizes"),
    }
}

impl Scalar {
    /// A size or stride argument.
    pub fn size(v: usize) -> Result<Self> {
        size(v).map(Scalar::U32)
    }

    /// The argument's bits, as the kernel reads them.
    #[cfg(test)]
    pub fn bits(self) -> u32 {
        match self {
            Scalar::U32(v) => v,
            Scalar::F32(v) => v.to_bits(),
        }
    }
}

/// One launch: `kernel` over `grid` blocks of `block` threads, its buffers (pushed by the
/// caller, in the kernel's parameter order) followed by `scalars`.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Launch {
    pub kernel: String,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub scalars: Vec<Scalar>,
}

impl Launch {
    /// One thread per value, in blocks of 1,024 (at least one block).
    pub fn per_value(kernel: &str, values: usize, scalars: Vec<Scalar>) -> Result<Self> {
        const THREADS: u32 = 1024;
        // The kernels number their threads in 32 bits.
        let blocks = values.div_ceil(THREADS as usize).max(1);
        if blocks > (u32::MAX / THREADS) as usize {
            bail!("kernel launch: {values} values are more than 32-bit thread numbers reach");
        }
        Ok(Self {
            kernel: kernel.to_owned(),
            grid: [blocks as u32, 1, 1],
            block: [THREADS, 1, 1],
            scalars,
        })
    }

    #[cfg(feature = "cuda")]
    pub fn config(&self) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        let [gx, gy, gz] = self.grid;
        let [bx, by, bz] = self.block;
        candle_core::cuda_backend::cudarc::driver::LaunchConfig {
            grid_dim: (gx, gy, gz),
            block_dim: (bx, by, bz),
            shared_mem_bytes: 0,
        }
    }

    /// Pushes the scalars, after the caller's buffers.
    #[cfg(feature = "cuda")]
    pub fn push_scalars<'a>(
        &'a self,
        builder: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>,
    ) {
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        for s in &self.scalars {
            match s {
                Scalar::U32(v) => builder.arg(v),
                Scalar::F32(v) => builder.arg(v),
            };
        }
    }
}
