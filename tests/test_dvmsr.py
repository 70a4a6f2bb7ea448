"""DVMSR as a teacher: the two switches, the preset, importing the published weights, the spec
resolver and its download (a real HTTP server on 127.0.0.1), and the published Set5 figure."""

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from model import ModelConfig, build_model, count_params, dvmsr, preset
from model.mambalitesr import RGB_MEAN, load_model

from conftest import SHARED
from servers import free_port

WEIGHTS = SHARED / "models" / "dvmsr"
SWITCHED = preset("tiny", embed_norm=True, block_residual=False)


@pytest.fixture
def published() -> Path:
    """The shared folder with both published files (present on developer machines and in CI, so
    their absence fails the test rather than skipping it)."""
    missing = [name for name in dvmsr.SHA256 if not (WEIGHTS / name).is_file()]
    if missing:
        pytest.fail(
            f"DVMSR's published weights {missing} not found in {WEIGHTS}: run the tests beside ../shared"
        )
    return WEIGHTS


def fake_published(path: Path, edit=None) -> Path:
    """A randomly initialised dvmsr network saved under DVMSR's key names, optionally edited."""
    state = {dvmsr.published_name(k): v for k, v in build_model("dvmsr").state_dict().items()}
    if edit:
        edit(state)
    torch.save(state, path)
    return path


# --- the switches and the preset -----------------------------------------------------------------


def test_defaults_keep_the_seed_network_and_the_preset_is_dvmsrs():
    cfg = ModelConfig()
    assert cfg.embed_norm is False and cfg.block_residual is True
    assert not any(k.startswith("embed_norm") for k in build_model("student").state_dict())
    d = preset("dvmsr")
    assert (d.embed_dim, d.n_groups, d.blocks_per_group, d.rank, d.d_state, d.expand, d.d_conv, d.scale) == (
        60, 4, 2, 4, 16, 2, 4, 4,
    )  # fmt: skip
    assert d.embed_norm and not d.block_residual
    assert count_params(build_model("dvmsr")) == 424_428  # the published file's count


@pytest.mark.parametrize("field", ["embed_norm", "block_residual"])
def test_a_switch_that_is_not_a_bool_names_the_field(field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: 1})


