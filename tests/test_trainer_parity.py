"""alignlib's pairwise trainer against TRL 1.16's own trainers: one batch, the same tiny model.

For each objective, the same preference rows go two ways:

- TRL: the real trainer (DPOTrainer, trl.experimental's ORPOTrainer and CPOTrainer,
  RewardTrainer) is built with its config, its own dataset processing and its own
  collator; `trainer.compute_loss(model, batch)` gives the loss, the trainer stores its
  metrics, and `loss.backward()` the gradient of every parameter.
- alignlib: `tokenize_preference_dataset` + `PreferenceCollator` + `pairwise_terms`, with
  the step loss built as `alignlib.trainer.train` builds it (the per-pair losses summed
  over the step's pairs, plus `nll_weight` times the chosen-token NLL over the step's
  chosen tokens); metrics are the trainer's sums divided by the pairs.

Both start from identical float64 weights (a seeded tiny Llama), and the policy differs from
the DPO reference, so rewards, margins and accuracies are not trivially zero. The batches
are checked to be token for token the same first, so any difference is the trainer's.

Tolerances: where TRL computes in float64 the comparison is at float64 round-off. TRL's
DPOTrainer takes its log-probs from its fused, chunked LM head, which runs the log-softmax
in float32 whatever the model's dtype (trl/kernels/chunked_logprob.py), and ORPO's
`odds_ratio_loss` casts with `.float()`, i.e. down to float32; those are compared at float32
round-off. The reward model is compared at float64 round-off.

Documented differences, tested as such: TRL's ORPOTrainer takes its NLL over the chosen
prompt *and* response (labels wherever the attention mask is 1), alignlib over the response
only (the paper's L_SFT; see alignlib/losses/orpo.py). The odds-ratio part is compared between
the trainers, and each NLL against a float64 cross-entropy with the matching labels.

TRL's configs default to bf16=True, which autocasts even on CPU; every TRL config here sets bf16=False.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from helpers.tiny_llama import tiny_llama
from helpers.tiny_tokenizer import tiny_tokenizer
from transformers import LlamaForSequenceClassification
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from alignlib.data import (
    PreferenceCollator,
    load_preference_dataset,
    pad_token_id_for,
    tokenize_preference_dataset,
)
from alignlib.losses import DPO_LOSS_TYPES
from alignlib.models import ReferenceForward
from alignlib.objectives import nll_weight, pairwise_terms
from alignlib.trainer import TrainConfig

# Prompts end on a token boundary and responses start with a space, so prompt and response
# tokenize apart (no merge across the boundary) in both libraries.
ROWS = [
    {"prompt": "What color is the sky?", "chosen": " The sky is blue.", "rejected": " The sky is green."},
    {"prompt": "Where is the sun?", "chosen": " It is in the sky.", "rejected": " In the sea."},
    {"prompt": "Hello world!", "chosen": " Hello!", "rejected": " What is the question? Answer: sorted(items)"},
    {"prompt": "def add(a, b):", "chosen": " return a + b", "rejected": " print(add(1, 2))"},
    {"prompt": "Question: how do I sort a list in Python?", "chosen": " Answer: use sorted(items).",
     "rejected": " The grass is green."},
]
MARGINS = [0.5, 0.0, 1.5, -0.25, 2.0]
DTYPE = torch.float64
# (rtol, atol) for values; gradients use rtol against the largest gradient entry of the parameter set.
FLOAT64_TOL = (1e-9, 1e-12)
FLOAT32_TOL = (2e-5, 1e-6)

DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


# ----------------------------------------------------------------------------------------------
# Models, data
# ----------------------------------------------------------------------------------------------


def _tiny_llama(tokenizer, **overrides) -> torch.nn.Module:
    """A float64 tiny Llama over `tokenizer`, seeded with 0 (helpers.tiny_llama)."""
    return tiny_llama(hidden=16, dtype=DTYPE, vocab_size=len(tokenizer), num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **overrides)


def _perturbed(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """A copy of `model` with seeded noise added to every weight: a policy that differs from its reference."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return other


