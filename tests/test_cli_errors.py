"""What the scripts say to a careless command: one name per knob (--checkpoint, the old --init-from still
accepted), arguments checked before any data is read, errors that name the problem first, and --help that
lists the choices of every choice flag (issue 24, item 5)."""

import argparse

import pytest

import rl
import serve
import train
from nanoglm5.training.state import check_resume
from nanoglm5.training.train_config import TrainError

SCRIPTS = {"train": train, "rl": rl, "serve": serve}
PARSERS = {"train": train.build_parser, "rl": rl.build_parser, "serve": lambda: serve.parser_for(serve.ServeConfig, serve.__doc__)}


def test_unknown_preset_is_named_before_any_data_is_read(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # no data dir exists: the preset must be what the error is about
        train.main(["--preset", "nosuch", "--data-dir", str(tmp_path / "no_data")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--preset" in err and "'nosuch'" in err and "'tiny'" in err
    assert "token shards" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("script", ["train", "rl", "serve"])
def test_missing_checkpoint_says_it_does_not_exist(script, tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    argv = ["--checkpoint", str(missing)] + (["--stage", "sft", "--data-dir", str(tmp_path)] if script == "train" else [])
    assert SCRIPTS[script].main(argv) == 1
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err and "tokenizer.json" not in err


@pytest.mark.parametrize("script", ["train", "rl", "serve"])
def test_a_directory_that_is_not_a_checkpoint_is_named(script, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README").write_text("not weights")
    argv = ["--checkpoint", str(tmp_path / "notes")] + (["--stage", "sft", "--data-dir", str(tmp_path)]
                                                         if script == "train" else [])
    assert SCRIPTS[script].main(argv) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'notes'} is not a checkpoint: point at a directory train.py wrote" in err
    assert "config.json and model.safetensors" in err and "save_hf" not in err


def test_old_flag_name_init_from_still_works():
    assert train.parse_config(["--init-from", "a/ckpt"]).checkpoint == "a/ckpt"
    assert rl.parse_config(["--init-from", "b/ckpt"]).checkpoint == "b/ckpt"
    assert rl.parse_config(["--checkpoint", "c/ckpt"]).checkpoint == "c/ckpt"


def test_a_misspelt_flag_gets_one_line_and_the_closest_name(capsys):
    with pytest.raises(SystemExit) as e:
        rl.main(["--checkpont", "x", "--mdoe", "sync"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "unrecognized arguments" in err and "did you mean --checkpoint?" in err and "--help" in err


@pytest.mark.parametrize("script", ["train", "rl", "serve"])
def test_help_lists_the_choices_of_every_choice_flag(script):
    p = PARSERS[script]()
    text = " ".join(p.format_help().split())  # the help wraps lines
    with_choices = [a for a in p._actions if a.choices and not isinstance(a, argparse._HelpAction)]
    assert with_choices  # each script has choice flags
    for a in with_choices:
        listed = "[choices: " + ", ".join(map(str, a.choices)) + "]"
        assert listed in text, (a.option_strings, listed)
    expected = {"train": {"--stage", "--preset", "--optimizer", "--decay", "--dtype"},
                "rl": {"--mode", "--env", "--backend", "--loss", "--agg", "--order", "--device"},
                "serve": {"--dtype", "--speculative"}}[script]
    assert expected <= {s for a in with_choices for s in a.option_strings}


def test_a_checkpoint_saved_with_init_from_still_resumes():
    """Run states written before the rename say init_from; it is the same resume-neutral knob as checkpoint."""
    neutral = {"checkpoint"}
    check_resume("ck", {"init_from": "old", "lr": 1.0}, {"checkpoint": "new", "lr": 1.0}, neutral, "differs")
    with pytest.raises(TrainError, match="lr: 1.0"):  # the rest is still compared
        check_resume("ck", {"init_from": "old", "lr": 1.0}, {"checkpoint": "new", "lr": 2.0}, neutral, "differs")
