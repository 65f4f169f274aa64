"""prefect.yaml: its parameters match the profiles, and the demo deployment runs end to end the way
a user runs it: a real `prefect server start`, `prefect deploy --all`, a process worker started in
another folder, `prefect deployment run` with a parameter override, MLflow checked afterwards."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from flows.cli import DEFAULT_PROFILE
from lib.config import PipelineConfig, build_config, load_config
from tests.conftest import tiny_overrides
from tests.support.prefect_server import PREFECT_CLI, api, log_tail, prefect_server

ROOT = Path(__file__).resolve().parent.parent
POOL = "lenta-process"
RUN_TIMEOUT_S = 360  # a tiny flow run takes ~1 min here; generous for a loaded 2-core machine
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def deployments() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text(encoding="utf-8"))
    return {d["name"]: d for d in spec["deployments"]}


def profile(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / name).read_text(encoding="utf-8"))


def test_deployment_parameters_are_generated_from_the_profiles(tmp_path):
    """configs/ is the one source: prefect.yaml's config blocks are what lib/deployments.py writes
    from the profiles (`make deployments`), and they load as the profiles do."""
    from lib.deployments import generate

    text = (ROOT / "prefect.yaml").read_text(encoding="utf-8")
    assert generate(text) == text, "prefect.yaml is out of date with configs/: run `make deployments`"
    # A hand edit inside a block is overwritten from the profile; an edit of the profile reaches it.
    assert generate(text.replace("max_new_tokens: 48", "max_new_tokens: 7")) == text
    (tmp_path / "configs").mkdir()
    for name in ("demo.yaml", "gpt-neo-1.3b.yaml"):
        edited = (
            (ROOT / "configs" / name).read_text(encoding="utf-8").replace("max_new_tokens: 48", "max_new_tokens: 7")
        )
        (tmp_path / "configs" / name).write_text(edited, encoding="utf-8")
    regenerated = generate(text, tmp_path)
    assert regenerated != text and regenerated == text.replace("max_new_tokens: 48", "max_new_tokens: 7", 1)
    found = deployments()
    assert found["demo"]["parameters"]["config"] == profile("demo.yaml")
    assert found["lenta-nightly"]["parameters"]["config"] == profile("gpt-neo-1.3b.yaml")
    for spec in found.values():
        assert spec["entrypoint"] == "flows/finetune.py:finetune"
        assert isinstance(build_config(spec["parameters"]["config"]), PipelineConfig)
    assert not found["demo"].get("schedules")
    assert [s["cron"] for s in found["lenta-nightly"]["schedules"]] == ["0 2 * * *"]
    assert found["lenta-nightly"]["schedules"][0]["timezone"] == "Europe/Moscow"


def test_make_deployments_checks_and_rewrites_prefect_yaml(tmp_path, capsys):
    """`make deployments` (lib/deployments.py's command): `--check` passes on the shipped file and
    fails, naming the fix, on a stale copy; without it the copy is rewritten from configs/."""
    from lib.deployments import main

    shipped = (ROOT / "prefect.yaml").read_text(encoding="utf-8")
    assert main(["--check"]) == 0
    stale = tmp_path / "prefect.yaml"
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the file's profiles are found beside it
    stale.write_text(shipped.replace("max_new_tokens: 48", "max_new_tokens: 7"), encoding="utf-8")
    assert main(["--check", "--file", str(stale)]) == 1
    assert "is out of date with configs/: run `make deployments`" in capsys.readouterr().err
    assert stale.read_text(encoding="utf-8") != shipped  # a check writes nothing
    assert main(["--file", str(stale)]) == 0 and f"rewrote {stale}" in capsys.readouterr().out
    assert stale.read_text(encoding="utf-8") == shipped
    assert main(["--check", "--file", str(stale)]) == 0


def wait_for_flow_run(url: str, flow_run_id: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = api(url, f"/flow_runs/{flow_run_id}")
        if run["state_type"] in TERMINAL:
            return run
        time.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout_s:.0f}s (state {run['state_name']})")


@pytest.mark.slow
def test_demo_deployment_runs_on_a_process_worker(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    model_name = f"deployed-{tmp_path.name}"
    # The deployment keeps its config; the run changes some settings the way `--set` does.
    overrides = tiny_overrides(
        str(tmp_path / "cache"), **{"registry.model_name": model_name, "tracking.uri": tracking_uri}
    )
    param = f"overrides={json.dumps(overrides)}"  # as the README runs it: --param 'overrides=[...]'
    worker_dir = tmp_path / "elsewhere"  # the pull step, not the worker's folder, decides where code runs
    worker_dir.mkdir()

    with prefect_server(tmp_path / "prefect-home") as server:
        server.cli("work-pool", "create", POOL, "--type", "process", cwd=ROOT)
        server.cli("deploy", "--all", cwd=ROOT)
        name = urllib.parse.quote("finetune")
        nightly = api(server.url, f"/deployments/name/{name}/lenta-nightly")
        assert [s["schedule"] for s in nightly["schedules"]] == [
            {"cron": "0 2 * * *", "timezone": "Europe/Moscow", "day_or": True}
        ]
        assert nightly["work_queue_name"] == "nightly" and nightly["work_pool_name"] == POOL
        demo = api(server.url, f"/deployments/name/{name}/demo")
        assert demo["schedules"] == [] and demo["work_queue_name"] == "default"
        assert demo["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
        assert demo["parameter_openapi_schema"]["properties"]["config"]  # the typed form in the UI

        # Only the default queue: should the test straddle 02:00 Moscow time, the nightly run waits.
        with server.worker(POOL, cwd=worker_dir, queues=("default",)):
            out = server.cli("deployment", "run", "finetune/demo", "--param", param, cwd=ROOT).stdout
            flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
            flow_run = wait_for_flow_run(server.url, flow_run_id, RUN_TIMEOUT_S)
            worker_log = server.home / f"worker-{POOL}.log"
            assert flow_run["state_type"] == "COMPLETED", f"{flow_run['state_name']}:\n{log_tail(worker_log)}"
            assert flow_run["parameters"]["overrides"] == overrides
            # A failing run: its state message (the UI, `prefect flow-run inspect`) says why, in one line.
            missing = str(tmp_path / "missing.csv")
            bad = json.dumps([*overrides, "data.source=csv", f"data.path={missing}"])
            watched = subprocess.run(
                [PREFECT_CLI, "deployment", "run", "finetune/demo", "--watch", "--param", f"overrides={bad}"],
                env=server.env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT_S,
            )
        assert watched.returncode == 1 and "prefect.flow-run.Failed" in watched.stdout, watched.stdout[-3000:]
        failed_id = re.search(r"UUID:\s*([0-9a-f-]{36})", watched.stdout).group(1)
        message = api(server.url, f"/flow_runs/{failed_id}")["state"]["message"]
        assert f"CorpusError: {missing}: file does not exist" in message and "\n" not in message, message

    client = MlflowClient(tracking_uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
    )
    assert [r.info.status for r in runs] == ["FINISHED"]
    # The overrides reached the run, on top of the deployment's demo profile.
    params_logged = runs[0].data.params
    assert params_logged["train.max_steps"] == "4" and params_logged["model.tiny.hidden_size"] == "64"
    assert params_logged["lora.r"] == str(load_config(DEFAULT_PROFILE).lora.r)
    versions = client.search_model_versions(f"name='{model_name}'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", runs[0].info.run_id)]
    assert versions[0].tags["prefect.flow_run_id"] == flow_run_id


def test_the_api_helper_retries_what_the_server_calls_retryable_and_nothing_else():
    """The Prefect server answers 503 for a retryable error (sqlite busy under its scheduler): the
    helper retries it as Prefect's client does (CI failed once on a single 503), but a 404 is raised."""
    import http.server
    import threading

    answers = {"/busy": [503, 503, 200], "/missing": [404, 200]}
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            seen.append(self.path)
            code = answers[self.path].pop(0)
            body = b'{"ok": true}' if code == 200 else b'{"exception_message": "Service Unavailable"}'
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert api(url, "/busy") == {"ok": True}
        assert seen == ["/busy"] * 3
        with pytest.raises(urllib.error.HTTPError) as raised:
            api(url, "/missing")
        assert raised.value.code == 404 and seen.count("/missing") == 1
    finally:
        server.shutdown()
