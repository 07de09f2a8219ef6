//! ult's own decoder forward pass for quantized GGUF models: Llama (Llama 3, Mistral, SmolLM2), Gemma 3,
//! Qwen2, Qwen3, Qwen3-MoE, Phi-3 and DeepSeek V2/V3 — one code path, with the families' differences as
//! data (fused or split projections, biases, QK-norms, full or latent attention, rope style and scaling,
//! dense, routed or shared-plus-routed feed-forward).
//!
//! Owning it lets ult size everything to the configured context (rope tables, KV caches with rings for
//! sliding-window layers), compute logits for the last position only, embed straight from the quantized
//! table, and fix what candle-transformers' `quantized_gemma3` gets wrong (SiLU for GELU-tanh, no
//! sliding-window mask on decode, a dtype clash on multi-token forwards at a non-zero position, and
//! 131072-position rope tables per layer).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, ggml_file::qtensor_from_ggml};
use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::ops::rms_norm;
use candle_nn::rotary_emb::{rope, rope_i};

use crate::EngineError;
use crate::attention::{self, AttnSeq, AttnShape};
use crate::decoder::{Decoder, StepInput, StepOutput};
use crate::gguf::{Arch, Gating, GgufHeader, HParams, MlaParams, MoeParams, RopeScaling};
use crate::kv::{KvDType, KvLayout, KvPool, SlotMap};

/// Where a load's tensor bytes come from.
pub enum WeightData<'a> {
    /// A whole mapped GGUF file.
    Gguf(&'a [u8]),
    /// A model folder's mapped safetensors, converted tensor by tensor.
    Folder(&'a crate::hf::HfWeights<'a>),
}

/// Reads tensors out of a mapped GGUF file (or a model folder) onto a device, counting bytes for progress
/// reports.
pub struct WeightSource<'a> {
    /// The validated header.
    pub header: &'a GgufHeader,
    /// The tensors' bytes.
    pub data: WeightData<'a>,
    /// Where tensors go.
    pub device: &'a Device,
    /// Called with the bytes of each tensor read.
    pub progress: &'a (dyn Fn(u64) + Sync),
    /// Dequantize every matrix to f32 (a numerical reference for correctness checks, not for serving).
    pub dequantize: bool,
}

