"""Speculative decoding for a streamed model: the draft given to ``offload(..., draft=)``.

A verification pass of k + 1 drafted tokens streams the same bytes as a pass for one token,
so a streamed target wants many drafted tokens a pass, far more than a model in memory.
transformers' assisted generation does the drafting and verifying; TensorStream keeps the
draft resident within the budget, uses it in ``generate()``, sets the drafting knobs where
transformers reads them (the draft's ``generation_config``) from what it measured, drafts
the next pass while the target verifies this one (greedy calls, :class:`Lookahead`), and
counts drafted and accepted tokens. See "Speculative decoding" in docs/design.md.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.generation import logits_process as lp
from transformers.generation.candidate_generator import AssistedCandidateGenerator

from .errors import InvalidArgumentError

log = logging.getLogger("tensorstream")

MAX_DRAFTED = 32
"""The most tokens drafted a pass."""

PRIOR_ACCEPTANCE = 0.8
"""Per-token acceptance assumed before any pass was verified."""

DRAFT_AHEAD = True
"""Whether greedy assisted calls draft the next pass while the target verifies (:class:`Lookahead`);
off only to measure what it gains (``bench/speculative.py``)."""

KNOBS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")

STATELESS_PROCESSORS = (
    lp.MinLengthLogitsProcessor,
    lp.MinNewTokensLengthLogitsProcessor,
    lp.RepetitionPenaltyLogitsProcessor,
    lp.EncoderRepetitionPenaltyLogitsProcessor,
    lp.NoRepeatNGramLogitsProcessor,
    lp.EncoderNoRepeatNGramLogitsProcessor,
    lp.ForcedBOSTokenLogitsProcessor,
    lp.ForcedEOSTokenLogitsProcessor,
    lp.InfNanRemoveLogitsProcessor,
    lp.ExponentialDecayLengthPenalty,
    lp.LogitNormalization,
    lp.SuppressTokensAtBeginLogitsProcessor,
    lp.SuppressTokensLogitsProcessor,
)
"""transformers' logits processors that are functions of their inputs alone. The draft ahead
applies the call's processors in its thread while the target applies them to its own
logits, so a call with any other (a watermark's random generator, a processor that
prepares state on first use, one the user wrote) drafts in turn."""


def check_draft(draft, model: nn.Module) -> None:
    """Refuse a `draft` that ``offload(model, ..., draft=)`` cannot use: a model that can
    ``generate()`` and stays resident, or a string naming a draft built from the model."""
    from .selfdraft import SELF_DRAFTS

    if isinstance(draft, str):
        if draft not in SELF_DRAFTS:
            raise InvalidArgumentError(
                f"draft={draft!r} is not a draft TensorStream builds; draft takes a transformers model that "
                f"can generate(), or one of {', '.join(repr(k) for k in SELF_DRAFTS)} (a copy of the model "
                "with int8 weights, built from it)"
            )
        if not hasattr(model, "generate"):
            raise InvalidArgumentError(
                f"draft={draft!r} builds the draft from the model, which must be a transformers model that can "
                f"generate(); {type(model).__name__} cannot"
            )
        return
    if not isinstance(draft, nn.Module) or not hasattr(draft, "generate"):
        raise InvalidArgumentError(
            f"draft must be a transformers model that can generate(), got {type(draft).__name__}"
        )
    if draft is model:
        raise InvalidArgumentError("the draft must be another model than the one offloaded")
    if getattr(draft, "_tensorstream", None) is not None:
        raise InvalidArgumentError(
            "the draft must stay resident: give offload() a model that is not offloaded"
        )


def expected_tokens(k: float, acceptance: float) -> float:
    """Tokens one verification pass yields when k tokens are drafted and each is accepted
    with probability `acceptance` given the ones before it were: 1 + a + ... + a^k."""
    return float(k + 1) if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)


def cycle_seconds(k: int, pass_seconds: float, draft_seconds: float, acceptance: float, ahead: bool) -> float:
    """Expected time from one verification pass to the next when k tokens are drafted a pass.

    Drafted in turn with the pass, it is T + k t. Drafted ahead (:class:`Lookahead`), the
    draft drafts k + 1 tokens while the target verifies, and they are used when all k were
    accepted and the target's own token is the first of them (probability a^(k+1)): then
    the cycle is max(T, (k + 1) t); otherwise the pass's k tokens are drafted after it."""
    t = max(draft_seconds, 0.0)
    serial = pass_seconds + k * t
    if not ahead:
        return serial
    hit = acceptance ** (k + 1)
    return hit * max(pass_seconds, (k + 1) * t) + (1 - hit) * serial


