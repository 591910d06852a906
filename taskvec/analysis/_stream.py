"""One streaming pass over one or more task vectors, tensor by tensor.

Every analysis in this package is a pass over parameter names: for each name,
load that tensor's delta from every task vector (float32, flattened), update
some running sums, drop the tensors. Nothing ever concatenates a whole model,
so peak memory is (number of task vectors + a few) x the largest tensor.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Iterator

import torch

from taskvec._progress import progress
from taskvec.errors import CheckpointError, KeyMismatchError, ParameterError, ShapeMismatchError

TaskVectorLike = Mapping[str, torch.Tensor]


def named_task_vectors(tvs, names: Sequence[str] | None = None) -> tuple[list[TaskVectorLike], list[str]]:
    """Normalise the ways callers pass task vectors into (list, names).

    Accepts one task vector (a Mapping name -> Tensor), a sequence of them, or a
    Mapping label -> task vector. Names come from `names`, else the mapping's
    labels, else each vector's `.name`, else 'task 1', 'task 2', ...
    """
    if isinstance(tvs, Mapping) and tvs and all(isinstance(v, Mapping) for v in tvs.values()):
        labels, vectors = [str(k) for k in tvs], list(tvs.values())
    elif isinstance(tvs, Mapping):
        labels, vectors = None, [tvs]
    else:
        vectors, labels = list(tvs), None
    if not vectors:
        raise ParameterError("no task vectors given")
    for i, v in enumerate(vectors):
        if not isinstance(v, Mapping):
            raise ParameterError(f"task vector {i} is a {type(v).__name__}, expected a Mapping of name -> tensor (e.g. a TaskVector)")
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(vectors):
            raise ParameterError(f"names: got {len(names)} names for {len(vectors)} task vectors")
    elif labels is not None:
        names = labels
    else:
        names = []
        for i, v in enumerate(vectors):
            n = getattr(v, "name", None) or getattr(v, "expression", None)  # TaskVector: e.g. "τ[ft_sentiment]"
            names.append(n if isinstance(n, str) and n else f"task {i + 1}")
    if len(set(names)) != len(names):
        # Duplicate labels would silently merge rows of tidy tables.
        names = [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]
    return vectors, names


def common_keys(vectors: Sequence[TaskVectorLike], names: Sequence[str]) -> list[str]:
    """Parameter names shared by all task vectors, in the first one's order; a clear error otherwise."""
    first = list(vectors[0].keys())
    first_set = set(first)
    for v, n in zip(vectors[1:], names[1:]):
        ks = set(v.keys())
        if ks != first_set:
            missing = sorted(first_set - ks)[:5]
            extra = sorted(ks - first_set)[:5]
            raise KeyMismatchError(
                f"task vector {n!r} holds different parameters than {names[0]!r}: "
                f"missing {missing}{'...' if len(first_set - ks) > 5 else ''}, "
                f"extra {extra}{'...' if len(ks - first_set) > 5 else ''}"
            )
    return first


def _difference_parts(tv):
    """(base source, fine-tuned source, check_finite) when `tv` is exactly theta_ft - theta_base, else None."""
    terms = getattr(tv, "_terms", None)
    if not terms or len(terms) != 1 or terms[0][0] != 1.0:
        return None
    atom = terms[0][1]
    base, ft = getattr(atom, "base", None), getattr(atom, "ft", None)
    if not (hasattr(base, "get") and hasattr(ft, "get") and hasattr(base, "meta") and hasattr(ft, "meta")):
        return None
    return base, ft, bool(getattr(atom, "check_finite", False))


def _same_checkpoint(a, b) -> bool:
    if a is b:
        return True
    files_a, files_b = tuple(getattr(a, "files", ()) or ()), tuple(getattr(b, "files", ()) or ())
    return type(a) is type(b) and bool(files_a) and files_a == files_b


