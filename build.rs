//! With the `cuda` feature: compiles smolchat's own CUDA kernels (`src/engine/gpu/*.cu`) to PTX
//! with nvcc, for `CUDA_COMPUTE_CAP` (default 90: H100/H200), as candle's kernels are built.
//! Without it: nothing.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &["kv_write", "decode_attention", "rope"];

fn main() {
    for k in KERNELS {
        println!("cargo:rerun-if-changed=src/engine/gpu/{k}.cu");
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "nvcc".into());
    for k in KERNELS {
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", &format!("--gpu-architecture=compute_{cap}")])
            .arg("-o")
            .arg(out.join(format!("{k}.ptx")))
            .arg(format!("src/engine/gpu/{k}.cu"))
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {nvcc:?} ({e}): the cuda feature needs nvcc (.ci/cuda-toolkit)")
            });
        assert!(status.success(), "nvcc failed on src/engine/gpu/{k}.cu");
    }
}
