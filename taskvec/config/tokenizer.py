"""Vocabulary merging: mergekit's ``tokenizer:`` / ``tokenizer_source:`` and ``chat_template:`` keys.

What mergekit 0.1.5 does, step for step (its code is cited in each docstring):

1. **Output tokenizer** (`build_output_tokenizer`, mergekit/tokenizer/build.py ``build_tokenizer``):
   ``base`` — the base model's tokenizer, stripped of tokens at or beyond its
   config's ``vocab_size``; a model path — that model's tokenizer; ``union`` —
   the base's tokenizer plus, in order, every other model's tokens it lacks
   (``add_tokens``), then every model's added tokens (`union_additions`).
   Tokens named under ``tokens:`` that the result lacks are added last.
2. **Permutations** (`permutation`): for every model, output id -> the model's
   own id, or -1 when the model lacks the token.
3. **Rows** (`permute_rows`, mergekit/tokenizer/embed.py ``PermutedVocabulary``):
   every vocabulary-indexed tensor (embeddings, LM head) of every model of the
   merge is re-indexed to the output vocabulary *before* the merge method runs.
   A row a model lacks (or every row of a ``force``d token) is filled by the
   token's source (`assign_sources`): a token only one model has -> that model's
   row; a token the base has -> the base's row; a token several models but not
   the base have -> their average; a token no model has -> zeros; an explicit
   ``tokens:`` entry -> its ``source`` (``{kind: zero}``, a model's row for the
   token, or ``{kind: model_token, model, token | token_id}``: a given row of a
   model). ``pad_to_multiple_of`` pads with the mean of the real rows.
4. **Chat template** (`resolve_chat_template`, mergekit/merge.py ``_set_chat_template``).

Everything except `build_output_tokenizer` / `resolve_chat_template` is a pure
function of vocabularies (``dict[str, int]``) and tensors, testable on toy
vocabularies. Deliberate differences from mergekit: tokens the union adds get
ids in a fixed order (models in config order, each in id order) where
mergekit's follow a Rust hash map's iteration order that changes from run to
run; without ``base_model`` the first model of the config is the base (mergekit
picks from an unordered set); averages are computed in float32 (mergekit: in
the inputs' dtype, the config's ``dtype``); a bad ``tokens:`` source is an error
naming the token (mergekit raises an assertion or NotImplementedError).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from taskvec.errors import ParameterError

if TYPE_CHECKING:  # torch is imported where rows are computed: parsing a config (and --help) stays light
    import torch

TOKENIZER_SOURCES = ("union", "base")  # or a model path


@dataclass(frozen=True)
class TokenSource:
    """Where a token's row comes from: mergekit's ``ModelTokenEmbedding`` / ``ZeroEmbedding`` / a model.

    kind: ``"model"`` (the model's row for the same token), ``"model_token"``
    (row `token_id`, or the row of `token`, of `model`) or ``"zero"``.
    """

    kind: str
    model: str | None = None
    token_id: int | None = None
    token: str | None = None


@dataclass(frozen=True)
class TokenEmbedding:
    """One entry of ``tokenizer.tokens`` (mergekit's ``TokenEmbeddingConfig``)."""

    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The ``tokenizer:`` block (mergekit's ``TokenizerConfig``); ``tokenizer_source: X`` is ``source: X``."""

    source: str = "union"
    tokens: Mapping[str, TokenEmbedding] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None

    def models(self) -> list[str]:
        """Models the block names (a model source, token sources)."""
        out = [] if self.source in TOKENIZER_SOURCES else [self.source]
        out += [e.source.model for e in self.tokens.values() if e.source is not None and e.source.model]
        return list(dict.fromkeys(out))


# ---------------------------------------------------------------- pure vocabulary functions

def padded_size(n: int, pad_to_multiple_of: int | None) -> int:
    """mergekit/merge.py ``_update_config_vocab`` and embed.py: round `n` up to a multiple."""
    if pad_to_multiple_of and n % pad_to_multiple_of:
        return n + pad_to_multiple_of - n % pad_to_multiple_of
    return n


def union_additions(base_vocab: Mapping[str, int],
                    models: Sequence[tuple[Mapping[str, int], Sequence[str], int]]) -> tuple[list[str], list[str]]:
    """The tokens mergekit's union adds to the base tokenizer, in order: (plain tokens, added tokens).

    models: (vocab, added-token strings, vocab_size) per model, the base first
    (mergekit/tokenizer/build.py ``build_union_tokenizer``): tokens at ids >=
    the model's vocab_size are skipped; plain tokens the base lacks are added
    as tokens, then every model's added tokens (the first model's settings win).
    Each vocabulary is walked in id order (mergekit: hash-map order).
    """
    out_vocab: dict[str, None] = {}
    out_added: dict[str, None] = {}
    for vocab, added, size in models:
        added = set(added)
        for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
            if idx < size and tok not in added:
                out_vocab.setdefault(tok)
        for tok in added:
            if vocab.get(tok, size) < size:
                out_added.setdefault(tok)
    plain = [t for t in out_vocab if t not in out_added and t not in base_vocab]
    ordered_added = [t for vocab, added, size in models
                     for t in sorted(added, key=lambda x: vocab.get(x, size)) if t in out_added]
    return plain, list(dict.fromkeys(ordered_added))


def permutation(vocab_out: Mapping[str, int], model_vocab: Mapping[str, int], vocab_size: int | None = None
                ) -> dict[int, int]:
    """Output id -> the model's id, -1 where the model lacks the token (build.py, "Building permutations").

    A token at an id >= the model's `vocab_size` (padding) counts as missing
    (mergekit leaves it out of the permutation and then fails on it).
    """
    size = len(model_vocab) if vocab_size is None else vocab_size
    out = {}
    for tok, new_idx in vocab_out.items():
        idx = model_vocab.get(tok, -1)
        out[new_idx] = idx if 0 <= idx < size else -1
    return out


def assign_sources(vocab: Mapping[str, int], permutations: Mapping[str, Mapping[int, int]], models: Sequence[str],
                   base_model: str | None, tokens: Mapping[str, TokenEmbedding]
                   ) -> tuple[dict[str, TokenEmbedding], set[str]]:
    """(token -> its source, tokens to average): embed.py ``assign_embedding_sources``.

    Tokens with an explicit entry keep it. Otherwise a token one model has comes
    from that model, a token no model has is zero, a token the base has (the
    base being one of `models`) comes from the base, and the rest are averaged
    over the models that have them.
    """
    configs = dict(tokens)
    average: set[str] = set()
    for tok, tid in vocab.items():
        if tok in configs:
            continue
        has = [permutations[m][tid] >= 0 for m in models]
        n = sum(has)
        if n == 1:
            configs[tok] = TokenEmbedding(TokenSource("model", models[has.index(True)]))
        elif n == 0:
            configs[tok] = TokenEmbedding(TokenSource("zero"))
        elif base_model in models and permutations[base_model][tid] >= 0:
            configs[tok] = TokenEmbedding(TokenSource("model", base_model))
        else:
            average.add(tok)
    return configs, average


def permute_rows(tensors: Mapping[str, torch.Tensor], vocab: Mapping[str, int],
                 permutations: Mapping[str, Mapping[int, int]], *, base_model: str | None = None,
                 tokens: Mapping[str, TokenEmbedding] | None = None,
                 original_vocabs: Mapping[str, Mapping[str, int]] | None = None,
                 pad_to_multiple_of: int | None = None, axis: int = 0, name: str = "tensor"
                 ) -> dict[str, torch.Tensor]:
    """Every model's vocabulary-indexed tensor re-indexed to `vocab` (embed.py ``PermutedVocabulary.execute``).

    tensors: model -> tensor (the models of the merge, in order; vocabulary on
    `axis`). Rows are copied where the model has the token (and it is not
    ``force``d); the others get the token's default row (`assign_sources`), the
    same for every model. Padding rows (``pad_to_multiple_of``) are the mean of
    the real rows of that model's re-indexed tensor. Computes in float32.
    """
    import torch

    tokens = dict(tokens or {})
    models = list(tensors)
    views = {m: t.movedim(axis, 0).float() for m, t in tensors.items()}
    shapes = {tuple(v.shape[1:]) for v in views.values()}
    if len(shapes) > 1:
        raise ParameterError(f"{name}: the models' non-vocabulary dimensions differ: "
                             f"{ {m: tuple(t.shape) for m, t in tensors.items()} }")
    row_shape = views[models[0]].shape[1:]
    configs, average = assign_sources(vocab, permutations, models, base_model, tokens)

    defaults: dict[str, torch.Tensor] = {}
    for tok, tid in vocab.items():
        cfg = tokens.get(tok)
        if not (cfg and cfg.force) and all(permutations[m][tid] >= 0 for m in models):
            continue
        if tok in average:
            have = [views[m][permutations[m][tid]] for m in models if permutations[m][tid] >= 0]
            row = torch.zeros(row_shape)
            for r in have:  # mergekit sums in model order, then divides
                row = row + r
            defaults[tok] = row / len(have)
        else:
            defaults[tok] = _source_row(configs[tok], tok, tid, views, permutations, original_vocabs, name)

    size = padded_size(len(vocab), pad_to_multiple_of)
    id_list = list(vocab.values())
    ids = torch.tensor(id_list, dtype=torch.long)
    forced = torch.tensor([bool(tokens.get(t) and tokens[t].force) for t in vocab], dtype=torch.bool)
    out = {}
    for m in models:
        p = permutations[m]
        src = torch.tensor([p[i] for i in id_list], dtype=torch.long)
        copy = (src >= 0) & ~forced  # the model's own row, unless the token is forced
        new = torch.zeros((size, *row_shape))
        new[ids[copy]] = views[m][src[copy]]
        for tok, row in defaults.items():
            tid = vocab[tok]
            if p[tid] < 0 or (tokens.get(tok) and tokens[tok].force):
                new[tid] = row
        if size > len(vocab):  # https://nlp.stanford.edu/~johnhew/vocab-expansion.html, as mergekit
            new[len(vocab):] = new[:len(vocab)].mean(dim=0)
        out[m] = new.movedim(0, axis).to(tensors[m].dtype)
    return out


def _source_row(cfg: TokenEmbedding, tok: str, tid: int, views: Mapping[str, torch.Tensor],
                permutations: Mapping[str, Mapping[int, int]], original_vocabs, name: str) -> torch.Tensor:
    """embed.py ``compute_default_embedding``: the row an explicit (or assigned) source gives `tok`."""
    import torch

    where = f"tokenizer.tokens[{tok!r}].source"
    src = cfg.source
    if src is None:
        raise ParameterError(f"{where}: token {tok!r} is missing from some model (or forced) and has no `source`; "
                             "give `source: MODEL`, `{kind: zero}` or `{kind: model_token, ...}`")
    if src.kind == "zero":
        return torch.zeros(next(iter(views.values())).shape[1:])
    if src.model not in views:
        raise ParameterError(f"{where}: model {src.model!r} is not one of the models merged into {name} "
                             f"({', '.join(views)})")
    rows = views[src.model]
    if src.kind == "model_token":
        idx = src.token_id
        if idx is None:
            vocab = (original_vocabs or {}).get(src.model, {})
            if src.token not in vocab:
                raise ParameterError(f"{where}: token {src.token!r} is not in {src.model}'s vocabulary")
            idx = vocab[src.token]
        if not 0 <= idx < rows.shape[0]:
            raise ParameterError(f"{where}: token_id {idx} is out of range for {src.model} "
                                 f"({rows.shape[0]} rows)")
        return rows[idx]
    idx = permutations[src.model][tid]
    if idx < 0:
        raise ParameterError(f"{where}: token {tok!r} is not in {src.model}'s vocabulary; use "
                             "`{kind: model_token, model: ..., token: ...}` to take another token's row")
    return rows[idx]


def vocabulary_axis(name: str, shape: Sequence[int], vocab_size: int | None) -> int | None:
    """The axis of a tensor that indexes the vocabulary (0), or None.

    mergekit reads it from its architecture definitions (``vocabulary_axis`` of
    the embeddings and the LM head); taskvec, which has none, takes every tensor
    outside the layer stack whose first dimension is the model's ``vocab_size``.
    """
    from taskvec.merging import layer_index

    if vocab_size is None or not shape or layer_index(name) is not None:
        return None
    return 0 if shape[0] == vocab_size else None


# ---------------------------------------------------------------- tokenizers (transformers)

@dataclass
class TokenizerInfo:
    """The output tokenizer and, per model, the permutation of its vocabulary (build.py ``TokenizerInfo``)."""

    tokenizer: Any
    vocab: dict[str, int]
    permutations: dict[str, dict[int, int]]
    original_vocabs: dict[str, dict[str, int]]
    vocab_sizes: dict[str, int]

    @property
    def size(self) -> int:
        return len(self.vocab)


def model_vocab_size(model_dir: Path | None) -> int | None:
    """``vocab_size`` of a model's config.json (``text_config.vocab_size`` for multimodal configs)."""
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        return None
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    size = cfg.get("vocab_size")
    if size is None and isinstance(cfg.get("text_config"), Mapping):
        size = cfg["text_config"].get("vocab_size")
    return size


def _load_tokenizer(path: Path, what: str):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as e:  # noqa: BLE001 - transformers raises anything
        raise ParameterError(f"{what}: can't load a tokenizer from {path} ({type(e).__name__}: {e})") from None


def _stripped_tokenizer(path: Path, vocab_size: int | None, what: str):
    """build.py ``get_stripped_tokenizer``: the tokenizer without tokens at ids >= the model's vocab_size."""
    import tokenizers

    tok = _load_tokenizer(path, what)
    size = vocab_size or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    if not tok.is_fast:
        raise ParameterError(f"{what}: {path} has tokens beyond vocab_size {size} and no fast tokenizer")
    d = json.loads(tok._tokenizer.to_str())
    if d["model"]["type"] != "BPE":
        raise ParameterError(f"{what}: {path} has tokens beyond vocab_size {size}; only a BPE tokenizer can be "
                             f"stripped of them (this one is {d['model']['type']}), as in mergekit")
    d["added_tokens"] = [e for e in d["added_tokens"] if e["id"] < size]
    for t in unused:
        d["model"]["vocab"].pop(t, None)
    d["model"]["merges"] = [m for m in d["model"]["merges"]
                            if not set(m.split(" ") if isinstance(m, str) else m) & unused]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(d))
    return tok


def build_output_tokenizer(spec: TokenizerSpec, base: str, models: Sequence[str], dirs: Mapping[str, Path | None],
                           where: str = "config") -> TokenizerInfo:
    """The output tokenizer and every model's permutation (build.py ``build_tokenizer``).

    base: the base model (mergekit: ``base_model``, else a referenced model);
    models: every model of the merge, in config order; dirs: model -> folder.
    A model whose tokenizer can't be loaded is assumed to share the base's, as
    mergekit does (with a warning).
    """
    import tempfile

    import transformers

    sizes = {m: model_vocab_size(dirs.get(m)) for m in models}
    if dirs.get(base) is None:
        raise ParameterError(f"{where}: tokenizer: the base model {base!r} has no folder to read a tokenizer from")
    base_tok = _stripped_tokenizer(Path(dirs[base]), sizes.get(base) or model_vocab_size(dirs[base]),
                                   f"{where}: tokenizer (base model {base})")
    toks = {base: base_tok}
    for m in models:
        if m == base or m in toks:
            continue
        try:
            if dirs.get(m) is None:
                raise ParameterError(f"{m}: no folder")
            toks[m] = _load_tokenizer(Path(dirs[m]), f"{where}: tokenizer")
        except ParameterError as e:
            warnings.warn(f"{where}: tokenizer: can't load the tokenizer of {m} ({e}); assuming it is the same as "
                          f"the base model's, as mergekit does", stacklevel=2)
    if spec.source == "base":
        out = base_tok
    elif spec.source == "union":
        added = {m: [a.content for a in t.added_tokens_decoder.values()] for m, t in toks.items()}
        first_info: dict[str, Any] = {}
        for m, t in toks.items():  # the first model's settings of an added token win (mergekit warns)
            for a in t.added_tokens_decoder.values():
                first_info.setdefault(a.content, a)
        plain, added_order = union_additions(
            base_tok.get_vocab(),
            [(t.get_vocab(), added[m], sizes.get(m) or t.vocab_size) for m, t in toks.items()])
        with tempfile.TemporaryDirectory() as tmp:  # mergekit: save and reload so the base is not mutated
            base_tok.save_pretrained(tmp, legacy_format=False, safe_serialization=True)
            out = transformers.AutoTokenizer.from_pretrained(tmp, use_fast=True)
        for t in plain:
            out.add_tokens(t)
        for t in added_order:
            out.add_tokens(first_info[t])
    else:
        src_dir = dirs.get(spec.source)
        if src_dir is None:
            raise ParameterError(f"{where}: tokenizer.source: {spec.source!r} is not a model folder")
        out = _load_tokenizer(Path(src_dir), f"{where}: tokenizer.source")
    existing = set(out.get_vocab())
    for t in spec.tokens:
        if t not in existing:
            out.add_tokens(t)
            existing.add(t)
    vocab = out.get_vocab()
    originals = {m: t.get_vocab() for m, t in toks.items()}
    perms = {}
    for m in models:
        mv = originals.get(m, originals[base])
        perms[m] = permutation(vocab, mv, sizes.get(m) or len(mv))
    return TokenizerInfo(out, vocab, perms, originals, {m: s for m, s in sizes.items() if s is not None})


def resolve_chat_template(value: str | None, model_dirs: Sequence[Path | None], where: str = "config") -> str | None:
    """The template text for ``chat_template: VALUE`` (mergekit/merge.py ``_set_chat_template``).

    ``auto``: the template most of the models carry (ties: the first in config
    order; None when none has one); a name of mergekit's bundled templates
    (`taskvec.config.chat_templates`); otherwise a literal Jinja template (at
    least 20 characters with a ``{``), else an error.
    """
    from collections import Counter

    from taskvec.config.chat_templates import CHAT_TEMPLATES

    if not value:
        return None
    if value == "auto":
        found = []
        for d in model_dirs:
            if d is None:
                continue
            try:
                tok = _load_tokenizer(Path(d), where)
            except ParameterError as e:
                warnings.warn(f"{where}: chat_template: auto: {e}", stacklevel=2)
                continue
            t = tok.chat_template
            if isinstance(t, dict):
                t = t.get("default")
            if t:
                found.append(t.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value and value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        raise ParameterError(f"{where}: chat_template: {value!r} is neither a template name mergekit ships "
                             f"({', '.join(sorted(CHAT_TEMPLATES))}), `auto`, nor a Jinja template")
    return value


# ---------------------------------------------------------------- sources re-indexed to the output vocabulary

class VocabularyMerge:
    """Every model's vocabulary-indexed tensors re-indexed to the output vocabulary, lazily, tensor by tensor.

    `wrap()` gives one `Source` per model whose embedding / LM-head tensors have
    the output vocabulary's rows (`permute_rows`); the merge then runs on those,
    as mergekit runs its merge methods on ``PermutedVocabulary``'s outputs.
    group(tensor_name) -> (the models merged into that tensor, its base model or
    None): mergekit takes the first slice's sources and base for embeddings, the
    last slice's for the LM head (plan.py ``plan_module``, config.py ``ConfigReader``).
    The last tensor's rows are cached for every model (the executor asks each
    model for the same tensor in turn).
    """

    def __init__(self, info: TokenizerInfo, spec: TokenizerSpec, base: str | None, sources: Mapping[str, Any],
                 group):
        self.info, self.spec, self.base, self.sources, self.group = info, spec, base, dict(sources), group
        self._cache: tuple[tuple, dict[str, torch.Tensor]] | None = None

    @property
    def size(self) -> int:
        return padded_size(self.info.size, self.spec.pad_to_multiple_of)

    def model_vocab_size(self, ref: str) -> int | None:
        if ref in self.info.vocab_sizes:
            return self.info.vocab_sizes[ref]
        v = self.info.original_vocabs.get(ref)
        return len(v) if v is not None else None

    def is_vocabulary(self, ref: str, name: str) -> bool:
        src = self.sources[ref]
        return name in src.index and vocabulary_axis(name, src.index[name].shape, self.model_vocab_size(ref)) == 0

    def rows(self, name: str, ref: str) -> torch.Tensor:
        group, base = self.group(name)
        members = [m for m in group if m in self.sources and self.is_vocabulary(m, name)]
        if ref not in members:
            members.append(ref)
        key = (name, tuple(members))
        if self._cache is None or self._cache[0] != key:
            self._cache = None  # free the previous tensor's rows first
            out = permute_rows({m: self.sources[m].get(name) for m in members}, self.info.vocab,
                               self.info.permutations, base_model=base, tokens=self.spec.tokens,
                               original_vocabs=self.info.original_vocabs,
                               pad_to_multiple_of=self.spec.pad_to_multiple_of, name=name)
            self._cache = (key, out)
        return self._cache[1][ref]

    def describe(self) -> str:
        """One paragraph for ``--dry-run``: the output vocabulary and where its rows come from."""
        models = list(self.info.permutations)
        configs, average = assign_sources(self.info.vocab, self.info.permutations, models, self.base,
                                          self.spec.tokens)
        missing = [t for t, i in self.info.vocab.items() if any(p[i] < 0 for p in self.info.permutations.values())]
        kinds: dict[str, int] = {}
        for t in missing:
            cfg = configs.get(t)
            kind = ("averaged" if t in average else "tokens: override" if t in self.spec.tokens
                    else "zero" if cfg.source.kind == "zero" else f"from {cfg.source.model}")
            kinds[kind] = kinds.get(kind, 0) + 1
        lines = [f"  tokenizer: {self.spec.source} -> {self.info.size} tokens"
                 + (f", {self.size} rows (pad_to_multiple_of {self.spec.pad_to_multiple_of})"
                    if self.size != self.info.size else "")]
        lines.append(f"    {len(missing)} tokens some model lacks; their rows: "
                     + (", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"))
        return "\n".join(lines)

    def wrap(self) -> dict[str, Any]:
        from taskvec.io.base import Source, TensorMeta

        merge = self

        class PermutedVocabularySource(Source):
            def __init__(self, ref: str):
                inner = merge.sources[ref]
                self.ref, self.inner = ref, inner
                self.name, self.model_dir, self.files = inner.name, inner.model_dir, inner.files

            def _index(self):
                return {k: (TensorMeta((merge.size, *m.shape[1:]), m.dtype) if merge.is_vocabulary(self.ref, k)
                            else m) for k, m in self.inner.index.items()}

            def get(self, key):
                return merge.rows(key, self.ref) if merge.is_vocabulary(self.ref, key) else self.inner.get(key)

        return {ref: PermutedVocabularySource(ref) for ref in self.sources}
