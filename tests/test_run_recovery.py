"""How the search driver (search/run.py) recovers, piece by piece and without Ray running: a Ctrl-C
told apart from a short fit, a lost disk or server named, damaged saved state set aside, and what
a resumed round still has to run. The end-to-end tests (test_search_e2e.py) drive the same paths
through the command line; these pin each decision in-process."""

import errno
import os
import signal
import socket
import sqlite3
from types import SimpleNamespace

import pytest

from search import compat, run
from search.config import load_config
from search.study import TrialRow


def smoke_cfg():
    return load_config(load_config.__globals__["CONFIG_DIR"] / "smoke.yaml")


# --- Ctrl-C during a fit ---------------------------------------------------------------------------


def test_ctrl_c_during_a_fit_is_recorded_and_handed_to_tune_as_sigusr1():
    """Inside during_fit a SIGINT is recorded and turned into SIGUSR1 (Tune's own way to stop and
    save); before Tune has its SIGUSR1 handler, that SIGUSR1 is a KeyboardInterrupt. The handlers
    in place before are back afterwards, and Tune's SIGINT handler is off."""
    before_int, before_usr1 = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)
    ctrl_c = compat.CtrlC()
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c.during_fit():
            assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"
            assert signal.getsignal(signal.SIGINT) not in (before_int, signal.default_int_handler)
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # Python runs the handlers between bytecodes of this thread
                pass
    assert ctrl_c.pressed
    assert signal.getsignal(signal.SIGINT) is before_int
    assert signal.getsignal(signal.SIGUSR1) is before_usr1


def test_a_fit_that_returns_without_ctrl_c_is_not_taken_for_one():
    ctrl_c = compat.CtrlC()
    with ctrl_c.during_fit():
        pass
    assert not ctrl_c.pressed


# --- what was lost -------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_full_disk_is_named_with_what_said_so_wherever_it_sits_in_the_chain(tmp_path):
    live = f"sqlite:///{tmp_path / 'mlflow.db'}"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/ckpt.pt")
    what, todo = run._lost_resource(full, live)
    assert what.startswith("the disk filled up (") and "No space left on device" in what
    assert todo == "free some space"

    try:  # SQLite's own words, two causes down, under MLflow's exception
        try:
            try:
                raise sqlite3.OperationalError("database or disk is full")
            except sqlite3.OperationalError as exc:
                raise RuntimeError(
                    "(sqlite3.OperationalError) database or disk is full\n[SQL: INSERT]"
                ) from exc
        except RuntimeError:
            raise ValueError("could not log the metric")  # noqa: B904 (an implicit __context__)
    except ValueError as outer:
        what, _ = run._lost_resource(outer, live)
    assert what == "the disk filled up ((sqlite3.OperationalError) database or disk is full)"


def test_a_tracking_server_that_stopped_answering_is_named_and_other_faults_are_not(tmp_path):
    dead = f"http://127.0.0.1:{_closed_port()}"
    what, todo = run._lost_resource(RuntimeError("API request failed"), dead)
    assert what == f"the tracking server at {dead} stopped answering" and todo == "start it again"
    # a fault of the search itself, with its store still there: its traceback is what to report
    assert run._lost_resource(KeyError("embed_dim"), f"sqlite:///{tmp_path / 'mlflow.db'}") is None


# --- damaged saved state -------------------------------------------------------------------------


def test_rays_saved_state_that_cannot_be_read_is_set_aside_and_the_round_goes_on(tmp_path, capsys):
    state = tmp_path / "ray"
    state.mkdir()
    (state / "tuner.pkl").write_bytes(b"not a pickle")
    (state / "experiment_state-2026-12-03.json").write_text("{")
    results = run._restored(str(state), lambda config: None, 2, compat.CtrlC())
    assert results == []
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("ray.damaged-")]
    assert not state.exists() and len(aside) == 1 and (aside[0] / "tuner.pkl").read_bytes() == b"not a pickle"
    said = capsys.readouterr().out
    assert f"round 2: Ray's saved state in {state} cannot be read (" in said
    assert f"set aside as {aside[0]}" in said and "decided from MLflow" in said


def _row(trial_id, k, status="complete", psnr=25.0, cost=1.0, **knobs):
    return TrialRow(
        trial_id,
        f"run-{trial_id}",
        status,
        step=8,
        val_psnr_y=psnr,
        cost=cost,
        round=k,
        knobs={"embed_dim": 12, "rank": 2, "alpha": 0.5, **knobs},
    )


def test_a_searcher_database_that_cannot_be_opened_is_rebuilt_from_mlflows_trials(tmp_path, capsys):
    import optuna

    cfg = smoke_cfg()
    db = tmp_path / "optuna.db"
    db.write_bytes(b"this is not an SQLite file" * 100)
    known = [
        _row("a", 1, psnr=25.0, cost=2.0),
        _row("b", 1, psnr=26.0, cost=3.0, embed_dim=8),
        _row("c", 1, status="failed"),
    ]
    searcher = run._searcher(cfg, "s-r2", tmp_path, 2, known)
    assert searcher is not None
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("optuna.db.damaged-")]
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    said = capsys.readouterr().out
    assert f"round 2: the searcher's database {db} cannot be opened (" in said
    assert "starts again from the 2 fully trained trial(s) MLflow holds" in said
    seeded = optuna.load_study(study_name="s-r2", storage=f"sqlite:///{db}")
    assert sorted(t.values for t in seeded.trials) == [[25.0, 2.0], [26.0, 3.0]]


