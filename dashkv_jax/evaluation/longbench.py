"""LongBench (THUDM/LongBench) on this project's models and attention methods.

`run_longbench(model, tokenizer, ["hotpotqa", "lcc"], data="LongBench/data", attention="dashkv",
budget="1/32")` follows LongBench's `pred.py` and `eval.py`:

- samples come from the Hub (`datasets.load_dataset("THUDM/LongBench", task, split="test")`) or
  from a folder of the official `data/*.jsonl` files (the unzipped `data.zip` of that Hub repo;
  the Hub copy is a loading-script dataset that `datasets` >= 4 no longer runs);
- the prompt is the task's official template (`PROMPTS`) filled with the sample's `context` and
  `input`, cut in the middle when it is longer than the context less the generation length: the
  first and last halves of its tokens are kept, since instructions sit at both ends;
- chat models get their chat template, except on the few-shot and code tasks (`NO_CHAT_TASKS`);
- decoding is greedy, for the task's official number of tokens (`MAX_NEW_TOKENS`);
- each prediction is scored by the protocol's metric (`dashkv_jax.evaluation.metrics`), best
  over the sample's answers, and a task's score is the mean x100.

Two protocols (`PROTOCOLS`, `protocol=`), which differ only in tasks, metrics and context:

- "official": LongBench's, each task's official metric (ROUGE-L for the summaries, F1 for
  TriviaQA...), prompts cut to the model's context; by default its English tasks;
- "paper": the DASH-KV paper's Table 1: NarrativeQA, HotpotQA, Qasper, MultiNews and GovReport
  scored by F1 (LongBench's `qa_f1_score`) and TriviaQA by exact match (`exact_match_score`),
  prompts cut to 32K tokens (or the model's context, when shorter), chat templates as above.
  Other tasks are refused: the paper gives them no metric.

Every report carries, beside each task's score under its protocol, its score under the other
protocol when that one scores the task (the same predictions, scored again: no generation).
With the official data (the unzipped `data.zip` of THUDM/LongBench; its `data` folder holds
`narrativeqa.jsonl`, ...), the paper's protocol for every method is

    python experiments/eval.py --sections longbench --longbench-data DIR --longbench-protocol paper

One difference: on samsum LongBench also stops generating at a newline; here the model runs to
its end-of-sequence token or the limit, and the first line is scored either way.
"""

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import datasets
from tokenizers import Tokenizer
from tqdm import tqdm

from dashkv_jax.attention.methods import (
    BUDGETED,
    HASHED,
    METHODS,
    make_methods,
    method_hasher,
    parse_budget,
)
from dashkv_jax.data import check_utf8
from dashkv_jax.errors import DashKVError
from dashkv_jax.evaluation.metrics import (
    PAPER_TASK_METRICS,
    PROTOCOL_METRICS,
    mean_score,
    score_prediction,
    task_metric,
)
from dashkv_jax.generate import generate
from dashkv_jax.models.llama import Llama
from dashkv_jax.models.tokenizer import render_chat

HUB_DATASET = "THUDM/LongBench"
# The fields of every official sample (LongBench's README, "Data Format").
FIELDS = ("input", "context", "answers", "length", "dataset", "language", "all_classes", "_id")

