"""The training loop: learning, exact resume, run directory contents, budgets, refusals."""

import csv
import dataclasses
import json
import math
import re

import pytest
import torch

from deeprnn.checkpoint import load_checkpoint
from deeprnn.errors import CheckpointError, ConfigError, CorpusError, DeepRNNError
from deeprnn.train import TrainConfig, build_optimizer, evaluate_tokens, sequence_loss, train


def tiny(tmp_path, **kw) -> TrainConfig:
    base = dict(corpus=["timemachine"], num_layers=1, num_hiddens=24, batch_size=8, num_steps=10,
                max_tokens=4000, val_fraction=0.02, test_fraction=0.02, num_epochs=2, lr=1e-2,
                eval_batch_size=8, eval_num_steps=50, sample_every=0, num_preds=5, precision="fp32",
                dropout=0.0, run_dir=str(tmp_path / "run"), seed=3)
    base.update(kw)
    return TrainConfig(**base)


def rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_training_lowers_heldout_loss(tmp_path):
    cfg = tiny(tmp_path, num_epochs=6)
    summary = train(cfg, progress=False, log=lambda *_: None)
    r = rows(tmp_path / "run")
    assert len(r) == 6  # one evaluation per epoch
    first, last = float(r[0]["val_loss"]), float(r[-1]["val_loss"])
    # falls epoch over epoch, and far below the untrained model's log(28) = 3.33 nats
    assert last < first - 0.1, (first, last)
    assert last < math.log(28) - 0.8
    assert summary["best_val_ppl"] == pytest.approx(math.exp(min(float(x["val_loss"]) for x in r)))
    assert summary["test_ppl"] < 20


