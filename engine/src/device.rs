//! Device memory as the driver reports it (CUDA only; None elsewhere), for measuring loads and probing the pool.

/// Free and total bytes of a GPU device's memory (None on CPU).
///
/// Candle allocates from the device's stream-ordered memory pool, which keeps freed blocks reserved for
/// reuse: a model unloaded a moment ago would still count as used, and the next load would measure only what
/// the pool had to grow by. With `settle`, the stream is synchronized (pending frees land) and the pool
/// trimmed to what is in use before the driver is asked: the numbers are then what the models and buffers
/// alive hold. Loads measure settled; the periodic probe does not (a sync and a trim every interval would
/// stall the serving stream and make the next decode steps grow the pool again), so it counts the pool's
/// reserve as used, which errs on the safe side.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub fn memory(device: &candle_core::Device, settle: bool) -> Option<(u64, u64)> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    match device {
        candle_core::Device::Cuda(d) => {
            // The driver reports for the current context; bind candle's to this thread.
            let stream = d.cuda_stream();
            let context = stream.context();
            context.bind_to_thread().ok()?;
            if settle {
                stream.synchronize().ok()?;
                let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
                // SAFETY: `pool` is a valid out-pointer and the device handle comes from a live context.
                let got = unsafe { sys::cuDeviceGetMemPool(&mut pool, context.cu_device()) };
                if got == sys::CUresult::CUDA_SUCCESS && !pool.is_null() {
                    // SAFETY: `pool` is the device's current pool, returned just above; trimming only
                    // releases reserved memory no allocation holds.
                    let _ = unsafe { sys::cuMemPoolTrimTo(pool, 0) };
                }
            }
            let (free, total) = result::mem_get_info().ok()?;
            Some((free as u64, total as u64))
        }
        _ => None,
    }
}

/// Free and total bytes of a GPU device's memory (None on CPU).
#[cfg(not(feature = "cuda"))]
pub fn memory(device: &candle_core::Device, settle: bool) -> Option<(u64, u64)> {
    let _ = (device, settle);
    None
}
