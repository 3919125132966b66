"""Training state: what an exact resume needs beyond the weights, how it is saved, and the one resume check.

  - RNG states (Python, numpy, torch CPU and CUDA) as plain lists/tensors, loadable with weights_only;
  - `save_checkpoint`: the one checkpoint format (config.json + model.safetensors, nanoglm5.checkpoint)
    plus tokenizer.json, trainer_state.pt and train_config.json, written atomically;
  - `trainer_state` / `load_trainer_state` (errors name the file);
  - `check_resume`: the settings that may not change between a run and its --resume, for train.py and rl.py;
  - sharded state under FSDP2: `save_sharded` / `load_sharded` write and read the model and optimizer shards
    with torch.distributed.checkpoint (DCP: every rank writes its own `__<rank>_<n>.distcp` file, rank 0 the
    `.metadata` index); `save_checkpoint(shards=...)` moves them into the checkpoint directory beside the
    gathered HF weights, so one atomic rename publishes both. DCP reshards on load: a checkpoint written by
    N ranks resumes on M ranks, under FSDP, DDP or one process. `optimizer_state` / `restore_optimizer_state`
    carry a full (unsharded) optimizer state across `fully_shard`, for a checkpoint written without FSDP.
"""

import contextlib
import dataclasses
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from nanoglm5.checkpoint import CheckpointError, resolve_dir, save_hf
from nanoglm5.int4 import qat_extra_files
from nanoglm5.training.train_config import TrainError


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Python, numpy, torch CPU and CUDA generator states, as plain tensors/lists (torch.load weights_only)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _python_state(x):
    """Tuples → lists recursively, so random.getstate() survives the weights_only unpickler as a list."""
    return [_python_state(v) for v in x] if isinstance(x, tuple | list) else x


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, model, trainer_state: dict, tokenizer_file: str | Path | None = None,
                    config: dict | None = None, shards: str | Path | None = None) -> Path:
    """Write the one checkpoint format atomically: config.json + model.safetensors (checkpoint.save_hf),
    tokenizer.json (copied), trainer_state.pt (optimizer, step, RNG, data position) and train_config.json.
    `shards`: a directory `save_sharded` filled (every rank done); its files move into the checkpoint.
    A QAT-prepared model also leaves its recipe (qat_config.json), so `python -m nanoglm5.quant convert` packs
    it bit-identically whichever stage wrote it (SFT or RL).
    A crash mid-write leaves the previous checkpoint under `path` intact (checkpoint.atomic_dir)."""
    extra = {"trainer_state.pt": lambda p: torch.save(trainer_state, p), **qat_extra_files(model)}
    if tokenizer_file is not None and Path(tokenizer_file).exists():
        extra["tokenizer.json"] = lambda p: shutil.copyfile(tokenizer_file, p)
    if config is not None:
        extra["train_config.json"] = lambda p: Path(p).write_text(json.dumps(config, indent=2, default=str))
    if shards is not None:
        listed = {i.relative_path for i in dcp.FileSystemReader(str(shards)).read_metadata().storage_data.values()}
        missing = sorted(f for f in listed if not (Path(shards) / f).exists())
        if missing:  # each rank wrote into its own node's directory of that name
            raise CheckpointError(f"{shards}: shard files {missing[:3]} written by other ranks are not here: with "
                                  "--fsdp every rank writes its shard under --out-dir, so it must be a directory "
                                  "all nodes see at the same path (a shared filesystem)")
        # flat, beside the weights: atomic_dir fsyncs the files at the top of the directory only
        extra.update({f.name: (lambda p, f=f: os.replace(f, p)) for f in sorted(Path(shards).iterdir())})
    out = save_hf(model, path, extra_files=extra)
    if shards is not None:
        shutil.rmtree(shards, ignore_errors=True)
    return out


def trainer_state(step: int, optimizers: dict, data: dict, config: dict, **extra) -> dict:
    """The trainer_state.pt payload: everything beyond the weights that an exact resume needs."""
    rng = rng_state()
    rng["python"] = _python_state(rng["python"])
    return {"step": step, "optimizers": {k: o.state_dict() for k, o in optimizers.items()}, "rng": rng,
            "data": data, "train_config": config, **extra}


def load_trainer_state(path: str | Path) -> dict:
    """trainer_state.pt of a checkpoint directory; a missing or corrupt file is a CheckpointError naming it."""
    f = resolve_dir(path) / "trainer_state.pt"
    if not f.exists():
        raise CheckpointError(f"{f} not found: {path} holds weights only, so it cannot be resumed; "
                              "start a new run from it with --checkpoint")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated zips and bad pickles
        raise CheckpointError(f"{f} is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                              "resume from an earlier checkpoint or restart without --resume") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{f} is not a nanoGLM5 trainer state (no 'step'); restart without --resume")
    p = state["rng"]["python"]
    state["rng"]["python"] = (p[0], tuple(p[1]), p[2])
    return state


