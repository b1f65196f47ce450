"""LongBench's answer metrics, re-implemented from its specification (THUDM/LongBench,
`LongBench/metrics.py` and `LongBench/eval.py`) so scores compare with published ones.

Each metric scores one prediction against one ground truth in [0, 1]; `score_prediction` takes
the best over a sample's ground truths, and `mean_score` averages a task's samples and reports
x100, rounded to 2 decimals, as LongBench does. `TASK_METRICS` names the metric of every task.

Two protocols (`PROTOCOL_METRICS`): "official", LongBench's own metric per task, and "paper",
the DASH-KV paper's Table 1, which scores six English tasks only: NarrativeQA, HotpotQA, Qasper,
MultiNews and GovReport by F1 (`qa_f1_score`: token F1, for the two summaries too, where
LongBench uses ROUGE-L) and TriviaQA by exact match (`exact_match_score`, where LongBench uses
F1). Both normalise answers the same way (`normalize_answer`).

The Chinese QA F1 and ROUGE-L segment words with `jieba` (not a dependency of this project: it
is needed for the multifieldqa_zh, dureader and vcsum tasks only; `pip install jieba`).
"""

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from rapidfuzz import fuzz

from dashkv_jax.errors import DashKVError

# LongBench keeps only the first line of these predictions: few-shot prompts invite the model to
# go on with the next example.
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_CHINESE_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～"
    "｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lowercase, drop ASCII and Chinese punctuation, drop all whitespace."""
    punctuation = set(string.punctuation + _CHINESE_PUNCTUATION)
    return "".join("".join(ch for ch in text.lower() if ch not in punctuation).split())


def token_f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists (0 when nothing overlaps)."""
    overlap = sum((Counter(prediction) & Counter(ground_truth)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction)
    recall = overlap / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """Token F1 after `normalize_answer`, the SQuAD-style English QA score."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 when prediction and ground truth are equal after `normalize_answer` (lowercased,
    ASCII punctuation and the articles a/an/the dropped, whitespace collapsed), else 0.0: the
    SQuAD-style exact match, on LongBench's normalisation. The paper's metric for TriviaQA."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def qa_f1_zh_score(prediction: str, ground_truth: str) -> float:
    """Token F1 over jieba words, each normalised by `normalize_zh_answer`, empties dropped."""

    def words(text: str) -> list[str]:
        return [w for w in map(normalize_zh_answer, _jieba_words(text)) if w]

    return token_f1(words(prediction), words(ground_truth))


