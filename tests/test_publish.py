"""Publishing to the Hub: `taskvec merge ... --push-to-hub`, `push_folder` and `TaskVector.push_to_hub`.

The Hub is a local stub of its HTTP API on 127.0.0.1 (`StubHub`): huggingface_hub's own client talks to
it, taskvec's code runs unmocked. The stub implements the endpoints `HfApi.create_repo`, `create_branch`
and `upload_folder` call (huggingface_hub 0.2x–2.x):

    POST /api/repos/create                          {"name", "organization", "visibility"|"private"} -> {"url"}
    POST /api/validate-yaml                         README.md front matter check -> {"errors": [], "warnings": []}
    POST /api/models/{ns}/{name}/branch/{branch}    create_branch
    POST /api/models/{ns}/{name}/preupload/{rev}    -> every file "regular", so contents travel inline
    POST /api/models/{ns}/{name}/commit/{rev}       NDJSON: a header line, then one base64 "file" line per file

Answering "regular" for every file keeps LFS and xet out of the way. With hf_xet installed,
huggingface_hub >= 1.x routes `upload_folder` through its pipelined (xet-capable) uploader; with
HF_HUB_DISABLE_XET=1 (read at import, so the tests set `constants.HF_HUB_DISABLE_XET`) it takes the
single-commit `create_commit` path. The upload tests run both ways.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

pytest.importorskip("huggingface_hub")

from taskvec import __version__  # noqa: E402
from taskvec.cli import main  # noqa: E402
from taskvec.io.publish import PublishError, push_folder  # noqa: E402
from tests.helpers import perturbed, save_model, tiny_llama  # noqa: E402

TOKEN = "hf_taskvec_test_token"


class StubHub:
    """The part of the Hub's HTTP API that create_repo / create_branch / upload_folder use, in memory."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict] = []  # create_repo payloads
        self.branches: list[tuple[str, str]] = []
        self.commits: list[dict] = []  # {"repo", "revision", "summary", "files": {path: bytes}, "auth"}
        self.errors: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                self._reply(404, {"error": f"stub hub: no GET {self.path}"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                hub.requests.append(("POST", path))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                parts = path.strip("/").split("/")
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.created.append(payload)
                    repo = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
                    return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if path == "/api/validate-yaml":
                    yaml.safe_load(json.loads(body)["content"].split("---")[1])  # front matter parses
                    return self._reply(200, {"errors": [], "warnings": []})
                if len(parts) == 6 and parts[:2] == ["api", "models"]:
                    repo, action, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
                    if action == "branch":
                        hub.branches.append((repo, rev))
                        return self._reply(200, {})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                            "shouldIgnore": False} for f in files]})
                    if action == "commit":
                        commit = {"repo": repo, "revision": rev, "files": {}}
                        for line in body.decode().splitlines():
                            item = json.loads(line)
                            if item["key"] == "header":
                                commit["summary"] = item["value"]["summary"]
                            elif item["key"] == "file":
                                commit["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                            else:
                                hub.errors.append(f"unexpected commit line {item['key']}")
                        hub.commits.append(commit)
                        oid = f"{len(hub.commits):040x}"
                        return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}",
                                                 "commitOid": oid, "success": True})
                hub.errors.append(f"unexpected POST {path}")
                return self._reply(404, {"error": f"stub hub: no POST {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def files(self, repo: str) -> dict[str, bytes]:
        """Every file committed to `repo` so far (later commits win)."""
        out: dict[str, bytes] = {}
        for c in self.commits:
            if c["repo"] == repo:
                out.update(c["files"])
        return out


@pytest.fixture
def stub_hub():
    hub = StubHub()
    hub.thread.start()
    yield hub
    hub.server.shutdown()
    hub.server.server_close()
    assert not hub.errors, hub.errors


@pytest.fixture(params=["xet-pipeline", "no-xet"])
def online(request, monkeypatch, tmp_path, stub_hub):
    """huggingface_hub allowed online (the suite sets HF_HUB_OFFLINE=1), a token, the stub as HF_ENDPOINT,
    a private temp dir (to see staging leftovers); xet on or off."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _runtime

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    if request.param == "no-xet":
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    elif not _runtime.is_xet_available():
        pytest.skip("hf_xet not installed: the pipelined path is not used")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", stub_hub.url)
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return stub_hub


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = tiny_llama(seed=0, layers=2)
    return {"base": save_model(base, root / "base"),
            "ft_a": save_model(perturbed(base, seed=1), root / "ft_a"),
            "ft_b": save_model(perturbed(base, seed=2), root / "ft_b")}


@pytest.fixture
def config(models, tmp_path) -> Path:
    text = (f"merge_method: task_arithmetic\nbase_model: {models['base']}\nmodels:\n"
            f"  - model: {models['ft_a']}\n    parameters:\n      weight: 0.7\n"
            f"  - model: {models['ft_b']}\n    parameters:\n      weight: 0.3\n"
            "dtype: float32\n")
    path = tmp_path / "merge.yml"
    path.write_text(text)
    return path


def _card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_merge_push_to_hub_uploads_the_folder_and_card_with_evaluation(online, config, models, tmp_path, capsys):
    evaluation = tmp_path / "metrics.json"
    evaluation.write_text(json.dumps({"sentiment": {"accuracy": 0.931, "f1": 0.9}, "language": {"accuracy": 0.8}}))
    out = tmp_path / "merged"
    rc = main(["merge", str(config), str(out), "--push-to-hub", "me/merged-tiny", "--evaluation", str(evaluation),
               "--commit-message", "tiny merge"])
    assert rc == 0, capsys.readouterr().err
    assert f"pushed to {online.url}/me/merged-tiny" in capsys.readouterr().out
    files = online.files("me/merged-tiny")
    local = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"model.safetensors", "config.json", "mergekit_config.yml", "README.md"} <= set(files)
    assert files == local  # byte for byte, the card included (written with the evaluation before the push)
    assert online.created == [{"name": "merged-tiny", "organization": "me", "type": "model", "visibility": "public"}]
    assert online.commits[0]["summary"] == "tiny merge" and online.commits[0]["revision"] == "main"
    meta, body = _card(files["README.md"].decode())
    assert f"taskvec](https://pypi.org/project/taskvec/) {__version__}" in body  # the version
    assert "[Task Arithmetic]" in body  # the method
    assert f"with `{models['base']}` as the base" in body  # the base
    assert f"* `{models['ft_a']}`" in body and f"* `{models['ft_b']}`" in body  # the parents
    assert "weight: 0.7" in body and "weight: 0.3" in body  # the parameters, in the config block
    assert "## Evaluation" in body and "| sentiment | accuracy | 0.931 |" in body  # the evaluation table
    assert "| language | accuracy | 0.8 |" in body
    results = meta["model-index"][0]["results"]
    assert meta["model-index"][0]["name"] == "merged"
    assert {r["dataset"]["name"]: [m["value"] for m in r["metrics"]] for r in results} == {
        "sentiment": [0.931, 0.9], "language": [0.8]}
    assert _hidden(tmp_path) == [] and os.listdir(tempfile.gettempdir()) == []


def test_private_and_revision_reach_the_hub(online, config, tmp_path, capsys):
    out = tmp_path / "merged-private"
    rc = main(["merge", str(config), str(out), "--push-to-hub", "me/secret", "--private", "--revision", "exp-1"])
    assert rc == 0, capsys.readouterr().err
    assert online.created[0]["visibility"] == "private"
    assert online.branches == [("me/secret", "exp-1")]
    assert online.commits[0]["revision"] == "exp-1"


def test_push_folder_with_a_sweep_result_leaves_the_local_folder_alone(online, config, tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "merged"
    assert main(["merge", str(config), str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    sweep = pd.DataFrame({"lambda": [0.2, 0.4], "accuracy": [0.81, 0.86]})  # as lambda_sweep(...).data
    result = push_folder(out, "me/swept", evaluation=sweep)
    assert result.repo_url == f"{online.url}/me/swept"
    files = online.files("me/swept")
    meta, body = _card(files["README.md"].decode())
    assert "| lambda | accuracy |" in body and "| 0.4 | 0.86 |" in body
    assert "model-index" not in meta  # a grid of models, not one model's results
    assert files["model.safetensors"] == before["model.safetensors"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # README.md untouched
    assert _hidden(tmp_path) == []  # the staging folder beside it is gone


def test_task_vector_push_to_hub(online, models, tmp_path):
    from taskvec import TaskVector

    tau = TaskVector.from_models(models["base"], models["ft_a"]) - 0.5 * TaskVector.from_models(models["base"], models["ft_b"])
    result = tau.push_to_hub("me/tau", private=True, evaluation={"accuracy": 0.9})
    assert result.repo_id == "me/tau" and online.created[0]["visibility"] == "private"
    files = online.files("me/tau")
    assert set(files) == {"task_vector.safetensors", "README.md"}
    got = tmp_path / "got.safetensors"
    got.write_bytes(files["task_vector.safetensors"])
    loaded = TaskVector.load(got)
    assert set(loaded) == set(tau)
    assert abs(loaded.norm() - tau.norm()) < 1e-5 * tau.norm()
    meta, body = _card(files["README.md"].decode())
    assert "task-vector" in meta["tags"]
    assert f"`{tau.expression}`" in body and f"{tau.norm():.6g}" in body
    assert f"`{tau.base_name}`" in body and __version__ in body
    assert "| accuracy | 0.9 |" in body and meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.9
    assert os.listdir(tempfile.gettempdir()) == []  # staging removed


def test_no_token_is_a_clear_error_before_the_merge(no_token, config, tmp_path, capsys):
    out = tmp_path / "merged"
    rc = main(["merge", str(config), str(out), "--push-to-hub", "me/x"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "HF_TOKEN" in err and "huggingface-cli login" in err
    assert not out.exists() and _hidden(tmp_path) == []  # nothing merged, nothing written


def test_task_vector_without_token(no_token, models, monkeypatch, tmp_path):
    from taskvec import TaskVector

    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with pytest.raises(PublishError, match="HF_TOKEN"):
        TaskVector.from_models(models["base"], models["ft_a"]).push_to_hub("me/tau")
    assert os.listdir(tmp) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_keeps_the_merge_and_says_how_to_retry(online, config, monkeypatch, tmp_path, capsys):
    dead = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    out = tmp_path / "merged"
    rc = main(["merge", str(config), str(out), "--push-to-hub", "me/x"])
    assert rc == 1
    captured = capsys.readouterr()
    assert f"merged into {out}" in captured.out
    err = captured.err
    assert "merge succeeded but the push failed" in err
    assert f"could not reach the Hugging Face Hub at {dead}/api/repos/create" in err
    assert f"hf upload me/x {out}" in err and "huggingface-cli upload" in err
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()  # the merge stays
    assert _hidden(tmp_path) == []


def test_unreachable_endpoint_for_a_task_vector(online, models):
    from taskvec import TaskVector

    dead = f"http://127.0.0.1:{_closed_port()}"
    tau = TaskVector.from_models(models["base"], models["ft_a"])
    with pytest.raises(PublishError, match=f"could not reach the Hugging Face Hub at {dead}"):
        tau.push_to_hub("me/tau", endpoint=dead)
    assert os.listdir(tempfile.gettempdir()) == []


def test_offline_mode_and_bad_token_are_named(online, models, monkeypatch):
    from huggingface_hub import constants

    from taskvec import TaskVector

    tau = TaskVector.from_models(models["base"], models["ft_a"])
    with pytest.raises(PublishError, match="401 Unauthorized"):
        tau.push_to_hub("me/tau", token="hf_wrong")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE"):
        tau.push_to_hub("me/tau")


def test_bad_repo_id_fails_before_the_merge(online, config, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(config), str(out), "--push-to-hub", "me/two/slashes"]) == 1
    assert "repo id 'me/two/slashes'" in capsys.readouterr().err
    assert main(["merge", str(config), str(out), "--push-to-hub", "me/bad name"]) == 1
    assert "repo id 'me/bad name'" in capsys.readouterr().err
    assert not out.exists() and online.requests == []


def test_evaluation_forms_and_a_bad_one():
    import pandas as pd

    from taskvec.errors import ParameterError
    from taskvec.model_card import evaluation_section

    md, index = evaluation_section({"accuracy": 0.93, "note": "a|b"}, name="m")
    assert "| metric | value |" in md and "| accuracy | 0.93 |" in md and "a\\|b" in md
    assert index[0]["results"][0]["metrics"] == [{"type": "accuracy", "value": 0.93, "name": "accuracy"}]
    per_task = pd.DataFrame({"accuracy": [0.9, 0.8]}, index=pd.Index(["sentiment", "language"], name="task"))
    md, index = evaluation_section(per_task, name="m")
    assert "| task | accuracy |" in md and "| language | 0.8 |" in md
    assert [r["dataset"]["name"] for r in index[0]["results"]] == ["sentiment", "language"]
    assert evaluation_section(None, name="m") == ("", None)
    with pytest.raises(ParameterError, match="evaluation: expected"):
        evaluation_section([0.9], name="m")
