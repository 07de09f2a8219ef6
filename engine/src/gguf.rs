//! GGUF headers: architecture, hyper-parameters, tokenizer metadata and tensor layout, read and validated
//! without reading any weight, plus the memory footprint they predict.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{self, Value};
use ult_policy::Footprint;

use super::EngineError;
use super::tokenizer::GgufVocab;

/// Model families ult runs from GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama and its kin (Llama 3, Mistral, SmolLM2): RMSNorm, SwiGLU, interleaved rope.
    Llama,
    /// Gemma 3: sandwich norms, QK-norm, GELU-tanh, local/global attention.
    Gemma3,
    /// Qwen2 / Qwen2.5: Llama's shape with Q/K/V biases and NeoX rope.
    Qwen2,
    /// Qwen3: per-head Q/K RMSNorm, no biases, NeoX rope.
    Qwen3,
    /// Qwen3-MoE: Qwen3's attention with top-k routed experts and normalised gates.
    Qwen3Moe,
    /// Phi-3: fused QKV and gate-up matrices, NeoX rope.
    Phi3,
    /// DeepSeek V2/V3 (and R1): multi-head latent attention over a compressed KV, dense leading layers,
    /// then shared plus routed experts.
    DeepSeek2,
}

impl Arch {
    /// Every family, in the order errors list them.
    pub const ALL: [Arch; 7] = [
        Self::Llama,
        Self::Gemma3,
        Self::Qwen2,
        Self::Qwen3,
        Self::Qwen3Moe,
        Self::Phi3,
        Self::DeepSeek2,
    ];

    /// The GGUF `general.architecture` string.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Gemma3 => "gemma3",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Qwen3Moe => "qwen3moe",
            Self::Phi3 => "phi3",
            Self::DeepSeek2 => "deepseek2",
        }
    }

    /// The family named `name` in `general.architecture`, if ult runs it.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == name)
    }

    /// Whether rope rotates the two halves of each head (GPT-NeoX style) rather than adjacent pairs
    /// (llama.cpp's `LLAMA_ROPE_TYPE_NEOX` against `LLAMA_ROPE_TYPE_NORM`).
    pub fn neox_rope(&self) -> bool {
        !matches!(self, Self::Llama | Self::DeepSeek2)
    }
}

/// How rope positions are scaled beyond the trained context (`{arch}.rope.scaling.*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain rope.
    None,
    /// Positions divided by `factor` (`linear`).
    Linear {
        /// The scaling factor.
        factor: f32,
    },
    /// YaRN: frequencies interpolated by `factor` outside a band of dimensions set by the original
    /// context, with magnitudes scaled by `1 + 0.1·ln(factor)` (as llama.cpp's `ggml_rope_ext`).
    Yarn {
        /// The scaling factor.
        factor: f32,
        /// The context the model was first trained for.
        original_context: usize,
        /// YaRN's fast boundary (rotations per original context).
        beta_fast: f32,
        /// YaRN's slow boundary.
        beta_slow: f32,
        /// An extra magnitude factor (`rope.scaling.attn_factor`, default 1).
        attn_factor: f32,
    },
}

/// How a router's logits become expert probabilities (`{arch}.expert_gating_func`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gating {
    /// Softmax over all experts (Qwen3-MoE, DeepSeek V2).
    Softmax,
    /// A sigmoid per expert (DeepSeek V3 and R1).
    Sigmoid,
}

/// Mixture-of-experts shape (Qwen3-MoE, DeepSeek).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeParams {
    /// Routed experts per layer.
    pub n_expert: usize,
    /// Experts each token routes to.
    pub n_expert_used: usize,
    /// Each expert's feed-forward size.
    pub n_ff_exp: usize,
    /// Whether the chosen experts' gates are renormalised to sum to one.
    pub norm_weights: bool,
    /// A factor on the gates (1 when the file sets none).
    pub weights_scale: f32,
    /// Router logits to probabilities.
    pub gating: Gating,
    /// Shared experts every token runs (one gated feed-forward of `n_shared · n_ff_exp`; DeepSeek).
    pub n_shared: usize,
    /// The first layers are dense feed-forwards of `n_ff`, not experts (DeepSeek).
    pub n_dense_lead: usize,
    /// Group-limited routing (DeepSeek V3): the experts fall into `.0` equal groups, and a token chooses
    /// among the `.1` groups whose two best experts score highest.
    pub groups: Option<(usize, usize)>,
}

