"""Test helpers: a throwaway multi-node Ray cluster on this machine, and `ray job submit`.

Every node is `ray start --block` in its own session, with its own free ports and temp dir,
so it cannot clash with any other Ray here; afterwards its process group (and any stray
process naming its temp dir) is killed and nothing else: `ray stop` would stop every Ray on
the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
HOST = "127.0.0.1"
# what a dashboard that is overloaded or (re)starting does to a request, as the CLI prints it
TRANSIENT = (
    "ConnectionError",
    "Connection aborted",
    "RemoteDisconnected",
    "Connection refused",
    "Connection reset",
    "Failed to connect",
    "timed out",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def own_processes(temp_dir: str) -> list[int]:
    """Pids whose command line names `temp_dir` (so belong to that node alone)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if temp_dir.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@dataclass
class Node:
    name: str
    process: subprocess.Popen[bytes]
    temp_dir: str

    @property
    def node_name(self) -> str:
        return Path(self.temp_dir).name

    @property
    def log(self) -> str:
        with contextlib.suppress(OSError):
            return Path(self.temp_dir, "node.log").read_text(errors="replace")[-3000:]
        return ""

    def kill(self) -> None:
        """A throwaway node needs no graceful stop: SIGKILL its own process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=60)
        for pid in own_processes(self.temp_dir):  # anything that left the session
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class NodeExited(RuntimeError):
    def __init__(self, node: Node) -> None:
        super().__init__(f"{node.name} node exited:\n{node.log}")
        self.node = node


@dataclass
class LocalCluster:
    dashboard: str = ""  # http://127.0.0.1:PORT: the job and state APIs
    gcs: str = ""  # 127.0.0.1:PORT: what `ray start --address` and `ray.init` take
    nodes: list[Node] = field(default_factory=list)
    node_ids: dict[str, str] = field(default_factory=dict)  # node name → Ray node id

    def check_alive(self) -> None:
        for node in self.nodes:
            if node.process.poll() is not None:
                raise NodeExited(node)


def _flags(options: dict[str, object]) -> list[str]:
    """{"--flag": value, "--switch": None} → ["--flag", "value", "--switch"]."""
    return [str(x) for flag, value in options.items() for x in (flag, value) if x is not None]


def _start_node(name: str, options: dict[str, object], env: dict[str, str]) -> Node:
    temp_dir = tempfile.mkdtemp(prefix=f"rtn{name[0]}", dir="/tmp")  # short: unix socket paths
    common = {
        "--block": None,
        "--disable-usage-stats": None,
        "--node-name": Path(temp_dir).name,  # Node.node_name: tells this start from others
        "--temp-dir": temp_dir,
        "--resources": json.dumps({f"{name}_slot": 1}),
        "--object-store-memory": 200 * 2**20,
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    command = [RAY, "start", *_flags(common | options)]
    with open(Path(temp_dir, "node.log"), "wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Node(name, process, temp_dir)


def wait_for_job_api(address: str, cluster: LocalCluster | None = None, timeout: float = 300):
    """A `JobSubmissionClient` once the dashboard's job API answers."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            client = JobSubmissionClient(address)
            client.list_jobs()
            return client
        except AuthenticationError:
            raise  # waiting does not help
        except Exception as exc:
            if cluster is not None:
                cluster.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"job API at {address} not up in {timeout:.0f} s") from exc
            time.sleep(2)


# `ray start` gives its raylet 30 s to register with the GCS and exits after that; a loaded
# machine can take longer, so a node that exits before it is up is started again
STARTS = 3