@pytest.fixture(scope="module", autouse=True)
def _tiny_models_on_one_thread(one_thread):
    """The models are tiny (see conftest's one_thread)."""


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def causal_models(tokenizer) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(reference, policy): float64 tiny Llamas, the policy a seeded perturbation of the reference."""
    reference = _tiny_llama(tokenizer).eval()
    return reference, _perturbed(reference, seed=1)


@pytest.fixture(scope="module")
def reward_model(tokenizer) -> torch.nn.Module:
    model = _tiny_llama(tokenizer, model_class=LlamaForSequenceClassification, num_labels=1)
    return _perturbed(model, seed=2, scale=0.2)  # the score head starts near 0; make the scores spread


def _alignlib_batch(rows: list[dict], tokenizer, *, for_reward_model: bool = False) -> dict:
    pairs = load_preference_dataset(Dataset.from_list(rows))
    tokenized, stats = tokenize_preference_dataset(pairs, tokenizer, max_length=None, max_prompt_length=None)
    assert stats.pairs_kept == len(rows) and stats.boundary_merges == 0
    return PreferenceCollator(pad_token_id_for(tokenizer), for_reward_model=for_reward_model)(list(tokenized))


@pytest.fixture(scope="module")
def alignlib_batch(tokenizer) -> dict:
    return _alignlib_batch(ROWS, tokenizer)


# ----------------------------------------------------------------------------------------------
# One step through each library
# ----------------------------------------------------------------------------------------------


@dataclass
class Step:
    loss: torch.Tensor
    metrics: dict[str, float]
    grads: dict[str, torch.Tensor]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def trl_step(trainer, batch: dict, metrics: dict) -> Step:
    """TRL's compute_loss on `batch` in train mode, backward, and the metrics it stored for this batch."""
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return Step(loss.detach(), {key: float(values[-1]) for key, values in metrics.items()}, _grads(model))


def alignlib_step(objective: str, cfg: TrainConfig, model: torch.nn.Module, batch: dict, reference=None) -> Step:
    """One micro-batch that is the whole step, with the step loss as alignlib.trainer.train builds it."""
    model.train()
    model.zero_grad(set_to_none=True)
    terms = pairwise_terms(objective, cfg, model, batch, reference)
    loss = terms.loss_sum / terms.examples
    alpha = nll_weight(objective, cfg)
    metrics = {key: value / terms.examples for key, value in terms.metric_sums.items()}
    if alpha:
        nll = terms.nll_sum / max(terms.nll_tokens, 1)
        loss = loss + alpha * nll
        metrics["nll_loss"] = nll.item()
    loss.backward()
    return Step(loss.detach(), metrics, _grads(model))


def assert_close(ours: float | torch.Tensor, theirs: float | torch.Tensor, what: str, tol: tuple[float, float]):
    ours, theirs = torch.as_tensor(ours, dtype=DTYPE), torch.as_tensor(theirs, dtype=DTYPE)
    rtol, atol = tol
    error = (ours - theirs).abs().max().item()
    assert error <= atol + rtol * theirs.abs().max().item(), (
        f"{what}: {ours.tolist()} vs {theirs.tolist()} (|diff| {error:.3g})")


def assert_grads_match(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], tol: tuple[float, float]):
    """Every parameter's gradient, entry by entry, within rtol of the largest gradient entry (plus atol)."""
    assert ours.keys() == theirs.keys()
    rtol, atol = tol
    scale = max(g.abs().max().item() for g in theirs.values())
    assert scale > 0, "TRL's gradient is zero: nothing compared"
    worst = max(((ours[name] - theirs[name]).abs().max().item(), name) for name in theirs)
    assert worst[0] <= atol + rtol * scale, f"gradient of {worst[1]}: |diff| {worst[0]:.3g}, largest entry {scale:.3g}"


