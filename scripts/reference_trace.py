#!/usr/bin/env python3
"""Time ROME's own causal tracing code (kmeng01/rome, experiments/causal_trace.py) on
smollm2-135m, on this machine, for a peer comparison with `engram locate`.

Nothing of the reference is copied here: the script imports it from a checkout given with
--rome, and only adapts what the reference hard-codes for GPT-2 / GPT-J / GPT-NeoX:
- `layername` maps ROME's layer names to Llama's (`model.layers.N`, `.mlp`, `.self_attn`,
  `model.embed_tokens`);
- `make_inputs` puts the batch on the CPU (the reference defaults to CUDA);
- `dsets` and `datasets` (only its command-line `main` uses them) are stubbed.

    python3 -m pip install torch transformers gguf accelerate matplotlib
    git clone https://github.com/kmeng01/rome /tmp/rome    # commit 0874014 was measured
    python3 scripts/reference_trace.py --rome /tmp/rome \
        --gguf ~/.cache/engram/models/smollm2-135m/<file>.gguf \
        --prompt "Anaal Nathrakh, that was created in" --subject "Anaal Nathrakh" \
        --noise 0.4067

`--noise` is the absolute noise std; pass the one `engram locate` prints (3 x the std of the
token embeddings) so both corrupt alike. The reference traces the model's own greedy answer.
Prints one JSON line: seconds per kind (hidden, mlp, attn), the total, clean and corrupted P.
"""
import argparse
import json
import os
import sys
import time
import types


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rome", required=True, help="checkout of github.com/kmeng01/rome")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--subject", required=True)
    ap.add_argument("--noise", type=float, required=True, help="absolute noise std")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=10)
    args = ap.parse_args()
    gguf = os.path.abspath(os.path.expanduser(args.gguf))

    # The reference reads globals.yml from the working directory and imports its siblings.
    os.chdir(args.rome)
    sys.path.insert(0, args.rome)
    for stub in ["dsets", "datasets"]:
        m = types.ModuleType(stub)
        m.KnownsDataset = m.load_dataset = None
        sys.modules[stub] = m

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experiments import causal_trace as ct

    def layername(model, num, kind=None):
        if kind == "embed":
            return "model.embed_tokens"
        suffix = {None: "", "mlp": ".mlp", "attn": ".self_attn"}[kind]
        return f"model.layers.{num}{suffix}"

    make_inputs = ct.make_inputs
    ct.layername = layername
    ct.make_inputs = lambda tok, prompts, device="cpu": make_inputs(tok, prompts, device)

    d, f = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval().requires_grad_(False)
    n_layers = model.config.num_hidden_layers
    mt = types.SimpleNamespace(model=model, tokenizer=tok, num_layers=n_layers)

    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "seconds": {}}
    total = 0.0
    for kind in [None, "mlp", "attn"]:
        t0 = time.perf_counter()
        r = ct.calculate_hidden_flow(
            mt,
            args.prompt,
            args.subject,
            samples=args.samples,
            noise=args.noise,
            window=args.window,
            kind=kind,
        )
        secs = time.perf_counter() - t0
        total += secs
        out["seconds"][kind or "hidden"] = round(secs, 2)
        out.update(
            answer=r["answer"],
            clean_p=float(r["high_score"]),
            corrupted_p=float(r["low_score"]),
            tokens=len(r["input_tokens"]),
            subject_range=list(r["subject_range"]),
        )
        print(f"{kind or 'hidden'}: {secs:.1f} s", file=sys.stderr, flush=True)
    out["total_seconds"] = round(total, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
