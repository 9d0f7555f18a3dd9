"""Drafting ahead: the draft drafts the next pass while the target verifies this one
(:class:`Lookahead`, around transformers' ``AssistedCandidateGenerator``), and when a call
may (:func:`may_draft_ahead`). Imports transformers."""

from __future__ import annotations

import logging
import threading
from typing import Optional

import torch
from transformers.generation import logits_process as lp

from .transformers_api import DraftingApi, missing_attributes

log = logging.getLogger("tensorstream")

DRAFT_AHEAD = True
"""Whether greedy assisted calls draft the next pass while the target verifies (:class:`Lookahead`);
off only to measure what it gains (``bench/speculative.py``)."""

STATELESS_PROCESSORS = tuple(
    getattr(lp, name)
    for name in (
        "MinLengthLogitsProcessor",
        "MinNewTokensLengthLogitsProcessor",
        "RepetitionPenaltyLogitsProcessor",
        "EncoderRepetitionPenaltyLogitsProcessor",
        "NoRepeatNGramLogitsProcessor",
        "EncoderNoRepeatNGramLogitsProcessor",
        "ForcedBOSTokenLogitsProcessor",
        "ForcedEOSTokenLogitsProcessor",
        "InfNanRemoveLogitsProcessor",
        "ExponentialDecayLengthPenalty",
        "LogitNormalization",
        "SuppressTokensAtBeginLogitsProcessor",
        "SuppressTokensLogitsProcessor",
    )
    if hasattr(lp, name)  # one transformers removed is simply not known to be stateless
)
"""transformers' logits processors that are functions of their inputs alone. The draft ahead
applies the call's processors in its thread while the target applies them to its own
logits, so a call with any other (a watermark's random generator, a processor that
prepares state on first use, one the user wrote) drafts in turn."""


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
      any length (a sliding window or a recurrent state cannot go back);
    - transformers' private API that drafting ahead calls, as found
      (:func:`~tensorstream.speculative.transformers_api.drafting_api`).

    Where it does not draft ahead, it calls only the generator's public methods, and `off`
    says why.
    """

    def __init__(self, gen, api: DraftingApi, off: Optional[str], off_api: bool = False):
        self.gen = gen
        self.api = api
        self.off = off
        """Why this call does not draft ahead, or None: it does."""
        self.off_api = off_api
        """Whether `off` is transformers' private API (missing, or changed): a fallback."""
        self.pending = None
        """(thread, result box, length of the sequence it drafts from) of the draft ahead."""
        self.hits = 0
        """Passes whose candidates were drafted ahead."""
        self.drafted = 0
        """Candidate tokens handed to the target."""

    @property
    def ahead(self) -> bool:
        return self.off is None

    @staticmethod
    def why_not(gen, generation_config, api: DraftingApi) -> tuple:
        """(why a call with generator `gen` cannot draft ahead or None, whether that is
        because transformers lacks what drafting ahead calls)."""
        if api.missing:
            return api.missing, True
        if type(gen) is not api.generator:
            return (
                f"the candidate generator is {type(gen).__name__}, not transformers' AssistedCandidateGenerator",
                False,
            )
        missing = missing_attributes(gen)
        if missing:
            return f"transformers' AssistedCandidateGenerator has no attribute {', '.join(missing)}", True
        g = gen.assistant_generation_config
        if not DRAFT_AHEAD:
            return "drafting ahead is switched off (tensorstream.speculative.lookahead.DRAFT_AHEAD)", False
        if generation_config is None or not may_draft_ahead(bool(generation_config.do_sample), g):
            return "the call samples, or its draft has a schedule or a confidence cut-off", False
        stateful = [type(p).__name__ for p in gen.logits_processor if type(p) not in STATELESS_PROCESSORS]
        if stateful:
            return f"the call has a logits processor that may keep state ({', '.join(stateful)})", False
        return None, False

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
        if cache is None:  # transformers keeps it elsewhere: what would be cropped is not known
            self.off, self.off_api = (
                "transformers' AssistedCandidateGenerator keeps no 'cache' in assistant_kwargs",
                True,
            )
            return
        api, layers = self.api, getattr(cache, "layers", None)
        if not (
            isinstance(cache, api.cache)
            and layers is not None
            and all(type(x) is api.cache_layer for x in layers)
        ):
            self.off = f"the draft's cache ({type(cache).__name__}) cannot be cropped back to any length"
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
        so its cache holds every token before it. transformers 5.24's own call crops the cache
        by one more token and feeds both again (right after the target added a token of its
        own); a 2-token forward costs up to twice a 1-token one on a CPU, so here the draft
        feeds only the last token: the cache cropped to all but it (``num_added_tokens=0``).
        Where ``_update_past_and_masks`` takes ``num_extra_tokens_to_remove`` (5.25), the crop
        is relative to the length ``get_candidates`` last drafted (which only it records), and
        ``get_candidates`` itself feeds only the last token: it is called as it is."""
        gen = self.gen
        ids = ids.to(gen.assistant_model.device)
        if self.api.added_tokens_keyword != "num_added_tokens":
            return gen.get_candidates(ids)
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


def may_draft_ahead(sampling: bool, draft_config) -> bool:
    """Whether a call may draft ahead, as far as the call's sampling and the draft's knobs
    (`draft_config`: its ``generation_config``) tell: greedy, a constant number of drafted
    tokens, no confidence cut-off (:class:`Lookahead` says why)."""
    return (
        DRAFT_AHEAD
        and not sampling
        and draft_config.num_assistant_tokens_schedule == "constant"
        and not draft_config.assistant_confidence_threshold
    )
