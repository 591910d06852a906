"""Publish to the Hugging Face Hub: a merged model folder, or a task vector with its model card.

`push_folder(folder, repo_id)` uploads a folder `taskvec merge` / `run_config` wrote
(README.md model card included; with `evaluation=` the card is re-rendered with an
"Evaluation" table and `model-index`). `push_task_vector(vector, repo_id)` saves the
vector (`TaskVector.save`) with a card describing it (base, expression, norm) and
uploads both. Both go through `huggingface_hub`: `HfApi.create_repo(exist_ok=True)`,
then `upload_folder` (one commit; `revision` branches are created when missing).

Local files are staged in a hidden folder (hard links, so no copy of the weights)
only when something must be written (a vector, a re-rendered card); it is removed
whatever happens. The folder being published is never modified.

Errors are `PublishError`s that say what to do: no token (set HF_TOKEN or log in),
offline mode (HF_HUB_OFFLINE), an unreachable endpoint (named), a rejected token or
a missing write permission (the HTTP status and the Hub's message).

The endpoint is `endpoint=`, else the HF_ENDPOINT environment variable read at call
time, else huggingface_hub's default (https://huggingface.co).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from taskvec.errors import TaskVecError

VECTOR_FILENAME = "task_vector.safetensors"
LOGIN_HINT = ("set the HF_TOKEN environment variable to a write token (https://huggingface.co/settings/tokens), "
              "run `hf auth login` (`huggingface-cli login` with huggingface_hub < 1.0), or pass token=")


class PublishError(TaskVecError, RuntimeError):
    """A push to the Hub failed: no token, offline, unreachable endpoint, rejected by the Hub."""


@dataclass(frozen=True)
class PushResult:
    """Where a push went: the repo URL and the commit URL."""

    repo_id: str
    repo_url: str
    commit_url: str

    def __str__(self) -> str:
        return self.repo_url


def resolve_endpoint(endpoint: str | None = None) -> str:
    """`endpoint`, else $HF_ENDPOINT (read now, not at import), else huggingface_hub's default."""
    if endpoint:
        return endpoint.rstrip("/")
    if os.environ.get("HF_ENDPOINT"):
        return os.environ["HF_ENDPOINT"].rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def resolve_token(token: str | None = None) -> str:
    """The token to push with: `token`, else HF_TOKEN, else the one `hf auth login` saved; else a PublishError."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise PublishError(f"no Hugging Face token found: pushing needs a token with write access; {LOGIN_HINT}")
    return found


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exception types of the HTTP client huggingface_hub uses (httpx2, httpx or requests)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, attr in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            found.append(getattr(__import__(module), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _failed_url(err: BaseException, default: str) -> str:
    try:
        request = getattr(err, "request", None)
        if request is not None and getattr(request, "url", None) is not None:
            return str(request.url)
    except RuntimeError:  # httpx: `.request` unset
        pass
    return default


@contextlib.contextmanager
def _hub_errors(endpoint: str, repo_id: str, retry: str) -> Iterator[None]:
    """Turn huggingface_hub's and the HTTP client's exceptions into PublishErrors that say how to retry."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise PublishError(f"cannot push to {repo_id!r}: huggingface_hub is in offline mode (HF_HUB_OFFLINE or "
                           f"TRANSFORMERS_OFFLINE is set); unset it and {retry}") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            why = f"the Hub rejected the token (401 Unauthorized); check it, or {LOGIN_HINT}"
        elif status == 403:
            why = f"the token has no write access to {repo_id!r} (403 Forbidden): use a write token or your own namespace"
        else:
            why = f"the Hub answered an error: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        raise PublishError(f"push to {repo_id!r} at {endpoint} failed: {why}; {retry}") from e
    except TaskVecError:
        raise
    except ValueError as e:  # huggingface_hub's own checks, e.g. "Invalid metadata in README.md"
        raise PublishError(f"push to {repo_id!r} at {endpoint} failed: {e}; {retry}") from e
    except _transport_errors() as e:
        raise PublishError(f"could not reach the Hugging Face Hub at {_failed_url(e, endpoint)} "
                           f"({type(e).__name__}: {e}); check the network (or HF_ENDPOINT) and {retry}") from e


