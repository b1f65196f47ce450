"""Every attention method side by side at equal token budgets, on the bundled model by default.

    python experiments/eval.py                                  # the smollm2 preset (CPU: hours)
    python experiments/eval.py --preset quick --out runs/eval   # a reduced run (minutes)
    python experiments/eval.py --sections perplexity --budgets 1/8,1/32 --methods full,dashkv

Sections (--sections, default all):
  perplexity  decode-mode perplexity on held-out text: every position attends through the
              method (teacher-forced), with the tokens and bytes per step it used; with
              --perplexity-prompt P, only the tokens after a P-token prompt, decoded step by step
  synthetic   RULER-style passkey / multi-key needle / variable tracking on held-out text at
              each length and depth (`dashkv_jax.evaluation.synthetic`), greedy answers scored
              exactly
  recall      the paper's retrieval metrics of every budget method, through its decode path:
              Recall@100 and KL(P_method || P_full) (`dashkv_jax.evaluation.recall`)
  longbench   THUDM/LongBench tasks with their official prompts
              (`dashkv_jax.evaluation.longbench`); only with --longbench-data DIR (the unzipped
              official data.zip: the Hub copy needs a loading script `datasets` no longer runs),
              scored by --longbench-protocol: official (each task's LongBench metric, the
              default) or paper (the DASH-KV paper's six tasks, F1 and TriviaQA EM, prompts cut
              to 32K); beside each score, the other protocol's where it scores the task
Writes OUT/results.json, OUT/results.md (tables) and OUT/*.png (plots: perplexity and recall
against budget, one needle heat map per method). With --resume, rows OUT/results.json already
holds (same model and settings) are kept rather than run again: an interrupted run picks up
where it stopped, and a run with more budgets or methods only runs what is new.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dashkv_jax import data  # noqa: E402
from dashkv_jax.attention.methods import METHODS, make_methods, parse_budget  # noqa: E402
from dashkv_jax.errors import DashKVError  # noqa: E402
from dashkv_jax.evaluation import synthetic  # noqa: E402
from dashkv_jax.evaluation.longbench import PROTOCOLS, run_longbench  # noqa: E402
from dashkv_jax.evaluation.metrics import METRIC_NAMES, task_metric  # noqa: E402
from dashkv_jax.evaluation.perplexity import decode_perplexity  # noqa: E402
from dashkv_jax.evaluation.recall import recall_report  # noqa: E402
from dashkv_jax.generate import generate_each  # noqa: E402
from dashkv_jax.models.loaders import DEFAULT_MODEL, load_model  # noqa: E402
from pallas_kernels.huge_pages import restart_with_huge_pages  # noqa: E402

SECTIONS = ("perplexity", "synthetic", "recall", "longbench")
# Methods that evict tokens for good: recall, a measure of selection from the whole cache,
# does not apply to them.
EVICTING = ("h2o", "snapkv", "hashevict")
# Generation budgets never go below 4 sinks + 64 window + 60 selected tokens (1/16 of 1K is 64).
MIN_BUDGET = 128


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    model: str = DEFAULT_MODEL
    methods: tuple[str, ...] = METHODS
    budgets: tuple[str, ...] = ("1/8", "1/16", "1/32", "1/64")
    tier2: str | None = None  # DASH-KV's approximate tokens; None: the hasher's
    equal_bytes: bool = False  # other budget methods read what DASH-KV reads per step
    perplexity_tokens: int = 8192  # held-out tokens per method and budget
    # Of those, a prompt each method prefills its own way, the rest scored step by step after
    # it (`prompted_perplexity`: how SnapKV differs from full attention); 0: every position.
    perplexity_prompt: int = 0
    synthetic_tasks: tuple[str, ...] = synthetic.TASKS
    synthetic_lengths: tuple[int, ...] = (1024, 2048, 4096, 8000)
    synthetic_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    generation_budget: str = "1/16"  # synthetic and LongBench generations; >= MIN_BUDGET tokens
    answer_tokens: int = 16
    # The synthetic tasks' text: held-out to report, validation to choose settings on.
    haystack_split: str = "heldout"
    recall_contexts: tuple[int, ...] = (1024, 4096, 8192)
    recall_budgets: tuple[str, ...] | None = None  # None: the same as `budgets`
    recall_queries: int = 64
    longbench_data: str | None = None  # a folder of the official LongBench jsonl files
    longbench_protocol: str = "official"  # or "paper" (`evaluation.longbench.PROTOCOLS`)
    longbench_tasks: tuple[str, ...] | None = None  # None: the protocol's (official: English)
    longbench_limit: int | None = None  # samples per task (None: all)
    longbench_new_tokens: int | None = None  # None: each task's official generation length


PRESETS = {
    "smollm2": EvalConfig(),
    # The bundled long-context model (32K), its hasher trained on windows of 2048 tokens.
    "gemma3": EvalConfig(
        model="gemma3-270m",
        methods=("full", "oracle", "streaming", "quest", "simhash", "dashkv"),
        budgets=("1/32",),
        perplexity_tokens=32768,
        synthetic_lengths=(4096, 8192, 16384, 32000),
        synthetic_depths=(0.1, 0.5, 0.9),
        generation_budget="1/32",
        recall_contexts=(8192, 32768),
        recall_budgets=("1/32",),
    ),
    # End to end in a few minutes on a 2-core CPU: what the tests run.
    "quick": EvalConfig(
        methods=("full", "oracle", "quest", "dashkv"),
        budgets=("1/4", "1/2"),
        perplexity_tokens=512,
        synthetic_tasks=("passkey",),
        synthetic_lengths=(1024,),  # at 512 tokens the model fails the task itself
        synthetic_depths=(0.5,),
        generation_budget="1/4",
        answer_tokens=8,
        recall_contexts=(512,),
        recall_budgets=("1/4",),  # 128 tokens: 4 sinks + 64 window + 60 in tier 1
        recall_queries=32,
        longbench_tasks=("hotpotqa", "trec"),
        longbench_limit=1,
        longbench_new_tokens=4,
    ),
}


def budgeted(methods):
    return [m for m in methods if m != "full"]


def perplexity_section(model, tokenizer, config: EvalConfig, save, previous) -> list[dict]:
    docs = data.load_documents(split="heldout")
    ids = next(
        data.iter_token_windows(docs, tokenizer, config.perplexity_tokens, concatenate=True), None
    )
    if ids is None:
        raise DashKVError(f"the held-out text has fewer than {config.perplexity_tokens} tokens")
    n = len(ids)
    runs = [("full", None)] if "full" in config.methods else []
    runs += [(m, b) for b in config.budgets for m in budgeted(config.methods)]
    prompt = config.perplexity_prompt
    if prompt and not 1 <= prompt <= n - 2:
        raise DashKVError(f"--perplexity-prompt {prompt} leaves nothing to score in {n} tokens")
    done = {(r["method"], r["budget"]): r for r in previous}
    rows = []
    for method, budget in tqdm(runs, desc="perplexity", unit="run"):
        if (method, budget) in done:
            rows.append(done[method, budget])
            continue
        (attention,) = make_methods(
            model, [method], n, budget, config.tier2, equal_bytes=config.equal_bytes
        ).values()
        start = time.perf_counter()
        result = decode_perplexity(model, ids, attention, prompt=prompt)
        rows.append(
            {
                "method": method,
                "budget": budget,
                "budget_tokens": getattr(attention, "budget", None),
                **result,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        save(rows)  # each run takes minutes at 8K tokens on a CPU: keep what is done
    return rows


def synthetic_section(model, tokenizer, config: EvalConfig, save, previous) -> list[dict]:
    split = data.load_documents(split=config.haystack_split)["text"]
    haystack = synthetic.Haystack(tokenizer, split)
    cases = [
        (task, length, depth)
        for task in config.synthetic_tasks
        for length in config.synthetic_lengths
        for depth in config.synthetic_depths
    ]
    done = {(r["task"], r["length"], r["depth"], r["method"]): r for r in previous}
    attentions = {}  # (method, length) -> backend: one budget per length, one compile per method
    rows = []
    for task, length, depth in tqdm(cases, desc="synthetic", unit="prompt"):
        sample = synthetic.make(task, haystack, length, depth)
        todo = [m for m in config.methods if (task, length, depth, m) not in done]
        for method in todo:
            if (method, length) not in attentions:
                tokens = max(parse_budget(config.generation_budget, length), MIN_BUDGET)
                budget = None if method == "full" else str(tokens)
                (attentions[method, length],) = make_methods(
                    model, [method], length, budget, config.tier2, equal_bytes=config.equal_bytes
                ).values()
        if not todo:  # every method's row is kept from an earlier run: no prefill needed
            rows += [done[task, length, depth, m] for m in config.methods]
            continue
        # One exact prefill for every method: the methods differ only in how they decode.
        # Instruct models answer the question at the end far better in their chat template; a
        # pretrained one (Gemma 3 270M) has none, and completes the sample's cue instead.
        chat = model.chat_template is not None
        outputs = generate_each(
            model,
            tokenizer,
            sample.prompt if chat else sample.prompt + sample.cue,
            [attentions[m, length] for m in todo],
            max_new_tokens=config.answer_tokens,
            chat=chat,
        )
        new = dict(zip(todo, outputs, strict=True))
        for method in config.methods:
            if method not in new:
                rows.append(done[task, length, depth, method])
                continue
            rows.append(
                {
                    "task": task,
                    "length": length,
                    "tokens": sample.length,
                    "depth": depth,
                    "method": method,
                    "score": synthetic.score(sample, new[method]),
                    "output": new[method],
                }
            )
        save(rows)
    return rows


def recall_section(model, tokenizer, config: EvalConfig, save, previous) -> list[dict]:
    text = "\n\n".join(data.load_documents(split="heldout")["text"])
    budgets = config.recall_budgets or config.budgets
    runs = [(c, b) for c in config.recall_contexts for b in budgets]
    rows = []
    for context, budget in tqdm(runs, desc="recall", unit="run"):
        if done := [r for r in previous if (r["context"], r["budget"]) == (context, budget)]:
            rows += done
            continue
        report = recall_report(
            model,
            tokenizer,
            text,
            methods=tuple(m for m in budgeted(config.methods) if m not in EVICTING),
            context=context,
            budget=budget,
            tier2=config.tier2,
            queries=config.recall_queries,
        )
        for method, metrics in report["methods"].items():
            rows.append({"context": context, "budget": budget, "method": method, **metrics})
    return rows


def longbench_section(model, tokenizer, config: EvalConfig, save, previous) -> list[dict]:
    """One row per method and task: the protocol's metric and score, and every protocol's
    ("metrics", "scores") where it scores the task."""
    if config.longbench_data is None:
        raise DashKVError("the longbench section needs --longbench-data DIR")
    rows = []
    for method in config.methods:
        if done := [r for r in previous if r["method"] == method]:
            rows += done
            continue
        report = run_longbench(
            model,
            tokenizer,
            config.longbench_tasks,
            protocol=config.longbench_protocol,
            data=config.longbench_data,
            attention=method,
            budget=None if method == "full" else config.generation_budget,
            tier2=config.tier2,
            equal_bytes=config.equal_bytes,
            min_budget=MIN_BUDGET,  # as the synthetic prompts: short samples, same floor
            limit=config.longbench_limit,
            max_new_tokens=config.longbench_new_tokens,
        )
        for task, result in report["tasks"].items():
            budgets = [s["budget_tokens"] for s in result["samples"]]
            rows.append(
                {
                    "method": method,
                    "task": task,
                    "protocol": report["protocol"],
                    "metric": result["metric"],
                    "score": result["score"],
                    "metrics": result["metrics"],
                    "scores": result["scores"],
                    "samples": len(result["samples"]),
                    "context": report["context"],
                    # Mean exact tokens per step over the samples (None: full attention).
                    "budget_tokens": None if None in budgets else sum(budgets) / len(budgets),
                }
            )
        save(rows)  # a method's tasks take hours at 8K on a CPU: keep what is done
    return rows


def markdown(results: dict) -> str:
    """The results as markdown tables."""
    out = [f"# Evaluation: {results['model']}", ""]
    if rows := results.get("perplexity"):
        budgets = [b for b in results["config"]["budgets"]]
        full = next((r["perplexity"] for r in rows if r["method"] == "full"), None)
        out += ["## Decode-mode perplexity", ""]
        if prompt := rows[0].get("prompt"):
            scope = (
                f"the {rows[0]['scored']} after a {prompt}-token prompt each method prefilled its"
                " own way, decoded step by step."
            )
        else:
            scope = "every position attends through the method."
        out += [f"{rows[0]['tokens']} held-out tokens; scored: {scope}", ""]
        out += ["| method | " + " | ".join(budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
        if full is not None:
            out += [f"| full | {full:.3f} (every budget) |" + " |" * (len(budgets) - 1)]
        for method in budgeted(results["config"]["methods"]):
            cells = []
            for b in budgets:
                r = next((r for r in rows if r["method"] == method and r["budget"] == b), None)
                if r is None:  # an interrupted run
                    cells.append("not run")
                    continue
                cell = f"{r['perplexity']:.3f}"
                if full is not None:
                    cell += f" ({100 * (r['perplexity'] / full - 1):+.1f}%)"
                if r["approx_tokens"]:
                    cell += f", {r['exact_tokens']:.0f}+{r['approx_tokens']:.0f} tokens"
                cell += f", {r['bytes'] / 1024:.0f} KiB"
                cells.append(cell)
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    if rows := results.get("synthetic"):
        budget = results["config"]["generation_budget"]
        out += [f"## Synthetic retrieval (budget {budget} of each prompt)", ""]
        tasks = sorted({r["task"] for r in rows})
        lengths = sorted({r["length"] for r in rows})
        header = [f"{t} @{n}" for t in tasks for n in lengths]
        out += ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]

        def scores(method, task, n) -> dict:  # depth -> score
            return {
                r["depth"]: r["score"]
                for r in rows
                if (r["method"], r["task"], r["length"]) == (method, task, n)
            }

        for method in results["config"]["methods"]:
            cells = []
            for t in tasks:
                for n in lengths:
                    mine, full = scores(method, t, n), scores("full", t, n)
                    # Only depths where full attention answers say anything about a method.
                    fair = [d for d in mine if full.get(d) == 1.0] if method != "full" else mine
                    if not mine:
                        cells.append("not run")
                    elif not fair:
                        cells.append("(full fails)")
                    else:
                        value = np.mean([mine[d] for d in fair])
                        count = f" [{len(fair)}/{len(mine)}]" if method != "full" else ""
                        cells.append(f"{value:.2f}{count}")
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out += [
            "",
            "Mean score; for methods other than full, over only the depths where full attention "
            "answers exactly, [their count / the depths run]. (full fails): it fails at every "
            "depth there, so the cell says nothing about the method.",
            "",
        ]
    if rows := results.get("recall"):
        out += ["## Retrieval through the decode path (means over sparse layers)", ""]
        out += ["| context | budget | method | Recall@100 | KL | exact | approx | KiB/step |"]
        out += ["|---|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(
                f"| {r['context']} | {r['budget']} | {r['method']} | {r['recall_at_100']:.3f} "
                f"| {r['kl']:.3f} | {r['exact_tokens']:.0f} | {r['approx_tokens']:.0f} "
                f"| {r['bytes'] / 1024:.1f} |"
            )
        out.append("")
    if rows := results.get("longbench"):
        out += longbench_markdown(rows, results["config"]["methods"])
    return "\n".join(out)


def longbench_markdown(rows: list[dict], methods) -> list[str]:
    """LongBench tables, methods x tasks and their average (x100): the run's protocol, then the
    other protocol's scores of the same predictions, on the tasks it scores."""
    protocol = rows[0].get("protocol", "official")  # rows of older runs lack it

    def by_protocol(row, field):  # older rows hold only their own protocol's metric and score
        own = "metric" if field == "metrics" else "score"
        return row.get(field, {protocol: row[own]})

    out = []
    for p in [protocol, *(p for p in PROTOCOLS if p != protocol)]:
        mine = [r for r in rows if p in by_protocol(r, "scores")]
        tasks = list(dict.fromkeys(r["task"] for r in mine))
        if not tasks:
            continue
        if p == protocol:
            out += [f"## LongBench ({p} protocol, x100)", ""]
        else:
            out += [f"The same predictions under the {p} protocol, on the tasks it scores:", ""]
        names = {r["task"]: METRIC_NAMES[by_protocol(r, "metrics")[p]] for r in mine}
        header = [f"{t} ({names[t]})" for t in tasks] + ["average"]
        out += ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
        for method in methods:
            scores = {r["task"]: by_protocol(r, "scores")[p] for r in mine if r["method"] == method}
            if not scores:
                continue
            cells = [f"{scores[t]:.2f}" if t in scores else "not run" for t in tasks]
            complete = len(scores) == len(tasks)
            cells.append(f"{sum(scores.values()) / len(scores):.2f}" if complete else "-")
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def plot(results: dict, out: Path) -> list[Path]:
    """Perplexity and recall against budget, and a needle heat map per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if rows := results.get("perplexity"):
        budgets = results["config"]["budgets"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in budgeted(results["config"]["methods"]):
            ys = [next((r["perplexity"] for r in rows if r["method"] == method
                        and r["budget"] == b), np.nan) for b in budgets]  # fmt: skip
            ax.plot(budgets, ys, marker="o", label=method)
        full = [r["perplexity"] for r in rows if r["method"] == "full"]
        if full:
            ax.axhline(full[0], color="black", linestyle="--", label="full")
        ax.set(xlabel="budget (fraction of the context)", ylabel="perplexity", yscale="log")
        plain = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}")  # 38, not 3.8 x 10^1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_title(f"Decode-mode perplexity, {rows[0]['tokens']} tokens")
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "perplexity_vs_budget.png"))
    if rows := results.get("recall"):
        contexts = sorted({r["context"] for r in rows})
        fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
        for ax, context in zip(axes[0], contexts, strict=True):
            for method in sorted({r["method"] for r in rows}):
                mine = [r for r in rows if r["method"] == method and r["context"] == context]
                ax.plot([r["budget"] for r in mine], [r["recall_at_100"] for r in mine],
                        marker="o", label=method)  # fmt: skip
            ax.set(xlabel="budget", ylabel="Recall@100", title=f"context {context}")
            ax.legend(fontsize=8)
        written.append(_save(fig, out / "recall_vs_budget.png"))
    if rows := results.get("synthetic"):
        lengths = sorted({r["length"] for r in rows})
        depths = sorted({r["depth"] for r in rows})
        methods = results["config"]["methods"]
        fig, axes = plt.subplots(1, len(methods), figsize=(2.5 * len(methods), 3), squeeze=False)
        for ax, method in zip(axes[0], methods, strict=True):
            grid = np.array([[np.mean([r["score"] for r in rows if r["method"] == method
                                       and r["length"] == n and r["depth"] == d])
                              for n in lengths] for d in depths])  # fmt: skip
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            ax.set_title(method, fontsize=9)
        axes[0][0].set(ylabel="depth")
        fig.supxlabel("context length (tokens)")
        written.append(_save(fig, out / "needle_heatmap.png"))
    if rows := results.get("longbench"):
        written.append(longbench_plot(rows, results["config"]["methods"], out / "longbench.png"))
    return written


def longbench_plot(rows: list[dict], methods, path: Path) -> Path:
    """Grouped bars: each method's score per task and their average, under the run's protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = [m for m in methods if any(r["method"] == m for r in rows)]
    labels = [*tasks, "average"]
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 4))
    for i, method in enumerate(methods):
        scores = {r["task"]: r["score"] for r in rows if r["method"] == method}
        ys = [scores.get(t, np.nan) for t in tasks]
        ys.append(np.mean(ys))
        ax.bar(np.arange(len(labels)) + (i - (len(methods) - 1) / 2) * width, ys, width,
               label=method)  # fmt: skip
    protocol = rows[0].get("protocol", "official")
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax.set(ylabel="score (x100)", title=f"LongBench, {protocol} protocol")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# Config fields that only choose which rows run; every other field changes what a row measures.
SELECTION_FIELDS = {
    "methods", "budgets", "synthetic_tasks", "synthetic_lengths", "synthetic_depths",
    "recall_contexts", "recall_budgets", "longbench_tasks",
}  # fmt: skip


