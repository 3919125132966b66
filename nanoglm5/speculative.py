"""Lossless speculative decoding with the MTP layer: `Engine(model, speculative="mtp", num_draft=k)`.

GLM-5 (arXiv 2602.15763) deploys its multi-token-prediction layer for speculative decoding, as DeepSeek-V3
(arXiv 2412.19437 §2.2, §5.4.3) does. At position i the MTP layer reads the main model's hidden state h_i and
the next token x_{i+1} and predicts x_{i+2} (model.MTPLayer). So once the main model has produced a token, the
MTP layer drafts the one after it; the main model then runs [last token, draft_1 .. draft_k] in ONE forward,
which gives its own distribution p at each of those positions:

  greedy   accept draft j while it equals the main model's argmax there; the first mismatch emits the main
           model's argmax instead; after k acceptances the argmax after the last draft is a bonus token.
           Exactly the tokens of plain greedy decoding.
  sampled  speculative sampling (Leviathan et al. 2023, Chen et al. 2023): accept a draft d ~ q with probability
           min(1, p(d)/q(d)); on rejection emit a token from norm(max(0, p − q)) and stop; after k acceptances
           sample a bonus token from p. p and q are the main model's and the MTP layer's distributions after the
           request's SamplingParams transform (temperature, top-k, top-p), so every emitted token is distributed
           exactly as p, as without speculation, and the log-prob reported for it is log p.

Caches: the main cache and the MTP layer's own cache (decode.PagedKVCache, the same block tables) hold the same positions.
A verify step writes k+1 entries; only the last token and the accepted drafts are counted in `Sequence.computed`, which
rolls the rejected ones back (entries past a row's length are never read before being overwritten). The MTP
layer then catches up over the same positions with the main model's fresh hidden states (right-padded: rows of
one batch accept different numbers of drafts) and drafts again; chained drafts (k > 1) feed the MTP layer its
own output (as model._mtp_loss chains depths) and also write past its length.
"""

from __future__ import annotations

import torch

from nanoglm5.sampling import SamplingParams, draw, sampling_logprobs


def _accepts(u: float, p_d: float, q_d: float) -> bool:
    """Accept a draft with probability min(1, p(d)/q(d)), u ~ U[0, 1)."""
    return u * q_d < p_d


def accept(p_logits: torch.Tensor, drafts: list[int], q: list, params: SamplingParams, gen, limit: int):
    """Verify drafts[:limit] against the main model's logits p_logits (limit + 1, V) at the positions before each
    draft (and after the last). q: the drafts' distributions (sampled) or None (greedy).
    → (tokens to emit, their log-probs under p, number of drafts accepted)."""
    if params.temperature == 0:
        target = p_logits[: limit + 1].argmax(-1).tolist()
        a = 0
        while a < limit and drafts[a] == target[a]:
            a += 1
        return drafts[:a] + [target[a]], [0.0] * (a + 1), a
    logp = sampling_logprobs(p_logits[: limit + 1], params)
    p = logp.exp()
    toks, lps = [], []
    for j in range(limit):
        d = drafts[j]
        u = float(torch.rand((), generator=gen, device=gen.device))
        if _accepts(u, float(p[j, d]), float(q[j][d])):
            toks.append(d)
            lps.append(float(logp[j, d]))
            continue
        resid = (p[j] - q[j]).clamp_min(0)
        if not float(resid.sum()) > 0:  # p == q up to rounding: then nothing is ever rejected; sample p
            resid = p[j]
        t = draw(resid[None], [gen])[0]
        return toks + [t], lps + [float(logp[j, t])], j
    t = draw(p[limit][None], [gen])[0]
    return toks + [t], lps + [float(logp[limit, t])], limit


def draft(logits: torch.Tensor, params: SamplingParams, gen) -> tuple[int, torch.Tensor | None]:
    """A draft token from the MTP layer's logits (V,) under the request's transform → (token, q probs or None)."""
    if params.temperature == 0:
        return int(logits.argmax()), None
    q = sampling_logprobs(logits, params).exp()
    return draw(q[None], [gen])[0], q


