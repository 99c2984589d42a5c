"""`twist serve` as a real process, with its own local Ray (never the test session's): bearer
API keys over HTTP, keys kept out of its logs, and Ctrl-C / SIGTERM stopping it (Serve app
and Ray processes) within 10 s."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from ray_nodes import free_port

from ray_twist.backbone import save_random_lora
from ray_twist.serve.config import AuthSettings
from ray_twist.settings import ConfigError

STOP_S = 10.0
KEY, OTHER_KEY, WRONG_KEY = "k-good-3f9a1c", "k-second-77d0", "k-wrong-b52e08"


def _processes_under(path: str) -> list[int]:
    """Pids whose command line names `path` (the Ray processes of that temp dir's cluster)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and path.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.2)


def test_api_keys_from_file_and_variable(tmp_path, monkeypatch) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# ops keys\n{KEY}\n\n  {OTHER_KEY}  \n")
    monkeypatch.setenv("TWIST_TEST_KEYS", "a1, b2\tc3")
    auth = AuthSettings(api_keys_file=str(keys), api_keys_env="TWIST_TEST_KEYS")
    assert auth.api_keys() == [KEY, OTHER_KEY, "a1", "b2", "c3"]
    assert not AuthSettings().enabled
    monkeypatch.setenv("TWIST_TEST_KEYS", " ")
    with pytest.raises(ConfigError, match=r"auth.api_keys_env: \$TWIST_TEST_KEYS is unset"):
        AuthSettings(api_keys_env="TWIST_TEST_KEYS").api_keys()
    with pytest.raises(ConfigError, match="auth.api_keys_file .*missing: No such file"):
        AuthSettings(api_keys_file=str(tmp_path / "missing")).api_keys()
    keys.write_text("# only a comment\n")
    with pytest.raises(ConfigError, match="holds no key"):
        AuthSettings(api_keys_file=str(keys)).api_keys()


@pytest.fixture(scope="module")
def served_files(tiny_backbones, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("serve_process")
    base = tiny_backbones["t5"]
    return {"base": base, "formal": save_random_lora(base, root / "formal", rank=2)}


@pytest.mark.parametrize(
    ("signame", "when"),
    [("SIGINT", "serving"), ("SIGTERM", "starting")],
    ids=["ctrl-c-to-the-process-group-while-serving", "sigterm-while-starting"],
)
def test_twist_serve_stops_on_a_signal(served_files, signame: str, when: str) -> None:
    """SIGINT goes to the whole process group, as a terminal's Ctrl-C does, once the app
    serves (after the auth checks below); SIGTERM goes to the process while Serve is
    still deploying. Either way `twist serve` exits 0 within 10 s and its Ray processes
    are gone by then. While serving with API keys (from an environment variable): 401 in
    the error shape without a key or with a wrong one, 200 with a key, /healthz and /docs
    open; neither key shows up in the output or in any of the Ray session's logs."""
    tmp = tempfile.mkdtemp(prefix="rt-sig-")  # short: Ray's socket paths must stay < 108 chars
    port = free_port()
    config = {
        "name": "sigtest",
        "base_model": served_files["base"],
        "styles": {"formal": served_files["formal"]},
        "generator": {"num_replicas": 1, "num_cpus": 0.5},
        "ingress": {"num_replicas": 1, "num_cpus": 0.1},
        "http": {"host": "127.0.0.1", "port": port},
        "auth": {"api_keys_env": "TWIST_TEST_KEYS"},
    }
    (Path(tmp) / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_TMPDIR": tmp, "TWIST_TEST_KEYS": f"{KEY},{OTHER_KEY}"}
    log = Path(tmp) / "out.log"
    cmd = [sys.executable, "-m", "ray_twist.cli", "serve", "--config", f"{tmp}/serve.yaml"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        if when == "serving":
            _wait_for(lambda: b"serving on" in log.read_bytes(), 150, "'serving on'")
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
                for headers in ({}, {"Authorization": f"Bearer {WRONG_KEY}"},
                                {"Authorization": KEY}):  # fmt: skip
                    r = c.get("/v1/styles", headers=headers)
                    assert r.status_code == 401, (headers, r.text)
                    assert r.json()["error"] == "unauthorized", r.text
                    assert r.json()["field"] == "authorization", r.text
                    assert WRONG_KEY not in r.text and KEY not in r.text
                    assert r.headers["www-authenticate"] == "Bearer"
                body = {"texts": ["the dog runs"], "style": "formal"}
                assert c.post("/v1/restyle", json=body).status_code == 401
                ok = c.post("/v1/restyle", json=body, headers={"Authorization": f"Bearer {KEY}"})
                assert ok.status_code == 200, ok.text
                styles = c.get("/v1/styles", headers={"Authorization": f"bearer {OTHER_KEY}"})
                assert styles.status_code == 200, styles.text
                assert c.get("/healthz").status_code == 200
                assert c.get("/docs").status_code == 200
        else:
            _wait_for(lambda: list(Path(tmp).glob("ray/session_*")), 150, "Ray session")
            time.sleep(1.0)  # Serve is starting or deploying now
            assert proc.poll() is None
        sent = time.monotonic()
        if signame == "SIGINT":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=STOP_S)
        _wait_for(lambda: not _processes_under(tmp), STOP_S - (time.monotonic() - sent),
                  "end of the Ray processes")  # fmt: skip
        took = time.monotonic() - sent
        print(f"\n{signame} while {when}: exit {code}, Ray gone, {took:.1f} s after the signal")
        assert code == 0, log.read_text()[-3000:]
        assert (b"serving on" in log.read_bytes()) == (when == "serving")  # stopped while starting
        for path in Path(tmp).rglob("*"):
            if path.is_file() and path.name != "serve.yaml":
                text = path.read_bytes()
                assert WRONG_KEY.encode() not in text and KEY.encode() not in text, path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in _processes_under(tmp):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