def previous_results(config: EvalConfig, out: Path) -> dict:
    """The rows of an earlier run in `out` that `config` would measure the same way."""
    path = out / "results.json"
    if not path.is_file():
        return {}
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DashKVError(f"cannot resume from {path}: not valid JSON ({error})") from None
    mine = dataclasses.asdict(config)
    # A field added since that run was run at its default.
    theirs = {**dataclasses.asdict(EvalConfig()), **previous.get("config", {})}
    differ = [
        k for k in mine if k not in SELECTION_FIELDS and _same(theirs.get(k)) != _same(mine[k])
    ]
    if differ:
        raise DashKVError(
            f"cannot resume from {path}: it was run with different {', '.join(differ)}; "
            "use another --out"
        )
    return {s: previous[s] for s in SECTIONS if s in previous}


def _same(value):
    return list(value) if isinstance(value, tuple) else value  # JSON turns tuples into lists


def run(config: EvalConfig, sections, out: Path, resume: bool = False) -> dict:
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise DashKVError(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
    if bad := [t for t in config.synthetic_tasks if t not in synthetic.TASKS]:
        raise DashKVError(f"unknown task(s) {', '.join(bad)} (known: {', '.join(synthetic.TASKS)})")
    previous = previous_results(config, out) if resume else {}
    model, tokenizer = load_model(config.model)
    out.mkdir(parents=True, exist_ok=True)
    results = {"model": config.model, "config": dataclasses.asdict(config)}
    for section in sections:
        fn = {"perplexity": perplexity_section, "synthetic": synthetic_section,
              "recall": recall_section, "longbench": longbench_section}[section]  # fmt: skip

        def save(rows, section=section):
            (out / "results.json").write_text(json.dumps({**results, section: rows}, indent=2))

        # Sections save their rows as they go: a CPU run of the full preset takes hours.
        results[section] = fn(model, tokenizer, config, save, previous.get(section, []))
        save(results[section])
    (out / "results.md").write_text(markdown(results))
    results["plots"] = [str(p) for p in plot(results, out)]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _numbers(kind):
    """An argparse type: comma-separated numbers of `kind` -> tuple."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a list like 1,2,3") from None

    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="smollm2", choices=sorted(PRESETS))
    parser.add_argument(
        "--sections", help="comma-separated (default: all; longbench only with --longbench-data)"
    )
    parser.add_argument("--methods", help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument(
        "--budgets", help="perplexity and recall: comma-separated fractions, e.g. 1/8,1/32"
    )
    parser.add_argument(
        "--generation-budget",
        help="synthetic and LongBench generations: one fraction (default: the preset's, "
        f"smollm2 {PRESETS['smollm2'].generation_budget}; at least {MIN_BUDGET} tokens)",
    )
    parser.add_argument("--model", help="a model name or path (default: the bundled model)")
    parser.add_argument(
        "--synthetic-tasks", help=f"comma-separated, of: {', '.join(synthetic.TASKS)}"
    )
    parser.add_argument(
        "--synthetic-lengths", type=_numbers(int), help="comma-separated prompt lengths in tokens"
    )
    parser.add_argument(
        "--synthetic-depths", type=_numbers(float), help="comma-separated needle depths in [0, 1]"
    )
    parser.add_argument(
        "--haystack-split",
        choices=("heldout", "validation"),
        help="the synthetic tasks' text: heldout (to report, the default) or validation (to "
        "choose settings on)",
    )
    parser.add_argument("--perplexity-tokens", type=int, help="held-out tokens per run")
    parser.add_argument(
        "--perplexity-prompt",
        type=int,
        help="score only the tokens after a prompt of this many, prefilled as each method "
        "prefills one (default 0: every position, teacher-forced)",
    )
    parser.add_argument(
        "--equal-bytes",
        action="store_true",
        help="give the budget methods that are not hashed DASH-KV's bytes per step, not tokens",
    )
    parser.add_argument(
        "--recall-contexts", type=_numbers(int), help="comma-separated contexts for recall"
    )
    parser.add_argument("--longbench-data", help="folder of the official LongBench jsonl files")
    parser.add_argument(
        "--longbench-protocol",
        choices=sorted(PROTOCOLS),
        help="official (LongBench's metrics, the default) or paper (the DASH-KV paper's six "
        "tasks, F1 and TriviaQA EM, 32K); given without --longbench-tasks: its own tasks",
    )
    parser.add_argument(
        "--longbench-tasks", help="comma-separated (default: the protocol's; official: English)"
    )
    parser.add_argument("--longbench-limit", type=int, help="samples per task")
    parser.add_argument("--out", default="runs/eval", type=Path)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the rows OUT/results.json already holds (an interrupted or smaller run)",
    )
    args = parser.parse_args(argv)
    config = PRESETS[args.preset]
    overrides = {
        "methods": args.methods and tuple(args.methods.split(",")),
        "budgets": args.budgets and tuple(args.budgets.split(",")),
        "generation_budget": args.generation_budget,
        "model": args.model,
        "synthetic_tasks": args.synthetic_tasks and tuple(args.synthetic_tasks.split(",")),
        "synthetic_lengths": args.synthetic_lengths,
        "synthetic_depths": args.synthetic_depths,
        "haystack_split": args.haystack_split,
        "perplexity_tokens": args.perplexity_tokens,
        "perplexity_prompt": args.perplexity_prompt,
        "equal_bytes": args.equal_bytes,
        "recall_contexts": args.recall_contexts,
        "longbench_data": args.longbench_data,
        "longbench_tasks": args.longbench_tasks and tuple(args.longbench_tasks.split(",")),
        "longbench_limit": args.longbench_limit,
        "longbench_protocol": args.longbench_protocol,
    }
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v})
    if args.longbench_protocol and not args.longbench_tasks:  # the protocol's own tasks
        config = dataclasses.replace(config, longbench_tasks=None)
    default = SECTIONS if config.longbench_data else SECTIONS[:-1]
    sections = args.sections.split(",") if args.sections else list(default)
    try:
        if bad := [s for s in sections if s not in SECTIONS]:
            raise DashKVError(f"unknown section(s) {', '.join(bad)} (known: {', '.join(SECTIONS)})")
        if "longbench" in sections:  # a task the protocol does not score fails before any work
            for task in config.longbench_tasks or ():
                task_metric(task, config.longbench_protocol)
        results = run(config, sections, args.out, resume=args.resume)
    except DashKVError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown(results))
    print(f"wrote {args.out / 'results.json'}, results.md and {len(results['plots'])} plot(s)")
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()
    sys.exit(main())