def test_run_directory_contents(tmp_path):
    cfg = tiny(tmp_path, num_epochs=2)
    summary = train(cfg, progress=False, log=lambda *_: None)
    run = tmp_path / "run"
    for name in ("config.json", "metrics.csv", "curve.png", "summary.json", "best/model.safetensors",
                 "best/checkpoint.json", "last/train_state.safetensors"):
        assert (run / name).exists(), name
    assert (run / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((run / "summary.json").read_text())
    assert saved["steps"] == summary["steps"]
    assert json.loads((run / "config.json").read_text())["num_hiddens"] == 24
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["step", "epoch", "tokens"] and "val_bpc" in header
    for row in rows(run):
        assert float(row["val_bpc"]) == pytest.approx(float(row["val_loss"]) / math.log(2))
        assert float(row["val_ppl"]) == pytest.approx(math.exp(float(row["val_loss"])))


@pytest.mark.parametrize("sampling,schedule,dropout", [("sequential", "cosine", 0.3), ("random", "constant", 0.0)])
def test_resume_gives_identical_losses(tmp_path, sampling, schedule, dropout):
    """2N steps in one go == N steps, pause, resume, N steps (same per-eval losses and weights)."""
    kw = dict(num_epochs=3, eval_every=5, sampling=sampling, schedule=schedule, dropout=dropout, num_layers=2)
    full = tiny(tmp_path / "a", **kw)
    train(full, progress=False, log=lambda *_: None)

    part = tiny(tmp_path / "b", **kw)
    s1 = train(part, progress=False, log=lambda *_: None, stop_after_steps=15)
    assert s1["stop_reason"] == "paused" and s1["steps"] == 15
    train(part, resume=True, progress=False, log=lambda *_: None)

    a, b = rows(tmp_path / "a" / "run"), rows(tmp_path / "b" / "run")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == rb["train_loss"], ra["step"]
        assert ra["val_loss"] == rb["val_loss"], ra["step"]
    wa = load_checkpoint(tmp_path / "a" / "run", prefer="last").model.state_dict()
    wb = load_checkpoint(tmp_path / "b" / "run", prefer="last").model.state_dict()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_resume_refuses_changed_model(tmp_path):
    cfg = tiny(tmp_path, max_steps=3)
    train(cfg, progress=False, log=lambda *_: None)
    changed = dataclasses.replace(cfg, num_hiddens=32)
    with pytest.raises(ConfigError, match=r"^num_hiddens differs from the run in .* \(24 there, 32 now\)"):
        train(changed, resume=True, progress=False, log=lambda *_: None)


def test_existing_run_dir_is_refused(tmp_path):
    cfg = tiny(tmp_path, max_steps=2)
    train(cfg, progress=False, log=lambda *_: None)
    with pytest.raises(CheckpointError, match=r"already exists; pass --resume .* --overwrite"):
        train(cfg, progress=False, log=lambda *_: None)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    train(cfg, overwrite=True, progress=False, log=lambda *_: None)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only the run's own files replaced


def _tree(root):
    """Every file under ``root`` with its bytes (what a test compares before and after a refusal)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_folder_that_holds_no_run_is_never_cleared(tmp_path):
    """A user's project folder with a config.json and a best/ of their own is not a run: refused with and
    without overwrite, no mention of --resume, and not one byte changed."""
    proj = tmp_path / "proj"
    (proj / "best").mkdir(parents=True)
    (proj / "config.json").write_text('{"my": "settings"}')
    (proj / "best" / "draft.txt").write_text("drafts")
    before = _tree(proj)
    cfg = tiny(tmp_path, max_steps=2, run_dir=str(proj))
    for overwrite in (False, True):
        with pytest.raises(CheckpointError) as e:
            train(cfg, overwrite=overwrite, progress=False, log=lambda *_: None)
        assert str(e.value) == (f"run directory {proj} is not empty and holds no deeprnn run; "
                                "choose a new or empty --run-dir")
        assert _tree(proj) == before


def test_overwrite_refuses_foreign_files_in_checkpoint_folders(tmp_path):
    """--overwrite on a real run removes only what a run writes. A file of the user's inside best/ would be
    lost with the folder, so overwriting is refused (nothing removed) until it is moved away."""
    cfg = tiny(tmp_path, max_steps=2)
    train(cfg, progress=False, log=lambda *_: None)
    run = tmp_path / "run"
    (run / "best" / "draft.txt").write_text("drafts")
    (run / "notes.txt").write_text("mine")
    before = _tree(run)
    with pytest.raises(CheckpointError) as e:
        train(cfg, overwrite=True, progress=False, log=lambda *_: None)
    assert str(e.value) == (f"cannot overwrite run directory {run}: {run / 'best' / 'draft.txt'} was not written "
                            "by deeprnn; move it away or choose another --run-dir")
    assert _tree(run) == before
    # The same for a file at a name a run writes that is not deeprnn's.
    (run / "best" / "draft.txt").unlink()
    (run / "summary.json").write_text('{"mine": 1}')
    with pytest.raises(CheckpointError, match=r"summary\.json was not written by deeprnn"):
        train(cfg, overwrite=True, progress=False, log=lambda *_: None)
    (run / "summary.json").unlink()
    train(cfg, overwrite=True, progress=False, log=lambda *_: None)
    assert (run / "notes.txt").read_text() == "mine" and (run / "best" / "checkpoint.json").exists()


def test_run_dir_that_is_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for overwrite in (False, True):
        with pytest.raises(CheckpointError) as e:
            train(tiny(tmp_path, max_steps=2, run_dir=str(afile)), overwrite=overwrite, progress=False,
                  log=lambda *_: None)
        assert str(e.value) == f"run directory {afile} is a file, not a directory; choose another --run-dir"
    with pytest.raises(CheckpointError) as e:
        train(tiny(tmp_path, max_steps=2, run_dir=str(afile / "sub")), progress=False, log=lambda *_: None)
    assert str(e.value) == f"cannot create run directory {afile / 'sub'}: Not a directory; choose another --run-dir"
    assert afile.read_text() == "x"


def test_resume_of_a_checkpoint_folder_is_refused(tmp_path):
    """--resume takes the run (it continues from last/); given the run's best/ it used to write a second run
    inside best/ (best/best, best/last, best/metrics.csv)."""
    cfg = tiny(tmp_path, max_steps=2)
    train(cfg, progress=False, log=lambda *_: None)
    run = tmp_path / "run"
    before = _tree(run)
    for name in ("best", "last"):
        with pytest.raises(CheckpointError) as e:
            train(dataclasses.replace(cfg, run_dir=str(run / name), max_steps=4), resume=True, progress=False,
                  log=lambda *_: None)
        assert str(e.value) == (f"{run / name} is a checkpoint inside the run {run}; --resume takes the run "
                                f"directory and continues from its last checkpoint: --resume {run}")
    assert _tree(run) == before


def test_resume_without_last_is_refused_not_taken_from_best(tmp_path):
    """A run without last/ (removed, or killed between the first evaluation's best/ and last/) resumed from best/
    without a word: an earlier step, with metrics.csv's later rows dropped, and with --ema-decay the averaged
    weights under the raw weights' optimiser state."""
    import shutil

    cfg = tiny(tmp_path, max_steps=4, eval_every=2, lr=1e-9)  # never improves after step 2: best/ is at step 2
    train(cfg, progress=False, log=lambda *_: None)
    run = tmp_path / "run"
    shutil.rmtree(run / "last")
    before = _tree(run)
    with pytest.raises(CheckpointError) as e:
        train(dataclasses.replace(cfg, max_steps=8), resume=True, progress=False, log=lambda *_: None)
    assert str(e.value) == (
        f"cannot resume {run}: it has no last/ checkpoint (where training stopped); its best/ holds the best "
        f"weights, not the training state to go on from: fine-tune from them with --init-from {run / 'best'}, "
        "or start the run again with --overwrite")
    assert _tree(run) == before


def test_every_ranks_generators_are_checkpointed_under_their_own_names():
    """Each rank's CPU and CUDA generators: the CUDA ones of ranks above 0 were not saved, so their dropout
    masks after a multi-GPU resume came from rank 0's seed. The names rank 0 used before stay."""
    from deeprnn.train import _restore_rng, _rng_tensors

    cpu0, cpu1 = torch.get_rng_state(), torch.Generator().manual_seed(1).get_state()
    cuda0, cuda1 = torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)
    saved = _rng_tensors([(cpu0, cuda0), (cpu1, cuda1)])
    assert list(saved) == ["rng.torch", "rng.cuda", "rng.torch.rank1", "rng.cuda.rank1"]
    assert saved["rng.cuda.rank1"] is cuda1 and saved["rng.torch.rank1"] is cpu1
    assert list(_rng_tensors([(cpu0, None), (cpu1, None)])) == ["rng.torch", "rng.torch.rank1"]
    with torch.random.fork_rng(devices=[]):  # the global generator is the other tests' again afterwards
        _restore_rng(saved, 1, torch.device("cpu"), fallback_seed=5)  # rank 1 takes its own generator
        assert torch.equal(torch.get_rng_state(), cpu1)
        _restore_rng(saved, 2, torch.device("cpu"), fallback_seed=5)  # a rank the checkpoint did not have
        assert torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(5).get_state())


