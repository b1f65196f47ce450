"""The DASH-KV paper's tables beside ours: its numbers, copied and marked, and ours, measured here.

    python experiments/paper_tables.py                            # both tables (CPU: hours)
    python experiments/paper_tables.py --longbench-data LongBench/data --equal-bytes
    python experiments/paper_tables.py --sections table2 --context 4096 --queries 32
    python experiments/paper_tables.py --quick --longbench-data tests/fixtures/longbench

Table 1, the paper's main table (methods x LongBench tasks): our methods (--methods, default
the paper's: full, StreamingLLM, H2O, SnapKV, DASH-KV) on the paper's six LongBench tasks under
its protocol (NarrativeQA, HotpotQA, Qasper, MultiNews, GovReport by F1, TriviaQA by exact match,
prompts cut in the middle to 32K or the model's context; `dashkv_jax.evaluation.longbench`),
each task's official LongBench score beside, on whatever data --longbench-data gives (the
unzipped data.zip of THUDM/LongBench; without it that part is skipped, and says so). Beside it,
what runs here without data: decode-mode perplexity of held-out text (its last
--perplexity-scored tokens, 512 by default, after the rest prefilled as a prompt, as the paper's
tasks generate after theirs; 0 scores every position) and RULER-style passkey /
multi-key / variable-tracking prompts. All three are experiments/eval.py's sections, run by it
(its own output, plots included, is in OUT/table1/); --equal-bytes gives every budget method
that is not hashed DASH-KV's bytes per step rather than its tokens.

Table 2, the paper's ablation: SimHash (the paper's "naive LSH"), the symmetric learned hasher
and DASH-KV (asymmetric): Recall@100 and KL(P_method || P_full) through each method's decode
path on held-out text (`dashkv_jax.evaluation.recall.recall_report`), and the decode latency
per token: the median wall time of one decode step (every layer, batch 1, `llama.decode_step`)
with a --context-token cache, on this machine; full attention's is given as the reference.

Every number is marked "paper" or "ours". The paper's are copied from the paper (as
../shared/DESIGN.md section 2 gives them): other models (Qwen2-7B-Instruct, Llama-3.1-8B-Instruct,
Qwen2.5-14B-Instruct), a GPU, a 32K context. Ours come from --model (default: the bundled
SmolLM2-135M-Instruct, its shipped hashers) on this machine, at --context. They sit side by side
to be read together; they are not one experiment.

Writes OUT/paper_tables.json, OUT/paper_tables.md, OUT/table1.png and OUT/table2.png (the plots
of what ran), and OUT/table1/ (experiments/eval.py's results). Bad input prints one line and
exits 2.
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import eval as evaluation  # noqa: E402  (experiments/eval.py: Table 1's sections)

from dashkv_jax import data  # noqa: E402
from dashkv_jax.attention.methods import METHODS, make_methods, parse_budget  # noqa: E402
from dashkv_jax.errors import DashKVError  # noqa: E402
from dashkv_jax.evaluation import synthetic  # noqa: E402
from dashkv_jax.evaluation.longbench import PAPER_TASKS, load_longbench  # noqa: E402
from dashkv_jax.evaluation.recall import recall_report  # noqa: E402
from dashkv_jax.generate import prefill_exact  # noqa: E402
from dashkv_jax.models.llama import decode_step  # noqa: E402
from dashkv_jax.models.loaders import DEFAULT_MODEL, load_model  # noqa: E402
from pallas_kernels.huge_pages import restart_with_huge_pages  # noqa: E402

SECTIONS = ("table1", "table2")
# The paper's Table 1 methods; Table 2's three hashers (ours by name, the paper's label).
TABLE1_METHODS = ("full", "streaming", "h2o", "snapkv", "dashkv")
TABLE2_METHODS = {
    "simhash": "naive LSH",
    "dashkv-symmetric": "symmetric learned",
    "dashkv": "DASH-KV (asymmetric)",
}

# The paper's numbers, copied (not measured here), with where they come from.
PAPER = {
    "source": "DASH-KV paper, as ../shared/DESIGN.md section 2 ('The paper's evaluation') gives it",
    "setting": "Qwen2-7B-Instruct, Llama-3.1-8B-Instruct and Qwen2.5-14B-Instruct at a 32K "
    "context on the paper's GPU; not this project's model or machine",
    "table1": {
        "what": "LongBench average over six tasks (NarrativeQA, HotpotQA, Qasper, MultiNews, "
        "GovReport: F1; TriviaQA: EM), x100",
        "tasks": list(PAPER_TASKS),
        "averages": [
            {"model": "Qwen2-7B-Instruct", "dashkv": 38.73, "full": 38.71},
            {"model": "Llama-3.1-8B-Instruct", "dashkv": 42.43, "full": 42.70},
            {"model": "Qwen2.5-14B-Instruct", "dashkv": 42.92, "full": 42.26},
        ],
    },
    "table2": {
        "what": "Recall@100 (%), KL(P_h || P_f) and decode latency per token (ms, the paper's GPU)",
        "rows": [
            {
                "method": "simhash",
                "label": "naive LSH",
                "recall_at_100": 8.91,
                "kl": 3.20,
                "latency_ms": 28,
            },
            {
                "method": "dashkv-symmetric",
                "label": "symmetric learned",
                "recall_at_100": 68.28,
                "kl": 1.32,
                "latency_ms": 38,
            },
            {
                "method": "dashkv",
                "label": "DASH-KV",
                "recall_at_100": 86.06,
                "kl": 0.4054,
                "latency_ms": 22,
            },
        ],  # fmt: skip
    },
}


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str = DEFAULT_MODEL
    context: int = 8192  # Table 2's text and cache; Table 1's perplexity and synthetic prompts
    budget: str = "1/32"  # exact tokens per KV head and step, a fraction of the context
    tier2: str | None = None  # the hashed methods' approximate tokens; None: the hasher's
    equal_bytes: bool = False
    queries: int = 64  # Table 2's query positions
    latency_steps: int = 8  # Table 2's timed decode steps per method
    methods: tuple[str, ...] = TABLE1_METHODS
    longbench_data: str | None = None
    longbench_limit: int | None = None  # samples per task (None: all)
    longbench_new_tokens: int | None = None  # None: each task's official generation length
    perplexity_tokens: int | None = None  # None: --context
    # Scored at the end of those, after the rest prefilled as a prompt, as the paper's tasks
    # generate after theirs (and the one way SnapKV differs from full attention); 0: every
    # position, teacher-forced.
    perplexity_scored: int = 512
    synthetic_tasks: tuple[str, ...] = synthetic.TASKS
    synthetic_lengths: tuple[int, ...] | None = None  # None: --context less room for the answer
    synthetic_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    answer_tokens: int = 16


# Tiny sizes: both tables end to end in a few minutes on a 2-core CPU (what the tests run).
QUICK = {
    "context": 512,
    "budget": "1/4",  # 128 of 512 tokens: 4 sinks + 64 window + 60 selected
    "queries": 16,
    "latency_steps": 3,
    "methods": ("full", "streaming", "dashkv"),
    "longbench_limit": 1,
    "longbench_new_tokens": 4,
    "perplexity_scored": 64,
    "synthetic_tasks": ("passkey",),
    "synthetic_lengths": (1024,),  # at 512 tokens the model fails the task itself
    "synthetic_depths": (0.5,),
    "answer_tokens": 8,
}
# Tokens a synthetic prompt leaves free in the context: chat template and answer.
ANSWER_ROOM = 192


def table1(settings: Settings, out: Path) -> dict:
    """Ours: experiments/eval.py's perplexity, synthetic and (with data) longbench sections,
    run by it into out/table1/ under the paper's LongBench protocol."""
    sections = ["perplexity", "synthetic"]
    if settings.longbench_data is not None:
        sections.append("longbench")
    context = settings.context
    tokens = settings.perplexity_tokens or context
    config = evaluation.EvalConfig(
        model=settings.model,
        methods=settings.methods,
        budgets=(settings.budget,),
        tier2=settings.tier2,
        equal_bytes=settings.equal_bytes,
        perplexity_tokens=tokens,
        perplexity_prompt=tokens - settings.perplexity_scored if settings.perplexity_scored else 0,
        synthetic_tasks=settings.synthetic_tasks,
        synthetic_lengths=settings.synthetic_lengths or (context - ANSWER_ROOM,),
        synthetic_depths=settings.synthetic_depths,
        generation_budget=settings.budget,
        answer_tokens=settings.answer_tokens,
        longbench_data=settings.longbench_data,
        longbench_protocol="paper",
        longbench_tasks=PAPER_TASKS,
        longbench_limit=settings.longbench_limit,
        longbench_new_tokens=settings.longbench_new_tokens,
    )
    results = evaluation.run(config, sections, out / "table1")
    longbench = results.get("longbench")
    return {
        "results": str(out / "table1" / "results.json"),
        "plots": results["plots"],
        "perplexity": results["perplexity"],
        "synthetic": results["synthetic"],
        "longbench": longbench,
        "longbench_skipped": None
        if longbench is not None
        else "needs the LongBench data: --longbench-data DIR (the unzipped data.zip of "
        "THUDM/LongBench)",
        "longbench_averages": None if longbench is None else longbench_averages(longbench),
        "markdown": evaluation.markdown(results),
    }