class _SharedBase:
    """Task vectors that are all theta_ft_i - theta_base over the *same* base checkpoint.

    Each base tensor is then read once per parameter (n + 1 reads instead of 2n),
    and `chunks` computes deltas block by block in cache-sized buffers.
    Build with `_SharedBase.detect(vectors)`.
    """

    def __init__(self, base, fts: list, check_finite: bool):
        self.base, self.fts, self.check_finite = base, fts, check_finite

    @classmethod
    def detect(cls, vectors: Sequence[TaskVectorLike]) -> "_SharedBase | None":
        parts = [_difference_parts(v) for v in vectors]
        if any(p is None for p in parts):
            return None
        base = parts[0][0]
        if not all(_same_checkpoint(base, p[0]) for p in parts):
            return None
        return cls(base, [p[1] for p in parts], any(p[2] for p in parts))

    def fits(self, key: str) -> bool:
        shape = self.base.meta(key).shape
        return all(ft.meta(key).shape == shape for ft in self.fts)  # aligned vocabularies: not here

    def _fail_nonfinite(self, key: str, b: torch.Tensor, ft) -> None:
        bad = self.base if not torch.isfinite(b).all() else ft
        raise CheckpointError(f"{bad.name}: tensor {key!r} contains NaN or inf")

    def deltas(self, key: str) -> list[torch.Tensor]:
        b = self.base.get(key).to(torch.float32)
        out = []
        for ft in self.fts:
            # copy then subtract in place: mixed-dtype torch.sub takes a ~9x slower path on CPU
            d = ft.get(key).to(torch.float32, copy=True).sub_(b)
            # sum() is one cheap pass; it is non-finite iff some entry is (float32 overflow aside)
            if self.check_finite and not torch.isfinite(d.sum()):
                self._fail_nonfinite(key, b, ft)
            out.append(d)
        return out

    def chunks(self, key: str, chunk: int) -> Iterator[torch.Tensor]:
        """(n, m) float32 blocks of the flattened deltas, m <= chunk, in reused cache-sized buffers."""
        b = self.base.get(key).reshape(-1)
        fts = [ft.get(key).reshape(-1) for ft in self.fts]
        numel = b.numel()
        size = min(chunk, numel)
        b32 = torch.empty(size, dtype=torch.float32)
        block = torch.empty((len(fts), size), dtype=torch.float32)
        for start in range(0, numel, chunk):
            stop = min(numel, start + chunk)
            m = stop - start
            bv = b32[:m]
            bv.copy_(b[start:stop])
            x = block[:, :m]
            for i, f in enumerate(fts):
                x[i].copy_(f[start:stop]).sub_(bv)  # stays in cache; no full-size float32 copy
            yield x


def _shared_base_loader(vectors: Sequence[TaskVectorLike]):
    """key -> list of float32 deltas reading the shared base once, or None without that structure."""
    shared = _SharedBase.detect(vectors)
    if shared is None:
        return None
    return lambda key: shared.deltas(key) if shared.fits(key) else None


def iter_deltas(
    vectors: Sequence[TaskVectorLike],
    names: Sequence[str],
    keys: Sequence[str] | None = None,
    *,
    desc: str = "analysing",
    flatten: bool = True,
    show_progress: bool = True,
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """Yield (parameter name, [delta of each task vector]) one parameter at a time.

    Deltas are float32 (flattened unless `flatten=False`); non-float entries of
    plain dicts are skipped (they carry no task vector). Shapes must agree.
    """
    if keys is None:
        keys = common_keys(vectors, names)
    shared = _shared_base_loader(vectors)
    for key in progress(keys, desc=desc, total=len(keys), disable=None if show_progress else True):
        deltas = shared(key) if shared is not None else None
        if deltas is None:
            deltas = [v[key] for v in vectors]
        if not all(d.dtype.is_floating_point for d in deltas):
            continue
        shape = tuple(deltas[0].shape)
        for d, n in zip(deltas[1:], names[1:]):
            if tuple(d.shape) != shape:
                raise ShapeMismatchError(
                    f"parameter {key!r}: shape {tuple(d.shape)} in task vector {n!r} but {shape} in {names[0]!r}"
                )
        deltas = [d.detach().to(torch.float32) for d in deltas]
        if flatten:
            deltas = [d.reshape(-1) for d in deltas]
        yield key, deltas


def iter_delta_blocks(
    vectors: Sequence[TaskVectorLike],
    names: Sequence[str],
    keys: Sequence[str] | None = None,
    *,
    desc: str = "analysing",
    chunk: int = 1 << 18,
) -> Iterator[tuple[str, Iterator[torch.Tensor]]]:
    """Yield (parameter name, iterator of (n_tasks, m) float32 blocks of its flattened deltas).

    For reductions that split over elements (dot products, counts). When the
    vectors share one base checkpoint, blocks of `chunk` elements are computed
    straight from the inputs into reused cache-sized buffers, so the model is
    read once and no full-size float32 copy is ever made; otherwise the whole
    tensor comes as one (n, numel) block. Blocks are only valid until the next one.
    With a shared base the pass runs single-threaded (torch's thread count is
    restored when the iteration ends or the generator is closed).
    """
    if keys is None:
        keys = common_keys(vectors, names)
    shared = _SharedBase.detect(vectors)
    threads = torch.get_num_threads()
    if shared is not None:
        # Blocks are small and cache-resident: one thread does them ~3x faster than the read floor,
        # while OpenMP's fork/join per small op is ruinous when cores are shared (measured: 25x slower).
        torch.set_num_threads(1)
    try:
        for key in progress(keys, desc=desc, total=len(keys)):
            if shared is not None and shared.fits(key) and shared.base.meta(key).dtype.is_floating_point:
                yield key, shared.chunks(key, chunk)
                continue
            for _, deltas in iter_deltas(vectors, names, [key], desc=desc, flatten=True, show_progress=False):
                yield key, iter([torch.stack(deltas)])
    finally:
        torch.set_num_threads(threads)