def test_the_switches_compute_what_dvmsr_computes():
    # Written out from ../shared/models/README.md, independently of MambaLiteSR.forward:
    # out = upsample(conv_after_body(norm_f(groups(LN(f0)))) + f0) + mean, blocks without skips.
    torch.manual_seed(0)
    net = build_model(SWITCHED, scan="reference").eval()
    x = torch.rand(2, 3, 6, 7)

    def tokens_norm(norm, f):  # LayerNorm over the channels of each pixel
        return norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    with torch.no_grad():
        mean = torch.tensor(RGB_MEAN).view(1, 3, 1, 1)
        f0 = net.conv_first(x - mean)
        f = tokens_norm(net.embed_norm, f0)
        for group in net.groups:
            t = f.flatten(2).transpose(1, 2)
            for block in group.blocks:
                t = block.mixer(block.norm(t))  # no per-block residual
            f = group.conv(t.transpose(1, 2).reshape(f.shape)) + f
        want = net.upsample(net.conv_after_body(tokens_norm(net.norm, f)) + f0) + mean
        got = net(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # each switch on its own changes the function (the test above could not pass by accident)
        for change in ({"embed_norm": False}, {"block_residual": True}):
            other = build_model(SWITCHED.replace(**change), scan="reference").eval()
            other.load_state_dict(net.state_dict(), strict=False)
            assert (other(x) - got).abs().max() > 1e-3, change


def test_switched_network_trains_and_fused_matches_reference():
    torch.manual_seed(1)
    ref = build_model(SWITCHED, scan="reference")
    fast = build_model(SWITCHED, scan="auto")
    fast.load_state_dict(ref.state_dict())
    x = torch.rand(2, 3, 8, 8)
    y = ref(x)
    assert y.shape == (2, 3, 32, 32) and torch.isfinite(y).all()
    y.square().mean().backward()
    missing = [n for n, p in ref.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"
    with torch.no_grad():
        torch.testing.assert_close(fast(x), y.detach(), rtol=1e-4, atol=1e-5)


def test_export_with_both_switches_matches_pytorch(tmp_path):
    import onnxruntime as ort

    from model.export import export_onnx

    torch.manual_seed(2)
    net = build_model(SWITCHED).eval()
    out = tmp_path / "switched.onnx"
    report = export_onnx(net, out, input_shape=(1, 3, 16, 16), n_checks=1, seed=0, fp16=False)
    assert report.fp32_max_abs_err <= 1e-4 and report.params == count_params(net)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        want = net(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - want).max() < 1e-4


# --- importing the published files ---------------------------------------------------------------


def test_key_names_match_the_published_file(published):
    on_file = torch.load(published / "team07_DVMSR.pth", map_location="cpu", weights_only=True)
    ours = build_model("dvmsr").state_dict()
    assert sorted(on_file) == sorted(dvmsr.published_name(k) for k in ours)
    assert len(on_file) == 106 and sum(v.numel() for v in on_file.values()) == 424_428


@pytest.mark.parametrize(
    "name,key,weights",
    [
        ("team07_DVMSR.pth", None, "state_dict"),
        ("DVMSR.pth", None, "params_ema"),
        ("DVMSR.pth", "params", "params"),
    ],
)
def test_both_published_formats_import(published, tmp_path, name, key, weights):
    out = dvmsr.import_weights(published / name, tmp_path / "teacher.pt", key)
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["source"]["weights"] == weights and ckpt["source"]["sha256"] == dvmsr.SHA256[name]
    net = load_model(str(out))
    assert net.cfg == preset("dvmsr") and count_params(net) == 424_428
    raw = torch.load(published / name, map_location="cpu", weights_only=True)
    raw = raw if key is None and weights == "state_dict" else raw[weights]
    torch.testing.assert_close(net.embed_norm.weight.detach(), raw["patch_embed.norm.weight"], rtol=0, atol=0)
    torch.testing.assert_close(
        net.groups[3].blocks[1].mixer.A_log.detach(),
        raw["layers.3.residual_group.blocks.1.mixer.A_log"],
        rtol=0,
        atol=0,
    )


def _drop(state):
    del state["layers.2.conv.bias"]


def _add(state):
    state["layers.4.conv.weight"] = torch.zeros(60, 60, 3, 3)


def _reshape(state):
    state["conv_first.weight"] = torch.zeros(64, 3, 3, 3)


@pytest.mark.parametrize(
    "edit,words",
    [
        (_drop, "missing keys: layers.2.conv.bias"),
        (_add, "unexpected keys: layers.4.conv.weight"),
        (_reshape, "wrong shapes: conv_first.weight (64, 3, 3, 3) (expected (60, 3, 3, 3))"),
    ],
)
def test_a_wrong_file_is_an_error_that_names_the_keys(tmp_path, edit, words):
    src = fake_published(tmp_path / "wrong.pth", edit)
    with pytest.raises(dvmsr.DVMSRError) as err:
        dvmsr.import_weights(src, tmp_path / "out.pt")
    assert words in str(err.value)
    assert not (tmp_path / "out.pt").exists()


def test_other_wrong_files(tmp_path):
    out = tmp_path / "out.pt"
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(dvmsr.DVMSRError, match="cannot read"):
        dvmsr.import_weights(tmp_path / "junk.pth", out)
    with pytest.raises(dvmsr.DVMSRError, match="no DVMSR weights file"):
        dvmsr.import_weights(tmp_path / "absent.pth", out)
    plain = fake_published(tmp_path / "plain.pth")
    with pytest.raises(dvmsr.DVMSRError, match="plain state_dict"):
        dvmsr.import_weights(plain, out, key="params")
    state = torch.load(plain, weights_only=True)
    torch.save({"params": state}, tmp_path / "basicsr.pth")
    with pytest.raises(dvmsr.DVMSRError, match="no 'params_ema' weights; it has \\['params'\\]"):
        dvmsr.import_weights(tmp_path / "basicsr.pth", out, key="params_ema")
    dvmsr.import_weights(tmp_path / "basicsr.pth", out)  # the only BasicSR key there is the default
    with pytest.raises(dvmsr.DVMSRError, match="already a MambaLiteSR checkpoint"):
        dvmsr.import_weights(out, tmp_path / "again.pt")


def test_cli(published, tmp_path, capsys):
    out = tmp_path / "teacher.pt"
    assert dvmsr.main([str(published / "DVMSR.pth"), "--key", "params", "--out", str(out)]) == 0
    assert "424,428 parameters" in capsys.readouterr().out
    assert load_model(str(out)).cfg == preset("dvmsr")
    wrong = fake_published(tmp_path / "wrong.pth", _drop)
    assert dvmsr.main([str(wrong), "--out", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "layers.2.conv.bias" in err and "Traceback" not in err


# --- the spec resolver and its download ----------------------------------------------------------


class _Files(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def file_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www; yields (folder, base URL, requests)."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_Files,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=root))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def test_resolve_downloads_checks_and_caches(published, tmp_path, file_server, capsys):
    root, base, requests = file_server
    shutil.copy(published / dvmsr.DEFAULT_FILE, root / dvmsr.DEFAULT_FILE)
    url, cache = f"{base}/{dvmsr.DEFAULT_FILE}", tmp_path / "cache"
    ckpt = dvmsr.resolve("dvmsr", url=url, cache=cache)
    assert load_model(str(ckpt)).cfg == preset("dvmsr")
    downloaded = cache / dvmsr.DEFAULT_FILE
    assert dvmsr.sha256_file(downloaded) == dvmsr.SHA256[dvmsr.DEFAULT_FILE]
    assert dvmsr.DEFAULT_FILE in capsys.readouterr().err  # the progress bar
    assert dvmsr.resolve("dvmsr", url=url, cache=cache) == ckpt and len(requests) == 1  # cached
    downloaded.write_bytes(b"damaged")
    assert dvmsr.resolve("dvmsr", url=url, cache=cache) == ckpt and len(requests) == 2
    assert "deleted it, downloading again" in capsys.readouterr().err
    assert not [p for p in cache.iterdir() if p.name.endswith(".partial")]


def test_a_download_with_the_wrong_checksum_is_deleted(published, tmp_path, file_server):
    root, base, requests = file_server
    shutil.copy(published / "DVMSR.pth", root / dvmsr.DEFAULT_FILE)  # a real file, but not the pinned one
    cache = tmp_path / "cache"
    with pytest.raises(dvmsr.DVMSRError, match="not the pinned .* it was deleted"):
        dvmsr.resolve("dvmsr", url=f"{base}/{dvmsr.DEFAULT_FILE}", cache=cache, progress=False)
    assert requests and not (cache.exists() and any(cache.iterdir()))


def test_an_unreachable_server_says_how_to_work_offline(tmp_path, file_server):
    _, base, _ = file_server
    for url in (f"{base}/missing.pth", f"http://127.0.0.1:{free_port()}/team07_DVMSR.pth"):
        with pytest.raises(dvmsr.DVMSRError, match="cannot download .*dvmsr:PATH or set MAMBALITESR_DVMSR"):
            dvmsr.resolve("dvmsr", url=url, cache=tmp_path / "cache", progress=False)


def test_local_copies_need_no_network(published, tmp_path, monkeypatch):
    nowhere = f"http://127.0.0.1:{free_port()}/team07_DVMSR.pth"  # any download would fail
    cache = tmp_path / "cache"
    by_path = dvmsr.resolve(f"dvmsr:{published / 'team07_DVMSR.pth'}", url=nowhere, cache=cache)
    monkeypatch.setenv(dvmsr.ENV_WEIGHTS, str(published / "team07_DVMSR.pth"))
    assert dvmsr.resolve("dvmsr", url=nowhere, cache=cache) == by_path
    basicsr = dvmsr.resolve(f"dvmsr:{published / 'DVMSR.pth'}", cache=cache)
    assert basicsr != by_path
    assert torch.load(basicsr, weights_only=True)["source"]["weights"] == "params_ema"
    monkeypatch.setenv(dvmsr.ENV_WEIGHTS, str(tmp_path / "absent.pth"))
    with pytest.raises(dvmsr.DVMSRError, match=dvmsr.ENV_WEIGHTS):
        dvmsr.resolve("dvmsr", cache=cache)
    for spec in ("dvmsr:", "teacher", f"dvmsr:{tmp_path / 'absent.pth'}"):
        with pytest.raises(dvmsr.DVMSRError):
            dvmsr.resolve(spec, cache=cache)
    assert dvmsr.is_spec("dvmsr") and dvmsr.is_spec("dvmsr:x.pth") and not dvmsr.is_spec("dvmsr.pt")


def test_an_unpublished_local_file_is_used_with_a_note(tmp_path, capsys):
    ckpt = dvmsr.resolve(f"dvmsr:{fake_published(tmp_path / 'mine.pth')}", cache=tmp_path / "cache")
    assert load_model(str(ckpt)).cfg == preset("dvmsr")
    assert "not one of DVMSR's published files" in capsys.readouterr().err


# --- the published figure ------------------------------------------------------------------------


def test_set5_reproduces_the_published_psnr(published, bench_dir, tmp_path):
    """DVMSR's Set5 x4 PSNR-Y is 32.19 dB; the standard protocol (Y, border 4, whole image) with
    the imported team07_DVMSR.pth must give it within 0.02 dB."""
    from trainers.data import load_pairs
    from trainers.evaluate import checkpoint_upscaler, evaluate_set

    ckpt = dvmsr.resolve(f"dvmsr:{published / 'team07_DVMSR.pth'}", cache=tmp_path)
    upscale, scale = checkpoint_upscaler(str(ckpt))
    result = evaluate_set(upscale, load_pairs(bench_dir / "Set5", scale), scale, "Set5")
    assert result.n_images == 5
    assert result.psnr_y == pytest.approx(32.19, abs=0.02)
    assert result.ssim_y == pytest.approx(0.8946, abs=0.002)


def test_the_acceptance_command_reproduces_it_through_the_cli(published, bench_dir, tmp_path, capsys):
    """`python -m trainers.evaluate --model dvmsr:PATH --data Set5`, as README gives it."""
    from trainers.evaluate import main

    out = tmp_path / "r.json"
    spec = f"dvmsr:{published / 'team07_DVMSR.pth'}"
    assert main(["--model", spec, "--data", str(bench_dir / "Set5"), "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["sets"]
    assert result["psnr_y"] == pytest.approx(32.19, abs=0.02)


def test_a_search_takes_dvmsr_as_its_teacher(published, tmp_path):
    """teacher.checkpoint: dvmsr:PATH is logged once on the study run, with where it came from;
    trials then load it by its runs:/ URI like any other teacher."""
    from search import mlflow_util, study
    from search.config import load_config
    from search.stages import ensure_teacher

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    spec = f"dvmsr:{published / 'team07_DVMSR.pth'}"
    # one validation image: what is checked is how the teacher is taken, not its PSNR on a set
    cfg = load_config(None, {"teacher.checkpoint": spec, "tracking_uri": uri, "training.val_max_images": 1})
    exp = study.ensure_experiment(uri, "t")
    run_id = mlflow_util.client(uri).create_run(exp).info.run_id
    s = study.Study(uri, exp, run_id, "s", cfg.training.iterations)
    teacher_uri = ensure_teacher(cfg, s, tmp_path / "s")
    assert teacher_uri.startswith(f"runs:/{run_id}/teacher/")
    data = mlflow_util.client(uri).get_run(run_id).data
    tags = data.tags
    assert data.metrics["teacher_val_psnr_y"] > 25  # a strong teacher on the built-in images
    assert tags[f"{study.TAG_TEACHER}.sha256"] == dvmsr.SHA256["team07_DVMSR.pth"]
    folder = mlflow_util.download(teacher_uri, uri, cache_dir=tmp_path / "cache")
    net = load_model(str(mlflow_util.single_file(folder, ".pt")))
    assert net.cfg == preset("dvmsr").replace(scan=net.cfg.scan)
    assert tags[study.TAG_TEACHER_URI] == teacher_uri and s.teacher_uri == teacher_uri  # resume takes it
