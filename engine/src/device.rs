//! Device memory as the driver reports it (CUDA's free and total; Metal's working-set limit and allocated
//! size; None on the CPU), for measuring loads and unloads and probing the pool.

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

/// Free and total bytes of a GPU device's memory (None on CPU). On Metal these are what its working-set
/// limit leaves and the limit itself (see [`metal`]).
#[cfg(not(feature = "cuda"))]
pub fn memory(device: &candle_core::Device, settle: bool) -> Option<(u64, u64)> {
    metal(device, settle).map(|m| {
        (
            m.working_set_limit.saturating_sub(m.allocated),
            m.working_set_limit,
        )
    })
}

/// What Metal reports for this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetalCounters {
    /// `MTLDevice.recommendedMaxWorkingSetSize`: the most this process's buffers should hold (about 84% of
    /// unified memory stock; `sudo sysctl iogpu.wired_limit_mb=N` raises it).
    pub working_set_limit: u64,
    /// `MTLDevice.currentAllocatedSize`: bytes this process's Metal resources hold now.
    pub allocated: u64,
}

/// Metal's counters for `device` (None off Metal). With `settle`, pending command buffers complete first,
/// which also drops the buffers Candle's pool keeps but nothing uses (huggingface/candle#3464), so an
/// unload is measured by what it really freed.
#[cfg(feature = "metal")]
pub fn metal(device: &candle_core::Device, settle: bool) -> Option<MetalCounters> {
    match device {
        candle_core::Device::Metal(m) => {
            if settle {
                let _ = m.wait_until_completed();
            }
            let d = m.metal_device();
            Some(MetalCounters {
                working_set_limit: d.recommended_max_working_set_size() as u64,
                allocated: d.current_allocated_size() as u64,
            })
        }
        _ => None,
    }
}

/// Metal's counters for `device` (None: this build has no Metal).
#[cfg(not(feature = "metal"))]
pub fn metal(device: &candle_core::Device, settle: bool) -> Option<MetalCounters> {
    let _ = (device, settle);
    None
}
