"""pretrain.py and the checkpoint loader: training lowers the loss, saves, reloads to the same
predictions, resumes, skips an existing checkpoint; bad names and missing files give clear errors."""

from __future__ import annotations

import os

import pytest
import torch

import pretrain
from nipa.errors import UserError
from nipa.pipelines.train import Recipe, fit, restore_rng_states, rng_states
from nipa.runtime import resolve_device
from nipa.workloads.datasets import get_dataset, make_loader
from nipa.workloads.zoo import build_model, checkpoint_path, load_model_and_data, load_trained_model


def test_short_training_lowers_loss_and_reloads_to_same_predictions(tmp_path):
    torch.manual_seed(0)
    model = build_model("smallcnn", "digits")
    train = make_loader(get_dataset("digits", "train"), batch_size=64, shuffle=True, seed=0)
    test = make_loader(get_dataset("digits", "test"), batch_size=128, shuffle=False, seed=0)
    result = fit(model, train, test, Recipe(epochs=4, batch_size=64, lr=0.05, step_size=10),
                 torch.device("cpu"), log=lambda line: None)
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < 0.5 * losses[0]
    assert result["history"][-1]["top1"] > 80.0


def test_pretrain_saves_checkpoint_with_metadata_and_reloads(digits_ckpt_dir):
    path = checkpoint_path("smallcnn", "digits", digits_ckpt_dir)
    model, meta = load_trained_model("smallcnn", "digits", digits_ckpt_dir)
    for key in ("model", "dataset", "num_classes", "input_shape", "test_top1", "epochs", "seed"):
        assert key in meta, key
    assert meta["num_classes"] == 10 and meta["input_shape"] == [1, 8, 8] and meta["epochs"] == 3
    x = torch.stack([get_dataset("digits", "test")[i][0] for i in range(32)])
    again, _ = load_trained_model("smallcnn", "digits", ckpt=path)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert not path.with_suffix(".resume.pt").exists()


def test_existing_checkpoint_is_not_retrained(digits_ckpt_dir, capsys):
    path = checkpoint_path("smallcnn", "digits", digits_ckpt_dir)
    before = path.stat().st_mtime_ns
    assert pretrain.main(["--dataset", "digits", "--epochs", "3", "--ckpt_dir", str(digits_ckpt_dir),
                          "--device", "cpu"]) == 0
    assert path.stat().st_mtime_ns == before
    assert "skipping training" in capsys.readouterr().out


def test_same_seed_same_weights(tmp_path):
    runs = []
    for name in ("a", "b"):
        assert pretrain.main(["--dataset", "digits", "--epochs", "1", "--ckpt_dir", str(tmp_path / name),
                              "--device", "cpu", "--seed", "3"]) == 0
        runs.append(torch.load(checkpoint_path("smallcnn", "digits", tmp_path / name))["state_dict"])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_interrupted_training_resumes(tmp_path, monkeypatch, device):
    """A run killed after epoch 1 continues at epoch 2 and ends where an uninterrupted run ends (on a
    GPU too: the resume file's random states are loaded to the CPU, where torch.set_rng_state wants them).
    Deterministic kernels, so that the GPU's two runs can agree."""
    import nipa.pipelines.train as train_module

    args = ["--dataset", "digits", "--epochs", "2", "--device", device.type, "--seed", "1", "--deterministic"]
    assert pretrain.main(args + ["--ckpt_dir", str(tmp_path / "full")]) == 0
    full = torch.load(checkpoint_path("smallcnn", "digits", tmp_path / "full"))["state_dict"]

    real_evaluate = train_module.evaluate
    calls = {"n": 0}

    def dying_evaluate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # during epoch 2, after epoch 1 was saved
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(train_module, "evaluate", dying_evaluate)
    assert pretrain.main(args + ["--ckpt_dir", str(tmp_path / "cut")]) == 130  # Ctrl-C, no traceback
    monkeypatch.setattr(train_module, "evaluate", real_evaluate)
    resume = checkpoint_path("smallcnn", "digits", tmp_path / "cut").with_suffix(".resume.pt")
    assert resume.is_file()
    assert pretrain.main(args + ["--ckpt_dir", str(tmp_path / "cut")]) == 0
    resumed = torch.load(checkpoint_path("smallcnn", "digits", tmp_path / "cut"))["state_dict"]
    assert all(torch.allclose(full[k].float(), resumed[k].float(), atol=1e-6) for k in full)


@pytest.fixture(autouse=True)
def _nondeterministic_again():
    """--deterministic changes process-wide state: every test starts and ends without it."""
    yield
    torch.use_deterministic_algorithms(False)


def test_random_states_survive_a_resume_file_loaded_to_the_device(tmp_path, device):
    """The states saved after an epoch, read back with the model's map_location (as resume files were),
    restore both the CPU's and the training GPU's streams."""
    torch.manual_seed(5)
    torch.save(rng_states(device), tmp_path / "states.pt")
    expected_cpu = torch.rand(4)
    expected_dev = torch.rand(4, device=device)
    state = torch.load(tmp_path / "states.pt", map_location=device, weights_only=False)
    assert ("cuda_rng" in state) == (device.type == "cuda")
    torch.rand(7), torch.rand(3, device=device)  # move both streams on
    restore_rng_states(state, device)
    assert torch.equal(torch.rand(4), expected_cpu)
    assert torch.equal(torch.rand(4, device=device), expected_dev)


def test_deterministic_flag_turns_on_deterministic_kernels_and_is_recorded(tmp_path):
    assert pretrain.main(["--dataset", "digits", "--epochs", "1", "--ckpt_dir", str(tmp_path), "--device", "cpu",
                          "--deterministic"]) == 0
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    meta = torch.load(checkpoint_path("smallcnn", "digits", tmp_path))
    assert meta["deterministic"] is True and meta["device"] == "cpu"


def test_missing_checkpoint_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python pretrain.py --model_name resnet18 --dataset digits"):
        load_model_and_data("resnet18", "digits", ckpt_dir=tmp_path)


def test_bad_model_name_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="valid names: .*resnet18"):
        pretrain.main(["--model_name", "resnet99", "--dataset", "digits", "--ckpt_dir", str(tmp_path)])


def test_missing_cifar_says_where_files_must_be(tmp_path, capsys):
    assert pretrain.main(["--dataset", "cifar10", "--data_root", str(tmp_path), "--ckpt_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pretrain.py: error: CIFAR-10 not found") and str(tmp_path) in err


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="expected auto, cpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(UserError, match="--gpu_id 3: no GPU"):  # not silently the CPU
            resolve_device("auto", 3)
