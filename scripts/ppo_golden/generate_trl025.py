"""Golden values from TRL 0.25.1's PPOTrainer, for alignlib's PPO tests.

Later TRL releases (0.12 to 0.25) ship a different PPOTrainer. Two of its pieces
have no function of their own: the KL estimators (args.kl_estimator "k1" or "k3")
and missing_eos_penalty are written inline in PPOTrainer.train(), between the
rollout and the PPO epochs, so they cannot be called on fixed inputs the way
generate_trl011.py calls the classic trainer's methods. This script therefore
runs a real PPOTrainer(...).train() on tiny models built from configs (a Llama
policy and reference policy, Llama reward and value models, a word-level
tokenizer over 24 tokens, 8 prompts, 8-token responses, all on CPU, no download),
and a trace function on the train() frame copies its local variables as the
lines run:

  - before the penalty line: scores_before_penalty, contain_eos_token
  - after it: scores (the penalty subtracted where a response has no EOS)
  - before the KL line: logprobs and ref_logprobs (INVALID_LOGPROB already
    written on padding), padding_mask, padding_mask_p1, sequence_lengths,
    responses and postprocessed_responses
  - after the score is added (before the optional whitening): kl,
    non_score_reward, rewards
  - before the GAE result is whitened: advantages_unwhitened
  - before the PPO epochs: values, advantages, returns; training then stops
    (a private exception, raised from the trace function, is caught here), so
    no optimizer step ever runs.

The anchors are found by their source text, not by line number; the JSON records
the line numbers they had. There are two runs, kl_estimator="k1" and "k3", on the
same seed, so both see the same responses and log-probabilities. The policy's
output layer gets a bias that keeps <pad> out of the samples (a sampled <pad>
would read as the end of a response) and makes <eos> likely enough that the batch
holds responses both with and without EOS, with EOS as the first and as the
last response token among them; the script checks that mix.

Run it through make_golden.sh (it builds the pinned virtual environment, with
trl==0.25.1 and torch==2.13.0, and calls `python generate_trl025.py OUT.json`
from scripts/ppo_golden):

    bash scripts/ppo_golden/make_golden.sh

Do not import alignlib here: the golden file must come from TRL alone.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from types import FrameType
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    PreTrainedTokenizerFast,
)
from trl import PPOConfig, PPOTrainer  # noqa: E402

assert trl.__version__ == "0.25.1", trl.__version__

SEED = 1
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
WORDS = [PAD, EOS, UNK] + [chr(c) for c in range(ord("a"), ord("u") + 1)]  # 24 tokens, <pad> = 0, <eos> = 1
PROMPTS = ["a b c d", "e f g h", "i j k l", "m n o p", "q r s t", "u a e i", "b d f h", "c g k o"]
RESPONSE_LENGTH = 8

# Source text that marks each capture point in PPOTrainer.train; a 'line' event fires before its line runs.
ANCHORS = {
    "penalty": "scores[~contain_eos_token] -= self.args.missing_eos_penalty",
    "after_penalty": "response_idxs = torch.arange(",
    "kl": 'kl = -logr if args.kl_estimator == "k1" else',
    "after_score": "if args.whiten_rewards:",
    "whiten_advantages": "advantages = masked_whiten(advantages, ~padding_mask)",
    "ppo_epochs": "for ppo_epoch_idx in range(args.num_ppo_epochs):",
}


class _StopTraining(Exception):
    """Raised inside train() once everything is captured, before any optimizer step."""


def anchor_lines() -> dict[str, int]:
    """Line number (in ppo_trainer.py) of the one line of PPOTrainer.train containing each anchor."""
    source, first = inspect.getsourcelines(PPOTrainer.train)
    lines = {}
    for name, text in ANCHORS.items():
        hits = [first + i for i, line in enumerate(source) if text in line]
        assert len(hits) == 1, (name, hits)
        lines[name] = hits[0]
    return lines


def as_list(x: torch.Tensor) -> list:
    x = x.detach().cpu()
    if x.dtype == torch.bool:
        return x.tolist()
    if x.dtype.is_floating_point:
        return x.double().tolist()
    return x.long().tolist()


def make_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def make_models(tokenizer: PreTrainedTokenizerFast) -> dict[str, torch.nn.Module]:
    """Tiny random Llamas: policy, reference policy (different weights), reward and value models."""
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,  # next-token distributions far enough from uniform for KL terms of ~1
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    policy = AutoModelForCausalLM.from_config(config)
    ref_policy = AutoModelForCausalLM.from_config(config)
    head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(policy.lm_head.weight)
        head.bias.zero_()
        head.bias[[tokenizer.pad_token_id, tokenizer.unk_token_id]] = -30.0  # never sampled
        head.bias[tokenizer.eos_token_id] = 0.5  # some responses stop early, some run to the end
    policy.lm_head = head
    score_config = LlamaConfig(**{**config.to_dict(), "num_labels": 1})
    reward_model = AutoModelForSequenceClassification.from_config(score_config)
    value_model = AutoModelForSequenceClassification.from_config(score_config)
    return {
        "model": policy,
        "ref_model": ref_policy,
        "reward_model": reward_model,
        "value_model": value_model,
    }


def run(kl_estimator: str, lines: dict[str, int]) -> dict[str, Any]:
    """One PPOTrainer.train() call, stopped before the PPO epochs; returns what the trace copied."""
    tokenizer = make_tokenizer()
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert all(len(p) == len(prompts[0]) and tokenizer.unk_token_id not in p for p in prompts), prompts
    dataset = Dataset.from_dict({"input_ids": prompts})
    captured: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as output_dir:
        args = PPOConfig(
            output_dir=output_dir,
            report_to=[],
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            seed=SEED,
            per_device_train_batch_size=len(PROMPTS),
            gradient_accumulation_steps=1,
            num_mini_batches=1,
            num_ppo_epochs=1,
            total_episodes=len(PROMPTS),
            num_sample_generations=0,
            response_length=RESPONSE_LENGTH,
            stop_token="eos",
            missing_eos_penalty=1.0,
            kl_coef=0.05,
            kl_estimator=kl_estimator,
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
        )
        trainer = PPOTrainer(
            args=args, processing_class=tokenizer, train_dataset=dataset, **make_models(tokenizer)
        )

        def on_line(frame: FrameType) -> None:
            where = frame.f_lineno
            local = frame.f_locals

            def copy(*names: str, prefix: str = "") -> None:
                for name in names:
                    captured[prefix + name] = local[name].clone()

            if where == lines["penalty"]:
                copy("contain_eos_token")
                copy("scores", prefix="before_penalty:")
            elif where == lines["after_penalty"]:
                copy("scores")
            elif where == lines["kl"]:
                copy("logprobs", "ref_logprobs", "padding_mask", "padding_mask_p1", "sequence_lengths")
                copy("responses", "postprocessed_responses")
                captured["context_length"] = local["context_length"]
                captured["invalid_logprob"] = frame.f_globals["INVALID_LOGPROB"]
            elif where == lines["after_score"]:
                copy("kl", "non_score_reward", "rewards")
            elif where == lines["whiten_advantages"]:
                copy("advantages", prefix="unwhitened:")
            elif where == lines["ppo_epochs"]:
                copy("values", "advantages", "returns")
                raise _StopTraining

        def local_trace(frame: FrameType, event: str, arg: object) -> Callable | None:
            if event == "line":
                on_line(frame)
            return local_trace

        def global_trace(frame: FrameType, event: str, arg: object) -> Callable | None:
            return local_trace if frame.f_code is PPOTrainer.train.__code__ else None

        sys.settrace(global_trace)
        try:
            trainer.train()
        except _StopTraining:
            pass
        finally:
            sys.settrace(None)
        assert "values" in captured, "train() never reached the PPO epochs"

    contain_eos = captured["contain_eos_token"]
    assert 0 < int(contain_eos.sum()) < len(contain_eos), (
        f"need responses with and without EOS: {contain_eos}"
    )
    assert captured["responses"].shape[1] == RESPONSE_LENGTH
    # The edge cases of where the score lands: EOS as the first response token, and EOS as the last one
    # (sequence_lengths + 1 is then past the end, so TRL adds the score at sequence_lengths instead).
    eos_at = captured["sequence_lengths"][contain_eos].tolist()
    assert 0 in eos_at and RESPONSE_LENGTH - 1 in eos_at, eos_at
    return {
        "kl_estimator": args.kl_estimator,
        "kl_coef": args.kl_coef,
        "gamma": args.gamma,
        "lam": args.lam,
        "whiten_rewards": args.whiten_rewards,
        "missing_eos_penalty": args.missing_eos_penalty,
        "temperature": args.temperature,
        "response_length": args.response_length,
        "invalid_logprob": captured["invalid_logprob"],
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "context_length": captured["context_length"],
        "responses": as_list(captured["responses"]),
        "postprocessed_responses": as_list(captured["postprocessed_responses"]),
        "contain_eos_token": as_list(contain_eos),
        "scores_before_penalty": as_list(captured["before_penalty:scores"]),
        "scores": as_list(captured["scores"]),
        "sequence_lengths": as_list(captured["sequence_lengths"]),
        "padding_mask": as_list(captured["padding_mask"]),
        "padding_mask_p1": as_list(captured["padding_mask_p1"]),
        "logprobs": as_list(captured["logprobs"]),
        "ref_logprobs": as_list(captured["ref_logprobs"]),
        "kl": as_list(captured["kl"]),
        "non_score_reward": as_list(captured["non_score_reward"]),
        "rewards": as_list(captured["rewards"]),
        "values": as_list(captured["values"]),
        "advantages_unwhitened": as_list(captured["unwhitened:advantages"]),
        "advantages": as_list(captured["advantages"]),
        "returns": as_list(captured["returns"]),
    }


def main(out_path: str) -> None:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    lines = anchor_lines()
    golden = {
        "generator": "scripts/ppo_golden/generate_trl025.py",
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "trl_train_lines": {"file": inspect.getsourcefile(PPOTrainer).split("site-packages/")[-1], **lines},
        "runs": [run("k1", lines), run("k3", lines)],
    }
    with open(out_path, "w") as f:
        json.dump(golden, f, indent=1)
    eos = golden["runs"][0]["contain_eos_token"]
    print(f"wrote {out_path} ({sum(eos)} of {len(eos)} responses contain EOS)")


if __name__ == "__main__":
    main(sys.argv[1])
