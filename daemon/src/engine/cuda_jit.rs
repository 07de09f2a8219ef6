//! CUDA only: compiles the Candle kernel modules ult's models use, once per machine, in the background at
//! startup, so a fresh ultd does not pay the PTX JIT on its first model load.
//!
//! Candle ships its element-wise, reduction and quantized kernels as PTX and hands each module to the driver
//! the first time an op needs it; the driver compiles it for the GPU and, unless disabled, stores the
//! result in its compute cache on disk. Two things follow. [`configure_cache`] points that cache at ult's
//! own folder and gives it room for every module, so the compile happens once per machine and driver.
//! [`WarmUp::start`] compiles the modules every decoder needs on one background thread while the daemon is
//! already accepting requests. Measured on an H100 (BENCHMARKS.md): the driver serialises JIT, so one
//! thread per module finished no sooner than their sum, and compiling every module up front cost more than
//! it hid; so only the common five are compiled ahead and the rest stay on Candle's on-demand path. Loads
//! wait for the warm-up; Candle's own later loads of the same PTX are then cache hits.

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

/// The PTX modules every quantized decoder's load and forward pass reaches (Nsight's kernel list of a
/// SmolLM2 decode step: mmvq and get_rows, rmsnorm/softmax/rope, badd/bmul, silu/copy, affine), in that
/// order. The rest (`cast`, `fill`, `indexing`, `ternary`, `conv`, `sort`) stay on Candle's on-demand path:
/// compiling all eleven up front made the first load of a fresh machine 10 s slower than compiling none.
const MODULES: [(&str, &kernels::Module); 5] = [
    ("quantized", &kernels::QUANTIZED),
    ("reduce", &kernels::REDUCE),
    ("binary", &kernels::BINARY),
    ("unary", &kernels::UNARY),
    ("affine", &kernels::AFFINE),
];

/// A background compile of all kernel modules that loads can wait on.
#[derive(Clone)]
pub struct WarmUp {
    done: Arc<(Mutex<Option<Duration>>, Condvar)>,
}

impl WarmUp {
    /// Starts compiling the modules on `device`, one after another on a background thread.
    pub fn start(device: &candle_core::CudaDevice) -> Self {
        let done = Arc::new((Mutex::new(None), Condvar::new()));
        let context = device.cuda_stream().context().clone();
        let signal = done.clone();
        let spawned = std::thread::Builder::new()
            .name("ult-cuda-jit".into())
            .spawn(move || {
                let started = Instant::now();
                for (name, module) in MODULES {
                    let t = Instant::now();
                    match context.load_module(Ptx::from_src(module.ptx())) {
                        Ok(_) => tracing::info!(
                            module = name,
                            ms = t.elapsed().as_millis() as u64,
                            at_ms = started.elapsed().as_millis() as u64,
                            "kernel module ready"
                        ),
                        Err(e) => {
                            tracing::warn!(module = name, error = %e, "kernel module compile failed")
                        }
                    }
                }
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