impl WeightSource<'_> {
    fn qtensor(&self, name: &str) -> std::result::Result<QTensor, EngineError> {
        let meta = self.header.tensor(name)?;
        let bytes = self.bytes_of(name, meta)?;
        let q = qtensor_from_ggml(meta.dtype, &bytes, meta.dims.clone(), self.device)
            .map_err(|e| EngineError::candle(format!("reading tensor {name}"), e))?;
        (self.progress)(meta.bytes);
        Ok(q)
    }

    /// The bytes of tensor `name` in ggml's layout.
    fn bytes_of(
        &self,
        name: &str,
        meta: &super::gguf::TensorMeta,
    ) -> std::result::Result<crate::hf::TensorBytes<'_>, EngineError> {
        let data = match &self.data {
            WeightData::Gguf(data) => data,
            WeightData::Folder(w) => {
                let bytes = w.bytes(name)?;
                if bytes.len() as u64 != meta.bytes {
                    return Err(EngineError::CorruptModel {
                        path: self.header.path.display().to_string(),
                        reason: format!(
                            "tensor {name} converted to {} bytes, not {}",
                            bytes.len(),
                            meta.bytes
                        ),
                    });
                }
                return Ok(bytes);
            }
        };
        let start = usize::try_from(meta.offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(usize::try_from(meta.bytes).unwrap_or(usize::MAX));
        // The header check guarantees the range; re-check because Candle reads the slice unchecked.
        let bytes = data
            .get(start..end)
            .ok_or_else(|| EngineError::CorruptModel {
                path: self.header.path.display().to_string(),
                reason: format!("tensor {name} lies outside the mapped file"),
            })?;
        Ok(crate::hf::TensorBytes::Mapped(bytes))
    }

    fn qmatmul(&self, name: &str) -> std::result::Result<QMatMul, EngineError> {
        let q = self.qtensor(name)?;
        self.matmul_of(Arc::new(q), name)
    }

    fn matmul_of(&self, q: Arc<QTensor>, name: &str) -> std::result::Result<QMatMul, EngineError> {
        let wrap = |e| EngineError::candle(format!("preparing {name}"), e);
        if self.dequantize {
            Ok(QMatMul::Tensor(q.dequantize(self.device).map_err(wrap)?))
        } else {
            QMatMul::from_arc(q).map_err(wrap)
        }
    }

    /// The `n_expert` matrices stacked in the 3-D tensor `name` (`(experts, rows, cols)`), one
    /// [`QMatMul`] each: every expert's rows are contiguous in the file, so each is a slice of it.
    fn expert_matmuls(
        &self,
        name: &str,
        n_expert: usize,
    ) -> std::result::Result<Vec<QMatMul>, EngineError> {
        let meta = self.header.tensor(name)?;
        let corrupt = |reason: String| EngineError::CorruptModel {
            path: self.header.path.display().to_string(),
            reason,
        };
        let &[e, rows, cols] = meta.dims.as_slice() else {
            return Err(corrupt(format!("{name} is not a stack of expert matrices")));
        };
        if e != n_expert || !(rows * cols).is_multiple_of(meta.dtype.block_size()) {
            return Err(corrupt(format!(
                "{name} holds {e} experts of {rows}×{cols}, not {n_expert}"
            )));
        }
        let bytes = self.bytes_of(name, meta)?;
        let per = bytes.len() / e;
        let out = (0..e)
            .map(|i| {
                let q = qtensor_from_ggml(
                    meta.dtype,
                    &bytes[i * per..(i + 1) * per],
                    vec![rows, cols],
                    self.device,
                )
                .map_err(|err| EngineError::candle(format!("reading expert {i} of {name}"), err))?;
                self.matmul_of(Arc::new(q), name)
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        (self.progress)(meta.bytes);
        Ok(out)
    }

    fn vector(&self, name: &str) -> std::result::Result<Tensor, EngineError> {
        self.qtensor(name)?
            .dequantize(self.device)
            .map_err(|e| EngineError::candle(format!("dequantizing {name}"), e))
    }

    fn optional_vector(&self, name: &str) -> std::result::Result<Option<Tensor>, EngineError> {
        if self.header.tensors.contains_key(name) {
            self.vector(name).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// The query, key and value projections: three matrices, or one fused `attn_qkv` (Phi-3).
enum Qkv {
    Split { q: QMatMul, k: QMatMul, v: QMatMul },
    Fused(QMatMul),
}

/// A layer's feed-forward.
enum Ffn {
    /// `down(act(gate(x)) · up(x))`.
    Gated {
        gate: QMatMul,
        up: QMatMul,
        down: QMatMul,
    },
    /// Phi-3: one `ffn_up` whose first half is the gate, second half the up projection.
    FusedGateUp { gate_up: QMatMul, down: QMatMul },
    /// Routed experts (Qwen3-MoE, DeepSeek).
    Moe(Moe),
}

/// Routed experts: a router and each expert's own matrices, so a step runs only the experts its tokens
/// chose (every expert is resident; none is touched unless routed to).
struct Moe {
    router: QMatMul,
    /// A bias added to the probabilities to choose experts, not to weigh them (DeepSeek V3's
    /// `exp_probs_b`).
    selection_bias: Option<Vec<f32>>,
    experts: Experts,
    /// The shared experts every token runs, as one gated feed-forward (DeepSeek).
    shared: Option<Expert>,
    params: MoeParams,
}

struct Expert {
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

impl Expert {
    /// `down(silu(gate(x)) · up(x))`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down
            .forward(&(self.gate.forward(x)?.silu()? * self.up.forward(x)?)?)
    }
}

/// How a layer's routed experts are held.
enum Experts {
    /// One matrix triple per expert, each run over the rows that chose it (the CPU and Metal, and the
    /// types Candle's indexed kernel lacks).
    Each(Vec<Expert>),
    /// The file's 3-D stacks `(experts, rows, cols)` as one quantized tensor each, multiplied by Candle's
    /// indexed MoE kernel on CUDA: one launch per projection computes every (row, chosen expert) pair,
    /// reading only the chosen experts' weights (llama.cpp's `mul_mat_id`). On the H200 it decodes a
    /// Qwen3-30B-A3B shape 2.5–2.9× faster than one matmul per expert, but prefilled 3.2× slower (each
    /// pair reads its expert's rows again; BENCHMARKS.md): a step of [`STACKED_ROWS`] rows or more
    /// copies each chosen expert's matrices out of the stacks on the device and multiplies them once over
    /// the rows that chose it instead (prefill then as fast as per-expert matrices).
    Stacked {
        gate: Arc<QTensor>,
        up: Arc<QTensor>,
        down: Arc<QTensor>,
    },
}

/// Steps of this many rows or more run stacked experts one by one (a device copy of each chosen expert's
/// matrices, then one matmul over its rows); fewer use the indexed kernel. `ULT_MOE_ROWS` overrides it
/// (for comparisons: 1 copies experts on every step).
const STACKED_ROWS: usize = 64;

fn stacked_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        std::env::var("ULT_MOE_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(STACKED_ROWS)
    })
}

impl Experts {
    /// The three stacks of layer `il`: stacked on CUDA when Candle's indexed kernel multiplies their
    /// type, else split per expert.
    fn load(
        src: &WeightSource<'_>,
        il: usize,
        n_expert: usize,
    ) -> std::result::Result<Self, EngineError> {
        let p = |t: &str| format!("blk.{il}.{t}.weight");
        let names = [p("ffn_gate_exps"), p("ffn_up_exps"), p("ffn_down_exps")];
        let indexed = |name: &String| {
            src.header.tensor(name).is_ok_and(|t| {
                t.dims.len() == 3
                    && t.dims[0] == n_expert
                    // Not Q8_0: Candle's indexed Q8_0 kernel gave logits off by a relative 1.1 on
                    // the H200 (bench/h200/runs-2026-12-02/moe), where one matmul per expert is right.
                    && matches!(
                        t.dtype,
                        GgmlDType::Q2K
                            | GgmlDType::Q3K
                            | GgmlDType::Q4K
                            | GgmlDType::Q5K
                            | GgmlDType::Q6K
                    )
            })
        };
        if src.device.is_cuda()
            && !src.dequantize
            && std::env::var_os("ULT_MOE").is_none_or(|v| v != "each")
            && names.iter().all(indexed)
        {
            let [gate, up, down] = names;
            return Ok(Self::Stacked {
                gate: Arc::new(src.qtensor(&gate)?),
                up: Arc::new(src.qtensor(&up)?),
                down: Arc::new(src.qtensor(&down)?),
            });
        }
        let [gate, up, down] = names.map(|n| src.expert_matmuls(&n, n_expert));
        Ok(Self::Each(
            gate?
                .into_iter()
                .zip(up?)
                .zip(down?)
                .map(|((gate, up), down)| Expert { gate, up, down })
                .collect(),
        ))
    }
}

/// A layer's attention projections.
enum Attn {
    /// Query, key and value heads (multi-head or grouped-query attention).
    Full {
        qkv: Qkv,
        /// Q, K and V biases (Qwen2).
        qkv_bias: Option<(Tensor, Tensor, Tensor)>,
        q_norm: Option<Tensor>,
        k_norm: Option<Tensor>,
    },
    /// Multi-head latent attention (DeepSeek; see [`MlaParams`]).
    Latent(Mla),
}

/// The query of latent attention: one matrix, or a low-rank pair with a norm between (`q_lora_rank`).
enum MlaQuery {
    Plain(QMatMul),
    LowRank {
        a: QMatMul,
        norm: Tensor,
        b: QMatMul,
    },
}

/// Latent attention's weights.
struct Mla {
    q: MlaQuery,
    /// Hidden state to the latent and the rope key (`attn_kv_a_mqa`).
    kv_a: QMatMul,
    /// The latent's RMSNorm.
    kv_a_norm: Tensor,
    /// `attn_k_b` transposed per head, `(heads, qk_nope, kv_lora_rank)`: multiplies a head's query into
    /// the latent space.
    k_b: Tensor,
    /// `attn_v_b` transposed per head, `(heads, kv_lora_rank, v_head_dim)`: maps a head's latent result
    /// to its value.
    v_b: Tensor,
    params: MlaParams,
}

struct Block {
    attn_norm: Tensor,
    attn: Attn,
    wo: QMatMul,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    ffn: Ffn,
    post_ffn_norm: Option<Tensor>,
}

/// A loaded decoder.
pub struct Transformer {
    hp: HParams,
    embed: Arc<QTensor>,
    blocks: Vec<Block>,
    out_norm: Tensor,
    lm_head: QMatMul,
    rope_global: (Tensor, Tensor),
    rope_local: Option<(Tensor, Tensor)>,
    device: Device,
    context: usize,
    layout: KvLayout,
    /// ult's own paged-attention kernels, on CUDA for the head sizes they are built for (else the
    /// portable ops attend; `ULT_ATTENTION=portable` forces them, for comparisons).
    #[cfg(feature = "cuda")]
    kernels: Option<crate::cuda_kernels::PagedKernels>,
}

impl Transformer {
    /// Loads every weight of `src` for a context of `context` positions.
    pub fn load(src: &WeightSource<'_>, context: usize) -> std::result::Result<Self, EngineError> {
        let hp = src.header.hparams.clone();
        let gemma = hp.arch == Arch::Gemma3;
        let embed = Arc::new(src.qtensor("token_embd.weight")?);
        let mut blocks = Vec::with_capacity(hp.n_layer);
        for il in 0..hp.n_layer {
            let p = |t: &str| format!("blk.{il}.{t}.weight");
            let has = |t: &str| src.header.tensors.contains_key(&p(t));
            let attn = match hp.mla {
                Some(params) => Attn::Latent(Mla::load(src, il, &hp, params)?),
                None => Attn::Full {
                    qkv: if has("attn_qkv") {
                        Qkv::Fused(src.qmatmul(&p("attn_qkv"))?)
                    } else {
                        Qkv::Split {
                            q: src.qmatmul(&p("attn_q"))?,
                            k: src.qmatmul(&p("attn_k"))?,
                            v: src.qmatmul(&p("attn_v"))?,
                        }
                    },
                    qkv_bias: {
                        let bias = |t: &str| src.optional_vector(&format!("blk.{il}.{t}.bias"));
                        match (bias("attn_q")?, bias("attn_k")?, bias("attn_v")?) {
                            (Some(q), Some(k), Some(v)) => Some((q, k, v)),
                            (None, None, None) => None,
                            _ => {
                                return Err(EngineError::CorruptModel {
                                    path: src.header.path.display().to_string(),
                                    reason: format!(
                                        "layer {il} has some but not all of the Q/K/V biases"
                                    ),
                                });
                            }
                        }
                    },
                    q_norm: src.optional_vector(&p("attn_q_norm"))?,
                    k_norm: src.optional_vector(&p("attn_k_norm"))?,
                },
            };
            let ffn = match hp.moe {
                Some(params) if il >= params.n_dense_lead => Ffn::Moe(Moe {
                    router: src.qmatmul(&p("ffn_gate_inp"))?,
                    selection_bias: src
                        .optional_vector(&format!("blk.{il}.exp_probs_b.bias"))?
                        .map(|b| b.flatten_all()?.to_vec1::<f32>())
                        .transpose()
                        .map_err(|e| {
                            EngineError::candle(format!("reading layer {il}'s exp_probs_b"), e)
                        })?,
                    experts: Experts::load(src, il, params.n_expert)?,
                    shared: if params.n_shared > 0 {
                        Some(Expert {
                            gate: src.qmatmul(&p("ffn_gate_shexp"))?,
                            up: src.qmatmul(&p("ffn_up_shexp"))?,
                            down: src.qmatmul(&p("ffn_down_shexp"))?,
                        })
                    } else {
                        None
                    },
                    params,
                }),
                _ if !has("ffn_gate") && hp.arch == Arch::Phi3 => Ffn::FusedGateUp {
                    gate_up: src.qmatmul(&p("ffn_up"))?,
                    down: src.qmatmul(&p("ffn_down"))?,
                },
                // Dense: every layer of a dense family, DeepSeek's leading layers.
                _ => Ffn::Gated {
                    gate: src.qmatmul(&p("ffn_gate"))?,
                    up: src.qmatmul(&p("ffn_up"))?,
                    down: src.qmatmul(&p("ffn_down"))?,
                },
            };
            blocks.push(Block {
                attn_norm: src.vector(&p("attn_norm"))?,
                attn,
                wo: src.qmatmul(&p("attn_output"))?,
                post_attn_norm: src.optional_vector(&p("post_attention_norm"))?,
                ffn_norm: src.vector(&p("ffn_norm"))?,
                ffn,
                post_ffn_norm: src.optional_vector(&p("post_ffw_norm"))?,
            });
        }
        let out_norm = src.vector("output_norm.weight")?;
        // Tied embeddings share the quantized table with the output head: no second copy.
        let lm_head = if src.header.tensors.contains_key("output.weight") {
            src.qmatmul("output.weight")?
        } else {
            src.matmul_of(embed.clone(), "the tied output head")?
        };
        // Llama 3.1+: per-dimension divisors of the rope frequencies.
        let freq_factors = if hp.rope_freqs {
            let f = src.vector("rope_freqs.weight")?;
            let f = f
                .flatten_all()
                .and_then(|f| f.to_vec1::<f32>())
                .map_err(|e| EngineError::candle("reading rope_freqs.weight".into(), e))?;
            if f.len() != hp.rope_dim / 2 {
                return Err(EngineError::CorruptModel {
                    path: src.header.path.display().to_string(),
                    reason: format!(
                        "rope_freqs.weight has {} values for a rope of {}",
                        f.len(),
                        hp.rope_dim
                    ),
                });
            }
            Some(f)
        } else {
            None
        };
        let tables = |base: f32, scaling: RopeScaling, factors: Option<&[f32]>| {
            rope_tables(hp.rope_dim, context, base, scaling, factors, src.device)
                .map_err(|e| EngineError::candle("building rope tables".into(), e))
        };
        let rope_global = tables(hp.rope_base, hp.rope_scaling, freq_factors.as_deref())?;
        let rope_local = if gemma {
            Some(tables(hp.rope_local_base, RopeScaling::None, None)?)
        } else {
            None
        };
        #[cfg(feature = "cuda")]
        let kernels = match src.device {
            // Latent attention's values live in its keys: the kernels read separate values.
            Device::Cuda(d)
                if hp.mla.is_none()
                    && std::env::var_os("ULT_ATTENTION").is_none_or(|v| v != "portable") =>
            {
                crate::cuda_kernels::PagedKernels::load(d, hp.head_dim).map_err(|e| {
                    EngineError::candle("loading the paged-attention kernels".into(), e)
                })?
            }
            _ => None,
        };
        Ok(Self {
            #[cfg(feature = "cuda")]
            kernels,
            hp,
            embed,
            blocks,
            out_norm,
            lm_head,
            rope_global,
            rope_local,
            device: src.device.clone(),
            context,
            layout: KvLayout::new(
                &src.header.hparams,
                context,
                KvDType::for_device(src.device),
                crate::kv::BLOCK_TOKENS,
            ),
        })
    }

    /// The hyper-parameters.
    pub fn hparams(&self) -> &HParams {
        &self.hp
    }

    /// The context this model was loaded for.
    pub fn context(&self) -> usize {
        self.context
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// True when ult's own CUDA kernels attend (and write the pool); false for the portable ops or the
    /// host loops.
    pub fn uses_kernels(&self) -> bool {
        #[cfg(feature = "cuda")]
        let on = self.kernels.is_some();
        #[cfg(not(feature = "cuda"))]
        let on = false;
        on
    }

    /// Runs one step for every sequence of `input` and returns the logits of those that asked, in order.
    pub fn forward_step(&self, input: &StepInput<'_>, pool: &mut KvPool) -> Result<StepOutput> {
        let hp = &self.hp;
        let n: usize = input.tokens();
        if n == 0 {
            return Ok(StepOutput {
                logits: None,
                rows: Vec::new(),
            });
        }
        pool.ensure()?;
        let mut tokens = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        let mut seqs = Vec::with_capacity(input.seqs.len());
        for s in &input.seqs {
            if s.start + s.tokens.len() > self.context {
                candle_core::bail!(
                    "positions up to {} exceed the context {}",
                    s.start + s.tokens.len(),
                    self.context
                )
            }
            seqs.push((tokens.len(), s));
            tokens.extend_from_slice(s.tokens);
            positions.extend((s.start..s.start + s.tokens.len()).map(|p| p as u32));
        }
        let layout = pool.layout().clone();
        let kernels = self.uses_kernels();
        let portable = pool.host_layer(0).is_none() && !kernels;
        let spans: Vec<(usize, usize, &[Vec<crate::sched::BlockId>])> = input
            .seqs
            .iter()
            .map(|s| (s.start, s.tokens.len(), s.tables))
            .collect();
        let slots = SlotMap::new(&layout, &spans, portable.then_some(&self.device))?;
        let groups: Vec<GroupStep<'_>> = layout
            .groups
            .iter()
            .enumerate()
            .map(|(g, group)| {
                let shape = AttnShape {
                    n_head: hp.n_head,
                    n_kv: hp.n_head_kv,
                    head_dim: hp.head_dim,
                    scale: hp.attn_scale as f32,
                    window: group.window,
                    ring: group.ring,
                    block_tokens: layout.block_tokens,
                };
                let seqs: Vec<AttnSeq<'_>> = seqs
                    .iter()
                    .map(|(row, s)| AttnSeq {
                        row: *row,
                        start: s.start,
                        len: s.tokens.len(),
                        table: &s.tables[g],
                    })
                    .collect();
                // Global layers write before they attend (see `attention`), rings after.
                let gathers = if portable {
                    attention::gather_indices(&seqs, &shape, group.ring.is_none(), &self.device)?
                } else {
                    Vec::new()
                };
                let paged = if kernels {
                    let pool_slots = pool.blocks()[g] * layout.block_tokens;
                    let (meta, at) =
                        attention::paged_meta(&seqs, &shape, &slots.rows[g], pool_slots)?;
                    let n = meta.len();
                    Some((Tensor::from_vec(meta, n, &self.device)?, at))
                } else {
                    None
                };
                Ok(GroupStep {
                    shape,
                    seqs,
                    gathers,
                    paged,
                })
            })
            .collect::<Result<_>>()?;
        let pos = Tensor::new(positions.as_slice(), &self.device)?;
        let gather = |(cos, sin): &(Tensor, Tensor)| -> Result<(Tensor, Tensor)> {
            let half = hp.rope_dim / 2;
            Ok((
                cos.index_select(&pos, 0)?.reshape((n, 1, half))?,
                sin.index_select(&pos, 0)?.reshape((n, 1, half))?,
            ))
        };
        let rope_global = gather(&self.rope_global)?;
        let rope_local = self.rope_local.as_ref().map(gather).transpose()?;
        let ids = Tensor::new(tokens.as_slice(), &self.device)?;
        let mut x = self.embed.embedding(&ids)?.unsqueeze(0)?;
        if hp.arch == Arch::Gemma3 {
            x = (x * (hp.n_embd as f64).sqrt())?;
        }
        let eps = hp.rms_eps as f32;
        for (il, b) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &b.attn_norm, eps)?;
            let rope = match (&rope_local, hp.is_local(il)) {
                (Some(local), true) => local,
                _ => &rope_global,
            };
            let ctx = StepContext {
                groups: &groups,
                slots: &slots,
                rope,
                layout: &layout,
            };
            let mut a = match &b.attn {
                Attn::Full {
                    qkv,
                    qkv_bias,
                    q_norm,
                    k_norm,
                } => {
                    let (q, k, v) = self.project(qkv, qkv_bias, q_norm, k_norm, &h, ctx.rope)?;
                    let out = self.attend(il, &q, &k, &v, &ctx, pool)?;
                    b.wo.forward(&out)?
                }
                Attn::Latent(mla) => mla.forward(self, il, &h, &ctx, pool, &b.wo)?,
            };
            if let Some(n) = &b.post_attn_norm {
                a = rms_norm(&a, n, eps)?;
            }
            x = (x + a)?;
            let h = rms_norm(&x, &b.ffn_norm, eps)?;
            let mut m = self.feed_forward(&b.ffn, &h)?;
            if let Some(n) = &b.post_ffn_norm {
                m = rms_norm(&m, n, eps)?;
            }
            x = (x + m)?;
        }
        let mut rows = Vec::new();
        let mut last = Vec::new();
        for (row, s) in &seqs {
            if s.sample {
                rows.push(s.seq);
                last.push((row + s.tokens.len() - 1) as u32);
            }
        }
        if last.is_empty() {
            return Ok(StepOutput { logits: None, rows });
        }
        let idx = Tensor::new(last.as_slice(), &self.device)?;
        let picked = x.squeeze(0)?.index_select(&idx, 0)?.unsqueeze(0)?;
        let picked = rms_norm(&picked, &self.out_norm, eps)?;
        let logits = self
            .lm_head
            .forward(&picked)?
            .squeeze(0)?
            .to_dtype(DType::F32)?;
        Ok(StepOutput {
            logits: Some(logits),
            rows,
        })
    }

    /// A layer's feed-forward of `h` `(1, rows, hidden)`.
    fn feed_forward(&self, ffn: &Ffn, h: &Tensor) -> Result<Tensor> {
        let act = |gate: Tensor| match self.hp.arch {
            Arch::Gemma3 => gate.gelu(),
            _ => gate.silu(),
        };
        match ffn {
            Ffn::Gated { gate, up, down } => {
                down.forward(&(act(gate.forward(h)?)? * up.forward(h)?)?)
            }
            Ffn::FusedGateUp { gate_up, down } => {
                let gu = gate_up.forward(h)?;
                let half = gu.dim(D::Minus1)? / 2;
                let (g, u) = (
                    gu.narrow(D::Minus1, 0, half)?,
                    gu.narrow(D::Minus1, half, half)?,
                );
                down.forward(&(act(g.contiguous()?)? * u)?)
            }
            Ffn::Moe(moe) => moe.forward(h),
        }
    }

    /// Full attention's queries `(rows, heads, head_dim)`, keys and values `(rows, kv heads, head_dim)`
    /// of `h`, with biases, QK-norms and rope applied.
    fn project(
        &self,
        qkv: &Qkv,
        qkv_bias: &Option<(Tensor, Tensor, Tensor)>,
        q_norm: &Option<Tensor>,
        k_norm: &Option<Tensor>,
        h: &Tensor,
        (cos, sin): &(Tensor, Tensor),
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let hp = &self.hp;
        let (_, n, _) = h.dims3()?;
        let (nh, nkv, hd) = (hp.n_head, hp.n_head_kv, hp.head_dim);
        let (mut q, mut k, mut v) = match qkv {
            Qkv::Split { q, k, v } => (q.forward(h)?, k.forward(h)?, v.forward(h)?),
            Qkv::Fused(w) => {
                let qkv = w.forward(h)?;
                (
                    qkv.narrow(D::Minus1, 0, nh * hd)?,
                    qkv.narrow(D::Minus1, nh * hd, nkv * hd)?,
                    qkv.narrow(D::Minus1, (nh + nkv) * hd, nkv * hd)?,
                )
            }
        };
        if let Some((bq, bk, bv)) = qkv_bias {
            q = q.broadcast_add(bq)?;
            k = k.broadcast_add(bk)?;
            v = v.broadcast_add(bv)?;
        }
        let mut q = q.contiguous()?.reshape((n, nh, 1, hd))?;
        let mut k = k.contiguous()?.reshape((n, nkv, 1, hd))?;
        let v = v.contiguous()?.reshape((n, nkv, hd))?;
        let eps = hp.rms_eps as f32;
        if let Some(w) = q_norm {
            q = rms_norm(&q.contiguous()?, w, eps)?;
        }
        if let Some(w) = k_norm {
            k = rms_norm(&k.contiguous()?, w, eps)?;
        }
        let (q, k) = if hp.arch.neox_rope() {
            (
                rope(&q.contiguous()?, cos, sin)?,
                rope(&k.contiguous()?, cos, sin)?,
            )
        } else {
            (
                rope_i(&q.contiguous()?, cos, sin)?,
                rope_i(&k.contiguous()?, cos, sin)?,
            )
        };
        Ok((q.reshape((n, nh, hd))?, k.reshape((n, nkv, hd))?, v))
    }

    /// Attention of layer `il` over the pool for queries `q` `(rows, heads, head_dim)`, with the step's
    /// keys and values `k`, `v` `(rows, kv heads, head_dim)` (written into the pool here); returns
    /// `(1, rows, heads · head_dim)`.
    fn attend(
        &self,
        il: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &StepContext<'_>,
        pool: &mut KvPool,
    ) -> Result<Tensor> {
        let hp = &self.hp;
        let n = q.dim(0)?;
        let (nh, hd) = (hp.n_head, hp.head_dim);
        let (g, _) = ctx.layout.place(il);
        let GroupStep {
            shape,
            seqs,
            gathers,
            paged,
        } = &ctx.groups[g];
        #[cfg(feature = "cuda")]
        if let (Some(kern), Some((meta, at))) = (&self.kernels, paged) {
            let (pk, pv) = pool
                .device_layer(il)
                .ok_or_else(|| candle_core::Error::Msg("the KV pool is released".into()))?;
            // Attend first, then write: the kernel reads the step's own keys from `k` and `v`.
            let out = kern.attend(q, k, v, pk, pv, meta, at, shape)?;
            kern.write(k, v, pk, pv, meta, at)?;
            return out.reshape((1, n, nh * hd));
        }
        #[cfg(not(feature = "cuda"))]
        let _ = paged;
        let out = match pool.host_layer(il) {
            Some(layer) => {
                let qh = q.flatten_all()?.to_vec1::<f32>()?;
                let kh = k.flatten_all()?.to_vec1::<f32>()?;
                let vh = v.flatten_all()?.to_vec1::<f32>()?;
                let o = attention::host(&layer, &qh, &kh, &vh, seqs, shape);
                Tensor::from_vec(o, (1, n, nh * hd), &self.device)?
            }
            None => {
                // A global layer keeps every position: its own rows can go into the pool first. A ring
                // may not hold a long chunk's early keys, so it attends first and writes after.
                let in_pool = shape.ring.is_none();
                if in_pool {
                    pool.write(il, k, v, ctx.slots)?;
                }
                let (pk, pv) = pool
                    .device_layer(il)
                    .ok_or_else(|| candle_core::Error::Msg("the KV pool is released".into()))?;
                let out = attention::portable(pk, pv, q, k, v, seqs, gathers, shape, in_pool)?
                    .reshape((1, n, nh * hd))?;
                if !in_pool {
                    pool.write(il, k, v, ctx.slots)?;
                }
                return Ok(out);
            }
        };
        pool.write(il, k, v, ctx.slots)?;
        Ok(out)
    }
}

/// One layer group's view of a step, the same for all its layers.
struct GroupStep<'a> {
    shape: AttnShape,
    seqs: Vec<AttnSeq<'a>>,
    gathers: Vec<Option<Tensor>>,
    /// With ult's CUDA kernels: the step's [`attention::paged_meta`] on the device, and its layout.
    paged: Option<(Tensor, attention::PagedLayout)>,
}

