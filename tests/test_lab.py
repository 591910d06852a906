"""`taskvec lab`: argument handling, notebook lookup, the kernel it gives the server, and the clear error when
JupyterLab / Voilà are missing. No server is started here (tests/test_browser.py serves notebooks for real)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from taskvec import lab_launcher
from taskvec.cli import main as cli_main

REPO_NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture
def installed(monkeypatch):
    """Pretend exactly these modules are importable (the test venv may or may not have jupyterlab/voila)."""
    def set_(*modules):
        monkeypatch.setattr(lab_launcher, "have", lambda m: m in modules)
    return set_


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch):
    monkeypatch.delenv("TASKVEC_NOTEBOOKS", raising=False)


def run(argv, capsys):
    code = cli_main(["lab", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_lab_is_a_listed_command(capsys):
    assert cli_main(["--help"]) == 0
    assert "lab" in capsys.readouterr().out


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["lab", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--voila", "--fast", "--port", "--no-browser", "--notebooks", "--dry-run", "taskvec[ui]"):
        assert option in out


def test_voila_dry_run_serves_the_named_notebook_fast(installed, capsys):
    installed("voila", "ipykernel")
    code, out, _ = run(["--voila", "04", "--fast", "--port", "8877", "--no-browser", "--dry-run"], capsys)
    assert code == 0, out
    assert "export TASKVEC_FAST=1" in out
    line = out.strip().splitlines()[-1]
    assert line.startswith(f"{sys.executable} -m voila {REPO_NOTEBOOKS / '04_dare.ipynb'}")
    assert "--port=8877" in line and "--no-browser" in line and "--Voila.ip=127.0.0.1" in line
    assert f"cd {REPO_NOTEBOOKS}" in out


def test_voila_without_a_notebook_serves_the_folder(installed, capsys):
    installed("voila", "ipykernel")
    code, out, _ = run(["--voila", "--dry-run"], capsys)
    assert code == 0
    assert out.strip().splitlines()[-1] == f"{sys.executable} -m voila {REPO_NOTEBOOKS} --Voila.ip=127.0.0.1"
    assert "TASKVEC_FAST" not in out


def test_lab_dry_run_opens_the_notebooks_folder(installed, capsys):
    installed("jupyterlab", "notebook", "ipykernel")
    code, out, _ = run(["00_model_merging_tour.ipynb", "--port", "9000", "--dry-run", "--", "--ServerApp.token=x"],
                       capsys)
    assert code == 0
    line = out.strip().splitlines()[-1]
    root = " --allow-root" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""   # Jupyter refuses root (containers) without it
    assert line == (f"{sys.executable} -m jupyterlab --ServerApp.root_dir={REPO_NOTEBOOKS} --ServerApp.ip=127.0.0.1 "
                    f"--ServerApp.port=9000{root} 00_model_merging_tour.ipynb --ServerApp.token=x")


def test_falls_back_to_jupyter_notebook_and_classic_asks_for_it(installed, capsys):
    installed("notebook", "ipykernel")
    code, out, _ = run(["--dry-run"], capsys)
    assert code == 0 and " -m notebook " in out
    installed("jupyterlab", "notebook", "ipykernel")
    code, out, _ = run(["--classic", "--dry-run"], capsys)
    assert code == 0 and " -m notebook " in out


@pytest.mark.parametrize("argv, missing", [
    ([], "jupyterlab"),
    (["--voila", "04"], "voila"),
    (["--classic"], "notebook"),
])
def test_a_missing_package_is_named_with_the_extra_to_install(installed, capsys, argv, missing):
    installed("ipykernel")
    code, out, err = run([*argv, "--dry-run"], capsys)
    assert code == 1 and out == ""
    assert err.startswith(f"taskvec lab: error: {missing} is not installed")
    assert 'pip install "taskvec[ui]"' in err


def test_a_missing_kernel_is_named_too(installed, capsys):
    installed("voila")
    code, _, err = run(["--voila", "--dry-run"], capsys)
    assert code == 1 and "ipykernel is not installed" in err and "taskvec[ui]" in err


@pytest.mark.parametrize("name, message", [
    ("0", "ambiguous"),                # 00_..., 01_..., ... all start with "0"
    ("99_nothing", "no notebook '99_nothing'"),
])
def test_unknown_or_ambiguous_notebooks_are_clear_errors(installed, capsys, name, message):
    installed("voila", "ipykernel")
    code, _, err = run(["--voila", name, "--dry-run"], capsys)
    assert code == 1 and message in err and "04_dare.ipynb" in err   # lists what there is


def test_a_notebook_path_outside_the_folder_is_taken_as_is(installed, capsys, tmp_path):
    installed("voila", "ipykernel")
    nb = tmp_path / "mine.ipynb"
    nb.write_text("{}")
    code, out, _ = run(["--voila", str(nb), "--dry-run"], capsys)
    assert code == 0 and f"-m voila {nb}" in out and f"cd {tmp_path}" in out


def test_an_installed_package_without_notebooks_says_so_and_takes_a_folder(installed, capsys, monkeypatch, tmp_path):
    installed("voila", "ipykernel", "jupyterlab")
    site = tmp_path / "site-packages" / "taskvec"
    site.mkdir(parents=True)
    monkeypatch.setattr(lab_launcher, "PACKAGE_DIR", site)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["--dry-run"], capsys)
    assert code == 1
    assert "not shipped with an installed (non-editable) taskvec package" in err and "--notebooks" in err
    mine = tmp_path / "nbs"
    mine.mkdir()
    (mine / "01_task_arithmetic.ipynb").write_text("{}")
    code, out, _ = run(["--voila", "01", "--notebooks", str(mine), "--dry-run"], capsys)
    assert code == 0 and str(mine / "01_task_arithmetic.ipynb") in out
    code, out, _ = run(["--voila", str(mine / "01_task_arithmetic.ipynb"), "--dry-run"], capsys)  # a path: no folder needed
    assert code == 0 and f"-m voila {mine / '01_task_arithmetic.ipynb'}" in out
    monkeypatch.setenv("TASKVEC_NOTEBOOKS", str(mine))
    code, out, _ = run(["--dry-run"], capsys)
    assert code == 0 and f"--ServerApp.root_dir={mine}" in out
    code, _, err = run(["--notebooks", str(tmp_path / "nope"), "--dry-run"], capsys)
    assert code == 1 and "no such folder" in err


@pytest.mark.parametrize("argv", [["--port", "70000"], ["--port", "x"], ["--voila", "--classic"], ["--bogus"]])
def test_bad_usage_exits_2(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli_main(["lab", *argv, "--dry-run"])
    assert e.value.code == 2


def test_the_kernel_spec_runs_this_python_and_shadows_a_user_python3(tmp_path, monkeypatch):
    jupyter_client = pytest.importorskip("jupyter_client.kernelspec")
    ours = lab_launcher.write_kernel_spec(tmp_path / "ours")
    other = tmp_path / "user" / "kernels" / "python3"   # e.g. a `python3` kernel of another environment
    other.mkdir(parents=True)
    (other / "kernel.json").write_text(json.dumps({"argv": ["/somewhere/else/python", "-m", "ipykernel_launcher",
                                                            "-f", "{connection_file}"],
                                                   "display_name": "other", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join([str(ours), str(tmp_path / "user")]))
    spec = jupyter_client.KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[:3] == [sys.executable, "-m", "ipykernel_launcher"]
    assert spec.display_name == "Python 3 (taskvec)"


def test_the_server_gets_the_kernel_and_the_environment(installed, monkeypatch, capsys):
    installed("voila", "ipykernel")
    seen = {}

    class FakePopen:
        def __init__(self, argv, cwd, env):
            first = env["JUPYTER_PATH"].split(os.pathsep)[0]
            seen.update(argv=argv, cwd=cwd, env=env,
                        spec=json.loads((Path(first) / "kernels" / "python3" / "kernel.json").read_text()))

        def wait(self):
            return 3   # the server's exit code is passed on

    monkeypatch.setattr(lab_launcher.subprocess, "Popen", FakePopen)
    monkeypatch.setenv("JUPYTER_PATH", "/already/there")
    monkeypatch.delenv("TASKVEC_FAST", raising=False)
    assert cli_main(["lab", "--voila", "03", "--fast", "--no-browser"]) == 3
    assert seen["env"]["TASKVEC_FAST"] == "1"
    assert seen["env"]["JUPYTER_PATH"].endswith(os.pathsep + "/already/there")
    assert seen["spec"]["argv"][0] == sys.executable
    assert seen["argv"][3] == str(REPO_NOTEBOOKS / "03_ties.ipynb") and seen["cwd"] == REPO_NOTEBOOKS
    assert "TASKVEC_FAST=1" in capsys.readouterr().err
    assert not Path(seen["env"]["JUPYTER_PATH"].split(os.pathsep)[0]).exists()   # the temporary spec is removed


def test_lab_help_does_not_import_torch():
    import subprocess

    code = ("import sys; from taskvec.cli import main\n"
            "try: main(['lab', '--help'])\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'taskvec lab --help imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)


@pytest.mark.skipif(not (lab_launcher.have("jupyterlab") and lab_launcher.have("ipykernel")),
                    reason="needs the ui extra (jupyterlab): pip install -e '.[ui]'")
def test_jupyterlab_really_starts_with_this_pythons_kernel(tmp_path):
    """Start `taskvec lab` for real (about 10 s), ask the server which python3 kernel it has, stop it."""
    import signal
    import socket
    import subprocess
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "lab.log"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "taskvec.cli", "lab", "04", "--fast", "--no-browser",
                                   "--port", str(port), "--", "--IdentityProvider.token=t"],
                                  stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                specs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/kernelspecs?token=t", timeout=5))
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        spec = specs["kernelspecs"]["python3"]["spec"]
        assert spec["argv"][0] == sys.executable and spec["display_name"] == "Python 3 (taskvec)"
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/lab/tree/04_dare.ipynb?token=t", timeout=30)
        assert page.status == 200
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
