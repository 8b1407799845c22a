"""Every default path of the project, built in one place from a workload's ids.

A script's --out, --records, --stats, --ckpt and --out_dir override these; without them every script
reads and writes where the others expect:

    ckpts/{model}_{dataset}.pt                       checkpoint (pretrain.py writes, the others read)
    results/{model}/{dataset}_{kind}.jsonl           records: kind accsim (main.py), wrap (wrap_error.py),
                                                     finetune (finetune.py), explore_accsim, ...
    results/stats/{model}_{dataset}.json             bit statistics (stat.py)
    results/{model}/{dataset}_nipa{variant}_*        validate.py's points CSV, summary JSON and plot
    results/{model}/{dataset}_explore*               explore.py's table, plots, summary

`model` and `dataset` are the ids of nipa.workloads.workload.Workload
(nipa.workloads.zoo.model_id / dataset_id): a CNN's
lower-case name, an LLM's folder or file name, a user model's file stem and class, a user dataset's stem.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = "ckpts"
RESULTS_DIR = Path("results")


def checkpoint_path(model_id: str, dataset_id: str, ckpt_dir: str | Path = CHECKPOINT_DIR) -> Path:
    """ckpts/{model}_{dataset}.pt (the model id lower-cased, as pretrain.py has always named it)."""
    return Path(ckpt_dir) / f"{model_id.lower()}_{dataset_id}.pt"


def model_dir(model_id: str) -> Path:
    """results/{model}/: every result of one model."""
    return RESULTS_DIR / model_id


def records_name(dataset_id: str, kind: str) -> str:
    """{dataset}_{kind}.jsonl: the name of a records file in its model's folder."""
    return f"{dataset_id}_{kind}.jsonl"


def results_path(model_id: str, dataset_id: str, kind: str) -> Path:
    """results/{model}/{dataset}_{kind}.jsonl: the records of main.py (accsim), wrap_error.py (wrap), ..."""
    return model_dir(model_id) / records_name(dataset_id, kind)


def statistics_path(model_id: str, dataset_id: str) -> Path:
    """Where stat.py writes, and validate.py and wrap_error.py read, a model's bit statistics."""
    return RESULTS_DIR / "stats" / f"{model_id}_{dataset_id}.json"


def validation_stem(out_dir: str | Path, dataset_id: str, variant: str = "", measure: str | None = None) -> Path:
    """The common start of validate.py's files: {out_dir}/{dataset}_nipa{variant}[_{measure}]; a metric
    variant and a lower-is-better measure name their files, so they never overwrite the published form."""
    return Path(out_dir) / f"{dataset_id}_nipa{variant}{'_' + measure if measure else ''}"


def summary_stem(records: str | Path, slug: str = "") -> Path:
    """{records stem}[_{slug}] beside a records file: wrap_error.py's summary JSON and plot start so."""
    records = Path(records)
    return records.with_name(records.stem + (f"_{slug}" if slug else ""))


def explore_stem(out_dir: str | Path, dataset_id: str) -> Path:
    """{out_dir}/{dataset}_explore: explore.py's CSV, plots, summary and verification records start so."""
    return Path(out_dir) / f"{dataset_id}_explore"
