"""Students that inherit their teacher's weights (model/inherit.py)."""

import pytest
import torch

from model.inherit import InheritError, delta_factor, evenly_spaced, inherit
from model.mambalitesr import MambaLiteSR, ModelConfig

# a small teacher with every dimension a student can shrink: C, E, G, K, N, d_conv and the rank
TEACHER = ModelConfig(embed_dim=12, n_groups=3, blocks_per_group=2, d_state=6, rank=4, scan="chunked")


def trained_like(cfg: ModelConfig, seed: int = 0) -> MambaLiteSR:
    """A network whose weights are all different from their initial values (as after training)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = MambaLiteSR(cfg)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def lr_patches(n: int = 2, side: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("topology", [{}, {"embed_norm": True, "block_residual": False}])
@pytest.mark.parametrize("criterion", ["weights", "activations"])
def test_a_student_with_the_teachers_config_is_the_teacher(topology, criterion):
    teacher = trained_like(TEACHER.replace(**topology))
    student = inherit(teacher, teacher.cfg, criterion, calibration=lr_patches())
    x = lr_patches(seed=2)
    with torch.no_grad():
        assert torch.equal(student.eval()(x), teacher(x))
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(student.state_dict()[name], tensor), name


def test_a_rank_above_the_teachers_keeps_its_function_and_can_still_learn():
    """The Delta product has rank 4: a rank-6 student gets it exactly; its two further components
    start with zero x_proj rows and nonzero dt_proj columns, so gradients reach them."""
    teacher = trained_like(TEACHER)
    student = inherit(teacher, TEACHER.replace(rank=6), "weights")
    x = lr_patches(seed=3)
    with torch.no_grad():
        assert torch.allclose(student.eval()(x), teacher(x), atol=1e-5)
    mixer = student.groups[0].blocks[0].mixer
    assert torch.count_nonzero(mixer.x_proj.weight[4:6]) == 0
    assert torch.count_nonzero(mixer.dt_proj.weight[:, 4:6]) == mixer.dt_proj.weight[:, 4:6].numel()
    student.train()(x).square().mean().backward()
    assert torch.count_nonzero(mixer.x_proj.weight.grad[4:6]) > 0


@pytest.mark.parametrize("rank", [1, 2, 3, 4, 7])
def test_the_delta_factor_is_the_best_rank_r_approximation(rank):
    """Its error (Frobenius) is the tail of the singular values: no rank-r factor does better."""
    g = torch.Generator().manual_seed(rank)
    product = torch.randn(10, 5, generator=g, dtype=torch.float64) @ torch.randn(
        5, 10, generator=g, dtype=torch.float64
    )
    left, right, k = delta_factor(product.float(), rank)
    assert left.shape == (10, rank) and right.shape == (rank, 10) and k == min(rank, 5)
    s = torch.linalg.svdvals(product)
    error = (product - left.double() @ right.double()).norm() ** 2
    assert error.item() == pytest.approx((s[rank:] ** 2).sum().item(), rel=1e-4, abs=1e-6)
    assert torch.count_nonzero(left[:, k:]) == 0 and torch.count_nonzero(right[k:]) == 0


def test_the_students_delta_path_is_the_svd_of_the_teachers_on_its_channels():
    teacher = trained_like(TEACHER)
    student = inherit(teacher, TEACHER.replace(embed_dim=8, rank=2), "weights")
    t, s = teacher.groups[1].blocks[1].mixer, student.groups[1].blocks[1].mixer
    product = t.dt_proj.weight @ t.x_proj.weight[:4]  # (24 x 24)
    # the student's inner channels are a subset of the teacher's: find them by their D
    e = [int(torch.nonzero(t.D == d)[0]) for d in s.D]
    assert sorted(e) == e and len(set(e)) == 16
    expected = product[e][:, e]
    got = s.dt_proj.weight @ s.x_proj.weight[:2]
    tail = torch.linalg.svdvals(expected.double())[2:]
    assert ((expected - got).double().norm() ** 2).item() == pytest.approx((tail**2).sum().item(), rel=1e-3)


def students():
    yield TEACHER.replace(embed_dim=4, rank=1)
    yield TEACHER.replace(embed_dim=8, rank=8, n_groups=1, blocks_per_group=1)
    yield TEACHER.replace(embed_dim=12, rank=2, n_groups=2, d_state=2, d_conv=2)
    yield TEACHER.replace(embed_dim=6, expand=1, rank=3, d_state=4)
    yield TEACHER.replace(embed_dim=8, rank=2, embed_norm=True, block_residual=False)


@pytest.mark.parametrize(
    "cfg", list(students()), ids=lambda c: f"C{c.embed_dim}E{c.inner_dim}r{c.rank}G{c.n_groups}"
)
def test_compatible_students_get_weights_picked_from_the_teacher_the_same_twice(cfg):
    teacher = trained_like(TEACHER)
    calibration = lr_patches()
    for criterion in ("weights", "activations"):
        a = inherit(teacher, cfg, criterion, calibration=calibration)
        b = inherit(teacher, cfg, criterion, calibration=calibration)
        assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
        y = a.eval()(lr_patches(seed=4))
        assert y.shape == (2, 3, 32, 32) and torch.isfinite(y).all()
        # the first conv's rows are some of the teacher's, in the teacher's order
        rows = [
            int(torch.nonzero((teacher.conv_first.weight == w).all(dim=(1, 2, 3)))[0])
            for w in a.conv_first.weight
        ]
        assert rows == sorted(rows) and len(set(rows)) == cfg.embed_dim


def test_the_criteria_can_choose_differently():
    """Weight norms and activation energy are two rules, not one: a residual channel with the
    strongest first-conv weights that nothing ever writes into on flat patches (its weights cancel
    there, and no group or mixer writes to it) is kept by the one and dropped by the other."""
    teacher = trained_like(TEACHER)
    with torch.no_grad():
        w = teacher.conv_first.weight
        w[0] = 0.0
        w[0, 0, 0, 0], w[0, 0, 0, 1] = 5.0, -5.0  # cancels on a flat image
        teacher.conv_first.bias[0] = 0.0
        for group in teacher.groups:
            group.conv.weight[0], group.conv.bias[0] = 0.0, 0.0
            for block in group.blocks:
                block.mixer.out_proj.weight[0] = 0.0
    flat = torch.full((2, 3, 8, 8), 0.5)
    by_weights = inherit(teacher, TEACHER.replace(embed_dim=6), "weights")
    by_energy = inherit(teacher, TEACHER.replace(embed_dim=6), "activations", calibration=flat)
    assert torch.equal(by_weights.conv_first.weight[0], teacher.conv_first.weight[0])
    assert not any(torch.equal(row, teacher.conv_first.weight[0]) for row in by_energy.conv_first.weight)


def test_fewer_groups_or_blocks_are_evenly_spaced_first_and_last_kept():
    assert evenly_spaced(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced(4, 2) == [0, 3]
    assert evenly_spaced(8, 4) == [0, 2, 5, 7]
    assert evenly_spaced(3, 1) == [0]
    teacher = trained_like(TEACHER)
    student = inherit(teacher, TEACHER.replace(n_groups=2, blocks_per_group=1), "weights")
    assert torch.equal(student.groups[1].conv.bias, teacher.groups[2].conv.bias)
    assert torch.equal(student.groups[0].blocks[0].mixer.D, teacher.groups[0].blocks[0].mixer.D)


@pytest.mark.parametrize(
    "change,words",
    [
        ({"embed_dim": 16}, "embed dim is 16, wider than the teacher's 12"),
        ({"expand": 3}, "inner width (expand x embed dim) is 36, wider than the teacher's 24"),
        ({"n_groups": 4}, "number of groups is 4, wider than the teacher's 3"),
        ({"blocks_per_group": 3}, "blocks per group is 3"),
        ({"d_state": 8}, "d_state is 8, wider than the teacher's 6"),
        ({"d_conv": 5}, "d_conv is 5"),
        ({"scale": 2}, "the student upscales x2 and the teacher x4"),
    ],
)
def test_a_student_wider_than_its_teacher_or_of_another_scale_is_refused_naming_why(change, words):
    with pytest.raises(InheritError, match=words.replace("(", r"\(").replace(")", r"\)")):
        inherit(trained_like(TEACHER), TEACHER.replace(**change))


def test_the_activations_criterion_needs_patches():
    with pytest.raises(ValueError, match="needs calibration patches"):
        inherit(trained_like(TEACHER), TEACHER, "activations")
    with pytest.raises(ValueError, match="criterion must be one of"):
        inherit(trained_like(TEACHER), TEACHER, "luck")


def test_the_benchmark_draws_each_arms_curve_from_its_starting_weights(tmp_path, capsys):
    """benchmarks/inherit_curve.py at toy size: every arm's curve starts at step 0 (scratch and the
    inherited weights differ there), the validation photos are held out of training, and the test
    sets are evaluated once."""
    import dataclasses
    import json

    import numpy as np

    from benchmarks import inherit_curve

    from conftest import write_png

    rng = np.random.default_rng(0)
    photos, bench = tmp_path / "photos", tmp_path / "bench" / "Mini"
    for i in range(4):
        write_png(photos / f"p{i}.png", rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    write_png(bench / "b.png", rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    teacher = trained_like(ModelConfig(embed_dim=8, n_groups=2, blocks_per_group=1, d_state=4, rank=2))
    path = tmp_path / "teacher.pt"
    torch.save({"model_config": dataclasses.asdict(teacher.cfg), "model": teacher.state_dict()}, path)
    argv = ["--out", str(tmp_path / "out"), "--teacher", str(path), "--train-data", str(photos)]
    argv += ["--val-images", "1", "--preset", "tiny", "--embed-dim", "4", "--rank", "1", "--steps", "2"]
    argv += ["--val-every", "1", "--batch-size", "2", "--patch-size", "8", "--test-data", str(bench)]
    assert inherit_curve.main(argv) == 0
    result = json.loads((tmp_path / "out" / "curves.json").read_text())["arms"]
    assert sorted(result) == ["scratch", "teacher:activations", "teacher:weights"]
    for arm in result.values():
        assert list(arm["val_psnr_y"]) == ["0", "1", "2"] and list(arm["test_psnr_y"]) == ["Mini"]
    assert result["scratch"]["val_psnr_y"]["0"] != result["teacher:weights"]["val_psnr_y"]["0"]
    assert sorted(p.name for p in (tmp_path / "out" / "data" / "val").iterdir()) == ["p3.png"]
    assert "p3.png" not in {p.name for p in (tmp_path / "out" / "data" / "train").iterdir()}
    assert "(validation PSNR-Y, dB, by step)" in capsys.readouterr().out


def test_early_rung_correlation_is_measured_per_arm_and_an_interrupted_run_continues(tmp_path, capsys):
    """benchmarks/early_rungs.py at toy size: the draws come from the config's space, each (draw,
    arm) run is appended once, a rerun trains nothing already done (a line cut short by a kill is
    trained again), and Spearman's rho of each early validation with the last is reported per arm."""
    import dataclasses
    import json

    import numpy as np

    from benchmarks import early_rungs

    from conftest import write_png

    assert early_rungs.spearman_by_rung([[1.0, 5.0, 10.0], [2.0, 4.0, 20.0], [3.0, 6.0, 30.0]]) == [1.0, 0.5]
    rng = np.random.default_rng(0)
    photos = tmp_path / "photos"
    for i in range(4):
        write_png(photos / f"p{i}.png", rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    teacher = trained_like(ModelConfig(embed_dim=8, n_groups=2, blocks_per_group=1, d_state=4, rank=2))
    path = tmp_path / "teacher.pt"
    torch.save({"model_config": dataclasses.asdict(teacher.cfg), "model": teacher.state_dict()}, path)
    config = tmp_path / "space.yaml"
    config.write_text(
        "base_model: tiny\nspace:\n  embed_dim: {low: 4, high: 8, step: 4}\n  rank: {low: 1, high: 3}\n"
    )
    out = tmp_path / "out"
    argv = ["--out", str(out), "--teacher", str(path), "--train-data", str(photos), "--config", str(config)]
    argv += ["--val-images", "1", "--draws", "3", "--steps", "3", "--val-every", "1"]
    argv += ["--batch-size", "2", "--patch-size", "8"]
    assert early_rungs.main(argv) == 0
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    pairs = [(d, a) for d in range(3) for a in ("scratch", "teacher")]
    assert sorted((r["draw"], r["arm"]) for r in runs) == pairs
    for r in runs:
        assert r["knobs"]["embed_dim"] in (4, 8) and 1 <= r["knobs"]["rank"] <= 3
        assert list(r["val_psnr_y"]) == ["0", "1", "2", "3"]
    summary = json.loads((out / "summary.json").read_text())
    for arm in ("scratch", "teacher"):
        assert len(summary[arm]["rho_by_validation"]) == 2 and len(summary[arm]["curves"]) == 3
    capsys.readouterr()

    # a kill mid-write leaves a partial last line: that run is trained again, nothing else is
    lines = (out / "runs.jsonl").read_text().splitlines()
    (out / "runs.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    assert early_rungs.main(argv) == 0
    retrained = [line for line in capsys.readouterr().out.splitlines() if line.startswith("draw ")]
    assert len(retrained) == 1 and retrained[0].startswith(f"draw {runs[-1]['draw']} {runs[-1]['arm']} ")
    assert early_rungs.main(argv) == 0  # and now every run is whole: nothing to train
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("draw ")]
