"""edge-agent: run the daemon, measure one file, inspect the device, deploy over SSH.

edge-agent run --tracking-uri http://mlflow:5000 --device orin-nano
edge-agent measure model.onnx                          # JSON on stdout
edge-agent info                                        # device, backends, power sources
edge-agent deploy user@jetson --tracking-uri ... --device orin-nano
edge-agent remote-measure user@jetson model.onnx
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from edge_agent import argtypes, backends, contract, errors, power, preflight
from edge_agent.agent import STATE_DIR, Agent, AgentConfig, measure_file, setup_logging
from edge_agent.deploy import DEFAULT_REMOTE_DIR, deploy
from edge_agent.errors import UserError
from edge_agent.fileio import sha256_file
from edge_agent.measure import MeasureConfig
from edge_agent.remote_measure import DEFAULT_AGENT_CMD, remote_measure
from edge_agent.ssh import SYSTEM_KNOWN_HOSTS, USER_KNOWN_HOSTS, SshError

log = logging.getLogger("edge_agent.cli")


def device_name(text: str) -> str:
    """argparse type: a device type the contract accepts as part of a tag key (orin-nano)."""
    try:
        contract.status_tag(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _state_dir(text: str) -> Path:
    """argparse type: the state folder, checked writable (engine cache, outbox, downloads)."""
    return Path(argtypes.writable_dir(text)).expanduser()


def _add_measure_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=backends.BACKENDS, default="auto")
    p.add_argument("--precision", choices=backends.PRECISIONS, default="fp16")
    p.add_argument("--power", choices=("auto", *power.SOURCES, "none"), default="auto", help="power source")
    p.add_argument("--power-root", type=Path, default=Path("/"), help="root of /sys and /proc (tests)")
    p.add_argument("--warmup-s", type=argtypes.nonnegative_float, default=MeasureConfig.warmup_s)
    p.add_argument("--idle-s", type=argtypes.nonnegative_float, default=MeasureConfig.idle_s)
    p.add_argument(
        "--duration-s", type=argtypes.positive_float, default=MeasureConfig.duration_s, help="each window's"
    )
    p.add_argument(
        "--windows",
        type=argtypes.positive_int,
        default=MeasureConfig.windows,
        help="loaded windows per candidate: the figures are their means",
    )
    p.add_argument(
        "--pause-s",
        type=argtypes.nonnegative_float,
        default=MeasureConfig.pause_s,
        help="idle time between loaded windows",
    )
    p.add_argument(
        "--max-cv",
        type=argtypes.positive_float,
        default=MeasureConfig.max_cv,
        help="largest std/mean of latency (and energy) across the windows; above it the candidate is "
        "measured again once, then reported unstable and never ranked",
    )
    p.add_argument(
        "--rate-hz", type=argtypes.positive_float, default=MeasureConfig.rate_hz, help="power sampling rate"
    )
    # a string default goes through the type check too
    p.add_argument(
        "--state-dir", type=_state_dir, default=str(STATE_DIR), help="engine cache, outbox, downloads"
    )


def _measure_config(args: argparse.Namespace) -> MeasureConfig:
    return MeasureConfig(
        warmup_s=args.warmup_s,
        idle_s=args.idle_s,
        duration_s=args.duration_s,
        windows=args.windows,
        pause_s=args.pause_s,
        max_cv=args.max_cv,
        rate_hz=args.rate_hz,
    )


def cmd_measure(args: argparse.Namespace) -> int:
    model = args.model
    if not model.is_file():
        what = "is not a file" if model.exists() else "does not exist"
        print(f"error: {model} {what}; give the path of an ONNX model", file=sys.stderr)
        return 2
    try:
        digest = sha256_file(model)
    except OSError as exc:
        print(f"error: cannot read {model} ({exc.strerror or exc}); check its permissions", file=sys.stderr)
        return 2
    result = measure_file(
        model,
        digest,
        backend=args.backend,
        precision=args.precision,
        reader=power.discover(args.power_root, args.power),
        cfg=_measure_config(args),
        cache_dir=args.state_dir / "engines",
        power_root=args.power_root,
    )
    json.dump(result.to_json(), sys.stdout, indent=1)
    print()
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from edge_agent.device import collect_device_info

    found = {}
    for name in power.SOURCES:
        try:
            reader = power.discover(args.power_root, name)
            found[name] = reader.describe()
            reader.close()
        except power.PowerReadError as exc:
            found[name] = {"available": "no", "why": str(exc)}
    out = {
        "device": collect_device_info(args.power_root),
        "backends": {
            "auto": backends.resolve_backend("auto"),
            "trtexec": backends.trtexec_path() or "not found",
        },
        "power_sources": found,
    }
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    # MLflow's client retries a dead server for minutes by default; the agent has its own
    # back-off and outbox, so fail fast (users can still override these in the environment)
    preflight.limit_mlflow_retries()
    # the log is one JSON object per line: MLflow's download progress bars (on stderr, which a
    # service's journal and the search's agent.log take in too) would break it
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    problem = preflight.missing_database_problem(args.tracking_uri)  # the agent measures what a search wrote
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    if args.once:  # one pass is a command, not a service: a dead server ends it at once
        problem = preflight.tracking_server_problem(args.tracking_uri)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
    cfg = AgentConfig(
        tracking_uri=args.tracking_uri,
        device=args.device,
        model_name=args.model_name,
        state_dir=args.state_dir,
        poll_s=args.poll_s,
        takeover_s=args.takeover_s,
        backend=args.backend,
        precision=args.precision,
        power=args.power,
        power_root=args.power_root,
        measure=_measure_config(args),
    )
    agent = Agent(cfg)
    previous = {sig: signal.signal(sig, agent.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    if args.stop_with_parent is not None:
        if os.getppid() != args.stop_with_parent:  # not our parent, or it died while we started
            print(
                f"error: --stop-with-parent {args.stop_with_parent}: that process is not (or no longer) "
                "the one that started this agent; give the id of the starting process",
                file=sys.stderr,
            )
            return 1
        _stop_when_orphaned(agent, args.stop_with_parent)
    try:
        if args.once:
            agent.poll_once()
        else:
            agent.run_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _stop_when_orphaned(agent: Agent, parent: int, period_s: float = 1.0) -> None:
    """Stop ``agent`` (handing back an unfinished claim) once the process that started it is gone,
    however it went (kill -9 included): this process is then re-parented, and its parent id
    changes."""

    def watch():
        while not agent.stopping:
            if os.getppid() != parent:
                log.info("the process that started this agent exited; stopping")
                agent.request_stop()
                return
            time.sleep(period_s)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _port(text: str) -> int:
    """argparse type: a TCP port, 1 to 65535."""
    port = argtypes.positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, got {text}")
    return port


def _add_ssh_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``deploy`` and ``remote-measure``: the workstation's side, over SSH."""
    conn = argparse.ArgumentParser(add_help=False)
    group = conn.add_argument_group("SSH connection")
    group.add_argument(
        "--identity", type=Path, help="private key file (default: ssh-agent, then ~/.ssh/id_*)"
    )
    group.add_argument(
        "--known-hosts",
        type=Path,
        help="the known_hosts file to check, and to add to with --accept-new-host-key "
        f"(default: {SYSTEM_KNOWN_HOSTS} and {USER_KNOWN_HOSTS})",
    )
    group.add_argument(
        "--accept-new-host-key",
        action="store_true",
        help="trust an unknown host key on first use and add it to known_hosts (OpenSSH's "
        "StrictHostKeyChecking=accept-new); a changed key is refused all the same",
    )
    group.add_argument("--port", type=_port, help="SSH port when TARGET names none (default 22)")

    p = subparsers.add_parser(
        "deploy",
        parents=[conn],
        help="install the agent on a device over SSH and start it as a systemd service",
        description="Build the agent's wheel (edge_agent alone), copy it to the device, install it in a "
        "venv there and start `edge-agent run` as the systemd service edge-agent. Secrets such as "
        "MLFLOW_TRACKING_TOKEN go in REMOTE_DIR/agent.env on the device, never on this command line.",
    )
    p.add_argument("target", metavar="TARGET", help="user@host[:port]; the service runs as that user")
    p.add_argument("--tracking-uri", required=True, help="MLflow tracking server, without credentials")
    p.add_argument(
        "--device",
        type=device_name,
        required=True,
        help="device name the agent measures for (e.g. orin-nano-8gb)",
    )
    p.add_argument(
        "--remote-dir", default=DEFAULT_REMOTE_DIR, help="folder on the device (default: %(default)s)"
    )
    p.add_argument(
        "--python", default="python3", help="the device's Python for the venv (default: %(default)s)"
    )
    p.add_argument(
        "--pip-arg",
        action="append",
        default=[],
        dest="pip_args",
        help="extra pip install argument; repeat; use --pip-arg=--flag",
    )
    p.add_argument(
        "--service-cmd",
        action="append",
        dest="service_cmds",
        help="remote command run last, with $unit, $remote_dir, $venv; repeat; replaces the systemd "
        "defaults (install the unit, daemon-reload, enable, restart)",
    )
    p.add_argument(
        "--agent-arg",
        action="append",
        default=[],
        dest="agent_args",
        help="extra `edge-agent run` argument; repeat; use --agent-arg=--poll-s --agent-arg=60",
    )
    p.set_defaults(func=cmd_deploy)

    measure_opts = argparse.ArgumentParser(add_help=False, parents=[conn])
    measure_opts.add_argument(
        "--agent-cmd", default=DEFAULT_AGENT_CMD, help="the agent on the device (default: %(default)s)"
    )
    p = subparsers.add_parser(
        "remote-measure",
        parents=[measure_opts],
        help="measure an ONNX model on a device over SSH and print the JSON",
        description="Copy MODEL to a temporary folder on the device, run `edge-agent measure` there, "
        "print its JSON and remove the folder. Arguments after -- go to `edge-agent measure`.",
    )
    p.add_argument("target", metavar="TARGET", help="user@host[:port]")
    p.add_argument("model", metavar="MODEL.onnx", type=Path)
    # REMAINDER, not "*": argparse (3.10, 3.11) leaves a "*" positional empty when options sit between
    # MODEL and "--". The handler takes this command's own options back out of it.
    p.add_argument(
        "rest", nargs=argparse.REMAINDER, metavar="-- MEASURE_ARGS", help="for `edge-agent measure`"
    )
    own = argparse.ArgumentParser(prog=p.prog, add_help=False, allow_abbrev=False, parents=[measure_opts])
    p.set_defaults(func=functools.partial(cmd_remote_measure, options=own))


