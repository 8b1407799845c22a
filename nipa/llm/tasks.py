"""Language-model evaluation: multiple-choice log-likelihood accuracy, perplexity, and lm-eval tasks.

`--dataset` of an LLM names one of:
- a JSONL file of multiple-choice questions in the PIQA schema (`goal`, `sol1`, `sol2`, `label` 0/1) or
  the ARC schema (`question` with `stem` and `choices` [{`text`, `label`}] as AI2 ships it, or `question`
  text with `choices` {`text`: [...], `label`: [...]} as the Hugging Face copy has it; `answerKey`);
- a plain-text file (.txt): perplexity over non-overlapping windows of `seq_len` tokens;
- `pydoc`: a built-in text every Python has offline, the reference topics of the standard library
  (`pydoc_data.topics.topics`, joined in sorted key order), as perplexity over its first `max_tokens`
  (default 32768) tokens in windows of 512;
- either text with other windows: `NAME@seq_len=N,max_tokens=M` (the scripts' --seq_len / --max_tokens
  write this form), so the window set is part of the dataset's name in records and result paths;
- lm-eval task names (`piqa,arc_easy`, or `--tasks`), or a task YAML of the user's own (its folder is
  lm-eval's include path), when the user has lm-eval installed.

Multiple choice follows lm-eval's convention, so numbers compare with the literature: the context is
"Question: {question}\\nAnswer:" and every choice " {text}" is scored by the sum of its tokens' log-probs;
`acc` takes the choice with the highest sum, `acc_norm` the highest sum per character of the choice text
(without the delimiter space), as lm-eval computes it.
Requests are sorted by length and batched with right padding; padded positions never enter a score.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nipa.errors import UserError


class TaskFileError(UserError):
    """A task file cannot be used: the message names the file, the line and the field."""


@dataclass(frozen=True)
class Question:
    """One multiple-choice item: the context, the choices (continuations) and the index of the answer."""

    context: str
    choices: tuple[str, ...]
    answer: int


def _field(path: Path, line: int, item: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in item:
        raise TaskFileError(f"{path}:{line}: field {key!r} is missing (fields present: {sorted(item)})")
    value = item[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise TaskFileError(f"{path}:{line}: field {key!r} = {value!r} should be {getattr(kind, '__name__', kind)}")
    return value


def _piqa(path: Path, line: int, item: dict) -> Question:
    goal = _field(path, line, item, "goal", str)
    solutions = (_field(path, line, item, "sol1", str), _field(path, line, item, "sol2", str))
    label = _field(path, line, item, "label", (int, str))
    if str(label) not in ("0", "1"):
        raise TaskFileError(f"{path}:{line}: field 'label' = {label!r} should be 0 or 1 (PIQA schema)")
    return Question(f"Question: {goal}\nAnswer:", tuple(f" {s}" for s in solutions), int(label))


def _arc(path: Path, line: int, item: dict) -> Question:
    question = _field(path, line, item, "question", (str, dict))
    if isinstance(question, dict):  # AI2's release: {"stem": ..., "choices": [{"text", "label"}, ...]}
        stem = _field(path, line, question, "stem", str)
        choices = _field(path, line, question, "choices", list)
        try:
            texts = [str(c["text"]) for c in choices]
            labels = [str(c["label"]) for c in choices]
        except (KeyError, TypeError):
            raise TaskFileError(f"{path}:{line}: field 'question.choices' must be a list of "
                                "{'text': ..., 'label': ...} objects") from None
    else:  # the Hugging Face copy: "question" text, "choices": {"text": [...], "label": [...]}
        stem = question
        choices = _field(path, line, item, "choices", dict)
        texts, labels = choices.get("text"), choices.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise TaskFileError(f"{path}:{line}: field 'choices' needs lists 'text' and 'label' of one length")
        texts, labels = [str(t) for t in texts], [str(x) for x in labels]
    answer = str(_field(path, line, item, "answerKey", (str, int)))
    if len(texts) < 2:
        raise TaskFileError(f"{path}:{line}: {len(texts)} choice(s); a question needs at least two")
    if answer not in labels:
        raise TaskFileError(f"{path}:{line}: field 'answerKey' = {answer!r} is not one of the choice "
                            f"labels {labels}")
    return Question(f"Question: {stem}\nAnswer:", tuple(f" {t}" for t in texts), labels.index(answer))


def read_multiple_choice(path: str | Path, limit: int | None = None) -> tuple[list[Question], str]:
    """The questions of a PIQA- or ARC-schema JSONL file (schema taken from the first item) and the
    schema's name. Every problem is an error naming the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: no such task file")
    questions: list[Question] = []
    schema = None
    with path.open(encoding="utf-8") as handle:
        for line_no, text in enumerate(handle, 1):
            if not text.strip():
                continue
            try:
                item = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TaskFileError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(item, dict):
                raise TaskFileError(f"{path}:{line_no}: each line must be a JSON object, found "
                                    f"{type(item).__name__}")
            if schema is None:
                schema = "piqa" if "goal" in item else "arc" if "question" in item else None
                if schema is None:
                    raise TaskFileError(f"{path}:{line_no}: neither the PIQA schema (goal, sol1, sol2, label) nor "
                                        f"the ARC schema (question, choices, answerKey); fields: {sorted(item)}")
            questions.append((_piqa if schema == "piqa" else _arc)(path, line_no, item))
            if limit is not None and len(questions) >= limit:
                break
    if not questions:
        raise TaskFileError(f"{path}: no questions in the file")
    return questions, schema