/// What every layer of one step shares.
struct StepContext<'a> {
    /// Per layer group: the attention shape, each sequence's part, and (portable path) what it gathers.
    groups: &'a [GroupStep<'a>],
    slots: &'a SlotMap,
    /// The rope tables of this layer, gathered at every row's position: `(rows, 1, head_dim / 2)`.
    rope: &'a (Tensor, Tensor),
    layout: &'a KvLayout,
}

impl Decoder for Transformer {
    fn kv_layout(&self) -> &KvLayout {
        &self.layout
    }

    fn context(&self) -> usize {
        self.context
    }

    fn vocab_size(&self) -> usize {
        self.hp.vocab_size
    }

    fn forward(
        &self,
        input: &StepInput<'_>,
        pool: &mut KvPool,
    ) -> std::result::Result<StepOutput, EngineError> {
        let vocab = self.hp.vocab_size as u32;
        for s in &input.seqs {
            if let Some(bad) = s.tokens.iter().find(|&&t| t >= vocab) {
                return Err(EngineError::InvalidParameter {
                    field: "prompt",
                    reason: format!("token id {bad} is outside the vocabulary"),
                });
            }
        }
        self.forward_step(input, pool)
            .map_err(|e| EngineError::candle("forward step".into(), e))
    }
}

/// `cos` and `sin` tables `(context, head_dim/2)` for rope with `base`, scaled as `scaling` says, each
/// frequency divided by its `factors` entry (Llama 3.1's `rope_freqs.weight`). Computed in f32 as
/// llama.cpp's `ggml_rope_cache_init` does (the angle of dimension pair `i` is the position times
/// `base^(-2/head_dim)` multiplied up `i` times), so the tables agree with it to float rounding.
fn rope_tables(
    head_dim: usize,
    context: usize,
    base: f32,
    scaling: RopeScaling,
    factors: Option<&[f32]>,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let theta_scale = base.powf(-2.0 / head_dim as f32);
    // (frequency scale, YaRN's ramp band and extrapolation mix, magnitude).
    let (freq_scale, yarn, mscale) = match scaling {
        RopeScaling::None => (1.0f32, None, 1.0f32),
        RopeScaling::Linear { factor } => (1.0 / factor, None, 1.0),
        RopeScaling::Yarn {
            factor,
            original_context,
            beta_fast,
            beta_slow,
            attn_factor,
        } => {
            let corr_dim = |rot: f32| {
                head_dim as f32
                    * (original_context as f32 / (rot * 2.0 * std::f32::consts::PI)).ln()
                    / (2.0 * base.ln())
            };
            let low = corr_dim(beta_fast).floor().max(0.0);
            let high = corr_dim(beta_slow).ceil().min(head_dim as f32 - 1.0);
            // llama.cpp cancels its own attention factor against the one rope applies, so what remains
            // is rope's 1 + 0.1·ln(factor), times the file's attn_factor.
            (
                1.0 / factor,
                Some((low, high)),
                attn_factor * (1.0 + 0.1 * factor.ln()),
            )
        }
    };
    if matches!(scaling, RopeScaling::None) && factors.is_none() {
        // Plain rope: the angle of pair `i` is the position times base^(−2i/d), as ult has always
        // computed it. It differs from llama.cpp's running product (below) in the last bits, and the
        // real models' pinned greedy texts (tests/tests/models.rs) sit on near-ties that notice.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1f32 / base.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions: Vec<f32> = (0..context).map(|p| p as f32).collect();
        let positions = Tensor::from_vec(positions, (context, 1), device)?;
        let freqs = positions.broadcast_mul(&inv_freq)?;
        return Ok((freqs.cos()?.contiguous()?, freqs.sin()?.contiguous()?));
    }
    let mut cos = Vec::with_capacity(context * half);
    let mut sin = Vec::with_capacity(context * half);
    for p in 0..context {
        let mut theta = p as f32;
        for i in 0..half {
            let extrap = theta / factors.map_or(1.0, |f| f[i]);
            let interp = freq_scale * extrap;
            let angle = match yarn {
                None => interp,
                Some((low, high)) => {
                    let y = (i as f32 - low) / (high - low).max(0.001);
                    let mix = 1.0 - y.clamp(0.0, 1.0);
                    interp * (1.0 - mix) + extrap * mix
                }
            };
            cos.push(angle.cos() * mscale);
            sin.push(angle.sin() * mscale);
            theta *= theta_scale;
        }
    }
    Ok((
        Tensor::from_vec(cos, (context, half), device)?,
        Tensor::from_vec(sin, (context, half), device)?,
    ))
}

