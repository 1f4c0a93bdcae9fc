"""alignlib.training: optimizers, schedules, atomic checkpoints and bitwise resume, metrics."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignlib.models import ModelConfig, load_causal_lm
from alignlib.training import (
    MetricsLogger,
    Progress,
    SeededSampler,
    Throughput,
    find_latest_checkpoint,
    is_main_process,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    read_metrics,
    save_checkpoint,
    set_seed,
    validate_checkpoint,
)

# ----------------------------------------------------------------------------------------------
# Optimizer and scheduler
# ----------------------------------------------------------------------------------------------


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_optimizer_groups_skip_weight_decay_on_biases_and_norms():
    block = Block()
    optimizer = make_optimizer(block, "adamw_torch", lr=1e-3, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert [p is block.linear.weight for p in decay["params"]] == [True] and decay["weight_decay"] == 0.1
    assert {id(p) for p in no_decay["params"]} == {id(block.linear.bias), id(block.norm.weight), id(block.norm.bias)}
    assert no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.8, 0.9) and decay["eps"] == 1e-6 and decay["lr"] == 1e-3
    # explicit parameters are used as given
    plain = make_optimizer([block.linear.weight], "adamw_torch", lr=1e-3, weight_decay=0.1)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_8bit_adamw_runs_on_cpu_with_8bit_state(name):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 128, bias=False)  # 8192 weights: above bitsandbytes' 4096 cut-off for 8-bit state
    target = torch.randn(16, 128)
    inputs = torch.randn(16, 64)
    optimizer = make_optimizer(layer, name, lr=1e-2)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # paged optimizers warn that paging is off on CPU
        for _ in range(20):
            loss = torch.nn.functional.mse_loss(layer(inputs), target)
            losses.append(loss.item())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    state = optimizer.state[layer.weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "sgd_fancy"}, "unknown optimizer 'sgd_fancy'.*adamw_torch"),
        ({"lr": 0.0}, "learning rate"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"betas": (0.9, 1.0)}, "betas"),
    ],
)
def test_optimizer_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer(Block(), **kwargs)


def test_optimizer_without_trainable_parameters_errors():
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(torch.nn.Linear(2, 2).requires_grad_(False))


def test_linear_schedule_with_warmup_steps_and_ratio():
    def lrs(**kwargs):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make_scheduler(optimizer, "linear", num_training_steps=10, **kwargs)
        seen = []
        for _ in range(10):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    # warm-up 2: 0, 1/2, then linear decay from 1 at step 2 to 0 at step 10
    assert lrs(num_warmup_steps=2) == pytest.approx([0, 0.5] + [(10 - s) / 8 for s in range(2, 10)])
    # ratio 0.25 of 10 steps: ceil(2.5) = 3 warm-up steps
    assert lrs(warmup_ratio=0.25) == pytest.approx([0, 1 / 3, 2 / 3] + [(10 - s) / 7 for s in range(3, 10)])
    assert lrs() == pytest.approx([(10 - s) / 10 for s in range(10)])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "wobbly"}, "unknown lr scheduler 'wobbly'.*cosine"),
        ({"num_training_steps": 0}, "num_training_steps"),
        ({"num_warmup_steps": 1, "warmup_ratio": 0.1}, "not both"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"num_warmup_steps": 11}, "num_warmup_steps"),
    ],
)
def test_scheduler_errors(kwargs, message):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    settings = {"name": "linear", "num_training_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_scheduler(optimizer, **settings)


def test_seeded_sampler_order_depends_only_on_seed_and_epoch():
    sampler = SeededSampler(10, seed=3)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not drawn from
    assert sorted(epoch0) == list(range(10)) and epoch0 != epoch1
    again = SeededSampler(10, seed=3)
    again.set_epoch(1, skip=4)
    assert list(again) == epoch1[4:] and len(again) == 6
    assert list(SeededSampler(4, shuffle=False)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="skip"):
        again.set_epoch(0, skip=11)


# ----------------------------------------------------------------------------------------------
# Checkpoints: bitwise resume
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dropout_llama_dir(tmp_path_factory):
    """A tiny Llama whose attention has dropout, so a training step draws from torch's RNG."""
    path = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, attention_dropout=0.2,
                         attn_implementation="eager")
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