def longbench_averages(rows: list[dict]) -> dict:
    """{method: {protocol: mean over the tasks of that protocol's scores}} of eval.py's rows."""
    averages = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        averages[method] = {
            p: round(float(np.mean([r["scores"][p] for r in mine])), 2)
            for p in mine[0]["scores"]
            if all(p in r["scores"] for r in mine)
        }
    return averages


def table2(model, tokenizer, settings: Settings) -> dict:
    """Ours: Recall@100 and KL of Table 2's methods, and each one's decode latency per token."""
    text = "\n\n".join(data.load_documents(split="heldout")["text"])
    report = recall_report(
        model,
        tokenizer,
        text,
        methods=tuple(TABLE2_METHODS),
        context=settings.context,
        budget=settings.budget,
        tier2=settings.tier2,
        queries=settings.queries,
    )
    bos = model.config.bos_token_id
    ids = ([] if bos is None else [bos]) + tokenizer.encode(text, add_special_tokens=False).ids
    # The cache ends full: prompt + one compiling step + the timed ones = the context.
    prompt = np.asarray(ids[: settings.context - settings.latency_steps - 1], np.int32)
    attentions = make_methods(
        model, ["full", *TABLE2_METHODS], settings.context, settings.budget, settings.tier2
    )
    latency = decode_latency(model, prompt, attentions, settings.latency_steps)
    rows = []
    for method, label in TABLE2_METHODS.items():
        metrics = report["methods"][method]
        rows.append(
            {
                "method": method,
                "label": label,
                "recall_at_100": round(100 * metrics["recall_at_100"], 2),  # %, as the paper
                "kl": round(metrics["kl"], 4),
                "latency_ms": latency[method]["median_ms"],
                "exact_tokens": round(metrics["exact_tokens"], 1),
                "approx_tokens": round(metrics["approx_tokens"], 1),
                "bytes": round(metrics["bytes"]),
            }
        )
    return {
        "context": settings.context,
        "budget_tokens": report["budget"],
        "tier2_tokens": report["tier2"],
        "queries": report["queries"],
        "rows": rows,
        "full_latency_ms": latency["full"]["median_ms"],
        "latency": latency,
        "recall_report": report,
    }