/// Multi-head latent attention (DeepSeek V2/V3): keys and values are decompressed per head from one
/// normalised latent of `kv_lora_rank` per token, which the KV cache holds with the shared rope key. ult
/// attends in the latent space: each head's query is multiplied into it through `attn_k_b`, every head
/// attends over the cached latent plus rope key (one KV head of `kv_lora_rank + rope_dim`, the value being
/// the latent itself), and `attn_v_b` maps each head's result out, as llama.cpp's MLA path does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaParams {
    /// The rank of the query's low-rank projection (0: one `attn_q` matrix).
    pub q_lora_rank: usize,
    /// The latent's size.
    pub kv_lora_rank: usize,
    /// Each head's key dimensions without rope.
    pub qk_nope: usize,
    /// Each head's value size.
    pub v_head_dim: usize,
}

/// Transformer hyper-parameters from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct HParams {
    /// The family.
    pub arch: Arch,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
    /// Per-head dimension of the cached keys (with MLA: the latent plus the rope key).
    pub head_dim: usize,
    /// The dimensions of each head that rope rotates (the whole head, except with MLA).
    pub rope_dim: usize,
    /// Feed-forward size.
    pub n_ff: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// Rope base frequency (global layers).
    pub rope_base: f32,
    /// Rope base for local (sliding-window) layers (`gemma3.rope.freq_base_swa`, else 10000).
    pub rope_local_base: f32,
    /// Rope scaling of global layers.
    pub rope_scaling: RopeScaling,
    /// Whether the file carries per-dimension rope frequency divisors (`rope_freqs.weight`, Llama 3.1+).
    pub rope_freqs: bool,
    /// The context the model was trained for.
    pub trained_context: usize,
    /// The sliding window of local layers, if any.
    pub sliding_window: Option<usize>,
    /// Every `swa_pattern`-th layer is global; the others are local.
    pub swa_pattern: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// The attention scale (1/sqrt of the query pre-attention scalar).
    pub attn_scale: f64,
    /// Routed experts, for mixture-of-experts families.
    pub moe: Option<MoeParams>,
    /// Multi-head latent attention (DeepSeek).
    pub mla: Option<MlaParams>,
}

impl HParams {
    /// Whether layer `il` uses the sliding window.
    pub fn is_local(&self, il: usize) -> bool {
        self.sliding_window.is_some()
            && self.swa_pattern > 0
            && !(il + 1).is_multiple_of(self.swa_pattern)
    }
}

/// One tensor's place in the file.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    /// Quantization type.
    pub dtype: GgmlDType,
    /// Dimensions, outermost first (candle order).
    pub dims: Vec<usize>,
    /// Absolute byte offset in the file.
    pub offset: u64,
    /// Bytes in the file.
    pub bytes: u64,
}

/// Everything ult needs from a GGUF file before loading it.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    /// The file.
    pub path: PathBuf,
    /// Its size.
    pub file_len: u64,
    /// Hyper-parameters.
    pub hparams: HParams,
    /// Tokenizer metadata.
    pub vocab: GgufVocab,
    /// `tokenizer.chat_template`, if the file has one.
    pub chat_template: Option<String>,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorMeta>,
    /// `general.name`.
    pub name: Option<String>,
}

impl GgufHeader {
    /// Reads and validates the header of `path`: magic, version, metadata, and that every tensor lies
    /// inside the file with the size its type and shape imply.
    pub fn read(path: &Path) -> Result<Self, EngineError> {
        let io = |source| EngineError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        Self::parse(&mut BufReader::new(file), file_len, path)
    }

