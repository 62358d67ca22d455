"""ROME, run for real as a baseline: the rank-one update of one FF2 matrix (Meng et al., 2022, "Locating and
Editing Factual Associations in GPT", Section 3 and Appendix; code kmeng01/rome, EasyEdit's ``rome``).

For an edit (prompt with subject s, target_new):

1. **Key** k*: FF2's input at the last token of the subject, averaged over the prompt preceded by a few
   context prefixes (ROME's ``fact_token = "subject_last"``, ``compute_u``).
2. **Value** v* = v0 + delta: delta is added to FF2's output at that token and optimised (Adam, lr
   ``v_lr``, ``v_num_grad_steps`` steps) so that the model predicts every token of target_new after each
   prefixed prompt, plus ``kl_factor`` x KL(original || edited) of the next-token distribution at the
   subject's last token of "{subject} is a" (keeps the subject's essence), plus a weight decay
   ``v_weight_decay * |delta| / |v0|^2`` (ROME's code, literally); |delta| is clamped to
   ``clamp_norm_factor * |v0|`` after each step (``compute_v``).
3. **Insert**: with C = E[k k^T] the uncentred second moment of FF2 inputs (``mom2_adjustment``),
   u = C^-1 k* / |C^-1 k*| and, at the unprefixed prompt's key k and output v = W k,
   ``right = (v* - v) / (k . u)``; the update in (d_in, d_out) orientation (:meth:`ModelView.weight`)
   is ``outer(u, right)``, so W' k = v* exactly and directions rare under C move least.

What differs from the published runs, and why:

* **C from CounterFact text, not Wikipedia.** ROME estimates C from 100,000 Wikipedia samples; offline we
  use FF2 inputs at every token of CounterFact prompts, paraphrases and neighbourhood prompts (by default
  the *train* split: no held-out text). These are short factual sentences, so C describes the keys of
  exactly this kind of text and less of general text; a ridge ``cov_ridge * tr(C)/d`` keeps it invertible
  (the sample has ~10^5 tokens for d_ff = 1536, but some directions are nearly unused).
* **Fewer context prefixes, generated greedily.** ROME samples 10 prefixes of 5 and 10 of 10 tokens from
  the model (``context_template_length_params [[5, 10], [10, 10]]``); we take the greedy 5-token
  continuations of ROME's five seed words ("The", "Therefore", "Because", "I", "You"), plus the bare
  prompt: deterministic (an edit is reproducible bit for bit) and 6 rows instead of 21, which keeps one
  edit affordable on a CPU. The v* optimisation re-runs only the blocks from ``layer`` up (nothing below
  depends on delta), as the editor's evaluation does.
* **Layer**: ROME edits GPT-2 XL's layer 17 of 48 (causal tracing); we default to the same relative depth
  (:func:`default_layer`: SmolLM2-135M 11 of 30, Gemma 3 270M 6 of 18) and take ``--layer``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch

from blens.extract.adapters import ModelView
from blens.extract.capture import pad_batch

from .spec import MATRIX

ROME_DEPTH = 17 / 48  # ROME's GPT-2 XL layer as a fraction of the depth
CONTEXT_SEEDS = ("The", "Therefore", "Because", "I", "You")  # ROME's seeds for its context templates


def default_layer(n_layers: int) -> int:
    """ROME's relative depth (layer 17 of GPT-2 XL's 48) on another model."""
    return min(n_layers - 1, round(ROME_DEPTH * n_layers))


@dataclass(frozen=True)
class RomeHparams:
    """ROME's published GPT-2 XL hyper-parameters (``hparams/ROME/gpt2-xl.json``; EasyEdit's names)."""

    fact_token: str = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int = -1  # the last layer: the loss is on the model's own output
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    mom2_adjustment: bool = True
    # (tokens, prefixes), greedy. ROME: [[5, 10], [10, 10]] sampled; 5 of 5 tokens keep an edit ~4x cheaper on CPU
    context_template_length_params: tuple[tuple[int, int], ...] = ((5, 5),)
    cov_ridge: float = 1e-2  # ours: C + cov_ridge * tr(C)/d * I (ROME's Wikipedia C needs none)

    def as_dict(self) -> dict:
        return asdict(self)


ROME_DEFAULTS = RomeHparams()


# -- text positions --------------------------------------------------------------------------------
def encode_with_subject(tokenizer, text: str, subject: str) -> tuple[list[int], int]:
    """Token ids of ``text`` (tokenized as extraction does) and the index of the subject's last token."""
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    start = text.rfind(subject)
    if not subject or start < 0:
        raise ValueError(f"subject {subject!r} does not occur in {text!r}")
    end = start + len(subject)
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not hits:
        raise ValueError(f"subject {subject!r} has no token in {text!r}")
    return ids, hits[-1]


