"""The convolutional reference nets (model/conv.py): shapes, counts, checkpoints, export, training."""

import dataclasses
import json

import onnx
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import build_model, count_flops, count_params
from model.conv import CONV_PRESETS, ConvConfig, ConvSR
from model.export import export_onnx, op_census
from model.mambalitesr import load_model
from trainers import train as train_module


def fsrcnn_params(d: int, s: int, m: int, r: int = 4) -> int:
    """The FSRCNN count from its layer list, written out (PReLU: one slope per channel)."""
    conv = lambda cin, cout, k: cin * cout * k * k + cout  # noqa: E731
    return conv(3, d, 5) + d + conv(d, s, 1) + s + m * (conv(s, s, 3) + s) + conv(s, d, 1) + d + conv(d, 3, 9)


@pytest.mark.parametrize("name", sorted(CONV_PRESETS))
def test_presets_upscale_by_their_scale_and_every_parameter_learns(name):
    net = build_model(name)
    assert isinstance(net, ConvSR) and net.cfg == CONV_PRESETS[name]
    x = torch.rand(2, 3, 9, 13)
    y = net(x)
    assert y.shape == (2, 3, 36, 52) and torch.isfinite(y).all()
    y.abs().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    for scale in (2, 3):
        assert build_model(name, scale=scale)(x).shape == (2, 3, 9 * scale, 13 * scale)


def test_parameter_counts_are_the_documented_ones():
    assert count_params(build_model("fsrcnn")) == fsrcnn_params(56, 12, 4) == 24_683
    c = CONV_PRESETS["fsrcnn-student"]
    assert count_params(build_model(c)) == fsrcnn_params(c.width, c.shrink, c.depth) == 137_763
    # ESPCN: 5x5 to 64, 3x3 to 32, 3x3 to 3 * 16, with biases
    assert count_params(build_model("espcn")) == (75 * 64 + 64) + (576 * 32 + 32) + (288 * 48 + 48) == 37_200
    # the student-sized one is within 3% of the `student` Mamba preset
    assert abs(137_763 / count_params(build_model("student")) - 1) < 0.03


@pytest.mark.parametrize(
    "cfg", [CONV_PRESETS["fsrcnn"], CONV_PRESETS["espcn"], ConvConfig("fsrcnn", 8, 4, 2, 3)]
)
def test_flops_match_torch_flop_counter(cfg):
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        build_model(cfg)(torch.rand(2, 3, 6, 10))
    flops = count_flops(cfg, 6, 10, batch=2)
    assert flops.scan == 0 and flops.total == counter.get_total_flops()


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"arch": "vdsr"}, "arch"),
        ({"width": 0}, "width"),
        ({"depth": 2, "arch": "espcn"}, "depth"),
        ({"scale": 5}, "scale"),
    ],
)
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=f"ConvConfig.{field}"):
        ConvConfig(**{**dataclasses.asdict(CONV_PRESETS["fsrcnn"]), **changes})


def test_a_checkpoint_loads_back_as_the_same_conv_net(tmp_path):
    torch.manual_seed(0)
    net = build_model("espcn")
    path = tmp_path / "espcn.pt"
    torch.save({"model_config": dataclasses.asdict(net.cfg), "model": net.state_dict()}, path)
    again = load_model(str(path))
    assert isinstance(again, ConvSR) and again.cfg == net.cfg
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x))
    torch.save({"model_config": {**dataclasses.asdict(net.cfg), "rank": 2}, "model": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="rank"):
        load_model(str(tmp_path / "bad.pt"))


@pytest.mark.parametrize("name", ["fsrcnn", "espcn"])
def test_export_checks_a_conv_net_as_it_checks_a_student(tmp_path, name):
    torch.manual_seed(0)
    net = build_model(name)
    out = tmp_path / f"{name}.onnx"
    report = export_onnx(net, out, input_shape=(1, 3, 16, 16), seed=1)
    assert report.fp32_max_abs_err <= 1e-4 and report.fp16_max_abs_err < 1e-2
    assert report.params == count_params(net) and report.gflops == count_flops(net.cfg, 16, 16).gflops
    census = op_census(onnx.load(str(out)))
    assert census["Conv"] == {"fsrcnn": 7, "espcn": 3}[name]  # fsrcnn: 5x5, shrink, 4 mapping, expand
    assert ("ConvTranspose" in census) == (name == "fsrcnn") and ("DepthToSpace" in census) == (
        name == "espcn"
    )


def test_trainers_train_a_conv_reference_from_scratch_and_refuse_what_it_cannot_take(tmp_path, capsys):
    out = tmp_path / "fsrcnn"
    argv = [
        "--preset",
        "fsrcnn",
        "--alpha",
        "0",
        "--iterations",
        "4",
        "--val-every",
        "2",
        "--batch-size",
        "2",
    ]
    argv += [
        "--patch-size",
        "12",
        "--val-max-images",
        "1",
        "--out-dir",
        str(out),
        "--json",
        str(tmp_path / "r.json"),
    ]
    assert train_module.main(argv) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["step"] == 4 and result["params"] == 24_683
    net = load_model(str(out / "last.pt"))
    assert isinstance(net, ConvSR) and net.cfg == CONV_PRESETS["fsrcnn"]
    assert torch.load(out / "last.pt", weights_only=True)["train_config"]["model"]["arch"] == "fsrcnn"
    capsys.readouterr()
    assert train_module.main([*argv, "--embed-dim", "16"]) == 2
    assert "--embed-dim" in capsys.readouterr().err
    assert train_module.main([*argv, "--init", "teacher", "--teacher", "x.pt"]) == 2
    assert "init 'scratch'" in capsys.readouterr().err


def test_bicubic_is_a_weightless_net_that_exports_like_the_others(tmp_path):
    from model.conv import BICUBIC

    net = build_model(BICUBIC)
    x = torch.rand(1, 3, 16, 16)
    want = torch.nn.functional.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)
    torch.testing.assert_close(net(x), want)
    assert count_params(net) == 0 and count_flops(BICUBIC, 16, 16).total == 2 * 256 * 16 * 3 * 16
    report = export_onnx(net, tmp_path / "bicubic.onnx", input_shape=(1, 3, 16, 16), seed=1, fp16=False)
    assert report.fp32_max_abs_err <= 1e-4 and set(op_census(onnx.load(str(tmp_path / "bicubic.onnx")))) >= {
        "Resize"
    }
    with pytest.raises(ValueError, match="must be 0 for bicubic"):
        ConvConfig("bicubic", 8, 0, 0)
    with pytest.raises(ValueError, match="no weights to train"):
        train_module.TrainConfig(model=BICUBIC, alpha=0.0)