def assert_metrics_match(ours: dict, theirs: dict, names, tol):
    for name in names:
        assert name in ours and name in theirs, f"metric {name!r}: alignlib has {sorted(ours)}, TRL {sorted(theirs)}"
        # TRL turns accuracies to float32 (`.float()`) before averaging: 2/5 is stored as 0.4000000059604645.
        accuracy = name in ("rewards/accuracies", "accuracy")
        assert_close(ours[name], theirs[name], f"metric {name} (alignlib vs TRL)",
                     FLOAT32_TOL if accuracy else tol)


# ----------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------

# Loss types that need label smoothing (exo_pair needs it > 0); the others run without.
DPO_LABEL_SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}
DPO_CASES = [dict(loss_type=t, label_smoothing=DPO_LABEL_SMOOTHING.get(t, 0.0)) for t in DPO_LOSS_TYPES] + [
    dict(loss_type="sigmoid", f_divergence_type="forward_kl"),
    dict(loss_type="sigmoid", f_divergence_type="js_divergence"),
    dict(loss_type="hinge", f_divergence_type="alpha_divergence"),
    dict(loss_type="sigmoid", beta=0.5, rpo_alpha=0.7),  # RPO: TRL 1.16 spells it loss_type [sigmoid, sft]
    dict(loss_type="sigmoid", use_kernels=True),  # alignlib's fused lm_head + log-softmax path
]


def _case_id(case: dict) -> str:
    return ",".join(f"{v}" if k == "loss_type" else f"{k}={v}" for k, v in case.items() if v)


def _trl_dpo_config(case: dict, output_dir) -> DPOConfig:
    kwargs = dict(beta=case.get("beta", 0.1), label_smoothing=case.get("label_smoothing", 0.0),
                  f_divergence_type=case.get("f_divergence_type", "reverse_kl"))
    if case.get("rpo_alpha"):
        kwargs.update(loss_type=[case["loss_type"], "sft"], loss_weights=[1.0, case["rpo_alpha"]])
    else:
        kwargs.update(loss_type=case["loss_type"])
    return DPOConfig(output_dir=str(output_dir), report_to="none", use_cpu=True, bf16=False, max_length=None,
                     per_device_train_batch_size=len(ROWS), **kwargs)


def _alignlib_cfg(case: dict) -> TrainConfig:
    return TrainConfig(**{k: v for k, v in case.items() if k != "beta"}, beta=case.get("beta", 0.1))


def _same_dpo_batch(ours: dict, theirs: dict) -> None:
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == theirs["attention_mask"].tolist()
    assert (ours["labels"] != -100).tolist() == theirs["completion_mask"].bool().tolist()


@pytest.mark.parametrize("case", DPO_CASES, ids=[_case_id(c) for c in DPO_CASES])
def test_dpo_trainer_matches_trl(case, causal_models, alignlib_batch, tokenizer, tmp_path):
    reference, policy = causal_models
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                         args=_trl_dpo_config(case, tmp_path), train_dataset=Dataset.from_list(ROWS),
                         processing_class=copy.deepcopy(tokenizer))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    _same_dpo_batch(alignlib_batch, batch)
    theirs = trl_step(trainer, batch, trainer._metrics["train"])

    model = copy.deepcopy(policy)
    ours = alignlib_step("dpo", _alignlib_cfg(case), model, alignlib_batch,
                         ReferenceForward("model", copy.deepcopy(reference), disable_adapter=False))

    assert_close(ours.loss, theirs.loss, "loss", FLOAT32_TOL)
    assert_metrics_match(ours.metrics, theirs.metrics, DPO_METRICS, FLOAT32_TOL)
    assert_grads_match(ours.grads, theirs.grads, FLOAT32_TOL)


# ----------------------------------------------------------------------------------------------
# ORPO and CPO / SimPO (trl.experimental): the older trainers with their own tokenize_row
# ----------------------------------------------------------------------------------------------


def _same_concatenated_batch(trainer, ours: dict, theirs: dict, pad_token_id: int) -> None:
    concatenated = trainer.concatenated_inputs(theirs, padding_value=pad_token_id)
    assert ours["input_ids"].tolist() == concatenated["concatenated_input_ids"].tolist()
    assert ours["attention_mask"].tolist() == concatenated["concatenated_attention_mask"].tolist()
    assert ours["labels"].tolist() == concatenated["concatenated_labels"].tolist()


