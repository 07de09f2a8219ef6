//! Multi-turn chat hits the prefix cache only if the rendered prompt of turn N+1 starts with the tokens
//! turn N computed: its rendered prompt and the reply it generated. This checks that property of the
//! shipped chat template (SmolLM2's ChatML; the shipped Gemma 3 270M file has none and is served as a
//! completion model, whose prompts extend each other by construction), on the real file's template and
//! tokenizer, and shows what breaks it: a template that rewrites earlier turns (Gemma 3's official one
//! trims every message, Qwen3's drops earlier `<think>` blocks), so the history renders differently
//! from what was generated.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::PathBuf;

use ult_engine::template::ChatMessage;
use ult_engine::{CandleEngine, Engine, Inspection, ModelKind, ModelSource};

fn inspect(path: &str) -> Inspection {
    let models = std::env::var_os("ULT_MODELS_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"),
        PathBuf::from,
    );
    let src = ModelSource {
        name: "m".into(),
        kind: ModelKind::Chat,
        path: models.join(path),
        context: Some(2048),
        max_sequences: 1,
        chat_template: None,
    };
    CandleEngine::new("cpu").unwrap().inspect(&src).unwrap()
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

/// Renders a conversation turn by turn; returns whether every turn's tokens start with the previous
/// turn's prompt tokens followed by the tokens of its reply (as the model would have generated them).
fn turns_extend(i: &Inspection, replies: &[&str]) -> bool {
    let template = i.template.as_ref().unwrap();
    let mut messages = vec![msg("system", "You are a terse assistant.")];
    let mut previous: Option<Vec<u32>> = None;
    for (turn, reply) in replies.iter().enumerate() {
        messages.push(msg("user", &format!("Question number {turn}?")));
        let prompt = template.render(&messages, true).unwrap();
        let tokens = i.tokenizer.encode(&prompt, false);
        if let Some(before) = &previous
            && !tokens.starts_with(before)
        {
            return false;
        }
        // What turn N computed: its prompt and the reply's tokens.
        let mut computed = tokens.clone();
        computed.extend(i.tokenizer.encode(reply, false));
        previous = Some(computed);
        messages.push(msg("assistant", reply));
    }
    true
}

const REPLIES: [&str; 4] = [
    "Paris.",
    "It has about two million people.",
    "The Seine.",
    "Yes, in 1889.",
];

#[test]
fn smollm2_turns_extend_the_previous_turn() {
    let i = inspect("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(turns_extend(&i, &REPLIES));
}

#[test]
fn a_template_that_rewrites_history_breaks_it() {
    // ChatML as SmolLM2 ships it, but trimming each message as Gemma 3's official template does: a
    // reply that ended in a blank line is re-rendered without it, and the next turn diverges there.
    let trimmed = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let mut i = inspect("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    i.template = Some(std::sync::Arc::new(
        ult_engine::template::ChatTemplate::new(trimmed, "<s>".into(), "</s>".into()).unwrap(),
    ));
    assert!(turns_extend(&i, &REPLIES));
    assert!(!turns_extend(&i, &["Paris.\n\n", "Yes."]));
}

#[test]
fn the_shipped_gemma3_file_has_no_chat_template() {
    // Served as a completion model: each request's prompt is what the client sends.
    assert!(
        inspect("gemma3/gemma-3-270m-q4_k_m.gguf")
            .template
            .is_none()
    );
}