# LongBench's prompt templates (config/dataset2prompt.json), verbatim, typos included: they are
# filled with `str.format(**sample)`.
PROMPTS = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a "
        "question. Answer the question asconcisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\n"
        "Story: {context}\n\n"
        "Now, answer the question based on the story asconcisely as you can, using a "
        "single phrase if possible. Do not provide any explanation.\n\n"
        "Question: {input}\n\n"
        "Answer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as "
        "concisely as you can, using a single phrase or sentence if possible. If the "
        "question cannot be answered based on the information in the article, write "
        '"unanswerable". If the question is a yes/no question, answer "yes", "no", '
        'or "unanswerable". Do not provide any explanation.\n\n'
        "Article: {context}\n\n"
        " Answer the question based on the above article as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based "
        'on the information in the article, write "unanswerable". If the question is a '
        'yes/no question, answer "yes", "no", or "unanswerable". Do not provide any '
        "explanation.\n\n"
        "Question: {input}\n\n"
        "Answer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n"
        "{context}\n\n"
        "Now, answer the following question based on the above text, only give me the "
        "answer and do not output any other words.\n\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n"
        "{context}\n\n"
        "现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n"
        "问题：{input}\n"
        "回答："
    ),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the answer and do "
        "not output any other words.\n\n"
        "The following are given passages.\n"
        "{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do "
        "not output any other words.\n\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "2wikimqa": (
        "Answer the question based on the given passages. Only give me the answer and do "
        "not output any other words.\n\n"
        "The following are given passages.\n"
        "{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do "
        "not output any other words.\n\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "musique": (
        "Answer the question based on the given passages. Only give me the answer and do "
        "not output any other words.\n\n"
        "The following are given passages.\n"
        "{context}\n\n"
        "Answer the question based on the given passages. Only give me the answer and do "
        "not output any other words.\n\n"
        "Question: {input}\n"
        "Answer:"
    ),
    "dureader": (
        "请基于给定的文章回答下述问题。\n\n"
        "文章：{context}\n\n"
        "请基于上述文章回答下面的问题。\n\n"
        "问题：{input}\n"
        "回答："
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the "
        "report.\n\n"
        "Report:\n"
        "{context}\n\n"
        "Now, write a one-page summary of the report.\n\n"
        "Summary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or "
        "instruction. Answer the query in one or more sentences.\n\n"
        "Transcript:\n"
        "{context}\n\n"
        "Now, answer the query based on the above meeting transcript in one or more "
        "sentences.\n\n"
        "Query: {input}\n"
        "Answer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\n"
        "News:\n"
        "{context}\n\n"
        "Now, write a one-page summary of all the news.\n\n"
        "Summary:"
    ),
    "vcsum": (
        "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n"
        "会议记录：\n"
        "{context}\n\n"
        "会议总结："
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of "
        "questions.\n\n"
        "{context}\n"
        "{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do "
        "not output any other words. The following are some examples.\n\n"
        "{context}\n\n"
        "{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some "
        "examples.\n\n"
        "{context}\n\n"
        "{input}"
    ),
    "lsht": ("请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}"),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be "
        "duplicates. Please carefully read these paragraphs and determine how many unique "
        "paragraphs there are after removing duplicates. In other words, how many "
        "non-repeating paragraphs are there in total?\n\n"
        "{context}\n\n"
        "Please enter the final count of unique paragraphs after removing duplicates. The "
        "output format should only contain the number, such as 1, 2, 3, and so on.\n\n"
        "The final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine "
        "which paragraph the abstract is from.\n\n"
        "{context}\n\n"
        "The following is an abstract.\n\n"
        "{input}\n\n"
        "Please enter the number of the paragraph that the abstract is from. The answer "
        'format must be like "Paragraph 1", "Paragraph 2", etc.\n\n'
        "The answer is: "
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n"
        "{context}\n\n"
        "下面是一个摘要\n\n"
        "{input}\n\n"
        '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n'
        "答案是："
    ),
    "lcc": ("Please complete the code given below. \n{context}Next line of code:\n"),
    "repobench-p": ("Please complete the code given below. \n{context}{input}Next line of code:\n"),
}
TASKS = tuple(PROMPTS)
CHINESE_TASKS = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
ENGLISH_TASKS = tuple(t for t in TASKS if t not in CHINESE_TASKS)

# LongBench's generation lengths in tokens (config/dataset2maxlen.json).
MAX_NEW_TOKENS = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "multifieldqa_zh": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "dureader": 128,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "vcsum": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "lsht": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32,
    "lcc": 64,
    "repobench-p": 64,
}