def test_no_validation_text_is_refused_before_anything_is_written(tmp_path):
    """With no validation text there is no best checkpoint to report on: refused, nothing written."""
    with pytest.raises(ConfigError) as e:
        train(tiny(tmp_path, val_fraction=0.0, max_steps=2), progress=False, log=lambda *_: None)
    assert str(e.value) == ("--val-fraction 0 leaves no validation text; training needs some to keep the best "
                            "checkpoint: use e.g. --val-fraction 0.05")
    f = tmp_path / "short.txt"
    f.write_text("the time machine by h g wells " * 20)  # 600 characters: the validation split gets 2
    with pytest.raises(ConfigError) as e:
        train(tiny(tmp_path, corpus=[str(f)], max_tokens=None, val_fraction=0.002, max_steps=2), progress=False,
              log=lambda *_: None)
    assert str(e.value) == ("the validation split has 2 tokens (--val-fraction 0.002); it needs at least 3: "
                            "raise --val-fraction or use more text")
    assert not (tmp_path / "run").exists()
    # A test split too short to score failed with a ZeroDivisionError after the whole run had trained, leaving
    # no summary.json and a run that refused to resume ("at or past max_steps").
    with pytest.raises(ConfigError) as e:
        train(tiny(tmp_path, corpus=[str(f)], max_tokens=None, test_fraction=0.002, max_steps=2), progress=False,
              log=lambda *_: None)
    assert str(e.value) == ("the test split has 2 tokens (--test-fraction 0.002); it needs at least 3 to be scored: "
                            "raise --test-fraction, use more text, or --test-fraction 0 for none")
    assert not (tmp_path / "run").exists()


def test_min_freq_that_leaves_only_unk_is_refused(tmp_path):
    """Every token <unk> scores a perfect (and meaningless) perplexity 1.0: refused."""
    with pytest.raises(ConfigError) as e:
        train(tiny(tmp_path, min_freq=100_000_000, max_steps=2), progress=False, log=lambda *_: None)
    assert str(e.value) == ("vocabulary has only <unk> after --min-freq 100000000 (no token occurs that often); "
                            "lower --min-freq")
    assert not (tmp_path / "run").exists()


def test_resume_missing_run_dir(tmp_path):
    with pytest.raises(CheckpointError, match=r"^cannot resume: run directory .*nope does not exist$"):
        train(tiny(tmp_path, run_dir=str(tmp_path / "nope")), resume=True, progress=False)


def test_corpus_too_small_names_minimum(tmp_path):
    f = tmp_path / "small.txt"
    f.write_text("the time machine " * 5)
    cfg = tiny(tmp_path, corpus=[str(f)], max_tokens=None, val_fraction=0.1, test_fraction=0.1)
    with pytest.raises(CorpusError, match=r"need at least 90 "):
        train(cfg, progress=False, log=lambda *_: None)


def test_same_seed_same_losses(tmp_path):
    a = train(tiny(tmp_path / "a", max_steps=6, dropout=0.2, num_layers=2), progress=False, log=lambda *_: None)
    b = train(tiny(tmp_path / "b", max_steps=6, dropout=0.2, num_layers=2), progress=False, log=lambda *_: None)
    assert a["last"]["train_loss"] == b["last"]["train_loss"]
    c = train(tiny(tmp_path / "c", max_steps=6, dropout=0.2, num_layers=2, seed=4), progress=False,
              log=lambda *_: None)
    assert c["last"]["train_loss"] != a["last"]["train_loss"]


def test_early_stopping_and_max_steps(tmp_path):
    s = train(tiny(tmp_path / "a", max_steps=7, eval_every=3), progress=False, log=lambda *_: None)
    assert s["steps"] == 7 and s["stop_reason"] == "max_steps"
    # lr so small nothing improves after the first evaluation beyond 1e-6: patience 1 stops at eval 2
    s = train(tiny(tmp_path / "b", lr=1e-9, eval_every=2, patience=1, num_epochs=5), progress=False,
              log=lambda *_: None)
    assert s["stop_reason"] == "early stopping"


def test_evaluate_tokens_equals_direct_sum():
    from deeprnn.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=7, cell="gru", num_layers=2, num_hiddens=6)).double()
    tokens = torch.randint(0, 7, (2 * 23 + 1,))
    total, n = evaluate_tokens(model, tokens, batch_size=2, num_steps=5)
    # Direct: two streams of 23 inputs each, one forward pass over the whole stream.
    X = tokens[:46].view(2, 23)
    Y = tokens[1:47].view(2, 23)
    model.eval()
    with torch.no_grad():
        logits, _ = model(X)
    assert n == 46
    assert total == pytest.approx(float(sequence_loss(logits, Y, reduction="sum")), rel=1e-9)