impl Mla {
    fn load(
        src: &WeightSource<'_>,
        il: usize,
        hp: &HParams,
        params: MlaParams,
    ) -> std::result::Result<Self, EngineError> {
        let p = |t: &str| format!("blk.{il}.{t}.weight");
        let q = if params.q_lora_rank > 0 {
            MlaQuery::LowRank {
                a: src.qmatmul(&p("attn_q_a"))?,
                norm: src.vector(&p("attn_q_a_norm"))?,
                b: src.qmatmul(&p("attn_q_b"))?,
            }
        } else {
            MlaQuery::Plain(src.qmatmul(&p("attn_q"))?)
        };
        // (heads, rows, cols) in the file, transposed to (heads, cols, rows) for `x · W^T` per head.
        let per_head = |name: &str, rows: usize, cols: usize| {
            let t = src.vector(&p(name))?;
            if t.dims() != [hp.n_head, rows, cols] {
                return Err(EngineError::CorruptModel {
                    path: src.header.path.display().to_string(),
                    reason: format!(
                        "{} is {:?}, not {} heads of {rows}×{cols}",
                        p(name),
                        t.dims(),
                        hp.n_head
                    ),
                });
            }
            t.transpose(1, 2)
                .and_then(|t| t.contiguous())
                .map_err(|e| EngineError::candle(format!("preparing {}", p(name)), e))
        };
        Ok(Self {
            q,
            kv_a: src.qmatmul(&p("attn_kv_a_mqa"))?,
            kv_a_norm: src.vector(&p("attn_kv_a_norm"))?,
            k_b: per_head("attn_k_b", params.kv_lora_rank, params.qk_nope)?,
            v_b: per_head("attn_v_b", params.v_head_dim, params.kv_lora_rank)?,
            params,
        })
    }

