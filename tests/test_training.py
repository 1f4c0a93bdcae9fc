"""alignlib.training: optimizers, schedules, the example order, resume and the non-finite policy."""

import math
import warnings

import pytest
import torch

from alignlib.checkpoint import save_checkpoint
from alignlib.distributed import Processes
from alignlib.training import (
    MAX_SKIPPED_IN_A_ROW,
    NonFiniteGuard,
    Schedule,
    SeededSampler,
    checkpoint_to_resume,
    make_optimizer,
    make_scheduler,
    rank_batches,
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
# The step schedule, the non-finite policy, resume
# ----------------------------------------------------------------------------------------------


def test_rank_batches_give_every_rank_the_same_number_of_batches():
    two_ranks = [Processes(rank=r, world_size=2) for r in (0, 1)]
    # 5 examples over 2 ranks in batches of 2: rank 0 takes 0, 2, 4; rank 1 takes 1, 3 and pads with an empty batch
    assert rank_batches([10, 11, 12, 13, 14], 2, two_ranks[0]) == [[10, 12], [14]]
    assert rank_batches([10, 11, 12, 13, 14], 2, two_ranks[1]) == [[11, 13], []]
    assert rank_batches([10, 11, 12], 2) == [[10, 11], [12]]  # one process: plain batches


def test_schedule_depends_only_on_seed_and_step():
    schedule = Schedule(num_examples=7, pairs_per_step=3, micro_batch=2, seed=5)
    assert schedule.steps_per_epoch == 3
    first_epoch = [i for step in range(3) for i in schedule.step_indices(step)]
    assert sorted(first_epoch) == list(range(7))  # each example once per epoch; the last step is short
    assert len(schedule.step_indices(2)) == 1
    assert schedule.step_indices(4) == Schedule(7, 3, 2, seed=5).step_indices(4)
    assert sorted(schedule.step_indices(3) + schedule.step_indices(4) + schedule.step_indices(5)) == list(range(7))
    assert schedule.micro_batches(0) == [schedule.step_indices(0)[:2], schedule.step_indices(0)[2:]]


def test_nonfinite_guard_stops_or_skips(capsys):
    logged = []
    stop = NonFiniteGuard("stop", lambda record, step: logged.append((step, record)))
    assert stop.allows(1, 0.7, 1.0)
    with pytest.raises(FloatingPointError, match=r"step 2: the loss is nan and the gradient norm 1.0; stopping"):
        stop.allows(2, math.nan, 1.0)

    skip = NonFiniteGuard("skip", lambda record, step: logged.append((step, record)))
    assert not skip.allows(3, 0.7, math.inf)
    assert logged == [(3, {"skipped_nonfinite_step": 3})]
    assert "step 3: the loss is 0.7 and the gradient norm inf; update skipped" in capsys.readouterr().out
    assert skip.allows(4, 0.7, 1.0)  # a finite step resets the count
    for step in range(5, 5 + MAX_SKIPPED_IN_A_ROW - 1):
        assert not skip.allows(step, math.nan, math.nan, where=f"minibatch {step}")
    with pytest.raises(FloatingPointError, match=f"minibatch 12: .* {MAX_SKIPPED_IN_A_ROW} steps in a row"):
        skip.allows(12, math.nan, math.nan, where="minibatch 12")


def test_checkpoint_to_resume_has_one_meaning(tmp_path, capsys):
    assert checkpoint_to_resume(None, tmp_path) is None
    assert checkpoint_to_resume("false", tmp_path) is None
    # 'latest' with nothing to resume: a fresh start, said in one line
    assert checkpoint_to_resume("latest", tmp_path) is None
    assert "no complete checkpoint in" in capsys.readouterr().out
    model = torch.nn.Linear(2, 2)
    for step in (2, 4):
        save_checkpoint(tmp_path, step, model=model)
    assert checkpoint_to_resume("latest", tmp_path) == tmp_path / "checkpoint-4"
    assert checkpoint_to_resume("true", tmp_path) == tmp_path / "checkpoint-4"  # the older PPO spelling
    assert checkpoint_to_resume(True, tmp_path) == tmp_path / "checkpoint-4"  # YAML's `true`
    assert checkpoint_to_resume(str(tmp_path / "checkpoint-2"), tmp_path) == tmp_path / "checkpoint-2"
    with pytest.raises(FileNotFoundError, match="no checkpoint directory at .*checkpoint-9"):
        checkpoint_to_resume(str(tmp_path / "checkpoint-9"), tmp_path)