def test_bad_config_values():
    with pytest.raises(ConfigError, match=r"^lr must be > 0, got -1"):
        TrainConfig(lr=-1).validate()
    with pytest.raises(ConfigError, match=r"^optimizer must be one of sgd, adam, adamw, got 'rmsprop'"):
        TrainConfig(optimizer="rmsprop").validate()
    with pytest.raises(ConfigError, match=r"^clip must be >= 0"):
        TrainConfig(clip=-0.5).validate()
    with pytest.raises(ConfigError, match=r"^beta1 must be in \[0, 1\), got 1.0$"):
        TrainConfig(beta1=1.0).validate()
    with pytest.raises(ConfigError, match=r"^beta2 must be in \[0, 1\), got -0.1$"):
        TrainConfig(beta2=-0.1).validate()
    with pytest.raises(ConfigError, match=r"^partial_shuffle needs sampling='sequential' \(random sampling already "
                                          r"shuffles its windows\)$"):
        TrainConfig(partial_shuffle=True, sampling="random").validate()


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_betas_reach_the_optimiser(name, cls):
    """--beta1/--beta2 set Adam's moment decays (defaults: torch's 0.9, 0.999)."""
    model = torch.nn.Linear(3, 2)
    default = build_optimizer(TrainConfig(optimizer=name), model)
    assert isinstance(default, cls) and default.param_groups[0]["betas"] == (0.9, 0.999)
    opt = build_optimizer(TrainConfig(optimizer=name, beta1=0.8, beta2=0.99, lr=0.01), model)
    assert opt.param_groups[0]["betas"] == (0.8, 0.99)
    # Three steps equal those of torch's own optimiser built with the same betas, bit for bit.
    ref_model = torch.nn.Linear(3, 2)
    ref_model.load_state_dict(model.state_dict())
    ref = cls(ref_model.parameters(), lr=0.01, betas=(0.8, 0.99), weight_decay=0.0)
    x = torch.randn(4, 3)
    for m, o in ((model, opt), (ref_model, ref)):
        for _ in range(3):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_source_weights_repeat_a_sources_training_text(tmp_path):
    """--source-weights: the training split holds each source's training text W times; held out as before."""
    (tmp_path / "b.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40, encoding="utf-8")
    lines = []
    cfg = tiny(tmp_path, corpus=["timemachine", str(tmp_path / "b.txt")], max_tokens=None, max_steps=1,
               source_weights=[0.05, 3], heldout_from=["timemachine"])
    train(cfg, progress=False, log=lines.append)
    # Time Machine: 170,580 chars, 96% trains: 163,756, 5% of it is 8,188; b: 1,720 chars, all training, x3.
    assert any("train 13,348 / valid 3,412 / test 3,412" in line for line in lines), lines[0]
    with pytest.raises(ConfigError,
                       match=r"^source_weights must be a list of numbers in \(0, 1,000\] \(one per source\), got \[0\]$"):
        tiny(tmp_path, source_weights=[0]).validate()
    for bad in (2, [True], [1e30], [float("inf")]):  # a bare number, a bool, 1e30 overflowed a repeat count
        with pytest.raises(ConfigError, match=r"^source_weights must be a list of numbers in \(0, 1,000\]"):
            tiny(tmp_path, source_weights=bad).validate()


def test_resume_past_the_budget_is_refused(tmp_path):
    """A resumed run already at or past --max-steps (or --num-epochs) has nothing to train: refused, nothing
    written. It used to score the test split again, rewrite summary.json and say "done (epochs)"."""
    cfg = tiny(tmp_path, max_steps=4)
    train(cfg, progress=False, log=lambda *_: None)
    run = tmp_path / "run"
    before = _tree(run)
    for max_steps in (4, 3):
        with pytest.raises(ConfigError) as e:
            train(dataclasses.replace(cfg, max_steps=max_steps), resume=True, progress=False, log=lambda *_: None)
        assert str(e.value) == (f"the run in {run} is already at step 4, at or past max_steps {max_steps}: nothing "
                                "to train; resume with --max-steps above 4 to train on")
    assert _tree(run) == before
    # The same for epochs (6 steps each here), also where the last checkpoint was saved at an epoch's last batch
    # (eval_every 6), before the loop moved on to the next epoch.
    for eval_every in (0, 6):
        ecfg = tiny(tmp_path / f"e{eval_every}", max_tokens=500, num_epochs=2, eval_every=eval_every)
        done = train(ecfg, progress=False, log=lambda *_: None)
        assert done["stop_reason"] == "epochs" and done["steps"] == 12
        with pytest.raises(ConfigError) as e:
            train(ecfg, resume=True, progress=False, log=lambda *_: None)
        assert str(e.value) == (f"the run in {ecfg.run_dir} has already trained 2 epochs, at or past num_epochs 2: "
                                "nothing to train; resume with --num-epochs above 2 to train on")
        summary = train(dataclasses.replace(ecfg, num_epochs=3), resume=True, progress=False, log=lambda *_: None)
        assert summary["stop_reason"] == "epochs" and summary["steps"] == 18
    # Variable-length windows: each epoch here draws 7 windows where len(loader) says 6. A run paused after the
    # 6th of the last epoch still has one to train.
    vcfg = tiny(tmp_path / "v", max_tokens=500, num_epochs=2, variable_bptt=True)
    assert train(vcfg, progress=False, log=lambda *_: None, stop_after_steps=13)["stop_reason"] == "paused"
    assert train(vcfg, resume=True, progress=False, log=lambda *_: None)["steps"] == 14
    with pytest.raises(ConfigError, match=r"has already trained 2 epochs, at or past num_epochs 2: "):
        train(vcfg, resume=True, progress=False, log=lambda *_: None)


def test_resume_past_the_time_budget_is_refused(tmp_path):
    """A run stopped by --time-budget, resumed with the same budget, used to train one more step, score the test
    split again and rewrite summary.json, with no word that the budget was spent."""
    cfg = tiny(tmp_path, time_budget=0.0005)  # 30 ms: a few steps
    done = train(cfg, progress=False, log=lambda *_: None)
    assert done["stop_reason"] == "time budget"
    run = tmp_path / "run"
    trained = json.loads((run / "last" / "checkpoint.json").read_text())["position"]["train_time"]
    minutes = f"{math.ceil(trained / 60 * 1e4) / 1e4:g}"
    before = _tree(run)
    with pytest.raises(ConfigError) as e:
        train(cfg, resume=True, progress=False, log=lambda *_: None)
    assert str(e.value) == (f"the run in {run} has already trained {minutes} minutes, at or past time_budget 0.0005: "
                            f"nothing to train; resume with --time-budget above {minutes} to train on")
    assert _tree(run) == before
    more = train(dataclasses.replace(cfg, time_budget=trained / 60 + 0.0005), resume=True, progress=False,
                 log=lambda *_: None)
    assert more["stop_reason"] == "time budget" and more["steps"] > done["steps"]


def test_a_run_names_its_files_by_absolute_path_and_resumes_from_anywhere(tmp_path, monkeypatch, shared_data):
    """--corpus wotw.txt in w/ is stored as w's absolute path (named corpora stay names), so the run resumes from
    the parent directory, with the file spelled w/wotw.txt or not at all, exactly as an uninterrupted run."""
    work = tmp_path / "w"
    work.mkdir()
    (work / "wotw.txt").write_text((shared_data / "timemachine.txt").read_text()[:6000])
    monkeypatch.chdir(work)
    kw = dict(corpus=["timemachine", "wotw.txt"], heldout_from=["wotw.txt"], source_weights=[0.02, 1.0],
              max_tokens=None, num_epochs=1, eval_every=4, max_steps=12)
    train(tiny(work / "a", **kw), progress=False, log=lambda *_: None)
    paused = train(tiny(work / "b", **kw), progress=False, log=lambda *_: None, stop_after_steps=8)  # at an evaluation
    assert paused["stop_reason"] == "paused"
    saved = json.loads((work / "b" / "run" / "config.json").read_text())
    assert saved["corpus"] == ["timemachine", str(work / "wotw.txt")]
    assert saved["heldout_from"] == [str(work / "wotw.txt")]

    monkeypatch.chdir(tmp_path)
    resumed = tiny(tmp_path, **{**kw, "corpus": ["timemachine", "w/wotw.txt"], "heldout_from": ["w/wotw.txt"]})
    resumed.run_dir = "w/b/run"  # relative too
    assert train(resumed, resume=True, progress=False, log=lambda *_: None)["steps"] == 12
    a, b = rows(work / "a" / "run"), rows(work / "b" / "run")
    assert [(r["step"], r["train_loss"], r["val_loss"]) for r in a] == \
        [(r["step"], r["train_loss"], r["val_loss"]) for r in b]

    from deeprnn.cli import main

    assert main(["evaluate", "w/b/run", "--split", "valid", "--json"]) == 0  # the run's own text, from here
    (tmp_path / "other.txt").write_text((shared_data / "timemachine.txt").read_text()[:6000])
    with pytest.raises(ConfigError) as e:
        train(dataclasses.replace(resumed, corpus=["timemachine", "other.txt"], max_steps=14), resume=True,
              progress=False, log=lambda *_: None)
    assert str(e.value) == (f"corpus differs from the run in w/b/run (['timemachine', '{work / 'wotw.txt'}'] there, "
                            "['timemachine', 'other.txt'] now); resume without changing it, or start a new run")


def test_an_old_run_with_relative_paths_resumes_from_its_own_directory(tmp_path, monkeypatch, shared_data):
    """Runs made before paths were stored absolute keep working where they were started; elsewhere the refusal
    says where to resume from."""
    import deeprnn.corpus

    work = tmp_path / "w"
    work.mkdir()
    (work / "wotw.txt").write_text((shared_data / "timemachine.txt").read_text()[:6000])
    monkeypatch.chdir(work)
    with monkeypatch.context() as m:
        m.setattr(deeprnn.corpus, "absolute_spec", lambda spec: spec)  # what older versions stored
        cfg = tiny(work, corpus=["wotw.txt"], max_tokens=None, max_steps=2)
        train(cfg, progress=False, log=lambda *_: None)
    assert json.loads((work / "run" / "config.json").read_text())["corpus"] == ["wotw.txt"]
    assert train(dataclasses.replace(cfg, run_dir="run", max_steps=3), resume=True, progress=False,
                 log=lambda *_: None)["steps"] == 3
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        train(dataclasses.replace(cfg, corpus=["w/wotw.txt"], run_dir="w/run", max_steps=4), resume=True,
              progress=False, log=lambda *_: None)
    assert str(e.value) == ("corpus differs from the run in w/run (['wotw.txt'] there, ['w/wotw.txt'] now); the run "
                            "names its files relative to the directory it was started in: resume from there")


def test_too_small_a_training_split_is_called_that(tmp_path):
    """The minimum is checked on the training split (after --max-tokens), and the message says so: it used to
    call the split's size the corpus's."""
    f = tmp_path / "small.txt"
    f.write_text("the time machine " * 5)  # 84 characters after d2l normalisation; 80% of them train
    cfg = tiny(tmp_path, corpus=[str(f)], max_tokens=None, val_fraction=0.1, test_fraction=0.1)
    with pytest.raises(CorpusError) as e:
        train(cfg, progress=False, log=lambda *_: None)
    assert str(e.value) == ("the training split has 67 tokens (the corpus has 84) but batch_size=8 and num_steps=10 "
                            "need at least 90 (batch_size*num_steps + num_steps); use more text or smaller sizes")
    with pytest.raises(CorpusError) as e:
        train(tiny(tmp_path, max_tokens=50), progress=False, log=lambda *_: None)
    assert str(e.value) == ("the training split has 50 tokens (--max-tokens 50; the corpus has 170580) but "
                            "batch_size=8 and num_steps=10 need at least 90 (batch_size*num_steps + num_steps); "
                            "use more text or smaller sizes")
    with pytest.raises(CorpusError) as e:  # a weight below 1 keeps the first part of a source's training text
        train(tiny(tmp_path, max_tokens=None, source_weights=[0.0003]), progress=False, log=lambda *_: None)
    assert str(e.value) == ("the training split has 49 tokens (--source-weights 0.0003; the corpus has 170580) but "
                            "batch_size=8 and num_steps=10 need at least 90 (batch_size*num_steps + num_steps); "
                            "use more text or smaller sizes")
    assert not (tmp_path / "run").exists()


def test_end_of_training_sample_has_num_preds_tokens(tmp_path):
    """--num-preds 7 gives 7 characters after the prefix (it used to be max(num_preds, 100))."""
    summary = train(tiny(tmp_path, max_steps=2, prefix="time traveller", num_preds=7), progress=False,
                    log=lambda *_: None)
    assert summary["sample"].startswith("time traveller") and len(summary["sample"]) == len("time traveller") + 7
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["sample"] == summary["sample"]


def test_end_of_training_sample_with_a_prefix_outside_the_vocabulary_is_skipped(tmp_path):
    """A prefix with words the word-level vocabulary lacks is refused as deeprnn generate refuses it: no sample
    (it used to feed them as <unk> silently), one line saying why; a prefix from the text gives one."""
    text = tmp_path / "cats.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log .\n" * 300)
    lines = []
    cfg = tiny(tmp_path, corpus=[str(text)], token="word", normalization="raw", max_tokens=None, max_steps=2,
               prefix="time traveller the", num_preds=4)
    summary = train(cfg, progress=False, log=lines.append)
    assert summary["sample"] is None
    assert lines[-1] == ("no sample: the prefix 'time traveller the' has words not in the vocabulary: 'time', "
                         "'traveller'; pass --prefix with words of the training text")
    summary = train(dataclasses.replace(cfg, prefix="the cat", run_dir=str(tmp_path / "run2")), progress=False,
                    log=lines.append)
    assert summary["sample"].startswith("the cat ") and len(summary["sample"].split()) == 2 + 4
    cfg = dataclasses.replace(cfg, normalization="d2l", prefix="The Cat,", run_dir=str(tmp_path / "run3"))
    assert train(cfg, progress=False, log=lines.append)["sample"] is None
    assert lines[-1] == ("no sample: the prefix 'The Cat,' has words not in the vocabulary: 'The', 'Cat', ',' (the "
                         "model was trained on 'd2l'-normalised text; normalised so, the prefix is 'the cat': pass "
                         "that); pass --prefix with words of the training text")


