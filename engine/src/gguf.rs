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
    /// Llama and its kin (SmolLM2): RMSNorm, SwiGLU, interleaved rope.
    Llama,
    /// Gemma 3: sandwich norms, QK-norm, GELU-tanh, local/global attention.
    Gemma3,
}

impl Arch {
    /// The GGUF `general.architecture` string.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Gemma3 => "gemma3",
        }
    }
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
    /// Per-head dimension.
    pub head_dim: usize,
    /// Feed-forward size.
    pub n_ff: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// Rope base frequency (global layers).
    pub rope_base: f32,
    /// Rope base for local (sliding-window) layers.
    pub rope_local_base: f32,
    /// Linear rope scaling factor for global layers (positions are divided by it).
    pub rope_scale: f32,
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
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "gemma3" => Arch::Gemma3,
            other => {
                return Err(EngineError::UnsupportedArchitecture {
                    path: path.display().to_string(),
                    arch: other.to_string(),
                });
            }
        };
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
        let hparams = read_hparams(arch, md, &vocab, &tensors).map_err(corrupt)?;
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

    /// Bytes of weights as they sit in memory: quantized blocks as stored; F16/BF16 tensors are widened to
    /// F32 on load (Candle computes in F32), so they count twice.
    pub fn weights_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|t| match t.dtype {
                GgmlDType::F16 | GgmlDType::BF16 => t.bytes * 2,
                _ => t.bytes,
            })
            .sum()
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
            Arch::Llama => 1,
        };
        let rope = rope_tables * 2 * context * (hp.head_dim / 2) * 4;
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
            .filter(|(_, t)| t.dims.len() == 2)
            .map(|(_, t)| super::repack::extra_bytes(level, t.dtype, t.dims[0], t.dims[1]))
            .sum();
        let chunk = super::PREFILL_CHUNK.min(context);
        let keys = context;
        let scores = 2 * hp.n_head * chunk * keys * 4;
        let activations = chunk * (4 * hp.n_embd + 3 * hp.n_head * hp.head_dim + 3 * hp.n_ff) * 4;
        let logits = 2 * hp.vocab_size * 4;
        Footprint {
            weights_bytes: self.weights_bytes(),
            overhead_bytes: rope as u64 + repacked,
            scratch_bytes: (scores + activations + logits) as u64,
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
    })
}

fn read_hparams(
    arch: Arch,
    md: &std::collections::HashMap<String, Value>,
    vocab: &GgufVocab,
    tensors: &BTreeMap<String, TensorMeta>,
) -> Result<HParams, String> {
    let a = arch.as_str();
    let req = |k: &str| {
        get_u64(md, &format!("{a}.{k}"))
            .map(|v| v as usize)
            .ok_or_else(|| format!("missing {a}.{k}"))
    };
    let n_layer = req("block_count")?;
    let n_embd = req("embedding_length")?;
    let n_head = req("attention.head_count")?;
    let n_head_kv =
        get_u64(md, &format!("{a}.attention.head_count_kv")).map_or(n_head, |v| v as usize);
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
        ));
    }
    if n_head % n_head_kv != 0 {
        return Err(format!(
            "{n_head} query heads is not a multiple of {n_head_kv} KV heads"
        ));
    }
    let head_dim =
        get_u64(md, &format!("{a}.attention.key_length")).map_or(n_embd / n_head, |v| v as usize);
    let rms_eps = get_f64(md, &format!("{a}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-6);
    let rope_base = get_f64(md, &format!("{a}.rope.freq_base")).unwrap_or(10_000.0) as f32;
    let trained_context = get_u64(md, &format!("{a}.context_length")).map_or(2048, |v| v as usize);
    let vocab_size = tensors
        .get("token_embd.weight")
        .and_then(|t| t.dims.first().copied())
        .unwrap_or(vocab.tokens.len());
    let rope_scale = match get_string(md, &format!("{a}.rope.scaling.type")).as_deref() {
        Some("linear") => get_f64(md, &format!("{a}.rope.scaling.factor")).unwrap_or(1.0) as f32,
        _ => 1.0,
    };
    let (sliding_window, swa_pattern, rope_local_base, attn_scale) = match arch {
        Arch::Llama => (None, 0, rope_base, 1.0 / (head_dim as f64).sqrt()),
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
                10_000.0,
                1.0 / (scalar as f64).sqrt(),
            )
        }
    };
    Ok(HParams {
        arch,
        n_layer,
        n_embd,
        n_head,
        n_head_kv,
        head_dim,
        n_ff,
        rms_eps,
        rope_base,
        rope_local_base,
        rope_scale,
        trained_context,
        sliding_window,
        swa_pattern,
        vocab_size,
        attn_scale,
    })
}