class MTPSpeculator:
    """The engine's speculative decode step (Engine.step calls `prefill` after a prefill, `decode` instead of the
    plain (B, 1) decode)."""

    def __init__(self, engine):
        self.e, self.k = engine, engine.num_draft

    def prefill(self, reqs, start: list[int], n: list[int], hidden: torch.Tensor) -> None:
        """The MTP layer over the positions a (chunked) prefill just computed, start[b]..start[b]+n[b]-1: position i
        reads h_i and x_{i+1} (at the prompt's last position, the token just sampled); then the first drafts of
        the rows whose prompt is complete. hidden (B, T, H): the main prefill's, right-padded."""
        e, T = self.e, hidden.shape[1]
        fed = [r.tokens[c + 1:c + m + 1] for r, c, m in zip(reqs, start, n)]
        ids = torch.tensor([f + [0] * (T - len(f)) for f in fed], device=e.device)
        last = [m - 1 for m in n]
        h, logits = e.run("mtp", ids, reqs, start, hidden, last, decode=False)
        done = [b for b, r in enumerate(reqs) if r.prefilled]
        if done:
            rows = torch.tensor(done, device=e.device)
            self._draft([reqs[b] for b in done], logits[rows],
                        h[rows, torch.tensor([last[b] for b in done], device=e.device)])

    def _draft(self, reqs, logits: torch.Tensor, h_last: torch.Tensor) -> None:
        """Drafts from the MTP logits (B, V) at each row's last caught-up position; chained to k drafts."""
        e = self.e
        for r in reqs:
            r.drafts, r.q = [], []
        for j in range(self.k):
            if j:  # chain: the MTP layer reads its own output and the previous draft, one position further
                start = [r.computed + j - 1 for r in reqs]
                ids = torch.tensor([[r.drafts[-1]] for r in reqs], device=e.device)
                h, logits = e.run("mtp", ids, reqs, start, h_last[:, None])
                h_last, logits = h[:, 0], logits[:, 0]
            logits = logits.float()
            greedy = [r.params.temperature == 0 for r in reqs]
            arg = logits.argmax(-1).tolist() if any(greedy) else None
            for b, r in enumerate(reqs):
                d, q = (arg[b], None) if greedy[b] else draft(logits[b], r.params, r.gen)
                r.drafts.append(d)
                r.q.append(q)

    def decode(self, reqs) -> list:
        """Verify every row's drafts in one (B, k+1) forward, emit 1..k+1 tokens each, catch the MTP layer up."""
        e, k = self.e, self.k
        ids = torch.tensor([[r.out[-1]] + r.drafts for r in reqs], device=e.device)
        start = [r.computed for r in reqs]
        hidden, logits = e.run("main", ids, reqs, start)
        logits = logits.float()
        raw = logits.log_softmax(-1) if any(r.params.logprobs for r in reqs) else None
        events, cont = [], []
        for b, r in enumerate(reqs):
            limit = min(k, r.params.max_tokens - len(r.out) - 1)  # never emit past max_tokens
            toks, lps, a = accept(logits[b], r.drafts, r.q, r.params, r.gen, limit)
            r.drafted, r.accepted = r.drafted + limit, r.accepted + a
            e.drafted, e.accepted = e.drafted + limit, e.accepted + a
            r.computed = start[b] + a + 1  # the last token and the accepted drafts: rejected rolled back
            for j, (t, lp) in enumerate(zip(toks, lps)):
                ev = e._emit(r, t, lp, raw[b, j] if raw is not None else None)
                events.append(ev)
                if ev.completion is not None:
                    break
            if r.id in e.running:
                cont.append((b, r, a))
        if cont:  # the MTP layer over the accepted positions, with the main model's hidden states there
            rs = [r for _, r, _ in cont]
            ids = torch.tensor([r.drafts[:a] + [r.out[-1]] + [0] * (k - a) for _, r, a in cont], device=e.device)
            rows = torch.tensor([b for b, _, _ in cont], device=e.device)
            last = [a for _, _, a in cont]
            h, logits = e.run("mtp", ids, rs, [start[b] for b, _, _ in cont], hidden[rows], last)
            self._draft(rs, logits, h[torch.arange(len(rs), device=e.device), torch.tensor(last, device=e.device)])
        return events
