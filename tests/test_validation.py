"""Bad config values and flags of the search and training CLIs: exit code 2, the key named, no
traceback, and neither Ray nor training started. Each case is a value that was accepted before."""

import json
import math

import pytest
import torch
import yaml

from edge_agent import contract
from search.config import CONFIG_DIR, ConfigError

SMOKE = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())


class Started(Exception):
    """Raised by the stand-ins for ray.init and train(): the CLI got past its checks."""


@pytest.fixture
def no_work(monkeypatch):
    import ray

    import trainers.train

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(ray, "init", started)
    monkeypatch.setattr(trainers.train, "train", started)


def exit_code(main, argv) -> int:
    """main(argv)'s exit code, whether it returns one or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def smoke_with(tmp_path, dotted: str, value) -> str:
    """smoke.yaml with one key set (a dotted path), written to tmp_path; returns the path."""
    cfg = json.loads(json.dumps(SMOKE))
    node = cfg
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


CONFIG_CASES = [
    ("registry.input_size", -32),
    ("space.rank", {"low": 9, "high": 12}),  # tiny's expand * embed_dim is 8 at C = 4
    ("space.embed_dim", {"low": 0, "high": 8, "step": 4}),
    ("space.alpha", {"low": 0.0, "high": math.nan}),
    ("cpus_per_trial", math.nan),
    ("gpus_per_trial", -1),
    ("num_samples", -1),
    ("max_concurrent", 0),
    ("seed", -1),
    ("loop.wait_timeout_s", math.inf),
    ("loop.rounds", 0),
    ("early_stopping.margin", -1.0),
    ("early_stopping.min_rung", 0),
    ("early_stopping.rule", "median"),
    ("early_stopping.rung_factor", 0.5),
    ("early_stopping.eta", 1.0),
    ("training.lr", math.nan),
    ("training.val_max_images", -1),
    ("teacher.iterations", 0),
    ("teacher.checkpoint", "no/such/teacher.pt"),
    ("training.train_data", ["no/such/folder"]),
    ("loop.local_agent", False),  # smoke.yaml's agent_args would be ignored
    ("storage_dir", "/proc/search"),
]


@pytest.mark.usefixtures("no_work")
@pytest.mark.parametrize("key,value", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_search_config_values_are_refused_up_front(tmp_path, capsys, key, value):
    from search.run import main

    code = exit_code(main, ["--config", smoke_with(tmp_path, key, value)])
    err = capsys.readouterr().err
    assert code == 2, err
    named = "loop.agent_args" if key == "loop.local_agent" else key
    assert named in err and "Traceback" not in err


FLAG_CASES = [
    (["--cpus-per-trial", "nan"], "--cpus-per-trial"),
    (["--gpus-per-trial", "-1"], "--gpus-per-trial"),
    (["--num-samples", "0"], "--num-samples"),
    (["--max-concurrent", "two"], "--max-concurrent"),
    (["--wait-timeout-s", "inf"], "--wait-timeout-s"),
    (["--seed", "-3"], "--seed"),
    (["--rounds", "0"], "--rounds"),
    (["--json", "/proc/summary.json"], "--json"),
    (["--config", str(CONFIG_DIR / "default.yaml")], "--smoke-test"),
]


@pytest.mark.usefixtures("no_work")
@pytest.mark.parametrize("flags,named", FLAG_CASES, ids=[c[1] for c in FLAG_CASES])
def test_search_flags_are_refused_up_front(tmp_path, capsys, flags, named):
    from search.run import main

    code = exit_code(main, ["--smoke-test", "--storage-dir", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert named in err and "Traceback" not in err


IGNORED = [
    (["--device", "orin-nano"], "--device"),  # default.yaml: FLOPs cost, no agent, no selection
    (["--wait-timeout-s", "5"], "--wait-timeout-s"),
    (["--searcher", "random", "--startup-trials", "4"], "--startup-trials"),
]


@pytest.mark.usefixtures("no_work")
@pytest.mark.parametrize("flags,named", IGNORED, ids=[c[1] for c in IGNORED])
def test_search_flags_that_would_be_ignored_are_errors(tmp_path, capsys, flags, named):
    from search.run import main

    assert exit_code(main, ["--storage-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_the_loops_switches_turn_off_what_a_config_turns_on(tmp_path):
    from search.cli import config_from_args, parse_args

    on = config_from_args(parse_args(["--smoke-test", "--storage-dir", str(tmp_path)]))
    assert on.loop.local_agent and on.loop.select and on.loop.agent_args
    off = ["--smoke-test", "--storage-dir", str(tmp_path), "--no-local-agent", "--no-select"]
    cfg = config_from_args(parse_args(off))
    # the smoke config's arguments for the agent go with it, not into a "would be ignored" error
    assert (cfg.loop.local_agent, cfg.loop.select, cfg.loop.agent_args) == (False, False, ())


def test_the_resume_hint_repeats_the_flags_the_run_was_given(tmp_path, monkeypatch, capsys):
    import shlex

    import ray

    from search import resources, run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C during the study

    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(resources, "trial_fit_problem", lambda *args, **kwargs: None)
    monkeypatch.setattr(run, "run_study", interrupted)
    argv = ["--smoke-test", "--num-samples", "3", "--experiment", "my study", "--storage-dir", str(tmp_path)]
    argv += ["--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    assert run.main(argv) == 130
    hint = f"interrupted: continue with `python search/run.py {shlex.join(argv)} --resume`"
    assert hint in capsys.readouterr().err


def _study(tmp_path, latest: str | None, run: str | None) -> list[str]:
    """A storage folder whose LATEST is ``latest``; ``run``: "none" (no study run in MLflow), "bare"
    (a study run without its config artifact) or "whole" (started as the search starts one).
    Returns the search's flags for it."""
    from search import mlflow_util, study
    from search.run import config_from_args, parse_args

    storage = tmp_path / "s"
    flags = ["--smoke-test", "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--storage-dir", str(storage)]
    cfg = config_from_args(parse_args(flags))
    uri = mlflow_util.absolute_tracking_uri(cfg.tracking_uri)
    if latest is not None:
        study.ensure_experiment(uri, "another study")  # a database, without this study in it
    if run == "whole":
        latest = study.Study.start(cfg, uri).name
    elif run == "bare":
        exp = study.ensure_experiment(uri, cfg.experiment)
        mlflow_util.client(uri).create_run(
            exp, tags={study.TAG_STUDY: latest, contract.ROLE: contract.ROLE_STUDY}
        )
    storage.mkdir(exist_ok=True)
    if latest is not None:
        (storage / "LATEST").write_text(latest)
    return [*flags, "--resume"]