    /// Latent attention of `h` `(1, rows, hidden)` for layer `il`, through the output projection `wo`.
    /// Each head's query is multiplied into the latent space (`q_nope · k_b`) and joined by its rope
    /// part; all heads attend over one KV head of latent and rope key (the pool's keys, which are also its
    /// values); each head's latent result leaves through `v_b`.
    fn forward(
        &self,
        t: &Transformer,
        il: usize,
        h: &Tensor,
        ctx: &StepContext<'_>,
        pool: &mut KvPool,
        wo: &QMatMul,
    ) -> Result<Tensor> {
        let hp = &t.hp;
        let (_, n, _) = h.dims3()?;
        let eps = hp.rms_eps as f32;
        let (nh, rope_d) = (hp.n_head, hp.rope_dim);
        let MlaParams {
            kv_lora_rank: lora,
            qk_nope: nope,
            v_head_dim: vd,
            ..
        } = self.params;
        let q = match &self.q {
            MlaQuery::Plain(w) => w.forward(h)?,
            MlaQuery::LowRank { a, norm, b } => b.forward(&rms_norm(&a.forward(h)?, norm, eps)?)?,
        };
        let q = q.reshape((n, nh, nope + rope_d))?;
        let kv = self.kv_a.forward(h)?.reshape((n, lora + rope_d))?;
        let latent = rms_norm(&kv.narrow(1, 0, lora)?.contiguous()?, &self.kv_a_norm, eps)?;
        let (cos, sin) = ctx.rope;
        let q_pe = q
            .narrow(2, nope, rope_d)?
            .contiguous()?
            .reshape((n, nh, 1, rope_d))?;
        let q_pe = rope_i(&q_pe, cos, sin)?.reshape((n, nh, rope_d))?;
        let k_pe = kv
            .narrow(1, lora, rope_d)?
            .contiguous()?
            .reshape((n, 1, 1, rope_d))?;
        let k_pe = rope_i(&k_pe, cos, sin)?.reshape((n, 1, rope_d))?;
        // (heads, rows, nope) · (heads, nope, lora) → (rows, heads, lora).
        let q_latent = q
            .narrow(2, 0, nope)?
            .transpose(0, 1)?
            .contiguous()?
            .matmul(&self.k_b)?
            .transpose(0, 1)?;
        let q = Tensor::cat(&[&q_latent, &q_pe], 2)?.contiguous()?;
        let k = Tensor::cat(&[&latent.reshape((n, 1, lora))?, &k_pe], 2)?.contiguous()?;
        // Values are the keys: each head's result is a mix of latents (its first `lora` dimensions).
        let out = t.attend(il, &q, &k, &k, ctx, pool)?;
        let o = out
            .reshape((n, nh, lora + rope_d))?
            .narrow(2, 0, lora)?
            .transpose(0, 1)?
            .contiguous()?
            .matmul(&self.v_b)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((1, n, nh * vd))?;
        wo.forward(&o)
    }
}