def target_token_ids(tokenizer, target: str) -> list[int]:
    """Every token of ``" " + target`` (ROME prepends the space), without a bare-space first token."""
    ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if len(ids) > 1 and tokenizer.decode(ids[:1]).strip() == "":
        ids = ids[1:]
    return list(ids)


def context_prefixes(model: torch.nn.Module, tokenizer, device, hp: RomeHparams = ROME_DEFAULTS) -> list[str]:
    """'' (the bare prompt) plus greedy continuations of ROME's seed words, ROME's "{}"-template text with
    braces removed and '. ' appended."""
    from .fluency import greedy_continuations

    out = [""]
    for length, count in hp.context_template_length_params:
        seeds = CONTEXT_SEEDS[:count]
        ids = [tokenizer(seed, add_special_tokens=False)["input_ids"] for seed in seeds]
        for seed, gen in zip(seeds, greedy_continuations(model, ids, length - 1, device)):
            text = seed + tokenizer.decode(gen)
            out.append(text.replace("{", " ").replace("}", " ").strip() + ". ")
    return out


# -- C = E[k k^T] ------------------------------------------------------------------------------------
def key_second_moment(view: ModelView, tokenizer, texts: Iterable[str], layer: int, device,
                      batch_size: int = 32) -> tuple[torch.Tensor, int]:
    """Uncentred second moment E[k k^T] (float64) of FF2's input at every real token of ``texts``, and
    the number of tokens. Only blocks up to ``layer`` need to run: a hook stops the forward there."""
    d = view.weight(layer, MATRIX).shape[0]
    acc = torch.zeros(d, d, dtype=torch.float64, device=device)
    n = 0
    texts = list(texts)

    class _Stop(Exception):
        pass

    cur: dict = {}

    def hook(_m, args):
        x = args[0][cur["mask"]].double()
        acc.addmm_(x.T, x)
        raise _Stop

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    h = view.matrix(layer, MATRIX).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                seqs = [tokenizer(t)["input_ids"] for t in texts[i: i + batch_size]]
                seqs = [s for s in seqs if s]
                if not seqs:
                    continue
                ids, mask = pad_batch(seqs, pad, device)
                cur["mask"] = mask
                n += int(mask.sum())
                try:
                    view.base(inputs_embeds=view.embedding(ids), attention_mask=mask.long(), use_cache=False)
                except _Stop:
                    pass
    finally:
        h.remove()
    if n == 0:
        raise ValueError("no text to estimate the key covariance from")
    return acc / n, n


def stats_texts(records) -> list[str]:
    """The offline text sample for C: every prompt, paraphrase and neighbourhood prompt of the records."""
    out: list[str] = []
    for r in records:
        out.append(r.prompt)
        out.extend(r.rephrase_prompts)
        out.extend(r.locality_prompts)
    return out