# --- precision auto: bf16 only where the device multiplies it natively -------------------------------------
@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_precision_auto_is_bf16_only_with_native_bf16(tmp_path, monkeypatch, native, expected):
    import deeprnn.precision as precision_mod
    from deeprnn.precision import resolve_precision

    monkeypatch.setattr(precision_mod, "native_bf16", lambda device: native)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == expected
    assert (resolve_precision("fp32", cpu), resolve_precision("bf16", cpu)) == ("fp32", "bf16")
    assert TrainConfig().precision == "auto"
    lines: list[str] = []
    cfg = tiny(tmp_path, cell="gru", precision="auto", max_steps=2)  # the GRU runs bf16 on any CPU
    train(cfg, progress=False, log=lines.append)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["precision"] == expected  # what auto became
    assert any(f", cpu, {expected} (auto); run dir" in line for line in lines), lines


def test_bf16_on_a_cpu_without_it(tmp_path, monkeypatch):
    """Asked for explicitly: the GRU and the scratch layers run, with a note that fp32 is faster; torch.nn.LSTM,
    which oneDNN cannot build in bf16 there, is one line before any run directory exists."""
    import deeprnn.precision as precision_mod
    from deeprnn.precision import check_precision, precision_note

    monkeypatch.setattr(precision_mod, "native_bf16", lambda device: False)
    cpu = torch.device("cpu")
    assert precision_note(cpu, "bf16", "concise") == (
        "note: this CPU has no AVX-512, so torch emulates bfloat16 products, several times slower than float32; "
        "--precision auto (or fp32) trains faster here")
    assert precision_note(cpu, "fp32", "concise") is None
    msg = ("precision 'bf16' with torch.nn.LSTM (impl 'concise') needs a CPU with AVX-512, which this one lacks; "
           "use precision auto or fp32, or impl 'scratch'")
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        train(tiny(tmp_path, precision="bf16"), progress=False, log=lambda *_: None)
    assert not (tmp_path / "run").exists()
    check_precision("auto", cpu, "lstm", "concise")  # auto is fp32 here
    check_precision("bf16", cpu, "lstm", "scratch")
    check_precision("bf16", cpu, "gru", "concise")


