"""The k rule: how many tokens to draft a pass, from the time of a verification pass, the
time of a drafted token and the per-token acceptance. Arithmetic alone: no model, no
transformers. See "Speculative decoding" in docs/design.md."""

from __future__ import annotations

MAX_DRAFTED = 32
"""The most tokens drafted a pass."""

PRIOR_ACCEPTANCE = 0.8
"""Per-token acceptance assumed before any pass was verified."""


def expected_tokens(k: float, acceptance: float) -> float:
    """Tokens one verification pass yields when k tokens are drafted and each is accepted
    with probability `acceptance` given the ones before it were: 1 + a + ... + a^k."""
    return float(k + 1) if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)


def cycle_seconds(k: int, pass_seconds: float, draft_seconds: float, acceptance: float, ahead: bool) -> float:
    """Expected time from one verification pass to the next when k tokens are drafted a pass.

    Drafted in turn with the pass, it is T + k t. Drafted ahead
    (:class:`~tensorstream.speculative.lookahead.Lookahead`), the draft drafts k + 1 tokens
    while the target verifies, and they are used when all k were accepted and the target's
    own token is the first of them (probability a^(k+1)): then the cycle is
    max(T, (k + 1) t); otherwise the pass's k tokens are drafted after it."""
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