    /// Parses and validates a GGUF header from `reader`, a file of `file_len` bytes named `path` in
    /// errors. Never panics, whatever the bytes (fuzzed: `ultd::fuzzing::gguf`).
    pub fn parse<R: std::io::Read + std::io::Seek>(
        reader: &mut R,
        file_len: u64,
        path: &Path,
    ) -> Result<Self, EngineError> {
        let corrupt = |reason: String| EngineError::CorruptModel {
            path: path.display().to_string(),
            reason,
        };
        let content = gguf_file::Content::read(reader).map_err(|e| corrupt(e.to_string()))?;
        let md = &content.metadata;
        let arch_name = get_string(md, "general.architecture")
            .ok_or_else(|| corrupt("no general.architecture".into()))?;
        let arch =
            Arch::from_name(&arch_name).ok_or_else(|| EngineError::UnsupportedArchitecture {
                path: path.display().to_string(),
                arch: arch_name.clone(),
            })?;
        let mut tensors = BTreeMap::new();
        for (name, info) in &content.tensor_infos {
            // Checked: a hostile file can name dimensions whose product overflows.
            let elems = info
                .shape
                .dims()
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| corrupt(format!("tensor {name}: element count overflows")))?;
            let block = info.ggml_dtype.block_size();
            if !elems.is_multiple_of(block) {
                return Err(corrupt(format!(
                    "tensor {name}: {elems} elements is not a multiple of the block size {block}"
                )));
            }
            let bytes = ((elems / block) as u64)
                .checked_mul(info.ggml_dtype.type_size() as u64)
                .ok_or_else(|| corrupt(format!("tensor {name}: size overflows")))?;
            let offset = content
                .tensor_data_offset
                .checked_add(info.offset)
                .ok_or_else(|| corrupt(format!("tensor {name}: offset overflows")))?;
            let end = offset
                .checked_add(bytes)
                .ok_or_else(|| corrupt(format!("tensor {name}: size overflows")))?;
            if end > file_len {
                return Err(corrupt(format!(
                    "tensor {name} ends at byte {end} but the file has {file_len} bytes (truncated?)"
                )));
            }
            tensors.insert(
                name.clone(),
                TensorMeta {
                    dtype: info.ggml_dtype,
                    dims: info.shape.dims().to_vec(),
                    offset,
                    bytes,
                },
            );
        }
        let vocab = read_vocab(md).map_err(corrupt)?;
        let hparams = hparams_from_metadata(arch, md, &vocab, &tensors, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file_len,
            hparams,
            vocab,
            chat_template: get_string(md, "tokenizer.chat_template"),
            tensors,
            name: get_string(md, "general.name"),
        })
    }

    /// The tensor named `name`, or a typed error.
    pub fn tensor(&self, name: &str) -> Result<&TensorMeta, EngineError> {
        self.tensors
            .get(name)
            .ok_or_else(|| EngineError::MissingTensor {
                path: self.path.display().to_string(),
                name: name.to_string(),
            })
    }

    /// Bytes of weights as stored. The f32 copies Candle makes of 16-bit matrices at load are overhead
    /// (see [`GgufHeader::footprint`]); the token embedding table stays as stored.
    pub fn weights_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.bytes).sum()
    }

    /// The predicted footprint for a context of `context` tokens and `max_sequences` sequences, on a CPU
    /// (`cpu = true`, where Candle may keep repacked weight copies) or a GPU.
    ///
    /// KV: the model's [`crate::kv::KvLayout`] (f32 on the CPU, f16 on GPUs, in blocks of
    /// [`crate::kv::BLOCK_TOKENS`]; sliding-window layers keep a ring of their window's blocks), the same
    /// layout the block pool is allocated from. Steady overhead: rope tables sized to the context (two bases for
    /// Gemma 3) and Candle's repacked copies. Scratch: the activations, attention scores and logits of a
    /// prefill chunk of [`super::PREFILL_CHUNK`] tokens against a full context.
    pub fn footprint(&self, context: usize, max_sequences: u32, cpu: bool) -> Footprint {
        let hp = &self.hparams;
        let dtype = if cpu {
            crate::kv::KvDType::F32
        } else {
            crate::kv::KvDType::F16
        };
        let layout = crate::kv::KvLayout::new(hp, context, dtype, crate::kv::BLOCK_TOKENS);
        let rope_tables = match hp.arch {
            Arch::Gemma3 => 2,
            _ => 1,
        };
        let rope = rope_tables * 2 * context * (hp.rope_dim / 2) * 4;
        let level = if cpu {
            super::repack::x86_level()
        } else {
            super::repack::X86Level::None
        };
        let repacked: u64 = self
            .tensors
            .iter()
            .filter(|(name, _)| name.starts_with("blk.") || name.as_str() == "output.weight")
            .chain(
                // A tied output head multiplies with the embedding table.
                self.tensors
                    .get_key_value("token_embd.weight")
                    .filter(|_| !self.tensors.contains_key("output.weight")),
            )
            .map(|(_, t)| match *t.dims.as_slice() {
                [n, k] => super::repack::extra_bytes(level, t.dtype, n, k),
                // Stacked experts are loaded as one matrix per expert, each repacked on its own.
                [e, n, k] => e as u64 * super::repack::extra_bytes(level, t.dtype, n, k),
                _ => 0,
            })
            .sum();
        // Candle multiplies by float matrices (F32, F16, BF16) as f32 tensors made at load: a 16-bit
        // matrix takes twice its file bytes (its file bytes in `weights_bytes`, the rest here), and a tied
        // output head over a float embedding table is a second, f32 copy of the table (the embedding keeps
        // the file's).
        let is_float =
            |t: &TensorMeta| matches!(t.dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        let f32_bytes = |t: &TensorMeta| t.dims.iter().product::<usize>() as u64 * 4;
        let tied = !self.tensors.contains_key("output.weight");
        // MLA's per-head attn_k_b and attn_v_b are batched matrix products: held as f32 tensors.
        let mla_f32 =
            |name: &str| name.ends_with(".attn_k_b.weight") || name.ends_with(".attn_v_b.weight");
        let dequantized: u64 = self
            .tensors
            .iter()
            .filter(|(name, t)| {
                // Norms and biases are f32 tensors too; only the embedding table stays as stored.
                name.as_str() != "token_embd.weight" && (is_float(t) || mla_f32(name))
            })
            .map(|(_, t)| f32_bytes(t).saturating_sub(t.bytes))
            .chain(
                self.tensors
                    .get("token_embd.weight")
                    .filter(|t| tied && is_float(t))
                    .map(f32_bytes),
            )
            .sum();
        let chunk = super::PREFILL_CHUNK.min(context);
        let keys = context;
        let scores = 2 * hp.n_head * chunk * keys * 4;
        // The widest feed-forward a token computes: the dense one, or its chosen experts side by side.
        let ff = hp
            .moe
            .map_or(hp.n_ff, |m| hp.n_ff.max(m.n_expert_used * m.n_ff_exp));
        let routing = hp.moe.map_or(0, |m| 2 * m.n_expert);
        let activations =
            chunk * (4 * hp.n_embd + 3 * hp.n_head * hp.head_dim + 3 * ff + routing) * 4;
        let logits = 2 * hp.vocab_size * 4;
        // On a GPU a prefill chunk copies one expert's three matrices out of the stacks at a time.
        let expert_copy: u64 = if cpu {
            0
        } else {
            3 * self
                .tensors
                .iter()
                .filter(|(name, t)| name.ends_with("_exps.weight") && t.dims.len() == 3)
                .map(|(_, t)| t.bytes / t.dims[0].max(1) as u64)
                .max()
                .unwrap_or(0)
        };
        Footprint {
            weights_bytes: self.weights_bytes(),
            overhead_bytes: rope as u64 + repacked + dequantized,
            scratch_bytes: (scores + activations + logits) as u64 + expert_copy,
            kv_bytes_per_token: layout.bytes_per_token(),
            kv_fixed_bytes_per_sequence: layout.ring_bytes_per_sequence(),
            kv_block_tokens: layout.block_tokens as u32,
            context_tokens: u32::try_from(context).unwrap_or(u32::MAX),
            max_sequences,
        }
    }
}

