"""One forward pass per batch records every requested activation (nnsight), streamed batch by batch.

Activation names (TransformerLens vocabulary; ``l`` is the 0-based layer; B batch, T padded length, H heads,
D hidden size, F FFN size, N requested head positions, V vocabulary). BERT/RoBERTa are post-LN: a block is
``resid_mid = LN1(resid_pre + attn_out)``, ``resid_post = LN2(resid_mid + mlp_out)``.

===================================  ============  =====================================================================
name                                 shape         what
===================================  ============  =====================================================================
``embed.hook_out``                   (B, T, D)     embeddings after their LayerNorm (= HF hidden_states[0])
``blocks.{l}.hook_resid_pre``        (B, T, D)     block input (= HF hidden_states[l])
``blocks.{l}.attn.hook_pattern``     (B, H, T, T)  attention probabilities, rows = queries (= HF attentions[l])
``blocks.{l}.hook_attn_out``         (B, T, D)     attention output projection, before residual + LN
``blocks.{l}.ln1.hook_in``           (B, T, D)     ``resid_pre + attn_out``, the attention LayerNorm's input
``blocks.{l}.hook_resid_mid``        (B, T, D)     attention LayerNorm output = FFN input
``blocks.{l}.mlp.hook_post``         (B, T, F)     FFN hidden activation (after GELU)
``blocks.{l}.hook_mlp_out``          (B, T, D)     FFN output projection, before residual + LN
``blocks.{l}.ln2.hook_in``           (B, T, D)     ``resid_mid + mlp_out``, the output LayerNorm's input
``blocks.{l}.hook_resid_post``       (B, T, D)     block output (= HF hidden_states[l + 1])
``mlm_head.hook_out``                (N, V)        MLM-head logits at ``CaptureBatch.head_positions``
===================================  ============  =====================================================================

Padding is zeroed in every tensor (attention rows and columns of padded positions); see :mod:`mlmscope.probes.batch`.

Example::

    from . import load_model, load_probe_set, capture
    lm = load_model("runs/demo/checkpoints/step_004000")
    ps = load_probe_set("probesets/default")
    for batch in capture(lm, ps, variants=("clean", "mask1"), names=["blocks.0.attn.hook_pattern"]):
        ...
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .align import EncodedProbes, encode_words
from .batch import CaptureBatch
from .masking import MaskPlan, active_plan, apply_mask, as_plan, check_variant, explicit_masks
from .model import LoadedModel, ProbeError

#: Documented activation-name templates, in forward execution order (``{l}`` = layer index).
ACTIVATION_NAMES: tuple[str, ...] = (
    "embed.hook_out",
    "blocks.{l}.hook_resid_pre",
    "blocks.{l}.attn.hook_pattern",
    "blocks.{l}.hook_attn_out",
    "blocks.{l}.ln1.hook_in",
    "blocks.{l}.hook_resid_mid",
    "blocks.{l}.mlp.hook_post",
    "blocks.{l}.hook_mlp_out",
    "blocks.{l}.ln2.hook_in",
    "blocks.{l}.hook_resid_post",
    "mlm_head.hook_out",
)
MLM_HEAD_NAME = "mlm_head.hook_out"
HEAD_AT = ("masked", "tokens", "none")


def activation_names(n_layers: int, has_mlm_head: bool = True) -> list[str]:
    """Every concrete activation name for a model, in execution order."""
    out: list[str] = []
    for tmpl in ACTIVATION_NAMES:
        if "{l}" in tmpl:
            continue
        if tmpl == MLM_HEAD_NAME:
            continue
        out.append(tmpl)
    for l in range(n_layers):
        out += [t.format(l=l) for t in ACTIVATION_NAMES if "{l}" in t]
    if has_mlm_head:
        out.append(MLM_HEAD_NAME)
    return out


@dataclass(frozen=True)
class _Tap:
    """Where one activation is read: a module, its input or output, and an optional tuple index."""

    name: str
    module: Callable[[], torch.nn.Module]
    kind: str  # "input" | "output"
    index: int | None = None


def _taps(lm: LoadedModel) -> dict[str, _Tap]:
    """Name -> tap, using only the architecture adapter's module paths."""
    a = lm.arch
    taps = {"embed.hook_out": _Tap("embed.hook_out", a.embeddings, "output")}
    for l in range(a.n_layers):
        per = {
            "hook_resid_pre": (lambda l=l: a.layer(l), "input", None),
            "attn.hook_pattern": (lambda l=l: a.attn_self(l), "output", 1),
            "hook_attn_out": (lambda l=l: a.attn_out_dense(l), "output", None),
            "ln1.hook_in": (lambda l=l: a.ln1(l), "input", None),
            "hook_resid_mid": (lambda l=l: a.ln1(l), "output", None),
            "mlp.hook_post": (lambda l=l: a.mlp_in(l), "output", None),
            "hook_mlp_out": (lambda l=l: a.mlp_out_dense(l), "output", None),
            "ln2.hook_in": (lambda l=l: a.ln2(l), "input", None),
            "hook_resid_post": (lambda l=l: a.ln2(l), "output", None),
        }
        for suffix, (mod, kind, idx) in per.items():
            name = f"blocks.{l}.{suffix}"
            taps[name] = _Tap(name, mod, kind, idx)
    return taps


