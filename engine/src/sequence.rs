//! One generation's own state, kept with the sequence rather than the worker: its tokens, its sampler
//! (seeded, so a preempted and recomputed sequence draws the same numbers), its text stream and stop
//! matching, and its limits. The worker feeds it each step's logits and forwards what it returns.

use crate::EngineError;
use crate::constraint::Constraint;
use crate::sampler::{Sampler, SamplingParams, logprobs};
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
    /// Report each generated token's log-probability, with this many of the most likely alternatives.
    pub logprobs: Option<usize>,
}

/// One generated token's log-probability under the model's distribution (before penalties, temperature
/// and any grammar).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token.
    pub token: u32,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens at this step, most likely first: (token, bytes, log-probability).
    pub top: Vec<(u32, Vec<u8>, f32)>,
}

/// What accepting a sampled token gave.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Accepted {
    /// Text to stream, if any is complete.
    pub delta: Option<String>,
    /// Set when the generation is over.
    pub finish: Option<FinishReason>,
    /// The token's log-probability, when asked for (not for a token that ended the generation).
    pub logprob: Option<TokenLogprob>,
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
    /// The output grammar, when the request has one.
    constraint: Option<Constraint>,
    /// The chosen token's log-probability and the step's most likely, until it is accepted.
    pending: Option<(f32, Vec<(u32, f32)>)>,
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
            constraint: None,
            pending: None,
        }
    }

    /// The sequence with an output grammar every token must keep to.
    pub fn with_constraint(mut self, constraint: Option<Constraint>) -> Self {
        self.constraint = constraint;
        self
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
    /// (greedy without a repetition penalty, a grammar or log-probabilities).
    pub fn needs_logits(&self) -> bool {
        !(self.params.sampling.is_greedy() && self.params.sampling.repetition_penalty == 1.0)
            || self.constraint.is_some()
            || self.params.logprobs.is_some()
    }

    /// Chooses the next token: from `logits` when [`Sequence::needs_logits`] (masked by the grammar, if
    /// any, which then takes the token), else the given argmax. Fails only when the grammar does.
    pub fn choose(&mut self, argmax: u32, logits: Option<&mut [f32]>) -> Result<u32, EngineError> {
        let Some(l) = logits.filter(|_| self.needs_logits()) else {
            return Ok(argmax);
        };
        let raw = self.params.logprobs.map(|_| l.to_vec());
        if let Some(c) = &mut self.constraint {
            c.mask(l)?;
        }
        let token = self.sampler.sample(l, &self.tokens);
        // A grammar never takes an end-of-sequence token: it ends the sequence instead.
        if let Some(c) = &mut self.constraint
            && !c.is_end(token)
        {
            c.commit(token)?;
        }
        if let (Some(raw), Some(top)) = (raw, self.params.logprobs) {
            self.pending = Some(logprobs(&raw, token, top));
        }
        Ok(token)
    }

    /// Takes the chosen token: returns the text it completes and whether the generation is over. A token
    /// that ends the generation (end of sequence, a stop sequence) is not kept.
    pub fn accept(&mut self, token: u32, tokenizer: &Tokenizer) -> Accepted {
        let pending = self.pending.take();
        if tokenizer.is_stop(token) && !self.params.ignore_eos {
            return Accepted {
                delta: self.stream.finish(),
                finish: Some(FinishReason::Eos),
                logprob: None,
            };
        }
        let logprob = pending.map(|(logprob, top)| TokenLogprob {
            token,
            bytes: tokenizer.token_bytes(token).to_vec(),
            logprob,
            top: top
                .into_iter()
                .map(|(t, lp)| (t, tokenizer.token_bytes(t).to_vec(), lp))
                .collect(),
        });
        self.tokens.push(token);
        self.generated += 1;
        let mut delta = self.stream.push(tokenizer.token_bytes(token));
        let finish = if self.stream.stopped()
            || self
                .constraint
                .as_ref()
                .is_some_and(Constraint::is_finished)
        {
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
        Accepted {
            delta,
            finish,
            logprob,
        }
    }

    /// The text held back when a generation ends for a reason other than its tokens (the KV pool is full).
    pub fn flush(&mut self) -> Option<String> {
        self.stream.finish()
    }
}