def _connect_kw(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "port": args.port,
        "identity": args.identity,
        "known_hosts": args.known_hosts,
        "accept_new_host_key": args.accept_new_host_key,
    }


def cmd_deploy(args: argparse.Namespace) -> int:
    try:
        report = deploy(
            args.target,
            tracking_uri=args.tracking_uri,
            device=args.device,
            remote_dir=args.remote_dir,
            python=args.python,
            pip_args=args.pip_args,
            agent_args=args.agent_args,
            service_cmds=args.service_cmds,
            **_connect_kw(args),
        )
    except SshError as e:
        return errors.fail(e, "edge-agent deploy")
    print(f"Installed {report.wheel} on {report.host} in {report.venv}; unit {report.unit}.")
    if args.service_cmds is None:
        print(
            "The edge-agent service is running; follow its log on the device with: "
            "journalctl -u edge-agent -f"
        )
    return 0


def cmd_remote_measure(args: argparse.Namespace, *, options: argparse.ArgumentParser) -> int:
    """``remote-measure``; ``options`` parses this command's options found after MODEL."""
    rest = list(args.rest)
    cut = rest.index("--") if "--" in rest else len(rest)
    args, unknown = options.parse_known_args(rest[:cut], namespace=args)
    measure_args = unknown + rest[cut + 1 :]
    try:
        result = remote_measure(
            args.target, args.model, measure_args=measure_args, agent_cmd=args.agent_cmd, **_connect_kw(args)
        )
    except SshError as e:
        return errors.fail(e, "edge-agent remote-measure")
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the daemon: measure every candidate registered for this device type")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), required=False)
    p.add_argument(
        "--device",
        type=device_name,
        required=True,
        help="device type, e.g. orin-nano (one measurement per type)",
    )
    p.add_argument("--model-name", default=contract.REGISTERED_MODEL)
    p.add_argument("--poll-s", type=argtypes.positive_float, default=AgentConfig.poll_s)
    p.add_argument(
        "--takeover-s",
        type=argtypes.positive_float,
        default=AgentConfig.takeover_s,
        help="seconds without a heartbeat after which other agents take over this agent's claims "
        "(written into each claim; claims of older agents are judged by this value)",
    )
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.add_argument(
        "--stop-with-parent",
        type=argtypes.positive_int,
        metavar="PID",
        help="the id of the process that starts this agent: stop when it exits, even if it was "
        "killed (a search's local agent)",
    )
    _add_measure_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("measure", help="measure one ONNX file; JSON on stdout")
    p.add_argument("model", type=Path)
    _add_measure_options(p)
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("info", help="device model, backends and power sources found")
    p.add_argument("--power-root", type=Path, default=Path("/"))
    p.set_defaults(func=cmd_info)

    _add_ssh_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # stdout carries `measure`'s JSON; logs go to stderr there, to stdout (journald) for the daemon
    setup_logging(
        logging.DEBUG if args.verbose else logging.INFO, sys.stdout if args.command == "run" else sys.stderr
    )
    if args.command == "run" and not args.tracking_uri:
        print("error: give --tracking-uri or set MLFLOW_TRACKING_URI", file=sys.stderr)
        return 2
    problem = contract.credential_problem(getattr(args, "tracking_uri", None))
    if problem and args.command != "deploy":  # deploy says where the credential goes on the device
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (UserError, ValueError) as exc:
        return errors.fail(exc)


if __name__ == "__main__":
    sys.exit(main())