RESUME_CASES = [
    (None, None, "nothing to resume"),
    ("", None, "does not name a study"),
    ("s1", None, "study s1 has no run in experiment 'mambalitesr-smoke'"),
    ("s1", "bare", "has no readable config/study.json"),
]


@pytest.mark.usefixtures("no_work")
@pytest.mark.parametrize("latest,run,message", RESUME_CASES, ids=[c[2] for c in RESUME_CASES])
def test_resume_of_a_damaged_study_is_refused(tmp_path, capsys, latest, run, message):
    from search.run import main

    flags = _study(tmp_path, latest, run)
    assert exit_code(main, flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.usefixtures("no_work")
def test_resume_refuses_a_changed_configuration(tmp_path, capsys):
    """The configuration a study started with is its run's config artifact: --resume compares."""
    from search import mlflow_util, study
    from search.run import config_from_args, main, parse_args

    resume = _study(tmp_path, None, "whole")
    assert exit_code(main, [*resume, "--num-samples", "9"]) == 2
    err = capsys.readouterr().err
    assert "num_samples (4 -> 9)" in err and "Traceback" not in err
    # what may change on resume passes the check
    cfg = config_from_args(parse_args([*resume, "--rounds", "2"]))
    found = study.Study.find(cfg, mlflow_util.absolute_tracking_uri(cfg.tracking_uri))
    assert cfg.loop.rounds == 2 and found.rounds_done() == 0
    # the same study under another tracking server: a sentence, not a traceback
    other = f"sqlite:///{tmp_path}/other.db"
    with pytest.raises(study.StudyError, match="no MLflow database at .*other.db"):
        study.Study.find(cfg, other)  # none there: none made
    study.ensure_experiment(other, "something else")
    with pytest.raises(study.StudyError, match="has no run in experiment"):
        study.Study.find(cfg, other)


TRAIN_CASES = [
    (["--iterations", "0"], "--iterations"),
    (["--iterations", "-5"], "--iterations"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--gamma", "-1"], "--gamma"),
    (["--alpha", "1.5"], "--alpha"),
    (["--batch-size", "x"], "--batch-size"),
    (["--val-every", "0"], "--val-every"),
    (["--seed", "-1"], "--seed"),
    (["--rank", "0"], "--rank"),
    (["--scale", "5"], "--scale"),
    (["--milestones", "1.5"], "lr_milestones"),
    (["--rank", "99"], "rank"),  # above the student's inner width
    (["--device", "tpu"], "tpu"),
    (["--device", "cuda:x"], "cuda:x"),
    (["--json", "/proc/result.json"], "--json"),
    (["--out-dir", "/proc/train"], "--out-dir"),
    (["--role", "teacher", "--alpha", "0.5"], "--alpha"),
    (["--teacher", "t.pt", "--alpha", "0"], "--alpha 0"),
    (["--experiment", "mine"], "--tracking-uri"),
]
if not torch.cuda.is_available():
    TRAIN_CASES.append((["--device", "cuda"], "CUDA is not available"))


@pytest.mark.usefixtures("no_work")
@pytest.mark.parametrize("flags,named", TRAIN_CASES, ids=[" ".join(c[0]) for c in TRAIN_CASES])
def test_training_flags_are_refused_up_front(tmp_path, capsys, flags, named):
    from trainers.train import main

    code = exit_code(main, ["--out-dir", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert named in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_teacher_uri_that_cannot_be_fetched_is_a_config_error(tmp_path):
    """Found by the driver once Ray is up (it fetches the teacher to validate it): one sentence,
    before any trial, instead of every trial failing on it."""
    from search import mlflow_util, study
    from search.config import load_config
    from search.stages import ensure_teacher

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = load_config(None, {"teacher.checkpoint": "runs:/0123456789abcdef/t.pt", "tracking_uri": uri})
    exp = study.ensure_experiment(uri, "t")
    run_id = mlflow_util.client(uri).create_run(exp).info.run_id
    s = study.Study(uri, exp, run_id, "s", cfg.training.iterations)
    with pytest.raises(
        ConfigError, match="teacher.checkpoint: runs:/0123456789abcdef/t.pt cannot be fetched"
    ):
        ensure_teacher(cfg, s, tmp_path / "s")
    assert s.teacher_uri is None  # not taken as the study's teacher by a --resume


def test_a_teacher_of_another_scale_is_a_config_error_before_any_trial(tmp_path):
    from dataclasses import asdict

    from model import build_model
    from search import mlflow_util, study
    from search.config import load_config
    from search.stages import ensure_teacher

    teacher = build_model("tiny", scale=2)
    path = tmp_path / "x2.pt"
    torch.save({"model_config": asdict(teacher.cfg), "model": teacher.state_dict()}, path)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = load_config(CONFIG_DIR / "smoke.yaml", {"teacher.checkpoint": str(path), "tracking_uri": uri})
    exp = study.ensure_experiment(uri, "t")
    s = study.Study(
        uri, exp, mlflow_util.client(uri).create_run(exp).info.run_id, "s", cfg.training.iterations
    )
    with pytest.raises(ConfigError, match=r"teacher.checkpoint: .*x2\.pt is a x2 model but the students"):
        ensure_teacher(cfg, s, tmp_path / "s")
    assert s.teacher_uri is None  # not taken as the study's teacher by a --resume
