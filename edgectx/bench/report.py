"""Human-readable tables for `edgectx bench ...` without `--json`.

    print_report("speed", result)
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _heat(value: float | None, text: str) -> Text:
    """`text` on a red (0) to green (1) background."""
    if value is None:
        return Text(text)
    red, green = int(200 * (1 - value)) + 40, int(170 * value) + 40
    return Text(text, style=f"bold white on rgb({red},{green},40)")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}"


def print_recall(console: Console, result: dict) -> None:
    """One depth x length heat map per task: recall % (background), then answer accuracy % with the memory and,
    where it ran, with full attention."""
    for task in result["tasks"]:
        table = Table("depth", *[f"{c:,}" for c in result["contexts"]], title=f"{task}: recall % / answer % (full attention %)",
                      caption=f"{result['model']} on {result['text']}, {result['trials']} trial(s), scorer {result['scorer']}, "
                      f"budget {result['memory_config']['budget_tokens']}")
        for depth in result["depths"]:
            row = []
            for context in result["contexts"]:
                cell = next(c for c in result["cells"] if (c["task"], c["context"], c["depth"]) == (task, context, depth))
                full = "" if cell["full_accuracy"] is None else f" ({_percent(cell['full_accuracy'])})"
                rank = "" if cell["mean_rank"] is None else f" r{cell['mean_rank']:.1f}"
                row.append(_heat(cell["recall"], f"{_percent(cell['recall'])} / {_percent(cell['accuracy'])}{full}{rank}"))
            table.add_row(str(depth), *row)
        means = [next(s for s in result["summary"] if (s["task"], s["context"]) == (task, c)) for c in result["contexts"]]
        table.add_row("mean", *[_heat(m["recall"], f"{_percent(m['recall'])} / {_percent(m['accuracy'])}"
                                      + ("" if m["full_accuracy"] is None else f" ({_percent(m['full_accuracy'])})")) for m in means])
        console.print(table)
    if result["multiquestion_by_question"]:
        table = Table("question", "recall %", "answer %", "cited %", title="multiquestion, by question in the conversation")
        for q in result["multiquestion_by_question"]:
            table.add_row(str(q["question"] + 1), _percent(q["recall"]), _percent(q["accuracy"]), _percent(q["cited"]))
        console.print(table)
    console.print(f"r: mean rank of the needle's passage among the cited ones where cited; {result['elapsed_s']:.0f} s, "
                  f"seed {result['seed']}", highlight=False)


def print_report(kind: str, result: dict) -> None:
    console = Console()
    if kind == "recall":
        print_recall(console, result)
        return
    if kind == "speed" and "synthetic" in result:
        floor = result["weight_read_floor_ms"]
        table = Table("context", "engine", "prefill s", "prefill tok/s", "decode ms/token", "decode / floor", "peak GPU MiB",
                      title=f"{result['model']} ({result['weights']}) on {result['device']}, weights {result['weight_bytes'] / 2**20:,.0f} MiB, "
                      f"floor {'-' if floor is None else f'{floor:.2f}'} ms/token")
        for r in result["runs"]:
            for engine, label in (("edgectx_memory", "memory"), ("edgectx", "full")):
                e = r.get(engine)
                if e:
                    peak = "-" if e["peak_gpu_bytes"] is None else f"{e['peak_gpu_bytes'] / 2**20:,.0f}"
                    tok_s, ratio = e["prefill_tok_s"], e["decode_floor_ratio"]
                    table.add_row(str(r["context"]), label, f"{e['prefill_s']:.2f}", "-" if tok_s is None else f"{tok_s:.1f}",
                                  f"{e['decode_ms_per_token']:.2f}", "-" if ratio is None else f"{ratio:.1f}x", peak)
                elif r.get(f"{engine}_skipped") or r.get(f"{engine}_error"):
                    table.add_row(str(r["context"]), label, r.get(f"{engine}_skipped") or r[f"{engine}_error"])
    elif kind == "speed":
        busy = f", --busy {result['busy']}" if result.get("busy") else ""
        table = Table("context", "engine", "prefill tok/s", "decode tok/s", "prefill ratio", "decode ratio",
                      "weights MiB", "device KV MiB", "peak RSS MiB", title=f"{result['model']}, {result['threads']} threads{busy}")
        for r in result["runs"]:
            for engine, prefix in (("llama_cpp", None), ("edgectx", ""), ("edgectx_memory", "memory_")):
                e = r.get(engine)
                if not e:
                    continue
                ratios = ("", "") if prefix is None else (f"{r[prefix + 'prefill_ratio']:.2f}", f"{r[prefix + 'decode_ratio']:.2f}")
                table.add_row(str(r["context"]), engine, f"{e['prefill_tok_s']:.1f}", f"{e['decode_tok_s']:.1f}", *ratios,
                              f"{e['weight_bytes'] / 2**20:,.0f}", f"{e['device_kv_bytes'] / 2**20:,.1f}",
                              f"{e['peak_rss_bytes'] / 2**20:,.0f}")
    elif kind == "longppl":
        table = Table("bucket", "NLL memory", "NLL full attention", title=f"{result['model']} on {result['text']}")
        for bucket, mem, full in zip(result["buckets"], result["nll_memory"], result["nll_full"]):
            table.add_row(bucket, _fmt(mem), _fmt(full))
    elif kind == "memory":
        table = Table("context", "device KV MiB", "host KV MiB", "evicted tokens", "elapsed s", "peak RSS MiB",
                      title=f"{result['model']}, budget {result['budget_tokens']}")
        for r in result["runs"]:
            table.add_row(str(r["context"]), f"{r['device_kv_bytes'] / 2**20:,.1f}", f"{r['host_kv_bytes'] / 2**20:,.1f}",
                          f"{r['evicted_tokens']:,}", f"{r['elapsed_s']:.0f}", f"{r['peak_rss_bytes'] / 2**20:,.0f}")
    elif kind == "fidelity" and "runs" in result:
        table = Table("budget", "scorer", "top-1 agreement", "past budget", "NLL memory", "NLL rel diff",
                      title=f"{result['model']} on {result['text']}, {result['context']} tokens, NLL full {result['nll_full']:.4f}")
        for r in result["runs"]:
            table.add_row(str(r["budget_tokens"]), r["scorer"], _fmt(r["top1_agreement"]), _fmt(r["top1_agreement_past_budget"]),
                          _fmt(r["nll_memory"]), _fmt(r["nll_rel_diff"]))
    else:
        table = Table("metric", "value", title=f"{result.get('model', '')} on {result.get('text', '')}")
        for key, value in result.items():
            if key not in ("model", "text") and not isinstance(value, (dict, list)):
                table.add_row(key, _fmt(value))
    console.print(table)
    if kind == "conformance":
        for line in conformance_lines(result):
            console.print(line, highlight=False, soft_wrap=True)


def conformance_lines(result: dict) -> list[str]:
    """The figures that say who rounds: each engine against the 32-bit reference, and llama.cpp against itself."""
    lines = []
    if "reference" in result:
        ours, theirs = result["edgectx_vs_reference"], result["llama_cpp_vs_reference"]
        why = " (llama.cpp rounds activations to 8 bits for quantized weights)" if result["nearer_reference"] == "edgectx" else ""
        lines.append(f"against the 32-bit reference: edgectx top-1 {ours['top1']:.3f}, llama.cpp {theirs['top1']:.3f}{why}; "
                     f"mean KL {ours['kl_mean']:.2e} and {theirs['kl_mean']:.2e}")
    if "llama_cpp_self" in result:
        own = result["llama_cpp_self"]
        lines.append(f"llama.cpp against itself (n_batch {own['n_batch'][0]} vs {own['n_batch'][1]}, {own['threads'][0]} vs "
                     f"{own['threads'][1]} threads): top-1 {own['top1']:.3f}, max |logit diff| {own['max_abs_logit_diff']:.3g}")
    return lines