def choice_text(continuation: str) -> str:
    """A choice as the task file wrote it: the continuation without the one delimiter space before it."""
    return continuation[1:] if continuation.startswith(" ") else continuation


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of the context and of the continuation, split from the encoding of the whole text so
    that the tokens at the boundary are the ones the model sees (trailing spaces go with the
    continuation)."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    whole = tokenizer(stripped + continuation).input_ids
    context_ids = tokenizer(stripped).input_ids
    split = len(context_ids)
    if whole[:split] != context_ids:  # the boundary merged into one token: keep it with the continuation
        split = max(0, split - 1)
    return whole[:split], whole[split:]


def _batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Request indices, longest first (so padding is little and memory peaks at the start), in batches."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _pad(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


class MultipleChoiceTask:
    """Multiple-choice log-likelihood accuracy of a causal LM on a list of questions."""

    kind = "multiple_choice"

    def __init__(self, questions: Sequence[Question], tokenizer, batch_size: int = 16,
                 max_length: int = 2048, name: str = "mc") -> None:
        self.questions, self.tokenizer, self.name = list(questions), tokenizer, name
        self.batch_size, self.max_length = batch_size, max_length
        self.requests: list[tuple[int, int, list[int], list[int]]] = []  # (question, choice, context, cont)
        for q_index, question in enumerate(self.questions):
            for c_index, choice in enumerate(question.choices):
                context_ids, cont_ids = _encode_pair(tokenizer, question.context, choice)
                if not cont_ids:
                    raise TaskFileError(f"{name}: question {q_index + 1}, choice {c_index + 1} "
                                        f"({choice!r}) encodes to no tokens")
                whole = (context_ids + cont_ids)[-(max_length + 1):]
                # Cut to the window, a continuation longer than it is scored on its last tokens (as lm-eval).
                self.requests.append((q_index, c_index, whole, cont_ids[-(len(whole) - 1):]))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.questions)

    @torch.no_grad()
    def loglikelihoods(self, model: nn.Module, device: torch.device | str = "cpu", progress: bool = False,
                       desc: str = "eval") -> list[list[float]]:
        """Per question, per choice: the sum of the log-probabilities of the choice's tokens."""
        model.eval()
        scores = [[0.0] * len(q.choices) for q in self.questions]
        inputs = [r[2][:-1] for r in self.requests]  # the last token is only ever a target
        batches = list(_batches([len(x) for x in inputs], self.batch_size))
        for batch in tqdm(batches, desc=desc, leave=False, disable=not progress):
            ids, mask = _pad([inputs[i] for i in batch], self.pad_id, device)
            log_probs = F.log_softmax(_logits(model, ids, mask), dim=-1)
            # Every choice's (position, target) of the batch in one index tensor, padded with position 0
            # and weight 0: one copy to the device, one gather and one copy back per batch (not two
            # synchronizations per choice).
            conts = [self.requests[index][3] for index in batch]
            width = max(len(c) for c in conts)
            positions = torch.zeros((len(batch), width), dtype=torch.long)
            targets = torch.zeros((len(batch), width), dtype=torch.long)
            valid = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, index in enumerate(batch):
                whole, cont = self.requests[index][2], conts[row]
                n = len(cont)
                positions[row, :n] = torch.arange(len(whole) - 1 - n, len(whole) - 1)
                targets[row, :n] = torch.as_tensor(cont, dtype=torch.long)
                valid[row, :n] = True
            positions, targets, valid = (t.to(log_probs.device) for t in (positions, targets, valid))
            rows = torch.arange(len(batch), device=log_probs.device)[:, None]
            picked = log_probs[rows, positions, targets].double()
            sums = torch.where(valid, picked, torch.zeros_like(picked)).sum(dim=1).tolist()
            for row, index in enumerate(batch):
                q_index, c_index = self.requests[index][:2]
                scores[q_index][c_index] = sums[row]
        return scores

    def evaluate(self, model: nn.Module, device: torch.device | str = "cpu", progress: bool = False,
                 desc: str = "eval") -> dict[str, Any]:
        """acc and acc_norm (percent; `top1` is acc, so every script reads it as the accuracy) and the mean
        negative log-likelihood of the right answers."""
        scores = self.loglikelihoods(model, device, progress, desc)
        hits = hits_norm = 0
        nll = 0.0
        for question, choice_scores in zip(self.questions, scores, strict=True):
            lengths = [max(1, len(choice_text(c))) for c in question.choices]
            best = max(range(len(choice_scores)), key=lambda j: choice_scores[j])
            best_norm = max(range(len(choice_scores)), key=lambda j: choice_scores[j] / lengths[j])
            hits += best == question.answer
            hits_norm += best_norm == question.answer
            nll -= choice_scores[question.answer]
        n = len(self.questions)
        return {"top1": 100.0 * hits / n, "top5": None, "acc": 100.0 * hits / n,
                "acc_norm": 100.0 * hits_norm / n, "loss": nll / n, "samples": n}

    def calibration_inputs(self, batches: int) -> list[torch.Tensor]:
        """Token batches (contexts with their right answers) for ADC calibration: the first questions."""
        sequences = [r[2] for r in self.requests if r[1] == self.questions[r[0]].answer]
        out = []
        for start in range(0, min(len(sequences), batches * self.batch_size), self.batch_size):
            out.append(_pad(sequences[start:start + self.batch_size], self.pad_id, "cpu")[0])
        return out

    def describe(self) -> str:
        choices = sum(len(q.choices) for q in self.questions)
        chance = 100.0 * sum(1 / len(q.choices) for q in self.questions) / len(self.questions)
        return f"{len(self.questions)} questions, {choices} choices (chance {chance:.1f}%)"