def choose_drafted(pass_seconds: float, draft_seconds: float, acceptance: float, ahead: bool = False) -> int:
    """The number of tokens to draft a pass: the k that maximises the tokens a pass yields
    over the time it takes, E(k) / cycle_seconds(k). Where several k give the same rate
    (drafted ahead, a draft slower than the pass sets the pace), the smallest."""
    rate = {
        k: expected_tokens(k, acceptance) / cycle_seconds(k, pass_seconds, draft_seconds, acceptance, ahead)
        for k in range(1, MAX_DRAFTED + 1)
    }
    best = max(rate.values())
    return min(k for k, r in rate.items() if r >= best * (1 - 1e-9))


def acceptance_from(tokens_per_pass: float, drafted_per_pass: float) -> float:
    """The per-token acceptance that makes `expected_tokens` equal what was observed."""
    k = max(drafted_per_pass, 1e-9)
    if tokens_per_pass >= k + 1:
        return 1.0
    if tokens_per_pass <= 1:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if expected_tokens(k, mid) < tokens_per_pass:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class Speculation:
    """Counters of assisted generation on one offloaded model (``Runtime.speculation``)."""

    calls: int = 0
    passes: int = 0
    """Verification passes of the target."""
    new_tokens: int = 0
    drafted: int = 0
    """Drafted tokens the target verified."""
    draft_tokens: int = 0
    """Tokens the draft computed (one a forward): those drafted, and those drafted ahead
    and not used."""
    draft_seconds: float = 0.0
    """The draft's forward time for them, whether it ran in turn with the target or ahead."""
    pass_seconds: float = 0.0
    drafted_per_pass: Optional[int] = None
    """The number of drafted tokens the last call asked for."""
    drafted_ahead: int = 0
    """Passes whose drafted tokens were drafted while the target verified the pass before."""
    seconds: float = 0.0
    """Wall time of the assisted calls."""
    disk_idle_seconds: float = 0.0
    """Of that time, how long the engine read nothing (its workers all idle)."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    """Held by an assisted call: one at a time drives the draft and sets its knobs."""

    @property
    def accepted(self) -> int:
        # Each verification pass gives the accepted drafted tokens plus one of its own.
        return max(self.new_tokens - self.passes, 0)

    def acceptance(self) -> float:
        if not self.passes or not self.drafted:
            return PRIOR_ACCEPTANCE
        return acceptance_from(self.new_tokens / self.passes, self.drafted / self.passes)

    def choose(self, rt, ahead: bool) -> int:
        """Drafted tokens for the next call, from the passes measured so far (a plain pass
        of this model when no assisted one ran yet)."""
        c = rt.counters
        pass_s = self.pass_seconds / self.passes if self.passes else c.pass_seconds / max(c.passes, 1)
        draft_s = self.draft_seconds / self.draft_tokens if self.draft_tokens else 0.0
        if not pass_s:
            return 8  # nothing measured yet: no pass ran
        return choose_drafted(pass_s, draft_s, self.acceptance(), ahead)

    def as_dict(self) -> dict:
        per_pass = (lambda x: x / self.passes) if self.passes else (lambda x: None)
        return {
            "calls": self.calls,
            "verification_passes": self.passes,
            "new_tokens": self.new_tokens,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "rejected": max(self.drafted - self.accepted, 0),
            "acceptance": self.accepted / self.drafted if self.drafted else None,
            "tokens_per_pass": per_pass(self.new_tokens),
            "drafted_per_pass": self.drafted_per_pass,
            "draft_tokens": self.draft_tokens,
            "drafted_ahead_passes": self.drafted_ahead,
            "draft_seconds_per_token": self.draft_seconds / self.draft_tokens if self.draft_tokens else None,
            "verification_pass_seconds": per_pass(self.pass_seconds),
            "seconds_per_pass": per_pass(self.seconds),
            "disk_idle_seconds_per_pass": per_pass(self.disk_idle_seconds),
        }


def assisted_generate(rt, generate, args, kwargs):
    """``model.generate`` of an offloaded model. Assisted by the draft given to offload()
    unless the call names its own assistant (or cannot be assisted); an assisted call gets
    the drafting knobs the user left unset chosen for the streamed target (restored after),
    drafts ahead where it can (:class:`Lookahead`), and has its passes counted."""
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    draft = kwargs.get("assistant_model")
    if draft is None and rt.draft is not None and _assistable(ids, kwargs):
        draft = kwargs["assistant_model"] = rt.draft
    if draft is None:
        return generate(*args, **kwargs)
    with rt.speculation.lock:
        return _assisted(rt, generate, args, kwargs, ids, draft)


def _assisted(rt, generate, args, kwargs, ids, draft):
    spec = rt.speculation
    gcfg = draft.generation_config
    saved = {k: getattr(gcfg, k, None) for k in KNOBS}
    if saved["num_assistant_tokens_schedule"] is None:
        gcfg.num_assistant_tokens_schedule = "constant"
    if saved["assistant_confidence_threshold"] is None:
        gcfg.assistant_confidence_threshold = 0.0  # draft all k: a streamed pass costs the same
    ahead = _may_draft_ahead(_sampling(rt.model, kwargs), gcfg)  # as far as known before the call
    k = kwargs.pop("num_assistant_tokens", None) or saved["num_assistant_tokens"] or spec.choose(rt, ahead)
    gcfg.num_assistant_tokens = k
    timing = _DraftTiming(draft)
    c = rt.counters
    passes, pass_s = c.passes, c.pass_seconds
    active0 = _engine_active(rt)
    t0 = time.perf_counter()
    outer, lookaheads = getattr(_calls, "open", None), []
    _calls.open = lookaheads
    try:
        out = generate(*args, **kwargs)
    finally:
        _calls.open = outer
        for la in lookaheads:
            la.finish(quiet=True)  # nothing drafts once generate() has returned
        timing.remove()
        for name, v in saved.items():
            setattr(gcfg, name, v)
    seconds = time.perf_counter() - t0
    seqs = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
    if isinstance(ids, torch.Tensor) and isinstance(seqs, torch.Tensor):
        spec.calls += 1
        spec.passes += c.passes - passes
        spec.pass_seconds += c.pass_seconds - pass_s
        spec.new_tokens += seqs.shape[-1] - ids.shape[-1]
        spec.drafted += sum(la.drafted for la in lookaheads)
        spec.draft_tokens += timing.tokens
        spec.draft_seconds += timing.seconds
        spec.drafted_per_pass = k
        spec.drafted_ahead += sum(la.hits for la in lookaheads)
        spec.seconds += seconds
        spec.disk_idle_seconds += max(seconds - (_engine_active(rt) - active0), 0.0)
    return out


def _engine_active(rt) -> float:
    """Seconds the runtime's engine has had a read in progress (0 before it has one)."""
    return rt.engine.stats()["active_seconds"] if rt.engine is not None else 0.0