fn get<'a>(md: &'a std::collections::HashMap<String, Value>, key: &str) -> Option<&'a Value> {
    md.get(key)
}

fn get_string(md: &std::collections::HashMap<String, Value>, key: &str) -> Option<String> {
    get(md, key).and_then(|v| v.to_string().ok()).cloned()
}

fn get_u64(md: &std::collections::HashMap<String, Value>, key: &str) -> Option<u64> {
    get(md, key).and_then(|v| match v {
        Value::U8(x) => Some(u64::from(*x)),
        Value::U16(x) => Some(u64::from(*x)),
        Value::U32(x) => Some(u64::from(*x)),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    })
}

fn get_f64(md: &std::collections::HashMap<String, Value>, key: &str) -> Option<f64> {
    get(md, key).and_then(|v| match v {
        Value::F32(x) => Some(f64::from(*x)),
        Value::F64(x) => Some(*x),
        _ => None,
    })
}

fn get_bool(md: &std::collections::HashMap<String, Value>, key: &str) -> Option<bool> {
    get(md, key).and_then(|v| v.to_bool().ok())
}

fn read_vocab(md: &std::collections::HashMap<String, Value>) -> Result<GgufVocab, String> {
    let strings = |key: &str| -> Result<Vec<String>, String> {
        match get(md, key) {
            None => Ok(Vec::new()),
            Some(v) => v
                .to_vec()
                .map_err(|e| format!("{key}: {e}"))?
                .iter()
                .map(|x| x.to_string().cloned().map_err(|e| format!("{key}: {e}")))
                .collect(),
        }
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        return Err("no tokenizer.ggml.tokens".into());
    }
    let token_types = match get(md, "tokenizer.ggml.token_type") {
        None => Vec::new(),
        Some(v) => v
            .to_vec()
            .map_err(|e| e.to_string())?
            .iter()
            .map(|x| x.to_i32().map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?,
    };
    let scores = match get(md, "tokenizer.ggml.scores") {
        None => Vec::new(),
        Some(v) => v
            .to_vec()
            .map_err(|e| e.to_string())?
            .iter()
            .map(|x| x.to_f32().map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?,
    };
    let id = |key: &str| get_u64(md, key).and_then(|v| u32::try_from(v).ok());
    Ok(GgufVocab {
        model: get_string(md, "tokenizer.ggml.model").unwrap_or_else(|| "llama".into()),
        pre: get_string(md, "tokenizer.ggml.pre"),
        merges: strings("tokenizer.ggml.merges")?,
        tokens,
        token_types,
        scores,
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id"),
        eot: id("tokenizer.ggml.eot_token_id"),
        unk: id("tokenizer.ggml.unknown_token_id"),
        add_bos: get_bool(md, "tokenizer.ggml.add_bos_token"),
        add_space_prefix: get_bool(md, "tokenizer.ggml.add_space_prefix"),
        ..GgufVocab::default()
    })
}

/// The hyper-parameters that GGUF metadata `md` (with the file's tensors) describe for `arch`; a model
/// folder's config reaches the decoder as this same metadata (`crate::hf`).
pub(crate) fn hparams_from_metadata(
    arch: Arch,
    md: &std::collections::HashMap<String, Value>,
    vocab: &GgufVocab,
    tensors: &BTreeMap<String, TensorMeta>,
    path: &Path,
) -> Result<HParams, EngineError> {
    read_hparams(arch, md, vocab, tensors).map_err(|e| match e {
        HParamsError::Corrupt(reason) => EngineError::CorruptModel {
            path: path.display().to_string(),
            reason,
        },
        HParamsError::Unsupported(what) => EngineError::UnsupportedFeature {
            path: path.display().to_string(),
            what,
        },
    })
}

/// Why hyper-parameters could not be read.
enum HParamsError {
    /// The metadata is missing or inconsistent.
    Corrupt(String),
    /// The metadata is valid but asks for something ult does not implement.
    Unsupported(String),
}

impl From<String> for HParamsError {
    fn from(s: String) -> Self {
        Self::Corrupt(s)
    }
}

impl From<&str> for HParamsError {
    fn from(s: &str) -> Self {
        Self::Corrupt(s.to_string())
    }
}

fn read_hparams(
    arch: Arch,
    md: &std::collections::HashMap<String, Value>,
    vocab: &GgufVocab,
    tensors: &BTreeMap<String, TensorMeta>,
) -> Result<HParams, HParamsError> {
    let a = arch.as_str();
    let key = |k: &str| format!("{a}.{k}");
    let req = |k: &str| {
        get_u64(md, &key(k))
            .map(|v| v as usize)
            .ok_or_else(|| format!("missing {a}.{k}"))
    };
    // DeepSeek V3's multi-token-prediction layers follow the decoder's; ult does not run them.
    let n_layer = req("block_count")?
        .saturating_sub(get_u64(md, &key("nextn_predict_layers")).map_or(0, |v| v as usize));
    let n_embd = req("embedding_length")?;
    let n_head = req("attention.head_count")?;
    let n_head_kv = get_u64(md, &key("attention.head_count_kv")).map_or(n_head, |v| v as usize);
    let n_ff = req("feed_forward_length")?;
    if n_layer == 0
        || n_embd == 0
        || n_head == 0
        || n_head_kv == 0
        || n_layer > 1024
        || n_head > 4096
    {
        return Err(format!(
            "implausible shape: {n_layer} layers, {n_embd} hidden, {n_head} heads"
        )
        .into());
    }
    if n_head % n_head_kv != 0 {
        return Err(
            format!("{n_head} query heads is not a multiple of {n_head_kv} KV heads").into(),
        );
    }
    let head_dim =
        get_u64(md, &key("attention.key_length")).map_or(n_embd / n_head, |v| v as usize);
    let value_dim = get_u64(md, &key("attention.value_length")).map_or(head_dim, |v| v as usize);
    let rope_dim = get_u64(md, &key("rope.dimension_count")).map_or(head_dim, |v| v as usize);
    let mla = match arch {
        Arch::DeepSeek2 => Some(read_mla(
            md, &key, n_head_kv, head_dim, value_dim, rope_dim,
        )?),
        _ => None,
    };
    if mla.is_none() && value_dim != head_dim {
        return Err(HParamsError::Unsupported(format!(
            "value heads of {value_dim} beside key heads of {head_dim}"
        )));
    }
    if head_dim == 0 || !head_dim.is_multiple_of(2) || head_dim > 4096 {
        return Err(format!("implausible head size {head_dim}").into());
    }
    if mla.is_none() && rope_dim != head_dim {
        return Err(HParamsError::Unsupported(format!(
            "rope over {rope_dim} of {head_dim} head dimensions (partial rotary)"
        )));
    }
    let rms_eps = get_f64(md, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6);
    let rope_base = get_f64(md, &key("rope.freq_base")).unwrap_or(10_000.0) as f32;
    let trained_context = get_u64(md, &key("context_length")).map_or(2048, |v| v as usize);
    let vocab_size = tensors
        .get("token_embd.weight")
        .and_then(|t| t.dims.first().copied())
        .unwrap_or(vocab.tokens.len());
    let rope_freqs = tensors.contains_key("rope_freqs.weight");
    if tensors.contains_key("rope_factors_long.weight") {
        return Err(HParamsError::Unsupported(
            "LongRoPE (rope_factors_long/short, Phi-3 128k)".into(),
        ));
    }
    let factor = get_f64(md, &key("rope.scaling.factor"))
        .or_else(|| get_f64(md, &key("rope.scale_linear")))
        .map_or(1.0, |f| f as f32);
    let rope_scaling = match get_string(md, &key("rope.scaling.type")).as_deref() {
        // llama.cpp reads a missing type as linear: a factor alone scales linearly.
        None | Some("linear") if factor != 1.0 && factor > 0.0 => RopeScaling::Linear { factor },
        None | Some("linear") | Some("none") => RopeScaling::None,
        // Llama 3.1's scaling is carried by rope_freqs.weight; the type alone says nothing more.
        Some("llama3") if rope_freqs => RopeScaling::None,
        Some("yarn") => RopeScaling::Yarn {
            factor: if factor > 0.0 { factor } else { 1.0 },
            original_context: get_u64(md, &key("rope.scaling.original_context_length"))
                .map_or(trained_context, |v| v as usize),
            beta_fast: get_f64(md, &key("rope.scaling.yarn_beta_fast")).map_or(32.0, |v| v as f32),
            beta_slow: get_f64(md, &key("rope.scaling.yarn_beta_slow")).map_or(1.0, |v| v as f32),
            attn_factor: get_f64(md, &key("rope.scaling.attn_factor")).map_or(1.0, |v| v as f32),
        },
        Some(other) => {
            return Err(HParamsError::Unsupported(format!(
                "rope scaling {other:?} (ult runs linear, yarn, and llama3 through rope_freqs.weight)"
            )));
        }
    };
    let moe = match arch {
        Arch::DeepSeek2 => Some(read_deepseek_moe(md, &key, n_ff, n_layer)?),
        Arch::Qwen3Moe => {
            let n_expert = req("expert_count")?;
            let n_expert_used = req("expert_used_count")?;
            if n_expert == 0 || n_expert_used == 0 || n_expert_used > n_expert || n_expert > 4096 {
                return Err(format!(
                    "implausible experts: {n_expert_used} of {n_expert} per token"
                )
                .into());
            }
            let n_ff_exp = get_u64(md, &key("expert_feed_forward_length"))
                .map_or(n_ff / n_expert_used, |v| v as usize);
            Some(MoeParams {
                n_expert,
                n_expert_used,
                n_ff_exp,
                // llama.cpp's qwen3moe graph always renormalises the chosen gates.
                norm_weights: true,
                weights_scale: weights_scale(md, &key("expert_weights_scale")),
                gating: Gating::Softmax,
                n_shared: 0,
                n_dense_lead: 0,
                groups: None,
            })
        }
        _ => None,
    };
    let (sliding_window, swa_pattern, rope_local_base, attn_scale) = match arch {
        Arch::Gemma3 => {
            // Gemma 3 scales queries by 1/sqrt(query_pre_attn_scalar): the head size, except for the 27B
            // model where it is hidden / heads (llama.cpp does the same; GGUF does not store it).
            let scalar = if n_embd == 5376 && n_head == 32 {
                n_embd / n_head
            } else {
                head_dim
            };
            (
                get_u64(md, "gemma3.attention.sliding_window").map(|v| v as usize),
                6,
                get_f64(md, "gemma3.rope.freq_base_swa").map_or(10_000.0, |v| v as f32),
                1.0 / (scalar as f64).sqrt(),
            )
        }
        _ => (None, 0, rope_base, 1.0 / (head_dim as f64).sqrt()),
    };
    let (rope_scaling, attn_scale) = match mla {
        Some(m) => deepseek_yarn(md, &key, rope_scaling, m.qk_nope + rope_dim),
        None => (rope_scaling, attn_scale),
    };
    Ok(HParams {
        arch,
        n_layer,
        n_embd,
        n_head,
        n_head_kv,
        head_dim,
        rope_dim,
        n_ff,
        rms_eps,
        rope_base,
        rope_local_base,
        rope_scaling,
        rope_freqs,
        trained_context,
        sliding_window,
        swa_pattern,
        vocab_size,
        attn_scale,
        moe,
        mla,
    })
}

/// DeepSeek's MLA shape, in the layout llama.cpp's converter writes since its MLA support: one KV head of
/// `kv_lora_rank + rope` (`attention.key_length`), values of `kv_lora_rank`, and the per-head sizes in
/// `attention.key_length_mla` / `value_length_mla` with the split `attn_k_b` / `attn_v_b` tensors.
fn read_mla(
    md: &std::collections::HashMap<String, Value>,
    key: &dyn Fn(&str) -> String,
    n_head_kv: usize,
    head_dim: usize,
    value_dim: usize,
    rope_dim: usize,
) -> Result<MlaParams, HParamsError> {
    let get = |k: &str| get_u64(md, &key(k)).map(|v| v as usize);
    let (Some(k_mla), Some(v_mla)) = (
        get("attention.key_length_mla"),
        get("attention.value_length_mla"),
    ) else {
        return Err(HParamsError::Unsupported(
            "a DeepSeek GGUF without attention.key_length_mla (the legacy attn_kv_b layout); \
             convert it again with llama.cpp's convert_hf_to_gguf.py of 2025 or later"
                .into(),
        ));
    };
    let kv_lora_rank = get("attention.kv_lora_rank").ok_or("missing attention.kv_lora_rank")?;
    let q_lora_rank = get("attention.q_lora_rank").unwrap_or(0);
    if n_head_kv != 1
        || value_dim != kv_lora_rank
        || head_dim != kv_lora_rank + rope_dim
        || k_mla <= rope_dim
        || rope_dim == 0
        || !rope_dim.is_multiple_of(2)
        || v_mla == 0
        || kv_lora_rank == 0
    {
        return Err(format!(
            "inconsistent MLA shape: {n_head_kv} KV heads of {head_dim} (values {value_dim}), latent \
             {kv_lora_rank}, rope {rope_dim}, heads {k_mla}/{v_mla}"
        )
        .into());
    }
    Ok(MlaParams {
        q_lora_rank,
        kv_lora_rank,
        qk_nope: k_mla - rope_dim,
        v_head_dim: v_mla,
    })
}

/// The gates' scale at `key`: llama.cpp reads 0 (or no key) as no scaling.
fn weights_scale(md: &std::collections::HashMap<String, Value>, key: &str) -> f32 {
    get_f64(md, key)
        .map(|v| v as f32)
        .filter(|&v| v != 0.0)
        .unwrap_or(1.0)
}

/// DeepSeek's experts: shared and routed, after `leading_dense_block_count` dense layers.
fn read_deepseek_moe(
    md: &std::collections::HashMap<String, Value>,
    key: &dyn Fn(&str) -> String,
    n_ff: usize,
    n_layer: usize,
) -> Result<MoeParams, HParamsError> {
    let get = |k: &str| get_u64(md, &key(k)).map(|v| v as usize);
    let n_expert = get("expert_count").ok_or("missing expert_count")?;
    let n_expert_used = get("expert_used_count").ok_or("missing expert_used_count")?;
    if n_expert == 0 || n_expert_used == 0 || n_expert_used > n_expert || n_expert > 4096 {
        return Err(format!("implausible experts: {n_expert_used} of {n_expert} per token").into());
    }
    let gating = match get("expert_gating_func") {
        // llama.cpp reads a missing function as DeepSeek V2's softmax.
        None | Some(0) | Some(1) => Gating::Softmax,
        Some(2) => Gating::Sigmoid,
        Some(other) => {
            return Err(HParamsError::Unsupported(format!(
                "expert gating function {other} (ult runs softmax and sigmoid)"
            )));
        }
    };
    let groups = match (get("expert_group_count"), get("expert_group_used_count")) {
        (Some(g), Some(used)) if g > 1 => {
            if !n_expert.is_multiple_of(g) || used == 0 || used >= g {
                return Err(format!(
                    "implausible expert groups: {used} of {g} for {n_expert} experts"
                )
                .into());
            }
            Some((g, used))
        }
        _ => None,
    };
    let n_dense_lead = get("leading_dense_block_count").unwrap_or(0).min(n_layer);
    if n_dense_lead > 0 && n_ff == 0 {
        return Err("dense leading layers without feed_forward_length".into());
    }
    Ok(MoeParams {
        n_expert,
        n_expert_used,
        n_ff_exp: get("expert_feed_forward_length").ok_or("missing expert_feed_forward_length")?,
        norm_weights: get_bool(md, &key("expert_weights_norm")).unwrap_or(false),
        weights_scale: weights_scale(md, &key("expert_weights_scale")),
        gating,
        n_shared: get("expert_shared_count").unwrap_or(0),
        n_dense_lead,
        groups,
    })
}

/// DeepSeek's YaRN, as llama.cpp computes it (`llama_context`'s yarn_attn_factor and the deepseek2
/// graph's kq_scale): rope's magnitude and the attention scale over the per-head key size `k_mla`. The
/// file's `rope.scaling.yarn_log_multiplier` is 0.1 × DeepSeek's `mscale_all_dim`.
fn deepseek_yarn(
    md: &std::collections::HashMap<String, Value>,
    key: &dyn Fn(&str) -> String,
    scaling: RopeScaling,
    k_mla: usize,
) -> (RopeScaling, f64) {
    let log_mul = get_f64(md, &key("rope.scaling.yarn_log_multiplier")).unwrap_or(0.0) / 0.1;
    let rope_attn = get_f64(md, &key("rope.scaling.attn_factor")).unwrap_or(1.0);
    let (factor, yarn) = match scaling {
        RopeScaling::None => (1.0, false),
        RopeScaling::Linear { factor } => (f64::from(factor), false),
        RopeScaling::Yarn { factor, .. } => (f64::from(factor), true),
    };
    let ln = if factor > 1.0 { factor.ln() } else { 0.0 };
    // The factor rope is given (its tables then carry it times 1 + 0.1·ln(factor) under YaRN).
    let rope_factor = if yarn {
        // With a log multiplier, llama.cpp's mscale ratio is 1; without, it is 1 + 0.1·ln(factor).
        let ratio = if log_mul != 0.0 { 1.0 } else { 1.0 + 0.1 * ln };
        ratio / (1.0 + 0.1 * ln) * rope_attn
    } else {
        rope_attn
    };
    let mscale = rope_factor * (1.0 + 0.1 * ln) * (1.0 + 0.1 * log_mul * ln);
    let scaling = match scaling {
        RopeScaling::Yarn {
            factor,
            original_context,
            beta_fast,
            beta_slow,
            ..
        } => RopeScaling::Yarn {
            factor,
            original_context,
            beta_fast,
            beta_slow,
            attn_factor: rope_factor as f32,
        },
        other => other,
    };
    (scaling, mscale * mscale / (k_mla as f64).sqrt())
}
