//! Grammar-constrained decoding through llguidance: a JSON schema, "any JSON object" or a Lark grammar
//! becomes a per-sequence token mask, so the model can only write text the grammar accepts. ult does not
//! parse JSON in the sampler itself; llguidance's Earley parser over the tokenizer's byte trie does.
//!
//! The trie is built once per tokenizer, lazily (the first constrained request of a model pays ~10–100 ms
//! for it; the rest reuse it). Compiling a grammar runs where the request is prepared, off the worker;
//! the worker only asks for each step's mask and commits the token it chose.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::earley::SlicedBiasComputer;
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::EngineError;
use crate::tokenizer::Tokenizer;

/// What shape the output must have.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// Free text.
    Text,
    /// Any JSON object (OpenAI's `json_object`, Ollama's `format: "json"`).
    JsonObject,
    /// JSON valid against this schema.
    JsonSchema(Value),
    /// A Lark grammar, as llguidance reads it.
    Lark(String),
}

impl OutputFormat {
    /// True for free text (nothing to constrain).
    pub fn is_text(&self) -> bool {
        matches!(self, Self::Text)
    }

    /// The grammar llguidance compiles. JSON is written compactly (`", "` and `": "` separators, no
    /// free whitespace) unless the schema carries its own `x-guidance` options: a small model given free
    /// whitespace can fill its budget with newlines.
    fn grammar(&self) -> Option<TopLevelGrammar> {
        let schema = |mut s: Value| {
            if let Some(o) = s.as_object_mut()
                && !o.contains_key("x-guidance")
            {
                o.insert(
                    "x-guidance".into(),
                    serde_json::json!({
                        "whitespace_flexible": false,
                        "item_separator": ", ",
                        "key_separator": ": ",
                    }),
                );
            }
            TopLevelGrammar::from_json_schema(s)
        };
        match self {
            Self::Text => None,
            Self::JsonObject => Some(schema(serde_json::json!({ "type": "object" }))),
            Self::JsonSchema(s) => Some(schema(s.clone())),
            Self::Lark(g) => Some(TopLevelGrammar::from_lark(g.clone())),
        }
    }
}

/// A tokenizer's grammar state: its byte trie and the parser factory over it.
pub struct GrammarEnv {
    factory: ParserFactory,
    /// The tokens that end a sequence (the grammar's ends).
    ends: Arc<[u32]>,
}

impl std::fmt::Debug for GrammarEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarEnv")
            .field("vocab", &self.factory.tok_env().tok_trie().vocab_size())
            .finish()
    }
}

impl GrammarEnv {
    /// Builds the trie of `tokenizer`'s vocabulary: each id's bytes, control tokens marked as special
    /// (never text), and its stop ids as the ends the grammar may choose.
    pub fn new(tokenizer: &Tokenizer) -> Result<Self, EngineError> {
        let stops = tokenizer.stop_ids();
        let eos =
            stops.first().copied().or(tokenizer.eos()).ok_or_else(|| {
                invalid("this model has no end-of-sequence token to end a grammar")
            })?;
        let words = tokenizer.grammar_words();
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(stops);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let caps = InferenceCapabilities {
            ff_tokens: false,
            conditional_ff_tokens: false,
            backtrack: false,
            fork: false,
        };
        let mut factory = ParserFactory::new(&env, caps, &SlicedBiasComputer::general_slices())
            .map_err(|e| invalid(&format!("building the grammar index: {e}")))?;
        factory.quiet();
        Ok(Self {
            factory,
            ends: stops.into(),
        })
    }

    /// Compiles `format` into a fresh constraint for one sequence (None for free text). A schema or
    /// grammar llguidance cannot compile is an invalid `response_format`, with its reason.
    pub fn compile(&self, format: &OutputFormat) -> Result<Option<Constraint>, EngineError> {
        let Some(grammar) = format.grammar() else {
            return Ok(None);
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| invalid(&format!("the schema or grammar does not compile: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(&format!(
                "the schema or grammar does not compile: {e}"
            )));
        }
        Ok(Some(Constraint {
            matcher: Box::new(matcher),
            ends: self.ends.clone(),
        }))
    }
}

/// Built once per tokenizer, on first use.
#[derive(Debug, Default)]
pub struct LazyGrammarEnv(OnceLock<Result<Arc<GrammarEnv>, String>>);

impl LazyGrammarEnv {
    /// The environment, building it on first call.
    pub fn get(&self, tokenizer: &Tokenizer) -> Result<Arc<GrammarEnv>, EngineError> {
        self.0
            .get_or_init(|| {
                GrammarEnv::new(tokenizer)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|e| invalid(&e))
    }
}

fn invalid(reason: &str) -> EngineError {
    EngineError::InvalidParameter {
        field: "response_format",
        reason: reason.to_string(),
    }
}

/// One sequence's grammar state.
pub struct Constraint {
    /// Boxed: a matcher is large, and jobs carrying one travel through channels.
    matcher: Box<Matcher>,
    ends: Arc<[u32]>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Constraint {
    /// Sets every logit the grammar forbids now to −∞. Ids past the vocabulary (padded output rows)
    /// are forbidden too.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
        let mask = self.matcher.compute_mask_or_eos().map_err(grammar_failed)?;
        let n = mask.len();
        for (id, l) in logits.iter_mut().enumerate() {
            if id >= n || !mask.get(id) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Takes the token the sampler chose from a masked row.
    pub fn commit(&mut self, token: u32) -> Result<(), EngineError> {
        self.matcher.consume_token(token).map_err(grammar_failed)
    }

    /// True for a token that ends the sequence (never committed to the grammar).
    pub fn is_end(&self, token: u32) -> bool {
        self.ends.contains(&token)
    }

    /// True once the grammar is complete and admits nothing more (the sequence should end).
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

fn grammar_failed(e: impl std::fmt::Display) -> EngineError {
    EngineError::Grammar(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_needs_no_grammar() {
        assert!(OutputFormat::Text.grammar().is_none());
        assert!(OutputFormat::JsonObject.grammar().is_some());
    }
}