def _check_names(lm: LoadedModel, names: Sequence[str] | None) -> list[str]:
    valid = activation_names(lm.n_layers, lm.has_mlm_head)
    if names is None:
        return valid
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in valid]
    if MLM_HEAD_NAME in unknown and not lm.has_mlm_head:
        raise ProbeError(f"{MLM_HEAD_NAME} requested but {lm.path!r} has no MLM head (head-less model)")
    if unknown:
        raise ProbeError(
            f"unknown activation name(s) {unknown}; valid names look like {ACTIVATION_NAMES[:4]}... "
            f"(layers 0..{lm.n_layers - 1})"
        )
    order = {n: i for i, n in enumerate(valid)}
    return sorted(names, key=order.__getitem__)


def envoy_at(net: Any, path: str) -> Any:
    """The nnsight envoy at a dotted module ``path`` inside ``net`` (an ``NNsight`` wrapper).

    nnsight serves ``.output``/``.input`` on every envoy, so a submodule *named* ``output`` (every BERT layer has
    one) is mounted as ``E_output``; this resolves such names.
    """
    from nnsight.intervention.envoy import Envoy

    envoy = net
    for part in filter(None, path.split(".")):
        serves = inspect.isdatadescriptor(getattr(Envoy, part, None))
        envoy = getattr(envoy, Envoy.OVERLOAD_PREFIX + part if serves else part)
    return envoy


#: Where :func:`nnsight_wrapper` keeps a module's wrapper (in the module's own ``__dict__``, not as a submodule).
_WRAPPER_ATTR = "_mlmscope_nnsight"


def nnsight_wrapper(module: torch.nn.Module) -> Any:
    """The one ``nnsight.NNsight`` wrapper of ``module``, created on first use and reused by every caller.

    nnsight patches the wrapped modules' ``forward`` and renames clashing submodules, so the capture and the
    interventions (layer drop) share one wrapper per loaded model instead of stacking several.
    """
    wrapper = module.__dict__.get(_WRAPPER_ATTR)
    if wrapper is None:
        from nnsight import NNsight

        with warnings.catch_warnings():
            # nnsight renames BERT's `output` submodules to `E_output` and warns per layer; resolved by _envoy.
            warnings.filterwarnings("ignore", message=".*nnsight already serves.*")
            wrapper = NNsight(module)
        module.__dict__[_WRAPPER_ATTR] = wrapper
    return wrapper


class _Tracer:
    """An nnsight wrapper of the bare encoder plus the envoys of the requested taps."""

    def __init__(self, lm: LoadedModel, names: list[str]) -> None:
        from nnsight.intervention.envoy import Envoy

        enc = lm.arch.encoder_model
        self.net = nnsight_wrapper(enc)
        paths = {id(m): p for p, m in enc.named_modules()}
        taps = _taps(lm)
        self.plan: list[tuple[str, Any, str, int | None]] = []
        for n in names:
            if n == MLM_HEAD_NAME:
                continue
            t = taps[n]
            self.plan.append((n, self._envoy_of(t, paths, Envoy), t.kind, t.index))
        last = taps[f"blocks.{lm.n_layers - 1}.hook_resid_post"]
        self.need_final = MLM_HEAD_NAME in names and not any(n == last.name for n, *_ in self.plan)
        if self.need_final:
            self.plan.append(("_final", self._envoy_of(last, paths, Envoy), last.kind, last.index))

    def _envoy_of(self, tap: _Tap, paths: dict[int, str], envoy_cls: Any) -> Any:
        return envoy_at(self.net, paths[id(tap.module())])

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """One traced forward pass; returns the saved tensors by name."""
        saved: dict[str, torch.Tensor] = {}
        plan = self.plan
        with torch.no_grad(), self.net.trace(input_ids, attention_mask=attention_mask):
            for name, envoy, kind, index in plan:
                value = envoy.output if kind == "output" else envoy.input
                saved[name] = (value if index is None else value[index]).save()
        return saved


