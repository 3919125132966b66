"""The code judge's primitive: call the candidate inside the sandbox, compare outside.

A grounded judge (GLM-5 arXiv 2602.15763 §3.2: rewards from running the model's output) must not be
forgeable by the program it judges. `run_calls` runs the candidate's function on the test arguments inside
`sandbox.run_code` and brings back only the repr of each return value; `CallsResult.passed` compares them
with the expected values here, in the trusted process. The expected values never enter the sandbox, so a
program that prints a fake verdict, overwrites the results line or exits early gains nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from nanoglm5.rl.sandbox import SandboxResult, run_code

RESULTS_MARK = "@@nanoglm5-results@@"  # the line that carries the return values (not a secret)
ERRORS_MARK = "@@nanoglm5-errors@@"  # per call, the exception a call raised (feedback text only, never a verdict)
START_MARK = "@@nanoglm5-started@@"  # the harness got to run the candidate: what follows is the program's doing


# Runs inside the sandbox. The candidate's prints go to stderr so stdout carries only the results
# line; the line is a claim about what the calls returned, nothing more: expected values never
# enter the sandbox, so a program that forges or overwrites it still has to produce the right values.
_CALLS_HARNESS = r"""import json, sys
_calls = json.loads({calls!r})
_chan, sys.stdout = sys.stdout, sys.stderr
_chan.write({start!r} + "\n")
_chan.flush()
_ns = {{}}
exec(compile({code!r}, "solution.py", "exec"), _ns)
_out, _errs = [], []
for _args in _calls:
    try:
        _out.append(repr(_ns[{func!r}](*_args)))
        _errs.append(None)
    except Exception as _e:
        _out.append(None)
        _errs.append((type(_e).__name__ + ": " + str(_e))[:300])
_chan.write("\n" + {emark!r} + json.dumps(_errs) + "\n")
_chan.write("\n" + {mark!r} + json.dumps(_out) + "\n")
_chan.flush()
"""


@dataclass
class CallsResult:
    """What `run_calls` brought back.

    run:   the sandboxed run of the harness.
    reprs: per call, repr(func(*args)) as computed inside the sandbox, or None where the call
           raised; None as a whole when the run timed out, hit a limit, or left no well-formed
           results line with one entry per call (a crash, an early exit, a garbled channel).
    errors: per call, "ExceptionName: message" where the call raised, else None (None as a whole
           when reprs is); text for the model's feedback only, never part of a verdict.
    started: the harness printed its start mark, i.e. the sandbox came up and began running the
           candidate. A run that ended without it never ran the program (the sandbox failed to
           start, or its start-up outlasted the timeout on a loaded machine): an environment
           failure, not the program's (envs.MultiTurnCodeEnv tells the two apart on it).
    """

    run: SandboxResult
    reprs: list[str | None] | None
    errors: list[str | None] | None = None
    started: bool = True

    def passed(self, expected: list[str]) -> int:
        """How many calls returned exactly the expected repr; compared here, outside the sandbox."""
        if self.reprs is None or len(self.reprs) != len(expected):
            return 0
        return sum(got == want for got, want in zip(self.reprs, expected))


def _parse_results(run: SandboxResult, n: int, mark: str = RESULTS_MARK) -> list[str | None] | None:
    if run.timed_out or run.limit_hit:
        return None
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith(mark)]
    if not lines:
        return None
    try:
        got = json.loads(lines[-1][len(mark) :])
    except ValueError:
        return None
    if not isinstance(got, list) or len(got) != n or not all(g is None or isinstance(g, str) for g in got):
        return None
    return got


def run_calls(code: str, calls: list, func: str = "f", **run_kw) -> CallsResult:
    """Define `code` (a module that defines `func`) inside the sandbox, call `func(*args)` for each
    args in `calls` (JSON-serializable lists/tuples; they arrive as lists) and return the repr of
    each result. Compare with `CallsResult.passed(expected_reprs)` outside: the expected values are
    never passed in. `run_kw`: run_code's keyword arguments (timeout_s, memory_mb,
    allow_unsandboxed, ...); the whole harness shares one run's limits."""
    args = json.dumps([list(a) for a in calls])
    harness = _CALLS_HARNESS.format(calls=args, code=code, func=func, mark=RESULTS_MARK, emark=ERRORS_MARK,
                                    start=START_MARK)
    run = run_code(harness, **run_kw)
    reprs = _parse_results(run, len(calls))
    errors = _parse_results(run, len(calls), ERRORS_MARK) if reprs is not None else None
    started = any(ln == START_MARK for ln in run.stdout.splitlines())
    return CallsResult(run=run, reprs=reprs, errors=errors, started=started)