def rouge_l_score(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F-measure as the `rouge` package (1.0.1) that LongBench calls computes it.

    That ROUGE-L is summary-level over sentences: both texts are cut into sentences at every
    '.', each sentence into words at spaces (after collapsing whitespace; no lowercasing). An
    LCS of every reference sentence with every predicted sentence is read back, and the
    *distinct* words of all of them are the hits; recall and precision divide the hits by the
    number of distinct words in the reference and in the prediction. This is not what
    `rouge-score`'s rougeL computes (lowercased alphanumeric tokens, one LCS over the whole
    text, word counts with repeats), so that library is not used. An empty prediction or
    reference scores 0 (the package raises, LongBench catches).
    """
    predicted, reference = _rouge_sentences(prediction), _rouge_sentences(ground_truth)
    if not predicted or not reference:
        return 0.0
    hits = set()
    for reference_words in reference:
        for predicted_words in predicted:
            hits.update(_lcs_words(reference_words, predicted_words))
    recall = len(hits) / len({w for words in reference for w in words})
    precision = len(hits) / len({w for words in predicted for w in words})
    return 2 * precision * recall / (precision + recall + 1e-8)


def rouge_zh_score(prediction: str, ground_truth: str) -> float:
    """`rouge_l_score` over the jieba words of both texts, joined by spaces."""
    return rouge_l_score(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(ground_truth)))


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str]) -> float:
    """1/k when the ground truth is among the k class names found in the prediction, else 0.

    Class names found inside the ground truth (but not equal to it) are not counted against it.
    LongBench drops them from the list while iterating over it, so the name right after a
    dropped one is never checked; kept here so scores match.
    """
    matches = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(matches):
        if matches[i] != ground_truth and matches[i] in ground_truth:
            del matches[i]  # The next name slides into slot i and the step below skips it.
        i += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def code_sim_score(prediction: str, ground_truth: str) -> float:
    """Edit similarity of the first predicted code line with the ground-truth line.

    The first line with no backtick, '#' or '//' (skipping markdown fences and comments) is
    compared by `rapidfuzz.fuzz.ratio` and rounded to a whole percent, as LongBench's
    `fuzzywuzzy.fuzz.ratio` returns it. That is the Indel similarity fuzzywuzzy computes with
    python-Levenshtein installed; without it fuzzywuzzy falls back to difflib's matching-blocks
    heuristic, which can score a little lower.
    """
    lines = prediction.lstrip("\n").split("\n")
    code = next((line for line in lines if not any(m in line for m in ("`", "#", "//"))), "")
    return round(fuzz.ratio(code, ground_truth)) / 100


def count_score(prediction: str, ground_truth: str) -> float:
    """Share of the numbers in the prediction that equal the ground-truth count."""
    return _share_equal(re.findall(r"\d+", prediction), str(ground_truth))


def retrieval_score(prediction: str, ground_truth: str) -> float:
    """Share of the numbers in the prediction that equal the N of the ground truth 'Paragraph N'."""
    return _share_equal(
        re.findall(r"\d+", prediction), _paragraph_id(ground_truth, r"Paragraph (\d+)")
    )


def retrieval_zh_score(prediction: str, ground_truth: str) -> float:
    """`retrieval_score` for the Chinese task, whose ground truth reads '段落N'."""
    return _share_equal(re.findall(r"\d+", prediction), _paragraph_id(ground_truth, r"段落(\d+)"))


TASK_METRICS: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_l_score,
    "qmsum": rouge_l_score,
    "multi_news": rouge_l_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_l_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

# The DASH-KV paper's LongBench tasks and metrics (its Table 1), in its order: F1 everywhere but
# TriviaQA, scored by exact match.
PAPER_TASK_METRICS: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score,
    "hotpotqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multi_news": qa_f1_score,
    "gov_report": qa_f1_score,
    "triviaqa": exact_match_score,
}
PROTOCOL_METRICS: dict[str, dict[str, Callable[..., float]]] = {
    "official": TASK_METRICS,
    "paper": PAPER_TASK_METRICS,
}
PROTOCOLS = tuple(PROTOCOL_METRICS)
# What a table header calls each metric.
METRIC_NAMES = {
    "qa_f1_score": "F1",
    "qa_f1_zh_score": "F1",
    "exact_match_score": "EM",
    "rouge_l_score": "ROUGE-L",
    "rouge_zh_score": "ROUGE-L",
    "classification_score": "accuracy",
    "retrieval_score": "accuracy",
    "retrieval_zh_score": "accuracy",
    "count_score": "accuracy",
    "code_sim_score": "edit sim",
}


def task_metric(task: str, protocol: str = "official") -> Callable[..., float]:
    """The metric `protocol` scores `task` by; a `DashKVError` if it does not score it."""
    if protocol not in PROTOCOL_METRICS:
        raise DashKVError(
            f"unknown LongBench protocol {protocol!r} (known: {', '.join(PROTOCOLS)})"
        )
    if task not in TASK_METRICS:
        raise DashKVError(f"unknown LongBench task {task!r} (known: {', '.join(TASK_METRICS)})")
    metrics = PROTOCOL_METRICS[protocol]
    if task not in metrics:
        raise DashKVError(
            f"the {protocol} protocol does not score {task!r} (its tasks: {', '.join(metrics)})"
        )
    return metrics[task]


def score_prediction(
    task: str,
    prediction: str,
    answers: Sequence[str],
    all_classes: Sequence[str] | None = None,
    protocol: str = "official",
) -> float:
    """A sample's score in [0, 1]: the task's metric under `protocol`, best over its
    ground-truth `answers`."""
    metric = task_metric(task, protocol)
    if task in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    if metric is classification_score:
        if not all_classes:
            raise DashKVError(f"{task} is a classification task; its samples need all_classes")
        return max((metric(prediction, truth, all_classes) for truth in answers), default=0.0)
    return max((metric(prediction, truth) for truth in answers), default=0.0)


def mean_score(scores: Sequence[float]) -> float:
    """A task's score as LongBench reports it: the mean of its sample scores x100, to 2 places."""
    if not scores:
        raise DashKVError("a task needs at least one scored sample")
    return round(100 * sum(scores) / len(scores), 2)


def _rouge_sentences(text: str) -> list[list[str]]:
    """The `rouge` package's split: sentences at '.', words at single spaces."""
    # A piece of only whitespace survives as one empty word, as in the package.
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _lcs_words(x: Sequence[str], y: Sequence[str]) -> list[str]:
    """The words of one longest common subsequence of x and y.

    Read back from the end with the `rouge` package's tie-break (step in x only when that keeps
    strictly more), which decides *which* LCS, and so which distinct words, ROUGE-L counts.
    """
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]  # [len(x) + 1, len(y) + 1]
    for i, xi in enumerate(x, 1):
        for j, yj in enumerate(y, 1):
            table[i][j] = (
                table[i - 1][j - 1] + 1 if xi == yj else max(table[i - 1][j], table[i][j - 1])
            )
    words, i, j = [], len(x), len(y)
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words[::-1]


def _share_equal(numbers: list[str], target: str) -> float:
    return numbers.count(target) / len(numbers) if numbers else 0.0


def _paragraph_id(ground_truth: str, pattern: str) -> str:
    match = re.search(pattern, ground_truth)
    if match is None:
        raise DashKVError(f"ground truth {ground_truth!r} names no paragraph ({pattern!r})")
    return match.group(1)


def _jieba_words(text: str) -> list[str]:
    try:
        import jieba
    except ImportError:
        raise DashKVError(
            "LongBench's Chinese metrics segment words with jieba, which is not installed: "
            "pip install jieba"
        ) from None
    return list(jieba.cut(text, cut_all=False))