def decode_latency(model, prompt: np.ndarray, attentions: dict, steps: int) -> dict:
    """{name: {"median_ms", "steps_ms"}}: wall time of one `decode_step` (all layers, batch 1)
    of each backend in `attentions` after one exact prefill of prompt [T] that each adopts,
    with a T + steps + 1 slot cache; the first step (compilation) is not timed."""
    logits, exact = prefill_exact(model, jnp.asarray(prompt[None]), len(prompt) + steps + 1)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [1]
    timings = {}
    for name, attention in attentions.items():
        # decode_step donates its cache: each method decodes from its own copy of the prefill.
        cache = model.adopt_cache(jax.tree.map(jnp.copy, exact), attention)
        out, cache = decode_step(model, first, cache, attention)
        token = jnp.argmax(out, axis=-1).astype(jnp.int32)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            out, cache = decode_step(model, token, cache, attention)
            out.block_until_ready()
            times.append(1000 * (time.perf_counter() - start))
            token = jnp.argmax(out, axis=-1).astype(jnp.int32)
        timings[name] = {
            "median_ms": round(float(np.median(times)), 2),
            "steps_ms": [round(t, 2) for t in times],
        }
    return timings


def machine() -> str:
    """This machine in words: the processor, its cores, JAX's backend."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux names the CPU model there, not in `platform`
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")]  # fmt: skip
        name = models[0] if models else name
    device = jax.devices()[0]
    return f"{name}, {os.cpu_count()} cores, JAX {jax.__version__} on {device.device_kind}"


def markdown(tables: dict) -> str:
    """Both tables as markdown: the paper's rows and ours, each marked."""
    ours = tables["ours"]
    where = f"{ours['model']} on this machine ({ours['machine']})"
    out = ["# The DASH-KV paper's tables beside ours", ""]
    out += [
        f"**paper**: copied from the paper ({PAPER['source']}): {PAPER['setting']}.",
        f"**ours**: measured by experiments/paper_tables.py on {where}, context "
        f"{ours['context']}, exact budget {ours['budget']}"
        + (", other budget methods at DASH-KV's bytes per step" if ours["equal_bytes"] else "")
        + ".",
        "",
    ]
    if "table1" in tables:
        t1 = tables["table1"]["ours"]
        out += ["## Table 1: LongBench, methods x tasks", ""]
        out += ["LongBench average (x100), DASH-KV against full attention:", ""]
        out += ["| source | model | setting | full | dashkv |", "|---|---|---|---|---|"]
        for row in PAPER["table1"]["averages"]:
            out.append(
                f"| paper | {row['model']} | 32K, GPU | {row['full']:.2f} | {row['dashkv']:.2f} |"
            )
        if t1["longbench_averages"] is not None:
            avg = t1["longbench_averages"]
            cells = [
                f"{avg[m]['paper']:.2f}" if m in avg else "not run" for m in ("full", "dashkv")
            ]
            setting = f"{t1['longbench'][0]['context'] // 1024}K, this machine"
            out.append(f"| ours | {ours['model']} | {setting} | " + " | ".join(cells) + " |")
        else:
            out.append(f"| ours | {ours['model']} | - | skipped: {t1['longbench_skipped']} | |")
        out += ["", "### Ours in full (experiments/eval.py's tables)", ""]
        body = t1["markdown"].split("\n", 1)[1]  # its "# Evaluation" title dropped
        out += [body.replace("\n## ", "\n#### "), ""]
    if "table2" in tables:
        t2 = tables["table2"]["ours"]
        out += ["## Table 2: naive LSH, symmetric and asymmetric (DASH-KV) hashing", ""]
        out += [
            f"Ours: {t2['queries']} held-out query positions at context {t2['context']}, "
            f"{t2['budget_tokens']} exact + {t2['tier2_tokens']} approximate tokens per KV head "
            f"and step; latency: the median decode step (all layers, batch 1) on this "
            f"machine, full attention's {t2['full_latency_ms']:.1f} ms.",
            "",
            "| source | method | Recall@100 (%) | KL | latency (ms/token) | setting |",
            "|---|---|---|---|---|---|",
        ]
        for row in PAPER["table2"]["rows"]:
            out.append(
                f"| paper | {row['label']} | {row['recall_at_100']:.2f} | {row['kl']:.4f} "
                f"| {row['latency_ms']} | paper's models, GPU, 32K |"
            )
        for row in t2["rows"]:
            out.append(
                f"| ours | {row['method']} | {row['recall_at_100']:.2f} | {row['kl']:.4f} "
                f"| {row['latency_ms']:.1f} | {ours['model']}, this CPU, {t2['context']} |"
            )
        out.append("")
    return "\n".join(out)


