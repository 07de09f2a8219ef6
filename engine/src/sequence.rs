//! One generation's own state, kept with the sequence rather than the worker: its tokens, its sampler
//! (seeded, so a preempted and recomputed sequence draws the same numbers), its text stream and stop
//! matching, and its limits. The worker feeds it each step's logits and forwards what it returns.

use crate::sampler::{Sampler, SamplingParams};
use crate::stream::TextStream;
use crate::tokenizer::Tokenizer;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence or end-of-turn token.
    Eos,
    /// A stop sequence matched.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The context (or the whole KV pool) is full.
    Context,
    /// The client went away.
    Cancelled,
}

/// What a generation asks for.
#[derive(Debug, Clone)]
pub struct SequenceParams {
    /// The most tokens to generate.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
}

/// What accepting a sampled token gave.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Accepted {
    /// Text to stream, if any is complete.
    pub delta: Option<String>,
    /// Set when the generation is over.
    pub finish: Option<FinishReason>,
}

/// A generation in progress.
#[derive(Debug)]
pub struct Sequence {
    tokens: Vec<u32>,
    prompt_tokens: usize,
    params: SequenceParams,
    sampler: Sampler,
    stream: TextStream,
    generated: usize,
    /// The most positions the sequence may hold.
    limit: usize,
}

impl Sequence {
    /// A sequence for `prompt` that may hold at most `limit` positions (the context).
    pub fn new(prompt: Vec<u32>, params: SequenceParams, limit: usize) -> Self {
        Self {
            prompt_tokens: prompt.len(),
            tokens: prompt,
            sampler: Sampler::new(params.sampling.clone()),
            stream: TextStream::new(params.stop.clone()),
            params,
            generated: 0,
            limit,
        }
    }

    /// Every known token: the prompt, then what was generated.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Tokens of the prompt.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// Tokens generated (stop tokens excluded).
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// Whether choosing the next token needs every logit; otherwise the device's argmax is enough
    /// (greedy without a repetition penalty).
    pub fn needs_logits(&self) -> bool {
        !(self.params.sampling.is_greedy() && self.params.sampling.repetition_penalty == 1.0)
    }

    /// Chooses the next token: from `logits` when [`Sequence::needs_logits`], else the given argmax.
    pub fn choose(&mut self, argmax: u32, logits: Option<&mut [f32]>) -> u32 {
        match logits {
            Some(l) if self.needs_logits() => self.sampler.sample(l, &self.tokens),
            _ => argmax,
        }
    }

    /// Takes the chosen token: returns the text it completes and whether the generation is over. A token
    /// that ends the generation (end of sequence, a stop sequence) is not kept.
    pub fn accept(&mut self, token: u32, tokenizer: &Tokenizer) -> Accepted {
        if tokenizer.is_stop(token) && !self.params.ignore_eos {
            return Accepted {
                delta: self.stream.finish(),
                finish: Some(FinishReason::Eos),
            };
        }
        self.tokens.push(token);
        self.generated += 1;
        let mut delta = self.stream.push(tokenizer.token_bytes(token));
        let finish = if self.stream.stopped() {
            Some(FinishReason::Stop)
        } else if self.generated >= self.params.max_tokens {
            Some(FinishReason::Length)
        } else if self.tokens.len() >= self.limit {
            Some(FinishReason::Context)
        } else {
            None
        };
        if matches!(finish, Some(FinishReason::Length | FinishReason::Context))
            && let Some(rest) = self.stream.finish()
        {
            delta = Some(delta.unwrap_or_default() + &rest);
        }
        Accepted { delta, finish }
    }

    /// The text held back when a generation ends for a reason other than its tokens (the KV pool is full).
    pub fn flush(&mut self) -> Option<String> {
        self.stream.finish()
    }
}
