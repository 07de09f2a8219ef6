// Reference logits for ult's model-family fixtures, computed by llama.cpp (the independent implementation).
//
//   llama-logits MODEL.gguf PROMPT_FILE TOPK N_GREEDY
//
// Tokenizes the prompt text with the model's own tokenizer, decodes it in one teacher-forced batch with
// logits at every position, then continues greedily for N_GREEDY tokens (one token per decode). KV cache
// in F32 and flash attention off, so an F32 file is compared at float rounding. Prints one JSON object:
// the prompt tokens, per position the argmax, the TOPK largest logits (id, value) and the L2 norm of the
// remaining logits, and the greedy continuation (ids, and its text's bytes in hex). Built by scripts/families/make-fixtures.sh.
#include "llama.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

static void quiet(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static std::string json_string(const std::string & s) {
    std::string out = "\"";
    for (unsigned char c : s) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    snprintf(buf, sizeof buf, "\\u%04x", c);
                    out += buf;
                } else {
                    out += (char) c;
                }
        }
    }
    return out + "\"";
}

static std::string piece(const llama_vocab * vocab, llama_token t) {
    char buf[256];
    int n = llama_token_to_piece(vocab, t, buf, sizeof buf, 0, false);
    return n > 0 ? std::string(buf, n) : std::string();
}

// The position's summary: argmax, top-k and the norm of the rest.
static std::string summary(const float * logits, int n_vocab, int topk, int & argmax) {
    std::vector<int> idx(n_vocab);
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + topk, idx.end(), [&](int a, int b) {
        return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    argmax = idx[0];
    double rest = 0.0;
    for (int i = topk; i < n_vocab; i++) {
        rest += (double) logits[idx[i]] * logits[idx[i]];
    }
    std::ostringstream o;
    o.precision(9);
    o << "{\"argmax\":" << argmax << ",\"top\":[";
    for (int i = 0; i < topk; i++) {
        o << (i ? "," : "") << "[" << idx[i] << "," << logits[idx[i]] << "]";
    }
    o << "],\"rest_l2\":" << std::sqrt(rest) << "}";
    return o.str();
}

int main(int argc, char ** argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPT_FILE TOPK N_GREEDY\n", argv[0]);
        return 2;
    }
    const int topk = atoi(argv[3]);
    const int n_greedy = atoi(argv[4]);
    std::ifstream pf(argv[2]);
    std::stringstream ps;
    ps << pf.rdbuf();
    std::string prompt = ps.str();
    while (!prompt.empty() && (prompt.back() == '\n')) {
        prompt.pop_back();
    }

    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    std::vector<llama_token> tokens(prompt.size() + 8);
    int n = llama_tokenize(vocab, prompt.c_str(), (int) prompt.size(), tokens.data(), (int) tokens.size(), true, false);
    if (n < 0) {
        fprintf(stderr, "tokenize failed\n");
        return 1;
    }
    tokens.resize(n);

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 256;
    cp.n_batch = 256;
    cp.n_ubatch = 256;
    cp.n_seq_max = 1;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.swa_full = true;
    cp.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot create a context\n");
        return 1;
    }

    llama_batch batch = llama_batch_init(256, 0, 1);
    batch.n_tokens = n;
    for (int i = 0; i < n; i++) {
        batch.token[i] = tokens[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "decode failed\n");
        return 1;
    }
    std::ostringstream out;
    out << "{\"prompt\":" << json_string(prompt) << ",\"tokens\":[";
    for (int i = 0; i < n; i++) {
        out << (i ? "," : "") << tokens[i];
    }
    out << "],\"positions\":[";
    int next = 0;
    for (int i = 0; i < n; i++) {
        int am = 0;
        out << (i ? ",\n" : "\n") << summary(llama_get_logits_ith(ctx, i), n_vocab, topk, am);
        next = am;
    }
    out << "],\n\"greedy\":[";
    std::string text;
    for (int g = 0; g < n_greedy; g++) {
        out << (g ? "," : "") << next;
        text += piece(vocab, next);
        if (g + 1 == n_greedy) {
            break;
        }
        batch.n_tokens = 1;
        batch.token[0] = next;
        batch.pos[0] = n + g;
        batch.n_seq_id[0] = 1;
        batch.seq_id[0][0] = 0;
        batch.logits[0] = 1;
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "decode failed\n");
            return 1;
        }
        int am = 0;
        summary(llama_get_logits_ith(ctx, 0), n_vocab, 1, am);
        next = am;
    }
    // The continuation's bytes in hex: a token may end inside a UTF-8 character.
    out << "],\"greedy_hex\":\"";
    for (unsigned char c : text) {
        char buf[3];
        snprintf(buf, sizeof buf, "%02x", c);
        out << buf;
    }
    out << "\"}\n";
    fputs(out.str().c_str(), stdout);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
