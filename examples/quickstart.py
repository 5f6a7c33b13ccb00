"""The README's runnable example: fused entropy + log-prob on CPU, checked against the float64 spec."""
import torch

from hero_kernels import entropy_logprob, linear_entropy_logprob, reference

torch.manual_seed(0)
B, T, D, V = 2, 16, 64, 1003  # odd vocabulary on purpose
hidden = torch.randn(B, T, D, requires_grad=True)
lm_head = torch.randn(V, D) / D**0.5
lm_head.requires_grad_(True)
labels = torch.randint(0, V, (B, T))
labels[:, :4] = -100  # prompt tokens: masked

# 1) from logits
logits = hidden @ lm_head.t()
logp, H = entropy_logprob(logits, labels, temperature=0.7)
# 2) fused LM head: same numbers, no [B*T, V] logits kept for backward
logp2, H2 = linear_entropy_logprob(hidden, lm_head, labels, temperature=0.7)

ref_logp, ref_H, _ = reference.entropy_logprob(logits.detach(), labels, temperature=0.7)
print(f"entropy_logprob         max |logp - ref| = {(logp - ref_logp).abs().max():.2e}  max |H - ref| = {(H - ref_H).abs().max():.2e}")
print(f"linear_entropy_logprob  max |logp - ref| = {(logp2 - ref_logp).abs().max():.2e}  max |H - ref| = {(H2 - ref_H).abs().max():.2e}")
valid = labels != -100
print(f"mean entropy {H[valid].mean():.3f} nats (log V = {torch.log(torch.tensor(float(V))):.3f}), mean logp {logp[valid].mean():.3f}")
(-(logp2 * valid).sum() + 0.1 * H2.sum()).backward()
print(f"grad norms: hidden {hidden.grad.norm():.3f}, lm_head {lm_head.grad.norm():.3f}")