class PerplexityTask:
    """Perplexity of a causal LM on a text file (or on `text` given, then `path` only names it in messages):
    non-overlapping windows of `seq_len` tokens among the first `max_tokens` tokens."""

    kind = "perplexity"

    def __init__(self, path: str | Path, tokenizer, seq_len: int = 512, batch_size: int = 8,
                 max_tokens: int | None = None, name: str = "text", text: str | None = None) -> None:
        path = Path(path)
        if text is None:
            if not path.is_file():
                raise TaskFileError(f"{path}: no such text file")
            text = path.read_text(encoding="utf-8")
        if seq_len < 2:
            raise TaskFileError(f"{path}: seq_len {seq_len}; a window needs at least two tokens")
        self.text_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        self.seq_len, self.max_tokens = seq_len, max_tokens
        ids = tokenizer(text).input_ids
        if max_tokens is not None:
            ids = ids[:max_tokens]
        if len(ids) < 2:
            raise TaskFileError(f"{path}: {len(ids)} token(s); perplexity needs at least two")
        self.windows = [ids[i:i + seq_len] for i in range(0, len(ids) - 1, seq_len)]
        self.windows = [w for w in self.windows if len(w) >= 2]
        self.tokenizer, self.batch_size, self.name = tokenizer, batch_size, name
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.windows)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device | str = "cpu", progress: bool = False,
                 desc: str = "eval") -> dict[str, Any]:
        model.eval()
        nll, count = 0.0, 0
        batches = list(_batches([len(w) for w in self.windows], self.batch_size))
        for batch in tqdm(batches, desc=desc, leave=False, disable=not progress):
            windows = [self.windows[i] for i in batch]
            ids, mask = _pad(windows, self.pad_id, device)
            log_probs = F.log_softmax(_logits(model, ids, mask)[:, :-1], dim=-1)
            token_lp = log_probs.gather(-1, ids[:, 1:, None])[..., 0]
            nll -= float((token_lp * mask[:, 1:]).double().sum())
            count += int(mask[:, 1:].sum())
        loss = nll / count
        # The text's hash goes into every record: the pydoc text differs a little between Python versions.
        return {"top1": None, "top5": None, "perplexity": math.exp(loss), "loss": loss,
                "samples": len(self.windows), "tokens": count, "text_sha256": self.text_sha256}

    def calibration_inputs(self, batches: int) -> list[torch.Tensor]:
        windows = self.windows[: batches * self.batch_size]
        return [_pad(windows[i:i + self.batch_size], self.pad_id, "cpu")[0]
                for i in range(0, len(windows), self.batch_size)]

    def describe(self) -> str:
        return (f"{len(self.windows)} windows of up to {self.seq_len} tokens, {sum(len(w) for w in self.windows)} "
                f"tokens (text sha256 {self.text_sha256[:12]})")


