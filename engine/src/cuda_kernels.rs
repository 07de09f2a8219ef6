//! CUDA only: ult's own kernels, compiled into a cubin at build time (`engine/build.rs`, sources in
//! `engine/kernels/`) and loaded from the binary, never JIT-compiled: paged attention over the block pool
//! for every row of a step in one launch, and the pool write of the step's keys and values in another.
//!
//! The metadata both kernels read comes from [`crate::attention::paged_meta`], portable code the CPU tests
//! check against the host loops; this module only moves pointers and launches.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaStream, CudaView, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, DType, Layout, Result, Storage, Tensor};
use half::f16;

use crate::attention::{AttnShape, MAX_SPLITS, PagedLayout, SPLIT_KEYS};

static CUBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/paged_attention.cubin"));

/// Head dimensions the attention kernel is built for (one instantiation each).
const HEAD_DIMS: [usize; 4] = [32, 64, 128, 256];

/// Threads per attention block: four warps (`WARPS` in the kernel source).
const ATTEND_THREADS: u32 = 128;

/// The loaded paged-attention kernels of one device.
pub struct PagedKernels {
    attend: CudaFunction,
    combine: CudaFunction,
    write: CudaFunction,
    stream: Arc<CudaStream>,
    device: CudaDevice,
}

impl PagedKernels {
    /// Loads the cubin on `device` for heads of `head_dim`; None when no instantiation fits it (the model
    /// then attends with the portable ops).
    pub fn load(device: &CudaDevice, head_dim: usize) -> Result<Option<Self>> {
        if !HEAD_DIMS.contains(&head_dim) {
            return Ok(None);
        }
        let stream = device.cuda_stream();
        let module = stream
            .context()
            .load_module(Ptx::from_binary(CUBIN.to_vec()))
            .w()?;
        let attend = module
            .load_function(&format!("paged_attention_hd{head_dim}"))
            .w()?;
        let combine = module
            .load_function(&format!("paged_combine_hd{head_dim}"))
            .w()?;
        let write = module.load_function("paged_write").w()?;
        Ok(Some(Self {
            attend,
            combine,
            write,
            stream,
            device: device.clone(),
        }))
    }