@contextlib.contextmanager
def _staging(near: Path | None) -> Iterator[Path]:
    """A hidden folder (beside `near` when given, so hard links work; else in the temp dir), always removed."""
    if near is not None:
        path = Path(tempfile.mkdtemp(prefix=f".{near.name}.taskvec-push-", dir=near.parent))
    else:
        path = Path(tempfile.mkdtemp(prefix="taskvec-push-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _link_tree(src: Path, dst: Path, *, skip: set[str]) -> None:
    """Mirror `src` into `dst` with hard links (a copy where links are impossible), skipping top-level `skip`."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] in skip or not path.is_file():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def _upload(api, folder: Path, repo_id: str, *, private: bool, revision: str | None,
            commit_message: str) -> PushResult:
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                             commit_message=commit_message)
    return PushResult(repo_id=repo_id, repo_url=str(repo_url), commit_url=str(getattr(info, "commit_url", info)))


def _api(endpoint: str, token: str):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name="taskvec", library_version=_version())


def _version() -> str:
    from taskvec import __version__

    return __version__


def check_repo_id(repo_id: str) -> None:
    """A ParameterError unless `repo_id` is a valid Hub model repo id ('name' or 'namespace/name')."""
    from taskvec.errors import ParameterError

    problem = None
    if not isinstance(repo_id, str) or not repo_id.strip() or repo_id.count("/") > 1:
        problem = "expected 'name' or 'namespace/name'"
    else:
        try:
            from huggingface_hub.utils import validate_repo_id

            validate_repo_id(repo_id)
        except ImportError:
            pass
        except ValueError as e:  # HFValidationError
            problem = str(e).splitlines()[0]
    if problem:
        raise ParameterError(f"repo id {repo_id!r}: {problem}")


def retry_hint(folder: str | os.PathLike, repo_id: str, *, private: bool = False) -> str:
    """How to retry pushing a folder that is already on disk."""
    flags = " --private" if private else ""
    return (f"the folder {folder} is complete; retry with `hf upload {repo_id} {folder}{flags}` "
            f"(`huggingface-cli upload` with huggingface_hub < 1.0) or, in Python, "
            f"`taskvec.io.publish.push_folder({str(folder)!r}, {repo_id!r})`")


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None, endpoint: str | None = None,
                evaluation: Any = None) -> PushResult:
    """Upload a merged model folder (as `taskvec merge` writes it) to the Hub repo `repo_id`.

    The repo is created if needed (`private=True`: a private repo; an existing repo keeps its
    visibility). `evaluation` (metrics: a dict, a dict of dicts, a DataFrame or a sweep) re-renders
    the README.md model card from the folder's mergekit_config.yml with an "Evaluation" table and
    `model-index`; the local folder is not modified. Returns a `PushResult` (repo and commit URLs).
    """
    folder = Path(folder).expanduser().absolute()
    check_repo_id(repo_id)
    if not folder.is_dir():
        raise PublishError(f"{folder}: not a folder; nothing to push")
    token = resolve_token(token)
    endpoint = resolve_endpoint(endpoint)
    message = commit_message or f"Upload merged model with taskvec {_version()}"
    retry = retry_hint(folder, repo_id, private=private)
    api = _api(endpoint, token)
    if evaluation is None:
        with _hub_errors(endpoint, repo_id, retry):
            return _upload(api, folder, repo_id, private=private, revision=revision, commit_message=message)
    card = _merge_card(folder, evaluation)
    with _staging(folder) as stage:
        _link_tree(folder, stage, skip={"README.md", ".git", ".cache"})
        (stage / "README.md").write_text(card, encoding="utf-8")
        with _hub_errors(endpoint, repo_id, retry):
            return _upload(api, stage, repo_id, private=private, revision=revision, commit_message=message)


def _merge_card(folder: Path, evaluation: Any) -> str:
    from taskvec.config.parse import parse_config
    from taskvec.model_card import render_model_card

    config = folder / "mergekit_config.yml"
    if not config.is_file():
        raise PublishError(f"{folder}: no mergekit_config.yml to render the model card from; write the evaluation "
                           f"into README.md yourself and push without evaluation=")
    return render_model_card(parse_config(config.read_text(encoding="utf-8")), name=folder.name, evaluation=evaluation)


def push_task_vector(vector: Any, repo_id: str, *, private: bool = False, token: str | None = None,
                     revision: str | None = None, commit_message: str | None = None, endpoint: str | None = None,
                     evaluation: Any = None, name: str | None = None, filename: str = VECTOR_FILENAME) -> PushResult:
    """Save `vector` (a `TaskVector`: anything with `.save(path)`, `.expression`, `.norm()`, `.base_name`)
    as `filename` with a README.md card (base, expression, norm, provenance, `evaluation`) and upload both.

    The token is checked and the repo created before the vector is written, so a missing token or an
    unreachable Hub fails fast; the staging folder (in the temp dir) is removed whatever happens.
    """
    from taskvec.model_card import render_vector_card

    check_repo_id(repo_id)
    token = resolve_token(token)
    endpoint = resolve_endpoint(endpoint)
    message = commit_message or f"Upload task vector with taskvec {_version()}"
    retry = f"rerun push_to_hub({repo_id!r}) (nothing was uploaded; the vector itself is unchanged)"
    api = _api(endpoint, token)
    with _hub_errors(endpoint, repo_id, retry):
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    metas = getattr(vector, "metas", {})
    card = render_vector_card(
        name=name or repo_id.split("/")[-1], repo_id=repo_id, base=getattr(vector, "base_name", None),
        expression=str(getattr(vector, "expression", "τ")), norm=float(vector.norm()), num_tensors=len(metas),
        num_parameters=int(getattr(vector, "num_parameters", 0)), filename=filename,
        provenance=list(getattr(vector, "provenance", [])), evaluation=evaluation)
    with _staging(None) as stage:
        vector.save(stage / filename)
        (stage / "README.md").write_text(card, encoding="utf-8")
        with _hub_errors(endpoint, repo_id, retry):
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            info = api.upload_folder(repo_id=repo_id, folder_path=str(stage), repo_type="model", revision=revision,
                                     commit_message=message)
    return PushResult(repo_id=repo_id, repo_url=str(repo_url), commit_url=str(getattr(info, "commit_url", info)))