DATA = torch.randint(0, 64, (8, 6), generator=torch.Generator().manual_seed(42))
BATCH = 2
BATCHES_PER_EPOCH = len(DATA) // BATCH


def build(model_dir, use_peft):
    """Model, optimizer and scheduler, built the same way for the first run and for the resume."""
    set_seed(1)  # LoRA initialisation draws from torch's RNG
    cfg = ModelConfig(model_name_or_path=model_dir, use_peft=use_peft,
                      **({"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1} if use_peft else {}))
    model = load_causal_lm(cfg)
    model.train()
    optimizer = make_optimizer(model, "adamw_torch", lr=1e-2, weight_decay=0.01)
    scheduler = make_scheduler(optimizer, "linear", num_training_steps=6, num_warmup_steps=2)
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, steps, start_step=0, checkpoint=None):
    """Steps start_step+1 .. steps over DATA in SeededSampler order; python, numpy and torch
    RNGs all shape the loss. Saves a checkpoint after step `checkpoint` (output_dir, step)."""
    sampler = SeededSampler(len(DATA), seed=7)
    losses = []
    for step in range(start_step + 1, steps + 1):
        epoch, batch_in_epoch = divmod(step - 1, BATCHES_PER_EPOCH)
        sampler.set_epoch(epoch, skip=batch_in_epoch * BATCH)
        rows = list(sampler)[:BATCH]
        ids = DATA[rows]
        out = model(input_ids=ids, labels=ids)
        noise = random.random() + float(np.random.rand()) + torch.rand(()).item()
        loss = out.loss * (1 + 0.01 * noise)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if checkpoint is not None and step == checkpoint[1]:
            epoch_after, seen_after = divmod(step, BATCHES_PER_EPOCH)
            save_checkpoint(checkpoint[0], step, model=model, optimizer=optimizer, scheduler=scheduler,
                            epoch=step / BATCHES_PER_EPOCH,
                            data_state={"epoch": epoch_after, "batches_seen": seen_after, "seed": 7},
                            metadata={"run": "test"})
    return losses


@pytest.mark.parametrize("use_peft", [True, False], ids=["lora", "full"])
def test_resume_is_bitwise_identical(dropout_llama_dir, tmp_path, use_peft):
    model, optimizer, scheduler = build(dropout_llama_dir, use_peft)
    set_seed(123)
    uninterrupted = train(model, optimizer, scheduler, 6, checkpoint=(tmp_path, 3))
    final = {n: p.detach().clone() for n, p in model.named_parameters()}

    resumed_model, resumed_optimizer, resumed_scheduler = build(dropout_llama_dir, use_peft)
    set_seed(999)  # whatever the seed now, the checkpoint's RNG states take over
    path = find_latest_checkpoint(tmp_path)
    assert path == tmp_path / "checkpoint-3"
    state = load_checkpoint(path, resumed_model, resumed_optimizer, resumed_scheduler)
    assert state["step"] == 3 and state["data_state"] == {"epoch": 0, "batches_seen": 3, "seed": 7}
    assert state["metadata"] == {"run": "test"} and state["epoch"] == 0.75
    resumed = train(resumed_model, resumed_optimizer, resumed_scheduler, 6, start_step=3)

    assert resumed == uninterrupted[3:]
    for name, param in resumed_model.named_parameters():
        assert torch.equal(param, final[name]), name
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()

    saved = torch.load(path / "model.pt", weights_only=True)
    if use_peft:  # only the adapters are in a LoRA checkpoint
        assert saved and all("lora_" in key for key in saved)
    else:
        assert set(saved) == set(model.state_dict())


def test_checkpoint_for_another_model_is_refused(dropout_llama_dir, tmp_path):
    model, _, _ = build(dropout_llama_dir, use_peft=True)
    save_checkpoint(tmp_path, 1, model=model)
    full, _, _ = build(dropout_llama_dir, use_peft=False)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_checkpoint(tmp_path / "checkpoint-1", full)
    with pytest.raises(ValueError, match="has no optimizer.pt"):
        load_checkpoint(tmp_path / "checkpoint-1", model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "checkpoint-2", model)


# ----------------------------------------------------------------------------------------------
# Checkpoints: partial, corrupt, rotation, failing disks
# ----------------------------------------------------------------------------------------------


def small_state(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_corrupt_or_partial_checkpoints_are_never_loaded(tmp_path):
    for step in (1, 2, 3):
        model, optimizer = small_state(step)
        save_checkpoint(tmp_path, step, model=model, optimizer=optimizer)
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-3"
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"

    # a crashed save of step 4 left its temporary directory: not a candidate
    (tmp_path / ".checkpoint-4.tmp-abc").mkdir()
    (tmp_path / ".checkpoint-4.tmp-abc" / "model.pt").write_bytes(b"half")
    # step 3 damaged after the fact: a truncated file
    model_file = tmp_path / "checkpoint-3" / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:-10])
    # step 5 complete-looking but without its manifest (the save died before writing it)
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "model.pt").write_bytes(b"x")

    with pytest.warns(UserWarning, match="skipping checkpoint") as caught:
        assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    reasons = " ".join(str(w.message) for w in caught)
    assert "checkpoint-5: no manifest.json" in reasons and "checkpoint-3: model.pt has" in reasons

    # same size, different bytes: only the hash notices
    optimizer_file = tmp_path / "checkpoint-2" / "optimizer.pt"
    data = bytearray(optimizer_file.read_bytes())
    data[-1] ^= 0xFF
    optimizer_file.write_bytes(bytes(data))
    assert "sha256" in validate_checkpoint(tmp_path / "checkpoint-2")
    assert validate_checkpoint(tmp_path / "checkpoint-2", verify_hashes=False) is None
    with pytest.raises(ValueError, match="incomplete or corrupt.*sha256"):
        load_checkpoint(tmp_path / "checkpoint-2", torch.nn.Linear(4, 4))
    with pytest.warns(UserWarning):
        assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path):
    model, optimizer = small_state(0)
    save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer)
    script = textwrap.dedent(f"""
        import os, signal, torch
        import alignlib.training as training

        def die(*args, **kwargs):  # every file is written; the process dies before the rename
            os.kill(os.getpid(), signal.SIGKILL)

        training._fsync_tree = die
        model = torch.nn.Linear(4, 4)
        training.save_checkpoint({str(tmp_path)!r}, 2, model=model,
                                 optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".checkpoint-2.tmp-")]
    assert len(leftovers) == 1 and (tmp_path / leftovers[0] / "manifest.json").exists()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-1"
    restored = torch.nn.Linear(4, 4)
    load_checkpoint(tmp_path / "checkpoint-1", restored)
    assert torch.equal(restored.weight, model.weight)
    # the next save with rotation clears the litter
    save_checkpoint(tmp_path, 3, model=model, save_total_limit=5)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_save_total_limit_keeps_the_newest(tmp_path):
    model, optimizer = small_state(0)
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model=model, optimizer=optimizer, save_total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-30", "checkpoint-40", "latest"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-40"
    # saving the same step again replaces it in one piece
    save_checkpoint(tmp_path, 40, model=model, optimizer=optimizer, metadata={"again": True})
    assert load_checkpoint(tmp_path / "checkpoint-40", restore_rng=False)["metadata"] == {"again": True}


def directory_snapshot(root):
    return {
        os.path.relpath(os.path.join(dirpath, name), root): open(os.path.join(dirpath, name), "rb").read()
        for dirpath, _, names in os.walk(root) for name in names
    }


def test_read_only_output_dir_gives_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = small_state(0)
    save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer)
    before = directory_snapshot(tmp_path)
    tmp_path.chmod(0o500)
    try:
        try:  # root ignores directory permissions: then simulate what the kernel would say
            probe = tempfile.mkdtemp(dir=tmp_path)
            os.rmdir(probe)

            def refuse(*args, **kwargs):
                raise PermissionError(errno.EACCES, "Permission denied")

            monkeypatch.setattr(tempfile, "mkdtemp", refuse)
        except PermissionError:
            pass
        with pytest.raises(OSError, match=rf"could not save checkpoint checkpoint-2 in {tmp_path}") as info:
            save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer)
        assert info.value.errno == errno.EACCES
    finally:
        tmp_path.chmod(0o700)
    assert directory_snapshot(tmp_path) == before
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"


def test_disk_full_during_a_save_cleans_up_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = small_state(0)
    save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer)
    before = directory_snapshot(tmp_path)
    real_save = torch.save

    def fill_disk(obj, handle, *args, **kwargs):  # save_checkpoint gives torch.save an open file
        if handle.name.endswith("optimizer.pt"):  # model.pt is written, then the disk is full
            handle.write(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fill_disk)
    with pytest.raises(OSError, match=rf"checkpoint-2 in {tmp_path}: No space left on device") as info:
        save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer)
    assert info.value.errno == errno.ENOSPC
    assert directory_snapshot(tmp_path) == before  # no checkpoint-2, no temp dir, latest unchanged
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"


def test_save_checkpoint_errors(tmp_path):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="step must be"):
        save_checkpoint(tmp_path, -1, model=model)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, 1, model=model, metadata={"tensor": torch.zeros(1)})
    with pytest.raises(ValueError, match="save_total_limit"):
        save_checkpoint(tmp_path, 1, model=model, save_total_limit=0)
    assert list(tmp_path.iterdir()) == []
    assert find_latest_checkpoint(tmp_path / "nothing") is None


# ----------------------------------------------------------------------------------------------
# Metrics, progress, helpers
# ----------------------------------------------------------------------------------------------


def test_metrics_are_trimmed_on_resume(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 6):
            logger.log({"loss": torch.tensor(1.0 / step), "rewards/accuracies": np.float32(0.5)},
                       step=step, epoch=step / 5)
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "loss": 0.1')  # torn by a crash
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[1] == {"step": 2, "epoch": 0.4, "loss": 0.5, "rewards/accuracies": 0.5}

    with MetricsLogger(tmp_path, resume_step=3) as logger:
        assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        for step in (4, 5):
            logger.log({"loss": 0.0}, step=step)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert json.loads(lines[3])["loss"] == 0.0

    MetricsLogger(tmp_path).close()  # a fresh run starts an empty file
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_metrics_plot(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 4):
        logger.log({"loss": 1.0 / step}, step=step)
    try:
        import matplotlib  # noqa: F401 - not a core dependency
    except ImportError:
        with pytest.warns(UserWarning, match="matplotlib is not installed"):
            assert logger.plot(tmp_path / "curves.png") is None
        assert not (tmp_path / "curves.png").exists()
    else:
        assert logger.plot(tmp_path / "curves.png") == tmp_path / "curves.png"
        assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logger.close()


def test_progress_shows_the_latest_metrics():
    with Progress(total=4, initial=1, desc="dpo") as progress:
        progress.update(loss=torch.tensor(0.693147), acc=0.75)
        progress.update()
        assert progress.bar.n == 3
        assert "loss=0.6931" in progress.bar.postfix and "acc=0.75" in progress.bar.postfix


def test_throughput_and_main_process():
    meter = Throughput()
    meter.add(100)
    meter.add(torch.tensor(28))
    assert meter.tokens == 128 and meter.rate() > 0
    meter.reset()
    assert meter.tokens == 0
    assert is_main_process()
