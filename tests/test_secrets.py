"""A tracking URI with a credential is refused by every CLI before any work, without echoing it."""

import pytest

SECRET = "planted-s3cret"
URIS = [
    f"http://alice:{SECRET}@127.0.0.1:5999",
    f"http://{SECRET}@127.0.0.1:5999",  # a token given as the user name
    f"https://127.0.0.1:5999/?token={SECRET}",
]


def run_search(uri):
    from search.run import main

    return main(["--smoke-test", "--tracking-uri", uri])


def run_select(uri):
    from search.selection import main

    return main(["--experiment", "mambalitesr", "--tracking-uri", uri])


def run_train(uri):
    from trainers.train import main

    return main(["--role", "student", "--alpha", "0", "--iterations", "1", "--tracking-uri", uri])


def run_evaluate(uri):
    from trainers.evaluate import main

    return main(["--model", "bicubic", "--data", "nowhere", "--tracking-uri", uri])


def run_agent(uri):
    from edge_agent.cli import main

    return main(["run", "--once", "--device", "cpu", "--tracking-uri", uri])


@pytest.mark.parametrize("uri", URIS)
@pytest.mark.parametrize("cli", [run_search, run_select, run_train, run_evaluate, run_agent])
def test_a_credential_in_the_tracking_uri_is_refused(cli, uri, capsys):
    assert cli(uri) == 2
    out, err = capsys.readouterr()
    assert "carries a credential" in err and "MLFLOW_TRACKING_PASSWORD" in err
    assert SECRET not in out + err and "Traceback" not in err


@pytest.mark.parametrize("cli", [run_search, run_select, run_train, run_evaluate, run_agent])
def test_a_credential_in_mlflow_tracking_uri_is_refused(cli, capsys, monkeypatch):
    """Even beside a clean --tracking-uri: what the command starts (Ray's workers, an agent)
    inherits the environment."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", URIS[0])
    assert cli("http://127.0.0.1:5999") == 2
    out, err = capsys.readouterr()
    assert "MLFLOW_TRACKING_URI (the environment) carries a credential" in err
    assert SECRET not in out + err and "Traceback" not in err


def test_uris_without_credentials_pass():
    from edge_agent.contract import uri_credential_problem

    for uri in ("sqlite:///mlflow.db", "http://127.0.0.1:5000", "https://mlflow.example.com/path", None, ""):
        assert uri_credential_problem(uri) is None, uri
