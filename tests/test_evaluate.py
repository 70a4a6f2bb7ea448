"""The evaluation CLI: bicubic, checkpoints, ONNX files and MLflow URIs."""

import json

import numpy as np
import pytest
import torch

from model import build_model
from model.export import export_onnx
from trainers.evaluate import main

from conftest import write_png


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("set")
    rng = np.random.default_rng(0)
    for i in range(2):
        hr = (rng.random((96, 80, 3)) * 80 + np.linspace(0, 170, 80)[None, :, None]).astype(np.uint8)
        write_png(root / "Small" / "HR" / f"img_{i}.png", hr)
    return root / "Small"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    net = build_model("tiny")
    torch.save({"model_config": net.cfg.__dict__, "model": net.state_dict()}, root / "tiny.pt")
    export_onnx(net, root / "tiny.onnx", (1, 3, 16, 16), n_checks=1, fp16=False)
    return root


def test_a_perfect_reconstruction_is_written_as_strict_json(tmp_path):
    """A flat image comes back exactly from bicubic: an infinite PSNR, which goes out as null."""
    from PIL import Image

    folder = tmp_path / "flat"
    folder.mkdir()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(folder / "flat.png")
    out = tmp_path / "r.json"
    assert main(["--model", "bicubic", "--data", str(folder), "--json", str(out)]) == 0

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    (flat,) = json.loads(out.read_text(), parse_constant=refuse)["sets"]
    assert flat["psnr_y"] is None and [v["psnr_y"] for v in flat["per_image"].values()] == [None]
    assert flat["ssim_y"] == pytest.approx(1.0)


def test_bicubic_on_set5(bench_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["--model", "bicubic", "--data", str(bench_dir / "Set5"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (set5,) = report["sets"]
    assert set5["name"] == "Set5" and set5["n_images"] == 5 and len(set5["per_image"]) == 5
    assert set5["psnr_y"] == pytest.approx(28.42, abs=0.02)
    assert "Set5" in capsys.readouterr().out


def test_checkpoint_and_onnx_agree(small_set, tiny_files, tmp_path):
    results = {}
    for name in ("tiny.pt", "tiny.onnx"):
        out = tmp_path / f"{name}.json"
        assert main(["--model", str(tiny_files / name), "--data", str(small_set), "--json", str(out)]) == 0
        results[name] = json.loads(out.read_text())["sets"][0]
    pt, ox = results["tiny.pt"], results["tiny.onnx"]
    assert np.isfinite(pt["psnr_y"]) and np.isfinite(ox["psnr_y"])
    # ONNX runs 16x16 tiles, the checkpoint the whole image: close, not equal (the scan's context)
    assert abs(pt["psnr_y"] - ox["psnr_y"]) < 0.5, (pt["psnr_y"], ox["psnr_y"])


def test_mlflow_runs_uri(small_set, tiny_files, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("eval-test")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tiny_files / "tiny.onnx"), "model")
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "--model",
                f"runs:/{run.info.run_id}/model",
                "--data",
                str(small_set),
                "--tracking-uri",
                uri,
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert np.isfinite(json.loads(out.read_text())["sets"][0]["psnr_y"])


def test_bad_model_is_a_clear_error(small_set, tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing.onnx"), "--data", str(small_set)]) == 1
    assert "not found" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_text("junk")
    assert main(["--model", str(tmp_path / "junk.pt"), "--data", str(small_set)]) == 1
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert main(["--model", "bicubic", "--data", str(tmp_path / "nothing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_a_model_that_is_not_x2_x3_or_x4_is_refused(small_set, tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16, 16])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "x1.onnx")
    assert main(["--model", str(tmp_path / "x1.onnx"), "--data", str(small_set)]) == 1
    err = capsys.readouterr().err
    assert "not a x2, x3 or x4" in err and "Traceback" not in err


def test_scale_must_match_the_data_and_hr_only_is_announced(small_set, tmp_path, capsys, caplog):
    paired = tmp_path / "Paired"
    rng = np.random.default_rng(1)
    write_png(paired / "HR" / "a.png", (rng.random((32, 32, 3)) * 255).astype(np.uint8))
    write_png(paired / "LR_bicubic" / "X4" / "ax4.png", (rng.random((8, 8, 3)) * 255).astype(np.uint8))
    assert main(["--model", "bicubic", "--scale", "2", "--data", str(paired)]) == 1
    assert "LR images for X4 but not X2" in capsys.readouterr().err
    with caplog.at_level("WARNING"):
        assert main(["--model", "bicubic", "--data", str(small_set)]) == 0
    assert any("no LR images" in r.getMessage() for r in caplog.records)


def test_the_means_count_every_image_when_two_share_a_name():
    """Folders with one file name twice (a.png and a.jpg; 0001.png of two sets in a validation
    list): each image counts once in the means, none replaces another."""
    from trainers.data import ImagePair
    from trainers.evaluate import bicubic_upscaler, evaluate_set
    from trainers.metrics import psnr

    rng = np.random.default_rng(0)
    smooth = np.repeat(np.repeat(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), 4, 0), 4, 1)
    noisy = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pairs = [ImagePair("a", hr, hr[::4, ::4].copy()) for hr in (smooth, noisy)]
    result = evaluate_set(bicubic_upscaler(4), pairs, 4, "twice")
    each = [psnr(bicubic_upscaler(4)(p.lr), p.hr, 4) for p in pairs]
    assert each[0] != each[1]
    assert result.n_images == 2 and result.psnr_y == pytest.approx(np.mean(each), abs=1e-12)
