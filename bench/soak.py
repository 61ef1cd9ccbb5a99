"""A soak of the running server: concurrent A1111 API clients while LoRA files are rewritten in
place, truncated and deleted under it, and the model is switched between two checkpoints.

It starts the real server (`webui.server.build_app` under uvicorn) in a child process over a
scratch folder of tiny SD1 checkpoints and LoRA files, and reports what a user would see: the
server still alive, no 5xx, requests answered first come first served, the image of a prompt
without LoRAs pixel-identical at the start and the end (the weights are back at base), and the
server's resident memory across model switches.

    python -m bench.soak                                    # the acceptance soak: 200 requests
                                                            # spread over 2 minutes, 10 switches
    python -m bench.soak --requests 100 --seconds 60 --unpaced   # as fast as the server answers

The test suite runs a short one (`tests/test_soak.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the LoRA files the soak writes: the first two are never touched, the others churn
STEADY = ("steady_a", "steady_b")
CHURNED = ("churn_a", "churn_b", "churn_c")
CHECKPOINTS = ("tiny_one", "tiny_two")
PROMPT_WITHOUT_LORAS = {"prompt": "a lighthouse", "seed": 1234, "steps": 2}


@dataclass(frozen=True)
class SoakPlan:
    """How hard and how long."""

    requests: int = 200
    clients: int = 4
    seconds: float = 120.0  # the soak stops sending when this runs out
    paced: bool = True  # spread the requests evenly over `seconds` (else: as fast as answered)
    switches: int = 10  # model switches, spread evenly over the requests
    churn_interval: float = 0.05  # seconds between two file mutations
    seed: int = 0


@dataclass
class Answer:
    """One request as the client saw it."""

    index: int
    status: int  # 0: no answer at all (connection refused or dropped)
    sent: float
    done: float
    detail: str = ""


@dataclass
class SoakReport:
    plan: SoakPlan
    answers: list[Answer] = field(default_factory=list)
    server_alive: bool = False
    exit_code: int | None = None
    base_image_identical: bool = False
    rss_after_warmup_mb: float = 0.0
    rss_end_mb: float = 0.0
    mutations: int = 0
    seconds: float = 0.0
    server_log_tail: str = ""

    @property
    def server_errors(self) -> list[Answer]:
        """Answers that are 5xx or no answer at all."""
        return [a for a in self.answers if a.status == 0 or a.status >= 500]

    @property
    def fifo_violations(self) -> list[tuple[int, int]]:
        """Pairs (a, b) where b was sent well after a (so surely queued after it) but finished
        first. Requests run one at a time, so the finishing order is the serving order."""
        margin = 0.25
        ok = sorted((a for a in self.answers if a.status == 200), key=lambda a: a.sent)
        return [
            (a.index, b.index)
            for i, a in enumerate(ok)
            for b in ok[i + 1 :]
            if b.sent - a.sent > margin and b.done < a.done
        ]

    @property
    def rss_growth_mb(self) -> float:
        return self.rss_end_mb - self.rss_after_warmup_mb

    def summary(self) -> dict[str, object]:
        statuses: dict[str, int] = {}
        for a in self.answers:
            statuses[str(a.status)] = statuses.get(str(a.status), 0) + 1
        return {
            "plan": asdict(self.plan),
            "requests_answered": len(self.answers),
            "statuses": statuses,
            "server_errors": [asdict(a) for a in self.server_errors[:10]],
            "fifo_violations": len(self.fifo_violations),
            "server_alive": self.server_alive,
            "exit_code": self.exit_code,
            "base_image_identical": self.base_image_identical,
            "rss_after_warmup_mb": round(self.rss_after_warmup_mb, 1),
            "rss_end_mb": round(self.rss_end_mb, 1),
            "rss_growth_mb": round(self.rss_growth_mb, 1),
            "file_mutations": self.mutations,
            "seconds": round(self.seconds, 1),
            "server_log_tail": self.server_log_tail if self.server_errors else "",
        }


# -- the scratch folder ---------------------------------------------------------------------------


def prepare_folder(root: Path) -> None:
    """Two tiny SD1 checkpoints in `root/models` and five kohya LoRAs for them in `root/loras`."""
    from bench.lora_apply import BenchArch, lora_targets, write_lora
    from webui.arch import Arch, Prediction
    from webui.engine.checkpoints import ModelKind, save_single_file
    from webui.engine.model_factory import ModelSpec, build_pipeline

    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "loras").mkdir(parents=True, exist_ok=True)
    pipe = None
    for seed, name in enumerate(CHECKPOINTS):
        pipe = build_pipeline(ModelSpec(Arch.SD1), seed=seed)
        kind = ModelKind(Arch.SD1, Prediction.EPSILON)
        save_single_file(pipe, kind, root / "models" / f"{name}.safetensors", embed_configs=True)
    targets = lora_targets(pipe, BenchArch.SD15)
    for seed, name in enumerate(STEADY + CHURNED):
        write_lora(root / "loras" / f"{name}.safetensors", targets, 4, seed, BenchArch.SD15)
    # what a churned file is rewritten with: another LoRA's bytes, of another size
    write_lora(root / "spare_rank8.safetensors", targets, 8, 99, BenchArch.SD15)


class FileChurn(threading.Thread):
    """Rewrites LoRA files under the running server the ways people do: `cp other.safetensors
    this.safetensors` (in place, same inode), truncation, deletion and re-creation."""

    def __init__(self, root: Path, interval: float, seed: int) -> None:
        super().__init__(daemon=True)
        self.loras = root / "loras"
        self.originals = {n: (self.loras / f"{n}.safetensors").read_bytes() for n in CHURNED}
        self.spare = (root / "spare_rank8.safetensors").read_bytes()
        self.interval = interval
        self.random = random.Random(seed)
        self.stopping = threading.Event()
        self.count = 0

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            name = self.random.choice(CHURNED)
            path = self.loras / f"{name}.safetensors"
            action = self.random.choice(("overwrite", "truncate", "delete", "restore"))
            try:
                if action == "delete":
                    path.unlink(missing_ok=True)
                elif action == "truncate" and path.exists():
                    with path.open("r+b") as f:
                        f.truncate(max(16, path.stat().st_size // 2))
                else:
                    data = self.spare if action == "overwrite" else self.originals[name]
                    with path.open("r+b" if path.exists() else "wb") as f:  # in place
                        f.write(data)
                        f.truncate()
                self.count += 1
            except OSError:
                continue

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)
        for name, data in self.originals.items():
            (self.loras / f"{name}.safetensors").write_bytes(data)


# -- the server -----------------------------------------------------------------------------------

SERVER_CODE = """
import sys
from pathlib import Path
from webui.engine.generate import Engine
from webui.server import build_app, serve
from webui.settings import DeviceChoice, Settings
root, port = Path(sys.argv[1]), int(sys.argv[2])
settings = Settings(models_dir=root / "models", loras_dir=root / "loras",
                    outputs_dir=root / "outputs", cache_dir=root / "cache",
                    device=DeviceChoice.CPU, save_outputs=False)
