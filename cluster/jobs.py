"""`scratchpad submit / status / logs / stop`: a run as a Ray job, through Ray's JobSubmissionClient.

The job uploads the current directory (the project) as its working_dir and runs
`scratchpad train CONFIG ...` there; the driver joins the cluster through the
RAY_ADDRESS Ray sets for it. Every failure to reach the cluster is one line.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shlex
from pathlib import Path

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded: virtual environments, run outputs, git history, caches (Ray also skips what .gitignore lists).
EXCLUDES = [".venv", "venv", "runs", ".git", "**/__pycache__", ".pytest_cache", "*.egg-info", ".mypy_cache", ".ruff_cache"]
# `ray job stop` sends SIGTERM, then SIGKILL after this many seconds; a run needs the rest of its step and a checkpoint.
STOP_WAIT_S = "120"


class JobError(Exception):
    """A job command that cannot be carried out (cluster unreachable, unknown job): one line, exit code 2."""


def resolve_address(address: str | None) -> str:
    """--address, else $RAY_ADDRESS, else the local dashboard."""
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def auth_headers() -> dict[str, str]:
    """The bearer token a token-authenticated cluster wants, from where Ray itself keeps it.

    Ray 2.60 turns token authentication on for a `ray start --head` cluster whenever ~/.ray/auth_token exists,
    but its job client only sends the token when RAY_AUTH_MODE=token is set on the client side. We send it
    whenever a token is at hand (a cluster without authentication ignores the header), unless
    RAY_AUTH_MODE=disabled says not to.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str | None):
    """A JobSubmissionClient for the resolved address, or JobError naming the address and why."""
    url = resolve_address(address)
    logging.getLogger("ray").setLevel(logging.WARNING)  # keep Ray's per-file upload notes out of the user's terminal
    # Ray's client lets $RAY_ADDRESS override its argument; --address must win, so hide the variable from it.
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(url, headers=auth_headers())
    except ConnectionError:
        raise JobError(f"cannot reach the Ray dashboard at {url} (set --address or $RAY_ADDRESS)") from None
    except AuthenticationError:
        raise JobError(f"the Ray cluster at {url} refused our token (set $RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH, "
                       f"or run on the head node where ~/.ray/auth_token is)") from None
    except RuntimeError as exc:
        raise JobError(f"the Ray dashboard at {url} answered: {str(exc).splitlines()[0]}") from None
    finally:
        os.environ.update(saved)


def submit(config: str, overrides: list[str], run_dir: str, address: str | None, env: dict[str, str]) -> tuple[str, str]:
    """Submit `scratchpad train CONFIG overrides --run-dir RUN_DIR`; returns (job id, dashboard address)."""
    client = connect(address)
    entrypoint = shlex.join(["scratchpad", "train", config, *overrides, "--run-dir", run_dir])
    env_vars = {"PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": STOP_WAIT_S,
                **{k: v for k, v in os.environ.items() if k.startswith("SCRATCHPAD_")}, **env}
    runtime_env = {"working_dir": os.getcwd(), "excludes": EXCLUDES, "env_vars": env_vars}
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata={"run_dir": run_dir})
    except RuntimeError as exc:
        raise JobError(f"the Ray cluster at {client.get_address()} refused the job: {str(exc).splitlines()[0]}") from None
    return job_id, client.get_address()


def _info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        if "404" in str(exc):
            raise JobError(f"no job {job_id!r} on the Ray cluster at {client.get_address()}") from None
        raise JobError(f"the Ray dashboard at {client.get_address()} answered: {str(exc).splitlines()[0]}") from None


def status(job_id: str, address: str | None) -> dict:
    """The job's status, message, entrypoint and run directory."""
    client = connect(address)
    info = _info(client, job_id)
    return {"job": job_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message or "", "entrypoint": info.entrypoint,
            "run_dir": (info.metadata or {}).get("run_dir", ""), "dashboard": client.get_address()}


def logs(job_id: str, address: str | None, follow: bool, write) -> None:
    """Print the job's logs so far, or with `follow` stream them until the job ends."""
    client = connect(address)
    _info(client, job_id)
    if not follow:
        write(client.get_job_logs(job_id))
        return

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())


def stop(job_id: str, address: str | None) -> bool:
    """Ask Ray to stop the job (SIGTERM to the driver: the run checkpoints after its current step)."""
    client = connect(address)
    _info(client, job_id)
    return client.stop_job(job_id)