impl Moe {
    /// Each row's chosen experts and their gates, from the router's logits `(rows, experts)`, as
    /// llama.cpp's `build_moe_ffn` chooses them: probabilities by the gating function; the selection
    /// bias added to choose (not to weigh); with groups, only the best groups' experts (a group scores the
    /// sum of its two best); the top `n_expert_used`, highest first with ties to the lower expert; gates
    /// from the unbiased probabilities, renormalised and scaled as the file says.
    fn route(&self, logits: &Tensor) -> Result<Vec<Vec<(usize, f32)>>> {
        let m = &self.params;
        let probs = match m.gating {
            Gating::Softmax => candle_nn::ops::softmax_last_dim(logits)?.to_vec2::<f32>()?,
            Gating::Sigmoid => logits
                .to_vec2::<f32>()?
                .into_iter()
                .map(|row| row.into_iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect())
                .collect(),
        };
        let mut order: Vec<usize> = Vec::with_capacity(m.n_expert);
        let mut groups: Vec<(usize, f32)> = Vec::new();
        let by_score = |s: &[f32], a: usize, b: usize| s[b].total_cmp(&s[a]).then(a.cmp(&b));
        let mut routes = Vec::with_capacity(probs.len());
        for p in &probs {
            let mut sel: Vec<f32> = match &self.selection_bias {
                Some(bias) => p.iter().zip(bias).map(|(x, b)| x + b).collect(),
                None => p.clone(),
            };
            if let Some((n_groups, used)) = m.groups {
                let per = sel.len() / n_groups;
                groups.clear();
                for g in 0..n_groups {
                    // The sum of the group's two best (one, in groups of one).
                    let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                    for &v in &sel[g * per..(g + 1) * per] {
                        if v > first {
                            (first, second) = (v, first);
                        } else if v > second {
                            second = v;
                        }
                    }
                    groups.push((g, if per > 1 { first + second } else { first }));
                }
                groups.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                for &(g, _) in &groups[used.min(groups.len())..] {
                    sel[g * per..(g + 1) * per].fill(f32::NEG_INFINITY);
                }
            }
            order.clear();
            order.extend(0..sel.len());
            order.sort_by(|&a, &b| by_score(&sel, a, b));
            let top = &order[..m.n_expert_used.min(order.len())];
            // llama.cpp clamps the sum at f16's smallest normal.
            let sum = top.iter().map(|&e| p[e]).sum::<f32>().max(6.103_515_6e-5);
            routes.push(
                top.iter()
                    .map(|&e| {
                        let mut w = p[e];
                        if m.norm_weights {
                            w /= sum;
                        }
                        (e, w * m.weights_scale)
                    })
                    .collect(),
            );
        }
        Ok(routes)
    }

