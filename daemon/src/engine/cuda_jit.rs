//! CUDA only: compiles Candle's kernel modules once per machine, in parallel, so a fresh ultd does not pay
//! the PTX JIT (about 12 s on an H100, serially) on its first model load.
//!
//! Candle ships its element-wise, reduction and quantized kernels as PTX and hands each module to the driver
//! the first time an op needs it; the driver compiles it for the GPU and, unless disabled, stores the
//! result in its compute cache on disk. Two things follow. [`configure_cache`] points that cache at ult's
//! own folder and gives it room for every module, so the compile happens once per machine and driver.
//! [`WarmUp::start`] compiles all modules at startup on one thread each (the compiles are independent), so
//! even the very first start pays the longest module instead of their sum, and pays it while the daemon is
//! already accepting requests. Loads wait for the warm-up; Candle's own later loads of the same PTX are
//! then cache hits.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::kernels;

/// Where the driver's compute cache lives unless `CUDA_CACHE_PATH` is set.
fn default_cache_dir() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("ULT_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache/ult"))
        })?;
    Some(base.join("cuda-jit"))
}

/// Points the driver's JIT cache at `~/.cache/ult/cuda-jit` (or `$ULT_CACHE/cuda-jit`) with room for 1 GiB,
/// unless the user set `CUDA_CACHE_PATH`/`CUDA_CACHE_MAXSIZE`; returns the cache folder.
///
/// # Safety
/// Sets environment variables: call it before any other thread starts and before CUDA is initialised.
#[allow(unsafe_code)]
pub unsafe fn configure_cache() -> Option<std::path::PathBuf> {
    if std::env::var_os("CUDA_CACHE_MAXSIZE").is_none() {
        // SAFETY: the caller guarantees no other thread exists yet.
        unsafe { std::env::set_var("CUDA_CACHE_MAXSIZE", (1u64 << 30).to_string()) };
    }
    if let Some(p) = std::env::var_os("CUDA_CACHE_PATH") {
        return Some(p.into());
    }
    let dir = default_cache_dir()?;
    std::fs::create_dir_all(&dir).ok()?;
    // SAFETY: as above.
    unsafe { std::env::set_var("CUDA_CACHE_PATH", &dir) };
    Some(dir)
}

/// Every PTX module Candle may load.
const MODULES: [(&str, &kernels::Module); 11] = [
    ("affine", &kernels::AFFINE),
    ("binary", &kernels::BINARY),
    ("cast", &kernels::CAST),
    ("conv", &kernels::CONV),
    ("fill", &kernels::FILL),
    ("indexing", &kernels::INDEXING),
    ("quantized", &kernels::QUANTIZED),
    ("reduce", &kernels::REDUCE),
    ("sort", &kernels::SORT),
    ("ternary", &kernels::TERNARY),
    ("unary", &kernels::UNARY),
];

/// A background compile of all kernel modules that loads can wait on.
#[derive(Clone)]
pub struct WarmUp {
    done: Arc<(Mutex<Option<Duration>>, Condvar)>,
}

impl WarmUp {
    /// Starts compiling every module on `device`, one thread per module.
    pub fn start(device: &candle_core::CudaDevice) -> Self {
        let done = Arc::new((Mutex::new(None), Condvar::new()));
        let context = device.cuda_stream().context().clone();
        let signal = done.clone();
        let spawned = std::thread::Builder::new()
            .name("ult-cuda-jit".into())
            .spawn(move || {
                let started = Instant::now();
                std::thread::scope(|s| {
                    for (name, module) in MODULES {
                        let context = context.clone();
                        s.spawn(move || {
                            let t = Instant::now();
                            match context.load_module(Ptx::from_src(module.ptx())) {
                                Ok(_) => tracing::debug!(
                                    module = name,
                                    ms = t.elapsed().as_millis() as u64,
                                    "kernel module ready"
                                ),
                                Err(e) => {
                                    tracing::warn!(module = name, error = %e, "kernel module compile failed")
                                }
                            }
                        });
                    }
                });
                let took = started.elapsed();
                tracing::info!(ms = took.as_millis() as u64, "CUDA kernels ready");
                let (lock, cv) = &*signal;
                if let Ok(mut g) = lock.lock() {
                    *g = Some(took);
                }
                cv.notify_all();
            });
        if spawned.is_err() {
            // No thread: nothing to wait for; Candle compiles on demand as it always did.
            if let Ok(mut g) = done.0.lock() {
                *g = Some(Duration::ZERO);
            }
        }
        Self { done }
    }

    /// Blocks until the warm-up has finished; returns how long it took.
    pub fn wait(&self) -> Duration {
        let (lock, cv) = &*self.done;
        let Ok(mut g) = lock.lock() else {
            return Duration::ZERO;
        };
        loop {
            if let Some(d) = *g {
                return d;
            }
            g = match cv.wait(g) {
                Ok(g) => g,
                Err(_) => return Duration::ZERO,
            };
        }
    }
}
