#!/usr/bin/env python3
"""Print the scale benchmark's table (README "Models people run") from what benches/scale.sh
wrote under out/scale/: one row per model and weight mode, every number read from a log or
JSON file there, so each can be checked against its source."""
import glob, json, os, re, sys

D = sys.argv[1] if len(sys.argv) > 1 else "out/scale"


def timed(path, what):
    """(seconds, peak GB) from a /usr/bin/time line `what: S s, peak RSS K KB`."""
    try:
        for line in open(path):
            m = re.match(rf"{what}: ([0-9.]+) s, peak RSS (\d+) KB", line.strip())
            if m:
                return float(m.group(1)), int(m.group(2)) / 1e6
    except FileNotFoundError:
        pass
    return None


def edit(tag, kind):
    t = timed(f"{D}/{tag}-{kind}.log", kind)
    try:
        j = json.load(open(f"{D}/{tag}-{kind}.json"))
    except FileNotFoundError:
        return "not run" if t is None else f"{t[0]:.0f} s, {t[1]:.2f} GB"
    rw = j["rewrites"]
    search = max(r["search"]["seconds"] for r in rw)
    steps = max(r["search"]["steps"] for r in rw)
    edit_s = sum(r["edit_seconds"] for r in rw)
    return (f"stats + prefixes {j['prepare_seconds']:.1f} s, search {search:.1f} s "
            f"({steps} steps), edit {edit_s:.1f} s; command {t[0]:.0f} s, {t[1]:.2f} GB")


tags = sorted({os.path.basename(p).rsplit("-inspect.log", 1)[0]
               for p in glob.glob(f"{D}/*-inspect.log")})
print("| model, weights | load: s, peak | prefill: tokens/s, GFLOP/token, achieved = fraction of the peak "
      "| generate 16 tokens: s, peak | ROME (one edit) | MEMIT (batch of 10) |")
print("|---|---|---|---|---|---|")
for tag in tags:
    load = timed(f"{D}/{tag}-inspect.log", "load")
    gen = timed(f"{D}/{tag}-generate.log", "generate")
    try:
        b = json.load(open(f"{D}/{tag}-bench.json"))["prefill"]
        tokens = b["batch"] * b["seq"]
        pre = (f"{b['tokens_per_second']:.0f}, {b['gflop_per_forward'] / tokens:.2f}, "
               f"{b['achieved_gflops']:.0f} GFLOP/s = {100 * b['fraction_of_peak']:.0f}% "
               f"of {b['matmul_peak_gflops']:.0f}")
    except FileNotFoundError:
        pre = "not run"
    fmt = lambda t: "not run" if t is None else f"{t[0]:.1f} s, {t[1]:.2f} GB"
    name = re.sub(r"-(f32|stored|stored-kernel)$", r", \1", tag)
    print(f"| {name} | {fmt(load)} | {pre} | {fmt(gen)} | {edit(tag, 'rome')} | {edit(tag, 'memit')} |")
