"""nipa.paths: the default paths every script reads and writes, built from a workload's ids."""

from __future__ import annotations

from pathlib import Path

from nipa import paths
from nipa.workloads import zoo
from nipa.workloads.workload import Workload


def test_default_layout_of_a_registry_cnn():
    workload = Workload.registry_cnn("SmallCNN", "mnist5k")
    assert workload.results_path("accsim") == Path("results/smallcnn/mnist5k_accsim.jsonl")
    assert workload.statistics_path() == Path("results/stats/smallcnn_mnist5k.json")
    assert workload.checkpoint() == Path("ckpts/smallcnn_mnist5k.pt")
    # the zoo's helpers give the same paths (one builder behind both)
    assert zoo.results_path("SmallCNN", "mnist5k", "wrap") == workload.results_path("wrap")
    assert zoo.statistics_path("SmallCNN", "mnist5k") == workload.statistics_path()


def test_file_stems_of_validate_wrap_and_explore():
    assert paths.validation_stem("out", "digits") == Path("out/digits_nipa")
    assert paths.validation_stem("out", "digits", "_layer_sum", "loss") == Path("out/digits_nipa_layer_sum_loss")
    assert paths.summary_stem("r/x/digits_wrap.jsonl") == Path("r/x/digits_wrap")
    assert paths.summary_stem("r/x/digits_wrap.jsonl", "published") == Path("r/x/digits_wrap_published")
    assert paths.explore_stem("o", "digits") == Path("o/digits_explore")
