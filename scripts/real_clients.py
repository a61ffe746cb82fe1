#!/usr/bin/env python3
"""Run engram's edited GGUF files in real clients: llama.cpp (llama-cpp-python) and transformers.

For each edit (one spec, or each of the first N CounterFact cases, every one edited from the
unedited model), this script:

1. runs `engram edit` on the given GGUF with `--out-type auto`, writing the edited file;
2. loads the written file in llama.cpp and, with `--transformers`, in transformers;
3. decodes each prompt greedily (20 new tokens, cut at the first sentence end by the same rule
   as engram's `src/eval/generation.rs`: `.`, `!` or `?` before whitespace, or a newline);
4. checks that the edit prompt's and the paraphrases' continuations contain the new target
   (case-insensitive, on word boundaries), that each neighbourhood prompt's continuation is
   the one the same client gives for the unedited file, and whether the text equals engram's
   own greedy continuation of the file as written (`requantized.gen_text` in its JSON), and
   whether both texts give the same verdict (the target, or for a neighbour its true answer,
   found in both or in neither). Beside
   "neighbourhood unchanged" it reports the same check on engram's own texts (before the edit
   against the written file), so that a neighbour the edit itself moved is not blamed on a
   client.

It is a benchmark, never run in CI (CI stays torch-free). Needs: pip install llama-cpp-python,
and for --transformers also transformers, gguf and torch.

Usage:
  scripts/real_clients.py --model M.gguf --spec edits/eiffel-rome.yaml --json out/clients.json [--transformers]
  scripts/real_clients.py --model M.gguf --counterfact ../shared/data/counterfact/dev-2000.jsonl --n 100 --json out/clients-cf.json
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import yaml

GEN_TOKENS = 20


def first_sentence(text):
    for i, c in enumerate(text):
        if c == "\n" and i > 0 and text[:i].strip():
            return text[:i]
        if c in ".!?" and (i + 1 == len(text) or text[i + 1].isspace()) and text[:i].strip():
            return text[: i + 1]
    return text


def contains_answer(text, answer):
    a = answer.strip().lower()
    if not a:
        return False
    return re.search(r"(?<![^\W_])" + re.escape(a) + r"(?![^\W_])", text.lower()) is not None


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False)

    def continue_(self, prompt):
        out = self.llm.create_completion(prompt, max_tokens=GEN_TOKENS, temperature=0.0, top_k=1)
        return first_sentence(out["choices"][0]["text"])


class Transformers:
    name = "transformers"

    def __init__(self, path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        d, f = os.path.split(os.path.abspath(path))
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        self.model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        self.model.eval()

    def continue_(self, prompt):
        ids = self.tok(prompt, return_tensors="pt", add_special_tokens=False)
        with self.torch.no_grad():
            out = self.model.generate(
                **ids, max_new_tokens=GEN_TOKENS, do_sample=False, pad_token_id=self.tok.eos_token_id
            )
        return first_sentence(self.tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


def cases_from(args):
    if args.spec:
        spec = yaml.safe_load(open(args.spec))
        return [(args.spec, spec["method"], spec["rewrites"])]
    out = []
    with open(args.counterfact) as f:
        for line in list(f)[args.offset : args.offset + args.n]:
            r = json.loads(line)
            rw = {
                "prompt": r["prompt"],
                "subject": r["subject"],
                "target_new": r["target_new"],
                "target_true": r["ground_truth"],
                "paraphrases": [r["rephrase_prompt"]],
                "neighborhood": [{"prompt": r["locality_prompt"], "answer": r["locality_ground_truth"]}],
            }
            out.append((f"case {r['case_id']}", {"method": "rome", "layer": args.layer}, [rw]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engram", default="./target/release/engram")
    ap.add_argument("--model", required=True, help="the unedited GGUF")
    ap.add_argument("--spec")
    ap.add_argument("--counterfact")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--transformers", action="store_true")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if bool(args.spec) == bool(args.counterfact):
        sys.exit("give one of --spec or --counterfact")
    clients = [LlamaCpp] + ([Transformers] if args.transformers else [])
    base = {c.name: c(args.model) for c in clients}
    base_text = {}  # (client, prompt) -> the unedited file's continuation
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        for label, method, rewrites in cases_from(args):
            spec = os.path.join(d, "spec.yaml")
            yaml.safe_dump({"method": method, "rewrites": rewrites}, open(spec, "w"))
            out, rep = os.path.join(d, "edited.gguf"), os.path.join(d, "edit.json")
            cmd = [args.engram, "edit", spec, "--model", args.model, "--out", out, "--out-type", "auto",
                   "--no-locality", "--json", rep, "--patch", os.path.join(d, "patch.safetensors")]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                rows.append({"case": label, "error": r.stderr[-2000:]})
                print(label, "engram failed:", r.stderr[-300:], file=sys.stderr)
                continue
            report = json.load(open(rep))
            edited = {c.name: c(out) for c in clients}
            row = {"case": label, "out_types": [(t["tensor"], t["chosen_type"]) for t in report.get("out_types", [])]}
            for name, client in edited.items():
                checks = {"edit": [], "paraphrase": [], "neighborhood_unchanged": [], "agrees_with_engram": [],
                          "verdict_agrees_with_engram": [], "engram_neighborhood_unchanged": []}
                texts, before = [], []
                for rw, er in zip(rewrites, report["rewrites"]):
                    q = er.get("requantized") or er["post"]
                    new = rw["target_new"]
                    t = client.continue_(rw["prompt"])
                    texts.append(t)
                    checks["edit"].append(contains_answer(t, new))
                    checks["agrees_with_engram"].append(t.strip() == q["gen_text"].strip())
                    checks["verdict_agrees_with_engram"].append(
                        contains_answer(t, new) == contains_answer(q["gen_text"], new))
                    for p, et in zip(rw.get("paraphrases", []), q["gen_paraphrase_texts"]):
                        t = client.continue_(p)
                        texts.append(t)
                        checks["paraphrase"].append(contains_answer(t, new))
                        checks["agrees_with_engram"].append(t.strip() == et.strip())
                        checks["verdict_agrees_with_engram"].append(
                            contains_answer(t, new) == contains_answer(et, new))
                    for n, et, pre in zip(rw.get("neighborhood", []), q["gen_neighborhood_texts"],
                                          er["pre"]["gen_neighborhood_texts"]):
                        p = n["prompt"]
                        key = (name, p)
                        if key not in base_text:
                            base_text[key] = base[name].continue_(p)
                        t = client.continue_(p)
                        texts.append(t)
                        before.append(base_text[key])
                        checks["neighborhood_unchanged"].append(t == base_text[key])
                        checks["agrees_with_engram"].append(t.strip() == et.strip())
                        truth = n.get("answer") or rw.get("target_true") or ""
                        checks["verdict_agrees_with_engram"].append(
                            contains_answer(t, truth) == contains_answer(et, truth))
                        # The same question asked of engram's own texts, before and after.
                        checks["engram_neighborhood_unchanged"].append(pre.strip() == et.strip())
                row[name] = {"checks": checks, "texts": texts, "neighborhood_before": before}
            for e in edited.values():
                del e
            rows.append(row)
            done = len(rows)
            print(f"{done} edits, {time.time() - t0:.0f} s: {label}: "
                  + ", ".join(f"{n} {row[n]['checks']}" for n in edited), file=sys.stderr)
    summary = {"model": args.model, "cases": len(rows), "failed": sum("error" in r for r in rows),
               "seconds": time.time() - t0, "clients": {}}
    for c in clients:
        agg = {}
        for k in ["edit", "paraphrase", "neighborhood_unchanged", "agrees_with_engram",
                  "verdict_agrees_with_engram", "engram_neighborhood_unchanged"]:
            v = [x for r in rows if c.name in r for x in r[c.name]["checks"][k]]
            agg[k] = sum(v) / len(v) if v else None
            agg[k + "_n"] = len(v)
        summary["clients"][c.name] = agg
    types = {}
    for r in rows:
        for _, t in r.get("out_types", []):
            types[t] = types.get(t, 0) + 1
    summary["out_types"] = types
    json.dump({"summary": summary, "rows": rows}, open(args.json, "w"), indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