# ---------------------------------------------------------------------------------------------- resume check
def config_dict(cfg) -> dict:
    """A config dataclass as plain JSON values (what train_config.json and trainer_state.pt hold)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_diff(saved: dict, now: dict, ignore: set[str] = frozenset()) -> list[str]:
    """['name: saved → now', …] for the keys whose values differ."""
    out = []
    for k in sorted(set(saved) | set(now)):
        if k in ignore:
            continue
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        if a != b:
            out.append(f"{k}: {a!r} (checkpoint) vs {b!r} (now)")
    return out


def check_resume(path, saved: dict, now: dict, neutral: set[str], what: str,
                 model: tuple[dict, dict] | None = None) -> None:
    """A resume must run the same math: raise TrainError listing every setting of `saved` (the checkpoint's)
    that differs in `now`, except the `neutral` ones. `model`: the (checkpoint, now) ModelConfig dicts,
    compared in full and listed as model.<field>. `what` opens the list ("the run used different settings")."""
    # checkpoints written before the flag was renamed --init-from → --checkpoint (one name per knob) say init_from
    saved = {("checkpoint" if k == "init_from" else k): v for k, v in saved.items()}
    diff = config_diff(saved, now, neutral)
    if model is not None:
        # special-token ids are the tokenizer's, not the math's: a checkpoint's config.json carries those of the
        # tokenizer saved beside it (checkpoint.token_ids), the run's ModelConfig those of its preset (tiny: none)
        diff += [f"model.{d}" for d in config_diff(*model, {"bos_token_id", "eos_token_id", "pad_token_id"})]
    if diff:
        raise TrainError(f"--resume {path}: {what}: " + "; ".join(diff)
                         + ". Pass the same flags, or start a new run from its weights with --checkpoint")


# ---------------------------------------------------------------------------------------------- sharded state (DCP)
SHARDS_INDEX = ".metadata"  # DCP's index of a checkpoint directory's *.distcp shard files


def has_sharded_state(path: str | Path) -> bool:
    return (Path(path) / SHARDS_INDEX).exists()


def _by_key(optimizers: dict) -> dict[str, torch.optim.Optimizer]:
    """{"main": Optimizers, …} → {"optim_main_0": torch optimizer, …}: one DCP entry per torch optimizer."""
    return {f"optim_{name}_{i}": o for name, bundle in optimizers.items() for i, o in enumerate(bundle.optimizers)}


@contextlib.contextmanager
def _one_process_is_fine():
    """DCP warns each time it runs without a process group (a one-process resume): that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_sharded(path: str | Path, model: torch.nn.Module, optimizers: dict) -> None:
    """Every rank: write its shards of the model and optimizer state under `path` (DCP, one file per rank;
    returns once rank 0 has written the index). Optimizer state is keyed by parameter name, so it reshards.
    An optimizer that has not stepped has no state and is left out: get_optimizer_state_dict would create
    one with a zero-lr step, and the step count it leaves behind would change the run's bias corrections."""
    sd = {"model": get_model_state_dict(model)}
    sd.update({k: get_optimizer_state_dict(model, o) for k, o in _by_key(optimizers).items() if o.state})
    with _one_process_is_fine():
        dcp.save(sd, checkpoint_id=str(path))


def load_sharded(path: str | Path, model: torch.nn.Module, optimizers: dict) -> None:
    """Every rank: load what `save_sharded` wrote into `model` (FSDP2 shards or plain tensors, any world size)
    and `optimizers` (built over `model`'s current parameters)."""
    path = Path(path)
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        sd = {"model": get_model_state_dict(model)}
        for key, o in _by_key(optimizers).items():
            if not any(k.startswith(key + ".") for k in meta):
                continue  # had not stepped when saved: stays fresh
            osd = get_optimizer_state_dict(model, o)  # the template (every parameter gets a state) ...
            osd["state"] = {n: s for n, s in osd["state"].items()  # ... cut to the parameters saved with one
                            if f"{key}.state.{n}.{next(iter(s))}" in meta}
            sd[key] = osd
        with _one_process_is_fine():
            dcp.load(sd, checkpoint_id=str(path))
    except (Exception, dcp.CheckpointException) as e:  # OSError, unpickling errors; a rank's failure arrives wrapped
        if isinstance(e, dcp.CheckpointException) and e.failures:
            e = next(iter(e.failures.values()))[0]  # (exception, traceback) of the first failed rank
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: the sharded model/optimizer state ({SHARDS_INDEX} + *.distcp) does not load "
                              f"({type(e).__name__}: {why}); resume from an earlier checkpoint or start a new run "
                              "from its weights with --checkpoint") from None
    set_model_state_dict(model, sd["model"])
    for key, o in _by_key(optimizers).items():
        if key in sd:
            _set_optimizer_state(model, o, sd[key], full=False)


def optimizer_state(model: torch.nn.Module, optimizers: dict) -> dict:
    """The optimizers' state keyed by parameter name (plain tensors on an unsharded model), for
    `restore_optimizer_state` after the parameters were replaced (fully_shard)."""
    return {k: get_optimizer_state_dict(model, o) for k, o in _by_key(optimizers).items() if o.state}


def restore_optimizer_state(model: torch.nn.Module, optimizers: dict, state: dict) -> None:
    """Load `optimizer_state`'s full tensors into optimizers over `model`'s (possibly sharded) parameters."""
    for key, o in _by_key(optimizers).items():
        if key in state:
            _set_optimizer_state(model, o, state[key], full=True)


def _set_optimizer_state(model, optim, osd: dict, full: bool) -> None:
    saved = set(osd["state"])
    set_optimizer_state_dict(model, optim, osd, options=StateDictOptions(full_state_dict=full, strict=False))
    # set_optimizer_state_dict first gives every parameter a state with a zero-lr step; a parameter the
    # checkpoint holds none for (the indexer in the main optimizer before DSA's sparse stage) loses it again,
    # so its first real step starts at step 1, as it did in the uninterrupted run
    name = {p: n for n, p in model.named_parameters()}
    for p in [p for p in optim.state if name.get(p) not in saved]:
        del optim.state[p]