def texts_fingerprint(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()[:16]


def inverse_moment(c: torch.Tensor, ridge: float) -> torch.Tensor:
    """(C + ridge * tr(C)/d * I)^-1 in float64."""
    d = c.shape[0]
    reg = c + ridge * torch.trace(c) / d * torch.eye(d, dtype=c.dtype, device=c.device)
    return torch.linalg.inv(reg)


# -- one edit ----------------------------------------------------------------------------------------
@dataclass
class RomeResult:
    update: torch.Tensor  # (d_in, d_out) in ModelView.weight orientation
    k_star: torch.Tensor
    v_star: torch.Tensor
    loss: float  # the v* objective at the last step
    target_nll: float  # its NLL term


def rome_update(view: ModelView, tokenizer, *, prompt: str, subject: str, target_new: str, layer: int,
                c_inv: torch.Tensor | None, prefixes: Sequence[str], device,
                hp: RomeHparams = ROME_DEFAULTS) -> RomeResult:
    """ROME's rank-one update of FF2 at ``layer`` for one fact (see the module docstring)."""
    module = view.matrix(layer, MATRIX)
    target = target_token_ids(tokenizer, target_new)
    if not target:
        raise ValueError(f"target_new {target_new!r} tokenizes to nothing")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # rewriting prompts: prefix + prompt + target[:-1], the target tokens predicted at the positions before them
    rows, lookups, tgt_pos = [], [], []
    for pre in prefixes:
        ids, look = encode_with_subject(tokenizer, pre + prompt, subject)
        n0 = len(ids)
        rows.append(ids + target[:-1])
        lookups.append(look)
        tgt_pos.append(list(range(n0 - 1, n0 - 1 + len(target))))
    kl_ids, kl_look = encode_with_subject(tokenizer, f"{subject} is a", subject)
    rows.append(kl_ids)
    lookups.append(kl_look)
    ids, mask = pad_batch(rows, pad, device)
    B = len(rows)
    n_rw = B - 1
    onehot = torch.zeros(ids.shape[0], ids.shape[1], 1, device=device)
    onehot[torch.arange(B), torch.tensor(lookups)] = 1.0

    seen: dict = {}
    state: dict = {"delta": None}
    block_in: dict[int, tuple] = {}

    def hook(_m, args, out):
        seen.setdefault("k", args[0][torch.arange(B), torch.tensor(lookups)].detach())
        seen.setdefault("v", out[torch.arange(B), torch.tensor(lookups)].detach())
        if state["delta"] is not None:
            return out + onehot.to(out.dtype) * state["delta"].to(out.dtype)
        return out

    def recorder(i: int):
        def pre(_m, args, kwargs):
            block_in.setdefault(i, (tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                                    {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}))
        return pre

    def run() -> torch.Tensor:
        """Final-normed hidden states. The first call runs the whole model and records the input (and keyword
        arguments: masks, rotary tables) of every block from ``layer`` up; later calls re-run only those
        blocks, since nothing below ``layer`` depends on delta."""
        if not block_in:
            return view.base(inputs_embeds=view.embedding(ids), attention_mask=mask.long(),
                             use_cache=False).last_hidden_state
        h = block_in[layer][0][0]
        for i in range(layer, view.n_layers):
            args, kwargs = block_in[i]
            out = view.blocks[i](h, *args[1:], **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return view.final_norm(h)

    handle = module.register_forward_hook(hook)
    pre_handles = [view.blocks[i].register_forward_pre_hook(recorder(i), with_kwargs=True)
                   for i in range(layer, view.n_layers)]
    try:
        with torch.no_grad():
            run()
        for h_ in pre_handles:
            h_.remove()
        pre_handles = []
        k_all, v_all = seen["k"], seen["v"]
        v0 = v_all[0].float()  # FF2's output at the bare prompt's subject token (prefix '' comes first)
        delta = torch.zeros_like(v0, requires_grad=True)
        state["delta"] = delta
        opt = torch.optim.Adam([delta], lr=hp.v_lr)
        flat_rows = torch.tensor([i for i in range(n_rw) for _ in target], device=device)
        flat_pos = torch.tensor([p for i in range(n_rw) for p in tgt_pos[i]], device=device)
        flat_tgt = torch.tensor(target * n_rw, device=device)
        kl_init = None
        loss_v = nll_v = float("nan")
        max_norm = hp.clamp_norm_factor * v0.norm()
        for it in range(hp.v_num_grad_steps):
            with torch.enable_grad():
                hidden = run()
                logits = view.logits(torch.cat([hidden[flat_rows, flat_pos], hidden[n_rw, kl_look][None]]))
                logp = torch.log_softmax(logits[:-1], -1)
                nll = -logp[torch.arange(len(flat_tgt)), flat_tgt].sum() / (len(target) * n_rw)
                kl_logp = torch.log_softmax(logits[-1:], -1)
                if kl_init is None:
                    kl_init = kl_logp.detach()
                kl = hp.kl_factor * torch.nn.functional.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
                decay = hp.v_weight_decay * (delta.norm() / v0.norm() ** 2)
                loss = nll + kl + decay
            loss_v, nll_v = float(loss.detach()), float(nll.detach())
            if loss_v < 5e-2 or it == hp.v_num_grad_steps - 1:  # ROME stops here too
                break
            (g,) = torch.autograd.grad(loss, [delta])
            delta.grad = g
            opt.step()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    finally:
        handle.remove()
        for h_ in pre_handles:
            h_.remove()

    v_star = (v0 + delta.detach()).double()
    k_mean = k_all[:n_rw].double().mean(0)  # k* averaged over the prefixed prompts (compute_u)
    u = c_inv.to(k_mean.device) @ k_mean if (hp.mom2_adjustment and c_inv is not None) else k_mean
    u = u / u.norm()
    k_cur, v_cur = k_all[0].double(), v_all[0].double()  # the bare prompt (compute_v's cur_input/cur_output)
    right = (v_star - v_cur) / torch.dot(k_cur, u)
    update = torch.outer(u, right).to(view.weight(layer, MATRIX).dtype)
    return RomeResult(update=update, k_star=k_mean, v_star=v_star, loss=loss_v, target_nll=nll_v)


# -- the statistics of one model, per layer -----------------------------------------------------------
_MEMO: dict[tuple, tuple[torch.Tensor, int]] = {}


class KeyStatistics:
    """C^-1 per layer for one loaded model and one text sample, computed once per process and cached on
    disk (``$BLENS_CACHE/rome-stats/``, keyed by model, revision, layer and the sample's fingerprint)."""

    def __init__(self, lm, texts: Sequence[str], *, description: str = "", hp: RomeHparams = ROME_DEFAULTS,
                 disk_cache: bool = True):
        self.lm = lm
        self.texts = list(texts)
        self.fingerprint = texts_fingerprint(self.texts)
        self.description = description
        self.hp = hp
        self.disk_cache = disk_cache
        self._inv: dict[int, torch.Tensor] = {}

    def identity(self) -> dict:
        """What the statistics depend on (part of a ROME edit's identity)."""
        return {"source": self.description, "n_texts": len(self.texts), "fingerprint": self.fingerprint,
                "cov_ridge": self.hp.cov_ridge}

    def moment(self, layer: int) -> tuple[torch.Tensor, int]:
        key = (self.lm.name, self.lm.revision, layer, self.fingerprint)
        if key in _MEMO:
            return _MEMO[key]
        path = None
        if self.disk_cache:
            from blens.extract.registry import cache_dir

            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self.lm.name)[-60:]
            path = cache_dir() / "rome-stats" / f"{safe}-{str(self.lm.revision)[:12]}-L{layer}-{self.fingerprint}.pt"
            if path.exists():
                got = torch.load(path, map_location="cpu")
                _MEMO[key] = (got["c"], int(got["n"]))
                return _MEMO[key]
        c, n = key_second_moment(self.lm.view, self.lm.tokenizer, self.texts, layer, self.lm.view.unembedding.device)
        c = c.cpu()
        _MEMO[key] = (c, n)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"c": c, "n": n}, tmp)
            tmp.replace(path)
        return c, n

    def inverse(self, layer: int) -> torch.Tensor:
        if layer not in self._inv:
            c, _ = self.moment(layer)
            self._inv[layer] = inverse_moment(c, self.hp.cov_ridge).to(self.lm.view.unembedding.device)
        return self._inv[layer]