serve(build_app(Engine(settings)), "127.0.0.1", port)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.Popen(
        [sys.executable, "-c", SERVER_CODE, str(root), str(port)],
        cwd=ROOT,
        env=env,
        stdout=(root / "server.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def post(url: str, body: dict[str, object], timeout: float = 120) -> tuple[int, str]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


def wait_until_up(base: str, process: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited early with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/sdapi/v1/sd-models", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer within {timeout} s")


# -- the soak -------------------------------------------------------------------------------------


def request_body(index: int, plan: SoakPlan, rng: random.Random) -> dict[str, object]:
    """A small txt2img request: one or two LoRAs (steady or churning) and, at evenly spread
    points, the other checkpoint."""
    names = rng.sample(STEADY + CHURNED, k=rng.choice((1, 2)))
    tags = " ".join(f"<lora:{n}:{rng.choice((0.4, 0.8, 1.0))}>" for n in names)
    body: dict[str, object] = {
        "prompt": f"a cat {tags}",
        "seed": index,
        "steps": 2,
        "width": 64,
        "height": 64,
        "sampler_name": "Euler",
    }
    if plan.switches:
        period = max(1, plan.requests // (plan.switches + 1))
        checkpoint = CHECKPOINTS[(index // period) % 2]
        body["override_settings"] = {"sd_model_checkpoint": checkpoint}
        body["override_settings_restore_afterwards"] = False
    return body


def image_of(base: str) -> str:
    status, text = post(
        f"{base}/sdapi/v1/txt2img",
        {
            **PROMPT_WITHOUT_LORAS,
            "width": 64,
            "height": 64,
            "sampler_name": "Euler",
            "override_settings": {"sd_model_checkpoint": CHECKPOINTS[0]},
            "override_settings_restore_afterwards": False,
        },
    )
    if status != 200:
        raise RuntimeError(f"the image without LoRAs failed: {status} {text[:300]}")
    return json.loads(text)["images"][0]


def run_soak(root: Path, plan: SoakPlan) -> SoakReport:
    """Serve `root` (prepared by `prepare_folder`), soak it, and report."""
    report = SoakReport(plan)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = start_server(root, port)
    churn = FileChurn(root, plan.churn_interval, plan.seed)
    start = time.monotonic()
    try:
        wait_until_up(base, process)
        before = image_of(base)
        for name in CHECKPOINTS:  # warm both models once, so memory is measured after warm-up
            post(f"{base}/sdapi/v1/options", {"sd_model_checkpoint": name})
        image_of(base)
        report.rss_after_warmup_mb = rss_mb(process.pid)
        rng = random.Random(plan.seed)
        bodies = [request_body(i, plan, rng) for i in range(plan.requests)]
        deadline = time.monotonic() + plan.seconds
        churn.start()

        began = time.monotonic()
        interval = plan.seconds / plan.requests if plan.paced else 0.0

        def send(index: int) -> Answer | None:
            time.sleep(max(0.0, began + index * interval - time.monotonic()))
            if time.monotonic() > deadline:
                return None
            sent = time.monotonic()
            status, text = post(f"{base}/sdapi/v1/txt2img", bodies[index])
            detail = "" if status == 200 else text[:300]
            return Answer(index, status, sent - start, time.monotonic() - start, detail)

        with ThreadPoolExecutor(plan.clients) as pool:
            report.answers = [a for a in pool.map(send, range(plan.requests)) if a is not None]
        churn.stop()
        report.mutations = churn.count
        report.server_alive = process.poll() is None
        if report.server_alive:
            report.base_image_identical = image_of(base) == before
            report.rss_end_mb = rss_mb(process.pid)
    finally:
        churn.stopping.set()
        report.seconds = time.monotonic() - start
        report.exit_code = process.poll()
        if report.exit_code is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        report.server_log_tail = (root / "server.log").read_text(errors="replace")[-3000:]
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = SoakPlan()
    parser.add_argument("--requests", type=int, default=defaults.requests)
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--switches", type=int, default=defaults.switches)
    parser.add_argument(
        "--unpaced", action="store_true", help="send as fast as answered, not spread over --seconds"
    )
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    plan = SoakPlan(args.requests, args.clients, args.seconds, args.switches, not args.unpaced)
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        root = Path(scratch)
        prepare_folder(root)
        report = run_soak(root, plan)
    from bench.lora_apply import environment, write_result

    write_result({**report.summary(), "environment": environment("bench.soak")}, args.out)
    healthy = report.server_alive and not report.server_errors and not report.fifo_violations
    return 0 if healthy and report.base_image_identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
