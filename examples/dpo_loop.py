import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignlib.logprobs import sequence_logprobs
from alignlib.losses import dpo_loss

torch.manual_seed(0)
policy = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
reference = copy.deepcopy(policy).eval().requires_grad_(False)  # or from_pretrained(...) twice
optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
input_ids = torch.randint(0, 64, (8, 12))  # rows 0-3 chosen, 4-7 rejected, prompt = first 4 tokens
labels = input_ids.masked_fill(torch.arange(12) < 4, -100)  # score only the response tokens

for step in range(10):
    logps = sequence_logprobs(policy(input_ids).logits, labels)  # (8,) summed response log-probs
    with torch.no_grad():
        ref_logps = sequence_logprobs(reference(input_ids).logits, labels)
    losses, chosen_rewards, rejected_rewards = dpo_loss(*logps.chunk(2), *ref_logps.chunk(2), beta=0.1)
    losses.mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}  loss {losses.mean().item():.4f}  reward accuracy {(chosen_rewards > rejected_rewards).float().mean().item():.2f}")