class LmEvalTask:
    """lm-eval (EleutherAI's harness) tasks on the in-memory model; needs `pip install lm-eval` and the
    task data in the user's datasets cache."""

    kind = "lm_eval"

    def __init__(self, tasks: Sequence[str], tokenizer, batch_size: int = 16, limit: int | None = None,
                 include_path: str | Path | None = None) -> None:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise TaskFileError(f"--dataset/--tasks {','.join(tasks)}: not a file, and lm-eval task names need "
                                "lm-eval: pip install lm-eval (or give a PIQA/ARC JSONL or a .txt file)") from None
        self.tasks, self.tokenizer, self.batch_size, self.limit = list(tasks), tokenizer, batch_size, limit
        self.include_path = None if include_path is None else str(include_path)
        self.name = "+".join(self.tasks)

    def evaluate(self, model: nn.Module, device: torch.device | str = "cpu", progress: bool = False,
                 desc: str = "eval") -> dict[str, Any]:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        model.eval()
        from lm_eval.tasks import TaskManager

        lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size, device=str(device))
        output = lm_eval.simple_evaluate(model=lm, tasks=self.tasks, limit=self.limit, bootstrap_iters=0,
                                         log_samples=False, task_manager=TaskManager(include_path=self.include_path))
        return lm_eval_metrics(output["results"], self.tasks, output.get("n-samples"))

    def calibration_inputs(self, batches: int) -> list[torch.Tensor]:
        raise TaskFileError("the calibrated ADC mode needs calibration inputs: with lm-eval tasks, use the "
                            "dynamic or full ADC mode, or evaluate a local JSONL/.txt task")

    def describe(self) -> str:
        return f"lm-eval tasks {', '.join(self.tasks)}" + (f" (limit {self.limit})" if self.limit else "")