def _pad_batch(rows: list[list[int]], pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    am = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        am[b, : len(r)] = 1
    return ids.to(device), am.to(device)


def _zero_padding_(name: str, x: torch.Tensor, pad: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Zero padded positions in place: (B, T, *) rows, and for attention (B, H, T, T) rows and columns.

    Args:
        name: Activation name (attention patterns get rows and columns zeroed).
        x: The tensor (one of the finished forward pass's own intermediates, so no copy is made).
        pad: ``(rows, positions)`` of the padded tokens (``(~attention_mask).nonzero(as_tuple=True)``); indexing only
            those is far cheaper than a full masked pass over every activation.
    """
    b, t = pad
    if name.endswith("attn.hook_pattern"):
        x[b, :, t] = 0
        x[b, :, :, t] = 0
    else:
        x[b, t] = 0
    return x


def _head_positions(head_at: str, labels: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    if head_at == "masked":
        sel = labels != -100
    elif head_at == "tokens":
        sel = token_mask
    else:
        sel = torch.zeros_like(token_mask)
    return sel.nonzero()


def prepare(lm: LoadedModel, probe_set: Any) -> EncodedProbes:
    """Tokenise a probe set for a model, checking the tokenizer hash and skipping sentences that do not fit.

    Args:
        lm: Loaded model.
        probe_set: A :class:`mlmscope.probes.probeset.ProbeSet`, an :class:`EncodedProbes`, or a list of word lists.

    Raises:
        ProbeError: the probe set was built for another tokenizer, or no sentence fits the model.
    """
    if isinstance(probe_set, EncodedProbes):
        return probe_set
    want = getattr(probe_set, "tokenizer_hash", None)
    if want and want != lm.tokenizer_hash:
        raise ProbeError(
            f"probe set was built for tokenizer {want} but the model at {lm.path!r} uses "
            f"{lm.tokenizer_hash}; rebuild it with `mlmscope probes build --model {lm.path}` "
            "or build one without --model"
        )
    sentences = getattr(probe_set, "sentences", probe_set)
    enc = encode_words(lm.tokenizer, sentences, lm.arch.max_length)
    if len(enc) == 0:
        raise ProbeError(f"no probe sentence fits the model (skipped: {enc.skipped})")
    return enc


def _batches(enc: EncodedProbes, batch_size: int, sort_by_length: bool) -> Iterator[list[int]]:
    order = list(range(len(enc)))
    if sort_by_length:
        order.sort(key=lambda i: (len(enc.input_ids[i]), i))
    for s in range(0, len(order), batch_size):
        yield order[s : s + batch_size]


def capture(
    lm: LoadedModel,
    probe_set: Any,
    variants: Sequence[str] = ("clean",),
    names: Sequence[str] | None = None,
    batch_size: int = 32,
    head_at: str = "masked",
    seed: int = 0,
    sort_by_length: bool = True,
    to_cpu: bool = True,
    masks: MaskPlan | Sequence[Any] | None = None,
) -> Iterator[CaptureBatch]:
    """Stream capture batches: one nnsight-traced forward pass per (variant, batch), saving only ``names``.

    Args:
        lm: From :func:`mlmscope.probes.model.load_model`.
        probe_set: ProbeSet, EncodedProbes (from :func:`prepare`, to reuse the tokenisation and see skip counts), or
            word lists.
        variants: Any of ``clean``, ``mask15``, ``mask1`` (see :mod:`mlmscope.probes.masking`); each is a full pass.
        names: Activation names (see module docstring); None = all.
        batch_size: Sentences per forward pass.
        head_at: Where ``mlm_head.hook_out`` is computed: ``masked`` positions (default), every non-special
            ``tokens`` position, or ``none``.
        seed: Masking seed.
        sort_by_length: Batch sentences of similar length together (less padding; results are padding-invariant).
        to_cpu: Move captured tensors to CPU; False keeps them on the model's device (the same thing on a CPU).
        masks: Explicit mask positions for the masked variants instead of the seeded rule: one list per probe
            sentence, 0-based among the sentence's non-special pieces (:class:`mlmscope.probes.masking.MaskPlan`).
            None = the seeded rule, or the plan of an enclosing :func:`mlmscope.probes.masking.explicit_masks`.

    Yields:
        :class:`CaptureBatch` objects, variant by variant.

    Raises:
        ProbeError: unknown variant/name/head_at, MLM head requested on a head-less model, tokenizer mismatch, or
            ``masks`` without one entry per sentence or with a position out of range (naming the sentence).
    """
    for v in variants:
        check_variant(v)
    if head_at not in HEAD_AT:
        raise ProbeError(f"head_at must be one of {HEAD_AT}, got {head_at!r}")
    names = _check_names(lm, names)
    plan = as_plan(masks)
    enc = prepare(lm, probe_set)
    in_force = plan if plan is not None else active_plan()
    if in_force is not None and any(v != "clean" for v in variants):
        in_force.check(enc)
    tracer = _Tracer(lm, names)
    tok = lm.tokenizer
    special_ids = set(tok.all_special_ids)
    for variant in variants:
        for idx in _batches(enc, batch_size, sort_by_length):
            with explicit_masks(plan):  # only around the batch's own masking: never held across a yield
                batch = _capture_one(lm, tracer, enc, idx, variant, names, head_at, seed, special_ids, to_cpu)
            yield batch


def _capture_one(
    lm: LoadedModel,
    tracer: _Tracer,
    enc: EncodedProbes,
    idx: list[int],
    variant: str,
    names: list[str],
    head_at: str,
    seed: int,
    special_ids: set[int],
    to_cpu: bool,
) -> CaptureBatch:
    tok = lm.tokenizer
    rows, labels = [], []
    for i in idx:
        wid = enc.word_ids[i]
        ids, lab = apply_mask(
            enc.input_ids[i], [w is None for w in wid], variant, enc.sentence_ids[i], tok.mask_token_id, seed
        )
        rows.append(ids)
        labels.append(lab)
    input_ids, am = _pad_batch(rows, tok.pad_token_id, lm.device)
    T = input_ids.shape[1]
    lab = torch.full((len(idx), T), -100, dtype=torch.long)
    special = torch.ones((len(idx), T), dtype=torch.bool)
    for b, i in enumerate(idx):
        lab[b, : len(labels[b])] = torch.tensor(labels[b])
        special[b, : len(rows[b])] = torch.tensor([w is None for w in enc.word_ids[i]])
    saved = tracer.run(input_ids, am)
    pad = (~am.bool()).nonzero(as_tuple=True)
    acts = {name: _zero_padding_(name, saved[name].float(), pad) for name in names if name != MLM_HEAD_NAME}
    am_cpu = am.cpu()
    hp = _head_positions(head_at, lab, am_cpu.bool() & ~special)
    if MLM_HEAD_NAME in names:
        final = saved.get(f"blocks.{lm.n_layers - 1}.hook_resid_post", saved.get("_final"))
        assert final is not None  # _Tracer adds "_final" to its plan whenever the last block is not captured
        hp_dev = hp.to(final.device)
        with torch.no_grad():
            acts[MLM_HEAD_NAME] = lm.arch.apply_mlm_head(final[hp_dev[:, 0], hp_dev[:, 1]]).float()
    if to_cpu:
        acts = {k: v.cpu() for k, v in acts.items()}
    word_ids = [enc.word_ids[i] + [None] * (T - len(enc.word_ids[i])) for i in idx]
    return CaptureBatch(
        variant=variant,
        sentence_ids=torch.tensor([enc.sentence_ids[i] for i in idx]),
        input_ids=input_ids.cpu(),
        attention_mask=am_cpu,
        special_mask=special,
        word_ids=word_ids,
        labels=lab,
        head_positions=hp,
        acts=acts,
    )
