//! CUDA only: compiles the Candle kernel modules ult's models use, once per machine, in the background at
//! startup, so a fresh ultd does not pay the PTX JIT on its first model load.
//!
//! Candle ships its element-wise, reduction and quantized kernels as PTX and hands each module to the driver
//! the first time an op needs it; the driver compiles it for the GPU and, unless disabled, stores the
//! result in its compute cache on disk. Two things follow. [`configure_cache`] points that cache at ult's
//! own folder and gives it room for every module, so the compile happens once per machine and driver.
//! [`WarmUp::start`] compiles the modules every decoder needs in the background while the daemon is already
//! accepting requests. Measured on an H100 (BENCHMARKS.md): the driver serialises JIT within a process, so
//! one thread per module finished no sooner than their sum, and compiling every module up front cost more
//! than it hid; so only the common five are compiled ahead and the rest stay on Candle's on-demand path.
//! On a cold cache the five compile in parallel child processes (the binary re-executed with
//! `ULT_CUDA_JIT_MODULE` set; see [`run_child`]), each writing the shared on-disk cache; a marker file then
//! records that this cache holds them. Loads wait for the warm-up; Candle's own later loads of the same PTX
//! are cache hits.

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

/// Set in a warm-up child process: the module it compiles, and the device it compiles for.
const CHILD_MODULE: &str = "ULT_CUDA_JIT_MODULE";
const CHILD_DEVICE: &str = "ULT_CUDA_JIT_DEVICE";

/// Whether this binary calls [`run_child`] first thing, so that it can serve as a warm-up child.
static CHILD_CAPABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What every CUDA binary of ult runs first thing in `main`: [`configure_cache`], then [`run_child`].
/// Returns the exit status to end with when this process is a warm-up child.
///
/// # Safety
/// As [`configure_cache`]: no other thread may exist yet.
#[allow(unsafe_code)]
pub unsafe fn init_process() -> Option<u8> {
    // SAFETY: passed on to the caller.
    unsafe { configure_cache() };
    run_child()
}

/// Called by [`init_process`]: in a warm-up child process (see
/// [`WarmUp::start`]) compiles its one module into the driver's cache and returns the exit status to end
/// with (0 or 1); in any other process returns None, and marks the binary as able to serve as a child.
pub fn run_child() -> Option<u8> {
    let Ok(name) = std::env::var(CHILD_MODULE) else {
        CHILD_CAPABLE.store(true, std::sync::atomic::Ordering::Relaxed);
        return None;
    };
    let ordinal = std::env::var(CHILD_DEVICE)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let ok = MODULES
        .iter()
        .find(|(n, _)| *n == name)
        .is_some_and(|(_, m)| {
            candle_core::cuda_backend::cudarc::driver::CudaContext::new(ordinal)
                .and_then(|c| c.load_module(Ptx::from_src(m.ptx())))
                .is_ok()
        });
    Some(if ok { 0 } else { 1 })
}

/// The driver's version, for the marker that says this cache already holds our modules.
#[allow(unsafe_code)]
fn driver_version() -> i32 {
    let mut v = 0;
    // SAFETY: `v` is a valid out-pointer; the call only writes the version.
    let _ = unsafe { candle_core::cuda_backend::cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    v
}

/// A file in the cache folder whose presence says a previous start compiled every module into it.
fn marker() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("CUDA_CACHE_PATH")?;
    Some(std::path::Path::new(&dir).join(format!(
        "ult-warm-{}-driver{}",
        env!("CARGO_PKG_VERSION"),
        driver_version()
    )))
}

/// Compiles every module in parallel, one child process each: the driver serialises JIT within a process,
/// not across processes, and the children write the shared on-disk cache that this process then reads.
/// False if a child could not be started or failed.
fn compile_in_children(ordinal: usize) -> bool {
    let Ok(exe) = std::env::current_exe() else {
        return false;
    };
    let children: Vec<_> = MODULES
        .iter()
        .map(|(name, _)| {
            std::process::Command::new(&exe)
                .env(CHILD_MODULE, name)
                .env(CHILD_DEVICE, ordinal.to_string())
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
        })
        .collect();
    let mut ok = true;
    for child in children {
        ok &= child.and_then(|mut c| c.wait()).is_ok_and(|s| s.success());
    }
    ok
}

/// A background compile of the decoder's kernel modules that loads can wait on.
#[derive(Clone)]
pub struct WarmUp {
    done: Arc<(Mutex<Option<Duration>>, Condvar)>,
}

impl WarmUp {
    /// Starts compiling the modules on `device` on a background thread: when the cache does not hold them
    /// yet and this binary can serve as a child ([`run_child`]), in parallel child processes first; then
    /// in this process, one after another (cache hits when the children ran).
    pub fn start(device: &candle_core::CudaDevice) -> Self {
        let done = Arc::new((Mutex::new(None), Condvar::new()));
        let context = device.cuda_stream().context().clone();
        let signal = done.clone();
        let spawned = std::thread::Builder::new()
            .name("ult-cuda-jit".into())
            .spawn(move || {
                let started = Instant::now();
                let marker = marker();
                let cold = marker.as_ref().is_some_and(|m| !m.exists());
                if cold && CHILD_CAPABLE.load(std::sync::atomic::Ordering::Relaxed) {
                    let ok = compile_in_children(context.ordinal());
                    tracing::info!(
                        ms = started.elapsed().as_millis() as u64,
                        ok,
                        "kernel modules compiled in child processes"
                    );
                }
                let mut all = true;
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
                            all = false;
                            tracing::warn!(module = name, error = %e, "kernel module compile failed")
                        }
                    }
                }
                if let (true, Some(m)) = (all && cold, marker) {
                    let _ = std::fs::write(m, b"");
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