# Few-shot and code tasks: LongBench prompts chat models on these without their chat template.
NO_CHAT_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a LongBench run chooses its tasks, cuts its prompts and scores its predictions (the
    metrics: `dashkv_jax.evaluation.metrics.PROTOCOL_METRICS[name]`)."""

    name: str
    tasks: tuple[str, ...]  # what runs when no tasks are given
    context: int | None  # prompt + generation tokens at most; None: the model's context
    source: str  # where the protocol is written down


PAPER_TASKS = tuple(PAPER_TASK_METRICS)  # narrativeqa, hotpotqa, qasper, multi_news, ...
PROTOCOLS = {
    "official": Protocol(
        "official", ENGLISH_TASKS, None, "THUDM/LongBench pred.py and eval.py, metrics.py"
    ),
    # The paper truncates at 32K; a model with a shorter context gets its own.
    "paper": Protocol(
        "paper", PAPER_TASKS, 32768, "DASH-KV paper, Table 1 (six tasks; F1, TriviaQA: EM)"
    ),
}


def load_longbench(
    task: str, data: str | Path | None = None, *, hub: str = HUB_DATASET
) -> list[dict]:
    """The samples of one LongBench task, in the official order, each a dict of `FIELDS`.

    Args:
      task: a name from `TASKS`.
      data: a folder holding the official `{task}.jsonl` files; None reads `hub` through
        `datasets` (configuration `task`, split "test").
      hub: the Hub dataset to read when `data` is None.

    Raises:
      DashKVError: an unknown task, a missing folder or file, a Hub dataset that cannot be
        loaded, or samples that are not in the official format.
    """
    check_task(task)
    if data is None:
        try:
            rows = list(datasets.load_dataset(hub, task, split="test"))
        except Exception as e:  # No network, a loading script `datasets` refuses, a bad name...
            raise DashKVError(
                f"could not load {task!r} of {hub!r} from the Hugging Face Hub "
                f"({type(e).__name__}: {e}). Download and unzip "
                f"https://huggingface.co/datasets/{HUB_DATASET}/resolve/main/data.zip and pass "
                "its data folder instead"
            ) from e
        where = f"{hub}/{task}"
    else:
        folder = Path(data).expanduser()
        if not folder.is_dir():
            raise DashKVError(f"no such LongBench data folder: {str(folder)!r}")
        path = folder / f"{task}.jsonl"
        if not path.is_file():
            found = ", ".join(sorted(p.stem for p in folder.glob("*.jsonl"))) or "none"
            raise DashKVError(f"no {path.name} in {str(folder)!r} (tasks there: {found})")
        rows = _read_jsonl(path)
        where = str(path)
    if not rows:
        raise DashKVError(f"{where} has no samples")
    for i, row in enumerate(rows):
        _check_sample(row, f"{where}, sample {i}")
    return rows


def truncate_middle(text: str, tokenizer: Tokenizer, max_tokens: int) -> str:
    """`text` if it is at most `max_tokens` tokens long, else its first and last
    `max_tokens // 2` tokens, decoded and joined."""
    if max_tokens < 2:
        raise DashKVError(f"a prompt needs room for at least 2 tokens, got {max_tokens}")
    ids = tokenizer.encode(text).ids
    if len(ids) <= max_tokens:
        return text
    half = max_tokens // 2
    return tokenizer.decode(ids[:half]) + tokenizer.decode(ids[-half:])


def build_prompt(
    task: str,
    sample: dict,
    tokenizer: Tokenizer,
    max_tokens: int,
    chat_template: str | None = None,
) -> str:
    """The prompt LongBench gives a model for `sample` of `task`.

    The task's template filled with the sample and cut in the middle to `max_tokens` tokens,
    then wrapped in `chat_template` (a chat model's Jinja template), except on `NO_CHAT_TASKS`.
    """
    check_task(task)
    prompt = truncate_middle(PROMPTS[task].format(**sample), tokenizer, max_tokens)
    if chat_template is not None and task not in NO_CHAT_TASKS:
        prompt = render_chat(chat_template, [{"role": "user", "content": prompt}])
    return prompt


def run_longbench(
    model: Llama,
    tokenizer: Tokenizer,
    tasks: Sequence[str] | None = None,
    *,
    protocol: str = "official",
    data: str | Path | None = None,
    hub: str = HUB_DATASET,
    attention: str = "full",
    budget: str | int | None = None,
    hasher=None,
    tier2: str | int | None = None,
    equal_bytes: bool = False,
    min_budget: int = 0,
    context: int | None = None,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    chat: bool | None = None,
    progress: bool = True,
) -> dict:
    """Generate and score LongBench `tasks` with one attention method; a JSON-able report.

    Args:
      model, tokenizer: as from `dashkv_jax.load_model`.
      tasks: names from `TASKS` that `protocol` scores; None: the protocol's own tasks.
      protocol: "official" or "paper" (`PROTOCOLS`, module docstring).
      data, hub: where the samples come from (see `load_longbench`).
      attention, budget, hasher, tier2: the attention method, as for
        `dashkv_jax.generate.generate` (a fractional budget is of each sample's own context).
      equal_bytes: a budget method that is not hashed gets, per sample, the token budget at
        which it reads per step what DASH-KV reads at `budget` and `tier2`
        (`attention.methods.equal_bytes_budget`); DASH-KV's hasher is then `hasher` (default:
        the shipped one).
      min_budget: the fewest exact tokens a sample's method reads per step (a fractional
        budget of a short sample may leave nothing beyond the sinks and window to select).
      context: prompt + generation tokens at most; None: the protocol's (capped at the model's).
      limit: score only the first `limit` samples of each task.
      max_new_tokens: overrides every task's official generation length (for quick runs).
      chat: apply the model's chat template (where LongBench does); None: when it has one.
      progress: show a progress bar over each task's samples.

    Returns:
      {"protocol", "attention", "budget", "equal_bytes", "source", "context", "chat", "tasks":
      {task: {"metric", "score", "metrics", "scores", "max_new_tokens", "samples": [{"_id",
      "prediction", "answers", "score", "scores", "length", "prompt_tokens", "budget_tokens",
      "truncated"}]}}, "average", "averages"}. "metric" and "score" are the protocol's;
      "metrics" and "scores" map every protocol that scores the task to its metric and score,
      and "averages" every protocol to its mean over the tasks (None where it skips one).
      Scores are x100 in [0, 100].
    """
    if protocol not in PROTOCOLS:
        raise DashKVError(
            f"unknown LongBench protocol {protocol!r} (known: {', '.join(PROTOCOLS)})"
        )
    tasks = PROTOCOLS[protocol].tasks if tasks is None else tuple(tasks)
    if not tasks:
        raise DashKVError("no LongBench tasks given")
    for task in tasks:
        task_metric(task, protocol)  # an unknown task, or one the protocol does not score
    if attention not in METHODS:
        raise DashKVError(f"unknown attention method {attention!r} (known: {', '.join(METHODS)})")
    if limit is not None and limit < 1:
        raise DashKVError(f"limit must be >= 1, got {limit}")
    context = _context(model, protocol, context)
    chat = model.chat_template is not None if chat is None else chat
    chat_template = model.chat_template if chat else None
    if chat and chat_template is None:
        raise DashKVError("this model has no chat template; run LongBench with chat=False")
    # Every task is read and checked before any decoding.
    samples = {task: load_longbench(task, data, hub=hub)[:limit] for task in tasks}
    # Equal bytes reshapes only the budget methods that are not hashed; the hashed ones are
    # the reference (or, for simhash and dashkv-symmetric, read what DASH-KV reads already).
    equal_bytes = equal_bytes and attention in BUDGETED
    if attention in HASHED or equal_bytes:  # Load the hasher once, not once per sample.
        hasher = method_hasher("dashkv" if equal_bytes else attention, model, hasher)
    method = {"attention": attention, "budget": budget, "hasher": hasher, "tier2": tier2,
              "min_budget": min_budget}  # fmt: skip

    report_tasks = {}
    for task, task_samples in samples.items():
        new_tokens = MAX_NEW_TOKENS[task] if max_new_tokens is None else max_new_tokens
        template = None if task in NO_CHAT_TASKS else chat_template
        max_prompt = context - new_tokens - _chat_overhead(tokenizer, template)
        # Both protocols' scores where both score the task: one generation, scored twice.
        protocols = [p for p in PROTOCOLS if task in PROTOCOL_METRICS[p]]
        scores, results = {p: [] for p in protocols}, []
        for sample in tqdm(task_samples, desc=task, unit="sample", disable=not progress):
            prompt = build_prompt(task, sample, tokenizer, max_prompt, template)
            prompt_tokens = len(tokenizer.encode(prompt).ids)
            try:
                tokens, options = _sample_method(
                    model, prompt_tokens + new_tokens, method, equal_bytes
                )
                prediction = generate(
                    model, tokenizer, prompt, max_new_tokens=new_tokens, **options
                )
            except DashKVError as e:
                raise DashKVError(f"{task} sample {sample['_id']}: {e}") from e
            for p in protocols:
                scores[p].append(
                    score_prediction(
                        task, prediction, sample["answers"], sample["all_classes"], protocol=p
                    )
                )
            results.append(
                {
                    "_id": sample["_id"],
                    "prediction": prediction,
                    "answers": list(sample["answers"]),
                    "score": round(100 * scores[protocol][-1], 2),
                    "scores": {p: round(100 * scores[p][-1], 2) for p in protocols},
                    "length": sample["length"],
                    "prompt_tokens": prompt_tokens,
                    "budget_tokens": tokens,
                    "truncated": PROMPTS[task].format(**sample) not in prompt,
                }
            )
        task_scores = {p: mean_score(scores[p]) for p in protocols}
        report_tasks[task] = {
            "metric": task_metric(task, protocol).__name__,
            "score": task_scores[protocol],
            "metrics": {p: task_metric(task, p).__name__ for p in protocols},
            "scores": task_scores,
            "max_new_tokens": new_tokens,
            "samples": results,
        }
    averages = {}
    for p in PROTOCOLS:
        mine = [t["scores"].get(p) for t in report_tasks.values()]
        averages[p] = None if None in mine else round(sum(mine) / len(mine), 2)
    return {
        "protocol": protocol,
        "attention": attention,
        "budget": None if budget is None else str(budget),
        "equal_bytes": equal_bytes,
        "source": str(data) if data is not None else hub,
        "context": context,
        "chat": chat,
        "tasks": report_tasks,
        "average": averages[protocol],
        "averages": averages,
    }


def check_task(task: str) -> None:
    """Raise a `DashKVError` naming the known tasks unless `task` is one."""
    if task not in PROMPTS:
        raise DashKVError(f"unknown LongBench task {task!r} (known: {', '.join(TASKS)})")


def _context(model: Llama, protocol: str, context: int | None) -> int:
    """Prompt + generation tokens a run allows: `context`, else the protocol's, at most the
    model's."""
    limit = model.config.max_position
    context = PROTOCOLS[protocol].context if context is None else context
    if context is None:
        return limit
    if context < 2:
        raise DashKVError(f"a LongBench context must be >= 2 tokens, got {context}")
    return min(context, limit)


