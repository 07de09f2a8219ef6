//! Build script: with the `cuda` feature, compiles ult's own CUDA kernels (`kernels/*.cu`) with nvcc into
//! cubins for one GPU architecture, which the binary embeds (no PTX, so no JIT at run time).
//!
//! nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on the PATH (`scripts/build-cuda.sh` sets
//! `CUDA_HOME` to the toolkit it installs). The architecture is `$CUDA_COMPUTE_CAP` (as Candle reads it),
//! 90 (H100/H200) by default.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 1] = ["paged_attention"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for k in KERNELS {
        println!("cargo:rerun-if-changed=kernels/{k}.cu");
    }
    for v in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_COMPUTE_CAP",
        "CARGO_FEATURE_CUDA",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        panic!("cargo sets OUT_DIR for build scripts");
    };
    for k in KERNELS {
        let cubin = out.join(format!("{k}.cubin"));
        let status = Command::new(&nvcc)
            .args(["-cubin", "-O3", "-std=c++17"])
            .arg(format!("-arch=sm_{cap}"))
            .arg("-o")
            .arg(&cubin)
            .arg(format!("kernels/{k}.cu"))
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("{} failed on kernels/{k}.cu ({s})", nvcc.display()),
            Err(e) => panic!(
                "cannot run {} for kernels/{k}.cu: {e} (set CUDA_HOME or NVCC; scripts/build-cuda.sh does)",
                nvcc.display()
            ),
        }
    }
}
