"""Every entry script's bad inputs, run through `main(argv)`: exit code 2, a message that names the
option or file and says what to do, no traceback, and no file changed (every file under the test's
folder is hashed before and after)."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import torch

import finetune
import main
import pretrain
import validate
import wrap_error

ROOT = Path(__file__).resolve().parents[1]

SPACE = """
[Algorithm_Level]
wl_weight = 4
wl_input = 6
[Hardware_Level]
subArray = 64
ADCprecision = 5
[Device_Level]
cellBit = 1
vari = 0.0, 0.1
"""


def stat_script():
    """stat.py (its name shadows the standard library's `stat`, so it is loaded from its path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nipa_stat_script", ROOT / "stat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def work(tmp_path, digits_ckpt_dir):
    """A folder with the checkpoint (copied), a tiny INI and a results file of a finished sweep."""
    ckpt_dir = tmp_path / "ckpts"
    ckpt_dir.mkdir()
    (ckpt_dir / "smallcnn_digits.pt").write_bytes((digits_ckpt_dir / "smallcnn_digits.pt").read_bytes())
    (tmp_path / "space.ini").write_text(SPACE)
    return tmp_path


def main_args(work: Path, *extra: str) -> list[str]:
    return ["--dataset", "digits", "--ckpt_dir", str(work / "ckpts"), "--HWdes", str(work / "space.ini"),
            "--sample_num", "0", "--cycle", "1", "--limit", "32", "--batch_size", "32", "--device", "cpu",
            "--out", str(work / "r.jsonl"), *extra]


@pytest.fixture()
def records(work):
    """work/r.jsonl: the records of main_args(work)."""
    assert main.main(main_args(work)) == 0
    return work / "r.jsonl"


def refused(capsys, work: Path, run, argv: list[str], *needles: str) -> str:
    """Run `run(argv)`: exit code 2, every needle in the message, no traceback, no file changed."""
    before = snapshot(work)
    capsys.readouterr()
    assert run(argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "Traceback" not in err
    assert snapshot(work) == before
    return err


# ---- main.py ----------------------------------------------------------------------------------------


def test_main_refuses_to_append_to_a_checkpoint(work, capsys):
    target = work / "c.pt"
    target.write_bytes((work / "ckpts" / "smallcnn_digits.pt").read_bytes())
    argv = main_args(work)[:-1] + [str(target)]
    refused(capsys, work, main.main, argv, "main.py: error:", "c.pt", "not a results file")
    torch.load(target, weights_only=True)  # still a checkpoint


@pytest.mark.parametrize("content, needle", [
    ("a,b,c\n1,2,3\n", "r.jsonl:1: not a JSON record"),  # a CSV
    ('{"method": "ideal"}\n[1, 2]\n', "r.jsonl:2: a JSON list, not a record"),
    ("hello", "r.jsonl:1: not a JSON record"),  # one line of text without a newline: not a torn record
])
def test_main_refuses_results_files_that_are_not_records(work, capsys, content, needle):
    (work / "r.jsonl").write_text(content)
    refused(capsys, work, main.main, main_args(work), needle, "--out")


def test_main_refuses_a_garbage_last_line_that_ends_in_a_newline(records, work, capsys):
    with open(records, "a") as handle:
        handle.write("garbage\n")
    refused(capsys, work, main.main, main_args(work), f"{records.name}:", "not a JSON record")


def test_main_refuses_a_directory_as_out(work, capsys):
    (work / "dir").mkdir()
    refused(capsys, work, main.main, main_args(work)[:-1] + [str(work / "dir")], "is a directory")


@pytest.mark.parametrize("extra, needle", [
    (["--sample_num", "-1"], "--sample_num -1"),
    (["--batch_size", "0"], "--batch_size 0"),
    (["--batch_size", "-1"], "--batch_size -1"),
    (["--limit", "0"], "--limit 0"),
    (["--memory_mb", "0"], "--memory_mb 0"),
    (["--memory_mb", "-5"], "--memory_mb -5"),
    (["--calib_batches", "-1"], "--calib_batches -1"),
    (["--adc_mode", "calibrated", "--calib_batches", "0"], "--calib_batches 0: the calibrated ADC mode"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--exclude_layer", "*"], "leave no layer mapped"),
    (["--exclude_layer", "nope"], "'nope' matches no mappable layer"),
    (["--ckpt", "missing.pt"], "--ckpt missing.pt: no such file"),
])
def test_main_bad_options(work, capsys, extra, needle):
    err = refused(capsys, work, main.main, main_args(work, *extra), needle)
    assert "pretrain.py" not in err  # an explicit --ckpt is no reason to suggest training the default


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_main_gpu_id_without_a_gpu_is_no_silent_cpu_run(work, capsys):
    argv = [a if a != "cpu" else "auto" for a in main_args(work, "--gpu_id", "3")]
    refused(capsys, work, main.main, argv, "--gpu_id 3: no GPU")
    refused(capsys, work, main.main, main_args(work, "--gpu_id", "3"), "--gpu_id 3 with --device cpu")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04 truncated zip"])
def test_main_garbage_checkpoint_names_the_file(work, capsys, content):
    bad = work / "bad.pt"
    bad.write_bytes(content)
    refused(capsys, work, main.main, main_args(work, "--ckpt", str(bad)), "checkpoint", "bad.pt")


@pytest.mark.parametrize("text, needle", [
    (b"", "no hardware parameter in the file"),
    (b"# comments only\n", "no hardware parameter in the file"),
    ("[Algorithm_Level]\n# caf\xe9\nwl_weight = 4\n".encode("latin-1"), "not UTF-8 text"),
    (b"[Algorithm_Level]\nwl_weight = %(x)s\n", "wl_weight = '%(x)s': must be an integer"),
    (b"[Algorithm_Level]\nwl_weight = 4\nwl_weight = 6\n", "not a valid INI file"),
    (b"[Hardware_Level]\nADCprecision = 0\n", "ADCprecision = 0"),
])
def test_main_bad_ini(work, capsys, text, needle):
    (work / "space.ini").write_bytes(text)
    refused(capsys, work, main.main, main_args(work), "space.ini", needle)


def test_debug_shows_the_traceback(work):
    (work / "space.ini").write_bytes(b"")
    with pytest.raises(ValueError, match="no hardware parameter"):
        main.main(main_args(work, "--debug"))


# ---- stat.py ----------------------------------------------------------------------------------------


def stat_args(work: Path, *extra: str) -> list[str]:
    return ["--dataset", "digits", "--ckpt_dir", str(work / "ckpts"), "--wl_weight", "4", "--subArray", "64",
            "--cellbit", "1", "--out", str(work / "stats.json"), *extra]


def test_stat_refuses_to_replace_a_file_that_is_not_statistics(work, capsys):
    (work / "stats.json").write_text("my notes\n")
    refused(capsys, work, stat_script().main, stat_args(work), "stat.py: error:", "stats.json",
            "not a valid nipa statistics file", "--overwrite")


@pytest.mark.parametrize("extra, needle", [
    (["--exclude_layer", "*"], "leave no layer mapped"),
    (["--ckpt", "missing.pt"], "--ckpt missing.pt: no such file"),
])
def test_stat_bad_options(work, capsys, extra, needle):
    refused(capsys, work, stat_script().main, stat_args(work, *extra), needle)


# ---- validate.py ------------------------------------------------------------------------------------


def other_weights(work: Path) -> Path:
    """A checkpoint of the same model with other weights."""
    payload = torch.load(work / "ckpts" / "smallcnn_digits.pt", weights_only=True)
    payload["state_dict"] = {k: v * 1.01 if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    path = work / "other.pt"
    torch.save(payload, path)
    return path


def test_validate_refuses_statistics_of_other_weights(records, work, capsys):
    other = other_weights(work)
    assert stat_script().main(stat_args(work, "--ckpt", str(other))) == 0
    argv = ["--dataset", "digits", "--records", str(records), "--stats", str(work / "stats.json"),
            "--out_dir", str(work / "out"), "--bootstrap", "0", "--no_plot"]
    refused(capsys, work, validate.main, argv, "validate.py: error:", "statistics of other weights")


def test_validate_has_no_device_option_and_says_so(work, capsys):
    # once read as an abbreviation of --device_model ("invalid choice: 'cuda'")
    err = refused(capsys, work, validate.main, ["--dataset", "digits", "--device", "cuda"],
                  "unrecognized arguments: --device cuda")
    assert "invalid choice" not in err


# ---- wrap_error.py ----------------------------------------------------------------------------------


def wrap_args(work: Path, truth: Path, *extra: str) -> list[str]:
    return ["--dataset", "digits", "--ckpt_dir", str(work / "ckpts"), "--ground_truth", str(truth), "--cycle", "1",
            "--time_points", "0", "--device", "cpu", "--out", str(work / "wrap.jsonl"), *extra]


def test_wrap_error_empty_records_file_is_not_called_missing(work, capsys):
    (work / "empty.jsonl").write_text("")
    err = refused(capsys, work, wrap_error.main, wrap_args(work, work / "empty.jsonl"), "wrap_error.py: error:",
                  "holds no record")
    assert "does not exist" not in err


def test_wrap_error_refuses_a_checkpoint_other_than_the_ground_truths(records, work, capsys):
    other = other_weights(work)
    refused(capsys, work, wrap_error.main, wrap_args(work, records, "--ckpt", str(other)),
            "simulated with other weights")


def test_wrap_error_refuses_statistics_of_other_weights(records, work, capsys):
    assert stat_script().main(stat_args(work, "--ckpt", str(other_weights(work)))) == 0
    refused(capsys, work, wrap_error.main,
            wrap_args(work, records, "--method", "published", "--stats", str(work / "stats.json")),
            "statistics of other weights")


def test_wrap_error_bad_options(work, capsys):
    refused(capsys, work, wrap_error.main, wrap_args(work, work / "r.jsonl", "--memory_mb", "0"), "--memory_mb 0")


# ---- finetune.py ------------------------------------------------------------------------------------


def finetune_args(work: Path, *extra: str) -> list[str]:
    return ["--dataset", "digits", "--ckpt_dir", str(work / "ckpts"), "--device", "cpu", "--limit", "32",
            "--chips", "1", "--methods", "none", "--out", str(work / "ft.jsonl"), *extra]


def test_finetune_cellbit_zero_speaks_of_cellbit(work, capsys):
    err = refused(capsys, work, finetune.main, finetune_args(work, "--cellbit", "0"), "--cellbit 0")
    assert "wl_weight" not in err


def test_finetune_refuses_an_out_that_is_not_records(work, capsys):
    (work / "ft.jsonl").write_text("a,b\n")
    refused(capsys, work, finetune.main, finetune_args(work), "finetune.py: error:", "ft.jsonl:1")


# ---- pretrain.py ------------------------------------------------------------------------------------


def pretrain_args(work: Path, *extra: str) -> list[str]:
    return ["--dataset", "digits", "--ckpt_dir", str(work / "new"), "--device", "cpu", *extra]


@pytest.mark.parametrize("extra, needle", [
    (["--epochs", "0"], "--epochs 0"),
    (["--batch_size", "0"], "--batch_size 0"),
    (["--lr", "0"], "--lr 0.0"),
])
def test_pretrain_bad_recipe(work, capsys, extra, needle):
    refused(capsys, work, pretrain.main, pretrain_args(work, *extra), "pretrain.py: error:", needle)


def test_pretrain_refuses_to_resume_with_another_seed(work, capsys):
    (work / "new").mkdir()
    resume = work / "new" / "smallcnn_digits.resume.pt"
    recipe = pretrain.default_recipe("digits")
    import dataclasses

    recipe = dataclasses.replace(recipe, epochs=2)
    torch.save({"recipe": recipe.to_dict(), "seed": 0, "epoch": 1}, resume)
    refused(capsys, work, pretrain.main, pretrain_args(work, "--epochs", "2", "--seed", "1"),
            "--seed 0, not 1", "resume it with --seed 0")


def test_pretrain_corrupt_cifar_pickle_names_the_file(work, capsys):
    root = work / "data" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(pickle.dumps({b"data": [], b"labels": []})[:-3])  # cut short
    refused(capsys, work, pretrain.main, ["--dataset", "cifar10", "--data_root", str(work / "data"),
                                          "--ckpt_dir", str(work / "new"), "--device", "cpu"],
            "data_batch_1", "not a readable CIFAR batch")