def lm_eval_metrics(results: dict[str, dict[str, Any]], tasks: Sequence[str],
                    n_samples: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
    """nipa's metrics from lm-eval's results: acc and acc_norm in percent, averaged over the tasks
    (`top1` is acc), each task's own values kept; `samples` counts the documents (lm-eval's n-samples)
    when given, else the tasks."""
    per_task: dict[str, dict[str, float]] = {}
    for task in tasks:
        if task not in results:
            raise KeyError(f"lm-eval returned no results for task {task!r} (got {sorted(results)})")
        entry = results[task]
        values = {}
        for metric in ("acc", "acc_norm"):
            value = entry.get(f"{metric},none", entry.get(metric))
            if value is not None:
                values[metric] = 100.0 * float(value)
        if "acc" not in values:
            raise KeyError(f"lm-eval task {task!r} reports no acc (metrics: {sorted(entry)})")
        per_task[task] = values
    acc = sum(v["acc"] for v in per_task.values()) / len(per_task)
    norms = [v["acc_norm"] for v in per_task.values() if "acc_norm" in v]
    return {"top1": acc, "top5": None, "acc": acc, "acc_norm": sum(norms) / len(norms) if norms else None,
            "loss": None, "samples": documents if (documents := _documents(n_samples, tasks)) else len(per_task),
            "tasks": per_task}


def _documents(n_samples: dict[str, dict[str, int]] | None, tasks: Sequence[str]) -> int | None:
    if not n_samples or any(task not in n_samples for task in tasks):
        return None
    return sum(int(n_samples[t].get("effective", n_samples[t].get("original", 0))) for t in tasks)


PYDOC = "pydoc"  # the built-in text task
PYDOC_MAX_TOKENS = 32768
DEFAULT_SEQ_LEN = 512


def pydoc_text() -> str:
    """The reference topics of Python's standard library (what `help('assert')` shows), joined in sorted key
    order: a real English technical text that nobody here wrote and every Python installation has offline.
    It changes a little between Python versions; the task records its sha256."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@dataclass(frozen=True)
class TextSpec:
    """A perplexity task named on the command line: the text (`pydoc` or a .txt path) and its windows."""

    source: str
    seq_len: int | None = None  # None: DEFAULT_SEQ_LEN
    max_tokens: int | None = None  # None: PYDOC_MAX_TOKENS for pydoc, the whole file for a .txt

    def text_label(self) -> str:
        return self.source if self.source == PYDOC else str(Path(self.source).expanduser())

    def spec(self) -> str:
        """The --dataset form of this task (what records and result paths are named after)."""
        options = [f"{name}={value}" for name, value in (("seq_len", self.seq_len), ("max_tokens", self.max_tokens))
                   if value is not None]
        return self.source + ("@" + ",".join(options) if options else "")


_SPEC_OPTION = re.compile(r"^(seq_len|max_tokens)=([0-9]+)$")


def parse_text_spec(dataset: str) -> TextSpec | None:
    """`pydoc`, `file.txt`, or either with `@seq_len=N,max_tokens=M`; None for any other dataset (a JSONL,
    a task YAML, lm-eval names)."""
    source, _, options = dataset.partition("@")
    if source != PYDOC and Path(source).suffix.lower() != ".txt":
        return None
    values: dict[str, int] = {}
    for option in filter(None, options.split(",")) if options else ():
        found = _SPEC_OPTION.match(option.strip())
        if found is None:
            raise TaskFileError(f"--dataset {dataset!r}: {option!r} is not seq_len=N or max_tokens=N")
        values[found.group(1)] = int(found.group(2))
    if options and not values:
        raise TaskFileError(f"--dataset {dataset!r}: nothing after '@' (give seq_len=N and/or max_tokens=N)")
    if values.get("seq_len", 2) < 2 or values.get("max_tokens", 2) < 2:
        raise TaskFileError(f"--dataset {dataset!r}: seq_len and max_tokens must be at least 2 tokens")
    return TextSpec(source, values.get("seq_len"), values.get("max_tokens"))


def with_windows(dataset: str, seq_len: int | None, max_tokens: int | None) -> str:
    """The dataset name with --seq_len / --max_tokens folded into it (see parse_text_spec); a dataset that is
    not a text is refused, since the options would do nothing there."""
    if seq_len is None and max_tokens is None:
        return dataset
    spec = parse_text_spec(dataset)
    if spec is None:
        raise TaskFileError(f"--seq_len/--max_tokens: apply to a perplexity text (pydoc or a .txt file), not to "
                            f"--dataset {dataset!r}")
    for name, value in (("seq_len", seq_len), ("max_tokens", max_tokens)):
        if value is not None and value < 2:
            raise TaskFileError(f"--{name} {value}: must be at least 2 tokens")
    merged = TextSpec(spec.source, seq_len if seq_len is not None else spec.seq_len,
                      max_tokens if max_tokens is not None else spec.max_tokens)
    return merged.spec()


def dataset_id(dataset: str) -> str:
    """Short name of an LLM task for result paths and records: a file's stem, or the lm-eval task names; a
    text with its own windows adds them (pydoc-seq256-tok8192), so two window sets never share a file."""
    text = parse_text_spec(dataset)
    if text is not None:
        stem = PYDOC if text.source == PYDOC else Path(text.source).stem.lower()
        return stem + "".join(f"-{tag}{value}" for tag, value in (("seq", text.seq_len), ("tok", text.max_tokens))
                              if value is not None)
    path = Path(dataset)
    if path.suffix.lower() in (".jsonl", ".txt", ".json", ".yaml", ".yml") or "/" in dataset or path.is_file():
        return path.stem.lower()
    return "+".join(t.strip() for t in dataset.split(",") if t.strip()).lower()


def load_task(dataset: str, tokenizer, batch_size: int = 16, limit: int | None = None,
              max_length: int = 2048, seq_len: int = 512):
    """The task `--dataset` names (see the module docstring); bad files fail here, before any work."""
    text = parse_text_spec(dataset)
    if text is not None:
        seq_len = text.seq_len or seq_len
        max_tokens = text.max_tokens or (PYDOC_MAX_TOKENS if text.source == PYDOC else None)
        if limit is not None:  # --limit counts windows
            max_tokens = min(max_tokens or limit * seq_len, limit * seq_len)
        return PerplexityTask(text.text_label(), tokenizer, seq_len, batch_size, max_tokens, name=dataset_id(dataset),
                              text=pydoc_text() if text.source == PYDOC else None)
    path = Path(dataset).expanduser()
    if path.suffix.lower() in (".yaml", ".yml"):  # a user's own lm-eval task definition
        if not path.is_file():
            raise TaskFileError(f"{path}: no such lm-eval task file")
        found = re.search(r"^task:\s*([^\s#]+)", path.read_text(encoding="utf-8"), re.MULTILINE)
        if found is None:
            raise TaskFileError(f"{path}: no 'task:' field (an lm-eval task YAML names its task)")
        return LmEvalTask([found.group(1)], tokenizer, batch_size, limit, include_path=path.parent)
    if path.suffix.lower() == ".jsonl" or (path.is_file() and path.suffix.lower() != ".txt"):
        questions, _ = read_multiple_choice(path, limit)
        return MultipleChoiceTask(questions, tokenizer, batch_size, max_length, name=dataset_id(dataset))
    return LmEvalTask([t.strip() for t in dataset.split(",") if t.strip()], tokenizer, batch_size, limit)
