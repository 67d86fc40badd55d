//! Where the model runs: `--device auto|cpu|candle-cpu|cuda[:N]`.
//!
//! `cpu` is the engine's own CPU backend. `cuda[:N]` runs the packed-batch forward on candle's
//! CUDA backend (feature `cuda`); `candle-cpu` runs that same forward on candle's CPU device
//! (feature `candle`), which is how it is tested on machines without a GPU. `auto` takes GPU 0
//! when the binary has the `cuda` feature and the GPU answers, and otherwise says in the log why
//! it runs on the CPU.

use std::fmt;
use std::str::FromStr;

use super::EngineError;

/// The device asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    CandleCpu,
    Cuda(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device {0:?}: expected auto, cpu, candle-cpu, cuda or cuda:N")]
pub struct DeviceParseError(String);

impl FromStr for DeviceChoice {
    type Err = DeviceParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DeviceParseError(s.to_owned());
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "candle-cpu" => Ok(Self::CandleCpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::CandleCpu => f.write_str("candle-cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The device chosen, ready to load a model onto.
#[derive(Clone, Debug)]
pub enum Placement {
    Cpu,
    #[cfg(feature = "candle")]
    Candle(candle_core::Device),
}

impl Placement {
    /// Whether this is a GPU (wider batches and steps suit it).
    pub fn is_gpu(&self) -> bool {
        match self {
            Self::Cpu => false,
            #[cfg(feature = "candle")]
            Self::Candle(d) => d.is_cuda(),
        }
    }
}

impl DeviceChoice {
    /// Finds the device. `auto` never fails: without a usable GPU it logs why and takes the
    /// CPU. An explicit choice that cannot be had is a [`EngineError::DeviceUnavailable`].
    pub fn resolve(self) -> Result<Placement, EngineError> {
        match self {
            Self::Cpu => Ok(Placement::Cpu),
            Self::Auto => Ok(match cuda(0) {
                Ok(p) => p,
                Err(why) if cfg!(feature = "cuda") => {
                    tracing::warn!("no GPU ({why}); running on the CPU");
                    Placement::Cpu
                }
                Err(why) => {
                    tracing::info!("running on the CPU ({why})");
                    Placement::Cpu
                }
            }),
            Self::Cuda(n) => cuda(n).map_err(|why| EngineError::DeviceUnavailable {
                device: self.to_string(),
                why,
            }),
            Self::CandleCpu => candle_cpu().map_err(|why| EngineError::DeviceUnavailable {
                device: self.to_string(),
                why,
            }),
        }
    }
}

#[cfg(feature = "candle")]
fn candle_cpu() -> Result<Placement, String> {
    Ok(Placement::Candle(candle_core::Device::Cpu))
}

#[cfg(not(feature = "candle"))]
fn candle_cpu() -> Result<Placement, String> {
    Err("this binary was built without the `candle` feature".into())
}

/// Opens CUDA device `n`. The driver is asked under `catch_unwind`: a missing or broken driver
/// must come back as a reason, never take the process down.
#[cfg(feature = "cuda")]
fn cuda(n: usize) -> Result<Placement, String> {
    let opened = std::panic::catch_unwind(|| candle_core::Device::new_cuda(n));
    match opened {
        Ok(Ok(device)) => {
            let name = device
                .as_cuda_device()
                .ok()
                .and_then(|d| d.cuda_stream().context().name().ok())
                .unwrap_or_default();
            tracing::info!(device = n, %name, "running on the GPU");
            Ok(Placement::Candle(device))
        }
        // candle appends a backtrace when RUST_BACKTRACE is set: the first line is the reason.
        Ok(Err(e)) => Err(format!(
            "CUDA device {n}: {}",
            e.to_string().lines().next().unwrap_or_default()
        )),
        Err(_) => Err(format!("CUDA device {n}: the driver panicked when asked")),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda(_n: usize) -> Result<Placement, String> {
    Err("this binary was built without the `cuda` feature".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        for (s, d) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("candle-cpu", DeviceChoice::CandleCpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("CUDA:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(s.parse::<DeviceChoice>(), Ok(d));
        }
        assert_eq!(DeviceChoice::Cuda(3).to_string(), "cuda:3");
        for bad in ["", "tpu", "cuda:", "cuda:x", "cuda:-1"] {
            assert!(bad.parse::<DeviceChoice>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn auto_without_a_gpu_takes_the_cpu_and_cuda_says_why_not() {
        // Holds on any machine without a working GPU (CI); with the `cuda` feature on a GPU
        // machine `auto` finds the GPU instead, which the device bench checks.
        if cfg!(feature = "cuda") {
            return;
        }
        assert!(matches!(DeviceChoice::Auto.resolve(), Ok(Placement::Cpu)));
        let err = DeviceChoice::Cuda(0).resolve().unwrap_err().to_string();
        assert!(
            err.contains("cuda:0") && err.contains("`cuda` feature"),
            "{err}"
        );
    }
}