@contextlib.contextmanager
def local_cluster(workers: int = 1, num_cpus: int = 2) -> Iterator[LocalCluster]:
    """A head (dashboard on 127.0.0.1) and `workers` worker nodes, `num_cpus` logical CPUs
    each; node `NAME` ("head", "worker", "worker2", ...) carries the custom resource
    `NAME_slot: 1`. Yields once every node is alive in the cluster."""
    from ray.util.state import list_nodes

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # `ray start --head` turns token auth on unless told otherwise, but this process's job and
    # state clients use it only under RAY_AUTH_MODE=token (which `ray.init` sets): make the
    # cluster do what the clients here do
    env["RAY_AUTH_MODE"] = os.environ.get("RAY_AUTH_MODE", "disabled")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"
    cluster = LocalCluster()
    names = ["head"] + [f"worker{i + 1}" if i else "worker" for i in range(workers)]
    starts = dict.fromkeys(names, 0)

    def start(name: str) -> None:
        starts[name] += 1
        if name == "head":
            gcs_port, dashboard_port = free_port(), free_port()
            cluster.gcs, cluster.dashboard = f"{HOST}:{gcs_port}", f"http://{HOST}:{dashboard_port}"
            options: dict[str, object] = {
                "--head": None,
                "--port": gcs_port,
                "--include-dashboard": "true",
                "--dashboard-host": HOST,
                "--dashboard-port": dashboard_port,
                "--ray-client-server-port": free_port(),
            }
        else:
            options = {"--address": cluster.gcs}
        cluster.nodes.append(_start_node(name, options | {"--num-cpus": num_cpus}, env))

    def restart(exited: NodeExited) -> None:
        node = exited.node
        if starts[node.name] >= STARTS or node.name in cluster.node_ids:
            raise exited
        cluster.nodes.remove(node)
        node.kill()
        start(node.name)

    try:
        start("head")
        while True:
            try:
                wait_for_job_api(cluster.dashboard, cluster)
                break
            except NodeExited as exited:
                restart(exited)
        for name in names[1:]:
            start(name)
        deadline = time.monotonic() + 300
        while len(cluster.node_ids) < len(names):
            try:
                cluster.check_alive()
            except NodeExited as exited:
                if exited.node.name == "head":
                    raise
                restart(exited)
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.name}\n{n.log}" for n in cluster.nodes)
                raise TimeoutError(f"nodes alive: {sorted(cluster.node_ids)} of {names}\n{logs}")
            time.sleep(2)
            with contextlib.suppress(Exception):  # the state API may not answer yet
                alive = list_nodes(
                    address=cluster.dashboard, filters=[("state", "=", "ALIVE")], detail=True
                )
                ids = {node.node_name: node.node_id for node in alive}
                cluster.node_ids = {
                    n.name: ids[n.node_name] for n in cluster.nodes if n.node_name in ids
                }
        yield cluster
    finally:
        for node in reversed(cluster.nodes):
            node.kill()


def submit_job(address: str, working_dir: Path, entrypoint: list[str], attempts: int = 4) -> str:
    """`ray job submit --no-wait` through the CLI; its submission id.

    Under heavy load the dashboard may drop the connection while the working dir is being
    uploaded (`ConnectionError: ('Connection aborted.', RemoteDisconnected(...))`): then, if
    the job did not get in, wait for the job API and submit again under a fresh id.
    """
    # the repo's .git (and any untracked wheels) are no part of the job: a smaller upload
    runtime_env = json.dumps({"excludes": [".git", ".whl", "*.whl"]})
    output = ""
    for attempt in range(1, attempts + 1):
        client = wait_for_job_api(address)
        job_id = f"job-{os.getpid()}-{time.time_ns()}-{attempt}"
        options = {
            "--address": address,
            "--working-dir": working_dir,
            "--runtime-env-json": runtime_env,
            "--submission-id": job_id,
            "--no-wait": None,
        }
        command = [RAY, "job", "submit", *_flags(options), "--", *entrypoint]
        try:
            submit = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if submit.returncode == 0:
                return job_id
            output = submit.stdout + submit.stderr
        except subprocess.TimeoutExpired as exc:
            output = (
                f"`ray job submit` timed out after {exc.timeout} s: {exc.stdout!r} {exc.stderr!r}"
            )
        with contextlib.suppress(Exception):  # the submission may have landed before the break
            client.get_job_info(job_id)
            return job_id
        if not any(marker in output for marker in TRANSIENT):
            break
        time.sleep(5 * attempt)
    raise AssertionError(f"`ray job submit` failed after {attempt} attempt(s):\n{output[-5000:]}")


def wait_for_job(address: str, job_id: str, timeout: float = 720) -> tuple[str, str]:
    """Poll a job until it ends: (status, logs). Stops it if it outlives `timeout`; a few
    dropped connections to a loaded dashboard are retried."""
    from ray.job_submission import JobStatus

    client = wait_for_job_api(address)
    deadline = time.monotonic() + timeout
    ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    failures = 0
    while True:
        try:
            status = client.get_job_status(job_id)
            failures = 0
        except OSError:  # requests' ConnectionError and Timeout, the SDK's ConnectionError
            failures += 1
            if failures > 10:
                raise
            time.sleep(5)
            continue
        if status in ended:
            return str(status), client.get_job_logs(job_id)
        if time.monotonic() > deadline:
            logs = client.get_job_logs(job_id)
            with contextlib.suppress(Exception):
                client.stop_job(job_id)
            raise AssertionError(
                f"job {job_id} still {status} after {timeout:.0f} s:\n{logs[-5000:]}"
            )
        time.sleep(3)