def test_resume_keeps_the_precision_auto_chose(tmp_path, monkeypatch):
    """A run started where auto meant bf16 resumes in bf16 with precision auto, wherever it resumes."""
    import deeprnn.precision as precision_mod

    monkeypatch.setattr(precision_mod, "native_bf16", lambda device: True)
    cfg = tiny(tmp_path, cell="gru", precision="auto", max_steps=4, eval_every=2)
    train(cfg, progress=False, log=lambda *_: None, stop_after_steps=2)
    monkeypatch.setattr(precision_mod, "native_bf16", lambda device: False)
    summary = train(tiny(tmp_path, cell="gru", precision="auto", max_steps=4, eval_every=2), resume=True,
                    progress=False, log=lambda *_: None)
    assert summary["steps"] == 4
    assert load_checkpoint(tmp_path / "run" / "last").meta["train_config"]["precision"] == "bf16"


def test_a_stop_request_on_the_final_step_finishes_the_run(tmp_path):
    """Ctrl-C that lands on a run's last step (of max_steps, or of its last epoch) used to save a checkpoint and
    say 'resume with …', and that resume then refused: 'already at step 4, at or past max_steps 4: nothing to
    train'. Now the run finishes (test score, summary.json) as if the signal had come a moment later; one step
    earlier it stops as before."""
    import signal

    from deeprnn.train import TrainingInterrupted, request_stop

    def stop_after(step):
        return lambda line: request_stop(signal.SIGINT) if f" step {step}:" in line else None

    summary = train(tiny(tmp_path, max_steps=4, eval_every=1), progress=False, log=stop_after(3))
    assert (summary["steps"], summary["stop_reason"]) == (4, "max_steps") and "test_ppl" in summary
    assert (tmp_path / "run" / "summary.json").exists()
    with pytest.raises(TrainingInterrupted):
        train(tiny(tmp_path, max_steps=4, eval_every=1, run_dir=str(tmp_path / "early")), progress=False,
              log=stop_after(2))
    assert [r["step"] for r in rows(tmp_path / "early")] == ["1", "2", "3"]
    # An epoch budget: a request on the last batch of the last epoch finishes the run too.
    n = train(tiny(tmp_path, num_epochs=1, run_dir=str(tmp_path / "whole")), progress=False,
              log=lambda *_: None)["steps"]
    summary = train(tiny(tmp_path, num_epochs=1, eval_every=1, run_dir=str(tmp_path / "epoch")), progress=False,
                    log=stop_after(n - 1))
    assert (summary["steps"], summary["stop_reason"], summary["epochs"]) == (n, "epochs", 1)