def _experimental_trainer(trainer_cls, config_cls, model, tokenizer, output_dir, **config):
    args = config_cls(output_dir=str(output_dir), report_to="none", use_cpu=True, bf16=False, max_length=128,
                      per_device_train_batch_size=len(ROWS), **config)
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(ROWS),
                          processing_class=copy.deepcopy(tokenizer))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    return trainer, batch


def _chosen_nll(model: torch.nn.Module, batch: dict, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The mean token cross-entropy of `labels` on the chosen rows, in the model's float64, and its gradient.

    (Not the Hugging Face model's own `.loss`: transformers upcasts the logits to float32 there.)
    """
    model.zero_grad(set_to_none=True)
    pairs = batch["input_ids"].shape[0] // 2
    logits = model(input_ids=batch["input_ids"][:pairs], attention_mask=batch["attention_mask"][:pairs]).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:pairs, 1:].flatten(), ignore_index=-100)
    loss.backward()
    return loss.detach(), _grads(model)


def test_orpo_trainer_matches_trl(causal_models, alignlib_batch, tokenizer, tmp_path):
    """ORPO = NLL + odds-ratio term. The odds-ratio part matches TRL to round-off; the NLL differs by design.

    TRL's ORPOTrainer takes its NLL over the chosen prompt and response (labels = input ids where the
    attention mask is 1); alignlib over the response only, the paper's L_SFT (alignlib/losses/orpo.py,
    docs/losses.md). Each NLL is checked against a float64 cross-entropy with those labels, and
    the rest of the loss and gradient (the odds-ratio term) is compared between the trainers.
    """
    _, policy = causal_models
    beta = 0.25
    trainer, batch = _experimental_trainer(ORPOTrainer, ORPOConfig, copy.deepcopy(policy), tokenizer, tmp_path,
                                           beta=beta)
    _same_concatenated_batch(trainer, alignlib_batch, batch, tokenizer.pad_token_id)
    theirs = trl_step(trainer, batch, trainer._stored_metrics["train"])
    ours = alignlib_step("orpo", TrainConfig(beta=beta), copy.deepcopy(policy), alignlib_batch)

    whole_sequence = alignlib_batch["input_ids"].masked_fill(alignlib_batch["attention_mask"] == 0, -100)
    nll_full, grads_full = _chosen_nll(copy.deepcopy(policy), alignlib_batch, whole_sequence)
    nll_response, grads_response = _chosen_nll(copy.deepcopy(policy), alignlib_batch, alignlib_batch["labels"])
    assert abs(nll_full - nll_response) > 1e-3  # the two conventions really differ on these rows

    assert_close(theirs.metrics["nll_loss"], nll_full, "TRL's NLL vs the prompt+response NLL", FLOAT64_TOL)
    assert_close(ours.metrics["nll_loss"], nll_response, "alignlib's NLL vs the response-only NLL", FLOAT64_TOL)
    assert_close(ours.loss - nll_response, theirs.loss - nll_full, "odds-ratio part of the loss", FLOAT32_TOL)
    assert_grads_match({name: g - grads_response[name] for name, g in ours.grads.items()},
                       {name: g - grads_full[name] for name, g in theirs.grads.items()}, FLOAT32_TOL)
    # TRL casts to float32 in odds_ratio_loss: rewards and log-odds are float32, the log-probs float64.
    assert_metrics_match(ours.metrics, theirs.metrics, ("logps/chosen", "logps/rejected"), FLOAT64_TOL)
    assert_metrics_match(ours.metrics, theirs.metrics, ("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                                        "rewards/margins", "log_odds_ratio", "log_odds_chosen"),
                         FLOAT32_TOL)


# (alignlib objective, TrainConfig fields) -> CPOTrainer's config. SimPO is CPO's "simpo" type without the NLL.
CPO_CASES = [
    ("cpo", dict(loss_type="sigmoid", beta=0.1)),
    ("cpo", dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.1, cpo_alpha=0.5)),
    ("cpo", dict(loss_type="hinge", beta=0.3)),
    ("cpo", dict(loss_type="ipo", beta=0.5)),
    ("cpo", dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5)),
    ("simpo", dict(beta=2.0, simpo_gamma=0.7)),
    ("simpo", dict(beta=2.5, simpo_gamma=0.5, label_smoothing=0.2)),
]


def _trl_cpo_config(objective: str, fields: dict) -> dict:
    config = {"loss_type": "simpo", "cpo_alpha": 0.0} if objective == "simpo" else {"cpo_alpha": 1.0}
    return {**config, **fields}


@pytest.mark.parametrize(("objective", "fields"), CPO_CASES,
                         ids=[f"{o}:" + ",".join(f"{k}={v}" for k, v in f.items()) for o, f in CPO_CASES])
def test_cpo_and_simpo_trainers_match_trl(objective, fields, causal_models, alignlib_batch, tokenizer, tmp_path):
    _, policy = causal_models
    trainer, batch = _experimental_trainer(CPOTrainer, CPOConfig, copy.deepcopy(policy), tokenizer, tmp_path,
                                           **_trl_cpo_config(objective, fields))
    _same_concatenated_batch(trainer, alignlib_batch, batch, tokenizer.pad_token_id)
    theirs = trl_step(trainer, batch, trainer._stored_metrics["train"])
    ours = alignlib_step(objective, TrainConfig(**fields), copy.deepcopy(policy), alignlib_batch)

    # CPOTrainer computes in the model's dtype throughout: float64 round-off.
    assert_close(ours.loss, theirs.loss, "loss", FLOAT64_TOL)
    assert_metrics_match(ours.metrics, theirs.metrics, DPO_METRICS, FLOAT64_TOL)
    if objective == "cpo":
        assert_metrics_match(ours.metrics, theirs.metrics, ("nll_loss",), FLOAT64_TOL)
    assert_grads_match(ours.grads, theirs.grads, FLOAT64_TOL)


# ----------------------------------------------------------------------------------------------
# Reward model
# ----------------------------------------------------------------------------------------------

REWARD_CASES = [dict(), dict(margin=True), dict(center_rewards_coefficient=0.05), dict(margin=True,
                center_rewards_coefficient=0.01)]


@pytest.mark.parametrize("case", REWARD_CASES,
                         ids=[",".join(f"{k}={v}" for k, v in c.items()) or "plain" for c in REWARD_CASES])
def test_reward_trainer_matches_trl(case, reward_model, tokenizer, tmp_path):
    rows = [{**row, "margin": m} for row, m in zip(ROWS, MARGINS, strict=True)] if case.get("margin") else ROWS
    center = case.get("center_rewards_coefficient")
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                        per_device_train_batch_size=len(rows), center_rewards_coefficient=center)
    trainer = RewardTrainer(model=copy.deepcopy(reward_model), args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=copy.deepcopy(tokenizer))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    ours_batch = _alignlib_batch(rows, tokenizer, for_reward_model=True)
    assert ours_batch["input_ids"].tolist() == batch["input_ids"].tolist()
    assert ours_batch["attention_mask"].tolist() == batch["attention_mask"].tolist()
    assert ("margin" in ours_batch) == ("margin" in batch) == bool(case.get("margin"))

    theirs = trl_step(trainer, batch, trainer._metrics["train"])
    ours = alignlib_step("reward", TrainConfig(center_rewards_coefficient=center), copy.deepcopy(reward_model),
                         ours_batch)
    assert_close(ours.loss, theirs.loss, "loss", FLOAT64_TOL)
    assert_metrics_match(ours.metrics, theirs.metrics, ("accuracy", "margin", "mean_reward"), FLOAT64_TOL)
    assert_grads_match(ours.grads, theirs.grads, FLOAT64_TOL)