def test_a_readable_searcher_database_is_kept(tmp_path, capsys):
    cfg = smoke_cfg()
    run._searcher(cfg, "s", tmp_path, 1, [])  # creates it
    run._searcher(cfg, "s", tmp_path, 1, [_row("a", 1)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optuna.db"]
    assert "cannot be opened" not in capsys.readouterr().out


# --- what a resumed round still runs ---------------------------------------------------------------


class FakeStudy:
    name = "s"

    def __init__(self, rows):
        self.rows, self.settled = rows, []

    def settle(self, results, k, objectives):
        self.settled.append((list(results), k))

    def trials(self, cost):
        return self.rows


@pytest.fixture
def fresh(monkeypatch):
    """Round k's new Tune runs as (Tune run name, trials, seed rows, known rows), instead of run."""
    calls = []

    def fake(k, cfg, ctx, storage, ray_storage, ray_name, study_name, n, seed, known, ctrl_c):
        calls.append((ray_name, study_name, n, seed, known))
        return [f"new-{i}" for i in range(n)]

    monkeypatch.setattr(run, "_fresh_round", fake)
    return calls


def test_a_new_round_runs_all_its_trials_seeded_with_the_earlier_rounds(tmp_path, fresh):
    cfg = smoke_cfg()
    earlier = [_row("a", 1)]
    ctx = SimpleNamespace(study=FakeStudy([]))
    out = run.run_round(2, cfg, False, ctx, tmp_path, str(tmp_path / "s"), earlier, compat.CtrlC())
    assert fresh == [("ray-r2", "s-r2", cfg.num_samples, earlier, earlier)]
    assert len(out) == cfg.num_samples


def test_a_resumed_round_without_saved_state_makes_up_what_mlflow_lacks(tmp_path, fresh, capsys):
    cfg = smoke_cfg()
    n = cfg.num_samples
    rows = [_row(f"t{i}", 1) for i in range(n - 1)] + [_row("earlier", 0)]
    ctx = SimpleNamespace(study=FakeStudy(rows))
    out = run.run_round(1, cfg, True, ctx, tmp_path, str(tmp_path / "s"), [], compat.CtrlC())
    assert fresh == [("ray", "s", 1, [], rows)] and out == ["new-0"]
    assert ctx.study.settled == [([], 1)]
    assert f"round 1: MLflow holds {n - 1} of its {n} trials; 1 new trial(s) make up the round" in (
        capsys.readouterr().out
    )


def test_a_resumed_round_that_mlflow_holds_whole_runs_nothing_new(tmp_path, fresh):
    cfg = smoke_cfg()
    ctx = SimpleNamespace(study=FakeStudy([_row(f"t{i}", 1) for i in range(cfg.num_samples)]))
    assert run.run_round(1, cfg, True, ctx, tmp_path, str(tmp_path / "s"), [], compat.CtrlC()) == []
    assert fresh == []


def test_the_make_up_run_takes_the_second_name_and_a_third_is_refused(tmp_path, fresh):
    cfg = smoke_cfg()
    ray_storage = tmp_path / "s"
    (ray_storage / "ray-r3").mkdir(parents=True)  # there, but not a state Tune can restore
    ctx = SimpleNamespace(study=FakeStudy([]))
    run.run_round(3, cfg, True, ctx, tmp_path, str(ray_storage), [], compat.CtrlC())
    assert [c[:3] for c in fresh] == [("ray-r3-more", "s-r3", cfg.num_samples)]
    (ray_storage / "ray-r3-more").mkdir()
    with pytest.raises(run.StudyFailed, match=r"round 3 needs \d+ more trial\(s\).*ray-r3, ray-r3-more"):
        run.run_round(3, cfg, True, ctx, tmp_path, str(ray_storage), [], compat.CtrlC())


def test_a_ctrl_c_while_restoring_returns_what_tune_gave_back(tmp_path, fresh, monkeypatch):
    from ray import tune

    cfg = smoke_cfg()
    ctrl_c = compat.CtrlC()
    restored = []

    def fake_restored(path, trainable, k, c):
        restored.append(path)
        c.pressed = True
        return ["old-0"]

    monkeypatch.setattr(tune.Tuner, "can_restore", staticmethod(lambda path: True))
    monkeypatch.setattr(run, "_restored", fake_restored)
    monkeypatch.setattr(run, "_trainable", lambda cfg, ctx: None)
    ctx = SimpleNamespace(study=FakeStudy([]))
    assert run.run_round(1, cfg, True, ctx, tmp_path, str(tmp_path / "s"), [], ctrl_c) == ["old-0"]
    assert restored == [str(tmp_path / "s" / "ray")] and fresh == [] and ctx.study.settled == []


def test_a_round_where_every_trial_failed_names_the_first_error():
    results = [
        SimpleNamespace(error=RuntimeError("CUDA out of memory\nTried to allocate 2 GiB")),
        SimpleNamespace(error=None),
        SimpleNamespace(error=ValueError("x")),
    ]
    said = run._all_failed_message(results, 2, "/runs/s")
    assert said.startswith("all 2 trials of round 2 failed, so nothing was registered")
    assert "the first error: RuntimeError: Tried to allocate 2 GiB" in said and "/runs/s" in said
    assert "none recorded" in run._all_failed_message([SimpleNamespace(error=None)], 1, "/r")