def test_a_run_being_trained_is_locked_against_a_second_process(tmp_path, lock_holder):
    """Two processes trained one run at once: metrics.csv got every row twice and last/ was whichever saved
    last. A resume or an --overwrite of a run still training is now refused, naming the trainer's pid, with
    not one byte changed; once it stops (even by SIGKILL: the lock is the OS's) the run resumes."""
    cfg = tiny(tmp_path, max_steps=4)
    train(cfg, progress=False, log=lambda *_: None)
    run = tmp_path / "run"
    holder = lock_holder(run)
    before = _tree(run)
    message = (f"run directory {run} is in use by another deeprnn process (pid {holder.pid}); wait for it to "
               "finish, or stop it, and try again")
    with pytest.raises(CheckpointError) as e:
        train(dataclasses.replace(cfg, max_steps=6), resume=True, progress=False, log=lambda *_: None)
    assert str(e.value) == message
    with pytest.raises(CheckpointError) as e:
        train(cfg, overwrite=True, progress=False, log=lambda *_: None)
    assert str(e.value) == message
    assert _tree(run) == before
    lock_holder.release()  # killed, as by SIGKILL
    assert train(dataclasses.replace(cfg, max_steps=6), resume=True, progress=False, log=lambda *_: None)["steps"] == 6
    assert [r["step"] for r in rows(run)] == ["4", "6"]


def test_a_row_written_just_before_a_kill_is_not_written_twice(tmp_path):
    """A process killed between writing an evaluation's row to metrics.csv and saving last/ left that row, and
    the resumed run wrote its step again (5 kill -9s gave a duplicate step 11). Resume drops rows past its
    checkpoint, byte for byte the rest."""
    cfg = tiny(tmp_path, max_steps=4, eval_every=2)
    train(cfg, progress=False, log=lambda *_: None)
    csv_path = tmp_path / "run" / "metrics.csv"
    kept = csv_path.read_bytes()
    orphan = kept.splitlines(keepends=True)[-1].replace(b"4,", b"6,", 1)  # the row of a step 6 never saved
    csv_path.write_bytes(kept + orphan)
    train(dataclasses.replace(cfg, max_steps=6), resume=True, progress=False, log=lambda *_: None)
    assert [r["step"] for r in rows(tmp_path / "run")] == ["2", "4", "6"]
    assert csv_path.read_bytes().startswith(kept) and csv_path.read_bytes().count(b"\n") == 4


def test_a_curve_that_cannot_be_drawn_is_one_warning_and_training_goes_on(tmp_path):
    """An edited metrics.csv header (re-saved from a spreadsheet) was a KeyError at every evaluation of every
    resume; a directory in curve.png's place an IsADirectoryError that left curve.tmp.png."""
    cfg = tiny(tmp_path, max_steps=2, eval_every=2)
    train(cfg, progress=False, log=lambda *_: None)
    run = tmp_path / "run"
    text = (run / "metrics.csv").read_text()
    (run / "metrics.csv").write_text("Step;Epoch" + text[text.index("\n"):])
    lines = []
    summary = train(dataclasses.replace(cfg, max_steps=4), resume=True, progress=False, log=lines.append)
    assert summary["steps"] == 4
    assert [line for line in lines if "warning" in line] == [
        f"warning: cannot draw {run / 'curve.png'} (KeyError: 'epoch'); training goes on, and {run / 'metrics.csv'} "
        "has the numbers"]
    edited = (run / "metrics.csv").read_text()
    (run / "metrics.csv").write_text(text[:text.index("\n")] + edited[edited.index("\n"):])  # the header mended
    (run / "curve.png").unlink()
    (run / "curve.png").mkdir()
    lines.clear()
    fresh = tiny(tmp_path, max_steps=6, eval_every=2)
    assert train(fresh, resume=True, progress=False, log=lines.append)["steps"] == 6
    assert [line for line in lines if "warning" in line] == [
        f"warning: cannot draw {run / 'curve.png'} (Is a directory); training goes on, and {run / 'metrics.csv'} "
        "has the numbers"]
    assert not (run / "curve.tmp.png").exists()