    /// Attention of `q` `(rows, n_head, head_dim)` over the pool's `(slots, n_kv, head_dim)` f16 tensors
    /// and the step's own `k`, `v` `(rows, n_kv, head_dim)`, as `meta` (the device copy of
    /// [`crate::attention::paged_meta`]) lays out; returns `(rows, n_head, head_dim)` f32.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pool_k: &Tensor,
        pool_v: &Tensor,
        meta: &Tensor,
        at: &PagedLayout,
        shape: &AttnShape,
    ) -> Result<Tensor> {
        let rows = at.rows;
        let (q, k, v) = (f32_contiguous(q)?, f32_contiguous(k)?, f32_contiguous(v)?);
        let (gq, lq) = q.storage_and_layout();
        let (gk, lk) = k.storage_and_layout();
        let (gv, lv) = v.storage_and_layout();
        let (gpk, lpk) = pool_k.storage_and_layout();
        let (gpv, lpv) = pool_v.storage_and_layout();
        let (gm, lm) = meta.storage_and_layout();
        let qs = view::<f32>(&gq, lq)?;
        let ks = view::<f32>(&gk, lk)?;
        let vs = view::<f32>(&gv, lv)?;
        let pks = view::<f16>(&gpk, lpk)?;
        let pvs = view::<f16>(&gpv, lpv)?;
        let ms = view::<u32>(&gm, lm)?;
        let row_meta = ms.slice(0..at.slots);
        let keys = ms.slice(at.keys..);
        let n = rows * shape.n_head * shape.head_dim;
        // SAFETY: every element is written: a row of one split by its attention block, a row of several
        // by the combine kernel.
        let out = unsafe { self.device.alloc::<f32>(n) }?;
        // Split-K partials: accumulators, then (max, sum) pairs, per row, head and split.
        let part = if at.splits > 1 {
            // SAFETY: each split's block writes its part before the combine kernel reads it.
            Some(unsafe {
                self.device
                    .alloc::<f32>(n * at.splits + rows * shape.n_head * at.splits * 2)
            }?)
        } else {
            None
        };
        let (nh, nkv) = (shape.n_head as i32, shape.n_kv as i32);
        let (split_keys, max_splits, splits) =
            (SPLIT_KEYS as u32, MAX_SPLITS as u32, at.splits as u32);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, shape.n_head as u32, splits),
            block_dim: (ATTEND_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.attend);
        b.arg(&qs)
            .arg(&ks)
            .arg(&vs)
            .arg(&pks)
            .arg(&pvs)
            .arg(&row_meta)
            .arg(&keys)
            .arg(&out)
            .arg(part.as_ref().unwrap_or(&out))
            .arg(&nh)
            .arg(&nkv)
            .arg(&shape.scale)
            .arg(&split_keys)
            .arg(&max_splits)
            .arg(&splits);
        // SAFETY: the arguments match the kernel's signature; `meta` was built for these rows and this
        // pool, so every index it holds is in bounds (checked by `paged_meta`), and `part` holds every
        // split of every row when there are several (a row of one split never touches it).
        unsafe { b.launch(cfg) }.w()?;
        if let Some(part) = &part {
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, shape.n_head as u32, 1),
                block_dim: (ATTEND_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(&self.combine);
            b.arg(&row_meta)
                .arg(part)
                .arg(&out)
                .arg(&nh)
                .arg(&split_keys)
                .arg(&max_splits)
                .arg(&splits);
            // SAFETY: as above; it runs after the attention kernel on the same stream.
            unsafe { b.launch(cfg) }.w()?;
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, self.device.clone()));
        Ok(Tensor::from_storage(
            storage,
            (rows, shape.n_head, shape.head_dim),
            BackpropOp::none(),
            false,
        ))
    }

    /// Writes the step's `k` and `v` `(rows, n_kv, head_dim)` into the pool's slots that `meta` names.
    pub fn write(
        &self,
        k: &Tensor,
        v: &Tensor,
        pool_k: &Tensor,
        pool_v: &Tensor,
        meta: &Tensor,
        at: &PagedLayout,
    ) -> Result<()> {
        let (k, v) = (f32_contiguous(k)?, f32_contiguous(v)?);
        let width = k.elem_count() / at.rows.max(1);
        let (gk, lk) = k.storage_and_layout();
        let (gv, lv) = v.storage_and_layout();
        let (gpk, lpk) = pool_k.storage_and_layout();
        let (gpv, lpv) = pool_v.storage_and_layout();
        let (gm, lm) = meta.storage_and_layout();
        let ks = view::<f32>(&gk, lk)?;
        let vs = view::<f32>(&gv, lv)?;
        // The pool is written in place through its device pointer: its tensors are never read by another
        // stream, and every Candle op on them runs on this one, in order.
        let pks = view::<f16>(&gpk, lpk)?;
        let pvs = view::<f16>(&gpv, lpv)?;
        let ms = view::<u32>(&gm, lm)?;
        let slots = ms.slice(at.slots..at.keys);
        let n = (at.rows * width) as u32;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 1024), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows, width) = (at.rows as u32, width as u32);
        let mut b = self.stream.launch_builder(&self.write);
        b.arg(&ks)
            .arg(&vs)
            .arg(&slots)
            .arg(&pks)
            .arg(&pvs)
            .arg(&rows)
            .arg(&width);
        // SAFETY: as in `attend`: the slots are the pool's own (checked by `paged_meta`).
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

fn f32_contiguous(t: &Tensor) -> Result<Tensor> {
    let t = if t.dtype() == DType::F32 {
        t.clone()
    } else {
        t.to_dtype(DType::F32)?
    };
    t.contiguous()
}

/// The device elements of a contiguous CUDA tensor.
fn view<'a, T: CudaDType>(storage: &'a Storage, layout: &Layout) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(s) = storage else {
        candle_core::bail!("paged attention: a tensor is not on the CUDA device")
    };
    let Some((from, to)) = layout.contiguous_offsets() else {
        candle_core::bail!("paged attention: a tensor is not contiguous")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(from..to))
}

#[cfg(test)]
mod tests {
    //! Run on a GPU machine (`cargo test --features cuda`, built by `scripts/build-cuda.sh`): the kernels
    //! against the portable Candle ops on the same device, pools and inputs.
    use super::*;
    use crate::attention::{self, gather_indices, paged_meta, seqs_of};
    use crate::kv::{KvDType, KvLayout, KvPool, SlotMap};
    use crate::sched::BlockId;
    use candle_core::Device;