_calls = threading.local()
"""``open``: the lookaheads of the assisted call running on this thread, or None."""


def candidate_generator(orig, **kwargs):
    """``model._get_candidate_generator`` of an offloaded model: transformers' own, counted,
    and drafting ahead where that cannot change the target's tokens (:class:`Lookahead`)."""
    gen = orig(**kwargs)
    open_ = getattr(_calls, "open", None)
    if open_ is None or not isinstance(gen, AssistedCandidateGenerator):
        return gen
    la = Lookahead(gen, ahead=Lookahead.applies(gen, kwargs["generation_config"]))
    open_.append(la)
    return la


class Lookahead:
    """transformers' ``AssistedCandidateGenerator``, counting the tokens it drafts, and
    drafting the next pass while the target verifies this one (`ahead`).

    When a pass's candidates are handed out, the draft goes on, in a thread, from the
    sequence with all of them accepted, and drafts k + 1 more tokens: a guess of the token
    the target adds itself, then the next pass's k. If the target accepts all k and adds
    that token, the next pass's candidates are ready (or nearly): drafting costs no time of
    its own but the draft's share of the CPU. Otherwise they are dropped and the draft
    drafts from what was accepted, as it would have. The draft drafts greedily either way,
    through the same generator, so the candidates are those it would have drafted in turn
    (up to the last bit of its cache: in turn, its own last token is fed again beside the
    target's, see :meth:`_draft_after_own`).

    It drafts ahead only where the target's tokens cannot change:
    - greedy calls with a constant number of drafted tokens: no random number is drawn out
      of turn, and nothing else reads the generator meanwhile;
    - logits processors that keep no state (:data:`STATELESS_PROCESSORS`): the thread
      applies them while the target does;
    - a draft whose cache layers are plain ``DynamicLayer``s, which a miss can crop back to
      any length (a sliding window or a recurrent state cannot go back).
    """

    def __init__(self, gen: AssistedCandidateGenerator, ahead: bool):
        self.gen = gen
        self.ahead = ahead
        self.pending = None
        """(thread, result box, length of the sequence it drafts from) of the draft ahead."""
        self.hits = 0
        """Passes whose candidates were drafted ahead."""
        self.drafted = 0
        """Candidate tokens handed to the target."""

    @staticmethod
    def applies(gen, generation_config) -> bool:
        g = getattr(gen, "assistant_generation_config", None)
        return (
            type(gen) is AssistedCandidateGenerator
            and g is not None
            and _may_draft_ahead(generation_config.do_sample, g)
            and all(type(p) in STATELESS_PROCESSORS for p in gen.logits_processor)
        )

    def __getattr__(self, name):
        gen = self.__dict__.get("gen")
        if gen is None:
            raise AttributeError(name)
        return getattr(gen, name)

    def get_candidates(self, input_ids, **kwargs):
        got = self._take(input_ids)
        ids, logits = got if got is not None else self.gen.get_candidates(input_ids, **kwargs)
        self.drafted += ids.shape[-1] - input_ids.shape[-1]
        if self.ahead:
            self._start(ids)
        return ids, logits

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        self.gen.update_candidate_strategy(input_ids, scores, num_matches)

    def _take(self, input_ids):
        """The candidates drafted ahead for `input_ids`, or None when they do not follow it."""
        done = self.finish()
        if done is None:
            return None
        ids, logits, start = done
        n = input_ids.shape[-1]
        _, most = self.gen._calculate_new_tokens(input_ids)
        m = min(most, ids.shape[-1] - n)
        if m <= 0 or not torch.equal(ids[:, :n], input_ids.to(ids.device)):
            return None
        self.hits += 1
        return ids[:, : n + m], logits[:, n - start : n - start + m]

    def _start(self, ids) -> None:
        """Draft ahead from `ids` with all its candidates accepted, if another pass can follow."""
        gen = self.gen
        k = gen.num_assistant_tokens
        if gen.main_model_max_length - ids.shape[-1] - 2 < 1:
            return
        cache = gen.assistant_kwargs.get("cache")
        if not (isinstance(cache, DynamicCache) and all(type(x) is DynamicLayer for x in cache.layers)):
            self.ahead = False  # see the class's docstring
            return
        box: dict = {}
        # On a GPU the draft enqueues its kernels on the caller's stream (a new thread starts on
        # the default one): the caller's work on the candidates, and on the draft's cache after
        # a miss, is then ordered after them, with no synchronisation and no tensor used on two
        # streams. The overlap is the CPU's: launching the draft's kernels while the target waits.
        dev = gen.assistant_model.device
        stream = torch.cuda.current_stream(dev) if dev.type == "cuda" else None

        def run():
            gen.num_assistant_tokens = k + 1
            try:
                with torch.cuda.stream(stream):  # no-op for None
                    box["out"] = self._draft_after_own(ids)
            except BaseException as e:  # re-raised where the result is taken
                box["error"] = e
            finally:
                gen.num_assistant_tokens = k

        thread = threading.Thread(target=run, name="tensorstream-draft-ahead", daemon=True)
        self.pending = (thread, box, ids.shape[-1])
        thread.start()

    def _draft_after_own(self, ids):
        """``gen.get_candidates(ids)`` where the draft drafted the last token of `ids` itself,
        so its cache holds every token before it. transformers' own call crops the cache by one
        more token and feeds both again (right after the target added a token of its own); a
        2-token forward costs up to twice a 1-token one on a CPU, so here the draft feeds only
        the last token."""
        gen = self.gen
        ids = ids.to(gen.assistant_model.device)
        least, most = gen._calculate_new_tokens(ids)
        if most == 0:
            return ids, None
        gen._update_past_and_masks(ids, num_added_tokens=0)
        return gen._generate_candidates(gen._prepare_generation_args(ids, least, most))

    def finish(self, quiet: bool = False):
        """Wait for the draft ahead: (ids, their scores, the length it drafted from), or
        None. Its error is raised, unless `quiet` (the call is over; nothing used it)."""
        if self.pending is None:
            return None
        thread, box, start = self.pending
        thread.join()
        self.pending = None
        if "error" in box:
            if quiet:
                log.debug("the draft's work ahead failed after generate() ended: %r", box["error"])
                return None
            raise box["error"]
        ids, logits = box["out"]
        return None if logits is None else (ids, logits, start)


