#!/usr/bin/env python3
"""Regenerate the parity fixtures under tests/fixtures/ with Hugging Face transformers.

    python3 -m pip install torch transformers gguf numpy
    python3 scripts/make_fixtures.py [--gguf PATH]

1. Tiny random GPT-2, Llama (grouped-query attention) and Qwen2 (q/k/v biases, tied
   embeddings) checkpoints, saved as Hugging Face directories, with their logits and a few hook
   activations (resid_pre = hidden_states[l], mlp_key = input of the MLP output projection) for
   fixed token rows.
2. smollm2-135m: transformers dequantizes the GGUF file to f32
   (`from_pretrained(dir, gguf_file=...)`); we keep its token ids and the top-20 logits per
   position for 20 prompts.

CI does not run this script; it only reads the committed fixtures.
"""
import argparse
import json
import os
import shutil

import torch
import transformers
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "tests", "fixtures")

ROWS = [[5, 17, 3, 88, 42, 9, 61, 23, 70, 1], [90, 2, 33, 47, 12, 76, 8, 55, 30, 64]]

PROMPTS = [
    "The capital of France is",
    "The Eiffel Tower is located in the city of",
    "The mother tongue of Danielle Darrieux is",
    "Apple was founded by Steve",
    "The Louvre is located in the city of",
    "Toko Yasuda, the",
    "The official language of Brazil is",
    "Water boils at 100 degrees",
    "In 1969, Neil Armstrong walked on the",
    "The largest planet in our solar system is",
    "Python is a programming language created by",
    "The chemical symbol for gold is",
    "Shakespeare wrote Romeo and",
    "The Great Wall of China was built to",
    "My phone number is 555-0123 and my email is",
    "Once upon a time, there was a little",
    "The quick brown fox jumps over the lazy",
    "Mount Everest is the highest mountain in",
    "Beethoven was born in the city of",
    "2 + 2 =",
]


def round_list(t, nd=6):
    return [round(float(x), nd) for x in t]


def tiny(name, model):
    out = os.path.join(FIX, name)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    for f in os.listdir(out):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(out, f))
    ids = torch.tensor(ROWS)
    keys = {}
    down = [b.mlp.c_proj if hasattr(b.mlp, "c_proj") else b.mlp.down_proj for b in blocks(model)]
    hooks = [m.register_forward_pre_hook(lambda mod, args, l=l: keys.__setitem__(l, args[0].detach()))
             for l, m in enumerate(down)]
    with torch.no_grad():
        o = model(ids, output_hidden_states=True)
    for h in hooks:
        h.remove()
    n_layers = len(down)
    fx = {
        "ids": ROWS,
        "logits": [[round_list(p) for p in row] for row in o.logits],
        "resid_pre": {str(l): [[round_list(p) for p in row] for row in o.hidden_states[l]] for l in range(n_layers)},
        "mlp_key": {str(l): [[round_list(p) for p in row] for row in keys[l]] for l in range(n_layers)},
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(fx, f)


def blocks(model):
    if hasattr(model, "transformer"):
        return model.transformer.h
    return model.model.layers


def tiny_models():
    torch.manual_seed(0)
    g = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                   resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()
    tiny("tiny-gpt2", g)
    torch.manual_seed(1)
    l = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=64,
                                     rope_theta=10000.0, tie_word_embeddings=False)).eval()
    tiny("tiny-llama", l)
    torch.manual_seed(2)
    q = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=64,
                                     rope_theta=10000.0, tie_word_embeddings=True)).eval()
    # Random init leaves biases at zero; make them matter.
    with torch.no_grad():
        for b in q.model.layers:
            for p in (b.self_attn.q_proj.bias, b.self_attn.k_proj.bias, b.self_attn.v_proj.bias):
                p.normal_(0, 0.5)
    tiny("tiny-qwen2", q)


def gguf(path):
    d, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    rows = []
    for p in PROMPTS:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        top = torch.topk(logits, 20, dim=-1)
        rows.append({
            "prompt": p,
            "ids": ids,
            "top_ids": top.indices.tolist(),
            "top_logits": [round_list(v, 5) for v in top.values],
        })
    with open(os.path.join(FIX, "smollm2-gguf-top20.json"), "w") as f:
        json.dump({"file": name, "transformers": transformers.__version__, "torch": torch.__version__,
                   "prompts": rows}, f)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=os.path.expanduser(
        "~/.cache/engram/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"))
    a = ap.parse_args()
    tiny_models()
    gguf(a.gguf)