def _sample_method(model: Llama, context: int, method: dict, equal_bytes: bool):
    """(exact tokens per step or None, `generate`'s attention options) for one sample whose
    prompt and generation take `context` tokens."""
    options = {k: v for k, v in method.items() if k != "min_budget"}
    attention, budget = method["attention"], method["budget"]
    if attention == "full" or budget is None:
        return None, options
    tokens = min(max(parse_budget(str(budget), context), method["min_budget"]), context)
    if not equal_bytes:
        return tokens, options | {"budget": str(tokens)}
    # DASH-KV's bytes at this context, as tokens of this method (tier 2 at the hasher's).
    (backend,) = make_methods(
        model, [attention], context, str(tokens), method["tier2"], method["hasher"],
        equal_bytes=True,
    ).values()  # fmt: skip
    return backend.budget, {"attention": backend}


def _chat_overhead(tokenizer: Tokenizer, chat_template: str | None) -> int:
    """Tokens the chat template adds around a message, kept free when truncating."""
    if chat_template is None:
        return 0
    empty = render_chat(chat_template, [{"role": "user", "content": ""}])
    return len(tokenizer.encode(empty).ids)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    check_utf8(path)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DashKVError(f"{path}:{number} is not JSON ({e})") from None
    return rows


def _check_sample(row, where: str) -> None:
    """Refuse a sample that is not in LongBench's format, before any model work."""
    if not isinstance(row, dict):
        raise DashKVError(f"{where} is not a JSON object, not LongBench's format")
    missing = [field for field in FIELDS if field not in row]
    if missing:
        raise DashKVError(f"{where} lacks {missing}, not LongBench's format (fields: {FIELDS})")
    if not isinstance(row["context"], str) or not isinstance(row["input"], str):
        raise DashKVError(f"{where}: context and input must be strings")
    answers = row["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise DashKVError(f"{where}: answers must be a non-empty list of strings")
    classes = row["all_classes"]
    if classes is not None and not (
        isinstance(classes, list) and all(isinstance(c, str) for c in classes)
    ):
        raise DashKVError(f"{where}: all_classes must be null or a list of strings")