def test_resume_on_a_changed_corpus_is_refused(tmp_path, shared_data):
    """A corpus file edited between a run and its resume was accepted when its vocabulary came out the same:
    the splits moved (epochs went backwards in metrics.csv, the test split grew from 48 to 128 tokens), best/
    was picked on other text, and the resume was no longer exact. Checkpoints now record the token stream."""
    text = (shared_data / "timemachine.txt").read_text(encoding="utf-8")[:6000]
    f = tmp_path / "book.txt"
    f.write_text(text, encoding="utf-8")
    cfg = tiny(tmp_path, corpus=[str(f)], max_tokens=None, max_steps=2)
    train(cfg, progress=False, log=lambda *_: None)
    run = tmp_path / "run"
    before = _tree(run)
    more = dataclasses.replace(cfg, max_steps=4)
    # The text's one "j" made a space: a letter fewer; five "x" of 16 made "j"s: the order of frequency.
    for changed, how in [(text * 3, "5,626 tokens then, 16,878 now"),
                         (text.replace("time", "mite"), "the same 5,626 tokens, but not the same text"),
                         (text.replace("j", " ").replace("J", " "), "tokens gone 'j'"),
                         (text.replace("x", "j", 5), "the same 28 tokens in another order of frequency")]:
        f.write_text(changed, encoding="utf-8")
        with pytest.raises(DeepRNNError) as e:
            train(more, resume=True, progress=False, log=lambda *_: None)
        assert str(e.value) == (f"the corpus has changed since the run in {run} started ({how}); resume with the "
                                "text the run was trained on, or start a new run")
        assert _tree(run) == before
    f.write_text(text, encoding="utf-8")
    assert train(more, resume=True, progress=False, log=lambda *_: None)["steps"] == 4


def test_a_run_from_before_the_test_split_check_still_resumes(tmp_path, monkeypatch):
    """Runs started before a too-short test split was refused (it has 2 tokens here) resume as they trained,
    without a test score: the refusal's advice, another --test-fraction, is one a resume cannot take."""
    import deeprnn.train as train_module

    f = tmp_path / "short.txt"
    f.write_text("the time machine by h g wells " * 20)  # 600 characters: the test split gets 2
    cfg = tiny(tmp_path, corpus=[str(f)], max_tokens=None, test_fraction=0.002, max_steps=2)
    monkeypatch.setattr(train_module, "MIN_HELDOUT_TOKENS", 2)  # as the check stood before
    train(cfg, progress=False, log=lambda *_: None)
    monkeypatch.undo()
    summary = train(dataclasses.replace(cfg, max_steps=4), resume=True, progress=False, log=lambda *_: None)
    assert summary["steps"] == 4 and "test_ppl" not in summary


def test_a_filesystem_without_locks_trains_unlocked_with_one_warning(tmp_path, monkeypatch):
    """filelock 3 raises NotImplementedError where the filesystem has no flock: that was a traceback for every
    run; now one RuntimeWarning and the run trains, as it did before the lock."""
    import filelock

    def no_flock(self, *args, **kwargs):
        raise NotImplementedError("FileSystem does not appear to support flock")

    monkeypatch.setattr(filelock.FileLock, "acquire", no_flock)
    with pytest.warns(RuntimeWarning) as caught:
        summary = train(tiny(tmp_path, max_steps=2), progress=False, log=lambda *_: None)
    assert summary["steps"] == 2
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
        f"deeprnn: {tmp_path / 'run'} is on a filesystem without file locks; nothing stops a second process from "
        "training this run at the same time"]


@pytest.mark.parametrize("resume, fix", [(False, "check its permissions or choose another --run-dir"),
                                         (True, "check its permissions")])
def test_a_run_directory_that_cannot_be_locked_is_one_line(tmp_path, monkeypatch, resume, fix):
    """The lock file cannot be created (no write permission): one line; a resume is not told to pick another
    --run-dir, which it refuses."""
    import filelock

    cfg = tiny(tmp_path, max_steps=2)
    if resume:
        train(cfg, progress=False, log=lambda *_: None)

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(filelock.FileLock, "acquire", denied)
    with pytest.raises(CheckpointError) as e:
        train(dataclasses.replace(cfg, max_steps=4), resume=resume, progress=False, log=lambda *_: None)
    assert str(e.value) == f"cannot write to run directory {tmp_path / 'run'}: Permission denied; {fix}"


def test_train_takes_a_trainconfig_and_paths_as_pathlib(tmp_path):
    """``train({...})`` was an AttributeError; ``TrainConfig(run_dir=Path(...))`` was refused as not a str."""
    with pytest.raises(ConfigError) as err:
        train({"max_steps": 1})
    assert str(err.value) == "train() needs a TrainConfig, got dict; build one with TrainConfig(**options)"
    text = tmp_path / "t.txt"
    text.write_text("the time machine " * 40)
    cfg = TrainConfig(corpus=[text], run_dir=tmp_path / "run", data_dir=tmp_path)
    assert (cfg.corpus, cfg.run_dir, cfg.data_dir) == ([str(text)], str(tmp_path / "run"), str(tmp_path))
    cfg.validate()
    assert dataclasses.replace(cfg, run_dir=tmp_path / "other").run_dir == str(tmp_path / "other")