def _may_draft_ahead(sampling: bool, draft_config) -> bool:
    """Whether a call may draft ahead, as far as the call's sampling and the draft's knobs
    (`draft_config`: its ``generation_config``) tell: greedy, a constant number of drafted
    tokens, no confidence cut-off (:class:`Lookahead` says why)."""
    return (
        DRAFT_AHEAD
        and not sampling
        and draft_config.num_assistant_tokens_schedule == "constant"
        and not draft_config.assistant_confidence_threshold
    )


def _sampling(model, kwargs) -> bool:
    """Whether this generate() call samples (as transformers resolves it)."""
    if "do_sample" in kwargs:
        return bool(kwargs["do_sample"])
    cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return bool(getattr(cfg, "do_sample", False))


def _assistable(ids, kwargs) -> bool:
    """Whether transformers can assist this call: one sequence, no beam search."""
    batch = ids.shape[0] if isinstance(ids, torch.Tensor) and ids.dim() > 1 else 1
    return batch == 1 and kwargs.get("num_beams", 1) in (None, 1)


class _DraftTiming:
    """Forward hooks on the draft for one call: how many tokens it drafted and how long."""

    def __init__(self, draft: nn.Module):
        self.tokens, self.seconds, self._t0 = 0, 0.0, None
        self.handles = [
            draft.register_forward_pre_hook(self._pre),
            draft.register_forward_hook(self._post),
        ]

    def _pre(self, *_):
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self.seconds += time.perf_counter() - self._t0
        self.tokens += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