def plot(tables: dict, out: Path) -> list[Path]:
    """table1.png: LongBench averages, full and DASH-KV, the paper's models and ours (when run);
    table2.png: Recall@100, KL and latency relative to DASH-KV's, the paper's and ours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    t1 = tables.get("table1", {}).get("ours")
    if t1 is not None and t1["longbench_averages"] is not None:
        rows = [(f"paper: {r['model']}", r["full"], r["dashkv"])
                for r in PAPER["table1"]["averages"]]  # fmt: skip
        avg = t1["longbench_averages"]
        rows.append(
            (f"ours: {tables['ours']['model']}", avg.get("full", {}).get("paper", np.nan),
             avg.get("dashkv", {}).get("paper", np.nan))
        )  # fmt: skip
        fig, ax = plt.subplots(figsize=(8, 4))
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r[1] for r in rows], 0.4, label="full")
        ax.bar(x + 0.2, [r[2] for r in rows], 0.4, label="dashkv")
        ax.set_xticks(x, [r[0] for r in rows], rotation=10, fontsize=8)
        ax.set(ylabel="LongBench average (x100)", title="Table 1: paper (32K, GPU) and ours")
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "table1.png"))
    t2 = tables.get("table2", {}).get("ours")
    if t2 is not None:
        paper = {r["method"]: r for r in PAPER["table2"]["rows"]}
        ours = {r["method"]: r for r in t2["rows"]}
        methods = list(TABLE2_METHODS)
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        panels = [
            ("recall_at_100", "Recall@100 (%)"),
            ("kl", "KL(P_method || P_full)"),
            ("latency_ms", "latency / DASH-KV's"),  # different machines: ratios compare
        ]
        x = np.arange(len(methods))
        for ax, (key, label) in zip(axes, panels, strict=True):
            ys = {}
            for source, rows in (("paper", paper), ("ours", ours)):
                values = np.array([rows[m][key] for m in methods], float)
                if key == "latency_ms":
                    values = values / rows["dashkv"][key]
                ys[source] = values
            ax.bar(x - 0.2, ys["paper"], 0.4, label="paper (its models, GPU, 32K)")
            ax.bar(x + 0.2, ys["ours"], 0.4, label=f"ours ({t2['context']}, this CPU)")
            ax.set_xticks(x, [TABLE2_METHODS[m] for m in methods], rotation=10, fontsize=8)
            ax.set(ylabel=label)
        axes[0].legend(fontsize=8)
        fig.suptitle("Table 2: the paper's numbers and ours")
        written.append(_save(fig, out / "table2.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(settings: Settings, sections, out: Path) -> dict:
    check(settings, sections)
    model, tokenizer = load_model(settings.model)
    if settings.context > model.config.max_position:
        raise DashKVError(
            f"--context {settings.context} exceeds the model's context of "
            f"{model.config.max_position}"
        )
    parse_budget(settings.budget, settings.context)
    out.mkdir(parents=True, exist_ok=True)
    tables = {
        "paper": PAPER,
        "ours": {
            "model": settings.model,
            "model_name": model.config.name,
            "machine": machine(),
            "context": settings.context,
            "budget": settings.budget,
            "tier2": settings.tier2,
            "equal_bytes": settings.equal_bytes,
            "settings": dataclasses.asdict(settings),
        },
    }
    if "table2" in sections:  # minutes: before Table 1's hours
        tables["table2"] = {
            "paper": PAPER["table2"],
            "ours": table2(model, tokenizer, settings),
        }
    del model  # Table 1's evaluation loads its own
    if "table1" in sections:
        tables["table1"] = {"paper": PAPER["table1"], "ours": table1(settings, out)}
    tables["markdown"] = markdown(tables)
    tables["plots"] = [str(p) for p in plot(tables, out)]
    (out / "paper_tables.md").write_text(tables["markdown"])
    (out / "paper_tables.json").write_text(json.dumps(tables, indent=2, ensure_ascii=False))
    return tables


def check(settings: Settings, sections) -> None:
    """Refuse bad settings before any model work."""
    if not sections:
        raise DashKVError("no sections given")
    if bad := [s for s in sections if s not in SECTIONS]:
        raise DashKVError(f"unknown section(s) {', '.join(bad)} (known: {', '.join(SECTIONS)})")
    if unknown := [m for m in settings.methods if m not in METHODS]:
        raise DashKVError(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
    if settings.context < 2 * (4 + 64):
        raise DashKVError(f"--context must be at least 136 tokens, got {settings.context}")
    if settings.queries < 1:
        raise DashKVError(f"--queries must be >= 1, got {settings.queries}")
    if settings.longbench_limit is not None and settings.longbench_limit < 1:
        raise DashKVError(f"--longbench-limit must be >= 1, got {settings.longbench_limit}")
    parse_budget(settings.budget, settings.context)
    if settings.tier2 is not None:
        parse_budget(settings.tier2, settings.context, allow_zero=True)
    if "table1" in sections and settings.longbench_data is not None:
        for task in PAPER_TASKS:  # a missing file or a bad sample fails now, not hours later
            load_longbench(task, settings.longbench_data)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr (and exit 2), as every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None) -> int:
    parser = OneLineParser(
        prog="paper_tables",
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sections", default="table1,table2", help="comma-separated, of: "
                        f"{', '.join(SECTIONS)} (default: both)")  # fmt: skip
    parser.add_argument("--model", help="a model name or path (default: the bundled model)")
    parser.add_argument("--context", type=int, help="tokens (default 8192; --quick: 512)")
    parser.add_argument("--budget", help="exact tokens per step: a fraction or a count "
                        "(default 1/32; --quick: 1/4)")  # fmt: skip
    parser.add_argument("--tier2", help="hashed methods' approximate tokens (default: hasher's)")
    parser.add_argument("--queries", type=int, help="Table 2's query positions (default 64)")
    parser.add_argument("--methods", help="Table 1's methods, comma-separated (default: "
                        f"{','.join(TABLE1_METHODS)})")  # fmt: skip
    parser.add_argument(
        "--equal-bytes",
        action="store_true",
        help="Table 1: budget methods that are not hashed read DASH-KV's bytes per step",
    )
    parser.add_argument(
        "--perplexity-scored",
        type=int,
        help="Table 1's perplexity: tokens scored after the rest of --context prefilled as a "
        "prompt (default 512; --quick: 64; 0: every position, teacher-forced)",
    )
    parser.add_argument("--longbench-data", help="folder of the official LongBench jsonl files")
    parser.add_argument("--longbench-limit", type=int, help="samples per LongBench task")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (minutes; the tests)")
    parser.add_argument("--out", type=Path, default=Path("runs/paper_tables"))
    args = parser.parse_args(argv)
    settings = Settings(**QUICK) if args.quick else Settings()
    overrides = {
        "model": args.model,
        "context": args.context,
        "budget": args.budget,
        "tier2": args.tier2,
        "queries": args.queries,
        "methods": args.methods and tuple(args.methods.split(",")),
        "equal_bytes": args.equal_bytes,
        "perplexity_scored": args.perplexity_scored,
        "longbench_data": args.longbench_data,
        "longbench_limit": args.longbench_limit,
    }
    settings = dataclasses.replace(
        settings, **{k: v for k, v in overrides.items() if v is not None and v is not False}
    )
    try:
        tables = run(settings, args.sections.split(","), args.out)
    except DashKVError as error:
        print(f"paper_tables: error: {error}", file=sys.stderr)
        return 2
    print(tables["markdown"])
    print(f"wrote {args.out / 'paper_tables.json'}, paper_tables.md and "
          f"{len(tables['plots'])} plot(s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()
    sys.exit(main())
