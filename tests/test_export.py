"""ONNX export: round trip through ONNX Runtime, op census, bounded graph size, failures."""

import json
from pathlib import Path

import onnx
import pytest
import torch

from edge_agent.contract import FP32_SCAN_PREFIX as SCAN_PREFIX
from edge_agent.fileio import sha256_file
from model import build_model
from model.export import BANNED_OPS, ExportError, export_onnx, format_report, main, op_census

from conftest import tiny_model


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    torch.manual_seed(0)
    net = build_model("tiny", scan="reference")  # exported with the chunked scan regardless
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    return net, out, export_onnx(net, out, input_shape=(1, 3, 32, 32), seed=1)


def test_round_trip_and_census(tiny_export):
    net, out, report = tiny_export
    assert out.exists() and not list(out.parent.glob(f".{out.name}.*.partial")), "a temporary export was left"
    assert report.sha256 == sha256_file(out)
    assert report.fp32_max_abs_err <= 1e-4
    assert report.fp16_max_abs_err < 1e-2
    proto = onnx.load(str(out))
    census = op_census(proto)
    assert not BANNED_OPS & set(census)
    assert census == report.op_census and sum(census.values()) == report.node_count
    assert census["Conv"] == 1 + 2 + 2 + 1 + 1  # first, groups, mixer conv1d per layer, after body, upsample
    assert any(n.name.startswith(SCAN_PREFIX) and n.op_type == "Exp" for n in proto.graph.node)
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 32, 32]

    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        want = net(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - want).max() < 1e-4


def test_an_exported_file_names_no_path_of_the_machine_that_built_it(tiny_export):
    _, out, _ = tiny_export
    data = out.read_bytes()
    here = Path(__file__).resolve().parents[1]  # the project, where model/ was traced from
    for path in {str(here), str(Path.home()), str(Path(torch.__file__).resolve().parent)}:
        assert path.encode() not in data, f"{out} names {path}"
    assert b"stack_trace" not in data and b'File "' not in data  # the exporter's source metadata
    proto = onnx.load(str(out))
    assert not [n for n in proto.graph.node if n.metadata_props]
    assert any(n.name.startswith(SCAN_PREFIX) for n in proto.graph.node)  # marked before it went


def test_node_count_bounded_in_token_count(tmp_path):
    net = tiny_model()
    counts = {}
    for side in (16, 64):
        report = export_onnx(net, tmp_path / f"t{side}.onnx", (1, 3, side, side), n_checks=1, fp16=False)
        counts[side] = report.node_count
        # without the float16 graph, nothing is claimed for it: fp32 engines only
        assert report.fp16_psnr_db is None and report.fp16_ok is False
    # 16x more tokens: an unrolled loop would grow 16x; the chunked scan adds a few levels.
    assert counts[64] < 1.5 * counts[16], counts


def test_cli_writes_report(tmp_path, capsys):
    out, js = tmp_path / "cli.onnx", tmp_path / "report.json"
    net = tiny_model()
    ckpt = tmp_path / "tiny.pt"
    torch.save({"model_config": net.cfg.__dict__, "model": net.state_dict()}, ckpt)
    rc = main(
        [
            "--checkpoint",
            str(ckpt),
            "--out",
            str(out),
            "--height",
            "16",
            "--width",
            "24",
            "--json",
            str(js),
            "--seed",
            "0",
            "--no-fp16",
        ]
    )
    assert rc == 0
    report = json.loads(js.read_text())
    assert report["input_shape"] == [1, 3, 16, 24] and report["params"] > 0
    assert report["fp16_ok"] is False and report["fp16_psnr_db"] is None
    printed = capsys.readouterr().out
    assert "fp32" in printed and "fp16       not checked (--no-fp16): build fp32 engines only" in printed


def test_cli_reports_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("nope")
    assert main(["--checkpoint", str(bad), "--out", str(tmp_path / "x.onnx")]) == 1
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_failed_verification_leaves_no_file(tmp_path):
    out = tmp_path / "strict.onnx"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_onnx(tiny_model(), out, (1, 3, 16, 16), n_checks=1, tolerance=0.0, fp16=False)
    assert not out.exists()
    with pytest.raises(ExportError, match="input_shape"):
        export_onnx(tiny_model(), out, (1, 1, 16, 16))


def test_the_exported_graph_is_the_same_for_every_scan_form(tmp_path):
    torch.manual_seed(0)
    state = build_model("tiny").state_dict()
    graphs = {}
    for scan in ("chunked", "auto", "fused", "triton"):  # the kernels' forms against the export path
        net = build_model("tiny", scan=scan)
        net.load_state_dict(state)
        export_onnx(net, tmp_path / f"{scan}.onnx", (1, 3, 16, 16), n_checks=1, seed=0, fp16=False)
        proto = onnx.load(str(tmp_path / f"{scan}.onnx"))
        graphs[scan] = (
            [(n.op_type, n.name, list(n.input), list(n.output)) for n in proto.graph.node],
            {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in proto.graph.initializer},
        )
    first = graphs["chunked"]
    assert first[0] and first[1]
    for scan, graph in graphs.items():
        assert graph == first, f"scan={scan!r} exported another graph"


@pytest.mark.parametrize("where", ["directory", "proc"])
def test_an_unwritable_destination_is_an_error_and_leaves_no_partial_file(tmp_path, capsys, where):
    net = tiny_model()
    ckpt = tmp_path / "tiny.pt"
    torch.save({"model_config": net.cfg.__dict__, "model": net.state_dict()}, ckpt)
    if where == "directory":
        out = tmp_path / "taken.onnx"
        out.mkdir()  # an existing directory under the output's name
    else:
        out = Path("/proc/mambalitesr-test.onnx")  # a file system that refuses new files
    rc = main(
        ["--checkpoint", str(ckpt), "--out", str(out), "--height", "16", "--width", "16", "--seed", "0"]
    )
    err = capsys.readouterr().err
    assert rc == 1 and f"cannot write {out}" in err and "Traceback" not in err
    assert not list(out.parent.glob(f".{out.name}.*.partial"))
    if where == "directory":
        assert out.is_dir() and not any(out.iterdir())


def test_the_fp16_gate_compares_fp16_error_with_the_models_quality(tiny_export, tmp_path):
    """fp16 passes when its PSNR against fp32 is FP16_MARGIN_DB above the model's own PSNR, and
    fails (fp32 engines only) when the model is better than that."""
    from model.export import DEFAULT_QUALITY_DB, FP16_MARGIN_DB

    net, _, report = tiny_export
    assert report.quality_db == DEFAULT_QUALITY_DB and 0 < report.fp16_max_abs_err
    p = report.fp16_psnr_db
    assert report.fp16_ok == (p >= DEFAULT_QUALITY_DB + FP16_MARGIN_DB)
    shape = (1, 3, 32, 32)
    good = export_onnx(net, tmp_path / "a.onnx", shape, seed=1, quality_db=p - FP16_MARGIN_DB - 1)
    bad = export_onnx(net, tmp_path / "b.onnx", shape, seed=1, quality_db=p - FP16_MARGIN_DB + 1)
    assert good.fp16_psnr_db == bad.fp16_psnr_db == p  # the same inputs: only the gate differs
    assert good.fp16_ok and not bad.fp16_ok
    assert "fp16 gate  ok" in format_report(good) and "fp16 gate  FAILED" in format_report(bad)
