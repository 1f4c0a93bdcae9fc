"""alignlib.checkpoint: atomic checkpoints and bitwise resume; partial, corrupt and rotated ones; failing disks."""

import errno
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import torch
from helpers.tiny_llama import tiny_llama

from alignlib.checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint, validate_checkpoint
from alignlib.models import ModelConfig, load_causal_lm
from alignlib.training import SeededSampler, make_optimizer, make_scheduler, set_seed

# ----------------------------------------------------------------------------------------------
# Checkpoints: bitwise resume
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dropout_llama_dir(tmp_path_factory):
    """A tiny Llama whose attention has dropout, so a training step draws from torch's RNG."""
    path = tmp_path_factory.mktemp("llama")
    tiny_llama(vocab_size=64, max_position_embeddings=32, pad_token_id=None, attention_dropout=0.2,
               attn_implementation="eager").save_pretrained(path)
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
        import alignlib.checkpoint as checkpoint

        def die(*args, **kwargs):  # every file is written; the process dies before the rename
            os.kill(os.getpid(), signal.SIGKILL)

        checkpoint._fsync_tree = die
        model = torch.nn.Linear(4, 4)
        checkpoint.save_checkpoint({str(tmp_path)!r}, 2, model=model,
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
