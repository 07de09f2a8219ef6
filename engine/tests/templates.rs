//! The chat templates of the families ult runs (Qwen2.5, Qwen3, Llama 3.1, Mistral Nemo, Phi-3.5,
//! DeepSeek-R1-Distill, DeepSeek-V3.1; copied from llama.cpp's models/templates) render with minijinja exactly as Python's
//! jinja2 renders them with transformers' settings (scripts/families/template-fixtures.py wrote
//! `expected.json`): a plain chat, a chat with a tool (loops over `tools`, `tojson`), and a conversation that
//! breaks role alternation (`raise_exception` where the template checks it).
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::BTreeMap;

use ult_engine::EngineError;
use ult_engine::template::{ChatMessage, ChatTemplate};

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

#[test]
fn family_templates_render_as_jinja2_does() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/templates");
    let expected: BTreeMap<String, BTreeMap<String, String>> =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/expected.json")).unwrap())
            .unwrap();
    let tools = serde_json::json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city, now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city, e.g. Zürich"}}, "required": ["city"]},
        },
    }]);
    let cases: [(&str, Vec<ChatMessage>, Option<&serde_json::Value>); 3] = [
        (
            "chat",
            vec![
                msg("system", "You are terse."),
                msg("user", "Hi there"),
                msg("assistant", "Hello."),
                msg("user", "What is 2+2?"),
            ],
            None,
        ),
        (
            "tools",
            vec![msg("user", "Weather in Zürich?")],
            Some(&tools),
        ),
        ("bad", vec![msg("user", "a"), msg("user", "b")], None),
    ];
    let mut checked = 0;
    for (key, want) in &expected {
        let (file, case) = key.split_once('/').unwrap();
        let src = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        let t = ChatTemplate::new(&src, "<s>".into(), "</s>".into()).unwrap();
        let (_, messages, tools) = cases.iter().find(|(c, _, _)| *c == case).unwrap();
        let got = t.render_with_tools(messages, *tools, true);
        match (want.get("ok"), want.get("error"), got) {
            (Some(w), _, Ok(g)) => assert_eq!(&g, w, "{key}"),
            (_, Some(w), Err(EngineError::Template { reason })) => {
                assert!(
                    reason.contains(w.as_str()),
                    "{key}: {reason:?} should say {w:?}"
                )
            }
            (_, _, other) => panic!("{key}: expected {want:?}, got {other:?}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 21, "seven templates, three cases each");
}