    type Span<'t> = (usize, usize, &'t [Vec<BlockId>]);

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .expect("a difference")
    }

    /// Tolerances, stated before comparing: outputs are convex combinations of N(0, 1) values. Global
    /// layers: both paths read every key and value as f16 (the portable one writes first), so they
    /// differ only in the order of sums and in `exp`: max |Δ| < 1e-4. Sliding-window layers: the
    /// portable ops read the step's own keys in f32, the kernel rounds them to the pool's f16 (so a key
    /// reads the same from the step or from the pool): max |Δ| < 1e-2. The pools both fill are equal
    /// bit for bit (both round to nearest f16).
    #[test]
    fn kernels_match_the_portable_ops() {
        let dev = Device::new_cuda(0).expect("a CUDA device");
        let Device::Cuda(cuda) = &dev else {
            unreachable!()
        };
        for (hd, nh, nkv) in [(64usize, 9usize, 3usize), (256, 4, 1), (128, 8, 8)] {
            let kern = PagedKernels::load(cuda, hd)
                .expect("the cubin loads")
                .expect("this head size is built");
            for window in [None, Some(40)] {
                let bt = 16;
                let layout = KvLayout::from_windows([window], nkv, hd, KvDType::F16, bt);
                let ring = layout.groups[0].ring;
                let blocks = 120;
                let mut port = KvPool::new(layout.clone(), vec![blocks], &dev, true).unwrap();
                let mut mine = KvPool::new(layout.clone(), vec![blocks], &dev, true).unwrap();
                let shape = AttnShape {
                    n_head: nh,
                    n_kv: nkv,
                    head_dim: hd,
                    scale: 1.0 / (hd as f32).sqrt(),
                    window,
                    ring,
                    block_tokens: bt,
                };
                let a: Vec<Vec<BlockId>> = vec![(0..12).map(|i| (i * 3) % 37).collect()];
                let b: Vec<Vec<BlockId>> = vec![vec![1, 4, 7, 10, 13, 16]];
                let c: Vec<Vec<BlockId>> = vec![vec![38, 39, 2, 5]];
                // d: 1,100 positions, so its rows are cut into several split-K runs (global layers).
                let d: Vec<Vec<BlockId>> = vec![(40..110).collect()];
                let steps: Vec<Vec<Span<'_>>> = vec![
                    vec![(0, 70, &a), (0, 1, &c), (0, 600, &d)],
                    vec![(70, 1, &a), (0, 33, &b), (1, 1, &c), (600, 499, &d)],
                    vec![(71, 1, &a), (33, 1, &b), (2, 17, &c), (1099, 1, &d)],
                    vec![(72, 1, &a), (34, 1, &b), (19, 1, &c), (1100, 1, &d)],
                ];
                for spans in steps {
                    let rows: usize = spans.iter().map(|s| s.1).sum();
                    let q = Tensor::randn(0f32, 2.0, (rows, nh, hd), &dev).unwrap();
                    let k = Tensor::randn(0f32, 1.0, (rows, nkv, hd), &dev).unwrap();
                    let v = Tensor::randn(0f32, 1.0, (rows, nkv, hd), &dev).unwrap();
                    let seqs = seqs_of(&spans);
                    let in_pool = window.is_none();
                    let m = SlotMap::new(&layout, &spans, Some(&dev)).unwrap();
                    if in_pool {
                        port.write(0, &k, &v, &m).unwrap();
                    }
                    let gathers = gather_indices(&seqs, &shape, in_pool, &dev).unwrap();
                    let (pk, pv) = port.device_layer(0).unwrap();
                    let want =
                        attention::portable(pk, pv, &q, &k, &v, &seqs, &gathers, &shape, in_pool)
                            .unwrap();
                    if !in_pool {
                        port.write(0, &k, &v, &m).unwrap();
                    }
                    let (meta, at) = paged_meta(&seqs, &shape, &m.rows[0], blocks * bt).unwrap();
                    let n = meta.len();
                    let meta = Tensor::from_vec(meta, n, &dev).unwrap();
                    let (mk, mv) = mine.device_layer(0).unwrap();
                    let got = kern.attend(&q, &k, &v, mk, mv, &meta, &at, &shape).unwrap();
                    kern.write(&k, &v, mk, mv, &meta, &at).unwrap();
                    let tol = if in_pool { 1e-4 } else { 1e-2 };
                    let d = max_diff(&got, &want);
                    assert!(d < tol, "hd {hd} window {window:?}: kernel vs portable {d}");
                    let (pk, pv) = port.device_layer(0).unwrap();
                    let (mk, mv) = mine.device_layer(0).unwrap();
                    for (x, y) in [(pk, mk), (pv, mv)] {
                        let d = max_diff(
                            &x.to_dtype(DType::F32).unwrap(),
                            &y.to_dtype(DType::F32).unwrap(),
                        );
                        assert!(d == 0.0, "hd {hd} window {window:?}: pools differ by {d}");
                    }
                }
            }
        }
    }

    /// A row's result does not depend on how its sequence was chunked or what else is in the step: the
    /// last row of 80 positions (one split-K run) and of 4,300 (the most runs, each longer than
    /// `SPLIT_KEYS`) computed as one chunk, as two, and as all but one + 1 beside another sequence are
    /// equal bit for bit.
    #[test]
    fn a_row_is_the_same_however_the_sequence_is_chunked() {
        let dev = Device::new_cuda(0).expect("a CUDA device");
        let Device::Cuda(cuda) = &dev else {
            unreachable!()
        };
        let (hd, nh, nkv, bt) = (64, 9, 3, 16);
        let kern = PagedKernels::load(cuda, hd).unwrap().unwrap();
        for (window, total) in [(None, 80usize), (Some(24), 80), (None, 4300)] {
            let layout = KvLayout::from_windows([window], nkv, hd, KvDType::F16, bt);
            let shape = AttnShape {
                n_head: nh,
                n_kv: nkv,
                head_dim: hd,
                scale: 0.125,
                window,
                ring: layout.groups[0].ring,
                block_tokens: bt,
            };
            let q = Tensor::randn(0f32, 2.0, (total, nh, hd), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (total, nkv, hd), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (total, nkv, hd), &dev).unwrap();
            let n_blocks = total.div_ceil(bt);
            // The sequence's blocks in a scrambled order, then one for the other sequence.
            let a: Vec<Vec<BlockId>> = vec![
                (0..n_blocks as u32)
                    .map(|i| (i * 7) % n_blocks as u32)
                    .collect(),
            ];
            let other: Vec<Vec<BlockId>> = vec![vec![n_blocks as u32]];
            let blocks = n_blocks + 1;
            let mut last = Vec::new();
            for cuts in [
                vec![total],
                vec![total * 5 / 8, total - total * 5 / 8],
                vec![total - 1, 1],
            ] {
                let mut pool = KvPool::new(layout.clone(), vec![blocks], &dev, true).unwrap();
                let mut start = 0;
                let mut out = None;
                for len in cuts.iter().copied() {
                    let mut spans: Vec<Span<'_>> = vec![(start, len, &a)];
                    let mut qs = vec![q.narrow(0, start, len).unwrap()];
                    let mut ks = vec![k.narrow(0, start, len).unwrap()];
                    let mut vs = vec![v.narrow(0, start, len).unwrap()];
                    if len == 1 {
                        spans.push((0, 3, &other));
                        qs.push(Tensor::randn(0f32, 2.0, (3, nh, hd), &dev).unwrap());
                        ks.push(Tensor::randn(0f32, 1.0, (3, nkv, hd), &dev).unwrap());
                        vs.push(Tensor::randn(0f32, 1.0, (3, nkv, hd), &dev).unwrap());
                    }
                    let cat = |t: &[Tensor]| Tensor::cat(t, 0).unwrap();
                    let (qc, kc, vc) = (cat(&qs), cat(&ks), cat(&vs));
                    let seqs = seqs_of(&spans);
                    let m = SlotMap::new(&layout, &spans, None).unwrap();
                    let (meta, at) = paged_meta(&seqs, &shape, &m.rows[0], blocks * bt).unwrap();
                    let n = meta.len();
                    let meta = Tensor::from_vec(meta, n, &dev).unwrap();
                    let (pk, pv) = pool.device_layer(0).unwrap();
                    let o = kern
                        .attend(&qc, &kc, &vc, pk, pv, &meta, &at, &shape)
                        .unwrap();
                    kern.write(&kc, &vc, pk, pv, &meta, &at).unwrap();
                    out = Some(o.narrow(0, 0, len).unwrap());
                    start += len;
                }
                let o = out.unwrap();
                let tail = o.narrow(0, o.dim(0).unwrap() - 1, 1).unwrap();
                last.push(tail.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            assert_eq!(
                last[0], last[1],
                "window {window:?}, {total}: one chunk vs two"
            );
            assert_eq!(
                last[0], last[2],
                "window {window:?}, {total}: one chunk vs + 1 in a batch"
            );
        }
    }
}