    /// Routes every row of `h` `(1, rows, hidden)` to its top experts and runs each chosen expert once
    /// over the rows that chose it; experts nobody chose are not touched. Shared experts run on every row.
    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let (_, n, d) = h.dims3()?;
        let x = h.squeeze(0)?;
        let routes = self.route(&self.router.forward(&x)?.to_dtype(DType::F32)?)?;
        let mut out = match &self.shared {
            Some(s) => s.forward(&x)?.to_dtype(DType::F32)?,
            None => Tensor::zeros((n, d), DType::F32, h.device())?,
        };
        let experts = match &self.experts {
            Experts::Each(experts) => experts,
            Experts::Stacked { gate, up, down } if n >= stacked_rows() => {
                // Each chosen expert copied out of the stacks in turn, used, and dropped.
                let one = |stack: &QTensor, e: usize| -> Result<QMatMul> {
                    QMatMul::from_qtensor(stack.matrix_of_stack(e)?)
                };
                let copy = |e: usize| -> Result<Expert> {
                    Ok(Expert {
                        gate: one(gate, e)?,
                        up: one(up, e)?,
                        down: one(down, e)?,
                    })
                };
                return self.each(&x, &routes, copy, out, h);
            }
            Experts::Stacked { gate, up, down } => {
                let k = self.params.n_expert_used;
                let (mut ids, mut ws) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k));
                for route in &routes {
                    if route.len() != k {
                        candle_core::bail!("a row routed to {} experts, not {k}", route.len())
                    }
                    ids.extend(route.iter().map(|&(e, _)| e as u32));
                    ws.extend(route.iter().map(|&(_, w)| w));
                }
                let ids = Tensor::from_vec(ids, (n, k), h.device())?;
                let ws = Tensor::from_vec(ws, (n, k, 1), h.device())?;
                // The kernel reads its input from the start of its buffer: copied only when `x` is
                // not a whole contiguous f32 tensor (the norm before it makes one).
                let x = x.to_dtype(DType::F32)?;
                let fresh = x.is_contiguous() && x.layout().start_offset() == 0;
                let x3 = if fresh { x } else { x.affine(1.0, 0.0)? }.reshape((n, 1, d))?;
                let g = gate.indexed_moe_forward(&x3, &ids)?;
                let u = up.indexed_moe_forward(&x3, &ids)?;
                let a = (g.silu()? * u)?; // (rows, k, ff): fresh
                let y = down.indexed_moe_forward(&a, &ids)?; // (rows, k, hidden)
                out = (out + y.broadcast_mul(&ws)?.sum(1)?)?;
                return out.to_dtype(h.dtype())?.unsqueeze(0);
            }
        };
        let each = |e: usize| {
            experts
                .get(e)
                .ok_or_else(|| candle_core::Error::Msg(format!("no expert {e}")))
        };
        self.each(&x, &routes, each, out, h)
    }

    /// Runs each expert once over the rows of `x` that chose it and adds their gated outputs to `out`;
    /// returns `(1, rows, hidden)` in `h`'s dtype. `expert(e)` gives expert `e`, asked only for experts
    /// some row chose, in order.
    fn each<E: std::borrow::Borrow<Expert>>(
        &self,
        x: &Tensor,
        routes: &[Vec<(usize, f32)>],
        mut expert: impl FnMut(usize) -> Result<E>,
        mut out: Tensor,
        h: &Tensor,
    ) -> Result<Tensor> {
        // Per expert: the rows that chose it and their gates.
        let mut chosen: Vec<(Vec<u32>, Vec<f32>)> =
            vec![(Vec::new(), Vec::new()); self.params.n_expert];
        for (row, route) in routes.iter().enumerate() {
            for &(e, w) in route {
                chosen[e].0.push(row as u32);
                chosen[e].1.push(w);
            }
        }
        for (e, (rows, gates)) in chosen.into_iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let expert = expert(e)?;
            let expert = expert.borrow();
            let m = rows.len();
            let idx = Tensor::from_vec(rows, m, h.device())?;
            let xs = x.index_select(&idx, 0)?.unsqueeze(0)?;
            let y = expert.forward(&xs)?.squeeze(0)?.to_dtype(DType::F32)?;
            let g = Tensor::from_vec(gates, (m, 1), h.device())?;
            out = out.index_add(&idx, &y.broadcast_mul(&g)?, 0)?;
        }
        out.to_dtype(h.dtype())?.unsqueeze(0)
    }
}

/// The index of the largest logit.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}
